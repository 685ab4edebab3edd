"""A package's public face, resolved lazily (PEP 562 ``__getattr__``).

Why: ``small4.engine`` must import without the server's libraries and its pure-Python block manager without torch;
a package's ``__init__`` that imported its modules eagerly would pull all of them into every import of any one. So
a face maps each public name to the module that defines it, and the module is imported on the name's first use.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable


def lazy_face(package: str, face: dict[str, str]) -> Callable[[str], object]:
    """The ``__getattr__`` of ``package``: ``face[name]`` is the submodule (relative to the package) holding it."""
    namespace = importlib.import_module(package).__dict__

    def __getattr__(name: str) -> object:
        module = face.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(f"{package}.{module}"), name)
        namespace[name] = value  # resolved once; later lookups never reach here
        return value

    return __getattr__
