"""The import layering of the design: framework ↛ stages/storage; stages ↮ storage."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
FRAMEWORK = ["messages", "codec", "transport", "ring", "runner", "config", "metrics", "models", "install"]
# Wiring (may import stages and storage): cli.py, supervisor.py, worker.py, doctor.py.


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("module", FRAMEWORK)
def test_framework_imports_neither_stages_nor_storage(module: str) -> None:
    assert not _imports(ROOT / "pipeline" / f"{module}.py") & {"stages", "storage"}


@pytest.mark.parametrize("package, forbidden", [("stages", "storage"), ("storage", "stages")])
def test_stages_and_storage_never_import_each_other(package: str, forbidden: str) -> None:
    offenders = [p.name for p in (ROOT / package).glob("*.py") if forbidden in _imports(p)]
    assert offenders == []


@pytest.mark.parametrize("package", ["pipeline", "stages", "storage"])
def test_nothing_is_pickled_between_processes(package: str) -> None:
    for path in (ROOT / package).glob("*.py"):
        text = path.read_text()
        for bad in ("import pickle", "send_pyobj", "recv_pyobj", "multiprocessing.Queue", "mp.Queue"):
            assert bad not in text, f"{path.name}: {bad}"
