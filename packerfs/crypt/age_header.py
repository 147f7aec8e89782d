"""The age-encryption.org/v1 header: stanzas, building a header (with its MAC), and parsing one.

    header = "age-encryption.org/v1\\n" stanza+ "--- " base64(MAC) "\\n"
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Sequence

from packerfs.crypt.age_primitives import _B64_RE, _b64decode, _b64encode, _hkdf, _hmac_sha256
from packerfs.crypt.base import RandomAccess
from packerfs.errors import FormatError

if TYPE_CHECKING:  # build_header() only calls Recipient.wrap(); age_recipients imports this module
    from packerfs.crypt.age_recipients import Recipient

INTRO = b"age-encryption.org/v1\n"
FILE_KEY_SIZE = 16
MAX_HEADER_SIZE = 16 * 1024 * 1024


def _header_mac(file_key: bytes, mac_input: bytes) -> bytes:
    return _hmac_sha256(_hkdf(file_key, b"", b"header"), mac_input)


# --------------------------------------------------------------------------- stanzas


@dataclass
class Stanza:
    args: list[str]  # args[0] is the stanza type
    body: bytes
    offset: int = 0  # where its "->" line starts in the header (for errors)

    @property
    def type(self) -> str:
        return self.args[0]

    def encode(self) -> bytes:
        text = _b64encode(self.body)
        if len(text) < 64:  # one short line (an X25519 or ssh-ed25519 stanza): the common case
            return ("-> " + " ".join(self.args) + "\n" + text + "\n").encode("ascii")
        lines = [text[i : i + 64] for i in range(0, len(text), 64)]
        if not lines or len(lines[-1]) == 64:
            lines.append("")
        return ("-> " + " ".join(self.args) + "\n" + "".join(line + "\n" for line in lines)).encode("ascii")


# --------------------------------------------------------------------------- header


def build_header(recipients: Sequence[Recipient], file_key: bytes, rands: Sequence[bytes]) -> bytes:
    """The header wrapping `file_key` to `recipients`, stanza i using the randomness rands[i]."""
    body = INTRO + b"".join(r.wrap(file_key, rnd).encode() for r, rnd in zip(recipients, rands, strict=True)) + b"---"
    return body + b" " + _b64encode(_header_mac(file_key, body)).encode("ascii") + b"\n"


class _NeedMore(Exception):
    pass


@dataclass
class Header:
    stanzas: list[Stanza]
    mac_input: bytes  # the header up to and including "---"
    mac: bytes
    size: int  # header length in bytes (payload starts here)
    mac_offset: int = 0
    raw: bytes = field(default=b"", repr=False)


def _parse_header(buf: bytes, complete: bool) -> Header:
    """Parse an age v1 header at the start of `buf` (raise _NeedMore if buf ends too early)."""
    pos = 0
    magic = b"age-encryption.org/"
    if not buf.startswith(magic[: len(buf)]) and not buf.startswith(b"-----BEGIN AGE"):
        raise FormatError("not an age file (bad version line)", offset=0)

    def line() -> tuple[bytes, int]:
        nonlocal pos
        end = buf.find(b"\n", pos)
        if end < 0:
            if complete:
                raise FormatError("age header is truncated", offset=len(buf))
            raise _NeedMore
        start = pos
        pos = end + 1
        return buf[start:end], start

    first, _ = line()
    if first + b"\n" != INTRO:
        if first.startswith(b"age-encryption.org/"):
            raise FormatError(f"unsupported age version {first.decode('ascii', 'replace')!r}", offset=0)
        if first.startswith(b"-----BEGIN AGE ENCRYPTED FILE"):
            raise FormatError("ASCII-armored age files are not supported; remove the armor first (age -d)", offset=0)
        raise FormatError("not an age file (bad version line)", offset=0)
    stanzas: list[Stanza] = []
    while True:
        text, start = line()
        if text.startswith(b"-> "):
            args_raw = text[3:].split(b" ")
            if any(not a or any(c < 0x21 or c > 0x7E for c in a) for a in args_raw):
                raise FormatError("age header: malformed stanza arguments", offset=start)
            body_parts = []
            while True:
                chunk, cstart = line()
                if len(chunk) > 64 or not _B64_RE.fullmatch(chunk):
                    raise FormatError("age header: malformed stanza body", offset=cstart)
                body_parts.append(chunk)
                if len(chunk) < 64:
                    break
            try:
                body = _b64decode(b"".join(body_parts))
            except ValueError:
                raise FormatError("age header: stanza body is not canonical base64", offset=start) from None
            stanzas.append(Stanza([a.decode("ascii") for a in args_raw], body, start))
        elif text.startswith(b"---"):
            if not stanzas:
                raise FormatError("age header has no recipient stanzas", offset=start)
            if not text.startswith(b"--- ") or len(text) != 47:
                raise FormatError("age header: malformed MAC line", offset=start)
            try:
                mac = _b64decode(text[4:])
            except ValueError:
                raise FormatError("age header: malformed MAC line", offset=start) from None
            return Header(stanzas, buf[: start + 3], mac, pos, start, buf[:pos])
        else:
            raise FormatError("age header: unexpected line (damaged header?)", offset=start)


def read_header(stream: RandomAccess) -> Header:
    want = 4096
    while True:
        n = min(want, stream.size, MAX_HEADER_SIZE)
        buf = stream.read(0, n)
        if len(buf) != n:
            raise FormatError("age stream is shorter than its stated size", offset=len(buf))
        try:
            return _parse_header(buf, complete=(n == stream.size))
        except _NeedMore:
            if n >= MAX_HEADER_SIZE:
                raise FormatError("age header is too large", offset=0) from None
            want *= 8
