"""Serving fixtures: an exported (untrained) model with its retrieval index and a small
serving config (the real redis-server, ``redis_url``, is in tests/conftest.py)."""

from __future__ import annotations

import socket
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
def rows():
    from serve_apps.bootstrap import sample_rows

    return sample_rows(3000, seed=1, task_types=tuple(TASK_TYPES))


@pytest.fixture(scope="session")
def exported(tmp_path_factory, rows):
    """(model dir, config): an untrained export + retrieval index and user-profile table
    built from parquet."""
    from model.user_profiles import PROFILE_FILE, build_profiles
    from serve_apps.bootstrap import export_untrained, write_rows
    from serve_apps.retrieval import INDEX_FILE, build_index

    root = tmp_path_factory.mktemp("serve_model")
    cfg = serving_config()
    model_dir = export_untrained(root / "model", cfg, rows)
    data = write_rows(rows, root / "prepared" / "train")
    build_index([data], model_dir / INDEX_FILE)
    build_profiles([data], model_dir / PROFILE_FILE)
    return model_dir, cfg
