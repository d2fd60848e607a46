"""Final-answer extraction: each anchor, their order, and the cases that must give no answer."""

import pytest

from megatron_sapo.rewards.extract import (
    answer_phrase,
    extract_answer,
    extract_reference,
    gsm8k_answer,
    last_boxed,
    last_number,
)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("so the result is \\boxed{\\frac{1}{2}}.", "\\frac{1}{2}"),
        ("\\boxed{\\left\\{ \\frac{a}{b^{2}} \\right\\}}", "\\left\\{ \\frac{a}{b^{2}} \\right\\}"),
        ("first \\boxed{1}, on reflection \\boxed{2}", "2"),
        ("\\fbox{42}", "42"),
        ("$\\boxed 7$ apples", "7"),
        ("\\boxed { 3 }", "3"),
        ("almost \\boxed{\\frac{1}{2", None),  # cut off inside the box: no answer
        ("\\boxed{}", None),
        ("no box here", None),
    ],
)
def test_last_boxed(text, expected):
    assert last_boxed(text) == expected


def test_gsm8k_and_answer_phrases():
    assert gsm8k_answer("She pays 3 * 4 = 12.\n#### 12") == "12"
    assert gsm8k_answer("#### 1,234\nextra") == "1,234"
    assert gsm8k_answer("no marker") is None
    assert answer_phrase("Thus, the answer is 3.5.") == "3.5"
    assert answer_phrase("The answer is 3. Then we check it.") == "3"
    assert answer_phrase("**Answer:** 42") == "42"
    assert answer_phrase("Final answer: $\\frac{3}{4}$.") == "\\frac{3}{4}"
    assert answer_phrase("The answer is: x = 5\nCheck: 5 + 1 = 6") == "x = 5"
    assert answer_phrase("I thought the answer is 1 but the answer is 2") == "2"
    assert answer_phrase("Let me find the answer") is None


@pytest.mark.parametrize(
    "text, expected",
    [
        ("we get 1,000,000 people", "1,000,000"),
        ("10 - 7 = 3", "3"),
        ("5-3", "3"),  # subtraction, not a negative number
        ("it is -3 degrees", "-3"),
        ("3/4 of the cake", "3/4"),
        ("which gives $\\frac{3}{4}$", "\\frac{3}{4}"),
        ("about 1.5e-3 of it", "1.5e-3"),
        ("a rise of 12.5%.", "12.5%"),
        ("no digits", None),
    ],
)
def test_last_number(text, expected):
    assert last_number(text) == expected


def test_anchor_order_and_fallback():
    assert extract_answer("The answer is 4, so \\boxed{5}") == "5"
    assert extract_answer("2 + 2 = 4\n#### 4 apples, 9 pears") == "4 apples, 9 pears"
    assert extract_answer("The answer is 4 after 9 tries.") == "4 after 9 tries"
    assert extract_answer("3 + 4 gives 7") == "7"
    assert extract_answer("3 + 4 gives 7", last_number_fallback=False) is None
    assert extract_answer("I cannot solve this.") is None
    assert extract_answer("7 then \\boxed{\\frac{1}{") is None  # a cut-off box is not replaced by the 7


def test_reference_answers_keep_their_full_form():
    assert extract_reference("x^2 + 1") == "x^2 + 1"  # no last-number fallback: not "1"
    assert extract_reference("  42 ") == "42"
    assert extract_reference("Worked solution ... so $\\boxed{\\frac{1}{2}}$.") == "\\frac{1}{2}"
    assert extract_reference("Natalia sold 48/2 = 24 clips.\n#### 72") == "72"
