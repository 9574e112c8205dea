"""Evaluation: reasoning pass@k and correction metrics, one call from Python or the validate / test loops."""

from cipo_lightning.evaluation.callback import Evaluation
from cipo_lightning.evaluation.core import EvalMetrics, ScoredEval, evaluate, evaluate_rows
from cipo_lightning.evaluation.report import markdown_table, write_report

__all__ = ["EvalMetrics", "Evaluation", "ScoredEval", "evaluate", "evaluate_rows", "markdown_table", "write_report"]
