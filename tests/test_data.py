"""Tasks and the prompt stream, without any model."""

import json

import pytest

from cipo_lightning.data import FileTask, ReasoningGymTask, RolloutDataModule
from cipo_lightning.errors import ConfigError
from tests.helpers import ParityReward


def test_reasoning_gym_task_rows_and_disjoint_validation():
    task = ReasoningGymTask(
        dataset_kwargs={"min_terms": 2, "max_terms": 2, "max_digits": 1}, train_size=50, val_size=50
    )
    train, val = task.load()
    assert len(train) == 50 and 0 < len(val) <= 50
    assert not {row["question"] for row in train} & {row["question"] for row in val}
    row = train[0]
    assert row["prompt"] == [{"role": "user", "content": row["question"] + " Give only the final number."}]
    # The default verifier is reasoning-gym's own check of this dataset.
    assert task.score([row, row], [f"It is {row['answer']}", "no idea"]) == [1.0, 0.0]


def test_file_task_passes_columns_to_the_verifier(tmp_path):
    rows = tmp_path / "rows.jsonl"
    rows.write_text("\n".join(json.dumps({"prompt": f"p{i}", "answer": str(i)}) for i in range(3)))
    seen = {}

    def reward(prompts, completions, answer, **_):
        seen.update(prompts=prompts, answer=answer)
        return [0.5] * len(completions)

    task = FileTask(str(rows), system_prompt="Be brief.", reward=reward)
    train, val = task.load()
    assert val == [] and [r["answer"] for r in train] == ["0", "1", "2"]
    assert train[0]["prompt"][0] == {"role": "system", "content": "Be brief."}
    assert task.score(train[:2], ["a", "b"]) == [0.5, 0.5]
    assert seen == {"prompts": ["p0", "p1"], "answer": ["0", "1"]}


def test_file_task_errors_name_the_file_and_row(tmp_path):
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"prompt": "ok"}\n{"prompt": "  "}\n')
    with pytest.raises(ConfigError, match=r"rows.jsonl: row 1: column 'prompt'"):
        FileTask(str(rows), reward=ParityReward()).load()
    with pytest.raises(ConfigError, match="has no column 'question'"):
        FileTask(str(rows), prompt_column="question", reward=ParityReward()).load()
    with pytest.raises(ConfigError, match="no such file"):
        FileTask(str(tmp_path / "missing.jsonl"), reward=ParityReward()).load()


def test_prompt_stream_covers_every_row_each_pass_and_reshuffles():
    datamodule = RolloutDataModule(ReasoningGymTask(train_size=12, val_size=4), prompts_per_step=4, seed=1)
    datamodule.setup("fit")
    first_pass = [row["question"] for _ in range(3) for row in datamodule.next_prompts()]
    second_pass = [row["question"] for _ in range(3) for row in datamodule.next_prompts()]
    everything = sorted(row["question"] for row in datamodule.train_rows)
    assert sorted(first_pass) == everything and sorted(second_pass) == everything
    assert first_pass != second_pass
    assert datamodule.state_dict() == {"pass": 1, "position": 12}
