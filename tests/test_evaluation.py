"""The evaluation core on a tiny model with the transformers engine: reasoning and two-turn correction metrics."""

import pytest
import torch
from transformers import AutoTokenizer

from cipo_lightning.data import ReasoningGymTask
from cipo_lightning.evaluation import evaluate
from cipo_lightning.rollout import HFEngine, SamplingSettings
from tests.helpers import ParityReward


def test_evaluate_reports_reasoning_and_two_turn_correction_metrics(tiny_model):

    engine = HFEngine()
    engine.start(tiny_model, seed=0, device=torch.device("cpu"))
    task = ReasoningGymTask(train_size=8, val_size=8, reward=ParityReward())
    rows, _ = task.load()
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    results = evaluate(engine, tokenizer, task, rows[:4], SamplingSettings(n=4, max_new_tokens=8, temperature=1.0))
    assert set(results) == {"mean@4", "pass@1", "pass@2", "pass@4", "acc@t1", "acc@t2", "delta", "delta_i2c",
                            "delta_c2i"}  # fmt: skip
    # The first turn is the same samples: acc@t1 is mean@4 (= pass@1); pass@k grows with k.
    assert results["acc@t1"] == pytest.approx(results["mean@4"]) == pytest.approx(results["pass@1"])
    assert results["pass@1"] <= results["pass@2"] <= results["pass@4"]
    assert results["delta"] == pytest.approx(results["delta_i2c"] - results["delta_c2i"])
    assert 0 < results["mean@4"] < 1 and 0 <= results["acc@t2"] <= 1  # parity splits random replies
    engine.shutdown()
