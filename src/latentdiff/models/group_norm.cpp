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

#include <algorithm>
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

// Channels-last sums over pixels: a pixel holds every channel, so each sample's pixels are cut into spans, each span
// sums into its own row of C partial sums, and a sample's rows are then added in span order. The rows grow with the
// spans (about two per thread), not with threads x samples (60 MB a call for 64 threads at batch 32 and 1280
// channels), and the result does not depend on which thread ran which span.
struct Spans {
    int64_t per_sample, length;  // spans per sample, pixels per span (the last one may be shorter, or empty)
    Spans(int64_t N, int64_t P, int threads)
        : per_sample(std::max<int64_t>(1, std::min<int64_t>((2 * threads + N - 1) / N, (P + 15) / 16))),
          length((P + per_sample - 1) / per_sample) {}
    int64_t first(int64_t span, int64_t P) const { return span / per_sample * P + span % per_sample * length; }
    int64_t last(int64_t span, int64_t P) const {
        return std::min(first(span, P) + length, (span / per_sample + 1) * P);
    }
};

}  // namespace

// out = act(gamma_c (v - mean_g) / sqrt(var_g + eps) + beta_c), v = x + shift_c (shift per sample, `shift_ns` floats
// apart: 0 for one shift for every sample; shift may be null), for x [N][C][P] (channels_last = 0) or [N][P][C]
// (1), contiguous, C a multiple of G; act: SiLU if `silu`, else none. out may be x. `stats` (may be null): each
// group's mean and 1 / sqrt(var + eps), [N][G][2], for group_norm_backward. Returns nonzero where it cannot
// allocate its statistics.
extern "C" int group_norm(const float* x, int64_t N, int64_t C, int64_t P, int channels_last, int64_t G,
                          const float* shift, int64_t shift_ns, const float* gamma, const float* beta, float eps,
                          int silu, float* out, double* stats, int threads) {
    const int64_t per_group = C / G;
    const Spans spans(N, P, threads);
    std::vector<double> sums, squares, partial;  // partial: channels-last, per span [2][C]: sums, sums of squares
    std::vector<float> a, b;  // out = act(a x + b), per sample and channel
    try {
        sums.resize(N * C);
        squares.resize(N * C);
        partial.assign(channels_last ? N * spans.per_sample * C * 2 : 0, 0.0);
        a.resize(N * C);
        b.resize(N * C);
    } catch (...) {
        return 1;
    }
#pragma omp parallel num_threads(threads)
    {
        const FlushSubnormals flushing;
        // pass 1: every channel's sum and sum of squares
        if (channels_last) {
#pragma omp for schedule(static)
            for (int64_t span = 0; span < N * spans.per_sample; ++span) {
                double* sum = partial.data() + span * C * 2;  // C sums, then C sums of squares
                double* square = sum + C;
                for (int64_t row = spans.first(span, P); row < spans.last(span, P); ++row) {
                    const float* v = x + row * C;  // C channels side by side
                    int64_t c = 0;
                    for (; c + LANES / 2 <= C; c += LANES / 2) {
                        HalfVec half;
                        memcpy(&half, v + c, sizeof half);
                        const VecD value = __builtin_convertvector(half, VecD);
                        VecD s, q;
                        memcpy(&s, sum + c, sizeof s);
                        memcpy(&q, square + c, sizeof q);
                        s += value;
                        q += value * value;
                        memcpy(sum + c, &s, sizeof s);
                        memcpy(square + c, &q, sizeof q);
                    }
                    for (; c < C; ++c) {
                        const double value = v[c];
                        sum[c] += value;
                        square[c] += value * value;
                    }
                }
            }
#pragma omp for collapse(2) schedule(static)
            for (int64_t n = 0; n < N; ++n) {
                for (int64_t c = 0; c < C; ++c) {
                    double sum = 0, square = 0;
                    for (int64_t j = 0; j < spans.per_sample; ++j) {
                        sum += partial[(n * spans.per_sample + j) * C * 2 + c];
                        square += partial[(n * spans.per_sample + j) * C * 2 + C + c];
                    }
                    sums[n * C + c] = sum;
                    squares[n * C + c] = square;
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
                sums[row] = total;
                squares[row] = total_square;
            }
        }
        // the groups' statistics, and each channel's a and b
#pragma omp for collapse(2) schedule(static)
        for (int64_t n = 0; n < N; ++n) {
            for (int64_t g = 0; g < G; ++g) {
                double sum = 0, square = 0;
                for (int64_t c = g * per_group; c < (g + 1) * per_group; ++c) {
                    const double cs = sums[n * C + c], cq = squares[n * C + c];
                    // with the shift h: sum (x + h) = cs + P h, sum (x + h)^2 = cq + 2 h cs + P h^2
                    const double h = shift ? shift[n * shift_ns + c] : 0.0;
                    sum += cs + P * h;
                    square += cq + 2 * h * cs + P * h * h;
                }
                const double count = double(per_group) * P, mean = sum / count;
                const double variance = square / count - mean * mean;
                const double rstd = 1.0 / sqrt((variance > 0 ? variance : 0) + eps);
                if (stats) {
                    stats[2 * (n * G + g)] = mean;
                    stats[2 * (n * G + g) + 1] = rstd;
                }
                for (int64_t c = g * per_group; c < (g + 1) * per_group; ++c) {
                    const double h = shift ? shift[n * shift_ns + c] : 0.0;
                    const double scale = gamma[c] * rstd;
                    a[n * C + c] = scale;
                    b[n * C + c] = beta[c] + (h - mean) * scale;
                }
            }
        }
        // pass 2: out = act(a x + b)
        if (channels_last) {
#pragma omp for collapse(2) schedule(static)
            for (int64_t n = 0; n < N; ++n) {
                for (int64_t pixel = 0; pixel < P; ++pixel) {
                    const int64_t row = n * P + pixel;
                    by_vectors(C, [&](int64_t c, auto lanes) {
                        const Vec y = load(x + row * C + c, lanes) * load(a.data() + n * C + c, lanes)
                                      + load(b.data() + n * C + c, lanes);
                        store(activate(y, silu), lanes, out + row * C + c);
                    });
                }
            }
        } else {
#pragma omp for schedule(static)
            for (int64_t row = 0; row < N * C; ++row) {
                const float scale = a[row], offset = b[row];
                by_vectors(P, [&](int64_t p, auto lanes) {
                    const Vec y = load(x + row * P + p, lanes) * scale + offset;
                    store(activate(y, silu), lanes, out + row * P + p);
                });
            }
        }
    }
    return 0;
}

namespace {

// z = gamma x^ + beta and dL/dz from dL/dout = g, where out = act(z): g sigma(z) (1 + z (1 - sigma(z))) for the
// SiLU, g itself without it.
inline Vec activation_grad(Vec g, Vec xhat, Vec gamma, Vec beta, bool silu) {
    if (!silu) return g;
    const Vec z = gamma * xhat + beta;
    const Vec sigma = 1.f / (1.f + exp_lanes(-z));
    return g * sigma * (1.f + z * (1.f - sigma));
}

constexpr int64_t FLUSH = 64;  // pixels summed in float before their sums go into the double totals

// The sum of v's lanes by halving the vector (a short row's sums: a few adds, not a chain of LANES).
inline float sum_lanes(Vec v) {
    typedef float Quarter __attribute__((vector_size(LANES / 4 * sizeof(float))));
    HalfVec low, high;
    memcpy(&low, &v, sizeof low);
    memcpy(&high, reinterpret_cast<const char*>(&v) + sizeof low, sizeof high);
    const HalfVec half = low + high;
    Quarter a, b;
    memcpy(&a, &half, sizeof a);
    memcpy(&b, reinterpret_cast<const char*>(&half) + sizeof a, sizeof b);
    const Quarter quarter = a + b;
    float total = 0.f;
    for (int l = 0; l < LANES / 4; ++l) total += quarter[l];
    return total;
}

}  // namespace

// The gradients of group_norm's out = act(gamma_c x^ + beta_c), x^ = (x + shift_c - mean_g) rstd_g, from dL/dout = g
// (x's layout) and the forward's `stats`: dL/dx into gx (may be g), dL/dgamma and dL/dbeta into grad_gamma and
// grad_beta [C], and where grad_shift is not null dL/dshift into it (shift's shape: [N][C], or [C] where shift_ns is
// 0). Two passes: the first reads x and g, writes dL/dz into gx and sums per sample and channel what the groups'
// dL/dx needs; the second reads x and dL/dz and writes
// dL/dx = rstd (gamma_c dL/dz - mean_group(gamma dL/dz) - x^ mean_group(gamma dL/dz x^)).
// Returns nonzero where it cannot allocate its sums.
extern "C" int group_norm_backward(const float* x, const float* g, int64_t N, int64_t C, int64_t P, int channels_last,
                                   int64_t G, const float* shift, int64_t shift_ns, const float* gamma,
                                   const float* beta, const double* stats, int silu, float* gx, float* grad_gamma,
                                   float* grad_beta, float* grad_shift, int threads) {
    const int64_t per_group = C / G, NC = N * C;
    // channels-last: each span of pixels sums in float over up to FLUSH pixels (a thread's `blocks`), then into its
    // own double sums; NCHW: a channel's pixels are one thread's
    const Spans spans(N, P, threads);
    std::vector<float> coefficients, blocks;
    std::vector<double> sums, partial;  // [N][C][3]: dL/dz x^, dL/dz, x; channels-last per span [C][3]
    try {
        coefficients.resize(5 * NC);
        blocks.resize(channels_last ? threads * 3 * C : 0);
        sums.assign(NC * 3, 0.0);
        partial.assign(channels_last ? N * spans.per_sample * C * 3 : 0, 0.0);
    } catch (...) {
        return 1;
    }
    // per sample and channel: x^ = r x + v, dL/dx = p dL/dz + q x^ + o
    float *r = coefficients.data(), *v = r + NC, *p = v + NC, *q = p + NC, *o = q + NC;
#pragma omp parallel num_threads(threads)
    {
        const FlushSubnormals flushing;
        // (nested loops: no integer division per channel, which cost more than a small map's pixels)
#pragma omp for collapse(2) schedule(static)
        for (int64_t n = 0; n < N; ++n) {
            for (int64_t grp = 0; grp < G; ++grp) {
                const double mean = stats[2 * (n * G + grp)], rstd = stats[2 * (n * G + grp) + 1];
                for (int64_t c = grp * per_group; c < (grp + 1) * per_group; ++c) {
                    r[n * C + c] = rstd;
                    v[n * C + c] = ((shift ? shift[n * shift_ns + c] : 0.0) - mean) * rstd;
                }
            }
        }
        // pass 1: the sums
        if (channels_last) {
            float* block = blocks.data() + omp_get_thread_num() * 3 * C;
#pragma omp for schedule(static)
            for (int64_t span = 0; span < N * spans.per_sample; ++span) {
                const int64_t n = span / spans.per_sample, end = spans.last(span, P);
                double* mine = partial.data() + span * C * 3;
                for (int64_t first = spans.first(span, P); first < end; first += FLUSH) {
                    std::fill(block, block + 3 * C, 0.f);
                    for (int64_t row = first; row < std::min(first + FLUSH, end); ++row) {
                        by_vectors(C, [&](int64_t c, auto lanes) {
                            const Vec value = load(x + row * C + c, lanes);
                            const Vec xhat = value * load(r + n * C + c, lanes) + load(v + n * C + c, lanes);
                            const Vec gz = activation_grad(load(g + row * C + c, lanes), xhat,
                                                           load(gamma + c, lanes), load(beta + c, lanes), silu);
                            store(gz, lanes, gx + row * C + c);
                            store(load(block + c, lanes) + gz * xhat, lanes, block + c);
                            store(load(block + C + c, lanes) + gz, lanes, block + C + c);
                            store(load(block + 2 * C + c, lanes) + value, lanes, block + 2 * C + c);
                        });
                    }
                    for (int64_t c = 0; c < C; ++c) {
                        for (int k = 0; k < 3; ++k) mine[c * 3 + k] += block[k * C + c];
                    }
                }
            }
            // each sample's spans, in order
#pragma omp for collapse(2) schedule(static)
            for (int64_t n = 0; n < N; ++n) {
                for (int64_t j = 0; j < 3 * C; ++j) {
                    double total = 0;
                    for (int64_t span = n * spans.per_sample; span < (n + 1) * spans.per_sample; ++span) {
                        total += partial[span * C * 3 + j];
                    }
                    sums[n * C * 3 + j] = total;
                }
            }
        } else {
#pragma omp for collapse(2) schedule(static)
            for (int64_t n = 0; n < N; ++n) {
              for (int64_t c = 0; c < C; ++c) {  // a channel
                const int64_t row = n * C + c;
                const Vec rr = Vec{} + r[row], vv = Vec{} + v[row], gg = Vec{} + gamma[c], bb = Vec{} + beta[c];
                for (int64_t start = 0; start < P; start += FLUSH * LANES) {
                    Vec a = {}, b = {}, total = {};
                    const int64_t end = std::min(P, start + FLUSH * LANES);
                    by_vectors(end - start, [&](int64_t j, auto lanes) {
                        const int64_t i = start + j;
                        const Vec value = load(x + row * P + i, lanes);
                        const Vec xhat = value * rr + vv;  // (past the end, g reads as 0, so dL/dz is 0)
                        const Vec gz = activation_grad(load(g + row * P + i, lanes), xhat, gg, bb, silu);
                        store(gz, lanes, gx + row * P + i);
                        a += gz * xhat;
                        b += gz;
                        total += value;
                    });
                    sums[row * 3] += sum_lanes(a);
                    sums[row * 3 + 1] += sum_lanes(b);
                    sums[row * 3 + 2] += sum_lanes(total);
                }
              }
            }
        }
        // each group's means of gamma dL/dz and of gamma dL/dz x^, its channels' p, q, o and dL/dshift (in place of
        // the sum of x: the sum over pixels of dL/dx, p sum dL/dz + q sum x^ + o P, where sum x^ = r sum x + P v)
#pragma omp for collapse(2) schedule(static)
        for (int64_t n = 0; n < N; ++n) {
            for (int64_t grp = 0; grp < G; ++grp) {
                const int64_t first = grp * per_group, last = first + per_group;  // its channels
                double m1 = 0, m2 = 0;
                for (int64_t c = first; c < last; ++c) {
                    m2 += gamma[c] * sums[(n * C + c) * 3];
                    m1 += gamma[c] * sums[(n * C + c) * 3 + 1];
                }
                const double rstd = stats[2 * (n * G + grp) + 1], scale = -rstd / (double(per_group) * P);
                for (int64_t c = first; c < last; ++c) {
                    const int64_t nc = n * C + c;
                    p[nc] = rstd * gamma[c];
                    q[nc] = scale * m2;
                    o[nc] = scale * m1;
                    double* sum = sums.data() + nc * 3;
                    const double sum_xhat = double(r[nc]) * sum[2] + double(P) * v[nc];
                    sum[2] = double(p[nc]) * sum[1] + double(q[nc]) * sum_xhat + double(o[nc]) * P;
                    if (grad_shift && shift_ns) grad_shift[nc] = float(sum[2]);
                }
            }
        }
        // dL/dgamma, dL/dbeta (and dL/dshift of a shift that every sample shares): sums over the samples
#pragma omp for schedule(static)
        for (int64_t c = 0; c < C; ++c) {
            double total[3] = {0, 0, 0};
            for (int64_t n = 0; n < N; ++n) {
                for (int k = 0; k < 3; ++k) total[k] += sums[(n * C + c) * 3 + k];
            }
            grad_gamma[c] = float(total[0]);
            grad_beta[c] = float(total[1]);
            if (grad_shift && !shift_ns) grad_shift[c] = float(total[2]);
        }
        // pass 2: dL/dx from dL/dz, which pass 1 left in gx
        if (channels_last) {
#pragma omp for schedule(static)
            for (int64_t row = 0; row < N * P; ++row) {
                const int64_t nc = row / P * C;
                by_vectors(C, [&](int64_t c, auto lanes) {
                    const Vec xhat = load(x + row * C + c, lanes) * load(r + nc + c, lanes) + load(v + nc + c, lanes);
                    const Vec gz = load(gx + row * C + c, lanes);
                    store(load(p + nc + c, lanes) * gz + load(q + nc + c, lanes) * xhat + load(o + nc + c, lanes),
                          lanes, gx + row * C + c);
                });
            }
        } else {
#pragma omp for schedule(static)
            for (int64_t row = 0; row < NC; ++row) {
                const Vec rr = Vec{} + r[row], vv = Vec{} + v[row];
                by_vectors(P, [&](int64_t i, auto lanes) {
                    const Vec xhat = load(x + row * P + i, lanes) * rr + vv;
                    const Vec gz = load(gx + row * P + i, lanes);
                    store(p[row] * gz + q[row] * xhat + o[row], lanes, gx + row * P + i);
                });
            }
        }
    }
    return 0;
}
