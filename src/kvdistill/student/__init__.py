"""kvdistill.student: the model being trained, built from a checkpoint or a config, optionally wrapped in
LoRA.

Below `objectives/` (which trains it) and `train/` (which runs the loop)."""

from kvdistill.student.build import build_student, save_student, unwrap_student

__all__ = ["build_student", "save_student", "unwrap_student"]
