"""The shape of the library: no import cycles in medart_core, no UI in the library, a docstring per module."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parent.parent / "medart_core"


def _modules() -> dict[str, Path]:
    out = {}
    for p in sorted(PKG.rglob("*.py")):
        rel = p.relative_to(PKG.parent).with_suffix("")
        name = ".".join(rel.parts)
        out[name[: -len(".__init__")] if name.endswith(".__init__") else name] = p
    return out


def _is_type_checking(node: ast.If) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or (
        isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING")


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """medart_core modules imported anywhere in the module (function-level imports too: a lazy import cycle
    is still a cycle), except under ``if TYPE_CHECKING:``."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()

    def resolve(base: str) -> None:
        while base and base not in known:
            base = base.rpartition(".")[0]
        if base and base != name:
            found.add(base)

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                for orelse in child.orelse:
                    visit(orelse)
                continue
            if isinstance(child, ast.Import):
                for a in child.names:
                    if a.name.startswith("medart_core"):
                        resolve(a.name)
            elif isinstance(child, ast.ImportFrom):
                if child.level:
                    parts = package.split(".")
                    base = ".".join(parts[: len(parts) - child.level + 1])
                    mod = f"{base}.{child.module}" if child.module else base
                else:
                    mod = child.module or ""
                if mod.startswith("medart_core"):
                    for a in child.names:  # `from . import hldf` names a module
                        if f"{mod}.{a.name}" in known:
                            resolve(f"{mod}.{a.name}")
                        else:
                            resolve(mod)
            visit(child)

    visit(tree)
    return found


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    return {name: _imports(name, path, set(mods)) for name, path in mods.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def dfs(n: str) -> list[str] | None:
        state[n] = 1
        stack.append(n)
        for m in sorted(graph.get(n, ())):
            if state.get(m) == 1:
                return stack[stack.index(m):] + [m]
            if m not in state and (c := dfs(m)):
                return c
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(graph):
        if n not in state and (c := dfs(n)):
            return c
    return None


def test_medart_core_has_no_import_cycle():
    cycle = find_cycle(_graph())
    assert cycle is None, "import cycle in medart_core: " + " -> ".join(cycle)


def test_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


@pytest.mark.parametrize("name", sorted(_modules()))
def test_library_module_has_docstring_and_no_ui(name):
    path = _modules()[name]
    tree = ast.parse(path.read_text(encoding="utf-8"))
    assert ast.get_docstring(tree), f"{path} should open with a docstring saying what it owns"
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            assert not any(n.split(".")[0] in ("gradio", "studio") for n in names), f"{path} imports UI code"


# ---- jobs: one door, small modules, no stage imported by the machinery -------------------------------------
ROOT = PKG.parent
_LEDGER_MODULES = ("medart_core.jobs.ledger",)


def _ledger_uses(path: Path) -> list[str]:
    """Where a module names ``JobLedger`` or imports the ledger module, or reaches an executor's ``.ledger``."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            mod = node.module or ""
            if any(a.name == "JobLedger" for a in node.names) or mod.endswith("jobs.ledger") or (
                    mod.endswith("jobs") and any(a.name == "ledger" for a in node.names)):
                found.append(f"line {node.lineno}: from {mod} import ...")
        elif isinstance(node, ast.Import) and any(a.name in _LEDGER_MODULES for a in node.names):
            found.append(f"line {node.lineno}: import of the ledger module")
        elif isinstance(node, ast.Name) and node.id == "JobLedger":
            found.append(f"line {node.lineno}: JobLedger")
        elif isinstance(node, ast.Attribute) and node.attr in ("JobLedger", "ledger"):
            found.append(f"line {node.lineno}: .{node.attr}")
    return found


def _doors() -> list[Path]:
    """The studio's modules and the CLI's: they reach jobs through the Executor only."""
    return sorted((ROOT / "studio").rglob("*.py")) + [PKG / "cli.py"] + sorted((PKG / "commands").rglob("*.py"))


@pytest.mark.parametrize("path", _doors(), ids=lambda p: str(p.relative_to(ROOT)))
def test_studio_and_cli_reach_jobs_through_the_executor_only(path):
    uses = _ledger_uses(path)
    assert not uses, (f"{path.relative_to(ROOT)} uses the job ledger directly ({'; '.join(uses)}); go through "
                      "the Executor (medart_core.jobs.Executor), the only door to jobs")


def test_ledger_use_finder_finds_uses(tmp_path):
    p = tmp_path / "m.py"
    p.write_text("from medart_core.jobs import JobLedger, LocalExecutor\nx = LocalExecutor(ws).ledger.get('a')\n")
    assert len(_ledger_uses(p)) == 2
    p.write_text("from medart_core.jobs import LocalExecutor\nx = LocalExecutor(ws).get('a')\n")
    assert _ledger_uses(p) == []


@pytest.mark.parametrize("path", sorted((PKG / "jobs").glob("*.py")), ids=lambda p: p.name)
def test_job_modules_stay_small(path):
    n = len(path.read_text(encoding="utf-8").splitlines())
    assert n <= 600, f"{path.relative_to(ROOT)} has {n} lines; split it by role (at most 600 a module)"


def test_job_machinery_imports_no_stage_module():
    # The generic machinery knows the stages' kinds by name only (medart_core.job_registry).
    allowed = {"medart_core.errors", "medart_core.workspace", "medart_core.durable", "medart_core.fileio",
               "medart_core.job_registry", "medart_core.store",
               # infrastructure, not stages: the Slurm adapter and the named executors (issue 17)
               "medart_core.slurm", "medart_core.executors"}
    graph = _graph()
    for name, deps in graph.items():
        if not (name == "medart_core.jobs" or name.startswith("medart_core.jobs.")):
            continue
        extra = {d for d in deps if not d.startswith("medart_core.jobs")} - allowed
        if name == "medart_core.jobs.__main__":
            extra -= {"medart_core.cli"}     # forwards anything but `_run` to the one command line
        assert not extra, f"{name} imports {sorted(extra)}; the job machinery must not import a stage module"
