"""kvdistill.objectives: what training minimises. One module per fusion space behind one interface
(`base.FusionSpace`), per-teacher terms, the fusion weights, and the thin `Objective` that composes them."""

from kvdistill.objectives.base import FusionSpace, SpaceOutput, Step
from kvdistill.objectives.build import build_objective, build_teachers
from kvdistill.objectives.objective import SPACES, Objective

__all__ = ["SPACES", "FusionSpace", "Objective", "SpaceOutput", "Step", "build_objective", "build_teachers"]
