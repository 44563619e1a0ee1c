"""Fixtures for the bundle tests: real Ed25519 keys and a trusted-keys folder (bundle_support)."""

from __future__ import annotations

import pytest
from bundle_support import BundleKeys, make_key


@pytest.fixture
def bundle_keys(tmp_path_factory: pytest.TempPathFactory) -> BundleKeys:
    """Key ``release`` (``keys/release.key``) and a trusted folder holding ``release.pub``."""
    keys_dir = tmp_path_factory.mktemp("keys")
    key, private, public = make_key(keys_dir, "release")
    trusted = tmp_path_factory.mktemp("trusted")
    (trusted / public.name).write_bytes(public.read_bytes())
    return BundleKeys(key=key, key_path=private, public_path=public, trusted_dir=trusted)


@pytest.fixture
def other_keys(tmp_path_factory: pytest.TempPathFactory) -> BundleKeys:
    """A second, unrelated key ``release`` in its own folders: its signature must not verify
    against ``bundle_keys.trusted_dir`` although the key id is the same."""
    keys_dir = tmp_path_factory.mktemp("other-keys")
    key, private, public = make_key(keys_dir, "release")
    trusted = tmp_path_factory.mktemp("other-trusted")
    (trusted / public.name).write_bytes(public.read_bytes())
    return BundleKeys(key=key, key_path=private, public_path=public, trusted_dir=trusted)
