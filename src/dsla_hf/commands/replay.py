"""`dsla replay`: replay an Azure 2023 LLM trace against a running server (`dsla_hf.serving.replay`) and print
vLLM's benchmark report as JSON (optionally also a file, a plot and the trace as vLLM's `timed_trace` JSONL).

    dsla replay --url http://127.0.0.1:8000 --trace conv --trace-dir ../shared/data/azure_llm_2023 \\
        --num-requests 100 --time-scale 0.5 --length-scale 0.25 --result out.json --plot out.png
"""

from __future__ import annotations

import argparse
import asyncio
import json
from pathlib import Path

from ..serving.replay import (
    PromptMaker,
    TraceRequest,
    load_trace,
    plot,
    replay,
    summarize,
    trace_path,
    write_timed_trace,
)

SLO_METRICS = ("ttft", "tpot", "e2el")
# Options of `add_trace_arguments` that `load_trace` takes under the same names.
TRACE_OPTIONS = ("start", "num_requests", "time_scale", "length_scale", "output_scale", "max_input", "max_output")


def parse_slo(values: list[str] | None) -> dict[str, float]:
    slo = {}
    for item in values or []:
        key, _, value = item.partition(":")
        if key not in SLO_METRICS or not value:
            raise ValueError(f"--goodput takes ttft:MS, tpot:MS or e2el:MS, got {item!r}")
        slo[key] = float(value)
    return slo


def load_tokenizer(spec: str):
    """The tokenizer that makes prompts of exact lengths: `toy`, `smollm2` (the teacher's) or a folder or hub id."""
    if spec == "toy":
        from ..serving.models import toy_tokenizer

        return toy_tokenizer()
    from transformers import AutoTokenizer

    if spec in ("smollm2", ""):
        from ..teacher import teacher_folder

        spec = str(teacher_folder())
    return AutoTokenizer.from_pretrained(spec)


def add_trace_arguments(
    parser: argparse.ArgumentParser,
    num_requests: int = 100,
    output_scale: float | None = None,
    max_input: int | None = None,
) -> None:
    """The options that pick and scale the trace rows (also benchmarks/bench_serve.py's, with its own defaults)."""
    parser.add_argument("--trace", default="conv", help="'conv', 'code' or a CSV path")
    parser.add_argument("--trace-dir", default=None, help="folder of the Azure 2023 CSVs (or $DSLA_TRACE_DIR)")
    parser.add_argument("--start", type=int, default=0, help="first trace row")
    parser.add_argument("--num-requests", type=int, default=num_requests)
    parser.add_argument("--time-scale", type=float, default=1.0, help="multiplies send times (< 1: more load)")
    parser.add_argument("--length-scale", type=float, default=1.0, help="multiplies prompt and output lengths")
    parser.add_argument("--output-scale", type=float, default=output_scale, help="multiplies output lengths instead")
    parser.add_argument("--max-input", type=int, default=max_input)
    parser.add_argument("--max-output", type=int, default=None)


def trace_requests(args: argparse.Namespace) -> list[TraceRequest]:
    """The requests of the trace rows that the options of `add_trace_arguments` pick."""
    return load_trace(trace_path(args.trace, args.trace_dir), **{name: getattr(args, name) for name in TRACE_OPTIONS})


def trace_info(args: argparse.Namespace, requests: list[TraceRequest]) -> dict:
    """What a report says about the trace it replayed."""
    return {
        "file": trace_path(args.trace, args.trace_dir).name,
        "start": args.start,
        "num_requests": len(requests),
        "time_scale": args.time_scale,
        "length_scale": args.length_scale,
    }


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--model-name", default=None, help="the served model name (default: ask /v1/models)")
    parser.add_argument("--tokenizer", default="smollm2", help="tokenizer for exact prompt lengths (as --model)")
    add_trace_arguments(parser)
    parser.add_argument("--goodput", nargs="*", default=None, help="SLOs, e.g. ttft:2000 tpot:200 e2el:20000 (ms)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--result", default=None, help="write the summary JSON here")
    parser.add_argument("--plot", default=None, help="write a PNG here")
    parser.add_argument("--save-timed-trace", default=None, help="write vLLM's timed_trace JSONL here")
    parser.add_argument("--dry-run", action="store_true", help="only load (and save) the trace")


def run(args: argparse.Namespace) -> int:
    requests = trace_requests(args)
    if args.save_timed_trace:
        write_timed_trace(requests, args.save_timed_trace)
    if args.dry_run:
        print(json.dumps({"requests": len(requests), "span_s": requests[-1].timestamp if requests else 0}))
        return 0
    maker = PromptMaker(load_tokenizer(args.tokenizer), seed=args.seed)
    results, samples, duration = asyncio.run(replay(args.url.rstrip("/"), requests, maker, args.model_name))
    summary = summarize(results, duration, parse_slo(args.goodput))
    summary["trace"] = trace_info(args, requests)
    text = json.dumps(summary, indent=2)
    print(text)
    if args.result:
        Path(args.result).write_text(text + "\n")
    if args.plot:
        plot(results, samples, args.plot, title=f"replay of {summary['trace']['file']}")
    return 0 if summary["failed"] == 0 else 1
