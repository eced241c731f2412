"""The package follows the data flow: each package imports only from the ones before it."""

from __future__ import annotations

import ast
from pathlib import Path

import sim

ORDER = {
    "core": 0,
    "data": 1,
    "models": 2,
    "evaluation": 3,
    "training": 4,
    "experiments": 5,
    "export": 5,
    "commands": 6,
}
PACKAGE = Path(sim.__file__).parent


def sim_imports(path: Path) -> list[tuple[int, str]]:
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module == "sim":
            out += [(node.lineno, f"sim.{a.name}") for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("sim."):
            out.append((node.lineno, node.module))
        elif isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names if a.name.startswith("sim.")]
    return out


def test_every_module_lives_in_a_package_of_the_data_flow():
    loose = sorted(p.name for p in PACKAGE.glob("*.py") if p.name not in ("__init__.py", "__main__.py"))
    # The import paths the contract shows users, kept as thin re-exports.
    assert loose == ["cache_features.py", "dataset.py", "model.py", "stream.py"], loose
    assert {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").is_file()} == set(ORDER)


def test_no_package_imports_from_a_later_one():
    backward = []
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE).parts
        if len(parts) < 2:
            continue
        for line, module in sim_imports(path):
            target = module.split(".")[1]
            if target in ORDER and ORDER[target] > ORDER[parts[0]]:
                backward.append(f"{'/'.join(parts)}:{line} imports {module}")
    assert not backward, "imports against the data flow:\n" + "\n".join(backward)


def test_the_tests_mirror_the_packages():
    tests = Path(__file__).parent
    dirs = {p.name for p in tests.iterdir() if p.is_dir() and not p.name.startswith((".", "_"))}
    assert dirs == set(ORDER), f"test directories {sorted(dirs)} differ from the packages {sorted(ORDER)}"


def test_a_sim_import_inside_a_function_says_why():
    """Imports of `sim` belong at the top of a module; one inside a function keeps start-up light or
    breaks a cycle, and its line says so in a comment."""
    silent = []
    for path in PACKAGE.rglob("*.py"):
        lines = path.read_text().splitlines()
        for node in ast.walk(ast.parse("\n".join(lines))):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for inner in ast.walk(node):
                module = inner.module if isinstance(inner, ast.ImportFrom) else None
                names = [a.name for a in inner.names] if isinstance(inner, ast.Import) else []
                if (module or "").startswith("sim") or any(n.startswith("sim") for n in names):
                    text = " ".join(lines[inner.lineno - 1 : (inner.end_lineno or inner.lineno)])
                    if "#" not in text:
                        silent.append(f"{path.relative_to(PACKAGE)}:{inner.lineno}")
    assert not silent, "sim imports inside functions without a reason:\n" + "\n".join(sorted(set(silent)))
