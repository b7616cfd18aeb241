"""Packed sequences (documents laid end to end in one row, as padding-free training collates them): DSLA layers reset
their states and window at each document, on every CPU backend, and agree with each document run alone."""

from __future__ import annotations

import pytest
import torch

from dsla_hf import DSLACache, convert_llama_to_dsla
from dsla_hf.kernels import window_attention
from dsla_hf.kernels.dispatch import cpp_available, package_module
from dsla_hf.kernels.window import rotate_half

LENGTHS = (3, 9, 17)  # shorter than, and longer than, a window of 4 and the kernels' chunks


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.fixture(params=["torch", "cpp"])
def backend(request, monkeypatch):
    """The CPU backend of the DSLA kernels (read by kernels/dispatch.py at each call)."""
    monkeypatch.setenv("DSLA_HF_CPP_KERNEL", "1" if request.param == "cpp" else "0")
    if request.param == "cpp" and not cpp_available():
        pytest.skip("the C++ CPU kernel is not available here")
    return request.param


def packed_model(teacher, window: int, active=(0, 2), **kwargs):
    """Layers `active` run as DSLA (the others stay softmax attention), parameters moved off their initial values."""
    model = convert_llama_to_dsla(teacher, layers="all", active=list(active), dsla_window=window, **kwargs).eval()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer in model.model.layers:
            for name, p in layer.linear_attn.named_parameters():
                if name != "gates.bias":
                    p.add_(0.05 * torch.randn(p.shape, generator=gen))
    return model


def documents(seed: int = 0, lengths=LENGTHS) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 101, (1, n), generator=gen) for n in lengths]


def packing(docs: list[torch.Tensor], how: str) -> dict:
    """The inputs of one packed row: position ids restarting at 0 (with an all-ones mask for "ones"), or flash
    attention's kwargs, or both."""
    lengths = [d.shape[1] for d in docs]
    batch = {"input_ids": torch.cat(docs, 1)}
    if how == "ones":
        batch["attention_mask"] = torch.ones_like(batch["input_ids"])
    if how in ("position_ids", "both", "ones"):
        batch["position_ids"] = torch.cat([torch.arange(n) for n in lengths])[None]
    if how in ("cu_seq_lens", "both"):
        cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
        batch.update(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=max(lengths), max_length_k=max(lengths))
    return batch


def alone(model, docs) -> torch.Tensor:
    return torch.cat([model(d, use_cache=False).logits for d in docs], 1)


def spy_cpp_kernels(monkeypatch) -> list[str]:
    """Record the C++ kernel calls that carried packing (cu_seqlens to the chunk kernel, doc_start to the window)."""
    calls = []
    chunk, window = package_module("cpp_chunk"), package_module("cpp_window")
    chunk_fn, window_fn = chunk.chunk_dsla_cpp, window.window_attention_cpp

    def chunk_spy(x, *args, **kwargs):  # x: the call's checked inputs (DSLAInputs)
        calls.append("chunk" if x.cu_seqlens is not None else "chunk1")
        return chunk_fn(x, *args, **kwargs)

    def window_spy(*args, doc_start=None, **kwargs):
        calls.append("window" if doc_start is not None else "window1")
        return window_fn(*args, doc_start=doc_start, **kwargs)

    monkeypatch.setattr(chunk, "chunk_dsla_cpp", chunk_spy)
    monkeypatch.setattr(window, "window_attention_cpp", window_spy)
    return calls


@pytest.mark.parametrize("how", ["position_ids", "cu_seq_lens", "both", "ones"])
@pytest.mark.parametrize("window", [0, 4])
def test_packed_row_matches_documents_alone(tiny_teacher, backend, window, how, monkeypatch):
    """DSLA layers 0 and 2 and softmax layers 1 and 3 in one model: the packed row's logits are those of each
    document run alone (the softmax layers through Transformers' packed masks, fed by the position ids; an all-ones
    mask, under which Transformers would not look for packing, is dropped)."""
    model = packed_model(tiny_teacher, window)
    docs = documents()
    calls = spy_cpp_kernels(monkeypatch) if backend == "cpp" else []
    with torch.no_grad():
        out = model(**packing(docs, how))
        expected = alone(model, docs)
    assert out.cache is None  # nothing to continue: no cache is made for a packed row
    assert (out.logits - expected).abs().max() <= 1e-5
    if backend == "cpp":  # the packed row went through the C++ kernels, with its documents
        kinds = ["chunk", "window"] if window else ["chunk"]
        assert calls[: 2 * len(kinds)] == kinds * 2
        assert set(calls[2 * len(kinds) :]) == {kind + "1" for kind in kinds}  # the documents alone: no packing


@pytest.mark.parametrize("window,preset", [(0, "default"), (4, "default"), (0, "paper")])
def test_packed_rows_of_a_batch(tiny_teacher, backend, window, preset):
    """Two rows packed differently (position ids restarting per row), as Transformers' masks allow; the kernels take
    them as one packed row (the paper preset's gates read the hidden state, laid out likewise)."""
    model = packed_model(tiny_teacher, window, active=(0, 1, 3), dsla_preset=preset)
    first, second = documents(0), documents(1, lengths=(17, 9, 3))
    rows = packing(first, "position_ids"), packing(second, "position_ids")
    batch = {key: torch.cat([rows[0][key], rows[1][key]]) for key in rows[0]}
    with torch.no_grad():
        got = model(**batch, use_cache=False).logits
        assert (got[0] - alone(model, first)[0]).abs().max() <= 1e-5
        assert (got[1] - alone(model, second)[0]).abs().max() <= 1e-5


def test_packed_row_paper_preset(tiny_teacher, backend):
    """The paper preset (gates from the hidden state, its own projections, no window) restarts its states too."""
    model = packed_model(tiny_teacher, 0, active=(1, 2), dsla_preset="paper")
    docs = documents(2)
    with torch.no_grad():
        assert (model(**packing(docs, "position_ids")).logits - alone(model, docs)).abs().max() <= 1e-5


@pytest.mark.parametrize("how", ["position_ids", "cu_seq_lens"])
@pytest.mark.parametrize("window", [0, 4])
def test_packed_gradients_are_the_sum_over_documents(tiny_teacher, window, how):
    """Training on a packed row: the gradient of every parameter (DSLA and teacher weights) is the sum of the
    gradients of the documents run alone (PyTorch path, the backward's)."""
    model = packed_model(tiny_teacher, window)
    docs = documents(3)
    weight = torch.randn(1, sum(LENGTHS), 101, generator=torch.Generator().manual_seed(4))
    params = [p for p in model.parameters() if p.requires_grad]

    def grads(loss):
        return torch.autograd.grad(loss, params, allow_unused=True)

    packed = grads((model(**packing(docs, how), use_cache=False).logits * weight).sum())
    pieces, start = [], 0
    for d in docs:
        n = d.shape[1]
        pieces.append(grads((model(d, use_cache=False).logits * weight[:, start : start + n]).sum()))
        start += n
    checked = 0
    for got, *parts in zip(packed, *pieces):
        if got is None:
            continue
        want = torch.stack(parts).sum(0)
        assert rel(got, want) <= 1e-4
        checked += 1
    dsla_params = sum(1 for n, p in model.named_parameters() if p.requires_grad and ".linear_attn." in n)
    assert checked > dsla_params  # DSLA parameters of the two DSLA layers and the teacher's weights


def test_flattening_collator_through_the_model(tiny_teacher, backend):
    """Transformers' `DataCollatorWithFlattening` (what TRL's padding-free training collates) straight into the
    model: logits and loss (labels -100 at each document's first token) are those of the documents alone."""
    from transformers import DataCollatorWithFlattening

    model = packed_model(tiny_teacher, 4, active=(0, 3))
    docs = documents(5)
    batch = DataCollatorWithFlattening(return_flash_attn_kwargs=True)([{"input_ids": d[0].tolist()} for d in docs])
    with torch.no_grad():
        out = model(**batch)
        pieces = [model(d, labels=d, use_cache=False) for d in docs]
    assert (out.logits - torch.cat([p.logits for p in pieces], 1)).abs().max() <= 1e-5
    counts = [d.shape[1] - 1 for d in docs]  # predicted tokens of each document
    expected = sum(p.loss * n for p, n in zip(pieces, counts)) / sum(counts)
    assert abs(out.loss - expected) <= 1e-5


def test_distill_trainer_padding_free(tiny_teacher, tmp_path):
    """`DSLADistillTrainer` with `padding_free=True` (TRL flattens each batch into one packed row, no attention mask;
    TRL 1.16 allows it with SDPA on CPUs): every loss term on the packed batch equals the same term on the padded
    batch of the same documents, and training steps run on packed batches."""
    import datasets
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    from dsla_hf.trainers.distill import DSLADistillConfig, DSLADistillTrainer
    from tests.test_trainer import tiny_tokenizer

    student = packed_model(tiny_teacher, 4, active=(0, 2))
    for p in student.parameters():
        p.requires_grad_(False)
    rows = [d[0].tolist() for d in documents(6, lengths=(3, 9, 17, 11, 5, 14))]
    args = DSLADistillConfig(
        output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=3, learning_rate=1e-2, logging_steps=1,
        ce_weight=0.5, gate_divergence_weight=0.0, padding_free=True, use_cpu=True, disable_tqdm=True,
    )  # fmt: skip
    trainer = DSLADistillTrainer(
        model=student, args=args, teacher=tiny_teacher, train_dataset=datasets.Dataset.from_dict({"input_ids": rows}),
        processing_class=tiny_tokenizer(),
    )  # fmt: skip
    examples = [trainer.train_dataset[i] for i in range(3)]
    packed = trainer.data_collator(examples)
    assert "attention_mask" not in packed and packed["input_ids"].shape[0] == 1
    assert packed["position_ids"][0].eq(0).sum() == 3
    padded = DataCollatorForLanguageModeling(pad_token_id=0)(examples)
    terms = ("align_loss", "kl_loss", "ce_loss")
    values = []
    student.eval()
    with torch.no_grad():
        # a packed row with an all-ones mask (custom collators send one) must not mix documents either
        ones = {**packed, "attention_mask": torch.ones_like(packed["input_ids"])}
        for batch in (packed, padded, ones):
            loss = trainer.compute_loss(student, batch)
            values.append((loss, *(trainer._metrics["eval"][name][-1] for name in terms)))
    assert values[0][1] > 0 and values[0][2] > 0 and values[0][3] > 0
    for other in values[1:]:
        for got, want in zip(values[0], other):
            assert abs(float(got) - float(want)) <= 1e-5 * max(1.0, abs(float(want)))
    before = {k: v.clone() for k, v in student.state_dict().items()}
    trainer.train()
    assert len([h for h in trainer.state.log_history if "kl_loss" in h]) == 2
    changed = {k for k, v in student.state_dict().items() if not torch.equal(before[k], v)}
    assert changed and all(".linear_attn." in k for k in changed)


# --- the window kernel with documents -----------------------------------------------------------------------------


def window_inputs(B=2, T=30, W=4, H=4, HK=2, D=8, seed=0):
    gen = torch.Generator().manual_seed(seed)
    P = W + T
    freqs = torch.arange(P, dtype=torch.float32)[None, :, None] / 100 ** (torch.arange(0, D, 2) / D).repeat(2)
    valid = torch.ones(B, P)
    valid[:, :W] = 0  # an empty window's null entries
    starts = torch.zeros(B, T, dtype=torch.long)  # row 0: documents at 0, 3, 12; row 1: at 0, 17
    for b, cuts in enumerate([(3, 12), (17,)]):
        for cut in cuts:
            starts[b, cut:] = cut
    return dict(
        q=torch.randn(B, T, H, D, generator=gen), keys=torch.randn(B, P, HK, D, generator=gen),
        values=torch.randn(B, P, HK, D, generator=gen), valid=valid, cos=freqs.cos().expand(B, -1, -1),
        sin=freqs.sin().expand(B, -1, -1), lin=torch.rand(B, T, H, D + 1, generator=gen),
        log_scale=torch.randn(H, generator=gen), doc_start=starts + W,
    )  # fmt: skip


def test_window_with_documents_is_softmax_within_each_document():
    x = window_inputs()
    o = window_attention(**x, backend="torch")
    W, D, G = 4, 8, 2
    rot = lambda t, b, i: t * x["cos"][b, i] + rotate_half(t) * x["sin"][b, i]
    for b in range(2):
        for t in range(30):
            for h in range(4):
                seen = [i for i in range(max(t + 1, int(x["doc_start"][b, t])), t + W + 1) if x["valid"][b, i] > 0]
                q = rot(x["q"][b, t, h], b, W + t)
                scores = torch.stack([q @ rot(x["keys"][b, i, h // G], b, i) for i in seen]) / D**0.5
                m = scores.max().clamp(min=0)
                e, c = (scores - m).exp(), (x["log_scale"][h] - m).exp()
                lin = x["lin"][b, t, h]
                want = (e @ x["values"][b, seen, h // G] + c * lin[:D]) / (e.sum() + c * lin[D] + 1e-6)
                assert torch.allclose(o[b, t, h], want, atol=1e-5), (b, t, h)
    assert not torch.allclose(o, window_attention(**dict(x, doc_start=None), backend="torch"), atol=1e-3)


@pytest.mark.parametrize("T,W", [(30, 4), (70, 8), (40, 1)])
def test_cpp_window_with_documents_matches_torch(T, W):
    if not cpp_available():
        pytest.skip("the C++ CPU kernel is not available here")
    x = window_inputs(T=T, W=W)
    with torch.no_grad():
        assert (window_attention(**x, backend="cpp") - window_attention(**x, backend="torch")).abs().max() <= 1e-5


def test_window_doc_start_shape_is_checked():
    x = window_inputs()
    with pytest.raises(ValueError, match="doc_start"):
        window_attention(**dict(x, doc_start=x["doc_start"][:, 1:]))


# --- what is refused, and what is not -----------------------------------------------------------------------------


def test_custom_masks_and_unsupported_combinations_are_refused(tiny_teacher):
    model = packed_model(tiny_teacher, 4)
    docs = documents()
    batch = packing(docs, "position_ids")
    T = batch["input_ids"].shape[1]
    mask4d = torch.ones(1, 1, T, T, dtype=torch.bool).tril()
    with torch.no_grad():
        with pytest.raises(ValueError, match=r"shape \(1, 1, 29, 29\) cannot be honoured by the DSLA layers \[0, 2\]"):
            model(batch["input_ids"], attention_mask=mask4d, use_cache=False)
        with pytest.raises(ValueError, match="without a cache"):
            model(**batch, cache=DSLACache(model.config))
        with pytest.raises(ValueError, match="without a cache"):
            model(**batch, use_cache=True)
        padded = dict(batch, attention_mask=torch.ones(1, T, dtype=torch.long).index_fill_(1, torch.tensor([28]), 0))
        with pytest.raises(ValueError, match="packed documents and padding together"):
            model(**padded, use_cache=False)
        with pytest.raises(ValueError, match="describe different documents"):
            model(**dict(packing(docs, "cu_seq_lens"), position_ids=torch.arange(T)[None]), use_cache=False)
        two = packing(docs, "cu_seq_lens")
        with pytest.raises(ValueError, match="a batch of one row"):
            model(**dict(two, input_ids=two["input_ids"].expand(2, -1)), use_cache=False)
        # softmax layers alone take any mask Transformers takes
        model.set_dsla_layers([])
        assert torch.allclose(
            model(batch["input_ids"], attention_mask=mask4d, use_cache=False).logits,
            tiny_teacher(batch["input_ids"], attention_mask=mask4d, use_cache=False).logits,
            atol=1e-5,
        )


def test_left_padding_with_generation_style_positions_is_not_packing(tiny_teacher):
    """Pads at position 1 before a row's first token at 0 (as `generate` numbers them) are padding, not a packed
    document: accepted, and the padded row's tokens match the row alone."""
    model = packed_model(tiny_teacher, 4)
    doc = documents(7, lengths=(12,))[0]
    ids = torch.cat([doc, torch.cat([torch.zeros(1, 5, dtype=torch.long), doc[:, :7]], 1)])
    mask = (torch.arange(12) >= torch.tensor([[0], [5]])).long()
    positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
    with torch.no_grad():
        got = model(ids, attention_mask=mask, position_ids=positions, use_cache=False).logits
        assert (got[0] - model(doc).logits[0]).abs().max() <= 1e-5
        assert (got[1, 5:] - model(doc[:, :7]).logits[0]).abs().max() <= 1e-5
