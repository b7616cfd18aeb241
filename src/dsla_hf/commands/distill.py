"""`dsla distill`: chained layer-by-layer distillation of a model in ranking order (resumable).

The chain is `run_chain` (dsla_hf.trainers.chain) on the model's ranking and the data of the flags:

    dsla distill --ratio 0.5 --output dsla_chain/
    accelerate launch --num_processes 2 --cpu -m dsla_hf.commands.distill --ratio 0.5 --output dsla_chain/
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from pathlib import Path

import torch

from ..devices import add_device_arguments, device_and_dtype
from ..distributed import is_main_process
from ..trainers.chain import CHECKPOINT, ChainConfig, run_chain


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="smollm2", help="'smollm2' (embedded teacher) or a Llama / DSLA folder")
    parser.add_argument("--ranking", default="entropy", help="'entropy', 'measured', 'index' or a ranking JSON")
    parser.add_argument("--train", nargs="*", default=None, help="training text: corpus names, files or hub names")
    parser.add_argument("--heldout", default=None, help="held-out text (never one of the training manuals)")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--train-sequences", type=int, default=64)
    parser.add_argument("--eval-sequences", type=int, default=4)
    parser.add_argument("--ratio", type=float, default=0.5, help="target conversion ratio")
    parser.add_argument("--quality-floor", type=float, default=None, help="stop past this ppl ratio to the teacher")
    parser.add_argument("--layer-alone-steps", type=int, default=40)
    parser.add_argument("--distill-steps", type=int, default=8, help="TRL phase steps per stage (0: none)")
    parser.add_argument("--output", default="dsla_chain")
    parser.add_argument("--no-resume", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    add_device_arguments(parser, dtype_default=None)


def conversion_order(args: argparse.Namespace, student, train_ds, eval_ds) -> list[int]:
    """The order of `--ranking`: layer index, ranked by entropy or measured loss, or read from a ranking JSON."""
    from ..ranking import rank_layers

    if args.ranking == "index":
        return list(range(student.config.num_hidden_layers))
    if args.ranking in ("entropy", "measured"):
        calib = torch.tensor(train_ds["input_ids"][:8])
        return rank_layers(student, calib, args.ranking, torch.tensor(eval_ds["input_ids"]), progress=False)["order"]
    return json.loads(Path(args.ranking).read_text())["order"]


def chain_config(args: argparse.Namespace) -> ChainConfig:
    """The chain's config: every field with a flag of the same name from the flags, and the renamed ones."""
    flags = {f.name: getattr(args, f.name) for f in dataclasses.fields(ChainConfig) if hasattr(args, f.name)}
    return ChainConfig(
        **flags, output_dir=args.output, target_ratio=args.ratio, resume=not args.no_resume, progress=is_main_process()
    )


def run(args: argparse.Namespace) -> int:
    from ..data import build_datasets
    from ..loading import load_student

    torch.manual_seed(args.seed)
    student, tokenizer = load_student(args.model, device=device_and_dtype(args)[0])
    train_ds, eval_ds = build_datasets(
        tokenizer, args.seq_len, args.train, args.heldout, args.train_sequences, args.eval_sequences, args.seed
    )
    student.config.conversion_order = conversion_order(args, student, train_ds, eval_ds)
    state = run_chain(student, train_ds, eval_ds, chain_config(args), tokenizer)
    if is_main_process():
        print(f"teacher ppl {state['teacher']['ppl']:.3f}; stopped: {state['stopped']}")
        for s in state["stages"]:
            print(
                f"  stage {s['stage'] + 1}: layer {s['layer']:2d}  ppl {s['eval']['ppl']:.3f}  x{s['ppl_ratio']:.3f}"
            )
        print(f"checkpoint: {Path(args.output) / CHECKPOINT}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point for `accelerate launch -m dsla_hf.commands.distill ...` (sets up torch.distributed first)."""
    parser = argparse.ArgumentParser(prog="dsla-distill", description=__doc__.splitlines()[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from accelerate import PartialState

        PartialState()  # initialises torch.distributed (gloo on CPU)
    return run(args)


if __name__ == "__main__":
    raise SystemExit(main())
