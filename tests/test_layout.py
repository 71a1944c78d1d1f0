"""The layout's promises: the lifecycle package is pure, and a file's directory says which
process runs it."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

from tests.harness import ROOT

PACKAGE = ROOT / "supervisor"
# What the pure core may import: data structures and typing, its own modules, and the wire
# protocol's message types (themselves pure: json and dataclasses).
PURE_IMPORTS = {"__future__", "dataclasses", "enum", "typing", "collections", "collections.abc", "json",
                "types", "supervisor", "supervisor.proto"}
EFFECTFUL = {"socket", "select", "selectors", "signal", "subprocess", "threading", "multiprocessing", "asyncio",
             "ctypes", "psutil", "random", "time", "os", "supervisor.channel", "supervisor.proc"}


def imports_of(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def test_lifecycle_modules_import_only_pure_modules():
    for path in sorted((PACKAGE / "lifecycle").glob("*.py")):
        for name in imports_of(path):
            assert name in PURE_IMPORTS or name.startswith("supervisor.lifecycle"), f"{path.name} imports {name}"
    for name in imports_of(PACKAGE / "proto.py"):
        assert name in PURE_IMPORTS, f"proto.py imports {name}"


def test_importing_the_lifecycle_loads_nothing_that_forks_signals_opens_sockets_or_reads_the_clock():
    code = ("import sys; before = set(sys.modules); "
            "import supervisor.lifecycle.core, supervisor.lifecycle.view; "
            "print(__import__('json').dumps(sorted(set(sys.modules) - before)))")
    out = subprocess.run([sys.executable, "-I", "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    loaded = set(json.loads(out.stdout))
    assert loaded, "the import did something"
    assert not loaded & EFFECTFUL, sorted(loaded & EFFECTFUL)


def test_negative_control_the_import_check_sees_an_effectful_module():
    code = ("import sys; before = set(sys.modules); import supervisor.channel; "
            "print(__import__('json').dumps(sorted(set(sys.modules) - before)))")
    out = subprocess.run([sys.executable, "-I", "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert set(json.loads(out.stdout)) & EFFECTFUL


def test_each_process_has_its_own_directory():
    """master/ runs in the master, worker/ in workers, lifecycle/ is pure; watch/ and consul/
    each have a helper-process module and master-side modules."""
    assert {p.name for p in (PACKAGE / "watch").glob("*.py")} >= {"spec.py", "helper.py"}
    assert {p.name for p in (PACKAGE / "consul").glob("*.py")} >= {"spec.py", "startup.py", "helper.py"}
    # the worker's code never imports the master's, and the other way round only its entry point
    for path in (PACKAGE / "worker").glob("*.py"):
        assert not any(n.startswith("supervisor.master") for n in imports_of(path)), path.name
    for path in (PACKAGE / "master").glob("*.py"):
        worker_imports = {n for n in imports_of(path) if n.startswith("supervisor.worker")}
        assert worker_imports <= {"supervisor.worker", "supervisor.worker.spec"}, path.name
