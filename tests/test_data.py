"""Tasks and the prompt stream, without any model."""

import json
import re

import pytest

from cipo_lightning.data import BundledTask, DatasetTask, ReasoningGymTask, RolloutDataModule
from cipo_lightning.data.formats import TYPING_PREAMBLE
from cipo_lightning.data.tasks import bundled_records
from cipo_lightning.errors import ConfigError
from cipo_lightning.rewards import CodeTestsReward
from tests.helpers import ParityReward


def test_reasoning_gym_task_rows_and_disjoint_validation():
    task = ReasoningGymTask(
        dataset_kwargs={"min_terms": 2, "max_terms": 2, "max_digits": 1}, train_size=50, val_size=50
    )
    train, val = task.load()
    assert len(train) == len(val) == 50
    assert not {row["question"] for row in train} & {row["question"] for row in val}
    row = train[0]
    assert row["prompt"] == [{"role": "user", "content": row["question"] + " Give only the final number."}]
    # The default verifier is reasoning-gym's own check of this dataset.
    assert task.score([row, row], [f"It is {row['answer']}", "no idea"]) == [1.0, 0.0]
    with pytest.raises(ConfigError, match="val_problem_frac must be in"):
        ReasoningGymTask(val_problem_frac=1.0)


def test_reasoning_gym_held_out_problems_are_drawn_like_the_training_stream():
    """The quickstart's task: no held-out problem is ever trained on, and problem types keep their shares (the old
    split, training drawn first, left 88% two-digit + two-digit sums held out against 40% in training)."""
    kwargs = {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 2, "operators": ["+"],
              "allow_negation": False, "allow_parentheses": False}  # fmt: skip
    train, val = ReasoningGymTask(dataset_kwargs=kwargs, train_size=10_000, val_size=200).load()
    assert not {row["question"] for row in train} & {row["question"] for row in val}

    def two_digit_share(rows):
        terms = [re.findall(r"\d+", row["question"]) for row in rows]
        return sum(all(len(term) == 2 for term in pair) for pair in terms) / len(rows)

    assert abs(two_digit_share(val) - two_digit_share(train)) <= 0.10, (two_digit_share(val), two_digit_share(train))


def test_val_problem_frac_sets_the_share_of_problems_held_out():
    """A larger val_problem_frac holds a larger share of the distinct problems out of training."""
    kwargs = {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 1, "operators": ["+"]}
    distinct = {}
    for frac in (0.2, 0.5):
        train, val = ReasoningGymTask(
            dataset_kwargs=kwargs, train_size=2000, val_size=400, val_problem_frac=frac
        ).load()
        held_out, trained = {row["question"] for row in val}, {row["question"] for row in train}
        assert not held_out & trained
        distinct[frac] = len(held_out) / len(held_out | trained)
    assert distinct[0.5] > 1.5 * distinct[0.2] > 0, distinct  # measured: 0.32 vs 0.18


def test_dataset_task_from_a_local_file_passes_columns_to_the_verifier(tmp_path):
    rows = tmp_path / "rows.jsonl"
    rows.write_text("\n".join(json.dumps({"question": f"p{i}", "answer": str(i)}) for i in range(3)))
    seen = {}

    def reward(prompts, completions, answer, **_):
        seen.update(prompts=prompts, answer=answer)
        return [0.5] * len(completions)

    task = DatasetTask(
        str(rows), columns={"question": "prompt"}, instruction=" Be exact.", system_prompt="Be brief.", reward=reward
    )
    train, val = task.load()
    assert val == [] and [r["answer"] for r in train] == ["0", "1", "2"]
    assert train[0]["prompt"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "p0 Be exact."},
    ]
    assert task.score(train[:2], ["a", "b"]) == [0.5, 0.5]
    assert seen == {"prompts": ["p0 Be exact.", "p1 Be exact."], "answer": ["0", "1"]}


def test_dataset_task_errors_name_the_file_and_row(tmp_path):
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"prompt": "ok"}\n{"prompt": "  "}\n')
    with pytest.raises(ConfigError, match=r"rows.jsonl: line 2: the problem text is empty"):
        DatasetTask(str(rows), reward=ParityReward()).load()
    with pytest.raises(ConfigError, match=r"rows.jsonl: line 1: no column 'question'"):
        DatasetTask(str(rows), prompt_column="question", reward=ParityReward()).load()
    with pytest.raises(ConfigError, match=r"rows.jsonl: line 1: no column 'problem'"):
        DatasetTask(str(rows), format="math500").load()
    with pytest.raises(ConfigError, match="no such file"):
        DatasetTask(str(tmp_path / "missing.jsonl"), reward=ParityReward()).load()


def test_dataset_task_hub_id_without_a_hub_is_a_config_error():
    with pytest.raises(ConfigError, match="data.task.path: cannot load 'nobody/no-such-dataset'"):
        DatasetTask("nobody/no-such-dataset", reward=ParityReward()).load()


def test_every_fixture_format_loads_through_a_local_file_like_the_bundled_copy(tmp_path):
    for name in ("math500", "aime", "mbpp", "livecodebench", "debugbench"):
        records = bundled_records(name)
        path = tmp_path / f"{name}.jsonl"
        path.write_text("\n".join(json.dumps(r) for r in records))
        from_file, _ = DatasetTask(str(path), format=name, reward=ParityReward()).load()
        bundled, _ = BundledTask(name, reward=ParityReward()).load()
        assert from_file == bundled and len(bundled) >= 3, name


def test_format_rows_carry_the_verifier_columns():
    (math500, *_), _ = BundledTask("math500", reward=ParityReward()).load()
    assert math500["answer"] == "\\frac{7}{8}" and "\\boxed{}" in math500["prompt"][-1]["content"]
    aime, _ = BundledTask("aime", reward=ParityReward()).load()
    assert aime[0]["answer"] == "47"
    gsm8k, _ = BundledTask("gsm8k", reward=ParityReward()).load()
    assert len(gsm8k) == 100 and all(row["answer"].lstrip("-").replace(".", "").isdigit() for row in gsm8k)
    humaneval, _ = BundledTask("humaneval", reward=ParityReward()).load()
    assert len(humaneval) == 164 and humaneval[0]["entry_point"] == "has_close_elements"
    assert (
        "def check(candidate)" in humaneval[0]["test"]
        and "def has_close_elements" in humaneval[0]["prompt"][-1]["content"]
    )
    mbpp, _ = BundledTask("mbpp", reward=ParityReward()).load()
    assert mbpp[0]["test"][0] == "assert sum_squares([1, 2, 3]) == 14" and mbpp[0]["entry_point"] is None
    lcb, _ = BundledTask("livecodebench", reward=ParityReward()).load()
    assert lcb[0]["test"][0] == "assert Solution().maxGap([7, 1, 5, 4]) == 4"
    debug, _ = BundledTask("debugbench", reward=ParityReward()).load()
    record = bundled_records("debugbench")[0]
    # A fix-given-solution row: the bare problem, and the buggy code as the given attempt.
    assert record["question"] in debug[0]["prompt"][-1]["content"] and record["buggy_code"] in debug[0]["attempt"]


def test_bundled_validation_split_is_seeded_and_disjoint():
    train, val = BundledTask("gsm8k", val_size=20, seed=3, reward=ParityReward()).load()
    again, val_again = BundledTask("gsm8k", val_size=20, seed=3, reward=ParityReward()).load()
    assert len(train) == 80 and len(val) == 20 and val == val_again and train == again
    assert not {r["prompt"][-1]["content"] for r in train} & {r["prompt"][-1]["content"] for r in val}


def test_prompt_stream_covers_every_row_each_pass_and_reshuffles():
    datamodule = RolloutDataModule(ReasoningGymTask(train_size=12, val_size=4), prompts_per_step=4, seed=1)
    datamodule.setup("fit")
    first_pass = [row["question"] for _ in range(3) for row in datamodule.next_prompts()]
    second_pass = [row["question"] for _ in range(3) for row in datamodule.next_prompts()]
    everything = sorted(row["question"] for row in datamodule.train_rows)
    assert sorted(first_pass) == everything and sorted(second_pass) == everything
    assert first_pass != second_pass
    assert datamodule.state_dict() == {"pass": 1, "position": 12}


def test_fixture_reference_solutions_pass_their_tests_and_the_bugs_fail():
    """The code fixtures are consistent: MBPP's `code` and DebugBench's `solution` pass, the buggy code fails."""
    reward = CodeTestsReward(timeout_s=10.0)
    for name, good, bad in (("mbpp", "code", None), ("debugbench", "solution", "buggy_code")):
        records = bundled_records(name)
        rows, _ = BundledTask(name, reward=reward).load()
        programs = [TYPING_PREAMBLE + r[good] for r in records]
        expected = [1.0] * len(records)
        if bad:
            programs += [TYPING_PREAMBLE + r[bad] for r in records]
            expected += [0.0] * len(records)
            rows = rows + rows
        assert BundledTask(name, reward=reward).score(rows, programs) == expected, name
