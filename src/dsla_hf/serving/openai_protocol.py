"""The OpenAI API as DSLA-Serve speaks it: validation of request bodies (every mistake is a 4xx with an OpenAI-style
error body, never a 5xx) and the shapes of responses, stream chunks and errors."""

from __future__ import annotations

import codecs
import itertools
import json
import math
import re
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from .sampling import SamplingParams


class ProtocolError(Exception):
    def __init__(self, message: str, status: int = 400, param: str | None = None, kind: str | None = None):
        super().__init__(message)
        self.message, self.status, self.param = message, status, param
        self.kind = kind or {404: "NotFoundError", 429: "RateLimitError", 503: "ServiceUnavailableError"}.get(
            status, "invalid_request_error"
        )

    def body(self) -> dict:
        return error_body(self.message, self.status, self.param, self.kind)


def error_body(message: str, status: int, param: str | None = None, kind: str = "invalid_request_error") -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": status}}


@dataclass
class ParsedRequest:
    """A validated completion or chat request; `prompt` is text or token ids, or `messages` for chat."""

    chat: bool
    model: str
    params: SamplingParams
    stream: bool = False
    include_usage: bool = False
    prompt: str | list[int] | None = None
    messages: list[dict] = field(default_factory=list)
    max_tokens_given: bool = False


# --- requests ------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Field:
    """A scalar field of a request body: its type (bool, int or float), default and bounds."""

    kind: type
    default: Any = None
    low: float | None = None
    high: float | None = None
    strict_low: bool = False  # `low` itself is out of range


# JSON types each kind accepts (a JSON boolean is never a number here) and how errors name them.
ACCEPTED = {bool: (bool,), int: (int,), float: (int, float)}
TYPE_NAMES = {bool: "a boolean", int: "an integer", float: "a number"}

# Scalar fields that go to SamplingParams as they are, and the request's own ones.
SAMPLING_FIELDS = {
    "temperature": Field(float, 1.0, low=0.0, high=2.0),
    "top_p": Field(float, 1.0, low=0.0, high=1.0, strict_low=True),
    "seed": Field(int, low=-(2**63), high=2**64 - 1),  # what torch.Generator.manual_seed takes
    "min_tokens": Field(int, 0, low=0),
    "ignore_eos": Field(bool, False),
}
REQUEST_FIELDS = {"n": Field(int, 1), "stream": Field(bool, False)}
MAX_TOKENS = Field(int, low=1)
INCLUDE_USAGE = Field(bool, False)
MAX_STOP_STRINGS = 16


def checked(body: dict, name: str, spec: Field):
    """`body[name]` checked against `spec` (absent or null: the default)."""
    value = body.get(name)
    if value is None:
        return spec.default
    if not isinstance(value, ACCEPTED[spec.kind]) or (isinstance(value, bool) and spec.kind is not bool):
        raise ProtocolError(f"'{name}' must be {TYPE_NAMES[spec.kind]}", param=name)
    if spec.kind is float and not finite(value):  # NaN passes every bound check, and sampling with it fails
        raise ProtocolError(f"'{name}' must be a finite number", param=name)
    if spec.low is not None and (value <= spec.low if spec.strict_low else value < spec.low):
        raise ProtocolError(f"'{name}' must be {'>' if spec.strict_low else '>='} {spec.low}, got {value}", param=name)
    if spec.high is not None and value > spec.high:
        raise ProtocolError(f"'{name}' must be <= {spec.high}, got {value}", param=name)
    return spec.kind(value)


def finite(value: int | float) -> bool:
    try:
        return math.isfinite(value)
    except OverflowError:  # an integer beyond any float
        return False


def checked_fields(body: dict, fields: dict[str, Field]) -> dict[str, Any]:
    return {name: checked(body, name, spec) for name, spec in fields.items()}


# --- the body: JSON, not too deep, with valid text -------------------------------------------------------------------

MAX_JSON_DEPTH = 64  # arrays and objects in arrays and objects; a request needs about 5
# A JSON string; an unterminated one runs to the end, so that the match never fails (and never backtracks).
JSON_STRING = re.compile(rb'"(?:[^"\\]+|\\.)*(?:"|\\?\Z)', re.DOTALL)
NOT_BRACKETS = bytes(sorted(set(range(256)) - set(b"[]{}")))
BRACKET_STEP = {ord("["): 1, ord("{"): 1, ord("]"): -1, ord("}"): -1}
# A lone surrogate in the text (from an invalid byte) or maybe in a string (a \uD800-\uDFFF escape).
SURROGATE_HINT = re.compile(r"[\ud800-\udfff]|\\u[dD][89a-fA-F]")


def json_depth(raw: bytes) -> int:
    """How deep arrays and objects nest in JSON text (an upper bound for invalid text), found without parsing: the
    parser recurses, and deep enough text makes it fail with RecursionError or worse. Brackets in strings don't
    count."""
    if raw.count(b"[") + raw.count(b"{") <= MAX_JSON_DEPTH:
        return 0  # too few brackets to matter
    brackets = JSON_STRING.sub(b"", raw).translate(None, NOT_BRACKETS)
    return max(itertools.accumulate(map(BRACKET_STEP.__getitem__, brackets)), default=0)


def reject_constant(name: str) -> None:  # NaN and the infinities, which json.loads takes by default
    raise ValueError(f"{name} is not a JSON number")


def parse_body(raw: bytes) -> dict:
    """The request body as a JSON object, with arrays and objects nested at most MAX_JSON_DEPTH deep and every
    string valid UTF-8 text."""
    depth = json_depth(raw)
    if depth > MAX_JSON_DEPTH:
        raise ProtocolError(f"The request body nests arrays and objects {depth} deep, more than {MAX_JSON_DEPTH}")
    # Invalid bytes become lone surrogates, which check_text then reports with the field that holds them.
    text = raw.removeprefix(codecs.BOM_UTF8).decode("utf-8", "surrogateescape")
    try:
        body = json.loads(text, parse_constant=reject_constant)
    except (ValueError, RecursionError) as error:  # RecursionError: should json_depth ever miss
        raise ProtocolError(f"The request body is not valid JSON: {error}") from None
    if not isinstance(body, dict):
        raise ProtocolError("The request body must be a JSON object")
    if SURROGATE_HINT.search(text):
        check_text(body)
    return body


def is_text(s: str) -> bool:
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def check_text(body: dict) -> None:
    """Every string, keys included, must be UTF-8 text: a lone surrogate survives json.loads, then fails in the
    tokenizer or when a response echoes it. The error names the field (as `messages[0].content`)."""
    stack: list[tuple[str, Any]] = [("", body)]
    while stack:
        path, value = stack.pop()
        if isinstance(value, dict):
            for key, item in value.items():
                name = f"{path}.{key}" if path else key
                if not is_text(key):
                    name = name.encode("utf-8", "backslashreplace").decode()
                    raise ProtocolError(f"The key '{name}' is not valid UTF-8 text", param=name)
                stack.append((name, item))
        elif isinstance(value, list):
            stack.extend((f"{path}[{i}]", item) for i, item in enumerate(value) if isinstance(item, (str, list, dict)))
        elif isinstance(value, str) and not is_text(value):
            raise ProtocolError(f"'{path}' is not valid UTF-8 text (an invalid byte or a lone surrogate)", param=path)


def parse_request(body: dict, chat: bool, served_model: str, max_model_len: int) -> ParsedRequest:
    model = body.get("model", served_model)
    if not isinstance(model, str):
        raise ProtocolError("'model' must be a string", param="model")
    if model != served_model:
        raise ProtocolError(f"The model `{model}` does not exist.", status=404, param="model")
    own = checked_fields(body, REQUEST_FIELDS)
    sampling = checked_fields(body, SAMPLING_FIELDS)
    if own["n"] != 1:
        raise ProtocolError("Only n=1 is supported", param="n")
    if body.get("best_of") not in (None, 1):
        raise ProtocolError("Only best_of=1 is supported", param="best_of")
    limit_name, max_tokens = parse_max_tokens(body, chat, max_model_len)
    stop = parse_stop(body.get("stop"))
    include_usage = parse_include_usage(body.get("stream_options"), own["stream"])
    cap = max_tokens if max_tokens is not None else max_model_len
    if sampling["min_tokens"] > cap:
        message = f"'min_tokens' ({sampling['min_tokens']}) must not exceed '{limit_name}' ({cap})"
        raise ProtocolError(message, param="min_tokens")
    # Until the prompt length is known (the server then sets the default of max_tokens), the context's length.
    params = SamplingParams(max_tokens=cap, stop=stop, **sampling)
    parsed = ParsedRequest(chat, model, params, own["stream"], include_usage, max_tokens_given=max_tokens is not None)
    if chat:
        parsed.messages = parse_messages(body.get("messages"))
    else:
        parsed.prompt = parse_prompt(body.get("prompt"))
    return parsed


def parse_max_tokens(body: dict, chat: bool, max_model_len: int) -> tuple[str, int | None]:
    """(the name the limit was given under, the limit or None); chat prefers `max_completion_tokens`."""
    name = "max_completion_tokens" if chat and body.get("max_completion_tokens") is not None else "max_tokens"
    value = checked(body, name, MAX_TOKENS)
    if value is not None and value > max_model_len:
        raise ProtocolError(
            f"'{name}' is {value}, more than the model's maximum context length of {max_model_len} tokens", param=name
        )
    return name, value


def parse_stop(stop) -> list[str]:
    if stop is None:
        return []
    if isinstance(stop, str):
        return [stop]
    if not (isinstance(stop, list) and all(isinstance(s, str) for s in stop)) or len(stop) > MAX_STOP_STRINGS:
        raise ProtocolError(f"'stop' must be a string or a list of at most {MAX_STOP_STRINGS} strings", param="stop")
    return stop


def parse_include_usage(options, stream: bool) -> bool:
    if options is not None and not isinstance(options, dict):
        raise ProtocolError("'stream_options' must be an object", param="stream_options")
    include_usage = checked(options or {}, "include_usage", INCLUDE_USAGE)
    if include_usage and not stream:
        raise ProtocolError("'stream_options' is only allowed when 'stream' is true", param="stream_options")
    return include_usage


def parse_messages(messages) -> list[dict]:
    """Chat messages as {"role", "content"} with text content (OpenAI's text content parts are joined)."""
    if not isinstance(messages, list) or not messages:
        raise ProtocolError("'messages' must be a non-empty list", param="messages")
    parsed = []
    for message in messages:
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise ProtocolError("Each message must be an object with a string 'role'", param="messages")
        content = message.get("content")
        if isinstance(content, list):
            if not all(isinstance(p, dict) and p.get("type") == "text" for p in content):
                raise ProtocolError("Only text content parts are supported", param="messages")
            if not all(isinstance(p.get("text"), str) for p in content):
                raise ProtocolError("Each text content part needs a string 'text'", param="messages")
            content = "".join(p["text"] for p in content)
        elif not isinstance(content, str):
            raise ProtocolError("Each message's 'content' must be a string", param="messages")
        parsed.append({"role": message["role"], "content": content})
    return parsed


def parse_prompt(prompt) -> str | list[int]:
    """One prompt: non-empty text or token ids (a batch of one is taken as its prompt)."""
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]
    if isinstance(prompt, str) and prompt:
        return prompt
    if isinstance(prompt, str):
        raise ProtocolError("'prompt' must not be empty", param="prompt")
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        return prompt
    raise ProtocolError("'prompt' must be a non-empty string or list of token ids (one prompt)", param="prompt")


# --- responses -----------------------------------------------------------------------------------------------------


def new_id(chat: bool) -> str:
    return ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def _choice(key: str, value: Any, finish_reason: str | None) -> dict:
    return {"index": 0, key: value, "logprobs": None, "finish_reason": finish_reason}


def _envelope(request_id: str, kind: str, model: str, choices: list[dict], **extra) -> dict:
    return {"id": request_id, "object": kind, "created": int(time.time()), "model": model, "choices": choices, **extra}


def _chunk_kind(chat: bool) -> str:
    return "chat.completion.chunk" if chat else "text_completion"


def response(request_id: str, chat: bool, model: str, text: str, finish_reason: str, usage_: dict) -> dict:
    if chat:
        choice = _choice("message", {"role": "assistant", "content": text}, finish_reason)
    else:
        choice = _choice("text", text, finish_reason)
    kind = "chat.completion" if chat else "text_completion"
    return _envelope(request_id, kind, model, [choice], usage=usage_)


def chunk(request_id: str, chat: bool, model: str, text: str | None, finish_reason: str | None, role=False) -> dict:
    if chat:
        delta: dict[str, Any] = {"role": "assistant", "content": ""} if role else {}
        if text is not None and not role:
            delta["content"] = text
        choice = _choice("delta", delta, finish_reason)
    else:
        choice = _choice("text", text or "", finish_reason)
    return _envelope(request_id, _chunk_kind(chat), model, [choice])


def usage_chunk(request_id: str, chat: bool, model: str, usage_: dict) -> dict:
    return _envelope(request_id, _chunk_kind(chat), model, [], usage=usage_)


def sse(data: dict | str) -> bytes:
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n".encode()
