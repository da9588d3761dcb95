"""Tags as one form wherever they are kept or compared (listings, search filters, owners' tag rules): NFKC (a
full-width or mathematical letter is its plain letter), case-folded, trimmed. A tag whose letters mix scripts (a
Cyrillic `а` in a Latin word) is refused: it can only be there to look like another tag."""

import unicodedata

# Scripts written together in one language: one group each (Japanese mixes kanji and kana; Korean hangul and hanja).
_SCRIPT_GROUPS = {"CJK": "HAN", "HIRAGANA": "HAN", "KATAKANA": "HAN", "HANGUL": "HAN", "IDEOGRAPHIC": "HAN",
                  "BOPOMOFO": "HAN", "KATAKANA-HIRAGANA": "HAN"}
_NO_SCRIPT = {"MODIFIER", "UNKNOWN"}  # modifier letters (ʻ, ˈ) are written with several scripts
TAGS_PER_LISTING = 15


def tag_normalise(name: str) -> str:
    return unicodedata.normalize("NFKC", name).casefold().strip()


def tag_scripts(name: str) -> set[str]:
    """The scripts of the tag's letters (by the first word of each letter's Unicode name; marks, digits and
    punctuation belong to none)."""
    scripts = set()
    for char in name:
        if unicodedata.category(char).startswith("L"):
            script = unicodedata.name(char, "UNKNOWN").split()[0]
            if script not in _NO_SCRIPT:
                scripts.add(_SCRIPT_GROUPS.get(script, script))
    return scripts


def tag_mixes_scripts(name: str) -> bool:
    return len(tag_scripts(name)) > 1
