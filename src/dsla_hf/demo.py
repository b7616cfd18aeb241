"""`dsla demo`: the embedded SmolLM2 teacher, a quarter of its layers converted to DSLA, generation speed and cache
size against the teacher."""

from __future__ import annotations

import argparse
import time

import torch


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ratio", type=float, default=0.25, help="fraction of layers run as DSLA")
    parser.add_argument("--prompt-tokens", type=int, default=1024, help="length of the prompt (CPython docs)")
    parser.add_argument("--new-tokens", type=int, default=32)


def generation_stats(model, input_ids: torch.Tensor, new_tokens: int) -> dict:
    from .cache_dsla import DSLACache

    cache = DSLACache(model.config)
    start = time.perf_counter()
    with torch.no_grad():
        out = model(input_ids, past_key_values=cache, use_cache=True)
        prefill = time.perf_counter() - start
        token = out.logits[:, -1:].argmax(-1)
        tokens = [token]
        start = time.perf_counter()
        for _ in range(new_tokens - 1):
            token = model(token, past_key_values=cache, use_cache=True).logits[:, -1:].argmax(-1)
            tokens.append(token)
        decode = time.perf_counter() - start
    return {
        "prefill_s": prefill,
        "decode_ms_per_token": 1000 * decode / max(1, new_tokens - 1),
        "cache_mib": cache.memory_bytes / 2**20,
        "tokens": torch.cat(tokens, 1),
    }


def run(args: argparse.Namespace) -> int:
    from .convert import convert_llama_to_dsla
    from .data import pydoc_text
    from .teacher import load_teacher

    torch.manual_seed(0)
    teacher, tokenizer = load_teacher()
    n = teacher.config.num_hidden_layers
    model = convert_llama_to_dsla(teacher, layers="all", active=[]).eval()
    ids = tokenizer(pydoc_text()[: 20 * args.prompt_tokens], return_tensors="pt").input_ids[:, : args.prompt_tokens]
    rows = []
    for label, ratio in (("teacher", 0.0), (f"DSLA {args.ratio:.0%} (untrained)", args.ratio)):
        layers = model.set_dsla_layers(ratio)
        stats = generation_stats(model, ids, args.new_tokens)
        rows.append((label, len(layers), stats))
        text = tokenizer.decode(stats["tokens"][0])
        print(f"\n[{label}: {len(layers)}/{n} DSLA layers] ...{text!r}")
    print(f"\nprompt: {ids.shape[1]} tokens of CPython docs, {args.new_tokens} greedy tokens\n")
    print("| model | DSLA layers | prefill (s) | decode (ms/token) | cache (MiB) |")
    print("|---|---|---|---|---|")
    for label, count, s in rows:
        print(f"| {label} | {count} | {s['prefill_s']:.2f} | {s['decode_ms_per_token']:.1f} | {s['cache_mib']:.1f} |")
    return 0
