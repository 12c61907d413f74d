"""Explanation sources: Neuronpedia export files, the Neuronpedia API offline, context summaries."""

from __future__ import annotations

import gzip
import json
import socket
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from featmatch.judging.explanations import (
    ContextExplanations,
    ExplanationError,
    ExplanationSource,
    NeuronpediaAPI,
    NeuronpediaExport,
    NeuronpediaUnavailableError,
    matched_pairs,
    parse_layer,
)


def _record(layer_source: str, index: int | str, description: str, explainer: str = "gpt-4o-mini") -> dict:
    # the fields of a Neuronpedia explanation export record (explanations/*.jsonl.gz or
    # /api/explanation/export), with the source id in "layer" and the index as a string
    return {
        "id": f"clx{index}",
        "modelId": "gemma-2-2b",
        "layer": layer_source,
        "index": str(index),
        "description": description,
        "explanationModelName": explainer,
        "typeName": "oai_token-act-pair",
        "authorId": "x",
        "createdAt": "2024-08-01T00:00:00.000Z",
    }


@pytest.fixture
def export_folder(tmp_path):
    folder = tmp_path / "export"
    (folder / "gemma-2-2b" / "20-gemmascope-res-16k" / "explanations").mkdir(parents=True)
    # a plain JSON list (the API export), layer 19
    (folder / "layer19.json").write_text(
        json.dumps(
            [
                _record("19-gemmascope-res-16k", 0, "references to academic institutions"),
                _record("19-gemmascope-res-16k", 7, "closing parentheses in code"),
            ]
        )
    )
    # a gzipped JSONL batch (the S3 exports bucket), layer 20, with two explainers for feature 3
    batch = folder / "gemma-2-2b" / "20-gemmascope-res-16k" / "explanations" / "batch-0.jsonl.gz"
    with gzip.open(batch, "wt", encoding="utf-8") as fh:
        for rec in [
            _record("20-gemmascope-res-16k", 3, " mentions of universities ", explainer="gpt-4o-mini"),
            _record("20-gemmascope-res-16k", 3, "colleges and schools", explainer="claude"),
            _record("20-gemmascope-res-16k", 9, "the token 'pi'"),
            {"modelId": "gemma-2-2b", "layer": "20-gemmascope-res-16k", "index": "11", "description": ""},
        ]:
            fh.write(json.dumps(rec) + "\n")
        fh.write("\n")
    # another model's file, filtered out by model_id
    other = _record("19-gemmascope-res-16k", 0, "something else")
    other["modelId"] = "gpt2-small"
    (folder / "other.jsonl").write_text(json.dumps(other) + "\n")
    return folder


def test_parse_layer():
    assert parse_layer("20-gemmascope-res-16k") == 20
    assert parse_layer("6-res-jb") == 6
    assert parse_layer("blocks.5.hook_resid_post") == 5
    assert parse_layer(3) == 3 and parse_layer("12") == 12
    assert parse_layer("gemmascope") is None


def test_neuronpedia_export(export_folder):
    src = NeuronpediaExport(export_folder, model_id="gemma-2-2b")
    assert isinstance(src, ExplanationSource)
    assert src.layers == [19, 20] and len(src) == 4
    assert src.explain(19, 0) == "references to academic institutions"
    assert src.explain(20, 3) == "mentions of universities"  # first in file order, stripped
    assert src.all(20, 3) == ["mentions of universities", "colleges and schools"]
    assert src.explain(20, 11) is None and src.explain(5, 0) is None  # empty description, unknown layer
    assert (
        NeuronpediaExport(export_folder, model_id="gemma-2-2b", explainer="claude").explain(20, 3)
        == "colleges and schools"
    )
    assert src.explain_many([(19, 7), (20, 9)]) == {
        (19, 7): "closing parentheses in code",
        (20, 9): "the token 'pi'",
    }
    only20 = NeuronpediaExport(export_folder, source="20-gemmascope-res-16k")
    assert only20.layers == [20]


def test_neuronpedia_export_errors(tmp_path, export_folder):
    with pytest.raises(ExplanationError, match="not found"):
        NeuronpediaExport(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ExplanationError, match="no Neuronpedia export files"):
        NeuronpediaExport(tmp_path / "empty")
    (export_folder / "res65k.json").write_text(json.dumps([_record("19-gemmascope-res-65k", 1, "x")]))
    with pytest.raises(ExplanationError, match="several sources"):
        NeuronpediaExport(export_folder, model_id="gemma-2-2b")
    assert NeuronpediaExport(export_folder, source="gemmascope-res-16k").layers == [19, 20]


def test_neuronpedia_api_offline_is_clear(tmp_path):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens here: connection refused, no network touched
    api = NeuronpediaAPI(
        "gemma-2-2b",
        "{layer}-gemmascope-res-16k",
        cache_dir=tmp_path,
        base_url=f"http://127.0.0.1:{port}",
        timeout=2,
        api_key="np-secret-key-123",
    )
    assert api.source_id(20) == "20-gemmascope-res-16k"
    with pytest.raises(NeuronpediaUnavailableError) as err:
        api.explain(20, 5)
    msg = str(err.value)
    assert "\n" not in msg and "cannot reach Neuronpedia" in msg and "np-secret-key-123" not in msg
    assert "np-secret-key-123" not in repr(api)
    # answers already cached are served offline
    (tmp_path / "gemma-2-2b" / "20-gemmascope-res-16k").mkdir(parents=True)
    (tmp_path / "gemma-2-2b" / "20-gemmascope-res-16k" / "5.json").write_text(
        json.dumps({"explanations": [{"description": "cached text", "explainer": "gpt-4o-mini"}]})
    )
    assert api.explain(20, 5) == "cached text"


class FakeTokenizer:
    """Token id i decodes to the word vocab[i] with a leading space.

    Kept (with ``fake_stats``): the expected snippets below are written out by hand, which
    needs a vocabulary and top activations chosen for the test, not SmolLM2's.
    """

    vocab = ["<bos>", "the", "cat", "sat", "on", "mat", "Paris", "London", "flew", "to", "\n"]

    def decode(self, ids):
        return "".join(" " + self.vocab[i] if self.vocab[i] != "\n" else "\n" for i in ids)


def fake_stats():
    seq_len = 6
    tokens = torch.tensor(
        [
            [0, 8, 9, 6, 4, 5],  # flew to Paris on mat
            [0, 1, 2, 3, 9, 7],  # the cat sat to London
            [0, 8, 9, 6, 10, 1],  # flew to Paris \n the
        ],
        dtype=torch.long,
    )
    # feature 0 fires on cities; feature 1 never fires; feature 2 only on BOS (excluded)
    top_positions = np.array(
        [[0 * seq_len + 3, 1 * seq_len + 5, 2 * seq_len + 3, -1], [-1, -1, -1, -1], [0, -1, -1, -1]],
        dtype=np.int64,
    )
    top_values = np.array(
        [[5.0, 4.0, 3.0, 0.0], [0.0, 0.0, 0.0, 0.0], [9.0, 0.0, 0.0, 0.0]], dtype=np.float32
    )
    return SimpleNamespace(top_values={4: top_values}, top_positions={4: top_positions}, tokens=tokens)


def test_context_explanations():
    src = ContextExplanations(fake_stats(), FakeTokenizer(), n_snippets=3, before=2, after=1)
    assert isinstance(src, ExplanationSource)
    assert src.top_tokens(4, 0) == [(" Paris", 2), (" London", 1)]
    ex = src.examples(4, 0)
    assert ex[0] == " flew to «Paris» on…"
    assert ex[1] == "… sat to «London»"
    assert ex[2] == " flew to «Paris»\\n…"  # newlines are shown escaped
    text = src.explain(4, 0)
    assert text.startswith('top tokens: " Paris" ×2, " London" ×1 | snippets: ')
    assert text.count("«") == 3
    assert src.explain(4, 1) is None and src.explain(4, 2) is None
    with pytest.raises(ExplanationError, match="out of range"):
        src.explain(4, 99)
    with pytest.raises(ExplanationError, match="no top_values for layer 7"):
        src.explain(7, 0)


def test_matched_pairs(export_folder):
    src = NeuronpediaExport(export_folder, model_id="gemma-2-2b")
    perm = np.full(10, -1)
    perm[0], perm[7] = 3, 9
    df = matched_pairs(src, 19, 20, perm)
    assert list(df.columns) == ["layer_a", "feature_a", "layer_b", "feature_b", "text_a", "text_b"]
    assert df[["feature_a", "feature_b"]].values.tolist() == [[0, 3], [7, 9]]
    assert df["text_b"].tolist() == ["mentions of universities", "the token 'pi'"]
    perm[1] = 11  # feature 1 of layer 19 has no explanation
    assert len(matched_pairs(src, 19, 20, perm)) == 2
    assert len(matched_pairs(src, 19, 20, perm, drop_missing=False)) == 3


def test_neuronpedia_api_against_loopback(tmp_path):
    # a local stand-in for neuronpedia.org, which the tests must not reach (offline, no key)
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    seen: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            seen.append(self.path)
            if self.path.startswith("/api/feature/gemma-2-2b/20-gemmascope-res-16k/5"):
                body = {
                    "modelId": "gemma-2-2b",
                    "layer": "20-gemmascope-res-16k",
                    "index": "5",
                    "explanations": [
                        {"description": "years and dates", "explanationModelName": "gpt-4o-mini"}
                    ],
                }
            elif self.path.startswith("/api/explanation/export"):
                body = [_record("21-gemmascope-res-16k", 8, "code comments")]
            else:
                self.send_response(404)
                self.end_headers()
                return
            data = json.dumps(body).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    srv = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        api = NeuronpediaAPI(
            "gemma-2-2b",
            "{layer}-gemmascope-res-16k",
            cache_dir=tmp_path,
            base_url=f"http://127.0.0.1:{srv.server_address[1]}",
        )
        assert api.explain(20, 5) == "years and dates"
        assert api.explain(20, 5) == "years and dates" and len(seen) == 1  # cached
        api.download_layer(21)
        assert api.explain_many([(21, 8), (21, 9)]) == {(21, 8): "code comments", (21, 9): None}
        assert len(seen) == 2
        with pytest.raises(ExplanationError, match="HTTP 404"):
            api.explain(22, 1)
    finally:
        srv.shutdown()
        srv.server_close()
