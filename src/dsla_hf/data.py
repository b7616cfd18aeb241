"""Offline text corpora (DESIGN §4): CPython's pydoc topics (always present) and Debian documentation packages."""

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
