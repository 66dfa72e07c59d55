"""Every titanlite module imports on its own in a fresh interpreter, and module-level imports form no cycle."""

import ast
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PACKAGE = REPO / "titanlite"


def _modules() -> dict[str, Path]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        if not (path.parent / "__init__.py").is_file():  # not a package: files shipped as data (HF remote code)
            continue
        parts = list(path.relative_to(REPO).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


def _top_level_imports(path: Path, name: str, modules: dict[str, Path]) -> set[str]:
    """titanlite modules imported at module level (not inside functions, not under `if TYPE_CHECKING`)."""
    is_package = path.name == "__init__.py"
    targets = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Import):
            targets.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative import
                anchor = name.split(".") if is_package else name.split(".")[:-1]
                anchor = anchor[:len(anchor) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:  # `from pkg import submodule` depends on the submodule, not on pkg's names
                sub = f"{base}.{alias.name}"
                targets.add(sub if sub in modules else base)
    return {t for t in targets if t in modules and t != name}


def test_no_import_cycle_among_module_level_imports():
    modules = _modules()
    graph = {name: _top_level_imports(path, name, modules) for name, path in modules.items()}
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    path: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycle = path[path.index(nxt):] + [nxt]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt)
        path.pop()
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name)
    assert len(graph) > 40 and graph["titanlite.train"]  # the walk saw the real package


def test_every_module_imports_in_a_fresh_interpreter():
    names = sorted(_modules())
    code = ("import importlib, sys\n"
            f"for name in {names!r}:\n"
            "    importlib.import_module(name)\n"
            "print('imported', len(sys.modules))\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300,
                            env={"PATH": "/usr/bin:/bin", "TORCHAO_FORCE_SKIP_LOADING_SO_FILES": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.startswith("imported")
