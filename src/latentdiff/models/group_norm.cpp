// GroupNorm (+ the timestep bias before it, + SiLU after it) for float32 activations on the CPU, for
// latentdiff.models.group_norm, which compiles this file with the system's g++ on first use (-O3 -march=native) and
// calls it through ctypes. PyTorch makes three passes over memory for norm(x) and two more for the SiLU (and two for
// a bias add); here one pass takes every channel's sum and sum of squares (in double: no E[x^2] - E[x]^2
// cancellation at float32's scale), the groups' statistics come from those, and a second pass writes
// silu(a_c x + b_c). Large maps are bound by memory: the SD VAE decoder's 128 x 512 x 512 map took 90 ms in PyTorch
// (2 threads). Both layouts: NCHW and channels-last (NHWC). Portable C++ (GCC's vector extension).
#include <math.h>
#include <stdint.h>
#include <string.h>

#include <vector>

#include <omp.h>

#include "kernels.h"

namespace {

typedef int32_t VecI __attribute__((vector_size(LANES * sizeof(int32_t))));
typedef float HalfVec __attribute__((vector_size(LANES / 2 * sizeof(float))));
typedef double VecD __attribute__((vector_size(LANES / 2 * sizeof(double))));

// e^x lane by lane, within ~2 ulp of float32's: x = n ln 2 + r, |r| <= ln 2 / 2 (Cody & Waite's two-part ln 2),
// e^r by the Cephes library's expf polynomial, 2^n into the exponent bits. x is clamped to [-87, 88] (finite,
// normal results), which the SiLU below cannot tell from the true value.
inline Vec exp_lanes(Vec x) {
    x = x < -87.f ? Vec{} - 87.f : x;
    x = x > 88.f ? Vec{} + 88.f : x;
    const Vec rounded = x * 1.44269504088896341f + 12582912.f;  // + 1.5 * 2^23: rounds to an integer
    const Vec n = rounded - 12582912.f;
    const Vec r = x - n * 0.693359375f + n * 2.12194440e-4f;
    Vec p = Vec{} + 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    const Vec e = p * r * r + r + 1.f;
    return (Vec)((VecI)e + (__builtin_convertvector(n, VecI) << 23));
}

inline Vec activate(Vec y, bool silu) { return silu ? y / (1.f + exp_lanes(-y)) : y; }

}  // namespace

// out = act(gamma_c (v - mean_g) / sqrt(var_g + eps) + beta_c), v = x + shift_c (shift per sample, `shift_ns` floats
// apart: 0 for one shift for every sample; shift may be null), for x [N][C][P] (channels_last = 0) or [N][P][C]
// (1), contiguous, C a multiple of G; act: SiLU if `silu`, else none. out may be x. Returns nonzero where it cannot
// allocate its statistics.
extern "C" int group_norm(const float* x, int64_t N, int64_t C, int64_t P, int channels_last, int64_t G,
                          const float* shift, int64_t shift_ns, const float* gamma, const float* beta, float eps,
                          int silu, float* out, int threads) {
    const int64_t per_group = C / G;
    std::vector<double> sums, squares;
    std::vector<float> a, b;  // out = act(a x + b), per sample and channel
    try {
        sums.assign(threads * N * C, 0.0);
        squares.assign(threads * N * C, 0.0);
        a.resize(N * C);
        b.resize(N * C);
    } catch (...) {
        return 1;
    }
    // pass 1: every channel's sum and sum of squares, per thread
#pragma omp parallel num_threads(threads)
    {
        const FlushSubnormals flushing;
        double* s = sums.data() + omp_get_thread_num() * N * C;
        double* q = squares.data() + omp_get_thread_num() * N * C;
        if (channels_last) {
#pragma omp for schedule(static)
            for (int64_t row = 0; row < N * P; ++row) {  // a pixel: C channels side by side
                const int64_t n = row / P;
                const float* v = x + row * C;
                double* sn = s + n * C;
                double* qn = q + n * C;
                for (int64_t c = 0; c < C; ++c) {
                    const double value = v[c];
                    sn[c] += value;
                    qn[c] += value * value;
                }
            }
        } else {
#pragma omp for schedule(static)
            for (int64_t row = 0; row < N * C; ++row) {  // a channel: P pixels side by side
                const float* v = x + row * P;
                VecD sum = {}, square = {};  // (lane-wise partial sums: a single sum would be one long chain)
                int64_t p = 0;
                for (; p + LANES / 2 <= P; p += LANES / 2) {
                    HalfVec half;
                    memcpy(&half, v + p, sizeof half);
                    const VecD value = __builtin_convertvector(half, VecD);
                    sum += value;
                    square += value * value;
                }
                double total = 0, total_square = 0;
                for (int l = 0; l < LANES / 2; ++l) {
                    total += sum[l];
                    total_square += square[l];
                }
                for (; p < P; ++p) {
                    total += v[p];
                    total_square += double(v[p]) * v[p];
                }
                s[row] += total;
                q[row] += total_square;
            }
        }
    }
    // the groups' statistics, and each channel's a and b
    for (int64_t n = 0; n < N; ++n) {
        for (int64_t g = 0; g < G; ++g) {
            double sum = 0, square = 0;
            for (int64_t c = g * per_group; c < (g + 1) * per_group; ++c) {
                double cs = 0, cq = 0;
                for (int t = 0; t < threads; ++t) {
                    cs += sums[(t * N + n) * C + c];
                    cq += squares[(t * N + n) * C + c];
                }
                // with the shift h: sum (x + h) = cs + P h, sum (x + h)^2 = cq + 2 h cs + P h^2
                const double h = shift ? shift[n * shift_ns + c] : 0.0;
                sum += cs + P * h;
                square += cq + 2 * h * cs + P * h * h;
            }
            const double count = double(per_group) * P, mean = sum / count;
            const double variance = square / count - mean * mean;
            const double rstd = 1.0 / sqrt((variance > 0 ? variance : 0) + eps);
            for (int64_t c = g * per_group; c < (g + 1) * per_group; ++c) {
                const double h = shift ? shift[n * shift_ns + c] : 0.0;
                const double scale = gamma[c] * rstd;
                a[n * C + c] = scale;
                b[n * C + c] = beta[c] + (h - mean) * scale;
            }
        }
    }
    // pass 2: out = act(a x + b)
#pragma omp parallel num_threads(threads)
    {
        const FlushSubnormals flushing;
        if (channels_last) {
#pragma omp for schedule(static)
            for (int64_t row = 0; row < N * P; ++row) {
                const int64_t n = row / P;
                for (int64_t c = 0; c < C; c += LANES) {
                    const int lanes = C - c < LANES ? int(C - c) : LANES;
                    const Vec y = load(x + row * C + c, lanes) * load(a.data() + n * C + c, lanes)
                                  + load(b.data() + n * C + c, lanes);
                    store(activate(y, silu), lanes, out + row * C + c);
                }
            }
        } else {
#pragma omp for schedule(static)
            for (int64_t row = 0; row < N * C; ++row) {
                const float scale = a[row], offset = b[row];
                for (int64_t p = 0; p < P; p += LANES) {
                    const int lanes = P - p < LANES ? int(P - p) : LANES;
                    const Vec y = load(x + row * P + p, lanes) * scale + offset;
                    store(activate(y, silu), lanes, out + row * P + p);
                }
            }
        }
    }
    return 0;
}
