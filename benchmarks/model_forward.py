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
import json
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import torch  # noqa: E402

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


def timed(fn, budget_s: float, min_iters: int = 2, max_iters: int = 200) -> float:
    """Seconds per call: one warm-up call, then repeat until the time budget is spent."""
    fn()
    times = []
    start = time.perf_counter()
    while len(times) < min_iters or (
        time.perf_counter() - start < budget_s and len(times) < max_iters
    ):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return float(np.median(times))


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
    budget = 0.3 if args.quick else 1.5
    cfg = load_config(args.config)
    proc = FeatureProcessor(cfg.dataset)
    big = random_columns(cfg, max(BATCH_SIZES), seed=1)
    proc.fit([big])
    many = random_columns(cfg, 20_000, seed=2)
    as_arrow = pa.Table.from_pydict(
        {k: pa.array(list(v)) if isinstance(v, list) else pa.array(v) for k, v in many.items()}
    )
    proc_rate = {
        "numpy_dict": round(20_000 / timed(lambda: proc(many), budget)),
        "arrow": round(20_000 / timed(lambda: proc(as_arrow), budget)),
    }

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
            row = {}
            for name, fn in variants.items():
                row[name] = bs / timed(lambda fn=fn, inputs=inputs: fn(*inputs), budget)
            for name in ("torchscript_fp32", "torchscript_bf16"):
                row[f"{name}_vs_eager"] = row[name] / row["eager_fp32"]
            throughput[str(bs)] = {k: round(v, 3 if "_vs_" in k else 1) for k, v in row.items()}

        # Cost of each piece at batch 512, eager fp32: the fields (embeddings + sequence
        # encoder), each backbone module on those fields, and whole single-backbone models.
        bs = 512
        batch = proc({k: v[:bs] for k, v in big.items()})
        inputs = batch.inputs()
        fields = model.fields(*inputs)
        flat = fields.flatten(1)
        ms = lambda s: round(1e3 * s, 3)  # noqa: E731
        pieces = {
            "fields_embeddings_and_sequence_ms": ms(timed(lambda: model.fields(*inputs), budget)),
            "bottom_ms": ms(timed(lambda: model.bottom(flat), budget)),
            "full_ensemble_ms": ms(timed(lambda: model(*inputs), budget)),
        }
        for name, bb in zip(model.backbone_names, model.backbones, strict=True):
            pieces[f"backbone_{name}_module_ms"] = ms(timed(lambda bb=bb: bb(fields, flat), budget))
        for name in ["cross", "attention", "masknet"]:
            alone_cfg = cfg.model_copy(deep=True)
            alone_cfg.model.backbones = [name]
            alone = build_model(alone_cfg).eval()
            pieces[f"model_with_only_{name}_ms"] = ms(timed(lambda m=alone: m(*inputs), budget))

    print(
        json.dumps(
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
    )


if __name__ == "__main__":
    main()
