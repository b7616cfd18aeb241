"""bf16 inference (fp32 states, the fold's bound), loading with `dtype=` / `device_map=`, the `--device` / `--dtype`
options, and the serving engine's memory accounting in the model's dtype. On CPU: CUDA runs in benchmarks/gpu_check.py.
"""

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaForCausalLM

from dsla_hf import DSLACache, convert_llama_to_dsla
from dsla_hf.devices import resolve_device, resolve_dtype
from dsla_hf.serving.engine import Engine, EngineConfig
from dsla_hf.serving.models import toy_tokenizer
from tests.conftest import tiny_llama_config

# bf16 keeps 8 significant bits: one rounding is a relative error of at most 2^-8.
BF16_BOUND = 2.0**-7  # two roundings: the rotated keys in the KV cache, then the keys back in bf16 after the fold


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.fixture(scope="module")
def models():
    """A Llama with SmolLM2's head size and RoPE base (head_dim 64, theta 1e5), converted, in fp32 and bf16."""
    torch.manual_seed(0)
    config = tiny_llama_config(hidden_size=256, num_hidden_layers=2, rope_theta=100000.0, max_position_embeddings=4096)
    model = convert_llama_to_dsla(LlamaForCausalLM(config).eval(), layers="all").eval()
    return model, copy.deepcopy(model).to(torch.bfloat16)


def folded_and_reference(model, ids, mask, layer):
    """The states and window of `layer` folded after a softmax prefill, and those of a run with the layer as DSLA from
    the first token (the layers below it as softmax attention in both, so its inputs are the same)."""
    with torch.no_grad():
        model.set_dsla_layers([])
        softmax_cache = DSLACache(model.config)
        model(ids, attention_mask=mask, cache=softmax_cache)
        model.set_dsla_layers([layer])
        dsla_cache = DSLACache(model.config)
        model(ids, attention_mask=mask, cache=dsla_cache)
        attention = model.model.layers[layer].linear_attn
        attention.fold(cache=softmax_cache, mask=mask)
    return softmax_cache.layers[layer], dsla_cache.layers[layer]


@pytest.mark.parametrize("length", [200, 1500])
def test_bf16_fold_is_within_bf16_rounding_of_dsla_from_the_first_token(models, length):
    fp32, bf16 = models
    ids = torch.randint(3, 101, (2, length))
    mask = torch.ones_like(ids)
    mask[1, :13] = 0  # left padding must not enter the folded states in bf16 either
    folded, reference = folded_and_reference(bf16, ids, mask, layer=1)
    assert folded.state.dtype == reference.state.dtype == torch.float32  # states stay fp32 in bf16
    assert folded.window[0].dtype == torch.bfloat16  # the window holds raw keys, as the KV cache does
    state_error = rel(folded.state, reference.state)
    window_error = max(rel(a, b) for a, b in zip(folded.window[:2], reference.window[:2]))
    assert state_error <= BF16_BOUND and window_error <= BF16_BOUND, (state_error, window_error)
    assert torch.equal(folded.window[2], reference.window[2])  # which window entries are real: exactly
    # The fold adds less error than running in bf16 does at all (against the fp32 model's states).
    _, reference32 = folded_and_reference(fp32, ids, mask, layer=1)
    assert state_error < rel(reference.state, reference32.state)


def test_bf16_switch_matches_dsla_from_the_first_token_in_the_logits(models):
    _, bf16 = models
    ids = torch.randint(3, 101, (1, 700))
    with torch.no_grad():
        bf16.set_dsla_layers([])
        cache = DSLACache(bf16.config)
        bf16(ids[:, :-1], cache=cache)
        bf16.set_dsla_layers([1])  # the top layer: the layers below keep their keys in both runs
        switched = bf16(ids[:, -1:], cache=cache).logits[0, -1]
        reference = bf16(ids, use_cache=False).logits[0, -1]
    assert rel(switched, reference) <= BF16_BOUND
    assert cache.layers[1].kv_tokens == 0 and cache.layers[1].state.dtype == torch.float32


def test_bf16_generate_matches_no_cache_argmax(models):
    _, bf16 = models
    bf16.set_dsla_layers([0, 1])
    ids = torch.randint(3, 101, (2, 90))
    with torch.no_grad():
        out = bf16.generate(
            ids, max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0,
            output_logits=True, return_dict_in_generate=True,
        )  # fmt: skip
        full = bf16(out.sequences, use_cache=False).logits[:, ids.shape[1] - 1 : -1].float()
    cached = torch.stack(out.logits, 1).float()
    assert rel(cached, full) <= BF16_BOUND  # each cached step's logits, against a no-cache forward
    # Greedy tokens are the no-cache argmax wherever bf16 rounding cannot swap the first two.
    top2 = full.topk(2, -1).values
    clear = (top2[..., 0] - top2[..., 1]) > 2 * (cached - full).abs().amax(-1)
    generated = out.sequences[:, ids.shape[1] :]
    assert clear.float().mean() > 0.5
    assert torch.equal(generated[clear], full.argmax(-1)[clear])


def test_from_pretrained_takes_dtype_and_device_map(models, tmp_path):
    fp32, _ = models
    fp32.set_dsla_layers([1])
    fp32.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16, device_map="cpu")
    assert loaded.dtype == torch.bfloat16 and loaded.device.type == "cpu" and loaded.dsla_layers == [1]
    ids = torch.randint(3, 101, (1, 80))
    with torch.no_grad():
        assert rel(loaded(ids).logits, fp32(ids).logits) < 0.05  # the same model, in bf16


def test_device_and_dtype_options():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert resolve_dtype("bfloat16", torch.device("cpu")) == torch.bfloat16
    with pytest.raises(ValueError, match="dtype"):
        resolve_dtype("float8", torch.device("cpu"))
    with pytest.raises(ValueError, match="Unknown device"):
        resolve_device("tpu-ish")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA device"):
            resolve_device("cuda")


def test_engine_counts_kv_bytes_in_the_models_dtype():
    from dsla_hf.serving.models import toy_model

    tokenizer = toy_tokenizer()
    engines = {dtype: Engine(toy_model().to(dtype), tokenizer, EngineConfig(max_model_len=256)) for dtype in
               (torch.float32, torch.bfloat16)}  # fmt: skip
    per_token = {dtype: e.runner.kv_bytes_per_token_layer for dtype, e in engines.items()}
    config = engines[torch.float32].model.config
    assert per_token[torch.float32] == 2 * config.num_key_value_heads * config.head_dim * 4
    assert per_token[torch.bfloat16] * 2 == per_token[torch.float32]
    assert engines[torch.bfloat16].runner.kv_budget * 2 == engines[torch.float32].runner.kv_budget


def test_engine_serves_in_bf16_like_generate():
    from dsla_hf.serving.models import toy_model
    from dsla_hf.serving.policy import StaticPolicy
    from dsla_hf.serving.sampling import SamplingParams

    model = toy_model().to(torch.bfloat16)
    model.set_dsla_layers([3, 2])
    engine = Engine(model, toy_tokenizer(), EngineConfig(max_num_seqs=1, prefill_chunk=16), policy=StaticPolicy(2))
    prompt = torch.randint(3, 101, (40,), generator=torch.Generator().manual_seed(1)).tolist()
    request = engine.submit(prompt, SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True), lambda out: None)
    while request.finish_reason is None:
        engine.step()
    with torch.no_grad():  # one request alone, chunked prefill as the engine runs it: the same bf16 arithmetic
        cache = DSLACache(model.config)
        for start in range(0, len(prompt), 16):
            logits = model(torch.tensor([prompt[start : start + 16]]), cache=cache, use_cache=True).logits
        expected = []
        for _ in range(10):
            expected.append(int(logits[0, -1].float().argmax()))
            logits = model(torch.tensor([expected[-1:]]), cache=cache, use_cache=True).logits
    assert request.output_ids == expected


def test_describe_records_the_threads_and_kernels_of_this_run():
    from dsla_hf.devices import describe
    from dsla_hf.kernels import backend_summary, projection_libraries

    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        where = describe(torch.device("cpu"))
    finally:
        torch.set_num_threads(threads)
    assert where["threads"] == 1
    assert where["dsla_kernels"] == backend_summary(torch.device("cpu"))
    assert where["cpu_projections"] == projection_libraries() and where["torch"] == torch.__version__


def test_cpu_name_tells_cpu_generations_apart(monkeypatch):
    # A VM's "AMD EPYC" is Zen 1 or Zen 5 alike: the family and model numbers say which.
    from dsla_hf.kernels import dispatch

    monkeypatch.setattr(dispatch, "cpuinfo", lambda: {"model name": "AMD EPYC", "cpu family": "23", "model": "1"})
    assert dispatch.cpu_name() == "AMD EPYC (family 23, model 1)"
    monkeypatch.setattr(dispatch, "cpuinfo", lambda: {"model name": "AMD EPYC", "cpu family": "26", "model": "2"})
    assert dispatch.cpu_name() == "AMD EPYC (family 26, model 2)"
    monkeypatch.setattr(dispatch, "cpuinfo", lambda: {})  # no /proc/cpuinfo: what platform knows
    assert dispatch.cpu_name() and "family" not in dispatch.cpu_name()
