"""Round-robin in-flight slots shared by the engines' submit/collect, model-file checks, and the
checks every engine call starts with (engine still open, input name known).

A slot is one set of buffers (and, on TensorRT, an execution context, a CUDA stream and an event).
``submit`` takes the next free slot in turn and hands back a :class:`~engines.base.Ticket`; the
slot stays taken until that ticket is collected, so neither its input buffer (being read) nor its
output buffers (not yet read) are touched meanwhile. A ``collect`` whose timeout passes first
(``InferenceTimeoutError``) leaves the ticket outstanding: collect it again, never abandon it, or
its slot stays taken for good. With every slot taken, ``submit`` and ``input_buffer`` raise
``InferenceError`` instead of blocking (blocking would deadlock a single-threaded caller); a
threaded caller bounds its own submissions by the slot count (the vision pipeline's slot tokens)
and so never meets this.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np

from engines.base import TensorSpec, Ticket
from engines.errors import (
    EngineClosedError,
    InferenceError,
    InputSpecError,
    ModelFileError,
    ModelFormatError,
)
from engines.fetch import hash_file

__all__ = [
    "SlotRing",
    "check_array",
    "check_model_file",
    "check_open",
    "file_sha256",
    "find_input",
    "shape_text",
]


class SlotRing:
    """Hands out slots round-robin, skipping slots whose ticket is still out."""

    def __init__(self, count: int) -> None:
        if count < 1:
            msg = f"an engine needs at least one slot, got {count}"
            raise ValueError(msg)
        self._count = count
        self._cursor = 0
        self._sequence = 0
        self._outstanding: dict[int, int] = {}

    @property
    def count(self) -> int:
        return self._count

    @property
    def in_flight(self) -> int:
        return len(self._outstanding)

    def require_free(self) -> int:
        """The first free slot from the cursor on (the one the next ``submit`` and
        ``input_buffer`` use), or ``InferenceError`` when all are taken."""
        for step in range(self._count):
            slot = (self._cursor + step) % self._count
            if slot not in self._outstanding:
                return slot
        oldest = min(self._outstanding.values())
        msg = (
            f"all {self._count} slots hold uncollected tickets (oldest #{oldest}): collect() a "
            "ticket before submitting again (one whose collect timed out is still outstanding)"
        )
        raise InferenceError(msg)

    def issue(self) -> Ticket:
        """Take the next free slot and return its ticket."""
        slot = self.require_free()
        ticket = Ticket(slot=slot, sequence=self._sequence)
        self._outstanding[slot] = self._sequence
        self._sequence += 1
        self._cursor = (slot + 1) % self._count
        return ticket

    def check(self, ticket: Ticket) -> None:
        """Raise ``InferenceError`` unless ``ticket`` is outstanding."""
        if self._outstanding.get(ticket.slot) != ticket.sequence:
            msg = (
                f"ticket #{ticket.sequence} (slot {ticket.slot}) is not outstanding: it was "
                "already collected or comes from another engine; collect each ticket exactly once"
            )
            raise InferenceError(msg)

    def release(self, ticket: Ticket) -> None:
        self.check(ticket)
        del self._outstanding[ticket.slot]

    def outstanding(self) -> list[Ticket]:
        return [Ticket(slot=s, sequence=q) for s, q in sorted(self._outstanding.items())]


def check_model_file(path: Path, *, fix: str) -> None:
    """Raise ``ModelFileError``/``ModelFormatError`` unless ``path`` is a readable, non-empty file.

    ``fix`` completes the one-line message (what the user should do to get a good file).
    """
    if not path.exists():
        msg = f"model file {path} does not exist: {fix}"
        raise ModelFileError(msg)
    if not path.is_file():
        msg = f"model path {path} is not a regular file: {fix}"
        raise ModelFileError(msg)
    try:
        with path.open("rb") as handle:
            head = handle.read(1)
    except OSError as exc:
        msg = (
            f"model file {path} is not readable ({exc.strerror or exc}): fix its permissions "
            f"(the agent's user must be able to read it) or {fix}"
        )
        raise ModelFileError(msg) from exc
    if not head:
        msg = f"model file {path} is empty (an interrupted copy?): {fix}"
        raise ModelFormatError(msg)


def check_open(closed: bool, path: Path) -> None:
    """Raise ``EngineClosedError`` when the engine for ``path`` is ``closed``."""
    if closed:
        msg = f"the engine for {path} is closed: build a new one"
        raise EngineClosedError(msg)


def find_input(
    index: Mapping[str, TensorSpec], name: str, path: Path, *, prefix: str = ""
) -> TensorSpec:
    """The spec of input ``name`` in ``index`` (the engine's inputs by name, in model order), or
    ``InputSpecError`` naming the model as ``{prefix}{path}`` (``prefix="plan "`` on TensorRT)
    and listing the inputs it has."""
    spec = index.get(name)
    if spec is None:
        known = ", ".join(repr(known_name) for known_name in index)
        msg = f"{prefix}{path} has no input {name!r}: its inputs are {known}"
        raise InputSpecError(msg)
    return spec


def check_array(array: object, spec: TensorSpec, path: Path, *, prefix: str = "") -> None:
    """``InputSpecError`` unless ``array`` is a NumPy array of ``spec``'s dtype; the message
    names the model as ``{prefix}{path}`` and says what the plan (``prefix="plan "``) or the
    model wants."""
    if not isinstance(array, np.ndarray):
        msg = (
            f"input {spec.name!r} of {prefix}{path} must be a numpy array, got "
            f"{type(array).__name__}: convert it with np.asarray"
        )
        raise InputSpecError(msg)
    if array.dtype != spec.dtype:
        owner = "plan" if prefix == "plan " else "model"
        msg = (
            f"input {spec.name!r} of {prefix}{path} has dtype {array.dtype}, the {owner} wants "
            f"{spec.dtype}: convert in preprocessing (or write into input_buffer)"
        )
        raise InputSpecError(msg)


def shape_text(shape: tuple[int, ...]) -> str:
    """``(1, 3, 416, 416)`` -> ``"[1,3,416,416]"``, the way engine messages write shapes."""
    return "[" + ",".join(str(d) for d in shape) + "]"


def file_sha256(path: Path) -> str:
    """Hex sha256 of a file, read in chunks (``ModelFileError`` when it cannot be read)."""
    try:
        return hash_file(path).hexdigest()
    except OSError as exc:
        msg = f"cannot read {path} to hash it ({exc.strerror or exc}): check the path and rights"
        raise ModelFileError(msg) from exc
