"""The training loop: schedule, early stopping, best weights, exact resume, errors, and a
tiny U-Net that learns a phantom."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from torch import nn

from calib.losses import bce_loss
from calib.metrics import dice
from calib.nets import UNet3D, UNetConfig
from calib.training import EpochResult, TrainConfig, TrainingError, fit

torch.set_num_threads(1)
CPU = torch.device("cpu")


class Noisy(nn.Module):
    """A small model whose training consumes every RNG the checkpoint must restore."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 8)
        self.drop = nn.Dropout(0.3)
        self.out = nn.Linear(8, 1)

    def forward(self, x):
        return self.out(self.drop(torch.tanh(self.lin(x))))


def _data():
    g = torch.Generator().manual_seed(42)
    x = torch.randn(64, 4, generator=g)
    y = (x[:, :1] + 0.5 * x[:, 1:2] > 0).float()
    return x, y


def _loaders():
    x, y = _data()

    def train_batches(epoch):
        # shuffling with the global torch, numpy and python RNGs on purpose
        order = torch.randperm(64)
        jitter = float(np.random.rand()) * 1e-3 + random.random() * 1e-3
        for i in range(0, 64, 16):
            idx = order[i:i + 16]
            yield {"x": x[idx] + jitter, "y": y[idx]}

    def val_batches():
        yield (x[:32], y[:32])

    return train_batches, val_batches


def _loss(module, batch):
    if isinstance(batch, dict):
        return bce_loss(module(batch["x"]), batch["y"])
    xb, yb = batch
    return bce_loss(module(xb), yb)


class Stop(Exception):
    pass


def test_interrupted_run_resumes_to_bit_identical_weights(tmp_path):
    cfg = TrainConfig(lr=1e-2, max_epochs=8, seed=3)
    train_batches, val_batches = _loaders()

    torch.manual_seed(0)
    ref = Noisy()
    ref_result = fit(ref, _loss, train_batches, val_batches, cfg, CPU, checkpoint_path=tmp_path / "a.pt")

    torch.manual_seed(0)
    interrupted = Noisy()
    seen: list[int] = []

    def stop_after_three(r: EpochResult):
        seen.append(r.epoch)
        if r.epoch == 2:
            raise Stop

    ckpt = tmp_path / "b.pt"
    with pytest.raises(Stop):
        fit(interrupted, _loss, train_batches, val_batches, cfg, CPU, checkpoint_path=ckpt,
            callbacks=[stop_after_three])
    torch.manual_seed(999)  # a new process: other RNG state, fresh weights
    random.seed(5)
    np.random.seed(5)
    resumed = Noisy()
    result = fit(resumed, _loss, train_batches, val_batches, cfg, CPU, checkpoint_path=ckpt,
                 callbacks=[lambda r: seen.append(r.epoch)])

    assert seen == list(range(8))
    ref_sd, res_sd = ref.state_dict(), resumed.state_dict()
    assert all(torch.equal(ref_sd[k], res_sd[k]) for k in ref_sd)
    assert [(h.train_loss, h.val_loss, h.lr) for h in result.history] == \
        [(h.train_loss, h.val_loss, h.lr) for h in ref_result.history]
    assert (result.best_epoch, result.best_val_loss, result.stop_reason) == \
        (ref_result.best_epoch, ref_result.best_val_loss, ref_result.stop_reason)


def test_finished_checkpoint_returns_without_training(tmp_path):
    cfg = TrainConfig(lr=1e-2, max_epochs=2)
    train_batches, val_batches = _loaders()
    model = Noisy()
    first = fit(model, _loss, train_batches, val_batches, cfg, CPU, checkpoint_path=tmp_path / "c.pt")

    def no_training(epoch):
        raise AssertionError("a finished run must not train again")

    other = Noisy()
    again = fit(other, _loss, no_training, val_batches, cfg, CPU, checkpoint_path=tmp_path / "c.pt")
    assert again.epochs_run == first.epochs_run == 2 and again.stop_reason == "max_epochs"
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), other.state_dict().values()))


def test_checkpoint_is_written_before_callbacks(tmp_path):
    cfg = TrainConfig(lr=1e-2, max_epochs=3)
    train_batches, val_batches = _loaders()
    epochs_on_disk = []

    def check(r: EpochResult):
        ck = torch.load(r.checkpoint_path, weights_only=True)
        epochs_on_disk.append(ck["epoch"])

    fit(Noisy(), _loss, train_batches, val_batches, cfg, CPU, checkpoint_path=tmp_path / "d.pt",
        callbacks=[check])
    assert epochs_on_disk == [0, 1, 2]
    assert [p.name for p in tmp_path.iterdir()] == ["d.pt"]  # no temporary left behind


def test_checkpoint_from_other_settings_is_refused(tmp_path):
    train_batches, val_batches = _loaders()
    fit(Noisy(), _loss, train_batches, val_batches, TrainConfig(lr=1e-2, max_epochs=1), CPU,
        checkpoint_path=tmp_path / "e.pt")
    with pytest.raises(TrainingError, match="lr=0.01 there, 0.001 now"):
        fit(Noisy(), _loss, train_batches, val_batches, TrainConfig(lr=1e-3, max_epochs=1), CPU,
            checkpoint_path=tmp_path / "e.pt")


class Scalar(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(()))


def test_plateau_schedule_and_early_stopping_as_keras():
    """Validation loss never improves after epoch 0: LR x0.1 after 4 bad epochs (patience 3),
    stop after 6 bad epochs (patience 6)."""
    model = Scalar()

    def loss_fn(m, batch):
        return (m.w - 5.0) ** 2 if batch == "train" else m.w * 0 + 1.0

    cfg = TrainConfig(lr=1e-2, max_epochs=50)
    r = fit(model, loss_fn, lambda e: ["train"], lambda: ["val"], cfg, CPU)
    assert r.stop_reason == "early_stop" and r.epochs_run == 7 and r.best_epoch == 0
    assert [h.lr for h in r.history] == pytest.approx([1e-2] * 5 + [1e-3] * 2)
    assert model.w.item() == pytest.approx(0.01, abs=1e-6)  # best weights: after epoch 0 (one Adam step)


def test_best_weights_are_restored():
    model = Scalar()
    values = []

    def loss_fn(m, batch):
        # trains toward 5, validated against 1: validation improves, then worsens
        return (m.w - 5.0) ** 2 if batch == "train" else (m.w - 1.0) ** 2

    r = fit(model, loss_fn, lambda e: ["train"], lambda: ["val"], TrainConfig(lr=0.3, max_epochs=30), CPU,
            callbacks=[lambda res: values.append(model.w.item())])
    assert r.stop_reason == "early_stop" and 0 < r.best_epoch < r.epochs_run - 1
    assert model.w.item() == values[r.best_epoch]
    assert r.best_val_loss == min(h.val_loss for h in r.history)


def test_non_finite_loss_names_epoch_and_batch():
    model = Scalar()

    def loss_fn(m, batch):
        return m.w * batch

    def train_batches(epoch):
        return [1.0, float("nan")] if epoch == 1 else [1.0]

    with pytest.raises(TrainingError, match="epoch 1, batch 1"):
        fit(model, loss_fn, train_batches, lambda: [1.0], TrainConfig(lr=1e-2, max_epochs=5), CPU)


def test_only_the_given_parameters_train():
    torch.manual_seed(0)
    model = Noisy()
    frozen = {k: v.clone() for k, v in model.lin.state_dict().items()}
    before_out = model.out.weight.clone()
    train_batches, val_batches = _loaders()
    fit(model, _loss, train_batches, val_batches, TrainConfig(lr=1e-2, max_epochs=2), CPU,
        params=model.out.parameters())
    assert all(torch.equal(frozen[k], v) for k, v in model.lin.state_dict().items())
    assert not torch.equal(before_out, model.out.weight)
    assert all(p.requires_grad for p in model.parameters())  # flags restored


def test_empty_data_is_a_clear_error():
    with pytest.raises(TrainingError, match="yielded no batch"):
        fit(Scalar(), lambda m, b: m.w, lambda e: [], lambda: [1], TrainConfig(lr=1e-2, max_epochs=1), CPU)


def _phantom(size=24, seed=0):
    """A noisy sphere in a brain-like mask (built here, independent of calib.data)."""
    g = np.random.default_rng(seed)
    ax = np.arange(size) - (size - 1) / 2
    r = np.sqrt(ax[:, None, None] ** 2 + ax[None, :, None] ** 2 + ax[None, None, :] ** 2)
    mask = r < size * 0.45
    label = ((np.sqrt((ax[:, None, None] - 2) ** 2 + ax[None, :, None] ** 2
                      + (ax[None, None, :] + 1) ** 2)) < size * 0.2).astype(np.uint8)
    image = np.stack([label * 1.0 + g.normal(0, 0.3, label.shape),
                      label * 0.5 + g.normal(0, 0.3, label.shape)]).astype(np.float32)
    image *= mask
    return torch.from_numpy(image)[None], torch.from_numpy(label)[None], torch.from_numpy(mask)[None]


def test_tiny_unet_overfits_a_phantom_subject():
    torch.manual_seed(0)
    net = UNet3D(UNetConfig.tiny(2, levels=3, base=4))
    image, label, mask = _phantom()
    batch = {"image": image, "label": label, "mask": mask}

    def loss_fn(m, b):
        return bce_loss(m(b["image"], b["mask"]), b["label"], b["mask"])

    r = fit(net, loss_fn, lambda e: [batch], lambda: [batch], TrainConfig(lr=3e-2, max_epochs=15), CPU)
    with torch.no_grad():
        prob = torch.sigmoid(net.eval()(image, mask))
    assert dice(prob, label, mask) > 0.9, r.history[-1]
