// GEGLU's feed-forward projection for CPUs with AVX2 and FMA but no AVX-512 (latentdiff.models.fma compiles this file
// with the system's g++ on first use and calls it through ctypes): y = value * gelu(gate), [value | gate] = x W^T + b.
// On such CPUs oneDNN's float32 products with its GELU and multiply epilogues (packed.PackedGEGLU) ran SD 1.5's
// 64x64 feed-forward at ~70-100 GFLOP/s on 2 cores, where its plain products reach 110-140. Here the product is a
// grid of 6-row x 16-column output tiles, each held in 12 registers while a panel of the packed weight (8 value
// columns and their 8 gate columns, every depth's 16 numbers side by side) meets 6 rows of the input (read in place,
// broadcast one number at a time); a block of MC input rows (in L2) meets every panel in turn, and the tile applies
// the gate as it writes (the exact GELU; erf to 1.5e-7). The depth is summed in blocks of KC, each from zero, the
// blocks' sums added (errors against float64 as oneDNN's or below). OpenMP threads take blocks of rows and panels.
#include <immintrin.h>
#include <stdint.h>

#include <algorithm>

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

template <int R>
void tiles(const Product& p, int64_t m, int64_t rows, int64_t j) {
    for (; rows >= R; rows -= R, m += R) tile<R>(p, m, j);
    if constexpr (R > 1) {
        if (rows > 0) tiles<R - 1>(p, m, rows, j);
    }
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
            for (int64_t j = g * group; j < std::min(panels, (g + 1) * group); ++j) tiles<6>(p, m0, rows, j);
        }
    }
}

}  // extern "C"
