"""The base of every config section: unknown keys refused, assignments validated, floats finite (an `inf` loss
weight or weight decay is refused when the config is read, not found as a divergence mid-run), attribute
docstrings kept as field descriptions (`kvdistill config show` prints them)."""

from __future__ import annotations

from typing import ClassVar

from pydantic import BaseModel, ConfigDict


class Section(BaseModel):
    model_config = ConfigDict(
        extra="forbid", validate_assignment=True, allow_inf_nan=False, use_attribute_docstrings=True
    )

    presence_fields: ClassVar[frozenset[str]] = frozenset()
    """Fields whose being set, not only their value, means something (e.g. data.text_field chooses text mode):
    a resolved dump writes every other field and these only where they were set
    (`kvdistill.config.dump_config`)."""
