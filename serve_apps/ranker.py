"""The ranker deployment: the exported model behind @serve.batch.

Requests (one :class:`~serve_apps.rows.RankInput` each, up to a few hundred candidates) are
batched by Serve (``max_batch_size`` / ``batch_wait_timeout_s`` from the use-case config),
expanded to unified rows, run through the exported model's FeatureProcessor and TorchScript
predictor, padded to the smallest configured shape bucket (``serve.shape_buckets``) so the
model only ever sees a few fixed shapes (one CUDA Graph per bucket on a GPU), and answered
with calibrated probabilities per task plus the use-case's ranking score
``sum_t score_weights[t] * p_t``.

Precision is the exported one (``manifest.json: precision``; fp16/bf16 for GPUs, fp32 —
or bf16, which is slow on CPUs without bf16 units — on CPU).

Isolation: each request is checked (serve_apps.bounds.check_rank_input) *before* it joins a
batch, so a malformed one is refused alone; if a batched call still fails, every request of
the batch is scored again on its own, so only the culprit fails; a request whose scores are
not all finite is answered with ``__error__`` (the ingress serves its fallback, marked
``model_error``) while the others of its batch are returned as scored.

Rollout: the model comes from the deployment's ``user_config`` (deploy_config.rollout_config:
a concrete version, pinned by the deploying side). Serve calls :meth:`Ranker.reconfigure`
before a new replica takes traffic and on every running replica when the config changes: the
new model is loaded, checked and warmed up beside the old one, then swapped in one
assignment; batches in flight finish on the model they started with. A model that fails to
load leaves the replica serving the old one, with the error in ``/version`` and
``unirank_rollouts{outcome="failed"}``. Every result names the version that scored it
(``__model_version__``).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import time

import numpy as np
import torch
from ray import serve

from model.config import ConfigError
from model.export import load_predictor, user_bucket
from serve_apps.bounds import EventTimes, InvalidRankInput, check_rank_input
from serve_apps.deploy_config import (
    RANKER_DEPLOYMENT,
    ROLLOUT_KV_PREFIX,
    parse_arms,
    parse_rollout,
)
from serve_apps.feature_store import Encoding, Events
from serve_apps.metrics import ServingMetrics
from serve_apps.model_store import model_version, resolve_model_dir
from serve_apps.rows import RankInput, split, to_columns
from serve_apps.settings import AppSettings

logger = logging.getLogger("ray.serve")
PRECOMPUTED, ON_THE_FLY = "precomputed", "on_the_fly"  # unirank_user_encoding{source}
ERROR_KEY = "__error__"  # in a result: why this request could not be scored
ROUTE = "ranker"  # the route tag of the ranker's own metrics
VERSION_KEY = "__model_version__"  # in a result: the model version that scored it


def pick_device(setting: str, num_gpus: float) -> str:
    """``serve.device``: cpu / cuda / auto (cuda when this replica has a GPU)."""
    if setting == "cuda" or (setting == "auto" and num_gpus > 0 and torch.cuda.is_available()):
        return "cuda"
    return "cpu"


def ranking_score(probs: dict[str, np.ndarray], weights: dict[str, float]) -> np.ndarray:
    """``sum_t w_t * p_t`` over the use-case's weighted tasks."""
    first = next(iter(probs.values()))
    score = np.zeros(len(first), dtype=np.float64)
    for task, w in weights.items():
        score += w * probs[task]
    return score


class ModelScorer:
    """The model side of the ranker, without Serve: load, check, warm up, score a batch."""

    def __init__(self, s: AppSettings, label: str | None = None):
        """``label``: the model version responses report (default: the model's digest)."""
        self.settings = s
        uc = s.use_case
        self.path = resolve_model_dir(s.model_uri, s.cfg)
        self.device = pick_device(s.cfg.serve.device, uc.num_gpus)
        self.predictor = load_predictor(self.path, self.device)
        # The serving config decides the buckets (the export's are a default).
        self.predictor.shape_buckets = sorted(s.cfg.serve.shape_buckets)
        known = set(self.predictor.cfg.dataset.task_types)
        if uc.name not in known:
            raise ConfigError(
                f"use-case {uc.name!r}: the model at {self.path} was not trained on task_type "
                f"{uc.name!r} (it knows {sorted(known)})"
            )
        tasks = {t.name for t in self.predictor.cfg.dataset.tasks}
        missing = sorted(set(uc.score_weights) - tasks)
        if missing:
            raise ConfigError(
                f"use-case {uc.name!r}: score_weights names tasks {missing} the model lacks "
                f"(it has {sorted(tasks)})"
            )
        self.weights = dict(uc.score_weights)
        self.times = EventTimes.from_config(s.cfg)
        self.version = model_version(self.path, s.model_uri or str(self.path))
        self.version["model_version"] = label or self.version["sha256"]
        self.version["device"] = self.device
        self.version["cuda_graphs"] = self.predictor.cuda_graphs_reason or "on"

    def warm_up(self, example: RankInput) -> None:
        """One call per shape bucket, so no request pays for a first-call compilation; on
        a GPU one per shape bucket x user bucket (1, 2, 4 .. max_batch_size requests), so
        every CUDA Graph the served path can need is captured before traffic."""
        max_users = self.settings.use_case.max_batch_size if self.device == "cuda" else 1
        for size in self.predictor.shape_buckets:
            rows = {k: np.resize(np.asarray(v), size) for k, v in example.candidates.items()}
            for users in sorted({user_bucket(u) for u in range(1, min(size, max_users) + 1)}):
                parts = [
                    dataclasses.replace(example, candidates={k: v[i] for k, v in rows.items()})
                    for i in np.array_split(np.arange(size), min(users, size))
                ]
                self.score(parts)

    def score(self, inputs: list[RankInput]) -> list[dict[str, np.ndarray]]:
        """Probabilities + ``__score__`` per input, and ``__encoding__`` /
        ``__encoding_reason__``: whether its user encoding was precomputed or computed here.
        An input with a non-finite probability or score gets ``__error__`` =
        ``non_finite_score`` (its values must not be served)."""
        if self.predictor.supports_encoding:
            probs, sources = self._predict_encoded(inputs)
        else:  # an export from before the encode_user / forward_encoded split
            probs = self.predictor.predict(to_columns(inputs))  # {task: (n,)} calibrated
            sources = [(ON_THE_FLY, "unsupported")] * len(inputs)
        probs = {t: np.asarray(v, dtype=np.float64) for t, v in probs.items()}
        with np.errstate(invalid="ignore", over="ignore"):
            probs["__score__"] = ranking_score(probs, self.weights)
        out = split(probs, [len(x) for x in inputs])
        for o, (source, reason) in zip(out, sources, strict=True):
            if not all(np.isfinite(v).all() for v in o.values()):
                o[ERROR_KEY] = np.asarray("non_finite_score")
            o["__encoding__"] = np.asarray(source)
            o["__encoding_reason__"] = np.asarray(reason)
            o[VERSION_KEY] = np.asarray(self.version["model_version"])
        return out

    def score_batch(self, inputs: list[RankInput]) -> list[dict[str, np.ndarray]]:
        """``score`` for a batch of requests, isolated: when the batched call raises, each
        request is scored alone, and only those that fail alone get ``__error__``."""
        try:
            return self.score(inputs)
        except Exception as exc:  # noqa: BLE001 - find the culprit, answer the others
            if len(inputs) == 1:
                logger.warning("ranker: a request failed to score: %r", exc)
                return [{ERROR_KEY: np.asarray(f"model_error: {type(exc).__name__}")}]
            logger.warning("ranker: a batch of %d failed (%r); scoring alone", len(inputs), exc)
        return [self.score_batch([inp])[0] for inp in inputs]

    def encoding_problem(self, enc: Encoding) -> str | None:
        """Why this model cannot use a stored encoding, or None when it can."""
        spec = self.predictor.user_encoding or {}
        if enc.model != self.predictor.digest:
            return "model_mismatch"  # computed by another model version
        v, ts = enc.vector, enc.event_ts
        if v.ndim != 2 or v.shape[1] != spec.get("dim") or len(v) > spec.get("max_len", 0):
            return "malformed"
        if ts is None or len(ts) != len(v):
            return "malformed"
        ts = np.asarray(ts)
        if ts.dtype != np.int64 or not self.times.valid(ts).all() or np.any(np.diff(ts) < 0):
            return "malformed"
        if not np.isfinite(v).all():
            return "malformed"
        return None

    def _predict_encoded(self, inputs: list[RankInput]):
        """Encode each on-the-fly user once (not once per candidate), take the others'
        encodings from the store, and score every candidate against its user's encoding."""
        spec = self.predictor.user_encoding
        length, dim = spec["max_len"], spec["dim"]
        sources: list[tuple[str, str]] = []
        rows: list[RankInput] = []
        user_h = np.zeros((len(inputs), length, dim), dtype=np.float32)  # (U, L, D)
        fly = []
        for u, inp in enumerate(inputs):
            enc, reason = inp.encoding, inp.encoding_status
            problem = self.encoding_problem(enc) if enc is not None else reason
            if enc is not None and problem is None:
                n = len(enc.vector)
                if n:
                    user_h[u, length - n :] = enc.vector  # left padding, newest last
                # The rows describe the encoded events (their age now drives the recency
                # bias), not the store's events: the encoding may know more history.
                z = np.zeros(n, np.int64)
                inp = dataclasses.replace(inp, events=Events(z, z, np.asarray(enc.event_ts)))
                sources.append((PRECOMPUTED, "fresh"))
            else:
                fly.append(u)
                sources.append((ON_THE_FLY, problem or "missing"))
            rows.append(inp)
        if fly:
            h, _ = self.predictor.encode(user_sequences([inputs[u] for u in fly]))
            user_h[fly] = h
        index = np.repeat(np.arange(len(inputs)), [len(x) for x in inputs])  # (n,)
        return self.predictor.predict_encoded(to_columns(rows), user_h, index), sources


def refuse(inp: RankInput, times: EventTimes) -> dict[str, np.ndarray] | None:
    """``{__error__: "invalid_input: ..."}`` for an input that must not join a batch."""
    try:
        check_rank_input(inp, times)
    except InvalidRankInput as exc:
        logger.warning("task_type=%s ranker refused a request: %s", inp.task_type, exc)
        return {ERROR_KEY: np.asarray(f"invalid_input: {exc}")}
    return None


def score_by_arm(
    live: ModelScorer, arms: dict[str, ModelScorer], inputs: list[RankInput]
) -> list[dict[str, np.ndarray]]:
    """Score each input with its experiment arm's model (``inp.arm``; None = the live model),
    one batched call per model. An arm this replica has no model for gets ``__error__`` (the
    ingress serves its fallback, marked), never another arm's scores."""
    groups: dict[str | None, list[int]] = {}
    for i, inp in enumerate(inputs):
        groups.setdefault(inp.arm, []).append(i)
    out: list[dict[str, np.ndarray]] = [{} for _ in inputs]
    for arm, idx in groups.items():
        scorer = live if arm is None else arms.get(arm)
        if scorer is None:
            for i in idx:
                out[i] = {ERROR_KEY: np.asarray(f"model_error: no model for arm {arm!r}")}
            continue
        for i, o in zip(idx, scorer.score_batch([inputs[i] for i in idx]), strict=True):
            out[i] = o
    return out


class InProcessRanker:
    """The ranker's per-request path in this process, without Serve (unit tests, tools): the
    same pre-batch check, isolated scoring and arm models as :class:`Ranker`, one request
    per call."""

    def __init__(self, scorer: ModelScorer, arms: dict[str, ModelScorer] | None = None):
        self.scorer = scorer
        self.arms = arms or {}

    async def rank(self, inp: RankInput, timeout_s: float) -> dict[str, np.ndarray]:
        refused = refuse(inp, self.scorer.times)
        if refused is not None:
            return refused
        call = asyncio.to_thread(score_by_arm, self.scorer, self.arms, [inp])
        (out,) = await asyncio.wait_for(call, timeout_s)
        return out

    async def version(self) -> dict:
        return dict(self.scorer.version)


def user_sequences(inputs: list[RankInput]) -> dict[str, object]:
    """One row per input: its events and the request time (what ``encode`` needs)."""
    return {
        "event_time": np.asarray([x.now for x in inputs], dtype=np.int64),
        "seq_item_ids": [x.events.item_ids for x in inputs],
        "seq_event_types": [x.events.event_types for x in inputs],
        "seq_timestamps": [x.events.timestamps for x in inputs],
    }


@serve.deployment(name=RANKER_DEPLOYMENT)
class Ranker:
    def __init__(self, args: dict):
        s = AppSettings.from_args(args)
        uc = s.use_case
        # A replica owns a fraction of a core: more intra-op threads only contend.
        torch.set_num_threads(max(1, int(uc.num_cpus)))
        self.settings = s
        self.use_case = uc.name
        self.metrics = ServingMetrics(uc.name)
        self.rank_batch.set_max_batch_size(uc.max_batch_size)
        self.rank_batch.set_batch_wait_timeout_s(uc.batch_wait_timeout_s)
        self._fault: tuple[str, float] | None = None
        # Loaded by reconfigure(user_config), which Serve calls before this replica takes
        # traffic (serve_apps.app.build_app always sets a user_config).
        self.scorer: ModelScorer | None = None
        self.arms: dict[str, ModelScorer] = {}  # an experiment's other models, by arm
        self.rollout: dict = {"target": None, "serving": None, "error": None, "at": None}

    async def reconfigure(self, config: dict) -> None:
        """Serve's lightweight update: load ``config``'s model beside the serving one, check
        and warm it up, then swap. The first model of a replica must load (the replica does
        not start without one); a later one that fails leaves the old one serving."""
        uri, label = parse_rollout(config)
        await self._load_arms(parse_arms(config))
        current = self.scorer
        if current is not None and (
            current.settings.model_uri,
            current.version["model_version"],
        ) == (uri, label):
            self.rollout.update(target=label, error=None)  # e.g. back from a failed rollout
            self._publish()
            return
        self.rollout.update(target=label, error=None)
        t0 = time.monotonic()
        try:
            scorer = await asyncio.to_thread(self._load, uri, label)
        except Exception as exc:
            if current is None:
                raise
            self.rollout.update(error=f"{type(exc).__name__}: {exc}"[:1000], at=time.time())
            self.metrics.inc("unirank_rollouts", outcome="failed")
            logger.error(
                "task_type=%s rollout to %s (%s) failed, still serving %s: %r",
                self.use_case, label, uri, current.version["model_version"], exc,
            )  # fmt: skip
            self._publish()
            return
        self.scorer = scorer  # the swap: one assignment; batches in flight keep the old one
        load_s = round(time.monotonic() - t0, 3)
        self.rollout.update(serving=label, at=time.time(), load_s=load_s)
        self.metrics.inc("unirank_rollouts", outcome="ok")
        logger.info(
            "ranker ready task_type=%s model_version=%s sha256=%s device=%s buckets=%s load_s=%s",
            self.use_case, label, scorer.version["sha256"], scorer.device,
            scorer.predictor.shape_buckets, load_s,
        )  # fmt: skip
        self._publish()

    async def _load_arms(self, wanted: dict[str, tuple[str, str]]) -> None:
        """Hold exactly the arms' models of ``user_config.arms``, loading only new versions;
        an arm whose model fails to load is left out (its requests get a marked fallback)."""
        arms: dict[str, ModelScorer] = {}
        for name, (uri, label) in wanted.items():
            have = self.arms.get(name)
            if have is not None and have.version["model_version"] == label:
                arms[name] = have
                continue
            try:
                arms[name] = await asyncio.to_thread(self._load, uri, label)
            except Exception as exc:  # noqa: BLE001 - the other arms keep serving
                self.metrics.inc("unirank_rollouts", outcome="failed")
                logger.error("task_type=%s arm %s: model %s failed to load: %r",
                             self.use_case, name, uri, exc)  # fmt: skip
        self.arms = arms  # one assignment, as for the live model

    def _load(self, uri: str, label: str) -> ModelScorer:
        scorer = ModelScorer(dataclasses.replace(self.settings, model_uri=uri), label)
        scorer.warm_up(warmup_input(self.use_case))
        return scorer

    def _publish(self) -> None:
        """This replica's rollout state in the cluster's KV, where ``serve_apps.rollout``
        checks that every replica serves the new version (or which ones failed)."""
        from ray.experimental.internal_kv import _internal_kv_put

        try:
            ctx = serve.get_replica_context()
            key = f"{ROLLOUT_KV_PREFIX}{ctx.app_name}/{ctx.replica_id.unique_id}"
            _internal_kv_put(key, json.dumps(self.rollout), overwrite=True)
        except Exception as exc:  # noqa: BLE001 - reporting must not break serving
            logger.warning("task_type=%s cannot publish the rollout state: %r", self.use_case, exc)

    def _scorer(self) -> ModelScorer:
        if self.scorer is None:  # only a Ranker bound without user_config
            raise RuntimeError("ranker: no model loaded (the deployment needs a user_config)")
        return self.scorer

    async def rank(self, inp: RankInput) -> dict[str, np.ndarray]:
        """One request's probabilities and score, or ``__error__`` (never raises for a bad
        input: it is refused here, before it can join and spoil a batch)."""
        refused = refuse(inp, self._scorer().times)
        if refused is not None:
            self.metrics.inc("unirank_errors", kind="invalid_input", route=ROUTE)
            return refused
        return await self.rank_batch(inp)

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.005)
    async def rank_batch(self, inputs: list[RankInput]) -> list[dict[str, np.ndarray]]:
        scorer, arms = self._scorer(), self.arms  # one set of models for the whole batch
        if self._fault is not None:
            kind, delay = self._fault
            if kind == "slow":
                await asyncio.sleep(delay)
            elif kind == "error":
                raise RuntimeError("injected model failure (Ranker.set_fault)")
        t0 = time.perf_counter()
        # The forward pass is CPU-bound: off the event loop, so health checks still answer.
        out = await asyncio.to_thread(score_by_arm, scorer, arms, inputs)
        self.metrics.observe("unirank_model_latency_ms", (time.perf_counter() - t0) * 1e3)
        for o in out:
            if ERROR_KEY in o:
                kind = str(o[ERROR_KEY]).split(":")[0]
                self.metrics.inc("unirank_errors", kind=kind, route=ROUTE)
                continue
            self.metrics.inc(
                "unirank_user_encoding",
                source=str(o["__encoding__"]),
                reason=str(o["__encoding_reason__"]),
            )
        self.metrics.observe("unirank_model_batch_rows", sum(len(x) for x in inputs))
        return out

    def version(self) -> dict:
        """The serving model and this replica's last rollout (target, error, when)."""
        arms = {name: a.version["model_version"] for name, a in self.arms.items()}
        return {**self._scorer().version, "rollout": dict(self.rollout), "arms": arms}

    def set_fault(self, kind: str | None, delay_s: float = 0.0) -> None:
        """Fault injection for drills and tests (not reachable over HTTP): ``"error"`` makes
        every batch raise, ``"slow"`` delays it by ``delay_s``, None clears it."""
        if kind not in (None, "error", "slow"):
            raise ValueError(f"fault kind must be None, 'error' or 'slow', got {kind!r}")
        self._fault = None if kind is None else (kind, float(delay_s))


def warmup_input(task_type: str, n: int = 16) -> RankInput:
    ids = np.arange(1, n + 1, dtype=np.int64)
    z = np.zeros(n, np.int64)
    return RankInput(
        task_type=task_type,
        now=int(time.time()),
        user_id=1,
        candidates={
            "item_id": ids,
            "category_id": z,
            "advertiser_id": z,
            "campaign_id": z,
            "price": np.full(n, np.nan, np.float32),
            "advertiser_reliability": np.full(n, np.nan, np.float32),
        },
    )
