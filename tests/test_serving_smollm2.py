"""DSLA-Serve on the real SmolLM2 teacher: chat template, and an exact switch of the top layers under load."""

import asyncio

import httpx
import pytest
import torch

from dsla_hf import convert_llama_to_dsla
from dsla_hf.serving.engine import Engine, EngineConfig
from dsla_hf.serving.metrics import Metrics
from dsla_hf.serving.policy import StaticPolicy
from dsla_hf.serving.server import ServerThread, build_app


class SwitchAfter(StaticPolicy):
    """0 DSLA layers, then `count` from the step at which `steps` steps have run (a switch at a known step)."""

    def __init__(self, engine_steps, count):
        super().__init__(0)
        self.engine_steps, self.target = engine_steps, count
        self.engine = None

    def decide(self, load, now):
        return self.target if self.engine is not None and self.engine.steps >= self.engine_steps else 0


@pytest.mark.slow
def test_smollm2_chat_and_exact_switch_under_load(smollm2):
    teacher, tok = smollm2
    n = teacher.config.num_hidden_layers
    order = list(range(n - 1, -1, -1))  # top layers first: a switch of the top layers is exact for every request
    model = convert_llama_to_dsla(teacher, layers="all", conversion_order=order, active=[]).eval()
    policy = SwitchAfter(engine_steps=6, count=2)
    engine = Engine(model, tok, EngineConfig(max_num_seqs=4, max_model_len=2048), policy, Metrics("smol"))
    policy.engine = engine
    recorded, submit = [], engine.submit
    engine.submit = lambda *a, **k: recorded.append(submit(*a, **k)) or recorded[-1]
    engine.start()
    with ServerThread(build_app(engine, tok, "smol")) as server:

        async def many():
            async with httpx.AsyncClient(base_url=server.url, timeout=300) as client:
                chats = [
                    {"role": "user", "content": "What is the capital of France?"},
                    {"role": "user", "content": "Write a Python function that adds two numbers."},
                    {"role": "user", "content": "Name three colours."},
                ]
                bodies = [{"model": "smol", "messages": [m], "max_tokens": 12, "temperature": 0} for m in chats]
                return await asyncio.gather(*(client.post("/v1/chat/completions", json=b) for b in bodies))

        replies = asyncio.run(many())
    engine.stop()
    assert all(r.status_code == 200 for r in replies), [r.text for r in replies]
    assert all(r.json()["choices"][0]["message"]["content"] for r in replies)
    assert engine.layer_switches == 1 and engine.runner.layers == (n - 2, n - 1)
    # Every token equals a fresh forward with the layers it was produced with (the switch folded KV exactly).
    for request in recorded:
        for j, token in enumerate(request.output_ids):
            model.set_dsla_layers(list(request.dsla_layers_at(j)))
            with torch.no_grad():
                ids = torch.tensor([request.prompt_ids + request.output_ids[:j]])
                logits = model(ids, use_cache=False).logits[0, -1]
            assert float(logits.max() - logits[token]) < 1e-3, (j, request.modes)  # greedy, up to exact ties
    assert engine.tokens_by_layers.get(2, 0) > 0 and engine.tokens_by_layers.get(0, 0) > 0


@pytest.mark.slow
def test_smollm2_lm_eval_loglikelihood_and_chat_logprobs(smollm2):
    """The real model and byte-level tokenizer, two top layers as DSLA, prompts prefilled in chunks of 8: lm-eval's
    `local-completions` over HTTP equals its in-process HFLM; chat logprobs' bytes add up to the streamed text."""
    openai = pytest.importorskip("openai")
    pytest.importorskip("tenacity")
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM
    from lm_eval.models.openai_completions import LocalCompletionsAPI

    from dsla_hf.teacher import teacher_folder

    teacher, tok = smollm2
    n = teacher.config.num_hidden_layers
    model = convert_llama_to_dsla(teacher, layers="all", conversion_order=list(range(n - 1, -1, -1)), active=[])
    model.eval().set_dsla_layers([n - 2, n - 1])
    engine = Engine(model, tok, EngineConfig(max_num_seqs=4, max_model_len=1024, prefill_chunk=8), StaticPolicy(2))
    engine.start()
    pairs = [
        ("The capital of France is", " Paris"),
        ("def add(a, b):\n    return", " a + b"),
        ("Zürich liegt in der", " Schweiz 🇨🇭"),
    ]
    requests = [Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)]
    with ServerThread(build_app(engine, tok, "smol")) as server:
        api = LocalCompletionsAPI(
            base_url=server.url + "/v1/completions", model="smol", tokenizer=str(teacher_folder()),
            tokenizer_backend="huggingface", max_length=1024, batch_size=3, max_retries=1,
        )  # fmt: skip
        got = api.loglikelihood(requests, disable_tqdm=True)
        with openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=300) as client:
            body = dict(model="smol", max_tokens=24, temperature=0, logprobs=True, top_logprobs=2)
            messages = [{"role": "user", "content": "Write the word café three times, with an emoji."}]
            chunks = list(client.chat.completions.create(messages=messages, stream=True, **body))
    engine.stop()
    want = HFLM(pretrained=model, tokenizer=tok, batch_size=1, max_length=1024).loglikelihood(requests)
    assert [g[1] for g in got] == [w[1] for w in want]
    assert [g[0] for g in got] == pytest.approx([w[0] for w in want], abs=2e-3)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    entries = [e for c in chunks if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert text and "\ufffd" not in text and bytes(b for e in entries for b in e.bytes).decode() == text
