"""Serving fixtures: a real redis-server, an exported (untrained) model with its retrieval
index, and a small serving config."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest

from model.config import UnirankConfig, load_config

REPO = Path(__file__).resolve().parents[2]
USE_CASES = REPO / "configs" / "use_cases"
# The model also knows "homefeed": the new-use-case test adds it by config only.
TASK_TYPES = ["ads", "notifications", "related_items", "search", "category", "homefeed"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serving_config(*overrides: str) -> UnirankConfig:
    """A small model (fast replicas) over the unified feature spec."""
    return load_config(
        None,
        [
            "model.embedding_dim=8",
            "model.bottom_dims=[32, 16]",
            "model.tower_dims=[16]",
            "model.dropout=0.0",
            f"dataset.task_types={TASK_TYPES}",
            "dataset.features.sequence.max_len=16",
            "serve.shape_buckets=[16, 64, 128, 512]",
            *overrides,
        ],
    )


@pytest.fixture(scope="session")
def serving_cfg():
    """``serving_config(*overrides)`` and a free port, for modules that deploy."""
    return serving_config, free_port


@pytest.fixture(scope="session")
def redis_url():
    """A real redis-server on 127.0.0.1 (UNIRANK_TEST_REDIS_URL when CI started one)."""
    url = os.environ.get("UNIRANK_TEST_REDIS_URL")
    if url:
        yield url
        return
    exe = shutil.which("redis-server")
    if exe is None:
        pytest.fail("redis-server is not installed: apt-get install -y redis-server")
    port = free_port()
    proc = subprocess.Popen(
        [exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 20
    while True:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                break
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"redis-server did not start on port {port}")
        time.sleep(0.1)
    yield f"redis://127.0.0.1:{port}/0"
    proc.terminate()
    proc.wait(timeout=10)


@pytest.fixture(scope="session")
def rows():
    from serve_apps.bootstrap import sample_rows

    return sample_rows(3000, seed=1, task_types=tuple(TASK_TYPES))


@pytest.fixture(scope="session")
def exported(tmp_path_factory, rows):
    """(model dir, config): an untrained export + retrieval index built from parquet."""
    from serve_apps.bootstrap import export_untrained, write_rows
    from serve_apps.retrieval import INDEX_FILE, build_index

    root = tmp_path_factory.mktemp("serve_model")
    cfg = serving_config()
    model_dir = export_untrained(root / "model", cfg, rows)
    data = write_rows(rows, root / "prepared" / "train")
    build_index([data], model_dir / INDEX_FILE)
    return model_dir, cfg
