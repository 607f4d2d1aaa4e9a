"""The per-worker training loop of ``ray_jobs.train``: what every Ray Train worker runs.

    train_func(config)                       # config = TrainLoopConfig(...).to_dict()
      resume: ray.train.get_checkpoint()     # latest checkpoint of this run (retry or rerun)
      or warm start from init weights        # train.init_from (champion / checkpoint)
      model -> DDP (ray.train.torch.prepare_model), AdamW groups, LR schedule
      per epoch:
        train on this worker's streaming shard (iter_torch_batches + FeatureProcessor collate)
        validate on this worker's shard, all-gather predictions, metrics per task x task_type
        early stopping on train.objective (weighted per-task AUC)
        checkpoint (rank 0) + ray.train.report (every rank), MLflow metrics (rank 0)

A checkpoint directory holds everything needed to resume or export (see CHECKPOINT_FILES).
Nothing here knows about the driver: tests and the benchmark call ``train_func`` through a
real TorchTrainer.
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
import time
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import ray
import ray.train
import torch
from ray.data.collate_fn import ArrowBatchCollateFn
from torch import nn

from model.batch import Batch
from model.config import TrainConfig, UnirankConfig
from model.ensemble import build_model, param_groups
from model.features import FeatureProcessor
from model.losses import MultiTaskLoss
from model.metrics import POOLED, evaluate, group_name, within_use_case_objective

log = logging.getLogger("unirank.train")

MODEL_FILE = "model.pt"  # weights after the checkpoint's epoch (resume from here)
BEST_MODEL_FILE = "best_model.pt"  # weights of the best epoch so far (evaluate / export)
OPTIMIZER_FILE = "optimizer.pt"  # optimizer + LR scheduler + AMP scaler state
STATE_FILE = "state.json"  # TrainState: epoch, best metric, history, starts
CONFIG_FILE = "config.yaml"  # the resolved UnirankConfig
PROCESSOR_FILE = "processor.json"  # FeatureProcessor statistics
CHECKPOINT_FILES = (
    MODEL_FILE,
    BEST_MODEL_FILE,
    OPTIMIZER_FILE,
    STATE_FILE,
    CONFIG_FILE,
    PROCESSOR_FILE,
)


# --------------------------------------------------------------------------- state


@dataclass
class TrainState:
    """What a checkpoint remembers besides tensors. ``starts`` lists the epoch each attempt
    (first run, worker-failure retry, rerun) started after: [0] for a run never interrupted."""

    epoch: int = 0  # last completed epoch
    best_objective: float = float("-inf")
    best_epoch: int = 0
    bad_epochs: int = 0  # epochs since the last improvement (early stopping)
    stopped_early: bool = False
    steps: int = 0
    history: list[dict] = field(default_factory=list)
    starts: list[int] = field(default_factory=list)

    def to_json(self) -> str:
        d = asdict(self)
        d["best_objective"] = _finite_or_none(self.best_objective)
        return json.dumps(d, indent=1)

    @classmethod
    def from_json(cls, text: str) -> TrainState:
        d = json.loads(text)
        if d.get("best_objective") is None:
            d["best_objective"] = float("-inf")
        return cls(**d)


def _finite_or_none(x: float) -> float | None:
    return float(x) if x is not None and math.isfinite(x) else None


@dataclass
class TrainLoopConfig:
    """What the driver hands every worker (plain data: it crosses process boundaries)."""

    config: dict  # UnirankConfig.model_dump(mode="json"), paths already absolute
    processor: dict  # FeatureProcessor.state_dict()
    steps_per_epoch: int  # per worker: sizes the LR schedule
    mlflow_run_id: str | None = None
    init_weights: Any = None  # ObjectRef of a state_dict (warm start), or None

    def to_dict(self) -> dict:
        return asdict(self)


# --------------------------------------------------------------------------- pieces


class ProcessorCollate(ArrowBatchCollateFn):
    """Ray Data hands each batch as a pyarrow Table; the one feature path makes it a Batch."""

    def __init__(self, processor: FeatureProcessor, pin_memory: bool = False):
        super().__init__()
        self.processor = processor
        self.pin_memory = pin_memory

    def __call__(self, batch: pa.Table) -> Batch:
        out = self.processor(batch)
        return out._map(torch.Tensor.pin_memory) if self.pin_memory else out


def objective_value(metrics: Mapping[str, Mapping], t: TrainConfig) -> float:
    """``train.objective``: the weighted mean of within-use-case ranking quality (AUC or
    grouped AUC per task x task_type, never the pooled AUC); -inf if no cell is finite."""
    tt_weights = {group_name(k): v for k, v in t.objective_task_types.items()} or None
    return within_use_case_objective(metrics, t.objective, tt_weights, t.objective_metric)


def lr_lambda(t: TrainConfig, total_steps: int):
    """Multiplier of the base LR at a step: linear warm-up, then constant or cosine to 0."""
    warm = t.warmup_steps
    total = max(total_steps, warm + 1)

    def f(step: int) -> float:
        if warm and step < warm:
            return (step + 1) / warm
        if t.lr_schedule == "cosine":
            progress = min(1.0, (step - warm) / max(1, total - warm))
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        return 1.0  # "constant" and "linear_warmup" (constant after the warm-up)

    return f


def build_optimizer(model: nn.Module, t: TrainConfig, total_steps: int):
    groups = param_groups(model, t.weight_decay, t.embedding_lr, t.embedding_weight_decay)
    opt = torch.optim.AdamW(groups, lr=t.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(t, total_steps))
    return opt, sched


def amp_dtype(device: torch.device, enabled: bool) -> torch.dtype | None:
    """Mixed precision on a GPU only: bf16 where supported, else fp16 (with a GradScaler).
    On CPU, bf16 autocast is several times slower than fp32 here (no bf16 units)."""
    if not enabled or device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def state_dict_cpu(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in unwrap(model).state_dict().items()}


def batches(
    shard,
    processor: FeatureProcessor,
    batch_size: int,
    pin_memory: bool,
    prefetch: int = 4,
    shuffle_buffer_rows: int = 0,
    seed: int | None = None,
) -> Iterator[Batch]:
    """One pass over a worker's shard as Batches; collate runs in Ray Data's prefetch thread."""
    return shard.iter_torch_batches(
        batch_size=batch_size,
        collate_fn=ProcessorCollate(processor, pin_memory),
        prefetch_batches=prefetch,
        local_shuffle_buffer_size=shuffle_buffer_rows or None,
        local_shuffle_seed=seed if shuffle_buffer_rows else None,
    )


def timed(it: Iterator[Batch], waits: list[float]) -> Iterator[Batch]:
    """``it``, appending to ``waits`` how long each batch was waited for (input stalls)."""
    it = iter(it)
    while True:
        t0 = time.perf_counter()
        try:
            b = next(it)
        except StopIteration:
            return
        waits.append(time.perf_counter() - t0)
        yield b


# --------------------------------------------------------------------------- validation


def group_column(processor: FeatureProcessor, name: str | None) -> int | None:
    """Index in ``Batch.sparse`` of the grouped-AUC feature (``evaluate.group_by``), if any."""
    names = processor.layout.sparse_names
    return names.index(name) if name is not None and name in names else None


def predict_shard(
    model: nn.Module,
    it,
    device: torch.device,
    amp: torch.dtype | None,
    group_col: int | None = None,
) -> dict:
    """Probabilities (sigmoid of the logits) and labels for one pass over ``it``; with
    ``group_col``, the ids of that sparse feature as ``group`` (for grouped AUC)."""
    model.eval()
    keys = (
        "labels",
        "masks",
        "task_type",
        "weight",
        *(("group",) if group_col is not None else ()),
    )
    parts: dict[str, list] = {k: [] for k in keys}
    preds: dict[str, list] = {}
    with torch.inference_mode():
        for b in it:
            b = b.to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
                logits = model(*b.inputs())
            for task, z in logits.items():
                preds.setdefault(task, []).append(torch.sigmoid(z.float()).cpu().numpy())
            parts["labels"].append(b.labels.cpu().numpy())
            parts["masks"].append(b.label_mask.cpu().numpy())
            parts["task_type"].append(b.task_type.cpu().numpy())
            parts["weight"].append(b.weight.cpu().numpy())
            if group_col is not None:
                parts["group"].append(b.sparse[:, group_col].cpu().numpy())
    model.train()
    return {
        "preds": {t: np.concatenate(v) for t, v in preds.items()},
        **{k: np.concatenate(v) if v else np.zeros(0) for k, v in parts.items()},
    }


def gather(local: dict) -> dict:
    """All-gather every worker's predictions so each rank computes identical metrics (and so
    takes the same early-stopping decision)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return local
    world = torch.distributed.get_world_size()
    if world == 1:
        return local
    parts: list = [None] * world
    torch.distributed.all_gather_object(parts, local)
    parts = [p for p in parts if p is not None and len(p["weight"])]
    if not parts:
        return local
    return {
        "preds": {t: np.concatenate([p["preds"][t] for p in parts]) for t in parts[0]["preds"]},
        **{k: np.concatenate([p[k] for p in parts]) for k in parts[0] if k != "preds"},
    }


def validation_metrics(pred: dict, processor: FeatureProcessor) -> dict:
    """Per task x task_type metrics (``model.metrics.evaluate``) of gathered predictions."""
    lay = processor.layout
    if not len(pred["weight"]):
        return {}
    return evaluate(
        pred["preds"],
        pred["labels"],
        pred["masks"],
        lay.task_names,
        pred["task_type"].astype(np.int64),
        lay.task_types,
        pred["weight"],
        pred.get("group"),
    )


METRIC_KEYS = ("auc", "gauc", "logloss", "ne", "ece", "pred_obs")


def flat_metrics(prefix: str, metrics: Mapping[str, Mapping[str, Mapping]]) -> dict[str, float]:
    """{task: {task_type: {auc: ..}}} -> {"val/click/ads/auc": .., "val/click/pooled/auc": ..}.

    Task-type keys are already valid MLflow names (``model.metrics.group_name``)."""
    out = {}
    for task, by_type in metrics.items():
        for tt, m in by_type.items():
            for k in METRIC_KEYS:
                v = m.get(k)
                if v is not None and math.isfinite(v):
                    out[f"{prefix}/{task}/{tt}/{k}"] = float(v)
    return out


def format_epoch(epoch: int, epochs: int, row: dict, metrics: dict, best: bool) -> str:
    """One log line: loss, speed, the objective and per task the range of within-use-case AUC
    (the pooled AUC is left out: it mostly measures base-rate gaps between use-cases)."""
    per_task = []
    for task, by_type in metrics.items():
        aucs = [m["auc"] for tt, m in by_type.items() if tt != POOLED and math.isfinite(m["auc"])]
        if aucs:
            per_task.append(f"{task} auc {min(aucs):.3f}..{max(aucs):.3f} ({len(aucs)} types)")
    return (
        f"epoch {epoch}/{epochs}  loss {row['train/loss']:.4f}  "
        f"{row['train/rows_per_s']:.0f} rows/s  "
        f"val objective {row['val/objective']:.4f}{' (best)' if best else ''}  | "
        + "  ".join(per_task)
    )


# --------------------------------------------------------------------------- checkpoints


def save_checkpoint(
    path: Path,
    model: nn.Module,
    best_weights: dict | None,
    opt,
    sched,
    scaler,
    state: TrainState,
    cfg: UnirankConfig,
    processor: FeatureProcessor,
) -> None:
    """Write one complete checkpoint directory (CHECKPOINT_FILES); STATE_FILE is written last."""
    weights = state_dict_cpu(model)
    torch.save(weights, path / MODEL_FILE)
    torch.save(best_weights if best_weights is not None else weights, path / BEST_MODEL_FILE)
    torch.save(
        {
            "optimizer": opt.state_dict(),
            "scheduler": sched.state_dict(),
            "scaler": scaler.state_dict() if scaler is not None else None,
        },
        path / OPTIMIZER_FILE,
    )
    (path / CONFIG_FILE).write_text(cfg.to_yaml())
    (path / PROCESSOR_FILE).write_text(json.dumps(processor.state_dict()))
    (path / STATE_FILE).write_text(state.to_json())


def load_state(path: str | Path) -> TrainState:
    return TrainState.from_json((Path(path) / STATE_FILE).read_text())


# --------------------------------------------------------------------------- MLflow (rank 0)


class _Tracker:
    """Per-epoch metrics to the run the driver created; a tracking outage is logged, not fatal
    (a long training run should not die because the tracking server blinked)."""

    def __init__(self, tracking_uri: str, run_id: str | None, enabled: bool):
        self.run_id = run_id if enabled else None
        self.client = None
        if self.run_id:
            from mlflow.tracking import MlflowClient

            self.client = MlflowClient(tracking_uri)

    def log(self, metrics: dict[str, float], step: int) -> None:
        if self.client is None:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step) for k, v in metrics.items() if math.isfinite(v)]
        try:
            for i in range(0, len(items), 500):  # the REST API caps a batch at 1000 metrics
                self.client.log_batch(self.run_id, metrics=items[i : i + 500])
        except Exception as exc:  # noqa: BLE001
            log.warning("MLflow: could not log epoch %d metrics: %s", step, exc)


# --------------------------------------------------------------------------- the loop


def train_func(config: dict) -> None:
    """Ray Train worker entry point (``TorchTrainer(train_func, train_loop_config=...)``)."""
    lc = TrainLoopConfig(**config)
    cfg = UnirankConfig.model_validate(lc.config)
    t = cfg.train
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    torch.manual_seed(t.seed + rank)
    if t.deterministic:
        # warn_only: an op without a deterministic kernel (some CUDA ones) warns, not fails
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS: fixed workspaces
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    device = ray.train.torch.get_device()
    on_gpu = device.type == "cuda"
    amp = amp_dtype(device, t.amp)

    processor = FeatureProcessor.from_state_dict(cfg.dataset, lc.processor)
    model = build_model(cfg)
    criterion = MultiTaskLoss.from_config(cfg)
    total_steps = lc.steps_per_epoch * t.epochs
    opt, sched = build_optimizer(model, t, total_steps)
    scaler = torch.amp.GradScaler("cuda") if amp == torch.float16 else None

    state, best_weights = TrainState(), None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:  # a retried worker group, or a rerun with the same run name
        with checkpoint.as_directory() as d:
            d = Path(d)
            state = load_state(d)
            model.load_state_dict(torch.load(d / MODEL_FILE, map_location="cpu"))
            best_weights = torch.load(d / BEST_MODEL_FILE, map_location="cpu")
            saved = torch.load(d / OPTIMIZER_FILE, map_location="cpu", weights_only=False)
            opt.load_state_dict(saved["optimizer"])
            sched.load_state_dict(saved["scheduler"])
            if scaler is not None and saved.get("scaler"):
                scaler.load_state_dict(saved["scaler"])
        if rank == 0:
            log.info("resuming after epoch %d (best %s at epoch %d)", state.epoch,
                     _finite_or_none(state.best_objective), state.best_epoch)  # fmt: skip
    elif lc.init_weights is not None:  # warm start: weights only, fresh optimizer
        model.load_state_dict(ray.get(lc.init_weights))
        if rank == 0:
            log.info("warm start from train.init_from=%s", t.init_from)
    state.starts.append(state.epoch)

    model = ray.train.torch.prepare_model(model)  # device + DDP when world > 1
    tracker = _Tracker(cfg.mlflow.tracking_uri, lc.mlflow_run_id, rank == 0)
    train_shard = ray.train.get_dataset_shard("train")
    val_shard = ray.train.get_dataset_shard("validation")
    group_col = group_column(processor, cfg.evaluate.group_by)

    done = state.stopped_early or state.epoch >= t.epochs
    for epoch in range(state.epoch + 1, t.epochs + 1):
        if done:
            break
        # ---- train
        model.train()
        t0, rows, loss_sum, task_sums, n_steps = time.perf_counter(), 0, 0.0, {}, 0
        waits: list[float] = []
        shard_it = batches(
            train_shard, processor, t.batch_size, on_gpu, t.prefetch_batches,
            t.shuffle_buffer_rows, t.seed + 1000 * epoch + rank,
        )  # fmt: skip
        for step, b in enumerate(timed(shard_it, waits)):
            if t.max_steps_per_epoch is not None and step >= t.max_steps_per_epoch:
                break
            b = b.to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
                logits = model(*b.inputs())
            loss, per_task = criterion({k: v.float() for k, v in logits.items()}, b)
            opt.zero_grad(set_to_none=True)
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.unscale_(opt)
            else:
                loss.backward()
            if t.grad_clip is not None:
                nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
            if scaler is not None:
                scaler.step(opt)
                scaler.update()
            else:
                opt.step()
            sched.step()
            rows += len(b)
            n_steps += 1
            loss_sum += float(loss.detach())
            for k, v in per_task.items():
                task_sums[k] = task_sums.get(k, 0.0) + float(v)
        train_s = time.perf_counter() - t0
        state.steps += n_steps

        # ---- validate (every rank its shard, then all-gather)
        t_val = time.perf_counter()
        val_it = batches(val_shard, processor, t.batch_size, on_gpu, t.prefetch_batches)
        local = predict_shard(model, val_it, device, amp, group_col)
        metrics = validation_metrics(gather(local), processor)
        val_s = time.perf_counter() - t_val
        objective = objective_value(metrics, t)
        improved = objective > state.best_objective + 1e-6
        if improved:
            state.best_objective, state.best_epoch, state.bad_epochs = objective, epoch, 0
            best_weights = state_dict_cpu(model)
        else:
            state.bad_epochs += 1
        state.epoch = epoch
        state.stopped_early = state.bad_epochs >= t.patience and epoch < t.epochs
        done = state.stopped_early

        row = {
            "epoch": epoch,
            "train/loss": loss_sum / max(n_steps, 1),
            **{f"train/{k}_loss": v / max(n_steps, 1) for k, v in task_sums.items()},
            "train/rows": rows * world,
            "train/rows_per_s": rows * world / max(train_s, 1e-9),
            "train/seconds": train_s,
            # input stalls: waiting for the first batch (pipeline start) and for the rest
            "train/first_batch_s": waits[0] if waits else 0.0,
            "train/data_wait_s": sum(waits[1:]),
            "val/seconds": val_s,
            "lr": sched.get_last_lr()[0],
            "val/objective": objective if math.isfinite(objective) else float("nan"),
            **flat_metrics("val", metrics),
        }
        state.history.append({k: _finite_or_none(v) for k, v in row.items()})
        # Ray logs every report: keep it to the headline figures (MLflow gets them all).
        report = {
            **{k: v for k, v in row.items() if k.count("/") < 2 or k.endswith("/auc")},
            "best_objective": _finite_or_none(state.best_objective),
            "best_epoch": state.best_epoch,
            "stopped_early": state.stopped_early,
        }
        if rank == 0:
            log.info(format_epoch(epoch, t.epochs, row, metrics, improved))
            tracker.log({k: v for k, v in row.items() if k != "epoch"}, step=epoch)
        with tempfile.TemporaryDirectory() as tmp:
            ckpt = None
            if rank == 0:
                save_checkpoint(
                    Path(tmp), model, best_weights, opt, sched, scaler, state, cfg, processor
                )
                ckpt = ray.train.Checkpoint.from_directory(tmp)
            ray.train.report(report, checkpoint=ckpt, checkpoint_dir_name=f"epoch_{epoch:04d}")
        if done and rank == 0:
            log.info(
                "early stop after epoch %d: no improvement for %d epochs (best %.4f at %d)",
                epoch, state.bad_epochs, state.best_objective, state.best_epoch,
            )  # fmt: skip
