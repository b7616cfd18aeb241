"""Parity of the CPU inference paths on the real SmolLM2: a distilled DSLA checkpoint (the demo's) on held-out text.

- Whole model, one 8k-token forward: the default path (the C++ kernel, gates computed inside it, the output written
  over the query features) and its variants, against the PyTorch path with materialised gates. Logits' relative
  error, argmax agreement, perplexity.
- One DSLA layer's kernel call on the inputs it really gets (2k tokens): the C++ kernel and the PyTorch path against
  the naive fp32 recurrence, outputs and final states (relative RMS).

    python benchmarks/parity_smollm2.py --model dsla_demo/checkpoint   # writes benchmarks/results/parity_smollm2.json
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import os
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from dsla_hf.data import load_text_dataset
from dsla_hf.kernels import chunk_dsla, naive_dsla
from dsla_hf.models.dsla import modeling_dsla


def rel_rms(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).pow(2).mean().sqrt() / b.pow(2).mean().sqrt()).item()


@torch.no_grad()
def logits_of(model, ids, cpp: bool, overlay: bool) -> tuple[torch.Tensor, float]:
    """Logits of one forward with the C++ kernel on or off and the output over the queries on or off."""
    previous = os.environ.get("DSLA_HF_CPP_KERNEL")
    os.environ["DSLA_HF_CPP_KERNEL"] = "1" if cpp else "0"
    original = modeling_dsla.DSLAAttention.output_over_queries
    if not overlay:
        modeling_dsla.DSLAAttention.output_over_queries = lambda self, *args: None
    try:
        start = time.perf_counter()
        logits = model(ids).logits[0].float()
        return logits, time.perf_counter() - start
    finally:
        modeling_dsla.DSLAAttention.output_over_queries = original
        if previous is None:
            os.environ.pop("DSLA_HF_CPP_KERNEL")
        else:
            os.environ["DSLA_HF_CPP_KERNEL"] = previous


@torch.no_grad()
def kernel_inputs(model, ids, layer_rank: int) -> tuple[int, dict]:
    """The arguments of chunk_dsla in one forward, for the `layer_rank`-th DSLA layer (queries copied: the model
    writes its output over them)."""
    calls = []
    original = modeling_dsla.chunk_dsla

    def spy(*args, **kwargs):
        call = inspect.signature(original).bind(*args, **kwargs).arguments
        q = call["q"].clone() if isinstance(call["q"], torch.Tensor) else call["q"]  # (features: not overwritten)
        calls.append(dict(q=q, k=call["k"], v=call["v"], g=call["g"], mix=call.get("mix"), scale=call.get("scale")))
        return original(*args, **kwargs)

    modeling_dsla.chunk_dsla = spy
    try:
        model(ids)
    finally:
        modeling_dsla.chunk_dsla = original
    active = [i for i, kind in enumerate(model.config.layer_types) if kind == "linear_attention"]
    return active[layer_rank], calls[layer_rank]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="dsla_demo/checkpoint", help="a DSLA checkpoint folder (dsla demo's)")
    parser.add_argument("--source", default="postgresql-docs", help="held-out text (an offline corpus name)")
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--layer-tokens", type=int, default=2048)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/parity_smollm2.json"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(args.model)
    text = "\n".join(load_text_dataset(args.source, max_chars=args.tokens * 8)["text"])
    ids = tok(text, return_tensors="pt").input_ids[:, : args.tokens]
    active = [i for i, kind in enumerate(model.config.layer_types) if kind == "linear_attention"]
    result = dict(model=args.model, source=args.source, tokens=ids.shape[1], dsla_layers=active, model_paths={})

    reference, seconds = logits_of(model, ids, cpp=False, overlay=False)
    paths = {"torch path (reference)": (False, False), "C++ kernel, output over queries (default)": (True, True),
             "C++ kernel, fresh output": (True, False), "torch path, output over queries": (False, True)}  # fmt: skip
    for name, (cpp, overlay) in paths.items():
        logits, seconds = (reference, seconds) if not (cpp or overlay) else logits_of(model, ids, cpp, overlay)
        loss = torch.nn.functional.cross_entropy(logits[:-1], ids[0, 1:]).item()
        row = dict(seconds=seconds, loss=loss, ppl=math.exp(loss), logits_rel_err=rel_rms(logits, reference),
                   logits_max_abs_err=(logits - reference).abs().max().item(),
                   argmax_agreement=(logits.argmax(-1) == reference.argmax(-1)).float().mean().item())  # fmt: skip
        result["model_paths"][name] = row
        print(
            f"{name:44s} {seconds:6.2f} s  ppl {row['ppl']:.5f}  logits rel err {row['logits_rel_err']:.2e}  "
            f"argmax agreement {row['argmax_agreement']:.4f}"
        )

    layer, c = kernel_inputs(model, ids[:, : args.layer_tokens], layer_rank=len(active) // 2)
    with torch.no_grad():
        o_ref, s_ref = naive_dsla(c["q"], c["k"], c["v"], c["g"], c["mix"], c["scale"], output_final_state=True)
        for backend in ("cpp", "torch"):
            o, s = chunk_dsla(c["q"], c["k"], c["v"], c["g"], c["mix"], c["scale"], output_final_state=True,
                              backend=backend)  # fmt: skip
            row = dict(o_rel_rms=rel_rms(o, o_ref), state_rel_rms=rel_rms(s, s_ref))
            result[f"layer_{layer}_{backend}_vs_naive"] = row
            print(
                f"layer {layer}, {args.layer_tokens} tokens, {backend} vs naive: output {row['o_rel_rms']:.2e}, "
                f"final state {row['state_rel_rms']:.2e}"
            )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
