"""The OpenAI-compatible HTTP server (FastAPI + uvicorn) in front of the engine thread; `dsla serve` runs it.

Routes: POST /v1/completions, POST /v1/chat/completions (SSE streaming with `stream`, a usage chunk with
`stream_options.include_usage`, then `data: [DONE]`), GET /v1/models, /health, /metrics (Prometheus). Requests reach
the engine through thread-safe queues; a client that disconnects cancels its request. Prompts are never logged.
Hostile clients get a 4xx (`Limits`): a body too large (413), a head or body too slow (408, then the connection is
closed), malformed JSON or text (400).

    dsla serve --model smollm2 --port 8000 --policy adaptive
    curl localhost:8000/v1/completions -d '{"model": "SmolLM2-135M-Instruct", "prompt": "def f(x):", "max_tokens": 16}'
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import functools
import json
import logging
import socket
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from http import HTTPStatus

import h11

# FastAPI reads the handlers' annotations (strings here) from this module's globals: import its names at the top.
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect
from uvicorn.protocols.http.h11_impl import H11Protocol

from .engine import Engine, EngineStopped, Output, QueueFull
from .engine import Request as EngineRequest
from .openai_protocol import (
    ParsedRequest,
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

logger = logging.getLogger(__name__)

FAILURE_STATUS = {"timeout": 408, "abort": 503, "error": 500}
METRICS_MEDIA_TYPE = "text/plain; version=0.0.4; charset=utf-8"  # Prometheus' text format
DISCONNECT_POLL_S = 0.5  # how often a non-streaming request checks that its client is still there
CLOSE_AFTER = (408, 413)  # the rest of the body may still come (or never): end the connection


@dataclass(frozen=True)
class Limits:
    """What one request may take: the size of its body, and the time its head and its body may take to arrive."""

    max_body_bytes: int = 4 * 2**20
    body_timeout_s: float = 30.0
    header_timeout_s: float = 10.0


def error_response(message: str, status: int, param: str | None = None, kind: str | None = None) -> JSONResponse:
    return JSONResponse(ProtocolError(message, status, param, kind).body(), status_code=status)


def failure_status(out: Output) -> int | None:
    """The HTTP status of a request that ended without success, None when it succeeded."""
    if out.finish_reason in ("stop", "length"):
        return None
    return FAILURE_STATUS.get(out.finish_reason, 500)


# Every error, FastAPI's own included (404, 405, a malformed request), gets an OpenAI-style body.


async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
    return error_response(str(exc.detail), exc.status_code)


async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    return error_response(str(exc), 400)


async def internal_error(request: Request, exc: Exception) -> JSONResponse:
    logger.exception("Unhandled error in %s", request.url.path)
    return error_response(f"Internal server error: {type(exc).__name__}", 500, kind="InternalServerError")


@dataclass
class Submission:
    """A request in the engine, and the queue (in the event loop) that its outputs arrive on."""

    id: str
    parsed: ParsedRequest
    request: EngineRequest
    outputs: asyncio.Queue[Output]


class OpenAIRoutes:
    """The route handlers for one engine serving one model under `model_name`."""

    def __init__(self, engine: Engine, tokenizer, model_name: str, limits: Limits | None = None):
        self.engine = engine
        self.tokenizer = copy.deepcopy(tokenizer)  # the engine thread decodes with its own copy
        self.model_name = model_name
        self.limits = limits or Limits()
        self.created = int(time.time())

    async def health(self) -> Response:
        if self.engine.alive:
            return PlainTextResponse("")
        return error_response("The engine is not running", 503)

    async def models(self) -> Response:
        card = {
            "id": self.model_name,
            "object": "model",
            "created": self.created,
            "owned_by": "dsla-hf",
            "root": self.model_name,
            "max_model_len": self.engine.max_model_len,
        }
        return JSONResponse({"object": "list", "data": [card]})

    async def metrics(self) -> Response:
        return PlainTextResponse(self.engine.metrics.render(), media_type=METRICS_MEDIA_TYPE)

    async def completions(self, request: Request) -> Response:
        return await self.generate(request, chat=False)

    async def chat_completions(self, request: Request) -> Response:
        return await self.generate(request, chat=True)

    async def generate(self, raw: Request, chat: bool) -> Response:
        """Validate and queue a request, then answer it whole or as a stream of server-sent events."""
        try:
            sub = await self.submit(raw, chat)
        except ProtocolError as exc:
            headers = {"Connection": "close"} if exc.status in CLOSE_AFTER else None
            return JSONResponse(exc.body(), status_code=exc.status, headers=headers)
        except ValueError as exc:  # the prompt does not fit the context, or token ids out of the vocabulary
            return error_response(str(exc), 400)
        except QueueFull as exc:
            return error_response(str(exc), 429)
        except EngineStopped as exc:
            return error_response(str(exc), 503)
        if sub.parsed.stream:
            headers = {"Cache-Control": "no-cache", "X-Request-Id": sub.id}
            return StreamingResponse(self.stream(sub), media_type="text/event-stream", headers=headers)
        return await self.whole(raw, sub)

    async def read_body(self, raw: Request) -> bytes:
        """The body, refused with 413 beyond `max_body_bytes` (by its Content-Length before reading a byte) and with
        408 when it does not arrive whole within `body_timeout_s`."""
        limit, timeout = self.limits.max_body_bytes, self.limits.body_timeout_s
        too_large = ProtocolError(f"The request body is larger than {limit} bytes", 413)
        declared = raw.headers.get("content-length", "")
        # (h11 has checked the digits; 20 of them are beyond any limit, and int() refuses more than 4300)
        if declared.isdigit() and (len(declared) > 19 or int(declared) > limit):
            raise too_large

        async def receive() -> bytes:
            body = bytearray()
            async for part in raw.stream():
                body += part
                if len(body) > limit:
                    raise too_large
            return bytes(body)

        try:
            return await asyncio.wait_for(receive(), timeout)
        except asyncio.TimeoutError:
            raise ProtocolError(f"The request body did not arrive within {timeout:g} s", 408) from None
        except ClientDisconnect:  # nobody to answer; no error to log either
            raise ProtocolError("The client disconnected", 499) from None

    async def submit(self, raw: Request, chat: bool) -> Submission:
        body = parse_body(await self.read_body(raw))
        parsed = parse_request(body, chat, self.model_name, self.engine.max_model_len)
        prompt_ids = self.encode(parsed)
        if not parsed.max_tokens_given:
            parsed.params.max_tokens = max(1, self.engine.max_model_len - len(prompt_ids))
            if parsed.params.min_tokens > parsed.params.max_tokens:
                message = f"'min_tokens' ({parsed.params.min_tokens}) exceeds the {parsed.params.max_tokens} tokens "
                raise ProtocolError(message + "the context leaves after the prompt", param="min_tokens")
        loop = asyncio.get_running_loop()
        outputs: asyncio.Queue[Output] = asyncio.Queue()

        def sink(out: Output) -> None:  # called from the engine thread
            with contextlib.suppress(RuntimeError):  # the loop is gone (shutdown)
                loop.call_soon_threadsafe(outputs.put_nowait, out)

        request = self.engine.submit(prompt_ids, parsed.params, sink)
        return Submission(new_id(chat), parsed, request, outputs)

    def encode(self, parsed: ParsedRequest) -> list[int]:
        if parsed.chat:
            try:
                text = self.tokenizer.apply_chat_template(parsed.messages, add_generation_prompt=True, tokenize=False)
            except Exception as exc:  # a template that rejects these messages (e.g. roles out of order)
                raise ProtocolError(f"The chat template rejected the messages: {exc}", param="messages") from None
            return self.tokenizer(text, add_special_tokens=False)["input_ids"]
        if isinstance(parsed.prompt, str):
            return self.tokenizer(parsed.prompt)["input_ids"]
        return list(parsed.prompt)

    async def whole(self, raw: Request, sub: Submission) -> Response:
        """The completion as one JSON body; a client that disconnects meanwhile cancels the request."""
        parts, checked = [], time.monotonic()
        while True:
            try:
                out = await asyncio.wait_for(sub.outputs.get(), timeout=DISCONNECT_POLL_S)
            except asyncio.TimeoutError:
                out = None
            if time.monotonic() - checked >= DISCONNECT_POLL_S:  # also while tokens flow, not only in pauses
                checked = time.monotonic()
                if await raw.is_disconnected():
                    sub.request.cancel()
                    return error_response("The client disconnected", 499)
            if out is None:
                continue
            parts.append(out.text)
            if out.finished:
                break
        status = failure_status(out)
        if status is not None:
            return error_response(out.error or "The request failed", status)
        text, tokens = "".join(parts), usage(out.prompt_tokens, out.completion_tokens)
        return JSONResponse(response(sub.id, sub.parsed.chat, self.model_name, text, out.finish_reason, tokens))

    async def stream(self, sub: Submission) -> AsyncIterator[bytes]:
        """Server-sent events: (chat: a role chunk), text chunks, the last one with its finish reason, (a usage
        chunk), `[DONE]`; a failure is an error event instead. A client that goes away cancels the request."""
        chat, name, finished = sub.parsed.chat, self.model_name, False
        try:
            if chat:
                yield sse(chunk(sub.id, chat, name, None, None, role=True))
            while not finished:
                out = await sub.outputs.get()
                finished = out.finished
                status = failure_status(out) if finished else None
                if status is not None:
                    yield sse(error_body(out.error or "The request failed", status, kind="StreamError"))
                    break
                if out.text or finished:
                    yield sse(chunk(sub.id, chat, name, out.text, out.finish_reason))
                if finished and sub.parsed.include_usage:
                    yield sse(usage_chunk(sub.id, chat, name, usage(out.prompt_tokens, out.completion_tokens)))
            yield sse("[DONE]")
        finally:
            if not finished:  # the client went away (the generator was closed or cancelled)
                sub.request.cancel()


def build_app(engine: Engine, tokenizer, model_name: str, limits: Limits | None = None) -> FastAPI:
    """The FastAPI app serving `engine` under `model_name`; run it with `uvicorn_options(app)`."""
    routes = OpenAIRoutes(engine, tokenizer, model_name, limits)
    app = FastAPI(title="DSLA-Serve")
    app.state.limits = routes.limits
    app.add_exception_handler(HTTPException, http_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(Exception, internal_error)
    app.add_api_route("/health", routes.health, methods=["GET"])
    app.add_api_route("/v1/models", routes.models, methods=["GET"])
    app.add_api_route("/metrics", routes.metrics, methods=["GET"])
    app.add_api_route("/v1/completions", routes.completions, methods=["POST"])
    app.add_api_route("/v1/chat/completions", routes.chat_completions, methods=["POST"])
    return app


def raw_error(status: int, message: str) -> bytes:
    """A whole HTTP response with an OpenAI-style error body that closes the connection."""
    body = json.dumps(error_body(message, status)).encode()
    head = f"HTTP/1.1 {status} {HTTPStatus(status).phrase}\r\ncontent-type: application/json\r\n"
    return f"{head}content-length: {len(body)}\r\nconnection: close\r\n\r\n".encode() + body


class GuardedH11Protocol(H11Protocol):
    """uvicorn's HTTP/1.1 protocol with a deadline for each request head, from the connection's start or the head's
    first byte: uvicorn has none, so a client that trickles its headers, or sends nothing, holds its connection
    forever (its keep-alive timeout only covers idle time between requests, and any byte cancels it). Its own 400s
    (malformed HTTP) get an OpenAI-style body."""

    def __init__(self, *args, header_timeout_s: float = Limits.header_timeout_s, **kwargs):
        super().__init__(*args, **kwargs)
        self.header_timeout_s = header_timeout_s
        self.head_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:
        super().connection_made(transport)
        self.head_timer = self.loop.call_later(self.header_timeout_s, self.head_timed_out)

    def data_received(self, data: bytes) -> None:
        if self.head_timer is None and self.awaiting_head():
            self.head_timer = self.loop.call_later(self.header_timeout_s, self.head_timed_out)
        super().data_received(data)

    def on_response_complete(self) -> None:
        self.cancel_head_timer()  # the next head's first byte starts the next deadline
        super().on_response_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        self.cancel_head_timer()
        super().connection_lost(exc)

    def cancel_head_timer(self) -> None:
        if self.head_timer is not None:
            self.head_timer.cancel()
            self.head_timer = None

    def awaiting_head(self) -> bool:
        return self.cycle is None or self.cycle.response_complete

    def head_timed_out(self) -> None:
        self.head_timer = None
        if not self.awaiting_head() or self.transport.is_closing():
            return  # the head arrived: the app's body timeout takes over
        if self.conn.our_state is h11.IDLE:  # else a response was sent already (the app did not read the body)
            self.transport.write(raw_error(408, f"The request head did not arrive within {self.header_timeout_s:g} s"))
        self.transport.close()

    def send_400_response(self, msg: str) -> None:
        self.transport.write(raw_error(400, msg))
        self.transport.close()


def uvicorn_options(app: FastAPI) -> dict:
    """uvicorn's options for an app of `build_app`: the guarded protocol, with the app's header timeout. The other
    bounds are uvicorn's defaults: `timeout_keep_alive` (5 s idle between requests) and
    `h11_max_incomplete_event_size` (16 KiB of request head)."""
    limits = getattr(app.state, "limits", Limits())
    return {"http": functools.partial(GuardedH11Protocol, header_timeout_s=limits.header_timeout_s)}


class ServerThread:
    """Run an app with uvicorn in a background thread on a free loopback port (tests, benchmarks)."""

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0):
        import uvicorn

        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://{host}:{self.port}"
        config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=2, **uvicorn_options(app))
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
