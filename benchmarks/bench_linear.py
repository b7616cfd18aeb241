"""SmolLM2's dense projections on this CPU: MKL's float32 product (PyTorch's default, ``F.linear``) against oneDNN's
(``torch.ops.mkldnn._linear_pointwise``, what `dsla_hf.kernels.linear` runs where `onednn_preferred`), interleaved
in rounds, at 1 and 8 tokens (decoding) and 512 to 4096 (prefill). Each row says which library the rule picks here.

    python benchmarks/bench_linear.py              # writes benchmarks/results/linear.{json,md}
    python benchmarks/bench_linear.py --isa avx2   # both libraries on their AVX2 code: linear_avx2.{json,md}
"""

from __future__ import annotations

import argparse
import functools
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from machine import add_isa_argument, describe, machine, suffix, use_isa

# SmolLM2-135M: hidden 576, 9 query heads and 3 key-value heads of 64, MLP 1536, vocabulary 49152
SHAPES = {
    "q, o (576 -> 576)": (576, 576),
    "k, v (576 -> 192)": (192, 576),
    "gate, up (576 -> 1536)": (1536, 576),
    "down (1536 -> 576)": (576, 1536),
    "LM head (576 -> 49152)": (49152, 576),
}


def best_of(fn, rounds: list[float], calls: int) -> None:
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    rounds.append((time.perf_counter() - start) / calls)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, nargs="*", default=[1, 8, 512, 1024, 4096])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=None, help="JSON path (default benchmarks/results/linear[_ISA].json)")
    add_isa_argument(parser)
    args = parser.parse_args()
    use_isa(args.isa)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    from dsla_hf.kernels.dense import ONEDNN_MIN_MACS, WIDE_OUTPUTS, picks_onednn, projection_libraries

    onednn = torch.ops.mkldnn._linear_pointwise
    rows = []
    with torch.no_grad():
        for tokens in args.tokens:
            for name, (n_out, n_in) in SHAPES.items():
                x, weight = torch.randn(tokens, n_in), torch.randn(n_out, n_in)
                macs = tokens * n_out * n_in
                calls = max(1, int(2e8 // macs))  # ~0.1-1 s a round
                reference = F.linear(x, weight)
                error = (onednn(x, weight, None, "none", [], "") - reference).norm() / reference.norm()
                mkl, dnn = [], []
                runs = (
                    (functools.partial(F.linear, x, weight), mkl),
                    (functools.partial(onednn, x, weight, None, "none", [], ""), dnn),
                )
                for _ in range(args.rounds + 1):  # interleaved; the first round warms up
                    for fn, times in runs:
                        best_of(fn, times, calls)
                mkl_s, dnn_s = min(mkl[1:]), min(dnn[1:])
                rows.append(
                    {
                        "tokens": tokens,
                        "projection": name,
                        "mkl_ms": 1e3 * mkl_s,
                        "onednn_ms": 1e3 * dnn_s,
                        "onednn_speedup": mkl_s / dnn_s,
                        "gflops_mkl": 2 * macs / mkl_s / 1e9,
                        "gflops_onednn": 2 * macs / dnn_s / 1e9,
                        "relative_difference": error.item(),
                        "rule_picks": "oneDNN" if picks_onednn(macs, wide=n_out >= WIDE_OUTPUTS * n_in) else "MKL",
                    }
                )
                print(rows[-1])
    result = {"meta": machine(args.threads), "setup": vars(args), "rows": rows}
    chosen = {
        "onednn": f"oneDNN from {ONEDNN_MIN_MACS:,} multiply-adds, MKL below",
        "mkl, onednn for wide outputs": f"MKL, and oneDNN for outputs {WIDE_OUTPUTS}x their inputs or wider (an LM "
        f"head) from {ONEDNN_MIN_MACS:,} multiply-adds",
    }.get(projection_libraries(), "MKL")
    lines = [
        f"Ran on {describe(result['meta'])}. `dsla_hf.kernels.linear` picks {chosen} here.",
        "",
        "| tokens | projection | MKL (ms) | oneDNN (ms) | oneDNN speed-up | GFLOP/s MKL / oneDNN | rel. difference "
        "| picked |",
        "|---:|---|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['tokens']} | {r['projection']} | {r['mkl_ms']:.3f} | {r['onednn_ms']:.3f} | "
            f"{r['onednn_speedup']:.2f}x | {r['gflops_mkl']:.0f} / {r['gflops_onednn']:.0f} | "
            f"{r['relative_difference']:.1e} | {r['rule_picks']} |"
        )
    out = Path(args.out or f"benchmarks/results/linear{suffix(args.isa)}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
