"""The challenge's model naming rule: ``<team>-可图Kolors训练-<suffix>``."""

from __future__ import annotations

import re

from kstory.core.errors import KstoryError

MIDDLE = "可图Kolors训练"
# ModelScope model names: letters, digits, '_', '.', '-' (and CJK, which the rule itself needs).
_PART = r"[A-Za-z0-9_.\u4e00-\u9fff]+(?:-[A-Za-z0-9_.\u4e00-\u9fff]+)*"
_NAME = re.compile(rf"^(?P<team>{_PART})-{MIDDLE}-(?P<suffix>{_PART})$")
MAX_LENGTH = 64
RULE = f"<team>-{MIDDLE}-<suffix>, e.g. myteam-{MIDDLE}-watercolour-fox"


def model_name(team: str, suffix: str) -> str:
    """``team`` and ``suffix`` joined by the rule's middle part, validated."""
    return validate_model_name(f"{team.strip()}-{MIDDLE}-{suffix.strip()}")


def validate_model_name(name: str) -> str:
    """Return ``name`` if it follows the rule, else raise KstoryError saying what is wrong.

    Accepts a bare name or ``owner/name`` (the owner is not checked here).
    """
    bare = name.rsplit("/", 1)[-1]
    if MIDDLE not in bare:
        raise KstoryError(f"model name {name!r} lacks '-{MIDDLE}-'", fix=f"name it {RULE}")
    if len(bare) > MAX_LENGTH:
        raise KstoryError(f"model name {name!r} is {len(bare)} characters, at most {MAX_LENGTH} are allowed",
                          fix="use a shorter team name or suffix")
    match = _NAME.match(bare)
    if not match:
        team, _, suffix = bare.partition(f"-{MIDDLE}-")
        if not team:
            problem = "the team name before it is missing"
        elif not suffix:
            problem = "the suffix after it is missing"
        else:
            problem = "team and suffix may use only letters, digits, Chinese characters, '_', '.' and single '-'"
        raise KstoryError(f"model name {name!r} breaks the naming rule: {problem}", fix=f"name it {RULE}")
    return name
