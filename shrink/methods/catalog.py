"""The catalog of methods: built-ins (every module under shrink.methods) and plugins.

Discovery imports each module once; a module registers its methods with @register on import.
Plugins name a module in the entry-point group `shrink.methods`.
"""

from __future__ import annotations

import difflib
import importlib
import pkgutil
from importlib import metadata

import shrink.methods
from shrink.errors import BadInputError
from shrink.methods.base import METHODS, Method

_discovered = False


def discover() -> None:
    """Import every built-in method module and every plugin, once."""
    global _discovered
    if _discovered:
        return
    _discovered = True
    for module in pkgutil.walk_packages(shrink.methods.__path__, prefix="shrink.methods."):
        importlib.import_module(module.name)
    for entry in metadata.entry_points(group="shrink.methods"):
        entry.load()


def get_method(name: str) -> Method:
    discover()
    if name not in METHODS:
        close = difflib.get_close_matches(name, METHODS, n=3)
        hint = f"did you mean {', '.join(close)}?" if close else f"known methods: {', '.join(sorted(METHODS))}"
        raise BadInputError(f"unknown method {name!r}", hint=hint)
    return METHODS[name]


def all_methods() -> dict[str, Method]:
    discover()
    return dict(METHODS)
