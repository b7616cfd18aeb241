"""What each DSLA state attends to: effective attention maps (the DSLA paper's Figure 5) and the learned mixing.

A DSLA layer has no attention matrix, but its output is still a weighted sum of the values: for query `t` and key
`i`, the weight given by state `s` is

    w_s(t, i) = scale * g_s * psi(q_t) . (prod_{j in (i, tau]} a_s,j) phi(k_i),       i <= tau = t - W

(`a_s,j` the per-feature gates, `g_s` the mixing weight, `W` the exact softmax window of the default preset: the
states hold the tokens before the window). With the window, the layer's output shares one normaliser between the
window's softmax terms `exp(q_t . k_i / sqrt(d))` (RoPE applied, `t - W < i <= t`) and `exp(c_h) * w_s(t, i)`
(`c_h` the learned log scale of the states); dividing both by that normaliser gives a map whose rows sum to 1 and
which reproduces the layer's output exactly (`sum_i A(t, i) v_i`; tested). Without a window, the sum normaliser
divides by `sum_{s, i} w_s(t, i)`; without a normaliser the weights are shown as they are.
"""

from __future__ import annotations

import torch

from ..models.dsla.configuration_dsla import LINEAR_ATTENTION


@torch.no_grad()
def capture_attention_inputs(model, input_ids: torch.Tensor, layers: list[int]) -> dict[int, torch.Tensor]:
    """The input of each listed layer's attention (after its input norm) in one forward of `model` as it stands."""
    seen: dict[int, torch.Tensor] = {}
    hooks = [
        model.model.layers[i].input_layernorm.register_forward_hook(
            lambda m, a, out, i=i: seen.__setitem__(i, out.detach())
        )
        for i in layers
    ]
    try:
        model(input_ids.to(model.device), use_cache=False, logits_to_keep=1)
    finally:
        for h in hooks:
            h.remove()
    return seen


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    from transformers.models.llama.modeling_llama import rotate_half

    return x * cos[:, :, None] + rotate_half(x) * sin[:, :, None]


@torch.no_grad()
def effective_attention(block, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Effective attention maps of one decoder layer's DSLA module on captured inputs `x` ([1, T, hidden]).

    Returns fp32 [H, T, T] maps (query heads, queries, keys): `"history"` and `"recency"` (or `"state"` for a
    single-state layer), `"window"` when the layer has an exact window, and `"teacher"`, the softmax attention of the
    teacher's layer on the same inputs, for comparison."""
    attn = block.linear_attn
    if attn is None:
        raise ValueError("This layer has no DSLA weights")
    if x.shape[0] != 1:
        raise ValueError("effective_attention reads one sequence ([1, T, hidden])")
    cfg = attn.config
    T, D, H, HK = x.shape[1], attn.head_dim, attn.num_heads, attn.num_kv_heads
    SH, W, S = attn.state_heads, attn.window, attn.num_states
    q_proj, k_proj, v_proj, _ = attn.projections()
    q = q_proj(x)
    if hasattr(attn, "q_lora"):
        q = q + attn.q_lora(x)
    q = q.view(1, T, H, D)
    k = k_proj(x).view(1, T, HK, D)
    keys = k.repeat_interleave(H // HK, dim=2) if SH != HK else k
    phi = attn.k_feature_map(keys)[0].float()  # [T, SH, F]
    psi = attn.q_feature_map(q)[0].float()  # [T, H, F]
    gates = attn.gates(keys if cfg.dsla_gate_source == "key" else x).materialize()[0]  # [T, S, SH, F]
    cumulative = gates.cumsum(0)
    mix = attn.mix_weights()
    mix = torch.ones(H, S, device=x.device) if mix is None else mix.float().expand(H, S)

    t = torch.arange(T, device=x.device)
    tau = t - W  # the last token in the states when query t is read
    reads = (t[None, :] <= tau[:, None]) & (tau[:, None] >= 0)  # [T queries, T keys]
    group = H // SH
    states = torch.zeros(S, H, T, T, device=x.device)
    for h in range(H):
        g = h // group
        for s in range(S):
            # decay from key i to tau(t): exp(G[tau] - G[i]) per feature, only where key i is in the states
            G = cumulative[:, s, g]  # [T, F]
            diff = G[tau.clamp(min=0)][:, None, :] - G[None, :, :]  # [T, T, F]
            decay = torch.where(reads[..., None], diff.clamp(max=0.0), torch.full_like(diff, float("-inf"))).exp()
            states[s, h] = attn.scale * mix[h, s] * torch.einsum("tf,tif,if->ti", psi[:, h], decay, phi[:, g])

    out: dict[str, torch.Tensor] = {}
    cos, sin = attn.rotary_emb(x, t[None])
    k_rot = _rope(k, cos, sin)[0].float().repeat_interleave(H // HK, dim=1)  # [T, H, D]
    q_teacher = _rope(q_proj(x).view(1, T, H, D), cos, sin)[0].float()
    scores = torch.einsum("thd,ihd->hti", q_teacher, k_rot) * D**-0.5
    out["teacher"] = scores.masked_fill(t[None, :] > t[:, None], float("-inf")).softmax(-1)
    if W:
        q_rot = _rope(q, cos, sin)[0].float()
        scores = torch.einsum("thd,ihd->hti", q_rot, k_rot) * D**-0.5
        in_window = (t[None, :] <= t[:, None]) & (t[None, :] > t[:, None] - W)
        scores = scores.masked_fill(~in_window, float("-inf"))
        top = scores.amax(-1, keepdim=True).clamp(min=0.0)
        window = (scores - top).exp()
        states = states * (attn.linear_log_scale.float()[None, :, None, None] - top[None]).exp()
        norm = window.sum(-1, keepdim=True) + states.sum((0, -1))[..., None] + 1e-6  # as the layer divides
        out["window"] = window / norm
        states = states / norm[None]
    elif attn.normalizer == "sum":
        states = states / (states.sum((0, -1), keepdim=True) + 1e-6)
    names = ["history", "recency"] if S == 2 else ["state"]
    for s, name in enumerate(names):
        out[name] = states[s]
    return {name: m.cpu() for name, m in out.items()}  # summaries and plots run on the CPU


@torch.no_grad()
def gate_half_lives(block, x: torch.Tensor) -> dict[str, float]:
    """Half-life in tokens of each state on captured inputs `x`: ln 2 over minus the mean log gate (over tokens,
    heads and features). A state that forgets fast has a short half-life."""
    attn = block.linear_attn
    k = attn.projections()[1](x).view(*x.shape[:2], attn.num_kv_heads, attn.head_dim)
    if attn.state_heads != attn.num_kv_heads:
        k = k.repeat_interleave(attn.num_heads // attn.num_kv_heads, dim=2)
    gates = attn.gates(k if attn.config.dsla_gate_source == "key" else x).materialize()  # [B, T, S, H, F]
    names = ["history", "recency"] if attn.num_states == 2 else ["state"]
    mean = gates.mean(dim=(0, 1, 3, 4))
    return {name: float(torch.log(torch.tensor(2.0)) / (-mean[s]).clamp(min=1e-12)) for s, name in enumerate(names)}


def map_summary(maps: dict[str, torch.Tensor], skip: int = 0) -> dict[str, dict[str, float]]:
    """Per component: its share of the attention mass and its mean distance `t - i` (mass-weighted), averaged over
    heads and over queries from `skip` on (e.g. past the window, where the states hold something)."""
    total = sum(m for name, m in maps.items() if name != "teacher")
    T = total.shape[-1]
    t = torch.arange(T)
    distance = (t[:, None] - t[None, :]).clamp(min=0).float()
    rows = slice(skip, T)
    summary = {}
    for name, m in maps.items():
        m = m[:, rows]
        mass = m.sum(-1)  # [H, queries]
        share = mass.mean().item() if name != "teacher" else 1.0
        dist = ((m * distance[rows]).sum(-1) / mass.clamp(min=1e-12)).mean().item()
        summary[name] = {"mass": share, "mean_distance": dist}
    return summary


@torch.no_grad()
def layer_maps(
    model, input_ids: torch.Tensor, layers: list[int] | None = None, half_lives: dict | None = None
) -> dict[int, dict[str, torch.Tensor]]:
    """Effective attention maps of the listed layers (default: every layer running as DSLA) on one sequence; with
    a dict as `half_lives`, each layer's gate half-lives (`gate_half_lives`) are stored in it too."""
    if layers is None:
        layers = [i for i, kind in enumerate(model.config.layer_types) if kind == LINEAR_ATTENTION]
    inputs = capture_attention_inputs(model, input_ids, layers)
    if half_lives is not None:
        half_lives.update({i: gate_half_lives(model.model.layers[i], inputs[i]) for i in layers})
    return {i: effective_attention(model.model.layers[i], inputs[i]) for i in layers}


def mixing_weights(model) -> dict[int, list[list[float]]]:
    """The learned mixing weights `[heads][states]` (softmax of the logits; per layer: one row) of every layer with
    DSLA weights and more than one state."""
    found = {}
    for i, block in enumerate(model.model.layers):
        attn = block.linear_attn
        if attn is not None and attn.num_states > 1:
            mix = attn.mix_weights()
            found[i] = (mix[None] if mix.dim() == 1 else mix).tolist()
    return found


def plot_maps(maps: dict[int, dict[str, torch.Tensor]], path, head: int = 0, tokens: list[str] | None = None) -> None:
    """One row per layer: the teacher's attention, then each DSLA component (log scale), for one query head."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import LogNorm

    layers = list(maps)
    names = list(next(iter(maps.values())))
    order = ["teacher", "window", "history", "recency", "state"]
    names = [n for n in order if n in names]
    fig, axes = plt.subplots(len(layers), len(names), figsize=(3.1 * len(names), 3.0 * len(layers)), squeeze=False)
    for r, layer in enumerate(layers):
        for c, name in enumerate(names):
            ax = axes[r][c]
            m = maps[layer][name][head].clamp(min=1e-6)
            im = ax.imshow(m.numpy(), norm=LogNorm(vmin=1e-4, vmax=1.0), cmap="viridis", interpolation="nearest")
            mass = maps[layer][name][head].sum(-1).mean().item()
            title = f"L{layer} {name}" + ("" if name == "teacher" else f" (mass {mass:.2f})")
            ax.set_title(title, fontsize=8)
            ax.set_xlabel("key i", fontsize=7)
            ax.set_ylabel("query t", fontsize=7)
            ax.tick_params(labelsize=6)
    fig.colorbar(im, ax=axes, shrink=0.6, label="effective attention weight")
    fig.suptitle(f"Effective attention of DSLA components (query head {head})", fontsize=9)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def plot_mixing(mixing: dict[int, list[list[float]]], shares: dict[int, dict[str, dict]], path) -> None:
    """Left: the learned weight of the history state per layer and head. Right: each component's share of the
    attention mass per layer on the text (window, history, recency)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 3.6))
    ax = axes[0]
    if mixing:
        layers = sorted(mixing)
        grid = torch.tensor([[row[0] for row in mixing[i]] for i in layers])  # [layers, heads], history weight
        spread = max(0.02, (grid - 0.5).abs().max().item())  # centred on an even mix, scaled to what was learned
        im = ax.imshow(grid.T.numpy(), vmin=0.5 - spread, vmax=0.5 + spread, cmap="coolwarm", aspect="auto")
        ax.set_xticks(range(len(layers)), [str(i) for i in layers], fontsize=6)
        ax.set_xlabel("layer")
        ax.set_ylabel("query head")
        ax.set_title("learned mixing: weight of the history state", fontsize=9)
        fig.colorbar(im, ax=ax)
    else:
        ax.text(0.5, 0.5, "single state: no mixing", ha="center")
    ax = axes[1]
    if shares:
        layers = sorted(shares)
        names = [n for n in ("window", "history", "recency", "state") if n in shares[layers[0]]]
        bottom = torch.zeros(len(layers))
        for name in names:
            values = torch.tensor([shares[i][name]["mass"] for i in layers])
            ax.bar(range(len(layers)), values.numpy(), bottom=bottom.numpy(), label=name)
            bottom += values
        ax.set_xticks(range(len(layers)), [str(i) for i in layers], fontsize=6)
        ax.set_xlabel("layer")
        ax.set_ylabel("share of attention mass")
        ax.set_title("effective attention mass per component (queries past the window)", fontsize=9)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
