"""LLM judge against a real loopback HTTP server speaking the OpenAI protocol; proxy judge offline."""

from __future__ import annotations

import json
import logging
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from featmatch.judging import judges
from featmatch.judging.judges import (
    JudgeAuthError,
    JudgeConfigError,
    JudgeError,
    JudgeUnreachableError,
    LLMJudge,
    ProxyJudge,
    format_user_message,
    label_counts,
    load_prompt,
    parse_reply,
)

KEY = "sk-featmatch-TEST-9f3c1e77-do-not-leak-0xDEADBEEF"
ENV_VARS = (
    "FEATMATCH_JUDGE_BASE_URL",
    "FEATMATCH_JUDGE_MODEL",
    "FEATMATCH_JUDGE_API_KEY",
    "OPENAI_BASE_URL",
    "OPENAI_API_KEY",
    "FEATMATCH_JUDGE",
    "FEATMATCH_JUDGE_COST_PER_1K_PROMPT",
    "FEATMATCH_JUDGE_COST_PER_1K_COMPLETION",
)


def _completion(content: str) -> dict:
    return {
        "id": "chatcmpl-test",
        "object": "chat.completion",
        "created": 0,
        "model": "judge-test",
        "choices": [
            {"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}
        ],
        "usage": {"prompt_tokens": 100, "completion_tokens": 20, "total_tokens": 120},
    }


class FakeOpenAI:
    """A chat-completions server on 127.0.0.1 with a queue of canned (status, body) replies.

    Kept: the tests run offline without an API key, and canned replies are the only way to
    drive the retries (429, 500), the key rejection (401) and malformed answers. The client
    side (the ``openai`` package, HTTP, the cache) is real.
    """

    def __init__(self) -> None:
        self.replies: list[tuple[int, dict]] = []
        self.requests: list[dict] = []
        self.auth_headers: list[str] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                outer.requests.append({"path": self.path, "body": body})
                outer.auth_headers.append(self.headers.get("Authorization", ""))
                status, payload = (
                    outer.replies.pop(0)
                    if outer.replies
                    else (500, {"error": {"message": "no reply queued"}})
                )
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        self.base_url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def ok(self, content: str) -> None:
        self.replies.append((200, _completion(content)))

    def error(self, status: int) -> None:
        self.replies.append((status, {"error": {"message": f"canned {status}", "type": "test"}}))

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def server():
    srv = FakeOpenAI()
    yield srv
    srv.close()


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    for var in ENV_VARS:
        monkeypatch.delenv(var, raising=False)


def closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def make_judge(base_url: str, cache: Path, **kw) -> LLMJudge:
    kw.setdefault("max_retries", 3)
    return LLMJudge(
        base_url=base_url,
        model="judge-test",
        api_key=KEY,
        cache_dir=cache,
        backoff=0.001,
        max_backoff=0.01,
        timeout=5.0,
        **kw,
    )


def all_text_under(path: Path) -> str:
    return "".join(p.read_text(encoding="utf-8") for p in path.rglob("*") if p.is_file())


# -- prompt and parsing (no server) ------------------------------------------------------


def test_prompt_is_the_papers_verbatim():
    prompt = load_prompt("explanations")
    assert prompt.startswith("You will receive two text explanations of an LLM features")
    assert prompt.rstrip().endswith("Label: 2")
    assert "Published as a conference paper" not in prompt
    # ../shared/seeds beside the project (as in CI); skipped where the seeds are absent
    seed = Path(__file__).resolve().parents[3] / "shared" / "seeds" / "002_4f49439b4e1c2b8f.txt"
    if seed.exists():  # compare word for word with the paper's text
        text = seed.read_text(encoding="utf-8")
        start = text.index("You will receive two text explanations")
        end = text.index('"""', start)
        original = text[start:end].replace("Published as a conference paper at ICLR 2025", " ")
        assert prompt.split() == original.split()


@pytest.mark.parametrize(
    "reply, label, malformed",
    [
        ("Evaluation: both are about cities.\nLabel: 3", 3, False),
        ("**Label:** 1", 1, False),
        ("label: 2.", 2, False),
        ("Not Label: 1 but on reflection\nLabel: 3", 3, False),
        ("The features are unrelated. 1", 1, False),
        ("Score:\n**2**", 2, False),
        ("Label: 4", None, True),
        ("I cannot decide.", None, True),
        ("They share 2/3 of their tokens", None, True),
        ("", None, True),
    ],
)
def test_parse_reply(reply, label, malformed):
    got, rationale, bad = parse_reply(reply)
    assert (got, bad) == (label, malformed)
    if label == 3 and reply.startswith("Evaluation"):
        assert rationale == "both are about cities."


def test_user_message_formats():
    assert format_user_message("a", "b") == 'Explanation 1: "a"\nExplanation 2: "b"'
    msg = format_user_message(["x «y»", "z"], "w", variant="examples")
    assert msg.splitlines() == ["Feature 1 examples:", "1. x «y»", "2. z", "Feature 2 examples:", "1. w"]


# -- LLM judge over loopback HTTP -----------------------------------------------------------


def test_label_parsed_and_request_shape(server, tmp_path):
    server.ok("Evaluation: both are about programming.\nLabel: 3")
    judge = make_judge(
        server.base_url, tmp_path / "cache", cost_per_1k_prompt=0.15, cost_per_1k_completion=0.6
    )
    v = judge.score("python function definitions", "the def keyword")
    assert (v.label, v.label_name, v.malformed, v.cached) == (3, "SAME", False, False)
    assert v.rationale == "both are about programming."
    assert (v.prompt_tokens, v.completion_tokens) == (100, 20)
    assert v.cost_usd == pytest.approx(0.1 * 0.15 + 0.02 * 0.6)
    req = server.requests[0]
    assert req["path"] == "/v1/chat/completions"
    assert req["body"]["model"] == "judge-test"
    assert req["body"]["messages"][0] == {"role": "system", "content": load_prompt("explanations")}
    assert req["body"]["messages"][1]["content"] == format_user_message(
        "python function definitions", "the def keyword"
    )
    assert server.auth_headers[0] == f"Bearer {KEY}"  # the key is sent to the endpoint, and only there
    assert judge.usage.completions == 1 and judge.usage.prompt_tokens == 100


def test_malformed_reply_recorded_not_counted(server, tmp_path):
    server.ok("These seem somewhat related, hard to say.")
    judge = make_judge(server.base_url, tmp_path / "cache")
    df = judge.score_many([("a", "b")], progress=False)
    row = df.iloc[0]
    assert bool(row["malformed"]) and row["label"] is pd_na()
    assert row["raw"] == "These seem somewhat related, hard to say."
    assert judge.usage.malformed == 1
    counts = label_counts(df, by=None).iloc[0]
    assert (
        counts["DIFFERENT"],
        counts["MAYBE"],
        counts["SAME"],
        counts["malformed"],
        counts["n_scored"],
    ) == (0, 0, 0, 1, 0)


def pd_na():
    import pandas as pd

    return pd.NA


def test_retries_429_then_500_then_success(server, tmp_path, caplog):
    server.error(429)
    server.error(500)
    server.ok("Label: 2")
    judge = make_judge(server.base_url, tmp_path / "cache")
    with caplog.at_level(logging.WARNING, logger="featmatch.judging.judges"):
        v = judge.score("a", "b")
    assert v.label == 2
    assert len(server.requests) == 3 and judge.usage.requests == 3
    assert "HTTP 429" in caplog.text and "HTTP 500" in caplog.text


def test_cache_second_call_sends_nothing(server, tmp_path):
    server.ok("Label: 1")
    cache = tmp_path / "cache"
    v1 = make_judge(server.base_url, cache).score("dates", "parentheses")
    judge2 = make_judge(server.base_url, cache)  # a new process would see the same files
    v2 = judge2.score("dates", "parentheses")
    assert len(server.requests) == 1
    assert (v1.cached, v2.cached, v2.label, v2.prompt_tokens) == (False, True, 1, 100)
    assert judge2.usage.requests == 0 and judge2.usage.cache_hits == 1
    df = judge2.score_many([("dates", "parentheses"), ("dates", "parentheses")], progress=False)
    assert len(server.requests) == 1 and df["cached"].all() and list(df["label"]) == [1, 1]
    entry = json.loads(judge2.cache_path("dates", "parentheses").read_text())
    assert set(entry) == {"model", "reply", "finish_reason", "usage"}


def test_key_never_leaks(server, tmp_path, caplog):
    cache = tmp_path / "cache"
    server.error(503)
    server.ok("Label: 3")
    server.error(400)
    with caplog.at_level(logging.DEBUG):  # every logger, openai and httpx included
        judge = make_judge(server.base_url, cache)
        df = judge.score_many([("x", "y")], progress=False)
        with pytest.raises(JudgeError) as err:
            judge.score("p", "q")
    assert KEY not in all_text_under(cache)
    assert KEY not in caplog.text and KEY[-12:] not in caplog.text
    assert KEY not in str(err.value) and KEY not in repr(err.value)
    assert err.value.__cause__ is None and (err.value.__context__ is None or err.value.__suppress_context__)
    assert KEY not in repr(judge) and KEY not in str(vars(judge))
    assert KEY not in df.to_csv()
    with pytest.raises(TypeError):
        import pickle

        pickle.dumps(judge)


def test_missing_key_is_one_clear_line(tmp_path):
    with pytest.raises(JudgeConfigError) as err:
        LLMJudge(base_url="http://127.0.0.1:9/v1", model="m", cache_dir=tmp_path)
    msg = str(err.value)
    assert "\n" not in msg and "FEATMATCH_JUDGE_API_KEY" in msg


def test_rejected_key_is_clear(server, tmp_path):
    server.error(401)
    with pytest.raises(JudgeAuthError, match="rejected the API key") as err:
        make_judge(server.base_url, tmp_path / "cache").score("a", "b")
    assert "\n" not in str(err.value) and len(server.requests) == 1


def test_unreachable_endpoint_keeps_earlier_work(server, tmp_path):
    cache = tmp_path / "cache"
    server.ok("Label: 3")
    first = make_judge(server.base_url, cache).score_many([("cats", "kittens")], progress=False)
    assert list(first["label"]) == [3]
    dead = make_judge(f"http://127.0.0.1:{closed_port()}/v1", cache, max_retries=1)
    with pytest.raises(JudgeUnreachableError) as err:
        dead.score_many([("cats", "kittens"), ("dates", "months")], progress=False)
    msg = str(err.value)
    assert "\n" not in msg and "cannot reach judge endpoint" in msg and KEY not in msg
    assert err.value.__context__ is None or err.value.__suppress_context__  # no chained traceback
    partial = err.value.partial
    assert list(partial["text_a"]) == ["cats"] and bool(partial["cached"].iloc[0])
    assert dead.cache_path("cats", "kittens").exists()
    assert not dead.cache_path("dates", "months").exists()
    # and the cached verdict still comes back without a server
    assert dead.score("cats", "kittens").label == 3


def test_score_many_dataframe_and_concurrency(server, tmp_path):
    for reply in ["Label: 1", "Label: 2", "Label: 3", "nonsense"]:
        server.ok(reply)
    import pandas as pd

    pairs = pd.DataFrame(
        {
            "layer_a": [0, 0, 1, 1, 1],
            "text_a": ["a", "b", "c", "d", None],
            "text_b": ["e", "f", "g", "h", "i"],
        }
    )
    judge = make_judge(server.base_url, tmp_path / "cache", max_concurrency=2, variant="examples")
    df = judge.score_many(pairs, progress=False)
    assert len(server.requests) == 4 and len(df) == 5
    assert list(df.columns[:3]) == ["layer_a", "text_a", "text_b"]
    assert set(df["label"].dropna()) <= {1, 2, 3} and df["malformed"].sum() == 1
    assert df["label"].isna().sum() == 2  # the malformed reply and the missing text
    assert (df["judge"].iloc[:4] == "llm:judge-test").all() and (df["variant"] == "examples").all()
    assert server.requests[0]["body"]["messages"][0]["content"] == load_prompt("examples")
    counts = label_counts(df)
    assert list(counts["layer_a"]) == [0, 1] and counts["n_scored"].sum() == 3


def test_available_judge_falls_back_to_proxy(monkeypatch, tmp_cache):
    assert isinstance(judges.available_judge(), ProxyJudge)
    monkeypatch.setenv("FEATMATCH_JUDGE_API_KEY", KEY)
    j = judges.available_judge()
    assert isinstance(j, LLMJudge) and KEY not in repr(j)
    monkeypatch.setenv("FEATMATCH_JUDGE", "proxy")
    assert isinstance(judges.available_judge(), ProxyJudge)


# -- offline proxy judge --------------------------------------------------------------------


@pytest.fixture(scope="module")
def proxy():
    return ProxyJudge()


def test_proxy_identical_and_unrelated(proxy):
    same = proxy.score(
        "references to academic institutions or universities",
        "references to academic institutions or universities",
    )
    assert same.label == 3 and same.similarity == pytest.approx(1.0, abs=1e-4)
    assert same.judge == "proxy:all-MiniLM-L6-v2" and not same.malformed and "not an LLM" in same.rationale
    diff = proxy.score("mentions of religious figures and practices", "HTML tags and web markup")
    assert diff.label == 1
    df = proxy.score_many(
        [("closing parentheses in code", "closing brackets in programming syntax")], progress=False
    )
    assert df["judge"].iloc[0] == "proxy:all-MiniLM-L6-v2" and df["label"].iloc[0] == 3
    assert 0 < df["similarity"].iloc[0] <= 1


def test_proxy_thresholds_reproduce_calibration(proxy):
    thresholds, report = judges.calibrate_proxy(proxy)
    assert thresholds == judges.PROXY_THRESHOLDS
    assert report["accuracy"] >= 0.9
    cal = judges.load_proxy_calibration()
    paper = cal[cal["origin"] == "paper"]
    with pytest.raises(ValueError, match="would be overwritten"):
        proxy.score_many(paper, progress=False)
    df = proxy.score_many(paper[["text_a", "text_b"]], progress=False)
    assert list(df["label"]) == list(paper["label"])  # the three App. C examples come out right
