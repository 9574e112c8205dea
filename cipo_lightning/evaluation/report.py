"""Evaluation results as files: JSON (every number and the settings), a markdown table, a pass@k curve as PNG."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from cipo_lightning.metrics import average_over_datasets


def averages(results: dict[str, dict[str, float]]) -> dict[str, float]:
    """Unweighted means over eval sets: reasoning metrics over the reasoning sets, fix_acc over the fix sets."""
    fix_sets = {label: m for label, m in results.items() if "fix_acc" in m}
    reasoning_sets = {label: m for label, m in results.items() if label not in fix_sets}
    return {
        **(average_over_datasets(reasoning_sets) if reasoning_sets else {}),
        **(average_over_datasets(fix_sets) if fix_sets else {}),
    }


def markdown_table(results: dict[str, dict[str, float]]) -> str:
    """One row per eval set and one for the average, one column per metric (in first-seen order), 3 decimals."""
    table = {**results, "average": averages(results)} if len(results) > 1 else results
    columns = list(dict.fromkeys(key for metrics in table.values() for key in metrics))
    lines = ["| set | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for label, metrics in table.items():
        cells = [f"{metrics[c]:.3f}" if c in metrics else "" for c in columns]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_report(stem: Path, results: dict[str, dict[str, float]], info: dict[str, Any]) -> list[Path]:
    """`stem`.json (metrics per set, averages and `info`), `stem`.md (the table) and `stem`.png (pass@k against k
    per reasoning set). Returns the paths written."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    paths = [stem.with_suffix(".json"), stem.with_suffix(".md")]
    payload = {**info, "results": results, "average": averages(results)}
    paths[0].write_text(json.dumps(payload, indent=2) + "\n")
    paths[1].write_text(markdown_table(results))
    curves = {
        label: sorted((int(key.split("@")[1]), value) for key, value in metrics.items() if key.startswith("pass@"))
        for label, metrics in results.items()
    }
    curves = {label: points for label, points in curves.items() if points}
    if curves:
        paths.append(stem.with_suffix(".png"))
        _plot_pass_at_k(paths[-1], curves, str(info.get("title", stem.name)))
    return paths


def _plot_pass_at_k(path: Path, curves: dict[str, list[tuple[int, float]]], title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on servers
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    for label, points in curves.items():
        ks, values = zip(*points, strict=True)
        ax.plot(ks, values, marker="o", label=label)
    ax.set_xscale("log", base=2)
    ks = sorted({k for points in curves.values() for k, _ in points})
    ax.set_xticks(ks, [str(k) for k in ks])
    ax.set(xlabel="k", ylabel="pass@k", ylim=(0, 1), title=title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
