"""DSLA-Serve end to end: replay an Azure 2023 trace against the server on SmolLM2, three ways, in one run:
the teacher (no DSLA layer), a static 50 % DSLA model, and the adaptive policy. Reports the mean latency per output
token (e2e latency / output tokens, the paper's metric: 93.6 ms -> 40.8 ms, 2.29x) and vLLM's benchmark fields,
with a quality proxy at the ratios used (held-out perplexity and top-1 agreement with the teacher, teacher-forced).

    python benchmarks/bench_serve.py --trace-dir ../shared/data/azure_llm_2023 [--model DIR] [--num-requests 60]

Lengths and rates can be scaled so that a replay finishes in minutes on 2 CPU cores; when prompts are shrunk, the
adaptive policy's prompt-length caps shrink by the same factor (the policy sees the trace as it was), when they are
stretched the caps stay on real token counts (`--policy-length-scale` overrides).
Results: benchmarks/results/serve.json, serve.png, serve.md.
Trace data: Azure LLM inference trace 2023, CC BY 4.0 (Patel et al., Splitwise, ISCA 2024); read in place.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import time
from pathlib import Path

import torch
from machine import describe, machine

from dsla_hf.commands.replay import add_trace_arguments, trace_info, trace_requests
from dsla_hf.devices import add_device_arguments, device_and_dtype
from dsla_hf.serving.engine import Engine, EngineConfig
from dsla_hf.serving.metrics import Metrics
from dsla_hf.serving.models import load_model
from dsla_hf.serving.policy import AdaptivePolicy, StaticPolicy, ratio_to_layers
from dsla_hf.serving.replay import PromptMaker, plot, plot_gauges, replay, summarize
from dsla_hf.serving.server import ServerThread, build_app


def quality(model, tokenizer, ratios, windows=8, length=512, seed=1):
    """Held-out perplexity and teacher-forced top-1 agreement with the teacher, per conversion ratio."""
    from dsla_hf.data import pydoc_text

    ids = tokenizer(pydoc_text(), add_special_tokens=False)["input_ids"]
    g = torch.Generator().manual_seed(seed)
    # The second half of the text: the replay's prompts are cut from anywhere, but nothing here is trained on it.
    starts = torch.randint(len(ids) // 2, len(ids) - length - 1, (windows,), generator=g).tolist()
    batch = torch.tensor([ids[s : s + length + 1] for s in starts])
    saved = model.config.active_dsla_layers
    out, teacher_top = {}, None
    with torch.no_grad():
        for ratio in ratios:
            model.set_dsla_layers(float(ratio))
            logits = model(batch[:, :-1], use_cache=False).logits.float()
            nll = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten())
            top = logits.argmax(-1)
            if teacher_top is None:
                teacher_top = top
            out[str(ratio)] = {
                "dsla_layers": len(model.config.active_dsla_layers),
                "perplexity": math.exp(float(nll)),
                "top1_agreement_with_teacher": float((top == teacher_top).float().mean()),
            }
    model.set_dsla_layers(saved)
    return out


def run_config(name, model, tokenizer, policy, requests, maker, args):
    model.set_dsla_layers([])
    engine = Engine(
        model,
        tokenizer,
        EngineConfig(max_num_seqs=args.max_num_seqs, max_queue=10_000, prefill_chunk=args.prefill_chunk),
        policy,
        Metrics("SmolLM2-135M-Instruct"),
    ).start()
    with ServerThread(build_app(engine, tokenizer, "SmolLM2-135M-Instruct")) as server:
        results, samples, duration = asyncio.run(replay(server.url, requests, maker))
    engine.stop()
    summary = summarize(results, duration, {"ttft": args.slo_ttft_ms, "tpot": args.slo_tpot_ms})
    summary["layer_switches"] = engine.layer_switches
    summary["tokens_by_dsla_layers"] = dict(sorted(engine.tokens_by_layers.items()))
    total = sum(engine.tokens_by_layers.values()) or 1
    n = model.config.num_hidden_layers
    summary["token_weighted_ratio"] = sum(k * v for k, v in engine.tokens_by_layers.items()) / total / n
    print(f"{name}: {json.dumps({k: v for k, v in summary.items() if not isinstance(v, (list, dict))})}", flush=True)
    return summary, results, samples


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2")
    add_trace_arguments(parser, num_requests=30, output_scale=0.25, max_input=4096)
    parser.add_argument("--max-num-seqs", type=int, default=8)
    parser.add_argument("--prefill-chunk", type=int, default=512)
    parser.add_argument("--static-ratio", type=float, default=0.5)
    parser.add_argument(
        "--policy-length-scale",
        type=float,
        default=None,
        help="scale of the adaptive policy's prompt-length caps (default: the trace's length scale when it shrinks "
        "prompts, 1 when it stretches them: caps then apply to the real token counts)",
    )
    parser.add_argument("--cooldown", type=float, default=1.0)
    parser.add_argument("--slo-ttft-ms", type=float, default=5000)
    parser.add_argument("--slo-tpot-ms", type=float, default=200)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "serve"))
    add_device_arguments(parser, dtype_default="float32")
    return parser.parse_args()


def policies(model, args) -> dict:
    """The configurations: the teacher, a static ratio, and the adaptive policy with each request capped by its own
    context length (the default) and with one ratio for all (named as in the report)."""
    n = model.config.num_hidden_layers

    def adaptive(per_request: bool) -> AdaptivePolicy:
        return AdaptivePolicy(
            num_layers=n,
            max_layers=len(model.config.conversion_order),
            length_scale=min(1.0, args.length_scale) if args.policy_length_scale is None else args.policy_length_scale,
            cooldown_s=args.cooldown,
            queue_high=2,
            queue_low=0,
            per_request=per_request,
        )

    return {
        "teacher": StaticPolicy(0),
        f"static {args.static_ratio:.0%}": StaticPolicy(ratio_to_layers(args.static_ratio, n)),
        "adaptive": adaptive(per_request=True),
        "adaptive, one ratio": adaptive(per_request=False),
    }


def run_all(model, tokenizer, configs, requests, args):
    """Every configuration on the same prompts: (summaries, (results, gauge samples)) by configuration name."""
    # Warm up (thread pools, allocator) on a few requests, so the first configuration is not measured cold.
    run_config("warm-up", model, tokenizer, StaticPolicy(0), requests[:3], PromptMaker(tokenizer, seed=1), args)
    runs, details = {}, {}
    for name, policy in configs.items():
        maker = PromptMaker(tokenizer, seed=0)  # the same prompts for every configuration
        runs[name], results, samples = run_config(name, model, tokenizer, policy, requests, maker, args)
        details[name] = (results, samples)
    teacher_lpt = runs["teacher"]["mean_latency_per_token_ms"]
    for summary in runs.values():
        summary["latency_per_token_speedup_vs_teacher"] = teacher_lpt / summary["mean_latency_per_token_ms"]
    return runs, details


def trace_report(args, requests) -> dict:
    return {
        **trace_info(args, requests),
        "output_scale": args.output_scale,
        "max_input": args.max_input,
        "mean_input": sum(r.input_length for r in requests) / len(requests),
        "mean_output": sum(r.output_length for r in requests) / len(requests),
        "span_s": requests[-1].timestamp,
    }


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    device, dtype = device_and_dtype(args)
    model, tokenizer, _ = load_model(args.model, dtype, device)
    requests = trace_requests(args)
    configs = policies(model, args)
    started = time.time()
    runs, details = run_all(model, tokenizer, configs, requests, args)
    ratios = sorted({0.0, 0.125, 0.25, 0.375, args.static_ratio})
    report = {
        "meta": machine(args.threads, device),
        "model": args.model,
        "dsla_weights": "as given by --model (smollm2: untrained DSLA weights, quality is a lower bound)",
        "trace": trace_report(args, requests),
        "engine": {
            "max_num_seqs": args.max_num_seqs,
            "prefill_chunk": args.prefill_chunk,
            "max_num_batched_tokens": EngineConfig(
                args.max_num_seqs, prefill_chunk=args.prefill_chunk
            ).max_num_batched_tokens,
            "threads": args.threads,
        },
        "adaptive_policy": {k: v for k, v in vars(configs["adaptive"]).items() if not k.startswith("_")},
        "runs": runs,
        "quality": quality(model, tokenizer, ratios),
        "load_average": os.getloadavg(),
        "wall_s": time.time() - started,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    write_plot(details, runs, out.with_suffix(".png"))
    table = f"Ran on {describe(report['meta'])}.\n\n" + markdown(report)
    out.with_suffix(".md").write_text(table)
    print(table)


def write_plot(details, runs, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.2))
    names = list(runs)
    axes[0].bar(
        names,
        [runs[k]["mean_latency_per_token_ms"] for k in names],
        color=["gray", "tab:blue", "tab:green", "tab:olive"][: len(names)],
    )
    axes[0].set(ylabel="mean latency per output token (ms)", title="latency per output token")
    for name, (results, _) in details.items():
        ok = sorted(1000 * r.latency / max(1, r.output_tokens) for r in results if r.success)
        axes[1].plot(ok, [i / max(1, len(ok) - 1) for i in range(len(ok))], label=name)
    axes[1].set(xscale="log", xlabel="latency per output token (ms)", ylabel="CDF", title="per request")
    axes[1].legend()
    plot_gauges(axes[2], details["adaptive"][1], title="adaptive run: server gauges")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    # Also one plot per run in replay's format.
    for name, (results, samples) in details.items():
        slug = "_".join(name.replace(",", "").split())  # "adaptive, one ratio" -> adaptive_one_ratio
        plot(results, samples, path.with_name(f"{path.stem}_{slug}.png"), title=name)


def markdown(report) -> str:
    t = report["trace"]
    lines = [
        f"Replay of `{t['file']}` rows {t['start']}..{t['start'] + t['num_requests'] - 1} "
        f"(time x{t['time_scale']}, prompts x{t['length_scale']} (mean {t['mean_input']:.0f} tokens), "
        f"outputs x{t['output_scale']} (mean {t['mean_output']:.0f})), SmolLM2-135M on 2 CPU threads, "
        f"max {report['engine']['max_num_seqs']} concurrent sequences.",
        "",
        "| configuration | mean latency / output token (ms) | vs teacher | mean TTFT (ms) | mean TPOT (ms) "
        "| p99 ITL (ms) | mean e2e (s) | output tok/s | token-weighted DSLA ratio | switches |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, r in report["runs"].items():
        lines.append(
            f"| {name} | {r['mean_latency_per_token_ms']:.1f} | {r['latency_per_token_speedup_vs_teacher']:.2f}x "
            f"| {r['mean_ttft_ms']:.0f} | {r['mean_tpot_ms']:.1f} | {r['p99_itl_ms']:.0f} "
            f"| {r['mean_e2el_ms'] / 1000:.2f} "
            f"| {r['output_throughput']:.1f} | {r['token_weighted_ratio']:.1%} | {r['layer_switches']} |"
        )
    lines += [
        "",
        "| DSLA ratio | layers | perplexity | top-1 agreement with teacher |",
        "| ---: | ---: | ---: | ---: |",
    ]
    for ratio, q in report["quality"].items():
        lines.append(
            f"| {float(ratio):.1%} | {q['dsla_layers']} | {q['perplexity']:.2f} "
            f"| {q['top1_agreement_with_teacher']:.3f} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
