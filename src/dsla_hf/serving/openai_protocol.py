"""The OpenAI API as DSLA-Serve speaks it: validation of request bodies (every mistake is a 4xx with an OpenAI-style
error body, never a 5xx) and the shapes of responses, stream chunks and errors."""

from __future__ import annotations

import json
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


def _number(body: dict, name: str, default, kind=float, low=None, high=None, strict_low=False):
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float) if kind is float else int):
        raise ProtocolError(f"'{name}' must be {'a number' if kind is float else 'an integer'}", param=name)
    if low is not None and (value <= low if strict_low else value < low):
        raise ProtocolError(f"'{name}' must be {'>' if strict_low else '>='} {low}, got {value}", param=name)
    if high is not None and value > high:
        raise ProtocolError(f"'{name}' must be <= {high}, got {value}", param=name)
    return kind(value)


def _bool(body: dict, name: str, default: bool = False) -> bool:
    value = body.get(name, default)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise ProtocolError(f"'{name}' must be a boolean", param=name)
    return value


def parse_body(raw: bytes) -> dict:
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as error:
        raise ProtocolError(f"The request body is not valid JSON: {error}") from None
    if not isinstance(body, dict):
        raise ProtocolError("The request body must be a JSON object")
    return body


def parse_request(body: dict, chat: bool, served_model: str, max_model_len: int) -> ParsedRequest:
    model = body.get("model", served_model)
    if not isinstance(model, str):
        raise ProtocolError("'model' must be a string", param="model")
    if model != served_model:
        raise ProtocolError(f"The model `{model}` does not exist.", status=404, param="model")
    n = _number(body, "n", 1, int)
    if n != 1:
        raise ProtocolError("Only n=1 is supported", param="n")
    if body.get("best_of") not in (None, 1):
        raise ProtocolError("Only best_of=1 is supported", param="best_of")
    if chat:
        limit_name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    else:
        limit_name = "max_tokens"
    given = body.get(limit_name) is not None
    max_tokens = _number(body, limit_name, None, int, low=1)
    if max_tokens is not None and max_tokens > max_model_len:
        raise ProtocolError(
            f"'{limit_name}' is {max_tokens}, more than the model's maximum context length of {max_model_len} tokens",
            param=limit_name,
        )
    stop = body.get("stop")
    if stop is None:
        stop = []
    elif isinstance(stop, str):
        stop = [stop]
    elif not (isinstance(stop, list) and all(isinstance(s, str) for s in stop)) or len(stop) > 16:
        raise ProtocolError("'stop' must be a string or a list of at most 16 strings", param="stop")
    temperature = _number(body, "temperature", 1.0, low=0.0, high=2.0)
    top_p = _number(body, "top_p", 1.0, low=0.0, high=1.0, strict_low=True)
    seed = _number(body, "seed", None, int)
    min_tokens = _number(body, "min_tokens", 0, int, low=0)
    ignore_eos = _bool(body, "ignore_eos")
    stream = _bool(body, "stream")
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise ProtocolError("'stream_options' must be an object", param="stream_options")
    include_usage = _bool(options or {}, "include_usage")
    if include_usage and not stream:
        raise ProtocolError("'stream_options' is only allowed when 'stream' is true", param="stream_options")
    cap = max_tokens if max_tokens is not None else max_model_len
    if min_tokens > cap:
        raise ProtocolError(f"'min_tokens' ({min_tokens}) must not exceed '{limit_name}' ({cap})", param="min_tokens")
    params = SamplingParams(
        max_tokens=max_tokens or 1,  # the server sets the default once the prompt length is known
        temperature=temperature,
        top_p=top_p,
        seed=seed,
        stop=stop,
        ignore_eos=ignore_eos,
        min_tokens=min_tokens,
    )
    parsed = ParsedRequest(chat, model, params, stream, include_usage, max_tokens_given=given)
    if chat:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise ProtocolError("'messages' must be a non-empty list", param="messages")
        for message in messages:
            if not isinstance(message, dict) or not isinstance(message.get("role"), str):
                raise ProtocolError("Each message must be an object with a string 'role'", param="messages")
            content = message.get("content")
            if isinstance(content, list):  # OpenAI content parts: keep the text ones
                if not all(isinstance(p, dict) and p.get("type") == "text" for p in content):
                    raise ProtocolError("Only text content parts are supported", param="messages")
                message = {**message, "content": "".join(str(p.get("text", "")) for p in content)}
            elif not isinstance(content, str):
                raise ProtocolError("Each message's 'content' must be a string", param="messages")
            parsed.messages.append({"role": message["role"], "content": message["content"]})
    else:
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
            prompt = prompt[0]  # a batch of one
        if isinstance(prompt, str):
            if not prompt:
                raise ProtocolError("'prompt' must not be empty", param="prompt")
        elif (
            isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt)
        ):
            pass
        else:
            raise ProtocolError(
                "'prompt' must be a non-empty string or list of token ids (one prompt)", param="prompt"
            )
        parsed.prompt = prompt
    return parsed


# --- responses -----------------------------------------------------------------------------------------------------


def new_id(chat: bool) -> str:
    return ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def response(request_id: str, chat: bool, model: str, text: str, finish_reason: str, usage_: dict) -> dict:
    if chat:
        choice: dict[str, Any] = {
            "index": 0,
            "message": {"role": "assistant", "content": text},
            "logprobs": None,
            "finish_reason": finish_reason,
        }
    else:
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}
    return {
        "id": request_id,
        "object": "chat.completion" if chat else "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": [choice],
        "usage": usage_,
    }


def chunk(request_id: str, chat: bool, model: str, text: str | None, finish_reason: str | None, role=False) -> dict:
    if chat:
        delta: dict[str, Any] = {"role": "assistant", "content": ""} if role else {}
        if text is not None and not role:
            delta["content"] = text
        choice: dict[str, Any] = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
    else:
        choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish_reason}
    return {
        "id": request_id,
        "object": "chat.completion.chunk" if chat else "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": [choice],
    }


def usage_chunk(request_id: str, chat: bool, model: str, usage_: dict) -> dict:
    return {
        "id": request_id,
        "object": "chat.completion.chunk" if chat else "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": [],
        "usage": usage_,
    }


def sse(data: dict | str) -> bytes:
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n".encode()
