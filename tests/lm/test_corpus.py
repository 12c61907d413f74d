"""The offline corpus: sources exist, the split is deterministic and disjoint, rows carry BOS."""

from __future__ import annotations

import pytest
import torch

from featmatch.lm import corpus


class ByteTokenizer:
    """One token per byte, no special tokens added.

    Kept beside the real SmolLM2 tokenizer (``test_token_batches_with_the_real_tokenizer``)
    because the corpus must not depend on a tokenizer's vocabulary, and it counts tokens
    exactly (the checks on ``add_special_tokens`` and the BOS/EOS fallback need it).
    """

    bos_token_id = 0
    eos_token_id = 1

    def __init__(self, vocab: int = 50) -> None:
        self.vocab = vocab

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        assert add_special_tokens is False
        return [2 + (b % (self.vocab - 2)) for b in text.encode("utf-8")]


@pytest.mark.parametrize("source", ["prose", "docs", "code"])
def test_every_source_has_both_splits(source):
    train = corpus.documents(source, "train")
    ev = corpus.documents(source, "eval")
    assert len(train) > 10 and len(ev) > 2
    assert all(d.source == source and d.text.strip() for d in train + ev)
    # about EVAL_FRACTION of the documents are held out
    assert 0.02 < len(ev) / (len(train) + len(ev)) < 0.3


@pytest.mark.parametrize("source", ["prose", "docs", "code", "mixed"])
def test_splits_are_disjoint_and_cover(source):
    train = {d.doc_id for d in corpus.documents(source, "train")}
    ev = {d.doc_id for d in corpus.documents(source, "eval")}
    both = corpus.documents(source, None)
    assert not train & ev
    assert train | ev == {d.doc_id for d in both}
    assert len(both) == len({d.doc_id for d in both}), "document ids must be unique"


def test_split_depends_only_on_the_id():
    assert corpus.split_of("prose/Genesis 1") == corpus.split_of("prose/Genesis 1")
    for d in corpus.documents("mixed", None)[:200]:
        assert d.split == corpus.split_of(d.doc_id)


def test_code_excludes_tests_and_is_python():
    ids = [d.doc_id for d in corpus.documents("code", None)]
    assert not any("/test/" in i or "/tests/" in i or i.split("/")[-1].startswith("test_") for i in ids)
    assert "code/json/decoder.py" in ids


def test_token_batches_shape_bos_and_determinism():
    tok = ByteTokenizer()
    a = corpus.token_batches(tok, 1000, seq_len=32, source="mixed", split="train", seed=0)
    b = corpus.token_batches(tok, 1000, seq_len=32, source="mixed", split="train", seed=0)
    c = corpus.token_batches(tok, 1000, seq_len=32, source="mixed", split="train", seed=1)
    assert a.dtype == torch.long and a.shape == (32, 32)  # ceil(1000 / 32) rows
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert (a[:, 0] == tok.bos_token_id).all()
    assert (a[:, 1:] != tok.bos_token_id).all(), "BOS appears only in column 0"


def test_token_batches_with_the_real_tokenizer():
    from featmatch.lm.models import load_tokenizer

    tok = load_tokenizer("smollm2-135m")
    a = corpus.token_batches(tok, 1000, seq_len=32, source="mixed", split="eval", seed=0)
    assert a.shape == (32, 32) and torch.equal(a, corpus.token_batches(tok, 1000, 32, "mixed", "eval", 0))
    assert (a[:, 0] == tok.bos_token_id).all() and not (a[:, 1:] == tok.bos_token_id).any()
    assert int(a.max()) < tok.vocab_size and int(a.min()) >= 0
    # real subword tokens: far fewer tokens than bytes, and the text round-trips
    text = tok.decode(a[0, 1:].tolist())
    assert len(text) > 2 * 31 and "\ufffd" not in text[1:-1]


def test_eval_and_train_tokens_differ():
    tok = ByteTokenizer()
    tr = corpus.token_batches(tok, 2048, seq_len=64, source="prose", split="train")
    ev = corpus.token_batches(tok, 2048, seq_len=64, source="prose", split="eval")
    assert not torch.equal(tr, ev)


def test_eos_fallback_for_bos():
    class NoBos(ByteTokenizer):
        bos_token_id = None
        eos_token_id = 1

    t = corpus.token_batches(NoBos(), 64, seq_len=16, source="docs")
    assert (t[:, 0] == 1).all()


def test_corpus_hash_is_stable_and_source_specific():
    h = corpus.corpus_hash()
    assert h == corpus.corpus_hash("mixed", None)
    assert len(h) == 64
    assert corpus.corpus_hash("prose") != corpus.corpus_hash("code")


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"source": "webtext"}, "unknown corpus source"),
        ({"split": "test"}, "unknown split"),
        ({"seq_len": 1}, "seq_len"),
        ({"n_tokens": 0}, "n_tokens"),
    ],
)
def test_clear_errors(kwargs, match):
    args = {"n_tokens": 64, **kwargs}
    with pytest.raises(ValueError, match=match):
        corpus.token_batches(ByteTokenizer(), **args)


def test_mix_allocation_respects_weights_and_caps():
    alloc = corpus._allocate(100, {"prose": 1000, "docs": 1000, "code": 1000})
    assert sum(alloc.values()) == 100
    assert alloc == {"prose": 40, "docs": 20, "code": 40}
    capped = corpus._allocate(100, {"prose": 1000, "docs": 5, "code": 1000})
    assert capped["docs"] == 5 and sum(capped.values()) == 100
