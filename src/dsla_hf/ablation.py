"""`dsla ablate`: the single-state ablation of DESIGN §5 ("the dual-state layer beats a single-state GLA layer trained
the same way").

Trains, with one recipe, one budget and one seed, chains on the embedded SmolLM2 teacher: the default DSLA preset
(history + recency states, 64-token exact window) and the same preset with `dsla_num_states=1` (a single gated
linear-attention state, same window, same feature maps), its gate initialised either as the history state's
(half-life 4096 tokens, `gla`) or as the recency state's (32 tokens, `gla-fast`, the fast-forgetting GLA of the
paper's comparison). All use the conversion order of one ranking of the teacher, so the checkpoints differ only in
their states. Then `dsla eval` puts them side by side:

    dsla ablate --output outputs/ablation --variants dsla gla gla-fast
    dsla eval --model outputs/ablation/dsla --compare "GLA=outputs/ablation/gla" --ratios 0 0.25 0.5

The recipe is the demo's (`dsla demo` defaults: entropy ranking, layer-alone stages of 20 steps on 8 captured
512-token sequences, captured once from the teacher, no logit phase). `chain_recipe` is the one place that builds it;
when the demo exposes its recipe as an object, this is where it plugs in.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

# name -> DSLA options of the chain; everything else is the default preset (64-token window, Hedgehog features, ...)
VARIANTS = {
    "dsla": {"dsla_num_states": 2},
    # one state, initialised as the history state (half-life 4096 tokens): does the recency state add anything?
    "gla": {"dsla_num_states": 1},
    # one state initialised to forget as fast as the recency state (32 tokens): the GLA of the paper's comparison
    "gla-fast": {"dsla_num_states": 1, "dsla_history_half_life": 32.0},
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--output", default="outputs/ablation", help="folder for the chains (dsla/, gla/)")
    parser.add_argument(
        "--variants",
        nargs="+",
        default=["dsla", "gla"],
        choices=sorted(VARIANTS),
        help="chains to train: dsla (two states), gla (one state, history half-life), gla-fast (one state, recency "
        "half-life: the usual fast-forgetting GLA)",
    )
    parser.add_argument("--ratio", type=float, default=0.5, help="conversion ratio each chain reaches")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--capture-sequences", type=int, default=8)
    parser.add_argument("--layer-alone-steps", type=int, default=20)
    parser.add_argument("--eval-sequences", type=int, default=4)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--no-resume", action="store_true")


def chain_recipe(output_dir: str | Path, args: argparse.Namespace):
    """The demo's chain configuration (see `dsla_hf.demo.run`), for one output folder."""
    from .trainers.chain import ChainConfig

    return ChainConfig(
        output_dir=str(output_dir),
        target_ratio=args.ratio,
        layer_alone_steps=args.layer_alone_steps,
        capture_sequences=args.capture_sequences,
        capture="teacher",
        distill_steps=0,
        eval_batch=2,
        resume=not args.no_resume,
    )


def run(args: argparse.Namespace) -> int:
    from .convert import convert_llama_to_dsla
    from .data import build_datasets
    from .demo import heldout_ids_dataset
    from .ranking import rank_layers
    from .teacher import load_teacher
    from .trainers.chain import CHECKPOINT, run_chain

    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    teacher, tokenizer = load_teacher()
    for p in teacher.parameters():
        p.requires_grad_(False)
    train_ds, heldout_ds = build_datasets(tokenizer, args.seq_len, None, None, 64, args.eval_sequences)
    summary = {"recipe": {k: v for k, v in vars(args).items() if not k.startswith("_")}, "chains": {}}
    order = None
    for variant in args.variants:
        start = time.perf_counter()
        torch.manual_seed(0)
        student = convert_llama_to_dsla(teacher, layers="all", active=[], **VARIANTS[variant])
        for p in student.parameters():
            p.requires_grad_(False)
        if order is None:  # the ranking reads the teacher only: one order for every chain
            calib = torch.tensor(train_ds["input_ids"][:8])
            order = rank_layers(student, calib, "entropy", torch.tensor(heldout_ds["input_ids"][:2]))["order"]
            print(f"ranking (entropy, lowest first): {order}")
        student.config.conversion_order = order
        folder = out / variant
        chain = run_chain(
            student, train_ds, heldout_ids_dataset(heldout_ds, 2), chain_recipe(folder, args), tokenizer, None
        )
        summary["chains"][folder.name] = {
            "options": VARIANTS[variant],
            "checkpoint": str(folder / CHECKPOINT),
            "teacher_ppl": chain["teacher"]["ppl"],
            "final_ppl": chain["stages"][-1]["eval"]["ppl"] if chain["stages"] else None,
            "stages": len(chain["stages"]),
            "seconds": time.perf_counter() - start,
        }
        print(f"{folder.name}: {summary['chains'][folder.name]}")
        del student
    previous = json.loads((out / "ablation.json").read_text()) if (out / "ablation.json").is_file() else {}
    summary["chains"] = {**previous.get("chains", {}), **summary["chains"]}
    (out / "ablation.json").write_text(json.dumps(summary, indent=2))
    return 0
