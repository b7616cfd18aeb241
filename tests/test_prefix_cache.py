"""Prefix caching: cache checkpoints restore a prefix exactly, the store's lookups and eviction, and the engine's
greedy outputs with the prefix cache equal to those without it (DSLA layers active, states past the window)."""

import pytest
import torch
from transformers import LlamaForCausalLM

from dsla_hf import DSLACache, convert_llama_to_dsla
from dsla_hf.models.dsla.cache_dsla import tensor_bytes
from dsla_hf.serving.engine import Engine, EngineConfig
from dsla_hf.serving.models import toy_config, toy_tokenizer
from dsla_hf.serving.policy import StaticPolicy
from dsla_hf.serving.prefix_cache import PrefixCache
from dsla_hf.serving.sampling import SamplingParams

CHUNK = 16


@pytest.fixture(scope="module")
def model():
    """The toy Llama, every layer convertible (top first), a window of 4 so that short prompts reach the states."""
    torch.manual_seed(0)
    teacher = LlamaForCausalLM(toy_config()).eval()
    return convert_llama_to_dsla(teacher, "all", conversion_order=[3, 2, 1, 0], active=[], dsla_window=4).eval()


def ids_of(n: int, seed: int = 0) -> list[int]:
    return torch.randint(3, 101, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def prefill(model, cache: DSLACache, ids: list[int], start: int = 0, checkpoints: list | None = None):
    """Chunked prefill of ids[start:] into `cache` (chunks ending at multiples of CHUNK): the logits of each chunk's
    last position; a checkpoint without keys and values after every chunk when a list is given."""
    last = []
    while start < len(ids):
        end = min(len(ids), (start // CHUNK + 1) * CHUNK)
        with torch.no_grad():
            out = model(torch.tensor([ids[start:end]]), cache=cache, use_cache=True, logits_to_keep=1)
        last.append(out.logits[0, -1])
        start = end
        if checkpoints is not None:
            checkpoints.append(cache.checkpoint(keys_values=False))
    return last


def greedy(model, cache: DSLACache, logits: torch.Tensor, steps: int) -> list[int]:
    tokens = [int(logits.argmax())]
    for _ in range(steps - 1):
        with torch.no_grad():
            logits = model(torch.tensor([[tokens[-1]]]), cache=cache, use_cache=True).logits[0, -1]
        tokens.append(int(logits.argmax()))
    return tokens


@pytest.mark.parametrize("active", [[3, 2], [3, 2, 1, 0]])
def test_a_cache_started_from_a_checkpoint_continues_exactly(model, active):
    """Restored at a chunk boundary, the rest of the prefill and the greedy decode are bitwise those of the cache
    that ran the whole prompt, and decoding the restored cache leaves the checkpoint as it was."""
    model.set_dsla_layers(active)
    ids = ids_of(45)
    full = DSLACache(model.config)
    checkpoints = []
    logits = prefill(model, full, ids, checkpoints=checkpoints)
    final = full.checkpoint()
    expected = greedy(model, full, logits[-1], 6)
    at_32 = checkpoints[1].sharing_keys_values(final)
    assert at_32.tokens == 32 and at_32.state_bytes > 0
    for _ in range(2):  # twice from the same checkpoint: the first run's in-place decoding did not touch it
        restored = DSLACache.from_checkpoint(at_32)
        assert restored.get_seq_length() == 32
        rest = prefill(model, restored, ids, start=32)
        assert torch.equal(rest[-1], logits[-1])
        assert greedy(model, restored, rest[-1], 6) == expected
    with pytest.raises(ValueError, match="no keys and values"):
        DSLACache.from_checkpoint(checkpoints[0])
    model.set_dsla_layers([])


def test_a_row_checkpoint_of_a_batch_is_that_rows_cache(model):
    """A finished request's row of the left-padded batch, checkpointed and restored, continues bitwise as the
    request's own cache would have."""
    model.set_dsla_layers([3, 2])
    short, long = ids_of(30), ids_of(45, seed=5)
    caches = [DSLACache(model.config), DSLACache(model.config)]
    prefill(model, caches[0], short)
    prefill(model, caches[1], long)
    batch, _ = DSLACache.stack(caches, [None, None])  # the short row padded by 15 on the left
    restored = DSLACache.from_checkpoint(batch.checkpoint(row=0, tokens=30))
    assert restored.get_seq_length() == 30
    # It holds what the request's own cache holds (that one has room to grow beside it).
    held = [t for layer in caches[0].layers for t in (layer.keys, layer.values, layer.state, *(layer.window or ()))]
    assert restored.memory_bytes == tensor_bytes(t for t in held if t is not None and t.numel())
    with torch.no_grad():
        for token in (7, 8, 9):
            mine = model(torch.tensor([[token]]), cache=restored, use_cache=True).logits
            own = model(torch.tensor([[token]]), cache=caches[0], use_cache=True).logits
            assert torch.equal(mine, own)
    with pytest.raises(ValueError, match="row's own tokens"):
        restored.checkpoint(tokens=20)  # fewer tokens than it has seen, but no row
    model.set_dsla_layers([])


def test_store_lookup_and_eviction(model):
    model.set_dsla_layers([3, 2])
    layers = (2, 3)
    ids = ids_of(40)
    cache = DSLACache(model.config)
    checkpoints = []
    prefill(model, cache, ids, checkpoints=checkpoints)
    taken = checkpoints[:-1] + [cache.checkpoint()]  # at 16, 32 and 40 tokens
    size = taken[-1].keys_values_bytes + sum(c.state_bytes for c in taken)
    store = PrefixCache(capacity_bytes=int(2.5 * size))
    store.store(ids, layers, taken)
    assert len(store) == 3 and store.used_bytes == size
    assert store.lookup(ids, layers).tokens == 32  # one token at least is left to prefill
    # (prompt ids are 3 to 100: a 2 never matches)
    assert store.lookup(ids + [2, 2], layers).tokens == 40
    assert store.lookup(ids[:20] + [2] * 30, layers).tokens == 16
    assert store.lookup(ids[:15] + [2] * 30, layers) is None
    assert store.lookup(ids + [2], (3,)) is None  # other layer kinds: other states
    store.store(ids, layers, taken)  # already there: nothing added
    assert len(store) == 3 and store.used_bytes == size
    other = ids_of(40, seed=1)
    store.store(other, layers, taken)  # (the same tensors stand in for another prompt's)
    assert len(store) == 6 and store.used_bytes == 2 * size
    store.lookup(ids + [2], layers)  # the first prompt is now the most recently used
    third = ids_of(40, seed=2)
    store.store(third, layers, taken)  # evicts the second prompt, the least recently used
    assert store.lookup(other + [2], layers) is None and store.lookup(ids + [2], layers).tokens == 40
    assert store.lookup(third + [2], layers).tokens == 40 and store.used_bytes == 2 * size
    PrefixCache(capacity_bytes=size - 1).store(ids, layers, taken)  # too large for the whole cache: not kept
    with pytest.raises(ValueError, match="positive"):
        PrefixCache(capacity_bytes=0)
    store.clear()
    assert len(store) == 0 and store.used_bytes == 0
    model.set_dsla_layers([])


def serve(model, prompts, caching: bool):
    """Greedy outputs of the prompts served one after another by an engine with or without the prefix cache."""
    config = EngineConfig(max_num_seqs=4, prefill_chunk=CHUNK, enable_prefix_caching=caching)
    engine = Engine(model, toy_tokenizer(), config, policy=StaticPolicy(len(model.config.active_dsla_layers)))
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    results = []
    for prompt in prompts:
        final = []
        request = engine.submit(prompt, params, lambda o, final=final: final.append(o) if o.finished else None)
        while request.finish_reason is None:
            engine.step()
        results.append((request.output_ids, final[0].cached_tokens))
    return results, engine


@pytest.mark.parametrize("active", [[3, 2], [3, 2, 1, 0]])
def test_engine_outputs_with_the_prefix_cache_equal_those_without(model, active):
    """A repeated prompt (hit at its last chunk boundary), a follow-up turn that resends the previous prompt and
    its answer (hit after the answer) and a prompt sharing only its first chunk: the same greedy tokens as an engine
    without the cache, with the cached tokens and vLLM's counters."""
    model.set_dsla_layers(active)
    first = ids_of(45)
    plain, _ = serve(model, [first], caching=False)
    follow_up = first + plain[0][0] + ids_of(9, seed=3)
    prompts = [first, first, follow_up, first[:20] + ids_of(30, seed=4)]
    cold, _ = serve(model, prompts, caching=False)
    warm, engine = serve(model, prompts, caching=True)
    assert [tokens for tokens, _ in warm] == [tokens for tokens, _ in cold]
    # the repeat: its last chunk boundary; the follow-up: the first turn's prompt and all but the last output token
    assert [cached for _, cached in warm] == [0, 32, 45 + 5, 16]
    assert [cached for _, cached in cold] == [0, 0, 0, 0]
    metrics = engine.metrics
    assert metrics.get("vllm:prefix_cache_queries_total") == sum(map(len, prompts))
    assert metrics.get("vllm:prefix_cache_hits_total") == 32 + 50 + 16
    assert metrics.get("vllm:prompt_tokens_total") == sum(map(len, prompts)) - (32 + 50 + 16)
    model.set_dsla_layers([])
