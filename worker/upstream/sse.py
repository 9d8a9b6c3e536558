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

Bounds (a broken or hostile server cannot grow us without limit): one pending line
may hold at most `max_line_bytes` (RELAY_MAX_SSE_LINE_BYTES), the `data` of one
pending event at most `max_event_bytes` (RELAY_MAX_SSE_EVENT_BYTES); past either,
`feed()` raises `SSELimitError` carrying the events completed before. The work per
byte is constant: a line that arrives over many reads is kept as a list of pieces
and joined once, when it ends (concatenating on every read was quadratic: one
100 MB line without a newline took minutes).
"""

from __future__ import annotations

import re
from typing import NamedTuple

BOM = b"\xef\xbb\xbf"
_LINE_END = re.compile(rb"\r\n|\r|\n")
DEFAULT_MAX_LINE_BYTES = 1024 * 1024
DEFAULT_MAX_EVENT_BYTES = 1024 * 1024


class SSELimitError(Exception):
    """A pending line or event passed its bound. `events` completed before it."""

    def __init__(self, message: str, events: list[SSEEvent]) -> None:
        super().__init__(message)
        self.message = message
        self.events = events


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
        "_data_bytes",
        "_event",
        "_last_id",
        "_parts",
        "_parts_bytes",
        "_retry",
        "_skip_lf",
        "comments",
        "discarded_bytes",
        "max_event_bytes",
        "max_line_bytes",
    )

    def __init__(
        self,
        *,
        max_line_bytes: int = DEFAULT_MAX_LINE_BYTES,
        max_event_bytes: int = DEFAULT_MAX_EVENT_BYTES,
    ) -> None:
        self.max_line_bytes = max_line_bytes
        self.max_event_bytes = max_event_bytes
        self._buffer = b""  # a short unterminated line (or a BOM still being read)
        self._parts: list[bytes] = []  # pieces of a long unterminated line, joined once
        self._parts_bytes = 0
        self._data_bytes = 0  # bytes of the pending event's data lines
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
        """Consume bytes from the wire; return the events they complete, in order.

        Raises:
            SSELimitError: a pending line or event passed its bound.
        """
        if not data:
            return []
        if (
            # The hot path: one whole `data: ...` event per read, nothing pending.
            not self._buffer
            and not self._parts
            and not self._data
            and not self._skip_lf
            and not self._at_start
            and data.startswith(b"data: ")
            and data.find(b"\n") == len(data) - 2
            and data.endswith(b"\n\n")
            and len(data) <= self.max_event_bytes
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
        events: list[SSEEvent] = []
        try:
            self._feed(data, events)
        except SSELimitError as exc:
            exc.events = events
            raise
        return events

    def _feed(self, data: bytes, events: list[SSEEvent]) -> None:
        if self._skip_lf:
            self._skip_lf = False
            if data[:1] == b"\n":
                data = data[1:]
        if self._parts:
            data = self._continue_line(data, events)
        buffer = self._buffer + data if self._buffer else data
        self._buffer = b""
        if self._at_start:
            if len(buffer) < len(BOM) and BOM.startswith(buffer):
                self._buffer = buffer  # could still be a BOM split across reads
                return
            self._at_start = False
            if buffer.startswith(BOM):
                buffer = buffer[len(BOM) :]
        if b"\r" not in buffer:
            # Fast path: the common LF-only stream.
            lines = buffer.split(b"\n")
            tail = lines.pop()
            for line in lines:
                self._process_line(line, events)
        else:
            start = 0
            for match in _LINE_END.finditer(buffer):
                end = match.end()
                if end == len(buffer) and match.group() == b"\r":
                    # A CR at the very end: an LF may follow in the next read.
                    self._skip_lf = True
                self._process_line(buffer[start : match.start()], events)
                start = end
            tail = buffer[start:]
        if tail:
            self._parts = [tail]
            self._parts_bytes = len(tail)
            self._check_line()

    def _continue_line(self, data: bytes, events: list[SSEEvent]) -> bytes:
        """Data after an unterminated line: end that line if `data` has a line end
        (one join of its pieces), else keep the piece. Returns what follows the line."""
        lf, cr = data.find(b"\n"), data.find(b"\r")
        if lf < 0 and cr < 0:
            self._parts.append(data)
            self._parts_bytes += len(data)
            self._check_line()
            return b""
        at = lf if cr < 0 or (0 <= lf < cr) else cr
        self._parts_bytes += at
        self._check_line()
        line = b"".join(self._parts) + data[:at]
        self._parts = []
        self._parts_bytes = 0
        rest = at + 1
        if data[at : at + 1] == b"\r":
            if rest == len(data):
                self._skip_lf = True
            elif data[rest : rest + 1] == b"\n":
                rest += 1
        self._process_line(line, events)
        return data[rest:]

    def _check_line(self) -> None:
        if self._parts_bytes > self.max_line_bytes:
            raise SSELimitError(
                f"an SSE line passed {self.max_line_bytes} bytes without a line end "
                "(RELAY_MAX_SSE_LINE_BYTES)",
                [],
            )

    def _add_data(self, value: bytes) -> None:
        self._data_bytes += len(value) + 1
        if self._data_bytes > self.max_event_bytes:
            raise SSELimitError(
                f"an SSE event passed {self.max_event_bytes} bytes of data without a blank "
                "line (RELAY_MAX_SSE_EVENT_BYTES)",
                [],
            )
        self._data.append(value.decode("utf-8", "replace"))

    def flush(self) -> list[SSEEvent]:
        """End of stream: dispatch a pending event whose lines were all complete."""
        events: list[SSEEvent] = []
        self.discarded_bytes += len(self._buffer) + self._parts_bytes
        self._buffer = b""
        self._parts = []
        self._parts_bytes = 0
        self._skip_lf = False
        self._dispatch(events)
        return events

    def _process_line(self, line: bytes, events: list[SSEEvent]) -> None:
        if not line:
            self._dispatch(events)
            return
        if line.startswith(b"data:"):
            # The hot path: one data line per chunk.
            self._add_data(line[6:] if line[5:6] == b" " else line[5:])
            return
        if line[:1] == b":":
            self.comments += 1
            return
        name, colon, field_value = line.decode("utf-8", "replace").partition(":")
        if colon and field_value[:1] == " ":
            field_value = field_value[1:]
        if name == "data":  # `data` without a colon: an empty data line
            self._add_data(field_value.encode())
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
        self._data_bytes = 0
        self._event = ""
