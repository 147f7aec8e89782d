"""OpenPGP recipient keys: choosing the encryption subkey and building v3 PKESK packets.

Which (sub)keys are usable is decided by gpg itself (its colon listing through
python-gnupg: validity not expired/revoked/invalid/disabled, usage flag `e`),
so self-signatures, revocations and expiry are judged exactly as `gpg -e`
would. The key material is then parsed from `gpg --export` (RFC 4880 §5.5.2,
RFC 6637 §9) and PKESK packets are built from it (RFC 4880 §5.1, RFC 6637 §8):

  RSA:      m = sym-algo || session key || checksum, PKCS#1 v1.5 encrypted.
  cv25519:  ephemeral X25519; KEK = SHA-2(00000001 || shared || Param) cut to the
            key's KEK size; C = AES-KeyWrap(KEK, PKCS5-padded m); the PKESK holds
            MPI(0x40 || ephemeral public) and len(C) || C.

A PKESK is a pure function of the key, the session key and 32 random octets
`rand` supplied by the caller (derived from the file's seed, see
packerfs.crypt.openpgp), so the same inputs rebuild the same packet:

  cv25519:  the ephemeral scalar is `rand` itself.
  RSA:      EME-PKCS1-v1_5 encoding 00 02 PS 00 m, PS nonzero; candidate j (j = 0, 1, ...)
            takes PS from the XOF SHAKE-256(HKDF-SHA256(ikm=rand, salt="",
            info="packerfs/openpgp/v3 pkcs1 padding" || u32be(j))), zero octets
            skipped; the first candidate whose ciphertext m^e mod n has the
            modulus' full bit length is used, so the MPI and the PKESK have a
            fixed size. Rejection sampling over PRF output gives the same
            distribution as over true random draws. The search takes 1/P
            candidates on average, P = 1 - 2**(bits-1)/n, which is 0.11 .. 0.5
            for gpg's keys (2 to 9 public operations of ~0.5 ms each in Python
            for 4096 bits), so pkesk() returns the index it found and accepts it
            back: the caller stores it (wrapped with the seed) and later rebuilds
            the packet with a single public operation.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import time
from dataclasses import dataclass

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.keywrap import aes_key_wrap

from packerfs.errors import FormatError, KeyProblem
from packerfs.crypt.openpgp_packets import (
    TAG_PKESK,
    TAG_PUBLIC_KEY,
    TAG_PUBLIC_SUBKEY,
    TAG_SECRET_KEY,
    TAG_SECRET_SUBKEY,
    definite_length,
    dearmor,
    iter_packets,
    mpi,
    read_mpi,
)

PK_RSA, PK_RSA_E, PK_ECDH = 1, 2, 18
SYM_AES256 = 9
OID_CV25519 = bytes.fromhex("2b060104019755010501")  # 1.3.6.1.4.1.3029.1.5.1
KDF_HASHES = {8: "sha256", 9: "sha384", 10: "sha512"}
KEK_SIZES = {7: 16, 8: 24, 9: 32}  # AES-128/192/256 key wrap
ANONYMOUS_SENDER = b"Anonymous Sender    "  # 20 octets, RFC 6637 §8
MIN_RSA_BITS = 2048
RAND_SIZE = 32  # randomness per PKESK
_PKCS1_INFO = b"packerfs/openpgp/v3 pkcs1 padding"
UNUSABLE_VALIDITY = {"e": "expired", "r": "revoked", "i": "invalid", "d": "disabled"}


def session_key_message(session_key: bytes) -> bytes:
    """algo octet || key || two-octet checksum (sum of key octets mod 65536)."""
    return bytes([SYM_AES256]) + session_key + (sum(session_key) & 0xFFFF).to_bytes(2, "big")


def _nonzero_octets(key: bytes, n: int) -> bytes:
    """n nonzero octets: SHAKE-256(key) with its zero octets skipped."""
    want = n + n // 64 + 32
    while True:
        out = hashlib.shake_256(key).digest(want).replace(b"\x00", b"")
        if len(out) >= n:
            return out[:n]
        want *= 2  # the XOF's output only extends: a longer read keeps the same prefix


def pkcs1_v15_padding(rand: bytes, j: int, n: int) -> bytes:
    """PS for candidate j: n nonzero octets derived from `rand`."""
    key = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=_PKCS1_INFO + j.to_bytes(4, "big")).derive(rand)
    return _nonzero_octets(key, n)


@dataclass(frozen=True)
class EncryptionKey:
    """One encryption-capable (sub)key of a recipient and how to encrypt to it."""

    primary_fpr: str  # hex, upper case: the recipient as recorded in the manifest
    fpr: bytes  # v4 fingerprint of the (sub)key used, 20 octets
    algo: int
    rsa_n: int = 0
    rsa_e: int = 0
    x25519: bytes = b""  # native 32-octet public u-coordinate
    kdf_hash: int = 0
    kek_algo: int = 0

    @property
    def keyid(self) -> bytes:
        return self.fpr[-8:]

    def describe(self) -> str:
        if self.algo == PK_ECDH:
            return f"cv25519 subkey {self.fpr.hex().upper()}"
        return f"rsa{self.rsa_n.bit_length()} subkey {self.fpr.hex().upper()}"

    def public_material(self) -> bytes:
        """The (sub)key's fingerprint, algorithm and public parameters, for fingerprinting recipients."""
        if self.algo == PK_ECDH:
            rest = self.x25519 + bytes([self.kdf_hash, self.kek_algo])
        else:
            rest = mpi(self.rsa_n) + mpi(self.rsa_e)
        return self.fpr + bytes([self.algo]) + rest

    def pkesk_len(self) -> int:
        """Length of the complete PKESK packet; the same for every session key."""
        if self.algo == PK_ECDH:
            body = 1 + 8 + 1 + (2 + 33) + 1 + 48
        else:
            body = 1 + 8 + 1 + 2 + (self.rsa_n.bit_length() + 7) // 8
        return 1 + len(definite_length(body)) + body

    def pkesk(self, session_key: bytes, rand: bytes, candidate: int | None = None) -> tuple[bytes, int]:
        """A v3 PKESK packet for session_key, using the 32 random octets `rand` (see the module docstring).

        -> (packet, candidate). RSA: with `candidate` None, the PKCS#1 padding
        candidates are tried from 0 on and the index of the first one of full
        bit length is returned; with an index (as returned before), only that
        candidate is computed, and ValueError is raised if it is not of full
        length (it was not returned by a search). cv25519: candidate is 0."""
        if len(rand) != RAND_SIZE:
            raise ValueError(f"PKESK randomness must be {RAND_SIZE} octets")
        m = session_key_message(session_key)
        head = bytes([3]) + self.keyid + bytes([self.algo])
        if self.algo == PK_ECDH:
            eph = X25519PrivateKey.from_private_bytes(rand)
            shared = eph.exchange(X25519PublicKey.from_public_bytes(self.x25519))
            param = (
                bytes([len(OID_CV25519)])
                + OID_CV25519
                + bytes([PK_ECDH, 3, 1, self.kdf_hash, self.kek_algo])
                + ANONYMOUS_SENDER
                + self.fpr
            )
            kek = hashlib.new(KDF_HASHES[self.kdf_hash], b"\x00\x00\x00\x01" + shared + param).digest()
            kek = kek[: KEK_SIZES[self.kek_algo]]
            pad = 8 - len(m) % 8
            wrapped = aes_key_wrap(kek, m + bytes([pad]) * pad)
            eph_pub = eph.public_key().public_bytes_raw()
            body = head + mpi(int.from_bytes(b"\x40" + eph_pub, "big")) + bytes([len(wrapped)]) + wrapped
        else:
            n, e = self.rsa_n, self.rsa_e
            bits = n.bit_length()
            k = (bits + 7) // 8
            # Redraw the PKCS#1 padding until the ciphertext has the modulus' bit length,
            # so the MPI (and the stream's header) has a fixed size: stream_size() is
            # then a pure function of the plaintext size. Expected tries: 1/P (see the
            # module docstring). The candidates come from `rand` and a counter, so the
            # result is deterministic.
            j = 0 if candidate is None else candidate
            while True:
                em = b"\x00\x02" + pkcs1_v15_padding(rand, j, k - len(m) - 3) + b"\x00" + m
                c = pow(int.from_bytes(em, "big"), e, n)
                if c.bit_length() == bits:
                    break
                if candidate is not None:
                    raise ValueError(f"PKCS#1 padding candidate {candidate} does not give a full-length ciphertext")
                j += 1
            body = head + mpi(c)
        out = bytes([0xC0 | TAG_PKESK]) + definite_length(len(body)) + body
        assert len(out) == self.pkesk_len()
        return out, (j if self.algo != PK_ECDH else 0)


def _parse_key_packet(body: bytes) -> dict:
    """Fields of a v4 public (sub)key packet body; ValueError if unsupported/malformed."""
    if len(body) < 6 or body[0] != 4:
        raise ValueError(f"key packet version {body[0] if body else '?'} (only v4 is supported)")
    fpr = hashlib.sha1(b"\x99" + len(body).to_bytes(2, "big") + body).digest()
    algo = body[5]
    out = {"fpr": fpr, "algo": algo, "created": int.from_bytes(body[1:5], "big")}
    pos = 6
    if algo in (PK_RSA, PK_RSA_E):
        n, pos = read_mpi(body, pos)
        e, pos = read_mpi(body, pos)
        out.update(rsa_n=int.from_bytes(n, "big"), rsa_e=int.from_bytes(e, "big"))
    elif algo == PK_ECDH:
        olen = body[pos]
        oid = body[pos + 1 : pos + 1 + olen]
        pos += 1 + olen
        point, pos = read_mpi(body, pos)
        if pos + 4 > len(body) or body[pos] != 3 or body[pos + 1] != 1:
            raise ValueError("bad ECDH KDF parameters")
        out.update(oid=oid, point=point, kdf_hash=body[pos + 2], kek_algo=body[pos + 3])
    return out


def _encryption_key(primary_fpr: str, fields: dict) -> EncryptionKey:
    """EncryptionKey from parsed fields, or ValueError naming why it cannot be used."""
    algo = fields["algo"]
    if algo in (PK_RSA, PK_RSA_E):
        bits = fields["rsa_n"].bit_length()
        if bits < MIN_RSA_BITS:
            raise ValueError(f"RSA key of {bits} bits is below the {MIN_RSA_BITS}-bit minimum")
        try:  # the public operation is done here with pow(): let cryptography vet n and e first
            rsa.RSAPublicNumbers(fields["rsa_e"], fields["rsa_n"]).public_key()
        except ValueError as e:
            raise ValueError(f"unusable RSA public key ({e})") from None
        return EncryptionKey(primary_fpr, fields["fpr"], algo, rsa_n=fields["rsa_n"], rsa_e=fields["rsa_e"])
    if algo == PK_ECDH:
        if fields["oid"] != OID_CV25519:
            raise ValueError("ECDH on a curve other than Curve25519 is not supported")
        point = fields["point"]
        if len(point) != 33 or point[0] != 0x40:
            raise ValueError("cv25519 point is not in native 0x40 format")
        if fields["kdf_hash"] not in KDF_HASHES or fields["kek_algo"] not in KEK_SIZES:
            raise ValueError("unsupported ECDH KDF parameters")
        return EncryptionKey(
            primary_fpr,
            fields["fpr"],
            algo,
            x25519=point[1:],
            kdf_hash=fields["kdf_hash"],
            kek_algo=fields["kek_algo"],
        )
    raise ValueError(f"public-key algorithm {algo} is not supported (RSA or cv25519 only)")


def _gpg(homedir: str | None):
    try:
        import gnupg
    except ImportError:  # pragma: no cover - dependency of the project
        raise KeyProblem("python-gnupg is not installed; it is needed to read OpenPGP keys") from None
    try:
        return gnupg.GPG(gnupghome=homedir)
    except (OSError, ValueError, RuntimeError) as e:
        raise KeyProblem(f"cannot run gpg{f' with homedir {homedir}' if homedir else ''}: {e}") from None


def keys_from_keyring(ids: list[str], homedir: str | None) -> list[EncryptionKey]:
    """One EncryptionKey per id, chosen as `gpg -e -r ID` would (newest usable subkey)."""
    if not ids:
        raise KeyProblem("no OpenPGP recipient was given")
    gpg = _gpg(homedir)
    where = f" in gpg homedir {homedir}" if homedir else " in the gpg keyring"
    out: list[EncryptionKey] = []
    for rid in ids:
        if not rid or not rid.strip():
            raise KeyProblem("an OpenPGP recipient is empty; give a fingerprint, key ID or e-mail address")
        listed = gpg.list_keys(keys=[rid])
        if not listed:
            raise KeyProblem(f"OpenPGP recipient {rid!r} was not found{where}")
        if len(listed) > 1:
            fprs = ", ".join(k["fingerprint"] for k in listed)
            raise KeyProblem(f"OpenPGP recipient {rid!r} matches several keys ({fprs}); give a fingerprint")
        key = listed[0]
        pfpr = key["fingerprint"].upper()
        if key.get("trust") in UNUSABLE_VALIDITY:
            raise KeyProblem(f"OpenPGP key {pfpr} for {rid!r} is {UNUSABLE_VALIDITY[key['trust']]}")
        now = time.time()
        candidates = []  # (created, fpr hex)
        own_caps = "".join(ch for ch in key.get("cap", "") if ch.islower())
        if "e" in own_caps:
            candidates.append((int(key.get("date") or 0), pfpr))
        for info in (key.get("subkey_info") or {}).values():
            if "e" not in (info.get("cap") or ""):
                continue
            if info.get("trust") in UNUSABLE_VALIDITY:
                continue
            exp = info.get("expires") or ""
            if exp.isdigit() and int(exp) <= now:
                continue
            if info.get("fingerprint"):
                candidates.append((int(info.get("date") or 0), info["fingerprint"].upper()))
        if not candidates:
            raise KeyProblem(f"OpenPGP key {pfpr} for {rid!r} has no valid encryption subkey")
        exported = gpg.export_keys(pfpr, armor=False)
        if not exported:
            raise KeyProblem(f"gpg did not export OpenPGP key {pfpr} for {rid!r}")
        try:
            parsed = {}
            for tag, body, _ in iter_packets(exported):
                if tag in (TAG_PUBLIC_KEY, TAG_PUBLIC_SUBKEY):
                    try:
                        f = _parse_key_packet(body)
                    except (ValueError, IndexError) as e:
                        f = {"error": str(e)}
                        # still index it by fingerprint when it can be computed
                        f["fpr"] = hashlib.sha1(b"\x99" + len(body).to_bytes(2, "big") + body).digest()
                    parsed[f["fpr"].hex().upper()] = f
        except FormatError as e:
            raise KeyProblem(f"cannot parse the export of OpenPGP key {pfpr}: {e}") from None
        reasons = []
        chosen = None
        for _, fhex in sorted(candidates, reverse=True):
            f = parsed.get(fhex)
            if f is None:
                reasons.append(f"{fhex}: not in the export")
                continue
            if "error" in f:
                reasons.append(f"{fhex}: {f['error']}")
                continue
            try:
                chosen = _encryption_key(pfpr, f)
                break
            except ValueError as e:
                reasons.append(f"{fhex}: {e}")
        if chosen is None:
            raise KeyProblem(
                f"OpenPGP key {pfpr} for {rid!r} has no usable encryption subkey ({'; '.join(reasons)})"
            )
        if chosen.fpr not in {k.fpr for k in out}:
            out.append(chosen)
    return out


def keys_from_file(path: str) -> list[EncryptionKey]:
    """Encryption keys of every public key in an exported key file (armored or binary)."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise KeyProblem(f"cannot read OpenPGP key file {path}: {e.strerror or e}") from None
    if b"-----BEGIN PGP" in data[:4096]:
        try:
            data = dearmor(data)
        except ValueError as e:
            raise KeyProblem(f"OpenPGP key file {path} has bad ASCII armor: {e}") from None
    try:
        tags = [tag for tag, _, _ in iter_packets(data)]
    except FormatError as e:
        raise KeyProblem(f"OpenPGP key file {path} is not a key export: {e}") from None
    if TAG_SECRET_KEY in tags or TAG_SECRET_SUBKEY in tags:
        raise KeyProblem(f"OpenPGP key file {path} holds secret keys; give the public key (gpg --export)")
    if TAG_PUBLIC_KEY not in tags:
        raise KeyProblem(f"OpenPGP key file {path} holds no public key")
    # Let gpg judge validity (self-signatures, expiry, revocation) in a throwaway homedir.
    home = tempfile.mkdtemp(prefix="packerfs-gpg-")
    try:
        os.chmod(home, 0o700)
        gpg = _gpg(home)
        res = gpg.import_keys(data)
        fprs = list(dict.fromkeys(f.upper() for f in (res.fingerprints or [])))
        primaries = [k["fingerprint"].upper() for k in gpg.list_keys()]
        fprs = [f for f in primaries if f in fprs] or primaries
        if not fprs:
            raise KeyProblem(f"gpg could not import the OpenPGP key in {path}")
        try:
            return keys_from_keyring(fprs, home)
        except KeyProblem as e:
            raise KeyProblem(f"{path}: {e}") from None
    finally:
        shutil.rmtree(home, ignore_errors=True)
