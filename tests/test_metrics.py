"""Evaluation metrics against exact combinatorics and hand-computed values, and across 2 CPU ranks (gloo)."""

import json
import math
from fractions import Fraction

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from cipo_lightning.metrics import (
    CorrectionMetrics,
    FixAccuracy,
    ReasoningMetrics,
    average_over_datasets,
    default_ks,
    majority_correct,
    pass_at_k,
)

PASS_AT_K_CASES = [
    # (n, c, k): small hand-checkable cases, the edges (c = 0, c = n, n - c < k, k = n), and large n where the
    # binomials run to dozens of digits.
    (1, 0, 1),
    (1, 1, 1),
    (4, 1, 1),
    (4, 2, 2),
    (4, 3, 2),
    (4, 2, 4),
    (5, 0, 3),
    (5, 5, 3),
    (8, 1, 8),
    (10, 3, 5),
    (16, 1, 4),
    (16, 15, 1),
    (64, 7, 16),
    (100, 1, 1),
    (200, 2, 50),
    (200, 150, 100),
    (256, 10, 128),
]


def _exact_pass_at_k(n: int, c: int, k: int) -> Fraction:
    # math.comb(n - c, k) is 0 when n - c < k, so this also covers the "always passes" edge.
    return 1 - Fraction(math.comb(n - c, k), math.comb(n, k))


@pytest.mark.parametrize(("n", "c", "k"), PASS_AT_K_CASES)
def test_pass_at_k_matches_exact_combinatorics(n, c, k):
    assert pass_at_k(n, c, k) == pytest.approx(float(_exact_pass_at_k(n, c, k)), rel=1e-12, abs=1e-15)


def test_pass_at_k_by_hand_and_edges():
    assert pass_at_k(4, 2, 2) == pytest.approx(5 / 6)  # 1 - C(2, 2) / C(4, 2) = 1 - 1/6
    assert pass_at_k(4, 1, 1) == pytest.approx(1 / 4)  # pass@1 = c / n
    assert pass_at_k(10, 0, 5) == 0.0  # no correct sample
    assert pass_at_k(10, 10, 5) == 1.0  # all correct
    assert pass_at_k(10, 6, 5) == 1.0  # n - c = 4 < k: every 5 samples hold a correct one


@pytest.mark.parametrize(
    ("n", "c", "k", "message"),
    [
        (4, 1, 5, "k <= n"),
        (4, 1, 0, "k >= 1"),
        (4, 1, -1, "k >= 1"),
        (4, 5, 2, "c <= n"),
        (4, -1, 2, "non-negative"),
        (-4, 1, 2, "non-negative"),
        (0, 0, 1, "k <= n"),
    ],
)
def test_pass_at_k_rejects_invalid_arguments(n, c, k, message):
    with pytest.raises(ValueError, match=message):
        pass_at_k(n, c, k)


def test_default_ks_are_powers_of_two_then_n():
    assert default_ks(1) == [1]
    assert default_ks(6) == [1, 2, 4, 6]
    assert default_ks(16) == [1, 2, 4, 8, 16]


def test_majority_vote_by_hand():
    # Tie between "a" and "b" (2 each over 4 samples): the first seen, "a", wins; it is correct.
    assert majority_correct(["a", "b", "b", "a"], [1, 0, 0, 1], k=4)
    assert not majority_correct(["b", "a", "a", "b"], [0, 1, 1, 0], k=4)
    # Only the first k samples vote: over 3 samples "b" leads 2 to 1, over all 5 "a" leads 3 to 2.
    assert not majority_correct(["a", "b", "b", "a", "a"], [1, 0, 0, 1, 1], k=3)
    assert majority_correct(["a", "b", "b", "a", "a"], [1, 0, 0, 1, 1], k=5)
    # No extracted answer (None) does not vote: "c" wins 1 to 0 over the Nones.
    assert majority_correct([None, None, "c"], [0, 0, 1], k=3)
    # No vote at all is wrong.
    assert not majority_correct([None, None, "c"], [0, 0, 1], k=2)


def _reasoning_example() -> tuple[torch.Tensor, list[list[str | None]]]:
    # n = 4. Per problem, with the default ks = [1, 2, 4]:
    # A: c = 2: pass@1 1/2, pass@2 1 - C(2,2)/C(4,2) = 5/6, pass@4 1; maj: "7" wins at k = 1, 2, 4 and is right.
    # B: c = 1: pass@1 1/4, pass@2 1 - C(3,2)/C(4,2) = 1/2, pass@4 1; maj: "2" wins at every k and is wrong.
    # C: c = 3: pass@1 3/4, pass@2 1 (n - c = 1 < 2), pass@4 1; maj@1: None does not vote -> wrong; maj@2, 4: "1".
    # D: c = 0: pass@k 0; maj: "x" wins (ties with "y", seen first) and is wrong.
    correct = torch.tensor([[1, 1, 0, 0], [0, 0, 0, 1], [0, 1, 1, 1], [0, 0, 0, 0]], dtype=torch.bool)
    answers = [["7", "7", "3", "5"], ["2", "2", "9", "4"], [None, "1", "1", "1"], ["x", "y", "x", "y"]]
    return correct, answers


def test_reasoning_metrics_by_hand():
    correct, answers = _reasoning_example()
    metric = ReasoningMetrics(n=4)
    metric.update(correct[:2], answers[:2])
    metric.update(correct[2:], answers[2:])
    expected = {
        "mean@4": 6 / 16,  # (2 + 1 + 3 + 0) correct of 16 samples
        "pass@1": (1 / 2 + 1 / 4 + 3 / 4 + 0) / 4,  # = mean@4
        "pass@2": (5 / 6 + 1 / 2 + 1 + 0) / 4,  # = 7/12
        "pass@4": (1 + 1 + 1 + 0) / 4,
        "maj@1": (1 + 0 + 0 + 0) / 4,
        "maj@2": (1 + 0 + 1 + 0) / 4,
        "maj@4": (1 + 0 + 1 + 0) / 4,
    }
    result = metric.compute()
    assert result.keys() == expected.keys()
    for key, value in expected.items():
        assert result[key] == pytest.approx(value, abs=1e-12), key


def test_reasoning_metrics_without_answers_and_custom_ks():
    correct, _ = _reasoning_example()
    metric = ReasoningMetrics(n=4, ks=[2, 1])
    metric.update(correct)
    result = metric.compute()
    assert list(result) == ["mean@4", "pass@1", "pass@2"]  # no answers, no maj@k
    assert result["pass@2"] == pytest.approx(7 / 12)


def test_reasoning_metrics_reject_bad_input():
    correct, answers = _reasoning_example()
    with pytest.raises(ValueError, match="1 <= k <= n"):
        ReasoningMetrics(n=4, ks=[8])
    metric = ReasoningMetrics(n=4)
    with pytest.raises(ValueError, match="n=4 samples"):
        metric.update(correct[:, :3])
    with pytest.raises(ValueError, match="0/1"):
        metric.update(correct.float() * 0.5)
    with pytest.raises(ValueError, match="lists of n=4 answers"):
        metric.update(correct, answers[:3])
    with pytest.raises(ValueError, match="at least one problem"):
        metric.compute()
    # Answers for some problems but not others would make maj@k's denominator ambiguous.
    metric.update(correct[:2], answers[:2])
    metric.update(correct[2:])
    with pytest.raises(ValueError, match="every problem or none"):
        metric.compute()


def test_correction_metrics_by_hand():
    # 8 pairs (t1 -> t2): 1->1 twice, 0->1 three times, 1->0 once, 0->0 twice.
    first = torch.tensor([1, 1, 0, 0, 0, 1, 0, 0])
    second = torch.tensor([1, 1, 1, 1, 1, 0, 0, 0])
    metric = CorrectionMetrics()
    metric.update(first[:5], second[:5])
    metric.update(first[5:], second[5:])
    result = metric.compute()
    assert result == {
        "acc@t1": 3 / 8,
        "acc@t2": 5 / 8,
        "delta": 2 / 8,
        "delta_i2c": 3 / 8,
        "delta_c2i": 1 / 8,
    }
    assert result["delta"] == pytest.approx(result["delta_i2c"] - result["delta_c2i"], abs=1e-15)


def test_correction_delta_identity_on_random_pairs():
    generator = torch.Generator().manual_seed(0)
    first, second = torch.randint(0, 2, (2, 1000), generator=generator)
    metric = CorrectionMetrics()
    metric.update(first.bool(), second.bool())
    result = metric.compute()
    assert result["delta"] == pytest.approx(result["acc@t2"] - result["acc@t1"], abs=1e-15)
    assert result["delta"] == pytest.approx(result["delta_i2c"] - result["delta_c2i"], abs=1e-15)


def test_correction_metrics_reject_bad_input():
    metric = CorrectionMetrics()
    with pytest.raises(ValueError, match="pair up"):
        metric.update(torch.tensor([1, 0]), torch.tensor([1, 0, 1]))
    with pytest.raises(ValueError, match="1 dimension"):
        metric.update(torch.ones(2, 2), torch.ones(2, 2))
    with pytest.raises(ValueError, match="at least one sample"):
        metric.compute()


def test_fix_accuracy_by_hand():
    metric = FixAccuracy()
    metric.update(torch.tensor([1, 0, 1]))
    metric.update(torch.tensor([True, False, False, False, True]))
    assert metric.compute() == {"fix_acc": 4 / 8}


def test_average_over_datasets():
    results = {
        "math500": {"pass@1": 0.5, "pass@8": 0.75, "maj@8": 0.6},
        "aime24": {"pass@1": 0.1, "pass@8": 0.25},  # no maj@8: dropped from the average
        "gsm8k": {"pass@1": 0.9, "pass@8": 1.0, "mean@8": 0.85},
    }
    average = average_over_datasets(results)
    assert average.keys() == {"pass@1", "pass@8"}
    assert average["pass@1"] == pytest.approx((0.5 + 0.1 + 0.9) / 3)  # unweighted: each dataset counts once
    assert average["pass@8"] == pytest.approx((0.75 + 0.25 + 1.0) / 3)
    assert average_over_datasets({"only": {"fix_acc": 0.25}}) == {"fix_acc": 0.25}
    with pytest.raises(ValueError, match="at least one dataset"):
        average_over_datasets({})


PROBLEMS, N_SAMPLES = 10, 8
SPLIT = 6  # rank 0 takes the first 6 problems, rank 1 the other 4: uneven on purpose


def _distributed_data() -> tuple[torch.Tensor, list[list[str | None]], torch.Tensor, torch.Tensor, torch.Tensor]:
    # Answers from a small vocabulary so votes collide and tie; "0" is the right answer, None is unextracted.
    generator = torch.Generator().manual_seed(4)  # a seed where delta, delta_i2c and delta_c2i all differ
    codes = torch.randint(0, 4, (PROBLEMS, N_SAMPLES), generator=generator)
    answers = [[None if code == 3 else str(code) for code in row] for row in codes.tolist()]
    correct = codes == 0
    first, second, fixes = torch.randint(0, 2, (3, PROBLEMS), generator=generator)
    return correct, answers, first, second, fixes


def _metric_values(begin: int, end: int) -> dict[str, float]:
    correct, answers, first, second, fixes = _distributed_data()
    reasoning, correction, fix = ReasoningMetrics(n=N_SAMPLES), CorrectionMetrics(), FixAccuracy()
    # Updates of up to 3 problems, so that states also accumulate within a rank.
    for start in range(begin, end, 3):
        part = slice(start, min(start + 3, end))
        reasoning.update(correct[part], answers[part])
        correction.update(first[part], second[part])
        fix.update(fixes[part])
    return {**reasoning.compute(), **correction.compute(), **fix.compute()}


def _rank(rank: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    values = _metric_values(0, SPLIT) if rank == 0 else _metric_values(SPLIT, PROBLEMS)
    with open(f"{out_dir}/rank{rank}.json", "w") as f:
        json.dump(values, f)
    dist.destroy_process_group()


def test_metrics_are_identical_in_one_process_and_across_ranks(tmp_path):
    mp.spawn(_rank, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    single = _metric_values(0, PROBLEMS)
    assert {"maj@8", "pass@8", "delta_c2i", "fix_acc"} <= single.keys()
    for rank in range(2):
        # Integer states summed over ranks: exactly the single-process values, on every rank.
        assert json.loads((tmp_path / f"rank{rank}.json").read_text()) == single
