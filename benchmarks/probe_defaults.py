"""Choose the default DSLA formulation by measurement (docs/design.md §1).

One layer of SmolLM2 (layer 10 by default), converted alone and trained alone to match the teacher's attention
output on captured inputs (512-token sequences of CPython's docs, Adam, batches of 4), at a fixed token budget; the
score is the relative error of the attention output on held-out sequences. Every variant gets the same data, steps
and seed.

    python benchmarks/probe_defaults.py --tokens 300000          # writes benchmarks/results/probe_defaults.{json,md}
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from tqdm import tqdm

from dsla_hf import convert_llama_to_dsla, load_teacher
from dsla_hf.data import pydoc_text
from dsla_hf.trainers.layer_alone import relative_error

VARIANTS = {
    "paper (raw q/k, no normaliser)": dict(dsla_preset="paper"),
    "raw q/k + output RMS norm": dict(dsla_feature_map="identity", dsla_normalizer="rms"),
    "elu+1 + sum normaliser": dict(dsla_feature_map="elu", dsla_normalizer="sum"),
    "hedgehog + sum (default)": dict(),
    "hedgehog + sum, single state (GLA)": dict(dsla_num_states=1),
    "hedgehog + sum, gates from hidden": dict(dsla_gate_source="hidden"),
    "hedgehog + sum + window 16": dict(dsla_window=16),
    "hedgehog + sum + window 64": dict(dsla_window=64),
}


class _Stop(Exception):
    """Raised once the captured layer has run: nothing above it is needed."""


def capture(teacher, layer: int, ids: torch.Tensor):
    """Inputs of the layer's attention (after its input norm) and the teacher's attention outputs."""
    block = teacher.model.layers[layer]
    inputs, outputs = [], []

    def keep_output(module, args, out):
        outputs.append(out[0].detach())
        raise _Stop

    hooks = [
        block.input_layernorm.register_forward_hook(lambda m, a, out: inputs.append(out.detach())),
        block.self_attn.register_forward_hook(keep_output),
    ]
    with torch.no_grad():
        for rows in tqdm(ids.split(4), desc="capture", leave=False):
            try:
                teacher.model(rows, use_cache=False)
            except _Stop:
                pass
    for h in hooks:
        h.remove()
    return torch.cat(inputs), torch.cat(outputs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layer", type=int, default=10)
    parser.add_argument("--tokens", type=int, default=300_000, help="training tokens per variant")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--train-seqs", type=int, default=96)
    parser.add_argument("--eval-seqs", type=int, default=16)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--variants", nargs="*", default=None, help="subset of variant names")
    parser.add_argument("--out", default="benchmarks/results/probe_defaults")
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(2)

    teacher, tokenizer = load_teacher()
    ids = tokenizer(pydoc_text(), return_tensors="pt").input_ids[0]
    n = args.train_seqs + args.eval_seqs
    ids = ids[: n * args.seq_len].view(n, args.seq_len)  # train first, held-out last: disjoint text
    x, y = capture(teacher, args.layer, ids)
    x_train, y_train = x[: args.train_seqs], y[: args.train_seqs]
    x_eval, y_eval = x[args.train_seqs :], y[args.train_seqs :]
    rotary = teacher.model.rotary_emb
    positions = torch.arange(args.seq_len)[None]
    steps = max(1, args.tokens // (4 * args.seq_len))

    results = {}
    for name, options in VARIANTS.items():
        if args.variants and name not in args.variants:
            continue
        torch.manual_seed(0)
        student = convert_llama_to_dsla(teacher, layers=[args.layer], **options)
        block = student.model.layers[args.layer]
        for p in student.parameters():
            p.requires_grad_(False)
        params = list(block.linear_attn.parameters())  # the paper preset's own q/k/v/o copies train too
        for p in params:
            p.requires_grad_(True)
        optimizer = torch.optim.Adam(params, lr=args.lr)
        before = relative_error(block.linear_attn, x_eval, y_eval)
        start = time.perf_counter()
        order = torch.randperm(len(x_train))
        for step in tqdm(range(steps), desc=name, leave=False):
            batch = order[(step * 4) % len(order) : (step * 4) % len(order) + 4]
            if len(batch) < 4:
                order = torch.randperm(len(x_train))
                batch = order[:4]
            pe = rotary(x_train[batch], positions)
            out = block.linear_attn(hidden_states=x_train[batch], position_embeddings=pe)
            loss = torch.nn.functional.mse_loss(out, y_train[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        seconds = time.perf_counter() - start
        after = relative_error(block.linear_attn, x_eval, y_eval)
        results[name] = {"options": options, "rel_error_init": before, "rel_error": after, "train_seconds": seconds}
        print(f"{name:40s} init {before:8.3f}  trained {after:7.3f}  ({seconds:.0f} s)", flush=True)
        del student

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if args.variants and out.with_suffix(".json").is_file():  # a re-run of some variants updates the others' table
        previous = json.loads(out.with_suffix(".json").read_text())["results"]
        results = {
            name: results.get(name) or previous.get(name) for name in VARIANTS if name in previous or name in results
        }
    meta = {k: getattr(args, k) for k in ("layer", "tokens", "seq_len", "train_seqs", "eval_seqs", "lr")}
    out.with_suffix(".json").write_text(json.dumps({"setup": meta, "steps": steps, "results": results}, indent=2))
    lines = [
        f"Layer {args.layer} of SmolLM2 trained alone on captured inputs, {steps} steps x 4 x {args.seq_len} tokens "
        f"(~{steps * 4 * args.seq_len / 1e3:.0f}k tokens), Adam lr {args.lr}; relative error of the attention output "
        "on held-out CPython docs.",
        "",
        "| variant | rel. error at init | rel. error trained | train time (s) |",
        "|---|---|---|---|",
    ]
    for name, r in results.items():
        lines.append(f"| {name} | {r['rel_error_init']:.3f} | {r['rel_error']:.3f} | {r['train_seconds']:.0f} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
