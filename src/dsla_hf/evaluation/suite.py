"""`dsla eval`: the evaluation suite (docs/design.md §4, §5) on any model, as JSON, a Markdown report and PNG plots.

    dsla eval --model smollm2                                    # the teacher alone
    dsla eval --model dsla_demo --ratios 0 0.25 0.5 --out eval/  # a DSLA checkpoint (or chain folder) per ratio
    dsla eval --model dsla_demo --compare "GLA=outputs/ablation/gla" --out eval/   # beside another checkpoint

For every model and ratio (ratio 0 of a DSLA checkpoint is its teacher, exactly):

- held-out perplexity at several context lengths, a sliding window over one token stream (`--ppl-tokens` tokens of
  the held-out corpus: PostgreSQL's manual, never trained on; pydoc topics disjoint from training without it);
- passkey retrieval (Landmark / LongLoRA prompt) over lengths x depths, drawn as heatmaps;
- RULER's `niah_single`, `niah_multikey`, `niah_multivalue` and `vt` in their prompt formats and scoring
  (`dsla_hf.evaluation.ruler`), lengths counted by the model's tokenizer;
- for DSLA models: effective attention maps of the history, recency and window components on held-out text (the
  DSLA paper's Figure 5), their share of the attention mass per layer, and the learned mixing per layer and head;
- the speed and memory tables of the benchmarks (`benchmarks/results/kernels*.md`, `e2e*.md`).

Defaults are small (a few minutes for a teacher and two ratios on 2 CPU cores); every size has a flag.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from ..loading import load_pretrained, trained_layers
from ..models.dsla.configuration_dsla import ratio_to_layers

RULER_TASKS = ("niah_single", "niah_multikey", "niah_multivalue", "vt")


# --- models -----------------------------------------------------------------------------------------------------


def load_model(spec: str, tokenizer: str | None = None, dtype: torch.dtype = torch.float32, device="cpu"):
    """(model, tokenizer, trained DSLA layer count or None) from 'smollm2', a folder or a hub id."""
    try:
        model, tok, _ = load_pretrained(spec, dtype, device, tokenizer)
    except ValueError as err:  # no tokenizer
        raise SystemExit(str(err)) from None
    return model, tok, trained_layers(spec)


def is_dsla(model) -> bool:
    return hasattr(model, "set_dsla_layers")


def model_variants(
    model, ratios: list[float], trained: int | None, label: str | None = None, with_teacher: bool = True
):
    """(name, ratio) for every ratio the model can run: a teacher runs ratio 0 only; a chain checkpoint only the
    ratios its trained stages cover (later layers of its conversion order hold untrained weights). DSLA variants are
    named `label` (default: DSLA, or GLA for one state) and the percentage."""
    out, skipped = [], []
    n = model.config.num_hidden_layers
    for ratio in ratios:
        if ratio == 0.0:
            if with_teacher:
                out.append(("teacher", 0.0))
            continue
        if not is_dsla(model):
            skipped.append((ratio, "the model has no DSLA weights"))
            continue
        count = ratio_to_layers(ratio, n)
        limit = len(model.config.conversion_order) if trained is None else trained
        if count > limit:
            skipped.append((ratio, f"needs {count} DSLA layers, {limit} trained"))
            continue
        states = model.config.dsla_num_states
        name = label or ("DSLA" if states == 2 else "GLA")
        out.append((f"{name} {round(100 * ratio)}%", ratio))
    return out, skipped


# --- data -------------------------------------------------------------------------------------------------------


def heldout_stream(tokenizer, source: str | None, tokens: int, seed: int = 0) -> tuple[torch.Tensor, str, str]:
    """(token ids, the text they came from, source name): the first documents of the held-out corpus."""
    from ..data import default_sources, load_text_dataset

    source = source or default_sources()["heldout"]
    ds = load_text_dataset(source, max_chars=tokens * 8, seed=seed + 1)
    text = "\n\n".join(t for t in ds["text"] if t and t.strip())
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids[0]
    if ids.numel() < tokens:
        raise SystemExit(f"{source} has only {ids.numel()} tokens; lower --ppl-tokens")
    return ids[:tokens], text, source


# --- running ----------------------------------------------------------------------------------------------------


def evaluate_variant(model, tokenizer, args, stream: torch.Tensor, essay: str, name: str, progress: bool) -> dict:
    from .metrics import passkey_grid, sliding_window_perplexity
    from .ruler import ruler_eval

    start = time.perf_counter()
    entry: dict = {"ppl": {}}
    for length in args.ppl_lengths:
        entry["ppl"][str(length)] = sliding_window_perplexity(
            model, stream, length, args.ppl_stride, progress=progress, desc=f"ppl@{length} {name}"
        )
    if args.passkey_lengths and args.passkey_depths:
        entry["passkey"] = passkey_grid(
            model, tokenizer, lengths=args.passkey_lengths, depths=args.passkey_depths, trials=args.passkey_trials,
            seed=args.seed, progress=progress, desc=f"passkey {name}",
        )  # fmt: skip
    if args.ruler_tasks and args.ruler_lengths:
        entry["ruler"] = ruler_eval(
            model, tokenizer, tasks=args.ruler_tasks, lengths=args.ruler_lengths, samples=args.ruler_samples,
            seed=args.seed, essay_text=essay, max_new_tokens=args.ruler_new_tokens, progress=progress,
            desc=f"ruler {name}",
        )  # fmt: skip
    entry["seconds"] = time.perf_counter() - start
    return entry


def evaluate_variants(
    results: dict, model, tokenizer, variants, args, stream: torch.Tensor, essay: str, out: Path, tag: str, progress
) -> None:
    """Evaluate `model` at each (name, ratio) of `variants` into `results["models"]`, and the attention maps of its
    last DSLA variant into `results["attention"]`."""
    ppl_stream = stream[: args.ppl_tokens]
    for name, ratio in variants:
        layers = model.set_dsla_layers(ratio) if is_dsla(model) else []
        model.eval()
        entry = evaluate_variant(model, tokenizer, args, ppl_stream, essay, name, progress)
        entry = {"ratio": ratio, "dsla_layers": layers, **entry}
        if is_dsla(model):
            entry["num_states"] = model.config.dsla_num_states
        results["models"][name] = entry
        print(f"{name}: " + ", ".join(f"ppl@{k} {v['ppl']:.2f}" for k, v in entry["ppl"].items()))
    dsla_variants = [(n, r) for n, r in variants if r > 0]
    if dsla_variants and args.map_tokens > 0:
        name, ratio = dsla_variants[-1]
        model.set_dsla_layers(ratio)
        results["attention"][name] = attention_analysis(model, stream, args, out, tag)


def attention_analysis(model, stream: torch.Tensor, args, out: Path, tag: str) -> dict:
    """Maps of every active DSLA layer on the first `--map-tokens` held-out tokens: summaries in the JSON, three
    layers (or `--map-layers`) drawn, and the mixing plot."""
    from .attention_maps import layer_maps, map_summary, mixing_weights, plot_maps, plot_mixing

    ids = stream[None, : args.map_tokens]
    half_lives: dict = {}
    maps = layer_maps(model, ids, half_lives=half_lives)
    window = model.config.dsla_window
    shares = {i: map_summary(m, skip=window) for i, m in maps.items()}
    for i, lives in half_lives.items():
        for name, life in lives.items():
            shares[i][name]["half_life"] = life
    mixing = {i: w for i, w in mixing_weights(model).items() if i in maps}
    active = sorted(maps)
    drawn = args.map_layers or [active[0], active[len(active) // 2], active[-1]] if active else []
    drawn = [i for i in dict.fromkeys(drawn) if i in maps]
    files = {}
    if drawn:
        files["maps"] = f"attention_maps_{tag}.png"
        plot_maps({i: maps[i] for i in drawn}, out / files["maps"])
        files["mixing"] = f"mixing_{tag}.png"
        plot_mixing(mixing, shares, out / files["mixing"])
    return {
        "tokens": ids.shape[1],
        "window": window,
        "layers": shares,
        "mixing": mixing,
        "drawn": drawn,
        "files": files,
    }


# --- speed and memory from the benchmark JSONs ------------------------------------------------------------------


BENCHMARKS = {  # result file stem -> what it measures
    "kernels": "One attention layer of SmolLM2 (the module benchmark and the real default-preset layer)",
    "kernels_avx2": "The same on the AVX2 code paths",
    "e2e": "SmolLM2, half the layers as DSLA vs the teacher",
    "e2e_avx2": "The same on the AVX2 code paths",
}


def speed_tables(folder: str | Path) -> tuple[list[str], dict]:
    """The Markdown tables that the kernel and end-to-end benchmarks wrote into `folder` (each says where it ran),
    and their raw numbers."""
    folder = Path(folder)
    lines, raw = [], {}
    for stem, title in BENCHMARKS.items():
        table, numbers = folder / f"{stem}.md", folder / f"{stem}.json"
        if not (table.is_file() and numbers.is_file()):
            lines += [f"_No {stem} benchmark ({table} missing: see `benchmarks/`)._", ""]
            continue
        raw[stem] = json.loads(numbers.read_text())
        lines += [f"{title} (`{table}`):", "", *table.read_text().strip().splitlines(), ""]
    return lines, raw


# --- report -----------------------------------------------------------------------------------------------------


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values) if values else float("nan")


def report_lines(results: dict) -> list[str]:
    models = results["models"]
    s = results["settings"]
    lines = [f"# Evaluation: {results['model']}", ""]
    lines += [
        f"Held-out text: `{results['heldout']}` ({s['ppl_tokens']} tokens, sliding window, stride "
        f"{s['ppl_stride'] or 'context/2'}); passkey lengths {s['passkey_lengths']} x depths {s['passkey_depths']} "
        f"({s['passkey_trials']} key(s) each); RULER at {s['ruler_lengths']} tokens, {s['ruler_samples']} sample(s) "
        f"per task and length (score in %, `string_match_all`). {results['wall_s'] / 60:.1f} min in all.",
        "",
    ]
    ppl_cols = [str(n) for n in s["ppl_lengths"]]
    tasks = s["ruler_tasks"] if s["ruler_lengths"] else []
    head = ["model", "DSLA layers", *[f"ppl@{n}" for n in ppl_cols]]
    head += ["passkey"] if s["passkey_lengths"] else []
    head += tasks
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, m in models.items():
        row = [name, str(len(m["dsla_layers"]))]
        row += [f"{m['ppl'][n]['ppl']:.2f}" for n in ppl_cols]
        if "passkey" in m:
            row.append(f"{m['passkey']['mean']:.2f}")
        row += [f"{_mean(m['ruler']['scores'][t].values()):.0f}" for t in tasks]
        lines.append("| " + " | ".join(row) + " |")
    lines.append("")
    if s["passkey_lengths"]:
        depths = s["passkey_depths"]
        lines += ["Passkey accuracy by depth of the key (mean over lengths; 0 = start of the prompt):", ""]
        lines += ["| model | " + " | ".join(f"depth {d:g}" for d in depths) + " |", "|---|" + "---|" * len(depths)]
        for name, m in models.items():
            acc = m["passkey"]["accuracy"]
            lines.append(f"| {name} | " + " | ".join(f"{_mean(row):.2f}" for row in acc) + " |")
        lines.append("")
    if tasks and len(s["ruler_lengths"]) > 1:
        lines += ["RULER per length (%):", ""]
        cols = [f"{t}@{n}" for t in tasks for n in s["ruler_lengths"]]
        lines += ["| model | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
        for name, m in models.items():
            vals = [f"{m['ruler']['scores'][t][str(n)]:.0f}" for t in tasks for n in s["ruler_lengths"]]
            lines.append(f"| {name} | " + " | ".join(vals) + " |")
        lines.append("")
    maps = results.get("attention", {})
    if maps:
        lines += [
            "Effective attention on held-out text (queries past the window; mean over layers and heads): share of the "
            "attention mass, mass-weighted mean distance `t - i` in tokens, and the gate half-life of each state "
            "(ln 2 / mean -log gate; median over layers):",
            "",
            "| model | component | mass | mean distance | half-life (tokens) |",
            "|---|---|---|---|---|",
        ]
        for name, a in maps.items():
            comps = next(iter(a["layers"].values())).keys()
            for comp in comps:
                mass = _mean(v[comp]["mass"] for v in a["layers"].values())
                dist = _mean(v[comp]["mean_distance"] for v in a["layers"].values())
                lives = sorted(v[comp]["half_life"] for v in a["layers"].values() if "half_life" in v[comp])
                life = f"{lives[len(lives) // 2]:.0f}" if lives else "-"
                lines.append(f"| {name} | {comp} | {mass:.3f} | {dist:.1f} | {life} |")
        lines.append("")
    lines += ["## Speed and memory", "", *results["speed_lines"]]
    lines += ["## Plots", ""]
    lines += [f"![{f}]({f})" for f in results["plots"]]
    lines += ["", "## Command", "", "```", results["command"], "```", ""]
    return lines


def plot_results(results: dict, out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models, s, files = results["models"], results["settings"], []
    if s["ppl_lengths"]:
        fig, ax = plt.subplots(figsize=(5.5, 3.8))
        for name, m in models.items():
            xs = [int(n) for n in m["ppl"]]
            ax.plot(xs, [m["ppl"][str(n)]["ppl"] for n in xs], marker="o", label=name)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("context length (tokens, sliding window)")
        ax.set_ylabel("held-out perplexity")
        ax.set_title(f"Perplexity on {results['heldout']}")
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / "perplexity.png", dpi=120)
        plt.close(fig)
        files.append("perplexity.png")
    if s["passkey_lengths"] and s["passkey_depths"]:
        fig, axes = plt.subplots(1, len(models), figsize=(2.6 * len(models) + 1, 3.0), squeeze=False)
        for ax, (name, m) in zip(axes[0], models.items()):
            acc = torch.tensor(m["passkey"]["accuracy"])
            im = ax.imshow(acc.numpy(), vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
            ax.set_xticks(range(len(s["passkey_lengths"])), [str(n) for n in s["passkey_lengths"]], fontsize=7)
            ax.set_yticks(range(len(s["passkey_depths"])), [f"{d:g}" for d in s["passkey_depths"]], fontsize=7)
            for (r, c), v in zip(
                [(r, c) for r in range(acc.shape[0]) for c in range(acc.shape[1])], acc.flatten().tolist()
            ):
                ax.text(c, r, f"{v:.2f}", ha="center", va="center", fontsize=7)
            ax.set_title(name, fontsize=8)
            ax.set_xlabel("length (tokens)", fontsize=7)
        axes[0][0].set_ylabel("depth of the key", fontsize=7)
        fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8, label="passkey accuracy")
        fig.savefig(out / "passkey_heatmap.png", dpi=120, bbox_inches="tight")
        plt.close(fig)
        files.append("passkey_heatmap.png")
    tasks = s["ruler_tasks"] if s["ruler_lengths"] else []
    if tasks:
        fig, axes = plt.subplots(1, len(tasks), figsize=(3.0 * len(tasks), 3.0), squeeze=False)
        width = 0.8 / max(1, len(models))
        for ax, task in zip(axes[0], tasks):
            for j, (name, m) in enumerate(models.items()):
                vals = [m["ruler"]["scores"][task][str(n)] for n in s["ruler_lengths"]]
                ax.bar([i + j * width for i in range(len(vals))], vals, width, label=name)
            ax.set_xticks(
                [i + width * (len(models) - 1) / 2 for i in range(len(s["ruler_lengths"]))],
                [str(n) for n in s["ruler_lengths"]],
            )
            ax.set_ylim(0, 105)
            ax.set_title(f"RULER {task}", fontsize=8)
            ax.set_xlabel("length (tokens)", fontsize=7)
        axes[0][0].set_ylabel("score (%)")
        axes[0][-1].legend(fontsize=6)
        fig.tight_layout()
        fig.savefig(out / "ruler.png", dpi=120)
        plt.close(fig)
        files.append("ruler.png")
    for a in results.get("attention", {}).values():
        files += list(a["files"].values())
    return files


def render(out: Path, benchmarks: str | Path) -> int:
    """Plots and report.md from `out/results.json` (the speed table re-read from `benchmarks`)."""
    results = json.loads((out / "results.json").read_text())
    results["speed_lines"], results["benchmarks"] = speed_tables(benchmarks)
    results["plots"] = plot_results(results, out)
    lines = report_lines(results)
    if results["skipped"]:
        lines += [
            "Skipped: " + "; ".join(f"{s['model']} at {s['ratio']} ({s['why']})" for s in results["skipped"]),
            "",
        ]
    (out / "report.md").write_text("\n".join(lines))
    (out / "results.json").write_text(json.dumps(results, indent=2, default=str))
    print("\n".join(lines[: lines.index("## Speed and memory")]))
    print(f"written: {out / 'results.json'}, {out / 'report.md'}, plots {results['plots']}")
    return 0
