"""`dsla ablate`'s grid (window x variant), its recipe overrides, its evaluation and report, and the recency-bias
metric (`evaluation.loss_by_distance`). Tiny random Llamas with the byte-level tokenizer of test_eval; the whole
command on a tiny stand-in teacher (a few seconds). Nothing here trains the real model."""

from __future__ import annotations

import argparse
import dataclasses
import json
import math

import pytest
import torch
import torch.nn.functional as F

from dsla_hf import cli, convert_llama_to_dsla
from dsla_hf.commands import ablate
from dsla_hf.demo import DEMO_RECIPE
from dsla_hf.evaluation import ablation
from dsla_hf.evaluation.ablation import (
    Cell,
    EvalData,
    EvalSettings,
    cached,
    cell_recipe,
    check_grid_overrides,
    check_same_budget,
    evaluate_cell,
    grid,
    parse_overrides,
    report_lines,
    write_report,
)
from dsla_hf.evaluation.metrics import distance_buckets, distance_gap, loss_by_distance, perplexity

from .conftest import tiny_llama_config
from .test_eval import VOCAB, byte_tokenizer, tiny_dsla


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tok():
    return byte_tokenizer()


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    ablate.add_arguments(parser)
    return parser.parse_args(argv)


# --- the grid and its recipes ----------------------------------------------------------------------------------------


def test_default_grid_is_both_windows_times_the_three_variants():
    args = parse([])
    names = [c.name for c in grid(args.windows, args.variants)]
    assert names == ["w0-dsla", "w0-gla", "w0-gla-fast", "w64-dsla", "w64-gla", "w64-gla-fast"]
    args = parse(["--windows", "64", "0", "64", "--variants", "gla-fast", "dsla"])
    names = [c.name for c in grid(args.windows, args.variants)]
    assert names == ["w64-gla-fast", "w64-dsla", "w0-gla-fast", "w0-dsla"]
    with pytest.raises(SystemExit, match="non-negative"):
        grid([-1], ["dsla"])
    with pytest.raises(SystemExit, match="unknown variant"):
        grid([0], ["mamba"])


def test_cell_recipes_change_only_their_variant_and_window():
    varied = {"window", "num_states", "history_half_life"}
    demo = {k: v for k, v in dataclasses.asdict(DEMO_RECIPE).items() if k not in varied}
    cells = grid([0, 64], ["dsla", "gla", "gla-fast"])
    recipes = {c.name: cell_recipe(c) for c in cells}
    for recipe in recipes.values():
        assert {k: v for k, v in dataclasses.asdict(recipe).items() if k not in varied} == demo
    assert recipes["w0-dsla"].dsla_options() == {"dsla_num_states": 2, "dsla_window": 0}
    assert recipes["w0-gla"].dsla_options() == {"dsla_num_states": 1, "dsla_window": 0}
    assert recipes["w64-gla-fast"].dsla_options() == {
        "dsla_num_states": 1,
        "dsla_history_half_life": 32.0,
        "dsla_window": 64,
    }
    check_same_budget(list(recipes.values()))
    with pytest.raises(RuntimeError, match="differ"):
        check_same_budget([recipes["w0-dsla"], recipes["w0-gla"].replace(layer_alone_steps=1)])
    # overrides reach every cell; the variant's own changes win
    overrides = {"layer_alone_steps": 7, "history_half_life": 1000.0}
    assert cell_recipe(Cell(0, "gla"), overrides).layer_alone_steps == 7
    assert cell_recipe(Cell(0, "gla"), overrides).history_half_life == 1000.0
    assert cell_recipe(Cell(0, "gla-fast"), overrides).history_half_life == 32.0


def test_window_64_is_the_preset_window_and_0_turns_it_off():
    from transformers import LlamaForCausalLM

    teacher = LlamaForCausalLM(tiny_llama_config()).eval()
    windows = {}
    for recipe in (DEMO_RECIPE, cell_recipe(Cell(64, "dsla")), cell_recipe(Cell(0, "gla-fast"))):
        model = convert_llama_to_dsla(teacher, active=[], **recipe.dsla_options())
        windows[recipe.window] = (model.config.dsla_window, model.config.dsla_num_states)
    assert windows == {None: (64, 2), 64: (64, 2), 0: (0, 1)}


def test_parse_overrides_takes_each_fields_annotated_type():
    got = parse_overrides(
        ["window=0", "history_half_life=32", "num_states=1", "layer_alone_lr=0.003", "ranking_first=low"]
    )
    assert got == {"window": 0, "history_half_life": 32.0, "num_states": 1, "layer_alone_lr": 0.003,
                   "ranking_first": "low"}  # fmt: skip
    assert type(got["window"]) is int and type(got["history_half_life"]) is float and type(got["num_states"]) is int
    assert parse_overrides(["window=none", "history_half_life=None"]) == {"window": None, "history_half_life": None}
    assert parse_overrides(["window=64"]) == {"window": 64}


@pytest.mark.parametrize(
    "item, message",
    [
        ("window=1.5", "--set window: expected int or none, got '1.5'"),
        ("window=wide", "--set window: expected int or none"),
        ("num_states=none", "--set num_states: expected int, got 'none'"),
        ("seed=", "--set seed: expected int"),
        ("layer_alone_lr=fast", "--set layer_alone_lr: expected float"),
        ("no_such_field=1", "FIELD=VALUE"),
        ("window", "FIELD=VALUE"),
    ],
)
def test_parse_overrides_rejects_bad_values_clearly(item, message):
    with pytest.raises(SystemExit) as err:
        parse_overrides([item])
    assert message in str(err.value)


def test_the_grid_fields_cannot_be_set():
    check_grid_overrides({"layer_alone_steps": 3})
    for field in ("window", "num_states"):
        with pytest.raises(SystemExit, match="--windows and --variants"):
            check_grid_overrides(parse_overrides([f"{field}=1"]))


def test_eval_settings_from_flags_and_their_checks():
    args = parse(["--ratios", "0.5", "--long-context", "512", "--long-tokens", "1024", "--passkey-lengths", "256"])
    s = ablate.settings_from_args(args)
    assert (s.ratios, s.long_context, s.long_tokens, s.passkey_lengths) == ((0.5,), 512, 1024, (256,))
    assert s.buckets() == [(1, 16), (17, 64), (65, 256), (257, 511)]
    defaults = ablate.settings_from_args(parse([]))
    assert defaults == EvalSettings()
    assert defaults.passkey_lengths == (1024, 4096) and len(defaults.passkey_depths) * defaults.passkey_trials >= 4
    assert defaults.buckets() == [(1, 16), (17, 64), (65, 256), (257, 1024), (1025, 2047)]
    with pytest.raises(SystemExit, match="long-tokens"):
        EvalSettings(long_context=2048, long_tokens=1024)
    with pytest.raises(SystemExit, match="ratios"):
        EvalSettings(ratios=(0.0, 0.5))


# --- loss by distance ------------------------------------------------------------------------------------------------


def test_distance_buckets_boundaries():
    assert distance_buckets(2048) == [(1, 16), (17, 64), (65, 256), (257, 1024), (1025, 2047)]
    assert distance_buckets(100) == [(1, 16), (17, 64), (65, 99)]
    assert distance_buckets(65) == [(1, 16), (17, 64)]  # an edge at context - 1 ends the last bucket
    assert distance_buckets(10, (2, 5)) == [(1, 2), (3, 5), (6, 9)]
    with pytest.raises(ValueError, match="increasing"):
        distance_buckets(100, (16, 16))
    with pytest.raises(ValueError, match="at least 2"):
        distance_buckets(1)


@pytest.mark.parametrize("kind", ["llama", "dsla"])
def test_loss_by_distance_matches_direct_computation(kind):
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    if kind == "llama":
        model = LlamaForCausalLM(tiny_llama_config(vocab_size=VOCAB)).eval()
    else:
        model = tiny_dsla()
        model.set_dsla_layers([0, 2])
    context, buckets = 24, [(1, 1), (2, 7), (8, 23)]
    ids = torch.randint(3, VOCAB, (3 * context + 5,), generator=torch.Generator().manual_seed(1))  # tail dropped
    got = loss_by_distance(model, ids, context, buckets, batch_size=2)
    per_distance = {d: [] for d in range(context)}
    with torch.no_grad():
        for w in range(3):
            window = ids[w * context : (w + 1) * context]
            logp = F.log_softmax(model(window[None], use_cache=False).logits[0].float(), -1)
            for d in range(1, context):  # the token at index d, predicted from the d tokens before it
                per_distance[d].append(-logp[d - 1, window[d]].item())
    assert got["windows"] == 3 and got["tokens"] == 3 * (context - 1) and got["context"] == context
    assert list(got["buckets"]) == ["1-1", "2-7", "8-23"]
    for (lo, hi), (label, b) in zip(buckets, got["buckets"].items()):
        values = [v for d in range(lo, hi + 1) for v in per_distance[d]]
        assert (b["lo"], b["hi"], b["tokens"]) == (lo, hi, len(values)) == (lo, hi, 3 * (hi - lo + 1))
        assert math.isclose(b["loss"], sum(values) / len(values), rel_tol=1e-5), label
    everything = [v for d in range(1, context) for v in per_distance[d]]
    assert math.isclose(got["loss"], sum(everything) / len(everything), rel_tol=1e-5)
    # the overall loss is the perplexity of the windows as rows
    rows = ids[: 3 * context].view(3, context)
    assert math.isclose(got["loss"], perplexity(model, rows)["loss"], rel_tol=1e-5)
    with pytest.raises(ValueError, match="outside"):
        loss_by_distance(model, ids, context, [(0, 3)])
    with pytest.raises(ValueError, match="fewer than one window"):
        loss_by_distance(model, ids[:10], context)


def _mistral_twin(llama, sliding_window: int):
    """The same weights in a Mistral, which attends to the last `sliding_window` tokens only: a Llama that cannot see
    further back."""
    from transformers import MistralConfig, MistralForCausalLM

    c = llama.config
    config = MistralConfig(
        vocab_size=c.vocab_size,
        hidden_size=c.hidden_size,
        intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_hidden_layers,
        num_attention_heads=c.num_attention_heads,
        num_key_value_heads=c.num_key_value_heads,
        head_dim=c.hidden_size // c.num_attention_heads,
        max_position_embeddings=c.max_position_embeddings,
        rms_norm_eps=c.rms_norm_eps,
        sliding_window=sliding_window,
    )
    twin = MistralForCausalLM(config).eval()
    twin.load_state_dict(llama.state_dict())
    return twin


def test_a_model_that_cannot_see_far_differs_only_in_the_far_buckets():
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    llama = LlamaForCausalLM(tiny_llama_config(vocab_size=VOCAB)).eval()
    short = _mistral_twin(llama, sliding_window=8)  # sees 8 tokens: itself and the 7 before
    ids = torch.randint(3, VOCAB, (4 * 48,), generator=torch.Generator().manual_seed(2))
    buckets = [(1, 8), (9, 16), (17, 47)]
    full, cut = loss_by_distance(llama, ids, 48, buckets), loss_by_distance(short, ids, 48, buckets)
    # a prediction from at most 8 tokens of context has the whole context in the window: the same loss
    assert math.isclose(cut["buckets"]["1-8"]["loss"], full["buckets"]["1-8"]["loss"], rel_tol=1e-6, abs_tol=1e-6)
    for far in ("9-16", "17-47"):
        assert abs(cut["buckets"][far]["loss"] - full["buckets"][far]["loss"]) > 1e-3
    gap = distance_gap(cut, full, far_from=8)
    assert abs(gap["near"]) < 1e-6 and abs(gap["far"]) > 1e-3
    # a window as long as the context changes nothing
    same = loss_by_distance(_mistral_twin(llama, sliding_window=48), ids, 48, buckets)
    for label, b in same["buckets"].items():
        assert math.isclose(b["loss"], full["buckets"][label]["loss"], rel_tol=1e-6), label


class CacheLM(torch.nn.Module):
    """A unigram cache language model: the next token is predicted from the counts of the tokens among the last
    `reach` tokens (all of them when None). On text where each document draws from a few tokens of its own, more
    context helps it, as context helps a real teacher; a short `reach` is a recency-biased model."""

    def __init__(self, vocab: int, reach: int | None = None):
        super().__init__()
        self.vocab, self.reach = vocab, reach
        self.dummy = torch.nn.Parameter(torch.zeros(()))  # the metric reads the device from the parameters

    def forward(self, input_ids, use_cache=False):
        counts = F.one_hot(input_ids, self.vocab).double().cumsum(1)  # tokens 0..t, per position t
        if self.reach is not None:
            counts[:, self.reach :] -= counts[:, : -self.reach].clone()
        return argparse.Namespace(logits=torch.log(counts + 0.05).float())


def test_recency_bias_flattens_the_curve_past_the_models_reach():
    vocab, context, reach = 40, 128, 8
    g = torch.Generator().manual_seed(3)
    # one document per window, each written with 4 tokens of the vocabulary
    docs = [torch.randperm(vocab, generator=g)[:4][torch.randint(0, 4, (context,), generator=g)] for _ in range(32)]
    ids = torch.cat(docs)
    buckets = [(1, 8), (9, 32), (33, 127)]
    teacher = loss_by_distance(CacheLM(vocab), ids, context, buckets)
    biased = loss_by_distance(CacheLM(vocab, reach), ids, context, buckets)
    curve = [b["loss"] for b in teacher["buckets"].values()]
    assert curve[0] > curve[1] + 0.1 > curve[2] + 0.2  # more context, lower loss
    flat = [b["loss"] for b in biased["buckets"].values()]
    assert abs(flat[1] - flat[2]) < (curve[1] - curve[2]) / 2  # nothing gained past its reach
    gap = distance_gap(biased, teacher, far_from=8)
    assert gap["near"] == 0.0  # within its reach it is the teacher
    assert gap["per_bucket"]["33-127"] > gap["per_bucket"]["9-32"] > 0.1
    assert gap["far"] > 0.2
    with pytest.raises(ValueError, match="different"):
        distance_gap(biased, loss_by_distance(CacheLM(vocab), ids, context, [(1, 127)]))


def test_distance_gap_weighs_buckets_by_tokens_and_splits_at_far_from():
    def curve(losses):
        spans = [(1, 16), (17, 256), (257, 2047)]
        buckets = {f"{lo}-{hi}": {"lo": lo, "hi": hi, "loss": v, "tokens": 2 * (hi - lo + 1)} for (lo, hi), v in
                   zip(spans, losses)}  # fmt: skip
        return {"context": 2048, "buckets": buckets}

    student, teacher = curve([5.0, 4.0, 3.5]), curve([4.0, 3.0, 3.0])
    gap = distance_gap(student, teacher)
    assert gap["per_bucket"] == {"1-16": 1.0, "17-256": 1.0, "257-2047": 0.5}
    assert (gap["near"], gap["far"]) == (1.0, 0.5)
    student = curve([5.0, 3.0, 3.5])  # 32 tokens 1 worse, 480 equal
    assert distance_gap(student, teacher)["near"] == pytest.approx(32 / 512)
    # a bucket that starts at or before far_from is near, even when it ends past it
    assert distance_gap(student, teacher, far_from=100)["near"] == pytest.approx(32 / 512)
    assert distance_gap(student, teacher, far_from=16)["near"] == 1.0
    assert distance_gap(student, teacher, far_from=16)["far"] == pytest.approx(0.5 * 3582 / (480 + 3582))
    assert distance_gap(student, teacher, far_from=4096)["far"] is None


# --- evaluating a cell, caching, the report --------------------------------------------------------------------------


def test_evaluate_cell_runs_each_trained_ratio_on_the_shared_data(tok):
    model = tiny_dsla()  # conversion order [2, 0, 3, 1]
    g = torch.Generator().manual_seed(4)
    data = EvalData(torch.randint(3, VOCAB, (2, 40), generator=g), torch.randint(3, VOCAB, (96,), generator=g), "x")
    settings = EvalSettings(
        ratios=(0.25, 0.5, 1.0),
        long_context=48,
        long_tokens=96,
        passkey_lengths=(160, 200),
        passkey_depths=(0.0, 0.5, 1.0),
        distance_edges=(4, 16),
        far_from=16,
    )
    out = evaluate_cell(model, tok, data, settings, trained=2, name="cell", progress=False)
    assert list(out["models"]) == ["25%", "50%"]
    assert out["skipped"] == [{"ratio": 1.0, "why": "needs 4 DSLA layers, 2 trained"}]
    quarter = out["models"]["25%"]
    assert quarter["dsla_layers"] == [2] and out["models"]["50%"]["dsla_layers"] == [0, 2]
    assert quarter["passkey"]["lengths"] == [160, 200] and len(quarter["passkey"]["accuracy"]) == 3
    assert list(quarter["distance"]["buckets"]) == ["1-4", "5-16", "17-47"]
    assert quarter["ppl_long"]["context"] == 48 and quarter["ppl"]["context"] == 40
    # each ratio's numbers are that ratio's model, not the last one set
    for label, layers in (("25%", [2]), ("50%", [0, 2])):
        model.set_dsla_layers(layers)
        assert math.isclose(out["models"][label]["ppl"]["loss"], perplexity(model, data.rows)["loss"], rel_tol=1e-6)
        got = loss_by_distance(model, data.stream, 48, settings.buckets())
        assert math.isclose(out["models"][label]["distance"]["loss"], got["loss"], rel_tol=1e-6)
    assert out["models"]["25%"]["ppl"]["loss"] != out["models"]["50%"]["ppl"]["loss"]


def test_cached_reuses_only_the_same_key(tmp_path):
    file, calls = tmp_path / "eval.json", []

    def compute():
        calls.append(1)
        return {"value": len(calls)}

    assert cached(file, {"a": (1, 2)}, compute) == {"value": 1}
    assert cached(file, {"a": (1, 2)}, compute) == {"value": 1}  # tuples compare as the lists they read back as
    assert cached(file, {"a": (1, 3)}, compute) == {"value": 2}
    assert cached(file, {"a": (1, 3)}, compute, resume=False) == {"value": 3}
    assert len(calls) == 3


def _entry(ppl: float, long: float, passkey: list[list[float]], losses: list[float], layers: list[int]) -> dict:
    labels = [(1, 16), (17, 256), (257, 2047)]
    tokens = [16, 240, 1791]
    return {
        "dsla_layers": layers,
        "ppl": {"ppl": ppl, "context": 512},
        "ppl_long": {"ppl": long, "context": 2048},
        "passkey": {"lengths": [1024, 4096], "depths": [0.0, 1.0], "accuracy": passkey},
        "distance": {
            "context": 2048,
            "buckets": {
                f"{lo}-{hi}": {"lo": lo, "hi": hi, "loss": loss, "tokens": n}
                for (lo, hi), loss, n in zip(labels, losses, tokens)
            },
        },
    }


def synthetic_summary() -> dict:
    cell = {
        "variant": "gla-fast",
        "window": 0,
        "num_states": 1,
        "recipe": {"history_half_life": 32.0},
        "stages": 15,
        "train": {"wall_s": 600.0, "stage_s": 540.0, "runs": 1},
        "chain_ppl": 20.5,
        "models": {"25%": _entry(19.0, 17.0, [[1.0, 0.0], [1.0, 1.0]], [4.0, 3.5, 3.5], [3, 7])},
        "skipped": [{"ratio": 0.5, "why": "needs 15 DSLA layers, 7 trained"}],
    }
    return {
        "command": "dsla ablate --windows 0",
        "overrides": {},
        "windows": [0],
        "variants": ["gla-fast"],
        "order": [3, 7],
        "settings": EvalSettings(passkey_depths=(0.0, 1.0)).as_json(),
        "heldout": {"source": "postgresql-docs", "rows": [4, 512], "stream_tokens": 4096},
        "teacher": _entry(18.0, 15.0, [[1.0, 1.0], [1.0, 1.0]], [4.0, 3.4, 3.0], []),
        "cells": {"w0-gla-fast": cell},
    }


def table(lines: list[str], header_start: str) -> list[list[str]]:
    start = next(i for i, line in enumerate(lines) if line.startswith(header_start))
    rows = []
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in line.strip("|").split("|")])
    return [rows[0], *rows[2:]]


def test_report_tables_from_a_synthetic_summary(tmp_path):
    summary = synthetic_summary()
    lines = report_lines(summary)
    head, teacher, cell = table(lines, "| model | window")
    assert head == ["model", "window", "states", "DSLA layers", "ppl@512 (rows)", "ppl@2048 (stream)",
                    "passkey@1024", "passkey@4096", "Δloss ≤256", "Δloss >256"]  # fmt: skip
    assert teacher == ["teacher", "-", "-", "0", "18.00", "15.00", "1.00", "1.00", "-", "-"]
    # near: (0 * 16 + 0.1 * 240) / 256; far: the one far bucket, 3.5 - 3.0; passkey: mean over depths per length
    assert cell == ["w0-gla-fast 25%", "0", "1", "2", "19.00", "17.00", "1.00", "0.50", "+0.094", "+0.500"]
    _, t, c = table(lines, "| model | depth")
    assert t == ["teacher", "1.00 / 1.00", "1.00 / 1.00"] and c == ["w0-gla-fast 25%", "1.00 / 0.00", "1.00 / 1.00"]
    head, t, c = table(lines, "| model | 1-16")
    assert head == ["model", "1-16", "17-256", "257-2047"]
    assert t == ["teacher", "4.000", "3.400", "3.000"]
    assert c == ["w0-gla-fast 25%", "4.000 (+0.000)", "3.500 (+0.100)", "3.500 (+0.500)"]
    _, c = table(lines, "| cell |")
    assert c == ["w0-gla-fast", "0", "1", "32", "15", "10.0", "9.0", "20.50"]
    assert "Skipped: w0-gla-fast at 0.5 (needs 15 DSLA layers, 7 trained)" in lines
    write_report(tmp_path, summary)
    assert json.loads((tmp_path / "ablation.json").read_text()) == summary
    assert (tmp_path / "ablation.md").read_text() == "\n".join(lines)
    # training only (--no-eval): the training table alone
    summary = {**synthetic_summary(), "settings": None, "teacher": None}
    del summary["heldout"]
    summary["cells"]["w0-gla-fast"].pop("models")
    lines = report_lines(summary)
    assert not any(line.startswith("| model") for line in lines) and table(lines, "| cell |")[1][0] == "w0-gla-fast"


# --- the command on a tiny stand-in teacher --------------------------------------------------------------------------


def test_ablate_trains_and_evaluates_the_grid_and_resumes(tok, tmp_path, monkeypatch):
    from transformers import LlamaForCausalLM

    import dsla_hf.demo
    import dsla_hf.ranking
    import dsla_hf.teacher

    def tiny_teacher():
        torch.manual_seed(0)
        return LlamaForCausalLM(tiny_llama_config(vocab_size=VOCAB, max_position_embeddings=4096)).eval(), tok

    monkeypatch.setattr(dsla_hf.teacher, "load_teacher", tiny_teacher)
    built = []
    demo_datasets = dsla_hf.demo.demo_datasets
    monkeypatch.setattr(dsla_hf.demo, "demo_datasets", lambda *a: built.append(1) or demo_datasets(*a))
    out = tmp_path / "ablation"
    argv = ["ablate", "--output", str(out), "--windows", "0", "4", "--variants", "dsla", "gla-fast", "--set"]
    argv += ["seq_len=64", "train_sequences=8", "eval_sequences=2", "capture_sequences=4", "layer_alone_steps=2"]
    argv += ["layer_alone_batch=2", "chain_eval_sequences=1", "--long-context", "64", "--long-tokens", "160"]
    argv += ["--passkey-lengths", "128", "--passkey-depths", "0", "1", "--distance-edges", "4", "16"]
    argv += ["--far-from", "16", "--no-progress"]
    assert cli.main(argv) == 0
    summary = json.loads((out / "ablation.json").read_text())
    names = ["w0-dsla", "w0-gla-fast", "w4-dsla", "w4-gla-fast"]
    assert list(summary["cells"]) == names
    assert len(built) == 1  # one data set, built once, for every chain
    ranking = json.loads((out / "ranking_entropy.json").read_text())
    assert summary["order"] == ranking["order"]
    for name in names:
        cell = summary["cells"][name]
        config = json.loads((out / name / "checkpoint" / "config.json").read_text())
        assert (config["dsla_window"], config["dsla_num_states"]) == (cell["window"], cell["num_states"])
        assert config["conversion_order"] == summary["order"]  # one ranking for every chain
        assert cell["stages"] == 2 and list(cell["models"]) == ["25%", "50%"]
        assert cell["train"]["wall_s"] >= cell["train"]["stage_s"] > 0
    assert json.loads((out / "w0-gla-fast" / "checkpoint" / "config.json").read_text())["dsla_history_half_life"] == 32
    # the same held-out data for every model
    teacher = summary["teacher"]
    assert summary["heldout"]["rows"] == [2, 64] and summary["heldout"]["stream_tokens"] == 160
    for cell in summary["cells"].values():
        for m in cell["models"].values():
            assert m["ppl"]["tokens"] == teacher["ppl"]["tokens"]
            assert m["distance"]["tokens"] == teacher["distance"]["tokens"] == 2 * 63
    md = (out / "ablation.md").read_text()
    assert all(f"| {name} 50% |" in md for name in names)
    # a rerun trains nothing, ranks nothing and evaluates nothing: everything is reused
    before = {n: json.loads((out / n / "chain.json").read_text()) for n in names}

    def refuse(*args, **kwargs):
        raise AssertionError("recomputed")

    monkeypatch.setattr(dsla_hf.ranking, "rank_layers", refuse)
    monkeypatch.setattr(ablation, "evaluate_model", refuse)
    assert cli.main(argv) == 0
    again = json.loads((out / "ablation.json").read_text())
    assert {n: json.loads((out / n / "chain.json").read_text()) for n in names} == before
    assert again["cells"] == summary["cells"] and again["teacher"] == teacher
