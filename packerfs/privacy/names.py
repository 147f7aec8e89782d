"""Hidden names: what a file part is called in a CAR packed with --hide-names.

::

    key  = names_key(dataset secret)
         = HKDF-SHA256(ikm=dataset secret (STATE_DIR/dataset.key), salt="", info="packerfs/names/v1 HMAC-SHA256", 32)
    d    = HMAC-SHA256(key, "packerfs/hidden-name/v1\\0" || u64be(version) || u32be(part))
    name = hex(d[0:16]) suffix                           e.g. 8c3f0a…e1.age  (32 octets + suffix)

Every name has the same shape: 32 hex digits, then the stream's suffix (`.age`,
`.zst.age`, `.gpg`), and every part sits directly in its bin's root directory
(a HAMT once it is large, which `ipfs-car` reads like any directory). Depth and
fan-out of the source tree are gone: all a CAR shows is how many parts it holds,
which its size shows anyway. (Buckets were weighed: 256 subdirectories would keep
stock unpacks of huge bins out of one directory, but they cost the planner 256
open directories per bin, and a HAMT already splits the directory's blocks.)

Length. 128 bits of `d` are used. For n names
the chance that any two collide is about n^2 / 2^129: 1.5e-21 for 10^9 names,
2^-49 for 2^40. A collision is a correctness problem (two links with one name in
a bucket; a stock `ipfs-car unpack` of all CARs into one directory would overwrite
a file), not a secrecy one, and 96 bits would already give 6e-12 at 10^9 names; the
other 32 bits cost 8 octets per link, nothing next to the file it names. Secrecy
does not depend on the length: HMAC-SHA256 under a secret key is a PRF, so any
truncation of it is indistinguishable from random octets to whoever lacks the key.

Why (version, part) and not the path. The name is derived from the file
version's number in the index (a counter that only grows, given to one file
version of one state: packerfs.pack.scan._new_record) and the part index
(0-based), nothing else: no path, size, mtime or content. That number is
index-internal (with hidden names the manifest that records it is encrypted),
and even if it were known the HMAC output reveals nothing about it, so the
order of versions (which is the path order of a scan) cannot be read from the
names. A path-derived name would be worse:
  * it is stable across versions, so a changed file placed again in a new bin
    (rescan, --repack-below) would reappear under the same name, and an observer
    of the bins over time would learn which files change, how often and how
    their sizes move; a version-derived name is fresh and unlinkable per version;
  * it gains nothing on restore: the recipient does not hold the dataset secret
    (only the pack's state does), so nobody computes names on the way back; the
    encrypted manifest maps each name to its path;
  * a path must be canonicalised and may be 4 KiB long; (version, part) is 12
    fixed octets the planner already holds, so a name costs one HMAC.
One caveat: version numbers are unique within one state. A state restored from a
backup hands out again the numbers given after the backup, so bins sealed from the
lost state share names with new ones (not keystreams: file seeds also mix in each
run's fresh run seed, crypt.secrets.file_seed).

The key is not derivable from public data: the dataset secret is 32 random
octets that never leave the state directory (and Dask tasks, in memory), and
HKDF with this label separates it from the secret's other uses (the seed wrap).
"""

from __future__ import annotations

import hashlib
import hmac
import re

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from packerfs.crypt.secrets import SECRET_SIZE

__all__ = ["KEY_SIZE", "NAME_LEN", "names_key", "hidden_name", "hidden_name_length"]

KEY_SIZE = 32
_DIGEST_OCTETS = 16  # 128 bits
NAME_LEN = 2 * _DIGEST_OCTETS  # 32 hex digits, before the suffix
SUFFIX_MAX = 32
_KEY_INFO = b"packerfs/names/v1 HMAC-SHA256"
_DOMAIN = b"packerfs/hidden-name/v1\x00"
_SUFFIX_RE = re.compile(r"(?:\.[a-z0-9]+)*")


def names_key(dataset_secret: bytes) -> bytes:
    """The 32-octet HMAC key of the hidden names, from the data set's secret (crypt.secrets)."""
    if len(dataset_secret) != SECRET_SIZE:
        raise ValueError(f"the dataset secret must be {SECRET_SIZE} octets")
    return HKDF(algorithm=hashes.SHA256(), length=KEY_SIZE, salt=None, info=_KEY_INFO).derive(bytes(dataset_secret))


def hidden_name(key: bytes, version: int, part: int, suffix: str) -> bytes:
    """The name `<32 hex>` + suffix of part `part` (0-based) of file version `version`.

    Always NAME_LEN + len(suffix) octets; `suffix` is the stream's suffix (lower-case
    ASCII dot-words such as ".age" or ".zst.age", at most 32 octets, or "")."""
    if len(key) != KEY_SIZE:
        raise ValueError(f"the names key must be {KEY_SIZE} octets (see names_key())")
    if not 0 <= version < 1 << 64:
        raise ValueError(f"file version {version} is out of range")
    if not 0 <= part < 1 << 32:
        raise ValueError(f"part index {part} is out of range")
    if len(suffix) > SUFFIX_MAX or not _SUFFIX_RE.fullmatch(suffix):
        raise ValueError(f"not a stream suffix: {suffix!r}")
    d = hmac.new(key, _DOMAIN + version.to_bytes(8, "big") + part.to_bytes(4, "big"), hashlib.sha256).digest()
    return d[:_DIGEST_OCTETS].hex().encode("ascii") + suffix.encode("ascii")


def hidden_name_length(suffix: str) -> int:
    """The length of every hidden name with this suffix: what the planner reserves for one."""
    return NAME_LEN + len(suffix)
