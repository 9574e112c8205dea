"""Every YAML file under configs/ parses with the CLI (`--print_config`), and every setting in it reaches the
resolved config. Strategy files are overlays: they are checked on top of configs/quickstart.yaml, the way the
README and docs/scaling.md use them."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from cipo_lightning.cli import main

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
# Overlays (no model or rollout section of their own) go on top of this one.
BASE = CONFIGS / "quickstart.yaml"
# The subcommand a config is written for, where it is not fit.
SUBCOMMAND = {"eval.yaml": "test"}


def _config_files() -> list[Path]:
    return sorted(CONFIGS.rglob("*.yaml")) + sorted(CONFIGS.rglob("*.yml"))


def _is_overlay(config: dict[str, Any]) -> bool:
    return "model" not in config and "rollout" not in config


def _missing(expected: Any, resolved: Any, where: str = "") -> list[str]:
    """Settings of `expected` that `resolved` does not hold (resolved may add defaults)."""
    if isinstance(expected, dict):
        if not isinstance(resolved, dict):
            return [f"{where}: {resolved!r} is not a mapping"]
        return [
            problem
            for key, value in expected.items()
            for problem in (
                _missing(value, resolved[key], f"{where}.{key}".lstrip("."))
                if key in resolved
                else [f"{where}.{key}".lstrip(".") + " missing"]
            )
        ]
    if isinstance(expected, list):
        if not isinstance(resolved, list) or len(resolved) != len(expected):
            return [f"{where}: {resolved!r} against {expected!r}"]
        pairs = enumerate(zip(expected, resolved, strict=True))
        return [problem for i, (e, r) in pairs for problem in _missing(e, r, f"{where}[{i}]")]
    return [] if expected == resolved else [f"{where}: {resolved!r} against {expected!r}"]


@pytest.mark.parametrize("path", _config_files(), ids=lambda p: str(p.relative_to(CONFIGS)))
def test_config_parses_and_every_setting_lands(
    path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    config = yaml.safe_load(path.read_text())
    assert isinstance(config, dict) and config, f"{path}: empty or not a mapping"
    configs = [BASE, path] if _is_overlay(config) else [path]
    args = [SUBCOMMAND.get(path.name, "fit")]
    for file in configs:
        args += ["--config", str(file)]
    monkeypatch.setattr(sys, "argv", ["cipo_lightning"])  # pytest's own arguments are not the CLI's
    with pytest.raises(SystemExit) as exit_info:
        main([*args, "--print_config"])
    printed = capsys.readouterr()
    assert exit_info.value.code in (None, 0), printed.err[-2000:]
    resolved = yaml.safe_load(printed.out)
    missing = _missing(config, resolved)
    assert not missing, f"{path}: settings not in the resolved config: {missing}"


def test_missing_finds_a_changed_setting() -> None:
    resolved = {"trainer": {"max_steps": 20, "callbacks": [{"class_path": "X", "init_args": {"a": 1, "b": 2}}]}}
    assert _missing({"trainer": {"callbacks": [{"init_args": {"a": 1}}]}}, resolved) == []
    assert _missing({"trainer": {"max_steps": 5}}, resolved) == ["trainer.max_steps: 20 against 5"]
    assert _missing({"trainer": {"callbacks": [{"init_args": {"c": 1}}]}}, resolved) == [
        "trainer.callbacks[0].init_args.c missing"
    ]


def test_every_config_file_is_collected() -> None:
    names = {str(p.relative_to(CONFIGS)) for p in _config_files()}
    assert {"quickstart.yaml", "math.yaml", "coder.yaml", "eval.yaml", "strategy/ddp.yaml"} <= names
