"""One training loop for every stage: Adam, plateau schedule, early stopping, exact resume.

The loop is generic: it trains any ``nn.Module`` with a caller-supplied ``loss_fn(module, batch)``
(U-Nets on volumes, Platt heads on cached logits, ...). Per epoch it

1. trains on ``train_batches(epoch)`` (Adam, bf16 autocast + channels-last on CUDA only),
2. evaluates ``val_batches()`` in ``eval()`` mode without gradients,
3. steps ``ReduceLROnPlateau`` (x ``lr_factor`` after ``lr_patience`` epochs without a relative
   improvement of ``min_rel_improvement``) and the early-stopping counter (stop after
   ``early_stop_patience`` such epochs, as Keras' ``EarlyStopping(min_delta)``),
4. writes a checkpoint atomically (``calib.atomic_io``) holding everything needed to
   continue bit-identically: weights, optimizer, scheduler, early-stopping state, best weights,
   history and the torch / CUDA / numpy / python RNG states,
5. calls the callbacks (after the checkpoint, so a callback that stops the process loses nothing).

At the end the best weights (lowest validation loss) are loaded into the module.

Reproducibility contract: ``train_batches(epoch)`` must depend only on ``epoch`` and the global
RNGs (which ``fit`` seeds with ``cfg.seed`` on a fresh start and restores on resume).

Every stage (``calib.stages``) begins with :func:`start_stage`, so that a stage's numbers do not
depend on what ran before it in the same process (a reused Ray worker) or on a fresh one: the
torch (CPU and CUDA), numpy and python RNGs are seeded from the stage's config and torch is held
to deterministic algorithms (``torch.use_deterministic_algorithms``). On CPU that is strict
(``warn_only=False``: an op without a deterministic kernel raises). On CUDA it is
``warn_only=True``: convolutions, ``scatter_add_``, ``index_add`` and ``MaxPool3d``'s backward take
their deterministic kernels, cuBLAS its deterministic workspace (``CUBLAS_WORKSPACE_CONFIG=:4096:8``,
set below at import, before any cuBLAS handle exists, unless the environment sets it), cuDNN
benchmarking is off; but torch has no deterministic CUDA kernel for the backward of trilinear
``F.interpolate`` (the U-Net's decoder) or of ``AvgPool3d`` (``pooling: avg``), nor for
``torch.bincount`` with weights or float ``torch.cumsum`` (GPU metric paths): those warn and stay
nondeterministic (atomic adds), where strict mode would stop training. Not checked on a GPU yet.
The thread count (``torch.set_num_threads``, set per trial by the sweep) is left as it is: the same
count gives the same CPU reductions.
"""

from __future__ import annotations

import math
import os
import random
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from calib.atomic_io import atomic_open
from calib.schedule import TrainConfig

CHECKPOINT_VERSION = 1
# cuBLAS reads it when a handle is created (the first CUDA matmul of the process): set it before.
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")


class TrainingError(RuntimeError):
    """Training cannot go on (non-finite loss, empty data, unusable checkpoint)."""


@dataclass(frozen=True)
class EpochResult:
    """What one finished epoch reports to the callbacks (``epoch`` counts from 0)."""

    epoch: int
    train_loss: float
    val_loss: float
    lr: float
    checkpoint_path: Path | None = None


@dataclass
class FitResult:
    """Outcome of :func:`fit`. ``stop_reason`` is ``"early_stop"`` or ``"max_epochs"``."""

    best_val_loss: float
    best_epoch: int
    epochs_run: int
    history: list[EpochResult] = field(default_factory=list)
    stop_reason: str = ""


# ---- helpers ------------------------------------------------------------------------------------

def _to_device(obj: Any, device: torch.device, channels_last: bool) -> Any:
    """Move every tensor inside dicts / lists / tuples to ``device`` (5D floats channels-last)."""
    if isinstance(obj, torch.Tensor):
        obj = obj.to(device, non_blocking=True)
        if channels_last and obj.dim() == 5 and obj.is_floating_point():
            obj = obj.contiguous(memory_format=torch.channels_last_3d)
        return obj
    if isinstance(obj, dict):
        return {k: _to_device(v, device, channels_last) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        moved = [_to_device(v, device, channels_last) for v in obj]
        return type(obj)(*moved) if hasattr(obj, "_fields") else type(obj)(moved)
    return obj


def _rng_state(device: torch.device) -> dict:
    # numpy's key array and python's tuple as tensors / lists so torch.load(weights_only=True) works
    kind, key, pos, has_gauss, gauss = np.random.get_state()
    py_version, py_internal, py_gauss = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"kind": kind, "key": torch.from_numpy(key.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "gauss": float(gauss)},
        "python": [py_version, list(py_internal), py_gauss],
    }
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["key"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def _seed_all(seed: int, device: torch.device) -> None:
    torch.manual_seed(seed)  # CPU and every CUDA device
    np.random.seed(seed)
    random.seed(seed)
    if device.type == "cuda":
        torch.cuda.manual_seed(seed)


def start_stage(seed: int, device: torch.device | str | None = None) -> None:
    """The process state every stage starts from (module doc): RNGs seeded with ``seed``,
    deterministic algorithms (strict on CPU, warn-only when ``device`` is CUDA), no cuDNN
    benchmarking. Call it first in a stage, before any weight is initialised."""
    device = torch.device(device if device is not None else "cpu")
    cuda = device.type == "cuda"
    torch.use_deterministic_algorithms(True, warn_only=cuda)
    torch.backends.cudnn.benchmark = False
    _seed_all(int(seed), device)


def atomic_save(obj: Any, path: Path) -> None:
    """``torch.save(obj)`` to ``path`` atomically (calib.atomic_io: never half-written)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_open(path, "wb") as f:
        torch.save(obj, f)


def _param_groups(params: list[nn.Parameter], weight_decay: float) -> list[dict]:
    """Adam parameter groups: kernels (>= 2 dims) with the L2 penalty, biases and norms without.

    torch's Adam ``weight_decay=g`` adds ``g * w`` to the gradient, the gradient of
    ``g / 2 * w ** 2``; Keras' ``l2(l)`` adds ``l * w ** 2`` to the loss, so ``g = 2 * l``.
    """
    if not weight_decay:
        return [{"params": params}]
    kernels = [p for p in params if p.dim() >= 2]
    others = [p for p in params if p.dim() < 2]
    return [g for g in ({"params": kernels, "weight_decay": 2.0 * weight_decay},
                        {"params": others, "weight_decay": 0.0}) if g["params"]]


def _cpu_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in module.state_dict().items()}


def _is_improvement(value: float, best: float, min_rel: float) -> bool:
    # relative threshold on |best| so negative losses behave too (best = inf on the first epoch)
    return value < best - abs(best) * min_rel if math.isfinite(best) else True


def _history_from(rows: list[dict], path: Path | None) -> list[EpochResult]:
    return [EpochResult(checkpoint_path=path, **r) for r in rows]


# ---- the loop -----------------------------------------------------------------------------------

def fit(module: nn.Module,
        loss_fn: Callable[[nn.Module, Any], torch.Tensor],
        train_batches: Callable[[int], Iterable[Any]],
        val_batches: Callable[[], Iterable[Any]],
        cfg: TrainConfig,
        device: torch.device,
        params: Iterable[nn.Parameter] | None = None,
        checkpoint_path: Path | None = None,
        callbacks: Sequence[Callable[[EpochResult], None]] = ()) -> FitResult:
    """Train ``module`` in place (see the module doc) and return what happened.

    Args:
        module: the model; moved to ``device`` (channels-last on CUDA).
        loss_fn: ``loss_fn(module, batch) -> scalar tensor``; called under bf16 autocast on CUDA.
        train_batches: ``train_batches(epoch)`` yields the batches of epoch ``epoch`` (0-based);
            tensors in dicts / lists / tuples are moved to ``device``.
        val_batches: ``val_batches()`` yields the validation batches; the validation loss is
            the mean of ``loss_fn`` over them.
        cfg: optimisation settings.
        device: where to train; CUDA enables bf16 autocast and channels-last.
        params: the parameters to train (default: all of ``module``). The module's other
            parameters are frozen for the run (``requires_grad`` restored afterwards) and are not
            given to the optimizer.
        checkpoint_path: written every epoch; when the file exists the run resumes from it
            (a finished run returns its result at once). Its settings must match ``cfg``.
        callbacks: called with an :class:`EpochResult` after each epoch's checkpoint.

    Raises:
        TrainingError: non-finite loss (naming epoch and batch), no batches, a checkpoint from
            another configuration or model.
    """
    device = torch.device(device)
    cuda = device.type == "cuda"
    module.to(device)
    if cuda:
        module.to(memory_format=torch.channels_last_3d)
    ckpt_path = Path(checkpoint_path) if checkpoint_path is not None else None

    all_params = list(module.parameters())
    train_params = all_params if params is None else list(params)
    if not train_params:
        raise TrainingError("fit() got an empty list of parameters to train")
    train_ids = {id(p) for p in train_params}
    saved_flags = [(p, p.requires_grad) for p in all_params]
    for p in all_params:
        p.requires_grad_(id(p) in train_ids)
    for p in train_params:
        p.requires_grad_(True)

    optimizer = torch.optim.Adam(_param_groups(train_params, cfg.weight_decay), lr=cfg.lr)
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
        optimizer, mode="min", factor=cfg.lr_factor, patience=cfg.lr_patience,
        threshold=cfg.min_rel_improvement, threshold_mode="rel")

    start_epoch, best_val, best_epoch, bad_epochs = 0, math.inf, -1, 0
    best_weights: dict[str, torch.Tensor] | None = None
    rows: list[dict] = []
    stop_reason = ""
    try:
        if ckpt_path is not None and ckpt_path.exists():
            ck = _load_checkpoint(ckpt_path, cfg)
            try:
                module.load_state_dict(ck["model"])
                optimizer.load_state_dict(ck["optimizer"])
            except (RuntimeError, ValueError, KeyError) as e:
                raise TrainingError(f"checkpoint {ckpt_path} does not fit this model/parameters: {e}") from e
            scheduler.load_state_dict(ck["scheduler"])
            start_epoch = ck["epoch"] + 1
            best_val, best_epoch, bad_epochs = ck["best_val"], ck["best_epoch"], ck["bad_epochs"]
            best_weights, rows, stop_reason = ck["best_weights"], ck["history"], ck["stop_reason"]
            _set_rng_state(ck["rng"], device)
        else:
            _seed_all(cfg.seed, device)

        epoch = start_epoch
        while not stop_reason and epoch < cfg.max_epochs:
            lr = optimizer.param_groups[0]["lr"]
            train_loss = _train_epoch(module, loss_fn, train_batches(epoch), optimizer, epoch, device, cuda)
            val_loss = _val_epoch(module, loss_fn, val_batches(), epoch, device, cuda)
            scheduler.step(val_loss)
            if _is_improvement(val_loss, best_val, cfg.min_rel_improvement):
                best_val, best_epoch, bad_epochs = val_loss, epoch, 0
                best_weights = _cpu_state_dict(module)
            else:
                bad_epochs += 1
            if bad_epochs >= cfg.early_stop_patience:
                stop_reason = "early_stop"
            elif epoch + 1 >= cfg.max_epochs:
                stop_reason = "max_epochs"
            row = {"epoch": epoch, "train_loss": train_loss, "val_loss": val_loss, "lr": lr}
            rows.append(row)
            if ckpt_path is not None:
                atomic_save({
                    "version": CHECKPOINT_VERSION, "cfg": asdict(cfg), "epoch": epoch,
                    "model": module.state_dict(), "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(), "best_val": best_val,
                    "best_epoch": best_epoch, "bad_epochs": bad_epochs, "best_weights": best_weights,
                    "history": rows, "stop_reason": stop_reason, "rng": _rng_state(device),
                }, ckpt_path)
            result = EpochResult(checkpoint_path=ckpt_path, **row)
            for cb in callbacks:
                cb(result)
            epoch += 1
        if not stop_reason:  # resumed with max_epochs already reached
            stop_reason = "max_epochs"
        if best_weights is not None and cfg.restore_best:
            module.load_state_dict(best_weights)
    finally:
        for p, flag in saved_flags:
            p.requires_grad_(flag)
    return FitResult(best_val_loss=best_val, best_epoch=best_epoch, epochs_run=len(rows),
                     history=_history_from(rows, ckpt_path), stop_reason=stop_reason)


def _load_checkpoint(path: Path, cfg: TrainConfig) -> dict:
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file is the same problem for the user
        raise TrainingError(f"cannot read checkpoint {path}: {e}") from e
    if not isinstance(ck, dict) or ck.get("version") != CHECKPOINT_VERSION:
        raise TrainingError(f"checkpoint {path} is not a calib.training checkpoint "
                            f"(version {CHECKPOINT_VERSION})")
    diff = {k: (v, ck["cfg"].get(k)) for k, v in asdict(cfg).items() if ck["cfg"].get(k) != v}
    if diff:
        raise TrainingError(f"checkpoint {path} was written with other settings: "
                            + ", ".join(f"{k}={old!r} there, {new!r} now" for k, (new, old) in diff.items()))
    return ck


def _train_epoch(module, loss_fn, batches, optimizer, epoch, device, cuda) -> float:
    module.train()
    total, n = 0.0, 0
    for b, batch in enumerate(batches):
        batch = _to_device(batch, device, cuda)
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=cuda):
            loss = loss_fn(module, batch)
        value = float(loss.detach())
        if not math.isfinite(value):
            raise TrainingError(f"non-finite training loss ({value}) at epoch {epoch}, batch {b}")
        if not loss.requires_grad:
            raise TrainingError("the loss does not depend on any trained parameter")
        loss.backward()
        optimizer.step()
        total += value
        n += 1
    if n == 0:
        raise TrainingError(f"train_batches({epoch}) yielded no batch")
    return total / n


@torch.no_grad()
def _val_epoch(module, loss_fn, batches, epoch, device, cuda) -> float:
    module.eval()
    total, n = 0.0, 0
    for b, batch in enumerate(batches):
        batch = _to_device(batch, device, cuda)
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=cuda):
            value = float(loss_fn(module, batch))
        if not math.isfinite(value):
            raise TrainingError(f"non-finite validation loss ({value}) at epoch {epoch}, batch {b}")
        total += value
        n += 1
    if n == 0:
        raise TrainingError("val_batches() yielded no batch")
    return total / n
