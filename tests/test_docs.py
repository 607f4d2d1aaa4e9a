"""The docs name only what exists: every ``python -m MODULE`` in README.md and docs/*.md is an
importable module with a ``__main__`` path, every Serve route they show is declared by the
Serve apps (for some use-case's route prefix), and README's bring-your-own snippet is
configs/byo_example.yaml. Static: nothing is executed or served."""

from __future__ import annotations

import ast
import importlib.util
import re
from pathlib import Path

import pytest

from serve_apps.deploy_config import load_use_cases

pytestmark = pytest.mark.unit
REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
SERVE_PORT = 8000
HTTP_METHODS = ("get", "post", "put", "delete", "patch")
# Routes the Serve HTTP proxy itself answers (not under an application's prefix).
PROXY_ROUTES = {"/-/healthz", "/-/routes"}

# `python -m pkg.mod`; placeholders (MODULE, <module>, ray_jobs.<job>) are not commands.
MODULE_RE = re.compile(r"python3?\s+-m\s+([a-z_][\w]*(?:\.[a-z_]\w*)*)(?![\w.<])")
# a Serve URL (port 8000) with or without a scheme, as curl examples write it
URL_RE = re.compile(rf"(?:localhost|127\.0\.0\.1):{SERVE_PORT}(/[\w\-./<>]*)")
# `POST /ads/rank`, `GET /<prefix>/healthz`, and table rows `| POST | `/<prefix>/rank` |`
METHOD_RE = re.compile(r"\b(GET|POST|PUT|DELETE|PATCH)\b[\s|`]+(/[\w\-./<>]*)")


def _text(path: Path) -> str:
    return path.read_text()


def documented_modules() -> dict[str, list[str]]:
    """module -> the docs that run it."""
    out: dict[str, list[str]] = {}
    for doc in DOCS:
        for m in MODULE_RE.findall(_text(doc)):
            out.setdefault(m, []).append(doc.name)
    return out


def has_main(module: str) -> bool:
    """``python -m module`` runs something: a package's __main__, or a module's main block."""
    spec = importlib.util.find_spec(module)
    if spec is None:
        return False
    if spec.submodule_search_locations is not None:  # a package: needs pkg/__main__.py
        return importlib.util.find_spec(f"{module}.__main__") is not None
    if spec.origin is None or not spec.origin.endswith(".py"):
        return True  # compiled / frozen modules of installed tools
    return (
        re.search(r"^if __name__ == .__main__.:", Path(spec.origin).read_text(), re.M) is not None
    )


def declared_app_routes() -> set[str]:
    """Paths the use-case FastAPI apps declare (``@<app>.get("/x")`` ...), by parsing
    serve_apps/ (building the app would need a model and a feature store), plus FastAPI's
    own /docs and /openapi.json unless an app turns them off."""
    paths: set[str] = set()
    defaults = {"docs_url": "/docs", "openapi_url": "/openapi.json"}
    for path in sorted((REPO / "serve_apps").glob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call) or not isinstance(
                node.func, (ast.Attribute, ast.Name)
            ):
                continue
            name = node.func.attr if isinstance(node.func, ast.Attribute) else node.func.id
            if name in HTTP_METHODS and node.args and isinstance(node.args[0], ast.Constant):
                value = node.args[0].value
                if isinstance(value, str) and value.startswith("/"):
                    paths.add(value)
            if name == "FastAPI":
                for kw in node.keywords:
                    if kw.arg in defaults and isinstance(kw.value, ast.Constant):
                        defaults[kw.arg] = kw.value.value
    return paths | {v for v in defaults.values() if v}


def _prefixes() -> list[str]:
    return [uc.route_prefix.rstrip("/") for uc in load_use_cases(REPO / "configs" / "use_cases")]


def serve_routes() -> set[str]:
    app = declared_app_routes()
    return {f"{p}{r}" for p in _prefixes() for r in app} | PROXY_ROUTES


def documented_routes() -> dict[str, list[str]]:
    """Serve route -> the docs that show it (query strings and trailing dots dropped)."""
    out: dict[str, list[str]] = {}
    for doc in DOCS:
        text = _text(doc)
        found = URL_RE.findall(text) + [p for _, p in METHOD_RE.findall(text)]
        for route in found:
            route = route.split("?")[0].rstrip(".,")
            if route.rstrip("/"):
                out.setdefault(route, []).append(doc.name)
    return out


PREFIX_PLACEHOLDERS = ("/<prefix>", "/<use-case>")


def _matches(route: str, known: set[str]) -> bool:
    """``/<prefix>/rank`` matches when it exists under some use-case's prefix."""
    candidates = {route}
    for ph in PREFIX_PLACEHOLDERS:
        if route.startswith(ph):
            candidates = {route.replace(ph, p, 1) for p in _prefixes()}
    for c in candidates:
        pattern = re.sub(r"<[^>]*>", "[^/]+", re.escape(c).replace(r"\<", "<").replace(r"\>", ">"))
        if any(re.fullmatch(pattern, k) for k in known):
            return True
    return False


def test_the_scanners_find_what_the_docs_show():
    modules, routes = documented_modules(), documented_routes()
    assert {"ray_jobs.demo", "ray_jobs.train", "k8s.render", "serve_apps.run"} <= set(modules)
    assert "/ads/rank" in routes and "/<prefix>/rank" in routes
    assert {"/rank", "/events", "/healthz", "/version"} <= declared_app_routes()


def test_every_documented_python_m_module_exists_and_runs():
    bad = {m: docs for m, docs in documented_modules().items() if not has_main(m)}
    assert bad == {}, f"`python -m` of a module that does not exist or has no __main__: {bad}"


def test_every_documented_serve_route_exists():
    known = serve_routes()
    bad = {r: docs for r, docs in documented_routes().items() if not _matches(r, known)}
    assert bad == {}, f"routes shown in the docs that no Serve app declares: {bad}"


def test_route_check_rejects_what_does_not_exist():
    known = serve_routes()
    assert _matches("/ads/rank", known) and _matches("/<prefix>/healthz", known)
    assert not _matches("/ads", known)  # the use-case prefix alone is not a route
    assert not _matches("/ads/score", known) and not _matches("/<prefix>/predict", known)
    assert not has_main("ray_jobs.no_such_job") and not has_main("ray_jobs")


def _byo_snippet() -> str:
    readme = _text(REPO / "README.md")
    section = readme.split("## Bring your own parquet", 1)[1]
    return section.split("```yaml\n", 1)[1].split("```", 1)[0]


def test_readme_byo_snippet_is_configs_byo_example():
    assert _byo_snippet() == (REPO / "configs" / "byo_example.yaml").read_text()
