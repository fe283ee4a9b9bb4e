"""The linear-time matcher behind Mango's `$regex` (plugshare/node/couch/linear_regex.py):
Python's `re` syntax and answers, in time linear in the string, within bounded automata."""

from __future__ import annotations

import json
import random
import re
import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from plugshare.node.couch.linear_regex import (MAX_DFA_STATES, RegexTooCostly,
                                               RegexUnsupported, Searcher)


def search(pattern: str, text: str) -> bool:
    return Searcher(pattern).search(text)


def test_flags_and_anchors():
    assert search("^b", "a\nb") is False
    assert search("(?m)^b", "a\nb") is True
    assert search("a$", "a\n") is True  # before a final newline
    assert search("a\\Z", "a\n") is False
    assert search("\\bfoo\\b", "a foo.") is True
    assert search("\\bfoo\\b", "afoo") is False
    assert search("a", "A") is False
    assert search("(?i)^a.*[ln]$", "Aladdin") is True
    assert search("", "") is True


@pytest.mark.parametrize("pattern", [
    "(a)\\1", "(?P<n>a)(?P=n)", "a(?=b)", "(?<!a)b", "(?>a+)b", "a++b", "(a)?(?(1)b|c)",
    "(x{40}){40}",
])
def test_what_no_finite_automaton_matches_is_refused(pattern):
    with pytest.raises(RegexUnsupported):
        Searcher(pattern)


def test_syntax_errors_are_re_errors():
    with pytest.raises(re.error):
        Searcher("(")


# Patterns that make Python's backtracking `re` take seconds to hours on these strings.
CATASTROPHIC = [
    ("[a-z]+\\d", "a" * 200_000, False),
    ("[a-z]+\\d", "a" * 200_000 + "1", True),
    ("\\w*\\d\\w*\\d!", "a1" * 50_000, False),
    ("(a+)+$", "a" * 100_000 + "!", False),
    ("(a|aa)*b", "a" * 100_000, False),
    ("^(\\w+\\s?)*$", "word " * 20_000 + "!", False),
    (".*.*.*=", "x" * 100_000 + "=", True),
]


def test_linear_in_the_string_whatever_the_pattern():
    # In a child process with a generous deadline (minutes, where the automaton needs about a
    # second): a backtracking matcher would hold the node's event loop for hours.
    script = (
        "import json, sys\n"
        "from plugshare.node.couch.linear_regex import Searcher\n"
        "for pattern, text, expected in json.loads(sys.stdin.read()):\n"
        "    got = Searcher(pattern).search(text)\n"
        "    assert got is expected, (pattern, got)\n"
        "print('ok')\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], input=json.dumps(CATASTROPHIC), text=True,
        capture_output=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"


def test_an_automaton_that_keeps_growing_is_refused_at_a_bounded_cost():
    # Each character of a random a/b string is a new DFA state for this pattern, each costing
    # ~50 µs to build: minutes over a large document. The bound counts states, not time, so
    # the outcome is the same on any machine.
    text = "".join(random.Random(7).choices("ab", k=2 * MAX_DFA_STATES))
    with pytest.raises(RegexTooCostly):
        search("(a|b)*a(a|b){60}c", text)
    # An automaton that stays small is fine on the same string.
    assert search("(a|b)*a(a|b){8}c", text) is False


regex_pieces = st.sampled_from([
    "a", "b", "ab", ".", "\\d", "\\w", "\\s", "\\W", "\\D", "[ab]", "[^a]", "[a-c1]",
    "[\\d_]", "[^\\w]", "\\n", " ", "^", "$", "\\b", "\\B", "\\A", "\\Z", "*", "+", "?",
    "*?", "{2}", "{1,3}", "{2,}", "|", "(", ")", "(?:", "(?i:", "(?m:", "(?s:",
    "A", "é", "É", "_", "1", "k", "\u212a", "ſ",
])
# (A scoped `(?a:...)` is left out: Python's `re` applies it to `\w` but not to `\W`.)
regex_flags = st.sampled_from(["", "(?i)", "(?m)", "(?s)", "(?a)", "(?im)", "(?ia)"])
regex_subjects = st.text(alphabet="abAB1_ \néÉ-kK\u212aſ", max_size=12)


@settings(max_examples=1500, deadline=None)
@given(regex_flags, st.lists(regex_pieces, min_size=1, max_size=8).map("".join),
       st.lists(regex_subjects, min_size=1, max_size=6))
def test_agrees_with_python_re(flags, body, subjects):
    pattern = flags + body
    try:
        expected = re.compile(pattern)
    except (re.error, ValueError, OverflowError):
        return
    try:
        searcher = Searcher(pattern)
    except RegexUnsupported as refused:
        assert "possessive repeat" in str(refused)  # `a*+`, `a++`
        return
    for subject in subjects:
        assert searcher.search(subject) is (expected.search(subject) is not None), subject
