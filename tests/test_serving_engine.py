"""The serving engine on a tiny random model: batching, exact switching under load, cancellation, limits."""

import threading
import time

import pytest
import torch

from dsla_hf import DSLACache
from dsla_hf.serving.engine import Engine, EngineConfig, QueueFull
from dsla_hf.serving.models import toy_model, toy_tokenizer
from dsla_hf.serving.policy import AdaptivePolicy, StaticPolicy
from dsla_hf.serving.sampling import Detokenizer, IncrementalDecoder, SamplingParams


@pytest.fixture(scope="module")
def toy():
    return toy_model(), toy_tokenizer()


def collect(engine, prompts, params, max_steps=2000):
    """Submit every prompt, step the engine synchronously until all finish; returns (requests, outputs)."""
    outputs = [[] for _ in prompts]
    requests = [engine.submit(p, params, outputs[i].append) for i, p in enumerate(prompts)]
    batch_sizes = []
    for _ in range(max_steps):
        if all(r.finish_reason for r in requests):
            break
        engine.step()
        batch_sizes.append(len(engine.running))
    return requests, outputs, batch_sizes


def reference_token(model, ids, layers):
    """Greedy next token of a fresh full forward (no cache) with the given DSLA layers."""
    saved = model.config.active_dsla_layers
    model.set_dsla_layers(list(layers))
    with torch.no_grad():
        logits = model(torch.tensor([ids]), use_cache=False).logits[0, -1]
    model.set_dsla_layers(saved)
    return int(logits.argmax())


def prompts_of(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 101, (n,), generator=g).tolist() for n in lengths]


@pytest.mark.parametrize("active", [[], [3, 2]])
def test_batched_greedy_matches_each_request_alone(toy, active):
    model, tok = toy
    model.set_dsla_layers(active)
    engine = Engine(model, tok, EngineConfig(max_num_seqs=4, prefill_chunk=7), policy=StaticPolicy(len(active)))
    params = SamplingParams(max_tokens=9, temperature=0.0, ignore_eos=True)
    prompts = prompts_of([13, 5, 21, 8])
    requests, outputs, batch_sizes = collect(engine, prompts, params)
    assert max(batch_sizes) >= 3  # decoded together, admitted without draining
    for request, prompt in zip(requests, prompts):
        assert request.finish_reason == "length" and len(request.output_ids) == 9
        for j, token in enumerate(request.output_ids):
            assert token == reference_token(model, prompt + request.output_ids[:j], active), j
    assert engine.cache is None and engine.running == []  # everything freed
    model.set_dsla_layers([])


def one_layer_when_queued() -> AdaptivePolicy:
    """One DSLA layer (the first of the conversion order) once 3 requests wait, none again when none waits."""
    return AdaptivePolicy(
        num_layers=4, step=0.25, max_ratio=0.25, prompt_caps=((1e9, 0.25),), queue_high=3, queue_low=0, kv_high=1.0,
        kv_low=1.0, prompt_high=None, prompt_low=None, cooldown_s=0.0,
    )  # fmt: skip


def test_switching_under_load_is_exact_for_the_top_layer(toy):
    """Layer 3 (the top layer) becomes DSLA while requests are in flight: its KV is folded, and every token equals
    a fresh forward with the layer kinds that the token was produced with (recorded per request and token)."""
    model, tok = toy
    model.set_dsla_layers([])
    engine = Engine(model, tok, EngineConfig(max_num_seqs=2, prefill_chunk=16), policy=one_layer_when_queued())
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    prompts = prompts_of([11, 4, 17, 9, 6, 14], seed=1)
    requests = [engine.submit(p, params, lambda out: None) for p in prompts[:2]]
    for _ in range(4):
        engine.step()  # two requests decoding with every layer as softmax attention
    assert engine.layer_switches == 0 and len(engine.running) == 2
    more, _, _ = collect(engine, prompts[2:], params)  # the queue grows: layer 3 switches mid-flight
    requests += more
    assert all(r.finish_reason == "length" for r in requests)
    # Up when the queue grew, down when it emptied: requests that lost layer 3's keys and values kept it.
    assert engine.layer_switches >= 2 and engine.deferred_decreases > 0 and engine.runner.layers == ()
    switched_mid_flight = [r for r in requests if len(r.modes) > 1]
    assert switched_mid_flight, "no request saw a switch"
    for request, prompt in zip(requests, prompts):
        for j, token in enumerate(request.output_ids):
            layers = request.dsla_layers_at(j)
            assert token == reference_token(model, prompt + request.output_ids[:j], layers), (j, layers)


def greedy_with_switches(model, prompt, request):
    """Greedy tokens of `prompt` in a plain loop on one cache (no engine, no batch), switching the layers, and
    folding the cache, before the same output tokens as `request` saw them switch."""
    cache = DSLACache(model.config)
    current = request.dsla_layers_at(0)
    model.set_dsla_layers(list(current))
    with torch.no_grad():
        tokens = [int(model(torch.tensor([prompt]), cache=cache, use_cache=True).logits[0, -1].argmax())]
        for j in range(1, len(request.output_ids)):
            if request.dsla_layers_at(j) != current:
                current = request.dsla_layers_at(j)
                model.set_dsla_layers(list(current), caches=[cache])
            tokens.append(int(model(torch.tensor([[tokens[-1]]]), cache=cache, use_cache=True).logits[0, -1].argmax()))
    return tokens


def test_switching_a_lower_layer_under_load_equals_the_same_switch_without_the_engine():
    """Conversion order bottom first: layer 0 becomes DSLA mid-flight. Its own states are folded exactly, but the
    layers above keep the keys and values they computed from its softmax outputs, so the tokens after the switch
    are not a fixed-configuration run's (that guarantee needs the switched layers above every other layer whose
    kind changed, as in the test above). What holds for any order: each request's tokens equal a plain loop that
    switches the same layers at the same token, folding its one cache."""
    model, tok = toy_model(conversion_order=[0, 1, 2, 3]), toy_tokenizer()
    engine = Engine(model, tok, EngineConfig(max_num_seqs=2, prefill_chunk=16), policy=one_layer_when_queued())
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    prompts = prompts_of([11, 4, 16, 9, 6, 14], seed=1)  # one prefill chunk each
    requests = [engine.submit(p, params, lambda out: None) for p in prompts[:2]]
    for _ in range(4):
        engine.step()
    more, _, _ = collect(engine, prompts[2:], params)
    requests += more
    assert engine.layer_switches >= 1 and any(r.dsla_layers_at(11) == (0,) for r in requests)
    switched_mid_flight = [r for r in requests if len(r.modes) > 1]
    assert switched_mid_flight, "no request saw a switch"
    for request, prompt in zip(requests, prompts):
        assert request.output_ids == greedy_with_switches(model, prompt, request)


def test_sampling_is_reproducible_with_a_seed(toy):
    model, tok = toy
    engine = Engine(model, tok)
    params = SamplingParams(max_tokens=8, temperature=0.9, top_p=0.8, seed=1234, ignore_eos=True)
    a, _, _ = collect(engine, prompts_of([6]), params)
    b, _, _ = collect(engine, prompts_of([6]), params)
    assert a[0].output_ids == b[0].output_ids


def test_stop_strings_min_tokens_and_eos(toy):
    model, tok = toy
    engine = Engine(model, tok)
    prompt = prompts_of([7], seed=3)
    (free,), (outs,), _ = collect(engine, prompt, SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True))
    text = "".join(o.text for o in outs)
    assert text == tok.decode(free.output_ids, skip_special_tokens=True)
    stop = text[10:12]
    (stopped,), (outs,), _ = collect(engine, prompt, SamplingParams(max_tokens=30, temperature=0.0, stop=[stop]))
    assert stopped.finish_reason == "stop" and "".join(o.text for o in outs) == text[: text.index(stop)]
    # Pretend the third greedy token is the end of sequence: it ends the request, unless min_tokens forbids it.
    eos_id = free.output_ids[2]
    first = free.output_ids.index(eos_id)
    engine.output.eos_ids = [eos_id]
    (eos,), _, _ = collect(engine, prompt, SamplingParams(max_tokens=10, temperature=0.0))
    assert eos.finish_reason == "stop" and len(eos.output_ids) == first + 1
    (forced,), _, _ = collect(engine, prompt, SamplingParams(max_tokens=10, temperature=0.0, min_tokens=5))
    assert len(forced.output_ids) >= 5 and eos_id not in forced.output_ids[:5]
    (ignored,), _, _ = collect(engine, prompt, SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True))
    assert ignored.finish_reason == "length" and ignored.output_ids == free.output_ids[:10]


def test_limits_queue_cancel_and_timeout(toy):
    model, tok = toy
    engine = Engine(model, tok, EngineConfig(max_queue=2, max_num_seqs=1, request_timeout_s=0.05))
    with pytest.raises(ValueError, match="maximum context length is 512"):
        engine.submit([5] * 500, SamplingParams(max_tokens=20), print)
    with pytest.raises(ValueError, match="token ids"):
        engine.submit([5, 1000], SamplingParams(max_tokens=2), print)
    params = SamplingParams(max_tokens=400, temperature=0.0, ignore_eos=True)
    outs = [[], [], []]
    a = engine.submit([5] * 10, params, outs[0].append)
    b = engine.submit([6] * 10, params, outs[1].append)
    with pytest.raises(QueueFull):
        engine.submit([7] * 10, params, print)
    engine.step()  # a starts
    b.cancel()
    engine.step()
    assert b.finish_reason == "abort" and outs[1][-1].finish_reason == "abort"
    time.sleep(0.06)
    engine.step()
    assert a.finish_reason == "timeout" and "timed out" in outs[0][-1].error
    assert engine.running == [] and engine.cache is None
    engine.submit([7] * 10, SamplingParams(max_tokens=2), outs[2].append)  # room again


def test_engine_thread_serves_concurrent_submissions(toy):
    model, tok = toy
    engine = Engine(model, tok, EngineConfig(max_num_seqs=4)).start()
    try:
        done = []
        events = [threading.Event() for _ in range(6)]

        def sink(i):
            def receive(out):
                if out.finished:
                    done.append((i, out.completion_tokens, out.finish_reason))
                    events[i].set()

            return receive

        for i, p in enumerate(prompts_of([5, 9, 3, 12, 7, 4])):
            engine.submit(p, SamplingParams(max_tokens=6, ignore_eos=True, temperature=0.0), sink(i))
        assert all(e.wait(30) for e in events)
        assert sorted(done) == [(i, 6, "length") for i in range(6)]
        assert engine.metrics.get("vllm:generation_tokens_total") >= 36
    finally:
        engine.stop()


def test_a_failing_first_token_ends_its_request_and_the_engine_serves_on(toy, monkeypatch):
    """Sampling that raises at a request's first token (after its prefill) ends that request with an error: it is
    never left waiting for a token that will not come, and the next request is served."""
    import dsla_hf.serving.output_processor as engine_module

    model, tok = toy
    model.set_dsla_layers([])
    calls = {"n": 0}
    real_sample = engine_module.sample

    def flaky_sample(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("injected sampling failure")
        return real_sample(*args, **kwargs)

    monkeypatch.setattr(engine_module, "sample", flaky_sample)
    engine = Engine(model, tok, EngineConfig(max_num_seqs=2), policy=StaticPolicy(0)).start()
    try:
        params = SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True)
        done = [threading.Event(), threading.Event()]
        outputs = [[], []]

        def sink(i):
            def put(out):
                outputs[i].append(out)
                if out.finish_reason is not None:
                    done[i].set()

            return put

        failed = engine.submit(prompts_of([6])[0], params, sink(0))
        assert done[0].wait(30), "the request whose first token failed never finished"
        assert failed.finish_reason == "error" and "RuntimeError" in outputs[0][-1].error
        served = engine.submit(prompts_of([6], seed=1)[0], params, sink(1))
        assert done[1].wait(30) and served.finish_reason == "length" and len(served.output_ids) == 3
    finally:
        engine.stop()


# --- logprobs --------------------------------------------------------------------------------------------------------


def reference_logprobs(model, ids, layers):
    """Log-softmax of a fresh full forward (no cache) of `ids` with these DSLA layers: row i predicts ids[i + 1]."""
    saved = model.config.active_dsla_layers
    model.set_dsla_layers(list(layers))
    with torch.no_grad():
        logits = model(torch.tensor([ids]), use_cache=False).logits[0]
    model.set_dsla_layers(saved)
    return logits.float().log_softmax(-1)


def assert_entry(entry, token, row, k):
    assert entry.token == token
    assert abs(entry.logprob - float(row[token])) < 1e-4, (entry.logprob, float(row[token]))
    values, ids = row.topk(k)
    assert [t for t, _ in entry.top] == ids.tolist()
    assert max(abs(v - float(r)) for (_, v), r in zip(entry.top, values)) < 1e-4


@pytest.mark.parametrize("active", [[], [3, 2]])
def test_logprobs_equal_a_forward_without_cache(toy, active):
    """Prompt logprobs over several prefill chunks and output logprobs of a batch of sampled requests: those of the
    model's own distribution (not of temperature or top-p), equal to a no-cache forward of prompt and output."""
    model, tok = toy
    model.set_dsla_layers(active)
    engine = Engine(model, tok, EngineConfig(max_num_seqs=3, prefill_chunk=7), policy=StaticPolicy(len(active)))
    params = SamplingParams(max_tokens=6, temperature=0.7, top_p=0.9, seed=5, ignore_eos=True)
    params.logprobs, params.prompt_logprobs = 3, 2
    prompts = prompts_of([20, 5, 13], seed=4)
    requests, outputs, batch_sizes = collect(engine, prompts, params)
    assert max(batch_sizes) >= 2
    for request, outs, prompt in zip(requests, outputs, prompts):
        ref = reference_logprobs(model, prompt + request.output_ids, active)
        scored = [o.prompt_logprobs for o in outs if o.prompt_logprobs is not None]
        assert len(scored) == 1 and outs[0].prompt_logprobs is scored[0]  # with the first output, once
        assert scored[0][0] == (prompt[0], None, None) and len(scored[0]) == len(prompt)
        for i, entry in enumerate(scored[0][1:], start=1):
            assert_entry(entry, prompt[i], ref[i - 1], 2)
        entries = [e for o in outs for e in o.logprobs]
        assert len(entries) == len(request.output_ids) == 6
        for j, entry in enumerate(entries):
            assert_entry(entry, request.output_ids[j], ref[len(prompt) - 1 + j], 3)
    model.set_dsla_layers([])


def test_max_tokens_zero_scores_the_prompt_alone_and_others_keep_one_logit(toy):
    """`max_tokens=0` (echo): the prompt scored, nothing generated. Only a scored prompt computes every position's
    logits: every other prefill keeps the last one."""
    model, tok = toy
    kept, forward_groups = [], model.forward_groups

    def recording(groups):
        kept.append([group.logits_to_keep for group in groups])
        return forward_groups(groups)

    model.forward_groups = recording
    try:
        engine = Engine(model, tok, EngineConfig(prefill_chunk=8))
        prompt = prompts_of([19], seed=6)
        (plain,), _, _ = collect(engine, prompt, SamplingParams(max_tokens=2, temperature=0.0))
        assert kept == [[1], [1], [1], [1]] and plain.finish_reason  # three prefill chunks, then a decode step
        kept.clear()
        (scored,), (outs,), _ = collect(engine, prompt, SamplingParams(max_tokens=0, prompt_logprobs=0))
        assert kept == [[0], [0], [0]]
    finally:
        del model.forward_groups
    assert scored.finish_reason == "length" and scored.output_ids == [] and len(outs) == 1
    assert outs[0].completion_tokens == 0 and outs[0].prompt_tokens == 19 and outs[0].text == ""
    ref = reference_logprobs(model, prompt[0], [])
    assert [e.top for e in outs[0].prompt_logprobs[1:]] == [[]] * 18
    assert max(abs(e.logprob - float(ref[i, e.token])) for i, e in enumerate(outs[0].prompt_logprobs[1:])) < 1e-4
    with pytest.raises(ValueError, match="logprobs"):
        SamplingParams(logprobs=21)


# --- incremental detokenisation --------------------------------------------------------------------------------------


def stream_text(tokenizer, ids, stop=()):
    """(the deltas a request streams, token by token, then its flush; the largest tail the decoder decoded)."""
    detok, deltas, tail = Detokenizer(tokenizer, list(stop)), [], 0
    for token in ids:
        text, hit = detok.update([token], check_stop=True)
        deltas.append(text)
        tail = max(tail, len(detok.decoder.window))
        if hit:
            return deltas, tail
    return deltas + [detok.flush()], tail


def expected_text(tokenizer, ids, stop=()):
    text = tokenizer.decode(ids, skip_special_tokens=True)
    hits = [i for i in (text.find(s) for s in stop) if i >= 0]
    return text[: min(hits)] if hits else text


@pytest.fixture(scope="module")
def smollm2_tokenizer():
    """The real SmolLM2 tokenizer (byte-level BPE), from the files `load_teacher` loads (offline)."""
    from transformers import AutoTokenizer

    from dsla_hf.teacher import teacher_folder

    try:
        return AutoTokenizer.from_pretrained(teacher_folder())
    except (ImportError, FileNotFoundError) as error:
        pytest.skip(f"no SmolLM2 teacher here: {error}")


def test_incremental_detokenizer_equals_a_whole_decode_on_the_toy_tokenizer(toy):
    _, tok = toy
    g = torch.Generator().manual_seed(0)
    for trial in range(300):
        ids = torch.randint(0, 101, (int(torch.randint(1, 40, (1,), generator=g)),), generator=g).tolist()
        full = tok.decode(ids, skip_special_tokens=True)
        stop = [full[3:6]] if trial % 2 and len(full) > 6 else []
        deltas, tail = stream_text(tok, ids, stop)
        assert "".join(deltas) == expected_text(tok, ids, stop), ids
        assert tail <= 2 * IncrementalDecoder.MAX_PENDING  # (special tokens add no text: the tail waits for some)
    deltas, tail = stream_text(tok, [40] + [0, 1, 2] * 200 + [41])  # special tokens alone do not grow the tail
    assert "".join(deltas) == tok.decode([40, 41]) and tail <= 2


def test_incremental_detokenizer_equals_a_whole_decode_on_smollm2(smollm2_tokenizer):
    """Random token sequences of the real byte-level tokenizer: random ids, single bytes (characters split across
    tokens, and bytes that are no character), special tokens, and slices of real multilingual text. The streamed
    text equals `tokenizer.decode` of the whole output; valid text never streams U+FFFD; the decoded tail stays
    bounded; stop strings across token boundaries end the text before them."""
    import random

    from dsla_hf.serving.openai_protocol import byte_level_alphabet

    tok = smollm2_tokenizer
    byte_ids = [tok.convert_tokens_to_ids(c) for c in byte_level_alphabet()]
    real = tok("naïve café — 東京タワー 😀👍🏽 ok, Zürich: Ελλάδα\n" * 3)["input_ids"]
    specials = tok.all_special_ids
    rng = random.Random(0)
    for trial in range(2000):
        n, kind = rng.randint(1, 48), trial % 4
        pool = [range(len(tok)), byte_ids, byte_ids + real + specials, None][kind]
        start = rng.randrange(len(real))
        ids = real[start : start + n] if pool is None else [rng.choice(pool) for _ in range(n)]
        deltas, tail = stream_text(tok, ids)
        assert "".join(deltas) == tok.decode(ids, skip_special_tokens=True), ids
        assert tail <= 2 * IncrementalDecoder.MAX_PENDING
        if "\ufffd" not in tok.decode(ids):  # valid text: no replacement character mid-stream
            assert not any("\ufffd" in d for d in deltas), deltas
    pathological = [byte_ids[0xE2]] * 100 + [byte_ids[0x80], byte_ids[0x99]]  # lead bytes that are no character
    deltas, tail = stream_text(tok, pathological)
    assert "".join(deltas) == tok.decode(pathological) and tail <= 2 * IncrementalDecoder.MAX_PENDING
    for stop in (["東京タ"], ["😀👍"], ["é —", "zzz"], ["\n"]):
        deltas, _ = stream_text(tok, real, stop)
        assert "".join(deltas) == expected_text(tok, real, stop) and not any(s in "".join(deltas) for s in stop)


def test_a_step_is_one_forward_with_decode_tokens_and_prompt_chunks(toy):
    """Each step runs the batch's decode tokens and prompt chunks of waiting requests as one forward (one MLP call
    per layer over all of them) within the token budget: running requests get a token at every step while a long
    prompt is prefilled, two short prompts start in the same step, and every token equals a fresh forward's."""
    model, tok = toy
    model.set_dsla_layers([3, 2])
    config = EngineConfig(max_num_seqs=4, prefill_chunk=8, max_num_batched_tokens=10)
    engine = Engine(model, tok, config, policy=StaticPolicy(2))
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    calls = []
    hook = model.model.layers[0].mlp.register_forward_hook(lambda module, args, out: calls.append(args[0].shape[0]))
    try:
        first = engine.submit(prompts_of([5])[0], params, lambda _: None)
        engine.step()  # its whole prompt: 5 tokens, then its first output token
        assert engine.running == [first] and len(first.output_ids) == 1
        long, short_a, short_b = prompts_of([30, 3, 4], seed=1)
        late = [engine.submit(p, params, lambda _: None) for p in (long, short_a, short_b)]
        calls.clear()
        engine.step()  # 1 decode token + 8 of the long prompt (a chunk ends at a multiple of 8) + 1 of short_a
        assert calls == [10] and len(first.output_ids) == 2
        assert late[0].prefilled == 8 and late[1].prefilled == 1 and not late[2].prefilled
        for _ in range(4):
            before, calls[:] = len(first.output_ids), []
            engine.step()
            assert len(calls) == 1 and calls[0] <= 10 and len(first.output_ids) == before + 1
        assert all(r.output_ids for r in late)
        while not all(r.finish_reason for r in [first, *late]):
            engine.step()
    finally:
        hook.remove()
    for request in [first, *late]:
        assert request.finish_reason == "length"
        for j, token in enumerate(request.output_ids):
            assert token == reference_token(model, request.prompt_ids + request.output_ids[:j], [2, 3]), j
    model.set_dsla_layers([])


def test_the_token_budget_must_leave_room_for_prompts():
    with pytest.raises(ValueError, match="max_num_batched_tokens"):
        EngineConfig(max_num_seqs=8, max_num_batched_tokens=8)
    assert EngineConfig(max_num_seqs=4, prefill_chunk=100).max_num_batched_tokens == 104


def test_each_request_runs_its_own_layers_in_mixed_batches(toy):
    """Per-request conversion (the paper's mixed batches): a context under 10 tokens is capped at no DSLA layer,
    a longer one runs the top two. Short and long requests decode in one step as two batches; a short request
    whose context passes 10 tokens has its own keys and values folded into layers 2 and 3 and moves to the other
    batch (split from the requests that stay). Every token equals a fresh forward with the layers it was produced
    with."""
    model, tok = toy
    policy = AdaptivePolicy(
        num_layers=4, step=0.5, max_ratio=0.5, prompt_caps=((10, 0.0), (1e9, 0.5)), queue_high=0, queue_low=0,
        kv_high=1.0, kv_low=1.0, prompt_high=None, prompt_low=None, cooldown_s=0.0,
    )  # fmt: skip
    engine = Engine(model, tok, EngineConfig(max_num_seqs=4, prefill_chunk=8), policy=policy)
    params = SamplingParams(max_tokens=9, temperature=0.0, ignore_eos=True)
    prompts = prompts_of([6, 14, 4, 20], seed=2)
    requests = [engine.submit(p, params, lambda _: None) for p in prompts]
    kinds_seen = []
    while not all(r.finish_reason for r in requests):
        engine.step()
        kinds_seen.append(sorted(b.layers for b in engine.batches))
    assert [(), (2, 3)] in kinds_seen  # two kinds decoded in one step
    for request in requests:
        first = request.dsla_layers_at(0)
        assert first == ((2, 3) if len(request.prompt_ids) >= 10 else ())
    risen = [r for r in requests if [layers for _, layers in r.modes] == [(), (2, 3)]]
    assert len(risen) == 2  # both short requests rose once their context passed 10 tokens
    assert risen[0].modes[1][0] != risen[1].modes[1][0]  # at different tokens: the short batch was split
    for request in requests:
        for j, token in enumerate(request.output_ids):
            layers = request.dsla_layers_at(j)
            assert token == reference_token(model, request.prompt_ids + request.output_ids[:j], layers), (j, layers)
    model.set_dsla_layers([])


def test_with_kept_keys_and_values_running_requests_follow_a_decrease(toy):
    """With `keep_kv`, a running request whose layers shrink goes back to softmax attention at once (its kept keys
    and values are complete), so no decrease is deferred; every token still equals a fresh forward with the layers
    it was produced with, and some request saw layer 3 come and go while it ran."""
    model, tok = toy
    config = EngineConfig(max_num_seqs=2, prefill_chunk=16, keep_kv=True)
    engine = Engine(model, tok, config, policy=one_layer_when_queued())
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    prompts = prompts_of([11, 4, 17, 9, 6, 14], seed=1)
    requests, _, _ = collect(engine, prompts, params)
    assert engine.layer_switches >= 2 and engine.deferred_decreases == 0
    assert any([layers for _, layers in r.modes][-2:] == [(3,), ()] for r in requests), [r.modes for r in requests]
    for request, prompt in zip(requests, prompts):
        for j, token in enumerate(request.output_ids):
            layers = request.dsla_layers_at(j)
            assert token == reference_token(model, prompt + request.output_ids[:j], layers), (j, layers)
