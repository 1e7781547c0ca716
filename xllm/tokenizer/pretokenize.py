"""Pre-tokenizers: how byte-level BPE cuts text into words before merging.

Byte-level BPE (GPT-2, Llama 3, SmolLM2, Qwen2) never merges across the
boundaries of a "pre-tokenizer": a regular expression first cuts the text into
words, numbers, punctuation runs and whitespace runs, and BPE then runs on each
piece alone. The regexes come from the model (a `tokenizer.json` spells them
out; a GGUF names them with `tokenizer.ggml.pre`) and are written for the
Oniguruma / PCRE dialect, which has Unicode property classes such as `\\p{L}`
(any letter) and `\\p{N}` (any number). Python's `re` module has no `\\p{..}`,
and xllm does not depend on the third-party `regex` module, so this module
*translates* such a pattern into a plain `re` pattern: `\\p{L}` becomes an
explicit character class `[A-Za-z\\u00aa...]` built once from `unicodedata`.

Worked example (the GPT-2 pattern)::

    >>> gpt2 = PreTokenizer.from_spec([{"type": "regex", "pattern": GPT2_PATTERN}])
    >>> gpt2.split("Hello world's  2024 cats!!")
    ['Hello', ' world', "'s", ' ', ' 2024', ' cats', '!!']

SmolLM2 first isolates every digit (HF `Digits(individual_digits=True)`), then
applies the GPT-2 pattern to what is between the digits::

    >>> smol = PreTokenizer.from_spec(PRESETS["smollm"])
    >>> smol.split("in 2024")
    ['in', ' ', '2', '0', '2', '4']

What is handled: `\\p{X}` / `\\P{X}` for one- and two-letter general
categories (`L`, `N`, `Lu`, `Nd`, ...), `\\s \\S \\d \\D \\w \\W` with the
Oniguruma (Unicode) meaning, lookaheads, `(?i:...)`, possessive quantifiers
(Python >= 3.11). What is not: script properties (`\\p{Han}`), `\\X`, and
named properties other than general categories; such a pattern raises
`ValueError`. The character classes follow the Unicode version of the running
Python's `unicodedata` (14.0 for Python 3.11); characters assigned in a later
Unicode version are "unassigned" here and may be classed differently than by
a reference tokenizer built on newer Unicode tables.
"""

from __future__ import annotations

import re
import unicodedata
from functools import lru_cache
from typing import Callable

# --------------------------------------------------------------------------
# The patterns used by the known models.
# --------------------------------------------------------------------------

#: GPT-2's pattern (also StarCoder, SmolLM2 after its digit split, ...).
GPT2_PATTERN = (
    r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
)

#: Llama 3's pattern: case-insensitive contractions, numbers in groups of 3,
#: a non-letter may lead a word, newlines kept with punctuation.
LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

#: Qwen 2's pattern: Llama 3's, but every digit on its own.
QWEN2_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

_DIGITS_THEN_GPT2 = [
    {"type": "digits", "individual": True},
    {"type": "regex", "pattern": GPT2_PATTERN},
]

_GPT2 = [{"type": "regex", "pattern": GPT2_PATTERN}]
_LLAMA3 = [{"type": "regex", "pattern": LLAMA3_PATTERN}]
_QWEN2 = [{"type": "regex", "pattern": QWEN2_PATTERN}]

#: `tokenizer.ggml.pre` name -> pre-tokenizer spec (see `PreTokenizer.from_spec`),
#: grouped as llama.cpp groups them. "default" (GGUFs written before
#: llama.cpp recorded the pre-tokenizer) is taken as GPT-2's.
PRESETS: dict[str, list[dict]] = {
    **{name: _GPT2 for name in ("default", "gpt2", "gpt-2", "phi-2", "mpt", "olmo", "jais")},
    **{name: _LLAMA3 for name in ("llama3", "llama-v3", "llama-bpe")},
    **{name: _QWEN2 for name in ("qwen2", "stablelm2")},
    **{name: _DIGITS_THEN_GPT2 for name in ("smollm", "starcoder", "refact", "command-r", "codeshell",
                                             "exaone", "minerva-7b")},
}

# --------------------------------------------------------------------------
# Unicode character classes, built from unicodedata.
# --------------------------------------------------------------------------

_MAX_CP = 0x110000


@lru_cache(maxsize=1)
def _category_ranges() -> dict[str, list[tuple[int, int]]]:
    """General category (e.g. "Lu") -> sorted list of (first, last) code points.

    One pass over all 1.1 million code points (about 0.2 s, done once)."""
    ranges: dict[str, list[tuple[int, int]]] = {}
    category = unicodedata.category
    start = 0
    current = category("\0")
    for cp in range(1, _MAX_CP):
        c = category(chr(cp))
        if c != current:
            ranges.setdefault(current, []).append((start, cp - 1))
            start, current = cp, c
    ranges.setdefault(current, []).append((start, _MAX_CP - 1))
    return ranges


def _merge_ranges(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for a, b in sorted(ranges):
        if out and a <= out[-1][1] + 1:
            out[-1] = (out[-1][0], max(b, out[-1][1]))
        else:
            out.append((a, b))
    return out


def _cp(c: int) -> str:
    """A code point as an escape that `re` reads the same inside or outside [...]."""
    return f"\\U{c:08x}"


#: Code point limits of the compiled variants of a pattern: BMP only, all.
BMP, ALL = 0x10000, _MAX_CP
_ASTRAL = re.compile("[\U00010000-\U0010ffff]")


def text_limit(text: str) -> int:
    """The smallest limit (BMP or ALL) above every character of `text`."""
    return ALL if _ASTRAL.search(text) else BMP


def _class_body(ranges: list[tuple[int, int]], limit: int = ALL) -> str:
    """The inside of a [...] class matching exactly `ranges` below `limit`."""
    return "".join(_cp(a) if a == b else f"{_cp(a)}-{_cp(b)}"
                   for a, b in ((a, min(b, limit - 1)) for a, b in ranges if a < limit))


@lru_cache(maxsize=None)
def category_class_body(name: str, limit: int = ALL) -> str:
    """The inside of a `re` character class for general category `name`,
    restricted to code points below `limit`.

    `name` is one letter ("L": all letters) or two ("Lu": upper-case letters).
    Why a limit: `re` tests a class's characters outside the BMP one range
    at a time, for every character that is not in the class, which makes
    `[\\p{L}]` four times slower; text without such characters (most text:
    `text_limit`) uses the BMP-only variant of the pattern.

        >>> import re
        >>> bool(re.fullmatch("[" + category_class_body("L") + "]+", "Straße"))
        True
    """
    table = _category_ranges()
    cats = [c for c in table if c == name or (len(name) == 1 and c[0] == name)]
    if not cats or len(name) > 2:
        raise ValueError(f"unsupported Unicode property \\p{{{name}}}")
    return _class_body(_merge_ranges([r for c in cats for r in table[c]]), limit)


@lru_cache(maxsize=None)
def whitespace_class_body(limit: int = ALL) -> str:
    """Oniguruma's Unicode `\\s`: TAB..CR, NEL (U+0085) and the Z* separators.

    Python's own `\\s` differs: it also matches U+001C..U+001F."""
    table = _category_ranges()
    ranges = [(0x09, 0x0D), (0x85, 0x85)]
    for c in ("Zs", "Zl", "Zp"):
        ranges += table[c]
    return _class_body(_merge_ranges(ranges), limit)


def _word_class_body(limit: int) -> str:
    # Oniguruma's Unicode \w: letters, marks, decimal digits, connector punctuation.
    return "".join(category_class_body(c, limit) for c in ("L", "M", "Nd", "Pc"))


def translate_pattern(pattern: str, limit: int = ALL) -> str:
    """Rewrite an Oniguruma/PCRE pattern into an equivalent Python `re` pattern
    (for text whose characters are all below `limit`).

        >>> import re
        >>> re.findall(translate_pattern(r" ?\\p{L}+"), "a bc 1")
        ['a', ' bc']
    """
    out: list[str] = []
    in_class = False  # inside [...]
    i, n = 0, len(pattern)
    while i < n:
        c = pattern[i]
        if c == "\\" and i + 1 < n:
            e = pattern[i + 1]
            body: str | None = None
            negated = False
            if e in "pP":
                if i + 2 < n and pattern[i + 2] == "{":
                    close = pattern.index("}", i + 2)
                    name = pattern[i + 3:close]
                    end = close + 1
                else:  # \pL
                    name = pattern[i + 2]
                    end = i + 3
                if name.startswith("^"):
                    name, negated = name[1:], True
                body = category_class_body(name, limit)
                negated = negated != (e == "P")
            elif e in "sS":
                body, negated, end = whitespace_class_body(limit), e == "S", i + 2
            elif e in "dD":
                body, negated, end = category_class_body("Nd", limit), e == "D", i + 2
            elif e in "wW":
                body, negated, end = _word_class_body(limit), e == "W", i + 2
            if body is None:  # any other escape means the same in `re`
                out.append(pattern[i:i + 2])
                i += 2
                continue
            if in_class:
                if negated:
                    raise ValueError(f"negated class escape inside [...] is not supported: {pattern!r}")
                out.append(body)
            else:
                out.append(("[^" if negated else "[") + body + "]")
            i = end
            continue
        if in_class:
            if c == "]":
                in_class = False
            out.append(c)
            i += 1
            continue
        if c == "[":
            in_class = True
            out.append(c)
            i += 1
            # a leading ^ and a leading ] are literal parts of the class opener
            if i < n and pattern[i] == "^":
                out.append("^")
                i += 1
            if i < n and pattern[i] == "]":
                out.append("\\]")
                i += 1
            continue
        out.append(c)
        i += 1
    return "".join(out)


@lru_cache(maxsize=None)
def compile_pattern(pattern: str, limit: int = ALL) -> re.Pattern:
    """`translate_pattern` + `re.compile`, cached (tokenizers share patterns)."""
    return re.compile(translate_pattern(pattern, limit))


# --------------------------------------------------------------------------
# The pre-tokenizer: a list of split steps.
# --------------------------------------------------------------------------

Step = Callable[[str], list[str]]


def _regex_step(spec: dict, limit: int) -> Step:
    """Split on a regex. behavior "isolated" (default): every match is a piece,
    and so is every stretch of text between matches; "removed": the matches are
    dropped (HF `Split(..., behavior="Removed")`). `invert`: the pieces are the
    text between matches instead."""
    rx = compile_pattern(spec["pattern"], limit) if not spec.get("literal") else re.compile(re.escape(spec["pattern"]))
    behavior = spec.get("behavior", "isolated").lower()
    if behavior not in ("isolated", "removed"):
        raise ValueError(f"unsupported split behavior {behavior!r}")
    if spec.get("invert", False) and behavior == "removed":
        # inverted: the matches are the pieces, the text between them goes
        def matches_only(text: str) -> list[str]:
            return [m.group() for m in rx.finditer(text) if m.group()]
        return matches_only
    if behavior == "removed":
        def gaps_only(text: str) -> list[str]:
            pieces, pos = [], 0
            for m in rx.finditer(text):
                if m.start() > pos:
                    pieces.append(text[pos:m.start()])
                pos = max(pos, m.end())
            if pos < len(text):
                pieces.append(text[pos:])
            return pieces
        return gaps_only
    # isolated (inverted or not): matches and the text between them are pieces
    if spec.get("total"):
        # The pattern matches every character (true of all the presets): the
        # matches already cover the text, so findall is enough (and fastest).
        return rx.findall

    def isolated(text: str) -> list[str]:
        pieces: list[str] = []
        pos = 0
        for m in rx.finditer(text):
            a, b = m.span()
            if a > pos:
                pieces.append(text[pos:a])
            if b > a:
                pieces.append(text[a:b])
            pos = b
        if pos < len(text):
            pieces.append(text[pos:])
        return pieces
    return isolated


_TOTAL_PATTERNS = {GPT2_PATTERN, LLAMA3_PATTERN, QWEN2_PATTERN}


def _digits_step(spec: dict, limit: int) -> Step:
    """HF `Digits`: every \\p{N} character alone (individual) or runs of them."""
    body = category_class_body("N", limit)
    rx = re.compile(f"[{body}]|[^{body}]+" if spec.get("individual", True) else f"[{body}]+|[^{body}]+")
    return rx.findall


def _prefix_space_step(spec: dict, limit: int) -> Step:
    """HF `ByteLevel(add_prefix_space=True)`: a space before each piece that lacks one."""
    def add_space(text: str) -> list[str]:
        return [text if text.startswith(" ") else " " + text]
    return add_space


class PreTokenizer:
    """Cuts text into the pieces that BPE then encodes one by one.

    Built from a *spec*: a list of steps, each a dict, applied in order (every
    step splits each piece that the step before produced)::

        {"type": "regex", "pattern": P, "behavior": "isolated"|"removed", "invert": bool}
        {"type": "digits", "individual": bool}
        {"type": "prefix_space"}

    The spec is plain data so that `convert/export_tokenizer.py` can store it.
    """

    def __init__(self, spec: list[dict]):
        self.spec = [dict(s) for s in spec]
        for s in self.spec:
            if s.get("type") not in ("regex", "digits", "prefix_space"):
                raise ValueError(f"unknown pre-tokenizer step {s.get('type')!r}")
        # The steps, compiled for BMP-only text and for any text (see text_limit).
        self._steps = {limit: self._compile(limit) for limit in (BMP, ALL)}

    def _compile(self, limit: int) -> list[Step]:
        steps: list[Step] = []
        for s in self.spec:
            kind = s["type"]
            if kind == "regex":
                if s["pattern"] in _TOTAL_PATTERNS and not s.get("literal"):
                    s = dict(s, total=True)
                steps.append(_regex_step(s, limit))
            elif kind == "digits":
                steps.append(_digits_step(s, limit))
            else:
                steps.append(_prefix_space_step(s, limit))
        return steps

    @classmethod
    def from_spec(cls, spec: list[dict]) -> "PreTokenizer":
        return cls(spec)

    def split(self, text: str) -> list[str]:
        """The pieces of `text`, in order; they concatenate back to `text`
        (unless a step removes matches)."""
        steps = self._steps[text_limit(text)]
        if len(steps) == 1:
            return steps[0](text)
        pieces = [text]
        for step in steps:
            pieces = [p for piece in pieces for p in step(piece)]
        return pieces
