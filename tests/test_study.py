"""The GRPO-vs-CIPO study (experiments/study.py) end to end on the tiny model, and the run-folder readers it uses."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from cipo_lightning.runs import read_eval_reports, read_metrics

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("study", REPO / "experiments" / "study.py")
study = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(study)


def test_held_out_transition_rates_from_fractions_of_all_samples():
    # 40 samples, 10 right at t1: 6 of the 30 wrong ones get corrected, 2 of the 10 right ones get broken.
    metrics = {"acc@t1": 0.25, "acc@t2": 0.35, "delta": 0.1, "delta_i2c": 0.15, "delta_c2i": 0.05, "pass@1": 0.25}
    rates = study.with_rates(metrics)
    assert rates["i2c_rate"] == pytest.approx(6 / 30) and rates["retention"] == pytest.approx(8 / 10)
    assert rates["pass@1"] == 0.25
    none_right = study.with_rates(metrics | {"acc@t1": 0.0, "delta_c2i": 0.0})
    assert math.isnan(none_right["retention"]) and none_right["i2c_rate"] == pytest.approx(0.15)


def test_mean_sd_skips_nan_and_paired_bootstrap_brackets_the_mean():
    assert study.mean_sd([0.2, math.nan, 0.4]) == pytest.approx((0.3, math.sqrt(0.02)))
    assert all(math.isnan(v) for v in study.mean_sd([math.nan]))
    assert study.paired_bootstrap([0.25] * 8) == (0.25, 0.25)
    low, high = study.paired_bootstrap([0.0, 1.0] * 16)
    assert 0.2 < low < 0.5 < high < 0.8  # mean 0.5, standard error 0.5 / sqrt(32) = 0.088


def test_seed_interval_by_hand():
    # Per-seed differences 0.1, 0.2, 0.3: mean 0.2, sd 0.1; t(0.975, 2 df) = 4.303, so +-4.303 * 0.1 / sqrt(3).
    interval = study.seed_interval([0.1, 0.2, 0.3])
    assert interval["mean"] == pytest.approx(0.2) and interval["sd"] == pytest.approx(0.1)
    assert interval["half-width"] == pytest.approx(0.24844, abs=1e-5)
    assert interval["95% t interval"] == pytest.approx((0.2 - 0.24844, 0.2 + 0.24844), abs=1e-5)
    # The fewest seeds with t(0.975, S - 1) * 0.1 / sqrt(S) <= 0.05: 18 (2.110 / sqrt(18) = 0.497; 17 gives 0.514).
    assert interval["seeds for the target"] == 18
    assert math.isnan(study.seed_interval([0.4])["half-width"])  # one seed: no spread to measure


def test_read_metrics_merges_the_rows_of_a_step(tmp_path):
    # CSVLogger's layout: one row per log call, empty cells for metrics another row holds.
    (tmp_path / "metrics.csv").write_text(
        "epoch,step,train/loss,time/step,val/pass@1\n0,0,0.5,30.0,\n0,1,0.25,31.5,\n0,1,,,0.75\n"
    )
    assert read_metrics(tmp_path) == {
        0: {"epoch": 0.0, "step": 0.0, "train/loss": 0.5, "time/step": 30.0},
        1: {"epoch": 0.0, "step": 1.0, "train/loss": 0.25, "time/step": 31.5, "val/pass@1": 0.75},
    }


def test_read_eval_reports_by_step_and_stage(tmp_path):
    (tmp_path / "eval").mkdir()
    for name, step in [("val_step10", 10), ("val_step2", 2), ("test_step2", 2)]:
        (tmp_path / "eval" / f"{name}.json").write_text(json.dumps({"step": step, "stage": name[:3]}))
    (tmp_path / "eval" / "val_step2_samples.jsonl").write_text("{}\n")
    assert read_eval_reports(tmp_path) == {2: {"step": 2, "stage": "val"}, 10: {"step": 10, "stage": "val"}}
    assert list(read_eval_reports(tmp_path, "test")) == [2]


@pytest.mark.slow
def test_study_runs_both_algorithms_over_seeds_and_writes_the_report(tiny_model, tmp_path):
    out, report = tmp_path / "runs", tmp_path / "report"
    # The transformers engine: the same study path, and each of the 5 runs starts in seconds instead of vLLM's ~30.
    command = [sys.executable, "experiments/study.py", "--seeds", "0", "1", "--steps", "2", "--val-every", "1",
               "--out", str(out), "--report-dir", str(report), "--model.model", tiny_model,
               "--eval-problems", "2", "--rollout.engine", "cipo_lightning.rollout.HFEngine"]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert "5 runs done now" in result.stdout  # the starting model once, then 2 seeds x 2 algorithms

    study = json.loads((report / "study.json").read_text())
    assert set(study["runs"]) == {"grpo", "cipo"}
    for algorithm, by_seed in study["runs"].items():
        assert set(by_seed) == {"0", "1"}
        for run in by_seed.values():
            assert [p["step"] for p in run["eval"]] == [0, 1, 2]
            assert run["eval"][0] == study["runs"]["grpo"]["0"]["eval"][0]  # one shared starting point
            walls = [p["wall_s"] for p in run["eval"]]
            assert walls[0] == 0 and walls[0] < walls[1] < walls[2]
            assert [row["step"] for row in run["train"]] == [0, 1]
            # Only CIPO has a correction stream at training time.
            assert ("train/retention" in run["train"][0]) == (algorithm == "cipo")
    # --eval-problems 2: each validation scores 2 held-out items x eval.n (4) samples, the starting model's too.
    for run_dir in (out / "base" / "version_0", out / "cipo" / "seed1" / "version_0"):
        step = 0 if run_dir.parent.name == "base" else 2
        samples = (run_dir / "eval").glob(f"val_step{step}_samples*.jsonl")
        assert sum(len(path.read_text().splitlines()) for path in samples) == 2 * 4, run_dir
    summary = study["summary"]
    assert summary["cipo minus grpo"]["seeds"] == [0, 1]
    assert summary["cipo"]["pass@1"][0] == pytest.approx(
        sum(study["runs"]["cipo"][s]["eval"][-1]["pass@1"] for s in "01") / 2
    )
    for name in ("pass_at_k.png", "corrections.png"):
        assert (report / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| held-out pass@1 |" in (report / "summary.md").read_text()

    # A second call reuses the finished runs; other settings into the same folder are refused.
    again = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, check=False)
    assert again.returncode == 0 and "0 runs done now" in again.stdout
    other = subprocess.run([*command, "--steps", "3"], cwd=REPO, env=env, capture_output=True, text=True, check=False)
    assert other.returncode != 0 and "--fresh" in other.stderr

    # --variants: a subset of the finished runs is reported alone, without a comparison it lacks a side of.
    subset = report.parent / "cipo_only"
    only = [*command, "--report-dir", str(subset), "--variants", "cipo"]  # the last --report-dir counts
    alone = subprocess.run(only, cwd=REPO, env=env, capture_output=True, text=True, check=False)
    assert alone.returncode == 0 and "0 runs done now" in alone.stdout, alone.stderr[-2000:]
    cipo_only = json.loads((subset / "study.json").read_text())
    assert list(cipo_only["runs"]) == ["cipo"] and "cipo minus grpo" not in cipo_only["summary"]
    assert cipo_only["runs"]["cipo"] == study["runs"]["cipo"]
    # The folder still records both variants' options, so a full call afterwards reuses every run.
    assert json.loads((out / "settings.json").read_text())["variants"] == study["variants"]


@pytest.mark.slow
def test_ablation_runs_every_variant_with_its_settings_on_the_same_prompts(tiny_model, tmp_path):
    out, report = tmp_path / "runs", tmp_path / "report"
    # ParityReward: about half the answers count as right, so there are correct anchors to replay (or not).
    command = [sys.executable, "experiments/ablation.py", "--seeds", "0", "--steps", "2", "--val-every", "2",
               "--out", str(out), "--report-dir", str(report), "--model.model", tiny_model,
               "--eval-problems", "2", "--rollout.engine", "cipo_lightning.rollout.HFEngine",
               "--data.task.init_args.reward", "tests.helpers.ParityReward"]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert "8 runs done now" in result.stdout  # the starting model, then 7 variants

    ablation = json.loads((report / "ablations.json").read_text())
    variants = ["grpo", "cipo", "rho_fixed", "no_shaping", "no_band", "failed_only", "previous_anchors"]
    assert list(ablation["runs"]) == variants
    train = {variant: ablation["runs"][variant]["0"]["train"] for variant in variants}
    configs = {
        variant: yaml.safe_load((out / variant / "seed0" / "version_0" / "config.yaml").read_text())
        for variant in variants
    }
    assert configs["grpo"]["algorithm"] == "grpo" and "train/retention" not in train["grpo"][0]
    assert configs["no_shaping"]["shaping"]["lambda_risk"] == 0 and configs["cipo"]["shaping"]["lambda_risk"] == 1
    assert all(row["train/correction_advantage_shift_mean"] == 0 for row in train["no_shaping"])
    assert configs["rho_fixed"]["replay"]["w1"] == configs["rho_fixed"]["replay"]["w2"] == 0
    assert all(row["train/rho"] == pytest.approx(0.3) for row in train["rho_fixed"])
    assert all(row["train/anchors_correct"] == 0 and row["train/rho"] == 0 for row in train["failed_only"])
    assert configs["no_band"]["rollout"]["anchor_band"] == [0, 1] != configs["cipo"]["rollout"]["anchor_band"]
    # previous_anchors corrects step 0's anchors in step 1's base call: no correction call of its own after step 0.
    assert configs["previous_anchors"]["rollout"]["anchors_from_previous_step"] is True
    correction_seconds = {
        variant: [m["time/correction_rollout"] for m in read_metrics(out / variant / "seed0" / "version_0").values()
                  if "time/correction_rollout" in m]
        for variant in ("cipo", "previous_anchors")
    }  # fmt: skip
    assert all(seconds > 0 for seconds in correction_seconds["cipo"])
    assert correction_seconds["previous_anchors"][0] > 0 and correction_seconds["previous_anchors"][1] == 0
    # A seed's variants see the same prompts: their first step samples the same attempts.
    assert len({train[variant][0]["train/reward_mean"] for variant in variants}) == 1
    summary = (report / "summary.md").read_text()
    assert "| metric | grpo | cipo | rho_fixed | no_shaping | no_band | failed_only | previous_anchors |" in summary
    assert "rho_fixed minus cipo" in summary and "cipo minus grpo" in summary
    assert "previous_anchors minus cipo" in summary
