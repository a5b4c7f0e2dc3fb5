"""Plugins: modules or files that register passes, imported before planning.

``--plugin my_passes.py`` (a file) or ``--plugin mypkg.passes`` (an importable module), repeatable,
and every entry point in the group ``potstill.passes`` (``[project.entry-points."potstill.passes"]``
in a package's ``pyproject.toml``). A plugin registers passes with ``@register_pass`` or
``@function_pass``, importance estimators with ``@estimator`` and targets with ``@target``; a name
already taken (a built-in or another plugin's) is refused. The files
they came from go into the cache key.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable
from importlib import metadata
from pathlib import Path

from potstill.errors import InputError, PotstillError
from potstill.inputs.data import import_file

ENTRY_POINT_GROUP = "potstill.passes"
_LOADED: dict[str, Path | None] = {}


def _file_of(module: object) -> Path | None:
    name = getattr(module, "__file__", None)
    return Path(name).resolve() if name else None


def load_plugin(spec: str) -> Path | None:
    """Import one plugin (a ``.py`` file or a module name); returns its source file."""
    key = str(Path(spec).resolve()) if spec.endswith(".py") else spec
    if key in _LOADED:  # a file imported twice would register its passes twice
        return _LOADED[key]
    try:
        if spec.endswith(".py"):
            if not Path(spec).is_file():
                raise InputError(f"--plugin {spec}: no such file")
            module = import_file(spec)
        else:
            module = importlib.import_module(spec)
    except PotstillError:
        raise
    except ImportError as e:
        raise InputError(f"--plugin {spec}: cannot import it ({e}); give a .py file or an importable module") from e
    except Exception as e:
        raise InputError(f"--plugin {spec}: importing it raised {type(e).__name__}: {e}") from e
    _LOADED[key] = _file_of(module)
    return _LOADED[key]


def load_plugins(specs: Iterable[str], note: Callable[[str], None] = print) -> list[Path]:
    """Import the ``--plugin`` modules and the ``potstill.passes`` entry points; their files."""
    files: list[Path] = []
    for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
        if ep.value in _LOADED:
            if _LOADED[ep.value] is not None:
                files.append(_LOADED[ep.value])  # type: ignore[arg-type]
            continue
        try:
            module = ep.load()
        except Exception as e:
            raise InputError(f"entry point {ep.name} = {ep.value} (group {ENTRY_POINT_GROUP}) failed to load: "
                             f"{type(e).__name__}: {e}; fix or uninstall that package") from e  # fmt: skip
        _LOADED[ep.value] = _file_of(module)
        if _LOADED[ep.value] is not None:
            files.append(_LOADED[ep.value])  # type: ignore[arg-type]
        note(f"plugin {ep.name} ({ep.value}) loaded from the {ENTRY_POINT_GROUP} entry points")
    for spec in specs:
        path = load_plugin(spec)
        if path is not None:
            files.append(path)
    return files
