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

from .sampling import MAX_LOGPROBS, SamplingParams, TokenLogprob


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


@dataclass(frozen=True)
class Limits:
    """What one request may take: the size of its body, and the time its head and its body may take to arrive."""

    max_body_bytes: int = 4 * 2**20
    body_timeout_s: float = 30.0
    header_timeout_s: float = 10.0


@dataclass
class ParsedRequest:
    """A validated completion or chat request: `prompts` (completions: texts or token ids, one choice each) or
    `messages` (chat); `logprobs`: the alternatives per token that the response lists (None: no logprobs)."""

    chat: bool
    model: str
    params: SamplingParams
    stream: bool = False
    include_usage: bool = False
    prompts: list[str | list[int]] = field(default_factory=list)
    messages: list[dict] = field(default_factory=list)
    max_tokens_given: bool = False
    echo: bool = False
    logprobs: int | None = None


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
# Legacy completions: `logprobs` is the number of alternatives; chat: a switch, and `top_logprobs` the number.
COMPLETION_FIELDS = {"echo": Field(bool, False), "logprobs": Field(int, low=0, high=MAX_LOGPROBS)}
CHAT_FIELDS = {"logprobs": Field(bool, False), "top_logprobs": Field(int, low=0, high=MAX_LOGPROBS)}
MAX_TOKENS = Field(int, low=0)  # 0 only with `echo` (the prompt scored alone, what lm-eval's loglikelihood asks)
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


def check_model(body: dict, served_model: str) -> str:
    model = body.get("model", served_model)
    if not isinstance(model, str):
        raise ProtocolError("'model' must be a string", param="model")
    if model != served_model:
        raise ProtocolError(f"The model `{model}` does not exist.", status=404, param="model")
    return model


def parse_request(body: dict, chat: bool, served_model: str, max_model_len: int) -> ParsedRequest:
    model = check_model(body, served_model)
    own = checked_fields(body, REQUEST_FIELDS)
    sampling = checked_fields(body, SAMPLING_FIELDS)
    if own["n"] != 1:
        raise ProtocolError("Only n=1 is supported (send a list of prompts for several completions)", param="n")
    if body.get("best_of") not in (None, 1):
        raise ProtocolError("Only best_of=1 is supported", param="best_of")
    echo, logprobs = parse_logprobs(body, chat)
    limit_name, max_tokens = parse_max_tokens(body, chat, max_model_len, echo)
    stop = parse_stop(body.get("stop"))
    include_usage = parse_include_usage(body.get("stream_options"), own["stream"])
    cap = max_tokens if max_tokens is not None else max_model_len
    if sampling["min_tokens"] > cap:
        message = f"'min_tokens' ({sampling['min_tokens']}) must not exceed '{limit_name}' ({cap})"
        raise ProtocolError(message, param="min_tokens")
    # Until the prompt length is known (the server then sets the default of max_tokens), the context's length.
    scored = logprobs if echo else None
    params = SamplingParams(max_tokens=cap, stop=stop, logprobs=logprobs, prompt_logprobs=scored, **sampling)
    parsed = ParsedRequest(chat, model, params, own["stream"], include_usage, max_tokens_given=max_tokens is not None)
    parsed.echo, parsed.logprobs = echo, logprobs
    if chat:
        parsed.messages = parse_messages(body.get("messages"))
    else:
        parsed.prompts = parse_prompts(body.get("prompt"))
    return parsed


def parse_logprobs(body: dict, chat: bool) -> tuple[bool, int | None]:
    """(echo the prompt, the alternatives per token or None for no logprobs), in the completions or chat format."""
    if not chat:
        values = checked_fields(body, COMPLETION_FIELDS)
        return values["echo"], values["logprobs"]
    values = checked_fields(body, CHAT_FIELDS)
    if not values["logprobs"]:
        if values["top_logprobs"]:
            raise ProtocolError("'top_logprobs' needs 'logprobs' to be true", param="top_logprobs")
        return False, None
    return False, values["top_logprobs"] or 0


def parse_max_tokens(body: dict, chat: bool, max_model_len: int, echo: bool = False) -> tuple[str, int | None]:
    """(the name the limit was given under, the limit or None); chat prefers `max_completion_tokens`."""
    name = "max_completion_tokens" if chat and body.get("max_completion_tokens") is not None else "max_tokens"
    value = checked(body, name, MAX_TOKENS)
    if value == 0 and not echo:
        raise ProtocolError(f"'{name}' must be >= 1 (0 only with 'echo', to score the prompt alone)", param=name)
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


def is_token_ids(value) -> bool:
    """A non-empty list of integers (a JSON boolean is none)."""
    return isinstance(value, list) and bool(value) and all(type(t) is int for t in value)


def parse_prompts(prompt) -> list[str | list[int]]:
    """The prompts of a completion request: a non-empty text or list of token ids, or a non-empty list of either
    (a batch: one choice each)."""
    if (isinstance(prompt, str) and prompt) or is_token_ids(prompt):
        return [prompt]
    if isinstance(prompt, list) and prompt:
        if all(isinstance(p, str) and p for p in prompt) or all(is_token_ids(p) for p in prompt):
            return list(prompt)
    if prompt == "" or (isinstance(prompt, list) and "" in prompt):
        raise ProtocolError("'prompt' must not be empty", param="prompt")
    raise ProtocolError(
        "'prompt' must be a non-empty string or list of token ids, or a list of either (a batch)", param="prompt"
    )


def parse_tokenize(body: dict, served_model: str) -> tuple[str | list[dict], bool, bool, bool]:
    """/tokenize (vLLM's): `prompt` or `messages` -> (prompt text or messages, add_special_tokens,
    add_generation_prompt, return_token_strs)."""
    check_model(body, served_model)
    chat = body.get("messages") is not None
    if chat == (body.get("prompt") is not None):
        raise ProtocolError("Give either 'prompt' (a string) or 'messages'", param="prompt")
    fields = {
        "add_special_tokens": Field(bool, not chat),  # a chat template adds its own
        "add_generation_prompt": Field(bool, True),
        "return_token_strs": Field(bool, False),
    }
    values = checked_fields(body, fields)
    if chat:
        source = parse_messages(body["messages"])
    elif isinstance(body["prompt"], str):
        source = body["prompt"]
    else:
        raise ProtocolError("'prompt' must be a string", param="prompt")
    return source, values["add_special_tokens"], values["add_generation_prompt"], values["return_token_strs"]


def parse_detokenize(body: dict, served_model: str, vocab_size: int) -> list[int]:
    """/detokenize (vLLM's): `tokens`, a list of token ids of the vocabulary."""
    check_model(body, served_model)
    tokens = body.get("tokens")
    if not (isinstance(tokens, list) and (not tokens or is_token_ids(tokens))):
        raise ProtocolError("'tokens' must be a list of token ids", param="tokens")
    if tokens and (min(tokens) < 0 or max(tokens) >= vocab_size):
        raise ProtocolError(f"Token ids must be in [0, {vocab_size})", param="tokens")
    return tokens


# --- responses -----------------------------------------------------------------------------------------------------


def new_id(chat: bool) -> str:
    return ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict:
    """OpenAI's usage; `prompt_tokens_details.cached_tokens` (prompt tokens served by the prefix cache) when any."""
    out = {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }
    if cached_tokens:
        out["prompt_tokens_details"] = {"cached_tokens": cached_tokens}
    return out


def _envelope(request_id: str, kind: str, model: str, choices: list[dict], **extra) -> dict:
    return {"id": request_id, "object": kind, "created": int(time.time()), "model": model, "choices": choices, **extra}


def _chunk_kind(chat: bool) -> str:
    return "chat.completion.chunk" if chat else "text_completion"


def choice(chat: bool, index: int, text: str | None, finish_reason: str | None, logprobs=None, delta=False) -> dict:
    """A choice of a response (`delta`: of a stream chunk; a chat chunk without text has an empty delta)."""
    if not chat:
        key, value = "text", text or ""
    elif delta:
        key, value = "delta", {} if text is None else {"content": text}
    else:
        key, value = "message", {"role": "assistant", "content": text}
    return {"index": index, key: value, "logprobs": logprobs, "finish_reason": finish_reason}


def role_choice() -> dict:
    """The first choice of a chat stream: the role, no text yet."""
    return {"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}


def response(request_id: str, chat: bool, model: str, choices: list[dict], usage_: dict) -> dict:
    return _envelope(request_id, "chat.completion" if chat else "text_completion", model, choices, usage=usage_)


def chunk(request_id: str, chat: bool, model: str, choices: list[dict]) -> dict:
    return _envelope(request_id, _chunk_kind(chat), model, choices)


def usage_chunk(request_id: str, chat: bool, model: str, usage_: dict) -> dict:
    return _envelope(request_id, _chunk_kind(chat), model, [], usage=usage_)


def sse(data: dict | str) -> bytes:
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n".encode()


# --- logprobs --------------------------------------------------------------------------------------------------------

UNLIKELY = -9999.0  # OpenAI's logprob for "very unlikely": JSON has no -Infinity (nor NaN)


def json_logprob(value: float) -> float:
    return value if value >= UNLIKELY else UNLIKELY  # NaN too


def byte_level_alphabet() -> dict[str, int]:
    """GPT-2's characters for bytes (how byte-level BPE vocabularies spell them), mapped back to the bytes."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1), *range(ord("\xae"), 256)]
    alphabet, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            alphabet[chr(byte)] = byte
        else:
            alphabet[chr(256 + extra)] = byte
            extra += 1
    return alphabet


class TokenText:
    """Each token's own text, `decode([id])` (how vLLM names tokens in logprobs), and its UTF-8 bytes, cached. A
    byte-level BPE token that holds part of a character decodes to U+FFFD: its bytes come from its vocabulary entry."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        decoder = getattr(getattr(tokenizer, "backend_tokenizer", None), "decoder", None)
        self.alphabet = byte_level_alphabet() if type(decoder).__name__ == "ByteLevel" else None
        self.texts: dict[int, str] = {}

    def text(self, token: int) -> str:
        text = self.texts.get(token)
        if text is None:
            text = self.texts[token] = self.tokenizer.decode([token], skip_special_tokens=False)
        return text

    def bytes(self, token: int) -> list[int]:
        text = self.text(token)
        if "\ufffd" in text and self.alphabet is not None:
            piece = self.tokenizer.convert_ids_to_tokens(token)
            if isinstance(piece, str) and all(c in self.alphabet for c in piece):
                return [self.alphabet[c] for c in piece]
        return list(text.encode("utf-8"))


def completion_logprobs(entries: list[TokenLogprob], names: TokenText, offset: int) -> dict:
    """OpenAI's legacy completions logprobs of these tokens, the first at text offset `offset` (each further by its
    text's length, as vLLM counts): the top alternatives of each token include the token itself."""
    tokens, values, tops, offsets = [], [], [], []
    for entry in entries:
        name = names.text(entry.token)
        tokens.append(name)
        offsets.append(offset)
        offset += len(name)
        if entry.logprob is None:  # the first prompt token: nothing predicts it
            values.append(None)
            tops.append(None)
            continue
        values.append(json_logprob(entry.logprob))
        top: dict[str, float] = {}
        for token, value in [*entry.top, (entry.token, entry.logprob)]:
            key = names.text(token)  # two tokens with one text (U+FFFD) keep the likelier value
            top[key] = max(top.get(key, UNLIKELY), json_logprob(value))
        tops.append(top)
    return {"tokens": tokens, "token_logprobs": values, "top_logprobs": tops, "text_offset": offsets}


def chat_logprobs(entries: list[TokenLogprob], names: TokenText) -> dict:
    """The chat format's logprobs of these tokens (`top_logprobs`: the alternatives alone)."""

    def named(token: int, value: float) -> dict:
        return {"token": names.text(token), "logprob": json_logprob(value), "bytes": names.bytes(token)}

    content = [{**named(e.token, e.logprob), "top_logprobs": [named(t, v) for t, v in e.top]} for e in entries]
    return {"content": content}


def extend_logprobs(total: dict | None, part: dict | None) -> dict | None:
    """Logprobs of more tokens appended (both formats are lists under fixed keys)."""
    if total is None or part is None:
        return total if part is None else part
    for key, values in total.items():
        values.extend(part[key])  # in place: a long answer appends one token at a time
    return total


# --- the tokenizer routes ------------------------------------------------------------------------------------------


def tokenize_response(tokens: list[int], max_model_len: int, token_strs: list[str] | None) -> dict:
    return {"count": len(tokens), "max_model_len": max_model_len, "tokens": tokens, "token_strs": token_strs}
