"""Load a Data-Juicer recipe, check it can run here, and pin the settings kstory's report relies on."""

from __future__ import annotations

import ast
import contextlib
import importlib.util
import inspect
import sys
import types
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from kstory.core.errors import KstoryError

DEFAULT_RECIPE = Path(__file__).parent / "recipes" / "default.yaml"
KSTORY_SECTION = "kstory"
KSTORY_DEFAULTS = {"max_image_pixels": 64_000_000}
TEXT_KEY = "text"
IMAGE_KEY = "images"


@dataclass(frozen=True)
class Recipe:
    """A recipe file split into kstory's pre-check settings and the Data-Juicer config."""

    path: Path
    juicer: dict[str, Any]
    max_image_pixels: int

    @property
    def ops(self) -> list[tuple[str, dict[str, Any]]]:
        """(op name, arguments as written in the recipe), in run order."""
        return [(name, dict(args or {})) for entry in self.juicer["process"] for name, args in entry.items()]


def load_recipe(path: Path | None = None) -> Recipe:
    """Read ``path`` (default: the shipped recipe) and fail early on anything Data-Juicer would trip over."""
    path = Path(path) if path is not None else DEFAULT_RECIPE
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as error:
        raise KstoryError(
            f"cannot read recipe ({error.strerror})", path=path, fix="pass an existing YAML file with --recipe"
        ) from None
    except yaml.YAMLError as error:
        raise KstoryError(f"recipe is not valid YAML: {error}", path=path, fix="fix the YAML syntax") from None
    if not isinstance(data, dict) or not isinstance(data.get("process"), list) or not data["process"]:
        raise KstoryError("recipe has no `process:` list of ops", path=path, fix=f"start from {DEFAULT_RECIPE}")
    for entry in data["process"]:
        if not (
            isinstance(entry, dict) and len(entry) == 1 and isinstance(next(iter(entry.values())), (dict, type(None)))
        ):
            raise KstoryError(
                f"process entry {entry!r} is not `- op_name: {{args}}`", path=path, fix=f"see {DEFAULT_RECIPE}"
            )
    settings = dict(KSTORY_DEFAULTS)
    extra = data.pop(KSTORY_SECTION, None) or {}
    unknown = set(extra) - set(KSTORY_DEFAULTS)
    if unknown:
        raise KstoryError(
            f"unknown `{KSTORY_SECTION}:` settings {sorted(unknown)}",
            path=path,
            fix=f"allowed: {sorted(KSTORY_DEFAULTS)}",
        )
    settings.update(extra)
    recipe = Recipe(path=path, juicer=data, max_image_pixels=int(settings["max_image_pixels"]))
    check_ops_runnable(recipe)
    return recipe


def check_ops_runnable(recipe: Recipe) -> None:
    """Every op must exist, take the arguments the recipe gives it and have its optional dependencies installed.

    Data-Juicer would otherwise pip-install a missing dependency in the middle
    of the run (or fail there), and find a wrong argument only after the
    pictures were decoded; kstory refuses up front and names the package or
    argument.
    """
    from data_juicer.ops import OPERATORS
    from data_juicer.utils.lazy_loader import LazyLoader

    missing: dict[str, set[str]] = {}
    for name, _ in recipe.ops:
        op_class = OPERATORS.modules.get(name)
        if op_class is None:
            raise KstoryError(
                f"unknown Data-Juicer op {name!r}",
                path=recipe.path,
                fix="check the op name in Data-Juicer's config_all.yaml",
            )
        for module_name in _lazy_imports(sys.modules[op_class.__module__], LazyLoader):
            top = module_name.split(".")[0]
            if importlib.util.find_spec(top) is None:
                missing.setdefault(LazyLoader.get_package_name(top), set()).add(name)
    _check_op_arguments(recipe)
    if missing:
        needs = ", ".join(f"{package} (for {', '.join(sorted(ops))})" for package, ops in sorted(missing.items()))
        raise KstoryError(
            f"recipe ops need packages that are not installed: {needs}",
            path=recipe.path,
            fix=f"pip install {' '.join(sorted(missing))}, or remove those ops from the recipe",
        )


def _check_op_arguments(recipe: Recipe) -> None:
    """Argument names and types, with Data-Juicer's own pre-flight check, before anything runs.

    The executor would make the same check only after the pictures were
    decoded, and its error would end the run with a traceback.
    """
    from data_juicer.core.preflight import PipelineConfigError, pre_instantiation_check

    try:
        pre_instantiation_check(recipe.juicer["process"])
    except PipelineConfigError as error:
        problems = "; ".join(str(problem) for problem in error.errors)
        raise KstoryError(
            f"recipe op arguments are wrong: {problems}",
            path=recipe.path,
            fix="fix those arguments (every op's arguments are listed in Data-Juicer's config_all.yaml)",
        ) from None


def _lazy_imports(module: types.ModuleType, lazy_loader: type) -> set[str]:
    """The modules ``module`` imports through Data-Juicer's LazyLoader.

    A LazyLoader replaces itself in its module's globals by the real module
    once used (after an earlier run in this process), so the declarations
    ``LazyLoader("name", ...)`` in the source are read as well.
    """
    names = {value.__name__ for value in vars(module).values() if isinstance(value, lazy_loader)}
    try:
        tree = ast.parse(inspect.getsource(module))
    except (OSError, TypeError, SyntaxError):
        return names
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Call)
            and getattr(node.func, "id", getattr(node.func, "attr", None)) == lazy_loader.__name__
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            names.add(node.args[0].value)
    return names


@contextlib.contextmanager
def no_auto_install() -> Iterator[None]:
    """Turn Data-Juicer's on-the-fly ``pip install`` of a missing dependency into an error naming it.

    :func:`check_ops_runnable` catches the dependencies an op module declares;
    this also covers the ones Data-Juicer only looks up while running (op
    fusion, for one, reaches for PyAV).
    """
    from data_juicer.utils.lazy_loader import LazyLoader

    original = LazyLoader.__dict__["_install_package"]

    def refuse(cls: type, package_spec: str, pip_args: Any = None) -> None:
        raise KstoryError(
            f"Data-Juicer tried to pip-install {package_spec!r} in the middle of the run",
            fix=f"install and declare it yourself (pip install {package_spec}), or drop the op or setting needing it",
        )

    LazyLoader._install_package = classmethod(refuse)
    try:
        yield
    finally:
        LazyLoader._install_package = original


def juicer_config(recipe: Recipe, *, work_dir: Path, num_samples: int) -> Any:
    """Write the Data-Juicer config for this run into ``work_dir`` and parse it with Data-Juicer.

    Tracing is on for every op with room for every sample, and op errors are
    raised instead of silently dropping the sample, so every drop in the
    report comes from an op's decision.  ``np`` stays at the recipe's value
    (default 1): the pictures are decoded and measured in kstory's parallel
    pre-check, after which the default ops are cheap, while every Data-Juicer
    map with ``np`` >= 1 forks its own worker pool.  With ``np: 1`` the ops
    therefore run in this process (see :func:`_in_main_process`).
    """
    config = pinned_config(recipe, work_dir=work_dir, num_samples=num_samples)
    if config["np"] == 1:
        config.update(auto_op_parallelism=False, process=_in_main_process(config["process"]))
    return parse_config(config, work_dir)


def pinned_config(recipe: Recipe, *, work_dir: Path, num_samples: int) -> dict[str, Any]:
    """The recipe with the settings the report relies on, whichever executor runs it."""
    config = dict(recipe.juicer)
    config.update(
        dataset_path=str(work_dir / "input.jsonl"),
        export_path=str(work_dir / "output" / "kept.jsonl"),
        work_dir=str(work_dir),
        job_id="run",
        np=recipe.juicer.get("np", 1),
        text_keys=TEXT_KEY,
        image_key=IMAGE_KEY,
        skip_op_error=False,
        open_tracer=True,
        op_list_to_trace=[],
        trace_num=max(1, num_samples),
        trace_keys=["id"],
        keep_stats_in_res_ds=True,
        keep_hashes_in_res_ds=True,
        op_fusion=False,
    )
    return config


def parse_config(config: dict[str, Any], work_dir: Path) -> Any:
    """Write ``config`` as ``work_dir/recipe.yaml`` (the exact config run) and parse it with Data-Juicer."""
    from data_juicer.config import init_configs

    config_path = work_dir / "recipe.yaml"
    config_path.write_text(yaml.safe_dump(config, sort_keys=False, allow_unicode=True), encoding="utf-8")
    return init_configs(["--config", str(config_path)], load_configs_only=True)


def _in_main_process(process: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Give every op ``num_proc: 0`` (unless the recipe sets its own) so its maps run in this process.

    Data-Juicer hands an op's ``num_proc`` to ``datasets``' map/filter, and
    ``datasets`` 4 starts a worker pool for any ``num_proc`` >= 1, a pool of
    one included: ~0.3 s and a pickling round trip per map, and a recipe
    makes about 15 maps.  ``num_proc`` 0 means no pool there; Data-Juicer
    passes it through unchanged once ``auto_op_parallelism`` is off (which
    would otherwise pick a process count per op).
    """
    return [{name: {"num_proc": 0, **(args or {})}} for entry in process for name, args in entry.items()]
