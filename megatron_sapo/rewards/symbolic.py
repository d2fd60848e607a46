"""Symbolic equivalence of two answers through Hugging Face's `math-verify` (the one place that imports it).

math-verify parses LaTeX and plain expressions into sympy (through latex2sympy2_extended) and compares them the way
the MATH / DeepScaleR graders do: expanded and simplified forms (`x^2+2x+1` and `(x+1)^2`, `\\sqrt{8}` and
`2\\sqrt{2}`), intervals, sets, tuples, equations against their right-hand side, units stripped. Writing our own
LaTeX-to-sympy layer would repeat that work less well.

Both strings are wrapped in `\\boxed{}` so that math-verify reads each as one LaTeX answer rather than searching it
for one. math-verify's own timeouts are off: they use `signal.alarm`, which works only in a process's main thread
and takes whole seconds, while the reward pool (`pool.py`) already bounds every call by killing its worker. Called
outside the pool, a comparison therefore has no time limit. math-verify is imported with this module (~0.6 s:
sympy, antlr), so a pool worker of the math reward pays that while it starts rather than inside a call's timeout
(its first comparison still takes ~0.3 s more than later ones: sympy fills its caches); the package's `__init__`
does not import this module, so workers of other reward functions never pay it.
"""

from __future__ import annotations

import logging

from math_verify import parse, verify

_TIMEOUT_DISABLED_NOTICE = "Timeout is disabled"


class _DropTimeoutDisabledNotice(logging.Filter):
    """math-verify warns once per process that its timeouts are off; here that is by design (see above)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(_TIMEOUT_DISABLED_NOTICE)


for _name in ("math_verify.parser", "math_verify.grader"):
    logging.getLogger(_name).addFilter(_DropTimeoutDisabledNotice())


def symbolically_equal(candidate: str, reference: str) -> bool:
    """Whether math-verify finds the candidate answer equivalent to the reference (False if either won't parse)."""
    gold = parse(f"\\boxed{{{reference}}}", parsing_timeout=None)
    target = parse(f"\\boxed{{{candidate}}}", parsing_timeout=None)
    return bool(gold) and bool(target) and verify(gold, target, timeout_seconds=None)
