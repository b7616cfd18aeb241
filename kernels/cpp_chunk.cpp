// Chunked dual-state linear attention, inference forward, for CPUs: one fused pass per chunk.
//
// The PyTorch path spends as much time in elementwise passes over memory (cumsum, exp, gated products, masks,
// layout changes) as in its matmuls. Here each (sequence, KV head, chunk) item does all of its work in a few
// kilobytes of per-thread scratch, and the products run in a register-blocked micro-kernel. The math is that of
// chunk.py (see its docstring): per state s, with b the cumulative log decay from the chunk start,
//
//     o_t   = sum_s w_s [ q_t e^{b_t} S_s + sum_{i<=t} (q_t e^{b_t} . k_i e^{-b_i}) v_i ]
//     S_out = e^{b_C} S + sum_i (k_i e^{b_C - b_i})^T v_i
//
// in three phases per round of up to `block` chunks of every sequence: chunk-local states (parallel), the scan
// over chunks (sequential per row), outputs (parallel). A state whose chunk exponents exceed SAFE_EXPONENT is not
// factored: its intra-chunk term is summed pairwise with exponents <= 0, as chunk.py's "exact" mode does.
//
// The per-token log decays are read from gate tensors, or computed per chunk from the gates' inputs as
// max(logsigmoid(x W^T + c) / tau, clamp) (gates.py), which saves writing them to memory and reading them back.
//
// Internal layouts pad the key width to a multiple of 8 and value and chunk widths to multiples of 16 with zeros,
// so every product is made of whole 16-float vectors. The sum normaliser's column of ones (`ones`: values given
// without it, outputs and states with it) is summed apart: a 65th value column would pad the products to 80.
// Built and loaded by cpp_chunk.py; plain C ABI, no Python.

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "cpu_gemm.h"

namespace {

using dsla::gemm;
using dsla::round_up;

constexpr float SAFE_EXPONENT = 60.0f;

struct Tensor3 {  // a [batch, token, head, feature] tensor with unit feature stride
    const float* data;
    long sb, st, sh;
    const float* at(long b, long t, long h) const { return data + b * sb + t * st + h * sh; }
};

struct LinearGates {  // log decays from the gate inputs x [B, T, HK or broadcast, D]; null gw: gate tensors
    Tensor3 x;
    const float* gw;  // [HK, D, SKz]: W^T, column s * Kp + f for state s and feature f, zero padded
    const float* gc;  // [HK, SKz]: the biases in the same columns
    const float* mask;  // [B, T] (strides mask_sb, mask_st) or null: 0 at padded tokens, which do not decay
    long mask_sb, mask_st;
    float inv_tau, clamp;  // clamp: the lower bound of a log decay (-FLT_MAX for none)
    int D, SKz;
};

struct FeatureMaps {  // Hedgehog maps: q and k above are raw [.., Dx] and the features are computed per chunk
    const float* qm;  // [H, Dx, F] or null: q and k are features already
    const float* km;  // [HK, Dx, F]
    const float* mask;  // [B, T] (strides of the gates' mask) or null: key features are 0 at padded tokens
    int Dx, F;  // raw width, features per sign (K = 2F)
};

struct Problem {
    Tensor3 q, k, v, g[2];
    LinearGates lg;
    FeatureMaps fm;
    const float* w;  // [HK, G, S], scale folded in
    int S, HK, G, K, V, C;  // V: value columns read from v
    bool ones;  // an implicit last value column of ones: outputs and states have V + 1 columns
    int Kp, Vp, Cp, Mp, SK;
    float* o;  // [B, T, H, V], unit stride over V
    long o_sb, o_st, o_sh;
};

struct Item {  // one chunk of one sequence and KV head
    int seq, b, hk;
    long t0;  // first token of the chunk
    int len;  // tokens in the chunk (<= C)
};

// What phase 1 leaves for phase 3 of one item, in the round's workspace.
struct Shared {
    float* U;      // [SK, Vp]: the chunk's own state contribution, then (after the scan) the state before it
    float* U1;     // [SK]: the same for the column of ones (p.ones)
    float* decay;  // [SK]: e^{b_C}
    float* eb;     // [S, C, Kp]: e^{b}
    float* kT;     // [SK, Cp]: k e^{-b} of the factored states, transposed (zero for the others)
    bool safe[2];  // whether each state factors in this chunk
};

struct Scratch {  // per thread
    std::vector<float> b, kf, kd, vloc, qe, A, O, O1, ones, x, z, kfeat, qfeat, raw, zf;
    explicit Scratch(const Problem& p)
        : b(p.S * p.C * p.Kp), kf(p.C * p.SK), kd(p.C * p.SK), vloc(p.Cp * p.Vp), qe(p.Mp * p.SK), A(p.Mp * p.Cp),
          O(p.Mp * p.Vp), O1(p.Mp), ones(p.Cp, 1.0f), x(p.lg.gw ? round_up(p.C, 8) * p.lg.D : 0),
          z(p.lg.gw ? round_up(p.C, 8) * p.lg.SKz : 0),
          kfeat(p.fm.qm ? p.C * p.Kp : 0), qfeat(p.fm.qm ? p.G * p.C * p.Kp : 0),
          raw(p.fm.qm ? round_up(p.C, 8) * p.fm.Dx : 0), zf(p.fm.qm ? round_up(p.C, 8) * p.fm.F : 0) {}
};

// Hedgehog features of the chunk's rows of x (head `head` of a [B, T, heads, Dx] tensor) by the map M [Dx, F]:
// out[t] = [softmax(x_t M), softmax(-x_t M)] (times the mask when given), rows Kp apart.
void hedgehog_rows(const Problem& p, const Item& it, const Tensor3& x, int head, const float* M, const float* mask,
                   Scratch& s, float* out) {
    const int Dx = p.fm.Dx, F = p.fm.F, rows = round_up(it.len, 8);
    const float* src = x.at(it.b, it.t0, head);
    long rs = x.st;
    if (rows != it.len) {  // a short last chunk: rows past its end come from scratch (finite, never read back)
        for (int t = 0; t < it.len; ++t) std::memcpy(&s.raw[t * Dx], src + t * rs, Dx * 4);
        src = s.raw.data(), rs = Dx;
    }
    gemm<false>(rows, F, Dx, src, rs, 1, M, F, s.zf.data(), F);
    for (int t = 0; t < it.len; ++t) {
        const float* z = &s.zf[t * F];
        float hi = -FLT_MAX, lo = FLT_MAX;
        for (int f = 0; f < F; ++f) hi = std::max(hi, z[f]), lo = std::min(lo, z[f]);
        float* row = out + (long)t * p.Kp;
        float sp = 0.0f, sn = 0.0f;
#pragma omp simd reduction(+ : sp, sn)
        for (int f = 0; f < F; ++f) {
            row[f] = dsla::exp_floor(z[f] - hi);
            row[F + f] = dsla::exp_floor(lo - z[f]);
            sp += row[f], sn += row[F + f];
        }
        const float keep = mask ? mask[it.b * p.lg.mask_sb + (it.t0 + t) * p.lg.mask_st] : 1.0f;
        const float ip = keep / sp, in = keep / sn;
#pragma omp simd
        for (int f = 0; f < F; ++f) row[f] *= ip, row[F + f] *= in;
    }
}

// The chunk's key features: rows of p.k, or (feature maps) computed into s.kfeat. Row t at the result + t * stride.
const float* key_features(const Problem& p, const Item& it, Scratch& s, long& stride) {
    if (!p.fm.qm) {
        stride = p.k.st;
        return p.k.at(it.b, it.t0, it.hk);
    }
    hedgehog_rows(p, it, p.k, it.hk, p.fm.km + (long)it.hk * p.fm.Dx * p.fm.F, p.fm.mask, s, s.kfeat.data());
    stride = p.Kp;
    return s.kfeat.data();
}

// The same for the queries of the G heads of the group: head g's row t at the result + g * hstride + t * stride.
const float* query_features(const Problem& p, const Item& it, Scratch& s, long& stride, long& hstride) {
    if (!p.fm.qm) {
        stride = p.q.st, hstride = p.q.sh;
        return p.q.at(it.b, it.t0, it.hk * p.G);
    }
    for (int g = 0; g < p.G; ++g) {
        const int h = it.hk * p.G + g;
        hedgehog_rows(p, it, p.q, h, p.fm.qm + (long)h * p.fm.Dx * p.fm.F, nullptr, s, &s.qfeat[(long)g * p.C * p.Kp]);
    }
    stride = p.Kp, hstride = (long)p.C * p.Kp;
    return s.qfeat.data();
}

// The chunk's log decays from the gate inputs, z[t][s * Kp + f] = max(logsigmoid(x_t . W_sf + c_sf) / tau, clamp).
void linear_gates(const Problem& p, const Item& it, Scratch& s) {
    const LinearGates& lg = p.lg;
    const int rows = round_up(it.len, 8), D = lg.D, SKz = lg.SKz;
    const float* x = lg.x.at(it.b, it.t0, it.hk);
    long xrs = lg.x.st;
    if (rows != it.len) {  // a short last chunk: rows past its end come from scratch (finite, never read back)
        for (int t = 0; t < it.len; ++t) std::memcpy(&s.x[t * D], x + t * xrs, D * 4);
        x = s.x.data(), xrs = D;
    }
    gemm<false>(rows, SKz, D, x, xrs, 1, lg.gw + (long)it.hk * D * SKz, SKz, s.z.data(), SKz);
    const float* bias = lg.gc + (long)it.hk * SKz;
    for (int t = 0; t < it.len; ++t) {
        const float keep = lg.mask ? lg.mask[it.b * lg.mask_sb + (it.t0 + t) * lg.mask_st] : 1.0f;
        float* z = &s.z[t * SKz];
        for (int j = 0; j < SKz; ++j) {  // logsigmoid(u) = min(u, 0) - log1p(e^{-|u|}), stable on both sides
            const float u = z[j] + bias[j];
            const float g = (std::fmin(u, 0.0f) - log1pf(dsla::exp_floor(-std::fabs(u)))) * lg.inv_tau;
            z[j] = std::fmax(g, lg.clamp) * keep;
        }
    }
}

// Cumulative log decays b[s][t][k] of the chunk; returns, per state, whether the chunk factors.
void cumulative_decay(const Problem& p, const Item& it, Scratch& s, bool safe[2]) {
    if (p.lg.gw) linear_gates(p, it, s);
    for (int st = 0; st < p.S; ++st) {
        float* b = s.b.data() + st * p.C * p.Kp;
        float worst = 0.0f;
        for (int t = 0; t < it.len; ++t) {
            const float* g = p.lg.gw ? &s.z[t * p.lg.SKz + st * p.Kp] : p.g[st].at(it.b, it.t0 + t, it.hk);
            float* row = b + t * p.Kp;
            for (int k = 0; k < p.K; ++k) row[k] = (t ? row[k - p.Kp] : 0.0f) + g[k];
            for (int k = 0; k < p.K; ++k) worst = std::max(worst, std::fabs(row[k]));
        }
        safe[st] = worst <= SAFE_EXPONENT;
    }
}

void load_values(const Problem& p, const Item& it, Scratch& s) {
    for (int t = 0; t < it.len; ++t) std::memcpy(&s.vloc[t * p.Vp], p.v.at(it.b, it.t0 + t, it.hk), p.V * 4);
}

// Phase 1: the chunk's own contribution to the state, U = sum_i (k_i e^{b_C - b_i})^T v_i, its decay e^{b_C},
// and the gated queries' and keys' factors that phase 3 reuses.
void chunk_state(const Problem& p, const Item& it, Scratch& s, Shared& sh) {
    const int Kp = p.Kp, SK = p.SK;
    cumulative_decay(p, it, s, sh.safe);
    load_values(p, it, s);
    long ks;
    const float* keys = key_features(p, it, s, ks);
    for (int st = 0; st < p.S; ++st) {
        const float* b = s.b.data() + st * p.C * Kp;
        const float* last = b + (it.len - 1) * Kp;
        float* decay = sh.decay + st * Kp;
        float* eb = sh.eb + st * p.C * Kp;
        for (int k = 0; k < p.K; ++k) decay[k] = std::exp(last[k]);
        for (int t = 0; t < it.len; ++t) {
            const float* key = keys + t * ks;
            const float* bt = b + t * Kp;
            float* e = eb + t * Kp;
            float* kd = &s.kd[t * SK + st * Kp];
            for (int k = 0; k < p.K; ++k) e[k] = std::exp(bt[k]);
            if (sh.safe[st]) {  // k e^{-b} for the intra-chunk term; times e^{b_C} for the state
                float* kf = &s.kf[t * SK + st * Kp];
                for (int k = 0; k < p.K; ++k) kf[k] = key[k] / e[k];
                for (int k = 0; k < p.K; ++k) kd[k] = kf[k] * decay[k];
            } else {
                for (int k = 0; k < p.K; ++k) kd[k] = key[k] * std::exp(last[k] - bt[k]);
            }
        }
        float* kT = sh.kT + st * Kp * p.Cp;
        if (!sh.safe[st]) {
            std::fill(kT, kT + Kp * p.Cp, 0.0f);
            continue;
        }
        for (int k = 0; k < p.K; ++k)
            for (int t = 0; t < it.len; ++t) kT[k * p.Cp + t] = s.kf[t * SK + st * Kp + k];
    }
    gemm<false>(SK, p.Vp, it.len, s.kd.data(), 1, SK, s.vloc.data(), p.Vp, sh.U, p.Vp);
    if (p.ones) {  // the column of ones: sum_i k_i e^{b_C - b_i}
        std::fill(sh.U1, sh.U1 + SK, 0.0f);
        for (int t = 0; t < it.len; ++t) {
            const float* kd = &s.kd[t * SK];
#pragma omp simd
            for (int k = 0; k < SK; ++k) sh.U1[k] += kd[k];
        }
    }
}

// Phase 3: outputs of the chunk's G * len query rows (row r = t * G + g), given the state before the chunk.
void chunk_output(const Problem& p, const Item& it, Scratch& s, const Shared& sh) {
    const int S = p.S, Kp = p.Kp, Cp = p.Cp, G = p.G, SK = p.SK;
    load_values(p, it, s);
    long qs, qhs;
    const float* queries = query_features(p, it, s, qs, qhs);
    // qe[r][s, k] = w_{g,s} q_{t,g,k} e^{b_{s,t,k}}
    for (int t = 0; t < it.len; ++t)
        for (int g = 0; g < G; ++g) {
            const float* query = queries + g * qhs + t * qs;
            float* row = &s.qe[(t * G + g) * SK];
            for (int st = 0; st < S; ++st) {
                const float wg = p.w[(it.hk * G + g) * S + st];
                const float* e = sh.eb + (st * p.C + t) * Kp;
                for (int k = 0; k < p.K; ++k) row[st * Kp + k] = wg * query[k] * e[k];
            }
        }
    for (int i = 0; i < p.Mp; i += 8) {  // A = qe kT, only the columns (keys) a block of 8 rows can see
        const int seen = std::min(Cp, round_up((i + 7) / G + 1, 16));
        gemm<false>(8, seen, SK, &s.qe[i * SK], SK, 1, sh.kT, Cp, &s.A[i * Cp], Cp);
    }
    long ks = 0;
    const float* keys = nullptr;
    if (!(sh.safe[0] && (S == 1 || sh.safe[1]))) {  // the cumulative decays and key features again, for the pairwise
        bool safe[2];                                // sums below
        cumulative_decay(p, it, s, safe);
        keys = key_features(p, it, s, ks);
    }
    for (int st = 0; st < S; ++st) {  // strongly decaying states: pairwise, every exponent <= 0
        if (sh.safe[st]) continue;
        const float* b = s.b.data() + st * p.C * Kp;
        for (int t = 0; t < it.len; ++t)
            for (int g = 0; g < G; ++g) {
                const float* query = queries + g * qhs + t * qs;
                const float wg = p.w[(it.hk * G + g) * S + st];
                for (int i = 0; i <= t; ++i) {
                    const float* key = keys + i * ks;
                    float dot = 0.0f;
                    for (int k = 0; k < p.K; ++k)
                        dot += query[k] * key[k] * std::exp(b[t * Kp + k] - b[i * Kp + k]);
                    s.A[(t * G + g) * Cp + i] += wg * dot;
                }
            }
    }
    for (int r = 0; r < G * it.len; ++r)  // causal: row r is token r / G
        std::fill(&s.A[r * Cp + r / G + 1], &s.A[(r + 1) * Cp], 0.0f);
    gemm<false>(p.Mp, p.Vp, SK, s.qe.data(), SK, 1, sh.U, p.Vp, s.O.data(), p.Vp);
    for (int i = 0; i < p.Mp; i += 8) {  // O += A v, over the keys the rows can see
        const int seen = std::min(it.len, (i + 7) / G + 1);
        gemm<true>(8, p.Vp, seen, &s.A[i * Cp], Cp, 1, s.vloc.data(), p.Vp, &s.O[i * p.Vp], p.Vp);
    }
    if (p.ones) {  // the column of ones: qe U1 + the row sums of A (zero past the causal edge)
        for (int r = 0; r < G * it.len; ++r)
            s.O1[r] = dsla::dot(&s.qe[r * SK], sh.U1, SK) + dsla::dot(&s.A[r * Cp], s.ones.data(), Cp);
    }
    // Each row (token, head) of o is written after the item has read that row of q: o may overlay q row for row.
    const bool heads_together = p.Vp == p.V && p.o_sh == p.V && !p.ones;
    for (int t = 0; t < it.len; ++t) {
        float* dst = p.o + it.b * p.o_sb + (it.t0 + t) * p.o_st + (long)it.hk * G * p.o_sh;
        if (heads_together)
            std::memcpy(dst, &s.O[t * G * p.Vp], G * p.V * 4);
        else
            for (int g = 0; g < G; ++g) {
                std::memcpy(dst + g * p.o_sh, &s.O[(t * G + g) * p.Vp], p.V * 4);
                if (p.ones) dst[g * p.o_sh + p.V] = s.O1[t * G + g];
            }
    }
}

}  // namespace

extern "C" {

// seq_b, seq_t0, seq_len [N]: each sequence's batch row, first token and length. v has V columns; with `ones`, the
// outputs and states have a last column more, of the sums of a column of ones (Vo = V + ones columns in all). h0
// [N, S, HK, K, Vo] or null; hT [N, S, HK, K, Vo] receives the final states, o [B, T, H, Vo] (strides o_strides)
// the outputs. The log decays come from g1 and g2, or (gw not null, g1 and g2 null) from the gate inputs x: see
// LinearGates. Returns 0, or 1 on an allocation failure.
int dsla_chunk_forward(const float* q, const long* q_strides, const float* k, const long* k_strides,
                       const float* v, const long* v_strides, const float* g1, const long* g1_strides,
                       const float* g2, const long* g2_strides, const float* x, const long* x_strides, int D,
                       const float* gw, const float* gc, float inv_tau, float clamp, const float* mask, long mask_sb,
                       long mask_st, const float* w, int S, int HK, int G, int K, int V, int N, const long* seq_b,
                       const long* seq_t0, const long* seq_len, const float* h0, float* hT, float* o, const long* o_strides,
                       int C, int block, int threads, const float* qm, const float* km, const float* fmask, int Dx,
                       int F, int ones) {
    Problem p;
    p.q = {q, q_strides[0], q_strides[1], q_strides[2]};
    p.k = {k, k_strides[0], k_strides[1], k_strides[2]};
    p.v = {v, v_strides[0], v_strides[1], v_strides[2]};
    p.g[0] = {g1, g1_strides[0], g1_strides[1], g1_strides[2]};
    p.g[1] = {g2, g2_strides[0], g2_strides[1], g2_strides[2]};
    p.lg = {{x, x_strides[0], x_strides[1], x_strides[2]}, gw, gc, mask, mask_sb, mask_st, inv_tau, clamp, D, 0};
    p.fm = {qm, km, fmask, Dx, F};
    p.w = w;
    p.S = S, p.HK = HK, p.G = G, p.K = K, p.V = V, p.C = C, p.ones = ones != 0;
    const int Vo = V + p.ones;
    p.Kp = round_up(K, 8), p.Vp = round_up(V, 16), p.Cp = round_up(C, 16), p.Mp = round_up(G * C, 8);
    p.o = o, p.o_sb = o_strides[0], p.o_st = o_strides[1], p.o_sh = o_strides[2];
    const int SK = p.SK = S * p.Kp;
    p.lg.SKz = round_up(SK, 16);
    const long state_size = (long)SK * p.Vp + SK;  // the column of ones last (unused without p.ones)
    const long shared_size = state_size + SK + (long)S * C * p.Kp + (long)SK * p.Cp;

    // Rounds of up to `block` chunks of every sequence, each (sequence, head) a run of consecutive items in
    // chunk order; states are carried between rounds in padded layout.
    struct Run {  // the items of one (sequence, head) in a round, in chunk order
        long first, count, stride;
        int seq, hk;
    };
    std::vector<std::vector<Item>> rounds;
    std::vector<std::vector<Run>> runs;
    for (long r = 0;; ++r) {
        std::vector<Item> items;
        std::vector<Run> round_runs;
        for (int n = 0; n < N; ++n) {
            const long first = r * block, end = std::min<long>((seq_len[n] + C - 1) / C, (r + 1) * block);
            if (first >= end) continue;
            for (int hk = 0; hk < HK; ++hk) round_runs.push_back({(long)items.size() + hk, end - first, HK, n, hk});
            for (long c = first; c < end; ++c)  // heads innermost: neighbouring items read neighbouring memory
                for (int hk = 0; hk < HK; ++hk)
                    items.push_back({n, (int)seq_b[n], hk, seq_t0[n] + c * C, (int)std::min<long>(C, seq_len[n] - c * C)});
        }
        if (items.empty()) break;
        rounds.push_back(std::move(items));
        runs.push_back(std::move(round_runs));
    }
    std::vector<float> state;
    try {
        state.assign((size_t)N * HK * state_size, 0.0f);
    } catch (...) {
        return 1;
    }
    if (h0)
        for (int n = 0; n < N; ++n)
            for (int s = 0; s < S; ++s)
                for (int hk = 0; hk < HK; ++hk)
                    for (int kk = 0; kk < K; ++kk) {
                        float* row = &state[(n * HK + hk) * state_size];
                        const float* src = h0 + (((long)(n * S + s) * HK + hk) * K + kk) * Vo;
                        std::memcpy(row + (s * p.Kp + kk) * p.Vp, src, V * 4);
                        if (p.ones) row[SK * p.Vp + s * p.Kp + kk] = src[V];
                    }
    size_t widest = 0;
    for (const auto& items : rounds) widest = std::max(widest, items.size());
    // Up to 16 MiB is kept per calling thread between calls, so that long prompts do not fault in fresh pages every
    // time. Its padding must be zero and is never written: it is zeroed when the layout changes (or the workspace
    // grows), not on every call (14 MB at 1k tokens of the default preset: a tenth of the kernel's time). What a
    // call leaves outside the padding is stale for the next, as between the rounds of one call, and never read.
    thread_local std::vector<float> kept;
    thread_local long kept_layout[7] = {};
    std::vector<float> once;
    const size_t size = widest * shared_size;
    const bool keep = size <= (16u << 20) / sizeof(float);
    std::vector<float>& workspace = keep ? kept : once;
    const long layout[7] = {S, K, V, C, p.Kp, p.Vp, p.Cp};
    std::vector<Shared> shared(widest);
    try {
        if (!keep || workspace.size() < size || !std::equal(layout, layout + 7, kept_layout)) {
            workspace.assign(std::max(size, keep ? workspace.size() : size), 0.0f);  // no reallocation when it fits
            if (keep) std::copy(layout, layout + 7, kept_layout);
        }
    } catch (...) {
        return 1;
    }
    for (size_t i = 0; i < widest; ++i) {
        float* base = &workspace[i * shared_size];
        shared[i] = {base, base + SK * p.Vp, base + state_size, base + state_size + SK,
                     base + state_size + SK + S * C * p.Kp, {}};
    }

#pragma omp parallel num_threads(threads)
    {
        const dsla::FlushDenormals flush;
        Scratch scratch(p);
        for (const auto& items : rounds) {
            const long count = (long)items.size();
#pragma omp for schedule(static)
            for (long i = 0; i < count; ++i) chunk_state(p, items[i], scratch, shared[i]);
            // Scan over each run's chunks, one state row at a time; U becomes the state before each chunk.
            const auto& round_runs = runs[&items - rounds.data()];
            const long rows = (long)round_runs.size() * SK;
#pragma omp for schedule(static)
            for (long row = 0; row < rows; ++row) {
                const Run& run = round_runs[row / SK];
                const int r = (int)(row % SK);
                float* base = &state[(run.seq * HK + run.hk) * state_size];
                float* cur = base + r * p.Vp;
                float* cur1 = base + SK * p.Vp + r;
                for (long c = 0; c < run.count; ++c) {
                    const Shared& sh = shared[run.first + c * run.stride];
                    float* u = sh.U + r * p.Vp;
                    const float d = sh.decay[r];
                    for (int j = 0; j < p.Vp; ++j) {
                        const float local = u[j];
                        u[j] = cur[j];
                        cur[j] = d * cur[j] + local;
                    }
                    if (p.ones) {
                        const float local = sh.U1[r];
                        sh.U1[r] = *cur1;
                        *cur1 = d * *cur1 + local;
                    }
                }
            }
#pragma omp for schedule(static)
            for (long i = 0; i < count; ++i) chunk_output(p, items[i], scratch, shared[i]);
        }
    }
    for (int n = 0; n < N; ++n)
        for (int s = 0; s < S; ++s)
            for (int hk = 0; hk < HK; ++hk)
                for (int kk = 0; kk < K; ++kk) {
                    const float* row = &state[(n * HK + hk) * state_size];
                    float* dst = hT + (((long)(n * S + s) * HK + hk) * K + kk) * Vo;
                    std::memcpy(dst, row + (s * p.Kp + kk) * p.Vp, V * 4);
                    if (p.ones) dst[V] = row[SK * p.Vp + s * p.Kp + kk];
                }
    return 0;
}

}  // extern "C"
