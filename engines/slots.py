"""Round-robin in-flight slots shared by the engines' submit/collect, and model-file checks.

A slot is one set of buffers (and, on TensorRT, an execution context, a CUDA stream and an event).
``submit`` takes the next slot in turn and hands back a :class:`~engines.base.Ticket`; the slot
stays taken until that ticket is collected, so its output buffers are never overwritten before
the caller has read them. Submitting into a slot whose ticket is still out is a caller bug and
raises ``InferenceError`` instead of blocking (blocking would deadlock a single-threaded caller).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from engines.base import Ticket
from engines.errors import InferenceError, ModelFileError, ModelFormatError

__all__ = ["SlotRing", "check_model_file", "file_sha256"]


class SlotRing:
    """Hands out slots ``0..count-1`` in turn; at most one uncollected ticket per slot."""

    def __init__(self, count: int) -> None:
        if count < 1:
            msg = f"an engine needs at least one slot, got {count}"
            raise ValueError(msg)
        self._count = count
        self._sequence = 0
        self._outstanding: dict[int, int] = {}

    @property
    def count(self) -> int:
        return self._count

    @property
    def next_slot(self) -> int:
        """The slot the next ``submit`` (and ``input_buffer``) uses."""
        return self._sequence % self._count

    @property
    def in_flight(self) -> int:
        return len(self._outstanding)

    def require_free(self) -> int:
        """The next slot, or ``InferenceError`` when its previous ticket was not collected."""
        slot = self.next_slot
        if slot in self._outstanding:
            msg = (
                f"all {self._count} slots hold uncollected tickets (slot {slot} has ticket "
                f"#{self._outstanding[slot]}): collect() a ticket before submitting again"
            )
            raise InferenceError(msg)
        return slot

    def issue(self) -> Ticket:
        """Take the next slot (checked with :meth:`require_free`) and return its ticket."""
        slot = self.require_free()
        ticket = Ticket(slot=slot, sequence=self._sequence)
        self._outstanding[slot] = self._sequence
        self._sequence += 1
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


def file_sha256(path: Path, *, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks (``ModelFileError`` when it cannot be read)."""
    digest = hashlib.sha256()
    try:
        with path.open("rb") as handle:
            while block := handle.read(chunk):
                digest.update(block)
    except OSError as exc:
        msg = f"cannot read {path} to hash it ({exc.strerror or exc}): check the path and rights"
        raise ModelFileError(msg) from exc
    return digest.hexdigest()
