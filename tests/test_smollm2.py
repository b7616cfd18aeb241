"""The foundation on the real SmolLM2-135M-Instruct teacher (embedded GGUF, offline)."""

import os
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

from dsla_hf import DSLACache, DSLALlamaForCausalLM, convert_llama_to_dsla
from dsla_hf.kernels import onednn_preferred

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def converted(smollm2):
    teacher, tokenizer = smollm2
    model = convert_llama_to_dsla(teacher, layers="all", conversion_order=list(range(29, -1, -1)), active=[]).eval()
    return teacher, tokenizer, model


@pytest.fixture(scope="module")
def prompt(converted, cpython_text):
    tokenizer = converted[1]
    return tokenizer(cpython_text[:4000], return_tensors="pt").input_ids[:, :200]


def test_teacher_is_the_real_smollm2(smollm2):
    teacher, tokenizer = smollm2
    cfg = teacher.config
    shape = (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads)
    assert shape == (30, 576, 9, 3)
    assert tokenizer.chat_template
    ids = tokenizer("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        out = teacher.generate(**ids, max_new_tokens=3, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0])


def test_conversion_parity_and_gqa(converted, prompt, monkeypatch):
    """With its projections on the teacher's library (MKL) the converted model's logits are the teacher's; on the
    library `dsla_hf.kernels.linear` picks here (oneDNN on AVX-512 CPUs not made by Intel) within fp32 rounding."""
    teacher, _, model = converted
    with torch.no_grad():
        reference = teacher(prompt).logits
        default = model(prompt).logits
        monkeypatch.setenv("DSLA_HF_ONEDNN_LINEAR", "0")
        onednn_preferred.cache_clear()
        try:
            same_library = model(prompt).logits
        finally:
            monkeypatch.delenv("DSLA_HF_ONEDNN_LINEAR")
            onednn_preferred.cache_clear()
    assert (same_library - reference).abs().max().item() <= 1e-5
    assert ((default - reference).norm() / reference.norm()).item() <= 1e-5
    dsla = model.model.layers[10].linear_attn
    assert dsla.state_heads == 3  # GQA-aware: states per KV head, not per query head
    assert model.lm_head.weight.data_ptr() == teacher.model.embed_tokens.weight.data_ptr()


def test_cached_greedy_generation_on_smollm2(converted, prompt):
    _, _, model = converted
    model.set_dsla_layers(0.25)
    try:
        ids = prompt[:, :64]
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=6, do_sample=False)
            x = ids
            for _ in range(out.shape[1] - ids.shape[1]):
                x = torch.cat([x, model(x, use_cache=False).logits[:, -1:].argmax(-1)], 1)
        assert torch.equal(out, x)
    finally:
        model.set_dsla_layers([])


def test_fold_on_smollm2_is_exact(converted, prompt):
    """Run the prompt with softmax attention, switch the top layer to DSLA: its states are folded from the KV cache
    and the next-token logits match a model that ran that layer as DSLA from the first token."""
    _, _, model = converted
    layer = 29
    cache = DSLACache(model.config)
    with torch.no_grad():
        model.set_dsla_layers([])
        model(prompt[:, :-1], cache=cache)
        model.set_dsla_layers([layer])
        folded = model(prompt[:, -1:], cache=cache).logits[0, -1]
        reference = model(prompt, use_cache=False).logits[0, -1]
    model.set_dsla_layers([])
    error = ((folded - reference).norm() / reference.norm()).item()
    assert error <= 1e-4, error
    assert cache.layers[layer].kv_tokens == 0 and cache.layers[layer].state is not None


def test_save_reload_and_remote_code_on_smollm2(converted, prompt, tmp_path):
    _, tokenizer, model = converted
    model.set_dsla_layers([20, 25])
    folder = tmp_path / "dsla-smollm2"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    ids = prompt[:, :32]
    with torch.no_grad():
        expected = model(ids).logits[0, -1]
    model.set_dsla_layers([])
    loaded = AutoModelForCausalLM.from_pretrained(folder).eval()
    assert isinstance(loaded, DSLALlamaForCausalLM) and loaded.dsla_layers == [20, 25]
    with torch.no_grad():
        assert torch.allclose(loaded(ids).logits[0, -1], expected, atol=1e-5)
    # A fresh process that cannot import dsla_hf loads the same folder as remote code.
    script = (
        "import importlib.abc, sys, torch\n"
        "class Block(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] == 'dsla_hf': raise ImportError(name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "from transformers import AutoModelForCausalLM, AutoTokenizer\n"
        "m = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True).eval()\n"
        "tok = AutoTokenizer.from_pretrained(sys.argv[1], trust_remote_code=True)\n"
        "ids = tok(sys.argv[2], return_tensors='pt').input_ids\n"
        'with torch.no_grad(): print("RESULT", m(ids).logits[0, -1].argmax().item(), m.dsla_layers)\n'
    )
    text = tokenizer.decode(ids[0])
    env = dict(os.environ, HF_MODULES_CACHE=str(tmp_path / "modules"), HF_HUB_OFFLINE="1")
    run = subprocess.run([sys.executable, "-c", script, str(folder), text], capture_output=True, text=True, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    retokenized = tokenizer(text, return_tensors="pt").input_ids
    with torch.no_grad():
        expected_token = loaded(retokenized).logits[0, -1].argmax().item()
    last = [line for line in run.stdout.splitlines() if line.startswith("RESULT")]
    assert last, run.stdout[-2000:]
    last = last[-1]
    assert last.split()[1] == str(expected_token)
    assert last.endswith("[20, 25]")
