"""The import rule that keeps the layout readable (docs/design.md):

- alpaca/protocol/ (the pure core) imports nothing of alpaca outside itself;
- alpaca/host/ (one module per OS concern) imports nothing of alpaca
  outside itself but the configuration's data types (alpaca.config);
- of everything else, only alpaca/daemon.py imports both: it is the one
  place where the core meets the host.

Function-level imports count too."""

from __future__ import annotations

import ast
from pathlib import Path

ALPACA = Path(__file__).resolve().parent.parent / "alpaca"


def module_name(path: Path) -> str:
    parts = path.relative_to(ALPACA.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> set[str]:
    """Every alpaca module `path` imports, as absolute dotted names."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == "alpaca")
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "alpaca":
                continue
            found.add(target)
            found.update(f"{target}.{a.name}" for a in node.names)   # `from . import x` names modules
    return found


def all_modules() -> dict[str, set[str]]:
    return {module_name(p): imports(p) for p in ALPACA.rglob("*.py")}


def inside(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


ALLOWED = {"alpaca.protocol": (), "alpaca.host": ("alpaca.config",)}


def test_the_core_and_the_host_import_only_themselves():
    for name, deps in all_modules().items():
        for package, allowed in ALLOWED.items():
            if inside(name, package):
                outside = sorted(d for d in deps if not inside(d, package) and d != "alpaca"
                                 and not any(inside(d, a) for a in allowed))
                assert not outside, f"{name} imports {outside}"


def test_only_the_daemon_joins_the_core_and_the_host():
    joiners = sorted(name for name, deps in all_modules().items()
                     if any(inside(d, "alpaca.protocol") for d in deps) and any(inside(d, "alpaca.host") for d in deps)
                     and not inside(name, "alpaca.protocol") and not inside(name, "alpaca.host"))
    assert joiners == ["alpaca.daemon"]


def test_the_rule_sees_relative_and_function_level_imports():
    deps = all_modules()
    assert "alpaca.host.routes" in deps["alpaca.daemon"]          # `from .host import routes` in a function
    assert "alpaca.protocol.node" in deps["alpaca.daemon"]
