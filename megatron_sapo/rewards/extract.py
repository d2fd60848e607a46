"""Final-answer extraction from a model's completion: pure string functions, no sympy.

A completion is a chain of reasoning that ends with an answer; the reward compares only that answer. The anchors,
tried in this order by `extract_answer`:

1. the last `\\boxed{...}` or `\\fbox{...}` (braces nested to any depth; `\\boxed 5` too). If the last one is cut off
   before its closing brace, the completion has no answer: the generation stopped inside it, and an earlier box or a
   number inside the unfinished one is not what the model meant to answer.
2. GSM8K's `#### 42`: the rest of the line after the last `####`.
3. "The answer is ...", "Final answer: ...", "**Answer:** ..." (the last such phrase; the answer runs to the end of
   its line or sentence).
4. the last number in the text (integers, decimals, `1,000`, `3/4`, `\\frac{3}{4}`, `1e-3`, `50%`, negatives), if
   the caller allows this fallback.
"""

from __future__ import annotations

import re

_BOX = re.compile(r"\\(?:boxed|fbox)\b\s*")
_GSM8K = "####"
_ANSWER_PHRASE = re.compile(r"\banswer\s*(?:\*+\s*)?(?:is\b|:)\s*:?[ \t*]*", re.IGNORECASE)
_SENTENCE_END = re.compile(r"\.(?:\s|$)")
# A minus sign counts only where it cannot be subtraction (not right after a digit, letter or closing bracket).
_SIGN = r"(?:(?<![\w.)\]}])-)?"
_LAST_NUMBER = re.compile(
    _SIGN + r"(?:\\[dt]?frac\{\d+\}\{\d+\}"
    r"|(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:[eE][-+]?\d+)?(?:/\d+)?%?"
    r"|\.\d+%?)"
)


def _balanced_group(text: str, start: int) -> str | None:
    """The content of the brace group opening at text[start] == "{", or None if it never closes."""
    depth = 0
    for i in range(start, len(text)):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                return text[start + 1 : i]
    return None


def last_boxed(text: str) -> str | None:
    """The content of the last `\\boxed{...}` / `\\fbox{...}`; None if there is none or it never closes."""
    boxes = list(_BOX.finditer(text))
    if not boxes:
        return None
    end = boxes[-1].end()
    if text.startswith("{", end):
        content = _balanced_group(text, end)
    else:  # `\boxed 5`: the box holds one token
        content = re.match(r"[^\s$]*", text[end:]).group()
    content = content.strip() if content is not None else None
    return content or None


def gsm8k_answer(text: str) -> str | None:
    """The rest of the line after the last `####` (GSM8K's answer marker), or None."""
    if _GSM8K not in text:
        return None
    answer = text.rsplit(_GSM8K, 1)[1].strip().split("\n", 1)[0].strip()
    return answer or None


def answer_phrase(text: str) -> str | None:
    """What follows the last "answer is" / "answer:" up to the end of that line or sentence, or None."""
    matches = list(_ANSWER_PHRASE.finditer(text))
    if not matches:
        return None
    answer = text[matches[-1].end() :].split("\n", 1)[0]
    sentence_end = _SENTENCE_END.search(answer)
    if sentence_end is not None:
        answer = answer[: sentence_end.start()]
    answer = answer.strip().strip("*").strip()
    if len(answer) >= 2 and answer[0] == answer[-1] == "$":
        answer = answer[1:-1].strip()
    return answer or None


def last_number(text: str) -> str | None:
    """The last number written in the text, as written (`1,000`, `-3/4`, `\\frac{1}{2}`, `12.5%`), or None."""
    numbers = _LAST_NUMBER.findall(text)
    return numbers[-1] if numbers else None


def extract_answer(text: str, *, last_number_fallback: bool = True) -> str | None:
    """The completion's final answer by the anchors in the module docstring, or None when it gives none."""
    if _BOX.search(text):
        return last_boxed(text)
    for anchor in (gsm8k_answer, answer_phrase):
        answer = anchor(text)
        if answer is not None:
            return answer
    return last_number(text) if last_number_fallback else None


def extract_reference(answer: str) -> str:
    """The reference answer to compare against: the boxed or `####` part of a worked solution (MATH, GSM8K),
    otherwise the whole string. No last-number fallback here: a reference like `x^2 + 1` is an answer in full."""
    if _BOX.search(answer):
        return last_boxed(answer) or answer.strip()
    return gsm8k_answer(answer) or answer.strip()
