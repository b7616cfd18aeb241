"""The optional softmax window beside the states (dsla_window > 0)."""

import pytest
import torch

from dsla_hf import DSLACache, convert_llama_to_dsla
from dsla_hf.kernels import feature_tensor
from dsla_hf.models.dsla.modeling_dsla import rotate_half


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def window_model(teacher, window=8, **kwargs):
    model = convert_llama_to_dsla(teacher, layers="all", dsla_window=window, **kwargs).eval()
    with torch.no_grad():  # move the DSLA parameters away from their initial values
        for layer in model.model.layers:
            for name, p in layer.linear_attn.named_parameters():
                if name not in {"gates.bias"}:
                    p.add_(0.05 * torch.randn_like(p))
    return model


def test_window_covering_the_sequence_is_the_teacher(tiny_teacher):
    model = convert_llama_to_dsla(tiny_teacher, layers="all", dsla_window=64).eval()
    ids = torch.randint(3, 101, (2, 40))
    with torch.no_grad():
        assert rel(model(ids).logits, tiny_teacher(ids).logits) <= 1e-5


def reference_layer_output(attn, teacher_attn, x, cos, sin):
    """Token-by-token: softmax over the window, plus psi(q) . S_{t-W}, one shared normaliser."""
    B, T, _ = x.shape
    D, H, HK, W = attn.head_dim, attn.num_heads, attn.num_kv_heads, attn.window
    q = (teacher_attn.q_proj(x) + attn.q_lora(x)).view(B, T, H, D)
    k = teacher_attn.k_proj(x).view(B, T, HK, D)
    v = teacher_attn.v_proj(x).view(B, T, HK, D)
    feats, vals, gates = attn.key_side(k, v, None, None)
    feats = feature_tensor(feats)
    g1, g2 = gates.materialize().unbind(2)
    qf = attn.q_feature_map(q).float()
    mix = attn.mix_weights()
    q_rot = q * cos[:, :, None] + rotate_half(q) * sin[:, :, None]
    k_rot = k * cos[:, :, None] + rotate_half(k) * sin[:, :, None]
    G = H // HK
    out = torch.zeros(B, T, H, D)
    for b in range(B):
        states = torch.zeros(2, HK, feats.shape[-1], D + 1)
        history = []
        for t in range(T):
            kv = feats[b, t].float()[:, :, None] * vals[b, t].float()[:, None, :]
            states = torch.stack([g1[b, t].exp(), g2[b, t].exp()])[..., None] * states + kv
            history.append(states.clone())
            for h in range(H):
                g = h // G
                lo = max(0, t - W + 1)
                scores = (q_rot[b, t, h] @ k_rot[b, lo : t + 1, g].T) * D**-0.5
                num = torch.exp(scores) @ v[b, lo : t + 1, g]
                den = torch.exp(scores).sum()
                if t - W >= 0:
                    s = history[t - W]
                    lin = qf[b, t, h] @ (mix[h, 0] * s[0, g] + mix[h, 1] * s[1, g])
                    scale = attn.linear_log_scale[h].exp()
                    num, den = num + scale * lin[:D], den + scale * lin[D]
                out[b, t, h] = num / den
    return out


def test_window_layer_matches_token_by_token_reference(tiny_teacher):
    model = window_model(tiny_teacher, window=5)
    layer = model.model.layers[1]
    x = torch.randn(2, 23, 64)
    position_ids = torch.arange(23)[None]
    cos, sin = model.model.rotary_emb(x, position_ids)
    attn = layer.linear_attn
    with torch.no_grad():
        got = attn(hidden_states=x, position_embeddings=(cos, sin))
        inner = reference_layer_output(attn, layer.self_attn, x, cos, sin).reshape(2, 23, -1)
        expected = layer.self_attn.o_proj(inner) + attn.o_lora(inner)  # o_lora reads the attention output too
    assert rel(got, expected) <= 1e-4


@pytest.mark.parametrize("active", [[0, 2], [0, 1, 2, 3]])
def test_window_cached_generation_matches_no_cache(tiny_teacher, active):
    model = window_model(tiny_teacher, window=4)
    model.set_dsla_layers(active)
    ids = torch.randint(3, 101, (1, 11))
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=7, do_sample=False, eos_token_id=None, pad_token_id=0)
        x = ids
        for _ in range(7):
            x = torch.cat([x, model(x, use_cache=False).logits[:, -1:].argmax(-1)], dim=1)
    assert torch.equal(out, x)


def test_window_left_padding_and_fold(tiny_teacher):
    model = window_model(tiny_teacher, window=6)
    a, b = torch.randint(3, 101, (1, 20)), torch.randint(3, 101, (1, 9))
    ids = torch.cat([a, torch.cat([torch.zeros(1, 11, dtype=torch.long), b], 1)])
    mask = (torch.arange(20) >= torch.tensor([[0], [11]])).long()
    with torch.no_grad():
        model.set_dsla_layers([1, 3])
        batch = model(ids, attention_mask=mask).logits[1, -1]
        alone = model(b).logits[0, -1]
        assert rel(batch, alone) <= 1e-4
        # Fold: softmax prefill then switch the top layer; the window and the states come from the KV cache.
        model.set_dsla_layers([])
        cache = DSLACache(model.config)
        model(ids[:, :-1], attention_mask=mask[:, :-1], cache=cache)
        model.set_dsla_layers([3])
        folded = model(ids[:, -1:], attention_mask=mask, cache=cache).logits[:, -1]
        reference = model(ids, attention_mask=mask).logits[:, -1]
    assert rel(folded, reference) <= 1e-4
    window_keys = cache.layers[3].window[0]
    assert window_keys.shape[1] == 6 and cache.layers[3].kv_tokens == 0


def test_window_config_errors(tiny_teacher):
    with pytest.raises(ValueError, match="dsla_window needs"):
        convert_llama_to_dsla(tiny_teacher, dsla_window=8, dsla_preset="paper")
    with pytest.raises(ValueError, match=">= 0"):
        convert_llama_to_dsla(tiny_teacher, dsla_window=-1)


def test_window_requests_stack_for_continuous_batching(tiny_teacher):
    from tests.test_cache import decode_alone

    model = window_model(tiny_teacher, window=4)
    model.set_dsla_layers([0, 2, 3])
    prompts = [torch.randint(3, 101, (1, n)) for n in (10, 3)]
    expected = [decode_alone(model, p, 3) for p in prompts]
    with torch.no_grad():
        caches, firsts = [], []
        for p in prompts:
            caches.append(DSLACache(model.config))
            firsts.append(model(p, cache=caches[-1]).logits[:, -1])
        cache, mask = DSLACache.stack(caches, [None, None])
        token = torch.cat(firsts).argmax(-1, keepdim=True)
        positions = torch.tensor([[10], [3]])
        for step in range(3):
            mask = torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], 1)
            logits = model(token, attention_mask=mask, position_ids=positions + step, cache=cache).logits
            for i in range(2):
                assert torch.allclose(logits[i, -1], expected[i][0, step + 1], atol=1e-4), (i, step)
            token = logits[:, -1].argmax(-1, keepdim=True)


def test_window_layer_gradients_match_token_by_token_reference(tiny_teacher):
    """Training through the window: gradients of the input and of every DSLA parameter agree with autograd through
    the token-by-token reference (the window's in-place steps must not corrupt what autograd saved)."""
    model = window_model(tiny_teacher, window=5)
    layer = model.model.layers[1]
    attn = layer.linear_attn
    x = torch.randn(2, 23, 64)
    cos, sin = model.model.rotary_emb(x, torch.arange(23)[None])
    weight = torch.randn(2, 23, 64)
    params = dict(attn.named_parameters())

    def gradients(fn):
        xg = x.clone().requires_grad_()
        loss = (fn(xg) * weight).sum()
        return torch.autograd.grad(loss, [xg, *params.values()], allow_unused=True)

    got = gradients(lambda xg: attn(hidden_states=xg, position_embeddings=(cos, sin)))

    def reference(xg):
        inner = reference_layer_output(attn, layer.self_attn, xg, cos, sin).reshape(2, 23, -1)
        return layer.self_attn.o_proj(inner) + attn.o_lora(inner)

    expected = gradients(reference)
    for name, a, b in zip(["input", *params], got, expected):
        if b is None:
            continue
        assert a is not None and rel(a, b) <= 1e-3, name


@pytest.mark.parametrize("window", [0, 4])
def test_fused_decoding_matches_the_unfused_step(tiny_teacher, window, monkeypatch):
    """Decoding by the fused kernel (one call per layer and token) gives the logits, states and windows of the
    unfused step within fp32 rounding: left-padded batch, a padded new token, keep_kv, beam search."""
    from dsla_hf.kernels.dispatch import cpp_available
    from dsla_hf.models.dsla import modeling_dsla

    if not cpp_available():
        pytest.skip("no fused CPU backend here")
    model = window_model(tiny_teacher, window=window)
    model.set_dsla_layers([0, 2, 3])
    ids = torch.randint(3, 101, (2, 13))
    mask = (torch.arange(13) >= torch.tensor([[0], [5]])).long()
    calls = []
    fused = modeling_dsla.fused_decode_dsla
    monkeypatch.setattr(modeling_dsla, "fused_decode_dsla", lambda *a, **k: calls.append(1) or fused(*a, **k))

    def decode(use_fused: bool):
        monkeypatch.setattr(
            modeling_dsla.DSLAAttention, "fused_decode_backend", lambda self, q: "cpp" if use_fused else None
        )
        cache = DSLACache(model.config, keep_kv=True)
        logits = [model(ids, attention_mask=mask, cache=cache).logits[:, -1]]
        token, m = logits[0].argmax(-1, keepdim=True), mask
        for step in range(5):
            pad = torch.tensor([[1], [0 if step == 2 else 1]])  # row 1's third new token is padding
            m = torch.cat([m, pad], 1)
            logits.append(model(token, attention_mask=m, cache=cache).logits[:, -1])
            token = logits[-1].argmax(-1, keepdim=True)
        return torch.stack(logits), cache

    with torch.no_grad():
        want, cache_want = decode(False)
        assert not calls
        got, cache_got = decode(True)
    assert len(calls) == 5 * 3
    assert rel(got, want) <= 1e-5
    for i in (0, 2, 3):
        a, b = cache_got.layers[i], cache_want.layers[i]
        assert rel(a.state, b.state) <= 1e-5 and a.seen_tokens == b.seen_tokens
        assert rel(a.keys, b.keys) <= 1e-5 and rel(a.values, b.values) <= 1e-5  # keep_kv: the rotated keys
        for x, y in zip(a.window or (), b.window or ()):
            assert rel(x, y) <= 1e-5
    with torch.no_grad():  # beam search reorders the states and windows between fused steps
        monkeypatch.setattr(modeling_dsla.DSLAAttention, "fused_decode_backend", lambda self, q: "cpp")
        beams = model.generate(ids[:1], max_new_tokens=5, num_beams=3, do_sample=False, eos_token_id=None)
        monkeypatch.setattr(modeling_dsla.DSLAAttention, "fused_decode_backend", lambda self, q: None)
        beams_unfused = model.generate(ids[:1], max_new_tokens=5, num_beams=3, do_sample=False, eos_token_id=None)
    assert torch.equal(beams, beams_unfused)


def test_fused_decoding_follows_weight_changes(tiny_teacher, monkeypatch):
    """The fused step keeps its weights from token to token; they must follow `load_state_dict` (which bumps the
    parameters' versions) and a fused AdamW step (which does not)."""
    from dsla_hf.kernels.dispatch import cpp_available
    from dsla_hf.models.dsla import modeling_dsla

    if not cpp_available():
        pytest.skip("no fused CPU backend here")
    torch.manual_seed(0)
    model = window_model(tiny_teacher, window=4)
    model.set_dsla_layers([0, 2])
    ids = torch.randint(3, 101, (2, 12))

    def next_logits(use_fused: bool) -> torch.Tensor:
        monkeypatch.setattr(
            modeling_dsla.DSLAAttention, "fused_decode_backend", lambda self, q: "cpp" if use_fused else None
        )
        with torch.no_grad():
            cache = DSLACache(model.config)
            model(ids[:, :-1], cache=cache)
            return model(ids[:, -1:], cache=cache).logits

    before = next_logits(True)  # the weights are kept from here
    state = model.state_dict()
    for name in state:
        if "linear_attn" in name and ("gates" in name or "feature_map" in name or "mix_logits" in name):
            state[name] = state[name] + 0.3 * torch.randn_like(state[name])
    model.load_state_dict(state)
    loaded = next_logits(True)
    assert rel(loaded, next_logits(False)) <= 1e-5
    assert rel(loaded, before) > 1e-3  # the change reached the logits

    params = [p for n, p in model.named_parameters() if "linear_attn" in n]
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(params, lr=0.3, fused=True)
    model(ids).logits.square().mean().backward()
    optimizer.step()
    stepped = next_logits(True)
    assert rel(stepped, next_logits(False)) <= 1e-5
    assert rel(stepped, loaded) > 1e-3
