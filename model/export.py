"""The serving face: predictor module, TorchScript export, loading, CUDA Graphs.

An exported directory is self-contained:

    model.pt           TorchScript predictor: fixed-shape padded tensors -> probabilities;
                       also ``encode_user`` (a user's sequence -> (L, D) encoding) and
                       ``forward_encoded`` (candidates scored against given encodings)
    processor.json     FeatureProcessor statistics (model.features)
    calibrators.json   per-task calibrators (model.calibration), applied right after model.pt
    config.yaml        the resolved UnirankConfig the model was trained with
    manifest.json      file list, precision, tasks, shape buckets, entry points, the user
                       encoding's shape, torch version
    retrieval.npz      (registered models) the candidate retrieval index, ray_jobs.export

``load_predictor(dir).predict(columns)`` runs the same FeatureProcessor as training, pads to
a fixed shape bucket, runs model.pt and calibrates: {task: np.ndarray (n,)}.
"""

import copy
import hashlib
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import yaml
from torch import nn

from model.batch import Batch, pad_batch, shape_bucket
from model.calibration import Calibrators
from model.config import UnirankConfig, config_from_dict
from model.ensemble import set_precision
from model.features import Columns, FeatureProcessor

MODEL_FILE = "model.pt"
PROCESSOR_FILE = "processor.json"
CALIBRATORS_FILE = "calibrators.json"
CONFIG_FILE = "config.yaml"
MANIFEST_FILE = "manifest.json"
# The TorchScript methods besides forward: encode a user's sequence once, score candidates
# against an encoding (precomputed by ray_jobs.user_embeddings or computed per request).
ENCODED_ENTRY_POINTS = ("encode_user", "forward_encoded")


class UnknownTaskTypeError(ValueError):
    """A request names task_types the model was not trained on (Serve answers 4xx)."""

    def __init__(self, unknown: Sequence[str], known: Sequence[str]):
        self.unknown = list(unknown)
        super().__init__(f"unknown task_type {self.unknown}; this model knows {list(known)}")


class Predictor(nn.Module):
    """model -> probabilities: sigmoid for BCE tasks, the raw output for MSE tasks."""

    sigmoid_tasks: list[str]  # class-level: TorchScript needs the type even when empty

    def __init__(self, model: nn.Module, sigmoid_tasks: Sequence[str]):
        super().__init__()
        self.model = model
        self.sigmoid_tasks = list(sigmoid_tasks)

    def _probs(self, logits: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for name, z in logits.items():
            out[name] = torch.sigmoid(z) if name in self.sigmoid_tasks else z
        return out

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
        return self._probs(
            self.model(sparse, multi, dense, seq_items, seq_types, seq_gaps, seq_mask, task_type)
        )

    @torch.jit.export
    def encode_user(
        self,
        seq_items: torch.Tensor,
        seq_types: torch.Tensor,
        seq_gaps: torch.Tensor,
        seq_mask: torch.Tensor,
    ) -> torch.Tensor:
        """(U, L) sequences -> (U, L, D) encodings (UnirankModel.encode_user)."""
        return self.model.encode_user(seq_items, seq_types, seq_gaps, seq_mask)

    @torch.jit.export
    def forward_encoded(
        self,
        sparse: torch.Tensor,
        multi: dict[str, torch.Tensor],
        dense: torch.Tensor,
        user_h: torch.Tensor,
        user_index: torch.Tensor,
        seq_gaps: torch.Tensor,
        seq_mask: torch.Tensor,
        task_type: torch.Tensor,
    ) -> dict[str, torch.Tensor]:
        """Probabilities from encoded users: ``user_h`` (U, L, D), ``user_index`` (B,)."""
        return self._probs(
            self.model.forward_encoded(
                sparse, multi, dense, user_h, user_index, seq_gaps, seq_mask, task_type
            )
        )


def make_predictor(model: nn.Module, cfg: UnirankConfig, precision: str = "fp32") -> Predictor:
    """An eval-mode copy of the model with its heavy layers in ``precision``, + sigmoid."""
    m = set_precision(copy.deepcopy(model).eval(), precision)
    return Predictor(m, [t.name for t in cfg.dataset.tasks if t.loss == "bce"]).eval()


def script_predictor(model: nn.Module, cfg: UnirankConfig, precision: str = "fp32"):
    """TorchScript (torch.jit.script, frozen) of the predictor.

    script, not trace: the model has data-independent but Python-level control flow
    (loops over backbones / tasks, optional modules) that tracing would bake in silently.
    """
    scripted = torch.jit.script(make_predictor(model, cfg, precision))
    return torch.jit.freeze(scripted, preserved_attrs=list(ENCODED_ENTRY_POINTS))


def export(
    out_dir: str | Path,
    model: nn.Module,
    processor: FeatureProcessor,
    cfg: UnirankConfig,
    calibrators: Calibrators | None = None,
    precision: str | None = None,
) -> Path:
    """Write the self-contained serving directory; returns its path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    precision = precision or cfg.model.precision
    task_names = [t.name for t in cfg.dataset.tasks]
    calibrators = calibrators or Calibrators.identity(task_names)
    torch.jit.save(script_predictor(model, cfg, precision), str(out / MODEL_FILE))
    (out / PROCESSOR_FILE).write_text(json.dumps(processor.state_dict(), indent=1))
    calibrators.save(out / CALIBRATORS_FILE)
    (out / CONFIG_FILE).write_text(cfg.to_yaml())
    manifest = {
        "format": "unirank-export/1",
        "files": [MODEL_FILE, PROCESSOR_FILE, CALIBRATORS_FILE, CONFIG_FILE],
        "precision": precision,
        "tasks": task_names,
        "task_types": list(processor.layout.task_types),
        "shape_buckets": list(cfg.serve.shape_buckets),
        "entry_points": ["forward", *ENCODED_ENTRY_POINTS],
        "user_encoding": user_encoding_spec(model),
        "torch": torch.__version__,
    }
    (out / MANIFEST_FILE).write_text(json.dumps(manifest, indent=1))
    return out


def user_encoding_spec(model: nn.Module) -> dict | None:
    """Shape of one user's encoding, (max_len, dim), or None without a sequence encoder."""
    seq = getattr(model, "sequence", None)
    if seq is None:
        return None
    return {"max_len": int(seq.pos_emb.num_embeddings), "dim": int(seq.dim)}


def model_digest(path: str | Path) -> str:
    """Short digest of an export's TorchScript file: which model produced an encoding."""
    return hashlib.sha256((Path(path) / MODEL_FILE).read_bytes()).hexdigest()[:12]


class LoadedPredictor:
    """An exported model ready to serve: ``predict(columns) -> {task: np.ndarray}``."""

    def __init__(self, path: str | Path, device: str = "cpu", cuda_graphs: bool = True):
        path = Path(path)
        missing = [f for f in (MODEL_FILE, PROCESSOR_FILE, CALIBRATORS_FILE, CONFIG_FILE)
                   if not (path / f).exists()]  # fmt: skip
        if missing:
            raise FileNotFoundError(f"export directory {path} lacks {missing}")
        self.path = path
        self.cfg = config_from_dict(yaml.safe_load((path / CONFIG_FILE).read_text()), str(path))
        state = json.loads((path / PROCESSOR_FILE).read_text())
        self.processor = FeatureProcessor.from_state_dict(self.cfg.dataset, state)
        self.calibrators = Calibrators.load(path / CALIBRATORS_FILE)
        self.device = torch.device(device)
        self.module = torch.jit.load(str(path / MODEL_FILE), map_location=self.device).eval()
        self.shape_buckets = list(self.cfg.serve.shape_buckets)
        self.task_types = np.asarray(self.processor.layout.task_types, dtype=object)
        # On a GPU, one captured graph per entry point and input shapes, built on first use
        # (warm_up builds them); a reason here = plain module calls.
        self.cuda_graphs_reason = (
            cuda_graphs_unavailable_reason(self.device) if cuda_graphs else "disabled by caller"
        )
        self._graphs: dict[tuple, CudaGraphRunner] = {}
        manifest = json.loads((path / MANIFEST_FILE).read_text())
        # Exports older than the split (or without a sequence encoder) score raw sequences only.
        self.user_encoding: dict | None = manifest.get("user_encoding")
        self.supports_encoding = self.user_encoding is not None and all(
            hasattr(self.module, m) for m in ENCODED_ENTRY_POINTS
        )
        self.digest = model_digest(path)

    def _require_encoding(self) -> None:
        if not self.supports_encoding:
            raise ValueError(
                f"export {self.path} has no user-encoding entry points {ENCODED_ENTRY_POINTS} "
                f"(exported before they existed, or the model has no sequence encoder); "
                f"re-export it with model.export.export"
            )

    def encode(self, columns: Columns) -> tuple[np.ndarray, np.ndarray]:
        """Encode one user per row: ``seq_*`` columns and the ``event_time`` to measure the
        events' age from. Returns (encodings (U, L, D) float32, mask (U, L) bool): the
        encoding of a real event is where the mask is True (left padding, newest last)."""
        self._require_encoding()
        batch = self.processor(columns)
        u = len(batch)
        # Users are padded to a power of two, so each bucket is one captured graph on a GPU.
        padded = pad_batch(batch, user_bucket(u)).to(self.device)
        args = (padded.seq_items, padded.seq_types, padded.seq_gaps, padded.seq_mask)
        h = self._call("encode_user", args)  # (U_bucket, L, D)
        return h[:u].float().cpu().numpy(), batch.seq_mask.numpy()

    def run_encoded(
        self, batch: Batch, user_h: np.ndarray, user_index: np.ndarray
    ) -> dict[str, np.ndarray]:
        """Uncalibrated outputs of ``batch`` against encoded users: ``user_h`` (U, L, D) from
        ``encode`` (or precomputed), ``user_index`` (n,) the row of ``user_h`` per example.
        The batch's ``seq_gaps`` / ``seq_mask`` must describe the encoded events."""
        self._require_encoding()
        n, length = len(batch), batch.seq_mask.shape[1]
        user_h = np.asarray(user_h, dtype=np.float32)
        user_index = np.asarray(user_index, dtype=np.int64)
        if user_h.ndim != 3 or user_h.shape[1] != length:
            raise ValueError(f"user encodings must be (U, {length}, D), got {user_h.shape}")
        if user_index.shape != (n,) or (
            n and not 0 <= user_index.min() <= user_index.max() < len(user_h)
        ):
            raise ValueError(
                f"user_index must be {n} rows of [0, {len(user_h)}), got shape {user_index.shape}"
            )  # fmt: skip
        size = shape_bucket(n, self.shape_buckets)
        padded = pad_batch(batch, size).to(self.device)
        index = torch.zeros(size, dtype=torch.int64)
        index[:n] = torch.from_numpy(user_index)
        users = torch.zeros((user_bucket(len(user_h)), *user_h.shape[1:]))  # (U_bucket, L, D)
        users[: len(user_h)] = torch.from_numpy(user_h)
        args = (
            padded.sparse,
            padded.multi,
            padded.dense,
            users.to(self.device),
            index.to(self.device),
            padded.seq_gaps,
            padded.seq_mask,
            padded.task_type,
        )
        out = self._call("forward_encoded", args)
        return {t: v[:n].float().cpu().numpy() for t, v in out.items()}

    def predict_encoded(
        self,
        columns: Columns,
        user_h: np.ndarray,
        user_index: np.ndarray,
        allow_unknown_task_type: bool = False,
    ) -> dict[str, np.ndarray]:
        """``predict`` with the users' sequences already encoded (see ``run_encoded``)."""
        batch = self._checked_batch(columns, allow_unknown_task_type)
        raw = self.run_encoded(batch, user_h, user_index)
        names = self.task_types[batch.task_type.numpy()]
        return self.calibrators.apply(raw, names)

    def _checked_batch(self, columns: Columns, allow_unknown_task_type: bool) -> Batch:
        if not allow_unknown_task_type:
            unknown = self.processor.unknown_task_types(columns)
            if unknown:
                raise UnknownTaskTypeError(unknown, self.cfg.dataset.task_types)
        return self.processor(columns)

    def run(self, batch: Batch) -> dict[str, np.ndarray]:
        """Uncalibrated outputs for a Batch, padded to its shape bucket and cut back."""
        n = len(batch)
        padded = pad_batch(batch, shape_bucket(n, self.shape_buckets)).to(self.device)
        out = self._call("forward", padded.inputs())
        return {t: v[:n].float().cpu().numpy() for t, v in out.items()}

    def _call(self, entry: str, args: tuple):
        """``module.<entry>(*args)``; on a GPU through the CUDA Graph captured for exactly
        these input shapes (callers pad to shape buckets, so there are a few per entry)."""
        fn = getattr(self.module, entry)
        with torch.inference_mode():
            if self.cuda_graphs_reason is not None:
                return fn(*args)
            key = (entry, *input_shapes(args))
            if key not in self._graphs:
                self._graphs[key] = CudaGraphRunner(fn, args)
            return self._graphs[key](*args)

    def predict(self, columns: Columns, allow_unknown_task_type: bool = False):
        """Calibrated probabilities per task for each row of ``columns``.

        Raises UnknownTaskTypeError (a ValueError) for task_types the model does not know,
        unless ``allow_unknown_task_type`` (they are then scored as task_type 0).
        """
        batch = self._checked_batch(columns, allow_unknown_task_type)
        raw = self.run(batch)
        names = self.task_types[batch.task_type.numpy()]  # (n,) task_type names
        return self.calibrators.apply(raw, names)


def load_predictor(
    path: str | Path, device: str = "cpu", cuda_graphs: bool = True
) -> LoadedPredictor:
    """Load an exported directory. On a CUDA device, CUDA Graphs replay each shape bucket
    (``cuda_graphs=False`` turns that off); elsewhere ``.cuda_graphs_reason`` says why not."""
    return LoadedPredictor(path, device, cuda_graphs)


# --------------------------------------------------------------------------- CUDA Graphs


def cuda_graphs_unavailable_reason(device: torch.device | str) -> str | None:
    """Why CUDA Graphs cannot be used here, or None if they can."""
    device = torch.device(device)
    if device.type != "cuda":
        return f"CUDA Graphs skipped: device is {device.type}, graphs need a CUDA device"
    if not torch.cuda.is_available():
        return "CUDA Graphs skipped: torch.cuda.is_available() is False (no GPU or CPU-only torch)"
    return None


def user_bucket(u: int) -> int:
    """Rows of user encodings in one call, padded to the next power of two (>= 1): a batch of
    requests has 1..max_batch_size users, so a handful of shapes (and graphs) cover all."""
    return 1 << max(u - 1, 0).bit_length()


def input_shapes(args: tuple) -> tuple:
    """The shapes and dtypes of (possibly dict-valued) inputs: what one graph is valid for."""
    out: list = []
    for a in args:
        if isinstance(a, dict):
            out.append(tuple((k, tuple(v.shape), v.dtype) for k, v in sorted(a.items())))
        else:
            out.append((tuple(a.shape), a.dtype))
    return tuple(out)


class CudaGraphRunner:
    """Replays one captured call of ``fn`` for fixed input shapes (serving pads to buckets).

    Inputs (tensors, or dicts of tensors) are copied into static tensors, the graph is
    replayed, outputs (a tensor or a dict of tensors) are cloned. One runner per entry point
    and shape. Only constructed when a GPU is present.
    """

    def __init__(self, fn, example: tuple, warmup: int = 3):
        devices = [t.device for t in _tensors(example)]
        reason = cuda_graphs_unavailable_reason(devices[0] if devices else "cpu")
        if reason:
            raise RuntimeError(reason)
        self.static = tuple(_clone(a) for a in example)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side), torch.inference_mode():
            for _ in range(warmup):  # allocator and cuDNN/cuBLAS autotuning before capture
                fn(*self.static)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph), torch.inference_mode():
            self.static_out = fn(*self.static)

    def __call__(self, *inputs):
        for dst, src in zip(self.static, inputs, strict=True):
            if isinstance(dst, dict):
                for k in dst:
                    dst[k].copy_(src[k])
            else:
                dst.copy_(src)
        self.graph.replay()
        if isinstance(self.static_out, dict):
            return {k: v.clone() for k, v in self.static_out.items()}
        return self.static_out.clone()


def _tensors(args: tuple) -> list[torch.Tensor]:
    return [t for a in args for t in (a.values() if isinstance(a, dict) else [a])]


def _clone(a):
    return {k: v.clone() for k, v in a.items()} if isinstance(a, dict) else a.clone()


def maybe_cuda_graphs(module: nn.Module, example: Batch) -> tuple[object, str | None]:
    """(CudaGraphRunner over ``module.forward``, None) on a GPU; (module unchanged, reason)
    anywhere else."""
    reason = cuda_graphs_unavailable_reason(example.sparse.device)
    if reason:
        return module, reason
    return CudaGraphRunner(module, example.inputs()), None
