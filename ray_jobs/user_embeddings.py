"""Precompute the user-sequence encodings of active users for serving.

    python -m ray_jobs.user_embeddings [CONFIG] [section.field=value ...]

1. Read ``user_id``, ``event_time`` and the ``seq_*`` columns of the prepared parquet
   (``user_embeddings.input``, default the dataset's train / validation / test splits).
2. Active users: an impression within ``user_embeddings.lookback_s`` before ``as_of``
   (default now). Per active user, the sequence of their latest impression (a per-block
   reduction, then a groupby for the global latest).
3. ``map_batches`` on an actor pool (``num_actors`` x ``actor_cpus``, ``batch_size`` users a
   call): each actor loads the exported model once (``model_uri``, default
   ``serve.model_uri``; a ``models:/`` URI is downloaded from MLflow) and runs its
   ``encode_user`` on the sequences, the events' age measured at the job's start
   (``computed_at``).
4. Write each encoding (the real events' rows, their timestamps, ``computed_at``,
   ``last_event_ts``, the model digest) to the Redis feature store when
   ``serve.feature_store=redis`` (keys ``unirank:enc:<user>``, expiring after ``ttl_s``),
   and all of them as parquet under ``user_embeddings.output``.

The ranker uses a stored encoding while it is fresher than the use-case's
``feature_freshness_s`` and no newer event was posted; see docs/serving.md.
"""

from __future__ import annotations

import json
import logging
import time

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray

from model.config import ConfigError, UnirankConfig
from model.storage import resolve
from ray_jobs.common import init_ray, job_parser, parse_job_args, read_parquet, setup_logging

log = logging.getLogger("unirank.user_embeddings")
COLUMNS = ["user_id", "event_time", "seq_item_ids", "seq_event_types", "seq_timestamps"]
OUTPUT_SCHEMA = pa.schema(
    [
        ("user_id", pa.int64()),
        ("n_events", pa.int32()),
        ("dim", pa.int32()),
        ("vector", pa.list_(pa.float32())),  # (n_events * dim,) row-major, oldest event first
        ("event_ts", pa.list_(pa.int64())),
        ("last_event_ts", pa.int64()),
        ("computed_at", pa.float64()),
        ("model", pa.string()),
    ]
)


# --------------------------------------------------------------------------- active users


def _micros(t: pa.Table) -> np.ndarray:
    return pc.cast(t["event_time"], pa.timestamp("us", tz="UTC")).cast(pa.int64()).to_numpy()


def latest_per_user(batch: pa.Table, since_us: int, until_us: int) -> pa.Table:
    """The latest row of each user among the rows with since <= event_time <= until."""
    if batch.num_rows == 0:
        return batch
    t = _micros(batch)
    keep = np.flatnonzero((t >= since_us) & (t <= until_us))
    if keep.size == 0:
        return batch.slice(0, 0)
    users = batch["user_id"].to_numpy(zero_copy_only=False)[keep]
    order = np.lexsort((t[keep], users))  # by user, then time: each user's latest is last
    last = np.r_[users[order][1:] != users[order][:-1], True]
    return batch.take(keep[order][last])


def latest_with_events(batch: pa.Table, since_us: int, until_us: int) -> pa.Table:
    """``latest_per_user``, without users whose latest sequence is empty (nothing to encode;
    on the fly that costs nothing)."""
    t = latest_per_user(batch, since_us, until_us)
    lengths = pc.fill_null(pc.list_value_length(t["seq_item_ids"]), 0)
    return t.filter(pc.greater(lengths, 0))


# --------------------------------------------------------------------------- the encoder


class UserEncoder:
    """One actor of the pool: the exported model, loaded once; users in, encodings out."""

    def __init__(self, cfg_json: dict, model_uri: str, computed_at: float, redis_url: str | None):
        from model.config import config_from_dict
        from model.export import load_predictor
        from model.model_dir import resolve_model_dir

        cfg = config_from_dict(cfg_json, "user_embeddings job config")
        self.predictor = load_predictor(resolve_model_dir(model_uri, cfg), cuda_graphs=False)
        if not self.predictor.supports_encoding:
            raise ConfigError(
                f"user_embeddings.model_uri {model_uri!r}: the export has no encode_user entry "
                f"point (no sequence encoder, or exported before it existed); re-export it"
            )
        self.computed_at = computed_at
        self.redis_url = redis_url
        self.ttl_s = cfg.user_embeddings.ttl_s
        self.length = self.predictor.user_encoding["max_len"]

    def __call__(self, batch: pa.Table) -> pa.Table:
        from model.user_encoding import Encoding, write_encodings

        n = batch.num_rows
        if n == 0:
            return OUTPUT_SCHEMA.empty_table()
        cols = {
            "event_time": np.full(n, int(self.computed_at), dtype=np.int64),  # age measured now
            **{c: batch[c] for c in COLUMNS[2:]},
        }
        h, mask = self.predictor.encode(cols)  # (U, L, D), (U, L)
        timestamps = batch["seq_timestamps"].to_pylist()
        users = batch["user_id"].to_numpy(zero_copy_only=False)
        out, encodings = [], []
        for i in range(n):
            k = int(mask[i].sum())  # real events kept (the newest max_len)
            ts = np.asarray([v or 0 for v in (timestamps[i] or [])][-k:] if k else [], np.int64)
            enc = Encoding(
                vector=np.ascontiguousarray(h[i][mask[i]]),  # (k, D)
                computed_at=self.computed_at,
                last_event_ts=int(ts.max()) if k else 0,
                event_ts=ts,
                model=self.predictor.digest,
            )
            encodings.append((int(users[i]), enc))
            out.append(enc)
        if self.redis_url:
            write_encodings(self.redis_url, encodings, ttl_s=self.ttl_s)
        dim = h.shape[2]
        return pa.table(
            {
                "user_id": pa.array(users.astype(np.int64)),
                "n_events": pa.array([len(e.vector) for e in out], pa.int32()),
                "dim": pa.array([dim] * n, pa.int32()),
                "vector": pa.array([e.vector.ravel() for e in out], pa.list_(pa.float32())),
                "event_ts": pa.array([e.event_ts for e in out], pa.list_(pa.int64())),
                "last_event_ts": pa.array([e.last_event_ts for e in out], pa.int64()),
                "computed_at": pa.array([self.computed_at] * n, pa.float64()),
                "model": pa.array([self.predictor.digest] * n, pa.string()),
            },
            schema=OUTPUT_SCHEMA,
        )


# --------------------------------------------------------------------------- the job


def inputs_of(cfg: UnirankConfig) -> list[str]:
    e, d = cfg.user_embeddings, cfg.dataset
    return list(e.input) or [*d.train, *d.validation, *d.test]


def run(cfg: UnirankConfig, address: str | None = None) -> dict:
    """Encode the active users' latest sequences; returns a summary (also printed)."""
    e = cfg.user_embeddings
    model_uri = e.model_uri or cfg.serve.model_uri
    if not model_uri:
        raise ConfigError("user_embeddings.model_uri (or serve.model_uri) is not set")
    if cfg.dataset.features.sequence is None:
        raise ConfigError("dataset.features.sequence is not set: there is nothing to encode")
    sources = inputs_of(cfg)
    if not sources:
        raise ConfigError("user_embeddings.input is empty and the dataset has no splits")
    computed_at = time.time()
    as_of = e.as_of if e.as_of is not None else int(computed_at)
    since_us, until_us = int((as_of - e.lookback_s) * 1e6), int(as_of * 1e6)
    redis_url = cfg.serve.redis_url if cfg.serve.feature_store == "redis" else None
    if redis_url is None:
        log.warning("serve.feature_store is %r: encodings go to parquet only", "memory")

    init_ray(address)
    try:
        ds = read_parquet(sources, cfg.storage, columns=COLUMNS)
    except FileNotFoundError as exc:
        raise ConfigError(f"user_embeddings.input: {exc}") from None
    missing = [c for c in COLUMNS if c not in ds.schema().names]
    if missing:
        raise ConfigError(f"user_embeddings.input {sources}: parquet lacks columns {missing}")
    window = {"since_us": since_us, "until_us": until_us}
    latest = ds.map_batches(latest_per_user, fn_kwargs=window, batch_format="pyarrow")
    latest = latest.groupby("user_id").map_groups(
        latest_with_events, fn_kwargs=window, batch_format="pyarrow"
    )
    encoded = latest.map_batches(
        UserEncoder,
        fn_constructor_args=(cfg.model_dump(mode="json"), model_uri, computed_at, redis_url),
        batch_size=e.batch_size,
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=e.num_actors),
        num_cpus=e.actor_cpus,
    )
    out = resolve(e.output, cfg.storage)
    if out.filesystem.get_file_info(out.path).type.name == "Directory":
        out.filesystem.delete_dir(out.path)  # a rerun replaces the previous snapshot
    encoded.write_parquet(out.path, filesystem=out.filesystem)
    users, digest = _summary(out)
    result = {
        "users": users,
        "output": e.output,
        "redis": redis_url,
        "model_uri": model_uri,
        "model": digest,
        "computed_at": computed_at,
        "as_of": as_of,
        "lookback_s": e.lookback_s,
        "inputs": sources,
    }
    log.info(
        "encoded %d active users -> %s%s", users, e.output, f" + {redis_url}" * bool(redis_url)
    )
    return result


def _summary(out) -> tuple[int, str | None]:
    import pyarrow.dataset as pads

    info = out.filesystem.get_file_info(out.path)
    if info.type.name != "Directory":
        return 0, None
    t = pads.dataset(out.path, filesystem=out.filesystem, format="parquet").to_table(
        columns=["model"]
    )
    models = pc.unique(t["model"]).to_pylist() if t.num_rows else []
    return t.num_rows, (models[0] if models else None)


def main(argv=None) -> None:
    setup_logging()
    parser = job_parser(__doc__.split("\n\n")[0], job="user_embeddings")
    args, cfg = parse_job_args(parser, argv)
    try:
        result = run(cfg, address=args.address)
    except ConfigError as exc:
        parser.exit(2, f"error: {exc}\n")
    print(json.dumps({"user_embeddings": result}, default=str))


if __name__ == "__main__":
    main()
