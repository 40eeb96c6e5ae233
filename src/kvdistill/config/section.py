"""The base of every config section: unknown keys refused, assignments validated, floats finite (an `inf` loss
weight or weight decay is refused when the config is read, not found as a divergence mid-run)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)
