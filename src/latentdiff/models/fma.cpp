// Float32 kernels for CPUs with AVX2 and FMA but no AVX-512 (latentdiff.models.fma compiles this file with the
// system's g++ on first use and calls it through ctypes): GEGLU's feed-forward projection, y = value * gelu(gate) with
// [value | gate] = x W^T + b, and attention. Both are grids of 6-row x 16-column output tiles held in 12 registers
// while a 16-column panel of packed weights (or keys, or values; every depth's 16 numbers side by side) meets 6 rows
// of the input (read in place, broadcast one number at a time). GEGLU: on such CPUs oneDNN's float32 products with
// its GELU and multiply epilogues (packed.PackedGEGLU) ran SD 1.5's 64x64 feed-forward at ~70-100 GFLOP/s on 2
// cores, where its plain products reach 110-140; here a block of MC input rows (in L2) meets every panel in turn
// (8 value columns and their 8 gate columns each), the tile applies the gate as it writes (the exact GELU; erf to
// 1.5e-7), and the depth is summed in blocks of KC, each from zero, the blocks' sums added (errors against float64
// as oneDNN's or below). Attention: see fma_attention. OpenMP threads take blocks of rows and panels, or of queries.
#include <immintrin.h>
#include <stdint.h>

#include <algorithm>
#include <cmath>
#include <new>
#include <type_traits>
#include <vector>

#include "kernels.h"

namespace {

constexpr int KC = 256;  // depth summed per block
constexpr int MC = 72;   // input rows per block (72 KiB at a depth of 256)

// e^x for x <= 0 (to -87; below, e^-87): x = n ln 2 + r, e^r by a degree-7 polynomial (Cephes' expf coefficients)
inline __m256 exp_nonpositive(__m256 x) {
    x = _mm256_max_ps(x, _mm256_set1_ps(-87.f));
    const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504f)),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 p = _mm256_set1_ps(1.9875691500e-4f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
    p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.f)));
    const __m256i scale = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(scale));
}

// the exact GELU, x (1 + erf(x / sqrt 2)) / 2, with erf by Abramowitz & Stegun's 7.1.26 (absolute error < 1.5e-7)
inline __m256 gelu(__m256 x) {
    const __m256 one = _mm256_set1_ps(1.f), sign = _mm256_set1_ps(-0.f);
    const __m256 z = _mm256_mul_ps(x, _mm256_set1_ps(0.70710678f)), a = _mm256_andnot_ps(sign, z);
    const __m256 t = _mm256_div_ps(one, _mm256_fmadd_ps(a, _mm256_set1_ps(0.3275911f), one));
    __m256 r = _mm256_fmadd_ps(_mm256_set1_ps(1.061405429f), t, _mm256_set1_ps(-1.453152027f));
    r = _mm256_fmadd_ps(r, t, _mm256_set1_ps(1.421413741f));
    r = _mm256_fmadd_ps(r, t, _mm256_set1_ps(-0.284496736f));
    r = _mm256_fmadd_ps(r, t, _mm256_set1_ps(0.254829592f));
    r = _mm256_mul_ps(r, t);
    const __m256 erf_abs = _mm256_fnmadd_ps(r, exp_nonpositive(_mm256_sub_ps(_mm256_setzero_ps(), _mm256_mul_ps(a, a))),
                                            one);
    const __m256 erf = _mm256_or_ps(erf_abs, _mm256_and_ps(z, sign));
    return _mm256_mul_ps(_mm256_mul_ps(x, _mm256_set1_ps(0.5f)), _mm256_add_ps(one, erf));
}

struct Product {
    const float* x; int64_t ldx;  // input rows
    const float* w;               // packed weight: [N / 16][K][16]
    const float* bias;            // [N], packed order
    float* y; int64_t ldy;        // output rows, N / 2 wide
    int64_t K;
};

// One R-row x 16-column tile of panel j for input rows m.. (named registers, not an array: GCC kept an array of
// accumulators in memory, stored at every step).
template <int R>
inline void tile(const Product& p, int64_t m, int64_t j) {
    const float* w = p.w + j * p.K * 16;
    const float* x0 = p.x + m * p.ldx;
    const float *x1 = x0 + p.ldx, *x2 = x1 + p.ldx, *x3 = x2 + p.ldx, *x4 = x3 + p.ldx, *x5 = x4 + p.ldx;
    __m256 c00, c01, c10, c11, c20, c21, c30, c31, c40, c41, c50, c51;  // row r: values c_r0, gates c_r1
    __m256 s00, s01, s10, s11, s20, s21, s30, s31, s40, s41, s50, s51;  // the sums of the blocks before
#define LATENTDIFF_ROWS(op) op(0) op(1) op(2) op(3) op(4) op(5)
#define LATENTDIFF_BIAS(r) if constexpr (R > r) { s##r##0 = _mm256_loadu_ps(p.bias + 16 * j); \
        s##r##1 = _mm256_loadu_ps(p.bias + 16 * j + 8); }
    LATENTDIFF_ROWS(LATENTDIFF_BIAS)
    for (int64_t k0 = 0; k0 < p.K; k0 += KC) {
        const int64_t k1 = std::min<int64_t>(p.K, k0 + KC);
#define LATENTDIFF_ZERO(r) if constexpr (R > r) { c##r##0 = _mm256_setzero_ps(); c##r##1 = _mm256_setzero_ps(); }
        LATENTDIFF_ROWS(LATENTDIFF_ZERO)
#define LATENTDIFF_FMA(r) if constexpr (R > r) { const __m256 v = _mm256_broadcast_ss(x##r + k); \
        c##r##0 = _mm256_fmadd_ps(v, w0, c##r##0); c##r##1 = _mm256_fmadd_ps(v, w1, c##r##1); }
#pragma GCC unroll 4
        for (int64_t k = k0; k < k1; ++k) {
            const __m256 w0 = _mm256_loadu_ps(w + 16 * k), w1 = _mm256_loadu_ps(w + 16 * k + 8);
            LATENTDIFF_ROWS(LATENTDIFF_FMA)
        }
#define LATENTDIFF_ADD(r) if constexpr (R > r) { s##r##0 = _mm256_add_ps(s##r##0, c##r##0); \
        s##r##1 = _mm256_add_ps(s##r##1, c##r##1); }
        LATENTDIFF_ROWS(LATENTDIFF_ADD)
    }
    float* y = p.y + m * p.ldy + 8 * j;
#define LATENTDIFF_GATE(r) if constexpr (R > r) _mm256_storeu_ps(y + r * p.ldy, _mm256_mul_ps(s##r##0, gelu(s##r##1)));
    LATENTDIFF_ROWS(LATENTDIFF_GATE)
}

// f(std::integral_constant<int, R>{}, m) for the tiles covering rows [m, m + rows): of 6 rows, the last fewer.
template <int R = 6, class F>
inline void row_tiles(int64_t m, int64_t rows, F&& f) {
    for (; rows >= R; rows -= R, m += R) f(std::integral_constant<int, R>{}, m);
    if constexpr (R > 1) {
        if (rows > 0) row_tiles<R - 1>(m, rows, f);
    }
}

// Attention's products: one R-row x 16-column tile of sum over `depth` of x[r][k] w[k][0..16] (x rows ldx apart, w
// a panel of 16 columns), handed to epi(r, c0, c1) row by row.
template <int R, class Epi>
inline void product_tile(const float* x, int64_t ldx, const float* w, int64_t depth, Epi&& epi) {
    const float *x0 = x, *x1 = x0 + ldx, *x2 = x1 + ldx, *x3 = x2 + ldx, *x4 = x3 + ldx, *x5 = x4 + ldx;
    __m256 c00, c01, c10, c11, c20, c21, c30, c31, c40, c41, c50, c51;
    LATENTDIFF_ROWS(LATENTDIFF_ZERO)
#pragma GCC unroll 4
    for (int64_t k = 0; k < depth; ++k) {
        const __m256 w0 = _mm256_loadu_ps(w + 16 * k), w1 = _mm256_loadu_ps(w + 16 * k + 8);
        LATENTDIFF_ROWS(LATENTDIFF_FMA)
    }
#define LATENTDIFF_EPI(r) if constexpr (R > r) epi(r, c##r##0, c##r##1);
    LATENTDIFF_ROWS(LATENTDIFF_EPI)
}

template <class Epi>
void product_tiles(const float* x, int64_t ldx, int64_t rows, const float* w, int64_t depth, Epi&& epi) {
    row_tiles(0, rows, [&](auto R, int64_t m) {
        product_tile<decltype(R)::value>(x + m * ldx, ldx, w, depth,
                                         [&](int r, __m256 a, __m256 c) { epi(m + r, a, c); });
    });
}

constexpr int QUERIES = 24;   // queries per block: their scores, 24 x (keys + 16), stay in L2
constexpr int KEY_BLOCK = 256;  // keys per pass of P V

inline float horizontal_max(__m256 v) {
    __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    return _mm_cvtss_f32(_mm_max_ss(m, _mm_shuffle_ps(m, m, 1)));
}

inline float horizontal_sum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_shuffle_ps(s, s, 1)));
}

// One row of scores (n of them) made its softmax's numerators exp(s - max) in place; returns their sum.
inline float exponentials(float* s, int64_t n) {
    const __m256i lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    const __m256i tail = _mm256_cmpgt_epi32(_mm256_set1_epi32((int)(n % 8)), lanes);
    const int64_t whole = n - n % 8;
    __m256 most = _mm256_set1_ps(-INFINITY);
    for (int64_t i = 0; i < whole; i += 8) most = _mm256_max_ps(most, _mm256_loadu_ps(s + i));
    if (whole < n)
        most = _mm256_max_ps(most, _mm256_blendv_ps(most, _mm256_maskload_ps(s + whole, tail),
                                                     _mm256_castsi256_ps(tail)));
    const __m256 top = _mm256_set1_ps(horizontal_max(most));
    __m256 sum = _mm256_setzero_ps();
    for (int64_t i = 0; i < whole; i += 8) {
        const __m256 e = exp_nonpositive(_mm256_sub_ps(_mm256_loadu_ps(s + i), top));
        _mm256_storeu_ps(s + i, e);
        sum = _mm256_add_ps(sum, e);
    }
    if (whole < n) {
        const __m256 e = _mm256_and_ps(exp_nonpositive(_mm256_sub_ps(_mm256_maskload_ps(s + whole, tail), top)),
                                       _mm256_castsi256_ps(tail));
        _mm256_maskstore_ps(s + whole, tail, e);
        sum = _mm256_add_ps(sum, e);
    }
    return horizontal_sum(sum);
}

}  // namespace

extern "C" {

// y [M][N / 2] = value * gelu(gate) for W [N, K] and its bias packed as fma.pack_geglu lays them out (N a multiple of
// 16), on `threads` OpenMP threads.
void fma_geglu(const float* x, int64_t ldx, const float* w, const float* bias, float* y, int64_t ldy, int64_t M,
               int64_t N, int64_t K, int threads) {
    const Product p{x, ldx, w, bias, y, ldy, K};
    const int64_t panels = N / 16, row_blocks = (M + MC - 1) / MC;
    int64_t split = 1;  // panels split into groups so that there are a few blocks per thread
    while (row_blocks * split < 4 * threads && split < panels) ++split;
    const int64_t group = (panels + split - 1) / split, groups = (panels + group - 1) / group;
#pragma omp parallel for collapse(2) schedule(static) num_threads(threads)
    for (int64_t b = 0; b < row_blocks; ++b) {
        for (int64_t g = 0; g < groups; ++g) {
            FlushSubnormals flush;
            const int64_t m0 = b * MC, rows = std::min<int64_t>(MC, M - m0);
            for (int64_t j = g * group; j < std::min(panels, (g + 1) * group); ++j)
                row_tiles(m0, rows, [&](auto R, int64_t m) { tile<decltype(R)::value>(p, m, j); });
        }
    }
}

// softmax(q k^T scale) v for float32 queries [B][H][Nq][D] and keys and values [B][H][Nk][D], each with strides (in
// floats: batch, head, token; unit along D) in `strides` (q's three, k's, v's, then out's), written to out. Keys are
// packed per head into 16-key panels ([ceil(Nk / 16)][D][16], zeros past Nk) and values into 16-column panels
// ([ceil(D / 16)][Nk][16], zeros past D); each block of QUERIES queries makes its scores S = q K^T by product tiles,
// each row's exp(s - max) and sum in place, then P V over KEY_BLOCK keys at a time into an accumulator, divided by the
// sums as it is written. Returns 1 where the buffers cannot be allocated, else 0.
int fma_attention(const float* q, const float* k, const float* v, float* out, const int64_t* strides, int64_t B,
                  int64_t H, int64_t Nq, int64_t Nk, int64_t D, float scale, int threads) {
    const int64_t key_panels = (Nk + 15) / 16, value_panels = (D + 15) / 16, heads = B * H;
    const int64_t ls = 16 * key_panels + 16;  // the scores' row stride (rows 16 KiB apart would share an L1 set)
    thread_local std::vector<float> keys, values;  // kept between a thread's calls: no fresh pages every call
    try {
        keys.assign(heads * key_panels * D * 16, 0.f);
        values.assign(heads * value_panels * Nk * 16, 0.f);
    } catch (const std::bad_alloc&) {
        return 1;
    }
    float* const packed_keys = keys.data();  // (the workers below see other thread_local instances of the vectors)
    float* const packed_values = values.data();
    const int64_t* qs = strides; const int64_t* ks = strides + 3; const int64_t* vs = strides + 6;
    const int64_t* os = strides + 9;
#pragma omp parallel for num_threads(threads)
    for (int64_t h = 0; h < heads; ++h) {
        const float* kh = k + (h / H) * ks[0] + (h % H) * ks[1];
        const float* vh = v + (h / H) * vs[0] + (h % H) * vs[1];
        float* kp = packed_keys + h * key_panels * D * 16;
        float* vp = packed_values + h * value_panels * Nk * 16;
        for (int64_t n = 0; n < Nk; ++n)
            for (int64_t d = 0; d < D; ++d) {
                kp[((n / 16) * D + d) * 16 + n % 16] = kh[n * ks[2] + d] * scale;
                vp[((d / 16) * Nk + n) * 16 + d % 16] = vh[n * vs[2] + d];
            }
    }
    const int64_t blocks = (Nq + QUERIES - 1) / QUERIES;
    int failed = 0;
#pragma omp parallel num_threads(threads) reduction(| : failed)
    {
        thread_local std::vector<float> scores, sums;
        try {
            scores.resize(QUERIES * ls);
            sums.resize(QUERIES * value_panels * 16);
        } catch (const std::bad_alloc&) {
            failed = 1;
        }
        float total[QUERIES];
#pragma omp for collapse(2) schedule(dynamic, 4)  // (dynamic: a thread that loses its core holds up no other)
        for (int64_t h = 0; h < heads; ++h) {
            for (int64_t b = 0; b < blocks; ++b) {
                if (failed) continue;
                FlushSubnormals flush;
                const int64_t m0 = b * QUERIES, rows = std::min<int64_t>(QUERIES, Nq - m0);
                const float* qb = q + (h / H) * qs[0] + (h % H) * qs[1] + m0 * qs[2];
                float* S = scores.data();
                for (int64_t j = 0; j < key_panels; ++j)
                    product_tiles(qb, qs[2], rows, packed_keys + (h * key_panels + j) * D * 16, D,
                                  [&](int64_t r, __m256 a, __m256 c) {
                                      _mm256_storeu_ps(S + r * ls + 16 * j, a);
                                      _mm256_storeu_ps(S + r * ls + 16 * j + 8, c);
                                  });
                for (int64_t r = 0; r < rows; ++r) total[r] = exponentials(S + r * ls, Nk);
                std::fill(sums.begin(), sums.end(), 0.f);
                for (int64_t k0 = 0; k0 < Nk; k0 += KEY_BLOCK) {
                    const int64_t depth = std::min<int64_t>(KEY_BLOCK, Nk - k0);
                    for (int64_t c = 0; c < value_panels; ++c)
                        product_tiles(S + k0, ls, rows, packed_values + ((h * value_panels + c) * Nk + k0) * 16,
                                      depth, [&](int64_t r, __m256 a, __m256 e) {
                                          float* o = sums.data() + (r * value_panels + c) * 16;
                                          _mm256_storeu_ps(o, _mm256_add_ps(_mm256_loadu_ps(o), a));
                                          _mm256_storeu_ps(o + 8, _mm256_add_ps(_mm256_loadu_ps(o + 8), e));
                                      });
                }
                float* ob = out + (h / H) * os[0] + (h % H) * os[1] + m0 * os[2];
                for (int64_t r = 0; r < rows; ++r) {
                    const float inverse = 1.f / total[r];
                    for (int64_t d = 0; d < D; ++d) ob[r * os[2] + d] = sums[r * value_panels * 16 + d] * inverse;
                }
            }
        }
    }
    return failed;
}

}  // extern "C"
