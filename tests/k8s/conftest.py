"""Shared fixtures of the k8s tests: the overlays rendered once per session."""

from __future__ import annotations

from pathlib import Path

import pytest

from k8s.render import render
from k8s.settings import overlays

FIXTURES = Path(__file__).resolve().parent / "fixtures"


@pytest.fixture(scope="session")
def rendered(tmp_path_factory) -> dict[str, Path]:
    """overlay name -> directory with its rendered manifests (python -m k8s.render)."""
    out = {}
    for name in overlays():
        out[name] = tmp_path_factory.mktemp(f"render-{name}")
        render(name, out[name])
    return out
