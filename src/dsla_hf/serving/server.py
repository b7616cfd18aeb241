"""The OpenAI-compatible HTTP server (FastAPI + uvicorn) in front of the engine thread; `dsla serve` runs it.

Routes: POST /v1/completions (a prompt or a batch of them, one choice each; `logprobs` and `echo` in OpenAI's legacy
format), POST /v1/chat/completions (`logprobs`, `top_logprobs`), both with SSE streaming (`stream`, a usage chunk with
`stream_options.include_usage`, then `data: [DONE]`); vLLM's POST /tokenize and /detokenize, GET /version;
GET /v1/models, /health, /metrics (Prometheus). Logprobs are those of the model's own distribution (log-softmax of
the raw logits, before min_tokens, temperature and top-p: vLLM's default); a prompt's are computed (every position's
logits) only for requests with `echo` and `logprobs`. Requests reach the engine through thread-safe queues; a client
that disconnects cancels its request. Prompts are never logged.
Hostile clients get a 4xx (`Limits`): a body too large (413), a head or body too slow (408, then the connection is
closed), malformed JSON or text (400).

    dsla serve --model smollm2 --port 8000 --policy adaptive
    curl localhost:8000/v1/completions -d '{"model": "SmolLM2-135M-Instruct", "prompt": "def f(x):", "max_tokens": 16}'
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import dataclasses
import functools
import json
import logging
import socket
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from http import HTTPStatus

import h11

# FastAPI reads the handlers' annotations (strings here) from this module's globals: import its names at the top.
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect
from uvicorn.protocols.http.h11_impl import H11Protocol

from .. import __version__
from .engine import Engine, EngineStopped, Output, QueueFull
from .engine import Request as EngineRequest
from .openai_protocol import (
    Limits,
    ParsedRequest,
    ProtocolError,
    TokenText,
    chat_logprobs,
    choice,
    chunk,
    completion_logprobs,
    error_body,
    extend_logprobs,
    new_id,
    parse_body,
    parse_detokenize,
    parse_request,
    parse_tokenize,
    response,
    role_choice,
    sse,
    tokenize_response,
    usage,
    usage_chunk,
)
from .sampling import SamplingParams

logger = logging.getLogger(__name__)

FAILURE_STATUS = {"timeout": 408, "abort": 503, "error": 500}
METRICS_MEDIA_TYPE = "text/plain; version=0.0.4; charset=utf-8"  # Prometheus' text format
DISCONNECT_POLL_S = 0.5  # how often a non-streaming request checks that its client is still there
CLOSE_AFTER = (408, 413)  # the rest of the body may still come (or never): end the connection


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
class Choice:
    """One choice (one prompt's completion) of a request, as its outputs arrive."""

    index: int
    request: EngineRequest
    echo: str | None = None  # the prompt's text, answered before the completion (completions with `echo`)
    offset: int = 0  # the text offset of the next output token (completions' logprobs)
    started: bool = False
    last: Output | None = None  # its final output, once it arrived


@dataclass
class Submission:
    """A request in the engine (one engine request per prompt), and the queue (in the event loop) that their
    outputs arrive on, with the index of their choice."""

    id: str
    parsed: ParsedRequest
    choices: list[Choice] = field(default_factory=list)
    outputs: asyncio.Queue[tuple[int, Output]] = field(default_factory=asyncio.Queue)
    polled: float = field(default_factory=time.monotonic)  # when the client was last seen connected

    def cancel(self) -> None:
        for item in self.choices:
            item.request.cancel()

    def usage(self) -> dict:
        finished = [c.last for c in self.choices if c.last is not None]
        return usage(
            prompt_tokens=sum(o.prompt_tokens for o in finished),
            completion_tokens=sum(o.completion_tokens for o in finished),
            cached_tokens=sum(o.cached_tokens for o in finished),
            modes=[o.modes for o in finished],
        )


def error_for(exc: Exception) -> JSONResponse:
    """The error response of a request that was refused before it reached the engine, or by the engine."""
    if isinstance(exc, ProtocolError):
        headers = {"Connection": "close"} if exc.status in CLOSE_AFTER else None
        return JSONResponse(exc.body(), status_code=exc.status, headers=headers)
    if isinstance(exc, QueueFull):
        return error_response(str(exc), 429)
    if isinstance(exc, EngineStopped):
        return error_response(str(exc), 503)
    return error_response(str(exc), 400)  # ValueError: a prompt that does not fit, or ids out of the vocabulary


REFUSED = (ProtocolError, ValueError, QueueFull, EngineStopped)


class OpenAIRoutes:
    """The route handlers for one engine serving one model under `model_name`."""

    def __init__(self, engine: Engine, tokenizer, model_name: str, limits: Limits | None = None):
        self.engine = engine
        self.tokenizer = copy.deepcopy(tokenizer)  # the engine thread decodes with its own copy
        self.names = TokenText(self.tokenizer)
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

    async def version(self) -> Response:
        return JSONResponse({"version": __version__})

    async def tokenize(self, raw: Request) -> Response:
        """vLLM's /tokenize: a prompt, or chat messages through the chat template, as token ids."""
        try:
            source, special, generation, strs = parse_tokenize(parse_body(await self.read_body(raw)), self.model_name)
            if isinstance(source, list):
                source = self.chat_text(source, generation)
            tokens = self.tokenizer(source, add_special_tokens=special)["input_ids"]
        except REFUSED as exc:
            return error_for(exc)
        names = self.tokenizer.convert_ids_to_tokens(tokens) if strs else None
        return JSONResponse(tokenize_response(tokens, self.engine.max_model_len, names))

    async def detokenize(self, raw: Request) -> Response:
        """vLLM's /detokenize: token ids as text (special tokens included)."""
        try:
            vocab = self.engine.model.config.vocab_size
            tokens = parse_detokenize(parse_body(await self.read_body(raw)), self.model_name, vocab)
            text = self.decode(tokens)
        except REFUSED as exc:
            return error_for(exc)
        return JSONResponse({"prompt": text})

    def decode(self, tokens: list[int]) -> str:
        try:
            return self.tokenizer.decode(tokens)
        except Exception as exc:  # ids of the model's vocabulary that the tokenizer lacks (a padded embedding)
            raise ProtocolError(f"The tokens could not be decoded: {type(exc).__name__}", param="tokens") from None

    async def completions(self, request: Request) -> Response:
        return await self.generate(request, chat=False)

    async def chat_completions(self, request: Request) -> Response:
        return await self.generate(request, chat=True)

    async def generate(self, raw: Request, chat: bool) -> Response:
        """Validate and queue a request, then answer it whole or as a stream of server-sent events."""
        try:
            sub = await self.submit(raw, chat)
        except REFUSED as exc:
            return error_for(exc)
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
        """Parse a request and queue one engine request per prompt: all of them, or none (every prompt is checked
        first; should the queue fill up midway, those queued are cancelled)."""
        body = parse_body(await self.read_body(raw))
        parsed = parse_request(body, chat, self.model_name, self.engine.max_model_len)
        if len(parsed.prompts) > self.engine.config.max_queue:
            message = f"{len(parsed.prompts)} prompts, more than the {self.engine.config.max_queue} the queue holds"
            raise ProtocolError(message, param="prompt")
        prompts = self.encode(parsed)
        params = [self.params_for(parsed, ids) for ids in prompts]
        for index, (ids, p) in enumerate(zip(prompts, params)):
            try:
                self.engine.check_prompt(ids, p)
            except ValueError as exc:  # in a batch, say which prompt
                raise ValueError(f"Prompt {index}: {exc}" if len(prompts) > 1 else str(exc)) from None
        sub = Submission(new_id(chat), parsed)
        loop = asyncio.get_running_loop()
        try:
            for index, (ids, p) in enumerate(zip(prompts, params)):
                request = self.engine.submit(ids, p, self.sink(loop, sub.outputs, index))
                echo = self.echo_text(parsed, index, ids) if parsed.echo else None
                sub.choices.append(Choice(index, request, echo, offset=len(echo or "")))
        except BaseException:
            sub.cancel()
            raise
        return sub

    @staticmethod
    def sink(loop: asyncio.AbstractEventLoop, outputs: asyncio.Queue, index: int) -> Callable[[Output], None]:
        def put(out: Output) -> None:  # called from the engine thread
            with contextlib.suppress(RuntimeError):  # the loop is gone (shutdown)
                loop.call_soon_threadsafe(outputs.put_nowait, (index, out))

        return put

    def params_for(self, parsed: ParsedRequest, prompt_ids: list[int]) -> SamplingParams:
        """The request's sampling parameters for one prompt: without `max_tokens`, what the context leaves."""
        params = parsed.params
        if parsed.max_tokens_given:
            return params
        room = max(1, self.engine.max_model_len - len(prompt_ids))
        if params.min_tokens > room:
            message = f"'min_tokens' ({params.min_tokens}) exceeds the {room} tokens "
            raise ProtocolError(message + "the context leaves after the prompt", param="min_tokens")
        return dataclasses.replace(params, max_tokens=room)

    def echo_text(self, parsed: ParsedRequest, index: int, prompt_ids: list[int]) -> str:
        prompt = parsed.prompts[index]
        return prompt if isinstance(prompt, str) else self.tokenizer.decode(prompt_ids)

    def chat_text(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        try:
            return self.tokenizer.apply_chat_template(
                messages, add_generation_prompt=add_generation_prompt, tokenize=False
            )
        except Exception as exc:  # a template that rejects these messages (e.g. roles out of order)
            raise ProtocolError(f"The chat template rejected the messages: {exc}", param="messages") from None

    def encode(self, parsed: ParsedRequest) -> list[list[int]]:
        if parsed.chat:
            return [self.tokenizer(self.chat_text(parsed.messages), add_special_tokens=False)["input_ids"]]
        texts = [p for p in parsed.prompts if isinstance(p, str)]
        if not texts:
            return [list(p) for p in parsed.prompts]
        return self.tokenizer(texts)["input_ids"]  # one call for the batch (the prompts are all texts, or all ids)

    def delta(self, sub: Submission, item: Choice, out: Output) -> tuple[str, dict | None]:
        """The text and logprobs (in the request's format; None without) that an output adds to its choice: the
        first one also brings the echoed prompt and its logprobs."""
        text, entries = out.text, out.logprobs or []
        first = not item.started
        item.started = True
        if first and item.echo is not None:
            text = item.echo + text
        if sub.parsed.logprobs is None:
            return text, None
        if sub.parsed.chat:
            return text, chat_logprobs(entries, self.names)
        logprobs = completion_logprobs(entries, self.names, item.offset)
        item.offset += sum(map(len, logprobs["tokens"]))
        if first and out.prompt_logprobs is not None:
            logprobs = extend_logprobs(completion_logprobs(out.prompt_logprobs, self.names, 0), logprobs)
        return text, logprobs

    async def next_output(self, raw: Request, sub: Submission) -> tuple[int, Output] | None:
        """The next output of any choice; None when the client disconnected (the request is then cancelled)."""
        while True:
            try:
                item = await asyncio.wait_for(sub.outputs.get(), timeout=DISCONNECT_POLL_S)
            except asyncio.TimeoutError:
                item = None
            if time.monotonic() - sub.polled >= DISCONNECT_POLL_S:  # also while tokens flow, not only in pauses
                sub.polled = time.monotonic()
                if await raw.is_disconnected():
                    sub.cancel()
                    return None
            if item is not None:
                return item

    async def whole(self, raw: Request, sub: Submission) -> Response:
        """The completion as one JSON body; a client that disconnects meanwhile cancels the request."""
        chat, n = sub.parsed.chat, len(sub.choices)
        texts: list[list[str]] = [[] for _ in range(n)]
        logprobs: list[dict | None] = [None] * n
        remaining = n
        while remaining:
            item = await self.next_output(raw, sub)
            if item is None:
                return error_response("The client disconnected", 499)
            index, out = item
            status = failure_status(out) if out.finished else None
            if status is not None:
                sub.cancel()
                return error_response(out.error or "The request failed", status)
            text, part = self.delta(sub, sub.choices[index], out)
            texts[index].append(text)
            logprobs[index] = extend_logprobs(logprobs[index], part)
            if out.finished:
                sub.choices[index].last = out
                remaining -= 1
        ends = [c.last.finish_reason for c in sub.choices]
        choices = [choice(chat, i, "".join(texts[i]), ends[i], logprobs[i]) for i in range(n)]
        return JSONResponse(response(sub.id, chat, self.model_name, choices, sub.usage()))

    async def stream(self, sub: Submission) -> AsyncIterator[bytes]:
        """Server-sent events: (chat: a role chunk), text chunks of each choice (with their tokens' logprobs when
        asked), the last one of each with its finish reason, (a usage chunk), `[DONE]`; a failure is an error event
        instead. A client that goes away cancels the request."""
        chat, name, remaining = sub.parsed.chat, self.model_name, len(sub.choices)
        try:
            if chat:
                yield sse(chunk(sub.id, chat, name, [role_choice()]))
            while remaining:
                index, out = await sub.outputs.get()
                status = failure_status(out) if out.finished else None
                if status is not None:
                    yield sse(error_body(out.error or "The request failed", status, kind="StreamError"))
                    break
                text, part = self.delta(sub, sub.choices[index], out)
                if text or out.finished or part:
                    item = choice(chat, index, text, out.finish_reason, part, delta=True)
                    yield sse(chunk(sub.id, chat, name, [item]))
                if out.finished:
                    sub.choices[index].last = out
                    remaining -= 1
            if not remaining and sub.parsed.include_usage:
                yield sse(usage_chunk(sub.id, chat, name, sub.usage()))
            yield sse("[DONE]")
        finally:
            if remaining:  # a choice failed, or the client went away (the generator was closed or cancelled)
                sub.cancel()


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
    app.add_api_route("/tokenize", routes.tokenize, methods=["POST"])
    app.add_api_route("/detokenize", routes.detokenize, methods=["POST"])
    app.add_api_route("/version", routes.version, methods=["GET"])
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
