"""User-sequence encoder: transformer over prior events + recency-aware candidate attention.

Tokens are item + event type + time-since-event bucket + position-from-newest embeddings.
Sequences arrive left-padded (newest event at L-1, see model.features.pad_lists).

Why the pieces:
* log-spaced time-gap buckets: "5 min ago" vs "1 h ago" matters, "20 vs 21 days" does not;
* a learned recency bias per time bucket is added to the pooling scores (initialized
  decreasing), so temporally closer events count more unless the data says otherwise;
* candidate-aware pooling (DIN-style): the candidate item's embedding is the query, so the
  user vector depends on which of the user's events are relevant to this candidate.

Two halves: ``encode`` (the transformer, candidate-independent: once per user, or
precomputed offline) and ``pool`` (target attention + recency, per candidate, online).
``forward`` is ``pool(encode(...))``.

Padding never changes the output: real queries attend to real keys only, padded positions
get zero pooling weight, and a sequence with no events pools to exactly zero (never NaN).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from model.modules.transformer import TransformerStack

MIN_GAP_S = 60.0  # everything under a minute is "now"
MAX_GAP_S = 365 * 86400.0  # everything over a year is "long ago"


class TimeBuckets(nn.Module):
    """Seconds since an event -> bucket in [0, num_buckets), log-spaced between 1 min and 1 y."""

    def __init__(self, num_buckets: int):
        super().__init__()
        edges = torch.logspace(
            math.log10(MIN_GAP_S), math.log10(MAX_GAP_S), steps=num_buckets - 1
        )  # (nb - 1,)
        self.register_buffer("edges", edges)

    def forward(self, gaps: torch.Tensor) -> torch.Tensor:  # (B, L) float -> (B, L) long
        return torch.bucketize(gaps.contiguous(), self.edges)


class SequenceEncoder(nn.Module):
    def __init__(
        self,
        dim: int,
        max_len: int,
        num_event_types: int,
        num_layers: int,
        num_heads: int,
        time_buckets: int,
        recency_bias: bool,
        candidate_attention: bool,
        dropout: float = 0.0,
    ):
        super().__init__()
        self.dim = dim
        self.time_buckets = TimeBuckets(time_buckets)
        self.event_emb = nn.Embedding(num_event_types, dim)
        self.time_emb = nn.Embedding(time_buckets, dim)
        self.pos_emb = nn.Embedding(max_len, dim)  # index = distance from the newest slot
        for emb in (self.event_emb, self.time_emb, self.pos_emb):
            nn.init.normal_(emb.weight, std=0.05)
        self.stack = TransformerStack(dim, num_layers, num_heads, dropout)
        self.norm = nn.LayerNorm(dim)
        self.key = nn.Linear(dim, dim)
        self.candidate_attention = candidate_attention
        # candidate embedding -> query; without candidate attention it sees zeros, so its bias
        # is a learned candidate-free query (and no parameter is left unused under DDP).
        self.query = nn.Linear(dim, dim)
        self.recency = nn.Embedding(time_buckets, 1) if recency_bias else None
        if self.recency is not None:
            with torch.no_grad():  # prior: newer is more relevant; learning may overrule it
                self.recency.weight.copy_(torch.linspace(0.0, -2.0, time_buckets).unsqueeze(-1))

    def encode(
        self,
        items: torch.Tensor,  # (B, L, D) item embeddings (shared item table)
        types: torch.Tensor,  # (B, L) long
        gaps: torch.Tensor,  # (B, L) float seconds
        mask: torch.Tensor,  # (B, L) bool, True = real event
    ) -> torch.Tensor:  # (B, L, D) contextualised events
        """The expensive, candidate-independent half: the transformer over the events.

        Depends on the user's events and on ``gaps`` (their age at encoding time) only, so it
        can be computed once per user (per request, or offline by ray_jobs.user_embeddings)
        and reused for every candidate.
        """
        length = mask.shape[1]
        bucket = self.time_buckets(gaps)  # (B, L)
        pos = torch.arange(length - 1, -1, -1, device=items.device)  # (L,) distance from newest
        x = items + self.event_emb(types) + self.time_emb(bucket) + self.pos_emb(pos)  # (B, L, D)
        # Query q may attend to key k if k is a real event; q==k is always allowed so that a
        # padded query has a non-empty row (else softmax over nothing = NaN). Padded queries'
        # outputs are garbage but never read: real queries cannot see them, pooling drops them.
        eye = torch.eye(length, dtype=torch.bool, device=mask.device)  # (L, L)
        allowed = (mask.unsqueeze(1) | eye).unsqueeze(1)  # (B, 1, L, L)
        return self.norm(self.stack(x, allowed))  # (B, L, D)

    def pool(
        self,
        h: torch.Tensor,  # (U, L, D) from encode(), one row per user
        gaps: torch.Tensor,  # (B, L) float seconds, age of each event *now*
        mask: torch.Tensor,  # (B, L) bool, True = real event
        candidate: torch.Tensor,  # (B, D) candidate item embedding
        user_index: torch.Tensor | None = None,  # (B,) long: row of ``h`` per candidate row
    ) -> torch.Tensor:  # (B, D) user vector
        """The cheap, candidate-aware half: recency-biased target attention over ``h``.

        Runs online: the recency bias uses the events' age at request time, and the
        candidate is the query. ``user_index`` None: ``h`` already has one row per candidate.
        """
        if not self.candidate_attention:
            candidate = torch.zeros_like(candidate)
        q = self.query(candidate)  # (B, D)
        keys = self.key(h)  # (U, L, D): once per user, not per candidate
        if user_index is not None:
            keys, h = keys[user_index], h[user_index]  # (B, L, D)
        scores = (keys * q.unsqueeze(1)).sum(-1) / math.sqrt(self.dim)  # (B, L)
        if self.recency is not None:
            scores = scores + self.recency(self.time_buckets(gaps)).squeeze(-1)
        scores = scores.float().masked_fill(~mask, -1e4)
        w = torch.softmax(scores, dim=-1) * mask.float()  # (B, L), exactly 0 on padding
        w = w / w.sum(-1, keepdim=True).clamp_min(1e-6)  # all-padding row -> all zeros
        return (w.unsqueeze(-1) * h).sum(1)  # (B, D)

    def forward(
        self,
        items: torch.Tensor,  # (B, L, D) item embeddings (shared item table)
        types: torch.Tensor,  # (B, L) long
        gaps: torch.Tensor,  # (B, L) float seconds
        mask: torch.Tensor,  # (B, L) bool, True = real event
        candidate: torch.Tensor,  # (B, D) candidate item embedding
    ) -> torch.Tensor:  # (B, D) user vector
        return self.pool(self.encode(items, types, gaps, mask), gaps, mask, candidate)
