"""HFEngine samples exactly the distribution the trainer scores, whatever the model's generation_config says."""

import json
import shutil
from pathlib import Path

import torch

from cipo_lightning.module import CIPOModule
from cipo_lightning.rollout import HFEngine, SamplingSettings, collate_rollouts


def test_model_sampling_settings_do_not_change_the_sampled_distribution(tiny_model, tmp_path):
    # A model folder that ships sampling settings which, applied by generate, would change the distribution.
    model_dir = Path(shutil.copytree(tiny_model, tmp_path / "model"))
    config_path = model_dir / "generation_config.json"
    config = json.loads(config_path.read_text())
    config |= {"do_sample": True, "repetition_penalty": 1.3, "top_k": 5, "min_p": 0.05, "no_repeat_ngram_size": 2}
    config_path.write_text(json.dumps(config))

    engine = HFEngine()
    engine.start(str(model_dir), seed=0, device=torch.device("cpu"))
    prompts = [[1, 9690, 198, 4093], [1, 520, 33, 2047, 198]]
    groups = engine.generate(prompts, SamplingSettings(n=4, max_new_tokens=12, temperature=0.7))
    samples = [s for group in groups for s in group]
    assert max(len(s.token_ids) for s in samples) > 4  # long enough for repeats and n-grams to matter

    module = CIPOModule(model=str(model_dir), gradient_checkpointing=False)
    module.configure_model()
    batch = collate_rollouts(
        [p for p in prompts for _ in range(4)], samples, [0.0] * len(samples), [0] * len(samples), 2, 0.7, 12
    )
    with torch.no_grad():
        trainer_logprobs, _ = module.token_logprobs(module.policy, batch)
    mask = batch.completion_mask.bool()
    assert (trainer_logprobs[mask] - batch.engine_logprobs[mask]).abs().max() < 1e-5
