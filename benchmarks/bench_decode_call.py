"""Where the time of one fused decoding call goes, at SmolLM2's layer shapes (9 query heads on 3 KV heads, 64-wide
heads, 64 Hedgehog features a sign, two states, a 64-token window), batch 1, on the C++ kernel:

- ``step``: :func:`fused_decode_dsla` as a layer calls it (inputs checked, the kernel's wrapper, the kernel);
- ``checks``: its input checks alone (:func:`check_step`);
- ``wrapper``: :func:`cpp_decode_dsla` (the C++ backend's Python side and the kernel);
- ``kernel``: the library's function alone, its arguments built beforehand; ``kernel, no window``: the same without
  the window (features, gates and both states only).

Interleaved rounds, medians; the states and the window move on at every call, as in decoding. Writes
``decode_call.{json,md}`` into ``--out``::

    python benchmarks/bench_decode_call.py --out benchmarks/results/amd_epyc_zen1
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from machine import machine

from dsla_hf.kernels.cpp_chunk import loaded
from dsla_hf.kernels.cpp_decode import cpp_decode_dsla, layer_address
from dsla_hf.kernels.decode import DecodeWeights, check_step, fused_decode_dsla

H, HK, D, F, S, W = 9, 3, 64, 64, 2, 64


def calls(calls_per_round: int) -> dict:
    """The functions to time, each running `calls_per_round` calls."""
    gen = torch.Generator().manual_seed(0)
    rnd = lambda *shape, scale=0.1: torch.randn(*shape, generator=gen) * scale  # noqa: E731
    weights = DecodeWeights(
        q_map=rnd(H, D, F), k_map=rnd(HK, D, F), gate_weight=rnd(S, HK, 2 * F, D), gate_bias=rnd(S, HK, 2 * F) + 3,
        tau=16.0, clamp=None, mix=torch.rand(H, S, generator=gen), scale=D**-0.5, window_log_scale=rnd(H),
        inv_freq=1.0 / 100000 ** (torch.arange(0, D, 2) / D), rope_scale=1.0,
    )  # fmt: skip
    q, k, v = rnd(1, H, D, scale=1.0), rnd(1, HK, D, scale=1.0), rnd(1, HK, D, scale=1.0)
    state = rnd(1, S, HK, 2 * F, D + 1).abs()
    window = (rnd(1, W, HK, D, scale=1.0), rnd(1, W, HK, D, scale=1.0), torch.ones(1, W))
    positions = torch.arange(4096, 4096 + W + 1)[None]
    lib, layer, out = loaded(), layer_address(weights), torch.empty(1, H, D)

    def kernel(width: int):
        ptrs = (window[0].data_ptr(), window[1].data_ptr(), window[2].data_ptr(), positions.data_ptr())
        args = (layer, q.data_ptr(), q.stride(0), k.data_ptr(), k.stride(0), v.data_ptr(), v.stride(0), None,
                state.data_ptr(), 1, width, *(ptrs if width else (None,) * 4), out.data_ptr(), 1)  # fmt: skip
        return lambda keep=(out, state, window, positions, weights): lib.dsla_decode_step(*args)  # operands held

    fns = {
        "step": lambda: fused_decode_dsla(q, k, v, state, weights, window, positions, backend="cpp"),
        "checks": lambda: check_step(q, k, v, state, weights, window, positions, None),
        "wrapper": lambda: cpp_decode_dsla(q, k, v, state, weights, window, positions),
        "kernel": kernel(W),
        "kernel, no window": kernel(0),
    }
    return {name: lambda fn=fn: [fn() for _ in range(calls_per_round)] for name, fn in fns.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--calls", type=int, default=300, help="calls per round")
    parser.add_argument("--out", type=Path, default=None, help="folder for decode_call.{json,md}")
    args = parser.parse_args()
    torch.set_num_threads(1)  # one sequence of 3 KV heads: the kernel runs one thread (see cpp_decode.cpp)
    fns = calls(args.calls)
    times = {name: [] for name in fns}
    for fn in fns.values():
        fn()  # warm-up
    for _ in range(args.rounds):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - start) / args.calls * 1e6)
    rows = {name: dict(median_us=sorted(t)[len(t) // 2], min_us=min(t)) for name, t in times.items()}
    meta = machine(threads=1)
    lines = [f"Ran on {meta['cpu']} ({meta['cpu_isa']}), 1 thread; C++ kernel on the {meta['dsla_kernel_isa']} path; "
             f"torch {meta['torch']}. One fused decoding call at SmolLM2's layer shapes, batch 1, {args.rounds} "
             f"interleaved rounds of {args.calls} calls.", "", "| part | median (µs) | best round (µs) |",
             "|---|---:|---:|"]  # fmt: skip
    lines += [f"| {name} | {r['median_us']:.1f} | {r['min_us']:.1f} |" for name, r in rows.items()]
    print("\n".join(lines))
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "decode_call.json").write_text(json.dumps(dict(meta=meta, rows=rows), indent=1) + "\n")
        (args.out / "decode_call.md").write_text("\n".join(lines) + "\n")
        print(f"wrote {args.out}/decode_call.json, decode_call.md")


if __name__ == "__main__":
    main()
