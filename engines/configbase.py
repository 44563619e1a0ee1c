"""The pydantic base every config section of every layer derives from."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict

__all__ = ["StrictModel"]


class StrictModel(BaseModel):
    """Unknown keys are errors (``extra="forbid"``); every field must carry a description."""

    model_config = ConfigDict(extra="forbid", validate_default=True, str_strip_whitespace=True)
