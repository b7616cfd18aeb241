"""`dsla ablate`: the single-state ablation of docs/design.md §5 ("the dual-state layer beats a single-state GLA
layer trained the same way"), in the paper's setting (no exact window) and in the preset's (a 64-token exact softmax
window).

One command trains and evaluates the grid window x variant on the embedded SmolLM2 teacher:

- windows (`--windows`, default `0 64`): 0 is the paper's setting (the states alone hold the past), 64 the default
  preset's exact softmax window over the last 64 tokens;
- variants (`--variants`, default all three): `dsla` (history + recency states), `gla` (one gated linear-attention
  state, its gate initialised as the history state's: half-life 4096 tokens) and `gla-fast` (one state initialised
  to forget as fast as the recency state, half-life 32 tokens: the fast-forgetting GLA of the paper's comparison).

Every cell is the demo's recipe (`dsla_hf.demo.DEMO_RECIPE`, run by `dsla_hf.demo.train_chain`) with only its
variant's changes and its window: same data, same budget, one seed, and the conversion order of one ranking of the
teacher (computed by the first chain, saved as `ranking_<method>.json` and reused). Each cell trains into its own
folder (`<output>/w0-dsla`, `<output>/w64-gla`, ...) and resumes from its last finished stage.

Then every cell is evaluated at ratios 0.25 and 0.5 (one checkpoint, `set_dsla_layers(ratio)`), and the teacher
once, on the same held-out data: perplexity on the recipe's held-out 512-token rows, perplexity with 2048 tokens of
context (sliding window over a held-out stream), passkey retrieval by length and depth, and recency bias (next-token
loss by distance inside a 2048-token window, `evaluation.loss_by_distance`, reported as the gap to the teacher near
and far). `ablation.json` and `ablation.md` in the output folder hold the results and the chains' training wall time;
each evaluation is cached beside its chain, so a rerun only computes what is new:

    dsla ablate --output outputs/ablation                          # the 6 chains, then their evaluation
    dsla ablate --windows 0 --variants dsla gla --passkey-trials 2 # a sub-grid, two keys per length and depth
    dsla ablate --no-eval                                          # train only

The report covers the cells of the command; rerun with the whole grid to rebuild it (trained chains and finished
evaluations are reused). `--set field=value` overrides a field of the recipe for every cell (e.g.
`--set layer_alone_steps=20`); a variant's own changes win over it, and `window` / `num_states` are the grid's.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import time
import types
import typing
from dataclasses import dataclass
from pathlib import Path

import torch

# name -> changes to the demo recipe
VARIANTS = {
    "dsla": {"num_states": 2},
    # one state, initialised as the history state (half-life 4096 tokens): does the recency state add anything?
    "gla": {"num_states": 1},
    # one state initialised to forget as fast as the recency state (32 tokens): the GLA of the paper's comparison
    "gla-fast": {"num_states": 1, "history_half_life": 32.0},
}
WINDOWS = (0, 64)  # 0: the paper's setting (no exact window); 64: the default preset's window
GRID_FIELDS = ("window", "num_states")  # recipe fields the grid sets (`--windows`, `--variants`), never `--set`
TRAIN_TIME_FILE = "ablation_train.json"  # per cell: training wall time, summed over resumed runs
EVAL_FILE = "ablation_eval.json"  # per cell: its evaluation and the key it was computed for


# --- the grid ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Cell:
    window: int
    variant: str

    @property
    def name(self) -> str:
        return f"w{self.window}-{self.variant}"


def grid(windows: list[int], variants: list[str]) -> list[Cell]:
    """The cells, window-major, each once."""
    for w in windows:
        if isinstance(w, bool) or not isinstance(w, int) or w < 0:
            raise SystemExit(f"--windows takes non-negative integers, got {w!r}")
    for v in variants:
        if v not in VARIANTS:
            raise SystemExit(f"unknown variant {v!r}; choose from {list(VARIANTS)}")
    return [Cell(w, v) for w in dict.fromkeys(windows) for v in dict.fromkeys(variants)]


def ablation_recipe(variant: str, overrides: dict | None = None, window: int | None = None):
    """The demo recipe with `overrides`, then the variant's changes and `window` (None: the recipe's)."""
    from ..demo import DEMO_RECIPE

    changes = {**(overrides or {}), **VARIANTS[variant]}
    if window is not None:
        changes["window"] = window
    return DEMO_RECIPE.replace(**changes)


def cell_recipe(cell: Cell, overrides: dict | None = None):
    return ablation_recipe(cell.variant, overrides, cell.window)


def check_same_budget(recipes: list) -> None:
    """Every cell must differ from the others only in what its variant and window change."""
    varied = {"window", *(k for changes in VARIANTS.values() for k in changes)}
    shared = [{k: v for k, v in dataclasses.asdict(r).items() if k not in varied} for r in recipes]
    if any(s != shared[0] for s in shared):
        raise RuntimeError("the cells' recipes differ beyond their variant and window")


def _parse_value(name: str, hint, value: str):
    """`value` as the type `hint` of the recipe field `name` (optional fields also take 'none')."""
    args = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    optional = type(None) in args
    kinds = [a for a in args if a is not type(None)]
    expected = " or ".join(k.__name__ for k in kinds) + (" or none" if optional else "")
    if value.strip().lower() == "none":
        if optional:
            return None
        raise SystemExit(f"--set {name}: expected {expected}, got {value!r}")
    if len(kinds) != 1 or kinds[0] not in (int, float, str, bool):
        raise SystemExit(f"--set {name}: fields of type {hint} cannot be set from the command line")
    kind = kinds[0]
    try:
        if kind is bool:
            truth = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}
            return truth[value.strip().lower()]
        return kind(value)
    except (KeyError, ValueError):
        raise SystemExit(f"--set {name}: expected {expected}, got {value!r}") from None


def parse_overrides(items: list[str]) -> dict:
    """`FIELD=VALUE` items as recipe changes, each value of its field's annotated type."""
    from ..demo import DemoRecipe

    hints = typing.get_type_hints(DemoRecipe)
    fields = [f.name for f in dataclasses.fields(DemoRecipe)]
    out = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or name not in fields:
            raise SystemExit(f"--set takes FIELD=VALUE with FIELD one of {sorted(fields)}, got {item!r}")
        out[name] = _parse_value(name, hints[name], value)
    return out


def check_grid_overrides(overrides: dict) -> None:
    taken = [k for k in GRID_FIELDS if k in overrides]
    if taken:
        raise SystemExit(f"--set {', '.join(taken)}: the grid sets these; use --windows and --variants")


# --- evaluation -------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EvalSettings:
    ratios: tuple[float, ...] = (0.25, 0.5)
    long_context: int = 2048
    long_tokens: int = 4096  # two windows of recency bias, three sliding windows of long perplexity
    passkey_lengths: tuple[int, ...] = (1024, 4096)
    passkey_depths: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)
    passkey_trials: int = 1  # keys per length and depth: with five depths, five keys per length
    distance_edges: tuple[int, ...] = (16, 64, 256, 1024)
    far_from: int = 256

    def __post_init__(self):
        if not all(0 < r <= 1 for r in self.ratios):
            raise SystemExit(f"--ratios must be in (0, 1] (the teacher is evaluated anyway), got {self.ratios}")
        if self.long_context < 2 or self.long_tokens < self.long_context:
            raise SystemExit(f"--long-tokens ({self.long_tokens}) must hold one --long-context ({self.long_context})")
        if self.passkey_trials < 1:
            raise SystemExit(f"--passkey-trials must be at least 1, got {self.passkey_trials}")

    def as_json(self) -> dict:
        return json.loads(json.dumps(dataclasses.asdict(self)))  # tuples as lists, as they read back

    def buckets(self) -> list[tuple[int, int]]:
        from .metrics import distance_buckets

        return distance_buckets(self.long_context, self.distance_edges)


@dataclass
class EvalData:
    """The held-out data every model is evaluated on: the recipe's packed rows and a token stream."""

    rows: torch.Tensor
    stream: torch.Tensor
    source: str
    seed: int = 0

    def describe(self) -> dict:
        # the token sums make a cached evaluation stale when the data changes
        return {
            "source": self.source,
            "rows": list(self.rows.shape),
            "stream_tokens": self.stream.numel(),
            "checksum": [int(self.rows.sum()), int(self.stream.sum())],
            "seed": self.seed,
        }


def eval_data(tokenizer, heldout_ds, settings: EvalSettings, seed: int = 0) -> EvalData:
    """The recipe's held-out rows and the first `long_tokens` tokens of the same held-out corpus (never trained on),
    read as `dsla eval` reads it."""
    from .suite import heldout_stream

    try:
        stream, _, source = heldout_stream(tokenizer, None, settings.long_tokens, seed)
    except SystemExit as err:
        raise SystemExit(f"{err} (here: --long-tokens)") from None
    return EvalData(torch.tensor(heldout_ds["input_ids"]), stream, source, seed)


def evaluate_model(
    model, tokenizer, data: EvalData, settings: EvalSettings, name: str = "model", progress: bool = True
) -> dict:
    """Every measure of the ablation on one model as it runs now (set its DSLA layers first)."""
    from .metrics import loss_by_distance, passkey_grid, perplexity, sliding_window_perplexity

    start = time.perf_counter()
    rows, long = data.rows.shape[1], settings.long_context
    entry = {
        "ppl": {**perplexity(model, data.rows, 2, progress, f"ppl@{rows} {name}"), "context": rows},
        "ppl_long": sliding_window_perplexity(model, data.stream, long, progress=progress, desc=f"ppl@{long} {name}"),
    }
    if settings.passkey_lengths and settings.passkey_depths:
        entry["passkey"] = passkey_grid(
            model,
            tokenizer,
            list(settings.passkey_lengths),
            list(settings.passkey_depths),
            settings.passkey_trials,
            data.seed,
            progress=progress,
            desc=f"passkey {name}",
        )
    entry["distance"] = loss_by_distance(
        model, data.stream, long, settings.buckets(), progress=progress, desc=f"loss by distance {name}"
    )
    entry["seconds"] = time.perf_counter() - start
    return entry


def ratio_label(ratio: float) -> str:
    return f"{round(100 * ratio)}%"


def evaluate_cell(
    model, tokenizer, data: EvalData, settings: EvalSettings, trained: int, name: str = "", progress: bool = True
) -> dict:
    """`evaluate_model` at every ratio the chain's `trained` stages cover (later layers of the conversion order hold
    untrained weights): `{"models": {"25%": entry, ...}, "skipped": [...]}`."""
    from ..models.dsla.configuration_dsla import ratio_to_layers

    n = model.config.num_hidden_layers
    models, skipped = {}, []
    for ratio in settings.ratios:
        needed = ratio_to_layers(ratio, n)
        if needed > trained:
            skipped.append({"ratio": ratio, "why": f"needs {needed} DSLA layers, {trained} trained"})
            continue
        layers = model.set_dsla_layers(ratio)
        model.eval()
        label = ratio_label(ratio)
        models[label] = {"ratio": ratio, "dsla_layers": layers}
        models[label].update(evaluate_model(model, tokenizer, data, settings, f"{name} {label}".strip(), progress))
    return {"models": models, "skipped": skipped}


def cached(file: Path, key: dict, compute, resume: bool = True) -> dict:
    """`compute()`, or what `file` holds when it was computed for the same `key` (and `resume`)."""
    key = json.loads(json.dumps(key, default=str))
    if resume and file.is_file():
        saved = json.loads(file.read_text())
        if saved.get("key") == key:
            return saved["results"]
    results = compute()
    file.write_text(json.dumps({"key": key, "results": results}, indent=2, default=str))
    return results


# --- training ---------------------------------------------------------------------------------------------------


def _stages_done(folder: Path) -> int:
    from ..trainers.chain import CHAIN_FILE, CHECKPOINT

    file = folder / CHECKPOINT / CHAIN_FILE  # what `run_chain` resumes from
    return len(json.loads(file.read_text())["stages"]) if file.is_file() else 0


def train_cell(recipe, folder: Path, teacher, tokenizer, datasets, order, resume: bool, progress: bool):
    """Train (or resume) one cell's chain. Returns `train_chain`'s result and the training time: `wall_s`, the wall
    time of the chain (ranking excluded) summed over the runs that trained stages, kept in `TRAIN_TIME_FILE`."""
    from ..demo import train_chain

    before = _stages_done(folder) if resume else 0
    marks = {}

    def before_chain(student, order):  # ranking (and conversion) done: the chain's own time starts
        marks["start"] = time.perf_counter()

    result = train_chain(
        recipe,
        folder,
        teacher,
        tokenizer,
        datasets,
        order=order,
        resume=resume,
        progress=progress,
        before_chain=before_chain,
    )
    seconds = time.perf_counter() - marks["start"]
    file = folder / TRAIN_TIME_FILE
    timing = json.loads(file.read_text()) if resume and file.is_file() else {"wall_s": 0.0, "runs": 0}
    if len(result["chain"]["stages"]) > before:  # a run that only reloads a finished chain is not training time
        timing = {"wall_s": timing["wall_s"] + seconds, "runs": timing["runs"] + 1}
        file.write_text(json.dumps(timing, indent=2))
    timing["stage_s"] = sum(s["seconds"] for s in result["chain"]["stages"])
    return result, timing


def saved_order(out: Path, recipe) -> list[int] | None:
    """The conversion order of an earlier run's ranking in `out`, when it was made the way the recipe ranks."""
    file = out / f"ranking_{recipe.ranking}.json"
    if not file.is_file():
        return None
    ranking = json.loads(file.read_text())
    return ranking["order"] if ranking.get("first") == recipe.ranking_first else None


# --- report -----------------------------------------------------------------------------------------------------


def _f(value, spec: str = ".2f") -> str:
    return "-" if value is None else format(value, spec)


def report_rows(summary: dict) -> list[tuple[str, dict | None, dict]]:
    """(name, cell or None for the teacher, evaluation entry) for every evaluated model."""
    rows = [("teacher", None, summary["teacher"])] if summary.get("teacher") else []
    for name, cell in summary["cells"].items():
        rows += [(f"{name} {label}", cell, entry) for label, entry in cell.get("models", {}).items()]
    return rows


def report_lines(summary: dict) -> list[str]:
    """The Markdown report of an ablation summary: one row per model (teacher, then each cell at each ratio) with
    perplexities, passkey per length and the loss gaps; then passkey by depth, loss by distance, training."""
    lines = ["# Ablation: DSLA vs single-state GLA, with and without the exact window", ""]
    lines += [
        f"Grid: windows {summary['windows']} x variants {summary['variants']}; recipe `DEMO_RECIPE` with overrides "
        f"{summary['overrides'] or 'none'}; conversion order {summary.get('order')}.",
        "",
    ]
    if summary.get("teacher"):
        lines += quality_table(summary) + passkey_depth_table(summary) + distance_table(summary)
    lines += training_table(summary)
    skipped = [
        f"{name} at {s['ratio']} ({s['why']})" for name, c in summary["cells"].items() for s in c.get("skipped", [])
    ]
    if skipped:
        lines += ["Skipped: " + "; ".join(skipped), ""]
    lines += ["Command:", "", "```", summary.get("command", "dsla ablate"), "```", ""]
    return lines


def _passkey_lengths(summary: dict) -> list[int]:
    return summary["settings"]["passkey_lengths"] if "passkey" in summary["teacher"] else []


def quality_table(summary: dict) -> list[str]:
    """What was evaluated, then one row per model: perplexities, passkey per length, loss gaps near and far."""
    from .metrics import distance_gap

    s, h, teacher = summary["settings"], summary["heldout"], summary["teacher"]
    far = s["far_from"]
    lines = [
        f"Held-out data: `{h['source']}`, {h['rows'][0]} rows of {h['rows'][1]} tokens (ppl@{h['rows'][1]}) and a "
        f"{h['stream_tokens']}-token stream (ppl@{s['long_context']}: sliding window, stride half the context; "
        f"loss by distance: windows of {s['long_context']} tokens). Passkey: {s['passkey_trials']} key(s) per "
        "length and depth; passkey@n is the mean over depths at n tokens. Δloss: next-token loss minus the "
        f"teacher's on the same tokens, at distances up to {far} (near) and past {far} (far) from the start of "
        "the window: a recency-biased model's far gap exceeds its near gap.",
        "",
    ]
    lengths = _passkey_lengths(summary)
    head = ["model", "window", "states", "DSLA layers", f"ppl@{h['rows'][1]} (rows)"]
    head += [f"ppl@{s['long_context']} (stream)", *[f"passkey@{n}" for n in lengths]]
    head += [f"Δloss ≤{far}", f"Δloss >{far}"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, cell, m in report_rows(summary):
        gap = distance_gap(m["distance"], teacher["distance"], far)
        if cell is None:
            row = [name, "-", "-", "0"]
        else:
            row = [name, str(cell["window"]), str(cell["num_states"]), str(len(m["dsla_layers"]))]
        row += [_f(m["ppl"]["ppl"]), _f(m["ppl_long"]["ppl"])]
        if lengths:
            acc = m["passkey"]["accuracy"]  # [depth][length]
            row += [_f(sum(r[j] for r in acc) / len(acc)) for j in range(len(lengths))]
        row += ["-", "-"] if cell is None else [_f(gap["near"], "+.3f"), _f(gap["far"], "+.3f")]
        lines.append("| " + " | ".join(row) + " |")
    return lines + [""]


def passkey_depth_table(summary: dict) -> list[str]:
    """Passkey accuracy per depth of the key (each cell: one value per length)."""
    lengths = _passkey_lengths(summary)
    if not lengths:
        return []
    depths = summary["settings"]["passkey_depths"]
    at = " / ".join(map(str, lengths))
    lines = [f"Passkey accuracy by depth of the key (0: start of the prompt), at {at} tokens:", ""]
    lines += ["| model | " + " | ".join(f"depth {d:g}" for d in depths) + " |", "|---|" + "---|" * len(depths)]
    for name, _, m in report_rows(summary):
        acc = m["passkey"]["accuracy"]
        lines.append(f"| {name} | " + " | ".join(" / ".join(_f(v) for v in r) for r in acc) + " |")
    return lines + [""]


def distance_table(summary: dict) -> list[str]:
    """Next-token loss per distance bucket, with each model's gap to the teacher."""
    from .metrics import distance_gap

    s, teacher = summary["settings"], summary["teacher"]
    buckets = list(teacher["distance"]["buckets"])
    lines = [
        f"Next-token loss by distance from the start of a {s['long_context']}-token window (teacher: loss; "
        "others: loss and gap to the teacher):",
        "",
        "| model | " + " | ".join(buckets) + " |",
        "|---|" + "---|" * len(buckets),
    ]
    for name, cell, m in report_rows(summary):
        gap = distance_gap(m["distance"], teacher["distance"], s["far_from"])["per_bucket"]
        cells = [
            _f(m["distance"]["buckets"][b]["loss"], ".3f") + ("" if cell is None else f" ({gap[b]:+.3f})")
            for b in buckets
        ]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines + [""]


def training_table(summary: dict) -> list[str]:
    """Per cell: its recipe's state layout, stages and training wall time."""
    lines = [
        "Training (same data and budget per chain; wall time of the chain, ranking excluded, summed over resumed "
        "runs):",
        "",
        "| cell | window | states | initial half-life | stages | wall (min) | stages (min) | chain ppl |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, cell in summary["cells"].items():
        life = cell["recipe"]["history_half_life"]
        lines.append(
            f"| {name} | {cell['window']} | {cell['num_states']} | {'preset' if life is None else f'{life:g}'} | "
            f"{cell['stages']} | {cell['train']['wall_s'] / 60:.1f} | {cell['train']['stage_s'] / 60:.1f} | "
            f"{_f(cell['chain_ppl'])} |"
        )
    return lines + [""]


def write_report(out: Path, summary: dict) -> None:
    """`ablation.json` (everything) and `ablation.md` (the tables) in `out`."""
    (out / "ablation.json").write_text(json.dumps(summary, indent=2, default=str))
    (out / "ablation.md").write_text("\n".join(report_lines(summary)))


# --- the grid ---------------------------------------------------------------------------------------------------


def run_ablation(
    out: Path,
    cells: list[Cell],
    overrides: dict,
    settings: EvalSettings | None,
    resume: bool = True,
    progress: bool = True,
    command: str = "dsla ablate (called from Python)",
) -> dict:
    """Train every cell's chain (resuming finished stages), evaluate it and the teacher when `settings` are given,
    and write `ablation.json` / `ablation.md` in `out` after every cell. Returns the summary."""
    from ..demo import demo_datasets
    from ..teacher import load_teacher

    wall = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    recipes = {cell.name: cell_recipe(cell, overrides) for cell in cells}
    check_same_budget(list(recipes.values()))
    base = recipes[cells[0].name]
    teacher, tokenizer = load_teacher()
    teacher.eval()
    teacher.requires_grad_(False)
    datasets = demo_datasets(tokenizer, base)  # one data set for every cell (check_same_budget: same data fields)
    summary: dict = {
        "command": command,
        "overrides": overrides,
        "windows": list(dict.fromkeys(c.window for c in cells)),
        "variants": list(dict.fromkeys(c.variant for c in cells)),
        "order": saved_order(out, base) if resume else None,
        "settings": settings.as_json() if settings else None,
        "cells": {},
    }
    data = None
    if settings:
        data = eval_data(tokenizer, datasets[1], settings, base.seed)
        summary["heldout"] = data.describe()
        # the teacher first: a broken evaluation fails before an hour of training, not after it
        key = {"settings": settings.as_json(), "data": data.describe()}
        evaluate = lambda: evaluate_model(teacher, tokenizer, data, settings, "teacher", progress)
        summary["teacher"] = cached(out / "teacher_eval.json", key, evaluate, resume)
        write_report(out, summary)
    for cell in cells:
        recipe = recipes[cell.name]
        run_cell(cell, recipe, out, summary, teacher, tokenizer, datasets, data, settings, resume, progress)
    summary["wall_s"] = time.perf_counter() - wall
    write_report(out, summary)
    print("\n".join(report_lines(summary)))
    print(f"written: {out / 'ablation.json'}, {out / 'ablation.md'}")
    return summary


def run_cell(
    cell: Cell,
    recipe,
    out: Path,
    summary: dict,
    teacher,
    tokenizer,
    datasets,
    data: EvalData | None,
    settings: EvalSettings | None,
    resume: bool,
    progress: bool,
) -> None:
    """Train (or resume) one cell's chain, evaluate it, and record it in `summary` and the report."""
    from ..ranking import save_ranking
    from ..trainers.chain import CHECKPOINT

    folder = out / cell.name
    result, timing = train_cell(recipe, folder, teacher, tokenizer, datasets, summary["order"], resume, progress)
    if summary["order"] is None:  # ranked by this first chain (of the teacher's layers): every later chain reuses it
        summary["order"] = result["order"]
        if result["ranking"] is not None:
            save_ranking(result["ranking"], out)
    student, chain = result["student"], result["chain"]
    entry = {
        "window": cell.window,
        "variant": cell.variant,
        "num_states": recipe.num_states,
        "recipe": dataclasses.asdict(recipe),
        "checkpoint": str(folder / CHECKPOINT),
        "stages": len(chain["stages"]),
        "train": timing,
        "chain_teacher_ppl": chain["teacher"]["ppl"],
        "chain_ppl": chain["stages"][-1]["eval"]["ppl"] if chain["stages"] else None,
    }
    if settings:
        key = {
            "settings": settings.as_json(),
            "data": data.describe(),
            "order": summary["order"],
            "chain": [[s["layer"], s["seconds"]] for s in chain["stages"]],  # a retrained chain is another
        }
        compute = functools.partial(
            evaluate_cell, student, tokenizer, data, settings, len(chain["stages"]), cell.name, progress
        )
        entry.update(cached(folder / EVAL_FILE, key, compute, resume))
    summary["cells"][cell.name] = entry
    write_report(out, summary)  # after every cell: an interrupted run still leaves its finished cells
    print(f"{cell.name}: {len(chain['stages'])} stages, {timing['wall_s'] / 60:.1f} min of training")
