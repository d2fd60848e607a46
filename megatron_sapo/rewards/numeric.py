"""Numeric answers: parse the ways a number is written and decide whether two of them are equal.

Most verifiable-math answers are numbers, and comparing them exactly needs no computer algebra: this path uses
`fractions.Fraction` only, so it is fast, deterministic and independent of the symbolic one.

Parsing accepts, after stripping `$`, `\\(`...`\\)`, `\\text{}` wrappers, `\\$` currency signs and LaTeX spacing:
integers and decimals (`-3`, `- 3`, `.5`, `2.50`), thousands separators in groups of three (`1,000`, `1{,}000`),
scientific notation (`1.5e3`, `1.5 \\times 10^{3}`), fractions (`3/4`, `\\frac{3}{4}`, `\\dfrac34`, `-\\frac{1}{2}`),
percentages (`50%`, `50\\%`) and a single-variable equation (`x = 5`, `a_1 = 5`). Anything else (`\\sqrt{2}`, `1, 2`,
`5 cm`) is not a number here and is left to the symbolic comparison.

Equality: two integers must be equal exactly; otherwise the values may differ by a relative 1e-6 (so a decimal
written to six significant digits, `0.333333`, equals `1/3`, but `0.33` does not). A percentage `p%` equals both
`p` and `p/100`, because references write "what percent" answers either way (`50%` equals `50` and `0.5`); two
numbers without a percent sign are never rescaled (`0.5` does not equal `50`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from fractions import Fraction

RELATIVE_TOLERANCE = Fraction(1, 10**6)

_WRAPPERS = re.compile(r"\\(?:text|textbf|mathrm|mbox)\{([^{}]*)\}")
_SPACING = re.compile(r"\\[!,;: ]|~")
_EQUATION = re.compile(r"[A-Za-z](?:_\{?\w+\}?)?\s*=\s*(.+)")
# Exponents stop at three digits: `1e999999999` would build a billion-digit integer (sympy takes such answers).
_DECIMAL = re.compile(r"(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d*)?(?:[eE][-+]?\d{1,3})?|\.\d+(?:[eE][-+]?\d{1,3})?")
_LATEX_FRACTION = re.compile(r"\\[dt]?frac(?:\{([^{}]+)\}\{([^{}]+)\}|(\d)(\d))")
_TIMES_TEN = re.compile(r"(.+?)\s*\\(?:times|cdot)\s*10\^\{?\s*([-+]?\d{1,3})\s*\}?")


@dataclass(frozen=True)
class Number:
    """A parsed number: its value as written (`50%` has value 50) and whether a percent sign followed it."""

    value: Fraction
    percent: bool = False


def _strip_markup(text: str) -> str:
    text = text.strip()
    for opening, closing in (("$", "$"), ("\\(", "\\)"), ("\\[", "\\]")):
        if text.startswith(opening) and text.endswith(closing) and len(text) >= len(opening) + len(closing):
            text = text[len(opening) : len(text) - len(closing)].strip()
    text = _WRAPPERS.sub(r"\1", text)
    text = _SPACING.sub("", text).replace("{,}", ",").replace("\\%", "%").replace("\\$", "").replace("$", "")
    return text.strip()


def _split_sign(text: str) -> tuple[int, str]:
    """(-1 or 1, the rest) for a leading minus or plus sign and any space after it (`- 3` is -3)."""
    text = text.strip()
    if text[:1] in ("+", "-"):
        return (-1 if text[0] == "-" else 1), text[1:].strip()
    return 1, text


def _decimal(text: str) -> Fraction | None:
    sign, text = _split_sign(text)
    if not _DECIMAL.fullmatch(text):
        return None
    try:
        return sign * Fraction(text.replace(",", ""))
    except ValueError:  # more digits than Python converts (sys.get_int_max_str_digits)
        return None


def _ratio(numerator: str, denominator: str) -> Fraction | None:
    top, bottom = _decimal(numerator), _decimal(denominator)
    if top is None or bottom is None or bottom == 0:
        return None
    return top / bottom


def _value(text: str) -> Fraction | None:
    fraction = _LATEX_FRACTION.fullmatch(text)
    if fraction is not None:
        top, bottom = (fraction.group(1), fraction.group(2)) if fraction.group(1) else fraction.group(3, 4)
        return _ratio(top, bottom)
    times_ten = _TIMES_TEN.fullmatch(text)
    if times_ten is not None:
        mantissa = _decimal(times_ten.group(1))
        return None if mantissa is None else mantissa * Fraction(10) ** int(times_ten.group(2))
    if text.count("/") == 1:
        return _ratio(*text.split("/"))
    return _decimal(text)


def parse_number(text: str) -> Number | None:
    """The number `text` writes (see the module docstring for the forms), or None if it is not one."""
    text = _strip_markup(text)
    equation = _EQUATION.fullmatch(text)
    if equation is not None:
        text = equation.group(1).strip()
    percent = text.endswith("%")
    text = text.removesuffix("%").strip()
    sign, text = _split_sign(text)  # here for `-\frac{1}{2}`; the forms below take a sign of their own
    if text[:1] in ("+", "-"):
        return None
    value = _value(text)
    return None if value is None else Number(sign * value, percent)


def _close(a: Fraction, b: Fraction) -> bool:
    if a == b:
        return True
    if a.denominator == 1 and b.denominator == 1:
        return False
    return abs(a - b) <= RELATIVE_TOLERANCE * max(abs(a), abs(b))


def numbers_equal(a: Number, b: Number) -> bool:
    """Whether two parsed numbers are the same answer (the rule is in the module docstring)."""
    if a.percent == b.percent:
        return _close(a.value, b.value)
    percent, plain = (a, b) if a.percent else (b, a)
    return _close(percent.value, plain.value) or _close(percent.value / 100, plain.value)
