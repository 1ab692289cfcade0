// Winograd's input and output transforms for latentdiff.models.winograd, which compiles this file with the system's
// g++ on first use (-O3 -march=native: the compiler vectorises the loops over channels for the host's vector unit)
// and calls it through ctypes. Each is one pass over memory, where PyTorch's elementwise ops made one per term of
// B^T d B and A^T M A (and a padded copy of the map before them). Portable C++ (GCC's vector extension, no
// intrinsics): on the 2-core AVX-512 host within ~10% of hand-written AVX-512 intrinsics, faster on large maps (and
// an AVX2 build as fast there). On an AVX2-only AMD EPYC (2 threads) the transforms ran at 0.7-2 G numbers a second,
// well below memory's 5-8 (a copy of the same bytes): each load went through the stack, and each tile's numbers
// went out to 36 places at once; with whole-vector loads known at compile time and the transformed input written
// tile by tile, SD 1.5's U-Net forward is 1.04x as fast and the SD VAE decode 1.07x (in-process A/Bs, same bits).
// OpenMP threads take tiles; loaded into a process that runs PyTorch, the OpenMP runtime is PyTorch's.
#include <stdint.h>
#include <string.h>

#include <type_traits>

#include "kernels.h"

namespace {

// Lavin & Gray 2016, sec. 4.1 and 4.2 (the same matrices as winograd.py's F2x2 and F4x4): F(m x m, 3 x 3)'s B^T
// (a x a, a = m + 2) and A^T (m x a). Known at compile time, so that the products by 0 and 1 compile away.
template <int m> struct Algorithm;
template <> struct Algorithm<2> {
    static constexpr int a = 4;
    static constexpr float BT[4][4] = {{1, 0, -1, 0}, {0, 1, 1, 0}, {0, -1, 1, 0}, {0, 1, 0, -1}};
    static constexpr float AT[2][4] = {{1, 1, 1, 0}, {0, 1, -1, -1}};
};
template <> struct Algorithm<4> {
    static constexpr int a = 6;
    static constexpr float BT[6][6] = {{4, 0, -5, 0, 1, 0}, {0, -4, -4, 1, 1, 0}, {0, 4, -4, -1, 1, 0},
                                       {0, -2, -1, 2, 1, 0}, {0, 2, -1, -2, 1, 0}, {0, 4, 0, -5, 0, 1}};
    static constexpr float AT[4][6] = {{1, 1, 1, 1, 1, 0}, {0, 1, -1, 2, -2, 0}, {0, 1, 1, 4, 4, 0},
                                       {0, 1, -1, 8, -8, 1}};
};

// out[i] = sum_j T[i][j] in[j] for the R x C matrix T, lane by lane
template <int R, int C>
inline void apply(const float (&T)[R][C], const Vec* in, Vec* out) {
#pragma GCC unroll 8
    for (int i = 0; i < R; ++i) {
        Vec sum = {};
#pragma GCC unroll 8
        for (int j = 0; j < C; ++j)
            if (T[i][j] == 1) sum += in[j];
            else if (T[i][j] == -1) sum -= in[j];
            else if (T[i][j] != 0) sum += T[i][j] * in[j];
        out[i] = sum;
    }
}

// out = T X T^T for the R x A matrix T and the A x A tile X held transposed, in[s][r] = X[r][s]: first T X (one
// column of X at a time, in[s]), then its rows by T^T
template <int R, int A>
inline void sandwich(const float (&T)[R][A], const Vec (&in)[A][A], Vec (&out)[R][R]) {
    Vec left[A][R], column[A];
    for (int s = 0; s < A; ++s) apply(T, in[s], left[s]);  // left[s][i] = (T X)[i][s]
    for (int i = 0; i < R; ++i) {
        for (int s = 0; s < A; ++s) column[s] = left[s][i];
        apply(T, column, out[i]);  // (T X T^T)[i][j] = sum_s (T X)[i][s] T[j][s]
    }
}

// V [a * a][N][t][tw][C] (points and tiles vp and vt elements apart, C unit-stride: with vp = C, vt = a * a * C, each
// tile's numbers side by side, written as one stream, not one per point) = B^T d B for every (a x a) tile d of the
// map x [N][H][W][C] (unit stride along C; samples, rows and columns sn, sh and sw elements apart) padded by 1 on
// every side and on the bottom and right up to whole tiles, tile rows t0 .. t0 + t: tile (ti, tj) starts at row
// m ti - 1, column m tj - 1 of x, where the padding reads as zeros (no padded copy of x is made). With `up` = 1 the
// map is x upsampled 2x by nearest neighbour (pixel (y, x) of the 2H x 2W map is x's (y / 2, x / 2)), read as such
// without being made.
template <int m>
void input(const float* x, int64_t sn, int64_t sh, int64_t sw, int64_t N, int64_t H, int64_t W, int64_t C, int up,
           int64_t t0, int64_t t, int64_t tw, float* V, int64_t vp, int64_t vt, int threads) {
    using F = Algorithm<m>;
    constexpr int a = F::a;
    const int64_t tiles = N * t * tw;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t tile = 0; tile < tiles; ++tile) {
        const FlushSubnormals flushing;
        const int64_t n = tile / (t * tw), ti = t0 + tile / tw % t, tj = tile % tw;
        const int64_t y0 = m * ti - 1, x0 = m * tj - 1;
        const float* pixel[a][a];  // the tile's pixels in x (null: in the padding)
        bool interior = true;
        for (int r = 0; r < a; ++r)
            for (int s = 0; s < a; ++s) {
                const int64_t y = y0 + r, xx = x0 + s;
                const bool inside = y >= 0 && y < H << up && xx >= 0 && xx < W << up;
                pixel[r][s] = inside ? x + n * sn + (y >> up) * sh + (xx >> up) * sw : nullptr;
                interior = interior && inside;
            }
        // `interior_tile` (no pixel in the padding) known at compile time too, so that the loads are unconditional
        const auto transform = [&](auto interior_tile) {
            by_vectors(C, [&](int64_t c, auto lanes) {
                Vec in[a][a], out[a][a];
                for (int r = 0; r < a; ++r)
                    for (int s = 0; s < a; ++s)
                        in[s][r] = decltype(interior_tile)::value || pixel[r][s] ? load(pixel[r][s] + c, lanes)
                                                                                 : Vec{};
                sandwich(F::BT, in, out);
                for (int i = 0; i < a; ++i)
                    for (int j = 0; j < a; ++j) store(out[i][j], lanes, V + (i * a + j) * vp + tile * vt + c);
            });
        };
        if (interior) transform(std::true_type{});
        else transform(std::false_type{});
    }
}

// out [N][t][m][tw][m][K] (samples `ns` elements apart) = A^T M A + bias (+ residual) for the products M [a * a][N][t]
// [tw][K] of every tile (points and tiles mp and mt elements apart, K unit-stride); bias may be null. `residual` (may
// be null) is an [N][H][W][K] map (samples, rows and columns rn, rh and rw elements apart; K unit-stride) whose row
// y0 + r is added to the tiles' output row r (out's rows past H and columns past W, the tiles' overhang, get none).
template <int m>
void output(const float* M, int64_t mp, int64_t mt, int64_t N, int64_t t, int64_t tw, int64_t K, const float* bias,
            float* out, int64_t ns, const float* residual, int64_t rn, int64_t rh, int64_t rw, int64_t H, int64_t W,
            int64_t y0, int threads) {
    using F = Algorithm<m>;
    constexpr int a = F::a;
    const int64_t tiles = N * t * tw;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t tile = 0; tile < tiles; ++tile) {
        const FlushSubnormals flushing;
        const int64_t n = tile / (t * tw), ti = tile / tw % t, tj = tile % tw;
        float* y = out + n * ns + ((ti * m * tw + tj) * m) * K;
        const float* extra[m][m];  // the residual's pixel for each output (null: none, or in the tiles' overhang)
        for (int i = 0; i < m; ++i)
            for (int j = 0; j < m; ++j) {
                const int64_t row = y0 + m * ti + i, column = m * tj + j;
                extra[i][j] = residual && row < H && column < W ? residual + n * rn + row * rh + column * rw : nullptr;
            }
        by_vectors(K, [&](int64_t k, auto lanes) {
            const Vec b = bias ? load(bias + k, lanes) : Vec{};
            Vec in[a][a], result[m][m];
            for (int r = 0; r < a; ++r)
                for (int s = 0; s < a; ++s) in[s][r] = load(M + (r * a + s) * mp + tile * mt + k, lanes);
            sandwich(F::AT, in, result);
            for (int i = 0; i < m; ++i)
                for (int j = 0; j < m; ++j) {  // output row m ti + i, column m tj + j
                    const Vec v = result[i][j] + b;
                    store(extra[i][j] ? v + load(extra[i][j] + k, lanes) : v, lanes, y + (i * tw * m + j) * K + k);
                }
        });
    }
}

}  // namespace

// F(m x m, 3 x 3) for m = 2 or 4, of x (up = 0) or of its nearest 2x upsampling (up = 1), into V with its points and
// tiles vp and vt elements apart; returns nonzero for another m or up
extern "C" int winograd_input(const float* x, int64_t sn, int64_t sh, int64_t sw, int64_t N, int64_t H, int64_t W,
                              int64_t C, int up, int64_t t0, int64_t t, int64_t tw, int m, float* V, int64_t vp,
                              int64_t vt, int threads) {
    if (up != 0 && up != 1) return 1;
    if (m == 2) input<2>(x, sn, sh, sw, N, H, W, C, up, t0, t, tw, V, vp, vt, threads);
    else if (m == 4) input<4>(x, sn, sh, sw, N, H, W, C, up, t0, t, tw, V, vp, vt, threads);
    else return 1;
    return 0;
}

extern "C" int winograd_output(const float* M, int64_t mp, int64_t mt, int64_t N, int64_t t, int64_t tw, int64_t K,
                               int m, const float* bias, float* out, int64_t ns, const float* residual, int64_t rn,
                               int64_t rh, int64_t rw, int64_t H, int64_t W, int64_t y0, int threads) {
    if (m == 2) output<2>(M, mp, mt, N, t, tw, K, bias, out, ns, residual, rn, rh, rw, H, W, y0, threads);
    else if (m == 4) output<4>(M, mp, mt, N, t, tw, K, bias, out, ns, residual, rn, rh, rw, H, W, y0, threads);
    else return 1;
    return 0;
}
