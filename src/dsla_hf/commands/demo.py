"""`dsla demo`: the whole pipeline on the embedded SmolLM2 teacher, in at most 20 minutes on 2 CPU cores.

1. rank the layers (attention entropy of the last token, docs/design.md §2);
2. chained distillation in that order up to 50 % of the layers (docs/design.md §3): each stage captures the new layer's
   inputs with every earlier conversion in place, trains it alone on them against the teacher's attention, then
   runs a short `DSLADistillTrainer` phase (TRL; token-normalised KL, per-layer alignment, gate divergence) with
   the whole converted prefix in place, and freezes it; one checkpoint serves every prefix;
3. evaluate the teacher, 25 % and 50 %: held-out perplexity on 512-token rows and with 2048 tokens of context
   (PostgreSQL docs, or pydoc topics disjoint from training), out-of-domain perplexity (Shakespeare, when
   installed), passkey retrieval at 1k and 4k tokens;
4. save the checkpoint, `results.json` and plots; then generation speed and cache size against the teacher.

The recipe is `dsla_hf.demo.DEMO_RECIPE`, with every field that has a flag of the same name taken from the flags;
`dsla_hf.demo.train_chain` runs steps 1 and 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..demo import DEMO_RECIPE, DemoRecipe, demo_datasets, train_chain
from ..devices import add_device_arguments, describe, device_and_dtype, synchronize

# docs/design.md §5: held-out perplexity within these factors of the teacher's ((ratio, context) -> factor); passkey
# at 50 %.
PPL_TARGETS = {("25%", "short"): 1.02, ("50%", "short"): 1.04, ("25%", "long"): 1.03, ("50%", "long"): 1.06}
PASSKEY_TARGET_50 = 0.75
# the models evaluated and timed: (label, conversion ratio), those the chain reached
MODELS = (("teacher", 0.0), ("DSLA 25%", 0.25), ("DSLA 50%", 0.5))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    r = DEMO_RECIPE
    parser.add_argument("--output", default="dsla_demo", help="folder for checkpoint, results.json and plots")
    parser.add_argument("--ratio", type=float, default=r.ratio, help="conversion ratio the chain reaches")
    parser.add_argument("--ranking", choices=["entropy", "measured"], default=r.ranking)
    parser.add_argument(
        "--ranking-first", choices=["low", "high"], default=r.ranking_first, help="which end of the scores goes first"
    )
    parser.add_argument("--seq-len", type=int, default=r.seq_len)
    parser.add_argument(
        "--capture-sequences", type=int, default=r.capture_sequences, help="captured sequences (layer-alone stage)"
    )
    parser.add_argument("--layer-alone-steps", type=int, default=r.layer_alone_steps)
    parser.add_argument("--layer-alone-lr", type=float, default=r.layer_alone_lr)
    parser.add_argument("--layer-alone-batch", type=int, default=r.layer_alone_batch)
    parser.add_argument("--layer-alone-schedule", choices=["constant", "cosine"], default=r.layer_alone_schedule)
    parser.add_argument(
        "--capture",
        choices=["teacher", "chain"],
        default=r.capture,
        help="capture layer inputs once from the teacher, or per stage with earlier conversions",
    )
    parser.add_argument("--distill-steps", type=int, default=r.distill_steps, help="TRL phase steps per stage")
    parser.add_argument("--distill-lr", type=float, default=r.distill_lr)
    parser.add_argument("--kl-weight", type=float, default=r.kl_weight)
    parser.add_argument("--alignment-weight", type=float, default=r.alignment_weight)
    parser.add_argument("--gate-divergence-weight", type=float, default=r.gate_divergence_weight)
    parser.add_argument(
        "--num-states", type=int, choices=[1, 2], default=r.num_states, help="2: DSLA; 1: single-state GLA ablation"
    )
    parser.add_argument("--eval-sequences", type=int, default=r.eval_sequences, help="held-out sequences (ppl)")
    parser.add_argument("--passkey-lengths", type=int, nargs="*", default=[1024, 4096])
    parser.add_argument("--long-context", type=int, default=2048, help="context of the second perplexity")
    parser.add_argument("--passkey-trials", type=int, default=4, help="keys per length (depths spread evenly)")
    parser.add_argument("--prompt-tokens", type=int, nargs="+", default=[1024, 4096],
                        help="prompt lengths of the speed table")  # fmt: skip
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    add_device_arguments(parser, dtype_default=None)
    parser.add_argument("--no-resume", action="store_true", help="start the chain afresh")


def recipe_from_args(args: argparse.Namespace) -> DemoRecipe:
    """The recipe with every field that has a flag of the same name taken from the flags."""
    flags = {f.name: getattr(args, f.name) for f in dataclasses.fields(DemoRecipe) if hasattr(args, f.name)}
    return DEMO_RECIPE.replace(**flags)


@dataclass
class DemoData:
    """The demo's text: the recipe's packed training and held-out rows, and out-of-domain rows when installed."""

    sources: dict
    train_ds: object
    heldout_ds: object
    heldout_ids: torch.Tensor
    ood_ids: torch.Tensor | None


def load_data(args: argparse.Namespace, recipe: DemoRecipe, tokenizer) -> DemoData:
    """Step 0: the recipe's training and held-out data, and two out-of-domain rows (when a source is installed)."""
    from ..data import default_sources, load_text_dataset, pack_dataset

    sources = default_sources()
    train_ds, heldout_ds = demo_datasets(tokenizer, recipe)
    heldout_ids = torch.tensor(heldout_ds["input_ids"])
    ood_ids = None
    if sources["ood"]:
        ood = load_text_dataset(sources["ood"], max_chars=args.seq_len * 4 * 12)
        ood_ids = torch.tensor(pack_dataset(ood, tokenizer, args.seq_len, 2)["input_ids"])
    print(f"data: train {sources['train']} ({len(train_ds)} x {args.seq_len} tokens), held out {sources['heldout']}")
    return DemoData(sources, train_ds, heldout_ds, heldout_ids, ood_ids)


def rank_and_chain(args, recipe: DemoRecipe, out: Path, teacher, tokenizer, data: DemoData, timings: dict):
    """Steps 1 and 2: rank, measure the first quarter at initialisation (does the training help?), run the chain.
    Returns `train_chain`'s result and the untrained quarter's held-out perplexity; adds the steps' timings."""
    from ..evaluation.metrics import perplexity

    n = teacher.config.num_hidden_layers
    untrained = {}
    t = time.perf_counter()

    def before_chain(student, order):
        timings["rank_s"] = time.perf_counter() - t
        print(f"ranking ({args.ranking}, {args.ranking_first}est first): {order}")
        start = time.perf_counter()
        student.set_dsla_layers(order[: int(0.25 * n)])
        untrained.update(perplexity(student, data.heldout_ids, 2, True, "ppl 25% untrained"))
        student.set_dsla_layers([])
        timings["untrained_eval_s"] = time.perf_counter() - start
        timings["chain_start"] = time.perf_counter()

    done = train_chain(
        recipe,
        out,
        teacher,
        tokenizer,
        (data.train_ds, data.heldout_ds),
        resume=not args.no_resume,
        before_chain=before_chain,
    )
    timings["chain_s"] = time.perf_counter() - timings.pop("chain_start")
    return done, untrained


def reached_models(chain: dict, num_layers: int) -> list[tuple[str, float]]:
    """The (label, ratio) of `MODELS` whose prefix the chain reached."""
    return [(label, ratio) for label, ratio in MODELS if ratio <= len(chain["stages"]) / num_layers + 1e-9]


def evaluate_models(args, student, tokenizer, data: DemoData, models: list[tuple[str, float]]) -> dict[str, dict]:
    """Step 3: for each model (a prefix of the chain), held-out perplexity on the rows and with `long_context` tokens
    of context, out-of-domain perplexity and passkey retrieval."""
    from ..evaluation.metrics import passkey_accuracy, perplexity, sliding_window_perplexity

    student.eval()
    results = {}
    for name, ratio in models:
        layers = student.set_dsla_layers(ratio)
        entry = {"dsla_layers": layers, "heldout": perplexity(student, data.heldout_ids, 2, True, f"ppl {name}")}
        # the same held-out text as one stream, each token scored with up to `long_context` tokens before it
        entry["heldout_long"] = sliding_window_perplexity(
            student, data.heldout_ids, args.long_context, progress=True, desc=f"ppl@{args.long_context} {name}"
        )
        if data.ood_ids is not None:
            entry["ood"] = perplexity(student, data.ood_ids, 2, True, f"ood ppl {name}")
        entry["passkey"] = passkey_accuracy(
            student, tokenizer, args.passkey_lengths, args.passkey_trials, progress=True, desc=f"passkey {name}"
        )
        entry["passkey"]["per_length"] = {str(k): v for k, v in entry["passkey"]["per_length"].items()}
        results[name] = entry
    return results


def generation_stats(model, input_ids: torch.Tensor, new_tokens: int) -> dict:
    """Prefill time, decode time per token and cache size of `new_tokens` greedy tokens after `input_ids`."""
    from ..models.dsla.cache_dsla import DSLACache

    cache = DSLACache(model.config)
    input_ids = input_ids.to(model.device)
    start = time.perf_counter()
    with torch.no_grad():
        out = model(input_ids, cache=cache, use_cache=True)
        token = out.logits[:, -1:].argmax(-1)
        synchronize(model.device)
        prefill = time.perf_counter() - start
        tokens, steps = [token], []
        for _ in range(new_tokens - 1):
            start = time.perf_counter()
            token = model(token, cache=cache, use_cache=True).logits[:, -1:].argmax(-1)
            synchronize(model.device)
            steps.append(time.perf_counter() - start)
            tokens.append(token)
    return {
        "prefill_s": prefill,
        # The median step, as vLLM reports inter-token latency: a VM's stalls of a few steps do not move it.
        "decode_ms_per_token": 1000 * statistics.median(steps) if steps else 0.0,
        "cache_mib": cache.memory_bytes / 2**20,
        "tokens": torch.cat(tokens, 1),
    }


def _faster(old: dict | None, new: dict) -> dict:
    """`new` with the faster of the two rounds' prefill and decode times."""
    if old is None:
        return new
    return {
        **new,
        "prefill_s": min(old["prefill_s"], new["prefill_s"]),
        "decode_ms_per_token": min(old["decode_ms_per_token"], new["decode_ms_per_token"]),
    }


def speed_rows(args, student, tokenizer, heldout_ids: torch.Tensor, models: list[tuple[str, float]]) -> list[tuple]:
    """Step 4: (prompt length, label, generation stats) of each model at each prompt length."""
    rows = []
    for length in args.prompt_tokens:
        # Held-out tokens, repeated where the held-out set is shorter than the prompt.
        flat = heldout_ids.flatten()
        ids = flat.repeat(-(-length // flat.numel()))[None, :length]
        best: dict[str, dict] = {}
        for _ in range(2):  # two interleaved rounds, the faster of each: the machine's slow phases fall on all
            for label, ratio in models:
                layers = student.set_dsla_layers(ratio)
                stats = generation_stats(student, ids, args.new_tokens)
                stats["text"] = tokenizer.decode(stats.pop("tokens")[0])
                stats["dsla_layers"] = len(layers)
                best[label] = _faster(best.get(label), stats)
        rows += [(length, label, s) for label, s in best.items()]
    return rows


def quality_targets(models: dict) -> dict[str, bool]:
    """Which quality targets of docs/design.md §5 the evaluated models meet (those whose model was evaluated)."""
    base, targets = models["teacher"], {}
    for (ratio, context), factor in PPL_TARGETS.items():
        m = models.get(f"DSLA {ratio}")
        if m is not None:
            key = "heldout" if context == "short" else "heldout_long"
            name = f"ppl_{ratio[:-1]}_{context}_within_{round(100 * (factor - 1))}pct"
            targets[name] = m[key]["ppl"] <= factor * base[key]["ppl"]
    if "DSLA 50%" in models:
        targets["passkey_50_at_least_0.75"] = models["DSLA 50%"]["passkey"]["accuracy"] >= PASSKEY_TARGET_50
    return targets


def plot_results(results: dict, path: Path) -> None:
    """The chain's perplexity per stage against the targets, and passkey accuracy per model and length."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stages = results["chain"]["stages"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    ax = axes[0]
    ratios = [0.0] + [s["ratio"] for s in stages]
    ppl = [results["chain"]["teacher"]["ppl"]] + [s["eval"]["ppl"] for s in stages]
    ax.plot([100 * r for r in ratios], ppl, marker="o")
    for ratio, color in (("25%", "tab:orange"), ("50%", "tab:red")):
        factor = PPL_TARGETS[(ratio, "short")]
        label = f"teacher +{round(100 * (factor - 1))} % (target at {ratio[:-1]} %, 512 tokens)"
        ax.axhline(factor * ppl[0], color=color, ls="--", lw=1, label=label)
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


def print_report(args, results: dict, rows: list[tuple], out: Path) -> None:
    """The results as Markdown tables: quality per model, the targets met, speed per prompt length."""
    from ..trainers.chain import CHECKPOINT

    timings, untrained = results["timings"], results["untrained_25"]
    print(f"\n## Results ({timings['total_s'] / 60:.1f} min; checkpoint {out / CHECKPOINT}, {out / 'results.json'})\n")
    print(f"25 % at initialisation (no training): held-out ppl {untrained['ppl']:.2f}\n")
    print(f"| model | DSLA layers | held-out ppl @{args.seq_len} | held-out ppl @{args.long_context} | "
          "out-of-domain ppl | passkey | passkey per length |")  # fmt: skip
    print("|---|---|---|---|---|---|---|")
    for name, m in results["models"].items():
        ood_ppl = f"{m['ood']['ppl']:.2f}" if "ood" in m else "-"
        per = ", ".join(f"{k}: {v:.2f}" for k, v in m["passkey"]["per_length"].items())
        print(f"| {name} | {len(m['dsla_layers'])} | {m['heldout']['ppl']:.2f} | {m['heldout_long']['ppl']:.2f} | "
              f"{ood_ppl} | {m['passkey']['accuracy']:.2f} | {per} |")  # fmt: skip
    met = ", ".join(f"{k}: {'met' if v else 'NOT met'}" for k, v in results["targets"].items())
    print(f"\nQuality targets (docs/design.md §5): {met}")
    where = results["machine"]
    print(f"\nspeed: held-out prompts, {args.new_tokens} greedy tokens (decode: the median step), best of two "
          f"interleaved rounds; {where['cpu']} ({where['cpu_isa']}), {where['threads']} threads, DSLA layers on "
          f"{where['dsla_kernels']}\n")  # fmt: skip
    print("| prompt | model | DSLA layers | prefill (s) | decode (ms/token) | cache (MiB) |")
    print("|---|---|---|---|---|---|")
    for length, label, s in rows:
        print(f"| {length} | {label} | {s['dsla_layers']} | {s['prefill_s']:.2f} | {s['decode_ms_per_token']:.1f} | "
              f"{s['cache_mib']:.1f} |")  # fmt: skip


def run(args: argparse.Namespace) -> int:
    """Data, ranking and chain, evaluation, speed; then `results.json`, the plots and the report."""
    from ..ranking import save_ranking
    from ..teacher import load_teacher

    if args.threads:
        torch.set_num_threads(args.threads)
    recipe = recipe_from_args(args)
    wall = time.perf_counter()
    timings = {}
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    device, _ = device_and_dtype(args)
    teacher, tokenizer = load_teacher()
    teacher = teacher.to(device)
    n = teacher.config.num_hidden_layers

    t = time.perf_counter()
    data = load_data(args, recipe, tokenizer)
    timings["data_s"] = time.perf_counter() - t

    done, untrained = rank_and_chain(args, recipe, out, teacher, tokenizer, data, timings)
    student, chain, order = done["student"], done["chain"], done["order"]
    save_ranking(done["ranking"], out)
    models = reached_models(chain, n)

    t = time.perf_counter()
    results = {
        "teacher": "SmolLM2-135M-Instruct",
        "sources": data.sources,
        "seq_len": args.seq_len,
        "ranking": {"method": args.ranking, "first": args.ranking_first, "order": order},
        "recipe": dataclasses.asdict(recipe),
        "passkey_lengths": args.passkey_lengths,
        "untrained_25": untrained,
        "models": evaluate_models(args, student, tokenizer, data, models),
    }
    timings["eval_s"] = time.perf_counter() - t
    results["chain"] = chain
    results["targets"] = quality_targets(results["models"])

    t = time.perf_counter()
    rows = speed_rows(args, student, tokenizer, data.heldout_ids, models)
    results["speed"] = {f"{label} @ {length}": {"prompt_tokens": length, **s} for length, label, s in rows}
    timings["speed_s"] = time.perf_counter() - t
    timings["total_s"] = time.perf_counter() - wall
    results["timings"] = timings
    results["machine"] = describe(device)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    plot_results(results, out / "results.png")
    print_report(args, results, rows, out)
    return 0
