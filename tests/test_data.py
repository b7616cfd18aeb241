"""Data: offline corpora, local files, packing, and held-out text disjoint from training text."""

import json

import pytest

from dsla_hf.data import build_datasets, load_text_dataset, pack_dataset, pydoc_documents


class CharTokenizer:
    """A tiny stand-in tokenizer: one id per character."""

    eos_token_id = 1

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [3 + (ord(c) % 90) for c in text]}


def test_pydoc_parts_are_disjoint_and_cover_everything():
    train, held, everything = pydoc_documents("train"), pydoc_documents("heldout"), pydoc_documents("all")
    assert held and train
    assert not set(train) & set(held)
    assert sorted(train + held) == sorted(everything)


def test_local_text_and_json_files(tmp_path):
    (tmp_path / "a.txt").write_text("hello world " * 20)
    (tmp_path / "b.txt").write_text("second doc " * 20)
    ds = load_text_dataset(str(tmp_path))
    assert len(ds) == 2 and ds.column_names == ["text"]
    rows = tmp_path / "rows.jsonl"
    rows.write_text("\n".join(json.dumps({"content": f"row {i} " * 10}) for i in range(5)))
    ds = load_text_dataset(str(rows), text_field="content")
    assert len(ds) == 5 and ds[0]["text"].startswith("row 0")


def test_packing_makes_full_rows_with_eos_between_documents():
    import datasets

    ds = datasets.Dataset.from_dict({"text": ["abcdefghij", "klmnopqrst"]})
    packed = pack_dataset(ds, CharTokenizer(), seq_len=7)
    assert len(packed) == 3  # 22 tokens (two EOS) -> three rows of 7
    flat = sum(packed["input_ids"], [])
    assert flat[10] == CharTokenizer.eos_token_id
    assert all(len(r) == 7 and sum(m) == 7 for r, m in zip(packed["input_ids"], packed["attention_mask"]))


def test_same_source_for_training_and_held_out_is_split_disjointly():
    tok = CharTokenizer()
    train, held = build_datasets(tok, 64, ["pydoc"], "pydoc", train_sequences=16, heldout_sequences=4)
    assert len(train) == 16 and len(held) == 4
    train_rows = {tuple(r) for r in train["input_ids"]}
    assert not any(tuple(r) in train_rows for r in held["input_ids"])


def test_missing_offline_corpus_is_a_clear_error(monkeypatch):
    import dsla_hf.data as data

    monkeypatch.setattr(data, "shakespeare_files", lambda: [])
    with pytest.raises(FileNotFoundError, match="not installed"):
        load_text_dataset("shakespeare")
