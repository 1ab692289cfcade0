// Float32 kernels for CPUs with AVX2 and FMA but no AVX-512 (latentdiff.models.fma compiles this file with the
// system's g++ on first use and calls it through ctypes): GEGLU's feed-forward projection, y = value * gelu(gate) with
// [value | gate] = x W^T + b, and attention. Both are grids of 6-row x 16-column output tiles held in 12 registers
// while a 16-column panel (every depth's 16 numbers side by side: packed weights, or 16 queries) meets 6 rows (read in
// place, broadcast one number at a time: input rows, or keys, or the values' dims). GEGLU: on such CPUs oneDNN's
// float32 products with its GELU and multiply epilogues (packed.PackedGEGLU) ran SD 1.5's 64x64 feed-forward at
// ~70-100 GFLOP/s on 2 cores, where its plain products reach 110-140; here a block of MC input rows (in L2) meets
// every panel in turn (8 value columns and their 8 gate columns each), the tile applies the gate as it writes (the
// exact GELU; erf to 1.5e-7), and the depth is summed in blocks of KC, each from zero, the blocks' sums added (errors
// against float64 as oneDNN's or below). Attention: see fma_attention. OpenMP threads take blocks of rows and panels,
// or of queries.
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

// 2^x for x <= 0 (to -125; below, 2^-125): x = n + r, |r| <= 1/2, 2^r by a degree-6 polynomial (fitted to 2^r
// on [-1/2, 1/2] by least relative squares: relative error 1e-7 in float32), 2^n added to its exponent. NaN stays NaN.
inline __m256 exp2_nonpositive(__m256 x) {
    x = _mm256_max_ps(_mm256_set1_ps(-125.f), x);  // (max returns its second operand where either is a NaN)
    const __m256 n = _mm256_round_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC), r = _mm256_sub_ps(x, n);
    __m256 p = _mm256_set1_ps(1.5337577e-4f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3399860e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(9.6185198e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.5503290e-2f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(2.4022646e-1f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(6.9314718e-1f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f));
    return _mm256_castsi256_ps(_mm256_add_epi32(_mm256_castps_si256(p),
                                                _mm256_slli_epi32(_mm256_cvtps_epi32(n), 23)));
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
    const __m256 erf_abs = _mm256_fnmadd_ps(r, exp2_nonpositive(_mm256_mul_ps(_mm256_mul_ps(a, a),
                                                                              _mm256_set1_ps(-1.44269504f))), one);
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
// (row r's number at depth k: x_r[k * step]; attention's products step along the values' rows)
#define LATENTDIFF_FMA(r) if constexpr (R > r) { const __m256 v = _mm256_broadcast_ss(x##r + k * step); \
        c##r##0 = _mm256_fmadd_ps(v, w0, c##r##0); c##r##1 = _mm256_fmadd_ps(v, w1, c##r##1); }
        constexpr int64_t step = 1;
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

// Attention's products: one R-row x 16-column tile of sum over `depth` of x[r][k] w[k][0..16] (w a panel of 16
// columns), handed to epi(r, c0, c1) row by row. x's rows are ldx apart and unit along the depth (the keys, for the
// scores), or with ADJACENT unit apart and ldx along the depth (the values' columns, for P V).
template <int R, bool ADJACENT = false, class Epi>
inline void product_tile(const float* x, int64_t ldx, const float* w, int64_t depth, Epi&& epi) {
    const int64_t row = ADJACENT ? 1 : ldx, step = ADJACENT ? ldx : 1;
    const float *x0 = x, *x1 = x0 + row, *x2 = x1 + row, *x3 = x2 + row, *x4 = x3 + row, *x5 = x4 + row;
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

// dst[j][i] = src[i][j] * scale[i or j] for an 8 x 8 block (rows ld_src and ld_dst apart): the 8 source rows each
// times `scale` (lane by lane) before they are transposed.
inline void transpose8(const float* src, int64_t ld_src, float* dst, int64_t ld_dst, __m256 scale) {
    __m256 r[8], t[8];
    for (int i = 0; i < 8; ++i) r[i] = _mm256_mul_ps(_mm256_loadu_ps(src + i * ld_src), scale);
    for (int i = 0; i < 8; i += 2) {
        t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);
        t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
    }
    for (int i = 0; i < 8; i += 4) {
        r[i] = _mm256_shuffle_ps(t[i], t[i + 2], 0x44);
        r[i + 1] = _mm256_shuffle_ps(t[i], t[i + 2], 0xEE);
        r[i + 2] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0x44);
        r[i + 3] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0xEE);
    }
    for (int i = 0; i < 4; ++i) {
        _mm256_storeu_ps(dst + i * ld_dst, _mm256_permute2f128_ps(r[i], r[i + 4], 0x20));
        _mm256_storeu_ps(dst + (i + 4) * ld_dst, _mm256_permute2f128_ps(r[i], r[i + 4], 0x31));
    }
}

constexpr int COLUMN = 16;   // queries side by side in a tile's columns
constexpr int COLUMNS = 2;   // such columns per block of queries: keys and values read once for both
constexpr int CHUNK = 132;   // keys per pass (22 tiles of 6): their scores, 132 x 32, stay in L1
constexpr int MAX_HEAD_DIM = 160;

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
// floats: batch, head, token; unit along D) in `strides` (q's three, k's, v's, then out's), written to out. Computed
// transposed, with queries along the vectors' lanes, so that the softmax's maxima and sums are taken lane by lane:
// keys and values copied per head to [Nk][D] (read in place, rows of other heads between them, SD 1.5's 64x64
// self-attention ran 13% slower); per block of 32 queries (two columns of 16, laid out [D][16] with scale / ln 2
// folded in, so that the exponentials are powers of 2) and per CHUNK keys: S^T = K q^T, each query's maximum taken as
// the tiles are written; where a maximum grew, the sums and the accumulated O^T rescaled; P^T = 2^(S^T - max), its
// sums added lane by lane (each chunk's apart); O^T += V^T P^T, its tiles covering the head dim 6 rows at a time (no
// padding to 16). Each block's O^T / sums is written out transposed. Returns 1 where the copies of the keys and values
// cannot be allocated, 2 where D exceeds MAX_HEAD_DIM, else 0.
int fma_attention(const float* q, const float* k, const float* v, float* out, const int64_t* strides, int64_t B,
                  int64_t H, int64_t Nq, int64_t Nk, int64_t D, float scale, int threads) {
    if (D > MAX_HEAD_DIM) return 2;
    constexpr int QB = COLUMN * COLUMNS;
    const int64_t heads = B * H, blocks = (Nq + QB - 1) / QB;
    const float scale2 = scale * 1.44269504088896341f;
    const int64_t* qs = strides; const int64_t* ks = strides + 3; const int64_t* vs = strides + 6;
    const int64_t* os = strides + 9;
    thread_local std::vector<float> copies;  // kept (never shrunk) between a thread's calls: no fresh pages or zeros
    try {
        if (copies.size() < (size_t)(2 * heads * Nk * D)) copies.resize(2 * heads * Nk * D);
    } catch (const std::bad_alloc&) {
        return 1;
    }
    float* const keys = copies.data();  // (the workers below see other thread_local instances of the vector)
    float* const values = keys + heads * Nk * D;
#pragma omp parallel for num_threads(threads)
    for (int64_t h = 0; h < heads; ++h) {
        const float* kh = k + (h / H) * ks[0] + (h % H) * ks[1];
        const float* vh = v + (h / H) * vs[0] + (h % H) * vs[1];
        for (int64_t n = 0; n < Nk; ++n) {
            std::copy(kh + n * ks[2], kh + n * ks[2] + D, keys + (h * Nk + n) * D);
            std::copy(vh + n * vs[2], vh + n * vs[2] + D, values + (h * Nk + n) * D);
        }
    }
#pragma omp parallel for collapse(2) schedule(dynamic, 4) num_threads(threads)
    for (int64_t h = 0; h < heads; ++h) {
        for (int64_t b = 0; b < blocks; ++b) {
            FlushSubnormals flush;
            alignas(32) float qt[COLUMNS][MAX_HEAD_DIM * COLUMN], ot[COLUMNS][MAX_HEAD_DIM * COLUMN];
            alignas(32) float p[COLUMNS][CHUNK * COLUMN];
            const int64_t m0 = b * QB, count = std::min<int64_t>(QB, Nq - m0);
            const float* qh = q + (h / H) * qs[0] + (h % H) * qs[1] + m0 * qs[2];
            const float* kh = keys + h * Nk * D;
            const float* vh = values + h * Nk * D;
            const int64_t whole = D - D % 8;  // (dims transposed 8 x 8 with 8 queries; the rest one by one)
            for (int64_t i = 0; i < QB; i += 8) {
                float* column = qt[i / COLUMN] + i % COLUMN;
                for (int64_t d = 0; d < (i + 8 <= count ? whole : 0); d += 8)
                    transpose8(qh + i * qs[2] + d, qs[2], column + d * COLUMN, COLUMN, _mm256_set1_ps(scale2));
                for (int64_t j = i; j < i + 8; ++j)
                    for (int64_t d = (i + 8 <= count ? whole : 0); d < D; ++d)
                        column[d * COLUMN + j - i] = j < count ? qh[j * qs[2] + d] * scale2 : 0.f;
            }
            for (int g = 0; g < COLUMNS; ++g) std::fill(ot[g], ot[g] + D * COLUMN, 0.f);
            __m256 top[COLUMNS][2], sum[COLUMNS][2];
            for (int g = 0; g < COLUMNS; ++g)
                for (int i = 0; i < 2; ++i) top[g][i] = _mm256_set1_ps(-INFINITY), sum[g][i] = _mm256_setzero_ps();
            for (int64_t k0 = 0; k0 < Nk; k0 += CHUNK) {
                const int64_t n = std::min<int64_t>(CHUNK, Nk - k0);
                __m256 most[COLUMNS][2];
                for (int g = 0; g < COLUMNS; ++g) most[g][0] = most[g][1] = _mm256_set1_ps(-INFINITY);
                row_tiles(0, n, [&](auto R, int64_t r0) {
                    for (int g = 0; g < COLUMNS; ++g)
                        product_tile<decltype(R)::value>(kh + (k0 + r0) * D, D, qt[g], D,
                                                         [&](int r, __m256 a, __m256 c) {
                            _mm256_store_ps(p[g] + (r0 + r) * COLUMN, a);
                            _mm256_store_ps(p[g] + (r0 + r) * COLUMN + 8, c);
                            most[g][0] = _mm256_max_ps(most[g][0], a);
                            most[g][1] = _mm256_max_ps(most[g][1], c);
                        });
                });
                for (int g = 0; g < COLUMNS; ++g) {
                    for (int i = 0; i < 2; ++i) {
                        const __m256 grown = _mm256_max_ps(top[g][i], most[g][i]);
                        if (k0 > 0 && _mm256_movemask_ps(_mm256_cmp_ps(grown, top[g][i], _CMP_NEQ_UQ))) {
                            const __m256 factor = exp2_nonpositive(_mm256_sub_ps(top[g][i], grown));
                            sum[g][i] = _mm256_mul_ps(sum[g][i], factor);
                            for (int64_t d = 0; d < D; ++d) {
                                float* o = ot[g] + d * COLUMN + 8 * i;
                                _mm256_store_ps(o, _mm256_mul_ps(_mm256_load_ps(o), factor));
                            }
                        }
                        top[g][i] = grown;
                    }
                    __m256 part[2] = {_mm256_setzero_ps(), _mm256_setzero_ps()};  // (this chunk's, summed apart)
                    for (int64_t j = 0; j < n; ++j)
                        for (int i = 0; i < 2; ++i) {
                            float* s = p[g] + j * COLUMN + 8 * i;
                            const __m256 e = exp2_nonpositive(_mm256_sub_ps(_mm256_load_ps(s), top[g][i]));
                            _mm256_store_ps(s, e);
                            part[i] = _mm256_add_ps(part[i], e);
                        }
                    for (int i = 0; i < 2; ++i) sum[g][i] = _mm256_add_ps(sum[g][i], part[i]);
                }
                row_tiles(0, D, [&](auto R, int64_t d0) {
                    for (int g = 0; g < COLUMNS; ++g)
                        product_tile<decltype(R)::value, true>(vh + k0 * D + d0, D, p[g], n,
                                                               [&](int r, __m256 a, __m256 c) {
                            float* o = ot[g] + (d0 + r) * COLUMN;
                            _mm256_store_ps(o, _mm256_add_ps(_mm256_load_ps(o), a));
                            _mm256_store_ps(o + 8, _mm256_add_ps(_mm256_load_ps(o + 8), c));
                        });
                });
            }
            alignas(32) float inverse[QB];
            for (int g = 0; g < COLUMNS; ++g)
                for (int i = 0; i < 2; ++i)
                    _mm256_store_ps(inverse + g * COLUMN + 8 * i, _mm256_div_ps(_mm256_set1_ps(1.f), sum[g][i]));
            float* ob = out + (h / H) * os[0] + (h % H) * os[1] + m0 * os[2];
            for (int64_t i = 0; i < count; i += 8) {
                const float* column = ot[i / COLUMN] + i % COLUMN;
                for (int64_t d = 0; d < (i + 8 <= count ? whole : 0); d += 8)
                    transpose8(column + d * COLUMN, COLUMN, ob + i * os[2] + d, os[2], _mm256_load_ps(inverse + i));
                for (int64_t j = i; j < std::min<int64_t>(i + 8, count); ++j)
                    for (int64_t d = (i + 8 <= count ? whole : 0); d < D; ++d)
                        ob[j * os[2] + d] = column[d * COLUMN + j - i] * inverse[j];
            }
        }
    }
    return 0;
}

}  // extern "C"
