// Attention on Intel AMX tiles, for latentdiff.models.amx (which compiles this file with the system's g++ on
// first use and calls it through ctypes): out = softmax(scale * q k^T) v, no mask, no dropout, no gradients, in
// bfloat16 (amx_attention) or float32 (amx_attention_fp32). Per head the keys and values are first re-laid out as AMX
// "B" tiles (zero padded: keys to a multiple of 32, the depth of q k^T to 32, the head dim of p v to 16); then each
// block of 32 queries runs an online softmax (Milakov & Gimelshein 2018) over chunks of CHUNK keys (GROUP blocks taking
// each chunk in turn, so that it is read from L2 rather than L3): scores in fp32 from tile products, numerators
// exp(scale * (s - running max)) computed in fp32 and rounded to bfloat16 for the p v tile products, the output divided
// at the end by the sum of those rounded numerators (so that the weights sum to 1 as used; PyTorch's CPU flash kernel
// sums them before rounding, and its errors against float64 are the same or larger). In float32 every input and
// numerator is split into three bfloat16 parts, x = x0 + x1 + x2 (exact for normal numbers), and each product x y is
// taken as the six products of parts that reach fp32's precision (Henry, Tang & Heinecke 2019, "bf16x6"): for q k^T the
// parts are laid side by side along the depth, for p v the six products accumulate into the same tiles. OpenMP threads
// take heads (packing), then groups of query blocks; loaded into a process that runs PyTorch, the OpenMP runtime is
// PyTorch's (same soname), so its worker threads are reused rather than competing with ours. The end of the file holds
// float32 linear layers on the same tiles and parts (amx_linear), and convolutions as such products (amx_conv).
// Built with LATENTDIFF_AVX512_ATTENTION defined (for CPUs with AVX512-BF16 but no AMX), the file holds the bfloat16
// attention alone, its q k^T and p v products taken from the same packed layouts with AVX-512's vdpbf16ps instead of
// tile products (scores and values below); everything else is the same code.
#include <immintrin.h>
#include <stdint.h>
#include <string.h>
#include <math.h>
#include <unistd.h>
#include <sys/syscall.h>
#include <algorithm>
#include <memory>
#include <mutex>
#include <vector>
#include <omp.h>
#include <new>
#include <stdlib.h>

#include "kernels.h"

namespace {

struct TileConfig {
    uint8_t palette = 1, start_row = 0, reserved[14] = {};
    uint16_t colsb[16] = {};
    uint8_t rows[16] = {};
};

#ifdef LATENTDIFF_AVX512_ATTENTION
void configure_tiles() {}
inline void release_tiles() {}
#else
void configure_tiles() {
    TileConfig cfg;
    for (int i = 0; i < 8; ++i) { cfg.colsb[i] = 64; cfg.rows[i] = 16; }
    _tile_loadconfig(&cfg);
}
inline void release_tiles() { _tile_release(); }
#endif

// 2^x = 2^round(x) * 2^f, f in [-1/2, 1/2]; 2^f for bfloat16 numerators (PARTS 1) by a degree-4 polynomial fitted
// to it (relative error < 3e-6), for float32 ones (PARTS 3) by a degree-6 one (< 2e-8)
template <int PARTS>
inline __m512 exp2_ps(__m512 x) {
    const __m512 n = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m512 f = _mm512_sub_ps(x, n);
    __m512 p;
    if (PARTS == 1) {
        p = _mm512_fmadd_ps(_mm512_set1_ps(9.5605105e-3f), f, _mm512_set1_ps(5.5917040e-2f));
        p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.4024981e-1f));
        p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.9312197e-1f));
        p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.9999917e-1f));
    } else {
        static constexpr float fit[7] = {1.f, 0.69314718f, 0.24022646f, 0.055503279f, 0.0096184891f, 0.0013400263f,
                                         1.5346633e-4f};
        p = _mm512_set1_ps(fit[6]);
        for (int i = 5; i >= 0; --i) p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(fit[i]));
    }
    return _mm512_scalef_ps(p, n);
}

// 16 bf16 numbers as fp32 (exactly)
inline __m512 widen(__m256i bf16) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bf16), 16));
}

// x as `n` bfloat16 parts, each the rounding of what the ones before leave: with three, x = x0 + x1 + x2 exactly
// for normal numbers (x has 24 significant bits, each part takes 8 or more; |x1| <= 2^-8 |x|, |x2| <= 2^-16 |x|)
inline void split(__m512 x, __m256i* parts, int n) {
    for (int c = 0; c < n; ++c) {
        parts[c] = (__m256i)_mm512_cvtneps_pbh(x);
        if (c + 1 < n) x = _mm512_sub_ps(x, widen(parts[c]));
    }
}

// Which parts multiply which (left: queries' or numerators', right: keys' or values'): with one part, x y; with
// three, the six products x0 y0, x0 y1, x0 y2, x1 y0, x1 y1, x2 y0 (those left out are below 2^-23 of x y), in an
// order that keeps each left part for consecutive products
constexpr int LEFT[6] = {0, 0, 0, 1, 1, 2}, RIGHT[6] = {0, 1, 2, 0, 1, 0};

// the lanes [0, count) of a 16-lane vector (all for count >= 16, none for count <= 0)
inline __mmask16 first_lanes(int64_t count) {
    return count >= 16 ? (__mmask16)0xffff : count > 0 ? (__mmask16)((1u << count) - 1) : (__mmask16)0;
}

inline int64_t padded(int64_t n, int64_t to) { return (n + to - 1) / to * to; }

// byte offsets of 16 rows `bytes` apart, for gathers
inline __m512i row_offsets(int64_t bytes) {
    return _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                              _mm512_set1_epi32((int)bytes));
}

// the 16 bf16 numbers of a and of b interleaved, a0 b0 a1 b1 ...: two depths' rows of a B tile
inline __m512i interleave(__m256i a, __m256i b) {
    alignas(64) static const uint16_t order[32] = {0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23,
                                                   8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31};
    return _mm512_permutexvar_epi16(_mm512_load_si512(order),
                                    _mm512_inserti64x4(_mm512_castsi256_si512(a), b, 1));
}

// first[0] and first[1] of 16 float32 rows (at `offsets` bytes from first; only the rows in `even`, `odd`: zeros
// elsewhere) as three bfloat16 parts, each the two depths' row of a B tile (their pairs interleaved)
inline void gather_pairs(const float* first, __m512i offsets, __mmask16 even, __mmask16 odd, __m512i* parts) {
    __m256i e[3], o[3];
    split(_mm512_mask_i32gather_ps(_mm512_setzero_ps(), even, offsets, first, 1), e, 3);
    split(_mm512_mask_i32gather_ps(_mm512_setzero_ps(), odd, offsets, first + 1, 1), o, 3);
    for (int c = 0; c < 3; ++c) parts[c] = interleave(e[c], o[c]);
}

// T: uint16_t (bfloat16 inputs and output) or float
template <typename T>
struct Args {
    const T *q, *k, *v;
    T* out;
    int64_t B, H, N, Nk, d;
    int64_t qs[3], ks[3], vs[3], os[3];  // batch, head, token strides (elements)
    float scale;
};

template <typename T>
constexpr int parts_of = sizeof(T) == 2 ? 1 : 3;  // bfloat16 parts per number

struct Shapes {
    int64_t parts, pairs;  // bfloat16 parts per number, products of parts per product (1 and 1, or 3 and 6)
    int64_t nk32, dk, dn;  // keys padded to 32, the q k^T depth (pairs * d) to 32, the head dim to 16 (p v width)
    // where the padding leaves room, column d of the packed values is all ones, so that the p v products also sum
    // the numerators (as the bf16 numbers they are multiplied as: the weights then sum to 1 exactly as rounded)
    bool ones;
    int64_t kp, vp;  // elements of one head's packed keys, values (all parts: [parts][nk32 / 2][dn][2])
    int64_t depth_pairs;  // pairs of the q k^T depth that are not zero padding, (pairs * d + 1) / 2
};

// K of one head as B tiles of q k^T: [nk32 / 16][dk / 2][16 keys][2 depths], the depth being the keys' parts side
// by side in the order RIGHT (keys past Nk and depths past pairs * d: zeros); one gather of 16 keys' pairs of dims at
// a time, its parts then stored where each product of parts takes them
template <typename T>
void pack_k(const Args<T>& a, const Shapes& s, const T* k, uint16_t* kp) {
    const __m512i rows = row_offsets(a.ks[2] * sizeof(T));  // 16 keys'
    for (int64_t nb = 0; nb < s.nk32 / 16; ++nb) {
        const __mmask16 real = first_lanes(a.Nk - nb * 16);
        const T* base = k + nb * 16 * a.ks[2];
        uint16_t* tile = kp + nb * (s.dk / 2) * 32;
        for (int64_t r = s.pairs * a.d / 2; r < s.dk / 2; ++r)
            _mm512_store_si512(tile + r * 32, _mm512_setzero_si512());
        for (int64_t r = 0; r < a.d / 2; ++r) {
            __m512i two[3];  // dims 2r and 2r + 1 of 16 keys, per part
            if constexpr (sizeof(T) == 2)
                two[0] = _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), real, rows, base + 2 * r, 1);
            else
                gather_pairs(base + 2 * r, rows, real, real, two);
            for (int64_t g = 0; g < s.pairs; ++g) _mm512_store_si512(tile + (g * a.d / 2 + r) * 32, two[RIGHT[g]]);
        }
    }
}

// V of one head as B tiles of p v: [parts][nk32 / 2][dn][2 keys] (keys past Nk and dims past d: zeros; dim d of
// part 0: ones where s.ones), 16 dims of two keys interleaved at a time
template <typename T>
void pack_v(const Args<T>& a, const Shapes& s, const T* v, uint16_t* vp) {
    const __m256i one = _mm256_set1_epi16(0x3F80);  // bf16 1.0
    for (int64_t kk = 0; kk < s.nk32 / 2; ++kk) {
        for (int64_t n0 = 0; n0 < s.dn; n0 += 16) {
            const int64_t left = a.d - n0;
            const __mmask16 dims = first_lanes(left);
            const __mmask16 ones = s.ones && left >= 0 && left < 16 ? (__mmask16)(1u << left) : 0;
            __m256i two[2][3] = {};  // the two keys' parts
            for (int e = 0; e < 2; ++e) {
                const int64_t key = 2 * kk + e;
                if (key >= a.Nk) continue;
                if constexpr (sizeof(T) == 2)
                    two[e][0] = _mm256_maskz_loadu_epi16(dims, v + key * a.vs[2] + n0);
                else
                    split(_mm512_maskz_loadu_ps(dims, v + key * a.vs[2] + n0), two[e], 3);
                two[e][0] = _mm256_mask_mov_epi16(two[e][0], ones, one);
            }
            for (int64_t c = 0; c < s.parts; ++c)
                _mm512_storeu_si512(vp + c * s.nk32 * s.dn + (kk * s.dn + n0) * 2, interleave(two[0][c], two[1][c]));
        }
    }
}

constexpr int64_t ROWS = 32;    // queries per block: two tile rows
constexpr int64_t GROUP = 8;  // blocks that take each chunk of keys in turn (while it is in L2)
constexpr int64_t CHUNK = 1024;  // keys per online-softmax step (its scores: 128 KiB, in L2)
constexpr int64_t SS = CHUNK + 16, PS = CHUNK + 32;  // row strides of those buffers (off 4 KiB multiples)

// uninitialized storage on a cache-line boundary: a tile row that straddles two lines costs two loads or stores
// (with malloc's 16-byte alignment the values' products ran at half speed in some processes)
template <typename T>
struct Aligned {
    std::unique_ptr<T[], decltype(&free)> memory;
    explicit Aligned(int64_t n)
        : memory(static_cast<T*>(aligned_alloc(64, (n * sizeof(T) + 63) / 64 * 64)), &free) {
        if (!memory) throw std::bad_alloc();
    }
    T* data() const { return memory.get(); }
};

struct Buffers {  // one thread's
    Aligned<uint16_t> q, p;  // q: [GROUP][ROWS][dk], p: [parts][ROWS][PS]
    Aligned<float> s, o, c;  // o: [GROUP][ROWS][dn]
    Buffers(const Shapes& sh)
        : q(GROUP * ROWS * sh.dk), p(sh.parts * ROWS * PS), s(ROWS * SS), o(GROUP * ROWS * sh.dn),
          c(ROWS * sh.dn) {}
};

// a block's queries as the A tiles of q k^T, [32][dk]: their parts side by side in the order LEFT, zero padded
// (rows past `rows` and depths past pairs * d)
template <typename T>
void load_queries(const Args<T>& a, const Shapes& s, const T* q, int64_t rows, uint16_t* qbuf) {
    for (int64_t i = 0; i < ROWS; ++i) {
        uint16_t* dst = qbuf + i * s.dk;
        if (i >= rows) {
            memset(dst, 0, s.dk * 2);
            continue;
        }
        if constexpr (sizeof(T) == 2) {
            memcpy(dst, q + i * a.qs[2], a.d * 2);
        } else {
            for (int64_t j = 0; j < a.d; j += 16) {
                const __mmask16 dims = first_lanes(a.d - j);
                __m256i parts[3];
                split(_mm512_maskz_loadu_ps(dims, q + i * a.qs[2] + j), parts, 3);
                for (int64_t g = 0; g < s.pairs; ++g) _mm256_mask_storeu_epi16(dst + g * a.d + j, dims, parts[LEFT[g]]);
            }
        }
        memset(dst + s.pairs * a.d, 0, (s.dk - s.pairs * a.d) * 2);
    }
}

#ifdef LATENTDIFF_AVX512_ATTENTION
// S[32][n] = Q K^T for keys [k0, k0 + n) (n a multiple of 32) with vdpbf16ps: 8 queries x 32 keys of scores in 16
// registers per pass, each step one pair of depths (a key tile row, 16 keys' pairs, is one register; a query's pair
// is broadcast); the depth's zero padding is skipped
inline void scores(const Shapes& s, const uint16_t* qp, const uint16_t* kp, int64_t k0, int64_t n, float* sbuf) {
    constexpr int R = 8;
    for (int64_t nb = k0 / 16; nb < (k0 + n) / 16; nb += 2) {
        float* dst = sbuf + 16 * (nb - k0 / 16);
        const uint16_t* ka = kp + nb * (s.dk / 2) * 32;
        const uint16_t* kb = ka + (s.dk / 2) * 32;
        for (int64_t r0 = 0; r0 < ROWS; r0 += R) {
            __m512 acc[R][2];
            for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
            const uint16_t* qrow = qp + r0 * s.dk;
            for (int64_t t = 0; t < s.depth_pairs; ++t) {
                const __m512bh a = (__m512bh)_mm512_load_si512(ka + 32 * t);
                const __m512bh b = (__m512bh)_mm512_load_si512(kb + 32 * t);
                for (int r = 0; r < R; ++r) {
                    int32_t pair;
                    memcpy(&pair, qrow + r * s.dk + 2 * t, 4);
                    const __m512bh x = (__m512bh)_mm512_set1_epi32(pair);
                    acc[r][0] = _mm512_dpbf16_ps(acc[r][0], x, a);
                    acc[r][1] = _mm512_dpbf16_ps(acc[r][1], x, b);
                }
            }
            for (int r = 0; r < R; ++r) {
                _mm512_storeu_ps(dst + (r0 + r) * SS, acc[r][0]);
                _mm512_storeu_ps(dst + (r0 + r) * SS + 16, acc[r][1]);
            }
        }
    }
}
#else
// S[32][n] = Q K^T for keys [k0, k0 + n) (n a multiple of 32), from packed keys, 32 x 32 scores per pass (four
// accumulator tiles). Measured on a 2-core Sapphire Rapids-class host: a tile product takes ~14 cycles, a tile
// store ~50, so in bfloat16 with head dims of 64 or less the stores of the scores, not the products, bound this
// part; in float32 (six times the depth) the products and their tile loads (~30 cycles per product) do.
inline void scores(const Shapes& s, const uint16_t* qp, const uint16_t* kp, int64_t k0, int64_t n, float* sbuf) {
    for (int64_t nb = k0 / 16; nb < (k0 + n) / 16; nb += 2) {
        float* dst = sbuf + 16 * (nb - k0 / 16);
        _tile_zero(0);
        _tile_zero(1);
        _tile_zero(2);
        _tile_zero(3);
        for (int64_t t = 0; t < s.dk / 32; ++t) {
            _tile_loadd(4, qp + 32 * t, s.dk * 2);
            _tile_loadd(5, qp + 16 * s.dk + 32 * t, s.dk * 2);
            _tile_loadd(6, kp + (nb * (s.dk / 2) + 16 * t) * 32, 64);
            _tile_loadd(7, kp + ((nb + 1) * (s.dk / 2) + 16 * t) * 32, 64);
            _tile_dpbf16ps(0, 4, 6);
            _tile_dpbf16ps(1, 5, 6);
            _tile_dpbf16ps(2, 4, 7);
            _tile_dpbf16ps(3, 5, 7);
        }
        _tile_stored(0, dst, SS * 4);
        _tile_stored(1, dst + 16 * SS, SS * 4);
        _tile_stored(2, dst + 16, SS * 4);
        _tile_stored(3, dst + 16 * SS + 16, SS * 4);
    }
}
#endif

// Numerators may exceed 1 by up to 2^HEADROOM (bf16 and fp32 hold that easily): a chunk whose scores stay within
// that of the running maximum is exponentiated against it in one pass, without a pass to find its own maximum.
constexpr float HEADROOM = 8.f;

// the largest of a row's `valid` scores
inline float row_max(const float* srow, int64_t valid) {
    const int64_t full = valid / 16 * 16;
    const __mmask16 tail = first_lanes(valid - full);
    __m512 m0 = _mm512_set1_ps(-INFINITY), m1 = m0;
    int64_t j = 0;
    for (; j + 32 <= full; j += 32) {
        m0 = _mm512_max_ps(m0, _mm512_loadu_ps(srow + j));
        m1 = _mm512_max_ps(m1, _mm512_loadu_ps(srow + j + 16));
    }
    for (; j < full; j += 16) m0 = _mm512_max_ps(m0, _mm512_loadu_ps(srow + j));
    if (tail) m1 = _mm512_max_ps(m1, _mm512_mask_loadu_ps(_mm512_set1_ps(-INFINITY), tail, srow + full));
    return _mm512_reduce_max_ps(_mm512_max_ps(m0, m1));
}

// x as three parts that bfloat16 holds exactly, x = x0 + x1 + x2, by truncation (each the leading 8 significant bits
// of what the ones before leave: cheaper than rounding, and |x1| < 2^-7 |x|, |x2| < 2^-15 |x|)
inline void chop(__m512 x, __m512* parts) {
    const __m512i top = _mm512_set1_epi32((int)0xFFFF0000u);
    parts[0] = _mm512_castsi512_ps(_mm512_and_si512(_mm512_castps_si512(x), top));
    x = _mm512_sub_ps(x, parts[0]);
    parts[1] = _mm512_castsi512_ps(_mm512_and_si512(_mm512_castps_si512(x), top));
    parts[2] = _mm512_sub_ps(x, parts[1]);
}

// 32 numerators (e0, e1) stored at prow[j..] as PARTS bfloat16 parts (part c at prow + c * ROWS * PS); u0, u1: the
// numbers as the p v products use them (with one part: rounded; with three: exactly)
template <int PARTS>
inline void store_numerators(__m512 e0, __m512 e1, uint16_t* prow, int64_t j, __m512& u0, __m512& u1) {
    if (PARTS == 1) {
        const __m512i p = (__m512i)_mm512_cvtne2ps_pbh(e1, e0);
        _mm512_storeu_si512(prow + j, p);
        u0 = widen(_mm512_castsi512_si256(p));
        u1 = widen(_mm512_extracti64x4_epi64(p, 1));
    } else {
        __m512 a[3], b[3];
        chop(e0, a);
        chop(e1, b);
        for (int c = 0; c < 3; ++c)
            _mm512_storeu_si512(prow + c * ROWS * PS + j, (__m512i)_mm512_cvtne2ps_pbh(b[c], a[c]));
        u0 = e0;
        u1 = e1;
    }
}

// the same for 16 numerators
template <int PARTS>
inline __m512 store_numerators(__m512 e, uint16_t* prow, int64_t j) {
    if (PARTS == 1) {
        const __m256i p = (__m256i)_mm512_cvtneps_pbh(e);
        _mm256_storeu_si256((__m256i*)(prow + j), p);
        return widen(p);
    }
    __m512 parts[3];
    chop(e, parts);
    for (int c = 0; c < 3; ++c)
        _mm256_storeu_si256((__m256i*)(prow + c * ROWS * PS + j), (__m256i)_mm512_cvtneps_pbh(parts[c]));
    return e;
}

// exp2(c * (s - m)) of a row's scores as PARTS bfloat16 parts over n columns, the first `valid` real (the rest
// zero); returns the sum of those numbers as used (SUM; else 0), and in `seen` the largest score
template <bool SUM, int PARTS>
inline float exponentials(const float* srow, int64_t valid, int64_t n, float c, float m, uint16_t* prow,
                          float& seen) {
    const int64_t full = valid / 32 * 32;  // (the pairs of full vectors)
    const __m512 vc = _mm512_set1_ps(c), vmc = _mm512_set1_ps(-m * c);
    __m512 s0 = _mm512_setzero_ps(), s1 = s0, m0 = _mm512_set1_ps(-INFINITY), m1 = m0;
    int64_t j = 0;
    for (; j < full; j += 32) {
        const __m512 x0 = _mm512_loadu_ps(srow + j), x1 = _mm512_loadu_ps(srow + j + 16);
        m0 = _mm512_max_ps(m0, x0);
        m1 = _mm512_max_ps(m1, x1);
        const __m512 e0 = exp2_ps<PARTS>(_mm512_fmadd_ps(x0, vc, vmc));
        const __m512 e1 = exp2_ps<PARTS>(_mm512_fmadd_ps(x1, vc, vmc));
        __m512 u0, u1;
        store_numerators<PARTS>(e0, e1, prow, j, u0, u1);
        if (SUM) {
            s0 = _mm512_add_ps(s0, u0);
            s1 = _mm512_add_ps(s1, u1);
        }
    }
    for (; j < n; j += 16) {  // what is left: a last full vector, the ragged tail, zeros up to n
        const __mmask16 keep = first_lanes(valid - j);
        __m512 e = _mm512_setzero_ps();
        if (keep) {
            const __m512 x = _mm512_mask_loadu_ps(_mm512_set1_ps(-INFINITY), keep, srow + j);
            m0 = _mm512_max_ps(m0, x);
            e = _mm512_maskz_mov_ps(keep, exp2_ps<PARTS>(_mm512_fmadd_ps(x, vc, vmc)));
        }
        const __m512 u = store_numerators<PARTS>(e, prow, j);
        if (SUM) s0 = _mm512_add_ps(s0, u);
    }
    seen = _mm512_reduce_max_ps(_mm512_max_ps(m0, m1));
    return _mm512_reduce_add_ps(_mm512_add_ps(s0, s1));
}

// one row's numerators for a chunk (exponentials), their sum added to l (SUM); m: the running maximum they are
// taken against, raised where the chunk's scores exceed it by more than HEADROOM; returns the factor that rescales
// what was summed before against the new maximum (1 where it stayed)
template <bool SUM, int PARTS>
inline float numerators(const float* srow, int64_t valid, int64_t n, float c, float& m, float& l, uint16_t* prow) {
    float seen;
    if (m != -INFINITY) {
        const float sum = exponentials<SUM, PARTS>(srow, valid, n, c, m, prow, seen);
        if ((seen - m) * c <= HEADROOM) {
            l += sum;
            return 1.f;
        }
    } else {
        seen = row_max(srow, valid);
    }
    const float m_new = std::max(m, seen), alpha = exp2f((m - m_new) * c);
    m = m_new;
    l = l * alpha + exponentials<SUM, PARTS>(srow, valid, n, c, m_new, prow, seen);
    return alpha;
}

#ifdef LATENTDIFF_AVX512_ATTENTION
// C[32][j0, j0 + 16 J) = P V for keys [k0, k0 + n) with vdpbf16ps: 8 queries x 16 J dims in 8 J registers per
// pass, each step one pair of keys (a value tile row, 16 dims of the two keys, is one register; a query's two
// numerators are broadcast)
template <int J>
inline void values_of(const Shapes& s, const uint16_t* pbuf, const uint16_t* vp, int64_t n, int64_t j0, float* cbuf) {
    constexpr int R = 8;
    for (int64_t r0 = 0; r0 < ROWS; r0 += R) {
        __m512 acc[R][J];
        for (int r = 0; r < R; ++r)
            for (int j = 0; j < J; ++j) acc[r][j] = _mm512_setzero_ps();
        for (int64_t t = 0; t < n / 2; ++t) {
            __m512bh v[J];
            for (int j = 0; j < J; ++j) v[j] = (__m512bh)_mm512_loadu_si512(vp + (t * s.dn + j0 + 16 * j) * 2);
            for (int r = 0; r < R; ++r) {
                int32_t pair;
                memcpy(&pair, pbuf + (r0 + r) * PS + 2 * t, 4);
                const __m512bh x = (__m512bh)_mm512_set1_epi32(pair);
                for (int j = 0; j < J; ++j) acc[r][j] = _mm512_dpbf16_ps(acc[r][j], x, v[j]);
            }
        }
        for (int r = 0; r < R; ++r)
            for (int j = 0; j < J; ++j) _mm512_storeu_ps(cbuf + (r0 + r) * s.dn + j0 + 16 * j, acc[r][j]);
    }
}

// C[32][dn] = P V for keys [k0, k0 + n) (n a multiple of 32; bfloat16: one part), three registers of dims at a time
inline void values(const Shapes& s, const uint16_t* pbuf, const uint16_t* vp, int64_t k0, int64_t n, float* cbuf) {
    vp += k0 * s.dn;  // (key pair k0 / 2)
    int64_t j0 = 0;
    for (; j0 + 48 <= s.dn; j0 += 48) values_of<3>(s, pbuf, vp, n, j0, cbuf);
    if (s.dn - j0 == 32) values_of<2>(s, pbuf, vp, n, j0, cbuf);
    if (s.dn - j0 == 16) values_of<1>(s, pbuf, vp, n, j0, cbuf);
}
#else
// C[32][dn] = P V for keys [k0, k0 + n) (n a multiple of 32), from the numerators' parts and the packed values'
// (the products of parts in the order LEFT x RIGHT, summed in the same tiles)
inline void values(const Shapes& s, const uint16_t* pbuf, const uint16_t* vp, int64_t k0, int64_t n, float* cbuf) {
    for (int64_t jb = 0; jb < s.dn / 16; jb += 2) {
        const bool two = jb + 1 < s.dn / 16;
        _tile_zero(0);
        _tile_zero(1);
        _tile_zero(2);
        _tile_zero(3);
        for (int64_t t = 0; t < n / 32; ++t) {
            for (int64_t g = 0; g < s.pairs; ++g) {
                if (g == 0 || LEFT[g] != LEFT[g - 1]) {
                    const uint16_t* p = pbuf + LEFT[g] * ROWS * PS + 32 * t;
                    _tile_loadd(4, p, PS * 2);
                    _tile_loadd(5, p + 16 * PS, PS * 2);
                }
                const uint16_t* v = vp + RIGHT[g] * s.nk32 * s.dn + ((k0 / 2 + 16 * t) * s.dn + 16 * jb) * 2;
                _tile_loadd(6, v, s.dn * 4);
                _tile_dpbf16ps(0, 4, 6);
                _tile_dpbf16ps(1, 5, 6);
                if (two) {
                    _tile_loadd(7, v + 32, s.dn * 4);
                    _tile_dpbf16ps(2, 4, 7);
                    _tile_dpbf16ps(3, 5, 7);
                }
            }
        }
        _tile_stored(0, cbuf + 16 * jb, s.dn * 4);
        _tile_stored(1, cbuf + 16 * s.dn + 16 * jb, s.dn * 4);
        if (two) {
            _tile_stored(2, cbuf + 16 * (jb + 1), s.dn * 4);
            _tile_stored(3, cbuf + 16 * s.dn + 16 * (jb + 1), s.dn * 4);
        }
    }
}
#endif

// up to GROUP blocks of 32 query rows (`rows` in all) of one head
template <typename T>
void group(const Args<T>& a, const Shapes& s, const T* q, const uint16_t* kp, const uint16_t* vp, T* out,
           int64_t rows, Buffers& buf) {
    constexpr int PARTS = parts_of<T>;
    const int64_t blocks = (rows + ROWS - 1) / ROWS;
    for (int64_t b = 0; b < blocks; ++b)
        load_queries(a, s, q + b * ROWS * a.qs[2], std::min(ROWS, rows - b * ROWS), buf.q.data() + b * ROWS * s.dk);
    const float c = a.scale * 1.4426950408889634f;
    float m[GROUP * ROWS], l[GROUP * ROWS], alpha[ROWS];
    std::fill(m, m + GROUP * ROWS, -INFINITY);
    std::fill(l, l + GROUP * ROWS, 0.f);
    std::fill(buf.o.data(), buf.o.data() + GROUP * ROWS * s.dn, 0.f);
    for (int64_t k0 = 0; k0 < s.nk32; k0 += CHUNK) {
        const int64_t n = std::min(CHUNK, s.nk32 - k0), valid = std::min(n, a.Nk - k0);
        for (int64_t b = 0; b < blocks; ++b) {
            scores(s, buf.q.data() + b * ROWS * s.dk, kp, k0, n, buf.s.data());
            for (int64_t i = 0; i < ROWS; ++i) {
                float* srow = buf.s.data() + i * SS;
                uint16_t* prow = buf.p.data() + i * PS;
                float &mi = m[b * ROWS + i], &li = l[b * ROWS + i];
                alpha[i] = s.ones ? numerators<false, PARTS>(srow, valid, n, c, mi, li, prow)
                                  : numerators<true, PARTS>(srow, valid, n, c, mi, li, prow);
            }
            values(s, buf.p.data(), vp, k0, n, buf.c.data());
            for (int64_t i = 0; i < ROWS; ++i) {
                const __m512 va = _mm512_set1_ps(alpha[i]);
                float* o = buf.o.data() + (b * ROWS + i) * s.dn;
                const float* cc = buf.c.data() + i * s.dn;
                for (int64_t j = 0; j < s.dn; j += 16)
                    _mm512_storeu_ps(o + j, _mm512_fmadd_ps(_mm512_loadu_ps(o + j), va, _mm512_loadu_ps(cc + j)));
            }
        }
    }
    for (int64_t i = 0; i < rows; ++i) {
        const float* orow = buf.o.data() + i * s.dn;
        const __m512 inv = _mm512_set1_ps(1.f / (s.ones ? orow[a.d] : l[i]));
        T* dst = out + i * a.os[2];
        for (int64_t j = 0; j < a.d; j += 16) {
            const __m512 r = _mm512_mul_ps(_mm512_loadu_ps(orow + j), inv);
            if constexpr (sizeof(T) == 2)
                _mm256_mask_storeu_epi16(dst + j, first_lanes(a.d - j), (__m256i)_mm512_cvtneps_pbh(r));
            else
                _mm512_mask_storeu_ps(dst + j, first_lanes(a.d - j), r);
        }
    }
}

// the packed keys and values go to a buffer kept from call to call (a fresh one of this size, for SD 1.5's largest
// attention 14 MB in bf16 and 52 MB in fp32, page-faults on every call); a call that finds it in use by another
// thread's call makes its own
std::mutex kept_lock;
std::unique_ptr<Aligned<uint16_t>> kept;
int64_t kept_size = 0;

template <typename T>
int attention(const T* q, const T* k, const T* v, T* out, int64_t B, int64_t H, int64_t N, int64_t Nk, int64_t d,
              const int64_t* strides, float scale, int threads) {
    Args<T> a{q, k, v, out, B, H, N, Nk, d, {}, {}, {}, {}, scale};
    for (int i = 0; i < 3; ++i) {
        a.qs[i] = strides[i]; a.ks[i] = strides[3 + i]; a.vs[i] = strides[6 + i]; a.os[i] = strides[9 + i];
    }
    const int64_t parts = parts_of<T>, pairs = parts == 1 ? 1 : 6, nk32 = padded(Nk, 32);
    const int64_t dk = padded(pairs * d, 32), dn = padded(d, 16);
    const Shapes s{parts, pairs, nk32, dk, dn, d % 16 != 0, nk32 * dk, parts * nk32 * dn, (pairs * d + 1) / 2};
    const int64_t heads = B * H, qgroups = (N + GROUP * ROWS - 1) / (GROUP * ROWS);
    std::unique_lock<std::mutex> hold(kept_lock, std::try_to_lock);
    std::unique_ptr<Aligned<uint16_t>> own;
    std::vector<Buffers> buffers;  // one per thread
    const int64_t size = heads * (s.kp + s.vp);
    try {
        if (hold.owns_lock() && kept_size < size) {
            kept.reset();
            kept_size = 0;
            kept.reset(new Aligned<uint16_t>(size));
            kept_size = size;
        } else if (!hold.owns_lock()) {
            own.reset(new Aligned<uint16_t>(size));
        }
        for (int t = 0; t < threads; ++t) buffers.emplace_back(s);
    } catch (const std::bad_alloc&) {
        return 1;
    }
    uint16_t* const kp = (own ? own : kept)->data();
    uint16_t* const vp = kp + heads * s.kp;
#pragma omp parallel num_threads(threads)
    {
        const FlushSubnormals flushing;
        configure_tiles();
#pragma omp for schedule(dynamic)
        for (int64_t h = 0; h < heads; ++h) {
            pack_k(a, s, k + h / H * a.ks[0] + h % H * a.ks[1], kp + h * s.kp);
            pack_v(a, s, v + h / H * a.vs[0] + h % H * a.vs[1], vp + h * s.vp);
        }
        Buffers& buf = buffers[omp_get_thread_num()];
#pragma omp for schedule(dynamic)
        for (int64_t w = 0; w < heads * qgroups; ++w) {
            const int64_t h = w / qgroups, b = h / H, hh = h % H, row0 = w % qgroups * GROUP * ROWS;
            group(a, s, q + b * a.qs[0] + hh * a.qs[1] + row0 * a.qs[2], kp + h * s.kp, vp + h * s.vp,
                  out + b * a.os[0] + hh * a.os[1] + row0 * a.os[2], std::min(GROUP * ROWS, N - row0), buf);
        }
        release_tiles();
    }
    return 0;
}

}  // namespace

#ifndef LATENTDIFF_AVX512_ATTENTION
// Linux hands out AMX tile state only on request (arch_prctl ARCH_REQ_XCOMP_PERM for XFEATURE_XTILEDATA); 0: granted
extern "C" int amx_request() {
    return (int)syscall(SYS_arch_prctl, 0x1023, 18);
}
#endif

// out = softmax(scale * q k^T) v for q [B, H, N, d], k and v [B, H, Nk, d], out [B, H, N, d], all bfloat16
// (amx_attention) or all float32 (amx_attention_fp32), with unit stride along d (even) and strides[12] = the batch,
// head and token strides of q, k, v, out (in elements). Returns 0, or 1 where its buffers could not be allocated
// (then out is untouched).
extern "C" int amx_attention(const uint16_t* q, const uint16_t* k, const uint16_t* v, uint16_t* out, int64_t B,
                             int64_t H, int64_t N, int64_t Nk, int64_t d, const int64_t* strides, float scale,
                             int threads) {
    return attention(q, k, v, out, B, H, N, Nk, d, strides, scale, threads);
}

#ifndef LATENTDIFF_AVX512_ATTENTION  // (float32 as six products of parts: PyTorch's float32 kernel wins without AMX)
extern "C" int amx_attention_fp32(const float* q, const float* k, const float* v, float* out, int64_t B, int64_t H,
                                  int64_t N, int64_t Nk, int64_t d, const int64_t* strides, float scale,
                                  int threads) {
    return attention(q, k, v, out, B, H, N, Nk, d, strides, scale, threads);
}

// ---- float32 linear layers on the same tiles: y = x W^T + b (+ residual), each product as the six products of
// bfloat16 parts as above. oneDNN's float32 products reach 220-310 GFLOP/s on SD 1.5's linear layers on the 2-core
// AMX host (FMA-bound); these ~350-440. The products of a pass over KC of the depth are summed in tiles, then added
// to y in fp32 (the six products per product would otherwise round the running sums six times as often: errors
// against float64 ~3x oneDNN's at depth 5120, below them this way).

namespace {

constexpr int64_t MAX_KC = 384;  // depth per pass over the output, at most
// for a GEGLU (whose running sums between passes take a pass over memory of their own): 32x32's 640 in one pass
constexpr int64_t MAX_KC_GEGLU = 1280;
constexpr int64_t ROWS_BYTES = 640 * 1024;  // bytes of x's parts (rows x depth x 3 parts) per turn, at most: in L2
constexpr int64_t MAX_SB = 128;  // rows of x per thread's turn, at most (their parts for a pass: 320 KiB, in L2)
constexpr int64_t PANEL = 768 * 1024;  // bytes of packed weights (columns x depth x 3 parts) per panel: in L2

// n split into the fewest equal steps (multiples of 32) of at most `most`
inline int64_t even_steps(int64_t n, int64_t most) {
    const int64_t count = (n + most - 1) / most;
    return padded((n + count - 1) / count, 32);
}

// the exact GELU, x (1 + erf(x / sqrt 2)) / 2, with erf by Abramowitz & Stegun's 7.1.26 (absolute error < 1.5e-7)
inline __m512 gelu(__m512 x) {
    const __m512 one = _mm512_set1_ps(1.f), z = _mm512_mul_ps(x, _mm512_set1_ps(0.70710678f));
    const __m512 a = _mm512_abs_ps(z);
    const __m512 t = _mm512_div_ps(one, _mm512_fmadd_ps(a, _mm512_set1_ps(0.3275911f), one));
    __m512 r = _mm512_fmadd_ps(_mm512_set1_ps(1.061405429f), t, _mm512_set1_ps(-1.453152027f));
    r = _mm512_fmadd_ps(r, t, _mm512_set1_ps(1.421413741f));
    r = _mm512_fmadd_ps(r, t, _mm512_set1_ps(-0.284496736f));
    r = _mm512_fmadd_ps(r, t, _mm512_set1_ps(0.254829592f));
    r = _mm512_mul_ps(r, t);
    const __m512 e = exp2_ps<3>(_mm512_mul_ps(_mm512_mul_ps(a, a), _mm512_set1_ps(-1.44269504f)));
    const __m512 erf_a = _mm512_fnmadd_ps(r, e, one);  // erf(|z|)
    const __m512 erf = _mm512_castsi512_ps(_mm512_or_si512(
        _mm512_castps_si512(erf_a), _mm512_and_si512(_mm512_castps_si512(z), _mm512_set1_epi32((int)0x80000000u))));
    return _mm512_mul_ps(_mm512_mul_ps(x, _mm512_set1_ps(0.5f)), _mm512_add_ps(one, erf));
}

// Where the rows of a product come from and go to. Row r is pixel (b, i, j) of a B x Ho x Wo grid of outputs; its
// left-hand side is the patch of an H x W input map under a kh x kw filter at (i * stride + top, j * stride + left):
// the taps in row-major order, each tap's C channels padded with zeros to C16 (a multiple of 16, so that no 16 depths
// of a tile row span two taps), pixels outside the map zero. A linear layer's rows are the 1x1 patches of a B x 1 x 1
// grid (C: its depth). Offsets in elements: x's pixel (b, y, x) at b * xb + y * xh + x * xw (channels unit-stride);
// the output's and the residual's pixel (b, i, j) at b * yb + i * yh + j * yw and b * rb + i * rh + j * rw.
struct Rows {
    const float* x;
    int64_t xb, xh, xw, H, W, C, C16, kh, kw, stride, top, left;
    int64_t Ho, Wo, yb, yh, yw, rb, rh, rw;
};

inline Rows linear_rows(const float* x, int64_t xs, int64_t K, int64_t ys, int64_t rs) {
    return Rows{x, xs, 0, 0, 1, 1, K, padded(K, 16), 1, 1, 1, 0, 0, 1, 1, ys, 0, 0, rs, 0, 0};
}

// where a pass's products go: y = x W^T + bias (+ residual), the running sums kept in y; or, for a GEGLU (W's rows
// ordered value 16, gate 16, value 16, ...: each pair of column tiles a value's and its gate's), y = value *
// gelu(gate), D = N / 2 wide, the running sums in h [M][N] (only where there are several passes)
struct LinearOut {
    float* y;
    const float *bias, *residual;
    float* h;
    int64_t N;
    bool geglu;
};

// adds a pass's products for columns [16 nb, 16 nb + 32) of rows [row0, row0 + rows) (c: [32][32]; those rows of y
// and of the residual at the offsets yoff, roff)
inline void flush(const LinearOut& o, const float* c, int64_t row0, const int64_t* yoff, const int64_t* roff,
                  int64_t rows, int64_t nb, bool first, bool last) {
    for (int64_t i = 0; i < rows; ++i) {
        const int64_t row = row0 + i;
        if (o.geglu) {
            const int64_t n = nb * 16;
            __m512 v = _mm512_load_ps(c + i * 32), g = _mm512_load_ps(c + i * 32 + 16);
            float* sums = o.h ? o.h + row * o.N + n : nullptr;
            if (first) {
                v = _mm512_add_ps(v, _mm512_loadu_ps(o.bias + n));
                g = _mm512_add_ps(g, _mm512_loadu_ps(o.bias + n + 16));
            } else {
                v = _mm512_add_ps(v, _mm512_loadu_ps(sums));
                g = _mm512_add_ps(g, _mm512_loadu_ps(sums + 16));
            }
            if (last) {
                _mm512_storeu_ps(o.y + yoff[i] + n / 2, _mm512_mul_ps(v, gelu(g)));
            } else {
                _mm512_storeu_ps(sums, v);
                _mm512_storeu_ps(sums + 16, g);
            }
            continue;
        }
        float* out = o.y + yoff[i];
        for (int64_t j = 0; j < 32; j += 16) {
            const int64_t n = nb * 16 + j;
            const __mmask16 cols = first_lanes(o.N - n);
            __m512 sum = _mm512_load_ps(c + i * 32 + j);
            if (!first) {
                sum = _mm512_add_ps(sum, _mm512_maskz_loadu_ps(cols, out + n));
            } else {
                if (o.bias) sum = _mm512_add_ps(sum, _mm512_maskz_loadu_ps(cols, o.bias + n));
                if (o.residual) sum = _mm512_add_ps(sum, _mm512_maskz_loadu_ps(cols, o.residual + roff[i] + n));
            }
            _mm512_mask_storeu_ps(out + n, cols, sum);
        }
    }
}

constexpr int64_t FEW_ROWS = 8;  // at most this many rows go to few_rows

// y for a few rows (the time embedding's two), which would leave the tiles mostly empty: vector products with each
// weight taken as the exact sum of its parts, 16 columns at a time, summed in double precision (PyTorch's products
// for so few rows are more exact than its large ones: a float32 sum along the depth would err 2-4x more)
void few_rows(const float* x, int64_t xs, const uint16_t* wp, const LinearOut& o, int64_t ys, int64_t rs,
              int64_t M, int64_t K, int threads) {
    const int64_t K32 = padded(K, 32), tiles = (o.N + 15) / 16;
    const __m512i high = _mm512_set1_epi32((int)0xFFFF0000u);
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t nb = 0; nb < tiles; ++nb) {
        const int64_t n = nb * 16;
        const __mmask16 cols = first_lanes(o.N - n);
        __m512d low[FEW_ROWS], top[FEW_ROWS];  // columns n..n+7, n+8..n+15 of each row
        for (int64_t m = 0; m < M; ++m) low[m] = top[m] = _mm512_setzero_pd();
        for (int64_t r = 0; r < (K + 1) / 2; ++r) {
            __m512 we = _mm512_setzero_ps(), wo = we;  // depths 2r and 2r + 1 (the sums of the parts: exact)
            for (int c = 2; c >= 0; --c) {
                const __m512i pairs = _mm512_load_si512(wp + ((nb * 3 + c) * (K32 / 2) + r) * 32);
                we = _mm512_add_ps(we, _mm512_castsi512_ps(_mm512_slli_epi32(pairs, 16)));
                wo = _mm512_add_ps(wo, _mm512_castsi512_ps(_mm512_and_si512(pairs, high)));
            }
            const __m512d we0 = _mm512_cvtps_pd(_mm512_castps512_ps256(we));
            const __m512d wo0 = _mm512_cvtps_pd(_mm512_castps512_ps256(wo));
            const __m512d we1 = _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(we), 1)));
            const __m512d wo1 = _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(wo), 1)));
            for (int64_t m = 0; m < M; ++m) {
                const __m512d xe = _mm512_set1_pd(x[m * xs + 2 * r]);
                const __m512d xo = _mm512_set1_pd(2 * r + 1 < K ? x[m * xs + 2 * r + 1] : 0.f);
                low[m] = _mm512_fmadd_pd(xo, wo0, _mm512_fmadd_pd(xe, we0, low[m]));
                top[m] = _mm512_fmadd_pd(xo, wo1, _mm512_fmadd_pd(xe, we1, top[m]));
            }
        }
        for (int64_t m = 0; m < M; ++m) {
            alignas(64) double sums[16];
            _mm512_store_pd(sums, low[m]);
            _mm512_store_pd(sums + 8, top[m]);
            alignas(64) float out[16];
            for (int64_t j = 0; j < 16; ++j) {
                double v = sums[j];
                if (n + j < o.N) {
                    if (o.bias) v += o.bias[n + j];
                    if (o.residual) v += o.residual[m * rs + n + j];
                }
                out[j] = (float)v;
            }
            _mm512_mask_storeu_ps(o.y + m * ys + n, cols, _mm512_load_ps(out));
        }
    }
}

}  // namespace

// Passes over the depth that amx_linear makes for K
extern "C" int64_t amx_linear_passes(int64_t K, int geglu) {
    const int64_t K32 = padded(K, 32), KC = even_steps(K32, geglu ? MAX_KC_GEGLU : MAX_KC);
    return (K32 + KC - 1) / KC;
}

// Elements (uint16) of W [N][K] packed by amx_pack_linear: [N32 / 16][3 parts][K32 / 2][16 columns][2]
extern "C" int64_t amx_packed_linear_size(int64_t N, int64_t K) {
    return padded(N, 32) * 3 * padded(K, 32);
}

extern "C" void amx_pack_linear(const float* w, int64_t N, int64_t K, uint16_t* wp, int threads) {
    const int64_t K32 = padded(K, 32), N32 = padded(N, 32);
    const __m512i rows = row_offsets(K * 4);  // 16 columns'
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t nb = 0; nb < N32 / 16; ++nb) {
        const __mmask16 cols = first_lanes(N - nb * 16);
        for (int64_t r = 0; r < K32 / 2; ++r) {  // (depths past K: zeros, read from nowhere)
            __m512i pairs[3];
            gather_pairs(w + nb * 16 * K + 2 * r, rows, 2 * r < K ? cols : 0, 2 * r + 1 < K ? cols : 0, pairs);
            for (int c = 0; c < 3; ++c) _mm512_storeu_si512(wp + ((nb * 3 + c) * (K32 / 2) + r) * 32, pairs[c]);
        }
    }
}

// y [P][M][N] = x [P][M][K] W[p]^T + bias (+ residual), or a GEGLU of it, for P points at once (points xp, yp and wps
// elements apart in x, y and the packed weights), the rows as `r` places them (PATCHES: a convolution's, whose taps
// may fall outside the map; else a linear layer's, which need no such checks); see amx_linear
template <bool PATCHES>
static int linear(const Rows& r, int64_t xp, const uint16_t* wp0, int64_t wps, const LinearOut& out, int64_t yp,
                  int64_t P, int64_t M, int64_t N, int64_t K, int threads) {
    const bool geglu = out.geglu;
    const int64_t K32 = padded(K, 32), N32 = padded(N, 32), KC = even_steps(K32, geglu ? MAX_KC_GEGLU : MAX_KC);
    const int64_t KS = KC + 32, NC = even_steps(N32, std::max<int64_t>(32, PANEL / (KC * 6) / 32 * 32));
    const int64_t most_rows = std::max<int64_t>(ROWS, std::min(MAX_SB, ROWS_BYTES / (KS * 6) / ROWS * ROWS));
    // rows split among the threads left over by the points (each point's weights are then read by as few threads as
    // can share the work: where the points are enough, by one)
    const int64_t per_point = std::max<int64_t>(1, threads / P);
    const int64_t SB = std::min(most_rows, padded((M + per_point - 1) / per_point, 32)), sblocks = (M + SB - 1) / SB;
    // fewer blocks of rows than threads (few rows, many cores): the columns are shared out too, each thread
    // splitting its rows of x into parts itself
    const int64_t slices = std::min(N32 / 32, std::max<int64_t>(1, threads / (P * sblocks)));
    const int64_t NS = padded((N32 + slices - 1) / slices, 32);
    int failed = 0;
#pragma omp parallel num_threads(threads)
    {
        const FlushSubnormals flushing;
        // x's parts for one block of rows and one pass, [SB / 32][3 parts][32 rows][KS] (KS: a tile's 16 rows never
        // share an L1 set), kept by each (PyTorch's, long-lived) thread from call to call
        thread_local std::unique_ptr<Aligned<uint16_t>> kept;
        thread_local int64_t kept_size = 0;
        const int64_t size = SB * 3 * KS;
        if (kept_size < size) {
            kept.reset();
            kept_size = 0;
            try {
                kept.reset(new Aligned<uint16_t>(size));
                kept_size = size;
            } catch (const std::bad_alloc&) {
#pragma omp atomic write
                failed = 1;
            }
        }
#pragma omp barrier
        if (!failed) {
            uint16_t* const ap = kept->data();
            configure_tiles();
            alignas(64) float c[ROWS * 32];
            // per row of the block: its patch's top-left input pixel (x offset and coordinates; rows past M far
            // outside the map) and its output and residual offsets
            int64_t xoff[MAX_SB], top[MAX_SB], left[MAX_SB], yoff[MAX_SB], roff[MAX_SB];
            bool whole[MAX_SB];  // the patch lies inside the map
            // per 16 depths of a pass: the tap's offset from the patch's corner (with the channel), its row and
            // column in the filter, and the real channels among the 16
            int64_t toff[MAX_KC_GEGLU / 16], ty[MAX_KC_GEGLU / 16], tx[MAX_KC_GEGLU / 16];
            __mmask16 lanes[MAX_KC_GEGLU / 16];
#pragma omp for schedule(static)
            for (int64_t item = 0; item < P * sblocks * slices; ++item) {
                const int64_t point = item / (sblocks * slices), sb = item / slices % sblocks;
                const int64_t n_start = item % slices * NS, n_end = std::min(N32, n_start + NS);
                const float* const x = r.x + point * xp;
                const uint16_t* const wp = wp0 + point * wps;
                LinearOut o = out;
                o.y += point * yp;
                const int64_t row0 = sb * SB, blocks = (std::min(M, row0 + SB) - row0 + ROWS - 1) / ROWS;
                // (b, oi, oj): row0's pixel, then the next row's
                int64_t b = row0 / (r.Ho * r.Wo), oi = row0 / r.Wo % r.Ho, oj = row0 % r.Wo;
                for (int64_t i = 0; i < blocks * ROWS; ++i) {
                    const bool real = row0 + i < M;
                    top[i] = real ? oi * r.stride + r.top : -(r.H + r.kh);
                    left[i] = oj * r.stride + r.left;
                    xoff[i] = real ? b * r.xb + top[i] * r.xh + left[i] * r.xw : 0;
                    yoff[i] = b * r.yb + oi * r.yh + oj * r.yw;
                    roff[i] = b * r.rb + oi * r.rh + oj * r.rw;
                    whole[i] = top[i] >= 0 && top[i] + r.kh <= r.H && left[i] >= 0 && left[i] + r.kw <= r.W;
                    if (++oj == r.Wo) {
                        oj = 0;
                        if (++oi == r.Ho) oi = 0, ++b;
                    }
                }
                for (int64_t k0 = 0; k0 < K32; k0 += KC) {
                    const int64_t depth = std::min(KC, K32 - k0);
                    // (k0's tap, its row and column in the filter, and channel; then the next 16 depths')
                    int64_t tap = k0 / r.C16, ch = k0 - tap * r.C16, fy = tap / r.kw, fx = tap % r.kw;
                    for (int64_t t = 0; t < depth / 16; ++t) {
                        ty[t] = fy;
                        tx[t] = fx;
                        toff[t] = fy * r.xh + fx * r.xw + ch;
                        lanes[t] = fy < r.kh ? first_lanes(r.C - ch) : 0;
                        if ((ch += 16) == r.C16) {
                            ch = 0;
                            if (++fx == r.kw) fx = 0, ++fy;
                        }
                    }
                    for (int64_t i = 0; i < blocks * ROWS; ++i) {
                        uint16_t* const dst = ap + ((i / ROWS * 3) * ROWS + i % ROWS) * KS;
                        const float* const patch = x + xoff[i];
                        const auto put = [&](int64_t t, __mmask16 load) {
                            __m256i parts[3];
                            split(_mm512_maskz_loadu_ps(load, patch + toff[t]), parts, 3);
                            for (int p = 0; p < 3; ++p)
                                _mm256_store_si256((__m256i*)(dst + p * ROWS * KS + 16 * t), parts[p]);
                        };
                        if (!PATCHES) {
                            for (int64_t t = 0; t < depth / 16; ++t) put(t, row0 + i < M ? lanes[t] : 0);
                        } else if (whole[i]) {
                            for (int64_t t = 0; t < depth / 16; ++t) put(t, lanes[t]);
                        } else {  // (taps outside the map: zeros)
                            for (int64_t t = 0; t < depth / 16; ++t) {
                                const int64_t y = top[i] + ty[t], xx = left[i] + tx[t];
                                put(t, y >= 0 && y < r.H && xx >= 0 && xx < r.W ? lanes[t] : 0);
                            }
                        }
                    }
                    for (int64_t n0 = n_start; n0 < n_end; n0 += NC) {
                        for (int64_t mb = 0; mb < blocks; ++mb) {
                            const int64_t rows = std::min(ROWS, M - row0 - mb * ROWS);
                            for (int64_t nb = n0 / 16; nb < std::min(n_end, n0 + NC) / 16; nb += 2) {
                                _tile_zero(0);
                                _tile_zero(1);
                                _tile_zero(2);
                                _tile_zero(3);
                                for (int64_t t = 0; t < depth / 32; ++t) {
                                    const int64_t kt = k0 / 32 + t;
                                    for (int g = 0; g < 6; ++g) {
                                        if (g == 0 || LEFT[g] != LEFT[g - 1]) {
                                            const uint16_t* a = ap + (mb * 3 + LEFT[g]) * ROWS * KS + 32 * t;
                                            _tile_loadd(4, a, KS * 2);
                                            _tile_loadd(5, a + 16 * KS, KS * 2);
                                        }
                                        _tile_loadd(6, wp + ((nb * 3 + RIGHT[g]) * (K32 / 2) + 16 * kt) * 32, 64);
                                        _tile_loadd(7, wp + (((nb + 1) * 3 + RIGHT[g]) * (K32 / 2) + 16 * kt) * 32, 64);
                                        _tile_dpbf16ps(0, 4, 6);
                                        _tile_dpbf16ps(1, 5, 6);
                                        _tile_dpbf16ps(2, 4, 7);
                                        _tile_dpbf16ps(3, 5, 7);
                                    }
                                }
                                _tile_stored(0, c, 128);
                                _tile_stored(1, c + 16 * 32, 128);
                                _tile_stored(2, c + 16, 128);
                                _tile_stored(3, c + 16 * 32 + 16, 128);
                                const int64_t at = mb * ROWS;
                                flush(o, c, row0 + at, yoff + at, roff + at, rows, nb, k0 == 0, k0 + KC >= K32);
                            }
                        }
                    }
                }
            }
            _tile_release();
        }
    }
    return failed;
}

// y [M][N] (row stride ys) = x [M][K] (row stride xs) W^T + bias (may be null) + residual [M][N] (row stride rs; may be
// null, may be y itself), W packed by amx_pack_linear; or, with `geglu` (see LinearOut: N a multiple of 32, a bias, no
// residual), y [M][N / 2] = value * gelu(gate), with h [M][N] for the running sums where amx_linear_passes(K) > 1.
// Each thread takes blocks of up to MAX_SB rows (and a share of the columns where the blocks are fewer than the
// threads); for each pass over KC of the depth it splits those rows of x into parts (in L2), then multiplies them by
// one panel of packed weights after another (read from L3 once per block of rows); up to FEW_ROWS rows go to
// few_rows. Returns 0, or 1 where its buffers could not be made.
extern "C" int amx_linear(const float* x, int64_t xs, const uint16_t* wp, const float* bias, const float* residual,
                          int64_t rs, float* y, int64_t ys, int64_t M, int64_t N, int64_t K, int threads, int geglu,
                          float* h) {
    const LinearOut o{y, bias, residual, h, N, geglu != 0};
    if (M <= 0 || K <= 0) return 0;  // (nothing for the tiles: linear() in Python gives the bias)
    if (M <= FEW_ROWS && !geglu) {
        few_rows(x, xs, wp, o, ys, rs, M, K, threads);
        return 0;
    }
    return linear<false>(linear_rows(x, xs, K, ys, rs), 0, wp, 0, o, 0, 1, M, N, K, threads);
}

// y [P][M][N] = x [P][M][K] W[p]^T for P weights packed by amx_pack_linear (each `wps` elements after the last), row
// stride ys and K, points yp and xp elements apart: Winograd's products (one per transform point). The threads take
// points first, so that each point's weights are read from memory by one of them
extern "C" int amx_linear_points(const float* x, int64_t xp, const uint16_t* wp, int64_t wps, float* y, int64_t yp,
                                 int64_t ys, int64_t P, int64_t M, int64_t N, int64_t K, int threads) {
    if (P <= 0 || M <= 0 || K <= 0) return 0;
    const LinearOut o{y, nullptr, nullptr, nullptr, N, false};
    return linear<false>(linear_rows(x, K, K, ys, 0), xp, wp, wps, o, yp, P, M, N, K, threads);
}

// The geometry of amx_conv's convolution (every field in elements or pixels; see Rows): a B x H x W map of C
// channels (x's pixel (b, y, x) at b * xb + y * xh + x * xw, channels unit-stride) under a kh x kw filter with the
// given stride, output pixel (i, j) of the Ho x Wo grid taking the patch whose top-left tap is at input pixel
// (i * stride + top, j * stride + left) (top, left <= 0: the padding); N output channels, written at b * yb + i * yh +
// j * yw (and the residual read at b * rb + i * rh + j * rw)
struct ConvShape {
    int64_t B, H, W, C, xb, xh, xw, kh, kw, stride, top, left, Ho, Wo, N, yb, yh, yw, rb, rh, rw;
};

// The depth of amx_conv's products for a kh x kw filter of C input channels: kh * kw taps of C16 (C padded to 16);
// its weights [N][C][kh][kw] are packed by amx_pack_linear as [N][kh][kw][C16] (N x that depth)
inline int64_t conv_depth(int64_t kh, int64_t kw, int64_t C) { return kh * kw * padded(C, 16); }

// y = conv(x, W) + bias (may be null) + residual (may be null), float32, the products as amx_linear's (each output
// pixel a row, its patch the row's depth), W packed by amx_pack_linear from [N][kh][kw][C16]. Returns 0, or 1 where
// its buffers could not be made.
extern "C" int amx_conv(const float* x, const ConvShape* s, const uint16_t* wp, const float* bias,
                        const float* residual, float* y, int threads) {
    const int64_t M = s->B * s->Ho * s->Wo, K = conv_depth(s->kh, s->kw, s->C);
    if (M <= 0 || s->N <= 0) return 0;
    const Rows r{x, s->xb, s->xh, s->xw, s->H, s->W, s->C, padded(s->C, 16), s->kh, s->kw, s->stride, s->top,
                 s->left, s->Ho, s->Wo, s->yb, s->yh, s->yw, s->rb, s->rh, s->rw};
    const LinearOut o{y, bias, residual, nullptr, s->N, false};
    return linear<true>(r, 0, wp, 0, o, 0, 1, M, s->N, K, threads);
}

#endif  // LATENTDIFF_AVX512_ATTENTION
