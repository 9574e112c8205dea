"""The command line: help, config printing, and one-line errors for the mistakes users make."""

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# Runs the CLI with vLLM made unimportable, as on a machine where it is not installed (a None entry in
# sys.modules makes `import vllm` fail and importlib.util.find_spec return None).
_WITHOUT_VLLM = """
import sys
sys.modules["vllm"] = None
from cipo_lightning.cli import main
main(sys.argv[1:])
"""


def _run(*args: str, code: str | None = None) -> subprocess.CompletedProcess:
    """The CLI with `args`, its run folder in a temporary root: set after the last --config (which would otherwise
    set it back to the config's runs/...), so a command that fails after creating its version_N folder leaves
    nothing in the checkout."""
    with tempfile.TemporaryDirectory() as root:
        args = _with_root(list(args), root)
        command = [sys.executable, "-c", code, *args] if code else [sys.executable, "-m", "cipo_lightning", *args]
        env = {**os.environ, "PYTHONPATH": str(REPO), "WANDB_MODE": "disabled"}
        return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def _with_root(args: list[str], root: str) -> list[str]:
    configs = [i for i, arg in enumerate(args) if arg == "--config"]
    at = configs[-1] + 2 if configs else 1  # after the subcommand
    return [*args[:at], "--trainer.default_root_dir", root, *args[at:]]


def _assert_one_line_error(result: subprocess.CompletedProcess, *fragments: str) -> None:
    assert result.returncode != 0
    assert "Traceback" not in result.stderr, result.stderr[-2000:]
    error_lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1, result.stderr[-2000:]
    for fragment in fragments:
        assert fragment in error_lines[0], error_lines[0]


def test_print_config_shows_every_section_with_defaults():
    result = _run("fit", "--config", "configs/quickstart.yaml", "--print_config")
    assert result.returncode == 0, result.stderr[-2000:]
    for expected in ("model: SmolLM2-135M-Instruct", "clip_eps_high: 0.28", "group_size: 8", "VLLMEngine",
                     "ReasoningGymTask", "prompts_per_step: 4", "loss_aggregation: token_mean", "policy_loss: ppo",
                     "advantage_estimator: grpo", "kl_estimator: k3", "algorithm: cipo", "correction_group_size: 4",
                     "anchor_band:", "lambda_risk: 1.0", "rho_max: 0.8", "lambda_corr: 1.0"):  # fmt: skip
        assert expected in result.stdout, expected
    grpo = _run("fit", "--config", "configs/quickstart.yaml", "--algorithm", "grpo", "--print_config")
    assert grpo.returncode == 0 and "algorithm: grpo" in grpo.stdout, grpo.stderr[-2000:]


def test_help_documents_settings():
    result = _run("fit", "--help")
    assert result.returncode == 0
    assert "AdamW learning rate" in result.stdout
    assert "completions sampled per prompt" in result.stdout
    assert "Dr. GRPO" in result.stdout and "dual-clip" in result.stdout


def test_unknown_model_path():
    result = _run("fit", "--config", "configs/quickstart.yaml", "--model.model", "/no/such/model")
    _assert_one_line_error(result, "model:", "/no/such/model")


def test_unknown_hub_id_without_hub():
    result = _run("fit", "--config", "configs/quickstart.yaml", "--model.model", "nobody/no-such-model-xyz",
                  "--rollout.engine", "cipo_lightning.rollout.HFEngine")  # fmt: skip
    _assert_one_line_error(result, "model:", "nobody/no-such-model-xyz")


def test_misspelled_config_key(tmp_path):
    config = tmp_path / "typo.yaml"
    config.write_text((REPO / "configs/quickstart.yaml").read_text().replace("group_size:", "group_sise:"))
    result = _run("fit", "--config", str(config))
    _assert_one_line_error(result, "group_sise")


def test_task_without_verifier(tmp_path):
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"prompt": "What is 1 + 1?", "answer": "2"}\n')
    result = _run("fit", "--config", "configs/quickstart.yaml", "--data.task", "cipo_lightning.data.DatasetTask",
                  "--data.task.path", str(rows))  # fmt: skip
    _assert_one_line_error(result, "data.task", "no verifier")


def test_vllm_engine_without_vllm_installed():
    result = _run("fit", "--config", "configs/quickstart.yaml", code=_WITHOUT_VLLM)
    _assert_one_line_error(result, "rollout.engine", "vLLM", "HFEngine")


def test_group_size_below_two():
    result = _run("fit", "--config", "configs/quickstart.yaml", "--rollout.group_size", "1")
    _assert_one_line_error(result, "rollout.group_size")


def test_composed_reward_in_config(tmp_path):
    config = tmp_path / "reward.yaml"
    config.write_text(
        "data:\n  task:\n    class_path: cipo_lightning.data.ReasoningGymTask\n    init_args:\n      reward:\n"
        "        class_path: cipo_lightning.rewards.WeightedSum\n        init_args:\n          rewards:\n"
        "            - class_path: cipo_lightning.rewards.ReasoningGymReward\n"
        "              init_args: {dataset: basic_arithmetic}\n"
        "            - class_path: tests.helpers.ParityReward\n          weights: [1.0, 0.1]\n"
    )
    result = _run("fit", "--config", "configs/quickstart.yaml", "--config", str(config), "--print_config")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "cipo_lightning.rewards.WeightedSum" in result.stdout and "partial_credit: false" in result.stdout


@pytest.mark.parametrize(
    ("args", "fragments"),
    [
        (["--replay.rho_min", "0.9", "--replay.rho_max", "0.5", "--replay.rho", "0.6"], ["replay.rho_min"]),
        (["--shaping.lambda_risk", "-1"], ["shaping.lambda_risk"]),
        (["--rollout.anchor_band", "[0.8, 0.2]"], ["rollout.anchor_band"]),
        (["--rollout.anchor_band", "[-0.1, 0.5]"], ["rollout.anchor_band"]),
        (["--replay.rho", "1.5"], ["replay.rho"]),
        (["--rollout.correction_template", "Fix this."], ["rollout.correction_template", "{problem}"]),
    ],
)
def test_bad_cipo_settings(args, fragments):
    _assert_one_line_error(_run("fit", "--config", "configs/quickstart.yaml", *args), *fragments)
