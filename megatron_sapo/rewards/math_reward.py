"""The verifiable-math reward: 1.0 when the completion's final answer equals the reference answer, else 0.0.

The final answer comes from `extract.extract_answer` (boxed, `####`, "the answer is", last number). Equality is
decided by the cheapest test that can decide it: identical strings; then, when both sides are numbers, the exact
numeric rule of `numeric.py` (whose verdict is final, so `0.5` against `1/2` never reaches sympy); otherwise
math-verify's symbolic comparison (`symbolic.py`).
"""

from __future__ import annotations

from .extract import extract_answer, extract_reference
from .numeric import numbers_equal, parse_number
from .symbolic import symbolically_equal


def answers_equivalent(candidate: str, reference: str) -> bool:
    """Whether two final answers are the same mathematical answer."""
    if candidate.strip() == reference.strip():
        return True
    candidate_number, reference_number = parse_number(candidate), parse_number(reference)
    if candidate_number is not None and reference_number is not None:
        return numbers_equal(candidate_number, reference_number)
    return symbolically_equal(candidate, reference)


def math_reward(completion: str, answer: str, **_extra) -> float:
    """1.0 if the completion's final answer is equivalent to `answer` (a final answer, or a worked solution with a
    boxed or `####` answer), else 0.0; a completion with no final answer scores 0.0. Per-sample extras are
    accepted and ignored, so a dataset's metadata can travel with every sample."""
    candidate = extract_answer(completion)
    if candidate is None:
        return 0.0
    return 1.0 if answers_equivalent(candidate, extract_reference(answer)) else 0.0
