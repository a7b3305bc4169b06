"""Evaluation in simulation: success rates with intervals, videos."""

from robofinetune.eval.rollout import EvalResult, evaluate_policy, record_videos
from robofinetune.eval.stats import success_rate_ci

__all__ = ["EvalResult", "evaluate_policy", "record_videos", "success_rate_ci"]
