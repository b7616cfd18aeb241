"""Distillation trainer (TRL SFTTrainer subclass), layer-alone stage and the chain, on tiny random Llamas."""

import argparse
import json
import os
import subprocess
import sys

import datasets
import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaForCausalLM

from dsla_hf import convert_llama_to_dsla
from dsla_hf.trainers.chain import ChainConfig, run_chain
from dsla_hf.trainers.distill import DSLADistillConfig, DSLADistillTrainer, token_normalised_kl
from dsla_hf.trainers.layer_alone import capture_layer_io, fit_layer_alone
from tests.conftest import tiny_llama_config


def tiny_tokenizer():
    """A word-level tokenizer over the tiny Llama's 101 ids: 'w3 w57 ...'."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "</s>": 1, "<s>": 2, **{f"w{i}": i for i in range(3, 101)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", bos_token="<s>")


def random_text(words: int, seed: int) -> str:
    g = torch.Generator().manual_seed(seed)
    # a little structure (repeats) so that training has something to learn
    base = torch.randint(3, 101, (16,), generator=g)
    ids = torch.cat([base[torch.randint(0, 16, (1,), generator=g)].repeat(4) for _ in range(words // 4)])
    return " ".join(f"w{i}" for i in ids.tolist())


def packed(rows: int, length: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 101, (rows, length), generator=g)
    return datasets.Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": [[1] * length] * rows})


def chain_config(tmp_path, **changes) -> ChainConfig:
    """A quiet chain in `tmp_path`, without the TRL phase unless `changes` ask for it."""
    return ChainConfig(**{"output_dir": str(tmp_path), "distill_steps": 0, "progress": False, **changes})


def distill_trainer(student, tmp_path, train_dataset, teacher=None, **settings) -> DSLADistillTrainer:
    """A `DSLADistillTrainer` on the CPU with `settings` (DSLADistillConfig fields)."""
    args = DSLADistillConfig(output_dir=str(tmp_path), use_cpu=True, disable_tqdm=True, **settings)
    return DSLADistillTrainer(
        model=student, args=args, teacher=teacher, train_dataset=train_dataset, processing_class=tiny_tokenizer()
    )


@pytest.fixture
def student(tiny_teacher):
    # A window shorter than the test sequences: with the preset's 64 tokens a layer would be its teacher exactly
    # (the states would hold nothing), and every loss zero up to rounding.
    model = convert_llama_to_dsla(tiny_teacher, layers="all", conversion_order=[2, 0, 3, 1], active=[], dsla_window=4)
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def test_token_normalised_kl_is_a_per_token_mean():
    s, t = torch.randn(2, 5, 7), torch.randn(2, 5, 7)
    mask = torch.ones(2, 5, dtype=torch.bool)
    mask[1, 3:] = False
    per_token = torch.nn.functional.kl_div(s.log_softmax(-1), t.log_softmax(-1), log_target=True, reduction="none")
    expected = per_token.sum(-1)[mask].mean()
    assert torch.allclose(token_normalised_kl(s, t, mask), expected, atol=1e-6)
    assert token_normalised_kl(t, t, mask).abs() < 1e-6


@pytest.mark.parametrize("schedule", ["constant", "cosine"])
def test_layer_alone_fit_lowers_the_error_and_trains_only_that_layer(student, schedule):
    # longer than the default preset's 64-token exact window, so that the states carry part of the output
    ids = torch.randint(3, 101, (6, 160))
    x, y = capture_layer_io(student, 2, ids)
    assert x.shape == y.shape == (6, 160, 64)
    frozen = {k: v.clone() for k, v in student.state_dict().items() if ".layers.2.linear_attn." not in k}
    result = fit_layer_alone(student, 2, x, y, steps=30, lr=1e-3, schedule=schedule)
    assert result["rel_error_before"] > 1e-3
    assert result["rel_error_after"] < result["rel_error_before"]
    after = student.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in frozen.items())
    assert not any(p.requires_grad for p in student.parameters())


@pytest.mark.parametrize("target", ["attention", "hidden"])
def test_distill_trainer_logs_every_loss_and_trains_only_dsla(student, tiny_teacher, tmp_path, target):
    student.set_dsla_layers([2])
    before = {k: v.clone() for k, v in student.state_dict().items()}
    trainer = distill_trainer(
        student, tmp_path, packed(8, 24, 0), tiny_teacher, max_steps=3, per_device_train_batch_size=2,
        learning_rate=1e-2, logging_steps=1, ce_weight=0.5, alignment_target=target,
    )  # fmt: skip
    trainer.train()
    logs = [h for h in trainer.state.log_history if "kl_loss" in h]
    assert len(logs) == 3
    for key in ("align_loss", "kl_loss", "ce_loss", "gate_cosine"):
        assert all(torch.isfinite(torch.tensor(h[key])) for h in logs), key
    assert logs[0]["align_loss"] > 0 and logs[0]["kl_loss"] > 0
    after = student.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(".layers.2.linear_attn." in k for k in changed)


def test_teacher_defaults_to_the_student_with_dsla_off(student, tmp_path):
    student.set_dsla_layers([0])
    trainer = distill_trainer(student, tmp_path, packed(2, 16, 1), max_steps=1, logging_steps=1)
    trainer.train()
    assert student.dsla_layers == [0]
    assert [h for h in trainer.state.log_history if "kl_loss" in h][0]["kl_loss"] > 0


def test_chain_converts_in_order_saves_every_prefix_and_resumes(student, tmp_path):
    train, held = packed(8, 32, 0), packed(2, 32, 1)
    config = chain_config(tmp_path, target_ratio=0.5, layer_alone_steps=5, capture_sequences=4)
    state = run_chain(student, train, held, config)
    assert [s["layer"] for s in state["stages"]] == [2, 0]
    assert state["stopped"].startswith("target ratio")
    assert student.dsla_layers == [0, 2]
    saved = json.loads((tmp_path / "checkpoint" / "chain.json").read_text())
    assert saved["stages"][1]["dsla_layers"] == [0, 2] and "eval" in saved["stages"][1]
    import dsla_hf  # noqa: F401  (registers the auto classes)

    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "checkpoint").eval()
    assert reloaded.config.conversion_order == [2, 0, 3, 1]
    assert reloaded.set_dsla_layers(0.25) == [2]
    ids = torch.tensor(held["input_ids"])
    student.eval()
    for ratio in (0.25, 0.5):
        student.set_dsla_layers(ratio)
        reloaded.set_dsla_layers(ratio)
        with torch.no_grad():
            assert torch.allclose(student(ids).logits, reloaded(ids).logits, atol=1e-5)
    # resume: a longer target continues from the saved stages (earlier layers untouched), a fresh student suffices
    teacher = LlamaForCausalLM(tiny_llama_config())
    teacher.load_state_dict({k: v for k, v in student.state_dict().items() if "linear_attn" not in k}, strict=False)
    fresh = convert_llama_to_dsla(teacher, layers="all", conversion_order=[2, 0, 3, 1], active=[])
    state2 = run_chain(fresh, train, held, config.replace(target_ratio=0.75))
    assert [s["layer"] for s in state2["stages"]] == [2, 0, 3]
    assert state2["stages"][:2] == saved["stages"]
    for name, value in student.state_dict().items():
        if ".layers.2.linear_attn." in name or ".layers.0.linear_attn." in name:
            assert torch.equal(fresh.state_dict()[name], value)


def test_chain_stops_at_the_quality_floor(student, tmp_path):
    config = chain_config(tmp_path, target_ratio=1.0, quality_floor=0.5, layer_alone_steps=0)
    # On random tokens an untrained layer may move the tiny model's perplexity either way (and within the default
    # preset's 64-token exact window not at all), so the floor sits below any reachable ratio: stage 1 passes it.
    state = run_chain(student, packed(4, 96, 0), packed(2, 96, 1), config)
    assert len(state["stages"]) == 1 and state["stopped"].startswith("quality floor")
    assert state["stages"][0]["ppl_ratio"] > 0.5


def test_chain_with_distill_phase(student, tiny_teacher, tmp_path):
    config = chain_config(tmp_path, target_ratio=0.25, layer_alone_steps=2, distill_steps=2)
    state = run_chain(
        student, packed(4, 16, 0), packed(2, 16, 1), config, tokenizer=tiny_tokenizer(), teacher=tiny_teacher
    )
    distill = state["stages"][0]["distill"]
    assert distill["steps"] == 2 and distill["last"]["kl_loss"] is not None


@pytest.mark.slow
def test_two_process_chain_with_accelerate(tmp_path):
    """`accelerate launch --num_processes 2 --cpu` runs a short chain (layer-alone and trainer phases, data
    parallel) and writes the same kind of checkpoint."""
    torch.manual_seed(0)
    model_dir, data = tmp_path / "tiny", tmp_path / "train.txt"
    LlamaForCausalLM(tiny_llama_config()).save_pretrained(model_dir)
    tiny_tokenizer().save_pretrained(model_dir)
    data.write_text(random_text(4000, 0))
    (tmp_path / "held.txt").write_text(random_text(600, 1))
    out = tmp_path / "chain"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "--cpu", "--num_machines", "1"]
    cmd += ["--mixed_precision", "no", "--dynamo_backend", "no", "-m", "dsla_hf.commands.distill"]
    cmd += ["--model", str(model_dir), "--train", str(data), "--heldout", str(tmp_path / "held.txt")]
    cmd += ["--seq-len", "32", "--train-sequences", "16", "--eval-sequences", "4", "--ratio", "0.5"]
    cmd += ["--layer-alone-steps", "4", "--distill-steps", "2", "--ranking", "index", "--output", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    state = json.loads((out / "checkpoint" / "chain.json").read_text())
    assert [s["layer"] for s in state["stages"]] == [0, 1]
    assert all("distill" in s and "layer_alone" in s for s in state["stages"])
    import dsla_hf  # noqa: F401

    model = AutoModelForCausalLM.from_pretrained(out / "checkpoint")
    assert model.config.conversion_order == [0, 1, 2, 3] and model.dsla_layers == [0, 1]


def test_chain_with_teacher_captured_inputs(student, tmp_path):
    config = chain_config(tmp_path, target_ratio=0.5, layer_alone_steps=3, capture="teacher")
    state = run_chain(student, packed(4, 16, 0), packed(2, 16, 1), config)
    assert [s["layer"] for s in state["stages"]] == [2, 0]
    assert all(s["layer_alone"]["steps"] == 3 for s in state["stages"])


def test_gate_divergence_reaches_the_gates_gradients(student, tmp_path):
    # Only the gate term: its gradient must reach the gate weights of the trained layer (and nothing else).
    student.set_dsla_layers([2, 0])
    trainer = distill_trainer(
        student, tmp_path, packed(2, 16, 2), max_steps=1, alignment_weight=0.0, kl_weight=0.0,
        gate_divergence_weight=1.0, trained_layers=[2],
    )  # fmt: skip
    batch = {"input_ids": torch.randint(3, 101, (2, 16)), "attention_mask": torch.ones(2, 16, dtype=torch.long)}
    loss = trainer.compute_loss(student, batch)
    loss.backward()
    gates = student.model.layers[2].linear_attn.gates
    assert gates.weight.grad is not None and gates.weight.grad.abs().sum() > 0
    assert gates.bias.grad.abs().sum() > 0
    assert 0 < loss.item() <= 1  # the mean cosine of two decaying gates (both negative): positive
    assert student.model.layers[0].linear_attn.gates.weight.grad is None  # not trained


def test_attention_alignment_term_is_the_normalised_error_to_the_teacher_attention(student, tmp_path):
    student.set_dsla_layers([2])
    trainer = distill_trainer(
        student, tmp_path, packed(2, 16, 2), max_steps=1, kl_weight=0.0, gate_divergence_weight=0.0
    )
    ids = torch.randint(3, 101, (2, 16))
    with torch.no_grad():
        loss = trainer.compute_loss(student, {"input_ids": ids})
    # independent reference: the layer's input from a softmax forward up to layer 2 (nothing below it is DSLA),
    # the teacher's attention there, and the DSLA layer called on that input
    student.set_dsla_layers([])
    with torch.no_grad():
        x, y = capture_layer_io(student, 2, ids)
    block, rotary = student.model.layers[2], student.model.rotary_emb
    with torch.no_grad():
        out = block.linear_attn(hidden_states=x, position_embeddings=rotary(x, torch.arange(16)[None]))
    expected = (out - y).pow(2).sum() / y.pow(2).sum()
    torch.testing.assert_close(loss, expected, rtol=1e-4, atol=1e-6)


def test_chain_captures_each_stage_with_the_earlier_conversions_in_place(student, tmp_path, monkeypatch):
    import dsla_hf.trainers.chain as chain

    seen = []

    def spy(model, layer, ids, *args, **kwargs):
        seen.append((layer, model.dsla_layers, model.model.layers[layer].layer_type))
        return capture_layer_io(model, layer, ids, *args, **kwargs)

    monkeypatch.setattr(chain, "capture_layer_io", spy)
    config = chain_config(tmp_path, target_ratio=0.75, layer_alone_steps=2, capture_sequences=2)
    run_chain(student, packed(4, 16, 0), packed(2, 16, 1), config)
    # order [2, 0, 3, 1]: train and eval captures of stage k see order[:k] as DSLA, the captured layer as softmax
    expected = [(2, [], "full_attention"), (0, [2], "full_attention"), (3, [0, 2], "full_attention")]
    assert seen == [e for e in expected for _ in range(2)]


def test_settings_pass_on_by_name():
    # `dsla distill`'s flags reach the ChainConfig fields of the same name, the chain's loss settings the trainer's
    from dsla_hf.commands.distill import add_arguments
    from dsla_hf.commands.distill import chain_config as config_from_flags
    from dsla_hf.trainers.distill import distill_settings

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    config = config_from_flags(parser.parse_args(["--ratio", "0.25", "--layer-alone-steps", "3", "--no-resume"]))
    assert config == ChainConfig(target_ratio=0.25, layer_alone_steps=3, resume=False)
    losses = {"alignment_weight": 1.0, "kl_weight": 0.5, "ce_weight": 0.0, "gate_divergence_weight": 0.01}
    assert distill_settings(config.replace(kl_weight=0.5)) == {**losses, "alignment_target": "attention"}


def test_chain_refuses_to_resume_with_another_recipe(student, tmp_path):
    def config(**changes):
        return chain_config(
            tmp_path, **{"target_ratio": 0.25, "layer_alone_steps": 1, "capture_sequences": 2, **changes}
        )

    run_chain(student, packed(2, 16, 0), packed(2, 16, 1), config())
    with pytest.raises(ValueError, match="another recipe.*layer_alone_steps: 1 -> 2"):
        run_chain(student, packed(2, 16, 0), packed(2, 16, 1), config(layer_alone_steps=2, target_ratio=0.5))
    state = run_chain(student, packed(2, 16, 0), packed(2, 16, 1), config(target_ratio=0.5))  # only aims further
    assert [s["layer"] for s in state["stages"]] == [2, 0]
