"""Numeric and symbolic equivalence, and the math reward end to end."""

from fractions import Fraction

import pytest

from megatron_sapo.rewards.math_reward import answers_equivalent, math_reward
from megatron_sapo.rewards.numeric import Number, numbers_equal, parse_number
from megatron_sapo.rewards.symbolic import symbolically_equal


@pytest.mark.parametrize(
    "text, value, percent",
    [
        ("0.5", Fraction(1, 2), False),
        ("1/2", Fraction(1, 2), False),
        ("\\frac{1}{2}", Fraction(1, 2), False),
        ("$\\dfrac34$", Fraction(3, 4), False),
        ("-\\frac{1}{2}", Fraction(-1, 2), False),
        ("\\frac{-1}{2}", Fraction(-1, 2), False),
        ("1,000", Fraction(1000), False),
        ("1{,}000.5", Fraction(2001, 2), False),
        ("- 3", Fraction(-3), False),
        (".25", Fraction(1, 4), False),
        ("1.5e3", Fraction(1500), False),
        ("1.5 \\times 10^{-3}", Fraction(3, 2000), False),
        ("x = 5", Fraction(5), False),
        ("a_1=-2", Fraction(-2), False),
        ("\\$12.50", Fraction(25, 2), False),
        ("\\text{7}", Fraction(7), False),
        ("50%", Fraction(50), True),
        ("12.5\\%", Fraction(25, 2), True),
    ],
)
def test_parse_number(text, value, percent):
    assert parse_number(text) == Number(value, percent)


@pytest.mark.parametrize(
    "text", ["\\sqrt{2}", "1, 2", "1,00", "5 cm", "--3", "1/0", "x^2", "", "3.1.4", "1e999999999", "9" * 5000]
)
def test_not_a_number(text):
    assert parse_number(text) is None


@pytest.mark.parametrize(
    "a, b, equal",
    [
        ("0.5", "1/2", True),
        ("0.5", "\\frac{1}{2}", True),
        ("50%", "0.5", True),  # a percentage equals p and p/100
        ("50%", "50", True),
        ("50\\%", "50%", True),
        ("0.5", "50", False),  # without a percent sign nothing is rescaled
        ("1,000", "1000", True),
        ("-3", "- 3", True),
        ("1000.0", "1000", True),
        ("0.333333", "1/3", True),  # six significant digits: within the relative 1e-6
        ("0.33", "1/3", False),
        ("1000000", "1000001", False),  # integers compare exactly
        ("x = 5", "5", True),
        ("-5", "5", False),
    ],
)
def test_numeric_equivalence(a, b, equal):
    assert numbers_equal(parse_number(a), parse_number(b)) is equal
    assert answers_equivalent(a, b) is equal


@pytest.mark.parametrize(
    "candidate, reference, equal",
    [
        ("x^2+2x+1", "(x+1)^2", True),
        ("\\sqrt{8}", "2\\sqrt{2}", True),
        ("\\frac{\\pi}{2}", "\\pi/2", True),
        ("\\{1,2\\}", "\\{2,1\\}", True),
        ("[0, 1)", "[0,1)", True),
        ("x^2+1", "(x+1)^2", False),
        ("\\sqrt{8}", "3", False),
        ("[0, 1)", "[0,1]", False),
        ("\\frac{", "1", False),  # unparsable: not equal, no exception
    ],
)
def test_symbolic_equivalence(candidate, reference, equal):
    assert symbolically_equal(candidate, reference) is equal
    assert answers_equivalent(candidate, reference) is equal


@pytest.mark.parametrize(
    "completion, answer, reward",
    [
        ("Adding up, the total is \\boxed{1,000}.", "1000", 1.0),
        ("So the probability is $\\boxed{\\frac{1}{2}}$.", "0.5", 1.0),
        ("Expanding, we get \\boxed{(x+1)^2}", "x^2 + 2x + 1", 1.0),
        ("She has 72 clips.\n#### 72", "Natalia sold 48/2 = 24 clips.\n#### 72", 1.0),
        ("The answer is 71.", "72", 0.0),
        ("I give up.", "72", 0.0),
        ("so \\boxed{\\frac{1}{2", "\\frac{1}{2}", 0.0),
        ("Therefore \\boxed{A}", "A", 1.0),
    ],
)
def test_math_reward(completion, answer, reward):
    assert math_reward(completion, answer, source="unit-test") == reward
