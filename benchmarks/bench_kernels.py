"""Kernel benchmark: one layer's attention module, DSLA against softmax attention, prefill and decode.

Both modules have SmolLM2-135M's shapes (hidden 576, 9 query heads, 3 KV heads, head dim 64) and include their
projections (q/k/v/o). The DSLA module adds the model's gates (``DSLAGates``: from the key, per KV head a 64 -> 64
linear map for each state, then ``logsigmoid / 16``) and runs ``chunk_dsla`` (prefill) or ``fused_recurrent_dsla``
(decode, states updated in place). Prefill is timed with both CPU backends of ``chunk_dsla``: the fused C++ kernel
(the default for inference where it builds) and the PyTorch path. The softmax module runs
``scaled_dot_product_attention`` (causal, GQA); when decoding it writes the new key/value into a preallocated KV
cache of the given length and attends to it. Prefill is also timed for the attention alone, on the same projected
inputs: ``scaled_dot_product_attention`` against the gates and ``chunk_dsla``. fla's ``chunk_gla`` is timed as well
when ``fla`` is importable (CUDA only in practice).

The real layer: the default preset's DSLA layer of SmolLM2 (layer 10 of the embedded teacher, converted; Hedgehog
features of width 128, both states, the sum normaliser, the 64-token window, LoRA on q and o) against that layer's
own softmax attention (Transformers' ``LlamaAttention``, SDPA), both with a cache as ``generate()`` runs them:
prefill, and decode steps at a fixed context (the fused decoding step against SDPA over the KV cache).

Times are medians of a few repeats, taken in one run (the machines are shared: read the ratios).

    python benchmarks/bench_kernels.py            # writes benchmarks/results/kernels.{json,md,png}
    python benchmarks/bench_kernels.py --isa avx2 # the AVX2 code paths: kernels_avx2.{json,md,png}
    python benchmarks/bench_kernels.py --quick    # small and fast, writes nothing unless --out is given
    python benchmarks/bench_kernels.py --lengths 16384 --decode-lengths   # one length, no decode; writes nothing
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from machine import add_isa_argument, describe, machine, suffix, use_isa
from torch import nn

from dsla_hf import DSLACache, DSLAConfig, convert_llama_to_dsla, load_teacher
from dsla_hf.kernels import chunk_dsla, fused_recurrent_dsla
from dsla_hf.kernels.dispatch import cpp_available
from dsla_hf.models.dsla.modeling_dsla import DSLAGates

HIDDEN, HEADS, KV_HEADS, HEAD_DIM = 576, 9, 3, 64
RESULTS = Path(__file__).parent / "results"


class SoftmaxAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.q_proj = nn.Linear(HIDDEN, HEADS * HEAD_DIM, bias=False)
        self.k_proj = nn.Linear(HIDDEN, KV_HEADS * HEAD_DIM, bias=False)
        self.v_proj = nn.Linear(HIDDEN, KV_HEADS * HEAD_DIM, bias=False)
        self.o_proj = nn.Linear(HEADS * HEAD_DIM, HIDDEN, bias=False)

    def project(self, x):
        """q [B, T, H, D], k and v [B, T, HK, D]."""
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, HEADS, HEAD_DIM)
        return q, self.k_proj(x).view(B, T, KV_HEADS, HEAD_DIM), self.v_proj(x).view(B, T, KV_HEADS, HEAD_DIM)

    def attend(self, q, k, v, cache=None, length=0):
        """The attention itself, [B, T, H, D] out."""
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if cache is None:
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        else:  # decode: write into the preallocated cache, attend to all of it
            kc, vc = cache
            T = q.shape[2]
            kc[:, :, length : length + T] = k
            vc[:, :, length : length + T] = v
            o = F.scaled_dot_product_attention(
                q, kc[:, :, : length + T], vc[:, :, : length + T], is_causal=False, enable_gqa=True
            )
        return o.transpose(1, 2)

    def forward(self, x, *cache):
        o = self.attend(*self.project(x), *cache)
        return self.o_proj(o.reshape(*x.shape[:2], HEADS * HEAD_DIM))


class DSLAAttention(SoftmaxAttention):
    def __init__(self):
        super().__init__()
        self.gates = DSLAGates(DSLAConfig(dsla_gate_tau=16.0), KV_HEADS, HEAD_DIM, HEAD_DIM)
        nn.init.normal_(self.gates.weight, std=HEAD_DIM**-0.5)
        with torch.no_grad():  # a slow history state and a fast recency state
            self.gates.bias.copy_(torch.tensor([6.0, 0.0]).view(2, 1, 1).expand_as(self.gates.bias))
        self.mix = nn.Parameter(torch.zeros(HEADS, 2))
        self.backend = None  # chunk_dsla's default

    def attend(self, q, k, v, state=None, overlay=False):
        """chunk_dsla (prefill) or fused_recurrent_dsla (decode, states updated in place), given the gates as the
        model gives them: inputs and weights (computed inside the C++ kernel, materialised by the other paths).
        ``overlay``: the prefill's output overlays the queries (as in the model, where nothing reads them after)."""
        gates = self.gates(k)
        mix = self.mix.softmax(-1)
        if state is None:
            return chunk_dsla(q, k, v, gates, mix, backend=self.backend, out=q if overlay else None)[0]
        return fused_recurrent_dsla(q, k, v, gates, mix, initial_state=state, inplace=True)[0]

    def forward(self, x, *state):
        o = self.attend(*self.project(x), *state, overlay=not state)
        return self.o_proj(o.reshape(*x.shape[:2], HEADS * HEAD_DIM))


def timed(fn, repeats: int, warmup: int = 1) -> float:
    return interleaved({"fn": fn}, repeats, warmup)["fn"]


def interleaved(fns: dict, repeats: int, warmup: int = 1) -> dict:
    """Median time of each function, run in rounds (one call of each per round), so that the shared machine's
    slow phases fall on all of them alike."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def fla_prefill(T: int, repeats: int):
    """fla's chunk_gla on the same shapes (GQA expanded to full heads), or None when fla is not importable."""
    try:
        from fla.ops.gla import chunk_gla
    except Exception:
        return None
    device = "cuda" if torch.cuda.is_available() else "cpu"
    q = torch.randn(1, T, HEADS, HEAD_DIM, device=device)
    k, v = torch.randn_like(q), torch.randn_like(q)
    g = F.logsigmoid(torch.randn_like(q)) / 16
    try:
        return timed(lambda: chunk_gla(q, k, v, g), repeats)
    except Exception:
        return None


@torch.no_grad()
def run(lengths, decode_lengths, repeats: int, decode_steps: int, threads: int):
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    softmax, dsla = SoftmaxAttention().eval(), DSLAAttention().eval()
    dsla.load_state_dict(softmax.state_dict(), strict=False)
    backends = ["cpp", "torch"] if cpp_available() else ["torch"]
    prefill = []
    for T in lengths:
        x = torch.randn(1, T, HIDDEN)
        reps = max(1, repeats if T <= 8192 else repeats - 1)

        def run_dsla(backend, fn, *args):
            dsla.backend = backend
            return fn(*args)

        qkv = softmax.project(x)
        fns = {"sdpa": lambda x=x: softmax(x)}
        fns |= {backend: lambda backend=backend, x=x: run_dsla(backend, dsla, x) for backend in backends}
        fns["projections"] = lambda x=x: [p(x) for p in (dsla.q_proj, dsla.k_proj, dsla.v_proj, dsla.o_proj)]
        fns["sdpa_attention"] = lambda qkv=qkv: softmax.attend(*qkv)
        fns["dsla_attention"] = lambda qkv=qkv: run_dsla(None, dsla.attend, *qkv)
        times = interleaved(fns, reps)
        t_sdpa, t_proj = times["sdpa"], times["projections"]
        # dsla_s: chunk_dsla's default CPU backend (the C++ kernel where it builds); dsla_torch_s: the PyTorch path.
        # *_attention_s: the attention alone on the same projected inputs (SDPA; the gates and chunk_dsla).
        row = dict(tokens=T, sdpa_s=t_sdpa, dsla_s=times[backends[0]], speedup=t_sdpa / times[backends[0]],
                   backend=backends[0], dsla_torch_s=times["torch"], speedup_torch=t_sdpa / times["torch"],
                   projections_s=t_proj, sdpa_attention_s=times["sdpa_attention"],
                   dsla_attention_s=times["dsla_attention"],
                   attention_speedup=times["sdpa_attention"] / times["dsla_attention"])  # fmt: skip
        t_fla = fla_prefill(T, reps)
        if t_fla is not None:
            row["fla_gla_s"] = t_fla
        prefill.append(row)
        modules = [f"dsla[{b}] {times[b] * 1e3:7.1f} ms x{t_sdpa / times[b]:.2f}" for b in backends]
        print(
            f"prefill {T:6d}: sdpa {t_sdpa * 1e3:8.1f} ms",
            *modules,
            f"attention alone x{row['attention_speedup']:.2f}",
        )
    decode = []
    for L in decode_lengths:
        x = torch.randn(1, 1, HIDDEN)
        cache = (torch.zeros(1, KV_HEADS, L + 1, HEAD_DIM), torch.zeros(1, KV_HEADS, L + 1, HEAD_DIM))
        cache[0].normal_(), cache[1].normal_()
        state = torch.zeros(1, 2, KV_HEADS, HEAD_DIM, HEAD_DIM)

        def steps(fn):
            return timed(lambda: [fn() for _ in range(decode_steps)], repeats) / decode_steps

        t_sdpa = steps(lambda x=x, cache=cache, L=L: softmax(x, cache, L))
        dsla.backend = None
        t_dsla = steps(lambda x=x, state=state: dsla(x, state))
        decode.append(dict(context=L, sdpa_step_s=t_sdpa, dsla_step_s=t_dsla, speedup=t_sdpa / t_dsla))
        print(f"decode  {L:6d}: sdpa {t_sdpa * 1e6:8.1f} us  dsla {t_dsla * 1e6:7.1f} us  x{t_sdpa / t_dsla:.2f}")
    return prefill, decode


class RealLayer:
    """One layer of SmolLM2 run either as its softmax attention or as its default-preset DSLA layer, with a cache."""

    def __init__(self, layer: int = 10):
        teacher, _ = load_teacher()
        self.model = convert_llama_to_dsla(teacher, layers=[layer]).eval()
        self.block, self.layer, self.cfg = self.model.model.layers[layer], layer, self.model.config
        self.rotary = self.model.model.rotary_emb

    def attention(self, kind: str, x: torch.Tensor, cache: DSLACache, positions: torch.Tensor) -> torch.Tensor:
        cache.record_positions(positions, x.shape[0])
        embeddings = self.rotary(x, positions)
        if kind == "dsla":
            return self.block.linear_attn(hidden_states=x, position_embeddings=embeddings, cache=cache)
        return self.block.self_attn(hidden_states=x, attention_mask=None, position_ids=positions, cache=cache,
                                    use_cache=True, position_embeddings=embeddings)[0]  # fmt: skip

    def prefill(self, kind: str, x: torch.Tensor) -> torch.Tensor:
        return self.attention(kind, x, DSLACache(self.cfg), torch.arange(x.shape[1])[None])

    def decoder(self, kind: str, context: int):
        """A step function at a fixed context: the softmax layer's new key and value are dropped after each step."""
        x = torch.randn(1, context, self.cfg.hidden_size)
        cache = DSLACache(self.cfg)
        self.attention(kind, x, cache, torch.arange(context)[None])
        step, position = torch.randn(1, 1, self.cfg.hidden_size), torch.tensor([[context]])

        def run():
            out = self.attention(kind, step, cache, position)
            if kind == "softmax":
                layer = cache.layers[self.layer]
                layer.keys, layer.values = layer.keys[..., :context, :], layer.values[..., :context, :]
                layer.seen_tokens = context
                cache.position_ids = cache.position_ids[:, :context]
            return out

        return run


@torch.no_grad()
def run_layer(lengths, decode_lengths, repeats: int, decode_steps: int):
    real = RealLayer()
    prefill, decode = [], []
    for T in lengths:
        x = torch.randn(1, T, real.cfg.hidden_size)
        times = interleaved({k: lambda k=k, x=x: real.prefill(k, x) for k in ("softmax", "dsla")}, max(2, repeats - 2))
        prefill.append(dict(tokens=T, softmax_s=times["softmax"], dsla_s=times["dsla"],
                            speedup=times["softmax"] / times["dsla"]))  # fmt: skip
        print(f"layer prefill {T:6d}: softmax {times['softmax'] * 1e3:8.1f} ms  dsla {times['dsla'] * 1e3:7.1f} ms"
              f"  x{prefill[-1]['speedup']:.2f}")  # fmt: skip
    for L in decode_lengths:
        steps = {k: real.decoder(k, L) for k in ("softmax", "dsla")}
        steps["fused_step"] = fused_step_alone(steps["dsla"])
        times = interleaved({k: lambda f=f: [f() for _ in range(decode_steps)] for k, f in steps.items()}, repeats)
        row = {f"{k}_step_s" if k != "fused_step" else "fused_step_s": t / decode_steps for k, t in times.items()}
        row = dict(context=L, **row, speedup=row["softmax_step_s"] / row["dsla_step_s"])
        decode.append(row)
        print(f"layer decode  {L:6d}: softmax {row['softmax_step_s'] * 1e6:8.1f} us  dsla "
              f"{row['dsla_step_s'] * 1e6:7.1f} us  x{row['speedup']:.2f}  (fused step alone "
              f"{row['fused_step_s'] * 1e6:.1f} us)")  # fmt: skip
    return prefill, decode


def fused_step_alone(step):
    """The fused decoding kernel's call of one DSLA step (as the layer makes it: same tensors), without the
    projections around it: the layer's step is run once with the call captured."""
    from dsla_hf.models.dsla import modeling_dsla

    captured, kernel = {}, modeling_dsla.fused_decode_dsla
    modeling_dsla.fused_decode_dsla = lambda *args, **kw: captured.update(args=args, kw=kw) or kernel(*args, **kw)
    try:
        step()
    finally:
        modeling_dsla.fused_decode_dsla = kernel
    if not captured:
        raise RuntimeError("the DSLA layer's decoding step did not run through the fused kernel")
    return lambda: kernel(*captured["args"], **captured["kw"])


def layer_markdown(prefill, decode) -> str:
    lines = ["| tokens | softmax layer (ms) | DSLA layer (ms) | speedup |", "|---:|---:|---:|---:|"]
    lines += [f"| {r['tokens']} | {r['softmax_s'] * 1e3:.1f} | {r['dsla_s'] * 1e3:.1f} | {r['speedup']:.2f}x |"
              for r in prefill]  # fmt: skip
    lines += ["", "| context | softmax decode step (us) | DSLA decode step (us) | speedup | fused step alone (us) |",
              "|---:|---:|---:|---:|---:|"]  # fmt: skip
    lines += [f"| {r['context']} | {r['softmax_step_s'] * 1e6:.0f} | {r['dsla_step_s'] * 1e6:.0f} | "
              f"{r['speedup']:.2f}x | {r['fused_step_s'] * 1e6:.0f} |" for r in decode]  # fmt: skip
    return "\n".join(lines)


def markdown(prefill, decode) -> str:
    lines = [
        "| tokens | SDPA module (ms) | DSLA module (ms) | speedup | DSLA, PyTorch path (ms) | speedup "
        "| projections (ms) | SDPA alone (ms) | gates + chunk_dsla (ms) | speedup |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in prefill:
        lines.append(
            f"| {r['tokens']} | {r['sdpa_s'] * 1e3:.1f} | {r['dsla_s'] * 1e3:.1f} ({r['backend']}) | "
            f"{r['speedup']:.2f}x | {r['dsla_torch_s'] * 1e3:.1f} | {r['speedup_torch']:.2f}x | "
            f"{r['projections_s'] * 1e3:.1f} | {r['sdpa_attention_s'] * 1e3:.1f} | "
            f"{r['dsla_attention_s'] * 1e3:.1f} | {r['attention_speedup']:.2f}x |"
        )
    lines += ["", "| context | SDPA decode step (us) | DSLA decode step (us) | speedup |", "|---:|---:|---:|---:|"]
    for r in decode:
        lines.append(
            f"| {r['context']} | {r['sdpa_step_s'] * 1e6:.0f} | {r['dsla_step_s'] * 1e6:.0f} | {r['speedup']:.2f}x |"
        )
    return "\n".join(lines)


def plot(prefill, decode, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    tokens = [r["tokens"] for r in prefill]
    a.plot(tokens, [r["sdpa_s"] * 1e3 for r in prefill], "o-", label="softmax (SDPA) module")
    a.plot(tokens, [r["dsla_s"] * 1e3 for r in prefill], "o-", label=f"DSLA module ({prefill[0]['backend']} kernel)")
    if prefill[0]["backend"] != "torch":
        a.plot(tokens, [r["dsla_torch_s"] * 1e3 for r in prefill], "o-", label="DSLA module (PyTorch path)")
    a.plot(tokens, [r["projections_s"] * 1e3 for r in prefill], "--", color="gray", label="projections alone")
    if any("fla_gla_s" in r for r in prefill):
        a.plot([r["tokens"] for r in prefill if "fla_gla_s" in r], [r["fla_gla_s"] * 1e3 for r in prefill], "o-",
               label="fla chunk_gla (kernel)")  # fmt: skip
    a.set(xscale="log", yscale="log", xlabel="prompt tokens", ylabel="ms", title="prefill, one attention layer")
    a.set_xticks(tokens, [f"{t // 1024}k" for t in tokens])
    a.legend()
    ctx = [r["context"] for r in decode]
    b.plot(ctx, [r["sdpa_step_s"] * 1e6 for r in decode], "o-", label="softmax + KV cache")
    b.plot(ctx, [r["dsla_step_s"] * 1e6 for r in decode], "o-", label="DSLA (fused recurrent, in place)")
    b.set(xscale="log", xlabel="context tokens", ylabel="us per step", title="decode step, one attention layer")
    b.set_xticks(ctx, [f"{t // 1024}k" for t in ctx])
    b.set_ylim(bottom=0)
    b.legend()
    fig.suptitle(f"SmolLM2 shapes, fp32, batch 1, {torch.get_num_threads()} CPU threads")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small lengths, few repeats, no files unless --out")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--out", type=Path, default=None, help="folder for kernels.json/kernels.png")
    parser.add_argument("--lengths", type=int, nargs="+", default=None, help="prefill lengths (tokens)")
    parser.add_argument("--decode-lengths", type=int, nargs="*", default=None, help="decode contexts (none: skip)")
    parser.add_argument("--no-layer", action="store_true", help="skip the real SmolLM2 layer")
    add_isa_argument(parser)
    args = parser.parse_args(argv)
    use_isa(args.isa)
    if args.quick:
        lengths, decode_lengths, repeats, steps = [512, 1024, 2048], [1024, 4096], args.repeats or 2, 20
        layer_lengths, layer_decode = [512, 1024], [512, 4096]
    else:
        lengths = [1024, 2048, 4096, 8192, 16384]
        decode_lengths = [1024, 2048, 4096, 8192, 16384, 32768]
        layer_lengths, layer_decode = [512, 1024, 2048, 4096, 8192, 16384], [512, 1024, 4096, 16384]
        repeats, steps = args.repeats or 5, 100
    lengths = args.lengths or lengths
    decode_lengths = decode_lengths if args.decode_lengths is None else args.decode_lengths
    prefill, decode = run(lengths, decode_lengths, repeats, steps, args.threads)
    layer = None if args.no_layer else run_layer(layer_lengths, layer_decode, repeats, 50)
    meta = dict(machine(args.threads), dtype="float32", batch=1,
                shapes=dict(hidden=HIDDEN, heads=HEADS, kv_heads=KV_HEADS, head_dim=HEAD_DIM))  # fmt: skip
    table = f"Ran on {describe(meta)}.\n\nModule (projections, key gates, two states):\n\n" + markdown(prefill, decode)
    if layer is not None:
        table += "\n\nSmolLM2's layer 10, default preset, against its softmax attention:\n\n" + layer_markdown(*layer)
    print()
    print(table)
    custom = args.quick or args.lengths is not None or args.decode_lengths is not None
    out = args.out or (None if custom else RESULTS)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        name = f"kernels{suffix(args.isa)}"
        result = dict(meta=meta, prefill=prefill, decode=decode)
        if layer is not None:
            result["layer"] = dict(prefill=layer[0], decode=layer[1])
        (out / f"{name}.json").write_text(json.dumps(result, indent=2))
        (out / f"{name}.md").write_text(table + "\n")
        plot(prefill, decode, out / f"{name}.png")
        print(f"wrote {out}/{name}.json, {name}.md, {name}.png")


if __name__ == "__main__":
    main()
