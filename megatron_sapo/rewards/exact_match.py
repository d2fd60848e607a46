"""The exact-match reward, for tasks whose answer is a string (a word, a label, a sorted list of digits).

The completion's answer is its anchored final answer (boxed, `####`, "the answer is": `extract.extract_answer`
without the last-number fallback, which would turn "abc 12" into "12"), or the whole completion when it has none.
"""

from __future__ import annotations

from .extract import extract_answer


def _normalise(text: str, ignore_case: bool, collapse_whitespace: bool) -> str:
    text = " ".join(text.split()) if collapse_whitespace else text.strip()
    return text.casefold() if ignore_case else text


def exact_match(
    completion: str, answer: str, *, ignore_case: bool = False, collapse_whitespace: bool = True, **_extra
) -> float:
    """1.0 if the completion's answer equals `answer` after stripping (and, by the options, collapsing runs of
    whitespace to one space and ignoring case), else 0.0. Per-sample extras are accepted and ignored."""
    candidate = extract_answer(completion, last_number_fallback=False)
    candidate = completion if candidate is None else candidate
    matched = _normalise(candidate, ignore_case, collapse_whitespace) == _normalise(
        answer, ignore_case, collapse_whitespace
    )
    return 1.0 if matched else 0.0
