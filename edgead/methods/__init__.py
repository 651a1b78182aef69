"""Detection methods: one folder each, discovered (there is no list of methods to edit anywhere else).

A method is a folder ``edgead/methods/<folder>/`` whose ``method.py`` defines a subclass of
:class:`edgead.methods.base.Method` with a literal ``name = "..."`` (and ``paper = "..."``,
``summary = "..."``). The registry finds those classes by reading ``method.py`` with :mod:`ast`, so
``import edgead.methods`` stays torch-free; ``get_method`` imports the module only when asked. Every
folder on this package's ``__path__`` is searched, so a plug-in may extend it.
"""

from __future__ import annotations

import ast
import functools
import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from edgead.methods.base import Method

#: The roadmap: methods of the product that have no folder yet, shown by ``edgead info``. A folder of the
#: same name, once it exists, takes precedence (nothing here is a registry entry).
PLANNED: dict[str, tuple[str, str]] = {}


#: Method folders whose ``method.py`` could not be read: folder name -> why (shown by ``edgead info``).
BROKEN: dict[str, str] = {}


@dataclass(frozen=True)
class MethodEntry:
    """What the registry knows about a method without importing it."""

    name: str
    module: str  # e.g. "edgead.methods.gaussian.method"
    class_name: str
    paper: str
    summary: str
    folder: Path


def _literal_class_attrs(node: ast.ClassDef) -> dict[str, str]:
    attrs: dict[str, str] = {}
    for stmt in node.body:
        targets = (
            stmt.targets if isinstance(stmt, ast.Assign) else [stmt.target] if isinstance(stmt, ast.AnnAssign) else []
        )
        value = getattr(stmt, "value", None)
        if isinstance(value, ast.Constant) and isinstance(value.value, str):
            for target in targets:
                if isinstance(target, ast.Name):
                    attrs[target.id] = value.value
    return attrs


def _entries_in(folder: Path) -> list[MethodEntry]:
    source = folder / "method.py"
    try:
        tree = ast.parse(source.read_text(encoding="utf-8"), filename=str(source))
    except (SyntaxError, UnicodeDecodeError, OSError) as err:
        # One broken folder must not take the others (or `edgead info`) down; it is reported, not registered.
        BROKEN[folder.name] = f"{source}: {err}"
        return []
    entries = []
    for node in tree.body:
        if not isinstance(node, ast.ClassDef) or not node.bases:
            continue
        attrs = _literal_class_attrs(node)
        if "name" not in attrs:
            continue
        doc = (ast.get_docstring(node) or "").strip().splitlines()
        entries.append(
            MethodEntry(
                name=attrs["name"],
                module=f"edgead.methods.{folder.name}.method",
                class_name=node.name,
                paper=attrs.get("paper", doc[0] if doc else ""),
                summary=attrs.get("summary", ""),
                folder=folder,
            )
        )
    return entries


def method_folders() -> list[Path]:
    """Every folder with a ``method.py`` on this package's path."""
    return [folder for root in __path__ for folder in sorted(Path(root).iterdir()) if (folder / "method.py").is_file()]


@functools.cache
def discover() -> dict[str, MethodEntry]:
    """Every method folder's entry, by method name, in folder order (cached; ``discover.cache_clear()``)."""
    found: dict[str, MethodEntry] = {}
    BROKEN.clear()
    for folder in method_folders():
        for entry in _entries_in(folder):
            if entry.name in found:
                raise RuntimeError(
                    f"method name {entry.name!r} is defined in both {found[entry.name].folder} and {folder}"
                )
            found[entry.name] = entry
    return found


def implemented_methods() -> list[str]:
    """Names of the methods this installation can train and export."""
    return list(discover())


def planned_methods() -> dict[str, tuple[str, str]]:
    """Roadmap entries (paper, summary) that have no folder yet."""
    return {name: info for name, info in PLANNED.items() if name not in discover()}


def get_method(name: str) -> type[Method]:
    """Return the method class registered under ``name``, with a clear error for unknown names."""
    entries = discover()
    if name not in entries:
        if name in planned_methods():
            raise NotImplementedError(
                f"method {name!r} is planned but not in this release; available: {', '.join(entries)}"
            )
        broken = "".join(f"; folder {folder} is broken ({why})" for folder, why in BROKEN.items())
        raise ValueError(f"unknown method {name!r}; expected one of {', '.join(entries)}{broken}")
    entry = entries[name]
    cls = getattr(importlib.import_module(entry.module), entry.class_name)
    from edgead.methods.base import Method

    if not (isinstance(cls, type) and issubclass(cls, Method)):
        raise TypeError(f"{entry.module}.{entry.class_name} declares name {name!r} but is not an edgead Method")
    return cls


def load_method(run_dir: Path) -> Method:
    """Rebuild a fitted method from its run directory (``config.json`` + weights)."""
    from edgead.config import RunConfig

    config = RunConfig.load(run_dir)
    return get_method(config.method).load(Path(run_dir), config)
