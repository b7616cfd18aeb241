"""End-to-end speed and memory on SmolLM2: the teacher vs half of its layers run as DSLA (DESIGN §5).

- Single-request prefill at 8k tokens. The bound is Amdahl's from measured parts: the teacher's prefill time, minus
  the measured time of the converted layers' softmax attention modules, plus the measured time of their DSLA modules
  on the same inputs. We report the fraction of that bound reached (bound time / measured time).
- Batched decode (batch 8, 4k context). Decoding is memory-bound, so the bound is the ratio of bytes read per step:
  weights (read once for the batch) plus every request's cache (keys and values, or DSLA states). Caches are filled
  with random values of the right shapes (speed does not depend on them), so no 4k prefill is needed.

    python benchmarks/bench_e2e.py            # writes benchmarks/results/e2e.json and prints a Markdown table
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from dsla_hf import DSLACache, convert_llama_to_dsla, load_teacher


def timed(fn, repeats: int = 1) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def module_times(model, ids: torch.Tensor, layers: list[int]) -> dict[int, float]:
    """Wall time of each listed layer's attention module (whichever kind runs) during one forward."""
    starts: dict[int, float] = {}
    times: dict[int, float] = {}
    hooks = []
    for i in layers:
        block = model.model.layers[i]
        module = block.linear_attn if block.layer_type == "linear_attention" else block.self_attn

        def start(module, args, i=i):
            starts[i] = time.perf_counter()

        def stop(module, args, out, i=i):
            times[i] = time.perf_counter() - starts[i]

        hooks += [module.register_forward_pre_hook(start), module.register_forward_hook(stop)]
    with torch.no_grad():
        model(ids, use_cache=False, logits_to_keep=1)
    for h in hooks:
        h.remove()
    return times


def prefill(model, length: int, converted: list[int], repeats: int) -> dict:
    ids = torch.randint(100, 40000, (1, length))
    run = lambda: model(ids, use_cache=False, logits_to_keep=1)
    with torch.no_grad():
        model.set_dsla_layers([])
        run()  # warm-up
        teacher_s = timed(run, repeats)
        softmax_parts = module_times(model, ids, converted)
        model.set_dsla_layers(converted)
        run()
        dsla_s = timed(run, repeats)
        dsla_parts = module_times(model, ids, converted)
    model.set_dsla_layers([])
    attention_share = sum(module_times(model, ids, list(range(model.config.num_hidden_layers))).values()) / teacher_s
    bound_s = teacher_s - sum(softmax_parts.values()) + sum(dsla_parts.values())
    return {
        "tokens": length,
        "teacher_s": teacher_s,
        "dsla_s": dsla_s,
        "speedup": teacher_s / dsla_s,
        "attention_share_teacher": attention_share,
        "converted_softmax_share": sum(softmax_parts.values()) / teacher_s,
        "bound_s": bound_s,
        "bound_speedup": teacher_s / bound_s,
        "fraction_of_bound": bound_s / dsla_s,
        "amdahl_limit_if_free": teacher_s / (teacher_s - sum(softmax_parts.values())),
    }


def synthetic_cache(model, batch: int, context: int) -> DSLACache:
    """A cache as after `context` tokens of every request, with random contents of the right shapes."""
    cfg = model.config
    cache = DSLACache(cfg)
    kv_shape = (batch, cfg.num_key_value_heads, context, cfg.head_dim)
    for i, layer in enumerate(cache.layers):
        block = model.model.layers[i]
        if block.layer_type == "linear_attention":
            attn = block.linear_attn
            layer.set_state(attn.empty_state(batch, torch.device("cpu")).normal_().mul_(0.01), context)
            if attn.window:
                window = attn.empty_window(batch, torch.zeros(1))
                layer.window = (window[0].normal_(), window[1].normal_(), window[2].fill_(1))
        else:
            keys, values = torch.randn(kv_shape), torch.randn(kv_shape)
            layer.lazy_initialization(keys, values)
            layer.keys, layer.values = keys, values
            layer.seen_tokens = context
    cache.position_ids = torch.arange(context).expand(batch, -1)
    return cache


def decode(model, batch: int, context: int, converted: list[int], steps: int) -> dict:
    weights = sum(p.numel() * p.element_size() for p in model.parameters() if p.dim() > 0)
    # Parameters that a step reads: every weight except DSLA weights of layers that run as softmax, and vice versa.
    results = {}
    for label, active in (("teacher", []), ("dsla", converted)):
        model.set_dsla_layers(active)
        cache = synthetic_cache(model, batch, context)
        token = torch.randint(100, 40000, (batch, 1))
        with torch.no_grad():
            model(token, cache=cache)  # warm-up step
            start = time.perf_counter()
            for _ in range(steps):
                model(token, cache=cache)
            seconds = (time.perf_counter() - start) / steps
        results[label] = {"step_s": seconds, "cache_bytes": cache.memory_bytes}
    model.set_dsla_layers([])
    teacher, dsla = results["teacher"], results["dsla"]
    bytes_teacher = weights + teacher["cache_bytes"]
    bytes_dsla = weights + dsla["cache_bytes"]
    bound = bytes_teacher / bytes_dsla
    speedup = teacher["step_s"] / dsla["step_s"]
    return {
        "batch": batch,
        "context": context,
        "teacher_step_s": teacher["step_s"],
        "dsla_step_s": dsla["step_s"],
        "speedup": speedup,
        "weights_bytes": weights,
        "teacher_cache_bytes": teacher["cache_bytes"],
        "dsla_cache_bytes": dsla["cache_bytes"],
        "cache_memory_ratio": dsla["cache_bytes"] / teacher["cache_bytes"],
        "bytes_bound_speedup": bound,
        "fraction_of_bound": speedup / bound,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prefill-tokens", type=int, default=8192)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--context", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--window", type=int, default=None, help="dsla_window of the converted layers (preset's)")
    parser.add_argument("--out", default="benchmarks/results/e2e.json")
    args = parser.parse_args()
    torch.set_num_threads(2)
    torch.manual_seed(0)
    teacher, _ = load_teacher()
    n = teacher.config.num_hidden_layers
    converted = list(range(n // 2, n))  # half the layers (which half does not change the speed)
    window = {} if args.window is None else {"dsla_window": args.window}
    model = convert_llama_to_dsla(teacher, layers=converted, active=[], **window).eval()
    result = {
        "setup": vars(args)
        | {"converted_layers": converted, "window": model.config.dsla_window, "threads": torch.get_num_threads()},
        "decode": decode(model, args.batch, args.context, converted, args.steps),
        "prefill": prefill(model, args.prefill_tokens, converted, args.repeats),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    p, d = result["prefill"], result["decode"]
    print("| measurement | teacher | half DSLA | speedup | bound | fraction of bound |")
    print("|---|---|---|---|---|---|")
    print(
        f"| prefill {p['tokens']} tokens (s) | {p['teacher_s']:.2f} | {p['dsla_s']:.2f} | {p['speedup']:.2f}x "
        f"| {p['bound_speedup']:.2f}x (Amdahl, measured parts; {p['amdahl_limit_if_free']:.2f}x if DSLA were free) "
        f"| {p['fraction_of_bound']:.0%} |"
    )
    print(
        f"| decode batch {d['batch']} @ {d['context']} (ms/step) | {1e3 * d['teacher_step_s']:.0f} "
        f"| {1e3 * d['dsla_step_s']:.0f} | {d['speedup']:.2f}x | {d['bytes_bound_speedup']:.2f}x (bytes read) "
        f"| {d['fraction_of_bound']:.0%} |"
    )
    print(
        f"| cache memory (MiB) | {d['teacher_cache_bytes'] / 2**20:.0f} | {d['dsla_cache_bytes'] / 2**20:.0f} "
        f"| {d['cache_memory_ratio']:.0%} of the teacher's | | |"
    )
    print(f"\nattention share of the teacher's prefill: {p['attention_share_teacher']:.0%}")


if __name__ == "__main__":
    main()
