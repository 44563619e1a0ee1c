"""Fixtures: a real mosquitto (auth + the deploy ACL) and a fresh device identity per test.

See broker_support.py for how the broker is run.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import pytest
from broker_support import DEVICE_POOL, MosquittoBroker, running_broker


@pytest.fixture(scope="session")
def broker() -> Iterator[MosquittoBroker]:
    with running_broker() as b:
        yield b


@pytest.fixture
def own_broker() -> Iterator[MosquittoBroker]:
    with running_broker() as b:
        yield b


_device_numbers = itertools.count()


@pytest.fixture
def device() -> str:
    """A device id (and user name) no other test in this session uses."""
    n = next(_device_numbers)
    if n >= DEVICE_POOL:
        pytest.fail(f"more than {DEVICE_POOL} devices requested: raise DEVICE_POOL")
    return f"dev{n:03d}"
