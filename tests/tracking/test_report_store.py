"""Fixture data, no tests: a real MLflow store (SQLite) of fabricated sweep runs with known answers.

Subjects i = 0..15 (brats18; folds 0 and 1 hold 8 each) have reference values
ref_dice = 0.70 + 0.01 i, ref_ece = 0.030 + 0.001 i and a jitter (i + 1)·1e-5 that keeps every
paired difference distinct (so scipy uses the exact null distribution). Per method, values are the
reference plus offsets chosen so that:

brats18 / CE
  * Dice: best = mc_decoder (lr 1e-4, the lowest mean best_val_loss). Against it, platt's
    differences have signed ranks with W+ = 30 (p = 0.0507, bold) and auxiliary's W+ = 29
    (p = 0.0443, not bold); base is below on every subject (p = 2/2^16).
  * ECE: best = platt; auxiliary differs by ±k·1e-4 (+1e-6 on the positive side), far from
    significant (bold); mc_decoder and base are above on every subject.
  * mc_decoder lr 1e-3 has the higher Dice, so --select-by dice picks it.
brats18 / SD
  * platt lacks subject 15 (missing-subject warning; tests run on 15 subjects, p = 2/2^15).
  * mc_center: lr 1e-4 selected; lr 1e-5 has the lowest val loss but ran on fold 0 only, so it is
    left out with a warning; --select-by dice picks 1e-3.
  * Dice best = mc_center, ECE best = platt.
  Pareto over brats18: SD platt and SD mc_center; within CE: platt and mc_decoder.
isles18 / CE (phantoms: per_subject.csv has true_ce), 8 subjects, 4 per fold
  * base, finetune (lr 0.0001 only), mc_center searched by Optuna with different LRs per fold:
    fold0 → 0.00072, fold1 → 2.1e-05 (lowest val loss each). finetune is best on both metrics,
    every other method worse on every subject (p = 2/2^8), and alone on the front.

Launch history: sweep run 1 (older) holds most trials, a FAILED attempt later retried, a
brats18/CE/finetune trial that only failed, and a stale FINISHED attempt;
sweep run 2 (a resumed launch, newer) re-ran brats18/CE/base fold 1 and ran every isles18 trial.
Experiment "broken" has a trial run without reliability_bins.csv.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from mlflow.tracking import MlflowClient

N = 16
REF_DICE = 0.70 + 0.01 * np.arange(N)
REF_ECE = 0.030 + 0.001 * np.arange(N)
JITTER = (np.arange(N) + 1) * 1e-5


def signed_ranks(positive: set[int]) -> np.ndarray:
    """Differences of magnitude k·1e-4 for subject k−1, positive for ranks in ``positive``."""
    k = np.arange(1, N + 1)
    return np.where(np.isin(k, list(positive)), k, -k) * 1e-4


def near_zero_pairs() -> np.ndarray:
    """Pairs (−k·1e-4, +k·1e-4 + 1e-6), k = 1..8: W+ = 72, W− = 64, p far above 0.05."""
    out = np.empty(N)
    for k in range(1, 9):
        out[2 * k - 2] = -k * 1e-4
        out[2 * k - 1] = k * 1e-4 + 1e-6
    return out


D_BEST_CE = REF_DICE + 0.020
E_PLATT_CE = REF_ECE - 0.010
# (dice, ece) per subject of each brats18 cell; a NaN marks a subject the method lacks.
BRATS = {
    ("CE", "base", ""): (REF_DICE - JITTER, REF_ECE + JITTER),
    ("CE", "platt", ""): (D_BEST_CE + signed_ranks({16, 14}), E_PLATT_CE),
    ("CE", "auxiliary", ""): (D_BEST_CE + signed_ranks({16, 13}), E_PLATT_CE + near_zero_pairs()),
    ("CE", "mc_decoder", "0.0001"): (D_BEST_CE, E_PLATT_CE + 0.002 + JITTER),
    ("CE", "mc_decoder", "0.001"): (REF_DICE + 0.025, REF_ECE - 0.006),
    ("SD", "base", ""): (REF_DICE + 0.05 - JITTER, REF_ECE + 0.005 + JITTER),
    ("SD", "platt", ""): (np.append((REF_DICE + 0.049 - 2 * JITTER)[:15], np.nan),
                          np.append((REF_ECE - 0.015)[:15], np.nan)),
    ("SD", "mc_center", "0.0001"): (REF_DICE + 0.053, REF_ECE + 0.004 - JITTER),
    ("SD", "mc_center", "0.001"): (REF_DICE + 0.054, REF_ECE + 0.005),
    ("SD", "mc_center", "1e-05"): (REF_DICE + 0.060, REF_ECE),  # fold 0 only
}
VAL_LOSS = {  # per fold
    ("CE", "mc_decoder", "0.0001"): (0.20, 0.22), ("CE", "mc_decoder", "0.001"): (0.25, 0.27),
    ("SD", "mc_center", "0.0001"): (0.30, 0.30), ("SD", "mc_center", "0.001"): (0.35, 0.35),
    ("SD", "mc_center", "1e-05"): (0.10, None),
}
ISLES_N = 8
ISLES_REF = (0.5 + 0.01 * np.arange(ISLES_N), 0.04 + 0.001 * np.arange(ISLES_N),
             0.03 + 0.001 * np.arange(ISLES_N))
# Optuna: (fold, lr, best_val_loss)
ISLES_OPTUNA = [(0, "0.00031", 0.4), (0, "0.00072", 0.3), (1, "2.1e-05", 0.2), (1, "0.00055", 0.5)]


@dataclass
class Store:
    uri: str
    experiment: str
    sweep1: str
    sweep2: str
    broken_experiment: str
    broken_run: str
    run_ids: dict = field(default_factory=dict)  # (dataset, weights, method, lr, fold) → run id


def _key(*parts) -> str:
    return hashlib.sha1("|".join(map(str, parts)).encode()).hexdigest()[:16]


class _Writer:
    def __init__(self, client: MlflowClient, tmp: Path) -> None:
        self.client, self.tmp, self.clock = client, tmp, 1_700_000_000_000

    def run(self, exp: str, tags: dict, parent: str | None = None, status: str = "FINISHED",
            metrics: dict | None = None, artifacts: dict | None = None) -> str:
        self.clock += 1000
        if parent:
            tags = tags | {"mlflow.parentRunId": parent}
        run = self.client.create_run(exp, start_time=self.clock, tags=tags)
        rid = run.info.run_id
        for name, value in (metrics or {}).items():
            self.client.log_metric(rid, name, value)
        for name, frame in (artifacts or {}).items():
            d = self.tmp / rid
            d.mkdir(parents=True, exist_ok=True)
            frame.to_csv(d / name, index=False)
            self.client.log_artifact(rid, str(d / name))
        self.client.set_terminated(rid, status, end_time=self.clock + 500)
        return rid

    def trial(self, exp, parent, stage, dataset, weights, method, fold, lr, per_subject, bins,
              val_loss=0.5, status="FINISHED", extra_tags=None) -> str:
        tags = {"calib.role": "trial", "calib.stage": stage, "calib.dataset": dataset,
                "calib.weights": weights, "calib.method": method, "calib.fold": str(fold),
                "calib.lr": lr, "calib.trial_key": _key(dataset, weights, method, fold, lr)}
        tags |= extra_tags or {}
        metrics = {"best_val_loss": val_loss, "dice_mean": float(per_subject["dice"].mean()),
                   "ece_mean": float(per_subject["ece"].mean()), "n_subjects": len(per_subject)}
        arts = {"per_subject.csv": per_subject, "reliability_bins.csv": bins}
        return self.run(exp, tags, parent, status, metrics, arts if status == "FINISHED" else None)


def fabricate_bins(ids: list[str], ece: np.ndarray, seed: int) -> pd.DataFrame:
    """Reliability bins for each subject: 4 bins with counts, confidences, positives that vary."""
    rng = np.random.default_rng(seed)
    rows = []
    for sid, e in zip(ids, ece):
        for b in (0, 5, 12, 19):
            count = int(rng.integers(50, 200))
            conf = (b + 0.5) / 20
            acc = float(np.clip(conf + rng.normal(0, 0.05) + e, 0, 1))
            rows.append((sid, b, count, conf * count, round(acc * count)))
    return pd.DataFrame(rows, columns=["subject_id", "bin", "count", "conf_sum", "pos_sum"])


def per_subject_frame(ids, folds, dice, ece, true_ce=None) -> pd.DataFrame:
    df = pd.DataFrame({"subject_id": ids, "fold": folds, "dice": dice, "ece": ece})
    if true_ce is not None:
        df["true_ce"] = true_ce
    return df.dropna(subset=["dice"])


def build_store(tmp: Path) -> Store:
    """Create the SQLite store under ``tmp`` (see module doc)."""
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    exp = client.create_experiment("calib-test", artifact_location=(tmp / "artifacts").as_uri())
    w = _Writer(client, tmp / "staging")
    sweep1 = w.run(exp, {"calib.role": "sweep"}, status="FINISHED")
    ids = [f"s{i:02d}" for i in range(N)]
    folds = np.arange(N) // 8
    run_ids = {}
    seed = 0
    for (weights, method, lr), (dice, ece) in BRATS.items():
        stage = "base" if method == "base" else "calibrate"
        for fold in (0, 1):
            vl = VAL_LOSS.get((weights, method, lr), (0.5, 0.5))[fold]
            if vl is None:
                continue  # this LR never ran on this fold
            sel = folds == fold
            ps = per_subject_frame([i for i, s in zip(ids, sel) if s], folds[sel], dice[sel], ece[sel])
            seed += 1
            extra = {"calib.protocol": "honest"} if stage == "calibrate" else None
            if (weights, method, fold) == ("CE", "platt", 0):  # an earlier attempt that failed
                w.trial(exp, sweep1, stage, "brats18", weights, method, fold, lr, ps, None,
                        status="FAILED", extra_tags=extra)
            if (weights, method, fold) == ("CE", "base", 1):
                # The stale run: garbage values, superseded by sweep 2's newer FINISHED run.
                junk = ps.assign(dice=0.0, ece=0.9)
                w.trial(exp, sweep1, stage, "brats18", weights, method, fold, lr, junk,
                        fabricate_bins(list(ps["subject_id"]), ps["ece"].to_numpy(), seed))
                continue
            run_ids[("brats18", weights, method, lr, fold)] = w.trial(
                exp, sweep1, stage, "brats18", weights, method, fold, lr, ps,
                fabricate_bins(list(ps["subject_id"]), ps["ece"].to_numpy(), seed), vl,
                extra_tags=extra)
    # A trial that only ever failed: a hole the report must name, not a row.
    w.trial(exp, sweep1, "calibrate", "brats18", "CE", "finetune", 0, "0.0001", ps, None,
            status="FAILED")
    # pretrain runs are not in the tables (and carry no per-subject artifacts here)
    for fold in (0, 1):
        w.run(exp, {"calib.role": "trial", "calib.stage": "pretrain", "calib.dataset": "brats18",
                    "calib.weights": "CE", "calib.method": "base", "calib.fold": str(fold),
                    "calib.lr": "", "calib.trial_key": _key("pretrain", fold)}, sweep1)

    sweep2 = w.run(exp, {"calib.role": "sweep"}, status="FINISHED")
    dice, ece = BRATS[("CE", "base", "")]
    sel = folds == 1
    ps = per_subject_frame([i for i, s in zip(ids, sel) if s], folds[sel], dice[sel], ece[sel])
    run_ids[("brats18", "CE", "base", "", 1)] = w.trial(
        exp, sweep2, "base", "brats18", "CE", "base", 1, "", ps,
        fabricate_bins(list(ps["subject_id"]), ps["ece"].to_numpy(), 99))

    pids = [f"p{i}" for i in range(ISLES_N)]
    pfold = np.arange(ISLES_N) // 4
    d0, e0, t0 = ISLES_REF
    jit = (np.arange(ISLES_N) + 1) * 1e-5
    cells = {("base", ""): (d0 - jit, e0, t0),
             ("finetune", "0.0001"): (d0 + 0.01, e0 - 0.01 + jit, t0 - 0.005)}
    for (method, lr), (d, e, t) in cells.items():
        for fold in (0, 1):
            s = pfold == fold
            ps = per_subject_frame([p for p, k in zip(pids, s) if k], pfold[s], d[s], e[s], t[s])
            run_ids[("isles18", "CE", method, lr, fold)] = w.trial(
                exp, sweep2, "base" if method == "base" else "calibrate", "isles18", "CE", method,
                fold, lr, ps, fabricate_bins(list(ps["subject_id"]), e[s], 200 + fold))
    for fold, lr, vl in ISLES_OPTUNA:
        s = pfold == fold
        ps = per_subject_frame([p for p, k in zip(pids, s) if k], pfold[s], (d0 + 0.005 + jit)[s],
                               (e0 - 0.005)[s], t0[s])
        run_ids[("isles18", "CE", "mc_center", lr, fold)] = w.trial(
            exp, sweep2, "calibrate", "isles18", "CE", "mc_center", fold, lr, ps,
            fabricate_bins(list(ps["subject_id"]), (e0 - 0.005)[s], 300), vl,
            extra_tags={"calib.search": "optuna"})

    broken = client.create_experiment("broken", artifact_location=(tmp / "broken").as_uri())
    bsweep = w.run(broken, {"calib.role": "sweep"})
    ps = per_subject_frame(["a", "b"], [0, 0], [0.5, 0.6], [0.1, 0.2])
    brun = w.run(broken, {"calib.role": "trial", "calib.stage": "base", "calib.dataset": "brats18",
                          "calib.weights": "CE", "calib.method": "base", "calib.fold": "0",
                          "calib.lr": "", "calib.trial_key": "k"}, bsweep,
                 metrics={"best_val_loss": 0.3}, artifacts={"per_subject.csv": ps})
    return Store(uri, "calib-test", sweep1, sweep2, "broken", brun, run_ids)
