"""Sensitivity ranking of layers (docs/design.md §2): which layers to convert to DSLA first.

- `entropy`: the paper's ranking. The entropy of the last query token's softmax attention distribution, averaged
  over query heads and calibration texts; the lowest entropy is converted first. Computed here from each layer's
  queries and keys (RoPE applied, grouped-query heads expanded), not from `output_attentions`.
- `measured`: the loss increase when each layer alone is converted after a short transfer (the layer trained alone
  on captured inputs, then the LM loss on held-out text with only that layer converted); the smallest increase is
  converted first.

`first="high"` converts the other end of the profile first (the highest score). On SmolLM2 with the default preset,
the highest-entropy layers first is the better order: held-out perplexity at 25 % 1.03x the teacher's and passkey
retrieval kept, against 1.06x and passkey lost for the lowest first (README, "Demo results").

    dsla rank --method entropy --output ranking/        # ranking.json, ranking.png; --save-config writes the order
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb


def _last_token_entropy(attn, hidden_states: torch.Tensor, position_embeddings, mask: torch.Tensor | None):
    """Entropy (nats) of the last query token's attention distribution, per batch row and query head: [B, H]."""
    B, T, _ = hidden_states.shape
    D = attn.head_dim
    cos, sin = position_embeddings
    q = attn.q_proj(hidden_states[:, -1:]).view(B, 1, -1, D).transpose(1, 2)  # [B, H, 1, D]
    k = attn.k_proj(hidden_states).view(B, T, -1, D).transpose(1, 2)  # [B, HK, T, D]
    q, _ = apply_rotary_pos_emb(q, q, cos[:, -1:], sin[:, -1:])
    _, k = apply_rotary_pos_emb(k, k, cos, sin)
    groups = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(groups, dim=1)  # GQA: each query head reads its group's key head
    scores = (q.float() @ k.float().transpose(-1, -2)).squeeze(2) * attn.scaling  # [B, H, T]
    if mask is not None:
        scores = scores.masked_fill(~mask[:, None, :].bool(), float("-inf"))
    logp = scores.log_softmax(-1)
    return -(logp.exp() * logp.nan_to_num(neginf=0.0)).sum(-1)


@torch.no_grad()
def attention_entropy(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, batch_size: int = 4):
    """Per-layer entropy of the last token's attention, averaged over heads and rows of `input_ids` (the last
    column must be a real token in every row: right-align padded rows). Works on a `LlamaForCausalLM` or a
    `DSLALlamaForCausalLM` running softmax attention. Returns a list of floats, one per layer."""
    layers = model.model.layers
    sums = torch.zeros(len(layers), dtype=torch.float64)
    current_mask = {}
    hooks = []
    for i, block in enumerate(layers):

        def hook(module, args, kwargs, i=i):
            x = kwargs.get("hidden_states", args[0] if args else None)
            ent = _last_token_entropy(module, x, kwargs["position_embeddings"], current_mask.get("m"))
            sums[i] += ent.mean(-1).double().sum().cpu()

        hooks.append(block.self_attn.register_forward_pre_hook(hook, with_kwargs=True))
    try:
        for start in range(0, len(input_ids), batch_size):
            rows = input_ids[start : start + batch_size].to(model.device)
            mask = attention_mask[start : start + batch_size].to(model.device) if attention_mask is not None else None
            current_mask["m"] = mask
            model.model(rows, attention_mask=mask, use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    return (sums / len(input_ids)).tolist()


def order_from_scores(scores: list[float], layers: list[int] | None = None, first: str = "low") -> list[int]:
    """Layers sorted by ascending score (`first="low"`) or descending score (`"high"`), ties by index: the conversion
    order."""
    if first not in ("low", "high"):
        raise ValueError(f"first must be 'low' or 'high', got {first!r}")
    layers = list(range(len(scores))) if layers is None else layers
    sign = 1.0 if first == "low" else -1.0
    return sorted(layers, key=lambda i: (sign * scores[i], i))


def _forward_from(model, hidden: torch.Tensor, start: int) -> torch.Tensor:
    """Logits of a DSLA-Llama run from the residual stream entering layer `start` (no cache, no padding)."""
    from transformers.masking_utils import create_causal_mask

    inner = model.model
    positions = torch.arange(hidden.shape[1], device=hidden.device)[None]
    pe = inner.rotary_emb(hidden, positions)
    mask = create_causal_mask(
        config=inner.config, inputs_embeds=hidden, attention_mask=None, cache=None, position_ids=positions
    )
    for layer in inner.layers[start:]:
        hidden = layer(hidden, attention_mask=mask, position_ids=positions, position_embeddings=pe)
    return model.lm_head(inner.norm(hidden))


def _lm_loss(logits: torch.Tensor, input_ids: torch.Tensor) -> float:
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), input_ids[:, 1:].flatten()).item()


def measured_sensitivity(
    student,
    train_ids: torch.Tensor,
    eval_ids: torch.Tensor,
    steps: int = 20,
    lr: float = 3e-3,
    batch_size: int = 2,
    layers: list[int] | None = None,
    progress: bool = True,
) -> dict:
    """Loss increase on `eval_ids` when each layer alone is converted after a short layer-alone transfer on
    `train_ids`. The student's DSLA weights are restored afterwards. Returns teacher loss and per-layer losses."""
    from .trainers.layer_alone import capture_all_layers, fit_layer_alone

    student.set_dsla_layers([])
    layers = list(student.config.dsla_layers if layers is None else layers)
    _, x_train, y_train = capture_all_layers(student, train_ids, progress=progress)
    resid_eval, _, _ = capture_all_layers(student, eval_ids, progress=progress)
    with torch.no_grad():
        base = _lm_loss(_forward_from(student, resid_eval[0], 0), eval_ids)
    losses, rel_errors = {}, {}
    for i in tqdm(layers, desc="measured ranking", disable=not progress):
        attn = student.model.layers[i].linear_attn
        saved = {k: v.detach().clone() for k, v in attn.state_dict().items()}
        fit = fit_layer_alone(student, i, x_train[i], y_train[i], steps=steps, lr=lr, batch_size=batch_size)
        student.set_dsla_layers([i])
        with torch.no_grad():
            losses[i] = _lm_loss(_forward_from(student, resid_eval[i], i), eval_ids)
        rel_errors[i] = fit["rel_error_after"]
        student.set_dsla_layers([])
        attn.load_state_dict(saved)
    n = student.config.num_hidden_layers
    scores = [losses.get(i, math.inf) - base for i in range(n)]
    return {"teacher_loss": base, "loss": [losses.get(i) for i in range(n)], "scores": scores, "rel_error": rel_errors}


def rank_layers(
    student,
    calib_ids: torch.Tensor,
    method: str = "entropy",
    eval_ids: torch.Tensor | None = None,
    steps: int = 20,
    progress: bool = True,
    first: str = "low",
) -> dict:
    """Rank the student's DSLA layers. Returns a dict with `method`, per-layer `scores`, `first` (which end of the
    scores converts first: "low" or "high") and the `order`."""
    if first not in ("low", "high"):
        raise ValueError(f"first must be 'low' or 'high', got {first!r}")
    start = time.perf_counter()
    active = student.dsla_layers
    student.set_dsla_layers([])
    try:
        if method == "entropy":
            scores = attention_entropy(student, calib_ids)
            result = {"method": method, "scores": scores}
        elif method == "measured":
            if eval_ids is None:
                raise ValueError("The measured ranking needs held-out eval_ids")
            result = {"method": method, **measured_sensitivity(student, calib_ids, eval_ids, steps, progress=progress)}
        else:
            raise ValueError(f"Unknown ranking method {method!r}; choose 'entropy' or 'measured'")
    finally:
        student.set_dsla_layers(active)
    result["first"] = first
    result["order"] = order_from_scores(result["scores"], student.config.dsla_layers, first)
    result["seconds"] = time.perf_counter() - start
    return result


def plot_profile(result: dict, path: str | Path, extra: dict | None = None) -> None:
    """A bar chart of the per-layer scores, the conversion rank written above each bar."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scores = result["scores"]
    rank = {layer: r for r, layer in enumerate(result["order"])}
    fig, ax = plt.subplots(figsize=(max(6, 0.35 * len(scores)), 3.5))
    finite = [s if math.isfinite(s) else 0.0 for s in scores]
    ax.bar(range(len(scores)), finite, color=["tab:blue" if i in rank else "tab:gray" for i in range(len(scores))])
    for i, s in enumerate(finite):
        if i in rank:
            ax.annotate(str(rank[i] + 1), (i, s), ha="center", va="bottom", fontsize=7)
    label = {"entropy": "last-token attention entropy (nats)", "measured": "loss increase (nats/token)"}
    ax.set_xlabel("layer (number: conversion rank)")
    ax.set_ylabel(label.get(result["method"], "score"))
    ax.set_title(f"Layer sensitivity ({result['method']}): {result.get('first', 'low')}est converted first")
    ax.set_xticks(range(len(scores)))
    ax.tick_params(axis="x", labelsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def save_ranking(result: dict, output_dir: str | Path) -> tuple[Path, Path]:
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    json_path, png_path = out / f"ranking_{result['method']}.json", out / f"ranking_{result['method']}.png"
    json_path.write_text(json.dumps(result, indent=2, default=lambda v: None if v is None else float(v)))
    plot_profile(result, png_path)
    return json_path, png_path
