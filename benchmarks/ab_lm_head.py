"""Interleaved A/B of the projection rule for wide outputs: SmolLM2's whole-model decode step at 1k tokens of
context, with its LM head on oneDNN (the rule on AVX2 CPUs not made by Intel) and on MKL, for the teacher (the
DSLA model with no DSLA layer) and half DSLA (layers 15-29). Each round prefills once per setup and times 16 steps;
the setups alternate within each round.

    python benchmarks/ab_lm_head.py --out benchmarks/results/amd_epyc_zen3/lm_head_ab.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from machine import describe, machine

from dsla_hf import convert_llama_to_dsla, load_teacher
from dsla_hf.commands.demo import generation_stats
from dsla_hf.kernels import dense


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--context", type=int, default=1024)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    teacher, _ = load_teacher()
    model = convert_llama_to_dsla(teacher, layers=list(range(15, 30))).eval()
    ids = torch.randint(100, 20000, (1, args.context), generator=torch.Generator().manual_seed(0))
    rule = dense.WIDE_OUTPUTS
    setups = [(name, layers, library) for name, layers in (("teacher", []), ("half DSLA", list(range(15, 30))))
              for library in ("oneDNN", "MKL")]  # fmt: skip
    times: dict[str, list[float]] = {}
    try:
        with torch.no_grad():
            for _ in range(args.rounds):
                for name, layers, library in setups:
                    dense.WIDE_OUTPUTS = rule if library == "oneDNN" else 1 << 30  # MKL: no output is that wide
                    model.set_dsla_layers(layers)
                    step_s = generation_stats(model, ids, args.steps + 1)["decode_ms_per_token"] / 1e3  # the median
                    times.setdefault(f"{name}, LM head by {library}", []).append(step_s)
    finally:
        dense.WIDE_OUTPUTS = rule
    meta = machine(args.threads)
    rows = {k: {"median_step_ms_per_round": [1e3 * t for t in v], "best_round_ms": 1e3 * min(v)}
            for k, v in times.items()}  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    setup = {**vars(args), "out": str(args.out)}
    args.out.write_text(json.dumps({"meta": meta, "setup": setup, "rows": rows}, indent=1))
    print(f"Ran on {describe(meta)}")
    for k, r in rows.items():
        rounds = [round(t, 1) for t in r["median_step_ms_per_round"]]
        print(f"{k}: best round {r['best_round_ms']:.1f} ms, rounds {rounds}")


if __name__ == "__main__":
    main()
