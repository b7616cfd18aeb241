// One decoding step of a default-preset DSLA layer for CPUs, fused (the math: decode.py's docstring).
//
// One work item per (sequence, KV head) does all of its group's work while the states' rows pass through cache
// once: the entering token's features and gates, then, row by row of both states, the update
// S = e^g S + phi^T [v, 1] and the G query heads' read of the new rows; then the window's move by one token and the
// softmax over it. RoPE tables of the window's positions are made once per sequence, and reused by the next call
// when its positions are the same (every DSLA layer of a step has the same ones). Plain C ABI; built with
// cpp_chunk.cpp into one library by cpp_chunk.py.

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstring>
#include <vector>

#include "cpu_gemm.h"

namespace {

// [softmax(z), softmax(-z)] of z = x M (x [D], M [D, F] row-major) into out [2F].
void hedgehog(const float* x, const float* M, int D, int F, float* z, float* out) {
    dsla::vecmat<false>(D, x, M, F, F, z);
    float hi = -FLT_MAX, lo = FLT_MAX;  // finite: built with -ffast-math
    for (int f = 0; f < F; ++f) hi = std::max(hi, z[f]), lo = std::min(lo, z[f]);
    float sp = 0.0f, sn = 0.0f;
#pragma omp simd reduction(+ : sp, sn)
    for (int f = 0; f < F; ++f) {
        out[f] = dsla::exp_floor(z[f] - hi);
        out[F + f] = dsla::exp_floor(lo - z[f]);
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

using dsla::LANES;
using dsla::load;
using dsla::store;
using dsla::vf;
constexpr int BLOCK = LANES == 16 ? 4 : 2;  // column vectors by up to 4 heads: half the registers accumulate

// The G heads' scores against one key, heads in blocks of up to 4: out[g * stride] = q_g . k.
void head_dots(const float* q, int G, const float* k, int D, float* out, long stride) {
    for (int g0 = 0; g0 < G; g0 += 4) {
        const float* x = q + (long)g0 * D;
        float* o = out + g0 * stride;
        switch (std::min(4, G - g0)) {
            case 1: dsla::dots<1>(x, k, D, o, stride); break;
            case 2: dsla::dots<2>(x, k, D, o, stride); break;
            case 3: dsla::dots<3>(x, k, D, o, stride); break;
            default: dsla::dots<4>(x, k, D, o, stride); break;
        }
    }
}

// Columns [c0, c0 + NV * LANES) of one state (rows [F2, V1]), for GB query heads: unless `read_only`, each row is
// updated, row = a_j row + phi_j v, then lin[g] (+)= coef[j][g] row. Rows pass through registers once, and the
// GB x NV accumulators stay in registers: each state element is loaded once, stored once and used GB + 1 times.
template <int GB, int NV>
void state_columns(float* st, int F2, int V1, int G, int c0, const float* a, const float* phi, const float* v,
                   const float* coef, float* lin, bool read_only, bool accumulate) {
    vf acc[GB][NV], val[NV];
    for (int n = 0; n < NV; ++n) val[n] = load(v + c0 + n * LANES);
    for (int g = 0; g < GB; ++g)
        for (int n = 0; n < NV; ++n) acc[g][n] = accumulate ? load(lin + (long)g * V1 + c0 + n * LANES) : vf{};
    for (int j = 0; j < F2; ++j) {
        float* row = st + (long)j * V1 + c0;
        vf r[NV];
        for (int n = 0; n < NV; ++n) r[n] = load(row + n * LANES);
        if (!read_only) {
            for (int n = 0; n < NV; ++n) r[n] = a[j] * r[n] + phi[j] * val[n];
            for (int n = 0; n < NV; ++n) store(row + n * LANES, r[n]);
        }
        for (int g = 0; g < GB; ++g)
            for (int n = 0; n < NV; ++n) acc[g][n] += coef[(long)j * G + g] * r[n];
    }
    for (int g = 0; g < GB; ++g)
        for (int n = 0; n < NV; ++n) store(lin + (long)g * V1 + c0 + n * LANES, acc[g][n]);
}

template <int GB>
void state_heads(float* st, int F2, int V1, int G, const float* a, const float* phi, const float* v,
                 const float* coef, float* lin, bool read_only, bool accumulate) {
    int c = 0;
    for (; c + BLOCK * LANES <= V1; c += BLOCK * LANES)
        state_columns<GB, BLOCK>(st, F2, V1, G, c, a, phi, v, coef, lin, read_only, accumulate);
    for (; c + LANES <= V1; c += LANES)
        state_columns<GB, 1>(st, F2, V1, G, c, a, phi, v, coef, lin, read_only, accumulate);
    for (; c < V1; ++c)  // the last columns (the normaliser's) one by one
        for (int j = 0; j < F2; ++j) {
            float* x = st + (long)j * V1 + c;
            if (!read_only) *x = a[j] * *x + phi[j] * v[c];
            for (int g = 0; g < GB; ++g) {
                float& out = lin[(long)g * V1 + c];
                out = (accumulate || j ? out : 0.0f) + coef[(long)j * G + g] * *x;
            }
        }
}

// One state [F2, V1]: updated in place, and read by the G query heads, lin[g] (+)= sum_j coef[j][g] row_j (coef
// [F2, G]); `accumulate`: add to lin (the second state) rather than overwrite it. Heads in blocks of up to 4.
void state_read(float* st, int F2, int V1, int G, const float* a, const float* phi, const float* v,
                const float* coef, float* lin, bool accumulate) {
    for (int g0 = 0; g0 < G; g0 += 4) {
        const int gb = std::min(4, G - g0);
        float* out = lin + (long)g0 * V1;
        const float* cf = coef + g0;
        const bool read_only = g0 > 0;  // the first block updated the state
        switch (gb) {
            case 1: state_heads<1>(st, F2, V1, G, a, phi, v, cf, out, read_only, accumulate); break;
            case 2: state_heads<2>(st, F2, V1, G, a, phi, v, cf, out, read_only, accumulate); break;
            case 3: state_heads<3>(st, F2, V1, G, a, phi, v, cf, out, read_only, accumulate); break;
            default: state_heads<4>(st, F2, V1, G, a, phi, v, cf, out, read_only, accumulate); break;
        }
    }
}

// The RoPE tables of the last call's window positions, per calling thread: cos [D / 2] and sin [D / 2] for each of
// B * (W + 1) positions, and what they were made from.
struct RopeTables {
    std::vector<long> pos;
    std::vector<float> inv_freq;
    float scale = 0.0f;
    std::vector<float> table;

    // Whether the tables are those of these inputs; if not, they are resized and keyed for them (to be filled).
    bool holds(const long* p, long n, const float* f, int half, float s) {
        const bool same = scale == s && (long)pos.size() == n && (int)inv_freq.size() == half &&
                          std::equal(p, p + n, pos.begin()) && std::equal(f, f + half, inv_freq.begin());
        if (!same) pos.assign(p, p + n), inv_freq.assign(f, f + half), scale = s, table.resize((size_t)n * half * 2);
        return same;
    }
};
thread_local RopeTables rope_memo;

}  // namespace

extern "C" {

// What every step of one layer reads: its weights (fp32, contiguous) and sizes, made once per weights (cpp_decode.py).
// Maps qm [H, D, F] and km [HK, D, F] (F2 = 2F); gates gw [HK, D, S F2] (per KV head, both states' weights as one
// matrix the key multiplies) and gb [S, HK, F2]; mix [H, S] (mix_heads) or [S] mixing weights, or null (ones), times
// scale; with a window, RoPE's inv_freq [D / 2] and rope_scale, and log_scale [H].
struct DecodeLayer {
    const float *qm, *km, *gw, *gb, *mix, *inv_freq, *log_scale;
    float inv_tau, clamp, scale, rope_scale;
    int mix_heads, S, HK, G, D, F;
};

// q [B, H, D], k and v [B, HK, D] (rows contiguous, strides per sequence q_sb, k_sb, v_sb); mask [B] or null;
// state [B, S, HK, F2, D + 1] updated in place; window (W > 0): wk, wv [B, W, HK, D] and valid [B, W], moved in
// place, and pos [B, W + 1]; o [B, H, D].
void dsla_decode_step(const DecodeLayer* layer, const float* q, long q_sb, const float* k, long k_sb, const float* v,
                      long v_sb, const float* mask, float* state, int B, int W, float* wk, float* wv, float* valid,
                      const long* pos, float* o, int threads) {
    const DecodeLayer& L = *layer;
    const int S = L.S, HK = L.HK, G = L.G, D = L.D, F = L.F, H = HK * G, F2 = 2 * F, V1 = D + 1, half = D / 2;
    const bool fresh = W && !rope_memo.holds(pos, (long)B * (W + 1), L.inv_freq, half, L.rope_scale);
    float* const tables = rope_memo.table.data();  // the calling thread's (the team's threads have their own memo)
    // A second thread pays only from two work items each: with one sequence of 3 KV heads (SmolLM2) it saved nothing
    // (41-45 us per call with one thread, 41-54 with two), and it keeps the other core busy.
    const int team = std::max(1, std::min(threads, B * HK / 2));
#pragma omp parallel num_threads(team)
    {
        const dsla::FlushDenormals flush;
        std::vector<float> z(F), phi(F2), decay((size_t)S * F2), psi((size_t)G * F2), lin((size_t)G * V1),
            vext(V1), qrot((size_t)G * D), krow(D), scores((size_t)G * W), top(G), coef((size_t)F2 * G);
        std::vector<char> live(W);
        if (fresh) {
#pragma omp for schedule(static)
            for (long r = 0; r < (long)B * (W + 1); ++r) {
                float* t = tables + r * D;
                const float p = (float)pos[r];
                // Two loops: GCC would fuse one loop's cosf and sinf into scalar sincosf calls (ten times slower).
#pragma omp simd
                for (int i = 0; i < half; ++i) t[i] = cosf(p * L.inv_freq[i]) * L.rope_scale;
#pragma omp simd
                for (int i = 0; i < half; ++i) t[half + i] = sinf(p * L.inv_freq[i]) * L.rope_scale;
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
            hedgehog(ke, L.km + (long)hk * D * F, D, F, z.data(), phi.data());
            for (int j = 0; j < F2; ++j) phi[j] *= me;
            // Both states' gates in one product, ke [D] @ gw[hk] [D, S F2], then the decays e^g.
            dsla::vecmat<false>(D, ke, L.gw + (long)hk * D * S * F2, S * F2, S * F2, decay.data());
            for (int s = 0; s < S; ++s) {
                float* u = &decay[(long)s * F2];
                const float* bias = L.gb + ((long)s * HK + hk) * F2;
#pragma omp simd
                for (int j = 0; j < F2; ++j) {  // a loop of its own, so that the exponentials are vectorised
                    const float x = u[j] + bias[j];
                    const float g = (std::fmin(x, 0.0f) - log1pf(dsla::exp_floor(-std::fabs(x)))) * L.inv_tau;
                    u[j] = expf(std::fmax(g, L.clamp) * me);
                }
            }
            std::memcpy(vext.data(), ve, D * 4);
            vext[D] = 1.0f;
            for (int g = 0; g < G; ++g)
                hedgehog(q + b * q_sb + (long)(hk * G + g) * D, L.qm + (long)(hk * G + g) * D * F, D, F, z.data(),
                         &psi[(long)g * F2]);
            // Both states: the update and the group's read, column block by column block (see state_pass).
            for (int s = 0; s < S; ++s) {
                float* st = state + (((long)b * S + s) * HK + hk) * F2 * V1;
                for (int g = 0; g < G; ++g) {
                    const int h = hk * G + g;
                    const float wg = L.scale * (L.mix ? L.mix[L.mix_heads ? h * S + s : s] : 1.0f);
                    for (int j = 0; j < F2; ++j) coef[(long)j * G + g] = wg * psi[(long)g * F2 + j];
                }
                state_read(st, F2, V1, G, &decay[(long)s * F2], phi.data(), vext.data(), coef.data(), lin.data(), s > 0);
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
                head_dots(qrot.data(), G, krow.data(), D, &scores[j], W);
                for (int g = 0; g < G; ++g) top[g] = std::max(top[g], scores[(long)g * W + j]);
            }
            for (int g = 0; g < G; ++g) {
                float den = 0.0f, *p = &scores[(long)g * W];
                const float m = top[g];
#pragma omp simd reduction(+ : den)
                for (int j = 0; j < W; ++j) {  // vectorised exponentials; dead entries weigh 0
                    p[j] = live[j] ? dsla::exp_floor(p[j] - m) : 0.0f;
                    den += p[j];
                }
                float* out = dst + (long)g * D;
                dsla::vecmat<false>(W, p, vals, row_stride, D, out);  // sum_j p_j v_j
                const float c = expf(L.log_scale[hk * G + g] - top[g]);
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
