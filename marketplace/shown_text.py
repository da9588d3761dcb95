"""Text one party writes and others are shown as written (a seller's service names, descriptions, tags, skill
descriptions, an agent's display name): it must read as it acts. Refused, wherever such text is stored:

- control characters (C0, DEL, C1): a terminal escape (ESC[2J) rewrites the screen of an operator whose command
  prints the text (`manage.py reconcile`); a carriage return overwrites a line. Prose (a description) keeps its line
  breaks and tabs;
- invisible format characters (Unicode category Cf): the bidi embeddings, overrides and isolates (U+202A-U+202E,
  U+2066-U+2069) reorder what is displayed ("Trojan Source": a name displaying as another seller's), zero-width
  spaces make two names look alike, tag characters (U+E0000 block) hide text an agent reading the listing still
  reads. Kept: the zero-width joiner and non-joiner, which emoji sequences and Indic and Persian words need; and, in
  prose only, the implicit direction marks (U+200E, U+200F, U+061C), which right-to-left prose needs and which reorder
  nothing a strong letter would not;
- the other characters Unicode says to render as nothing (Default_Ignorable_Code_Point, not category Cf): the
  combining grapheme joiner, the Hangul fillers (a blank "letter", long used for names that look empty or like
  another's), the Khmer inherent vowels and the unassigned ignorables; and a variation selector that selects nothing
  (on a letter, a space, nothing), so "open\ufe0fai" is not a second "openai". Kept: a variation selector on a symbol
  or a digit (emoji and keycap presentation, "\u2764\ufe0f", "1\ufe0f\u20e3"), on a CJK ideograph (ideographic
  variants of names) and the Mongolian free variation selectors on Mongolian letters (their written forms);
- line and paragraph separators (U+2028, U+2029) in a name, a lone surrogate anywhere.
"""

import unicodedata

from marketplace.errors import InvalidInput

CODE = "unsafe_characters"
_JOINERS = frozenset("\u200c\u200d")
_DIRECTION_MARKS = frozenset("\u200e\u200f\u061c")
_PROSE_LAYOUT = frozenset("\t\n\r")


# Default_Ignorable_Code_Point (Unicode's DerivedCoreProperties) outside category Cf, as inclusive ranges.
_IGNORABLE_NOT_FORMAT = ((0x034F, 0x034F), (0x115F, 0x1160), (0x17B4, 0x17B5), (0x2065, 0x2065), (0x3164, 0x3164),
                         (0xFFA0, 0xFFA0), (0xFFF0, 0xFFF8), (0xE0000, 0xE00FF), (0xE01F0, 0xE0FFF))
_VARIATION_SELECTORS = ((0xFE00, 0xFE0F), (0xE0100, 0xE01EF))
_MONGOLIAN_VARIATION_SELECTORS = frozenset("\u180b\u180c\u180d\u180f")


def _within(code: int, ranges: tuple[tuple[int, int], ...]) -> bool:
    return any(low <= code <= high for low, high in ranges)


def _selects_a_variant(char: str, base: str) -> bool:
    """Whether variation selector `char` can select a glyph of the character `base` before it."""
    if char in _MONGOLIAN_VARIATION_SELECTORS:
        return unicodedata.name(base, "").startswith("MONGOLIAN")
    return (unicodedata.category(base)[0] == "S" or base.isdecimal() or base in "#*"
            or unicodedata.name(base, "").startswith(("CJK UNIFIED IDEOGRAPH", "CJK COMPATIBILITY IDEOGRAPH")))


def _refused(char: str, *, prose: bool, before: str) -> bool:
    category = unicodedata.category(char)
    if category == "Cc":
        return not (prose and char in _PROSE_LAYOUT)
    if category == "Cf":
        return char not in _JOINERS and not (prose and char in _DIRECTION_MARKS)
    if category == "Mn" and (char in _MONGOLIAN_VARIATION_SELECTORS or _within(ord(char), _VARIATION_SELECTORS)):
        return not (before and _selects_a_variant(char, before))
    return (category == "Cs" or (category in ("Zl", "Zp") and not prose)
            or _within(ord(char), _IGNORABLE_NOT_FORMAT))


def unsafe_characters(text: str, *, prose: bool = False) -> list[str]:
    """The code points (`U+202E`) of `text` refused in a name, or in prose (`prose`), in order, once each."""
    return list(dict.fromkeys(f"U+{ord(char):04X}" for index, char in enumerate(text)
                              if _refused(char, prose=prose, before=text[index - 1] if index else "")))


def message(characters: list[str]) -> str:
    return (f"Control or invisible formatting characters are not allowed in text shown to others: "
            f"{', '.join(characters)}.")


def refuse_unsafe(text: str, *, field: str, prose: bool = False) -> None:
    """400 `unsafe_characters` naming `field` and the characters, if `text` holds any refused (a plain ASCII line
    is checked at the cost of two C calls)."""
    if text.isascii() and text.isprintable():
        return
    characters = unsafe_characters(text, prose=prose)
    if characters:
        raise InvalidInput(message(characters), code=CODE, details={"fields": [field], "characters": characters})


def printable(text: str) -> str:
    """`text` for a terminal or a log line: its control, format, separator and other invisible characters escaped
    (`\\x1b`, `\\u202e`, `\\u3164`), the rest as written."""
    return "".join(char.encode("unicode_escape").decode("ascii")
                   if unicodedata.category(char) in ("Cc", "Cf", "Cs", "Zl", "Zp")
                   or _within(ord(char), _IGNORABLE_NOT_FORMAT) else char
                   for char in text)
