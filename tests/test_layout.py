"""The layout is the architecture: the core library (ssl_bench) never imports the application layer
(ssl_bench_app: the command line, launching, sweeps, the benchmark) nor the evaluation harness (evals),
not even inside a function."""
import ast
from pathlib import Path

CORE = Path(__file__).resolve().parent.parent / "ssl_bench"


def imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def test_the_core_never_imports_the_application():
    offenders = {str(p.relative_to(CORE.parent)): sorted(m for m in imported_modules(p) if m.split(".")[0] in ("ssl_bench_app", "evals"))
                 for p in CORE.rglob("*.py")}
    assert {k: v for k, v in offenders.items() if v} == {}
