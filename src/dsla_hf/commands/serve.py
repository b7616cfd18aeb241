"""`dsla serve`: the OpenAI-compatible server (`dsla_hf.serving.server`) on a model the engine converts to DSLA
layer by layer as load and prompt length grow.

    dsla serve --model smollm2 --port 8000 --policy adaptive
"""

from __future__ import annotations

import argparse
import logging

from ..devices import add_device_arguments, device_and_dtype
from ..serving.engine import Engine, EngineConfig
from ..serving.metrics import Metrics
from ..serving.openai_protocol import Limits
from ..serving.policy import AdaptivePolicy, StaticPolicy, ratio_to_layers

logger = logging.getLogger(__name__)


def add_policy_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("conversion policy")
    group.add_argument("--policy", choices=["adaptive", "static"], default="adaptive")
    group.add_argument("--dsla-ratio", type=float, default=0.0, help="static policy: fraction of layers as DSLA")
    group.add_argument("--max-ratio", type=float, default=0.75)
    group.add_argument("--ratio-step", type=float, default=0.125)
    group.add_argument("--cooldown", type=float, default=2.0, help="seconds between two switches")
    group.add_argument("--queue-high", type=int, default=4)
    group.add_argument("--queue-low", type=int, default=0)
    group.add_argument("--kv-high", type=float, default=0.75)
    group.add_argument("--kv-low", type=float, default=0.4)
    group.add_argument("--prompt-high", type=int, default=4096, help="a prompt this long raises the ratio (0: off)")
    group.add_argument("--prompt-low", type=int, default=2048)
    group.add_argument(
        "--length-scale", type=float, default=1.0, help="multiplies the prompt-length bounds (scaled-down traces)"
    )
    group.add_argument(
        "--per-request",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="cap each request by its own context length (mixed batches); off: one ratio set by the longest prompt",
    )


# Options that set the AdaptivePolicy field of the same name.
POLICY_OPTIONS = ("max_ratio", "queue_high", "queue_low", "kv_high", "kv_low", "length_scale", "per_request")


def make_policy(args: argparse.Namespace, model) -> AdaptivePolicy | StaticPolicy:
    n = model.config.num_hidden_layers
    if args.policy == "static":
        return StaticPolicy(ratio_to_layers(args.dsla_ratio, n))
    off = not args.prompt_high  # --prompt-high 0: the prompt length is no trigger
    return AdaptivePolicy(
        num_layers=n,
        max_layers=len(model.config.conversion_order),
        step=args.ratio_step,
        cooldown_s=args.cooldown,
        prompt_high=None if off else args.prompt_high,
        prompt_low=None if off else args.prompt_low,
        **{name: getattr(args, name) for name in POLICY_OPTIONS},
    )


def add_engine_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("engine")
    group.add_argument("--max-num-seqs", type=int, default=8, help="requests decoded together at most")
    group.add_argument("--max-queue", type=int, default=128, help="waiting requests at most (then 429)")
    group.add_argument("--max-model-len", type=int, default=None)
    group.add_argument(
        "--prefill-chunk", type=int, default=512, help="prompt chunks end at its multiples (prefix-cache blocks)"
    )
    group.add_argument(
        "--max-num-batched-tokens",
        type=int,
        default=None,
        help="tokens per step: decode tokens first, prompt chunks after (default: prefill-chunk + max-num-seqs)",
    )
    group.add_argument("--request-timeout", type=float, default=600.0)
    group.add_argument(
        "--kv-cache-gb", type=float, default=None, help="KV budget (default: max-num-seqs full contexts)"
    )
    group.add_argument("--keep-kv", action="store_true", help="keep KV of DSLA layers: reverts are never deferred")
    group.add_argument(
        "--enable-prefix-caching",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="start prompts after the longest prefix served before (on by default, as in vLLM)",
    )
    group.add_argument("--prefix-cache-gb", type=float, default=None, help="prefix cache memory (default: KV / 4)")


def engine_config(args: argparse.Namespace) -> EngineConfig:
    return EngineConfig(
        max_num_seqs=args.max_num_seqs,
        max_queue=args.max_queue,
        max_model_len=args.max_model_len,
        prefill_chunk=args.prefill_chunk,
        max_num_batched_tokens=args.max_num_batched_tokens,
        request_timeout_s=args.request_timeout,
        kv_cache_bytes=int(args.kv_cache_gb * 2**30) if args.kv_cache_gb else None,
        keep_kv=args.keep_kv,
        enable_prefix_caching=args.enable_prefix_caching,
        prefix_cache_bytes=None if args.prefix_cache_gb is None else int(args.prefix_cache_gb * 2**30),
    )


def add_http_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("HTTP limits (hostile or broken clients)")
    limits = Limits()
    group.add_argument(
        "--max-body-bytes", type=int, default=limits.max_body_bytes, help="a larger body gets 413 (default 4 MiB)"
    )
    group.add_argument(
        "--body-timeout",
        type=float,
        default=limits.body_timeout_s,
        help="seconds for a request body to arrive, else 408 and close",
    )
    group.add_argument(
        "--header-timeout",
        type=float,
        default=limits.header_timeout_s,
        help="seconds for a request head to arrive (from the connection's start or the head's first byte), else 408 "
        "and close",
    )


def http_limits(args: argparse.Namespace) -> Limits:
    """The server's `Limits` from the HTTP options."""
    return Limits(args.max_body_bytes, args.body_timeout, args.header_timeout)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        default="smollm2",
        help="a DSLA checkpoint or Llama (folder or hub id), 'smollm2' (the embedded teacher, converted) or 'toy'",
    )
    parser.add_argument("--served-model-name", default=None)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--threads", type=int, default=None, help="torch threads for the engine")
    add_device_arguments(parser)
    parser.add_argument("--log-level", default="info")
    add_engine_arguments(parser)
    add_http_arguments(parser)
    add_policy_arguments(parser)


def run(args: argparse.Namespace) -> int:
    import torch
    import uvicorn

    # FastAPI and uvicorn are the `serve` extra: imported only when serving, so `dsla --help` works without them.
    from ..serving.models import load_model
    from ..serving.server import build_app, uvicorn_options

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = engine_config(args)  # checked before the model loads
    except ValueError as error:
        raise SystemExit(f"dsla serve: {error}") from None
    if args.threads:
        torch.set_num_threads(args.threads)
    device, dtype = device_and_dtype(args)
    model, tokenizer, name = load_model(args.model, dtype, device)
    logger.info("Serving %s on %s in %s", args.model, device, str(dtype).removeprefix("torch."))
    name = args.served_model_name or name
    engine = Engine(model, tokenizer, config, make_policy(args, model), Metrics(name)).start()
    app = build_app(engine, tokenizer, name, http_limits(args))
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, **uvicorn_options(app))
    finally:
        engine.stop()
    return 0
