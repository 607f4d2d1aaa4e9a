"""The unirank multi-task ensemble: config -> modules, and its optimizer parameter groups.

    fields (B, K, D) = [categorical ids | list ids pooled | task_type | numerics | user vector]
    shared = bottom MLP(flat fields)                               # (B, H)
    backbone_e(fields, flat) for e in {cross, attention, masknet}  # E x (B, H)
    fused = fusion(backbones, shared, task_type)                   # (B, H)
    per-task inputs = experts([shared, fused])                     # T x (B, He)
    logits = towers(per-task inputs)                               # {task: (B,)}

``forward`` = ``forward_encoded(encode_user(sequence))``: serving encodes a user's sequence
once per request (or reads it precomputed) and scores every candidate against it.
``forward`` returns logits only; losses.py adds the loss for training, export.py adds sigmoid
+ calibration for serving. Adding a task or a use-case (task_type) is config only.
"""

import torch
from torch import nn

from model.config import ModelConfig, UnirankConfig
from model.features import FeatureLayout, feature_layout
from model.modules.attention import FieldAttention
from model.modules.cross import CrossNetV2
from model.modules.embeddings import FusedEmbeddings, NumericEmbedding
from model.modules.experts import PLE, MMoE, NoExperts
from model.modules.fusion import AverageFusion, BlendFusion, GatingFusion
from model.modules.masknet import MaskNet
from model.modules.mlp import MLP
from model.modules.sequence import SequenceEncoder
from model.modules.towers import Towers

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class UnirankModel(nn.Module):
    backbone_names: list[str]  # class-level: TorchScript needs the type even when empty
    task_names: list[str]  # class-level: TorchScript needs the type even when empty

    def __init__(
        self,
        embeddings: FusedEmbeddings,
        numeric: NumericEmbedding | None,
        task_type_emb: nn.Embedding,
        sequence: SequenceEncoder | None,
        candidate_index: int,
        bottom: MLP,
        backbones: nn.ModuleDict,
        fusion: nn.Module,
        experts: nn.Module,
        towers: Towers,
        dot_fields: int = 0,
    ):
        super().__init__()
        self.embeddings = embeddings
        self.numeric = numeric
        self.task_type_emb = task_type_emb
        self.sequence = sequence
        self.candidate_index = candidate_index  # column of the candidate item in Batch.sparse
        self.bottom = bottom
        self.backbone_names = list(backbones.keys())
        self.backbones = nn.ModuleList(list(backbones.values()))
        self.fusion = fusion
        self.experts = experts
        self.towers = towers
        self.task_names = list(towers.task_names)
        # Upper triangle of the (K, K) field Gram matrix: the pairs whose dot products are
        # appended to the flat input (model.dot_interaction): K = dot_fields, 0 = off.
        # Not persistent: derived from the config, and checkpoints saved without them load.
        left, right = torch.triu_indices(dot_fields, dot_fields, offset=1)
        self.dot_interaction = dot_fields > 0
        self.register_buffer("dot_left", left, persistent=False)
        self.register_buffer("dot_right", right, persistent=False)

    def encode_user(
        self,
        seq_items: torch.Tensor,
        seq_types: torch.Tensor,
        seq_gaps: torch.Tensor,
        seq_mask: torch.Tensor,
    ) -> torch.Tensor:
        """The user's events through the sequence transformer: (U, L, D), one row per user.

        Candidate-independent, so serving runs it once per user (or reads it precomputed,
        ray_jobs.user_embeddings) and passes it to ``forward_encoded``. Without a sequence
        encoder: (U, L, 0).
        """
        if self.sequence is None:
            return torch.zeros(seq_mask.shape[0], seq_mask.shape[1], 0, device=seq_mask.device)
        items = self.embeddings.sequence(seq_items)  # (U, L, D)
        return self.sequence.encode(items, seq_types, seq_gaps, seq_mask)  # (U, L, D)

    def fields(
        self,
        sparse: torch.Tensor,
        multi: dict[str, torch.Tensor],
        dense: torch.Tensor,
        user_h: torch.Tensor,
        user_index: torch.Tensor | None,
        seq_gaps: torch.Tensor,
        seq_mask: torch.Tensor,
        task_type: torch.Tensor,
    ) -> torch.Tensor:
        """Every input as a field embedding: (B, K, D). ``user_h`` is ``encode_user``'s output
        (U, L, D); ``user_index`` (B,) its row per example (None: one row per example)."""
        cat = self.embeddings.sparse(sparse)  # (B, F, D)
        parts = [cat]
        for pooled in self.embeddings.pooled(multi):
            parts.append(pooled.unsqueeze(1))  # (B, 1, D)
        parts.append(self.task_type_emb(task_type).unsqueeze(1))  # (B, 1, D)
        if self.numeric is not None:
            parts.append(self.numeric(dense))  # (B, N, D)
        if self.sequence is not None:
            if self.candidate_index >= 0:
                candidate = cat[:, self.candidate_index]  # (B, D)
            else:
                candidate = torch.zeros_like(cat[:, 0])
            user = self.sequence.pool(user_h, seq_gaps, seq_mask, candidate, user_index)  # (B, D)
            parts.append(user.unsqueeze(1))
        return torch.cat(parts, 1)  # (B, K, D)

    def forward_encoded(
        self,
        sparse: torch.Tensor,
        multi: dict[str, torch.Tensor],
        dense: torch.Tensor,
        user_h: torch.Tensor,
        user_index: torch.Tensor | None,
        seq_gaps: torch.Tensor,
        seq_mask: torch.Tensor,
        task_type: torch.Tensor,
    ) -> dict[str, torch.Tensor]:
        """``forward`` with the user's sequence already encoded (``encode_user``).

        ``seq_gaps`` / ``seq_mask`` (B, L) describe the encoded events at request time: the
        gaps drive the recency bias, the mask which positions of ``user_h`` are events.
        """
        fields = self.fields(
            sparse, multi, dense, user_h, user_index, seq_gaps, seq_mask, task_type
        )  # (B, K, D)
        flat = fields.flatten(1)  # (B, K*D)
        if self.dot_interaction:
            gram = torch.bmm(fields, fields.transpose(1, 2))  # (B, K, K)
            flat = torch.cat([flat, gram[:, self.dot_left, self.dot_right]], 1)  # (B, K*D + P)
        shared = self.bottom(flat)  # (B, H)
        outs: list[torch.Tensor] = []
        for backbone in self.backbones:
            outs.append(backbone(fields, flat))  # (B, H)
        fused = self.fusion(outs, shared, self.task_type_emb(task_type))  # (B, H)
        per_task = self.experts(torch.cat([shared, fused], -1))  # T x (B, He)
        return self.towers(per_task)  # {task: (B,)}

    def forward(
        self,
        sparse: torch.Tensor,
        multi: dict[str, torch.Tensor],
        dense: torch.Tensor,
        seq_items: torch.Tensor,
        seq_types: torch.Tensor,
        seq_gaps: torch.Tensor,
        seq_mask: torch.Tensor,
        task_type: torch.Tensor,
    ) -> dict[str, torch.Tensor]:
        user_h = self.encode_user(seq_items, seq_types, seq_gaps, seq_mask)  # (B, L, D)
        return self.forward_encoded(
            sparse, multi, dense, user_h, None, seq_gaps, seq_mask, task_type
        )


# --------------------------------------------------------------------------- builder


def build_backbone(
    name: str, m: ModelConfig, num_fields: int, flat_dim: int, out_dim: int
) -> nn.Module:
    d = m.embedding_dim
    if name == "cross":
        return CrossNetV2(flat_dim, m.cross.num_layers, m.cross.low_rank, out_dim)
    if name == "attention":
        return FieldAttention(
            num_fields, d, m.attention.num_layers, m.attention.num_heads, out_dim, m.dropout
        )
    if name == "masknet":
        return MaskNet(flat_dim, m.masknet.num_blocks, m.masknet.reduction, out_dim)
    raise ValueError(f"model.backbones: unknown backbone {name!r}")


def build_fusion(kind: str, num: int, shared_dim: int, task_dim: int) -> nn.Module:
    if kind == "average":
        return AverageFusion()
    if kind == "gating":
        return GatingFusion(num, shared_dim, task_dim)
    if kind == "blend":
        return BlendFusion(num)
    raise ValueError(f"model.fusion: unknown fusion {kind!r}")


def build_experts(m: ModelConfig, in_dim: int, num_tasks: int) -> nn.Module:
    e = m.experts
    if e.kind == "none":
        return NoExperts(in_dim, num_tasks)
    if e.kind == "mmoe":
        return MMoE(in_dim, e.num_experts, e.hidden, num_tasks, m.dropout)
    if e.kind == "ple":
        return PLE(in_dim, e.num_experts, e.num_shared, e.hidden, num_tasks, m.dropout)
    raise ValueError(f"model.experts.kind: unknown kind {e.kind!r}")


def num_fields(layout: FeatureLayout, sequence_on: bool) -> int:
    return (
        len(layout.sparse_names)
        + len(layout.multi_names)
        + 1  # task_type
        + len(layout.numeric_names)
        + (1 if sequence_on else 0)
    )


def build_model(cfg: UnirankConfig, sparse_embeddings: bool = False) -> UnirankModel:
    """Map the resolved config to modules. Always fp32; see set_precision for serving.

    ``sparse_embeddings`` makes the big fused id table produce sparse gradients (the training
    job then steps param_groups' "embeddings" group with SparseAdam, the rest with Adam).
    """
    m, lay = cfg.model, feature_layout(cfg.dataset)
    d = m.embedding_dim
    embeddings = FusedEmbeddings(
        lay.table_rows,
        [lay.table_of[n] for n in lay.sparse_names],
        lay.multi_names,
        [lay.table_of[n] for n in lay.multi_names],
        lay.seq_table,
        d,
        sparse=sparse_embeddings,
    )
    sequence_on = m.sequence.enabled and lay.seq_len > 0
    sequence = None
    if sequence_on:
        s = m.sequence
        sequence = SequenceEncoder(
            d,
            lay.seq_len,
            lay.num_event_types,
            s.num_layers,
            s.num_heads,
            s.time_buckets,
            s.recency_bias,
            s.candidate_attention,
            m.dropout,
        )
    # The candidate item is the sparse feature that owns the sequence's table (item_id).
    candidate_index = (
        lay.sparse_names.index(lay.seq_table) if lay.seq_table in lay.sparse_names else -1
    )
    k = num_fields(lay, sequence_on)
    flat_dim = k * d + (k * (k - 1) // 2 if m.dot_interaction else 0)
    bottom = MLP(flat_dim, m.bottom_dims, m.dropout)
    h = bottom.out_dim
    backbones = nn.ModuleDict(
        {name: build_backbone(name, m, k, flat_dim, h) for name in m.backbones}
    )
    fusion = build_fusion(m.fusion, len(backbones), h, d)
    experts = build_experts(m, 2 * h, len(lay.task_names))
    towers = Towers(experts.out_dim, m.tower_dims, lay.task_names, m.dropout)
    return UnirankModel(
        embeddings=embeddings,
        numeric=NumericEmbedding(len(lay.numeric_names), d) if lay.numeric_names else None,
        task_type_emb=nn.Embedding(len(lay.task_types), d),
        sequence=sequence,
        candidate_index=candidate_index,
        bottom=bottom,
        backbones=backbones,
        fusion=fusion,
        experts=experts,
        towers=towers,
        dot_fields=k if m.dot_interaction else 0,
    )


# --------------------------------------------------------------------------- precision


def set_precision(model: nn.Module, precision: str) -> nn.Module:
    """Run the heavy layers (cross net, transformers, MaskNet) in fp32 / bf16 / fp16, in place.

    Embeddings, towers and the loss-facing logits stay fp32: the heavy layers are where
    reduced precision buys speed on a GPU, the rest is cheap and precision-sensitive.
    For inference only; training uses autocast on fp32 weights instead.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {sorted(PRECISIONS)}, got {precision!r}")
    dtype = PRECISIONS[precision]
    for module in model.modules():
        if getattr(type(module), "heavy", False):
            module.to(dtype)
            module.compute_dtype = dtype
    return model


# --------------------------------------------------------------------------- optimizer groups


def param_groups(
    model: nn.Module,
    weight_decay: float,
    embedding_lr: float | None = None,
    embedding_weight_decay: float = 0.0,
) -> list[dict]:
    """Optimizer parameter groups: decay only on weight matrices.

    No decay on norms and biases. Embeddings get ``embedding_weight_decay``, default none: a
    dense optimizer's decay shrinks every row every step, seen or not, so rare ids drift
    towards 0. ``embedding_lr`` sets a separate learning rate for embedding tables (sparse ids
    see few updates); None keeps the optimizer's lr.
    Empty groups are dropped.
    """
    emb_ids, no_decay_ids = set(), set()
    for module in model.modules():
        direct = list(module.parameters(recurse=False))
        if isinstance(module, nn.Embedding):
            emb_ids.update(id(p) for p in direct)
        elif isinstance(module, (nn.LayerNorm, nn.BatchNorm1d, NumericEmbedding)):
            no_decay_ids.update(id(p) for p in direct)
    decay, no_decay, emb = [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if id(p) in emb_ids:
            emb.append(p)
        elif id(p) in no_decay_ids or p.ndim <= 1 or name.endswith("bias"):
            no_decay.append(p)
        else:
            decay.append(p)
    groups = [
        {"params": decay, "weight_decay": weight_decay, "name": "decay"},
        {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"},
        {"params": emb, "weight_decay": embedding_weight_decay, "name": "embeddings"},
    ]
    if embedding_lr is not None:
        groups[2]["lr"] = embedding_lr
    return [g for g in groups if g["params"]]
