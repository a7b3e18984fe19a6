"""Train-time calibration losses as base weights: each trains from the CE pretraining, records its
loss parameters, and a bad parameter is a clear error."""

import pytest
import torch

from calib.data import make_folds, preprocess_dataset, write_phantoms
from calib.nets import UNetConfig
from calib.stages import StageError, make_split, run_base, run_pretrain
from calib.training import TrainConfig
from calib.vocabulary import BASE_WEIGHTS, PAPER_WEIGHTS, PRETRAINED_WEIGHTS, TRAIN_TIME_WEIGHTS

CPU = torch.device("cpu")
NET = UNetConfig.tiny(4, levels=3, base=2)
ONE_EPOCH = TrainConfig(lr=3e-3, max_epochs=1, batch_size=2)


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("train_time")
    ids = write_phantoms("brats18", root / "raw", 6, seed=0, shape=(48, 48, 36))
    cache = preprocess_dataset("brats18", root / "raw", root / "pp", shape=(24, 24, 18),
                               workers=1, progress=False)
    split = make_split(cache, make_folds(ids, 3, seed=0), 0)
    return split, run_pretrain(NET, ONE_EPOCH, split, root / "pretrain", CPU)


def test_vocabulary_keeps_the_paper_weights_first():
    assert BASE_WEIGHTS[:3] == PAPER_WEIGHTS == ("CE", "CE-SD", "SD")
    assert set(TRAIN_TIME_WEIGHTS) <= set(PRETRAINED_WEIGHTS) and "SD" not in PRETRAINED_WEIGHTS


@pytest.mark.parametrize("weights, params, expected", [
    ("focal", None, {"loss.gamma": 2.0}),
    ("svls", {"sigma": 0.5}, {"loss.sigma": 0.5, "loss.size": 3, "loss.centre": "gaussian"}),
    ("ace", {"weight": 0.3}, {"loss.weight": 0.3, "loss.n_bins": 20}),
])
def test_each_train_time_loss_trains_a_base_model(pretrained, tmp_path, weights, params, expected):
    split, pre = pretrained
    result = run_base(weights, NET, ONE_EPOCH, split, tmp_path, CPU, init_weights=pre.weights,
                      loss_params=params)
    assert result.params["loss"] == weights and result.params["init"] == "pretrain"
    assert {k: v for k, v in result.params.items() if k.startswith("loss.")} == expected
    assert (tmp_path / "logits" / "index.json").is_file()
    assert result.per_subject["dice"].between(0, 1).all()
    # the weights moved away from the pretraining
    before = torch.load(pre.weights, map_location="cpu")
    after = torch.load(result.weights, map_location="cpu")
    state = lambda s: s.get("state_dict", s) if isinstance(s, dict) else s  # noqa: E731
    assert any(not torch.equal(state(before)[k], state(after)[k]) for k in state(after)
               if torch.is_tensor(state(after)[k]) and state(after)[k].is_floating_point())


def test_train_time_weights_need_the_pretraining_and_valid_params(pretrained, tmp_path):
    split, pre = pretrained
    with pytest.raises(StageError, match="init_weights is required"):
        run_base("focal", NET, ONE_EPOCH, split, tmp_path, CPU, init_weights=None)
    with pytest.raises(StageError, match=r"base svls: loss 'svls': unknown parameter 'gamma'"):
        run_base("svls", NET, ONE_EPOCH, split, tmp_path, CPU, init_weights=pre.weights,
                 loss_params={"gamma": 2})
