"""Sensitivity ranking: attention entropy from q/k (RoPE, GQA) against eager attention weights; measured ranking."""

import json

import pytest
import torch
from transformers import LlamaForCausalLM

from dsla_hf import convert_llama_to_dsla
from dsla_hf.ranking import attention_entropy, order_from_scores, rank_layers, save_ranking
from tests.conftest import tiny_llama_config


def test_entropy_matches_eager_attention_weights():
    torch.manual_seed(0)
    config = tiny_llama_config()
    config._attn_implementation = "eager"
    model = LlamaForCausalLM(config).eval()
    ids = torch.randint(3, 101, (3, 24))
    with torch.no_grad():
        attentions = model(ids, output_attentions=True).attentions
    expected = []
    for a in attentions:  # [B, H, T, T]
        p = a[:, :, -1].double()
        expected.append((-(p * p.clamp_min(1e-30).log()).sum(-1)).mean().item())
    got = attention_entropy(model, ids, batch_size=2)
    assert torch.allclose(torch.tensor(got), torch.tensor(expected), atol=1e-5)


def test_entropy_ranking_order_and_files(tiny_teacher, tmp_path):
    student = convert_llama_to_dsla(tiny_teacher, layers="all", active=[1])
    result = rank_layers(student, torch.randint(3, 101, (2, 32)), "entropy", progress=False)
    assert sorted(result["order"]) == [0, 1, 2, 3]
    assert [result["scores"][i] for i in result["order"]] == sorted(result["scores"])
    assert student.dsla_layers == [1]  # the active layers are restored
    json_path, png_path = save_ranking(result, tmp_path)
    assert json.loads(json_path.read_text())["order"] == result["order"]
    assert png_path.stat().st_size > 1000


def test_order_from_scores_ties_and_subset():
    assert order_from_scores([1.0, 0.5, 0.5, 2.0]) == [1, 2, 0, 3]
    assert order_from_scores([1.0, 0.5, 0.5, 2.0], [0, 3]) == [0, 3]
    assert order_from_scores([1.0, 0.5, 0.5, 2.0], first="high") == [3, 0, 1, 2]
    with pytest.raises(ValueError):
        order_from_scores([1.0], first="middle")


def test_entropy_ranking_highest_first(tiny_teacher):
    student = convert_llama_to_dsla(tiny_teacher, layers="all", active=[])
    ids = torch.randint(3, 101, (2, 32))
    low = rank_layers(student, ids, "entropy", progress=False)
    high = rank_layers(student, ids, "entropy", progress=False, first="high")
    assert high["first"] == "high" and low["first"] == "low"
    assert high["scores"] == low["scores"]
    assert [high["scores"][i] for i in high["order"]] == sorted(high["scores"], reverse=True)


def test_measured_ranking_restores_weights(tiny_teacher):
    student = convert_llama_to_dsla(tiny_teacher, layers="all", active=[])
    for p in student.parameters():
        p.requires_grad_(False)
    before = {k: v.clone() for k, v in student.state_dict().items()}
    train, held = torch.randint(3, 101, (4, 32)), torch.randint(3, 101, (2, 32))
    result = rank_layers(student, train, "measured", eval_ids=held, steps=3, progress=False)
    assert sorted(result["order"]) == [0, 1, 2, 3]
    assert all(isinstance(s, float) for s in result["scores"])
    # only-that-layer losses are losses of a converted model: the teacher's plus the score
    for i in range(4):
        assert abs(result["loss"][i] - result["teacher_loss"] - result["scores"][i]) < 1e-6
    after = student.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not any(p.requires_grad for p in student.parameters())


def test_forward_from_a_layer_matches_the_full_model(tiny_teacher):
    from dsla_hf.ranking import _forward_from
    from dsla_hf.trainers.layer_alone import capture_all_layers

    student = convert_llama_to_dsla(tiny_teacher, layers="all", active=[])
    ids = torch.randint(3, 101, (2, 20))
    resid, _, _ = capture_all_layers(student, ids)
    student.set_dsla_layers([2])
    with torch.no_grad():
        full = student(ids).logits
        assert torch.allclose(_forward_from(student, resid[2], 2), full, atol=1e-5)
        assert torch.allclose(_forward_from(student, resid[0], 0), full, atol=1e-5)


def test_cli_lists_rank_distill_and_demo(capsys):

    from dsla_hf.cli import main

    for command in ("rank", "distill", "demo"):
        with pytest.raises(SystemExit) as exit_info:
            main([command, "--help"])
        assert exit_info.value.code == 0
        assert "usage: dsla " + command in capsys.readouterr().out


@pytest.mark.slow
def test_entropy_ranking_on_smollm2(smollm2, cpython_text):
    model, tokenizer = smollm2
    ids = tokenizer(cpython_text[:20000], return_tensors="pt").input_ids[:, :512].view(2, 256)
    entropies = attention_entropy(model, ids)
    assert len(entropies) == model.config.num_hidden_layers
    assert all(0.0 <= e <= torch.log(torch.tensor(256.0)).item() + 1e-4 for e in entropies)
    assert len(set(order_from_scores(entropies))) == model.config.num_hidden_layers
