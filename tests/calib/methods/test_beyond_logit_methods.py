"""Local temperature scaling, beta calibration, histogram binning and isotonic regression on cached
phantom logits (numpy-made, no U-Net): segmentation kept, truth approached, monotone maps,
identity on calibrated input, deterministic subsampling, save/load."""

import math

import numpy as np
import pytest
import torch
from scipy.special import expit

import calib.methods.beta as beta_module
from calib.logits import write_index, write_subject_logits
from calib.methods import MethodError, SubjectSet, build_method, load_method
from calib.methods.lts import T_MIN
from calib.methods.closed_form import calibration_voxels
from calib.metrics import ece, nll, p_star_distance

CPU = torch.device("cpu")
FAST = {"batch_size": 8}  # 24 z-slices per test volume (see test_logit_methods.py)


def _sets(logits_dir, ids):
    return (SubjectSet(ids[:8], logits_dir=logits_dir), SubjectSet(ids[8:11], logits_dir=logits_dir),
            SubjectSet(ids[11:], logits_dir=logits_dir))


def _mean_p_star_distance(probs_of, subjects, true):
    return float(np.mean([p_star_distance(probs_of(s), true[s.subject_id], s.mask) for s in subjects]))


def _base(s):
    return expit(s.logits)


# ---- local temperature scaling ------------------------------------------------------------------

def test_lts_keeps_the_segmentation_and_approaches_the_truth(phantom_logits):
    # overconfident base: logits = 3 * logit(p*), labels drawn from p*
    logits_dir, ids, true = phantom_logits(15, scale=3.0)
    train, val, test = _sets(logits_dir, ids)
    method = build_method("lts", FAST)
    result = method.fit(train, val, CPU)
    assert result.epochs_run >= 1 and np.isfinite(result.best_val_loss)
    for s in test:
        prob = method.predict_proba(s)
        np.testing.assert_array_equal((prob > 0.5)[s.mask], (_base(s) > 0.5)[s.mask])
        assert method.temperature_map(s.logits).min() >= T_MIN
    before = _mean_p_star_distance(_base, test, true)
    after = _mean_p_star_distance(method.predict_proba, test, true)
    assert before > 0.1, before  # the base really is far from the truth
    assert after < 0.5 * before, (before, after)
    # the learned temperature is above 1 where the base is overconfident
    t = method.temperature_map(test.subject(ids[11]).logits)[test.subject(ids[11]).mask]
    assert np.median(t) > 1.5


def test_lts_starts_at_the_identity_and_keeps_tiny_logits_on_their_side(tmp_path):
    method = build_method("lts")
    z = np.linspace(-8, 8, 16 * 16 * 4, dtype=np.float32).reshape(16, 16, 4)
    np.testing.assert_allclose(method.calibrated_logits(z), z, rtol=1e-6, atol=1e-6)
    # a sharp temperature (T ~ T_MIN) on logits near 0: float16 cache values of +-6e-8 give a
    # base sigmoid of exactly 0.5 (background) but sigmoid(z / 0.01) > 0.5 -- LTS must not flip them
    with torch.no_grad():
        method.module.head.bias.fill_(-30.0)
    shape = (8, 8, 4)
    logits = np.where(np.indices(shape).sum(0) % 2 == 0, 6e-8, -6e-8).astype(np.float32)
    mask = np.ones(shape, bool)
    write_subject_logits(tmp_path, "s0", logits, np.zeros(shape, np.uint8), mask)
    write_index(tmp_path, ["s0"], shape)
    s = SubjectSet(["s0"], logits_dir=tmp_path).subject("s0")
    assert (expit(method.calibrated_logits(s.logits))[s.logits > 0] > 0.5).all()  # the raw map would flip
    np.testing.assert_array_equal(method.predict_proba(s) > 0.5, expit(s.logits) > 0.5)  # all in mask


# ---- beta calibration ---------------------------------------------------------------------------

def test_beta_is_the_identity_on_calibrated_input(phantom_logits):
    logits_dir, ids, _ = phantom_logits(15, scale=1.0, seed=1)
    train, val, _ = _sets(logits_dir, ids)
    method = build_method("beta")
    result = method.fit(train, val, CPU)
    assert result.epochs_run == 0 and result.stop_reason == "closed_form"
    a, b, c = method.abc
    assert abs(a - 1) < 0.1 and abs(b - 1) < 0.1 and abs(c) < 0.1, (a, b, c)


def _write_beta_distorted(out, n, a, b, c, seed=0, shape=(32, 32, 24)):
    """Base logits z (a smooth field, std 2) with labels drawn from the beta map of sigmoid(z)."""
    from scipy.ndimage import gaussian_filter

    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij"))
    mask = (grid ** 2).sum(0) < 0.9
    ids = []
    for i in range(n):
        z = gaussian_filter(rng.standard_normal(shape), 3)
        z *= 2.0 / z.std()
        q = expit(a * np.log(expit(z)) - b * np.log(expit(-z)) + c)
        sid = f"beta{i:03d}"
        write_subject_logits(out, sid, z, (rng.random(shape) < q).astype(np.uint8), mask)
        ids.append(sid)
    write_index(out, ids, shape)
    return ids


def test_beta_map_formula_and_monotonicity_rule():
    method = build_method("beta")
    method._set_state({"abc": torch.tensor([1.0, 1.0, 0.0], dtype=torch.float64)})
    z = np.linspace(-30, 30, 601)
    np.testing.assert_allclose(method.map_logits(z), expit(z), rtol=1e-12)  # the identity
    method._set_state({"abc": torch.tensor([0.5, 2.0, 0.3], dtype=torch.float64)})
    p = expit(z)
    np.testing.assert_allclose(method.map_logits(z)[250:350],
                               expit(0.5 * np.log(p) - 2.0 * np.log(1 - p) + 0.3)[250:350], rtol=1e-9)
    # labels that rise with p near 0 and fall near 1: the unconstrained fit gives b < 0; Kull et
    # al.'s rule drops that term and the map stays non-decreasing
    rng = np.random.default_rng(0)
    zz = rng.normal(0, 2, 20000)
    pp = expit(zz)
    yy = (rng.random(zz.size) < expit(0.8 * np.log(pp) + 0.7 * np.log(1 - pp) + 0.5)).astype(np.uint8)
    (a_free, b_free), _ = beta_module._logistic(beta_module.beta_features(zz), yy)
    assert b_free < 0 < a_free
    method._set_state(method.fit_map(zz, yy))
    a, b, c = method.abc
    assert b == 0.0 and a > 0, (a, b, c)
    assert (np.diff(method.map_logits(np.sort(zz))) >= 0).all()
    # labels that fall with p everywhere: both terms go, the map is the base rate
    yy = (rng.random(zz.size) < expit(-zz)).astype(np.uint8)
    method._set_state(method.fit_map(zz, yy))
    assert method.abc[:2] == (0.0, 0.0)
    np.testing.assert_allclose(method.map_logits(zz), yy.mean(), rtol=1e-12)
    with pytest.raises(MethodError, match="only label 0"):
        method.fit_map(zz, np.zeros(zz.size, np.uint8))


def test_beta_recovers_an_asymmetric_distortion(tmp_path):
    # a map Platt scaling cannot express (different slopes near 0 and near 1)
    ids = _write_beta_distorted(tmp_path, 15, a=0.5, b=2.0, c=0.3)
    train, val, test = _sets(tmp_path, ids)
    method = build_method("beta")
    method.fit(train, val, CPU)
    a, b, c = method.abc
    assert abs(a - 0.5) < 0.1 and abs(b - 2.0) < 0.2 and abs(c - 0.3) < 0.1, (a, b, c)
    platt = build_method("platt", FAST)
    platt.fit(train, val, CPU)
    mean_ece = lambda f: np.mean([ece(f(s), s.label, s.mask) for s in test])  # noqa: E731
    assert mean_ece(method.predict_proba) < mean_ece(platt.predict_proba)


# ---- histogram binning and isotonic regression --------------------------------------------------

@pytest.mark.parametrize("name", ["histogram_binning", "isotonic", "beta"])
def test_closed_form_maps_are_monotone_and_approach_the_truth(phantom_logits, name):
    logits_dir, ids, true = phantom_logits(15, scale=3.0)
    train, val, test = _sets(logits_dir, ids)
    method = build_method(name)
    result = method.fit(train, val, CPU)
    assert result.epochs_run == 0 and result.best_epoch == 0 and result.history == []
    assert result.stop_reason == "closed_form"
    mapped = method.map_logits(np.linspace(-30, 30, 10001))
    assert (np.diff(mapped) >= 0).all() and mapped.min() >= 0 and mapped.max() <= 1
    before = _mean_p_star_distance(_base, test, true)
    after = _mean_p_star_distance(method.predict_proba, test, true)
    assert after < 0.5 * before, (before, after)
    # best_val_loss is the BCE of the fitted map over the validation voxels
    q = np.concatenate([method.predict_proba(s)[s.mask] for s in val])
    y = np.concatenate([s.label[s.mask] for s in val])
    assert result.best_val_loss == pytest.approx(nll(q, y), rel=1e-5)


def test_histogram_binning_hand_worked():
    # equal-mass bins, and no minimum count: four voxels would otherwise be a single bin
    method = build_method("histogram_binning", {"n_bins": 2, "binning": "equal_mass", "min_bin_count": 1})
    p = np.array([0.1, 0.2, 0.3, 0.4])
    method._set_state(method.fit_probabilities(p, np.array([0, 0, 1, 1])))
    # equal-mass edges 0.1, 0.25, 0.4: bins [.., 0.25) -> 0/2, [0.25, ..) -> 2/2, left-closed
    np.testing.assert_array_equal(method.apply(np.array([0.0, 0.2499, 0.25, 0.9])), [0, 0, 1, 1])
    assert method.state_dict()["inner_edges"].tolist() == [0.25]


def test_histogram_binning_bins_hold_equal_mass(phantom_logits):
    logits_dir, ids, _ = phantom_logits(4, scale=3.0)
    train = SubjectSet(ids, logits_dir=logits_dir)
    method = build_method("histogram_binning", {"n_bins": 10, "binning": "equal_mass"})
    method.fit(train, train, CPU)
    p = expit(calibration_voxels(train, 10**9, 0)[0])
    edges = method.state_dict()["inner_edges"].numpy()
    counts = np.bincount(np.searchsorted(edges, p, side="right"), minlength=10)
    assert counts.size == 10 and np.abs(counts - p.size / 10).max() <= 0.01 * p.size


def test_isotonic_predicts_as_sklearn_does(phantom_logits):
    from sklearn.isotonic import IsotonicRegression

    logits_dir, ids, _ = phantom_logits(4, scale=3.0)
    train, val = SubjectSet(ids[:3], logits_dir=logits_dir), SubjectSet(ids[3:], logits_dir=logits_dir)
    method = build_method("isotonic", {"max_voxels": 20000})
    method.fit(train, val, CPU)
    z, y = calibration_voxels(train, 20000, 0)
    p = expit(z)
    ref = IsotonicRegression(y_min=0, y_max=1, out_of_bounds="clip").fit(p, y.astype(float))
    s = val.subject(ids[3])
    base = expit(s.logits.astype(np.float64))
    np.testing.assert_allclose(method.predict_proba(s)[s.mask], ref.predict(base[s.mask]), atol=1e-6)
    grid = np.linspace(-0.1, 1.1, 1001).clip(0, 1)
    np.testing.assert_allclose(method.apply(grid), ref.predict(grid), atol=1e-12)


def test_subsampling_is_deterministic_and_sized(phantom_logits):
    logits_dir, ids, _ = phantom_logits(6, scale=3.0)
    train = SubjectSet(ids, logits_dir=logits_dir)
    total = sum(int(s.mask.sum()) for s in train)
    p1, y1 = calibration_voxels(train, 5000, seed=0)
    p2, y2 = calibration_voxels(train, 5000, seed=0)
    p3, _ = calibration_voxels(train, 5000, seed=1)
    np.testing.assert_array_equal(p1, p2)
    np.testing.assert_array_equal(y1, y2)
    assert not np.array_equal(p1, p3)
    assert abs(p1.size - 5000) < 5 * math.sqrt(5000) and total > 10 * 5000
    assert calibration_voxels(train, 10**9, 0)[0].size == total
    a = build_method("isotonic", {"max_voxels": 5000})
    b = build_method("isotonic", {"max_voxels": 5000})
    a.fit(train, train, CPU)
    b.fit(train, train, CPU)
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k])


@pytest.mark.parametrize("name", ["lts", "beta", "histogram_binning", "isotonic"])
def test_save_load_gives_identical_predictions(phantom_logits, tmp_path, name):
    logits_dir, ids, _ = phantom_logits(4, scale=3.0)
    train, val = SubjectSet(ids[:2], logits_dir=logits_dir), SubjectSet(ids[2:3], logits_dir=logits_dir)
    params = {"max_epochs": 2, **FAST} if name == "lts" else {}
    method = build_method(name, params)
    method.fit(train, val, CPU)
    path = method.save(tmp_path / "m" / "method.pt")
    loaded = load_method(path)
    assert type(loaded) is type(method) and loaded.params == method.params
    assert loaded.describe() == method.describe()
    subject = SubjectSet(ids[3:], logits_dir=logits_dir).subject(ids[3])
    np.testing.assert_array_equal(loaded.predict_proba(subject), method.predict_proba(subject))


def test_closed_form_errors_name_the_problem(phantom_logits, tmp_path):
    method = build_method("isotonic")
    logits_dir, ids, _ = phantom_logits(2, scale=1.0)
    with pytest.raises(MethodError, match="has not been fitted"):
        method.predict_proba(SubjectSet(ids, logits_dir=logits_dir).subject(ids[0]))
    with pytest.raises(MethodError, match="reads logits but the SubjectSet has no logits_dir"):
        method.fit(SubjectSet(ids, cache_dir=tmp_path), SubjectSet(ids, cache_dir=tmp_path), CPU)
    with pytest.raises(MethodError, match="n_bins=1 is invalid"):
        build_method("histogram_binning", {"n_bins": 1})
    with pytest.raises(MethodError, match="unknown parameter 'lr'"):
        build_method("isotonic", {"lr": 1e-3})
    saved = build_method("histogram_binning")
    saved._set_state(saved.fit_probabilities(np.array([0.1, 0.9]), np.array([0, 1])))
    path = saved.save(tmp_path / "hb.pt")
    payload = torch.load(path, weights_only=True)
    payload["state"] = {"values": payload["state"]["values"]}
    torch.save(payload, path)
    with pytest.raises(MethodError, match="saved state does not fit method 'histogram_binning'"):
        load_method(path)


def test_lts_initial_weights_do_not_depend_on_what_ran_before():
    # A Ray worker is reused across trials: the global RNG state at construction differs.
    torch.manual_seed(1)
    first = build_method("lts").module.state_dict()
    torch.rand(1000)
    torch.manual_seed(2)
    second = build_method("lts").module.state_dict()
    assert all(torch.equal(first[k], second[k]) for k in first)
    # and the global RNG is left as it was (the init draws from a forked one)
    torch.manual_seed(3)
    build_method("lts")
    after_build = torch.rand(3)
    torch.manual_seed(3)
    assert torch.equal(torch.rand(3), after_build)
