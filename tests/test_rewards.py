"""The reasoning-gym verifier: strict, with the final answer extracted from the reply."""

import json

import pytest
import reasoning_gym

from cipo_lightning.rewards import ReasoningGymReward, WeightedSum
from cipo_lightning.rewards.reasoning_gym import extract_final_answer


@pytest.mark.parametrize(
    ("reply", "expected"),
    [
        ("42", "42"),
        ("The answer is -17.", "-17"),
        ("5 - 3 = 2", "2"),
        ("Total: 1,250 apples", "1250"),
        ("<answer>7</answer> and later 9", "7"),
        ("no digits here", "no digits here"),
    ],
)
def test_extract_final_answer(reply, expected):
    assert extract_final_answer(reply) == expected


def test_reasoning_gym_reward_is_strict():
    entry = reasoning_gym.create_dataset("basic_arithmetic", size=1, seed=3)[0]
    answer = str(entry["answer"])
    reward = ReasoningGymReward("basic_arithmetic")
    columns = {"answer": [answer] * 4, "metadata": [json.dumps(entry["metadata"])] * 4}
    replies = [f"The result is {answer}.", answer, f"{answer}1", "I don't know"]
    # reasoning-gym's own score gives partial credit to a wrong answer containing the right one ("{answer}1").
    assert reasoning_gym.get_score_answer_fn("basic_arithmetic")(f"{answer}1", entry) > 0
    assert reward(["q"] * 4, replies, **columns) == [1.0, 1.0, 0.0, 0.0]
    assert ReasoningGymReward("basic_arithmetic", partial_credit=True)(["q"] * 4, replies, **columns)[2] > 0


def test_weighted_sum_of_reward_functions():
    entry = reasoning_gym.create_dataset("basic_arithmetic", size=1, seed=3)[0]
    columns = {"answer": [str(entry["answer"])] * 2, "metadata": [json.dumps(entry["metadata"])] * 2}

    def short(prompts, completions, **_):
        return [float(len(c) <= 8) for c in completions]

    combined = WeightedSum([ReasoningGymReward("basic_arithmetic"), short], weights=[1.0, 0.25])
    replies = [str(entry["answer"]), "a long reply without the answer"]
    assert combined(["q"] * 2, replies, **columns) == [1.25, 0.0]
    with pytest.raises(ValueError, match="one weight per reward function"):
        WeightedSum([short], weights=[1.0, 2.0])
