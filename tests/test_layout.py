"""The package arrows point one way (docs/DESIGN: ``ray_jobs`` and ``serve_apps`` are siblings
over ``model``): training code never imports serving code, serving code never imports training
code, and ``model`` imports neither. Static: every import statement of every module is read
with ``ast``, including imports inside functions (a lazy import is still a dependency)."""

import ast
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[1]

# The one allowed crossing: the demo runs every step end to end, its last step being Serve.
ALLOWED = {("ray_jobs/demo.py", "serve_apps.run")}


def imported_modules(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every absolute import in a file."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found += [(node.lineno, node.module)]
            # ``from serve_apps import retrieval`` names the package only
            found += [(node.lineno, f"{node.module}.{a.name}") for a in node.names]
    return found


def crossings(packages: tuple[str, ...], forbidden: tuple[str, ...]) -> list[str]:
    bad = []
    for pkg in packages:
        for path in sorted((REPO / pkg).rglob("*.py")):
            rel = path.relative_to(REPO).as_posix()
            for line, module in imported_modules(path):
                top = module.split(".")[0]
                allowed = any(
                    rel == f and (module == m or module.startswith(m + ".")) for f, m in ALLOWED
                )
                if top in forbidden and not allowed:
                    bad.append(f"{rel}:{line} imports {module}")
    return sorted(set(bad))


def test_training_code_never_imports_serving_code():
    assert crossings(("ray_jobs", "tuning"), ("serve_apps",)) == []


def test_serving_code_never_imports_training_code():
    assert crossings(("serve_apps",), ("ray_jobs", "tuning")) == []


def test_model_imports_no_job_or_serving_code():
    assert crossings(("model",), ("ray_jobs", "tuning", "serve_apps", "benchmarks")) == []


def test_the_check_sees_imports_inside_functions(tmp_path):
    """The walker finds a lazy ``from serve_apps.x import y`` in a function body (the form the
    old export and user_embeddings used), and the demo's exception is still in the code."""
    f = tmp_path / "job.py"
    f.write_text("def run():\n    from serve_apps.retrieval import build_index\n")
    assert (2, "serve_apps.retrieval") in imported_modules(f)
    demo = [m for _, m in imported_modules(REPO / "ray_jobs" / "demo.py")]
    assert "serve_apps.run" in demo
