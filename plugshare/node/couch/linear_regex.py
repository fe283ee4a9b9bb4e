"""A linear-time regular-expression matcher for Mango's `$regex` (pure: no I/O).

`Searcher(pattern).search(text)` says whether `pattern` (Python's syntax) matches anywhere in
`text`, in time linear in the text whatever the pattern. `Searcher(pattern)` raises `re.error`
for a pattern that is not Python syntax, `RecursionError` for one nested too deeply, and
`RegexUnsupported` for one no finite automaton can match or longer than `MAX_REGEX_PROGRAM`
steps; `search` raises `RegexTooCostly` when the lazily built DFA grows past
`MAX_DFA_STATES` states (so mid-scan, on a particular string).
"""

from __future__ import annotations

import re
from collections.abc import Callable

# Python's own regular-expression parser (private, stable since 3.11): the same syntax and
# errors as `re`, matched by the automaton below rather than by `re`'s backtracking.
from re import _constants as _re_constants  # type: ignore[attr-defined]
from re import _parser as _re_parser  # type: ignore[attr-defined]
from typing import Any

__all__ = ["Searcher", "RegexUnsupported", "RegexTooCostly", "MAX_REGEX_PROGRAM",
           "MAX_DFA_STATES", "MAX_DFA_STATE_POSITIONS"]

#
# Python's `re` backtracks: `[a-z]+\d` takes seconds on a 20,000-character string and
# `\w*\d\w*\d!` minutes, all of it holding the event loop. So `$regex` never runs the
# pattern with `re` (its one use of `re` on a document finds the next character of a set,
# which cannot backtrack). The pattern is parsed by Python's own parser (`re._parser`: same
# syntax, same errors), compiled into a Thompson NFA, and searched by a lazily built DFA whose transitions
# are cached per (state, character): time linear in the string, whatever the pattern.
# Back-references, look-around, conditionals, atomic groups and possessive repeats (which no
# finite automaton expresses) are refused. Only whether there is a match is computed, so
# greedy and lazy repeats are the same.

_CHAR, _SPLIT, _JUMP, _ASSERT, _MATCH = range(5)
MAX_REGEX_PROGRAM = 1_024  # NFA instructions (`x{500}` is 500 of them)
_DFA_CACHE_LIMIT = 20_000  # cached transitions per pattern before the cache starts afresh
# A DFA can have exponentially many states (`(a|b)*a(a|b){60}`: one more per character of a
# random a/b string, each costing ~50 µs to build): a pattern past these bounds is refused
# as too costly, rather than run for minutes over a large document. Everyday patterns have
# a few dozen states.
MAX_DFA_STATES = 10_000
MAX_DFA_STATE_POSITIONS = 200_000  # NFA positions held in all states together
_ASCII_SPACE = frozenset(" \t\n\r\f\v")


def _is_ascii_word(c: str) -> bool:
    return c.isascii() and (c.isalnum() or c == "_")


def _is_word(c: str) -> bool:
    return c.isalnum() or c == "_"


def _category(category: Any, ascii_only: bool) -> Callable[[str], bool]:
    C = _re_constants
    if category in (C.CATEGORY_DIGIT, C.CATEGORY_NOT_DIGIT):
        test = (lambda c: "0" <= c <= "9") if ascii_only else str.isdecimal
    elif category in (C.CATEGORY_SPACE, C.CATEGORY_NOT_SPACE):
        test = _ASCII_SPACE.__contains__ if ascii_only else str.isspace
    elif category in (C.CATEGORY_WORD, C.CATEGORY_NOT_WORD):
        test = _is_ascii_word if ascii_only else _is_word
    else:
        raise RegexUnsupported(f"character category {category}")
    if category in (C.CATEGORY_NOT_DIGIT, C.CATEGORY_NOT_SPACE, C.CATEGORY_NOT_WORD):
        return lambda c: not test(c)
    return test


class RegexUnsupported(Exception):
    pass


def _case_variants(c: str, flags: int) -> frozenset[str]:
    """The characters `c` matches as, under the pattern's flags: itself, and its simple case
    mappings with IGNORECASE (ASCII letters only with the ASCII flag, as `re` does)."""
    C = _re_constants
    if not flags & C.SRE_FLAG_IGNORECASE or (flags & C.SRE_FLAG_ASCII and not c.isascii()):
        return frozenset(c)
    mapped = (c, c.lower(), c.upper(), c.lower().upper(), c.upper().lower())
    return frozenset(m for m in mapped if len(m) == 1 and (m.isascii() or not
                                                         flags & C.SRE_FLAG_ASCII))


def _char_class(items: list, flags: int) -> Callable[[str], bool]:
    """The predicate of `[...]` (or of `\\d`, which the parser gives as a one-item class)."""
    C = _re_constants
    ascii_only = bool(flags & C.SRE_FLAG_ASCII)
    negate = bool(items) and items[0][0] is C.NEGATE
    literals: set[str] = set()
    ranges: list[tuple[int, int]] = []
    tests: list[Callable[[str], bool]] = []
    for op, arg in items[1:] if negate else items:
        if op is C.LITERAL:
            literals.update(_case_variants(chr(arg), flags))
        elif op is C.RANGE:
            ranges.append(arg)
        elif op is C.CATEGORY:
            tests.append(_category(arg, ascii_only))
        else:
            raise RegexUnsupported(f"{op} in a character class")

    def inside(c: str) -> bool:
        for v in _case_variants(c, flags):
            if v in literals:
                return True
            o = ord(v)
            if any(low <= o <= high for low, high in ranges):
                return True
        return any(test(c) for test in tests)

    return (lambda c: not inside(c)) if negate else inside


def _required_literal(items: list, flags: int) -> str:
    """The longest run of consecutive case-sensitive literal characters at the top level of a
    pattern: text without it cannot match. Empty when there is none to rely on."""
    C = _re_constants
    if flags & C.SRE_FLAG_IGNORECASE:
        return ""
    if any(op is C.BRANCH for op, _ in items):
        return ""
    best = run = ""
    for op, arg in items:
        if op is C.LITERAL:
            run += chr(arg)
            best = max(best, run, key=len)
        elif op is C.AT:
            continue  # zero-width: the run goes on across it
        else:
            run = ""
    return best


def _class_chars(items: list, flags: int) -> frozenset[str] | None:
    """Exactly the characters a `[...]` of plain characters accepts, case-sensitively; None
    for anything else (a category, a negation, a wide range, IGNORECASE)."""
    C = _re_constants
    if flags & C.SRE_FLAG_IGNORECASE:
        return None
    chars: set[str] = set()
    for op, arg in items:
        if op is C.LITERAL:
            chars.add(chr(arg))
        elif op is C.RANGE and arg[1] - arg[0] < 64:
            chars.update(chr(o) for o in range(arg[0], arg[1] + 1))
        else:
            return None
    return frozenset(chars)


class _Program:
    """A Thompson NFA: a list of instructions, built from `re._parser`'s tree; and the
    longest run of plain characters every match contains (a fast first check)."""

    def __init__(self, pattern: str):
        tree = _re_parser.parse(pattern, 0)
        self.code: list[tuple] = []
        self._emit_sequence(list(tree), tree.state.flags)
        self.code.append((_MATCH,))
        self.required = _required_literal(list(tree), tree.state.flags)
        self.first = self._first_chars()

    def _first_chars(self) -> frozenset[str] | None:
        """The characters a match can start with, when they are a known finite set and no
        match is empty (assertions are taken as passing: a superset); else None."""
        chars: set[str] = set()
        seen: set[int] = set()
        stack = [0]
        while stack:
            pc = stack.pop()
            if pc in seen:
                continue
            seen.add(pc)
            instruction = self.code[pc]
            kind = instruction[0]
            if kind == _JUMP:
                stack.append(instruction[1])
            elif kind == _SPLIT:
                stack.extend(instruction[1:])
            elif kind == _ASSERT:
                stack.append(pc + 1)
            elif kind == _MATCH or instruction[2] is None:
                return None
            else:
                chars.update(instruction[2])
        return frozenset(chars)

    def _add(self, instruction: tuple) -> int:
        if len(self.code) >= MAX_REGEX_PROGRAM:
            raise RegexUnsupported(f"a pattern longer than {MAX_REGEX_PROGRAM} steps once "
                                    "repetitions are counted")
        self.code.append(instruction)
        return len(self.code) - 1

    def _emit_sequence(self, items: list, flags: int) -> None:
        for op, arg in items:
            self._emit(op, arg, flags)

    def _emit(self, op: Any, arg: Any, flags: int) -> None:
        C = _re_constants
        if op is C.LITERAL or op is C.NOT_LITERAL:
            wanted = _case_variants(chr(arg), flags)
            if len(wanted) == 1:
                test = chr(arg).__eq__
            else:
                test = lambda c: not wanted.isdisjoint(_case_variants(c, flags))  # noqa: E731
            if op is C.LITERAL:
                self._add((_CHAR, test, wanted if len(wanted) == 1 else None))
            else:
                self._add((_CHAR, lambda c: not test(c), None))
        elif op is C.ANY:
            if flags & C.SRE_FLAG_DOTALL:
                self._add((_CHAR, lambda c: True, None))
            else:
                self._add((_CHAR, lambda c: c != "\n", None))
        elif op is C.IN:
            self._add((_CHAR, _char_class(arg, flags), _class_chars(arg, flags)))
        elif op is C.AT:
            self._add((_ASSERT, arg, flags))
        elif op is C.SUBPATTERN:
            _group, add_flags, del_flags, sub = arg
            self._emit_sequence(list(sub), (flags | add_flags) & ~del_flags)
        elif op is C.BRANCH:
            _, alternatives = arg
            self._emit_branch([list(a) for a in alternatives], flags)
        elif op is C.MAX_REPEAT or op is C.MIN_REPEAT:
            low, high, sub = arg
            self._emit_repeat(list(sub), low, high, flags)
        else:
            raise RegexUnsupported(str(op).lower().replace("_", " "))

    def _emit_branch(self, alternatives: list[list], flags: int) -> None:
        jumps_to_end = []
        for alternative in alternatives[:-1]:
            split = self._add((_SPLIT, None, None))
            self._emit_sequence(alternative, flags)
            jumps_to_end.append(self._add((_JUMP, None)))
            self.code[split] = (_SPLIT, split + 1, len(self.code))
        self._emit_sequence(alternatives[-1], flags)
        for jump in jumps_to_end:
            self.code[jump] = (_JUMP, len(self.code))

    def _emit_repeat(self, sub: list, low: int, high: int, flags: int) -> None:
        for _ in range(low):
            self._emit_sequence(sub, flags)
        if high == _re_constants.MAXREPEAT:
            loop = self._add((_SPLIT, None, None))
            self._emit_sequence(sub, flags)
            self._add((_JUMP, loop))
            self.code[loop] = (_SPLIT, loop + 1, len(self.code))
            return
        skips = []
        for _ in range(high - low):
            skips.append(self._add((_SPLIT, None, None)))
            self._emit_sequence(sub, flags)
        for split in skips:
            self.code[split] = (_SPLIT, split + 1, len(self.code))


# What an assertion needs to know of the character before a position: the start of the string
# (_BEGIN), or (is a newline, is a word character, is an ASCII word character).
_BEGIN = ("begin",)


def _before_kind(c: str) -> tuple[bool, bool, bool]:
    return (c == "\n", _is_word(c), _is_ascii_word(c))


def _assertion_holds(at: Any, flags: int, before: Any, after: str | None, last: bool) -> bool:
    """`^ $ \\A \\Z \\b \\B` between `before` (_BEGIN or a `_before_kind`) and `after` (a
    character, or None at the end); `last`: `after` is the string's last character."""
    C = _re_constants
    multiline = flags & C.SRE_FLAG_MULTILINE
    if at is C.AT_BEGINNING:
        return before is _BEGIN or (bool(multiline) and before[0])
    if at is C.AT_BEGINNING_STRING:
        return before is _BEGIN
    if at is C.AT_END:
        if after is None:
            return True
        return after == "\n" and (bool(multiline) or last)
    if at is C.AT_END_STRING:
        return after is None
    if at is C.AT_BOUNDARY or at is C.AT_NON_BOUNDARY:
        if before is _BEGIN and after is None:
            return False  # Python: neither \b nor \B matches in the empty string
        ascii_only = flags & C.SRE_FLAG_ASCII
        word = _is_ascii_word if ascii_only else _is_word
        word_before = before is not _BEGIN and before[2 if ascii_only else 1]
        boundary = word_before != (after is not None and word(after))
        return boundary if at is C.AT_BOUNDARY else not boundary
    raise RegexUnsupported(f"the assertion {at}")


class Searcher:
    """Whether a pattern matches anywhere in a string: a DFA over sets of NFA positions, built
    lazily. Each character costs one cached transition, or, the first time, a closure over at
    most the program's size: time linear in the string. The cache is bounded; past its bound
    it starts afresh (still linear, only slower)."""

    def __init__(self, pattern: str):
        program = _Program(pattern)
        self.code = program.code
        self._required = program.required
        self._transitions: dict[tuple, tuple[bool, frozenset, Any]] = {}
        self._start: frozenset = frozenset((0,))
        self._states: dict[frozenset, frozenset] = {self._start: self._start}  # stored once
        self._state_positions = 1
        self._assertions = False
        # `^...` or `\A...` (not multiline): a match can only start at the beginning.
        first = self.code[0]
        self._anchored = first[0] == _ASSERT and (
            first[1] is _re_constants.AT_BEGINNING_STRING
            or (first[1] is _re_constants.AT_BEGINNING
                and not first[2] & _re_constants.SRE_FLAG_MULTILINE)
        )
        # Check every assertion once, so an unsupported one fails now, not mid-query.
        for instruction in self.code:
            if instruction[0] == _ASSERT:
                self._assertions = True
                _assertion_holds(instruction[1], instruction[2], _BEGIN, "a", False)
        # From the start state, characters no match begins with lead back to it: skip them
        # with a one-character-class `re` search (linear: nothing to backtrack over).
        self._skip = None
        if program.first and not self._anchored:
            escaped = "".join(re.escape(c) for c in sorted(program.first))
            self._skip = re.compile(f"[{escaped}]")

    def _closure(self, pcs: frozenset, before: Any, after: str | None, last: bool) -> set[int]:
        """The consuming positions (and MATCH) reachable from `pcs` without consuming."""
        code = self.code
        reached: set[int] = set()
        seen: set[int] = set()
        stack = list(pcs)
        while stack:
            pc = stack.pop()
            if pc in seen:
                continue
            seen.add(pc)
            instruction = code[pc]
            kind = instruction[0]
            if kind == _JUMP:
                stack.append(instruction[1])
            elif kind == _SPLIT:
                stack.append(instruction[2])
                stack.append(instruction[1])
            elif kind == _ASSERT:
                if _assertion_holds(instruction[1], instruction[2], before, after, last):
                    stack.append(pc + 1)
            else:
                reached.add(pc)
        return reached

    def _step(self, pcs: frozenset, before: Any, c: str, last: bool) -> tuple:
        """(matched before `c`, the next position set, the next `before`)."""
        reached = self._closure(pcs, before, c, last)
        code = self.code
        if any(code[pc][0] == _MATCH for pc in reached):
            return True, pcs, before
        following = {pc + 1 for pc in reached if code[pc][1](c)}
        if not self._anchored:
            following.add(0)  # a match may also start after this character
        positions = frozenset(following)
        stored = self._states.get(positions)
        if stored is None:
            self._state_positions += len(positions)
            if (len(self._states) >= MAX_DFA_STATES
                    or self._state_positions > MAX_DFA_STATE_POSITIONS):
                raise RegexTooCostly()
            stored = self._states[positions] = positions
        return False, stored, _before_kind(c) if self._assertions else None

    def search(self, text: str) -> bool:
        """Whether the pattern matches somewhere in `text`. Raises RegexTooCostly."""
        if self._required and self._required not in text:
            return False
        transitions = self._transitions
        if len(transitions) > _DFA_CACHE_LIMIT:
            transitions.clear()
        pcs = start = self._start
        before: Any = _BEGIN
        skip = self._skip
        i, end = 0, len(text)
        while i < end:
            if pcs is start and skip is not None:
                found = skip.search(text, i)
                if found is None:
                    return False  # no match can start, and none is empty
                if found.start() != i:
                    i = found.start()
                    before = _before_kind(text[i - 1]) if self._assertions else None
            c = text[i]
            last = i == end - 1
            key = (pcs, before, c, last)
            step = transitions.get(key)
            if step is None:
                step = transitions[key] = self._step(pcs, before, c, last)
            matched, pcs, before = step
            if matched:
                return True
            if not pcs:  # anchored at the start, and no way forward
                return False
            i += 1
        reached = self._closure(pcs, before, None, False)
        return any(self.code[pc][0] == _MATCH for pc in reached)


class RegexTooCostly(Exception):
    pass
