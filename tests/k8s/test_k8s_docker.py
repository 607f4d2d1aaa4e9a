"""The container image definition: Ray base image matches the pinned Ray, torch goes first."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import ray

pytestmark = pytest.mark.unit
ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "k8s" / "docker" / "Dockerfile"


def test_base_images_are_ray_cpu_and_gpu_at_the_installed_ray():
    text = DOCKERFILE.read_text()
    assert re.search(rf"^ARG RAY_VERSION={re.escape(ray.__version__)}$", text, re.M)
    froms = re.findall(r"^FROM (\S+)", text, re.M)
    assert "rayproject/ray:${RAY_VERSION}-${PYTHON_TAG}-cpu" in froms
    assert "rayproject/ray:${RAY_VERSION}-${PYTHON_TAG}-gpu" in froms
    assert "ARG PYTHON_TAG=py311" in text


def test_torch_first_then_the_project_with_the_constraints():
    text = DOCKERFILE.read_text().replace("\\\n", " ")  # join continued lines
    runs = re.findall(r"^RUN (.+)$", text, re.M)
    torch_at = next(i for i, r in enumerate(runs) if "torch" in r and "-c constraints.txt" in r)
    project_at = next(i for i, r in enumerate(runs) if "pip install -c constraints.txt ." in r)
    assert torch_at < project_at


def test_dockerignore_keeps_what_the_image_copies():
    ignore = (DOCKERFILE.parent / "Dockerfile.dockerignore").read_text().split()
    for path in re.findall(r"^COPY --chown=\S+ (\S+)", DOCKERFILE.read_text(), re.M):
        assert f"!{path}" in ignore or f"!{path}/**" in ignore, path
