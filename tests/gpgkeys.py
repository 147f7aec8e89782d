"""Throwaway gpg homes and keys for the tests (made once per session in conftest)."""

from __future__ import annotations

import os
import shutil
import subprocess

GPG = shutil.which("gpg")


def gpg(home: str, *args: str, input: bytes | None = None, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(
        [GPG, "--homedir", home, "--batch", "--pinentry-mode", "loopback", "--passphrase", "", *args],
        input=input,
        capture_output=True,
        check=check,
        timeout=300,
    )


def new_home(tmp_path_factory, name: str) -> str:
    home = str(tmp_path_factory.mktemp(name))
    os.chmod(home, 0o700)
    return home


def make_key(home: str, uid: str, primary: str, sub: str | None, sub_expire: str = "never") -> tuple[str, str | None]:
    gpg(home, "--quick-gen-key", uid, primary, "sign", "never")
    fpr = fingerprints(home, uid)[0]
    if sub is not None:
        gpg(home, "--quick-add-key", fpr, sub, "encr", sub_expire)
    fprs = fingerprints(home, uid)
    return fpr, (fprs[1] if len(fprs) > 1 else None)


def fingerprints(home: str, rid: str) -> list[str]:
    """Primary then subkey fingerprints of one key."""
    out = gpg(home, "--with-colons", "--list-keys", rid).stdout.decode()
    return [ln.split(":")[9] for ln in out.splitlines() if ln.startswith("fpr:")]


def kill_agent(home: str) -> None:
    subprocess.run(["gpgconf", "--homedir", home, "--kill", "gpg-agent"], capture_output=True, timeout=60)
