"""The ``[bundles]`` section: trusted keys, slots and the health gate for firmware bundles."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field

from engines.configbase import StrictModel

__all__ = ["DEFAULT_TRUSTED_KEYS_DIR", "BundlesConfig"]

DEFAULT_TRUSTED_KEYS_DIR = Path("/etc/edge-agent/bundle-keys")


class BundlesConfig(StrictModel):
    trusted_keys_dir: Path = Field(
        default=DEFAULT_TRUSTED_KEYS_DIR,
        description="Directory of public keys a bundle signature must verify against "
        "(*.pub: base64 of the raw 32-byte Ed25519 key, or *.pem); the file name is the key id.",
    )
    allow_downgrade: bool = Field(
        default=False,
        description="Accept a bundle whose version is not newer than the installed one "
        "(`bundle install --allow-downgrade` allows it for one install).",
    )
    health_timeout_s: float = Field(
        default=120.0,
        gt=0,
        description="Time a newly installed version has, from its first boot, to reach READY "
        "and pass its self-test; after it the previous slot is restored.",
    )
    max_boot_attempts: int = Field(
        default=3,
        ge=1,
        le=20,
        description="Boots a new version may take to pass its health gate (crashes and power "
        "loss count); one more and the previous slot is restored.",
    )
    max_download_bytes: int = Field(
        default=4 * 1024**3,
        gt=0,
        description="Largest bundle a URL install downloads; a larger one is refused.",
    )
    hook_timeout_s: float = Field(
        default=120.0, gt=0, description="Time a bundle's pre-/post-install check may take."
    )
    venv_system_site_packages: bool = Field(
        default=False,
        description="Create each slot's virtual environment with --system-site-packages "
        "(Jetson: to see JetPack's tensorrt and pycuda).",
    )
    service_unit: str = Field(
        default="edge-agent.service",
        min_length=1,
        description="The systemd unit `bundle install` restarts to boot the new slot.",
    )
