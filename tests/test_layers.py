"""The layers point one way (ARCHITECTURE.md, Layers; issue 10).

``core`` imports nothing above it; ``telemetry`` imports ``core`` and is the only
importer of ``sigil._native``; ``pipeline`` imports both; ``interfaces`` imports
everything and nothing imports it. The OTLP package reads logs through
``sigil.telemetry.log_parser``, never the native module directly.

Every module's imports are read from its source with :mod:`ast`, wherever they
stand: at the top, inside a function (lazy CLI imports) or under
``TYPE_CHECKING`` (a type-only import still points the dependency the wrong way).
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

import sigil

PACKAGE_DIR = Path(sigil.__file__).resolve().parent


@dataclass(frozen=True)
class Import:
    module: str  # the importing module
    target: str  # what it imports, as a dotted name
    line: int


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE_DIR.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(source: str, module: str, *, is_package: bool = False) -> list[Import]:
    """Every import in ``source``; ``from a import b`` yields both ``a`` and ``a.b``
    (``b`` may be a module: ``from sigil import _native``)."""
    found: list[Import] = []
    package = module if is_package else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [Import(module, alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            found.append(Import(module, base, node.lineno))
            found += [Import(module, f"{base}.{a.name}", node.lineno) for a in node.names]
    return found


def all_imports() -> list[Import]:
    found: list[Import] = []
    for path in sorted(PACKAGE_DIR.rglob("*.py")):
        found += imports_of(
            path.read_text(encoding="utf-8"),
            module_name(path),
            is_package=path.name == "__init__.py",
        )
    return found


def within(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def violations(found: list[Import], importer: str, forbidden: tuple[str, ...]) -> list[str]:
    return sorted(
        {
            f"{i.module}:{i.line} imports {i.target}"
            for i in found
            if within(i.module, importer) and any(within(i.target, f) for f in forbidden)
        }
    )


#: The services above telemetry and below the CLI: each stands alone.
SERVICES = ("sigil.proxy", "sigil.collect", "sigil.reports")

RULES = [
    (
        "sigil.core",
        ("sigil.telemetry", "sigil.pipeline", "sigil.interfaces", "sigil._native", *SERVICES),
    ),
    ("sigil.telemetry", ("sigil.pipeline", "sigil.interfaces", *SERVICES)),
    ("sigil.pipeline", ("sigil.interfaces", *SERVICES)),
    ("sigil.telemetry.otlp", ("sigil._native",)),
    *((s, tuple(o for o in SERVICES if o != s)) for s in SERVICES),
]


@pytest.mark.parametrize(("importer", "forbidden"), RULES, ids=[r[0] for r in RULES])
def test_layer_imports_point_one_way(importer: str, forbidden: tuple[str, ...]) -> None:
    assert violations(all_imports(), importer, forbidden) == []


def test_only_telemetry_imports_the_native_module() -> None:
    found = all_imports()
    # The package's own modules, listed so a rule cannot pass by finding nothing.
    assert any(i.module == "sigil.telemetry.log_parser" for i in found)
    bad = sorted(
        f"{i.module}:{i.line}"
        for i in found
        if within(i.target, "sigil._native") and not within(i.module, "sigil.telemetry")
    )
    assert bad == []


def test_nothing_imports_the_interfaces_but_the_entry_point() -> None:
    bad = sorted(
        f"{i.module}:{i.line} imports {i.target}"
        for i in all_imports()
        if within(i.target, "sigil.interfaces")
        and not within(i.module, "sigil.interfaces")
        and i.module != "sigil.__main__"
    )
    assert bad == []


def test_the_package_imports_file_security_from_core_not_its_spec_alias() -> None:
    """``sigil.telemetry.file_security`` re-exports core's module for the spec's
    import paths (Appendix D); inside the package there is one place to import from."""
    found = all_imports()
    assert any(within(i.target, "sigil.core.file_security") for i in found)
    bad = sorted(
        f"{i.module}:{i.line}" for i in found if within(i.target, "sigil.telemetry.file_security")
    )
    assert bad == []


def test_the_checker_sees_every_kind_of_import() -> None:
    """The rules above would pass on a scanner that finds nothing: show that it
    finds top-level, lazy, type-only, relative and ``from package import module``
    imports."""
    source = """
from __future__ import annotations
from typing import TYPE_CHECKING
import sigil.telemetry.tokens
from sigil import _native
if TYPE_CHECKING:
    from sigil.telemetry.tokens import EventLogger
def lazy():
    from ..interfaces.cli import main
    from . import paths
"""
    found = imports_of(source, "sigil.core.example")
    targets = {i.target for i in found}
    assert {
        "sigil.telemetry.tokens",
        "sigil._native",
        "sigil.telemetry.tokens.EventLogger",
        "sigil.interfaces.cli",
        "sigil.core.paths",
    } <= targets
    assert violations(found, "sigil.core", RULES[0][1]) == [
        "sigil.core.example:4 imports sigil.telemetry.tokens",
        "sigil.core.example:5 imports sigil._native",
        "sigil.core.example:7 imports sigil.telemetry.tokens",
        "sigil.core.example:7 imports sigil.telemetry.tokens.EventLogger",
        "sigil.core.example:9 imports sigil.interfaces.cli",
        "sigil.core.example:9 imports sigil.interfaces.cli.main",
    ]


def test_core_bounds_are_the_native_parsers_own() -> None:
    """``core`` may not import the native module, so it states the parser's bounds
    itself; they must be the parser's, or the writer would accept lines every
    reader rejects (contract 13)."""
    from sigil import _native
    from sigil.core import limits

    assert limits.MAX_METADATA_DEPTH == _native.MAX_DEPTH
    assert limits.MAX_TOKENS == _native.MAX_TOKENS


def test_monitor_once_and_help_start_without_asyncio(tmp_path: Path) -> None:
    """Start-up is most of `sigil monitor --once` and `sigil --help`: neither
    imports asyncio (about a third of a --once run on this machine) nor
    difflib; the event loop belongs to the live paths only."""
    home = tmp_path / "home"
    (home / "logs" / "sessions" / "s").mkdir(parents=True)
    (home / "logs" / "sessions" / "s" / "execution.jsonl").write_bytes(b"")
    probe = (
        "import sys\n"
        "from sigil.interfaces.cli.main import main\n"
        "sys.argv = ['sigil', *sys.argv[1:]]\n"
        "try:\n"
        "    main()\n"
        "except SystemExit:\n"
        "    pass\n"
        "print(sorted(m for m in ('asyncio', 'difflib') if m in sys.modules), file=sys.stderr)\n"
    )
    env = {**os.environ, "SIGIL_HOME": str(home)}
    for args in (["--help"], ["monitor", "--session", "s", "--once", "--mode", "json"]):
        argv = [sys.executable, "-c", probe, *args]
        proc = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=60)
        assert proc.stderr.strip().splitlines()[-1] == "[]", (args, proc.stderr)
