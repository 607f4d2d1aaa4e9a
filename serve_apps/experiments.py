"""Online experiments: which arm serves a user.

A use-case's ``experiment`` (model.config.ExperimentConfig) splits its users between arms:
the champion, challengers (other model versions) and a holdout (a non-personalized policy).
A user's arm is a pure function of (user_id, salt), so every replica and every request
agree without shared state, the same user always sees the same arm, and a new salt
reshuffles everyone. Statistics: serve_apps.experiment_stats.
"""

from __future__ import annotations

import hashlib

import numpy as np

from model.config import ArmConfig, ExperimentConfig

HASH_SPACE = 2**64


def user_position(user_id: int, salt: str) -> float:
    """The user's place in [0, 1): the first 8 bytes of BLAKE2b over ``salt:user_id``."""
    digest = hashlib.blake2b(f"{salt}:{int(user_id)}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / HASH_SPACE


def assign_arm(user_id: int, exp: ExperimentConfig) -> ArmConfig:
    """The arm that serves ``user_id``: arms own consecutive slices of [0, 1) in config
    order, each as wide as its share (a share of 0 gets nobody)."""
    edges = np.cumsum([a.share for a in exp.arms])
    at = int(np.searchsorted(edges, user_position(user_id, exp.salt), side="right"))
    live = [i for i, a in enumerate(exp.arms) if a.share > 0]
    # float rounding can leave the last edge a hair under 1: that slice goes to the last arm
    return exp.arms[at if at < len(exp.arms) else live[-1]]
