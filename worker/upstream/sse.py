"""A pure, byte-exact Server-Sent Events decoder: `feed(bytes) -> events`, `flush()`.

Follows the WHATWG HTML "event stream interpretation" algorithm
(https://html.spec.whatwg.org/multipage/server-sent-events.html#event-stream-interpretation):

- lines end in CRLF, CR or LF, and a CR at the end of one read followed by an LF
  at the start of the next is one line ending, not two;
- a UTF-8 byte order mark is skipped once, at the very start of the stream;
- `:` starts a comment (keep-alives such as `: ping` or OpenRouter's
  `: OPENROUTER PROCESSING`); comments never dispatch an event;
- `field: value` loses exactly one space after the colon, no other whitespace;
- `data` lines accumulate joined by LF; an empty line dispatches the event,
  unless no `data` line was seen (then the buffers just reset);
- `id` (ignored when it contains NUL) sets the last event id, which persists
  across events; `retry` with only ASCII digits sets the reconnection time.

Lines are decoded as UTF-8 only once complete, so a multi-byte character split
across reads is reassembled exactly; invalid bytes become U+FFFD (as the spec says).

One deliberate deviation: the spec discards an event whose final blank line never
came. `flush()` dispatches it when all its lines were complete (only the blank line
is missing, as after `data: [DONE]\\n` from a server that closes at once) and
drops a partial last line, whose length it reports in `discarded_bytes`: a line
cut mid-way is a truncated stream, never a valid chunk.
"""

from __future__ import annotations

import re
from typing import NamedTuple

BOM = b"\xef\xbb\xbf"
_LINE_END = re.compile(rb"\r\n|\r|\n")


class SSEEvent(NamedTuple):
    """One dispatched event. `id` is the stream's last event id at dispatch time."""

    data: str
    event: str = "message"
    id: str | None = None
    retry: int | None = None


class SSEDecoder:
    """Incremental SSE decoder; no I/O, no awaits (httpx `LineDecoder` style)."""

    __slots__ = (
        "_at_start",
        "_buffer",
        "_data",
        "_event",
        "_last_id",
        "_retry",
        "_skip_lf",
        "comments",
        "discarded_bytes",
    )

    def __init__(self) -> None:
        self._buffer = b""  # bytes of the current, unterminated line
        self._at_start = True  # a BOM may still come
        self._skip_lf = False  # the previous read ended in CR
        self._data: list[str] = []
        self._event = ""
        self._last_id: str | None = None
        self._retry: int | None = None
        self.comments = 0  # comment / keep-alive lines seen
        self.discarded_bytes = 0  # bytes of a partial last line dropped by flush()

    @property
    def last_event_id(self) -> str | None:
        return self._last_id

    def feed(self, data: bytes) -> list[SSEEvent]:
        """Consume bytes from the wire; return the events they complete, in order."""
        if not data:
            return []
        if (
            # The hot path: one whole `data: ...` event per read, nothing pending.
            not self._buffer
            and not self._data
            and not self._skip_lf
            and not self._at_start
            and data.startswith(b"data: ")
            and data.find(b"\n") == len(data) - 2
            and data.endswith(b"\n\n")
            and b"\r" not in data
        ):
            event = SSEEvent(
                data[6:-2].decode("utf-8", "replace"),
                self._event or "message",
                self._last_id,
                self._retry,
            )
            self._event = ""
            return [event]
        if self._skip_lf:
            self._skip_lf = False
            if data[:1] == b"\n":
                data = data[1:]
        buffer = self._buffer + data if self._buffer else data
        if self._at_start:
            if len(buffer) < len(BOM) and BOM.startswith(buffer):
                self._buffer = buffer  # could still be a BOM split across reads
                return []
            self._at_start = False
            if buffer.startswith(BOM):
                buffer = buffer[len(BOM) :]
        events: list[SSEEvent] = []
        if b"\r" not in buffer:
            # Fast path: the common LF-only stream.
            lines = buffer.split(b"\n")
            self._buffer = lines.pop()
            for line in lines:
                self._process_line(line, events)
            return events
        start = 0
        for match in _LINE_END.finditer(buffer):
            end = match.end()
            if end == len(buffer) and match.group() == b"\r":
                # A CR at the very end: an LF may follow in the next read.
                self._skip_lf = True
            self._process_line(buffer[start : match.start()], events)
            start = end
        self._buffer = buffer[start:]
        return events

    def flush(self) -> list[SSEEvent]:
        """End of stream: dispatch a pending event whose lines were all complete."""
        events: list[SSEEvent] = []
        self.discarded_bytes += len(self._buffer)
        self._buffer = b""
        self._skip_lf = False
        self._dispatch(events)
        return events

    def _process_line(self, line: bytes, events: list[SSEEvent]) -> None:
        if not line:
            self._dispatch(events)
            return
        if line.startswith(b"data:"):
            # The hot path: one data line per chunk.
            value = line[6:] if line[5:6] == b" " else line[5:]
            self._data.append(value.decode("utf-8", "replace"))
            return
        if line[:1] == b":":
            self.comments += 1
            return
        name, colon, field_value = line.decode("utf-8", "replace").partition(":")
        if colon and field_value[:1] == " ":
            field_value = field_value[1:]
        if name == "data":  # `data` without a colon: an empty data line
            self._data.append(field_value)
        elif name == "event":
            self._event = field_value
        elif name == "id" and "\0" not in field_value:
            self._last_id = field_value
        elif name == "retry" and field_value.isascii() and field_value.isdigit():
            self._retry = int(field_value)
        # Any other field name is ignored, as the spec says.

    def _dispatch(self, events: list[SSEEvent]) -> None:
        if self._data:
            events.append(
                SSEEvent(
                    "\n".join(self._data),
                    self._event or "message",
                    self._last_id,
                    self._retry,
                )
            )
        self._data = []
        self._event = ""
