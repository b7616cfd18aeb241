"""The OpenAI API as DSLA-Serve speaks it: request bodies (read under a nesting bound and checked as UTF-8 text, then
parsed by strict pydantic models; every mistake is a 4xx with an OpenAI-style error body naming the field, never a
5xx) and the shapes of responses, stream chunks and errors."""

from __future__ import annotations

import codecs
import itertools
import json
import re
import time
import uuid
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

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


class StrictBody(BaseModel):
    """JSON as OpenAI's API takes it: no coercion (a string is no number, a boolean no integer, a float no integer),
    JSON null the same as an absent field, unknown fields ignored."""

    model_config = ConfigDict(strict=True, extra="ignore")

    @model_validator(mode="before")
    @classmethod
    def null_is_absent(cls, data):
        return {k: v for k, v in data.items() if v is not None} if isinstance(data, dict) else data


Logprobs = Annotated[int, Field(ge=0, le=MAX_LOGPROBS)]
Tokens = Annotated[int, Field(ge=0)]
MAX_STOP_STRINGS = 16


class StreamOptions(StrictBody):
    include_usage: bool = False


class TextPart(StrictBody):
    type: Literal["text"]
    text: str


class ChatMessage(StrictBody):
    role: str
    content: str | list[TextPart]  # OpenAI's text content parts are joined

    def as_dict(self) -> dict:
        content = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)
        return {"role": self.role, "content": content}


class GenerationRequest(StrictBody):
    """What completion and chat requests share. `model` is checked before (a 404 comes first)."""

    model: str | None = None
    temperature: Annotated[float, Field(ge=0.0, le=2.0, allow_inf_nan=False)] = 1.0
    top_p: Annotated[float, Field(gt=0.0, le=1.0, allow_inf_nan=False)] = 1.0
    seed: Annotated[int, Field(ge=-(2**63), le=2**64 - 1)] | None = None  # what torch.Generator.manual_seed takes
    min_tokens: Tokens = 0
    ignore_eos: bool = False
    n: int = 1
    best_of: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | Annotated[list[str], Field(max_length=MAX_STOP_STRINGS)] | None = None
    max_tokens: Tokens | None = None  # 0 only with `echo` (the prompt scored alone: lm-eval's loglikelihood)

    def sampling(self) -> dict[str, Any]:
        """The fields that go to SamplingParams as they are."""
        return self.model_dump(include={"temperature", "top_p", "seed", "min_tokens", "ignore_eos"})


class CompletionRequest(GenerationRequest):
    prompt: str | list[int] | list[str] | list[list[int]]  # a text or token ids, or a batch of either
    echo: bool = False
    logprobs: Logprobs | None = None  # legacy completions: the number of alternatives


class ChatCompletionRequest(GenerationRequest):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    logprobs: bool = False  # chat: a switch, and `top_logprobs` the number of alternatives
    top_logprobs: Logprobs | None = None
    max_completion_tokens: Tokens | None = None


class TokenizeRequest(StrictBody):
    """vLLM's /tokenize: `prompt` or `messages`."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool | None = None  # default: True for a prompt; a chat template adds its own
    add_generation_prompt: bool = True
    return_token_strs: bool = False


class DetokenizeRequest(StrictBody):
    model: str | None = None
    tokens: list[int]


# Fields whose pydantic errors (one per member of a union, or deep inside) say less than a sentence of ours.
FIELD_ERRORS = {
    "prompt": "'prompt' must be a non-empty string or list of token ids, or a list of either (a batch)",
    "stop": f"'stop' must be a string or a list of at most {MAX_STOP_STRINGS} strings",
    "messages": "'messages' must be a non-empty list of objects with a string 'role' and a string 'content' (or a "
    "list of text parts, each {'type': 'text', 'text': <string>})",
}
Body = TypeVar("Body", bound=StrictBody)


def validated(kind: type[Body], body: dict) -> Body:
    """`body` as a `kind`, or a ProtocolError naming the top-level field at fault."""
    try:
        return kind.model_validate(body)
    except ValidationError as error:
        first = error.errors(include_url=False)[0]
        name = str(first["loc"][0]) if first["loc"] else None
        message = FIELD_ERRORS.get(name) or f"'{name}': {first['msg']}"
        raise ProtocolError(message, param=name) from None


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
    request = validated(ChatCompletionRequest if chat else CompletionRequest, body)
    if request.n != 1:
        raise ProtocolError("Only n=1 is supported (send a list of prompts for several completions)", param="n")
    if request.best_of not in (None, 1):
        raise ProtocolError("Only best_of=1 is supported", param="best_of")
    echo, logprobs = parse_logprobs(request)
    limit_name, max_tokens = parse_max_tokens(request, max_model_len, echo)
    include_usage = request.stream_options is not None and request.stream_options.include_usage
    if request.stream_options is not None and not request.stream:
        raise ProtocolError("'stream_options' is only allowed when 'stream' is true", param="stream_options")
    cap = max_tokens if max_tokens is not None else max_model_len
    if request.min_tokens > cap:
        message = f"'min_tokens' ({request.min_tokens}) must not exceed '{limit_name}' ({cap})"
        raise ProtocolError(message, param="min_tokens")
    # Until the prompt length is known (the server then sets the default of max_tokens), the context's length.
    scored = logprobs if echo else None
    stop = [request.stop] if isinstance(request.stop, str) else list(request.stop or [])
    params = SamplingParams(max_tokens=cap, stop=stop, logprobs=logprobs, prompt_logprobs=scored, **request.sampling())
    parsed = ParsedRequest(chat, model, params, request.stream, include_usage, max_tokens_given=max_tokens is not None)
    parsed.echo, parsed.logprobs = echo, logprobs
    if chat:
        parsed.messages = [m.as_dict() for m in request.messages]
    else:
        parsed.prompts = parse_prompts(request.prompt)
    return parsed


def parse_logprobs(request: CompletionRequest | ChatCompletionRequest) -> tuple[bool, int | None]:
    """(echo the prompt, the alternatives per token or None for no logprobs), in the completions or chat format."""
    if isinstance(request, CompletionRequest):
        return request.echo, request.logprobs
    if not request.logprobs:
        if request.top_logprobs:
            raise ProtocolError("'top_logprobs' needs 'logprobs' to be true", param="top_logprobs")
        return False, None
    return False, request.top_logprobs or 0


def parse_max_tokens(
    request: CompletionRequest | ChatCompletionRequest, max_model_len: int, echo: bool = False
) -> tuple[str, int | None]:
    """(the name the limit was given under, the limit or None); chat prefers `max_completion_tokens`."""
    name, value = "max_tokens", request.max_tokens
    if getattr(request, "max_completion_tokens", None) is not None:
        name, value = "max_completion_tokens", request.max_completion_tokens
    if value == 0 and not echo:
        raise ProtocolError(f"'{name}' must be >= 1 (0 only with 'echo', to score the prompt alone)", param=name)
    if value is not None and value > max_model_len:
        raise ProtocolError(
            f"'{name}' is {value}, more than the model's maximum context length of {max_model_len} tokens", param=name
        )
    return name, value


def parse_prompts(prompt: str | list[int] | list[str] | list[list[int]]) -> list[str | list[int]]:
    """The prompts of a completion request, one choice each: none of them empty."""
    prompts = [prompt] if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)) else list(prompt)
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ProtocolError("'prompt' must not be empty", param="prompt")
    return prompts


def parse_tokenize(body: dict, served_model: str) -> tuple[str | list[dict], bool, bool, bool]:
    """/tokenize (vLLM's): `prompt` or `messages` -> (prompt text or messages, add_special_tokens,
    add_generation_prompt, return_token_strs)."""
    check_model(body, served_model)
    request = validated(TokenizeRequest, body)
    chat = request.messages is not None
    if chat == (request.prompt is not None):
        raise ProtocolError("Give either 'prompt' (a string) or 'messages'", param="prompt")
    if chat and not request.messages:
        raise ProtocolError(FIELD_ERRORS["messages"], param="messages")
    source = [m.as_dict() for m in request.messages] if chat else request.prompt
    special = not chat if request.add_special_tokens is None else request.add_special_tokens
    return source, special, request.add_generation_prompt, request.return_token_strs


def parse_detokenize(body: dict, served_model: str, vocab_size: int) -> list[int]:
    """/detokenize (vLLM's): `tokens`, a list of token ids of the vocabulary."""
    check_model(body, served_model)
    tokens = validated(DetokenizeRequest, body).tokens
    if tokens and (min(tokens) < 0 or max(tokens) >= vocab_size):
        raise ProtocolError(f"Token ids must be in [0, {vocab_size})", param="tokens")
    return tokens


# --- responses -----------------------------------------------------------------------------------------------------


def new_id(chat: bool) -> str:
    return ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0, modes: list | None = None) -> dict:
    """OpenAI's usage; `prompt_tokens_details.cached_tokens` (prompt tokens served by the prefix cache) when any;
    `dsla_modes`, per choice, the DSLA layers its output tokens were produced with, from which token on (each
    request's own kinds: they change when the load or its context length changes them)."""
    out = {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }
    if cached_tokens:
        out["prompt_tokens_details"] = {"cached_tokens": cached_tokens}
    if modes is not None:
        out["dsla_modes"] = [
            [{"from_token": start, "dsla_layers": list(layers)} for start, layers in choice] for choice in modes
        ]
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
