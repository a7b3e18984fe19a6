"""The study's vocabulary is the one list every room reads: the registry's classes, the method
recipes, the report's order and the training schedules agree with it, and it loads without torch."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest

from calib import vocabulary as V
from calib.methods import METHOD_NAMES, METHODS, build_method, get_method
from calib.methods.recipes import RECIPES, resolve
from calib.nets import UNetConfig
from calib.schedule import TrainConfig

REPO = Path(__file__).resolve().parents[2]


def test_the_registry_holds_exactly_the_vocabularys_methods_in_its_order():
    assert tuple(cls.name for cls in METHODS.values()) == V.METHODS == METHOD_NAMES
    assert tuple(RECIPES) == V.METHODS
    assert V.METHODS[:5] == V.PAPER_METHODS


def test_the_report_orders_every_method():
    from tracking.report.analysis import METHOD_ORDER

    assert set(V.METHODS) <= set(METHOD_ORDER)
    assert METHOD_ORDER == (V.BASE, *V.METHODS)


@pytest.mark.parametrize("name", V.METHODS)
def test_a_method_class_declares_what_its_recipe_says(name):
    cls, recipe = get_method(name), RECIPES[name]
    assert (cls.uses, cls.has_lr, dict(cls.DEFAULTS)) == (recipe.uses, recipe.has_lr, dict(recipe.defaults))
    assert cls.uses in V.USES


@pytest.mark.parametrize("name", V.METHODS)
@pytest.mark.parametrize("weights", V.BASE_WEIGHTS)
def test_resolving_without_a_network_gives_the_built_methods_parameters(name, weights):
    net = UNetConfig.tiny(4, levels=2, base=1)
    schedule = TrainConfig(lr=1e-3, max_epochs=7, lr_patience=2, seed=3)
    params = {"max_epochs": 4} if "max_epochs" in RECIPES[name].defaults else {}
    built = build_method(name, params, weights=weights, net_cfg=net, schedule=schedule)
    assert resolve(name, params, weights, schedule) == built.params


def test_schedule_keys_are_trainconfig_fields():
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    assert set(V.METHOD_TRAIN_KEYS) <= fields and set(V.METHOD_SCHEDULE_KEYS) <= fields
    assert set(V.CALIBRATION_SCHEDULE_KEYS) < set(V.TRAIN_SCHEDULE_KEYS)
    assert set(V.TRAIN_SCHEDULE_KEYS) - set(V.CALIBRATION_SCHEDULE_KEYS) == {"lr", "batch_size"}


def test_the_vocabulary_recipes_and_schedule_load_without_torch():
    code = ("import sys; import calib.vocabulary, calib.methods.recipes, calib.schedule; "
            "print('torch' in sys.modules, 'numpy' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["False", "False"]
