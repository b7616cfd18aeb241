"""DSLA-Serve over HTTP on loopback (uvicorn in a thread, httpx client), with the tiny toy model."""

import argparse
import asyncio
import json
import threading
import time

import httpx
import pytest
import torch

from dsla_hf.commands import replay as replay_command
from dsla_hf.commands import serve as serve_command
from dsla_hf.serving.engine import Engine, EngineConfig
from dsla_hf.serving.metrics import Metrics
from dsla_hf.serving.models import toy_model, toy_tokenizer
from dsla_hf.serving.policy import AdaptivePolicy, StaticPolicy
from dsla_hf.serving.replay import PromptMaker, load_trace, replay, summarize, write_timed_trace
from dsla_hf.serving.server import ServerThread, build_app

TRACE_CSV = (
    "TIMESTAMP,ContextTokens,GeneratedTokens\n"
    "2023-11-16 18:15:46.6805900,374,44\n"
    "2023-11-16 18:15:46.7000000,396,109\n"
    "2023-11-16 18:15:47.1000000,879,63\n"
    "2023-11-16 18:15:47.2500000,91,7\n"
    "2023-11-16 18:15:47.9000000,1320,20"
)


def serve(policy=None, limits=None, **config):
    model, tok = toy_model(), toy_tokenizer()
    engine = Engine(model, tok, EngineConfig(**config), policy or StaticPolicy(0), Metrics("toy")).start()
    return engine, ServerThread(build_app(engine, tok, "toy", limits))


@pytest.fixture(scope="module")
def server():
    engine, thread = serve(max_num_seqs=4, max_queue=64)
    with thread:
        yield engine, thread.url
    engine.stop()


def stream_events(client, url, body):
    events = []
    with client.stream("POST", url, json=body) as reply:
        assert reply.status_code == 200 and reply.headers["content-type"].startswith("text/event-stream")
        for line in reply.iter_lines():
            if line.startswith("data: "):
                events.append(line[6:])
    return events


def test_routes_completion_and_chat(server):
    engine, url = server
    with httpx.Client(base_url=url, timeout=60) as client:
        assert client.get("/health").status_code == 200
        models = client.get("/v1/models").json()
        assert models["data"][0]["id"] == "toy" and models["data"][0]["max_model_len"] == 512
        body = {"model": "toy", "prompt": "def f(x):", "max_tokens": 7, "temperature": 0, "ignore_eos": True}
        reply = client.post("/v1/completions", json=body).json()
        assert reply["object"] == "text_completion" and reply["choices"][0]["finish_reason"] == "length"
        modes = [[{"from_token": 0, "dsla_layers": []}]]  # every token by softmax layers only
        assert reply["usage"] == {"prompt_tokens": 9, "completion_tokens": 7, "total_tokens": 16, "dsla_modes": modes}
        text = reply["choices"][0]["text"]
        # Streaming gives the same text, in chunks, then a usage chunk, then [DONE].
        events = stream_events(
            client, "/v1/completions", {**body, "stream": True, "stream_options": {"include_usage": True}}
        )
        assert events[-1] == "[DONE]"
        chunks = [json.loads(e) for e in events[:-1]]
        assert "".join(c["choices"][0]["text"] for c in chunks if c["choices"]) == text
        assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 7
        assert chunks[-2]["choices"][0]["finish_reason"] == "length"
        # Token-id prompts.
        ids = client.post("/v1/completions", json={**body, "prompt": [5, 6, 7]}).json()
        assert ids["usage"]["prompt_tokens"] == 3
        # Chat: the tokenizer's chat template.
        chat = {"model": "toy", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5, "temperature": 0}
        reply = client.post("/v1/chat/completions", json={**chat, "ignore_eos": True}).json()
        assert reply["object"] == "chat.completion" and reply["choices"][0]["message"]["role"] == "assistant"
        assert reply["usage"]["prompt_tokens"] == len("<|user|>hi\n<|assistant|>")
        events = stream_events(client, "/v1/chat/completions", {**chat, "ignore_eos": True, "stream": True})
        deltas = [json.loads(e)["choices"][0]["delta"] for e in events[:-1]]
        assert deltas[0]["role"] == "assistant" and events[-1] == "[DONE]"
        assert "".join(d.get("content", "") for d in deltas) == reply["choices"][0]["message"]["content"]
        # Stop strings: the text ends before the first stop string.
        stop = text[3:5]
        reply = client.post("/v1/completions", json={**body, "stop": [stop], "ignore_eos": False}).json()
        assert reply["choices"][0]["text"] == text[: text.index(stop)]
        assert reply["choices"][0]["finish_reason"] == "stop"
        # Seeded sampling is reproducible.
        sampled = {**body, "temperature": 1.0, "top_p": 0.9, "seed": 7, "max_tokens": 12}
        first = client.post("/v1/completions", json=sampled).json()["choices"][0]["text"]
        assert client.post("/v1/completions", json=sampled).json()["choices"][0]["text"] == first
        metrics = client.get("/metrics").text
    for name in (
        "vllm:num_requests_running",
        "vllm:num_requests_waiting",
        "vllm:kv_cache_usage_perc",
        "vllm:time_to_first_token_seconds_bucket",
        "vllm:time_per_output_token_seconds_count",
        "vllm:e2e_request_latency_seconds_sum",
        "vllm:prompt_tokens_total",
        "vllm:generation_tokens_total",
        "dsla:num_dsla_layers",
        "dsla:conversion_ratio",
        "dsla:layer_switches_total",
    ):
        assert f"\n{name}{{" in metrics, name
    assert "# TYPE vllm:e2e_request_latency_seconds histogram" in metrics


@pytest.mark.parametrize(
    "route, body, status, param",
    [
        ("/v1/completions", b"{not json", 400, None),
        ("/v1/completions", b"[1, 2]", 400, None),
        ("/v1/completions", {"model": "toy", "prompt": "x", "max_tokens": "ten"}, 400, "max_tokens"),
        ("/v1/completions", {"model": "toy", "prompt": "x", "max_tokens": -1}, 400, "max_tokens"),
        ("/v1/completions", {"model": "toy", "prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
        ("/v1/completions", {"model": "toy", "prompt": "x", "max_tokens": 10**12}, 400, "max_tokens"),
        ("/v1/completions", {"model": "toy", "prompt": "x", "max_tokens": 500}, 200, None),  # fits: the control
        ("/v1/completions", {"model": "toy", "prompt": "x" * 600, "max_tokens": 5}, 400, None),
        ("/v1/completions", {"model": "toy", "prompt": [1, 2, 10**9]}, 400, None),
        ("/v1/completions", {"model": "gpt-4", "prompt": "x"}, 404, "model"),
        ("/v1/completions", {"model": "toy", "prompt": 42}, 400, "prompt"),
        ("/v1/completions", {"model": "toy", "prompt": ""}, 400, "prompt"),
        ("/v1/completions", {"model": "toy", "prompt": "x", "temperature": "hot"}, 400, "temperature"),
        ("/v1/completions", {"model": "toy", "prompt": "x", "temperature": -1}, 400, "temperature"),
        ("/v1/completions", {"model": "toy", "prompt": "x", "top_p": 0}, 400, "top_p"),
        ("/v1/completions", {"model": "toy", "prompt": "x", "n": 2}, 400, "n"),
        ("/v1/completions", {"model": "toy", "prompt": "x", "stop": 5}, 400, "stop"),
        ("/v1/completions", {"model": "toy", "prompt": "x", "stream": "yes"}, 400, "stream"),
        ("/v1/completions", {"model": "toy", "prompt": "x", "max_tokens": 3, "min_tokens": 5}, 400, "min_tokens"),
        # without max_tokens, min_tokens is checked against the room the prompt leaves (512 tokens of context)
        ("/v1/completions", {"model": "toy", "prompt": "x", "min_tokens": 4, "temperature": 0}, 200, None),
        ("/v1/completions", {"model": "toy", "prompt": "x" * 300, "min_tokens": 400}, 400, "min_tokens"),
        (
            "/v1/completions",
            {"model": "toy", "prompt": "x", "stream_options": {"include_usage": True}},
            400,
            "stream_options",
        ),
        ("/v1/chat/completions", {"model": "toy", "messages": "hi"}, 400, "messages"),
        ("/v1/chat/completions", {"model": "toy", "messages": [{"role": "user", "content": 3}]}, 400, "messages"),
        ("/v1/chat/completions", {"model": "nope", "messages": [{"role": "user", "content": "hi"}]}, 404, "model"),
        # logprobs and echo: completions' `logprobs` is a count, chat's a switch with `top_logprobs` the count
        ("/v1/completions", {"model": "toy", "prompt": "x", "logprobs": 21}, 400, "logprobs"),
        ("/v1/completions", {"model": "toy", "prompt": "x", "logprobs": True}, 400, "logprobs"),
        ("/v1/completions", {"model": "toy", "prompt": "x", "echo": "yes"}, 400, "echo"),
        ("/v1/completions", {"model": "toy", "prompt": "x", "max_tokens": 0, "echo": True}, 200, None),
        ("/v1/chat/completions", {"model": "toy", "messages": [{"role": "user", "content": "hi"}], "logprobs": 2}, 400,
         "logprobs"),
        ("/v1/chat/completions", {"model": "toy", "messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2},
         400, "top_logprobs"),
        ("/v1/chat/completions", {"model": "toy", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 0,
         "echo": True}, 400, "max_tokens"),
        # batches of prompts: all texts or all token ids, at most the queue's bound (64 here)
        ("/v1/completions", {"model": "toy", "prompt": ["x", [5, 6]]}, 400, "prompt"),
        ("/v1/completions", {"model": "toy", "prompt": ["x", ""]}, 400, "prompt"),
        ("/v1/completions", {"model": "toy", "prompt": ["x"] * 65, "max_tokens": 1}, 400, "prompt"),
        ("/v1/completions", {"model": "toy", "prompt": ["x", "x" * 600], "max_tokens": 1}, 400, None),
    ],
)  # fmt: skip
def test_bad_requests_get_a_clear_4xx(server, route, body, status, param):
    _, url = server
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    reply = httpx.post(url + route, content=content, headers={"content-type": "application/json"}, timeout=60)
    assert reply.status_code == status, reply.text
    if status != 200:
        error = reply.json()["error"]
        assert error["message"] and error["code"] == status and error["param"] == param
        assert error["type"] in ("invalid_request_error", "NotFoundError")


def test_echo_of_token_ids_and_batches_of_them(server):
    _, url = server
    tok = toy_tokenizer()
    body = {"model": "toy", "prompt": [[5, 6, 7], [40, 41]], "max_tokens": 0, "echo": True, "logprobs": 1}
    reply = httpx.post(url + "/v1/completions", json=body, timeout=60).json()
    assert [c["text"] for c in reply["choices"]] == [tok.decode([5, 6, 7]), tok.decode([40, 41])]
    assert [len(c["logprobs"]["tokens"]) for c in reply["choices"]] == [3, 2]
    assert reply["usage"] == {"prompt_tokens": 5, "completion_tokens": 0, "total_tokens": 5, "dsla_modes": [[], []]}


def test_tokenizer_routes_and_version(server):
    """vLLM's /tokenize, /detokenize and /version, with the same validation and error bodies as the other routes."""
    import dsla_hf

    engine, url = server
    tok = toy_tokenizer()
    with httpx.Client(base_url=url, timeout=60) as client:
        assert client.get("/version").json() == {"version": dsla_hf.__version__}
        reply = client.post("/tokenize", json={"model": "toy", "prompt": "def f(x):"}).json()
        assert reply == {"count": 9, "max_model_len": 512, "tokens": tok("def f(x):")["input_ids"], "token_strs": None}
        chat = {"messages": [{"role": "user", "content": "hi"}], "return_token_strs": True}
        reply = client.post("/tokenize", json=chat).json()
        completion = {"model": "toy", "max_tokens": 1, **chat}
        assert reply["count"] == client.post("/v1/chat/completions", json=completion).json()["usage"]["prompt_tokens"]
        assert "".join(reply["token_strs"]) == "<|user|>hi\n<|assistant|>"
        assert client.post("/detokenize", json={"tokens": reply["tokens"]}).json() == {
            "prompt": "<|user|>hi\n<|assistant|>"
        }
        assert client.post("/detokenize", json={"tokens": []}).json() == {"prompt": ""}
        for route, body, param in [
            ("/tokenize", {}, "prompt"),
            ("/tokenize", {"prompt": "x", "messages": chat["messages"]}, "prompt"),
            ("/tokenize", {"prompt": ["x"]}, "prompt"),
            ("/tokenize", {"messages": []}, "messages"),
            ("/tokenize", {"prompt": "x", "add_special_tokens": 1}, "add_special_tokens"),
            ("/detokenize", {"tokens": [1, engine.model.config.vocab_size]}, "tokens"),
            ("/detokenize", {"tokens": "abc"}, "tokens"),
            ("/detokenize", {}, "tokens"),
        ]:
            reply = client.post(route, json=body)
            assert reply.status_code == 400 and reply.json()["error"]["param"] == param, (route, body, reply.text)
        assert client.post("/tokenize", json={"model": "gpt-4", "prompt": "x"}).status_code == 404


def test_a_batch_is_queued_whole_or_not_at_all():
    """A batch that the queue cannot take whole is refused (429) and leaves nothing queued."""
    engine, thread = serve(max_num_seqs=1, max_queue=3)
    with thread:
        engine.model.register_forward_pre_hook(lambda *a: time.sleep(0.01))
        long = {"model": "toy", "prompt": "abc", "max_tokens": 300, "ignore_eos": True, "stream": True}
        with (
            httpx.Client(base_url=thread.url, timeout=60) as client,
            client.stream("POST", "/v1/completions", json=long),
        ):
            batch = client.post("/v1/completions", json={**long, "prompt": ["a", "b", "c", "d"], "stream": False})
            assert batch.status_code == 400  # more than the queue holds, ever
            with client.stream("POST", "/v1/completions", json=long):  # one running, one waiting: room for two
                deadline = time.monotonic() + 30
                while engine.num_waiting < 1:
                    assert time.monotonic() < deadline
                    time.sleep(0.01)
                batch = client.post("/v1/completions", json={**long, "prompt": ["a", "b", "c"], "stream": False})
                assert batch.status_code == 429, batch.text
                for _ in range(200):  # the two that were queued are cancelled
                    if engine.num_waiting == 1:
                        break
                    time.sleep(0.02)
                assert engine.num_waiting == 1
    engine.stop()


def test_unknown_route_and_method(server):
    _, url = server
    assert httpx.get(url + "/v1/nothing").status_code == 404
    reply = httpx.get(url + "/v1/completions")
    assert reply.status_code == 405 and reply.json()["error"]["message"]


def test_concurrent_requests_are_batched(server):
    engine, url = server
    seen = []
    stop = threading.Event()

    def watch():
        while not stop.is_set():
            seen.append(len(engine.running))
            stop.wait(0.002)

    async def many():
        async with httpx.AsyncClient(base_url=url, timeout=60) as client:
            bodies = [
                {"model": "toy", "prompt": "x" * (5 + 3 * i), "max_tokens": 40, "ignore_eos": True, "temperature": 0}
                for i in range(6)
            ]
            return await asyncio.gather(*(client.post("/v1/completions", json=b) for b in bodies))

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        replies = asyncio.run(many())
    finally:
        stop.set()
        watcher.join()
    assert all(r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 40 for r in replies)
    assert max(seen) >= 3  # decoded together
    # Batched greedy outputs equal the outputs of each request alone.
    alone = httpx.post(url + "/v1/completions", json={**json.loads(json.dumps({"model": "toy"})), "prompt": "x" * 8,
                       "max_tokens": 40, "ignore_eos": True, "temperature": 0}, timeout=60).json()  # fmt: skip
    assert alone["choices"][0]["text"] == replies[1].json()["choices"][0]["text"]


def test_disconnect_cancels_and_full_queue_answers_429():
    engine, thread = serve(max_num_seqs=1, max_queue=1)
    with thread:
        url = thread.url
        long = {"model": "toy", "prompt": "abc", "max_tokens": 500, "ignore_eos": True, "stream": True}
        with httpx.Client(timeout=60) as client:
            with client.stream("POST", url + "/v1/completions", json=long) as reply:
                for line in reply.iter_lines():
                    if line.startswith("data: "):
                        break  # one chunk, then hang up
        for _ in range(200):
            if not engine.running and not engine.prefilling:
                break
            threading.Event().wait(0.02)
        assert not engine.running, "the disconnected request kept running"
        # Fill the engine (one running) and the queue (one waiting): the next request is refused with 429. The model
        # is slowed down so that the running request cannot finish before the second one has queued.
        engine.model.register_forward_pre_hook(lambda *a: time.sleep(0.01))
        with httpx.Client(timeout=60) as client, client.stream("POST", url + "/v1/completions", json=long) as a:
            next(a.iter_lines())
            with client.stream("POST", url + "/v1/completions", json=long) as b:
                deadline = time.monotonic() + 30
                while engine.num_waiting < 1:
                    assert time.monotonic() < deadline, "the second request never queued"
                    threading.Event().wait(0.01)
                third = client.post(url + "/v1/completions", json={**long, "stream": False})
                assert third.status_code == 429 and "busy" in third.json()["error"]["message"]
                assert b.status_code == 200
    engine.stop()


def test_timeout_answers_408():
    engine, thread = serve(max_num_seqs=1, request_timeout_s=0.3)
    with thread:
        body = {"model": "toy", "prompt": "abc", "max_tokens": 500, "ignore_eos": True}
        engine.model.register_forward_pre_hook(lambda *a: time.sleep(0.01))  # slow it down
        reply = httpx.post(thread.url + "/v1/completions", json=body, timeout=60)
        assert reply.status_code == 408 and "timed out" in reply.json()["error"]["message"]
    engine.stop()


def test_switching_under_load_over_http_is_exact():
    """Concurrent streaming requests while the adaptive policy converts the top layer: every greedy token equals a
    fresh forward with the layer kinds the engine recorded for that token."""
    policy = AdaptivePolicy(
        num_layers=4, step=0.25, max_ratio=0.25, prompt_caps=((1e9, 0.25),), queue_high=2, queue_low=0,
        kv_high=1.0, kv_low=1.0, prompt_high=None, prompt_low=None, cooldown_s=0.0,
    )  # fmt: skip
    engine, thread = serve(policy=policy, max_num_seqs=2)
    recorded = []
    submit = engine.submit

    def recording_submit(*args, **kwargs):
        request = submit(*args, **kwargs)
        recorded.append(request)
        return request

    engine.submit = recording_submit
    with thread:

        async def many():
            async with httpx.AsyncClient(base_url=thread.url, timeout=60) as client:
                tasks = []
                for i in range(6):
                    body = {"model": "toy", "prompt": [5 + i] * (4 + 3 * i), "max_tokens": 15, "temperature": 0}
                    tasks.append(client.post("/v1/completions", json={**body, "ignore_eos": True}))
                    await asyncio.sleep(0.05)
                return await asyncio.gather(*tasks)

        replies = asyncio.run(many())
    engine.stop()
    assert all(r.status_code == 200 for r in replies)
    assert engine.layer_switches >= 1 and any(len(r.modes) > 1 or r.modes[0][1] for r in recorded)
    # Each response says which layers produced its tokens (the request's own modes).
    modes = {tuple(r.prompt_ids): [{"from_token": i, "dsla_layers": list(m)} for i, m in r.modes] for r in recorded}
    for reply, i in zip(replies, range(6)):
        assert reply.json()["usage"]["dsla_modes"] == [modes[tuple([5 + i] * (4 + 3 * i))]]
    model = engine.model
    for request in recorded:
        for j, token in enumerate(request.output_ids):
            model.set_dsla_layers(list(request.dsla_layers_at(j)))
            with torch.no_grad():
                logits = model(torch.tensor([request.prompt_ids + request.output_ids[:j]]), use_cache=False).logits
            assert token == int(logits[0, -1].argmax()), (j, request.modes)


def test_short_replay(tmp_path):
    trace = tmp_path / "trace.csv"
    trace.write_text(TRACE_CSV)
    requests = load_trace(trace, time_scale=0.5, length_scale=0.05, max_output=8)
    assert [r.input_length for r in requests] == [19, 20, 44, 5, 66]
    assert [r.output_length for r in requests] == [2, 5, 3, 1, 1]
    assert requests[0].timestamp == 0.0 and abs(requests[2].timestamp - 0.20970) < 1e-4
    write_timed_trace(requests, tmp_path / "timed.jsonl")
    rows = [json.loads(line) for line in (tmp_path / "timed.jsonl").read_text().splitlines()]
    assert rows[1] == {"timestamp": requests[1].timestamp, "input_length": 20, "output_length": 5}
    engine, thread = serve(max_num_seqs=4)
    tok = toy_tokenizer()
    maker = PromptMaker(tok, text="The quick brown fox jumps over the lazy dog. " * 20)
    assert len(maker(37)) == 37
    with thread:
        results, samples, duration = asyncio.run(replay(thread.url, requests, maker))
    engine.stop()
    summary = summarize(results, duration, {"ttft": 10_000, "e2el": 20_000})
    assert summary["completed"] == 5 and summary["failed"] == 0
    assert summary["total_output_tokens"] == 12 and summary["total_input_tokens"] == 154
    for key in ("mean_ttft_ms", "median_tpot_ms", "p99_itl_ms", "mean_e2el_ms", "request_goodput"):
        assert key in summary
    assert samples and "dsla:num_dsla_layers" in samples[0]


def test_serve_and_replay_commands(tmp_path, capsys):
    """The command lines: `dsla serve`'s policy and engine options, `dsla replay --dry-run` on a trace file."""
    parser = argparse.ArgumentParser()
    serve_command.add_arguments(parser)
    args = parser.parse_args(["--queue-high", "3", "--prompt-high", "0", "--kv-cache-gb", "0.5"])
    policy = serve_command.make_policy(args, toy_model())
    assert isinstance(policy, AdaptivePolicy) and policy.queue_high == 3 and policy.prompt_high is None
    assert serve_command.engine_config(args).kv_cache_bytes == 2**29
    static = serve_command.make_policy(parser.parse_args(["--policy", "static", "--dsla-ratio", "0.5"]), toy_model())
    assert static == StaticPolicy(2)
    trace = tmp_path / "trace.csv"
    trace.write_text(TRACE_CSV)
    parser = argparse.ArgumentParser()
    replay_command.add_arguments(parser)
    timed = tmp_path / "timed.jsonl"
    args = parser.parse_args(
        ["--trace", str(trace), "--time-scale", "0.5", "--dry-run", "--save-timed-trace", str(timed)]
    )
    assert replay_command.run(args) == 0
    assert json.loads(capsys.readouterr().out) == {"requests": 5, "span_s": 0.609705}
    assert len(timed.read_text().splitlines()) == 5
    assert replay_command.parse_slo(["ttft:100", "e2el:2e3"]) == {"ttft": 100.0, "e2el": 2000.0}
    with pytest.raises(ValueError, match="--goodput"):
        replay_command.parse_slo(["p50:3"])


def test_a_follow_up_turn_is_served_from_the_prefix_cache(server):
    """A chat's second turn resends the first: its usage counts the first turn as cached (OpenAI's
    `prompt_tokens_details.cached_tokens`), and /metrics counts the hit under vLLM's name."""
    engine, url = server
    with httpx.Client(base_url=url, timeout=60) as client:
        messages = [{"role": "user", "content": "Name three prime numbers, please."}]
        body = {"model": "toy", "messages": messages, "max_tokens": 5, "temperature": 0, "ignore_eos": True}
        first = client.post("/v1/chat/completions", json=body).json()
        assert "prompt_tokens_details" not in first["usage"]
        answer = {"role": "assistant", "content": first["choices"][0]["message"]["content"]}
        messages = messages + [answer, {"role": "user", "content": "And two more?"}]
        second = client.post("/v1/chat/completions", json={**body, "messages": messages}).json()
        # the toy template renders the first turn unchanged at the start of the second: its prompt and all but the
        # last answer token (the one the first request sampled but never fed) come from the cache
        held = first["usage"]["prompt_tokens"] + first["usage"]["completion_tokens"] - 1
        assert second["usage"]["prompt_tokens_details"] == {"cached_tokens": held}
        metrics = client.get("/metrics").text
    hits = [line for line in metrics.splitlines() if line.startswith("vllm:prefix_cache_hits_total")]
    assert hits and float(hits[0].split()[-1]) >= first["usage"]["prompt_tokens"]
