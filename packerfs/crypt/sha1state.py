"""SHA-1 whose chaining value can be saved and restored (for resuming an OpenPGP MDC).

hashlib cannot export or import a hash's internal state, and the OpenPGP MDC
is a SHA-1 over everything before it, so continuing an interrupted encryption
in the middle of a file would otherwise mean hashing the whole prefix again.
This module drives OpenSSL's low-level SHA-1 (SHA1_Init / SHA1_Update /
SHA1_Final in the system libcrypto) through ctypes, on a SHA_CTX of our own:

    typedef struct SHAstate_st {
        SHA_LONG h0, h1, h2, h3, h4;   /* the chaining value          */
        SHA_LONG Nl, Nh;               /* message length in bits      */
        SHA_LONG data[16];             /* the unprocessed block       */
        unsigned int num;              /* octets in `data`            */
    } SHA_CTX;                         /* 96 octets, public ABI       */

A *state* (what `Sha1.state()` returns and `Sha1.resume()` takes) is the
20-octet chaining value, big-endian as in FIPS 180-4, taken at a message
length that is a multiple of 64 octets (so no buffered message octets are
part of it and the length need not be stored: the caller knows it). The
bulk speed is OpenSSL's (SHA-NI / AVX2 assembly), the same as hashlib's, and
ctypes releases the GIL during SHA1_Update, so hashing still overlaps with
encryption on another thread.

`available()` is False when there is no libcrypto with these functions (or
the layout self-test fails); callers then fall back to hashlib and to hashing
the prefix again. Nothing here is secret-bearing by itself: the caller wraps
a state before storing it (a chaining value taken after a secret prefix still
allows testing guesses of the data hashed after it, given a later value).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import hashlib
import struct
import sys

__all__ = ["Sha1", "available", "BLOCK", "STATE_SIZE", "new"]

BLOCK = 64
STATE_SIZE = 20
_CTX_SIZE = 96
_H_FMT = "=5I"  # native-endian u32 h0..h4 at offset 0
_N_FMT = "=2I"  # Nl, Nh at offset 20
_NUM_OFF = 92
_IV = bytes.fromhex("67452301efcdab8998badcfe10325476c3d2e1f0")

_lib = None
_checked: bool | None = None


class _PyBuffer(ctypes.Structure):
    """CPython's Py_buffer (stable layout since 3.3)."""

    _fields_ = [
        ("buf", ctypes.c_void_p),
        ("obj", ctypes.c_void_p),
        ("len", ctypes.c_ssize_t),
        ("itemsize", ctypes.c_ssize_t),
        ("readonly", ctypes.c_int),
        ("ndim", ctypes.c_int),
        ("format", ctypes.c_char_p),
        ("shape", ctypes.c_void_p),
        ("strides", ctypes.c_void_p),
        ("suboffsets", ctypes.c_void_p),
        ("internal", ctypes.c_void_p),
    ]


_GetBuffer = None
_ReleaseBuffer = None


def _load():
    global _lib, _GetBuffer, _ReleaseBuffer
    if sys.implementation.name != "cpython":
        return None
    names = [ctypes.util.find_library("crypto"), "libcrypto.so.3", "libcrypto.so"]
    for name in names:
        if not name:
            continue
        try:
            lib = ctypes.CDLL(name)
            init, upd, fin = lib.SHA1_Init, lib.SHA1_Update, lib.SHA1_Final
        except (OSError, AttributeError):
            continue
        init.argtypes = [ctypes.c_void_p]
        init.restype = ctypes.c_int
        upd.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t]
        upd.restype = ctypes.c_int
        fin.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
        fin.restype = ctypes.c_int
        get = ctypes.pythonapi.PyObject_GetBuffer
        get.argtypes = [ctypes.py_object, ctypes.POINTER(_PyBuffer), ctypes.c_int]
        get.restype = ctypes.c_int
        rel = ctypes.pythonapi.PyBuffer_Release
        rel.argtypes = [ctypes.POINTER(_PyBuffer)]
        rel.restype = None
        _GetBuffer, _ReleaseBuffer = get, rel
        _lib = lib
        return lib
    return None


class Sha1:
    """SHA-1 over OpenSSL's SHA_CTX; update() takes any contiguous buffer, without copying it."""

    __slots__ = ("_ctx", "_len")

    def __init__(self, state: bytes | None = None, length: int = 0):
        """A fresh hash, or one continuing from `state` after `length` octets (a multiple of 64)."""
        self._ctx = ctypes.create_string_buffer(_CTX_SIZE)
        if _lib.SHA1_Init(self._ctx) != 1:
            raise RuntimeError("SHA1_Init failed")
        self._len = 0
        if state is not None:
            if len(state) != STATE_SIZE or length < 0 or length % BLOCK:
                raise ValueError("a SHA-1 state is 20 octets, at a length that is a multiple of 64")
            raw = bytearray(_CTX_SIZE)
            struct.pack_into(_H_FMT, raw, 0, *struct.unpack(">5I", state))
            bits = length * 8
            struct.pack_into(_N_FMT, raw, 20, bits & 0xFFFFFFFF, bits >> 32)
            ctypes.memmove(self._ctx, bytes(raw), _CTX_SIZE)
            self._len = length

    @classmethod
    def resume(cls, state: bytes, length: int) -> "Sha1":
        return cls(state, length)

    @property
    def length(self) -> int:
        """Octets hashed so far."""
        return self._len

    def update(self, data) -> None:
        n = len(data) if not isinstance(data, memoryview) else data.nbytes
        if not n:
            return
        if isinstance(data, bytes):
            if _lib.SHA1_Update(self._ctx, data, n) != 1:  # ctypes passes a bytes object's own buffer
                raise RuntimeError("SHA1_Update failed")
        else:
            view = _PyBuffer()
            if _GetBuffer(data, ctypes.byref(view), 0) != 0:  # PyBUF_SIMPLE: contiguous bytes
                raise BufferError("SHA-1 input must be a contiguous buffer")
            try:
                ok = _lib.SHA1_Update(self._ctx, view.buf, view.len)
            finally:
                _ReleaseBuffer(ctypes.byref(view))
            if ok != 1:
                raise RuntimeError("SHA1_Update failed")
        self._len += n

    def state(self) -> bytes:
        """The chaining value now (20 octets, big-endian); only at a length that is a multiple of 64."""
        if self._len % BLOCK:
            raise ValueError("a SHA-1 state can only be taken at a multiple of 64 octets")
        raw = ctypes.string_at(self._ctx, STATE_SIZE)
        return struct.pack(">5I", *struct.unpack(_H_FMT, raw))

    def copy(self) -> "Sha1":
        other = Sha1.__new__(Sha1)
        other._ctx = ctypes.create_string_buffer(ctypes.string_at(self._ctx, _CTX_SIZE), _CTX_SIZE)
        other._len = self._len
        return other

    def digest(self) -> bytes:
        """The digest of everything hashed so far (the hash itself stays usable)."""
        tmp = ctypes.create_string_buffer(ctypes.string_at(self._ctx, _CTX_SIZE), _CTX_SIZE)
        out = ctypes.create_string_buffer(STATE_SIZE)
        if _lib.SHA1_Final(out, tmp) != 1:
            raise RuntimeError("SHA1_Final failed")
        return out.raw


def _self_test() -> bool:
    """The SHA_CTX layout is what we think: save at 128 octets, restore, finish, compare with hashlib."""
    try:
        msg = bytes(range(256)) * 3 + b"packerfs"
        h = Sha1()
        if h.state() != _IV:
            return False
        h.update(msg[:100])
        h.update(memoryview(msg)[100:128])
        st = h.state()
        h2 = Sha1.resume(st, 128)
        h2.update(bytearray(msg[128:]))
        h.update(msg[128:])
        want = hashlib.sha1(msg).digest()
        num = struct.unpack_from("=I", ctypes.string_at(h._ctx, _CTX_SIZE), _NUM_OFF)[0]
        return h2.digest() == want and h.digest() == want and num == len(msg) % BLOCK
    except Exception:  # pragma: no cover - any surprise means: do not use it
        return False


def available() -> bool:
    """True if the system libcrypto provides SHA-1 with a SHA_CTX of the expected layout."""
    global _checked
    if _checked is None:
        _checked = _load() is not None and _self_test()
    return _checked


def new():
    """A Sha1 if available(), else hashlib.sha1() (whose state cannot be saved)."""
    return Sha1() if available() else hashlib.sha1()
