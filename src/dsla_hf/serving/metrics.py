"""Prometheus metrics in the text exposition format, under vLLM's names, plus DSLA's own gauges and counter.

A small thread-safe registry (no dependency): the engine thread records, the HTTP server renders `/metrics`.
"""

from __future__ import annotations

import threading

# vLLM's default buckets for these histograms.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0)
TPOT_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0)
E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0)


def _labels(labels: dict[str, str]) -> str:
    if not labels:
        return ""
    escaped = {k: str(v).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") for k, v in labels.items()}
    return "{" + ",".join(f'{k}="{v}"' for k, v in escaped.items()) + "}"


class Metrics:
    def __init__(self, model_name: str):
        self.base = {"model_name": model_name}
        self._lock = threading.Lock()
        self._help: dict[str, tuple[str, str]] = {}
        self._values: dict[str, dict[tuple, float]] = {}
        self._hist: dict[str, tuple[tuple[float, ...], dict[tuple, list]]] = {}
        for name, doc in (
            ("vllm:num_requests_running", "Number of requests in model execution batches."),
            ("vllm:num_requests_waiting", "Number of requests waiting to be processed."),
            ("vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage."),
            ("dsla:num_dsla_layers", "Number of layers currently running as DSLA."),
            ("dsla:conversion_ratio", "Fraction of layers currently running as DSLA."),
        ):
            self._declare(name, "gauge", doc)
        for name, doc in (
            ("vllm:prompt_tokens_total", "Number of prefill tokens processed."),
            ("vllm:generation_tokens_total", "Number of generation tokens processed."),
            ("vllm:request_success_total", "Count of successfully processed requests."),
            ("dsla:layer_switches_total", "Number of times the set of DSLA layers changed."),
            ("dsla:requests_rejected_total", "Requests refused because the queue was full."),
            ("vllm:prefix_cache_queries_total", "Prefix cache queries, in terms of number of queried tokens."),
            ("vllm:prefix_cache_hits_total", "Prefix cache hits, in terms of number of cached tokens."),
        ):
            self._declare(name, "counter", doc)
        for name, doc, buckets in (
            ("vllm:time_to_first_token_seconds", "Histogram of time to first token in seconds.", TTFT_BUCKETS),
            ("vllm:time_per_output_token_seconds", "Histogram of time per output token in seconds.", TPOT_BUCKETS),
            ("vllm:inter_token_latency_seconds", "Histogram of inter-token latency in seconds.", TPOT_BUCKETS),
            ("vllm:e2e_request_latency_seconds", "Histogram of end to end request latency in seconds.", E2E_BUCKETS),
        ):
            self._declare(name, "histogram", doc)
            self._hist[name] = (buckets, {})
        for name in ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc"):
            self.set(name, 0.0)
        self.set("dsla:num_dsla_layers", 0.0)
        self.set("dsla:conversion_ratio", 0.0)
        for name in ("vllm:prompt_tokens_total", "vllm:generation_tokens_total", "dsla:layer_switches_total",
                     "vllm:prefix_cache_queries_total", "vllm:prefix_cache_hits_total"):  # fmt: skip
            self.inc(name, 0.0)

    def _declare(self, name: str, kind: str, doc: str) -> None:
        self._help[name] = (kind, doc)
        self._values.setdefault(name, {})

    def _key(self, labels: dict[str, str] | None) -> tuple:
        return tuple(sorted({**self.base, **(labels or {})}.items()))

    def set(self, name: str, value: float, **labels) -> None:
        with self._lock:
            self._values[name][self._key(labels)] = float(value)

    def inc(self, name: str, value: float = 1.0, **labels) -> None:
        with self._lock:
            key = self._key(labels)
            self._values[name][key] = self._values[name].get(key, 0.0) + value

    def observe(self, name: str, value: float, **labels) -> None:
        with self._lock:
            buckets, series = self._hist[name]
            key = self._key(labels)
            counts = series.setdefault(key, [0] * (len(buckets) + 1) + [0.0])  # per bucket, +Inf, sum
            for i, bound in enumerate(buckets):
                if value <= bound:
                    counts[i] += 1
            counts[len(buckets)] += 1
            counts[-1] += value

    def get(self, name: str, **labels) -> float:
        with self._lock:
            return self._values[name].get(self._key(labels), 0.0)

    def render(self) -> str:
        lines = []
        with self._lock:
            for name, (kind, doc) in self._help.items():
                lines += [f"# HELP {name} {doc}", f"# TYPE {name} {kind}"]
                if kind == "histogram":
                    buckets, series = self._hist[name]
                    for key, counts in series.items():
                        labels = dict(key)
                        for bound, count in zip(buckets, counts):  # counts are cumulative already
                            lines.append(f"{name}_bucket{_labels({**labels, 'le': repr(float(bound))})} {count}")
                        lines.append(f"{name}_bucket{_labels({**labels, 'le': '+Inf'})} {counts[len(buckets)]}")
                        lines.append(f"{name}_count{_labels(labels)} {counts[len(buckets)]}")
                        lines.append(f"{name}_sum{_labels(labels)} {counts[-1]}")
                else:
                    for key, value in self._values[name].items():
                        lines.append(f"{name}{_labels(dict(key))} {value}")
        return "\n".join(lines) + "\n"
