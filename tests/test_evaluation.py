"""Evaluation on a tiny model with the transformers engine: reasoning, two-turn and fix-given-solution metrics, the
eval sets and their sharding, and the validate / test commands with their reports."""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from transformers import AutoTokenizer

from cipo_lightning.data import BundledTask, DatasetTask, ReasoningGymTask, RolloutDataModule
from cipo_lightning.data.datamodule import shard
from cipo_lightning.data.tasks import is_fix_set
from cipo_lightning.errors import ConfigError
from cipo_lightning.evaluation import EvalMetrics, ScoredEval, evaluate, evaluate_rows, markdown_table
from cipo_lightning.rewards import MathAnswerReward, ReasoningGymReward
from cipo_lightning.rollout import HFEngine, SamplingSettings
from tests.helpers import ParityReward, PartialCreditReward

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def hf_engine(tiny_model):
    engine = HFEngine()
    engine.start(tiny_model, seed=0, device=torch.device("cpu"))
    yield engine, AutoTokenizer.from_pretrained(tiny_model)
    engine.shutdown()


def test_evaluate_reports_reasoning_and_two_turn_correction_metrics(hf_engine):
    engine, tokenizer = hf_engine
    task = ReasoningGymTask(train_size=8, val_size=8, reward=ParityReward())
    rows, _ = task.load()
    results = evaluate(engine, tokenizer, task, rows[:4], SamplingSettings(n=4, max_new_tokens=8, temperature=1.0))
    assert set(results) == {"mean@4", "pass@1", "pass@2", "pass@4", "acc@t1", "acc@t2", "delta", "delta_i2c",
                            "delta_c2i"}  # fmt: skip
    # The first turn is the same samples: acc@t1 is mean@4 (= pass@1); pass@k grows with k.
    assert results["acc@t1"] == pytest.approx(results["mean@4"]) == pytest.approx(results["pass@1"])
    assert results["pass@1"] <= results["pass@2"] <= results["pass@4"]
    assert results["delta"] == pytest.approx(results["delta_i2c"] - results["delta_c2i"])
    assert 0 < results["mean@4"] < 1 and 0 <= results["acc@t2"] <= 1  # parity splits random replies


def test_correct_threshold_decides_what_counts_as_correct(hf_engine):
    engine, tokenizer = hf_engine
    task = ReasoningGymTask(train_size=8, val_size=8, reward=PartialCreditReward())
    rows, _ = task.load()
    sampling = SamplingSettings(n=4, max_new_tokens=8, temperature=1.0)
    strict = evaluate(engine, tokenizer, task, rows[:4], sampling)
    lenient = evaluate(engine, tokenizer, task, rows[:4], sampling, correct_threshold=0.5)
    assert strict["pass@4"] == strict["acc@t2"] == 0.0  # a reward of 0.6 is not 1.0
    assert 0 < lenient["mean@4"] < 1 and lenient["pass@4"] > 0


def test_majority_vote_uses_the_verifiers_extracted_answers(hf_engine):
    assert MathAnswerReward.extract_answer("so the total is \\boxed{x + 1}.") == "x+1"
    assert MathAnswerReward.extract_answer("no number here") is None
    assert ReasoningGymReward.extract_answer("I think 4 + 3 = 7") == "7"
    engine, tokenizer = hf_engine
    task = ReasoningGymTask(train_size=8, val_size=8)  # the real verifier: it extracts answers, so maj@k appears
    rows, _ = task.load()
    scored = evaluate_rows(engine, tokenizer, task, rows[:3], SamplingSettings(n=2, max_new_tokens=6), False, False)
    assert [len(a) for a in scored.answers] == [2, 2, 2]
    assert [r["answer"] for r in scored.records] == [a for answers in scored.answers for a in answers]
    assert scored.corrected is None and "correction" not in scored.records[0]
    results = evaluate(engine, tokenizer, task, rows[:3], SamplingSettings(n=2, max_new_tokens=6), two_turn=False)
    assert {"maj@1", "maj@2"} <= results.keys() and "acc@t1" not in results


def test_fix_given_solution_asks_to_correct_the_given_attempt(hf_engine):
    engine, tokenizer = hf_engine
    task = BundledTask("debugbench", reward=ParityReward())
    rows, _ = task.load()
    assert is_fix_set(rows, "debugbench") and "def " in rows[0]["attempt"]
    # The model is shown the problem with the given buggy code, not the bare problem.
    prompts = []
    engine_generate = engine.generate

    def recording_generate(token_ids, sampling):
        prompts.extend(tokenizer.decode(p) for p in token_ids)
        return engine_generate(token_ids, sampling)

    engine.generate = recording_generate
    try:
        scored = evaluate_rows(engine, tokenizer, task, rows, SamplingSettings(n=3, max_new_tokens=8), True, True)
    finally:
        del engine.generate
    assert len(prompts) == len(rows) and all(row["attempt"] in p for row, p in zip(rows, prompts, strict=True))
    assert scored.correct.shape == (len(rows), 3) and scored.answers is None and scored.corrected is None
    assert [r["given_attempt"] for r in scored.records] == [row["attempt"] for row in rows for _ in range(3)]
    results = evaluate(engine, tokenizer, task, rows, SamplingSettings(n=3, max_new_tokens=8))
    assert set(results) == {"fix_acc"} and 0 <= results["fix_acc"] <= 1


def test_a_set_mixing_fix_rows_and_plain_rows_is_an_error_naming_the_row():
    rows = [{"prompt": [], "attempt": "x"}, {"prompt": []}, {"prompt": [], "attempt": "y"}]
    with pytest.raises(ConfigError, match="eval set 'mine': row 1 lacks an `attempt`"):
        is_fix_set(rows, "mine")
    assert not is_fix_set([{"prompt": []}], "plain")


def test_criticbench_style_file_with_a_renamed_solution_column_is_a_fix_set(tmp_path):
    path = tmp_path / "critic.jsonl"
    record = {"question": "What is 2 + 3?", "wrong_solution": "2 + 3 = 6, so \\boxed{6}", "answer": "5"}
    path.write_text(json.dumps(record) + "\n")
    columns = {"question": "prompt", "wrong_solution": "attempt"}
    rows, _ = DatasetTask(str(path), columns=columns, reward=MathAnswerReward()).load()
    assert is_fix_set(rows, "critic") and rows[0]["attempt"] == record["wrong_solution"] and rows[0]["answer"] == "5"


PROBLEMS, N = 11, 4


def _eval_values(rank: int, world: int) -> dict[str, float]:
    """EvalMetrics over this rank's shard of fixed samples, as the Evaluation callback does it."""
    generator = torch.Generator().manual_seed(0)
    correct = torch.randint(0, 2, (PROBLEMS, N), generator=generator)
    corrected = torch.randint(0, 2, (PROBLEMS, N), generator=generator)
    answers = [[str(int(c)) if c else str(j % 2 + 1) for j, c in enumerate(row)] for row in correct]
    metrics = EvalMetrics(N, fix=False, two_turn=True)
    for problem in shard(list(range(PROBLEMS)), rank, world):
        metrics.update(ScoredEval(correct[[problem]], [answers[problem]], corrected[problem], []))
    return metrics.compute()


def _eval_rank(rank: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    (Path(out_dir) / f"rank{rank}.json").write_text(json.dumps(_eval_values(rank, 2)))
    dist.destroy_process_group()


def test_eval_metrics_over_two_gloo_ranks_equal_one_process(tmp_path):
    mp.spawn(_eval_rank, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    single = _eval_values(0, 1)
    assert {"pass@4", "maj@4", "acc@t2", "delta_c2i"} <= single.keys()
    for rank in range(2):
        assert json.loads((tmp_path / f"rank{rank}.json").read_text()) == single


@pytest.mark.parametrize("rows,world", [(10, 2), (7, 3), (2, 4), (0, 2), (5, 1)])
def test_eval_shards_cover_every_problem_exactly_once(rows, world):
    items = list(range(rows))
    shares = [shard(items, rank, world) for rank in range(world)]
    assert sum(shares, []) == items
    assert max(map(len, shares)) - min(map(len, shares)) <= 1


def test_eval_sets_default_to_held_out_rows_and_get_distinct_labels():
    plain = RolloutDataModule(ReasoningGymTask(train_size=8, val_size=5, reward=ParityReward()))
    plain.setup("fit")
    (only,) = plain.eval_sets
    assert only.label == "basic_arithmetic" and only.rows == plain.val_rows and not only.fix
    gsm8k_all, gsm8k_held_out = BundledTask("gsm8k"), BundledTask("gsm8k", val_size=10)
    sets = RolloutDataModule(eval_tasks=[gsm8k_all, gsm8k_held_out], eval_max_problems=30)
    sets.setup("test")
    assert [(s.label, len(s.rows)) for s in sets.eval_sets] == [("gsm8k", 30), ("gsm8k_2", 10)]
    with pytest.raises(ConfigError, match="data.task is required to fit"):
        RolloutDataModule().setup("fit")


def test_markdown_table_has_a_row_per_set_and_the_average():
    table = markdown_table({"a": {"pass@1": 0.5, "maj@1": 1.0}, "b": {"pass@1": 0.25}, "c": {"fix_acc": 0.75}})
    lines = table.splitlines()
    assert lines[0] == "| set | pass@1 | maj@1 | fix_acc |"
    assert lines[2:] == ["| a | 0.500 | 1.000 |  |", "| b | 0.250 |  |  |", "| c |  |  | 0.750 |",
                         "| average | 0.375 |  | 0.750 |"]  # fmt: skip


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "WANDB_MODE": "disabled"}
    command = [sys.executable, "-m", "cipo_lightning", *args]
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def test_validation_during_fit_then_test_of_the_checkpoint(tiny_model, tmp_path):
    """fit validates every step on the held-out rows (metrics.csv, reports); `test --ckpt_path` evaluates the saved
    policy on several sets (a reasoning set, a math set with maj@k, a fix-given-solution set)."""
    common = ["--model.model", tiny_model, "--rollout.engine", "cipo_lightning.rollout.HFEngine", "--eval.n", "2",
              "--rollout.max_new_tokens", "8", "--trainer.default_root_dir", str(tmp_path)]  # fmt: skip
    fit = _cli("fit", "--config", str(REPO / "configs/quickstart.yaml"), *common, "--trainer.max_steps", "2",
               "--trainer.val_check_interval", "1", "--trainer.check_val_every_n_epoch", "null",
               "--data.task.init_args.train_size", "64", "--data.task.init_args.val_size", "6",
               "--rollout.group_size", "2", "--rollout.correction_group_size", "2", "--data.prompts_per_step", "2",
               "--trainer.callbacks.init_args.every_n_train_steps", "2", cwd=tmp_path)  # fmt: skip
    assert fit.returncode == 0, fit.stderr[-3000:]
    run = tmp_path / "version_0"
    rows = list(csv.DictReader((run / "metrics.csv").open()))
    validated = [r for r in rows if r.get("val/pass@1")]
    assert [int(r["step"]) for r in validated] == [0, 1]  # after optimizer steps 1 and 2 (Lightning logs step - 1)
    for key in ("val/basic_arithmetic/mean@2", "val/pass@2", "val/acc@t2", "val/delta_c2i", "val/maj@2"):
        assert all(r[key] != "" for r in validated), key
    assert sorted(p.name for p in (run / "eval").iterdir()) == [
        f"val_step{step}{suffix}" for step in (1, 2) for suffix in (".json", ".md", ".png", "_samples.jsonl")
    ]
    checkpoint = run / "checkpoints" / "last.ckpt"
    eval_sets = json.dumps([
        {"class_path": "cipo_lightning.data.ReasoningGymTask", "init_args": {"train_size": 8, "val_size": 4}},
        {"class_path": "cipo_lightning.data.BundledTask", "init_args": {"name": "gsm8k"}},
        {"class_path": "cipo_lightning.data.BundledTask", "init_args": {"name": "debugbench"}},
    ])  # fmt: skip
    test = _cli("test", "--config", str(REPO / "configs/quickstart.yaml"), *common, "--ckpt_path", str(checkpoint),
                "--data.eval_tasks", eval_sets, "--data.eval_max_problems", "3",
                "--eval.max_new_tokens_per_set", '{"gsm8k": 2}', cwd=tmp_path)  # fmt: skip
    assert test.returncode == 0, test.stderr[-3000:]
    (report,) = (tmp_path / "version_1" / "eval").glob("test_step*.json")
    result = json.loads(report.read_text())
    assert result["ckpt_path"] == str(checkpoint) and result["problems"] == {
        "basic_arithmetic": 3, "gsm8k": 3, "debugbench": 3}  # fmt: skip
    assert {"mean@2", "pass@1", "pass@2", "maj@2", "acc@t1", "acc@t2", "delta_i2c"} <= result["results"]["gsm8k"].keys()
    assert set(result["results"]["debugbench"]) == {"fix_acc"} and "fix_acc" in result["average"]
    assert report.with_suffix(".png").stat().st_size > 0
    table = report.with_suffix(".md").read_text().splitlines()
    labels = ["basic_arithmetic", "gsm8k", "debugbench"]
    assert [line.split(" | ")[0] for line in table[2:]] == [f"| {label}" for label in [*labels, "average"]]
    samples = [json.loads(line) for line in report.with_name(report.stem + "_samples.jsonl").open()]
    assert len(samples) == (3 + 3 + 3) * 2 and sorted({s["set"] for s in samples}) == sorted(labels)
    # gsm8k replies had their own budget of 2 tokens, the others the rollout's 8.
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    lengths = {label: max(len(tokenizer(s["attempt"]).input_ids) for s in samples if s["set"] == label)
               for label in ("gsm8k", "basic_arithmetic")}  # fmt: skip
    assert lengths["gsm8k"] <= 3 < lengths["basic_arithmetic"], lengths
    assert result["sampling"]["max_new_tokens_per_set"] == {"gsm8k": 2}


def test_validate_without_eval_sets_is_a_one_line_error(tmp_path):
    config = tmp_path / "no_eval.yaml"
    config.write_text((REPO / "configs/quickstart.yaml").read_text())
    result = _cli("validate", "--config", str(config), "--data.task.init_args.val_size", "0",
                  "--trainer.default_root_dir", str(tmp_path), cwd=tmp_path)  # fmt: skip
    assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert "error: nothing to evaluate: set data.eval_tasks" in result.stderr
