"""Evaluation helpers: held-out perplexity and passkey retrieval (DESIGN §4). Grown by the evaluation issue."""

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
    device = next(model.parameters()).device
    per_length, samples = {}, []
    jobs = [(length, t) for length in lengths for t in range(trials)]
    keys = [rng.randint(10 ** (digits - 1), 10**digits - 1) for _ in jobs]
    hits = {length: 0 for length in lengths}
    for (length, t), key in tqdm(list(zip(jobs, keys)), desc=desc, leave=False, disable=not progress):
        depth = (t + 0.5) / trials
        ids = tokenizer(passkey_prompt(tokenizer, length, key, depth), return_tensors="pt").input_ids.to(device)
        out = model.generate(ids, max_new_tokens=digits + 3, do_sample=False, pad_token_id=tokenizer.eos_token_id)
        answer = tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
        hit = str(key) in answer
        hits[length] += hit
        samples.append({"length": length, "tokens": ids.shape[1], "depth": depth, "key": key, "answer": answer})
    for length in lengths:
        per_length[length] = hits[length] / trials
    return {"accuracy": sum(hits.values()) / len(jobs), "per_length": per_length, "samples": samples}
