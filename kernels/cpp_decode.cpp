// One decoding step of a default-preset DSLA layer for CPUs, fused (the math: decode.py's docstring).
//
// One work item per (sequence, KV head) does all of its group's work while the states' rows pass through cache
// once: the entering token's features and gates, then, row by row of both states, the update
// S = e^g S + phi^T [v, 1] and the G query heads' read of the new rows; then the window's move by one token and the
// softmax over it. RoPE tables of the window's positions are made once per sequence. Plain C ABI; built with
// cpp_chunk.cpp into one library by cpp_chunk.py.

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstring>
#include <vector>

namespace {

// [softmax(z), softmax(-z)] of z = x M (x [D], M [D, F] row-major) into out [2F].
void hedgehog(const float* x, const float* M, int D, int F, float* z, float* out) {
    std::fill(z, z + F, 0.0f);
    for (int d = 0; d < D; ++d) {
        const float xd = x[d];
        const float* row = M + (long)d * F;
#pragma omp simd
        for (int f = 0; f < F; ++f) z[f] += xd * row[f];
    }
    float hi = -FLT_MAX, lo = FLT_MAX;  // finite: built with -ffast-math
    for (int f = 0; f < F; ++f) hi = std::max(hi, z[f]), lo = std::min(lo, z[f]);
    float sp = 0.0f, sn = 0.0f;
#pragma omp simd reduction(+ : sp, sn)
    for (int f = 0; f < F; ++f) {
        out[f] = expf(z[f] - hi);
        out[F + f] = expf(lo - z[f]);
        sp += out[f];
        sn += out[F + f];
    }
    const float ip = 1.0f / sp, in = 1.0f / sn;
#pragma omp simd
    for (int f = 0; f < F; ++f) out[f] *= ip, out[F + f] *= in;
}

// x rotated by RoPE with the tables cos, sin [D / 2] (rotate-half convention), into out [D].
inline void rotate(const float* x, const float* cos, const float* sin, int D, float* out) {
    const int h = D / 2;
#pragma omp simd
    for (int i = 0; i < h; ++i) {
        out[i] = x[i] * cos[i] - x[i + h] * sin[i];
        out[i + h] = x[i + h] * cos[i] + x[i] * sin[i];
    }
}

}  // namespace

extern "C" {

// q [B, H, D], k and v [B, HK, D] (rows contiguous, strides per sequence q_sb, k_sb, v_sb); mask [B] or null;
// state [B, S, HK, F2, D + 1] updated in place; maps qm [H, D, F] and km [HK, D, F] (F2 = 2F); gates gw
// [S, HK, F2, D], gb [S, HK, F2]; w [H, S] mixing weights with the scale; window (W > 0): wk, wv [B, W, HK, D] and
// valid [B, W], moved in place, pos [B, W + 1], inv_freq [D / 2], rope_scale, log_scale [H]; o [B, H, D].
void dsla_decode_step(const float* q, long q_sb, const float* k, long k_sb, const float* v, long v_sb,
                      const float* mask, float* state, const float* qm, const float* km, const float* gw,
                      const float* gb, float inv_tau, float clamp, const float* w, int B, int S, int HK, int G,
                      int D, int F, int W, float* wk, float* wv, float* valid, const long* pos,
                      const float* inv_freq, float rope_scale, const float* log_scale, float* o, int threads) {
    const int H = HK * G, F2 = 2 * F, V1 = D + 1, half = D / 2;
    std::vector<float> tables(W ? (size_t)B * (W + 1) * D : 0);  // per sequence and position: cos [D/2], sin [D/2]
#pragma omp parallel num_threads(threads)
    {
        std::vector<float> z(F), phi(F2), decay((size_t)S * F2), psi((size_t)G * F2), lin((size_t)G * V1),
            vext(V1), qrot((size_t)G * D), krow(D), scores((size_t)G * W), top(G);
        std::vector<char> live(W);
        if (W) {
#pragma omp for schedule(static)
            for (long r = 0; r < (long)B * (W + 1); ++r) {
                float* t = &tables[r * D];
                const float p = (float)pos[r];
#pragma omp simd
                for (int i = 0; i < half; ++i) {
                    const float a = p * inv_freq[i];
                    t[i] = cosf(a) * rope_scale;
                    t[half + i] = sinf(a) * rope_scale;
                }
            }
        }
#pragma omp for schedule(static)
        for (long item = 0; item < (long)B * HK; ++item) {
            const int b = (int)(item / HK), hk = (int)(item % HK);
            const float new_valid = mask ? mask[b] : 1.0f;
            // The entering token: the window's oldest, or the new one.
            const float* ke = W ? wk + ((long)b * W * HK + hk) * D : k + b * k_sb + (long)hk * D;
            const float* ve = W ? wv + ((long)b * W * HK + hk) * D : v + b * v_sb + (long)hk * D;
            const float me = W ? valid[(long)b * W] : new_valid;
            hedgehog(ke, km + (long)hk * D * F, D, F, z.data(), phi.data());
            for (int j = 0; j < F2; ++j) phi[j] *= me;
            for (int s = 0; s < S; ++s)
                for (int j = 0; j < F2; ++j) {
                    const float* row = gw + (((long)s * HK + hk) * F2 + j) * D;
                    float u = gb[((long)s * HK + hk) * F2 + j];
#pragma omp simd reduction(+ : u)
                    for (int d = 0; d < D; ++d) u += row[d] * ke[d];
                    const float g = (std::fmin(u, 0.0f) - log1pf(expf(-std::fabs(u)))) * inv_tau;
                    decay[(long)s * F2 + j] = expf(std::fmax(g, clamp) * me);
                }
            std::memcpy(vext.data(), ve, D * 4);
            vext[D] = 1.0f;
            for (int g = 0; g < G; ++g)
                hedgehog(q + b * q_sb + (long)(hk * G + g) * D, qm + (long)(hk * G + g) * D * F, D, F, z.data(),
                         &psi[(long)g * F2]);
            std::fill(lin.begin(), lin.end(), 0.0f);
            // Both states, row by row: update, then the group's read of the new row.
            for (int s = 0; s < S; ++s) {
                float* st = state + (((long)b * S + s) * HK + hk) * F2 * V1;
                for (int j = 0; j < F2; ++j) {
                    float* row = st + (long)j * V1;
                    const float a = decay[(long)s * F2 + j], f = phi[j];
#pragma omp simd
                    for (int c = 0; c < V1; ++c) row[c] = a * row[c] + f * vext[c];
                    for (int g = 0; g < G; ++g) {
                        const float coef = w[(long)(hk * G + g) * S + s] * psi[(long)g * F2 + j];
                        float* out = &lin[(long)g * V1];
#pragma omp simd
                        for (int c = 0; c < V1; ++c) out[c] += coef * row[c];
                    }
                }
            }
            float* dst = o + ((long)b * H + hk * G) * D;
            if (!W) {
                for (int g = 0; g < G; ++g) {
                    const float inv = 1.0f / (lin[(long)g * V1 + D] + 1e-6f);
                    for (int d = 0; d < D; ++d) dst[(long)g * D + d] = lin[(long)g * V1 + d] * inv;
                }
                continue;
            }
            // The window moves by one token (this head's columns), then the softmax over its W entries.
            const long row_stride = (long)HK * D;
            float* keys = wk + ((long)b * W * HK + hk) * D;
            float* vals = wv + ((long)b * W * HK + hk) * D;
            for (int j = 0; j + 1 < W; ++j) {
                std::memcpy(keys + j * row_stride, keys + (j + 1) * row_stride, D * 4);
                std::memcpy(vals + j * row_stride, vals + (j + 1) * row_stride, D * 4);
            }
            std::memcpy(keys + (W - 1) * row_stride, k + b * k_sb + (long)hk * D, D * 4);
            std::memcpy(vals + (W - 1) * row_stride, v + b * v_sb + (long)hk * D, D * 4);
            const float* tab = &tables[(long)b * (W + 1) * D];
            const float qscale = 1.0f / std::sqrt((float)D);
            for (int g = 0; g < G; ++g) {
                rotate(q + b * q_sb + (long)(hk * G + g) * D, tab + (long)W * D, tab + (long)W * D + half, D,
                       &qrot[(long)g * D]);
                for (int d = 0; d < D; ++d) qrot[(long)g * D + d] *= qscale;
            }
            // Scores of the G heads over the W entries (entry j at position pos[b][j + 1], valid as the old
            // validity row's entry j + 1, or the new token's), each key rotated once; then a softmax per head.
            std::fill(top.begin(), top.end(), 0.0f);
            for (int j = 0; j < W; ++j) {
                live[j] = (j + 1 < W ? valid[(long)b * W + j + 1] : new_valid) > 0.0f;
                if (!live[j]) continue;
                const float* t = tab + (long)(j + 1) * D;
                rotate(keys + j * row_stride, t, t + half, D, krow.data());
                for (int g = 0; g < G; ++g) {
                    const float* qg = &qrot[(long)g * D];
                    float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
                    for (int d = 0; d < D; ++d) dot += qg[d] * krow[d];
                    scores[(long)g * W + j] = dot;
                    top[g] = std::max(top[g], dot);
                }
            }
            for (int g = 0; g < G; ++g) {
                float den = 0.0f;
                float* out = dst + (long)g * D;
                std::fill(out, out + D, 0.0f);
                for (int j = 0; j < W; ++j) {
                    if (!live[j]) continue;
                    const float p = expf(scores[(long)g * W + j] - top[g]);
                    den += p;
                    const float* val = vals + j * row_stride;
#pragma omp simd
                    for (int d = 0; d < D; ++d) out[d] += p * val[d];
                }
                const float c = expf(log_scale[hk * G + g] - top[g]);
                const float* l = &lin[(long)g * V1];
                const float inv = 1.0f / (den + c * l[D] + 1e-6f);
                for (int d = 0; d < D; ++d) out[d] = (out[d] + c * l[d]) * inv;
            }
        }
        // The validity rows move once per sequence, after every head has read them.
        if (W) {
#pragma omp for schedule(static)
            for (long b = 0; b < B; ++b) {
                float* ok = valid + b * W;
                std::memmove(ok, ok + 1, (W - 1) * 4);
                ok[W - 1] = mask ? mask[b] : 1.0f;
            }
        }
    }
}

}  // extern "C"
