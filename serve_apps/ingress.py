"""One use-case's ingress: validation, feature store, cache, retrieval, rules, fallback.

Routes (under the use-case's route prefix, e.g. ``/ads``; the FastAPI app is
serve_apps.api.build_api over an :class:`IngressCore`):

    POST /rank      rank candidates for a user            -> RankResponse
    POST /events    append a user's event to the store     -> EventAck
    POST /profile   set fields of a user's online profile  -> ProfileAck
    GET  /healthz   liveness + model, store, index status
    GET  /version   the served model (URI, version, digest, manifest, device, last rollout)
    GET  /docs, /openapi.json

A request flows: body limit (before parsing) -> schema bounds (422 naming the field) ->
use-case checks -> the user's recent events (feature store, truncated to the model's sequence
length) and profile (the export's profile table < the store's online profile < the request's
``profile``) -> result cache (TTL per use-case) -> candidates (request or retrieval) -> pre rules
-> Ranker (deadline = the use-case's request_timeout_s) -> post rules + top_k. A ranker
error, a non-finite score or a missed deadline is answered by the fallback policy
(``fallback`` field set, counted in ``unirank_fallbacks``); never a score that is not finite.

``model_version`` in a response is the version that scored it (from the ranker's result). The
cache is keyed by the version this app rolls out (``user_config``, the same as the ranker's)
and keeps only responses scored by it, so a rollout or rollback never serves a cached score of
another version.

:class:`IngressCore` has no Serve in it: the deployment gives it a handle to the Ranker
deployment (:class:`HandleRanker`); tests give it the ranker's in-process path
(``serve_apps.ranker.InProcessRanker``).
"""

import asyncio
import hashlib
import json
import logging
import time
from collections import OrderedDict
from typing import Any, Protocol

import numpy as np
from ray import serve
from ray.serve.handle import DeploymentHandle

from model.config import ArmConfig, ExperimentConfig
from model.exposure_log import Exposure, Outcome
from serve_apps.api import RequestError, Unavailable, build_api
from serve_apps.bounds import EventTimes
from serve_apps.deploy_config import INGRESS_DEPLOYMENT, parse_experiment, parse_rollout
from serve_apps.experiments import assign_arm
from serve_apps.exposures import make_exposure_log
from serve_apps.feature_store import Encoding, Events, make_store, now_s
from serve_apps.metrics import ServingMetrics
from serve_apps.request_features import candidate_features, load_profiles, user_profile
from serve_apps.retrieval import RetrievalIndex
from serve_apps.rows import RankInput
from serve_apps.rules import RuleContext, Slate, load_rules, sort_by_score, with_scores
from serve_apps.schemas import (
    Event,
    EventAck,
    Fallback,
    ProfileAck,
    ProfileUpdate,
    RankRequest,
    RankResponse,
    ScoredItem,
)
from serve_apps.settings import AppSettings

logger = logging.getLogger("ray.serve")
# generous JSON size of one candidate object, content lists included (2 x 32 ids of <= 19
# digits would be ~1.3 kB; a typical candidate is far smaller)
BYTES_PER_CANDIDATE = 1536
# Everything but the candidates at their schema maxima: 10,000 excluded + 1,000 campaign ids +
# 64 query tokens of up to 19 digits each, and the small fields.
BASE_BODY_BYTES = 256 * 1024
SMALL_BODY_BYTES = 4 * 1024  # /events and the GET routes
CACHE_MAX_ENTRIES = 10_000
STORE_TIMEOUT_S = 0.5
ERROR_KEY = "__error__"  # serve_apps.ranker.ERROR_KEY (the ingress does not import torch)
HOLDOUT_VERSION = "popularity"  # model_version of a holdout arm's answers
VERSION_KEY = "__model_version__"  # serve_apps.ranker.VERSION_KEY


class RankerClient(Protocol):
    async def rank(self, inp: RankInput, timeout_s: float) -> dict[str, np.ndarray]: ...

    async def version(self) -> dict: ...


class HandleRanker:
    """The Ranker deployment through its Serve handle."""

    def __init__(self, handle: DeploymentHandle):
        self.handle = handle

    async def rank(self, inp: RankInput, timeout_s: float) -> dict[str, np.ndarray]:
        response = self.handle.rank.remote(inp)
        try:
            return await asyncio.wait_for(_await(response), timeout_s)
        except TimeoutError:
            response.cancel()
            raise

    async def version(self) -> dict:
        return await self.handle.version.remote()


class ResultCache:
    """A small TTL cache of ranking responses (one per ingress replica)."""

    def __init__(self, ttl_s: float, max_entries: int = CACHE_MAX_ENTRIES):
        self.ttl_s, self.max_entries = ttl_s, max_entries
        self._d: OrderedDict[str, tuple[float, dict]] = OrderedDict()

    def get(self, key: str) -> dict | None:
        hit = self._d.get(key)
        if hit is None:
            return None
        if hit[0] < time.monotonic():
            del self._d[key]
            return None
        return hit[1]

    def put(self, key: str, value: dict) -> None:
        if self.ttl_s <= 0:
            return
        self._d[key] = (time.monotonic() + self.ttl_s, value)
        self._d.move_to_end(key)
        while len(self._d) > self.max_entries:
            self._d.popitem(last=False)


def cache_key(
    req: RankRequest,
    events: Events,
    profile: dict | None = None,
    arm: str | None = None,
    model_version: str = "",
) -> str:
    """The request minus its id, plus the user's exact history (new or backfilled events
    bust the cache), online profile (so does a profile update), experiment arm (arms never
    share answers) and the model version being served."""
    body = req.model_dump(exclude={"request_id"})
    parts = [body, events.digest(), profile or {}, arm, model_version]
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def _unique(ids: np.ndarray) -> np.ndarray:
    """Drop repeated ids, keeping the first occurrence and the order."""
    _, first = np.unique(ids, return_index=True)
    return ids[np.sort(first)]


async def _await(response):
    return await response


class _RankerFailed(Exception):
    def __init__(self, kind: str, detail: str = ""):
        super().__init__(detail or kind)
        self.kind = kind


def _items(slate: Slate) -> list[ScoredItem]:
    out = []
    for i in range(len(slate)):
        probs = None
        if slate.probs is not None:
            probs = {k: float(v[i]) for k, v in slate.probs.items()}
        out.append(
            ScoredItem(
                item_id=int(slate.item_id[i]),
                score=None if slate.score is None else float(slate.score[i]),
                probs=probs,
                category_id=int(slate.category_id[i]),
                advertiser_id=int(slate.advertiser_id[i]),
            )
        )
    return out


def load_index(s: AppSettings) -> RetrievalIndex | None:
    """The index the model was registered with (``<model dir>/retrieval.npz``, written by
    ray_jobs.export) comes first, so candidates match the model's catalogue; the
    ``retrieval_index`` arg serves models exported without one."""
    from serve_apps.model_store import resolve_model_dir
    from serve_apps.retrieval import INDEX_FILE, RetrievalError

    inside = resolve_model_dir(s.model_uri, s.cfg) / INDEX_FILE
    path = str(inside) if inside.is_file() or s.retrieval_index is None else s.retrieval_index
    if s.retrieval_index is not None and path != s.retrieval_index:
        logger.info(
            "task_type=%s using the model's own %s, not retrieval_index=%s",
            s.use_case.name,
            inside,
            s.retrieval_index,
        )
    try:
        return RetrievalIndex.load(path)
    except RetrievalError:
        if s.use_case.retrieval != "request" or s.use_case.fallback == "popularity":
            raise
        return None  # request-supplied candidates, no fallback: the index is optional


class IngressCore:
    """One use-case's request handling, without Serve or HTTP."""

    def __init__(self, s: AppSettings, ranker: RankerClient):
        self.settings = s
        self.uc = uc = s.use_case
        self.name = uc.name
        self.ranker = ranker
        self.rules = load_rules(uc)
        self.metrics = ServingMetrics(uc.name)
        seq = s.cfg.dataset.features.sequence
        self.max_seq_len = seq.max_len if seq is not None else 0
        self.times = EventTimes.from_config(s.cfg)
        self.store = make_store(
            s.cfg.serve,
            keep=max(4 * self.max_seq_len, 64),
            times=self.times,
            on_repair=self._repaired,
        )
        self.cache = ResultCache(uc.cache_ttl_s)
        self.max_body = BASE_BODY_BYTES + BYTES_PER_CANDIDATE * uc.max_candidates
        self.index = load_index(s)
        self.log = make_exposure_log(s.cfg.serve.exposure_log, s.cfg.serve.redis_url)
        self.experiment: ExperimentConfig | None = uc.experiment
        self.profiles = load_profiles(s)
        self.known_task_types = set(s.cfg.dataset.task_types)
        # The version this app rolls out (user_config); None = whatever the ranker serves.
        self.target_version: str | None = None

    def body_limit(self, route: str) -> int:
        return self.max_body if route == "/rank" else SMALL_BODY_BYTES

    def _repaired(self, user_id: int, reason: str, n: int) -> None:
        self.metrics.inc("unirank_feature_store_repairs", float(n), reason=reason)

    def record(
        self,
        route: str,
        status: int,
        rid: str,
        ms: float,
        kind: str | None,
        message: str | None,
    ) -> None:
        """Count and log one HTTP response (serve_apps.api.Guard calls this for every one)."""
        self.metrics.inc("unirank_requests", status=str(status), route=route)
        if route == "/rank":
            self.metrics.observe("unirank_request_latency_ms", ms)
        if status >= 400:
            kind = kind or f"http_{status}"
            self.metrics.inc("unirank_errors", kind=kind, route=route)
            log = logger.error if status >= 500 else logger.warning
            log(
                "task_type=%s route=%s request_id=%s status=%d kind=%s latency_ms=%.1f error=%s",
                self.name,
                route,
                rid,
                status,
                kind,
                ms,
                (message or "")[:500],
            )
        else:
            logger.info(
                "task_type=%s route=%s request_id=%s status=%d latency_ms=%.1f",
                self.name,
                route,
                rid,
                status,
                ms,
            )

    # ------------------------------------------------------------------ routes

    async def healthz(self) -> dict:
        try:
            store_ok = await asyncio.wait_for(self.store.ping(), STORE_TIMEOUT_S)
        except Exception:  # noqa: BLE001 - health reports, never raises
            store_ok = False
        return {
            "status": "ok",
            "use_case": self.uc.name,
            "feature_store": {"backend": self.store.backend, "ok": store_ok},
            "retrieval_items": len(self.index) if self.index is not None else 0,
            "rules": self.rules.names,
        }

    async def version(self) -> dict:
        """Asked each time: a rollout changes it (one ranker replica answers)."""
        got = await asyncio.wait_for(self.ranker.version(), self.settings.request_timeout_s + 5.0)
        return {"use_case": self.uc.name, **got, "target_version": self.target_version}

    async def events(self, event: Event) -> EventAck:
        ts = event.timestamp if event.timestamp is not None else now_s()
        problem = self.times.problem(ts)
        if problem is not None:
            raise RequestError(422, problem, "timestamp")
        try:
            n = await asyncio.wait_for(
                self.store.append(event.user_id, event.item_id, event.event_type, ts),
                STORE_TIMEOUT_S,
            )
        except Exception as exc:  # noqa: BLE001 - a 503 naming the store, not a 500
            raise Unavailable("feature_store", f"feature store unavailable: {exc!r}"[:300]) from exc
        outcome = Outcome(
            request_id=event.request_id,
            ts=float(ts),
            use_case=self.name,
            user_id=event.user_id,
            item_id=event.item_id,
            event_type=event.event_type,
        )
        await self._log(outcome)
        return EventAck(user_id=event.user_id, stored_events=n)

    async def put_profile(self, update: ProfileUpdate) -> ProfileAck:
        fields = update.profile.model_dump(exclude_none=True)
        try:
            await asyncio.wait_for(self.store.put_profile(update.user_id, fields), STORE_TIMEOUT_S)
            stored = await asyncio.wait_for(self.store.get_profile(update.user_id), STORE_TIMEOUT_S)
        except Exception as exc:  # noqa: BLE001 - a 503 naming the store, not a 500
            raise Unavailable("feature_store", f"feature store unavailable: {exc!r}"[:300]) from exc
        return ProfileAck(user_id=update.user_id, profile=stored or {})

    # ------------------------------------------------------------------ the request path

    def _validate(self, req: RankRequest) -> None:
        uc = self.uc
        if req.task_type is not None and req.task_type != uc.name:
            known = sorted(self.known_task_types)
            what = (
                "unknown task_type"
                if req.task_type not in self.known_task_types
                else ("wrong endpoint for task_type")
            )
            raise RequestError(
                422,
                f"{what} {req.task_type!r}: this endpoint serves {uc.name!r} (model knows {known})",
                "task_type",
            )
        if req.candidates is not None and len(req.candidates) > uc.max_candidates:
            raise RequestError(
                422,
                f"{len(req.candidates)} candidates, at most {uc.max_candidates} for {uc.name}",
                "candidates",
            )
        if req.candidates is None:
            need = {
                "request": ("candidates", None),
                "popular_by_category": ("category_id", req.category_id),
                "co_occurrence": ("source_item_id", req.source_item_id),
                "inverted_index": ("query_tokens", req.query_tokens),
            }.get(uc.retrieval)
            if need is not None and not need[1]:
                raise RequestError(
                    422, f"{need[0]} is required by the {uc.retrieval} retrieval", need[0]
                )

    async def _user_encoding(self, user_id: int) -> Encoding | None:
        try:
            return await asyncio.wait_for(self.store.get_encoding(user_id), STORE_TIMEOUT_S)
        except Exception:  # noqa: BLE001 - encode on the fly rather than fail
            self.metrics.inc("unirank_errors", kind="feature_store", route="/rank")
            logger.warning("task_type=%s feature store encoding read failed", self.uc.name)
            return None

    async def _user_events(self, user_id: int) -> Events:
        try:
            return await asyncio.wait_for(
                self.store.recent(user_id, self.max_seq_len), STORE_TIMEOUT_S
            )
        except Exception:  # noqa: BLE001 - rank without history rather than fail
            self.metrics.inc("unirank_errors", kind="feature_store", route="/rank")
            logger.warning("task_type=%s feature store read failed", self.uc.name)
            return Events.empty()

    def _retrieve(self, req: RankRequest) -> np.ndarray:
        uc, limit, idx = self.uc, self.uc.max_candidates, self.index
        if req.candidates is not None:
            return np.asarray([c.item_id for c in req.candidates], dtype=np.int64)
        assert idx is not None
        if uc.retrieval == "popular_by_category":
            return idx.popular_in_category(int(req.category_id), limit)
        if uc.retrieval == "co_occurrence":
            return idx.neighbours(int(req.source_item_id), limit)
        if uc.retrieval == "inverted_index":
            return idx.search(req.query_tokens or [], limit)
        if uc.retrieval == "eligible_ads":
            return idx.eligible_ads(req.campaign_ids, limit)
        raise RequestError(422, "candidates are required", "candidates")

    async def _stored_profile(self, user_id: int) -> dict:
        """The user's online profile fields (feature store); {} when none or unreadable."""
        try:
            got = await asyncio.wait_for(self.store.get_profile(user_id), STORE_TIMEOUT_S)
        except Exception:  # noqa: BLE001 - the export's table still answers
            self.metrics.inc("unirank_errors", kind="feature_store", route="/rank")
            logger.warning("task_type=%s feature store profile read failed", self.uc.name)
            return {}
        return got or {}

    async def rank(self, req: RankRequest, rid: str) -> dict[str, Any]:
        uc, t0 = self.uc, time.monotonic()
        self._validate(req)
        events, encoding, online = await asyncio.gather(
            self._user_events(req.user_id),
            self._user_encoding(req.user_id),
            self._stored_profile(req.user_id),
        )
        # the export's profile table < the online profile < the request's own fields
        profile, profile_lists = user_profile(self.profiles, req.user_id, online, req.profile)
        arm = assign_arm(req.user_id, self.experiment) if self.experiment else None
        target = self.target_version
        key = cache_key(req, events, online, arm.name if arm else None, target or "")
        if uc.cache_ttl_s > 0:
            hit = self.cache.get(key)
            if hit is not None:
                self.metrics.inc("unirank_cache_hits")
                resp = {**hit, "request_id": rid, "cached": True}
                await self._exposed(resp, req.user_id, arm, t0)
                return resp
            self.metrics.inc("unirank_cache_misses")

        ids = _unique(self._retrieve(req))[: uc.max_candidates]
        feats, lists = candidate_features(self.index, uc, req, ids)
        ctx = RuleContext(
            use_case=uc,
            seen_item_ids=frozenset(int(x) for x in events.item_ids),
            blocked_item_ids=self.settings.blocked_item_ids | frozenset(req.exclude_item_ids),
            top_k=min(req.top_k or uc.top_k, uc.top_k),
        )
        slate = Slate(ids, feats["category_id"], feats["advertiser_id"])
        slate = self.rules.apply_pre(ctx, slate)
        where = {int(x): i for i, x in enumerate(ids)}
        rows = np.fromiter((where[int(x)] for x in slate.item_id), np.int64, len(slate))
        feats = {k: v[rows] for k, v in feats.items()}  # aligned with the slate
        lists = {k: v.take(rows) for k, v in lists.items()}

        fallback, precomputed, scored_by = None, False, target or ""
        if arm is not None and arm.policy == "popularity":  # the holdout: not personalized
            slate = slate.take(np.argsort(-feats["popularity"], kind="stable"))
            scored_by = HOLDOUT_VERSION
        elif len(slate):
            now = now_s()
            # A stored encoding counts only when fresher than the use-case's limit and no
            # event arrived after it; else the ranker encodes the events on the fly.
            status = "missing"
            if encoding is not None:
                status = encoding.status(now, uc.feature_freshness_s, events)
            inp = RankInput(
                task_type=uc.name,
                now=now,
                user_id=req.user_id,
                candidates={k: v for k, v in feats.items() if k != "popularity"},
                candidate_lists=lists,
                profile=profile,
                profile_lists=profile_lists,
                events=events,
                source_item_id=req.source_item_id or 0,
                query_tokens=np.asarray(req.query_tokens or [], dtype=np.int64),
                device=req.context.device,
                hour=req.context.hour if req.context.hour is not None else (now % 86400) // 3600,
                surface=req.context.surface,
                encoding=encoding if status == "fresh" else None,
                encoding_status=status,
                arm=arm.name if arm is not None and arm.model_uri else None,
            )
            try:
                out = await self._call_ranker(inp)
                precomputed = str(out.get("__encoding__", "")) == "precomputed"
                scored_by = str(out.get(VERSION_KEY, ""))
                probs = {k: v for k, v in out.items() if not k.startswith("__")}
                slate = sort_by_score(with_scores(slate, out["__score__"], probs))
            except (TimeoutError, _RankerFailed) as exc:
                kind = "timeout" if isinstance(exc, TimeoutError) else exc.kind
                reason = "timeout" if kind == "timeout" else "model_error"
                if uc.fallback == "none":
                    raise Unavailable(kind, f"ranker unavailable ({kind}), no fallback") from None
                fallback = Fallback(policy=uc.fallback, reason=reason)
                self.metrics.inc("unirank_fallbacks", reason=reason)
                self.metrics.inc("unirank_errors", kind=kind, route="/rank")
                logger.warning(
                    "task_type=%s request_id=%s fallback=%s reason=%s kind=%s",
                    uc.name,
                    rid,
                    uc.fallback,
                    reason,
                    kind,
                )
                order = np.argsort(-feats["popularity"], kind="stable")
                slate = slate.take(order)
        num_candidates = len(slate)
        slate = self.rules.apply_post(ctx, slate)
        if fallback is None and slate.score is not None:
            self.metrics.observe_many("unirank_scores", slate.score)
        self.metrics.observe("unirank_candidates", num_candidates)
        resp = RankResponse(
            request_id=rid,
            use_case=uc.name,
            model_version=scored_by,
            items=_items(slate),
            num_candidates=num_candidates,
            fallback=fallback,
            used_precomputed_encoding=precomputed,
            experiment=self.experiment.id if arm is not None else None,
            arm=arm.name if arm is not None else None,
        ).model_dump()
        # mid-rollout answers of the old version are not cached; a holdout's always can be
        if fallback is None and (target in (None, scored_by) or scored_by == HOLDOUT_VERSION):
            self.cache.put(key, resp)
        await self._exposed(resp, req.user_id, arm, t0)
        return resp

    async def _exposed(self, resp: dict, user_id: int, arm: ArmConfig | None, t0: float) -> None:
        """A response is about to be shown: log the exposure, count it per arm."""
        await self._log(self._exposure(resp, user_id, arm))
        if arm is not None:
            tags = {"experiment": self.experiment.id, "arm": arm.name}
            ms = (time.monotonic() - t0) * 1e3
            self.metrics.inc("unirank_experiment_exposures", **tags)
            self.metrics.observe("unirank_experiment_latency_ms", ms, **tags)

    def _exposure(self, resp: dict[str, Any], user_id: int, arm: ArmConfig | None) -> Exposure:
        items = resp["items"]
        fallback = resp.get("fallback")
        scored = not fallback and all(i["score"] is not None for i in items)
        return Exposure(
            request_id=resp["request_id"],
            ts=time.time(),
            use_case=self.name,
            user_id=user_id,
            model_version=resp["model_version"],
            items=[int(i["item_id"]) for i in items],
            scores=[float(i["score"]) for i in items] if scored else None,
            fallback=fallback["reason"] if fallback else None,
            experiment=resp.get("experiment"),
            arm=resp.get("arm"),
            propensity=arm.share if arm is not None else 1.0,
        )

    async def _log(self, record: Exposure | Outcome) -> None:
        """Append to the exposure log; a log that is down is counted, never fatal."""
        if self.log is None:
            return
        try:
            await asyncio.wait_for(self.log.append(record), STORE_TIMEOUT_S)
        except Exception as exc:  # noqa: BLE001 - serving goes on without the log
            self.metrics.inc("unirank_errors", kind="exposure_log", route=f"/{record.kind}")
            logger.warning("task_type=%s exposure log write failed: %r", self.name, exc)

    async def _call_ranker(self, inp: RankInput) -> dict[str, np.ndarray]:
        """The ranker's answer for this request; raises TimeoutError past the deadline and
        _RankerFailed when it failed, refused the input or returned a non-finite value."""
        try:
            out = await self.ranker.rank(inp, self.settings.request_timeout_s)
        except TimeoutError:
            raise
        except Exception as exc:  # noqa: BLE001 - any ranker failure means fallback
            logger.warning("task_type=%s ranker failed: %s", self.uc.name, exc)
            raise _RankerFailed("model_error", str(exc)) from exc
        if ERROR_KEY in out:
            detail = str(out[ERROR_KEY])
            raise _RankerFailed(detail.split(":")[0], detail)
        if not all(
            np.isfinite(np.asarray(v, dtype=np.float64)).all()
            for k, v in out.items()
            if not k.startswith("__") or k == "__score__"
        ):
            raise _RankerFailed("non_finite_score")
        return out


@serve.deployment(name=INGRESS_DEPLOYMENT)
@serve.ingress()
class UseCaseIngress:
    """The Serve deployment: an IngressCore over the Ranker's handle; each replica serves
    its own FastAPI app (``__serve_build_asgi_app__``, called after ``__init__``)."""

    _load_index = staticmethod(load_index)

    def __init__(self, ranker: DeploymentHandle, args: dict):
        self.core = IngressCore(AppSettings.from_args(args), HandleRanker(ranker))

    def reconfigure(self, config: dict) -> None:
        """The app's rollout (the same user_config as the ranker's): keys the cache; and the
        running experiment's arms and shares, changed live (serve_apps.experiments apply)."""
        _, self.core.target_version = parse_rollout(config)
        experiment = parse_experiment(config)
        if experiment is not None:
            self.core.experiment = experiment

    def __serve_build_asgi_app__(self):
        return build_api(self.core)
