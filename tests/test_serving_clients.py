"""DSLA-Serve against clients written elsewhere, on loopback with the toy model: the `openai` Python SDK
(completions and chat, streaming or not, with logprobs) and lm-evaluation-harness's `local-completions` model, whose
log-likelihoods must equal those of lm-eval's in-process HFLM on the same model. No network."""

from __future__ import annotations

import httpx
import pytest
import torch

from dsla_hf.serving.models import toy_tokenizer

from .test_serving_server import serve

openai = pytest.importorskip("openai")

PROMPT = "def f(x):"


@pytest.fixture(scope="module")
def server():
    engine, thread = serve(max_num_seqs=4, max_queue=16)
    with thread:
        yield engine, thread.url
    engine.stop()


@pytest.fixture(scope="module")
def client(server):
    _, url = server
    with openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=60) as client:
        yield client


def no_cache_logprobs(engine, ids: list[int]) -> torch.Tensor:
    """The independent reference: log-softmax of one forward of the whole sequence without cache (row i predicts
    token i + 1)."""
    with torch.no_grad():
        return engine.model(torch.tensor([ids]), use_cache=False).logits[0].float().log_softmax(-1)


def test_openai_sdk_completions_with_logprobs_and_echo(server, client):
    engine, _ = server
    tok = toy_tokenizer()
    common = dict(model="toy", max_tokens=6, temperature=0.8, seed=3, extra_body={"ignore_eos": True})
    reply = client.completions.create(prompt=PROMPT, logprobs=2, echo=True, **common)
    (only,) = reply.choices
    prompt_ids = tok(PROMPT)["input_ids"]
    lp = only.logprobs
    assert only.text.startswith(PROMPT) and len(lp.tokens) == len(prompt_ids) + 6 == len(lp.text_offset)
    assert "".join(lp.tokens) == only.text and lp.text_offset[:3] == [0, 1, 2]
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None  # nothing predicts the first prompt token
    ids = prompt_ids + tok.convert_tokens_to_ids(lp.tokens[len(prompt_ids) :])
    ref = no_cache_logprobs(engine, ids)
    for i in range(1, len(ids)):  # raw model logprobs (not those of temperature 0.8), prompt and completion alike
        assert abs(lp.token_logprobs[i] - float(ref[i - 1, ids[i]])) < 1e-4, i
        top = lp.top_logprobs[i]
        assert lp.tokens[i] in top and len(top) <= 3  # the two likeliest, and the sampled token
        assert max(top.values()) == pytest.approx(float(ref[i - 1].max()), abs=1e-4)
    assert reply.usage.prompt_tokens == len(prompt_ids) and reply.usage.completion_tokens == 6
    # Streaming: the same text and logprobs, in pieces (the echoed prompt first).
    chunks = list(client.completions.create(prompt=PROMPT, logprobs=2, echo=True, stream=True, **common))
    assert "".join(c.choices[0].text for c in chunks) == only.text
    streamed = [v for c in chunks if c.choices[0].logprobs for v in c.choices[0].logprobs.token_logprobs]
    assert streamed == lp.token_logprobs
    assert [o for c in chunks if c.choices[0].logprobs for o in c.choices[0].logprobs.text_offset] == lp.text_offset
    # max_tokens=0 with echo: the prompt scored alone (what lm-eval's loglikelihood asks for).
    scored = client.completions.create(model="toy", prompt=PROMPT, max_tokens=0, echo=True, logprobs=0).choices[0]
    assert scored.text == PROMPT and scored.logprobs.token_logprobs == lp.token_logprobs[: len(prompt_ids)]
    assert scored.logprobs.top_logprobs[1] == {lp.tokens[1]: lp.token_logprobs[1]}  # logprobs=0: the token alone


def test_openai_sdk_batched_prompts(client):
    prompts = ["abc", "The quick brown fox", PROMPT]
    greedy = dict(model="toy", max_tokens=5, temperature=0, extra_body={"ignore_eos": True})
    batch = client.completions.create(prompt=prompts, **greedy)
    assert [c.index for c in batch.choices] == [0, 1, 2]
    alone = [client.completions.create(prompt=p, **greedy) for p in prompts]
    assert [c.text for c in batch.choices] == [a.choices[0].text for a in alone]
    assert batch.usage.prompt_tokens == sum(a.usage.prompt_tokens for a in alone)
    assert batch.usage.completion_tokens == 15
    ids = client.completions.create(prompt=[[5, 6, 7], [8, 9]], **greedy)
    assert len(ids.choices) == 2 and ids.usage.prompt_tokens == 5
    texts = ["", "", ""]
    usage = {"include_usage": True}
    chunks = list(client.completions.create(prompt=prompts, stream=True, stream_options=usage, **greedy))
    for c in chunks:
        for item in c.choices:
            texts[item.index] += item.text
    assert texts == [c.text for c in batch.choices] and chunks[-1].usage == batch.usage  # summed over the batch
    with pytest.raises(openai.BadRequestError, match="n=1"):
        client.completions.create(prompt="x", n=2, model="toy")


def test_openai_sdk_chat_with_logprobs(server, client):
    engine, _ = server
    tok = toy_tokenizer()
    messages = [{"role": "user", "content": "hi there"}]
    common = dict(model="toy", messages=messages, max_tokens=5, temperature=0, extra_body={"ignore_eos": True})
    reply = client.chat.completions.create(logprobs=True, top_logprobs=3, **common)
    content = reply.choices[0].logprobs.content
    assert "".join(e.token for e in content) == reply.choices[0].message.content and len(content) == 5
    prompt_ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    ref = no_cache_logprobs(engine, prompt_ids + tok.convert_tokens_to_ids([e.token for e in content]))
    for j, entry in enumerate(content):
        row = ref[len(prompt_ids) - 1 + j]
        assert abs(entry.logprob - float(row.max())) < 1e-4  # greedy: the likeliest token
        assert entry.bytes == list(entry.token.encode()) and len(entry.top_logprobs) == 3
        assert [t.logprob for t in entry.top_logprobs] == pytest.approx(row.topk(3).values.tolist(), abs=1e-4)
    chunks = list(client.chat.completions.create(logprobs=True, top_logprobs=3, stream=True, **common))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == reply.choices[0].message.content
    streamed = [e for c in chunks if c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert [e.model_dump() for e in streamed] == [e.model_dump() for e in content]
    assert client.chat.completions.create(**common).choices[0].logprobs is None  # not asked, not computed
    with pytest.raises(openai.BadRequestError, match="top_logprobs"):
        client.chat.completions.create(model="toy", messages=messages, top_logprobs=2)


def test_lm_eval_local_completions_equals_hflm(server, tmp_path):
    """lm-eval's `local-completions` (log-likelihoods from echo + logprobs over HTTP, one request or a batch of
    several) against lm-eval's in-process HFLM on the same model: equal sums and greedy flags."""
    pytest.importorskip("lm_eval")
    pytest.importorskip("tenacity")  # (lm-eval's API models need it, and its `api` extra is not installed here)
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM
    from lm_eval.models.openai_completions import LocalCompletionsAPI

    engine, url = server
    tok = toy_tokenizer()
    tok.save_pretrained(tmp_path)  # lm-eval loads its tokenizer by path
    greedy = {"model": "toy", "prompt": "The cat", "max_tokens": 4, "temperature": 0, "ignore_eos": True}
    continuation = httpx.post(url + "/v1/completions", json=greedy, timeout=60).json()["choices"][0]["text"]
    pairs = [(PROMPT, " return x"), ("The quick brown", " fox"), ("a", "bcd"), ("The cat", continuation)]
    requests = [Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)]
    rolling = [Instance("loglikelihood_rolling", {}, ("Some text to score, whole.",), 0)]
    expected = HFLM(pretrained=engine.model, tokenizer=tok, batch_size=4, max_length=512)
    want, want_rolling = expected.loglikelihood(requests), expected.loglikelihood_rolling(rolling)
    assert want[-1][1] and not want[0][1]  # the greedy continuation is greedy, the others not
    for batch_size in (1, 3):
        api = LocalCompletionsAPI(
            base_url=url + "/v1/completions", model="toy", tokenizer=str(tmp_path), tokenizer_backend="huggingface",
            max_length=512, batch_size=batch_size, max_retries=1,
        )  # fmt: skip
        got = api.loglikelihood(requests, disable_tqdm=True)
        assert [g[1] for g in got] == [w[1] for w in want]
        assert [g[0] for g in got] == pytest.approx([w[0] for w in want], abs=1e-4)
        assert api.loglikelihood_rolling(rolling, disable_tqdm=True) == pytest.approx(want_rolling, abs=1e-4)
