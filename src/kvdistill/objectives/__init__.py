"""kvdistill.objectives: what training minimises. One interface (`base.TrainingObjective`) that the text
objective (`text.TextObjective`: one module per fusion space behind `space.FusionSpace`, per-teacher terms,
the fusion weights) and the latent-reasoning objective (`kava.KavaObjective`) implement;
`build.build_objective` makes the one a config asks for."""

from kvdistill.objectives.base import TrainingObjective
from kvdistill.objectives.build import OBJECTIVES, build_objective, build_teachers
from kvdistill.objectives.kava import KavaObjective
from kvdistill.objectives.space import FusionSpace, SpaceOutput, Step
from kvdistill.objectives.text import SPACES, TextObjective

__all__ = [
    "OBJECTIVES",
    "SPACES",
    "FusionSpace",
    "KavaObjective",
    "SpaceOutput",
    "Step",
    "TextObjective",
    "TrainingObjective",
    "build_objective",
    "build_teachers",
]
