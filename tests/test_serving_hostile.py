"""Hostile clients against DSLA-Serve on loopback (issue 16): malformed, ill-typed, oversized, slow and vanishing
requests, and a flood past the queue. Each gets a specific 4xx (429 for a full queue, 503 for an engine that is down)
with an OpenAI-style error body, never a 5xx; the server keeps answering, and answers the same greedy text after the
barrage. Slow and partial clients are raw sockets; the limits are small so that the file runs in seconds."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import select
import socket
import time

import httpx
import pytest

from dsla_hf.commands import serve as serve_command
from dsla_hf.serving.openai_protocol import MAX_JSON_DEPTH, Limits

from .test_serving_server import serve

LIMITS = Limits(max_body_bytes=64 * 1024, body_timeout_s=0.5, header_timeout_s=0.5)
GREEDY = {"model": "toy", "prompt": "def f(x):", "max_tokens": 6, "temperature": 0, "ignore_eos": True}
SLACK_S = 3.0  # a timed-out client is answered within its timeout plus this


class ErrorLog(logging.Handler):
    """The server's logged errors (an unhandled exception is logged even when its client is gone)."""

    def __init__(self):
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture(scope="module")
def hostile():
    """(engine, server thread, the greedy text before the barrage, the server's error log)."""
    errors = ErrorLog()
    # (not uvicorn's loggers: each server's logging config resets them; the app logs its unhandled errors itself)
    loggers = [logging.getLogger(name) for name in ("dsla_hf.serving", "asyncio")]
    for logger in loggers:
        logger.addHandler(errors)
    engine, thread = serve(limits=LIMITS, max_num_seqs=2, max_queue=4)
    with thread:
        before = httpx.post(thread.url + "/v1/completions", json=GREEDY, timeout=60).json()["choices"][0]["text"]
        yield engine, thread, before, errors
    engine.stop()
    for logger in loggers:
        logger.removeHandler(errors)


def post(url: str, route: str, content: bytes, content_type: str = "application/json") -> httpx.Response:
    return httpx.post(url + route, content=content, headers={"content-type": content_type}, timeout=30)


def assert_error(status: int, body: bytes | str, expected: int, param: str | None = None) -> dict:
    assert status == expected, body
    error = json.loads(body)["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"] and error["code"] == expected
    assert error["param"] == param, error
    return error


def assert_alive(url: str) -> None:
    reply = httpx.post(url + "/v1/completions", json={**GREEDY, "max_tokens": 2}, timeout=30)
    assert reply.status_code == 200, reply.text


# --- raw sockets -----------------------------------------------------------------------------------------------------


def connect(thread) -> socket.socket:
    return socket.create_connection(("127.0.0.1", thread.port), timeout=10)


def read_response(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """One HTTP response (status, lower-cased headers, body with a Content-Length)."""
    data = b""
    while b"\r\n\r\n" not in data:
        part = sock.recv(65536)
        assert part, f"the server closed the connection without a response: {data!r}"
        data += part
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.strip().lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:])}
    while len(body) < int(headers.get("content-length", 0)):
        part = sock.recv(65536)
        assert part, "the server closed the connection mid-response"
        body += part
    return status, headers, body


def closed_by_server(sock: socket.socket, within_s: float = SLACK_S) -> bool:
    sock.settimeout(within_s)
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def trickle(sock: socket.socket, data: bytes, delay_s: float = 0.1) -> None:
    """Send `data` a byte at a time until the server answers or closes (or all is sent)."""
    for i in range(len(data)):
        if select.select([sock], [], [], 0)[0]:
            return
        try:
            sock.sendall(data[i : i + 1])
        except (BrokenPipeError, ConnectionResetError):
            return
        time.sleep(delay_s)


def head(route: str = "/v1/completions", length: int | None = None, extra: str = "") -> bytes:
    lines = [f"POST {route} HTTP/1.1", "Host: localhost", "Content-Type: application/json"]
    if length is not None:
        lines.append(f"Content-Length: {length}")
    return ("\r\n".join(lines) + "\r\n" + extra + "\r\n").encode()


def request_bytes(body: dict) -> bytes:
    content = json.dumps(body).encode()
    return head(length=len(content)) + content


# --- malformed and ill-typed bodies ----------------------------------------------------------------------------------


def nested(depth: int, leaf: str = "1") -> str:
    return "[" * depth + leaf + "]" * depth


def short_id(value) -> str | None:
    """Test ids that fit a line (the bodies can be 60 KB)."""
    if isinstance(value, (str, bytes)):
        text = value if isinstance(value, str) else value.decode("latin-1")
        return text.replace(BODY, "")[:60]
    return None


BODY = '{"model": "toy", "max_tokens": 3, "temperature": 0, '
C, CHAT, TOK, DETOK = "/v1/completions", "/v1/chat/completions", "/tokenize", "/detokenize"
USER = '"messages": [{"role": "user", "content": "hi"}]'
PART = BODY + '"messages": [{"role": "user", "content": [{"type": "text", "text": %s}]}]}'  # a text content part
MULTIPART = b'--x\r\nContent-Disposition: form-data; name="prompt"\r\n\r\nx\r\n--x--'


@pytest.mark.parametrize(
    "route, raw, status, param",
    [
        # nesting: the reviewer's 10,000-deep array and 5,000-deep object, and the bound itself
        (C, BODY + '"prompt": ' + nested(10_000) + "}", 400, None),
        (C, '{"prompt": ' + '{"a": ' * 5000 + "1" + "}" * 5000 + "}", 400, None),
        (CHAT, '{"messages": ' + nested(30_000) + "}", 400, None),
        (C, BODY + '"prompt": ' + nested(MAX_JSON_DEPTH - 1) + "}", 400, "prompt"),  # deep enough to parse
        (C, BODY + '"prompt": ' + nested(MAX_JSON_DEPTH) + "}", 400, None),  # one too deep
        (C, BODY + '"prompt": "' + "[" * 400 + '"}', 200, None),  # brackets in a string do not count
        # text: lone surrogates (escaped or as raw bytes), invalid UTF-8, each named by its field
        (C, BODY + '"prompt": "\\ud800"}', 400, "prompt"),
        (C, BODY + '"prompt": "a\\udfffb"}', 400, "prompt"),
        (C, (BODY + '"prompt": "\xed\xa0\x80"}').encode("latin-1"), 400, "prompt"),
        (C, (BODY + '"prompt": "\xff\xfe"}').encode("latin-1"), 400, "prompt"),
        (CHAT, BODY + '"messages": [{"role": "user", "content": "\\ud800"}]}', 400, "messages[0].content"),
        (CHAT, BODY + '"messages": [{"role": "\\udc00", "content": "hi"}]}', 400, "messages[0].role"),
        (CHAT, PART % '"\\ud800"', 400, "messages[0].content[0].text"),
        (C, '{"model": "\\ud800", "prompt": "x"}', 400, "model"),
        (C, BODY + '"prompt": "x", "stop": ["a", "\\ud800"]}', 400, "stop[1]"),
        (C, BODY + '"prompt": "x", "\\ud800": 1}', 400, "\\ud800"),
        (C, BODY + '"prompt": "x \\ud83d\\ude00"}', 200, None),  # an escaped pair is fine
        (C, (BODY + '"prompt": "x \U0001f600 é"}').encode(), 200, None),
        (C, BODY + '"prompt": "a\\u0000b"}', 200, None),  # an escaped NUL is text
        (C, BODY + '"prompt": "a\x00b"}', 400, None),  # a raw control character is not JSON
        # not JSON, or not an object
        (C, b"", 400, None),
        (C, b"   \n", 400, None),
        (C, b"null", 400, None),
        (C, b'"a string"', 400, None),
        (C, b"42", 400, None),
        (C, b"[]", 400, None),
        (C, BODY + '"prompt": "x"} trailing', 400, None),
        (C, BODY + '"prompt": "x"', 400, None),
        (C, b"\xef\xbb\xbf" + (BODY + '"prompt": "x"}').encode(), 200, None),  # a UTF-8 BOM is tolerated
        (C, BODY + '"prompt": 5, "prompt": "x"}', 200, None),  # duplicate keys: the last one wins
        # numbers: NaN and infinities, huge integers, out of range, wrong types
        (C, BODY + '"prompt": "x", "temperature": NaN}', 400, None),
        (C, BODY + '"prompt": "x", "top_p": Infinity}', 400, None),
        (C, BODY + '"prompt": "x", "temperature": -Infinity}', 400, None),
        (C, BODY + '"prompt": "x", "temperature": 1e999}', 400, "temperature"),
        (C, BODY + '"prompt": "x", "top_p": -1e999}', 400, "top_p"),
        (C, BODY + f'"prompt": "x", "temperature": {10**400}}}', 400, "temperature"),
        (C, BODY + f'"prompt": "x", "top_p": {10**400}}}', 400, "top_p"),
        (C, f'{{"prompt": "x", "max_tokens": {10**400}}}', 400, "max_tokens"),
        (C, f'{{"prompt": "x", "min_tokens": {10**400}}}', 400, "min_tokens"),
        (C, BODY + f'"prompt": "x", "seed": {10**400}}}', 400, "seed"),
        (C, BODY + f'"prompt": "x", "seed": {-(10**400)}}}', 400, "seed"),
        (C, BODY + f'"prompt": "x", "seed": {2**64}}}', 400, "seed"),
        (C, BODY + f'"prompt": "x", "seed": {2**64 - 1}, "temperature": 1}}', 200, None),
        (C, BODY + '"prompt": "x", "seed": -1, "temperature": 1}', 200, None),
        (C, BODY + f'"prompt": "x", "n": {10**400}}}', 400, "n"),
        (C, BODY + '"prompt": "x", "max_tokens": ' + "9" * 5000 + "}", 400, None),  # beyond Python's int parsing
        (C, BODY + f'"prompt": [1, {10**400}]}}', 400, None),
        (C, BODY + '"prompt": [1, -1]}', 400, None),
        (C, BODY + '"prompt": [1, 2.5]}', 400, "prompt"),
        (C, BODY + '"prompt": [true]}', 400, "prompt"),
        (C, '{"prompt": "x", "max_tokens": 2.0}', 400, "max_tokens"),
        (C, '{"prompt": "x", "max_tokens": true}', 400, "max_tokens"),
        (C, BODY + '"prompt": "x", "min_tokens": -1}', 400, "min_tokens"),
        (C, BODY + '"prompt": "x", "n": 0}', 400, "n"),
        (C, BODY + '"prompt": "x", "top_p": -0.5}', 400, "top_p"),
        (C, BODY + '"prompt": "x", "temperature": "0"}', 400, "temperature"),
        (C, BODY + '"prompt": "x", "best_of": NaN}', 400, None),
        # wrong shapes at every level
        (C, BODY + '"prompt": {}}', 400, "prompt"),
        (C, BODY + '"prompt": null}', 400, "prompt"),
        (C, BODY + '"prompt": [[]]}', 400, "prompt"),
        (C, BODY + '"prompt": [["a"]]}', 400, "prompt"),
        (C, BODY + '"prompt": ["a", "b"]}', 200, None),  # a batch: one choice each
        (C, BODY + '"prompt": [[5, 6], [7]]}', 200, None),
        (C, BODY + '"prompt": ["a", ["b"]]}', 400, "prompt"),
        (C, BODY + '"prompt": [[5], "a"]}', 400, "prompt"),
        (C, BODY + '"prompt": [[5], []]}', 400, "prompt"),
        (C, BODY + '"prompt": [[5], [[6]]]}', 400, "prompt"),
        (C, BODY + '"prompt": [[5], [true]]}', 400, "prompt"),
        (C, BODY + '"prompt": ["a", null]}', 400, "prompt"),
        (C, BODY + '"prompt": ["a", "\\ud800"]}', 400, "prompt[1]"),
        (C, BODY + f'"prompt": [[5], [1, {10**400}]]}}', 400, None),
        (C, BODY + '"prompt": ' + json.dumps(["a"] * 5) + "}", 400, "prompt"),  # more than the queue ever holds
        # logprobs and echo
        (C, BODY + '"prompt": "x", "logprobs": 5, "echo": true}', 200, None),
        (C, BODY + '"prompt": "x", "logprobs": 20, "max_tokens": 0, "echo": true}', 200, None),
        (C, BODY + '"prompt": "x", "logprobs": 21}', 400, "logprobs"),
        (C, BODY + '"prompt": "x", "logprobs": -1}', 400, "logprobs"),
        (C, BODY + f'"prompt": "x", "logprobs": {10**400}}}', 400, "logprobs"),
        (C, BODY + '"prompt": "x", "logprobs": 1.5}', 400, "logprobs"),
        (C, BODY + '"prompt": "x", "logprobs": NaN}', 400, None),
        (C, BODY + '"prompt": "x", "logprobs": true}', 400, "logprobs"),
        (C, BODY + '"prompt": "x", "echo": 1}', 400, "echo"),
        (C, '{"prompt": "x", "max_tokens": 0}', 400, "max_tokens"),
        (C, '{"prompt": "x", "max_tokens": 0, "echo": false}', 400, "max_tokens"),
        (CHAT, BODY + USER + ', "logprobs": 3}', 400, "logprobs"),
        (CHAT, BODY + USER + ', "logprobs": true, "top_logprobs": 21}', 400, "top_logprobs"),
        (CHAT, BODY + USER + ', "logprobs": true, "top_logprobs": "2"}', 400, "top_logprobs"),
        (CHAT, BODY + USER + ', "top_logprobs": 2}', 400, "top_logprobs"),
        (CHAT, BODY + USER + ', "logprobs": true, "top_logprobs": 20, "stream": true}', 200, None),
        (C, BODY + '"prompt": "x", "model": ["toy"]}', 400, "model"),
        (C, BODY + '"prompt": "x", "model": "' + "m" * 10_000 + '"}', 404, "model"),
        (C, BODY + '"prompt": "x", "stream": "true"}', 400, "stream"),
        (C, BODY + '"prompt": "x", "stream": true, "stream_options": []}', 400, "stream_options"),
        (C, BODY + '"prompt": "x", "stream": true, "stream_options": {"include_usage": 1}}', 400, "stream_options"),
        (C, BODY + '"prompt": "x", "stop": [1]}', 400, "stop"),
        (C, BODY + '"prompt": "x", "stop": [null]}', 400, "stop"),
        (C, BODY + '"prompt": "x", "stop": [["a"]]}', 400, "stop"),
        (C, BODY + '"prompt": "x", "stop": {"a": 1}}', 400, "stop"),
        (C, BODY + '"prompt": "x", "stop": ' + json.dumps(["a"] * 17) + "}", 400, "stop"),
        (CHAT, BODY + '"messages": {}}', 400, "messages"),
        (CHAT, BODY + '"messages": []}', 400, "messages"),
        (CHAT, BODY + '"messages": null}', 400, "messages"),
        (CHAT, BODY + '"messages": [["user", "hi"]]}', 400, "messages"),
        (CHAT, BODY + '"messages": ["hi"]}', 400, "messages"),
        (CHAT, BODY + '"messages": [{"role": ["user"], "content": "hi"}]}', 400, "messages"),
        (CHAT, BODY + '"messages": [{"role": "user"}]}', 400, "messages"),
        (CHAT, BODY + '"messages": [{"role": "user", "content": {"text": "hi"}}]}', 400, "messages"),
        (CHAT, BODY + '"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}', 400, "messages"),
        (CHAT, PART % '{"a": 1}', 400, "messages"),
        (CHAT, PART % '"hi"', 200, None),
        (CHAT, BODY + '"messages": [{"role": "user", "content": [{"type": "text"}]}]}', 400, "messages"),
        (CHAT, BODY + USER + ', "max_completion_tokens": -5}', 400, "max_completion_tokens"),
        (CHAT, BODY + USER + ', "max_completion_tokens": 1e999}', 400, "max_completion_tokens"),
        # vLLM's tokenizer routes
        (TOK, b"{", 400, None),
        (TOK, b"[]", 400, None),
        (TOK, "{}", 400, "prompt"),
        (TOK, '{"prompt": 5}', 400, "prompt"),
        (TOK, '{"prompt": ["a"]}', 400, "prompt"),
        (TOK, '{"prompt": "\\ud800"}', 400, "prompt"),
        (TOK, '{"prompt": "x", ' + USER + "}", 400, "prompt"),
        (TOK, '{"messages": "hi"}', 400, "messages"),
        (TOK, '{"messages": [{"role": "user", "content": 3}]}', 400, "messages"),
        (TOK, '{"prompt": "x", "model": "nope"}', 404, "model"),
        (TOK, '{"prompt": "x", "add_special_tokens": "yes"}', 400, "add_special_tokens"),
        (TOK, '{"prompt": "x", "return_token_strs": 1}', 400, "return_token_strs"),
        (TOK, '{"prompt": ""}', 200, None),
        (TOK, '{"prompt": "' + "x" * 60_000 + '"}', 200, None),  # longer than the context: counted, not refused
        (TOK, "{" + USER + ', "add_generation_prompt": false}', 200, None),
        (DETOK, b"null", 400, None),
        (DETOK, "{}", 400, "tokens"),
        (DETOK, '{"tokens": "abc"}', 400, "tokens"),
        (DETOK, '{"tokens": [1, -1]}', 400, "tokens"),
        (DETOK, '{"tokens": [1, 101]}', 400, "tokens"),
        (DETOK, f'{{"tokens": [{10**400}]}}', 400, "tokens"),
        (DETOK, '{"tokens": [1.5]}', 400, "tokens"),
        (DETOK, '{"tokens": [true]}', 400, "tokens"),
        (DETOK, '{"tokens": [[5]]}', 400, "tokens"),
        (DETOK, '{"tokens": [5, 6], "model": ["toy"]}', 400, "model"),
        (DETOK, '{"tokens": [0, 1, 2, 5, 100]}', 200, None),
        (DETOK, '{"tokens": ' + json.dumps(list(range(3, 99)) * 100) + "}", 200, None),
        # very long strings, within the body limit
        (C, BODY + '"prompt": "' + "x" * 60_000 + '"}', 400, None),  # longer than the context
        (CHAT, BODY + '"messages": [{"role": "user", "content": "' + "y" * 60_000 + '"}]}', 400, None),
        (C, BODY + '"prompt": "x", "stop": ["' + "s" * 60_000 + '"]}', 200, None),
    ],
    ids=short_id,
)
def test_malformed_and_ill_typed_bodies_get_a_clear_4xx(hostile, route, raw, status, param):
    _, thread, _, _ = hostile
    reply = post(thread.url, route, raw if isinstance(raw, bytes) else raw.encode())
    if status == 200:
        assert reply.status_code == 200, reply.text
    else:
        error = assert_error(reply.status_code, reply.content, status, param)
        assert error["type"] in ("invalid_request_error", "NotFoundError")


def test_nesting_and_surrogate_errors_say_why(hostile):
    _, thread, _, _ = hostile
    error = post(thread.url, C, (BODY + '"prompt": ' + nested(10_000) + "}").encode()).json()["error"]
    assert "10001 deep" in error["message"] and str(MAX_JSON_DEPTH) in error["message"]
    error = post(thread.url, CHAT, (BODY + '"messages": [{"role": "user", "content": "\\ud800"}]}').encode()).json()
    assert "'messages[0].content' is not valid UTF-8" in error["error"]["message"]


@pytest.mark.parametrize(
    "content_type, raw, status",
    [
        ("text/plain", json.dumps(GREEDY).encode(), 200),  # lenient: the body is JSON whatever the header says
        ("application/x-www-form-urlencoded", json.dumps(GREEDY).encode(), 200),  # what `curl -d` sends
        ("application/x-www-form-urlencoded", b"model=toy&prompt=x", 400),
        ("multipart/form-data; boundary=x", MULTIPART, 400),
        ("application/octet-stream", bytes(range(256)), 400),
        ("application/json; charset=utf-16", json.dumps(GREEDY).encode("utf-16"), 400),
    ],
)
def test_content_types(hostile, content_type, raw, status):
    _, thread, _, _ = hostile
    reply = post(thread.url, C, raw, content_type)
    if status == 200:
        assert reply.status_code == 200, reply.text
    else:
        assert_error(reply.status_code, reply.content, status)


def test_wrong_routes_and_methods(hostile):
    _, thread, _, _ = hostile
    cases = [("PUT", C, 405), ("DELETE", CHAT, 405), ("POST", "/health", 405), ("POST", "/v1/nothing", 404)]
    cases += [("GET", TOK, 405), ("PUT", DETOK, 405), ("POST", "/version", 405)]
    with httpx.Client(base_url=thread.url, timeout=30) as client:
        for method, route, status in cases + [("GET", "/v1/%ff%00", 404)]:
            reply = client.request(method, route, content=b"{")
            assert_error(reply.status_code, reply.content, status)


# --- malformed HTTP --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "data",
    [
        b"GET /\xff HTTP/1.1\r\nHost: x\r\n\r\n",
        b"\x00\x01\x02 garbage\r\n\r\n",
        head(extra="Content-Length: -1\r\n"),
        head(length=10**30),  # h11 takes 20 digits at most
        head(extra="Transfer-Encoding: chunked\r\n") + b"zz\r\n",
    ],
    ids=short_id,
)
def test_malformed_http_gets_400(hostile, data):
    _, thread, _, _ = hostile
    with connect(thread) as sock:
        sock.sendall(data)
        status, headers, body = read_response(sock)
        assert_error(status, body, 400)
        assert headers["connection"] == "close" and closed_by_server(sock)
    assert_alive(thread.url)


def test_oversized_head_gets_400(hostile):
    """A head trickled past h11's 16 KiB bound (uvicorn's `h11_max_incomplete_event_size`)."""
    _, thread, _, _ = hostile
    with connect(thread) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n")
        for i in range(8):  # 8 headers of 4 KiB, each sent on its own, the head never ends
            if select.select([sock], [], [], 0.05)[0]:
                break
            sock.sendall(f"X-Pad-{i}: ".encode() + b"p" * 4096 + b"\r\n")
        status, _, body = read_response(sock)
        assert_error(status, body, 400)
    assert_alive(thread.url)


# --- oversized bodies ------------------------------------------------------------------------------------------------


def test_body_over_the_limit_by_content_length_gets_413_before_it_is_sent(hostile):
    _, thread, _, _ = hostile
    for length in (LIMITS.max_body_bytes + 1, 10**12, 10**19):
        with connect(thread) as sock:
            sock.sendall(head(length=length))  # the head only: refused by what it promises
            status, headers, body = read_response(sock)
            assert "larger than 65536 bytes" in assert_error(status, body, 413)["message"]
            assert headers["connection"] == "close" and closed_by_server(sock)


def test_chunked_body_over_the_limit_gets_413(hostile):
    """No Content-Length: the body is read up to the limit, then refused."""
    _, thread, before, _ = hostile
    with connect(thread) as sock:
        sock.sendall(head(extra="Transfer-Encoding: chunked\r\n"))
        sock.sendall(b"%x\r\n" % (LIMITS.max_body_bytes + 1) + b" " * (LIMITS.max_body_bytes + 1) + b"\r\n")
        status, headers, body = read_response(sock)  # before the last chunk
        assert_error(status, body, 413)
        assert headers["connection"] == "close" and closed_by_server(sock)
    # A chunked body within the limit is served.
    content = json.dumps(GREEDY).encode()
    with connect(thread) as sock:
        sock.sendall(head(extra="Transfer-Encoding: chunked\r\n"))
        for i in range(0, len(content), 10):
            part = content[i : i + 10]
            sock.sendall(b"%x\r\n%s\r\n" % (len(part), part))
        sock.sendall(b"0\r\n\r\n")
        status, _, body = read_response(sock)
        assert status == 200 and json.loads(body)["choices"][0]["text"] == before


def test_body_at_the_limit_is_read(hostile):
    _, thread, before, _ = hostile
    content = json.dumps(GREEDY).encode()
    exact = content[:-1] + b" " * (LIMITS.max_body_bytes - len(content)) + b"}"
    assert len(exact) == LIMITS.max_body_bytes
    reply = post(thread.url, C, exact)
    assert reply.status_code == 200 and reply.json()["choices"][0]["text"] == before


# --- slow clients (slowloris) ----------------------------------------------------------------------------------------


def test_body_shorter_than_its_content_length_gets_408(hostile):
    _, thread, _, _ = hostile
    content = json.dumps(GREEDY).encode()
    with connect(thread) as sock:
        start = time.monotonic()
        sock.sendall(head(length=len(content) + 100) + content)  # promises 100 bytes more than it sends
        status, headers, body = read_response(sock)
        assert "did not arrive within 0.5 s" in assert_error(status, body, 408)["message"]
        assert headers["connection"] == "close" and closed_by_server(sock)
        assert LIMITS.body_timeout_s <= time.monotonic() - start < LIMITS.body_timeout_s + SLACK_S


def test_trickled_body_gets_408(hostile):
    _, thread, _, _ = hostile
    content = json.dumps(GREEDY).encode()
    with connect(thread) as sock:
        start = time.monotonic()
        sock.sendall(head(length=len(content)))
        trickle(sock, content, delay_s=0.05)  # 50 bytes at 20/s: 2.5 s, past the body timeout
        status, headers, body = read_response(sock)
        assert_error(status, body, 408)
        assert headers["connection"] == "close" and closed_by_server(sock)
        assert time.monotonic() - start < LIMITS.body_timeout_s + SLACK_S


def test_trickled_head_and_silent_connection_get_408(hostile):
    _, thread, _, _ = hostile
    for data in (head(length=10), b""):  # a head a byte at a time; a connection that sends nothing
        with connect(thread) as sock:
            start = time.monotonic()
            trickle(sock, data, delay_s=0.05)
            if not data:
                select.select([sock], [], [], LIMITS.header_timeout_s + SLACK_S)
            status, headers, body = read_response(sock)
            assert "request head did not arrive within 0.5 s" in assert_error(status, body, 408)["message"]
            assert headers["connection"] == "close" and closed_by_server(sock)
            assert time.monotonic() - start < LIMITS.header_timeout_s + SLACK_S


def test_head_deadline_restarts_for_each_request_on_a_connection(hostile):
    _, thread, before, _ = hostile
    with connect(thread) as sock:
        for _ in range(2):  # two requests, each well within the head and body deadlines, the pause between longer
            sock.sendall(request_bytes(GREEDY))
            status, _, body = read_response(sock)
            assert status == 200 and json.loads(body)["choices"][0]["text"] == before
            time.sleep(LIMITS.header_timeout_s + 0.2)
        trickle(sock, head(length=10), delay_s=0.05)  # then a slow head on the kept-alive connection
        assert_error(*read_response(sock)[::2], 408)


def test_slow_but_timely_client_is_served(hostile):
    _, thread, before, _ = hostile
    content = json.dumps(GREEDY).encode()
    with connect(thread) as sock:
        sock.sendall(head(length=len(content)))
        for i in range(0, len(content), len(content) // 3 + 1):  # three parts within the body timeout
            sock.sendall(content[i : i + len(content) // 3 + 1])
            time.sleep(0.1)
        status, _, body = read_response(sock)
        assert status == 200 and json.loads(body)["choices"][0]["text"] == before


def test_many_slow_clients_do_not_block_the_others(hostile):
    _, thread, _, _ = hostile
    socks = [connect(thread) for _ in range(30)]
    try:
        for i, sock in enumerate(socks):
            sock.sendall(head(length=100)[: 10 + i] if i % 2 else head(length=100) + b'{"prompt"')
        assert_alive(thread.url)  # served while they all hang
        for sock in socks:  # then each gets its 408 and is closed
            status, _, body = read_response(sock)
            assert_error(status, body, 408)
            assert closed_by_server(sock)
    finally:
        for sock in socks:
            sock.close()


# --- disconnecting clients -------------------------------------------------------------------------------------------


def wait_idle(engine, within_s: float = 10.0) -> None:
    deadline = time.monotonic() + within_s
    while engine.running or engine.prefilling or engine.num_waiting:
        assert time.monotonic() < deadline, "a request of a client that went away kept running"
        time.sleep(0.02)


def test_client_closing_mid_body(hostile):
    engine, thread, _, errors = hostile
    content = json.dumps(GREEDY).encode()
    for cut in (0, 1, len(content) // 2, len(content) - 1):
        with connect(thread) as sock:
            sock.sendall(head(length=len(content)) + content[:cut])
            time.sleep(0.05)
    time.sleep(0.2)
    assert not errors.records, [r.getMessage() for r in errors.records]
    assert_alive(thread.url)
    wait_idle(engine)


def test_client_closing_mid_stream_and_before_the_answer(hostile):
    """400 tokens take 4 s or more here: the engine must be idle well before, the requests cancelled."""
    engine, thread, _, _ = hostile
    long = {**GREEDY, "max_tokens": 400}
    hook = engine.model.register_forward_pre_hook(lambda *a: time.sleep(0.01))
    try:
        with connect(thread) as sock:
            sock.sendall(request_bytes({**long, "stream": True}))
            status, headers, data = read_response(sock)  # chunked: the head, maybe some events
            while b"data: " not in data:
                data += sock.recv(65536)
            assert status == 200 and headers["content-type"].startswith("text/event-stream")
        wait_idle(engine, within_s=2.5)
        with connect(thread) as sock:
            sock.sendall(request_bytes(long))  # a whole answer, never awaited
            time.sleep(0.2)
        wait_idle(engine, within_s=2.5)
    finally:
        hook.remove()
    assert_alive(thread.url)


# --- a flood past the queue ------------------------------------------------------------------------------------------


def test_flood_past_the_queue_gets_429(hostile):
    engine, thread, _, _ = hostile
    hook = engine.model.register_forward_pre_hook(lambda *a: time.sleep(0.01))  # 2 running, 4 waiting at most

    async def flood():
        limits = httpx.Limits(max_connections=40)
        async with httpx.AsyncClient(base_url=thread.url, timeout=60, limits=limits) as client:
            body = {**GREEDY, "max_tokens": 10}
            return await asyncio.gather(*(client.post(C, json=body) for _ in range(16)))

    try:
        replies = asyncio.run(flood())
    finally:
        hook.remove()
    statuses = [r.status_code for r in replies]
    assert set(statuses) <= {200, 429}, statuses
    assert statuses.count(429) >= 1 and statuses.count(200) >= 2, statuses
    for reply in replies:
        if reply.status_code == 429:
            assert assert_error(429, reply.content, 429)["type"] == "RateLimitError"
    wait_idle(engine)


def test_engine_down_answers_503():
    engine, thread = serve(limits=LIMITS, max_num_seqs=1)
    with thread:
        engine.stop()
        reply = httpx.post(thread.url + C, json=GREEDY, timeout=30)
        assert assert_error(reply.status_code, reply.content, 503)["type"] == "ServiceUnavailableError"
        assert httpx.get(thread.url + "/health", timeout=30).status_code == 503
        reply = httpx.post(thread.url + C, content=b"{", timeout=30)
        assert_error(reply.status_code, reply.content, 400)  # still validated first


def test_serve_command_http_options():
    parser = argparse.ArgumentParser()
    serve_command.add_arguments(parser)
    assert serve_command.http_limits(parser.parse_args([])) == Limits()  # the same defaults
    args = parser.parse_args(["--max-body-bytes", "1000", "--body-timeout", "2", "--header-timeout", "3"])
    assert serve_command.http_limits(args) == Limits(max_body_bytes=1000, body_timeout_s=2.0, header_timeout_s=3.0)
    text = parser.format_help()
    assert all(option in text for option in ("--max-body-bytes", "--body-timeout", "--header-timeout"))


# --- after the barrage -----------------------------------------------------------------------------------------------


def test_same_greedy_text_after_the_barrage(hostile):
    """Last in the file: the server answers as it did before every hostile request above, and logged no error."""
    engine, thread, before, errors = hostile
    assert httpx.get(thread.url + "/health", timeout=30).status_code == 200
    reply = httpx.post(thread.url + C, json=GREEDY, timeout=60)
    assert reply.status_code == 200 and reply.json()["choices"][0]["text"] == before
    chat = {**GREEDY, "messages": [{"role": "user", "content": "hi"}]}
    assert httpx.post(thread.url + CHAT, json=chat, timeout=60).status_code == 200
    wait_idle(engine)
    assert engine.alive and not errors.records, [r.getMessage() for r in errors.records]
