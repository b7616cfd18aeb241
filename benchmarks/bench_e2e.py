"""End-to-end speed and memory on SmolLM2: the teacher vs half of its layers run as DSLA (default preset).

- Single-request prefill at 1k, 4k, 8k and 16k tokens, teacher and DSLA interleaved. At the bound lengths (1k and
  8k) the bound is Amdahl's from measured parts: the teacher's prefill time, minus the measured time of the
  converted layers' softmax attention modules, plus the measured time of their DSLA modules on the same inputs. We
  report the fraction of that bound reached (bound time / measured time).
- Decode steps at batch 1 (1k, 4k, 16k of context) and batch 8 (4k). A step reads every weight once for the batch
  plus every request's cache (keys and values, or DSLA states and windows); the bytes-read ratio is the bound of a
  memory-bound step (at batch 1 the 540 MB of weights dominate). Caches are filled with random values of the right
  shapes (speed does not depend on them), so no long prefill is needed.

    python benchmarks/bench_e2e.py              # writes benchmarks/results/e2e.{json,md}
    python benchmarks/bench_e2e.py --isa avx2   # the AVX2 code paths: e2e_avx2.{json,md}
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch
from machine import add_isa_argument, describe, machine, suffix, use_isa

from dsla_hf import DSLACache, convert_llama_to_dsla, load_teacher
from dsla_hf.devices import add_device_arguments, device_and_dtype, synchronize


def timed(fn, device: torch.device, repeats: int = 1) -> float:
    best = float("inf")
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
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


def prefill(model, length: int, converted: list[int], repeats: int, bound: bool) -> dict:
    ids = torch.randint(100, 40000, (1, length), device=model.device)
    run = lambda: model(ids, use_cache=False, logits_to_keep=1)
    times = {"teacher": float("inf"), "dsla": float("inf")}
    with torch.no_grad():
        for _ in range(repeats):  # interleaved: the machine's slow phases fall on both
            for label, active in (("teacher", []), ("dsla", converted)):
                model.set_dsla_layers(active)
                times[label] = min(times[label], timed(run, model.device))
        row = {"tokens": length, "teacher_s": times["teacher"], "dsla_s": times["dsla"],
               "speedup": times["teacher"] / times["dsla"]}  # fmt: skip
        if bound:
            model.set_dsla_layers([])
            softmax_parts = module_times(model, ids, converted)
            everything = module_times(model, ids, list(range(model.config.num_hidden_layers)))
            model.set_dsla_layers(converted)
            dsla_parts = module_times(model, ids, converted)
            bound_s = times["teacher"] - sum(softmax_parts.values()) + sum(dsla_parts.values())
            row |= {
                "attention_share_teacher": sum(everything.values()) / times["teacher"],
                "converted_softmax_share": sum(softmax_parts.values()) / times["teacher"],
                "bound_s": bound_s,
                "bound_speedup": times["teacher"] / bound_s,
                "fraction_of_bound": bound_s / times["dsla"],
                "amdahl_limit_if_free": times["teacher"] / (times["teacher"] - sum(softmax_parts.values())),
            }
    model.set_dsla_layers([])
    return row


def synthetic_cache(model, batch: int, context: int) -> DSLACache:
    """A cache as after `context` tokens of every request, with random contents of the right shapes."""
    cfg = model.config
    cache = DSLACache(cfg)
    kv_shape = (batch, cfg.num_key_value_heads, context, cfg.head_dim)
    device, dtype = model.device, model.dtype
    for i, layer in enumerate(cache.layers):
        block = model.model.layers[i]
        if block.layer_type == "linear_attention":
            attn = block.linear_attn
            layer.set_state(attn.empty_state(batch, device).normal_().mul_(0.01), context)
            if attn.window:
                window = attn.empty_window(batch, torch.zeros(1, device=device, dtype=dtype))
                layer.window = (window[0].normal_(), window[1].normal_(), window[2].fill_(1))
        else:
            keys, values = (torch.randn(kv_shape, device=device, dtype=dtype) for _ in range(2))
            layer.lazy_initialization(keys, values)
            layer.keys, layer.values = keys, values
            layer.seen_tokens = context
    cache.position_ids = torch.arange(context, device=device).expand(batch, -1)
    return cache


def decode(model, batch: int, context: int, converted: list[int], steps: int, repeats: int) -> dict:
    weights = sum(p.numel() * p.element_size() for p in model.parameters() if p.dim() > 0)
    # Parameters that a step reads: every weight except DSLA weights of layers that run as softmax, and vice versa.
    setups = {}
    for label, active in (("teacher", []), ("dsla", converted)):
        model.set_dsla_layers(active)
        setups[label] = (active, synthetic_cache(model, batch, context))
    token = torch.randint(100, 40000, (batch, 1), device=model.device)
    results = {
        label: {"step_s": float("inf"), "cache_bytes": cache.memory_bytes} for label, (_, cache) in setups.items()
    }
    with torch.no_grad():
        for r in range(repeats + 1):  # interleaved rounds; the first is a warm-up
            for label, (active, cache) in setups.items():
                model.set_dsla_layers(active)
                synchronize(model.device)
                start = time.perf_counter()
                for _ in range(steps):
                    model(token, cache=cache)
                synchronize(model.device)
                if r:
                    results[label]["step_s"] = min(results[label]["step_s"], (time.perf_counter() - start) / steps)
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


def markdown(result: dict) -> str:
    lines = [f"Ran on {describe(result['meta'])}.", ""]
    lines += ["| measurement | teacher | half DSLA | speedup | bound | fraction of bound |", "|" + "---|" * 6]
    for p in result["prefill"]:
        bound, fraction = "", ""
        if "bound_s" in p:
            bound = f"{p['bound_speedup']:.2f}x (Amdahl; {p['amdahl_limit_if_free']:.2f}x if DSLA were free)"
            fraction = f"{p['fraction_of_bound']:.0%}"
        lines.append(f"| prefill {p['tokens']} tokens (s) | {p['teacher_s']:.2f} | {p['dsla_s']:.2f} | "
                     f"{p['speedup']:.2f}x | {bound} | {fraction} |")  # fmt: skip
    for d in result["decode"]:
        lines.append(f"| decode batch {d['batch']} @ {d['context']} (ms/step) | {1e3 * d['teacher_step_s']:.1f} | "
                     f"{1e3 * d['dsla_step_s']:.1f} | {d['speedup']:.2f}x | {d['bytes_bound_speedup']:.2f}x (bytes "
                     f"read) | {d['fraction_of_bound']:.0%} |")  # fmt: skip
    for d in result["decode"]:
        mib = d["teacher_cache_bytes"] / 2**20, d["dsla_cache_bytes"] / 2**20
        lines.append(f"| cache memory, batch {d['batch']} @ {d['context']} (MiB) | {mib[0]:.0f} | {mib[1]:.0f} | "
                     f"{d['cache_memory_ratio']:.1%} of the teacher's | | |")  # fmt: skip
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prefill-tokens", type=int, nargs="*", default=[1024, 4096, 8192, 16384])
    parser.add_argument("--bound-tokens", type=int, nargs="*", default=[1024, 8192], help="prefills with a bound")
    parser.add_argument("--decode", nargs="*", default=["1x1024", "1x4096", "1x16384", "8x4096"],
                        help="decode setups, BATCHxCONTEXT")  # fmt: skip
    parser.add_argument("--steps", type=int, default=16, help="decode steps per round")
    parser.add_argument("--repeats", type=int, default=2, help="prefill rounds after a warm-up")
    parser.add_argument("--decode-repeats", type=int, default=8,
                        help="decode rounds after a warm-up (a shared VM moves ~40 ms steps by 10-30 %%)")  # fmt: skip
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--window", type=int, default=None, help="dsla_window of the converted layers (preset's)")
    parser.add_argument("--out", default=None, help="JSON path (default benchmarks/results/e2e[_ISA].json)")
    add_isa_argument(parser)
    add_device_arguments(parser, dtype_default="float32")
    args = parser.parse_args()
    use_isa(args.isa)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device, dtype = device_and_dtype(args)
    teacher, _ = load_teacher(dtype=dtype)
    teacher = teacher.to(device)
    n = teacher.config.num_hidden_layers
    converted = list(range(n // 2, n))  # half the layers (which half does not change the speed)
    window = {} if args.window is None else {"dsla_window": args.window}
    model = convert_llama_to_dsla(teacher, layers=converted, active=[], **window).eval()
    result = {
        "meta": machine(args.threads, device),
        "setup": vars(args)
        | {
            "device": str(device),
            "dtype": str(dtype).removeprefix("torch."),
            "converted_layers": converted,
            "window": model.config.dsla_window,
        },
        "decode": [],
        "prefill": [],
    }
    for setup in args.decode:
        batch, context = (int(x) for x in setup.split("x"))
        result["decode"].append(decode(model, batch, context, converted, args.steps, args.decode_repeats))
        print(result["decode"][-1])
    for length in args.prefill_tokens:
        result["prefill"].append(prefill(model, length, converted, args.repeats, length in args.bound_tokens))
        print(result["prefill"][-1])
    result["meta"]["load_average"] = os.getloadavg()
    out = Path(args.out or f"benchmarks/results/e2e{suffix(args.isa)}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    table = markdown(result)
    out.with_suffix(".md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
