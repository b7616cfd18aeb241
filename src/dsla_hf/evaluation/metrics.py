"""Evaluation helpers (docs/design.md §4): held-out perplexity (rows, or a long stream with a sliding window) and
passkey retrieval (per length, or over a length x depth grid), and recency bias (loss by distance inside a window).
RULER's tasks are in `dsla_hf.evaluation.ruler`, the `dsla eval` report in `dsla_hf.evaluation.suite`."""

from __future__ import annotations

import math
import random

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..distributed import process_group


@torch.no_grad()
def perplexity(model, input_ids: torch.Tensor, batch_size: int = 2, progress: bool = False, desc: str = "ppl") -> dict:
    """Next-token loss and perplexity of `model` on rows of `input_ids` (no padding). Under `torch.distributed`,
    rows are shared out between processes and the sums reduced, so every process gets the same answer."""
    dist = process_group()
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist else (0, 1)
    device = next(model.parameters()).device
    total = torch.zeros(2, dtype=torch.float64)
    rows = input_ids[rank::world]
    for batch in tqdm(rows.split(batch_size), desc=desc, leave=False, disable=not progress or rank != 0):
        batch = batch.to(device)
        logits = model(batch, use_cache=False).logits
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), batch[:, 1:].flatten(), reduction="sum")
        total += torch.tensor([loss.item(), batch[:, 1:].numel()], dtype=torch.float64)
    if dist:
        dist.all_reduce(total)
    loss = (total[0] / total[1].clamp(min=1)).item()
    return {"loss": loss, "ppl": math.exp(loss), "tokens": int(total[1].item())}


PASSKEY_TASK = (
    "There is an important info hidden inside a lot of irrelevant text. Find it and memorize them. "
    "I will quiz you about the important information there."
)
PASSKEY_FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
PASSKEY_QUESTION = "What is the pass key? The pass key is"


def passkey_prompt(tokenizer, length: int, passkey: int, depth: float) -> str:
    """The Landmark / LongLoRA passkey prompt of about `length` tokens (by `tokenizer`), the key line at relative
    `depth` of the filler."""
    needle = f"The pass key is {passkey}. Remember it. {passkey} is the pass key."
    unit = len(tokenizer(" " + PASSKEY_FILLER, add_special_tokens=False)["input_ids"])
    fixed = len(tokenizer(f"{PASSKEY_TASK} {needle} {PASSKEY_QUESTION}", add_special_tokens=False)["input_ids"])
    repeats = max(1, (length - fixed) // unit)
    before = int(round(repeats * depth))
    filler = [PASSKEY_FILLER] * repeats
    parts = [PASSKEY_TASK, *filler[:before], needle, *filler[before:], PASSKEY_QUESTION]
    return " ".join(parts)


@torch.no_grad()
def passkey_accuracy(
    model,
    tokenizer,
    lengths: list[int],
    trials: int = 2,
    seed: int = 0,
    digits: int = 5,
    progress: bool = False,
    desc: str = "passkey",
) -> dict:
    """Greedy passkey retrieval: the answer counts when the generated continuation contains the key (substring
    match, as in the originals). Depths spread evenly over the trials. Returns accuracy per length and overall."""
    rng = random.Random(seed)
    per_length, samples = {}, []
    jobs = [(length, t) for length in lengths for t in range(trials)]
    keys = [rng.randint(10 ** (digits - 1), 10**digits - 1) for _ in jobs]
    hits = {length: 0 for length in lengths}
    for (length, t), key in tqdm(list(zip(jobs, keys)), desc=desc, leave=False, disable=not progress):
        trial = _passkey_trial(model, tokenizer, length, key, (t + 0.5) / trials, digits)
        hits[length] += trial["hit"]
        samples.append(trial)
    for length in lengths:
        per_length[length] = hits[length] / trials
    return {"accuracy": sum(hits.values()) / len(jobs), "per_length": per_length, "samples": samples}


def sliding_windows(num_tokens: int, context: int, stride: int | None = None) -> list[tuple[int, int, int]]:
    """Windows `(begin, end, first_scored)` over a stream of `num_tokens` tokens: each window reads at most `context`
    tokens and scores the tokens from `first_scored` to `end` (exclusive) that no earlier window scored, so every
    token but the first is scored exactly once, with at least `context - stride` tokens of context once past the
    first window (the usual Transformers recipe; `stride` defaults to half the context)."""
    if context < 2:
        raise ValueError(f"context must be at least 2 tokens, got {context}")
    stride = stride or max(1, context // 2)
    if not 0 < stride < context:  # a window must hold the token before the first one it scores
        raise ValueError(f"stride must be in [1, context - 1], got {stride}")
    windows, prev_end = [], 1  # token 0 has no prediction
    for begin in range(0, num_tokens, stride):
        end = min(begin + context, num_tokens)
        if end > prev_end:
            windows.append((begin, end, prev_end))
        prev_end = max(prev_end, end)
        if end == num_tokens:
            break
    return windows


@torch.no_grad()
def sliding_window_perplexity(
    model,
    input_ids: torch.Tensor,
    context: int,
    stride: int | None = None,
    batch_size: int = 1,
    progress: bool = False,
    desc: str = "ppl",
) -> dict:
    """Perplexity of a 1-D token stream read in windows of at most `context` tokens (`sliding_windows`). Windows of
    equal length are batched; only the scored positions go through the LM head (`logits_to_keep`)."""
    ids = input_ids.flatten()
    device = next(model.parameters()).device
    windows = sliding_windows(ids.numel(), context, stride)
    groups: dict[tuple[int, int], list[tuple[int, int, int]]] = {}
    for w in windows:
        groups.setdefault((w[1] - w[0], w[1] - w[2]), []).append(w)
    total_loss, total_tokens = 0.0, 0
    bar = tqdm(total=len(windows), desc=desc, leave=False, disable=not progress)
    for (length, scored), group in groups.items():
        for i in range(0, len(group), batch_size):
            chunk = group[i : i + batch_size]
            batch = torch.stack([ids[b:e] for b, e, _ in chunk]).to(device)
            # logits of the last `scored + 1` positions: `scored` predictions plus nothing wasted but one
            logits = model(batch, use_cache=False, logits_to_keep=scored + 1).logits[:, :-1]
            targets = batch[:, length - scored :]
            loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), reduction="sum")
            total_loss += loss.item()
            total_tokens += targets.numel()
            bar.update(len(chunk))
    bar.close()
    loss = total_loss / max(1, total_tokens)
    return {"loss": loss, "ppl": math.exp(loss), "tokens": total_tokens, "context": context, "windows": len(windows)}


def _passkey_trial(model, tokenizer, length: int, key: int, depth: float, digits: int) -> dict:
    device = next(model.parameters()).device
    ids = tokenizer(passkey_prompt(tokenizer, length, key, depth), return_tensors="pt").input_ids.to(device)
    out = model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=digits + 3,
        do_sample=False,
        pad_token_id=tokenizer.eos_token_id,
    )
    answer = tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
    return {
        "length": length,
        "tokens": ids.shape[1],
        "depth": depth,
        "key": key,
        "answer": answer,
        "hit": str(key) in answer,
    }


@torch.no_grad()
def passkey_grid(
    model,
    tokenizer,
    lengths: list[int],
    depths: list[float],
    trials: int = 1,
    seed: int = 0,
    digits: int = 5,
    progress: bool = False,
    desc: str = "passkey",
) -> dict:
    """Passkey retrieval (Landmark / LongLoRA prompt, substring match) at every length and depth: `accuracy` is a
    [len(depths)][len(lengths)] list (rows: depths, columns: lengths), `trials` keys per cell."""
    rng = random.Random(seed)
    jobs = [(d, n, t) for d in range(len(depths)) for n in range(len(lengths)) for t in range(trials)]
    keys = [rng.randint(10 ** (digits - 1), 10**digits - 1) for _ in jobs]
    hits = [[0] * len(lengths) for _ in depths]
    samples = []
    for (d, n, _), key in tqdm(list(zip(jobs, keys)), desc=desc, leave=False, disable=not progress):
        trial = _passkey_trial(model, tokenizer, lengths[n], key, depths[d], digits)
        hits[d][n] += trial["hit"]
        samples.append(trial)
    accuracy = [[h / trials for h in row] for row in hits]
    overall = sum(map(sum, hits)) / max(1, len(jobs))
    return {
        "lengths": list(lengths),
        "depths": list(depths),
        "accuracy": accuracy,
        "mean": overall,
        "samples": samples,
    }


# --- recency bias: loss by distance -------------------------------------------------------------------------------


def distance_buckets(context: int, edges: tuple[int, ...] | list[int] = (16, 64, 256, 1024)) -> list[tuple[int, int]]:
    """Log-spaced buckets `(lo, hi)` (inclusive) of the distance of a predicted token from the start of its window,
    i.e. how many tokens of context it is predicted from: 1 to `context - 1`. `edges` are the upper ends of all but
    the last bucket; edges at or past `context - 1` are dropped. `distance_buckets(2048)` is
    [(1, 16), (17, 64), (65, 256), (257, 1024), (1025, 2047)]."""
    if context < 2:
        raise ValueError(f"context must be at least 2 tokens, got {context}")
    edges = list(edges)
    if any(e < 1 for e in edges) or any(b <= a for a, b in zip(edges, edges[1:])):
        raise ValueError(f"edges must be positive and strictly increasing, got {edges}")
    buckets, lo = [], 1
    for edge in edges:
        if edge >= context - 1:
            break
        buckets.append((lo, edge))
        lo = edge + 1
    buckets.append((lo, context - 1))
    return buckets


@torch.no_grad()
def loss_by_distance(
    model,
    input_ids: torch.Tensor,
    context: int,
    buckets: list[tuple[int, int]] | None = None,
    batch_size: int = 1,
    progress: bool = False,
    desc: str = "loss by distance",
) -> dict:
    """Recency bias: mean next-token loss as a function of how many tokens of context the prediction had. The 1-D
    stream is cut into non-overlapping windows of exactly `context` tokens (a shorter tail is dropped, so every
    distance has the same number of tokens); in each window the token at index `d` is predicted from the `d` tokens
    before it and counts at distance `d`. Returns `buckets` (label "lo-hi" -> `lo`, `hi`, mean `loss`, `tokens`),
    the overall `loss`, `tokens` and `windows`. A model that uses long context has a curve that keeps falling with
    distance; one that forgets (a short window, a fast-decaying state) flattens past its reach."""
    ids = input_ids.flatten()
    windows = ids.numel() // context
    if windows < 1:
        raise ValueError(f"the stream has {ids.numel()} tokens, fewer than one window of {context}")
    buckets = buckets or distance_buckets(context)
    for lo, hi in buckets:
        if not 1 <= lo <= hi <= context - 1:
            raise ValueError(f"bucket ({lo}, {hi}) is outside distances 1 to {context - 1}")
    device = next(model.parameters()).device
    sums = torch.zeros(context, dtype=torch.float64)  # loss summed over windows, per distance (index 0: unused)
    rows = ids[: windows * context].view(windows, context)
    for batch in tqdm(rows.split(batch_size), desc=desc, leave=False, disable=not progress):
        batch = batch.to(device)
        logits = model(batch, use_cache=False).logits[:, :-1]
        loss = F.cross_entropy(logits.flatten(0, 1).float(), batch[:, 1:].flatten(), reduction="none")
        sums[1:] += loss.view(batch.shape[0], context - 1).sum(0).double().cpu()
    out = {}
    for lo, hi in buckets:
        tokens = windows * (hi - lo + 1)
        out[f"{lo}-{hi}"] = {"lo": lo, "hi": hi, "loss": sums[lo : hi + 1].sum().item() / tokens, "tokens": tokens}
    total = windows * (context - 1)
    return {
        "context": context,
        "windows": windows,
        "tokens": total,
        "loss": sums.sum().item() / total,
        "buckets": out,
    }


def distance_gap(curve: dict, reference: dict, far_from: int = 256) -> dict:
    """Loss by distance of `curve` minus that of `reference` (both from `loss_by_distance` with the same buckets, on
    the same stream): per bucket, and token-weighted over the `near` buckets (starting at or before `far_from`) and
    the `far` ones (starting past it). A recency-biased student's gap to its teacher grows from near to far."""
    if curve["context"] != reference["context"] or list(curve["buckets"]) != list(reference["buckets"]):
        raise ValueError("the two curves have different contexts or buckets")
    per_bucket, sides = {}, {"near": [0.0, 0], "far": [0.0, 0]}
    for label, b in curve["buckets"].items():
        gap = b["loss"] - reference["buckets"][label]["loss"]
        per_bucket[label] = gap
        side = sides["far" if b["lo"] > far_from else "near"]
        side[0] += gap * b["tokens"]
        side[1] += b["tokens"]
    return {
        "per_bucket": per_bucket,
        **{name: (s / n if n else None) for name, (s, n) in sides.items()},
        "far_from": far_from,
    }
