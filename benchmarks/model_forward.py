"""Forward throughput of the unirank ensemble: eager fp32 vs TorchScript fp32 vs bf16.

    python benchmarks/model_forward.py [--quick] [--threads N] [--config configs/x.yaml]

Prints one JSON line:
* examples/s at batch sizes 64, 512, 4096 for eager fp32, TorchScript fp32 and reduced
  precision (TorchScript with the heavy layers in bf16), with ratios against eager fp32;
* the forward cost of each backbone alone (module only, and a whole model built with only
  that backbone) next to the full ensemble, so the ensemble's overhead is visible;
* parameter counts per module; FeatureProcessor rows/s for the same config.

Inputs are random columns of the unified schema (the model's speed does not depend on signal).
On a CPU without bf16 units reduced precision is expected to be slower: it is a GPU feature.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import torch  # noqa: E402

from benchmarks._util import emit  # noqa: E402
from model.config import UnirankConfig, load_config  # noqa: E402
from model.ensemble import build_model  # noqa: E402
from model.export import make_predictor, script_predictor  # noqa: E402
from model.features import FeatureProcessor  # noqa: E402

BATCH_SIZES = [64, 512, 4096]
T0 = 1_767_225_600


def random_columns(cfg: UnirankConfig, n: int, seed: int = 0) -> dict:
    """A dict of numpy columns (Ray Data batch format) covering the config's feature spec."""
    rng = np.random.default_rng(seed)
    f = cfg.dataset.features
    cols: dict = {}
    for c in f.categorical:
        if c.multi:
            cols[c.name] = [rng.integers(1, 10**6, size=rng.integers(0, 6)) for _ in range(n)]
        else:
            hi = c.vocab_size if c.vocab_size is not None else 10**12
            cols[c.name] = rng.integers(0, hi, size=n)
    for num in f.numeric:
        cols[num.name] = rng.lognormal(2.0, 1.0, size=n).astype(np.float32)
    if f.sequence is not None:
        s = f.sequence
        lengths = rng.integers(0, 2 * s.max_len, size=n)
        cols[s.item_column] = [rng.integers(1, 10**12, size=k) for k in lengths]
        if s.event_type_column:
            cols[s.event_type_column] = [
                rng.integers(0, s.num_event_types, size=k) for k in lengths
            ]
        if s.timestamp_column:
            cols[s.timestamp_column] = [
                np.sort(T0 - rng.integers(0, 30 * 86400, size=k)) for k in lengths
            ]
    if f.time_column:
        cols[f.time_column] = np.full(n, T0, dtype=np.int64)
    if f.task_type_column:
        cols[f.task_type_column] = rng.choice(cfg.dataset.task_types, size=n).astype(object)
    for t in cfg.dataset.tasks:
        cols[t.column] = (rng.random(n) < 0.1).astype(np.float32)
    return cols


def timed(fns: dict, budget_s: float, min_rounds: int = 3, max_rounds: int = 200) -> dict:
    """Median seconds per call of each function.

    Calls alternate round-robin (one call of each per round) so a burst of load from another
    process hits every variant alike and the ratios stay fair on a shared machine.
    """
    for fn in fns.values():  # warm-up (TorchScript profiling runs, allocator)
        fn()
        fn()
    times: dict = {k: [] for k in fns}
    start = time.perf_counter()
    rounds = 0
    while rounds < min_rounds or (
        time.perf_counter() - start < budget_s * len(fns) and rounds < max_rounds
    ):
        for k, fn in fns.items():
            t = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t)
        rounds += 1
    return {k: float(np.median(v)) for k, v in times.items()}


def field_inputs(model, inputs: tuple) -> tuple:
    """``Batch.inputs()`` (forward's arguments) -> ``UnirankModel.fields``' arguments: the
    sequence goes through ``encode_user`` first, one encoded row per example."""
    sparse, multi, dense, seq_items, seq_types, seq_gaps, seq_mask, task_type = inputs
    user_h = model.encode_user(seq_items, seq_types, seq_gaps, seq_mask)  # (B, L, D)
    return sparse, multi, dense, user_h, None, seq_gaps, seq_mask, task_type


def flat_input(model, fields: torch.Tensor) -> torch.Tensor:
    """The flat (B, K*D [+ P]) input of the bottom MLP and backbones, as ``forward_encoded``
    builds it (with the pairwise dot products when model.dot_interaction is on)."""
    flat = fields.flatten(1)
    if model.dot_interaction:
        gram = torch.bmm(fields, fields.transpose(1, 2))  # (B, K, K)
        flat = torch.cat([flat, gram[:, model.dot_left, model.dot_right]], 1)
    return flat


def param_counts(model: torch.nn.Module) -> dict[str, int]:
    out = {}
    for name, child in model.named_children():
        if name == "backbones":
            for bname, bb in zip(model.backbone_names, child, strict=True):
                out[f"backbones.{bname}"] = sum(p.numel() for p in bb.parameters())
        elif child is not None:
            out[name] = sum(p.numel() for p in child.parameters())
    out["total"] = sum(p.numel() for p in model.parameters())
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="smaller time budget per measurement")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    ap.add_argument("--config", default=None, help="a configs/*.yaml (default: built-in)")
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    budget = 0.1 if args.quick else 1.0  # seconds per variant per measurement
    cfg = load_config(args.config)
    proc = FeatureProcessor(cfg.dataset)
    big = random_columns(cfg, max(BATCH_SIZES), seed=1)
    proc.fit([big])
    many = random_columns(cfg, 20_000, seed=2)
    as_arrow = pa.Table.from_pydict(
        {k: pa.array(list(v)) if isinstance(v, list) else pa.array(v) for k, v in many.items()}
    )
    rates = timed({"numpy_dict": lambda: proc(many), "arrow": lambda: proc(as_arrow)}, budget)
    proc_rate = {k: round(20_000 / v) for k, v in rates.items()}

    model = build_model(cfg).eval()
    eager = make_predictor(model, cfg, "fp32")
    variants = {
        "eager_fp32": eager,
        "torchscript_fp32": script_predictor(model, cfg, "fp32"),
        "torchscript_bf16": script_predictor(model, cfg, "bf16"),
    }
    throughput: dict[str, dict[str, float]] = {}
    with torch.inference_mode():
        for bs in BATCH_SIZES:
            batch = proc({k: v[:bs] for k, v in big.items()})
            inputs = batch.inputs()
            secs = timed(
                {name: (lambda fn=fn, inputs=inputs: fn(*inputs)) for name, fn in variants.items()},
                budget,
            )
            row = {name: bs / sec for name, sec in secs.items()}
            for name in ("torchscript_fp32", "torchscript_bf16"):
                row[f"{name}_vs_eager"] = row[name] / row["eager_fp32"]
            throughput[str(bs)] = {k: round(v, 3 if "_vs_" in k else 1) for k, v in row.items()}

        # Cost of each piece at batch 512, eager fp32: the fields (embeddings + sequence
        # encoder), each backbone module on those fields, and whole single-backbone models.
        bs = 512
        batch = proc({k: v[:bs] for k, v in big.items()})
        inputs = batch.inputs()
        fields = model.fields(*field_inputs(model, inputs))
        flat = flat_input(model, fields)
        fns = {
            "sequence_encoder_ms": lambda: model.encode_user(*inputs[3:7]),
            "fields_embeddings_and_sequence_ms": lambda: model.fields(*field_inputs(model, inputs)),
            "bottom_ms": lambda: model.bottom(flat),
            "full_ensemble_ms": lambda: model(*inputs),
        }
        for name, bb in zip(model.backbone_names, model.backbones, strict=True):
            fns[f"backbone_{name}_module_ms"] = lambda bb=bb: bb(fields, flat)
        for name in ["cross", "attention", "masknet"]:
            alone_cfg = cfg.model_copy(deep=True)
            alone_cfg.model.backbones = [name]
            alone = build_model(alone_cfg).eval()
            fns[f"model_with_only_{name}_ms"] = lambda m=alone: m(*inputs)
        pieces = {k: round(1e3 * v, 3) for k, v in timed(fns, budget / 2).items()}

    emit(
        {
            "benchmark": "model_forward",
            "quick": args.quick,
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "backbones": cfg.model.backbones,
            "fusion": cfg.model.fusion,
            "experts": cfg.model.experts.kind,
            "examples_per_s": throughput,
            "cost_at_batch_512": pieces,
            "params": param_counts(model),
            "feature_processor_rows_per_s": proc_rate,
        }
    )


if __name__ == "__main__":
    main()
