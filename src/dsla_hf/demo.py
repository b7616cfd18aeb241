"""`dsla demo`: the whole pipeline on the embedded SmolLM2 teacher, in about a quarter of an hour on 2 CPU cores.

1. rank the layers (attention entropy of the last token, DESIGN §2.4);
2. chained distillation in that order up to 50 % of the layers (layer-alone stage on captured inputs, optional
   short logit-KL phase), one checkpoint serving every prefix;
3. evaluate the teacher, 25 % and 50 %: held-out perplexity (PostgreSQL docs, or pydoc topics disjoint from
   training), out-of-domain perplexity (Shakespeare, when installed), passkey retrieval at a few lengths;
4. save the checkpoint, `results.json` and plots; then generation speed and cache size against the teacher.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--output", default="dsla_demo", help="folder for checkpoint, results.json and plots")
    parser.add_argument("--ratio", type=float, default=0.5, help="conversion ratio the chain reaches")
    parser.add_argument("--ranking", choices=["entropy", "measured"], default="entropy")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--capture-sequences", type=int, default=8, help="captured sequences per stage")
    parser.add_argument("--layer-alone-steps", type=int, default=20)
    parser.add_argument(
        "--capture",
        choices=["teacher", "chain"],
        default="teacher",
        help="capture layer inputs once from the teacher, or per stage with earlier conversions",
    )
    parser.add_argument("--distill-steps", type=int, default=0, help="logit-KL steps per stage (full model)")
    parser.add_argument("--eval-sequences", type=int, default=4, help="held-out sequences for perplexity")
    parser.add_argument("--passkey-lengths", type=int, nargs="*", default=[1024, 4096])
    parser.add_argument("--passkey-trials", type=int, default=2)
    parser.add_argument("--prompt-tokens", type=int, default=1024, help="prompt length of the speed table")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--no-resume", action="store_true", help="start the chain afresh")


def generation_stats(model, input_ids: torch.Tensor, new_tokens: int) -> dict:
    from .cache_dsla import DSLACache

    cache = DSLACache(model.config)
    start = time.perf_counter()
    with torch.no_grad():
        out = model(input_ids, cache=cache, use_cache=True)
        prefill = time.perf_counter() - start
        token = out.logits[:, -1:].argmax(-1)
        tokens = [token]
        start = time.perf_counter()
        for _ in range(new_tokens - 1):
            token = model(token, cache=cache, use_cache=True).logits[:, -1:].argmax(-1)
            tokens.append(token)
        decode = time.perf_counter() - start
    return {
        "prefill_s": prefill,
        "decode_ms_per_token": 1000 * decode / max(1, new_tokens - 1),
        "cache_mib": cache.memory_bytes / 2**20,
        "tokens": torch.cat(tokens, 1),
    }


def plot_results(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stages = results["chain"]["stages"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    ax = axes[0]
    ratios = [0.0] + [s["ratio"] for s in stages]
    ppl = [results["chain"]["teacher"]["ppl"]] + [s["eval"]["ppl"] for s in stages]
    ax.plot([100 * r for r in ratios], ppl, marker="o")
    ax.axhline(1.10 * ppl[0], color="tab:orange", ls="--", lw=1, label="teacher +10 % (target at 25 %)")
    ax.axhline(1.25 * ppl[0], color="tab:red", ls="--", lw=1, label="teacher +25 % (target at 50 %)")
    for s in stages:
        ax.annotate(str(s["layer"]), (100 * s["ratio"], s["eval"]["ppl"]), fontsize=6, xytext=(2, 2),
                    textcoords="offset points")  # fmt: skip
    ax.set_xlabel("layers converted (%)  [label: layer converted at that stage]")
    ax.set_ylabel("held-out perplexity (chain eval)")
    ax.set_title("Chained distillation")
    ax.legend(fontsize=7)
    ax = axes[1]
    models = list(results["models"])
    lengths = [str(n) for n in results["passkey_lengths"]]
    width = 0.8 / len(models)
    for j, name in enumerate(models):
        acc = [results["models"][name]["passkey"]["per_length"][n] for n in lengths]
        ax.bar([i + j * width for i in range(len(lengths))], acc, width, label=name)
    ax.set_xticks([i + width * (len(models) - 1) / 2 for i in range(len(lengths))], lengths)
    ax.set_xlabel("prompt length (tokens)")
    ax.set_ylabel("passkey accuracy")
    ax.set_ylim(0, 1.05)
    ax.set_title("Passkey retrieval")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(args: argparse.Namespace) -> int:
    from .convert import convert_llama_to_dsla
    from .data import build_datasets, default_sources, load_text_dataset, pack_dataset
    from .evaluation import passkey_accuracy, perplexity
    from .ranking import rank_layers, save_ranking
    from .teacher import load_teacher
    from .trainers.chain import CHECKPOINT, ChainConfig, run_chain

    wall = time.perf_counter()
    timings = {}
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    teacher, tokenizer = load_teacher()
    n = teacher.config.num_hidden_layers
    student = convert_llama_to_dsla(teacher, layers="all", active=[])
    for p in student.parameters():
        p.requires_grad_(False)

    # -- data ----------------------------------------------------------------------------------------------------
    t = time.perf_counter()
    sources = default_sources()
    train_ds, heldout_ds = build_datasets(tokenizer, args.seq_len, None, None, 64, args.eval_sequences)
    heldout_ids = torch.tensor(heldout_ds["input_ids"])
    ood_ids = None
    if sources["ood"]:
        ood = load_text_dataset(sources["ood"], max_chars=args.seq_len * 4 * 12)
        ood_ids = torch.tensor(pack_dataset(ood, tokenizer, args.seq_len, 2)["input_ids"])
    print(f"data: train {sources['train']} ({len(train_ds)} x {args.seq_len} tokens), held out {sources['heldout']}")
    timings["data_s"] = time.perf_counter() - t

    # -- 1. ranking ----------------------------------------------------------------------------------------------
    t = time.perf_counter()
    calib = torch.tensor(train_ds["input_ids"][:8])
    ranking = rank_layers(student, calib, args.ranking, heldout_ids[:2], progress=True)
    save_ranking(ranking, out)
    order = ranking["order"]
    student.config.conversion_order = order
    print(f"ranking ({args.ranking}, lowest first): {order}")
    timings["rank_s"] = time.perf_counter() - t

    # -- does the layer-alone stage help? the first quarter at initialisation, before any training ---------------
    t = time.perf_counter()
    quarter = int(0.25 * n)
    student.set_dsla_layers(order[:quarter])
    untrained_25 = perplexity(student, heldout_ids, 2, True, "ppl 25% untrained")
    student.set_dsla_layers([])
    timings["untrained_eval_s"] = time.perf_counter() - t

    # -- 2. chain ------------------------------------------------------------------------------------------------
    t = time.perf_counter()
    config = ChainConfig(
        output_dir=str(out),
        target_ratio=args.ratio,
        layer_alone_steps=args.layer_alone_steps,
        capture_sequences=args.capture_sequences,
        capture=args.capture,
        distill_steps=args.distill_steps,
        eval_batch=2,
        resume=not args.no_resume,
    )
    chain = run_chain(student, train_ds, heldout_ids_dataset(heldout_ds, 2), config, tokenizer, teacher=None)
    timings["chain_s"] = time.perf_counter() - t

    # -- 3. evaluation ---------------------------------------------------------------------------------------------
    t = time.perf_counter()
    results = {
        "teacher": "SmolLM2-135M-Instruct",
        "sources": sources,
        "seq_len": args.seq_len,
        "ranking": {"method": args.ranking, "order": order},
        "passkey_lengths": args.passkey_lengths,
        "untrained_25": untrained_25,
        "models": {},
    }
    student.eval()
    for name, ratio in (("teacher", 0.0), ("DSLA 25%", 0.25), ("DSLA 50%", 0.5)):
        if ratio > len(chain["stages"]) / n + 1e-9:
            continue
        layers = student.set_dsla_layers(ratio)
        entry = {"dsla_layers": layers, "heldout": perplexity(student, heldout_ids, 2, True, f"ppl {name}")}
        if ood_ids is not None:
            entry["ood"] = perplexity(student, ood_ids, 2, True, f"ood ppl {name}")
        entry["passkey"] = passkey_accuracy(
            student, tokenizer, args.passkey_lengths, args.passkey_trials, progress=True, desc=f"passkey {name}"
        )
        entry["passkey"]["per_length"] = {str(k): v for k, v in entry["passkey"]["per_length"].items()}
        results["models"][name] = entry
    timings["eval_s"] = time.perf_counter() - t
    results["chain"] = chain
    base = results["models"]["teacher"]
    targets = {}
    if "DSLA 25%" in results["models"]:
        m = results["models"]["DSLA 25%"]
        targets["ppl_25_within_10pct"] = m["heldout"]["ppl"] <= 1.10 * base["heldout"]["ppl"]
        targets["passkey_25_at_least_90pct_of_teacher"] = m["passkey"]["accuracy"] >= 0.9 * base["passkey"]["accuracy"]
    if "DSLA 50%" in results["models"]:
        targets["ppl_50_within_25pct"] = (
            results["models"]["DSLA 50%"]["heldout"]["ppl"] <= 1.25 * base["heldout"]["ppl"]
        )
    results["targets"] = targets

    # -- 4. speed and cache size against the teacher (the first demo's table) -------------------------------------
    t = time.perf_counter()
    ids = heldout_ids.flatten()[None, : args.prompt_tokens]
    rows = []
    for label, ratio in (("teacher", 0.0), ("DSLA 25%", 0.25), ("DSLA 50%", 0.5)):
        if ratio > len(chain["stages"]) / n + 1e-9:
            continue
        layers = student.set_dsla_layers(ratio)
        stats = generation_stats(student, ids, args.new_tokens)
        stats["text"] = tokenizer.decode(stats.pop("tokens")[0])
        rows.append((label, len(layers), stats))
    results["speed"] = {label: {"dsla_layers": count, **s} for label, count, s in rows}
    timings["speed_s"] = time.perf_counter() - t
    timings["total_s"] = time.perf_counter() - wall
    results["timings"] = timings
    (out / "results.json").write_text(json.dumps(results, indent=2))
    plot_results(results, out / "results.png")

    print(f"\n## Results ({timings['total_s'] / 60:.1f} min; checkpoint {out / CHECKPOINT}, {out / 'results.json'})\n")
    print(f"25 % at initialisation (no training): held-out ppl {untrained_25['ppl']:.2f}\n")
    print("| model | DSLA layers | held-out ppl | out-of-domain ppl | passkey | passkey per length |")
    print("|---|---|---|---|---|---|")
    for name, m in results["models"].items():
        ood_ppl = f"{m['ood']['ppl']:.2f}" if "ood" in m else "-"
        per = ", ".join(f"{k}: {v:.2f}" for k, v in m["passkey"]["per_length"].items())
        print(f"| {name} | {len(m['dsla_layers'])} | {m['heldout']['ppl']:.2f} | {ood_ppl} | "
              f"{m['passkey']['accuracy']:.2f} | {per} |")  # fmt: skip
    print("\nDESIGN §5 quality targets: " + ", ".join(f"{k}: {'met' if v else 'NOT met'}" for k, v in targets.items()))
    print(f"\nprompt: {ids.shape[1]} held-out tokens, {args.new_tokens} greedy tokens\n")
    print("| model | DSLA layers | prefill (s) | decode (ms/token) | cache (MiB) |")
    print("|---|---|---|---|---|")
    for label, count, s in rows:
        print(f"| {label} | {count} | {s['prefill_s']:.2f} | {s['decode_ms_per_token']:.1f} | {s['cache_mib']:.1f} |")
    return 0


def heldout_ids_dataset(heldout_ds, rows: int):
    """The first `rows` held-out sequences: the chain's per-stage evaluation (the final one uses them all)."""
    return heldout_ds.select(range(min(rows, len(heldout_ds))))
