"""What the model records for trainers (Transformers' output capturing), checked against independent references:
the teacher's own hidden states, the DSLA layer called directly, and per-row runs without padding."""

import torch
from transformers import LlamaForCausalLM

from dsla_hf import convert_llama_to_dsla
from tests.conftest import tiny_llama_config


def student_of(teacher, active):
    return convert_llama_to_dsla(teacher, layers="all", active=active, dsla_window=4).eval()


def test_hidden_states_match_the_teacher_with_dsla_off_last_one_after_the_norm(tiny_teacher):
    student = student_of(tiny_teacher, [])
    ids = torch.randint(3, 101, (2, 12))
    with torch.no_grad():
        ours = student(ids, output_hidden_states=True).hidden_states
        theirs = tiny_teacher(ids, output_hidden_states=True).hidden_states
    assert len(ours) == len(theirs) == tiny_teacher.config.num_hidden_layers + 1
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b)
    # the last entry is the final norm's output (as in Transformers' Llama), not the last layer's raw output
    assert not torch.allclose(ours[-1], student.model(ids, output_hidden_states=True).hidden_states[-2])


def test_recorded_dsla_outputs_and_gates_are_those_of_the_layers_that_ran(tiny_teacher):
    student = student_of(tiny_teacher, [3, 1])
    ids = torch.randint(3, 101, (2, 12))
    with torch.no_grad():
        out = student(ids, output_attention_inputs=True, output_dsla_attentions=True, output_dsla_gates=True)
    # Read before any other forward: what the recorded gates keep must not be reused by a later layer or call.
    recorded = [g.materialize() for g in out.dsla_gates]
    assert len(out.attention_inputs) == 4 and len(out.dsla_attentions) == len(out.dsla_gates) == 2
    rotary = student.model.rotary_emb
    for j, i in enumerate([1, 3]):  # layer order
        block = student.model.layers[i]
        x = out.attention_inputs[i]
        with torch.no_grad():
            direct = block.linear_attn(hidden_states=x, position_embeddings=rotary(x, torch.arange(12)[None]))
            gates = block.linear_attn.gates(block.self_attn.k_proj(x).view(2, 12, 2, 16))
        torch.testing.assert_close(out.dsla_attentions[j], direct)
        assert out.dsla_gates[j].weight is block.linear_attn.gates.weight
        # the recorded gates are the state inputs' (keys delayed by the 4-token window): the last new key is in
        # the window, the first state input is a null entry (masked, no decay)
        torch.testing.assert_close(recorded[j][:, 4:], gates.materialize()[:, :-4])
        assert (recorded[j][:, :4] == 0).all()
    assert student(ids).dsla_gates is None  # recorded only on request


def test_softmax_attention_target_honours_left_padding():
    torch.manual_seed(0)
    teacher = LlamaForCausalLM(tiny_llama_config()).eval()
    student = student_of(teacher, [])
    x = torch.randn(2, 10, 64)
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[1, :3] = 0  # row 1 left-padded by 3
    with torch.no_grad():
        both = student.model.softmax_attention(2, x, attention_mask=mask)
        alone = student.model.softmax_attention(2, x[1:, 3:])
        unmasked = student.model.softmax_attention(2, x)
    torch.testing.assert_close(both[1, 3:], alone[0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(both[0], unmasked[0])
    assert not torch.allclose(unmasked[1, 3:], alone[0], atol=1e-3)  # ignoring the mask would be wrong
