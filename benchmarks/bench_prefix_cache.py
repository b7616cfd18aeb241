"""Prefix caching on a multi-turn chat replay: each turn resends the whole conversation (as chat clients do).

Two `dsla serve` servers on loopback share one model, one with the prefix cache and one without; every turn of
every conversation goes to both, one after the other (the order alternating), over HTTP with streaming, so the cold
and warm times come from the same moments of one run. The user turns are passages of CPython's documentation, the
answers the greedy output of the cached server. Reported per conversion ratio: time to first token of the first
turn and of the follow-up turns, cold and warm, the prompt tokens the cache served, and whether both servers
answered the same text (greedy: they should).

    python benchmarks/bench_prefix_cache.py --model dsla_demo/checkpoint    # benchmarks/results/prefix_cache.{json,md}
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from contextlib import ExitStack
from pathlib import Path

import httpx
import torch
from machine import describe, machine

from dsla_hf.data import pydoc_text
from dsla_hf.serving.engine import Engine, EngineConfig
from dsla_hf.serving.metrics import Metrics
from dsla_hf.serving.models import load_model
from dsla_hf.serving.policy import StaticPolicy, ratio_to_layers
from dsla_hf.serving.server import ServerThread, build_app

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results" / "prefix_cache"


def passages(tokenizer, count: int, tokens: int) -> list[str]:
    """`count` consecutive passages of about `tokens` tokens of CPython's documentation."""
    ids = tokenizer(pydoc_text(), add_special_tokens=False)["input_ids"]
    return [tokenizer.decode(ids[i * tokens : (i + 1) * tokens]) for i in range(count)]


def chat_turn(client: httpx.Client, messages: list[dict], max_tokens: int) -> dict:
    """One streamed chat request: time to the first content, the text, and the usage."""
    body = {"model": "model", "messages": messages, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}  # fmt: skip
    start, first, text, usage = time.perf_counter(), None, [], {}
    with client.stream("POST", "/v1/chat/completions", json=body) as reply:
        reply.raise_for_status()
        for line in reply.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if event.get("usage"):
                usage = event["usage"]
            for choice in event["choices"]:
                if choice["delta"].get("content"):
                    first = first or time.perf_counter()
                    text.append(choice["delta"]["content"])
    return {"ttft_s": (first or time.perf_counter()) - start, "text": "".join(text), "usage": usage}


def run_ratio(model, tokenizer, ratio: float, args) -> dict:
    layers = ratio_to_layers(ratio, model.config.num_hidden_layers)
    model.set_dsla_layers(float(ratio))
    texts = passages(tokenizer, args.conversations * args.turns, args.turn_tokens)
    turns = []
    with ExitStack() as stack:
        clients = {}
        for name, caching in (("cold", False), ("warm", True)):
            config = EngineConfig(max_num_seqs=4, prefill_chunk=args.prefill_chunk, enable_prefix_caching=caching)
            engine = Engine(model, tokenizer, config, StaticPolicy(layers), Metrics("model")).start()
            stack.callback(engine.stop)
            thread = stack.enter_context(ServerThread(build_app(engine, tokenizer, "model")))
            clients[name] = stack.enter_context(httpx.Client(base_url=thread.url, timeout=600))
        for c in range(args.conversations):
            messages: list[dict] = []
            for t in range(args.turns):
                messages.append({"role": "user", "content": f"Summarise this:\n\n{texts[c * args.turns + t]}"})
                order = ("cold", "warm") if (c + t) % 2 == 0 else ("warm", "cold")
                results = {name: chat_turn(clients[name], messages, args.max_tokens) for name in order}
                cached = results["warm"]["usage"].get("prompt_tokens_details", {}).get("cached_tokens", 0)
                turns.append({
                    "conversation": c, "turn": t, "prompt_tokens": results["warm"]["usage"]["prompt_tokens"],
                    "cached_tokens": cached, "cold_ttft_s": results["cold"]["ttft_s"],
                    "warm_ttft_s": results["warm"]["ttft_s"],
                    "same_text": results["cold"]["text"] == results["warm"]["text"],
                })  # fmt: skip
                messages.append({"role": "assistant", "content": results["warm"]["text"]})
                print(json.dumps(turns[-1]), flush=True)
    follow = [r for r in turns if r["turn"] > 0]
    first = [r for r in turns if r["turn"] == 0]

    def mean(rows, key):
        return statistics.fmean(r[key] for r in rows)

    return {
        "ratio": ratio,
        "dsla_layers": layers,
        "turns": turns,
        "first_turn": {"cold_ttft_s": mean(first, "cold_ttft_s"), "warm_ttft_s": mean(first, "warm_ttft_s")},
        "follow_up": {
            "cold_ttft_s": mean(follow, "cold_ttft_s"),
            "warm_ttft_s": mean(follow, "warm_ttft_s"),
            "ratio": mean(follow, "warm_ttft_s") / mean(follow, "cold_ttft_s"),
            "prompt_tokens": mean(follow, "prompt_tokens"),
            "cached_tokens": mean(follow, "cached_tokens"),
        },
        "same_text": all(r["same_text"] for r in turns),
    }


def markdown(result: dict) -> str:
    lines = [
        "# Prefix caching: a multi-turn chat replay",
        "",
        f"Ran on {describe(result['machine'])}. {result['conversations']} conversations of {result['turns']} turns "
        f"(user turns of about {result['turn_tokens']} tokens of CPython's docs, {result['max_tokens']}-token greedy "
        "answers); each turn resends the whole conversation to a server without and a server with the prefix cache, "
        "interleaved. `python benchmarks/bench_prefix_cache.py`.",
        "",
        "| model | first turn TTFT cold / warm | follow-up prompt tokens (cached) | follow-up TTFT cold / warm | "
        "warm / cold | same text |",
        "|---|---|---|---|---|---|",
    ]
    for row in result["rows"]:
        f, u = row["first_turn"], row["follow_up"]
        name = "teacher" if row["ratio"] == 0 else f"DSLA {row['ratio']:.0%} ({row['dsla_layers']} layers)"
        lines.append(
            f"| {name} | {f['cold_ttft_s']:.2f} s / {f['warm_ttft_s']:.2f} s | {u['prompt_tokens']:.0f} "
            f"({u['cached_tokens']:.0f}) | {u['cold_ttft_s']:.2f} s / {u['warm_ttft_s']:.2f} s | {u['ratio']:.2f}x | "
            f"{'yes' if row['same_text'] else 'no'} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(ROOT / "dsla_demo" / "checkpoint"), help="a DSLA checkpoint folder")
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.0, 0.5])
    parser.add_argument("--conversations", type=int, default=3)
    parser.add_argument("--turns", type=int, default=5)
    parser.add_argument("--turn-tokens", type=int, default=200)
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--prefill-chunk", type=int, default=512)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, tokenizer, _ = load_model(args.model)
    rows = [run_ratio(model, tokenizer, ratio, args) for ratio in args.ratios]
    settings = {k: getattr(args, k) for k in ("conversations", "turns", "turn_tokens", "max_tokens", "prefill_chunk")}
    result = {"machine": machine(args.threads), "model": args.model, "rows": rows, **settings}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=1))
    args.out.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
