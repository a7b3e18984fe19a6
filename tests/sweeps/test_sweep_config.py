"""Grid files -> frozen GridConfig: defaults, data roots, and one clear error line per mistake
(exit status 2 from the command line, before Ray starts)."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from support.ports import free_port

from sweeps.cli import main, parse_data_roots
from sweeps.grid import GridError, Overrides, load_grid

REPO = Path(__file__).resolve().parents[2]


def _paper(**changes) -> dict:
    raw = yaml.safe_load((REPO / "sweeps/grids/paper.yaml").read_text())
    raw.update(changes)
    return raw


def _write(tmp_path: Path, raw: dict) -> str:
    path = tmp_path / "g.yaml"
    path.write_text(yaml.safe_dump(raw))
    return str(path)


def test_paper_grid_reads_the_papers_axes():
    grid = load_grid("paper", require_data=False, env={})
    assert [d.name for d in grid.datasets] == ["brats18", "isles18"]
    assert grid.weights == ("CE", "CE-SD", "SD") and grid.folds.n_folds == 5
    methods = {m.name: m for m in grid.methods}
    # the paper's five first, then the methods beyond the paper
    assert list(methods) == ["platt", "auxiliary", "finetune", "mc_decoder", "mc_center",
                             "temperature", "lts", "beta", "histogram_binning", "isotonic", "tta"]
    assert methods["mc_center"].lrs == (1e-3, 1e-4, 1e-5)
    assert dict(methods["finetune"].lr_by_weights) == {"CE": 1e-4, "CE-SD": 1e-3, "SD": 1e-3}
    assert methods["auxiliary"].params["k"] == 5
    assert grid.preprocessing.shape == (136, 136, 82) and grid.preprocessing.spacing == 2.0
    assert grid.execution.resources_for("calibrate", "platt").gpu == 0.25
    assert grid.execution.resources_for("calibrate", "mc_decoder").gpu == 0.5
    with pytest.raises(dataclasses.FrozenInstanceError):
        grid.seed = 1
    with pytest.raises(TypeError):
        grid.training["base"]["lr"] = 1.0  # read-only mapping


def test_resolved_grid_round_trips(tmp_path):
    grid = load_grid("demo", Overrides(work_dir=str(tmp_path)))
    again = load_grid(_write(tmp_path, yaml.safe_load(grid.to_yaml())))
    assert again.to_dict() == grid.to_dict()


def test_data_root_precedence(tmp_path):
    (tmp_path / "env" / "brats18").mkdir(parents=True)
    (tmp_path / "cli" / "brats18").mkdir(parents=True)
    (tmp_path / "one").mkdir()
    raw = _paper(datasets=["brats18"])
    path = _write(tmp_path, raw)
    env = {"CALIB_DATA_ROOT": str(tmp_path / "env")}
    assert load_grid(path, env=env).dataset("brats18").root == tmp_path / "env" / "brats18"
    ov = Overrides(data_roots={"*": str(tmp_path / "cli")})
    assert load_grid(path, ov, env=env).dataset("brats18").root == tmp_path / "cli" / "brats18"
    ov = Overrides(data_roots={"*": str(tmp_path / "cli"), "brats18": str(tmp_path / "one")})
    assert load_grid(path, ov, env=env).dataset("brats18").root == tmp_path / "one"
    assert parse_data_roots(["/d", "isles18=/i"]) == {"*": "/d", "isles18": "/i"}


@pytest.mark.parametrize("change, expected", [
    ({"datasets": ["brats18", "brats19"]}, ["datasets", "'brats19'", "did you mean 'brats18'", "isles18"]),
    ({"weights": ["CE", "CE-DS"]}, ["weights", "'CE-DS'", "did you mean", "CE-SD"]),
    ({"methods": {"platt": {}, "mc_decodr": {}}}, ["mc_decodr", "did you mean 'mc_decoder'", "valid choices"]),
    ({"methods": {"mc_decoder": {"lr": [1e-3, 0]}}}, ["methods.mc_decoder.lr", "> 0", "0"]),
    ({"methods": {"mc_decoder": {"lr": [-1e-3]}}}, ["methods.mc_decoder.lr", "> 0"]),
    ({"methods": {"platt": {"lr": [1e-3]}}}, ["methods.platt.lr", "no learning-rate axis", "mc_decoder"]),
    ({"methods": {"auxiliary": {"params": {"k": 4}}}}, ["auxiliary", "k=4", "(1, 5, 7, 9, 11)"]),
    ({"protocl": "paper"}, ["protocl", "did you mean 'protocol'", "valid keys"]),
    ({"protocol": "fair"}, ["protocol", "'fair'", "honest, two_way, paper"]),
    ({"training": {**_paper()["training"], "base": {"lr": 1e-3, "max_epochs": 3, "epochs": 4}}},
     ["training.base.epochs", "max_epochs"]),
    ({"training": {**_paper()["training"], "calibrate": {"lr_factor": 2.0, "max_epochs": 3}}},
     ["training.calibrate", "lr_factor"]),
    ({"resources": {"calibrate": {"gpus": 1}}}, ["resources.calibrate.gpus", "did you mean 'gpu'"]),
])
def test_bad_grid_is_one_clear_line(tmp_path, change, expected):
    with pytest.raises(GridError) as info:
        load_grid(_write(tmp_path, _paper(**change)), require_data=False, env={})
    message = str(info.value)
    assert "\n" not in message and "g.yaml" in message
    for part in expected:
        assert part in message, message


def test_missing_data_root_names_the_fixes(tmp_path):
    with pytest.raises(GridError, match=r"--data-root.*CALIB_DATA_ROOT"):
        load_grid("paper", env={})
    with pytest.raises(GridError, match=r"does not exist: .*nowhere/brats18"):
        load_grid("paper", Overrides(data_roots={"*": str(tmp_path / "nowhere")}), env={})


def test_unknown_grid_name_lists_the_grids():
    with pytest.raises(GridError, match=r"'papr'.*did you mean 'paper'.*demo, external-example, paper"):
        load_grid("papr")


def test_cli_bad_grid_exits_2_with_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("CALIB_DATA_ROOT", raising=False)
    monkeypatch.chdir(tmp_path)
    path = _write(tmp_path, _paper(weights=["CE", "XE"]))
    assert main(["--grid", path]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("error: ") and "'XE'" in err
    assert not (tmp_path / "mlflow.db").exists()  # nothing started
    with pytest.raises(SystemExit) as info:
        main(["--grid", "paper", "--max-concurrent", "0"])
    assert info.value.code == 2


def test_paper_dry_run_counts_without_data_or_ray(tmp_path):
    env = {k: v for k, v in __import__("os").environ.items()
           if k not in ("CALIB_DATA_ROOT", "MLFLOW_TRACKING_URI", "RAY_ADDRESS")}
    proc = subprocess.run([sys.executable, str(REPO / "sweeps/launch.py"), "--grid", "paper", "--dry-run"],
                          cwd=tmp_path, capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "10 pretrain + 30 base + 450 calibrate = 490 trials" in out
    rows = {line.split()[1]: line.split() for line in out.splitlines()
            if line.split()[:1] in (["pretrain"], ["base"], ["calibrate"])}
    assert {m: int(r[2]) for m, r in rows.items()} == {
        "pretrain": 10, "base": 30, "platt": 30, "auxiliary": 30, "finetune": 30,
        "mc_decoder": 90, "mc_center": 90, "temperature": 30, "lts": 30, "beta": 30,
        "histogram_binning": 30, "isotonic": 30, "tta": 30}
    assert "cpu 2, gpu 0.25" in rows["platt"][3] + " " + " ".join(rows["platt"][4:])
    assert "dry run: nothing started" in out
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "calib_store").exists()


def test_unreachable_tracking_server_exits_2_before_ray(tmp_path, capsys, monkeypatch):
    import sweeps.run.cluster

    monkeypatch.setattr(sweeps.run.cluster, "connect_ray", lambda *a, **k: pytest.fail("Ray was started"))
    monkeypatch.chdir(tmp_path)
    uri = f"http://127.0.0.1:{free_port()}"
    assert main(["--grid", "demo", "--tracking-uri", uri]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and uri in err and "unreachable" in err


def test_the_papers_code_settings_are_options_of_the_grid(tmp_path):
    grid = load_grid("paper", require_data=False, env={})
    assert grid.protocol == "honest" and grid.calib_fraction == 0.2 and grid.val_fraction == 0.2
    assert grid.preprocessing.normalisation == "fixed"
    assert grid.network.weight_decay_for("brats18") == 1e-5 and grid.network.weight_decay_for("isles18") == 0
    raw = _paper(protocol="paper", folds={"n_folds": 5, "file": "paper"},
                 network={"preset": "paper", "weight_decay": 2e-5},
                 preprocessing={"normalisation": "subject"})
    grid = load_grid(_write(tmp_path, raw), require_data=False, env={})
    assert grid.folds.is_paper and grid.protocol == "paper"
    assert grid.network.weight_decay_for("isles18") == 2e-5 and grid.preprocessing.normalisation == "subject"
    again = load_grid(_write(tmp_path, yaml.safe_load(grid.to_yaml())), require_data=False, env={})
    assert again.to_dict() == grid.to_dict()


def test_the_papers_code_settings_change_the_trial_keys(tmp_path):
    from sweeps.plan import expand

    def keys(**change):
        return {(t.stage, t.dataset, t.weights, t.method, t.fold, t.lr): t.key
                for t in expand(load_grid(_write(tmp_path, _paper(**change)), require_data=False, env={})).trials}

    base = keys()
    for change in ({"calib_fraction": 0.3}, {"protocol": "two_way"},
                   {"preprocessing": {"normalisation": "subject"}}):
        other = keys(**change)
        assert other.keys() == base.keys() and not set(other.values()) & set(base.values()), change
    # no L2 penalty: every BraTS trial changes, ISLES (none in the paper grid either) does not
    other = keys(network={"preset": "paper", "weight_decay": 0.0})
    for k, key in base.items():
        assert (other[k] != key) == (k[1] == "brats18"), k
    # the L2 penalty reaches the stages that train U-Net layers, per dataset
    plan = expand(load_grid("paper", require_data=False, env={}))
    brats = next(t for t in plan.trials if t.stage == "base" and t.dataset == "brats18")
    isles = next(t for t in plan.trials if t.stage == "base" and t.dataset == "isles18")
    assert brats.config["train"]["weight_decay"] == 1e-5 and "weight_decay" not in isles.config["train"]


@pytest.mark.parametrize("change, expected", [
    ({"preprocessing": {"normalisation": "zscore"}}, ["preprocessing.normalisation", "'zscore'", "subject, fixed"]),
    ({"network": {"preset": "paper", "weight_decay": {"brats19": 1e-5}}},
     ["network.weight_decay.brats19", "did you mean 'brats18'"]),
    ({"network": {"preset": "paper", "weight_decay": -1}}, ["network.weight_decay", ">= 0"]),
    ({"calib_fraction": 0.9}, ["calib_fraction", "val_fraction + calib_fraction must be < 1"]),
    ({"folds": {"n_folds": 3, "file": "paper"}}, ["folds.n_folds", "the paper's folds are 5"]),
    ({"folds": {"file": "nowhere.json"}}, ["folds.file", "does not exist", "'paper'"]),
])
def test_bad_paper_code_settings_are_one_clear_line(tmp_path, change, expected):
    with pytest.raises(GridError) as info:
        load_grid(_write(tmp_path, _paper(**change)), require_data=False, env={})
    for part in expected:
        assert part in str(info.value), str(info.value)


def test_folds_only_runs_a_subset_of_the_same_split(tmp_path):
    from sweeps.plan import expand

    full = expand(load_grid("paper", require_data=False, env={}))
    raw = _paper(folds={"n_folds": 5, "seed": 0, "only": [0, 3]})
    part = expand(load_grid(_write(tmp_path, raw), require_data=False, env={}))
    assert {t.fold for t in part.trials} == {0, 3}
    # the same trials as the full study's, keys included (a pilot's results count for it)
    assert {t.key for t in part.trials} == {t.key for t in full.trials if t.fold in (0, 3)}
    with pytest.raises(GridError, match="folds.only: must list distinct folds of 0..4"):
        load_grid(_write(tmp_path, _paper(folds={"n_folds": 5, "only": [5]})), require_data=False, env={})


def test_paper_smoke_grid_is_the_paper_grid_cut_in_size():
    smoke = load_grid("paper-smoke", require_data=False, env={})
    paper = load_grid("paper", require_data=False, env={})
    assert [d.name for d in smoke.datasets] == [d.name for d in paper.datasets]
    assert smoke.network == paper.network and smoke.preprocessing.shape == paper.preprocessing.shape
    assert smoke.weights == paper.weights and [m.name for m in smoke.methods] == [m.name for m in paper.methods]
    assert smoke.folds.run_folds() == (0,)
    assert {d.phantom.shape for d in smoke.datasets} == {(240, 240, 155), (256, 256, 8)}


def test_phantom_label_noise_is_a_grid_key_of_the_trial_keys(tmp_path):
    from sweeps.plan import expand

    raw = yaml.safe_load((REPO / "sweeps/grids/paper-smoke.yaml").read_text())
    iid = load_grid("paper-smoke", require_data=False, env={})
    assert {d.phantom.label_noise for d in iid.datasets} == {"iid"}  # the default
    for ds in raw["datasets"].values():
        ds["phantom"]["label_noise"] = "correlated"
    corr = load_grid(_write(tmp_path, raw), require_data=False, env={})
    assert {d.phantom.label_noise for d in corr.datasets} == {"correlated"}
    # other labels are other data: no trial of one is reused for the other
    assert not {t.key for t in expand(iid).trials} & {t.key for t in expand(corr).trials}
    for ds in raw["datasets"].values():
        ds["phantom"]["label_noise"] = "speckled"
    with pytest.raises(GridError, match="label noise 'speckled'.*valid choices: iid, correlated"):
        load_grid(_write(tmp_path, raw), require_data=False, env={})


def test_the_launch_writes_phantoms_with_the_grids_label_noise(tmp_path):
    import json

    from calib.data.phantom import RECIPE_NAME
    from sweeps.grid import DatasetSpec, PhantomSpec
    from sweeps.run.data_prep import ensure_phantoms

    spec = DatasetSpec("isles18", tmp_path / "isles",
                       PhantomSpec(subjects=2, seed=0, shape=(32, 32, 4), label_noise="correlated"))
    ensure_phantoms(spec)
    assert json.loads((tmp_path / "isles" / RECIPE_NAME).read_text())["label_noise"] == "correlated"


def test_the_demo_tests_on_twelve_subjects_and_fits_on_two(tmp_path):
    """Issue 20: the demo's verdicts rest on >= 12 test subjects per dataset and >= 2 val and
    >= 2 calibration subjects per fold (the split rule itself, on the demo's own settings)."""
    from calib.data import make_folds
    from calib.stages import make_split

    demo = load_grid("demo", require_data=False, env={})
    for d in demo.datasets:
        ids = [f"s{i:02d}" for i in range(d.phantom.subjects)]
        folds = make_folds(ids, demo.folds.n_folds, demo.folds.seed)
        for fold in demo.folds.run_folds():
            s = make_split(tmp_path, folds, fold, demo.protocol, demo.seed, demo.val_fraction,
                           demo.calib_fraction)
            assert len(s.test_ids) >= 12 and len(s.val_ids) >= 2 and len(s.calib_ids) >= 2, d.name


def _without_finetune(raw: dict) -> dict:
    """The paper grid less fine-tuning, whose LRs by weights name only the paper's three."""
    raw["methods"].pop("finetune")
    raw.get("resources", {}).get("methods", {}).pop("finetune", None)
    return raw


@pytest.mark.parametrize("losses, expected", [
    ({"focal": {"gama": 3}}, r"losses\.focal: loss 'focal': unknown parameter 'gama'; valid: gamma"),
    ({"focal": {"gamma": -1}}, r"losses\.focal: .*must be >= 0"),
    ({"svls": {"sigma": 2}}, r"losses\.svls: sets parameters of weights 'svls', which the grid does not train"),
    ({"CE": {}}, r"losses\.CE: 'CE' has no loss parameters; valid: focal, svls, ace"),
])
def test_bad_loss_parameters_are_one_clear_line(tmp_path, losses, expected):
    raw = _paper(weights=["CE-SD", "focal"], losses=losses)
    _without_finetune(raw)
    with pytest.raises(GridError, match=expected):
        load_grid(_write(tmp_path, raw), require_data=False, env={})


def test_loss_parameters_go_to_the_base_trials_and_their_keys(tmp_path):
    from sweeps.plan import expand

    raw = _without_finetune(_paper(weights=["CE-SD", "focal", "svls"]))
    default = expand(load_grid(_write(tmp_path, raw), require_data=False, env={}))
    raw["losses"] = {"focal": {"gamma": 3}}
    grid = load_grid(_write(tmp_path, raw), require_data=False, env={})
    assert yaml.safe_load(grid.to_yaml())["losses"] == {"focal": {"gamma": 3}}
    changed = expand(grid)
    base = {t.weights: t for t in changed.trials if t.stage == "base" and t.fold == 0}
    assert base["focal"].params == {"gamma": 3.0} and base["svls"].params["sigma"] == 1.0
    assert base["CE-SD"].params == {}
    # only the focal branch (its base models and what calibrates them) gets new keys
    old = {t.key for t in default.trials}
    moved = {(t.stage, t.weights) for t in changed.trials if t.key not in old}
    assert moved == {("base", "focal"), ("calibrate", "focal")}
