"""CIPO end to end on a tiny random model with the transformers engine: the correction stream is built from the
model's own attempts, verified, shaped and trained on; grpo generates no corrections; rho survives a resume; with
anchors_from_previous_step both streams share one engine call and a resume keeps the anchors' groups."""

import json
import math

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger

from cipo_lightning.algorithms import Anchor
from cipo_lightning.callbacks import AdaptiveReplay, RiskShaping
from cipo_lightning.data import ReasoningGymTask, RolloutDataModule
from cipo_lightning.errors import ConfigError
from cipo_lightning.module import CIPOModule
from cipo_lightning.rollout import HFEngine, RolloutCallback, Sample
from cipo_lightning.rollout.batch import CORRECTION_STREAM, ScoredGroup
from cipo_lightning.rollout.corrections import CorrectionGroup, correction_stats
from tests.helpers import ParityReward, PartialCreditReward

GROUP_SIZE, CORRECTION_GROUP_SIZE, PROMPTS, ANCHORS = 4, 3, 2, 2


class RecordingEngine(HFEngine):
    """The real transformers engine, remembering each generate call: prompts, n, and the samples it returned."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = []
        self.engine_calls = []  # (prompts, n) of each request, per call of generate_many

    def generate(self, prompts, sampling):
        samples = super().generate(prompts, sampling)
        self.calls.append((prompts, sampling.n, samples))
        return samples

    def generate_many(self, requests):
        self.engine_calls.append([(len(prompts), sampling.n) for prompts, sampling in requests])
        return super().generate_many(requests)


class RecordingModule(CIPOModule):
    """The real module, remembering the rollout batches it trained on."""

    def loss_targets(self, batch):
        self.batches = [*getattr(self, "batches", []), batch]
        return super().loss_targets(batch)


def _group(anchor_reward: float, rewards: list[float], in_band: bool = True) -> CorrectionGroup:
    anchor = Anchor(group=0, sample=0, correct=anchor_reward == 1.0, in_band=in_band)
    samples = [Sample([7] * (i + 1), [0.0] * (i + 1), truncated=False) for i in range(len(rewards))]
    scored = ScoredGroup({"prompt": []}, [1, 2, 3], samples, ["x"] * len(rewards), rewards)
    shift = [-float(anchor_reward == 1.0 and r == 0.0) for r in rewards]
    return CorrectionGroup(anchor, "attempt", anchor_reward, scored, shift)


def test_correction_stats_by_hand():
    groups = [_group(1.0, [1.0, 0.0, 1.0, 1.0]), _group(0.0, [1.0, 0.0, 0.0, 0.0], in_band=False)]
    stats = correction_stats(groups).reduce()
    assert stats["train/anchors_correct"] == stats["train/anchors_failed"] == 1
    assert stats["train/anchors_in_band"] == stats["train/anchors_fallback"] == 1
    assert stats["train/retention"] == 0.75 and stats["train/c2i_rate"] == 0.25
    assert stats["train/i2c_rate"] == 0.25
    assert stats["train/correction_reward_mean"] == 4 / 8
    assert stats["train/correction_advantage_shift_mean"] == -1 / 8  # the one c->i costs lambda_risk 1
    assert stats["train/anchor_correct_frac"] == 0.5
    assert stats["train/correction_prompt_len_mean"] == 3 and stats["train/correction_len_mean"] == 2.5
    # Without a correct anchor retention is NaN, not absent (Lightning would repeat the last logged value).
    only_failed = correction_stats([_group(0.0, [1.0, 0.0])]).reduce()
    assert math.isnan(only_failed["train/retention"]) and math.isnan(only_failed["train/c2i_rate"])
    assert only_failed["train/i2c_rate"] == 0.5


def _fit(tiny_model, root, algorithm="cipo", steps=2, replay=None, ckpt_path=None, reward=None, **rollout_args):
    module = RecordingModule(model=tiny_model, learning_rate=1e-2, micro_batch_size=8, gradient_checkpointing=False)
    task = ReasoningGymTask(train_size=64, val_size=8, reward=reward or ParityReward())
    datamodule = RolloutDataModule(task, PROMPTS)
    engine = RecordingEngine()
    rollout = RolloutCallback(
        engine,
        group_size=GROUP_SIZE,
        max_new_tokens=8,
        algorithm=algorithm,
        num_anchors=ANCHORS,
        correction_group_size=CORRECTION_GROUP_SIZE,
        sample_table_every_n_steps=1,
        **rollout_args,
    )
    replay = replay or AdaptiveReplay(rho=0.5)
    logged = []

    class Recorder(L.Callback):
        def on_train_batch_end(self, trainer, *args):
            logged.append({k: v.item() for k, v in trainer.callback_metrics.items()})

    checkpoint = ModelCheckpoint(dirpath=root / "checkpoints", every_n_train_steps=2)
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=steps,
        logger=CSVLogger(root, name=""),
        callbacks=[rollout, replay, RiskShaping(), Recorder(), checkpoint],
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, datamodule, ckpt_path=ckpt_path)
    return module, engine, replay, logged, trainer


def test_cipo_trains_on_verified_corrections_of_its_own_attempts(tiny_model, tmp_path):
    module, engine, _, logged, trainer = _fit(tiny_model, tmp_path)
    tokenizer = module.tokenizer
    # Each step: one base generation (G per prompt), then one correction generation (G_c per anchor).
    assert [(len(prompts), n) for prompts, n, _ in engine.calls] == [
        (PROMPTS, GROUP_SIZE),
        (ANCHORS, CORRECTION_GROUP_SIZE),
    ] * 2
    records = [json.loads(line) for line in (tmp_path / "version_0" / "correction_samples.jsonl").open()]
    assert [r["step"] for r in records] == [0] * 6 + [1] * 6
    reward = ParityReward()
    for step in range(2):
        (_, _, base_samples), (correction_prompts, _, correction_samples) = engine.calls[2 * step : 2 * step + 2]
        base_texts = tokenizer.batch_decode([s.token_ids for g in base_samples for s in g], skip_special_tokens=True)
        step_records = [r for r in records if r["step"] == step]
        for anchor_index, prompt in enumerate(correction_prompts):
            group = step_records[anchor_index * CORRECTION_GROUP_SIZE : (anchor_index + 1) * CORRECTION_GROUP_SIZE]
            anchor = group[0]["anchor"]
            # The anchor is one of this step's own base completions, and the correction prompt shows it.
            assert anchor in base_texts
            assert anchor in tokenizer.decode(prompt)
            corrections = [s.token_ids for s in correction_samples[anchor_index]]
            assert [r["correction"] for r in group] == tokenizer.batch_decode(corrections, skip_special_tokens=True)
            for r in group:  # scored by the task's verifier, then risk-shaped (lambda_risk 1)
                assert r["reward"] == reward([], [r["correction"]])[0]
                broken = r["anchor_reward"] == 1.0 and r["reward"] == 0.0
                assert r["advantage_shift"] == -float(broken)
        # The batch trains on both streams; the anchor text sits only in the (untrained) prompt columns.
        batch = module.batches[step]
        corrections = batch.streams == CORRECTION_STREAM
        assert corrections.sum() == ANCHORS * CORRECTION_GROUP_SIZE
        assert len(batch) == PROMPTS * GROUP_SIZE + ANCHORS * CORRECTION_GROUP_SIZE
        trained = [
            tokenizer.decode(ids[mask.bool()])
            for ids, mask in zip(batch.completion_ids, batch.completion_mask, strict=True)
        ]
        correction_rows = trained[PROMPTS * GROUP_SIZE :]
        assert correction_rows == tokenizer.batch_decode([s.token_ids for g in correction_samples for s in g])
        # The shaping reaches the loss as an advantage shift of exactly the broken corrections' rows.
        step_shifts = [r["advantage_shift"] for r in step_records]
        assert batch.advantage_shift[corrections].tolist() == step_shifts
    for step in logged:
        assert step["train/anchors_correct"] + step["train/anchors_failed"] == ANCHORS
        assert step["train/anchors_in_band"] + step["train/anchors_fallback"] == ANCHORS
        for key in ("train/rho", "train/correction_reward_mean", "train/correction_advantage_shift_mean",
                    "train/correction_prompt_len_mean", "train/correction_len_mean", "train/base_loss",
                    "train/correction_loss", "train/base_clip_frac", "train/correction_clip_frac",
                    "time/correction_rollout"):  # fmt: skip
            assert key in step, key
    assert trainer.global_step == 2


def test_grpo_generates_no_corrections(tiny_model, tmp_path):
    module, engine, replay, logged, _ = _fit(tiny_model, tmp_path, algorithm="grpo")
    assert [(len(prompts), n) for prompts, n, _ in engine.calls] == [(PROMPTS, GROUP_SIZE)] * 2
    assert all(not (batch.streams == CORRECTION_STREAM).any() for batch in module.batches)
    assert not any(key.startswith("train/correction") or key == "train/rho" for key in logged[-1])
    assert replay.rho == 0.5 and not (tmp_path / "version_0" / "correction_samples.jsonl").exists()


def test_resumed_run_continues_with_the_saved_rho(tiny_model, tmp_path):
    _, _, replay, _, _ = _fit(tiny_model, tmp_path / "first", steps=2)
    saved_rho = replay.rho
    assert saved_rho != 0.5, "rho did not move in two steps; the test would not see a lost rho"
    (checkpoint,) = (tmp_path / "first" / "checkpoints").glob("*.ckpt")
    state = torch.load(checkpoint, map_location="cpu", weights_only=False)["callbacks"]["AdaptiveReplay"]
    assert state == {"rho": saved_rho, "retention_prev": replay.retention_prev}
    # A fresh run starts from rho0 = 0.5 unless the checkpoint restores the saved value.
    _, _, _, logged, _ = _fit(tiny_model, tmp_path / "second", steps=3, ckpt_path=checkpoint)
    assert len(logged) == 1 and logged[0]["train/rho"] == pytest.approx(saved_rho)


def test_correct_threshold_decides_correct_in_every_statistic(tiny_model, tmp_path):
    # Partial credit (0.6 / 0.2): under the default threshold 1.0 nothing is ever correct.
    _, _, _, strict, _ = _fit(tiny_model, tmp_path / "strict", steps=1, reward=PartialCreditReward())
    assert strict[0]["train/accuracy"] == 0 and strict[0]["train/anchors_correct"] == 0
    assert math.isnan(strict[0]["train/retention"])
    _, _, _, lenient, _ = _fit(
        tiny_model, tmp_path / "lenient", steps=1, reward=PartialCreditReward(), correct_threshold=0.5
    )
    assert 0 < lenient[0]["train/accuracy"] < 1 and lenient[0]["train/anchors_correct"] == 1  # rho 0.5 of 2
    assert 0 <= lenient[0]["train/retention"] <= 1 and not math.isnan(lenient[0]["train/i2c_rate"])


def test_max_model_len_must_hold_the_longest_correction_prompt(tiny_model):
    from transformers import AutoTokenizer

    from cipo_lightning.rollout import VLLMEngine

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    rows, _ = ReasoningGymTask(train_size=64, val_size=8).load()

    def check(max_model_len: int, algorithm: str = "cipo") -> None:
        engine = VLLMEngine(max_model_len=max_model_len)  # constructed, not started: the check needs its limit only
        RolloutCallback(engine, max_new_tokens=48, algorithm=algorithm).check_model_len(tokenizer, rows)

    check(512)
    check(150, algorithm="grpo")  # a base prompt (~40 tokens) + 48 fits; no correction prompts under grpo
    with pytest.raises(ConfigError, match=r"max_model_len 150 cannot hold the longest correction prompt"):
        check(150)
    with pytest.raises(ConfigError, match=r"max_model_len 64 cannot hold the longest training prompt"):
        check(64, algorithm="grpo")


def test_top_p_below_one_warns_that_log_probs_are_renormalised():
    with pytest.warns(UserWarning, match="top_p 0.9 < 1"):
        RolloutCallback(HFEngine(), top_p=0.9)


def _records(root):
    return [json.loads(line) for line in (root / "version_0" / "correction_samples.jsonl").open()]


def test_anchors_from_the_previous_step_share_the_base_engine_call(tiny_model, tmp_path):
    module, engine, _, logged, _ = _fit(tiny_model, tmp_path, steps=3, anchors_from_previous_step=True)
    tokenizer = module.tokenizer
    # Step 0 has no previous groups: base call, then the corrections of its own anchors. Later steps: one call.
    base, corrections = (PROMPTS, GROUP_SIZE), (ANCHORS, CORRECTION_GROUP_SIZE)
    assert engine.engine_calls == [[base], [corrections], [base, corrections], [base, corrections]]
    base_texts = [
        tokenizer.batch_decode([s.token_ids for g in samples for s in g], skip_special_tokens=True)
        for prompts, n, samples in engine.calls
        if n == GROUP_SIZE
    ]
    records = _records(tmp_path)
    for step in range(3):
        anchors = {r["anchor"] for r in records if r["step"] == step}
        # Step 0 corrects its own attempts; every later step the attempts of the step before.
        assert anchors and anchors <= set(base_texts[max(step - 1, 0)])
        batch = module.batches[step]
        assert (batch.streams == CORRECTION_STREAM).sum() == ANCHORS * CORRECTION_GROUP_SIZE
    # The corrections sampled in step 1's call (the engine's 4th generate) are the ones step 1 trains on.
    correction_prompts, _, step1_corrections = engine.calls[3]
    step1_anchors = [r["anchor"] for r in records if r["step"] == 1][::CORRECTION_GROUP_SIZE]
    assert all(a in tokenizer.decode(p) for a, p in zip(step1_anchors, correction_prompts, strict=True))
    trained = module.batches[1]
    rows = trained.streams == CORRECTION_STREAM
    decoded = [tokenizer.decode(ids[mask.bool()]) for ids, mask in zip(trained.completion_ids[rows],
               trained.completion_mask[rows], strict=True)]  # fmt: skip
    assert decoded == tokenizer.batch_decode([s.token_ids for g in step1_corrections for s in g])
    assert all(step["train/anchors_correct"] + step["train/anchors_failed"] == ANCHORS for step in logged)


def test_previous_anchors_ride_on_the_first_round_of_dynamic_sampling(tiny_model, tmp_path):
    module, engine, _, _, _ = _fit(tiny_model, tmp_path, steps=2, anchors_from_previous_step=True,
                                   dynamic_sampling=True, max_generation_rounds=4)  # fmt: skip
    base, corrections = (PROMPTS, GROUP_SIZE), (ANCHORS, CORRECTION_GROUP_SIZE)
    # Step 0: its rounds, then its own anchors' corrections; step 1: the corrections in its first round's call only.
    step0_end = engine.engine_calls.index([corrections]) + 1
    assert all(call == [base] for call in engine.engine_calls[: step0_end - 1])
    first, *more = engine.engine_calls[step0_end:]
    assert first == [base, corrections] and all(call == [base] for call in more)
    assert (module.batches[1].streams == CORRECTION_STREAM).sum() == ANCHORS * CORRECTION_GROUP_SIZE


def test_a_resume_corrects_the_anchors_of_the_step_before_the_checkpoint(tiny_model, tmp_path):
    module, first, _, _, _ = _fit(tiny_model, tmp_path / "first", steps=2, anchors_from_previous_step=True)
    (_, n, step1_base) = first.calls[2]  # step 0: base, corrections; step 1: base and corrections in one call
    assert n == GROUP_SIZE
    step1_texts = module.tokenizer.batch_decode([s.token_ids for g in step1_base for s in g], skip_special_tokens=True)
    (checkpoint,) = (tmp_path / "first" / "checkpoints").glob("*.ckpt")
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)["callbacks"]["RolloutCallback"]
    (saved,) = state["previous_groups"]  # one list per rank
    assert [t for g in saved for t in g["texts"]] == step1_texts
    _, resumed, _, _, _ = _fit(tiny_model, tmp_path / "second", steps=3, ckpt_path=checkpoint,
                               anchors_from_previous_step=True)  # fmt: skip
    # The resumed step 2 samples both streams in one call, and its anchors are step 1's attempts from the checkpoint.
    assert resumed.engine_calls == [[(PROMPTS, GROUP_SIZE), (ANCHORS, CORRECTION_GROUP_SIZE)]]
    anchors = {r["anchor"] for r in _records(tmp_path / "second")}
    assert anchors and anchors <= set(step1_texts)


@pytest.mark.slow
def test_vllm_samples_requests_of_different_n_in_one_call_as_each_alone(tiny_model):
    """The base groups (n = G) and the corrections (n = G_c) in one LLM.generate call; seeded, every prompt draws
    the tokens it draws in a call of its own."""
    from cipo_lightning.rollout import SamplingSettings, VLLMEngine

    engine = VLLMEngine(dtype="float32", kv_cache_memory_gb=0.1, max_model_len=128)
    engine.start(tiny_model, 0, torch.device("cpu"))
    base, corrections = [[1, 9690, 198], [1, 4093, 28, 17]], [[1, 2, 3, 4, 5, 6, 7, 8]]
    base_sampling = SamplingSettings(n=4, max_new_tokens=6, temperature=1.0, seed=5)
    correction_sampling = SamplingSettings(n=3, max_new_tokens=6, temperature=1.0, seed=5)
    calls = []
    generate = engine.llm.generate
    engine.llm.generate = lambda *args, **kwargs: calls.append(args) or generate(*args, **kwargs)
    try:
        together = engine.generate_many([(base, base_sampling), (corrections, correction_sampling)])
        assert len(calls) == 1
        alone = [engine.generate(base, base_sampling), engine.generate(corrections, correction_sampling)]
    finally:
        engine.shutdown()
    tokens = [[[s.token_ids for s in samples] for samples in request] for request in together]
    assert [[len(group) for group in request] for request in tokens] == [[4, 4], [3]]
    assert tokens == [[[s.token_ids for s in samples] for samples in request] for request in alone]
