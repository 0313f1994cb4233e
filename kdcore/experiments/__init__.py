"""Offline KD studies (issue 6): modes, teacher freshness, teacher size, shared labels and
a synthetic sudden shift, all run through the daily pipeline's own steps (progressive
validation, label materialization, student fan-out) and written up as docs/results.md."""

from kdcore.experiments.runner import Settings, run_experiments

__all__ = ["Settings", "run_experiments"]
