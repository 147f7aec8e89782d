"""Random-access plaintext of an OpenPGP message (SEIPD v1 + MDC), session key from gpg.

Only gpg ever sees the recipient's secret key: we hand `gpg --show-session-key
--decrypt` the PKESK packets plus the first octets of the encrypted packet,
read the SESSION_KEY status line, and decrypt ranges ourselves with AES-CFB
(block i needs only ciphertext block i-1, which is read from the stream).
The session key is cached per stream object, so gpg runs once per stream.

Integrity: range reads (`read`) are NOT authenticated, because CFB ranges
cannot be; the CAR layer hashes every block against its CID before it
decrypts, which is what protects them. `iter_verified()` reads the whole
message in order and checks the MDC at the end (raising FormatError on a
mismatch, after the chunks were yielded: a consumer must treat the data as
unverified until the iterator finishes, as with `gpg -d`).

Handled: messages made by packerfs and by stock `gpg -e -z 0` (RSA, cv25519,
and anything else gpg can decrypt; AES-128/192/256), with definite or partial
lengths at both levels, old- or new-format headers. Refused with FormatError:
compressed data (random access would need the whole prefix; use `gpg -d`),
signed messages, SED without MDC, and AEAD (OCB / SEIPD v2) messages.
"""

from __future__ import annotations

import bisect
import hashlib
import re
import subprocess
import weakref
from typing import Iterator

from cryptography.hazmat.primitives.ciphers import Cipher as _BlockCipher
from cryptography.hazmat.primitives.ciphers import algorithms

try:
    from cryptography.hazmat.decrepit.ciphers.modes import CFB
except ImportError:  # pragma: no cover - older cryptography
    from cryptography.hazmat.primitives.ciphers.modes import CFB

from packerfs.crypt.base import RandomAccess
from packerfs.crypt.openpgp_packets import (
    DEFINITE,
    PacketError,
    definite_length,
    INDETERMINATE,
    PARTIAL,
    TAG_AEAD,
    TAG_COMPRESSED,
    TAG_LITERAL,
    TAG_MARKER,
    TAG_OPS,
    TAG_PKESK,
    TAG_SED,
    TAG_SEIPD,
    TAG_SKESK,
    parse_header,
    parse_new_length,
)
from packerfs.errors import FormatError, KeyProblem

__all__ = ["open_openpgp_plaintext", "OpenPGPPlaintext"]

BLOCK = 16
PREFIX_LEN = BLOCK + 2
MDC_LEN = 22
AES_KEY_SIZES = {7: 16, 8: 24, 9: 32}
# How much of the encrypted packet's body gpg gets to find the session key.
_GPG_BODY_PREFIX = 64

# stream object -> (message head, algo, session key)
_KEY_CACHE: "weakref.WeakKeyDictionary[object, tuple[bytes, int, bytes]]" = weakref.WeakKeyDictionary()


class _Segments:
    """A body split over several places: (logical offset, physical offset, length), sorted."""

    def __init__(self):
        self.logical: list[int] = []
        self.physical: list[int] = []
        self.lengths: list[int] = []
        self.total = 0

    def add(self, physical: int, length: int) -> None:
        if length:
            self.logical.append(self.total)
            self.physical.append(physical)
            self.lengths.append(length)
        self.total += length

    def locate(self, a: int, c: int) -> Iterator[tuple[int, int, int]]:
        """(logical, physical, length) pieces covering logical [a, c)."""
        i = max(bisect.bisect_right(self.logical, a) - 1, 0)
        while a < c and i < len(self.logical):
            lo, ph, ln = self.logical[i], self.physical[i], self.lengths[i]
            if a < lo + ln:
                e = min(c, lo + ln)
                yield a, ph + (a - lo), e - a
                a = e
            i += 1

    def physical_of(self, a: int) -> int:
        for _, ph, _ in self.locate(a, a + 1):
            return ph
        return (self.physical[-1] + self.lengths[-1]) if self.physical else 0


def _walk_body(read, pos: int, kind: str, length: int, end: int, what: str) -> tuple[_Segments, int]:
    """Segments of a packet body whose first chunk starts at `pos`; returns (segments, end position)."""
    segs = _Segments()
    if kind == INDETERMINATE:
        segs.add(pos, end - pos)
        return segs, end
    while True:
        if pos + length > end:
            raise PacketError(f"{what} runs past the end of the data (truncated?)", pos)
        segs.add(pos, length)
        pos += length
        if kind != PARTIAL:
            return segs, pos
        kind, length, n = parse_new_length(read, pos)
        pos += n


def _session_key_from_gpg(head: bytes, homedir: str | None, keyids: list[str]) -> tuple[int, bytes]:
    cmd = ["gpg", "--batch", "--status-fd", "2", "--show-session-key", "--decrypt"]
    if homedir is not None:
        cmd[1:1] = ["--homedir", homedir]
    try:
        proc = subprocess.run(cmd, input=head, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    except OSError as e:
        raise KeyProblem(f"cannot run gpg to decrypt the OpenPGP session key: {e.strerror or e}") from None
    err = proc.stderr.decode("utf-8", "replace")
    m = re.search(r"^\[GNUPG:\] SESSION_KEY (\d+):([0-9A-Fa-f]+)\s*$", err, re.M)
    if m:
        return int(m.group(1)), bytes.fromhex(m.group(2))
    no_sec = re.findall(r"^\[GNUPG:\] NO_SECKEY (\S+)", err, re.M)
    logs = [ln[5:].strip() for ln in err.splitlines() if ln.startswith("gpg: ")]
    failed = [ln for ln in logs if "failed" in ln or "error" in ln.lower()]
    reason = failed[0] if failed else (logs[-1] if logs else f"gpg exited with status {proc.returncode}")
    if no_sec and len(no_sec) >= len(keyids):
        reason = f"no secret key for key ID {', '.join(no_sec)} ({reason})"
    if "[GNUPG:] PINENTRY_LAUNCHED" in err:  # gpg needed the passphrase and had no way to get it
        reason += (" (the secret key has a passphrase, which packerfs does not ask for: it must be unlocked in "
                   "gpg-agent first, e.g. by decrypting any file with it in a terminal)")
    where = f" with gpg homedir {homedir}" if homedir else ""
    raise KeyProblem(f"gpg could not decrypt the OpenPGP session key{where}: {reason}")


class OpenPGPPlaintext:
    """Random access to the literal data of an OpenPGP message (implements RandomAccess)."""

    def __init__(self, stream: RandomAccess, body: _Segments, algo: int, key: bytes, name: str | None):
        self._stream = stream
        self._body = body  # SEIPD body (version octet + ciphertext) in the stream
        self._key = key
        self._algo = algo
        self._name = name
        self.T = body.total - 1  # inner (CFB) length
        if self.T < PREFIX_LEN + MDC_LEN + 2:
            raise self._err("encrypted packet is too short to hold a message", 0)
        pre = self._decrypt(0, PREFIX_LEN)
        if pre[14:16] != pre[16:18]:
            raise self._err("OpenPGP prefix check failed: wrong session key or corrupt data", 0)
        self._data = self._parse_literal()
        if self._decrypt(self.T - MDC_LEN, self.T - MDC_LEN + 2) != b"\xd3\x14":
            raise self._err("no MDC packet at the end of the encrypted data (unexpected packets?)", self.T - MDC_LEN)

    # --- offsets and ciphertext --------------------------------------------------
    def _stream_off(self, inner: int) -> int:
        return self._body.physical_of(inner + 1)

    def _err(self, msg: str, inner: int) -> FormatError:
        return FormatError(msg, path=self._name, offset=self._stream_off(max(min(inner, self.T - 1), 0)))

    def _ct(self, a: int, c: int) -> bytes:
        """Ciphertext of inner [a, c), read from the stream."""
        parts = []
        for lo, ph, n in self._body.locate(a + 1, c + 1):
            got = self._stream.read(ph, n)
            if len(got) != n:
                raise FormatError("stream ended early (truncated?)", path=self._name, offset=ph + len(got))
            parts.append(got)
        return b"".join(parts)

    def _cfb(self, iv: bytes):
        return _BlockCipher(algorithms.AES(self._key), CFB(iv)).decryptor()

    def _decrypt(self, a: int, c: int) -> bytes:
        """Inner plaintext [a, c) clipped to the message."""
        c = min(c, self.T)
        if a >= c:
            return b""
        s = (a // BLOCK) * BLOCK
        iv = self._ct(s - BLOCK, s) if s else bytes(BLOCK)
        return self._cfb(iv).update(self._ct(s, c))[a - s :]

    def _parse_literal(self) -> _Segments:
        def iread(off: int, n: int) -> bytes:
            return self._decrypt(off, off + n)

        end = self.T - MDC_LEN
        try:
            h = parse_header(iread, PREFIX_LEN)
        except PacketError as e:
            raise self._err(e.msg, e.pos) from None
        if h.tag == TAG_COMPRESSED:
            raise self._err(
                "OpenPGP data is compressed, which packerfs cannot read by range; "
                "decrypt it with gpg -d (packerfs writes it uncompressed, like gpg -z 0)",
                PREFIX_LEN,
            )
        if h.tag == TAG_OPS:
            raise self._err("signed OpenPGP messages are not supported; decrypt them with gpg -d", PREFIX_LEN)
        if h.tag != TAG_LITERAL:
            raise self._err(f"expected a literal data packet, found packet tag {h.tag}", PREFIX_LEN)
        try:
            lit, lit_end = _walk_body(iread, PREFIX_LEN + h.header_len, h.kind, h.length, end, "literal packet")
        except PacketError as e:
            raise self._err(e.msg, e.pos) from None
        if lit_end != end:
            raise self._err("unexpected data between the literal packet and the MDC", lit_end)
        if lit.total < 6:
            raise self._err("literal packet is too short", PREFIX_LEN)
        first = lit.physical[0]
        meta = 2 + iread(first + 1, 1)[0] + 4
        if meta > lit.lengths[0]:
            raise self._err("literal packet header is split across partial chunks", PREFIX_LEN)
        data = _Segments()
        for lo, ph, n in lit.locate(meta, lit.total):
            data.add(ph, n)
        return data

    # --- RandomAccess ---------------------------------------------------------
    @property
    def size(self) -> int:
        return self._data.total

    def read(self, offset: int, size: int) -> bytes:
        a = max(offset, 0)
        c = min(offset + max(size, 0), self._data.total)
        if a >= c:
            return b""
        pieces = list(self._data.locate(a, c))
        i0 = pieces[0][1]
        i1 = pieces[-1][1] + pieces[-1][2]
        pt = self._decrypt(i0, i1)
        if len(pieces) == 1:
            return pt
        return b"".join(pt[ph - i0 : ph - i0 + n] for _, ph, n in pieces)

    def iter_verified(self, chunk_size: int = 1 << 20) -> Iterator[bytes]:
        """The whole plaintext in order; FormatError at the end if the MDC does not match."""
        chunk_size = max(chunk_size, BLOCK)
        dec = self._cfb(bytes(BLOCK))
        sha = hashlib.sha1()
        hashed_end = self.T - 20
        tail_start = self.T - MDC_LEN
        tail = b""  # inner [T-22, T): D3 14 || SHA-1
        pos = 0
        while pos < self.T:
            c = min(self.T, pos + chunk_size)
            pt = dec.update(self._ct(pos, c))
            if pos < hashed_end:
                sha.update(pt[: hashed_end - pos] if c > hashed_end else pt)
            if c > tail_start:
                tail += pt[max(tail_start - pos, 0) :]
            if pos == 0 and pt[14:16] != pt[16:18]:
                raise self._err("OpenPGP prefix check failed: wrong session key or corrupt data", 0)
            out = [pt[ph - pos : ph - pos + n] for _, ph, n in self._inner_data(pos, c)]
            if out:
                yield out[0] if len(out) == 1 else b"".join(out)
            pos = c
        if tail[:2] != b"\xd3\x14":
            raise self._err("no MDC packet at the end of the encrypted data", tail_start)
        if sha.digest() != tail[2:]:
            raise self._err(
                "OpenPGP integrity check (MDC) failed: the message was modified or is corrupt", self.T - 20
            )

    def _inner_data(self, a: int, c: int) -> Iterator[tuple[int, int, int]]:
        """Data pieces lying in inner [a, c): (data offset, inner offset, length)."""
        d = self._data
        i = max(bisect.bisect_right(d.physical, a) - 1, 0)
        while i < len(d.physical) and d.physical[i] < c:
            ph, ln = d.physical[i], d.lengths[i]
            s, e = max(a, ph), min(c, ph + ln)
            if s < e:
                yield d.logical[i] + (s - ph), s, e - s
            i += 1


def open_openpgp_plaintext(
    stream: RandomAccess, gpg_homedir: str | None = None, *, name: str | None = None
) -> OpenPGPPlaintext:
    """Random-access plaintext of an OpenPGP message; the session key comes from gpg.

    KeyProblem if gpg cannot decrypt the session key (no/wrong secret key,
    agent cannot unlock it); FormatError, with the stream offset, for anything
    malformed or unsupported.
    """
    size = stream.size

    def read(off: int, n: int) -> bytes:
        return stream.read(off, n)

    pos = 0
    keyids: list[str] = []
    while True:
        try:
            h = parse_header(read, pos)
        except PacketError as e:
            raise FormatError(e.msg, path=name, offset=e.pos) from None
        if h.tag in (TAG_PKESK, TAG_SKESK, TAG_MARKER):
            if h.kind != DEFINITE:
                raise FormatError(f"packet tag {h.tag} must have a definite length", path=name, offset=pos)
            if pos + h.header_len + h.length > size:
                raise FormatError("key packet runs past the end of the stream", path=name, offset=pos)
            if h.tag == TAG_PKESK:
                keyids.append(read(pos + h.header_len + 1, 8).hex().upper())
            pos += h.header_len + h.length
            continue
        if h.tag == TAG_SEIPD:
            break
        if h.tag == TAG_SED:
            raise FormatError(
                "OpenPGP data without integrity protection (no MDC) is refused", path=name, offset=pos
            )
        if h.tag == TAG_AEAD:
            raise FormatError(
                "AEAD (OCB) encrypted OpenPGP data is not supported; decrypt it with gpg -d", path=name, offset=pos
            )
        raise FormatError(f"unexpected OpenPGP packet tag {h.tag} before the encrypted data", path=name, offset=pos)
    if not keyids:
        raise FormatError("OpenPGP message has no public-key encrypted session key", path=name, offset=0)
    seipd_pos = pos
    try:
        body, end = _walk_body(read, pos + h.header_len, h.kind, h.length, size, "encrypted packet")
    except PacketError as e:
        raise FormatError(e.msg, path=name, offset=e.pos) from None
    if end != size:
        raise FormatError("unexpected data after the encrypted packet", path=name, offset=end)
    version = read(body.physical[0], 1) if body.physical else b""
    if version != b"\x01":
        what = "empty" if not version else f"version {version[0]}"
        raise FormatError(
            f"encrypted packet is {what}; only SEIPD version 1 (RFC 4880) is supported", path=name, offset=seipd_pos
        )

    # gpg gets the key packets and a re-framed SEIPD packet with a definite length
    # holding just the first ciphertext octets: enough to find and check the
    # session key, and independent of how the real packet is framed (gpg will not
    # start on a partial-length packet until it has a buffer's worth of it).
    first = body.physical[0]
    n_first = min(body.lengths[0], _GPG_BODY_PREFIX)
    first_body = read(first, n_first)
    if len(first_body) != n_first:
        raise FormatError("stream ended early (truncated?)", path=name, offset=first + len(first_body))
    head = read(0, seipd_pos) + bytes([0xC0 | TAG_SEIPD]) + definite_length(n_first) + first_body
    cached = None
    try:
        cached = _KEY_CACHE.get(stream)
    except TypeError:  # not weak-referenceable / hashable
        pass
    if cached is not None and cached[0] == head:
        algo, key = cached[1], cached[2]
    else:
        algo, key = _session_key_from_gpg(head, gpg_homedir, keyids)
        try:
            _KEY_CACHE[stream] = (head, algo, key)
        except TypeError:
            pass
    if algo not in AES_KEY_SIZES:
        raise FormatError(
            f"OpenPGP symmetric algorithm {algo} is not supported (AES only); decrypt with gpg -d",
            path=name,
            offset=seipd_pos,
        )
    if len(key) != AES_KEY_SIZES[algo]:
        raise KeyProblem(f"gpg returned a session key of {len(key)} bytes for algorithm {algo}")
    return OpenPGPPlaintext(stream, body, algo, key, name)

