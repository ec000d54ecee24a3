"""YAML loading that remembers line numbers, so schema errors can point at the line.

Configs and story specs are hand-written; "prep.source: field required" is far
less useful than "kstory.yaml:7: prep.source: ...". A key given twice in one
mapping is an error naming both lines: plain YAML would keep the last one silently.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from kstory.core.errors import KstoryError

Model = TypeVar("Model", bound=BaseModel)


class DuplicateKey(Exception):
    """A mapping names the same key twice (YAML would silently keep the last one)."""

    def __init__(self, where: tuple, first: int, second: int):
        self.where, self.first, self.second = where, first, second


def _walk(node: yaml.Node, prefix: tuple, marks: dict[tuple, int]) -> None:
    marks[prefix] = node.start_mark.line + 1
    if isinstance(node, yaml.MappingNode):
        seen: dict[Any, int] = {}
        for key_node, value_node in node.value:
            line = key_node.start_mark.line + 1
            if isinstance(key_node, yaml.ScalarNode) and key_node.value != "<<":
                if key_node.value in seen:
                    raise DuplicateKey((*prefix, key_node.value), seen[key_node.value], line)
                seen[key_node.value] = line
            key = (*prefix, key_node.value)
            _walk(value_node, key, marks)
            marks[key] = line
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            _walk(item, (*prefix, index), marks)


def load_yaml(path: Path, doc: str = "docs/config.md", text: str | None = None) -> tuple[Any, dict[tuple, int]]:
    """Parse ``path`` and return (data, {key path: line number}); ``doc`` is the page a missing file points to.

    ``text``: the file's contents to check instead of what is on disk (a change is checked before it is written).
    """
    try:
        if text is None:
            text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise KstoryError("file not found", path=path, fix=f"check the path, or create it (see {doc})") from None
    except IsADirectoryError:
        raise KstoryError("this is a folder, not a YAML file", path=path, fix=f"give the YAML file (see {doc})") from None
    except UnicodeDecodeError:
        raise KstoryError("not UTF-8 text", path=path, fix="save the file as UTF-8") from None
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()  # one parse: the node tree gives the lines, then the data
        data = loader.construct_document(node) if node is not None else None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        raise KstoryError(f"invalid YAML: {where}{getattr(exc, 'problem', exc)}", path=path,
                          fix="fix the YAML syntax at that line") from None
    finally:
        loader.dispose()
    marks: dict[tuple, int] = {}
    if node is not None:
        try:
            _walk(node, (), marks)
        except DuplicateKey as dup:
            name = ".".join(str(part) for part in dup.where)
            raise KstoryError(f"{name} is given twice, on line {dup.first} and line {dup.second}", path=path,
                              fix=f"keep one of the two (YAML would silently use line {dup.second})") from None
    return data, marks


def _line_for(loc: tuple, marks: dict[tuple, int]) -> int | None:
    for end in range(len(loc), -1, -1):
        if loc[:end] in marks:
            return marks[loc[:end]]
    return None


def doc_page(model: type[BaseModel], loc: tuple = ()) -> str:
    """The documentation page of the field at ``loc`` in ``model``.

    A schema says where it is documented with ``DOC_PAGE`` (default
    docs/config.md) and, for sections documented elsewhere, ``SECTION_PAGES``
    (``{"train": "docs/train.md"}`` on the run config).
    """
    sections: dict[str, str] = getattr(model, "SECTION_PAGES", {})
    if loc and loc[0] in sections:
        return sections[loc[0]]
    return getattr(model, "DOC_PAGE", "docs/config.md")


def validation_error(model: type[BaseModel], exc: ValidationError, marks: dict[tuple, int],
                     path: Path | None, *, names: dict[str, str] | None = None) -> KstoryError:
    """One ``KstoryError`` listing every bad field of ``exc`` with its line and the page that documents it.

    ``names`` renames fields for the message (``{"max_steps": "--steps"}`` for command-line options).
    """
    problems, pages = [], []
    for error in exc.errors():
        loc = tuple(error["loc"])
        line = _line_for(loc, marks)
        where = f"line {line}: " if line else ""
        field = ".".join(str(part) for part in loc) or "(top level)"
        if names and loc and loc[0] in names:
            field = names[loc[0]]
        problems.append(f"  {where}{field}: {error['msg']}")
        page = doc_page(model, loc)
        if page not in pages:
            pages.append(page)
    return KstoryError(
        "invalid settings:\n" + "\n".join(problems),
        path=path,
        fix=f"correct the fields listed above (see {' and '.join(pages)} for every field)",
    )


def validate(model: type[Model], data: Any, marks: dict[tuple, int], path: Path) -> Model:
    """Validate ``data`` against ``model``; on failure name every bad field with its line."""
    try:
        return model.model_validate(data if data is not None else {})
    except ValidationError as exc:
        raise validation_error(model, exc, marks, path) from None


def load_model(model: type[Model], path: Path) -> Model:
    """Load and validate a YAML file into ``model`` with line-precise errors."""
    data, marks = load_yaml(path, doc_page(model))
    return validate(model, data, marks, path)
