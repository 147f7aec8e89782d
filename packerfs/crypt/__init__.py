"""Encrypted streams: the cipher chosen for a pack, and decryption on unpack.

Pack side::

    cipher = make_cipher(recipients=[...])            # or gpg_recipients=[...], or no_encryption=True
    enc = cipher.new_file(size, load_or_create_dataset_secret(state_dir))
    ... enc.update(chunk) ... enc.finish(); params = enc.params()
    stream = cipher.open_stream(params, size, read_plain, secret)   # RandomAccess, any range

    partial = enc.params()        # at any time: regenerates the stream bytes returned so far
    enc = cipher.resume_file(partial, size, secret)   # after an interruption: same secrets, same bytes
    enc, plain_offset = cipher.resume_at(partial, size, secret, stream_offset)
                                  # the same, from stream_offset on: feed plaintext from plain_offset

Unpack side::

    keyring = KeyRing(identity_files=[...], gpg_homedir=None)
    plain = open_plaintext(stream, keyring, cipher_name)           # RandomAccess of plaintext
    for block in iter_plaintext(plain): ...                        # everything, authenticated
"""

from __future__ import annotations

import os
from typing import Iterator, Sequence

from packerfs.crypt.base import Cipher, Encryptor, RandomAccess, ReadAt
from packerfs.crypt.keys import write_age_identity
from packerfs.crypt.plain import PlainCipher
from packerfs.crypt.secrets import load_or_create_dataset_secret
from packerfs.errors import FormatError, UsageError

__all__ = [
    "Cipher",
    "Encryptor",
    "RandomAccess",
    "ReadAt",
    "KeyRing",
    "PlainCipher",
    "make_cipher",
    "open_plaintext",
    "iter_plaintext",
    "load_or_create_dataset_secret",
    "write_age_identity",
]

_PGP_SUFFIXES = (".asc", ".gpg", ".pgp")
_PGP_ARMOR = b"-----BEGIN PGP PUBLIC KEY BLOCK-----"

_NO_RECIPIENT_HELP = (
    "no recipients given: use --recipient (an age1… key, an SSH public key, or a file of them; "
    "create an age key with `packerfs keygen`), --gpg-recipient (a key in your gpg keyring), "
    "or --no-encryption to store the files unencrypted."
)


def _openpgp():
    try:
        from packerfs.crypt import openpgp
    except ModuleNotFoundError as e:
        if e.name == "packerfs.crypt.openpgp":
            raise UsageError("OpenPGP support is not available in this packerfs build.") from None
        raise
    return openpgp


def _is_openpgp_key_file(path: str) -> bool:
    if path.lower().endswith(_PGP_SUFFIXES):
        return True
    try:
        with open(path, "rb") as f:
            return f.read(len(_PGP_ARMOR) + 64).lstrip().startswith(_PGP_ARMOR)
    except OSError:
        return False


def _looks_like_key_text(s: str) -> bool:
    t = s.strip()
    return t.startswith("age1") or any(tok.startswith(("ssh-", "ecdsa-", "sk-")) for tok in t.split()[:-1])


def make_cipher(
    recipients: Sequence[str] = (),
    recipients_files: Sequence[str] = (),
    gpg_recipients: Sequence[str] = (),
    gpg_homedir: str | None = None,
    no_encryption: bool = False,
) -> Cipher:
    """The Cipher for a pack, from the command line's choices.

    recipients: ``age1…`` keys, SSH public key lines, or paths to files holding
    them (an ssh ``.pub`` file, an ``age -R`` recipients file); a path to an
    OpenPGP public key (``.asc``/``.gpg``, or armored) selects OpenPGP instead.
    recipients_files: ``age -R`` style files. gpg_recipients: key ids/emails in
    the gpg keyring (``gpg_homedir`` or the default one).
    """
    recipients = list(recipients)
    recipients_files = list(recipients_files)
    gpg_recipients = list(gpg_recipients)
    if no_encryption:
        if recipients or recipients_files or gpg_recipients:
            raise UsageError("--no-encryption cannot be combined with --recipient or --gpg-recipient.")
        return PlainCipher()

    from packerfs.crypt import age

    age_recipients: list[age.Recipient] = []
    pgp_key_files: list[str] = []
    for r in recipients:
        if r and not _looks_like_key_text(r) and os.path.isfile(r):
            if _is_openpgp_key_file(r):
                pgp_key_files.append(r)
            else:
                age_recipients.extend(age.read_recipients_file(r))
        else:
            age_recipients.append(age.parse_recipient(r))  # a UsageError quotes anything unusable
    for path in recipients_files:
        if os.path.isfile(path) and _is_openpgp_key_file(path):
            pgp_key_files.append(path)
        else:
            age_recipients.extend(age.read_recipients_file(path))

    if age_recipients and (gpg_recipients or pgp_key_files):
        raise UsageError(
            "cannot mix age/SSH recipients with OpenPGP recipients in one pack; "
            "each file is encrypted with one format (choose age or OpenPGP)."
        )
    if gpg_recipients or pgp_key_files:
        openpgp = _openpgp()
        if pgp_key_files and gpg_recipients:
            raise UsageError("give OpenPGP recipients either as a key file or as --gpg-recipient names, not both.")
        if len(pgp_key_files) > 1:
            raise UsageError("give one OpenPGP public key file (it may hold several keys), or use --gpg-recipient.")
        if pgp_key_files:
            return openpgp.OpenPGPCipher.from_key_file(pgp_key_files[0])
        return openpgp.OpenPGPCipher.from_keyring(gpg_recipients, gpg_homedir)
    if age_recipients:
        return age.AgeCipher(age_recipients)
    raise UsageError(_NO_RECIPIENT_HELP)


class KeyRing:
    """The keys available for unpacking: age identity files / OpenSSH private keys, and a gpg home.

    Identity files are read when the KeyRing is made, so a missing, unreadable
    or passphrase-protected key is reported (KeyProblem) before any work starts.
    """

    def __init__(self, identity_files: Sequence[str] = (), gpg_homedir: str | None = None):
        from packerfs.crypt import age

        self.identity_files = list(identity_files)
        self.gpg_homedir = gpg_homedir
        self.age_identities: list[age.Identity] = []
        for path in self.identity_files:
            self.age_identities.extend(age.load_identity_file(path))


def open_plaintext(
    stream: RandomAccess, keyring: KeyRing, cipher_name: str, name: str | None = None
) -> RandomAccess:
    """Random-access plaintext of a stored stream. `name` (optional) is used in error messages.

    For "age" and "openpgp" the result also has iter_verified(chunk_size) yielding
    the whole plaintext in order, fully authenticated; see iter_plaintext().
    """
    if cipher_name == "plain":
        return stream
    if cipher_name == "age":
        from packerfs.crypt import age

        return age.open_age_plaintext(stream, keyring.age_identities, name=name)
    if cipher_name == "openpgp":
        return _openpgp().open_openpgp_plaintext(stream, keyring.gpg_homedir, name=name)
    raise FormatError(f"unknown cipher {cipher_name!r} (made by a newer packerfs?)", path=name)


def iter_plaintext(plain: RandomAccess, chunk_size: int = 1 << 20) -> Iterator[bytes]:
    """The whole plaintext in order: iter_verified() where the format has it, else plain reads."""
    it = getattr(plain, "iter_verified", None)
    if it is not None:
        yield from it(chunk_size)
        return
    off = 0
    while off < plain.size:
        data = plain.read(off, min(chunk_size, plain.size - off))
        if not data:
            raise FormatError("stream ended before its stated size", offset=off)
        yield data
        off += len(data)

