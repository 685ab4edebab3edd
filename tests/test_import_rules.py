"""The import rules of ``../shared/DESIGN.md`` as code: every module's imports are read statically (ast: module-level,
function-level and ``TYPE_CHECKING`` imports alike) and held against one table, so a broken rule fails CI with the
list of every offending import.

A *unit* is a top-level piece of ``small4``: a package (``small4/engine/``) or a module (``small4/tokenizer.py``).
``MAY_IMPORT`` says which other units each may import; anything not listed is a violation. Peers (engine and spec)
may import each other; otherwise the table is a one-way order (checked too), so no unit imports one above it.
"""

from __future__ import annotations

import ast
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "small4"

# Imported by anything above the kernels: configs, the tokenizer's plain view, the lazy-face helper.
BASE = {"config", "tokenizer", "_face"}

# unit -> the small4 units it may import (itself always allowed). The design's rules, bottom to top:
MAY_IMPORT: dict[str, set[str]] = {
    "_face": set(),
    "config": set(),
    "tokenizer": set(),
    "kernels": set(),  # leaves: torch, triton, the standard library and other kernels only (EXTERNAL below)
    "model": {"config", "kernels", "_face"},  # never engine / server; never weights (the FP8 math is a kernel)
    "weights": BASE | {"kernels", "model"},
    "engine": BASE | {"kernels", "model", "weights", "spec"},  # never server / chat
    "spec": BASE | {"kernels", "model", "weights", "engine"},  # speculative decoding: a peer of engine
    "parallel": BASE | {"kernels", "model", "weights", "engine"},
    # the engine core in its own process: below the server; it compiles a request's grammar spec (chat/grammar.py)
    # because a matcher cannot cross the process boundary
    "core": BASE | {"engine", "chat"},
    "chat": {"tokenizer", "config", "_face"},  # the conversation protocol: never torch (EXTERNAL below)
    "server": BASE | {"engine", "chat"},  # HTTP only: the engine through its face (FACE_ONLY), and chat
    "demo_model": BASE | {"kernels", "model", "weights", "engine", "spec", "chat"},
    "bench": BASE | {"kernels", "model", "weights", "engine", "spec", "parallel", "chat", "server"},
    "cli": BASE | {"weights", "engine", "parallel", "server", "bench", "demo_model", "demo", "spec", "chat"},
    "demo": BASE | {"demo_model", "weights", "server"},  # runs `small4 serve` as a process, never imports cli
}

# Units that may import each other (a group of the one-way order rather than two rungs of it).
PEERS = [{"engine", "spec"}]

# importer unit -> units it may reach only through their package face (``from small4.engine import X``)
FACE_ONLY: dict[str, set[str]] = {"server": {"engine", "parallel", "weights"}}

# Single modules allowed past their unit's row, each with its reason.
EXCEPTIONS: dict[str, tuple[set[str], str]] = {
    "small4.server.serve": (
        {"parallel", "weights", "core"},
        "`small4 serve`'s process entry builds the engine it serves: the embedded default model, split over ranks "
        "(parallel/serving.py), or in its own process (core/)",
    ),
    "small4.demo_model.heldout": (
        {"server"},
        "the held-out evaluation asks the real `small4 serve` (in this process, over loopback with the openai "
        "client), so it measures what a user sees",
    ),
}

# unit -> third-party top-level modules it must not import (None: only torch, triton and the standard library)
EXTERNAL: dict[str, set[str] | None] = {
    "kernels": None,
    "chat": {"torch", "triton", "numpy", "safetensors"},
    "config": {"torch", "triton", "numpy"},
}
KERNEL_LIBS = {"torch", "triton"}


@dataclass(frozen=True)
class Import:
    module: str  # the importing module, e.g. small4.server.chat
    target: str  # what it imports, e.g. small4.engine.async_engine
    line: int

    def __str__(self) -> str:
        return f"{self.module}:{self.line} imports {self.target}"


def unit_of(module: str) -> str:
    return module.split(".")[1] if module.count(".") else ""


def module_name(path: Path) -> str:
    parts = ("small4", *path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(module: str, source: str) -> Iterator[Import]:
    """Every import in ``source`` (at any depth), relative ones resolved against ``module``."""
    package = module.split(".") if source is not None else []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield Import(module, alias.name, node.lineno)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                keep = package if module_is_package(module) else package[:-1]
                base = ".".join(keep[: len(keep) - node.level + 1] + ([base] if base else []))
            yield Import(module, base, node.lineno)


def module_is_package(module: str) -> bool:
    return (ROOT.joinpath(*module.split(".")[1:]) / "__init__.py").is_file()


def all_imports() -> list[Import]:
    found = []
    for path in sorted(ROOT.rglob("*.py")):
        module = module_name(path)
        found.extend(imports_of(module, path.read_text()))
    return found


def violations(imports: list[Import]) -> list[str]:
    """What breaks a rule, one line each: a unit outside its row, a face bypassed, a forbidden library."""
    bad = []
    for imp in imports:
        src = unit_of(imp.module)
        top = imp.target.split(".")[0]
        if top == "small4":
            dst = unit_of(imp.target)
            if not dst or dst == src:
                continue
            allowed = MAY_IMPORT.get(src)
            extra, _ = EXCEPTIONS.get(imp.module, (set(), ""))
            if allowed is None:
                bad.append(f"{imp}: unit '{src}' has no row in MAY_IMPORT")
            elif dst not in allowed and dst not in extra:
                bad.append(f"{imp}: '{src}' may not import '{dst}'")
            elif dst in FACE_ONLY.get(src, ()) and imp.target != f"small4.{dst}":
                bad.append(f"{imp}: '{src}' reaches '{dst}' only through its face, `from small4.{dst} import ...`")
        elif src in EXTERNAL and top not in sys.stdlib_module_names and top != "__future__":
            forbidden = EXTERNAL[src]
            if (forbidden is None and top not in KERNEL_LIBS) or (forbidden is not None and top in forbidden):
                bad.append(f"{imp}: '{src}' may not import the library '{top}'")
    return bad


def test_every_import_follows_the_design():
    bad = violations(all_imports())
    assert not bad, "import rules broken (tests/test_import_rules.py has the table):\n" + "\n".join(bad)


def test_every_unit_has_a_row():
    units = {unit_of(module_name(p)) for p in ROOT.rglob("*.py")} - {""}
    assert units <= set(MAY_IMPORT), f"units without a row in MAY_IMPORT: {sorted(units - set(MAY_IMPORT))}"


def test_the_table_is_one_way():
    """Apart from peers, the allowed imports form no cycle: no unit may import one that may import it back."""
    group = {u: next((frozenset(p) for p in PEERS if u in p), frozenset({u})) for u in MAY_IMPORT}
    edges = {g: set() for g in group.values()}
    for unit, allowed in MAY_IMPORT.items():
        edges[group[unit]] |= {group[d] for d in allowed if group[d] != group[unit]}
    done: set[frozenset] = set()

    def visit(g: frozenset, path: tuple[frozenset, ...]) -> None:
        assert g not in path, f"cycle in MAY_IMPORT: {[sorted(p) for p in (*path, g)]}"
        if g not in done:
            for d in edges[g]:
                visit(d, (*path, g))
            done.add(g)

    for g in edges:
        visit(g, ())


@pytest.mark.parametrize(
    "module,source,expected",
    [
        (
            "small4.model.layers",
            "def f():\n    from small4.engine.engine import LLM\n",
            "'model' may not import 'engine'",
        ),
        ("small4.kernels.x", "import safetensors\n", "'kernels' may not import the library 'safetensors'"),
        ("small4.kernels.x", "from small4.model import layers\n", "'kernels' may not import 'model'"),
        ("small4.chat.parse", "import torch\n", "'chat' may not import the library 'torch'"),
        ("small4.server.app", "from small4.engine.async_engine import AsyncEngine\n", "only through its face"),
        ("small4.engine.scheduler", "from small4.chat import render\n", "'engine' may not import 'chat'"),
        ("small4.engine.scheduler", "from small4.server import app\n", "'engine' may not import 'server'"),
        ("small4.spec.runtime", "from small4.server import app\n", "'spec' may not import 'server'"),
    ],
)
def test_a_broken_rule_is_reported(module, source, expected):
    bad = violations(list(imports_of(module, source)))
    assert len(bad) == 1 and expected in bad[0], bad


def test_allowed_imports_pass():
    ok = "from small4.engine import AsyncEngine\nfrom small4.chat import ChatRenderer\nimport fastapi\n"
    assert violations(list(imports_of("small4.server.app", ok))) == []
    assert violations(list(imports_of("small4.kernels.x", "import torch\nimport triton.language\nimport os\n"))) == []


@pytest.mark.parametrize("package", ["engine", "chat", "model", "weights", "kernels", "server", "parallel", "config"])
def test_faces_resolve(package):
    """Every name a package's face exports exists in the module it names."""
    import importlib

    face = importlib.import_module(f"small4.{package}")
    assert face.__all__, f"small4.{package} exports nothing"
    for name in face.__all__:
        assert getattr(face, name) is not None, name
