"""`dsla serve`: the OpenAI-compatible HTTP server (FastAPI + uvicorn) in front of the engine thread.

Routes: POST /v1/completions, POST /v1/chat/completions (SSE streaming with `stream`, a usage chunk with
`stream_options.include_usage`, then `data: [DONE]`), GET /v1/models, /health, /metrics (Prometheus). Requests reach
the engine through thread-safe queues; a client that disconnects cancels its request. Prompts are never logged.

    dsla serve --model smollm2 --port 8000 --policy adaptive
    curl localhost:8000/v1/completions -d '{"model": "SmolLM2-135M-Instruct", "prompt": "def f(x):", "max_tokens": 16}'
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import copy
import logging
import socket
import threading
import time

from ..devices import add_device_arguments, device_and_dtype
from .engine import Engine, EngineConfig, EngineStopped, Output, QueueFull
from .metrics import Metrics
from .openai_protocol import (
    ProtocolError,
    chunk,
    error_body,
    new_id,
    parse_body,
    parse_request,
    response,
    sse,
    usage,
    usage_chunk,
)
from .policy import AdaptivePolicy, StaticPolicy, ratio_to_layers

logger = logging.getLogger(__name__)

FAILURE_STATUS = {"timeout": 408, "abort": 503, "error": 500}


def build_app(engine: Engine, tokenizer, model_name: str):
    """The FastAPI app serving `engine` under `model_name`."""
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
    from starlette.exceptions import HTTPException

    app = FastAPI(title="DSLA-Serve")
    tokenizer = copy.deepcopy(tokenizer)  # the engine thread decodes with its own copy
    created = int(time.time())

    def error(message: str, status: int, param: str | None = None, kind: str | None = None) -> JSONResponse:
        return JSONResponse(ProtocolError(message, status, param, kind).body(), status_code=status)

    @app.exception_handler(HTTPException)
    async def http_error(request, exc):
        return error(str(exc.detail), exc.status_code)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request, exc):
        return error(str(exc), 400)

    @app.exception_handler(Exception)
    async def internal_error(request, exc):
        logger.exception("Unhandled error in %s", request.url.path)
        return error(f"Internal server error: {type(exc).__name__}", 500, kind="InternalServerError")

    @app.get("/health")
    async def health():
        if engine.alive:
            return PlainTextResponse("")
        return error("The engine is not running", 503)

    @app.get("/v1/models")
    async def models():
        card = {
            "id": model_name,
            "object": "model",
            "created": created,
            "owned_by": "dsla-hf",
            "root": model_name,
            "max_model_len": engine.max_model_len,
        }
        return {"object": "list", "data": [card]}

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(engine.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    def encode(parsed) -> list[int]:
        if parsed.chat:
            try:
                text = tokenizer.apply_chat_template(parsed.messages, add_generation_prompt=True, tokenize=False)
            except Exception as exc:  # a template that rejects these messages (e.g. roles out of order)
                raise ProtocolError(f"The chat template rejected the messages: {exc}", param="messages") from None
            return tokenizer(text, add_special_tokens=False)["input_ids"]
        if isinstance(parsed.prompt, str):
            return tokenizer(parsed.prompt)["input_ids"]
        return list(parsed.prompt)

    async def handle(raw, chat: bool):
        try:
            parsed = parse_request(parse_body(await raw.body()), chat, model_name, engine.max_model_len)
            prompt_ids = encode(parsed)
            params = parsed.params
            if not parsed.max_tokens_given:
                params.max_tokens = max(1, engine.max_model_len - len(prompt_ids))
            loop = asyncio.get_running_loop()
            outputs: asyncio.Queue[Output] = asyncio.Queue()

            def sink(out: Output) -> None:  # called from the engine thread
                with contextlib.suppress(RuntimeError):  # the loop is gone (shutdown)
                    loop.call_soon_threadsafe(outputs.put_nowait, out)

            request = engine.submit(prompt_ids, params, sink)
        except ProtocolError as exc:
            return JSONResponse(exc.body(), status_code=exc.status)
        except ValueError as exc:
            return error(str(exc), 400)
        except QueueFull as exc:
            return error(str(exc), 429)
        except EngineStopped as exc:
            return error(str(exc), 503)
        request_id = new_id(chat)
        if parsed.stream:
            return StreamingResponse(
                stream(request, outputs, request_id, chat, parsed.include_usage),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Request-Id": request_id},
            )
        parts = []
        while True:
            try:
                out = await asyncio.wait_for(outputs.get(), timeout=0.5)
            except asyncio.TimeoutError:
                if await raw.is_disconnected():
                    request.cancel()
                    return error("The client disconnected", 499)
                continue
            parts.append(out.text)
            if out.finished:
                break
        if out.finish_reason not in ("stop", "length"):
            return error(out.error or "The request failed", FAILURE_STATUS.get(out.finish_reason, 500))
        body = response(
            request_id,
            chat,
            model_name,
            "".join(parts),
            out.finish_reason,
            usage(out.prompt_tokens, out.completion_tokens),
        )
        return JSONResponse(body)

    async def stream(request, outputs, request_id: str, chat: bool, include_usage: bool):
        finished = False
        try:
            if chat:
                yield sse(chunk(request_id, chat, model_name, None, None, role=True))
            while True:
                out = await outputs.get()
                finished = out.finished
                if finished and out.finish_reason not in ("stop", "length"):
                    status = FAILURE_STATUS.get(out.finish_reason, 500)
                    yield sse(error_body(out.error or "The request failed", status, kind="StreamError"))
                    break
                if out.text or finished:
                    yield sse(chunk(request_id, chat, model_name, out.text, out.finish_reason))
                if finished:
                    if include_usage:
                        yield sse(
                            usage_chunk(request_id, chat, model_name, usage(out.prompt_tokens, out.completion_tokens))
                        )
                    break
            yield sse("[DONE]")
        finally:
            if not finished:  # the client went away (the generator was closed or cancelled)
                request.cancel()

    async def completions(raw):
        return await handle(raw, chat=False)

    async def chat_completions(raw):
        return await handle(raw, chat=True)

    # Real classes, not the strings that `from __future__ import annotations` makes (FastAPI must see `Request`).
    for route, endpoint in (("/v1/completions", completions), ("/v1/chat/completions", chat_completions)):
        endpoint.__annotations__ = {"raw": Request}
        app.post(route)(endpoint)

    return app


class ServerThread:
    """Run an app with uvicorn in a background thread on a free loopback port (tests, benchmarks)."""

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0):
        import uvicorn

        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://{host}:{self.port}"
        config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=2)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> ServerThread:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("The server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(10)
        self.sock.close()


# --- command line --------------------------------------------------------------------------------------------------


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


def make_policy(args, model):
    n = model.config.num_hidden_layers
    if args.policy == "static":
        return StaticPolicy(ratio_to_layers(args.dsla_ratio, n))
    off = not args.prompt_high
    return AdaptivePolicy(
        num_layers=n,
        max_layers=len(model.config.conversion_order),
        step=args.ratio_step,
        max_ratio=args.max_ratio,
        queue_high=args.queue_high,
        queue_low=args.queue_low,
        kv_high=args.kv_high,
        kv_low=args.kv_low,
        prompt_high=None if off else args.prompt_high,
        prompt_low=None if off else args.prompt_low,
        cooldown_s=args.cooldown,
        length_scale=args.length_scale,
    )


def add_engine_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("engine")
    group.add_argument("--max-num-seqs", type=int, default=8, help="requests decoded together at most")
    group.add_argument("--max-queue", type=int, default=128, help="waiting requests at most (then 429)")
    group.add_argument("--max-model-len", type=int, default=None)
    group.add_argument("--prefill-chunk", type=int, default=512)
    group.add_argument("--request-timeout", type=float, default=600.0)
    group.add_argument(
        "--kv-cache-gb", type=float, default=None, help="KV budget (default: max-num-seqs full contexts)"
    )
    group.add_argument("--keep-kv", action="store_true", help="keep KV of DSLA layers: reverts are never deferred")


def engine_config(args) -> EngineConfig:
    return EngineConfig(
        max_num_seqs=args.max_num_seqs,
        max_queue=args.max_queue,
        max_model_len=args.max_model_len,
        prefill_chunk=args.prefill_chunk,
        request_timeout_s=args.request_timeout,
        kv_cache_bytes=int(args.kv_cache_gb * 2**30) if args.kv_cache_gb else None,
        keep_kv=args.keep_kv,
    )


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
    add_policy_arguments(parser)


def run(args) -> int:
    import torch
    import uvicorn

    from .models import load_model

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    device, dtype = device_and_dtype(args)
    model, tokenizer, name = load_model(args.model, dtype, device)
    logger.info("Serving %s on %s in %s", args.model, device, str(dtype).removeprefix("torch."))
    name = args.served_model_name or name
    engine = Engine(model, tokenizer, engine_config(args), make_policy(args, model), Metrics(name)).start()
    try:
        uvicorn.run(build_app(engine, tokenizer, name), host=args.host, port=args.port, log_level=args.log_level)
    finally:
        engine.stop()
    return 0
