"""The demo's evaluation step on the toy model: every model it lists is scored at its own layers, with the same
numbers as the metrics called directly."""

import argparse

import torch

from dsla_hf.commands.demo import DemoData, evaluate_models, generation_stats
from dsla_hf.evaluation.metrics import perplexity
from dsla_hf.serving.models import toy_model, toy_tokenizer


def test_evaluate_models_scores_each_model_at_its_layers():
    model, tokenizer = toy_model(), toy_tokenizer()
    heldout = torch.randint(3, 101, (2, 40), generator=torch.Generator().manual_seed(0))
    data = DemoData(sources={}, train_ds=None, heldout_ds=None, heldout_ids=heldout, ood_ids=heldout[:, :20])
    args = argparse.Namespace(long_context=24, passkey_lengths=[80], passkey_trials=1)
    results = evaluate_models(args, model, tokenizer, data, [("teacher", 0.0), ("DSLA 50%", 0.5)])
    assert [results[name]["dsla_layers"] for name in results] == [[], [2, 3]]
    for name, ratio in (("teacher", 0.0), ("DSLA 50%", 0.5)):
        model.set_dsla_layers(ratio)
        entry = results[name]
        assert entry["heldout"]["ppl"] == perplexity(model, heldout, 2)["ppl"]
        assert entry["ood"]["ppl"] == perplexity(model, heldout[:, :20], 2)["ppl"]
        assert set(entry["passkey"]["per_length"]) == {"80"} and 0 <= entry["passkey"]["accuracy"] <= 1
        assert entry["heldout_long"]["tokens"] == heldout.numel() - 1


def test_generation_stats_decodes_greedy_tokens_with_the_cache():
    model = toy_model()
    model.set_dsla_layers(0.5)
    ids = torch.randint(3, 101, (1, 30), generator=torch.Generator().manual_seed(1))
    stats = generation_stats(model, ids, 6)
    # The reference: the same greedy tokens from full forwards without a cache.
    seq = ids
    with torch.no_grad():
        for _ in range(6):
            seq = torch.cat([seq, model(seq, use_cache=False).logits[:, -1:].argmax(-1)], 1)
    assert torch.equal(stats["tokens"], seq[:, ids.shape[1] :])
    assert stats["prefill_s"] > 0 and stats["decode_ms_per_token"] > 0 and stats["cache_mib"] > 0
