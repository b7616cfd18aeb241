// Shared by the CPU kernels: vectors of the instruction set's width and a register-blocked product of small
// matrices. Included by cpp_chunk.cpp, cpp_decode.cpp and cpp_window.cpp (each built with the same -march).

#pragma once

#include <cmath>
#include <cstring>
#if defined(__SSE__)
#include <xmmintrin.h>
#endif

namespace dsla {

// The micro-kernel's register blocking, per instruction set: R rows by NV vectors of LANES floats accumulate in
// registers, with NV vectors of B and one broadcast beside them. AVX-512 has 32 registers of 16 floats: 8 x 2
// (16 accumulators). AVX2 has 16 registers of 8 floats: 4 x 2 (8 accumulators; 6 x 2 measured no faster). A
// 16-float vector there is two registers, and the 8 x 2 block of 16-float vectors spilled: ten times slower.
#if defined(__AVX512F__)
constexpr int LANES = 16, ROWS = 8, PANEL = 2;
#else
constexpr int LANES = 8, ROWS = 4, PANEL = 2;
#endif
static_assert(8 % ROWS == 0, "products have a multiple of 8 rows");
typedef float vf __attribute__((vector_size(4 * LANES)));

inline vf load(const float* p) {
    vf x;
    std::memcpy(&x, p, sizeof x);
    return x;
}

inline void store(float* p, vf x) { std::memcpy(p, &x, sizeof x); }

// C[R x LANES NV] (+)= A[R x P] @ B[P x LANES NV]: A(r, p) at A[r * ars + p * aps] (any layout: its elements are
// broadcast one at a time), B and C row-major. The R x NV accumulators stay in registers.
template <int R, int NV, bool ACC>
inline void micro(int P, const float* A, long ars, long aps, const float* B, long ldb, float* C, long ldc) {
    vf acc[R][NV];
    for (int r = 0; r < R; ++r)
        for (int j = 0; j < NV; ++j) acc[r][j] = ACC ? load(C + r * ldc + LANES * j) : vf{};
    for (int p = 0; p < P; ++p) {
        vf b[NV];
        for (int j = 0; j < NV; ++j) b[j] = load(B + p * ldb + LANES * j);
        for (int r = 0; r < R; ++r) {
            const float a = A[r * ars + p * aps];
            for (int j = 0; j < NV; ++j) acc[r][j] += a * b[j];
        }
    }
    for (int r = 0; r < R; ++r)
        for (int j = 0; j < NV; ++j) store(C + r * ldc + LANES * j, acc[r][j]);
}

template <int NV, bool ACC>
inline void panel(int M, int P, const float* A, long ars, long aps, const float* B, long ldb, float* C, long ldc) {
    for (int i = 0; i < M; i += ROWS) micro<ROWS, NV, ACC>(P, A + i * ars, ars, aps, B, ldb, C + i * ldc, ldc);
}

// C[M x N] (+)= A[M x P] @ B[P x N]; M a multiple of 8, N of 16 (whole vectors on either instruction set). Panels
// of PANEL vectors' width, each A element broadcast once per PANEL vectors of B.
template <bool ACC>
void gemm(int M, int N, int P, const float* A, long ars, long aps, const float* B, long ldb, float* C, long ldc) {
    constexpr int WIDE = LANES * PANEL;
    int j = 0;
    for (; j + WIDE <= N; j += WIDE) panel<PANEL, ACC>(M, P, A, ars, aps, B + j, ldb, C + j, ldc);
    for (; j < N; j += LANES) panel<1, ACC>(M, P, A, ars, aps, B + j, ldb, C + j, ldc);
}

// out[N] (+)= x[P] @ B[P x N] (B's rows ldb apart), one row by a matrix: blocks of VEC vectors accumulate in
// registers (independent chains, so FMA latency is hidden), then single vectors, then a scalar tail.
template <bool ACC>
inline void vecmat(int P, const float* x, const float* B, long ldb, int N, float* out) {
    constexpr int VEC = LANES == 16 ? 8 : 4;
    int j = 0;
    for (; j + VEC * LANES <= N; j += VEC * LANES) micro<1, VEC, ACC>(P, x, 0, 1, B + j, ldb, out + j, 0);
    for (; j + LANES <= N; j += LANES) micro<1, 1, ACC>(P, x, 0, 1, B + j, ldb, out + j, 0);
    for (; j < N; ++j) {
        float acc = ACC ? out[j] : 0.0f;
        for (int p = 0; p < P; ++p) acc += x[p] * B[p * ldb + j];
        out[j] = acc;
    }
}

inline int round_up(int x, int m) { return (x + m - 1) / m * m; }

// out[r * stride] = x_r . y for the R rows x_r [n] (n apart): whole vectors, y's loads shared by one accumulator per
// row (their chains hide the FMA latency a lone dot product waits on), then a scalar tail (spelled out: GCC
// vectorises the plain loop with gathers).
template <int R>
inline void dots(const float* x, const float* y, int n, float* out, long stride) {
    vf acc[R] = {};
    int i = 0;
    for (; i + LANES <= n; i += LANES) {
        const vf yi = load(y + i);
        for (int r = 0; r < R; ++r) acc[r] += load(x + (long)r * n + i) * yi;
    }
    for (int r = 0; r < R; ++r) {
        float sum = 0.0f;
        for (int l = 0; l < LANES; ++l) sum += acc[r][l];
        for (int e = i; e < n; ++e) sum += x[(long)r * n + e] * y[e];
        out[r * stride] = sum;
    }
}

// sum_i a[i] b[i].
inline float dot(const float* a, const float* b, int n) {
    float sum;
    dots<1>(a, b, n, &sum, 0);
    return sum;
}

// expf of an argument that may lie far below zero, in the vectorised exponential's fast range: below -80 (e^-80 =
// 2e-35, nothing next to a softmax row's maximum or a 1e-6 floor) glibc's vector expf takes a scalar path per lane.
inline float exp_floor(float x) { return expf(x < -80.0f ? -80.0f : x); }

// Within a kernel's parallel region, on each thread: denormal inputs and results as zero (FTZ and DAZ), the
// thread's own mode restored after. Real activations make them: softmax weights and Hedgehog features far below
// their row's maximum (e^-90 and less), whose every product then takes a microcode assist (five times slower
// windows on SmolLM2's keys). Values below 1.2e-38 next to a row that sums to 1 change no fp32 result that matters.
struct FlushDenormals {
#if defined(__SSE__)
    unsigned saved = _mm_getcsr();
    FlushDenormals() { _mm_setcsr(saved | 0x8040); }  // FTZ (bit 15) and DAZ (bit 6)
    ~FlushDenormals() { _mm_setcsr(saved); }
#endif
};

}  // namespace dsla
