"""Business rules: small pluggable functions around the model, chosen per use-case.

A use-case lists rules by name in its config (``rules: [filter_seen, cap_per_advertiser=2]``);
``name=value`` passes one integer argument. ``pre`` rules drop candidates before scoring (the
model never sees them), ``post`` rules reorder / cut the scored slate. ``top_k`` always runs
last. A use-case's ``rules_module`` (a Python module path) may register more rules with
:func:`rule`; importing it is all it takes, and other use-cases are unaffected.

Every rule is ``fn(ctx, slate, arg) -> Slate``; a Slate is parallel arrays, best first after
scoring.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Literal

import numpy as np

from model.config import ConfigError, UseCaseConfig

Stage = Literal["pre", "post"]


@dataclass(frozen=True)
class Slate:
    """Candidates as parallel arrays. ``score`` is None before the model ran."""

    item_id: np.ndarray  # (n,) int64
    category_id: np.ndarray  # (n,) int64
    advertiser_id: np.ndarray  # (n,) int64
    score: np.ndarray | None = None  # (n,) float
    probs: dict[str, np.ndarray] | None = None  # task -> (n,)

    def __len__(self) -> int:
        return len(self.item_id)

    def take(self, idx: np.ndarray) -> Slate:
        """Rows ``idx`` (a bool mask or positions), in that order."""
        return Slate(
            self.item_id[idx],
            self.category_id[idx],
            self.advertiser_id[idx],
            None if self.score is None else self.score[idx],
            None if self.probs is None else {k: v[idx] for k, v in self.probs.items()},
        )


@dataclass(frozen=True)
class RuleContext:
    """What rules may look at besides the slate."""

    use_case: UseCaseConfig
    seen_item_ids: frozenset[int] = frozenset()  # from the user's recent events
    blocked_item_ids: frozenset[int] = frozenset()  # global blocklist + the request's
    top_k: int = 20


RuleFn = Callable[[RuleContext, Slate, "int | None"], Slate]


@dataclass(frozen=True)
class Rule:
    name: str
    stage: Stage
    fn: RuleFn
    default_arg: int | None = None


_RULES: dict[str, Rule] = {}


def rule(name: str, stage: Stage, default_arg: int | None = None):
    """Register ``fn(ctx, slate, arg) -> Slate`` under ``name`` (a decorator)."""

    def deco(fn: RuleFn) -> RuleFn:
        _RULES[name] = Rule(name, stage, fn, default_arg)
        return fn

    return deco


def registered() -> list[str]:
    return sorted(_RULES)


# --------------------------------------------------------------------------- built-in rules


@rule("filter_seen", "pre")
def filter_seen(ctx: RuleContext, slate: Slate, arg: int | None) -> Slate:
    """Drop items the user already had an event with (from the feature store)."""
    if not ctx.seen_item_ids:
        return slate
    return slate.take(~np.isin(slate.item_id, np.fromiter(ctx.seen_item_ids, np.int64)))


@rule("blocked_items", "pre")
def blocked_items(ctx: RuleContext, slate: Slate, arg: int | None) -> Slate:
    """Drop blocked items (global blocklist and the request's ``exclude_item_ids``)."""
    if not ctx.blocked_item_ids:
        return slate
    return slate.take(~np.isin(slate.item_id, np.fromiter(ctx.blocked_item_ids, np.int64)))


def _rank_within(keys: np.ndarray) -> np.ndarray:
    """For each position, how many earlier positions share its key (0 for the first)."""
    order = np.argsort(keys, kind="stable")
    sorted_keys = keys[order]
    start = np.r_[0, np.flatnonzero(sorted_keys[1:] != sorted_keys[:-1]) + 1]
    counts = np.diff(np.r_[start, len(keys)])
    within = np.arange(len(keys)) - np.repeat(start, counts)
    out = np.empty_like(within)
    out[order] = within
    return out


@rule("cap_per_advertiser", "post", default_arg=2)
def cap_per_advertiser(ctx: RuleContext, slate: Slate, arg: int | None) -> Slate:
    """At most ``arg`` items per advertiser, best first; organic items (advertiser 0) pass."""
    if len(slate) == 0:
        return slate
    within = _rank_within(slate.advertiser_id)
    return slate.take((slate.advertiser_id == 0) | (within < arg))


@rule("diversify_category", "post", default_arg=1)
def diversify_category(ctx: RuleContext, slate: Slate, arg: int | None) -> Slate:
    """Interleave categories: the best ``arg`` of every category, then the next ``arg``, ...

    Within a round the model's order is kept, so the top item never moves.
    """
    if len(slate) == 0:
        return slate
    rounds = _rank_within(slate.category_id) // arg
    return slate.take(np.lexsort((np.arange(len(slate)), rounds)))


def top_k(ctx: RuleContext, slate: Slate) -> Slate:
    return slate.take(np.arange(min(ctx.top_k, len(slate))))


# --------------------------------------------------------------------------- per use-case


@dataclass(frozen=True)
class RuleSet:
    """The parsed rules of one use-case."""

    pre: list[tuple[Rule, int | None]] = field(default_factory=list)
    post: list[tuple[Rule, int | None]] = field(default_factory=list)

    def apply_pre(self, ctx: RuleContext, slate: Slate) -> Slate:
        for r, arg in self.pre:
            slate = r.fn(ctx, slate, arg)
        return slate

    def apply_post(self, ctx: RuleContext, slate: Slate) -> Slate:
        """Post rules on a slate sorted best first, then top_k."""
        for r, arg in self.post:
            slate = r.fn(ctx, slate, arg)
        return top_k(ctx, slate)

    @property
    def names(self) -> list[str]:
        return [r.name for r, _ in self.pre + self.post]


def load_rules(uc: UseCaseConfig) -> RuleSet:
    """Import ``uc.rules_module`` (if any) and parse ``uc.rules``; errors name the rule."""
    if uc.rules_module:
        try:
            importlib.import_module(uc.rules_module)
        except ImportError as exc:
            raise ConfigError(
                f"use-case {uc.name!r}: rules_module {uc.rules_module!r} cannot be imported: {exc}"
            ) from None
    out = RuleSet()
    for text in uc.rules:
        name, _, raw = text.partition("=")
        name = name.strip()
        if name not in _RULES:
            raise ConfigError(
                f"use-case {uc.name!r}: rules: unknown rule {name!r}; known: {registered()}"
            )
        r = _RULES[name]
        arg = r.default_arg
        if raw:
            try:
                arg = int(raw)
            except ValueError:
                raise ConfigError(
                    f"use-case {uc.name!r}: rules: {text!r}: argument must be an integer"
                ) from None
            if arg < 1:
                raise ConfigError(f"use-case {uc.name!r}: rules: {text!r}: argument must be >= 1")
        (out.pre if r.stage == "pre" else out.post).append((r, arg))
    return out


def sort_by_score(slate: Slate) -> Slate:
    """Best first; ties keep the retrieval order."""
    assert slate.score is not None
    return slate.take(np.argsort(-slate.score, kind="stable"))


def with_scores(slate: Slate, score: np.ndarray, probs: dict[str, np.ndarray] | None) -> Slate:
    return replace(slate, score=np.asarray(score, dtype=np.float64), probs=probs)
