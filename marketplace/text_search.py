"""PostgreSQL's web-search syntax (`websearch_to_tsquery`) and what it cannot take.

Exclusion marks (`-`) with no word between them nest its negations (`!!!…`), and past 32 deep it fails with an
internal error ("tsquery stack too small", whatever separates the marks: spaces, `!`, `(`, `)`, `&`, `|`, `<`).
Hyphens within words and an exclusion of each of many words nest nothing.
"""

import re

NESTED_NEGATIONS_MAX = 16
_BETWEEN_WORDS = re.compile(r"\W+")


def negations_nest_too_deep(text: str) -> bool:
    """Whether a stretch of non-word characters of `text` holds more than NESTED_NEGATIONS_MAX exclusion marks."""
    return text.count("-") > NESTED_NEGATIONS_MAX and any(
        stretch.count("-") > NESTED_NEGATIONS_MAX for stretch in _BETWEEN_WORDS.findall(text))
