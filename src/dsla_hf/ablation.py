"""`dsla ablate`: the single-state ablation of DESIGN §5 ("the dual-state layer beats a single-state GLA layer trained
the same way").

Trains chains on the embedded SmolLM2 teacher with the demo's recipe (`dsla_hf.demo.DEMO_RECIPE`, run by
`dsla_hf.demo.train_chain`), one budget and one seed, differing only in their states: the default DSLA preset
(history + recency states, 64-token exact window) and the same preset with `dsla_num_states=1` (a single gated
linear-attention state, same window, same feature maps), its gate initialised either as the history state's
(half-life 4096 tokens, `gla`) or as the recency state's (32 tokens, `gla-fast`, the fast-forgetting GLA of the
paper's comparison). All use the conversion order of one ranking of the teacher. Then `dsla eval` puts them side by
side:

    dsla ablate --output outputs/ablation --variants dsla gla
    dsla eval --model outputs/ablation/dsla --compare "GLA=outputs/ablation/gla" --ratios 0 0.25 0.5

`--set field=value` overrides a field of the recipe (e.g. `--set layer_alone_steps=20`), for every variant.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import torch

# name -> changes to the demo recipe
VARIANTS = {
    "dsla": {"num_states": 2},
    # one state, initialised as the history state (half-life 4096 tokens): does the recency state add anything?
    "gla": {"num_states": 1},
    # one state initialised to forget as fast as the recency state (32 tokens): the GLA of the paper's comparison
    "gla-fast": {"num_states": 1, "history_half_life": 32.0},
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--output", default="outputs/ablation", help="folder for the chains (one per variant)")
    parser.add_argument(
        "--variants",
        nargs="+",
        default=["dsla", "gla"],
        choices=sorted(VARIANTS),
        help="chains to train: dsla (two states), gla (one state, history half-life), gla-fast (one state, recency "
        "half-life: the usual fast-forgetting GLA)",
    )
    parser.add_argument("--set", nargs="*", default=[], metavar="FIELD=VALUE", help="override recipe fields")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--no-resume", action="store_true")


def ablation_recipe(variant: str, overrides: dict | None = None):
    """The demo recipe with the variant's changes (and `overrides`)."""
    from .demo import DEMO_RECIPE

    return DEMO_RECIPE.replace(**{**(overrides or {}), **VARIANTS[variant]})


def parse_overrides(items: list[str]) -> dict:
    from .demo import DemoRecipe

    fields = {f.name: f for f in dataclasses.fields(DemoRecipe)}
    out = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or name not in fields:
            raise SystemExit(f"--set takes FIELD=VALUE with FIELD one of {sorted(fields)}, got {item!r}")
        default = getattr(DemoRecipe(), name)
        kind = float if default is None else type(default)  # the one optional field, history_half_life, is a float
        out[name] = kind(value) if kind in (int, float) else value
    return out


def run(args: argparse.Namespace) -> int:
    from .demo import train_chain
    from .teacher import load_teacher
    from .trainers.chain import CHECKPOINT

    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    overrides = parse_overrides(args.set)
    teacher, tokenizer = load_teacher()
    for p in teacher.parameters():
        p.requires_grad_(False)
    summary = {"overrides": overrides, "chains": {}}
    order = None
    for variant in args.variants:
        start = time.perf_counter()
        recipe = ablation_recipe(variant, overrides)
        folder = out / variant
        # one ranking (of the teacher: it does not depend on the variant) for every chain
        result = train_chain(recipe, folder, teacher, tokenizer, order=order, resume=not args.no_resume)
        order = result["order"]
        chain = result["chain"]
        summary["chains"][variant] = {
            "recipe": dataclasses.asdict(recipe),
            "checkpoint": str(folder / CHECKPOINT),
            "order": order,
            "teacher_ppl": chain["teacher"]["ppl"],
            "final_ppl": chain["stages"][-1]["eval"]["ppl"] if chain["stages"] else None,
            "stages": len(chain["stages"]),
            "seconds": time.perf_counter() - start,
        }
        print(f"{variant}: {summary['chains'][variant]}")
        del result
    file = out / "ablation.json"
    previous = json.loads(file.read_text()) if file.is_file() else {}
    summary["chains"] = {**previous.get("chains", {}), **summary["chains"]}
    file.write_text(json.dumps(summary, indent=2))
    return 0
