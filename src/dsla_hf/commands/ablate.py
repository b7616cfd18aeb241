"""`dsla ablate`: the dual-state ablation grid (see :mod:`dsla_hf.evaluation.ablation`)."""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

import torch

from ..evaluation.ablation import (
    VARIANTS,
    WINDOWS,
    EvalSettings,
    check_grid_overrides,
    grid,
    parse_overrides,
    run_ablation,
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--output", default="outputs/ablation", help="folder of the cells' folders and the report")
    parser.add_argument(
        "--windows",
        type=int,
        nargs="+",
        default=list(WINDOWS),
        help="exact softmax windows of the DSLA layers: 0 (none, the paper's setting), 64 (the preset's)",
    )
    parser.add_argument(
        "--variants",
        nargs="+",
        default=list(VARIANTS),
        choices=list(VARIANTS),
        help="dsla (two states), gla (one state, history half-life), gla-fast (one state, recency half-life: the "
        "usual fast-forgetting GLA)",
    )
    parser.add_argument("--set", nargs="*", default=[], metavar="FIELD=VALUE", help="override recipe fields")
    e = EvalSettings()
    parser.add_argument("--ratios", type=float, nargs="+", default=list(e.ratios), help="ratios evaluated per chain")
    parser.add_argument(
        "--long-context", type=int, default=e.long_context, help="context of the long perplexity and recency bias"
    )
    parser.add_argument("--long-tokens", type=int, default=e.long_tokens, help="tokens of the held-out stream")
    parser.add_argument("--passkey-lengths", type=int, nargs="*", default=list(e.passkey_lengths))
    parser.add_argument("--passkey-depths", type=float, nargs="*", default=list(e.passkey_depths))
    parser.add_argument("--passkey-trials", type=int, default=e.passkey_trials, help="keys per length and depth")
    parser.add_argument(
        "--distance-edges",
        type=int,
        nargs="*",
        default=list(e.distance_edges),
        help="upper ends of the loss-by-distance buckets (the last bucket runs to the context)",
    )
    parser.add_argument(
        "--far-from", type=int, default=e.far_from, help="buckets starting past this distance count as far"
    )
    parser.add_argument("--no-eval", action="store_true", help="train only")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--no-resume", action="store_true", help="retrain every chain and redo every evaluation")


def settings_from_args(args: argparse.Namespace) -> EvalSettings:
    return EvalSettings(
        ratios=tuple(args.ratios),
        long_context=args.long_context,
        long_tokens=args.long_tokens,
        passkey_lengths=tuple(args.passkey_lengths),
        passkey_depths=tuple(args.passkey_depths),
        passkey_trials=args.passkey_trials,
        distance_edges=tuple(args.distance_edges),
        far_from=args.far_from,
    )


def run(args: argparse.Namespace) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    overrides = parse_overrides(args.set)
    check_grid_overrides(overrides)
    cells = grid(args.windows, args.variants)
    command = "dsla " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if sys.argv[1:2] == ["ablate"] else None
    run_ablation(
        Path(args.output),
        cells,
        overrides,
        settings=None if args.no_eval else settings_from_args(args),
        resume=not args.no_resume,
        progress=not args.no_progress,
        command=command or "dsla ablate (called from Python)",
    )
    return 0
