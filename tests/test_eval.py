"""The evaluation suite: RULER generators and scoring, sliding-window perplexity, passkey grid, effective attention
maps, the `dsla eval` report, lm-evaluation-harness on our model. Tiny random Llamas with a byte-level tokenizer
(one token per byte, so lengths are exact and every string round-trips); the real SmolLM2 in the slow tests."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from dsla_hf import cli, convert_llama_to_dsla
from dsla_hf.evaluation.metrics import passkey_grid, perplexity, sliding_window_perplexity, sliding_windows
from dsla_hf.evaluation.ruler import (
    NOISE,
    TASKS,
    generate_sample,
    postprocess,
    ruler_eval,
    split_sentences,
    string_match_all,
    string_match_part,
)

from .conftest import tiny_llama_config

VOCAB = 260  # 3 specials + 256 bytes (+1 spare)


def byte_tokenizer():
    """A byte-level tokenizer (no merges), built offline: ids 0-2 are specials, 3-258 the bytes."""
    from tokenizers import Tokenizer, decoders, models
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "</s>": 1, "<s>": 2}
    vocab.update({c: 3 + i for i, c in enumerate(sorted(ByteLevel.alphabet()))})
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="</s>", bos_token="<s>")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models gain nothing from a second thread, and on a shared, loaded machine its synchronisation costs
    milliseconds per operation."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tok():
    return byte_tokenizer()


def tiny_dsla(**dsla):
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    teacher = LlamaForCausalLM(tiny_llama_config(vocab_size=VOCAB, max_position_embeddings=4096)).eval()
    options = {"dsla_window": 4, **dsla}
    model = convert_llama_to_dsla(teacher, conversion_order=[2, 0, 3, 1], active=[], **options).eval()
    with torch.no_grad():  # trained-looking DSLA weights: mixing, gates and scales away from their initial values
        for name, p in model.named_parameters():
            if ".linear_attn." in name:
                p.add_(0.2 * torch.randn_like(p))
    return model


ESSAY = " ".join(
    f"Sentence number {i} of the essay talks about topic {i % 7}, and it is long enough to matter." for i in range(400)
)


def count(tok, text):
    return len(tok(text, add_special_tokens=False)["input_ids"])


# --- RULER: prompts --------------------------------------------------------------------------------------------------


def test_byte_tokenizer_round_trips(tok):
    text = "One of the special magic numbers for tiny-otter is: 1234567.\nVAR ABCDE = 12345"
    assert count(tok, text) == len(text.encode())
    assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text


@pytest.mark.parametrize("depth", [0.0, 0.25, 0.5, 0.75, 1.0])
def test_niah_single_needle_sits_at_the_requested_depth(tok, depth):
    s = generate_sample("niah_single", tok, 2048, seed=3, depths=[depth])
    text = s["input"]
    needles = re.findall(r"One of the special magic numbers for ([a-z]+-[a-z]+) is: (\d+)\.", text)
    assert len(needles) == 1
    key, value = needles[0]
    assert len(value) == 7 and s["outputs"] == [value]
    # the noise lines before the needle are round(depth * lines), of all noise lines
    lines = text.split("\n")
    where = next(i for i, line in enumerate(lines) if line.startswith("One of the special magic"))
    before = sum(line == NOISE for line in lines[:where])
    total = sum(line == NOISE for line in lines)
    assert before == round(depth * total)
    # RULER's singular wording, with the answer prefix the model continues
    assert text.startswith("A special magic number is hidden within the following text. Make sure to memorize it.")
    assert text.endswith(
        f"\nWhat is the special magic number for {key} mentioned in the provided text? "
        f"The special magic number for {key} mentioned in the provided text is"
    )


def test_niah_essay_needles_at_their_depths(tok):
    depths = [0.1, 0.4, 0.6, 0.9]
    s = generate_sample("niah_multikey", tok, 4096, seed=1, depths=depths, essay_text=ESSAY)
    text = s["input"]
    context = text[text.index("\n") + 1 : text.rindex("\nWhat is")]
    found = re.findall(r"One of the special magic numbers for ([a-z]+-[a-z]+) is: (\d{7})\.", context)
    assert len(found) == 4 and len({k for k, _ in found}) == 4  # four different keys, one asked
    assert len(s["outputs"]) == 1 and s["outputs"][0] in [v for _, v in found]
    asked = re.search(r"number for ([a-z]+-[a-z]+) mentioned", text).group(1)
    assert dict(found)[asked] == s["outputs"][0]
    positions = sorted(context.index(f"for {k} is") / len(context) for k, _ in found)
    for got, want in zip(positions, depths):
        assert abs(got - want) < 0.03, (positions, depths)


def test_niah_multivalue_prompt_and_answers(tok):
    s = generate_sample("niah_multivalue", tok, 2048, seed=0, essay_text=ESSAY)
    text = s["input"]
    assert text.startswith("Some special magic numbers are hidden within the following text.")
    assert "I will quiz you about the numbers afterwards.\n" in text
    key = re.search(r"What are all the special magic numbers for ([a-z]+-[a-z]+) mentioned", text).group(1)
    assert text.endswith(f"The special magic numbers for {key} mentioned in the provided text are")
    values = re.findall(rf"One of the special magic numbers for {key} is: (\d{{7}})\.", text)
    assert sorted(values) == sorted(s["outputs"]) and len(values) == 4


def test_variable_tracking_chain_example_and_template(tok):
    s = generate_sample("vt", tok, 4096, seed=2)
    text = s["input"]
    marker = "Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n"
    assert text.count(marker) == 2  # RULER's solved example, then the question
    example, question = text[: text.rindex(marker)], text[text.rindex(marker) :]
    # the example ends with its own answer
    ex_value = re.search(r"VAR [A-Z]{3} = (\d{5})\n", example).group(1)
    ex_answer = example.strip().split()[-5:]
    assert example.count(f"assigned the value {ex_value}, they are: ") == 1
    assert all(re.fullmatch(r"[A-Z]{3}", v) for v in ex_answer)
    # the chain: VAR A = value, VAR B = VAR A, ... in order, hidden in the noise
    value = re.search(r"VAR ([A-Z]{5}) = (\d{5})\n", question)
    names = [value.group(1)]
    for _ in range(4):
        names.append(re.search(rf"VAR ([A-Z]{{5}}) = VAR {names[-1]} \n", question).group(1))
    assert s["outputs"] == names
    assert question.endswith(
        f"Question: Find all variables that are assigned the value {value.group(2)} in the text above. Answer: "
        f"According to the chain(s) of variable assignment in the text above, 5 variables are assigned the value "
        f"{value.group(2)}, they are: "
    )
    lines = question.split("\n")
    assert sum(line == NOISE for line in lines) > 20


@pytest.mark.parametrize("task", list(TASKS))
@pytest.mark.parametrize("length", [2048, 6000])  # bytes: about 500 and 1500 tokens of a real tokenizer
def test_length_is_the_target_within_one_haystack_unit(tok, task, length):
    s = generate_sample(task, tok, length, seed=0, essay_text=ESSAY)
    assert count(tok, s["input"]) == s["prompt_tokens"]
    assert s["length"] == s["prompt_tokens"] + s["max_new_tokens"]
    unit = count(tok, NOISE + "\n") if TASKS[task].haystack == "noise" else 120  # a line, or a word and a sentence
    assert length - unit <= s["length"] <= length, (task, s["length"])


def test_samples_are_reproducible_and_vary_with_seed(tok):
    a = generate_sample("niah_single", tok, 1024, seed=5)
    assert a == generate_sample("niah_single", tok, 1024, seed=5)
    assert a["outputs"] != generate_sample("niah_single", tok, 1024, seed=6)["outputs"]


def test_bad_depths_are_refused(tok):
    with pytest.raises(ValueError, match="needs 1 depths"):
        generate_sample("niah_single", tok, 1024, depths=[0.1, 0.2])
    with pytest.raises(ValueError, match="fractions"):
        generate_sample("niah_single", tok, 1024, depths=[1.5])


def test_sentence_splitter():
    assert split_sentences("One two.  Three four!\nFive? six. Seven") == [
        "One two.",
        "Three four!",
        "Five? six.",
        "Seven",
    ]


# --- RULER: scoring --------------------------------------------------------------------------------------------------


def test_scoring_matches_ruler():
    # string_match_all: fraction of references in the prediction, case-insensitive, mean x 100, 2 decimals
    assert string_match_all(["The numbers are 123 and 456."], [["123", "456", "789"]]) == 66.67
    assert string_match_all(["abcde FGHIJ"], [["ABCDE", "fghij"]]) == 100.0
    assert string_match_all(["1234567", "nothing"], [["1234567"], ["7654321"]]) == 50.0
    assert string_match_all([], []) == 0.0
    # string_match_part (QA): any reference counts
    assert string_match_part(["the answer is paris"], [["London", "Paris"]]) == 100.0
    assert string_match_part(["x", "y"], [["a"], ["y"]]) == 50.0
    # RULER's postprocessing: strip, control characters become newlines
    assert postprocess("  12\t34\x0056 \n") == "12\n34\n56"


class PerfectReader(torch.nn.Module):
    """A stand-in model that reads the prompt and answers as RULER expects: the needle values of the asked key, or
    the chain of variables holding the asked value."""

    def __init__(self, tok):
        super().__init__()
        self.tok = tok
        self.anchor = torch.nn.Parameter(torch.zeros(1))

    def answer(self, prompt: str) -> str:
        if "variables are assigned the value" in prompt:
            question = prompt[prompt.rindex("Memorize and track") :]
            value = re.findall(r"assigned the value (\d+),", question)[-1]
            names = [re.search(rf"VAR ([A-Z]+) = {value}\n", question).group(1)]
            while m := re.search(rf"VAR ([A-Z]+) = VAR {names[-1]} ", question):
                names.append(m.group(1))
            return " " + " ".join(names)
        key = re.findall(r"magic numbers? for ([a-z]+-[a-z]+) mentioned", prompt)[-1]
        return " " + ", ".join(re.findall(rf"for {key} is: (\d+)\.", prompt)) + "."

    def generate(self, ids, max_new_tokens, **kwargs):
        prompt = self.tok.decode(ids[0])
        new = self.tok(self.answer(prompt), add_special_tokens=False, return_tensors="pt").input_ids
        return torch.cat([ids, new[:, :max_new_tokens]], 1)


def test_ruler_eval_scores_a_perfect_reader_100_and_a_silent_one_0(tok):
    tasks = list(TASKS)
    res = ruler_eval(PerfectReader(tok), tok, tasks, [1024, 2048], samples=2, essay_text=ESSAY, max_new_tokens=80)
    assert res["scores"] == {t: {"1024": 100.0, "2048": 100.0} for t in tasks}
    assert len(res["samples"]) == len(tasks) * 2 * 2

    class Silent(PerfectReader):
        def answer(self, prompt):
            return " I do not know."

    res = ruler_eval(Silent(tok), tok, tasks, [1024], samples=1, essay_text=ESSAY)
    assert res["scores"] == {t: {"1024": 0.0} for t in tasks}


# --- perplexity ------------------------------------------------------------------------------------------------------


def test_sliding_windows_score_every_token_once():
    for n, context, stride in [(10, 6, 3), (100, 32, None), (100, 32, 31), (7, 16, None), (33, 8, 1)]:
        windows = sliding_windows(n, context, stride)
        scored = [t for _, end, first in windows for t in range(first, end)]
        assert scored == list(range(1, n))
        assert all(end - begin <= context and begin < first for begin, end, first in windows)
    assert sliding_windows(10, 6, 3) == [(0, 6, 1), (3, 9, 6), (6, 10, 9)]
    with pytest.raises(ValueError, match="stride"):
        sliding_windows(100, 32, 32)


@pytest.mark.parametrize("dsla_layers", [[], [0, 2]])
def test_sliding_window_perplexity_matches_direct_computation(dsla_layers):
    model = tiny_dsla()
    model.set_dsla_layers(dsla_layers)
    ids = torch.randint(3, VOCAB, (50,), generator=torch.Generator().manual_seed(1))
    # a context that holds everything: the full-sequence loss
    full = sliding_window_perplexity(model, ids, context=64)
    direct = perplexity(model, ids[None])
    assert full["tokens"] == direct["tokens"] == 49
    assert math.isclose(full["loss"], direct["loss"], rel_tol=1e-5)
    # short windows: every scored token against a forward of exactly its window, one window at a time
    got = sliding_window_perplexity(model, ids, context=16, stride=5, batch_size=3)
    total, tokens = 0.0, 0
    with torch.no_grad():
        for begin, end, first in sliding_windows(50, 16, 5):
            logits = model(ids[None, begin:end], use_cache=False).logits[0]
            logp = F.log_softmax(logits.float(), -1)
            for t in range(first, end):
                total -= logp[t - 1 - begin, ids[t]].item()
                tokens += 1
    assert got["tokens"] == tokens == 49
    assert math.isclose(got["loss"], total / tokens, rel_tol=1e-5)
    assert got["loss"] != pytest.approx(full["loss"], rel=1e-4)  # the windows did cut the context


# --- passkey grid ----------------------------------------------------------------------------------------------------


def test_passkey_grid_shape_and_keys(tok):
    model = tiny_dsla()
    model.set_dsla_layers(0.5)
    lengths, depths = [400, 600], [0.0, 0.5, 1.0]
    res = passkey_grid(model, tok, lengths, depths, trials=2)
    assert len(res["accuracy"]) == 3 and all(len(row) == 2 for row in res["accuracy"])
    assert len(res["samples"]) == 12 and 0.0 <= res["mean"] <= 1.0
    assert [s["depth"] for s in res["samples"][:4]] == [0.0] * 4
    assert all(abs(s["tokens"] - s["length"]) <= count(tok, " " + NOISE) + 2 for s in res["samples"])


# --- effective attention maps ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "dsla", [{}, {"dsla_num_states": 1}, {"dsla_window": 0}, {"dsla_preset": "paper", "dsla_normalizer": "sum"}]
)
def test_effective_attention_reproduces_the_layer_output(dsla):
    from dsla_hf.evaluation.attention_maps import capture_attention_inputs, effective_attention, map_summary

    if dsla.get("dsla_preset") == "paper":
        dsla = {**dsla, "dsla_feature_map": "elu", "dsla_window": 0}
    model = tiny_dsla(**dsla)
    model.set_dsla_layers([0, 1, 2])
    T, layer = 24, 1
    ids = torch.randint(3, VOCAB, (1, T), generator=torch.Generator().manual_seed(2))
    x = capture_attention_inputs(model, ids, [layer])[layer]
    block = model.model.layers[layer]
    attn = block.linear_attn
    seen = {}
    project = attn.output_projection

    def spy(o, proj):  # the input of o_proj and its LoRA (one merged product at inference: no module call to hook)
        seen["o"] = o
        return project(o, proj)

    attn.output_projection = spy
    with torch.no_grad():
        rotary = model.model.rotary_emb
        attn(hidden_states=x, position_embeddings=rotary(x, torch.arange(T)[None]))
    del attn.output_projection
    maps = effective_attention(block, x)
    expected = {"teacher", "state"} if attn.num_states == 1 else {"teacher", "history", "recency"}
    assert set(maps) == expected | ({"window"} if attn.window else set())
    combined = sum(m for name, m in maps.items() if name != "teacher")  # [H, T, T]
    assert combined.shape == (attn.num_heads, T, T)
    assert torch.all(combined.triu(1) == 0)  # causal
    assert torch.allclose(combined.sum(-1), torch.ones(attn.num_heads, T), atol=1e-4)
    v = attn.projections()[2](x).view(1, T, attn.num_kv_heads, attn.head_dim)[0]
    v = v.repeat_interleave(attn.num_heads // attn.num_kv_heads, dim=1)
    rebuilt = torch.einsum("hti,ihd->thd", combined, v).reshape(T, -1)
    assert torch.allclose(rebuilt, seen["o"][0], atol=1e-5)
    if attn.window:  # the states hold only tokens before the window
        for name in expected - {"teacher"}:
            t, i = torch.meshgrid(torch.arange(T), torch.arange(T), indexing="ij")
            assert torch.all(maps[name][:, i > t - attn.window] == 0)
    summary = map_summary(maps, skip=attn.window)
    assert math.isclose(sum(v["mass"] for k, v in summary.items() if k != "teacher"), 1.0, rel_tol=1e-3)


def test_gate_half_lives_at_initialisation_are_the_configured_ones():
    from transformers import LlamaForCausalLM

    from dsla_hf.evaluation.attention_maps import capture_attention_inputs, gate_half_lives

    torch.manual_seed(0)
    model = convert_llama_to_dsla(LlamaForCausalLM(tiny_llama_config()).eval(), active=[1]).eval()
    x = capture_attention_inputs(model, torch.randint(3, 100, (1, 32)), [1])[1]
    lives = gate_half_lives(model.model.layers[1], x)
    assert lives["history"] == pytest.approx(model.config.dsla_history_half_life, rel=0.05)
    assert lives["recency"] == pytest.approx(model.config.dsla_recency_half_life, rel=0.05)


# --- dsla eval -------------------------------------------------------------------------------------------------------


def save_tiny(folder: Path, tok, **dsla) -> Path:
    model = tiny_dsla(**dsla)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    (folder / "chain.json").write_text(json.dumps({"stages": [{"layer": 2}, {"layer": 0}]}))  # 2 of 4 trained
    return folder


def test_dsla_eval_end_to_end(tok, tmp_path):
    save_tiny(tmp_path / "dsla" / "checkpoint", tok)
    gla = save_tiny(tmp_path / "gla", tok, dsla_num_states=1)
    text = tmp_path / "heldout.txt"
    text.write_text(ESSAY)
    bench = tmp_path / "bench"
    bench.mkdir()
    kernels_table = "\n".join(["Ran on a test CPU.", "", "| tokens | SDPA (ms) | DSLA (ms) |", "|---:|---:|---:|",
                               "| 1024 | 20.0 | 10.0 |"])  # fmt: skip
    (bench / "kernels.json").write_text(json.dumps({"meta": {"threads": 2}, "prefill": [], "decode": []}))
    (bench / "kernels.md").write_text(kernels_table + "\n")
    out = tmp_path / "eval"
    argv = [
        "eval",
        "--model",
        str(tmp_path / "dsla"),
        "--compare",
        f"GLA={gla}",
        "--ratios",
        "0",
        "0.25",
        "0.5",
        "0.75",
    ]
    argv += ["--out", str(out), "--heldout", str(text), "--ppl-lengths", "32", "64", "--ppl-tokens", "160"]
    argv += ["--passkey-lengths", "96", "128", "--passkey-depths", "0", "1", "--ruler-lengths", "600"]
    argv += ["--ruler-new-tokens", "4", "--map-tokens", "40", "--benchmarks", str(bench), "--no-progress"]
    assert cli.main(argv) == 0
    results = json.loads((out / "results.json").read_text())
    assert list(results["models"]) == ["teacher", "DSLA 25%", "DSLA 50%", "GLA 25%", "GLA 50%"]
    assert results["models"]["DSLA 50%"]["dsla_layers"] == [0, 2]
    assert results["models"]["GLA 50%"]["num_states"] == 1
    assert {s["ratio"] for s in results["skipped"]} == {0.75}  # only 2 layers trained
    for m in results["models"].values():
        assert set(m["ppl"]) == {"32", "64"} and m["ppl"]["64"]["tokens"] == 159
        assert len(m["passkey"]["accuracy"]) == 2 and len(m["passkey"]["accuracy"][0]) == 2
        assert set(m["ruler"]["scores"]) == set(TASKS)
    assert results["models"]["teacher"]["ppl"]["64"]["ppl"] != results["models"]["DSLA 50%"]["ppl"]["64"]["ppl"]
    attention = results["attention"]
    assert set(attention) == {"DSLA 50%", "GLA 50%"}
    assert set(attention["DSLA 50%"]["layers"]) == {"0", "2"}
    assert set(next(iter(attention["GLA 50%"]["layers"].values()))) == {"teacher", "window", "state"}
    assert len(attention["DSLA 50%"]["mixing"]["0"]) == 4  # per head
    assert attention["GLA 50%"]["layers"]["2"]["state"]["half_life"] > 0
    report = (out / "report.md").read_text()
    assert "| DSLA 50% | 2 |" in report and "| GLA 25% | 1 |" in report
    assert kernels_table in report and "e2e.md missing" in report
    for png in ["perplexity.png", "passkey_heatmap.png", "ruler.png", "attention_maps_main.png", "mixing_gla.png"]:
        assert (out / png).read_bytes()[:4] == b"\x89PNG", png
    # a later end-to-end benchmark joins the report without re-evaluating anything
    e2e_table = "\n".join(["Ran on a test CPU.", "", "| measurement | teacher | half DSLA |", "|---|---|---|",
                           "| prefill 8192 tokens (s) | 9.00 | 6.00 |"])  # fmt: skip
    (bench / "e2e.json").write_text(json.dumps({"meta": {"threads": 2}, "decode": [], "prefill": []}))
    (bench / "e2e.md").write_text(e2e_table + "\n")
    assert cli.main(["eval", "--out", str(out), "--render-only", "--benchmarks", str(bench)]) == 0
    report = (out / "report.md").read_text()
    assert kernels_table in report and e2e_table in report
    assert "| DSLA 50% | 2 |" in report


def test_model_variants_names_and_trained_limit():
    from dsla_hf.evaluation.suite import model_variants

    model = tiny_dsla()
    variants, skipped = model_variants(model, [0.0, 0.25, 0.5, 1.0], trained=2, label="GLA-fast")
    assert variants == [("teacher", 0.0), ("GLA-fast 25%", 0.25), ("GLA-fast 50%", 0.5)]
    assert skipped == [(1.0, "needs 4 DSLA layers, 2 trained")]
    assert model_variants(model, [0.0, 0.5], None, with_teacher=False)[0] == [("DSLA 50%", 0.5)]


def test_eval_of_a_plain_llama_runs_the_teacher_only(tok, tmp_path):
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    LlamaForCausalLM(tiny_llama_config(vocab_size=VOCAB)).save_pretrained(tmp_path / "llama")
    tok.save_pretrained(tmp_path / "llama")
    (tmp_path / "h.txt").write_text(ESSAY)
    out = tmp_path / "out"
    argv = ["eval", "--model", str(tmp_path / "llama"), "--out", str(out), "--heldout", str(tmp_path / "h.txt")]
    argv += ["--ppl-lengths", "32", "--ppl-tokens", "64", "--passkey-lengths", "--ruler-lengths", "--no-progress"]
    argv += ["--benchmarks", str(tmp_path / "none")]
    assert cli.main(argv) == 0
    results = json.loads((out / "results.json").read_text())
    assert list(results["models"]) == ["teacher"] and not results["attention"]
    assert len(results["skipped"]) == 2  # 0.25 and 0.5: no DSLA weights
    assert "kernels.md missing" in (out / "report.md").read_text()


# --- lm-evaluation-harness -------------------------------------------------------------------------------------------


def test_lm_eval_harness_hflm_scores_our_model(tok, tmp_path):
    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    model = tiny_dsla()
    model.set_dsla_layers(0.5)
    docs = [
        {"question": "The sky is", "choices": ["blue", "green"], "answer": 0},
        {"question": "Two and two make", "choices": ["five", "four", "three"], "answer": 1},
        {"question": "The grass is", "choices": ["green", "red"], "answer": 0},
    ]
    (tmp_path / "docs.jsonl").write_text("\n".join(json.dumps(d) for d in docs))
    (tmp_path / "dsla_tiny.yaml").write_text(
        "task: dsla_tiny\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {tmp_path / 'docs.jsonl'}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        'doc_to_text: "{{question}}"\n'
        'doc_to_choice: "{{choices}}"\n'
        'doc_to_target: "{{answer}}"\n'
        "metric_list:\n  - metric: acc\n"
    )
    lm = HFLM(pretrained=model, tokenizer=tok, batch_size=2, max_length=256)
    out = lm_eval.simple_evaluate(model=lm, tasks=["dsla_tiny"], task_manager=TaskManager(include_path=str(tmp_path)))
    result = out["results"]["dsla_tiny"]
    # the harness's accuracy is the argmax of its per-choice log-likelihoods; recompute them directly
    hits = 0
    with torch.no_grad():
        for doc in docs:
            scores = []
            for choice in doc["choices"]:
                context = tok(doc["question"], add_special_tokens=False).input_ids
                cont = tok(" " + choice, add_special_tokens=False).input_ids
                ids = torch.tensor([context + cont])
                logp = F.log_softmax(model(ids, use_cache=False).logits[0].float(), -1)
                scores.append(sum(logp[len(context) - 1 + j, c].item() for j, c in enumerate(cont)))
            hits += max(range(len(scores)), key=scores.__getitem__) == doc["answer"]
    assert result["acc,none"] == pytest.approx(hits / len(docs))
    # and one log-likelihood request, compared number for number
    [(ll, _)] = lm.loglikelihood([_request("The sky is", " blue")])
    context, cont = tok("The sky is").input_ids, tok(" blue").input_ids
    with torch.no_grad():
        logp = F.log_softmax(model(torch.tensor([context + cont]), use_cache=False).logits[0].float(), -1)
    assert ll == pytest.approx(sum(logp[len(context) - 1 + j, c].item() for j, c in enumerate(cont)), rel=1e-4)


def _request(context: str, continuation: str):
    from lm_eval.api.instance import Instance

    return Instance(request_type="loglikelihood", doc={}, arguments=(context, continuation), idx=0)


# --- the real SmolLM2 ------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_ruler_lengths_and_teacher_on_smollm2(smollm2, tmp_path):
    model, tokenizer = smollm2
    for task in TASKS:
        for length in (1024, 4096):
            s = generate_sample(task, tokenizer, length, seed=0, essay_text=ESSAY)
            unit = 30 if TASKS[task].haystack == "noise" else 40
            assert length - unit <= s["length"] <= length, (task, length, s["length"])
            assert count(tokenizer, s["input"]) == s["prompt_tokens"]
    # the teacher finds a single needle in 512 tokens, and more context lowers its perplexity
    res = ruler_eval(model, tokenizer, ["niah_single"], [512], samples=2)
    assert res["scores"]["niah_single"]["512"] >= 50.0, res["samples"]
    stream = tokenizer(ESSAY * 2, add_special_tokens=False, return_tensors="pt").input_ids[0, :768]
    short = sliding_window_perplexity(model, stream, 32)
    long = sliding_window_perplexity(model, stream, 384)
    assert long["ppl"] < short["ppl"]
    # the command on the teacher, tiny budget
    out = tmp_path / "eval"
    argv = ["eval", "--model", "smollm2", "--out", str(out), "--ppl-lengths", "64", "--ppl-tokens", "128"]
    argv += ["--passkey-lengths", "128", "--passkey-depths", "0.5", "--ruler-tasks", "niah_single"]
    argv += ["--ruler-lengths", "256", "--map-tokens", "0", "--no-progress"]
    assert cli.main(argv) == 0
    results = json.loads((out / "results.json").read_text())
    assert list(results["models"]) == ["teacher"] and results["heldout"]


# --- the ablation's recipes -----------------------------------------------------------------------------------------


def test_ablation_variants_are_the_demo_recipe_with_other_states():
    from dsla_hf.demo import DEMO_RECIPE
    from dsla_hf.evaluation.ablation import ablation_recipe, parse_overrides

    dsla, gla, fast = (ablation_recipe(v) for v in ("dsla", "gla", "gla-fast"))
    assert dsla.dsla_options() == {"dsla_num_states": 2}
    assert gla.dsla_options() == {"dsla_num_states": 1}
    assert fast.dsla_options() == {"dsla_num_states": 1, "dsla_history_half_life": 32.0}
    for recipe in (dsla, gla, fast):  # everything else is the demo's
        assert recipe.chain_config("x") == DEMO_RECIPE.chain_config("x")
    overrides = parse_overrides(["layer_alone_steps=20", "layer_alone_lr=0.003", "ranking_first=low"])
    assert overrides == {"layer_alone_steps": 20, "layer_alone_lr": 0.003, "ranking_first": "low"}
    assert ablation_recipe("gla", overrides).chain_config("x").layer_alone_steps == 20
    with pytest.raises(SystemExit, match="FIELD=VALUE"):
        parse_overrides(["no_such_field=1"])
