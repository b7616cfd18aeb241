"""The hybrid cache under continuous batching: requests of different lengths joined, decoded together, removed."""

import copy

import pytest
import torch

from dsla_hf import DSLACache, convert_llama_to_dsla


def convert(teacher, layers="all", **kwargs):
    """Conversion without the softmax window (tests/test_window.py covers it), so short sequences reach the states."""
    kwargs.setdefault("dsla_window", 0)
    return convert_llama_to_dsla(teacher, layers, **kwargs)


def decode_alone(model, ids, steps):
    cache = DSLACache(model.config)
    with torch.no_grad():
        logits = [model(ids, cache=cache).logits[:, -1]]
        token = logits[-1].argmax(-1, keepdim=True)
        for _ in range(steps):
            logits.append(model(token, cache=cache).logits[:, -1])
            token = logits[-1].argmax(-1, keepdim=True)
    return torch.stack(logits, 1)


@pytest.mark.parametrize("active", [[1, 3], [], [0, 1, 2, 3]])
def test_stacked_requests_decode_like_alone(tiny_teacher, active):
    model = convert(tiny_teacher, layers="all").eval()
    model.set_dsla_layers(active)
    prompts = [torch.randint(3, 101, (1, n)) for n in (13, 6, 9)]
    steps = 4
    expected = [decode_alone(model, p, steps) for p in prompts]
    caches, firsts = [], []
    with torch.no_grad():
        for p in prompts:
            cache = DSLACache(model.config)
            firsts.append(model(p, cache=cache).logits[:, -1])
            caches.append(cache)
        cache, mask = DSLACache.stack(caches, [None] * 3)
        assert cache.get_seq_length() == 13 and mask.sum(1).tolist() == [13, 6, 9]
        positions = torch.tensor([[13], [6], [9]])
        token = torch.cat(firsts).argmax(-1, keepdim=True)
        for step in range(steps):
            mask = torch.cat([mask, torch.ones(3, 1, dtype=torch.long)], 1)
            logits = model(token, attention_mask=mask, position_ids=positions + step, cache=cache).logits
            for i in range(3):
                assert torch.allclose(logits[i, -1], expected[i][0, step + 1], atol=1e-4), (i, step)
            token = logits[:, -1].argmax(-1, keepdim=True)
        # The longest request leaves: its padding-only columns can be trimmed without changing the others.
        cache.batch_select_indices(torch.tensor([1, 2]))
        mask = mask[1:]
        leading = int((mask.cumsum(1) == 0).all(0).sum())
        cache.trim_left(leading)
        mask = mask[:, leading:]
        assert leading == 13 - 9
        logits = model(
            token[1:],
            attention_mask=torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], 1),
            position_ids=positions[1:] + steps,
            cache=cache,
        ).logits
    alone = [decode_alone(model, p, steps + 1) for p in prompts[1:]]
    for i in range(2):
        assert torch.allclose(logits[i, -1], alone[i][0, steps + 1], atol=1e-4)


def test_switch_after_stacking_folds_padded_rows_exactly(tiny_teacher):
    model = convert(tiny_teacher, layers="all", active=[]).eval()
    prompts = [torch.randint(3, 101, (1, n)) for n in (11, 5)]
    with torch.no_grad():
        caches = []
        for p in prompts:
            cache = DSLACache(model.config)
            model(p, cache=cache)
            caches.append(cache)
        cache, mask = DSLACache.stack(caches, [None, None])
        model.set_dsla_layers([3])  # the top layer: its inputs do not depend on the switch
        token = torch.tensor([[7], [8]])
        mask = torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], 1)
        logits = model(token, attention_mask=mask, position_ids=torch.tensor([[11], [5]]), cache=cache)
        for i, p in enumerate(prompts):
            reference = model(torch.cat([p, token[i : i + 1]], 1), use_cache=False).logits[0, -1]
            assert torch.allclose(logits.logits[i, -1], reference, atol=1e-4)


def test_stack_rejects_inconsistent_caches(tiny_teacher):
    model = convert(tiny_teacher, layers="all").eval()
    with torch.no_grad():
        a, b = DSLACache(model.config), DSLACache(model.config)
        model.set_dsla_layers([])
        model(torch.randint(3, 101, (1, 5)), cache=a)
        model.set_dsla_layers([2])
        model(torch.randint(3, 101, (1, 5)), cache=b)  # layer 2: states only, keys freed
    with pytest.raises(ValueError, match="fold them first"):
        DSLACache.stack([a, b], [None, None])
    with pytest.raises(ValueError, match="Nothing"):
        DSLACache.stack([], [])


def test_decoding_writes_keys_in_place_and_leaves_earlier_views_alone(tiny_teacher):
    """Decode steps write each key and value into the layer's spare room instead of copying all of them (one buffer
    across steps, grown by half when full); a view taken before (as a prefix-cache checkpoint holds) keeps its
    values; the logits equal a forward with no cache."""
    model = convert(tiny_teacher, layers="all").eval()
    model.set_dsla_layers([1])
    ids = torch.randint(3, 101, (2, 60))
    cache = DSLACache(model.config)
    with torch.no_grad():
        model(ids[:, :20], cache=cache)
        layer = cache.layers[0]
        earlier = layer.keys
        snapshot = earlier.clone()
        buffers = {layer.keys.untyped_storage().data_ptr()}
        for step in range(20, 60):
            logits = model(ids[:, step : step + 1], cache=cache).logits[:, -1]
            buffers.add(layer.keys.untyped_storage().data_ptr())
        reference = model(ids, use_cache=False).logits[:, -1]
    assert layer.kv_tokens == 60 and torch.equal(earlier, snapshot)
    assert len(buffers) == 2  # room for 52 tokens after the prompt's 20, then for 79
    torch.testing.assert_close(logits, reference, rtol=1e-4, atol=1e-4)
    assert cache.layers[1].kv_tokens == 0  # the DSLA layer keeps states, not keys


@pytest.mark.parametrize("active", [[1, 3], []])
def test_groups_in_one_forward_match_each_group_alone(tiny_teacher, active):
    """`forward_groups` (a server's step: a left-padded batch's decode tokens and another request's prompt chunk,
    each in its own cache) gives each group the logits and cache it gets from a forward of its own."""
    from dsla_hf.models.dsla.modeling_dsla import SequenceGroup

    model = convert(tiny_teacher, layers="all").eval()
    model.set_dsla_layers(active)
    prompts = [torch.randint(3, 101, (1, n)) for n in (9, 5, 11)]
    with torch.no_grad():
        caches = [DSLACache(model.config) for _ in prompts]
        for prompt, cache in zip(prompts, caches):
            model(prompt, cache=cache)
        batch, mask = DSLACache.stack(caches[:2], [None, None])
        tokens, chunk = torch.tensor([[7], [8]]), torch.randint(3, 101, (1, 6))
        mask = torch.cat([mask, mask.new_ones(2, 1)], 1)
        positions = torch.tensor([[9], [5]])
        alone_batch, alone_chunk = copy.deepcopy(batch), copy.deepcopy(caches[2])
        groups = [
            SequenceGroup(tokens, batch, attention_mask=mask, position_ids=positions),
            SequenceGroup(chunk, caches[2], logits_to_keep=0),
        ]
        together = model.forward_groups(groups)
        decode = model(tokens, attention_mask=mask, position_ids=positions, cache=alone_batch).logits[:, -1:]
        prefill = model(chunk, cache=alone_chunk).logits
    vocab = model.config.vocab_size
    assert together[0].shape == (2, 1, vocab) and together[1].shape == (1, 6, vocab)
    torch.testing.assert_close(together[0], decode, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(together[1], prefill, rtol=1e-5, atol=1e-5)
    for mine, alone in ((batch, alone_batch), (caches[2], alone_chunk)):
        for layer, reference in zip(mine.layers, alone.layers):
            assert layer.seen_tokens == reference.seen_tokens
            for a, b in ((layer.keys, reference.keys), (layer.state, reference.state)):
                if b is not None and b.numel():
                    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_groups_of_different_layer_kinds_in_one_forward(tiny_teacher):
    """Each group runs its own DSLA layers (the paper's mixed batches): a group with layers 1 and 3 and a group
    with none, in one forward, each equal to a forward of its own with the model switched to its kinds. A group
    asking for a layer that has no DSLA weights is refused."""
    from dsla_hf.models.dsla.modeling_dsla import SequenceGroup

    model = convert(tiny_teacher, layers=[1, 3]).eval()
    prompts = [torch.randint(3, 101, (1, n)) for n in (7, 12)]
    kinds = [(1, 3), ()]
    with torch.no_grad():
        groups = [
            SequenceGroup(p, DSLACache(model.config), logits_to_keep=0, dsla_layers=k) for p, k in zip(prompts, kinds)
        ]
        together = model.forward_groups(groups)
        for prompt, layers, logits in zip(prompts, kinds, together):
            model.set_dsla_layers(list(layers))
            torch.testing.assert_close(logits, model(prompt, use_cache=False).logits, rtol=1e-5, atol=1e-5)
        with pytest.raises(ValueError, match=r"Layers \[0\] have no DSLA weights"):
            model.forward_groups([SequenceGroup(prompts[0], DSLACache(model.config), dsla_layers=(0, 1))])


def test_selected_rows_continue_as_the_batch_would(tiny_teacher):
    """`select_rows` (a server's batch as requests leave: rows kept, the columns that are then padding dropped, one
    copy into buffers with room) decodes exactly as `batch_select_indices` then `trim_left` on the same batch."""
    model = convert(tiny_teacher, layers="all").eval()
    model.set_dsla_layers([1, 3])
    caches = [DSLACache(model.config) for _ in range(3)]
    prompts = [torch.randint(3, 101, (1, n)) for n in (13, 6, 9)]
    with torch.no_grad():
        for prompt, cache in zip(prompts, caches):
            model(prompt, cache=cache)
        batch, mask = DSLACache.stack(caches, [None] * 3)
        reference = copy.deepcopy(batch)
        selected = batch.select_rows([1, 2], drop_left=4)  # rows of 6 and 9 tokens: 4 columns of padding in both
        reference.batch_select_indices(torch.tensor([1, 2]))
        reference.trim_left(4)
        kept = mask[[1, 2], 4:]
        assert selected.get_seq_length() == reference.get_seq_length() == 9
        positions = torch.tensor([[6], [9]])
        for token in (7, 8, 9):
            kept = torch.cat([kept, kept.new_ones(2, 1)], 1)
            ids = torch.tensor([[token], [token + 1]])
            mine = model(ids, attention_mask=kept, position_ids=positions, cache=selected).logits
            theirs = model(ids, attention_mask=kept, position_ids=positions, cache=reference).logits
            torch.testing.assert_close(mine, theirs, rtol=0, atol=0)
            positions = positions + 1
    assert selected.layers[0].owns_buffers  # room to grow: the decode steps above appended in place
    with pytest.raises(ValueError, match="at least one row"):
        batch.select_rows([])
    model.set_dsla_layers([])
