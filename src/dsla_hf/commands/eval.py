"""`dsla eval`: the evaluation suite (see :mod:`dsla_hf.evaluation.suite`) on any model and ratios."""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import torch

from ..devices import add_device_arguments, device_and_dtype
from ..evaluation.suite import RULER_TASKS, evaluate_variants, heldout_stream, load_model, model_variants, render


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model", default="smollm2", help="'smollm2', a DSLA/Llama folder (or chain output), a hub id"
    )
    parser.add_argument("--tokenizer", default=None, help="tokenizer folder or id when the model has none")
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.0, 0.25, 0.5], help="conversion ratios")
    parser.add_argument("--label", default=None, help="name of the model's DSLA variants (default: DSLA or GLA)")
    parser.add_argument(
        "--compare",
        action="append",
        default=[],
        metavar="LABEL=PATH",
        help="another DSLA checkpoint, evaluated at the same non-zero ratios (repeatable)",
    )
    parser.add_argument("--out", default="eval_results", help="folder for results.json, report.md and plots")
    parser.add_argument("--heldout", default=None, help="held-out text source (default: the offline held-out corpus)")
    parser.add_argument("--ppl-lengths", type=int, nargs="*", default=[128, 512, 1024], help="context lengths")
    parser.add_argument("--ppl-tokens", type=int, default=2048, help="tokens of held-out stream scored per length")
    parser.add_argument("--ppl-stride", type=int, default=None, help="window stride (default: half the context)")
    parser.add_argument("--passkey-lengths", type=int, nargs="*", default=[256, 1024])
    parser.add_argument("--passkey-depths", type=float, nargs="*", default=[0.0, 0.5, 1.0])
    parser.add_argument("--passkey-trials", type=int, default=1, help="keys per length and depth")
    parser.add_argument("--ruler-tasks", nargs="*", default=list(RULER_TASKS), choices=RULER_TASKS)
    parser.add_argument("--ruler-lengths", type=int, nargs="*", default=[1024])
    parser.add_argument("--ruler-samples", type=int, default=1, help="samples per task and length")
    parser.add_argument("--ruler-new-tokens", type=int, default=None, help="generation budget (default per task)")
    parser.add_argument("--map-tokens", type=int, default=192, help="held-out tokens for the attention maps")
    parser.add_argument("--map-layers", type=int, nargs="*", default=None, help="layers drawn (default: three)")
    parser.add_argument("--benchmarks", default="benchmarks/results", help="benchmark results folder")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    add_device_arguments(parser, dtype_default="float32")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument(
        "--render-only",
        action="store_true",
        help="rewrite report.md and the plots from an existing results.json in --out (speed table re-read)",
    )


def run(args: argparse.Namespace) -> int:
    if args.render_only:
        return render(Path(args.out), args.benchmarks)
    if args.threads:
        torch.set_num_threads(args.threads)
    wall = time.perf_counter()
    progress = not args.no_progress
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)
    compares = []
    for spec in args.compare:
        label, sep, path = spec.partition("=")
        if not sep or not label or not path:
            raise SystemExit(f"--compare takes LABEL=PATH, got {spec!r}")
        compares.append((label, path))

    device, dtype = device_and_dtype(args)
    model, tokenizer, trained = load_model(args.model, args.tokenizer, dtype, device)
    longest = max([*args.ppl_lengths, *args.passkey_lengths, *args.ruler_lengths, args.map_tokens, 1])
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit and longest > limit:
        print(f"note: {longest} tokens exceed the model's max_position_embeddings ({limit})")
    stream, essay, source = heldout_stream(tokenizer, args.heldout, max(args.ppl_tokens, args.map_tokens), args.seed)
    results: dict = {
        "model": args.model,
        "heldout": source,
        "settings": {k: v for k, v in vars(args).items() if not k.startswith("_")},
        "models": {},
        "skipped": [],
        "attention": {},
    }
    variants, skipped = model_variants(model, args.ratios, trained, args.label)
    results["skipped"] += [{"model": args.model, "ratio": r, "why": why} for r, why in skipped]
    evaluate_variants(results, model, tokenizer, variants, args, stream, essay, out, "main", progress)
    del model
    for label, path in compares:
        other, other_tok, other_trained = load_model(path, args.tokenizer, dtype, device)
        variants, skipped = model_variants(other, args.ratios, other_trained, label, with_teacher=False)
        results["skipped"] += [{"model": path, "ratio": r, "why": why} for r, why in skipped]
        tag = label.lower().replace(" ", "_")
        evaluate_variants(results, other, other_tok, variants, args, stream, essay, out, tag, progress)
        del other

    results["wall_s"] = time.perf_counter() - wall
    results["command"] = (
        "dsla eval " + " ".join(shlex.quote(a) for a in sys.argv[2:])
        if sys.argv[1:2] == ["eval"]
        else "dsla eval (called from Python)"
    )
    (out / "results.json").write_text(json.dumps(results, indent=2, default=str))
    return render(out, args.benchmarks)
