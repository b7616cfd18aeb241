// The softmax window of a DSLA layer for CPUs (inference prefill): each query attends, with RoPE, to the W newest
// pending tokens up to itself (packed sequences: none before its document's first token), under one normaliser with
// the states' output (the math: window.py's docstring).
//
// One work item per (sequence, KV head, block of QB queries): the block's keys are rotated once into a transposed
// scratch, the scores of its G x QB query rows against the QB + W - 1 keys they can see are one register-blocked
// product, the band is exponentiated in place (vectorised; everything outside it weighs 0), and the weighted values
// are a second product. The whole band of a block is computed, a third more than the W keys a query needs, so
// both products run at the micro-kernel's speed. Plain C ABI; built with the other CPU kernels by cpp_chunk.py.

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "cpu_gemm.h"

namespace {

using dsla::gemm;
using dsla::round_up;

constexpr int QB = 32;  // queries per block

struct View {  // a [batch, token, head, feature] tensor with unit feature stride
    const float* data;
    long sb, st, sh;
    const float* at(long b, long t, long h) const { return data + b * sb + t * st + h * sh; }
};

// x rotated by RoPE (rotate-half convention) with cos and sin [D], times `scale`, into out.
inline void rotate(const float* x, const float* cos, const float* sin, int D, float scale, float* out) {
    const int h = D / 2;
#pragma omp simd
    for (int i = 0; i < h; ++i) {
        out[i] = (x[i] * cos[i] - x[i + h] * sin[i]) * scale;
        out[i + h] = (x[i + h] * cos[i + h] + x[i] * sin[i + h]) * scale;
    }
}

// q [B, T, H, D] raw queries; keys, values [B, P, HK, D] raw pending tokens (P = W + T: the window's, then the new
// ones), valid [B, P]; cos, sin [B, P, D] RoPE tables of the pending positions; lin [B, T, H, D + 1] the states'
// output (numerator, then denominator); log_scale [H]; out [B, T, H, D]. Strides of dims 0..2 given per tensor
// (unit stride in the last); valid_sb, rope_sb / rope_st for the 2-D / 3-D tables. doc_start [B, T] (row stride
// doc_sb) or null: packed sequences, the pending index of the first token of each query's document; the query skips
// the pending tokens before it.
void window_attention(const float* q, const long* qs, const float* keys, const long* ks, const float* values,
                      const long* vs, const float* valid, long valid_sb, const float* cos, const float* sin,
                      long rope_sb, long rope_st, const float* lin, const long* ls, const float* log_scale,
                      const long* doc_start, long doc_sb, float* out, const long* os, int B, int T, int W, int HK,
                      int G, int D, int threads) {
    const View Q{q, qs[0], qs[1], qs[2]}, K{keys, ks[0], ks[1], ks[2]}, Vv{values, vs[0], vs[1], vs[2]};
    const View L{lin, ls[0], ls[1], ls[2]};
    const int blocks = (T + QB - 1) / QB, R = round_up(G * QB, 8), NP = round_up(QB + W - 1, 16);
    const int Dv = round_up(D, 16);
    const float scale = 1.0f / std::sqrt((float)D);
    const long items = (long)B * HK * blocks;
#pragma omp parallel num_threads(threads)
    {
        const dsla::FlushDenormals flush;
        // kT [D, NP]: rotated keys, column c the pending token t0 + 1 + c; qr [R, D]; S [R, NP]; vb [NP, Dv];
        // O [R, Dv]. Padding stays zero: rows and columns past the block are never written with other values.
        std::vector<float> kT((size_t)D * NP), qr((size_t)R * D), S((size_t)R * NP), vb((size_t)NP * Dv),
            O((size_t)R * Dv), rot(D), top(R), den(R), live(NP);
#pragma omp for schedule(static)
        for (long item = 0; item < items; ++item) {
            const int b = (int)(item / ((long)HK * blocks)), hk = (int)(item / blocks % HK);
            const int t0 = (int)(item % blocks) * QB, nq = std::min(QB, T - t0);
            const int nk = std::min(nq + W - 1, T + W - 1 - t0);  // pending tokens t0 + 1 .. t0 + nk
            for (int c = 0; c < NP; ++c) {
                const bool live = c < nk;
                const long i = t0 + 1 + c;
                if (live) rotate(K.at(b, i, hk), cos + b * rope_sb + i * rope_st, sin + b * rope_sb + i * rope_st, D,
                                 1.0f, rot.data());
                for (int d = 0; d < D; ++d) kT[(long)d * NP + c] = live ? rot[d] : 0.0f;
                float* vrow = &vb[(long)c * Dv];
                if (live)
                    std::memcpy(vrow, Vv.at(b, i, hk), D * 4);
                else
                    std::fill(vrow, vrow + D, 0.0f);
            }
            for (int r = 0; r < R; ++r) {  // row r: query t0 + r / G, head hk * G + r % G
                float* row = &qr[(long)r * D];
                const int t = r / G;
                if (t < nq) {
                    const long i = W + t0 + t;  // its pending index
                    rotate(Q.at(b, t0 + t, hk * G + r % G), cos + b * rope_sb + i * rope_st,
                           sin + b * rope_sb + i * rope_st, D, scale, row);
                } else {
                    std::fill(row, row + D, 0.0f);
                }
            }
            gemm<false>(R, NP, D, qr.data(), D, 1, kT.data(), NP, S.data(), NP);
            const float* ok = valid + b * valid_sb + t0 + 1;
            for (int c = 0; c < NP; ++c) live[c] = c < nk && ok[c] > 0.0f ? 1.0f : 0.0f;
            for (int r = 0; r < R; ++r) {
                // Query t sees pending tokens t0 + t + 1 .. t0 + t + W: columns t .. t + W - 1 (and, packed, none
                // before its document's first token: column c is pending index t0 + 1 + c).
                float* s = &S[(long)r * NP];
                const int t = r / G, hi = std::min(t + W, nk);
                if (t >= nq) {
                    std::fill(s, s + NP, 0.0f);
                    continue;
                }
                const int lo = doc_start ? std::max(t, (int)(doc_start[b * doc_sb + t0 + t] - t0 - 1)) : t;
                float m = 0.0f;
                for (int c = lo; c < hi; ++c)
                    if (live[c] > 0.0f) m = std::max(m, s[c]);
                float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
                for (int c = 0; c < NP; ++c) {  // every column exponentiated (vectorised), then the band kept
                    const float e = dsla::exp_floor(std::min(s[c] - m, 0.0f));  // <= 0 in the band; none outside
                    s[c] = e * (c >= lo && c < hi ? live[c] : 0.0f);
                    sum += s[c];
                }
                top[r] = m, den[r] = sum;
            }
            gemm<false>(R, Dv, NP, S.data(), NP, 1, vb.data(), Dv, O.data(), Dv);
            for (int r = 0; r < G * nq; ++r) {
                const int t = r / G, h = hk * G + r % G;
                const float* l = L.at(b, t0 + t, h);
                const float c = expf(log_scale[h] - top[r]);
                const float inv = 1.0f / (den[r] + c * l[D] + 1e-6f);
                float* dst = out + b * os[0] + (t0 + t) * os[1] + h * os[2];
                const float* o = &O[(long)r * Dv];
#pragma omp simd
                for (int d = 0; d < D; ++d) dst[d] = (o[d] + c * l[d]) * inv;
            }
        }
    }
}

}  // namespace

extern "C" {

// The window without packing (the arguments of window_attention, no doc_start).
void dsla_window_attention(const float* q, const long* qs, const float* keys, const long* ks, const float* values,
                           const long* vs, const float* valid, long valid_sb, const float* cos, const float* sin,
                           long rope_sb, long rope_st, const float* lin, const long* ls, const float* log_scale,
                           float* out, const long* os, int B, int T, int W, int HK, int G, int D, int threads) {
    window_attention(q, qs, keys, ks, values, vs, valid, valid_sb, cos, sin, rope_sb, rope_st, lin, ls, log_scale,
                     nullptr, 0, out, os, B, T, W, HK, G, D, threads);
}

// Packed sequences: window_attention with a doc_start table.
void dsla_window_attention_packed(const float* q, const long* qs, const float* keys, const long* ks,
                                  const float* values, const long* vs, const float* valid, long valid_sb,
                                  const float* cos, const float* sin, long rope_sb, long rope_st, const float* lin,
                                  const long* ls, const float* log_scale, const long* doc_start, long doc_sb,
                                  float* out, const long* os, int B, int T, int W, int HK, int G, int D,
                                  int threads) {
    window_attention(q, qs, keys, ks, values, vs, valid, valid_sb, cos, sin, rope_sb, rope_st, lin, ls, log_scale,
                     doc_start, doc_sb, out, os, B, T, W, HK, G, D, threads);
}

}  // extern "C"
