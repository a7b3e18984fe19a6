"""Registry: names, typo suggestions, parameter validation, LR axes."""

import pytest

from calib.methods import (
    METHOD_NAMES,
    MethodError,
    build_method,
    default_lr,
    get_method,
    method_has_lr,
)


def test_every_method_is_registered_under_its_name():
    assert METHOD_NAMES[:5] == ("platt", "auxiliary", "finetune", "mc_decoder", "mc_center")
    assert set(METHOD_NAMES) == {"platt", "auxiliary", "finetune", "mc_decoder", "mc_center",
                                 "temperature", "lts", "histogram_binning", "isotonic", "beta", "tta"}
    for name in METHOD_NAMES:
        assert get_method(name).name == name


@pytest.mark.parametrize("typo, suggestion", [("plat", "platt"), ("mc_decodr", "mc_decoder"),
                                              ("temprature", "temperature"), ("fine_tune", "finetune"),
                                              ("isotonc", "isotonic"), ("histogram", "histogram_binning")])
def test_typo_suggests_the_closest_name(typo, suggestion):
    with pytest.raises(MethodError, match=f"did you mean '{suggestion}'"):
        get_method(typo)


def test_unknown_name_lists_the_choices():
    with pytest.raises(MethodError, match="valid choices: platt, auxiliary"):
        get_method("dirichlet")


@pytest.mark.parametrize("name, params, culprit", [
    ("auxiliary", {"k": 3}, "k=3"),
    ("auxiliary", {"k": 13}, "k=13"),
    ("auxiliary", {"dims": 4}, "dims=4"),
    ("platt", {"lr": 0}, "lr=0"),
    ("platt", {"lr": -1e-3}, "lr=-0.001"),
    ("temperature", {"max_epochs": 0}, "max_epochs=0"),
    ("platt", {"batch_size": 2.5}, "batch_size=2.5"),
])
def test_bad_parameter_values_name_key_and_valid_values(name, params, culprit):
    with pytest.raises(MethodError, match=culprit) as err:
        build_method(name, params)
    assert name in str(err.value) and "must be" in str(err.value)


def test_unknown_parameter_suggests_the_closest_key():
    with pytest.raises(MethodError, match="unknown parameter 'kernel'.*valid parameters:"):
        build_method("auxiliary", {"kernel": 5})
    with pytest.raises(MethodError, match="did you mean 'max_epochs'"):
        build_method("platt", {"max_epoch": 5})


def test_bad_base_weights_are_an_error():
    with pytest.raises(MethodError, match="did you mean 'CE-SD'"):
        build_method("platt", weights="CESD")


def test_network_methods_need_a_network_config():
    with pytest.raises(MethodError, match="net_cfg is required"):
        build_method("finetune")


def test_lr_axes_and_defaults_follow_the_paper():
    assert [n for n in METHOD_NAMES if method_has_lr(n)] == ["mc_decoder", "mc_center"]
    assert default_lr("platt") == 5e-3
    assert default_lr("finetune", "CE") == 1e-4
    assert default_lr("finetune", "CE-SD") == default_lr("finetune", "SD") == 1e-3
    with pytest.raises(MethodError, match="did you mean 'platt'"):
        method_has_lr("plat")
    assert default_lr("lts") == 5e-3
    for name in ("isotonic", "histogram_binning", "beta", "tta"):
        with pytest.raises(MethodError, match=f"method '{name}' has no learning rate"):
            default_lr(name)


def test_defaults_are_the_paper_recipe_and_overridable():
    platt = build_method("platt")
    assert platt.params["lr"] == 5e-3 and platt.params["batch_size"] == 64
    assert platt.params["max_epochs"] == 50 and platt.params["early_stop_patience"] == 6
    assert platt.params["lr_patience"] == 3 and platt.params["lr_factor"] == 0.1
    aux = build_method("auxiliary")
    assert aux.params["k"] == 5 and aux.params["dims"] == 2
    assert sum(p.numel() for p in aux.module.parameters()) == 26
    assert sum(p.numel() for p in platt.module.parameters()) == 2
    assert build_method("auxiliary", {"dims": 3}).params["batch_size"] == 2
    assert build_method("platt", {"lr": 1e-2}).params["lr"] == 1e-2
