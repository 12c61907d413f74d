"""Task prompts for circuit discovery: digit addition in several formats, tokenisation,
greedy accuracy per format, and the filter that keeps only correctly answered prompts.

SmolLM2 tokenises every digit as its own token and a space before a digit as a separate
``" "`` token (``"3 plus 4 is 7"`` -> ``['3', ' plus', ' ', '4', ' is', ' ', '7']``).
The built-in formats therefore end with that space when the answer follows one
(``"3 plus 4 is "``), so the answer is a single digit token and the metric reads one logit.
Answer tokens are always derived as the continuation of the prompt's own tokenisation
(``tokens(prompt + answer)[len(tokens(prompt)):]``), which handles any tokeniser.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch

__all__ = [
    "ADDITION_FORMATS",
    "TaskPrompts",
    "TaskTokens",
    "digit_addition_prompts",
    "tokenize_task",
    "answer_accuracy",
    "accuracy_by_format",
    "keep_correct",
]

#: Built-in digit-addition formats: name -> template with ``{a}``, ``{b}``. Names starting
#: with ``chat`` are wrapped in the tokenizer's chat template (user turn + generation prompt).
ADDITION_FORMATS: dict[str, str] = {
    "plus_is": "{a} plus {b} is ",
    "symbolic": "{a}+{b}=",
    "symbolic_spaced": "{a} + {b} = ",
    "question": "What is {a} plus {b}? Answer: ",
    "sentence": "If you add {a} and {b}, you get ",
    "fewshot_plus": "2 plus 5 is 7. 6 plus 1 is 7. 3 plus 3 is 6. {a} plus {b} is ",
    "fewshot_symbolic": "2+5=7\n6+1=7\n3+3=6\n{a}+{b}=",
    "chat_question": "What is {a} plus {b}? Reply with the number only.",
}


@dataclass
class TaskPrompts:
    """A prompt/answer set given as text.

    Parameters
    ----------
    prompts : list of str
        Prompts, already in their final form (chat templates applied).
    answers : list of str
        Correct continuation of each prompt (e.g. ``"7"``).
    counterfactuals : list of str, optional
        A wrong answer per prompt. When given, the task metric is the logit difference
        ``logit(answer) - logit(counterfactual)``; otherwise the answer logit.
    formats : list of str, optional
        A format label per prompt (for per-format accuracy); default ``"custom"``.
    """

    prompts: list[str]
    answers: list[str]
    counterfactuals: list[str] | None = None
    formats: list[str] | None = None

    def __post_init__(self) -> None:
        n = len(self.prompts)
        if n == 0:
            raise ValueError("TaskPrompts needs at least one prompt")
        if len(self.answers) != n:
            raise ValueError(f"{n} prompts but {len(self.answers)} answers")
        if self.counterfactuals is not None and len(self.counterfactuals) != n:
            raise ValueError(f"{n} prompts but {len(self.counterfactuals)} counterfactuals")
        if self.formats is None:
            self.formats = ["custom"] * n
        elif len(self.formats) != n:
            raise ValueError(f"{n} prompts but {len(self.formats)} format labels")

    def __len__(self) -> int:
        return len(self.prompts)


@dataclass
class TaskTokens:
    """A tokenised task: what the attribution and scoring functions consume.

    Parameters
    ----------
    tokens : list of (T_i,) LongTensor
        One token sequence per prompt; element 0 is BOS (never attributed or ablated).
    answer_ids : list of list of int
        The full answer continuation per prompt. The metric reads the first token.
    counterfactual_ids : list of int, optional
        First token of the counterfactual answer per prompt (logit-difference metric).
    formats : list of str
        Format label per prompt.
    prompts : list of str
        Prompt texts (for display and export); synthesised from ids when not given.
    """

    tokens: list[torch.Tensor]
    answer_ids: list[list[int]]
    counterfactual_ids: list[int] | None = None
    formats: list[str] = field(default_factory=list)
    prompts: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        n = len(self.tokens)
        if n == 0:
            raise ValueError("TaskTokens needs at least one prompt")
        self.tokens = [torch.as_tensor(t, dtype=torch.long).reshape(-1) for t in self.tokens]
        if any(t.numel() < 2 for t in self.tokens):
            raise ValueError("every prompt needs BOS plus at least one token")
        self.answer_ids = [[int(a)] if np.isscalar(a) else [int(x) for x in a] for a in self.answer_ids]
        if len(self.answer_ids) != n or any(len(a) == 0 for a in self.answer_ids):
            raise ValueError("need one non-empty answer per prompt")
        if self.counterfactual_ids is not None:
            self.counterfactual_ids = [int(c) for c in self.counterfactual_ids]
            if len(self.counterfactual_ids) != n:
                raise ValueError("need one counterfactual per prompt")
        if not self.formats:
            self.formats = ["custom"] * n
        if not self.prompts:
            self.prompts = [" ".join(str(int(i)) for i in t[1:]) for t in self.tokens]
        if len(self.formats) != n or len(self.prompts) != n:
            raise ValueError("formats and prompts must have one entry per prompt")

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def metric_name(self) -> str:
        """``"logit_diff"`` with counterfactuals, else ``"answer_logit"``."""
        return "answer_logit" if self.counterfactual_ids is None else "logit_diff"

    def subset(self, idx: Sequence[int]) -> TaskTokens:
        """The prompts at positions ``idx`` (in that order)."""
        idx = [int(i) for i in idx]
        return TaskTokens(
            tokens=[self.tokens[i] for i in idx],
            answer_ids=[self.answer_ids[i] for i in idx],
            counterfactual_ids=None
            if self.counterfactual_ids is None
            else [self.counterfactual_ids[i] for i in idx],
            formats=[self.formats[i] for i in idx],
            prompts=[self.prompts[i] for i in idx],
        )

    def groups(self) -> list[np.ndarray]:
        """Prompt indices grouped by sequence length (each group runs as one batch)."""
        lengths = np.array([t.numel() for t in self.tokens])
        return [np.flatnonzero(lengths == L) for L in np.unique(lengths)]

    def batch(self, idx: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Stack equal-length prompts: ``(tokens (B, T), answer (B,), counterfactual (B,) | None)``."""
        toks = torch.stack([self.tokens[i] for i in idx])
        ans = torch.tensor([self.answer_ids[i][0] for i in idx], dtype=torch.long)
        cf = None
        if self.counterfactual_ids is not None:
            cf = torch.tensor([self.counterfactual_ids[i] for i in idx], dtype=torch.long)
        return toks, ans, cf


def digit_addition_prompts(
    formats: Sequence[str] | None = None,
    max_sum: int = 9,
    operands: Sequence[int] = range(10),
    counterfactual: str | None = None,
    tokenizer=None,
    n_per_format: int | None = None,
    seed: int = 0,
) -> TaskPrompts:
    """Digit-addition prompts ``a + b`` in several formats.

    Parameters
    ----------
    formats : sequence of str, optional
        Keys of :data:`ADDITION_FORMATS`. Default: all plain formats, plus the chat
        formats when ``tokenizer`` is given.
    max_sum : int
        Keep pairs with ``a + b <= max_sum`` (default 9: single-token answers).
    operands : sequence of int
        Values of ``a`` and ``b``.
    counterfactual : {None, "next", "swap_last"}
        Counterfactual answer: ``"next"`` uses ``(a + b + 1) mod 10``.
    tokenizer : optional
        Needed for the ``chat*`` formats (``apply_chat_template``).
    n_per_format : int, optional
        Subsample this many pairs per format (seeded); default all.
    seed : int
        Seed of the subsampling.

    Returns
    -------
    TaskPrompts
    """
    if formats is None:
        formats = [f for f in ADDITION_FORMATS if not f.startswith("chat") or tokenizer is not None]
    unknown = [f for f in formats if f not in ADDITION_FORMATS]
    if unknown:
        raise ValueError(f"unknown formats {unknown}; choose from {sorted(ADDITION_FORMATS)}")
    if counterfactual not in (None, "next"):
        raise ValueError("counterfactual must be None or 'next'")
    pairs = [(a, b) for a in operands for b in operands if a + b <= max_sum]
    if not pairs:
        raise ValueError("no operand pairs satisfy max_sum")
    rng = np.random.default_rng(seed)
    prompts, answers, cfs, labels = [], [], [], []
    for fmt in formats:
        chosen = pairs
        if n_per_format is not None and n_per_format < len(pairs):
            chosen = [pairs[i] for i in sorted(rng.choice(len(pairs), n_per_format, replace=False))]
        for a, b in chosen:
            text = ADDITION_FORMATS[fmt].format(a=a, b=b)
            if fmt.startswith("chat"):
                if tokenizer is None:
                    raise ValueError(f"format {fmt!r} needs a tokenizer for its chat template")
                text = tokenizer.apply_chat_template(
                    [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=False
                )
            prompts.append(text)
            answers.append(str(a + b))
            cfs.append(str((a + b + 1) % 10))
            labels.append(fmt)
    return TaskPrompts(prompts, answers, cfs if counterfactual else None, labels)


def _encode(model, text: str, bos: bool) -> list[int]:
    tok = model.tokenizer
    ids = list(tok.encode(text, add_special_tokens=False))
    if bos:
        bos_id = tok.bos_token_id
        if bos_id is None:
            raise ValueError("the tokenizer has no BOS token; pass TaskTokens instead")
        if not ids or ids[0] != bos_id:
            ids = [bos_id] + ids
    return ids


def _continuation(model, prompt: str, p_ids: list[int], answer: str) -> list[int]:
    joint = _encode(model, prompt + answer, bos=True)
    ids = joint[len(p_ids) :] if joint[: len(p_ids)] == p_ids else _encode(model, answer, bos=False)
    if not ids:
        raise ValueError(f"answer {answer!r} of prompt {prompt!r} tokenises to nothing")
    return ids


def tokenize_task(model, task: TaskPrompts | TaskTokens, move_whitespace: bool = True) -> TaskTokens:
    """Tokenise a :class:`TaskPrompts` with ``model.tokenizer`` (BOS first, once).

    The answer tokens are the continuation ``tokens(prompt + answer)[len(tokens(prompt)):]``
    when the prompt's tokens are a prefix of the joint tokenisation, else the answer
    tokenised alone. Chat-templated prompts that already start with BOS get no second BOS.
    With ``move_whitespace`` (default), leading whitespace-only answer tokens are appended to
    the prompt (teacher-forced): ``("3 plus 4 is", " 7")`` becomes ``("3 plus 4 is ", "7")``
    under SmolLM2's tokeniser, so the metric reads the digit's logit.
    """
    if isinstance(task, TaskTokens):
        return task
    if getattr(model, "tokenizer", None) is None:
        raise ValueError("the model has no tokenizer; build a TaskTokens from token ids instead")
    toks, ans, cfs = [], [], []
    prompts = list(task.prompts)
    for i, (p, a) in enumerate(zip(task.prompts, task.answers, strict=False)):
        p_ids = _encode(model, p, bos=True)
        a_ids = _continuation(model, p, p_ids, a)
        c_ids = (
            None if task.counterfactuals is None else _continuation(model, p, p_ids, task.counterfactuals[i])
        )
        # leading whitespace-only answer tokens (SmolLM2's " " before a digit) are moved into
        # the prompt, so the metric reads the first informative token
        while move_whitespace and len(a_ids) > 1 and model.tokenizer.decode([a_ids[0]]).strip() == "":
            tok = a_ids.pop(0)
            if c_ids is not None and len(c_ids) > 1 and c_ids[0] == tok:
                c_ids.pop(0)
            p_ids.append(tok)
            prompts[i] += model.tokenizer.decode([tok])
        toks.append(torch.tensor(p_ids, dtype=torch.long))
        ans.append(a_ids)
        if c_ids is not None:
            cfs.append(c_ids[0])
    return TaskTokens(
        tokens=toks,
        answer_ids=ans,
        counterfactual_ids=cfs if task.counterfactuals is not None else None,
        formats=list(task.formats),
        prompts=prompts,
    )


@torch.no_grad()
def answer_accuracy(model, task: TaskPrompts | TaskTokens, batch_size: int = 32) -> pd.DataFrame:
    """Greedy correctness of every prompt.

    A prompt is correct when greedy decoding reproduces the whole answer: with the answer
    teacher-forced after the prompt, the argmax at each answer position equals the next
    answer token (equivalent to greedy generation of ``len(answer)`` tokens).

    Returns
    -------
    pandas.DataFrame
        One row per prompt: ``prompt``, ``format``, ``answer`` (token ids as text when no
        tokenizer), ``predicted``, ``correct`` (bool), ``answer_logit``, ``margin``
        (answer logit minus the best other logit at the first answer position).
    """
    tt = tokenize_task(model, task)
    full = [
        torch.cat([t, torch.tensor(a[:-1], dtype=torch.long)])
        for t, a in zip(tt.tokens, tt.answer_ids, strict=False)
    ]
    lengths = np.array([f.numel() for f in full])
    rows: list[dict] = [{} for _ in range(len(tt))]
    tok = getattr(model, "tokenizer", None)
    dec = (lambda ids: tok.decode(ids)) if tok is not None else (lambda ids: " ".join(map(str, ids)))
    for L in np.unique(lengths):
        idx_all = np.flatnonzero(lengths == L)
        for s in range(0, len(idx_all), batch_size):
            idx = idx_all[s : s + batch_size]
            logits = model(torch.stack([full[i] for i in idx]))
            for r, i in enumerate(idx):
                n_prompt = tt.tokens[i].numel()
                k = len(tt.answer_ids[i])
                lg = logits[r, n_prompt - 1 : n_prompt - 1 + k]
                pred = lg.argmax(-1).tolist()
                first = logits[r, n_prompt - 1].clone()
                a0 = tt.answer_ids[i][0]
                a_logit = float(first[a0])
                first[a0] = -float("inf")
                rows[i] = {
                    "prompt": tt.prompts[i],
                    "format": tt.formats[i],
                    "answer": dec(tt.answer_ids[i]),
                    "predicted": dec(pred),
                    "correct": pred == tt.answer_ids[i],
                    "answer_logit": a_logit,
                    "margin": a_logit - float(first.max()),
                }
    return pd.DataFrame(rows)


def accuracy_by_format(results: pd.DataFrame) -> pd.DataFrame:
    """Per-format accuracy from :func:`answer_accuracy`: ``format, n, n_correct, accuracy``."""
    g = results.groupby("format", sort=False)["correct"]
    out = pd.DataFrame({"n": g.size(), "n_correct": g.sum().astype(int)})
    out["accuracy"] = out["n_correct"] / out["n"]
    return out.reset_index()


def keep_correct(
    model, task: TaskPrompts | TaskTokens, batch_size: int = 32, min_prompts: int = 1
) -> tuple[TaskTokens, pd.DataFrame]:
    """Keep only the prompts the model answers correctly (greedy).

    Returns
    -------
    (TaskTokens, pandas.DataFrame)
        The correctly answered prompts, and the per-prompt table of :func:`answer_accuracy`.

    Raises
    ------
    ValueError
        When fewer than ``min_prompts`` prompts are answered correctly; the message gives
        the per-format accuracy and examples of what the model predicted instead.
    """
    tt = tokenize_task(model, task)
    res = answer_accuracy(model, tt, batch_size=batch_size)
    ok = np.flatnonzero(res["correct"].to_numpy())
    if len(ok) < min_prompts:
        acc = accuracy_by_format(res)
        per = ", ".join(f"{r.format}: {r.n_correct}/{r.n}" for r in acc.itertuples())
        ex = "; ".join(
            f"{r.prompt!r} -> {r.predicted!r} (expected {r.answer!r})" for r in res.head(3).itertuples()
        )
        raise ValueError(
            f"the model answers {len(ok)} of {len(res)} prompts correctly (need {min_prompts}); "
            f"no attribution graph can be built for a task the model does not perform. "
            f"Accuracy per format: {per}. Examples: {ex}. "
            "Try another prompt format (e.g. 'a plus b is ' for SmolLM2) or check the answer tokens."
        )
    return tt.subset(ok), res
