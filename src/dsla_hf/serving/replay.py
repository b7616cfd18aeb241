"""Replay the Azure LLM inference traces (2023, conversation and code) against a running server (`dsla replay`).

Each trace row gives an arrival time, a prompt length (`ContextTokens`) and an output length (`GeneratedTokens`).
Send times are the offsets from the first row, multiplied by `--time-scale` (below 1: more load); lengths are
multiplied by `--length-scale`. Each prompt has exactly that many tokens, cut from real text (CPython's docs) and
sent as token ids; the output length is forced (`max_tokens = min_tokens`, `ignore_eos`). Requests stream, so the
client measures what vLLM's `benchmark_serving` reports: TTFT, TPOT, ITL and end-to-end latency (mean, median,
p99), request and token throughput, and goodput under SLOs. The server's `dsla:num_dsla_layers` gauge is sampled
during the run. It can also write the trace as vLLM's `timed_trace` JSONL.

Data: "Azure LLM inference trace 2023" (Azure/AzurePublicDataset), CC BY 4.0. Patel et al., "Splitwise: Efficient
generative LLM inference using phase splitting", ISCA 2024. The trace files are read where they are
(`--trace-dir` or $DSLA_TRACE_DIR), never copied.

    dsla replay --url http://127.0.0.1:8000 --trace conv --trace-dir ../shared/data/azure_llm_2023 \
        --num-requests 100 --time-scale 0.5 --length-scale 0.25 --result out.json --plot out.png
"""

from __future__ import annotations

import asyncio
import csv
import json
import logging
import os
import random
import re
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)

TRACE_FILES = {"conv": "AzureLLMInferenceTrace_conv.csv", "code": "AzureLLMInferenceTrace_code.csv"}
# The server's gauges sampled during a replay (name in /metrics -> label in plots).
GAUGES = {
    "dsla:num_dsla_layers": "DSLA layers",
    "vllm:num_requests_running": "running",
    "vllm:num_requests_waiting": "waiting",
}


@dataclass
class TraceRequest:
    timestamp: float  # send time in seconds from the start of the replay (after time scaling)
    input_length: int
    output_length: int


def trace_path(trace: str, trace_dir: str | None) -> Path:
    if trace in TRACE_FILES:
        folder = trace_dir or os.environ.get("DSLA_TRACE_DIR")
        if not folder:
            raise FileNotFoundError(f"Where is {TRACE_FILES[trace]}? Pass --trace-dir or set DSLA_TRACE_DIR")
        return Path(folder) / TRACE_FILES[trace]
    return Path(trace)


def parse_timestamp(value: str) -> float:
    # 7 fractional digits; strptime takes at most 6.
    date, _, fraction = value.strip().partition(".")
    seconds = datetime.strptime(date, "%Y-%m-%d %H:%M:%S").timestamp()
    return seconds + (float("0." + fraction) if fraction else 0.0)


def load_trace(
    path: str | Path,
    start: int = 0,
    num_requests: int | None = None,
    time_scale: float = 1.0,
    length_scale: float = 1.0,
    output_scale: float | None = None,
    min_input: int = 1,
    max_input: int | None = None,
    max_output: int | None = None,
) -> list[TraceRequest]:
    """Rows `start` .. `start + num_requests` of a trace CSV (TIMESTAMP, ContextTokens, GeneratedTokens), with send
    times relative to the first of them times `time_scale`, and lengths times `length_scale` (outputs times
    `output_scale`, default `length_scale`), clamped to [min_input, max_input] and [1, max_output]."""
    output_scale = length_scale if output_scale is None else output_scale
    rows = []
    with open(path, newline="") as handle:
        reader = csv.DictReader(handle)
        for i, row in enumerate(reader):
            if i < start:
                continue
            if num_requests is not None and len(rows) >= num_requests:
                break
            rows.append((parse_timestamp(row["TIMESTAMP"]), int(row["ContextTokens"]), int(row["GeneratedTokens"])))
    if not rows:
        return []
    t0 = rows[0][0]
    out = []
    for t, context, generated in rows:
        n_in = max(min_input, round(context * length_scale))
        n_out = max(1, round(generated * output_scale))
        if max_input is not None:
            n_in = min(n_in, max_input)
        if max_output is not None:
            n_out = min(n_out, max_output)
        out.append(TraceRequest(round((t - t0) * time_scale, 6), n_in, n_out))
    return out


def write_timed_trace(requests: list[TraceRequest], path: str | Path) -> None:
    """vLLM's `timed_trace` dataset rows: {"timestamp": s, "input_length": n, "output_length": m}."""
    with open(path, "w") as handle:
        for r in requests:
            handle.write(json.dumps(asdict(r)) + "\n")


class PromptMaker:
    """Prompts of exactly n tokens: windows of real text (CPython's docs by default), tokenised once."""

    def __init__(self, tokenizer, text: str | None = None, seed: int = 0):
        if text is None:
            from ..data import pydoc_text

            text = pydoc_text()
        self.ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        self.rng = random.Random(seed)

    def __call__(self, n: int) -> list[int]:
        if n <= len(self.ids):
            start = self.rng.randrange(0, len(self.ids) - n + 1)
            return self.ids[start : start + n]
        repeats = -(-n // len(self.ids))
        return (self.ids * repeats)[:n]


@dataclass
class RequestResult:
    send_time: float = 0.0
    input_length: int = 0
    output_length: int = 0  # asked for
    success: bool = False
    error: str = ""
    ttft: float = 0.0
    latency: float = 0.0
    itl: list[float] = field(default_factory=list)
    output_tokens: int = 0  # received (from the usage chunk)
    start: float = 0.0


async def send_one(client, url: str, model: str, prompt: list[int], request: TraceRequest, t0: float):
    result = RequestResult(send_time=request.timestamp, input_length=request.input_length)
    result.output_length = request.output_length
    body = {
        "model": model,
        "prompt": prompt,
        "max_tokens": request.output_length,
        "min_tokens": request.output_length,
        "ignore_eos": True,
        "temperature": 0.0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    start = time.perf_counter()
    result.start = start - t0
    last = start
    try:
        async with client.stream("POST", url + "/v1/completions", json=body) as reply:
            if reply.status_code != 200:
                text = (await reply.aread()).decode(errors="replace")
                result.error = f"HTTP {reply.status_code}: {text[:200]}"
                return result
            async for line in reply.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                if data == "[DONE]":
                    result.success = True
                    break
                message = json.loads(data)
                if "error" in message:
                    result.error = message["error"].get("message", "stream error")
                    break
                if message.get("usage"):
                    result.output_tokens = message["usage"]["completion_tokens"]
                if message.get("choices") and message["choices"][0].get("text"):
                    now = time.perf_counter()
                    if result.ttft == 0.0:
                        result.ttft = now - start
                    else:
                        result.itl.append(now - last)
                    last = now
    except Exception as error:  # connection refused or reset: count as failed
        result.error = f"{type(error).__name__}: {error}"
    result.latency = time.perf_counter() - start
    return result


async def sample_gauges(client, url: str, t0: float, samples: list, stop: asyncio.Event, every: float = 0.25):
    pattern = re.compile("^(" + "|".join(map(re.escape, GAUGES)) + r")\{.*\} (\S+)$")
    while not stop.is_set():
        try:
            text = (await client.get(url + "/metrics")).text
            values = {m.group(1): float(m.group(2)) for m in map(pattern.match, text.splitlines()) if m}
            samples.append({"t": time.perf_counter() - t0, **values})
        except Exception:
            pass
        try:
            await asyncio.wait_for(stop.wait(), every)
        except asyncio.TimeoutError:
            pass


async def replay(url: str, requests: list[TraceRequest], make_prompt, model: str | None = None, timeout: float = 3600):
    """Send every request at its time; returns (results, gauge samples, duration)."""
    import httpx

    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(timeout=httpx.Timeout(timeout), limits=limits) as client:
        if model is None:
            model = (await client.get(url + "/v1/models")).json()["data"][0]["id"]
        prompts = [make_prompt(r.input_length) for r in requests]
        samples: list[dict] = []
        stop = asyncio.Event()
        t0 = time.perf_counter()
        sampler = asyncio.create_task(sample_gauges(client, url, t0, samples, stop))

        async def at_time(prompt, request):
            await asyncio.sleep(max(0.0, request.timestamp - (time.perf_counter() - t0)))
            return await send_one(client, url, model, prompt, request, t0)

        results = await asyncio.gather(*(at_time(p, r) for p, r in zip(prompts, requests)))
        duration = time.perf_counter() - t0
        stop.set()
        await sampler
    return list(results), samples, duration


def _stats(values: list[float], prefix: str, scale: float = 1000.0) -> dict:
    a = np.asarray(values, dtype=float) * scale if values else np.zeros(1)
    return {
        f"mean_{prefix}_ms": float(a.mean()),
        f"median_{prefix}_ms": float(np.median(a)),
        f"std_{prefix}_ms": float(a.std()),
        f"p99_{prefix}_ms": float(np.percentile(a, 99)),
    }


def summarize(results: list[RequestResult], duration: float, slo: dict[str, float] | None = None) -> dict:
    """vLLM's benchmark fields (ms), plus the paper's latency per output token (e2e latency / output tokens)."""
    ok = [r for r in results if r.success]
    ttfts = [r.ttft for r in ok]
    tpots = [(r.latency - r.ttft) / (r.output_tokens - 1) for r in ok if r.output_tokens > 1]
    itls = [x for r in ok for x in r.itl]
    e2el = [r.latency for r in ok]
    per_token = [r.latency / r.output_tokens for r in ok if r.output_tokens]
    total_out = sum(r.output_tokens for r in ok)
    total_in = sum(r.input_length for r in ok)
    summary = {
        "duration": duration,
        "completed": len(ok),
        "failed": len(results) - len(ok),
        "total_input_tokens": total_in,
        "total_output_tokens": total_out,
        "request_throughput": len(ok) / duration,
        "output_throughput": total_out / duration,
        "total_token_throughput": (total_in + total_out) / duration,
        **_stats(ttfts, "ttft"),
        **_stats(tpots, "tpot"),
        **_stats(itls, "itl"),
        **_stats(e2el, "e2el"),
        **_stats(per_token, "latency_per_token"),
    }
    if slo:
        good = 0
        for r in ok:
            tpot = (r.latency - r.ttft) / (r.output_tokens - 1) if r.output_tokens > 1 else 0.0
            measured = {"ttft": r.ttft * 1000, "tpot": tpot * 1000, "e2el": r.latency * 1000}
            good += all(measured[k] <= v for k, v in slo.items())
        summary["request_goodput"] = good / duration
        summary["slo_ms"] = slo
    errors = sorted({r.error for r in results if r.error})
    if errors:
        summary["errors"] = errors[:5]
    return summary


def plot(results: list[RequestResult], samples: list[dict], path: str | Path, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    ok = [r for r in results if r.success]
    axes[0].scatter([r.start for r in ok], [1000 * r.latency / max(1, r.output_tokens) for r in ok], s=8)
    axes[0].set(xlabel="send time (s)", ylabel="latency per output token (ms)", title="per request")
    for values, label in (([r.ttft for r in ok], "TTFT"), ([x for r in ok for x in r.itl], "ITL")):
        if values:
            xs = np.sort(np.asarray(values) * 1000)
            axes[1].plot(xs, np.linspace(0, 1, len(xs)), label=label)
    axes[1].set(xscale="log", xlabel="ms", ylabel="CDF", title="TTFT and ITL")
    axes[1].legend()
    plot_gauges(axes[2], samples)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_gauges(ax, samples: list[dict], title: str = "server gauges") -> None:
    """The gauges sampled during a replay, as steps over time (nothing when none were sampled)."""
    if not samples:
        return
    t = [s["t"] for s in samples]
    for key, label in GAUGES.items():
        ax.step(t, [s.get(key, 0) for s in samples], where="post", label=label)
    ax.set(xlabel="time (s)", title=title)
    ax.legend()
