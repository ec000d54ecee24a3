"""YAML loading that remembers line numbers, so schema errors can point at the line.

Configs and story specs are hand-written; "prep.source: field required" is far
less useful than "kstory.yaml:7: prep.source: ...".
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from kstory.errors import KstoryError

Model = TypeVar("Model", bound=BaseModel)


def _walk(node: yaml.Node, prefix: tuple, marks: dict[tuple, int]) -> None:
    marks[prefix] = node.start_mark.line + 1
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            key = (*prefix, key_node.value)
            _walk(value_node, key, marks)
            marks[key] = key_node.start_mark.line + 1
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            _walk(item, (*prefix, index), marks)


def load_yaml(path: Path) -> tuple[Any, dict[tuple, int]]:
    """Parse ``path`` and return (data, {key path: line number})."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise KstoryError("file not found", path=path, fix="check the path, or create it (see docs/config.md)") from None
    except UnicodeDecodeError:
        raise KstoryError("not UTF-8 text", path=path, fix="save the file as UTF-8") from None
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        raise KstoryError(f"invalid YAML: {where}{getattr(exc, 'problem', exc)}", path=path,
                          fix="fix the YAML syntax at that line") from None
    marks: dict[tuple, int] = {}
    if node is not None:
        _walk(node, (), marks)
    return data, marks


def _line_for(loc: tuple, marks: dict[tuple, int]) -> int | None:
    for end in range(len(loc), -1, -1):
        if loc[:end] in marks:
            return marks[loc[:end]]
    return None


def validate(model: type[Model], data: Any, marks: dict[tuple, int], path: Path) -> Model:
    """Validate ``data`` against ``model``; on failure name every bad field with its line."""
    try:
        return model.model_validate(data if data is not None else {})
    except ValidationError as exc:
        problems = []
        for error in exc.errors():
            loc = tuple(error["loc"])
            line = _line_for(loc, marks)
            where = f"line {line}: " if line else ""
            field = ".".join(str(part) for part in loc) or "(top level)"
            problems.append(f"  {where}{field}: {error['msg']}")
        raise KstoryError(
            "invalid settings:\n" + "\n".join(problems),
            path=path,
            fix="correct the fields listed above (see docs/config.md for every field)",
        ) from None


def load_model(model: type[Model], path: Path) -> Model:
    """Load and validate a YAML file into ``model`` with line-precise errors."""
    data, marks = load_yaml(path)
    return validate(model, data, marks, path)
