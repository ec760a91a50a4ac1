"""The import layering of the design (framework ↛ stages/storage; stages ↮ storage) and the size limits."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
FRAMEWORK = ["messages", "codec", "transport", "ring", "runner", "config", "metrics",
             "topology", "counters", "processes", "status", "runs", "capture", "journal", "models", "install", "gate",
             "mqtt", "discovery", "frigate", "companion",  # companion: recognize (the gallery) comes injected
             "api", "api_models", "api_system", "api_data",  # the HTTP API: stages/storage come injected (Backend)
             "api_jobs", "jobs", "job_analyze", "job_cleanup",  # jobs: the jobs table (JobStore) and the backend come injected
             "api_live", "api_page",  # the live view (boxes from recognition over live_tracks) and the web page
             "hub"]  # the fleet hub's MQTT subscriber: the database writes come injected (Sink)
WIRING = {"cli", "supervisor", "worker", "doctor", "services", "jobrun", "hubrun", "identities"}  # the only pipeline modules that may import stages/storage
MAX_FUNCTION_LINES = 60
MAX_CLASS_LINES = 300
# (module, qualified name) allowed over the limits; empty: every class and function in pipeline/ fits.
KNOWN_OVERSIZE: set[tuple[str, str]] = set()


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
    if not (ROOT / "pipeline" / f"{module}.py").exists():
        pytest.skip(f"pipeline/{module}.py is not on this branch")
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


def test_every_pipeline_module_is_framework_or_wiring() -> None:
    modules = {p.stem for p in (ROOT / "pipeline").glob("*.py")} - {"__init__"}
    assert modules <= set(FRAMEWORK) | WIRING, "classify the new module in FRAMEWORK or WIRING"


def _defs(tree: ast.AST, prefix: str = ""):
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            name = f"{prefix}{node.name}"
            yield name, node
            yield from _defs(node, name + ".")
        else:
            yield from _defs(node, prefix)


@pytest.mark.parametrize("module", sorted(p.name for p in (ROOT / "pipeline").glob("*.py")))
def test_no_class_over_300_and_no_function_over_60_lines(module: str) -> None:
    over = []
    for name, node in _defs(ast.parse((ROOT / "pipeline" / module).read_text())):
        lines = node.end_lineno - node.lineno + 1  # type: ignore[operator]
        limit = MAX_CLASS_LINES if isinstance(node, ast.ClassDef) else MAX_FUNCTION_LINES
        if lines > limit and (module, name) not in KNOWN_OVERSIZE:
            over.append(f"{name}: {lines} lines (limit {limit})")
    assert over == [], f"{module}: " + "; ".join(over)
