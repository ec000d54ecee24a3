"""Make a caption's text mean what it shows: Unicode NFC, no invisible controls.

Scraped captions carry characters a reader never sees but a text encoder
does: bidi overrides and isolates (which also reorder what a reviewer sees
in the report), a byte-order mark left from an editor, C0/C1 control codes.
They are removed before the recipe runs, and each removal is reported, so
the caption trained on is the caption shown.  Tabs, newlines and other
whitespace controls stay: the recipe's whitespace mapper turns them into
spaces, which keeps the words apart.
"""

from __future__ import annotations

import unicodedata

# Bidi embeddings/overrides (U+202A-U+202E), isolates (U+2066-U+2069), the LRM/RLM/ALM marks, and the BOM.
INVISIBLE = frozenset(
    [chr(code) for code in range(0x202A, 0x202F)]
    + [chr(code) for code in range(0x2066, 0x206A)]
    + ["\u200e", "\u200f", "\u061c", "\ufeff"]
)


def normalise_caption(text: str) -> tuple[str, list[str]]:
    """``text`` in NFC without bidi controls, BOMs and non-whitespace control codes; and what was done.

    The second value lists the changes, e.g. ``["NFC", "U+202E RIGHT-TO-LEFT
    OVERRIDE x1"]``; it is empty when the text was already clean.
    """
    composed = unicodedata.normalize("NFC", text)
    changes = ["NFC"] if composed != text else []
    removed: dict[str, int] = {}
    kept = []
    for char in composed:
        if char in INVISIBLE or (unicodedata.category(char) == "Cc" and not char.isspace()):
            removed[char] = removed.get(char, 0) + 1
        else:
            kept.append(char)
    changes += [f"U+{ord(char):04X} {_name(char)} x{count}" for char, count in sorted(removed.items())]
    return "".join(kept), changes


def _name(char: str) -> str:
    return unicodedata.name(char, "CONTROL CHARACTER")
