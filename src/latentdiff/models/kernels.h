// Shared by latentdiff's C++ kernels (amx.cpp, fma.cpp, winograd.cpp, group_norm.cpp).
#pragma once
#include <stdint.h>
#include <string.h>

#include <type_traits>

#if defined(__x86_64__)
#include <xmmintrin.h>
#include <pmmintrin.h>
#endif

// Subnormal results and operands flushed to zero (MXCSR's FTZ and DAZ) on this thread while it lives; the previous
// mode is restored after, since the threads are PyTorch's. Without it every operation that makes or reads a subnormal
// takes a microcode assist: exponentials of scores far below the row's maximum (peaked attention: 8-16x slower) and the
// GELU of large gates (2x slower) did. The tiles treat bfloat16 subnormals as zero anyway; the sums change by < 2^-126.
struct FlushSubnormals {
#if defined(__x86_64__)
    const unsigned int saved = _mm_getcsr();
    FlushSubnormals() { _mm_setcsr(saved | _MM_FLUSH_ZERO_ON | _MM_DENORMALS_ZERO_ON); }
    ~FlushSubnormals() { _mm_setcsr(saved); }
#endif
    FlushSubnormals(const FlushSubnormals&) = delete;
    FlushSubnormals& operator=(const FlushSubnormals&) = delete;
};

// The portable kernels' vectors (GCC's vector extension), one of the host's vector registers wide: 16 floats with
// AVX-512, else 8 (AVX2). Wider than the registers, GCC splits them and moves much of the work through the stack:
// 16-float vectors on an AVX2-only CPU made group_norm.cpp 2-3x slower than PyTorch's GroupNorm + SiLU.
// Loads and stores of the first `lanes` of them (the rest read as zeros).
#if defined(__AVX512F__)
constexpr int LANES = 16;
#else
constexpr int LANES = 8;
#endif
typedef float Vec __attribute__((vector_size(LANES * sizeof(float))));

inline Vec load(const float* p, int lanes) {
    Vec v = {};
    if (lanes == LANES) memcpy(&v, p, sizeof v);  // one vector load
    else memcpy(&v, p, lanes * sizeof(float));
    return v;
}

inline void store(Vec v, int lanes, float* p) {
    if (lanes == LANES) memcpy(p, &v, sizeof v);
    else memcpy(p, &v, lanes * sizeof(float));
}

// chunk(c, lanes) for each vector's worth of elements c.. of `count`: lanes is LANES as a compile-time constant
// (std::integral_constant) for whole vectors, so that each load and store is one vector load or store (with the
// lane count checked per load, GCC moved every loaded vector through the stack), then an int for the last, partial
// one
template <class Chunk>
inline void by_vectors(int64_t count, Chunk&& chunk) {
    int64_t c = 0;
    for (; c + LANES <= count; c += LANES) chunk(c, std::integral_constant<int, LANES>{});
    if (c < count) chunk(c, int(count - c));
}
