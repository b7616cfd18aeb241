"""Evaluation helpers (DESIGN §4): held-out perplexity (rows, or a long stream with a sliding window) and passkey
retrieval (per length, or over a length x depth grid). RULER's tasks are in `dsla_hf.ruler`, the `dsla eval`
report in `dsla_hf.eval_suite`."""

from __future__ import annotations

import math
import random

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm


def _dist():
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return dist
    return None


@torch.no_grad()
def perplexity(model, input_ids: torch.Tensor, batch_size: int = 2, progress: bool = False, desc: str = "ppl") -> dict:
    """Next-token loss and perplexity of `model` on rows of `input_ids` (no padding). Under `torch.distributed`,
    rows are shared out between processes and the sums reduced, so every process gets the same answer."""
    dist = _dist()
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
