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
- line and paragraph separators (U+2028, U+2029) in a name, a lone surrogate anywhere.
"""

import unicodedata

from marketplace.errors import InvalidInput

CODE = "unsafe_characters"
_JOINERS = frozenset("\u200c\u200d")
_DIRECTION_MARKS = frozenset("\u200e\u200f\u061c")
_PROSE_LAYOUT = frozenset("\t\n\r")


def _refused(char: str, *, prose: bool) -> bool:
    category = unicodedata.category(char)
    if category == "Cc":
        return not (prose and char in _PROSE_LAYOUT)
    if category == "Cf":
        return char not in _JOINERS and not (prose and char in _DIRECTION_MARKS)
    return category == "Cs" or (category in ("Zl", "Zp") and not prose)


def unsafe_characters(text: str, *, prose: bool = False) -> list[str]:
    """The code points (`U+202E`) of `text` refused in a name, or in prose (`prose`), in order, once each."""
    return list(dict.fromkeys(f"U+{ord(char):04X}" for char in text if _refused(char, prose=prose)))


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
    """`text` for a terminal or a log line: its control, format and separator characters escaped (`\\x1b`,
    `\\u202e`), the rest as written."""
    return "".join(char.encode("unicode_escape").decode("ascii")
                    if unicodedata.category(char) in ("Cc", "Cf", "Cs", "Zl", "Zp") else char
                    for char in text)
