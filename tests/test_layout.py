"""The direction of imports: app -> model, never back; tests import their harness, never bench or each other."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def imported_modules(path: Path) -> set[str]:
    modules = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            modules.add(node.module)
        elif isinstance(node, ast.Import):
            modules.update(alias.name for alias in node.names)
    return modules


def imports_of(folder: str) -> dict[str, set[str]]:
    return {str(path.relative_to(ROOT)): imported_modules(path) for path in (ROOT / folder).rglob("*.py")}


def offenders(folder: str, forbidden: tuple[str, ...]) -> dict[str, list[str]]:
    found = {
        name: sorted(module for module in modules if module.split(".")[0] in forbidden or module.startswith(forbidden))
        for name, modules in imports_of(folder).items()
    }
    return {name: modules for name, modules in found.items() if modules}


def test_the_model_knows_nothing_of_the_service_tests_or_benchmarks():
    assert offenders("model", ("app", "tests", "bench", "fastapi", "starlette", "uvicorn")) == {}


def test_the_service_imports_neither_tests_nor_benchmarks():
    assert offenders("app", ("tests", "bench")) == {}


def test_tests_import_their_harness_never_bench_or_another_test_module():
    assert offenders("tests", ("bench", "tests.test_", "tests.conftest", "conftest")) == {}
