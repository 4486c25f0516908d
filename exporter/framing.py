"""Where one HTTP/1.1 request ends in the bytes a client sent: pure functions, no sockets.

The server's worker buffers each request with these before a thread parses it, so a client
that sends slowly, or not at all, holds no thread. They only find the request's extent
(head up to the blank line, then the body by Content-Length or the chunked encoding) and
enforce the size limits; the request itself is still parsed by gunicorn. What they cannot
frame with certainty (conflicting lengths, an unknown transfer coding) is handed on as the
head alone, for gunicorn's parser to refuse.
"""

from __future__ import annotations

import json
import re
import string
from dataclasses import dataclass

from exporter.rejections import Reason

CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
HEX_DIGITS = frozenset(string.hexdigits.encode())
# The fields that frame a body, as gunicorn reads them (no space before the colon).
FRAMING_FIELD = re.compile(
    rb"^(content-length|transfer-encoding|expect):(.*?)\r?$", re.IGNORECASE | re.MULTILINE
)


@dataclass(frozen=True)
class Limits:
    """gunicorn's own request limits (its settings of the same names) and the body limit."""

    request_line: int = 4094
    header_fields: int = 100
    header_field_size: int = 8190
    header_section: int = 64 * 1024
    body: int = 64 * 1024

    @property
    def chunked_overhead(self) -> int:
        """Chunk framing beyond any honest sender's; past it the body counts as too large."""
        return self.body + 64 * 1024


@dataclass(frozen=True)
class Head:
    end: int  # offset just past the blank line
    request_line: bytes
    block: bytes  # the header lines and the empty line after them, as sent
    content_length: int | None
    chunked: bool
    expects_continue: bool
    unclear: bool  # framing gunicorn will refuse: hand the head on alone

    @property
    def fields(self) -> tuple[bytes, ...]:
        """The header lines without their line ends."""
        return tuple(_chomp(line) for line in self.block.split(b"\n")[:-2])


@dataclass(frozen=True)
class Refusal:
    """A request the worker answers itself: the status line and a JSON body like the app's."""

    reason: Reason
    message: str

    def response(self) -> bytes:
        body = json.dumps({"status": "error", "reason": self.reason, "error": self.message})
        status = self.reason.status
        return (
            f"HTTP/1.1 {status.value} {status.phrase}\r\n"
            "Content-Type: application/json\r\n"
            f"Content-Length: {len(body) + 1}\r\n"
            "Connection: close\r\n\r\n"
            f"{body}\n"
        ).encode()


def uri_too_long(limits: Limits) -> Refusal:
    return Refusal(Reason.URI_TOO_LONG, f"request line over {limits.request_line} bytes")


def headers_too_large(message: str) -> Refusal:
    return Refusal(Reason.HEADERS_TOO_LARGE, message)


def parse_head(data: bytes, limits: Limits) -> Head | Refusal | None:
    """The request's head once its blank line is in; None while it may still come."""
    first_end = data.find(b"\n")
    line_length = len(data) if first_end < 0 else len(data[:first_end].rstrip(b"\r"))
    if line_length > limits.request_line:
        return uri_too_long(limits)
    if first_end < 0:
        return None
    end = _head_end(data, first_end)
    if end is None:
        return _incomplete_head_refusal(data, limits)
    if end > limits.header_section:
        return headers_too_large(f"header section over {limits.header_section} bytes")
    block = data[first_end + 1 : end]
    if block.count(b"\n") - 1 > limits.header_fields:
        return headers_too_large(f"over {limits.header_fields} header fields")
    if max(map(len, block.split(b"\n"))) > limits.header_field_size + len(b"\r"):
        return headers_too_large(f"a header field over {limits.header_field_size} bytes")
    return _framing(_chomp(data[:first_end]), block, end)


def _chomp(line: bytes) -> bytes:
    return line[:-1] if line.endswith(b"\r") else line


def _head_end(data: bytes, first_end: int) -> int | None:
    """Just past the empty line that ends the head (CRLF, or a bare LF for gunicorn to refuse)."""
    crlf, lf = data.find(b"\n\r\n", first_end), data.find(b"\n\n", first_end)
    ends = ([crlf + 3] if crlf >= 0 else []) + ([lf + 2] if lf >= 0 else [])
    return min(ends) if ends else None


def _incomplete_head_refusal(data: bytes, limits: Limits) -> Refusal | None:
    if len(data) > limits.header_section:
        return headers_too_large(f"header section over {limits.header_section} bytes")
    if data.count(b"\n") - 1 > limits.header_fields:
        return headers_too_large(f"over {limits.header_fields} header fields")
    if len(data) - data.rfind(b"\n") - 1 > limits.header_field_size:
        return headers_too_large(f"a header field over {limits.header_field_size} bytes")
    return None


def _framing(request_line: bytes, block: bytes, end: int) -> Head:
    lengths: list[bytes] = []
    codings: list[bytes] = []
    expects_continue = False
    for match in FRAMING_FIELD.finditer(block):
        name, value = match[1].lower(), match[2].strip()
        if name == b"content-length":
            lengths.append(value)
        elif name == b"transfer-encoding":
            codings += [coding.strip().lower() for coding in value.split(b",")]
        elif value.lower() == b"100-continue":
            # HTTP/1.0 clients cannot expect it (RFC 9110, 10.1.1): gunicorn ignores it too.
            expects_continue = not request_line.endswith(b"HTTP/1.0")
    chunked = bool(codings) and codings[-1] == b"chunked"
    unclear = bool(codings) and (not chunked or bool(lengths))
    unclear = unclear or len(lengths) > 1 or (bool(lengths) and not lengths[0].isdigit())
    content_length = int(lengths[0]) if len(lengths) == 1 and not unclear else None
    return Head(end, request_line, block, content_length, chunked, expects_continue, unclear)


def _field(line: bytes) -> tuple[bytes, bytes]:
    name, _, value = line.partition(b":")
    return name.strip().lower(), value.strip()


def _is_expect_continue(line: bytes) -> bool:
    name, value = _field(line)
    return name == b"expect" and value.lower() == b"100-continue"


@dataclass(frozen=True)
class Chunks:
    """How far a chunked body has been scanned: resumable as more bytes arrive."""

    offset: int  # where the next chunk-size line starts
    decoded: int  # body bytes in the chunks before it
    end: int | None = None  # offset just past the trailer section, once the last chunk is in
    too_large: bool = False


def scan_chunks(data: bytes, progress: Chunks, limits: Limits) -> Chunks:
    """Chunks up to the last one and its trailers; a malformed one ends the scan (gunicorn
    refuses it), so does a body over the limit."""
    offset, decoded = progress.offset, progress.decoded
    while True:
        line_end = data.find(b"\r\n", offset)
        if line_end < 0:
            malformed = len(data) - offset > limits.header_field_size
            return Chunks(offset, decoded, len(data) if malformed else None)
        size_text = data[offset:line_end].split(b";", 1)[0].strip()
        if not size_text or not HEX_DIGITS.issuperset(size_text):
            return Chunks(offset, decoded, len(data))
        size = int(size_text, 16)
        if decoded + size > limits.body:
            return Chunks(offset, decoded + size, too_large=True)
        if size == 0:  # the last chunk: then trailer fields, if any, and an empty line
            trailers_end = data.find(b"\r\n\r\n", line_end)
            if trailers_end < 0:
                return Chunks(offset, decoded, too_large=len(data) - line_end > limits.body)
            return Chunks(offset, decoded, trailers_end + 4)
        data_end = line_end + 2 + size
        if len(data) < data_end + 2:
            return Chunks(offset, decoded)
        if data[data_end : data_end + 2] != b"\r\n":
            return Chunks(offset, decoded, len(data))
        offset, decoded = data_end + 2, decoded + size


@dataclass(frozen=True)
class Waiting:
    send_continue: bool = False  # the head is in, expects 100-continue, and its body fits


@dataclass(frozen=True)
class Complete:
    request: bytes  # for gunicorn's parser: the head (without Expect: 100-continue), the body


Step = Waiting | Complete | Refusal


class RequestAssembly:
    """One connection's bytes until they make a whole request, then the next one's."""

    def __init__(self, limits: Limits) -> None:
        self._limits = limits
        self._buffer = bytearray()
        self._head: Head | None = None
        self._chunks: Chunks | None = None
        self._continue_sent = False
        self._closing = False  # after a body too large: the rest of the stream is not framed

    @property
    def buffered(self) -> int:
        return len(self._buffer)

    def add(self, data: bytes) -> Step:
        if self._closing:
            return Waiting()
        self._buffer += data
        buffered = bytes(self._buffer)
        if self._head is None:
            head = parse_head(buffered, self._limits)
            if head is None or isinstance(head, Refusal):
                return head or Waiting()
            self._head = head
            if head.chunked and not head.unclear:
                self._chunks = Chunks(head.end, 0)
        return self._body(buffered, self._head)

    def cut_short(self) -> Complete | None:
        """The client ended its side mid-request: what it sent, for gunicorn to refuse."""
        if not self._buffer:
            return None
        request = bytes(self._buffer)
        self._next_request(len(self._buffer))
        return Complete(request)

    def _body(self, buffered: bytes, head: Head) -> Step:
        limits = self._limits
        if head.unclear:
            return self._complete(buffered, head, head.end)
        if head.content_length is not None and head.content_length > limits.body:
            return self._too_large(head, head.content_length)
        if self._chunks is not None:
            self._chunks = scan_chunks(buffered, self._chunks, limits)
            overhead = len(buffered) - head.end - self._chunks.decoded
            if self._chunks.too_large or overhead > limits.chunked_overhead:
                return self._too_large(head, max(self._chunks.decoded, limits.body + 1))
            end = self._chunks.end
        else:
            end = head.end + (head.content_length or 0)
        if end is None or len(buffered) < end:
            send_continue = head.expects_continue and not self._continue_sent
            self._continue_sent = True
            return Waiting(send_continue)
        return self._complete(buffered, head, end)

    def _complete(self, buffered: bytes, head: Head, end: int) -> Complete:
        if head.expects_continue:
            request = _rebuilt_head(head, head.fields) + buffered[head.end : end]
        else:
            request = buffered[:end]
        self._next_request(end)
        return Complete(request)

    def _too_large(self, head: Head, length: int) -> Complete:
        """The head alone, declaring the length found too large and asking to close: the app
        refuses it (and counts it) without reading a body, and gunicorn closes the connection
        (it ignores the app's own Connection header)."""
        kept = [line for line in head.fields if _field(line)[0] not in _REPLACED_FIELDS]
        kept += [b"Content-Length: %d" % length, b"Connection: close"]
        self._next_request(len(self._buffer))
        self._closing = True
        return Complete(_rebuilt_head(head, kept))

    def _next_request(self, end: int) -> None:
        del self._buffer[:end]
        self._head, self._chunks, self._continue_sent = None, None, False


_REPLACED_FIELDS = (b"content-length", b"transfer-encoding", b"connection")


def _rebuilt_head(head: Head, fields: list[bytes] | tuple[bytes, ...]) -> bytes:
    kept = [line for line in fields if not _is_expect_continue(line)]
    return b"\r\n".join([head.request_line, *kept, b"", b""])
