"""Token text -> answer text -> stream chunks.

``TextAssembler`` turns token bytes into text: pieces may end inside a UTF-8 character
(incremental decoder), and text that could be the start of a stop string is held back until it
is clear whether it is one. ``Coalescer`` groups the released text into chunks: flushed after
``flush_ms`` (age of the oldest buffered token, checked when a token arrives), ``flush_tokens``
tokens, at a sentence end, and the first token at once.
"""

from __future__ import annotations

import codecs
from dataclasses import dataclass

__all__ = ["Coalescer", "TextAssembler"]

_SENTENCE_ENDS = (".", "!", "?", ":", ";", "\n", "\u3002", "\uff01", "\uff1f")


class TextAssembler:
    """Bytes of tokens in, answer text out; ``stopped`` once a stop string appeared."""

    def __init__(self, stop: tuple[str, ...] | list[str]) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._stop = tuple(s for s in stop if s)
        self._held = ""
        self.text = ""
        """Everything released so far (the answer up to now)."""
        self.stopped: str | None = None
        """The stop string that ended the answer, if any."""

    def feed(self, data: bytes) -> str:
        """Add one token's bytes; the newly released text (may be empty)."""
        if self.stopped is not None:
            return ""
        self._held += self._decoder.decode(data)
        return self._release()

    def finish(self) -> str:
        """The end of the answer: flush the decoder and the held text."""
        if self.stopped is not None:
            return ""
        self._held += self._decoder.decode(b"", final=True)
        out = self._cut()
        if out is None:
            out, self._held = self._held, ""
        self.text += out
        return out

    def _cut(self) -> str | None:
        """Text before the first stop string in the held text (and stop), or None."""
        first: tuple[int, str] | None = None
        for s in self._stop:
            i = self._held.find(s)
            if i >= 0 and (first is None or i < first[0]):
                first = (i, s)
        if first is None:
            return None
        self.stopped = first[1]
        out = self._held[: first[0]]
        self._held = ""
        return out

    def _release(self) -> str:
        out = self._cut()
        if out is not None:
            self.text += out
            return out
        keep = 0  # longest tail of the held text that starts some stop string
        for s in self._stop:
            for n in range(min(len(s) - 1, len(self._held)), keep, -1):
                if self._held.endswith(s[:n]):
                    keep = n
                    break
        cut = len(self._held) - keep
        out, self._held = self._held[:cut], self._held[cut:]
        self.text += out
        return out


@dataclass
class _Buffer:
    text: str = ""
    tokens: int = 0
    since: float = 0.0


class Coalescer:
    """Groups released text into chunks (see the module docstring); times in seconds."""

    def __init__(
        self,
        *,
        flush_ms: float,
        flush_tokens: int,
        sentence_end: bool,
        first_token: bool,
    ) -> None:
        self._flush_s = flush_ms / 1000.0
        self._flush_tokens = flush_tokens
        self._sentence_end = sentence_end
        self._first_token = first_token
        self._buf = _Buffer()
        self._chunks = 0

    def add(self, text: str, now: float) -> tuple[str, int] | None:
        """Add one token's text; ``(text, tokens)`` of a chunk to publish now, or None."""
        buf = self._buf
        if buf.tokens == 0:
            buf.since = now
        buf.text += text
        buf.tokens += 1
        if not buf.text:
            return None
        due = (
            (self._first_token and self._chunks == 0)
            or buf.tokens >= self._flush_tokens
            or now - buf.since >= self._flush_s
            or (self._sentence_end and buf.text.rstrip(" ").endswith(_SENTENCE_ENDS))
        )
        return self._take() if due else None

    def flush(self) -> tuple[str, int] | None:
        """The rest, at the end of the answer (None when nothing is buffered)."""
        return self._take() if self._buf.text else None

    def _take(self) -> tuple[str, int]:
        chunk = (self._buf.text, self._buf.tokens)
        self._buf = _Buffer()
        self._chunks += 1
        return chunk
