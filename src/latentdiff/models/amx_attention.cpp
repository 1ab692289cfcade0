// Bfloat16 attention on Intel AMX tiles, for latentdiff.models.amx_attention (which compiles this file with the
// system's g++ on first use and calls it through ctypes): out = softmax(scale * q k^T) v, no mask, no dropout, no
// gradients. Per head the keys and values are first re-laid out as AMX "B" tiles (zero padded: keys to a multiple
// of 32, the head dim to 32 for q k^T and to 16 for p v); then each block of 32 queries runs an online softmax
// (Milakov & Gimelshein 2018) over chunks of CHUNK keys: scores in fp32 from tile products, numerators
// exp(scale * (s - running max)) computed in fp32 and rounded to bfloat16 for the p v tile products, the output
// divided at the end by the sum of those rounded numerators (so that the weights sum to 1 as used; PyTorch's CPU
// flash kernel sums them before rounding, and its errors against float64 are the same or larger). OpenMP threads
// take heads (packing), then query blocks; loaded into a process that runs PyTorch, the OpenMP runtime is
// PyTorch's (same soname), so its worker threads are reused rather than competing with ours.
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

namespace {

struct TileConfig {
    uint8_t palette = 1, start_row = 0, reserved[14] = {};
    uint16_t colsb[16] = {};
    uint8_t rows[16] = {};
};

void configure_tiles() {
    TileConfig cfg;
    for (int i = 0; i < 8; ++i) { cfg.colsb[i] = 64; cfg.rows[i] = 16; }
    _tile_loadconfig(&cfg);
}

// 2^x = 2^round(x) * 2^f, f in [-1/2, 1/2], 2^f by a degree-4 polynomial fitted to it (relative error < 3e-6)
inline __m512 exp2_ps(__m512 x) {
    const __m512 n = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m512 f = _mm512_sub_ps(x, n);
    __m512 p = _mm512_fmadd_ps(_mm512_set1_ps(9.5605105e-3f), f, _mm512_set1_ps(5.5917040e-2f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.4024981e-1f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.9312197e-1f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.9999917e-1f));
    return _mm512_scalef_ps(p, n);
}

// the lanes [0, count) of a 16-lane vector (all for count >= 16, none for count <= 0)
inline __mmask16 first_lanes(int64_t count) {
    return count >= 16 ? (__mmask16)0xffff : count > 0 ? (__mmask16)((1u << count) - 1) : (__mmask16)0;
}

struct Args {
    const uint16_t *q, *k, *v;
    uint16_t* out;
    int64_t B, H, N, Nk, d;
    int64_t qs[3], ks[3], vs[3], os[3];  // batch, head, token strides (elements)
    float scale;
};

struct Shapes {
    int64_t nk32, dk, dn;  // keys padded to 32, head dim padded to 32 (QK depth), to 16 (PV width)
    // where the padding leaves room, column d of the packed values is all ones, so that the p v products also sum
    // the numerators (as the bf16 numbers they are multiplied as: the weights then sum to 1 exactly as rounded)
    bool ones;
};

// K of one head as B tiles of q k^T: [nk32 / 16][dk / 2][16 keys][2 dims], one gather of 16 keys' dim pairs at a
// time (keys past Nk and dims past d: zeros)
void pack_k(const Args& a, const Shapes& s, const uint16_t* k, uint16_t* kp) {
    const __m512i rows = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                            _mm512_set1_epi32((int)(a.ks[2] * 2)));  // byte offsets of 16 keys
    for (int64_t nb = 0; nb < s.nk32 / 16; ++nb) {
        const __mmask16 real = first_lanes(a.Nk - nb * 16);
        const uint16_t* base = k + nb * 16 * a.ks[2];
        for (int64_t r = 0; r < s.dk / 2; ++r) {
            const __m512i pairs = 2 * r < a.d ? _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), real, rows,
                                                                             base + 2 * r, 1)
                                              : _mm512_setzero_si512();
            _mm512_store_si512(kp + (nb * (s.dk / 2) + r) * 32, pairs);
        }
    }
}

// V of one head as B tiles of p v: [nk32 / 2][dn][2 keys] (keys past Nk and dims past d: zeros; dim d: ones where
// s.ones), 16 dims of two keys interleaved at a time
void pack_v(const Args& a, const Shapes& s, const uint16_t* v, uint16_t* vp) {
    alignas(64) static const uint16_t order[32] = {0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23,
                                                   8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31};
    const __m512i interleave = _mm512_load_si512(order);
    const __m256i one = _mm256_set1_epi16(0x3F80);  // bf16 1.0
    for (int64_t kk = 0; kk < s.nk32 / 2; ++kk) {
        for (int64_t n0 = 0; n0 < s.dn; n0 += 16) {
            const int64_t left = a.d - n0;
            const __mmask16 dims = first_lanes(left);
            const __mmask16 ones = s.ones && left >= 0 && left < 16 ? (__mmask16)(1u << left) : 0;
            __m256i two[2];
            for (int e = 0; e < 2; ++e) {
                const int64_t key = 2 * kk + e;
                two[e] = key < a.Nk ? _mm256_mask_mov_epi16(_mm256_maskz_loadu_epi16(dims, v + key * a.vs[2] + n0),
                                                             ones, one)
                                    : _mm256_setzero_si256();
            }
            const __m512i both = _mm512_inserti64x4(_mm512_castsi256_si512(two[0]), two[1], 1);
            _mm512_storeu_si512(vp + (kk * s.dn + n0) * 2, _mm512_permutexvar_epi16(interleave, both));
        }
    }
}

constexpr int64_t ROWS = 32;    // queries per block: two tile rows
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
    Aligned<uint16_t> q, p;
    Aligned<float> s, o, c;
    Buffers(const Shapes& sh) : q(ROWS * sh.dk), p(ROWS * PS), s(ROWS * SS), o(ROWS * sh.dn), c(ROWS * sh.dn) {}
};

// S[32][n] = Q K^T for keys [k0, k0 + n) (n a multiple of 32), from packed keys, 32 x 32 scores per pass (four
// accumulator tiles). Measured on a 2-core Sapphire Rapids-class host: a tile product takes ~14 cycles, a tile
// store ~50, so with head dims of 64 or less the stores of the scores, not the products, bound this part.
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

// Numerators may exceed 1 by up to 2^HEADROOM (bf16 and fp32 hold that easily): a chunk whose scores stay within
// that of the running maximum is exponentiated against it in one pass, without a pass to find its own maximum.
constexpr float HEADROOM = 8.f;

// 16 bf16 numbers as fp32 (exactly)
inline __m512 widen(__m256i bf16) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bf16), 16));
}

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

// exp2(c * (s - m)) of a row's scores as bf16 over n columns, the first `valid` real (the rest zero); returns the
// sum of those bf16 numbers (SUM; else 0), and in `seen` the largest score
template <bool SUM>
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
        const __m512 e0 = exp2_ps(_mm512_fmadd_ps(x0, vc, vmc)), e1 = exp2_ps(_mm512_fmadd_ps(x1, vc, vmc));
        const __m512i p = (__m512i)_mm512_cvtne2ps_pbh(e1, e0);
        _mm512_storeu_si512(prow + j, p);
        if (SUM) {
            s0 = _mm512_add_ps(s0, widen(_mm512_castsi512_si256(p)));
            s1 = _mm512_add_ps(s1, widen(_mm512_extracti64x4_epi64(p, 1)));
        }
    }
    for (; j < n; j += 16) {  // what is left: a last full vector, the ragged tail, zeros up to n
        const __mmask16 keep = first_lanes(valid - j);
        __m512 e = _mm512_setzero_ps();
        if (keep) {
            const __m512 x = _mm512_mask_loadu_ps(_mm512_set1_ps(-INFINITY), keep, srow + j);
            m0 = _mm512_max_ps(m0, x);
            e = _mm512_maskz_mov_ps(keep, exp2_ps(_mm512_fmadd_ps(x, vc, vmc)));
        }
        const __m256i p = (__m256i)_mm512_cvtneps_pbh(e);
        _mm256_storeu_si256((__m256i*)(prow + j), p);
        if (SUM) s0 = _mm512_add_ps(s0, widen(p));
    }
    seen = _mm512_reduce_max_ps(_mm512_max_ps(m0, m1));
    return _mm512_reduce_add_ps(_mm512_add_ps(s0, s1));
}

// one row's numerators for a chunk (exponentials), their sum added to l (SUM); m: the running maximum they are
// taken against, raised where the chunk's scores exceed it by more than HEADROOM; returns the factor that rescales
// what was summed before against the new maximum (1 where it stayed)
template <bool SUM>
inline float numerators(const float* srow, int64_t valid, int64_t n, float c, float& m, float& l, uint16_t* prow) {
    float seen;
    if (m != -INFINITY) {
        const float sum = exponentials<SUM>(srow, valid, n, c, m, prow, seen);
        if ((seen - m) * c <= HEADROOM) {
            l += sum;
            return 1.f;
        }
    } else {
        seen = row_max(srow, valid);
    }
    const float m_new = std::max(m, seen), alpha = exp2f((m - m_new) * c);
    m = m_new;
    l = l * alpha + exponentials<SUM>(srow, valid, n, c, m_new, prow, seen);
    return alpha;
}

// C[32][dn] = P V for keys [k0, k0 + n) (n a multiple of 32), from packed values
inline void values(const Shapes& s, const uint16_t* pbuf, const uint16_t* vp, int64_t k0, int64_t n, float* cbuf) {
    for (int64_t jb = 0; jb < s.dn / 16; jb += 2) {
        const bool two = jb + 1 < s.dn / 16;
        _tile_zero(0);
        _tile_zero(1);
        _tile_zero(2);
        _tile_zero(3);
        for (int64_t t = 0; t < n / 32; ++t) {
            const uint16_t* v = vp + ((k0 / 2 + 16 * t) * s.dn + 16 * jb) * 2;
            _tile_loadd(4, pbuf + 32 * t, PS * 2);
            _tile_loadd(5, pbuf + 16 * PS + 32 * t, PS * 2);
            _tile_loadd(6, v, s.dn * 4);
            _tile_dpbf16ps(0, 4, 6);
            _tile_dpbf16ps(1, 5, 6);
            if (two) {
                _tile_loadd(7, v + 32, s.dn * 4);
                _tile_dpbf16ps(2, 4, 7);
                _tile_dpbf16ps(3, 5, 7);
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

// one block of up to 32 query rows (`rows`) of one head
void block(const Args& a, const Shapes& s, const uint16_t* q, const uint16_t* kp, const uint16_t* vp,
           uint16_t* out, int64_t rows, Buffers& buf) {
    for (int64_t i = 0; i < ROWS; ++i) {  // queries, zero padded to [32][dk]
        uint16_t* dst = buf.q.data() + i * s.dk;
        if (i < rows) {
            memcpy(dst, q + i * a.qs[2], a.d * 2);
            memset(dst + a.d, 0, (s.dk - a.d) * 2);
        } else {
            memset(dst, 0, s.dk * 2);
        }
    }
    const float c = a.scale * 1.4426950408889634f;
    float m[ROWS], l[ROWS], alpha[ROWS];
    std::fill(m, m + ROWS, -INFINITY);
    std::fill(l, l + ROWS, 0.f);
    std::fill(buf.o.data(), buf.o.data() + ROWS * s.dn, 0.f);
    for (int64_t k0 = 0; k0 < s.nk32; k0 += CHUNK) {
        const int64_t n = std::min(CHUNK, s.nk32 - k0), valid = std::min(n, a.Nk - k0);
        scores(s, buf.q.data(), kp, k0, n, buf.s.data());
        for (int64_t i = 0; i < ROWS; ++i) {
            float* srow = buf.s.data() + i * SS;
            uint16_t* prow = buf.p.data() + i * PS;
            alpha[i] = s.ones ? numerators<false>(srow, valid, n, c, m[i], l[i], prow)
                              : numerators<true>(srow, valid, n, c, m[i], l[i], prow);
        }
        values(s, buf.p.data(), vp, k0, n, buf.c.data());
        for (int64_t i = 0; i < ROWS; ++i) {
            const __m512 va = _mm512_set1_ps(alpha[i]);
            float* o = buf.o.data() + i * s.dn;
            const float* cc = buf.c.data() + i * s.dn;
            for (int64_t j = 0; j < s.dn; j += 16)
                _mm512_storeu_ps(o + j, _mm512_fmadd_ps(_mm512_loadu_ps(o + j), va, _mm512_loadu_ps(cc + j)));
        }
    }
    for (int64_t i = 0; i < rows; ++i) {
        const float* orow = buf.o.data() + i * s.dn;
        const __m512 inv = _mm512_set1_ps(1.f / (s.ones ? orow[a.d] : l[i]));
        uint16_t* dst = out + i * a.os[2];
        for (int64_t j = 0; j < a.d; j += 16) {
            __m256i r = (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(_mm512_loadu_ps(orow + j), inv));
            _mm256_mask_storeu_epi16(dst + j, first_lanes(a.d - j), r);
        }
    }
}

}  // namespace

// Linux hands out AMX tile state only on request (arch_prctl ARCH_REQ_XCOMP_PERM for XFEATURE_XTILEDATA); 0: granted
extern "C" int amx_request() {
    return (int)syscall(SYS_arch_prctl, 0x1023, 18);
}

// out = softmax(scale * q k^T) v for q [B, H, N, d], k and v [B, H, Nk, d], out [B, H, N, d], all bfloat16 with
// unit stride along d (even) and strides[12] = the batch, head and token strides of q, k, v, out (in elements).
// Returns 0, or 1 where its buffers could not be allocated (then out is untouched).
extern "C" int amx_attention(const uint16_t* q, const uint16_t* k, const uint16_t* v, uint16_t* out,
                              int64_t B, int64_t H, int64_t N, int64_t Nk, int64_t d, const int64_t* strides,
                              float scale, int threads) {
    Args a{q, k, v, out, B, H, N, Nk, d, {}, {}, {}, {}, scale};
    for (int i = 0; i < 3; ++i) {
        a.qs[i] = strides[i]; a.ks[i] = strides[3 + i]; a.vs[i] = strides[6 + i]; a.os[i] = strides[9 + i];
    }
    Shapes s{(Nk + 31) / 32 * 32, (d + 31) / 32 * 32, (d + 15) / 16 * 16, d % 16 != 0};
    const int64_t heads = B * H, qblocks = (N + ROWS - 1) / ROWS;
    const int64_t kp_size = s.nk32 * s.dk, vp_size = s.nk32 * s.dn;
    // the packed keys and values go to a buffer kept from call to call (a fresh one of this size, 14 MB for SD
    // 1.5's largest attention, page-faults on every call); a call that finds it in use by another thread's call
    // makes its own
    static std::mutex kept_lock;
    static std::unique_ptr<Aligned<uint16_t>> kept;
    static int64_t kept_size = 0;
    std::unique_lock<std::mutex> hold(kept_lock, std::try_to_lock);
    std::unique_ptr<Aligned<uint16_t>> own;
    std::vector<Buffers> buffers;  // one per thread
    const int64_t size = heads * (kp_size + vp_size);
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
    uint16_t* const vp = kp + heads * kp_size;
#pragma omp parallel num_threads(threads)
    {
        configure_tiles();
#pragma omp for schedule(dynamic)
        for (int64_t h = 0; h < heads; ++h) {
            pack_k(a, s, k + h / H * a.ks[0] + h % H * a.ks[1], kp + h * kp_size);
            pack_v(a, s, v + h / H * a.vs[0] + h % H * a.vs[1], vp + h * vp_size);
        }
        Buffers& buf = buffers[omp_get_thread_num()];
#pragma omp for schedule(dynamic)
        for (int64_t w = 0; w < heads * qblocks; ++w) {
            const int64_t h = w / qblocks, b = h / H, hh = h % H, row0 = w % qblocks * ROWS;
            block(a, s, q + b * a.qs[0] + hh * a.qs[1] + row0 * a.qs[2], kp + h * kp_size,
                  vp + h * vp_size, out + b * a.os[0] + hh * a.os[1] + row0 * a.os[2],
                  std::min(ROWS, N - row0), buf);
        }
        _tile_release();
    }
    return 0;
}
