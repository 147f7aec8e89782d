"""Pack side: scan a source into the index, then serve or write its bins."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from typing import Callable

from packerfs.crypt import load_or_create_dataset_secret
from packerfs.crypt.base import Cipher
from packerfs.errors import UsageError
from packerfs.index import Index
from packerfs.pack.reader import BinReader
from packerfs.pack.scan import Scan, ScanReport
from packerfs.ipld import car
from packerfs.pack.writer import already_written, car_name, write_car, write_manifests

__all__ = ["Engine", "default_state_dir", "car_name"]


def default_state_dir(source: str) -> str:
    """Under the user's cache directory, keyed by the source's real path."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    key = hashlib.sha256(os.fsencode(os.path.realpath(source))).hexdigest()[:16]
    return os.path.join(base, "packerfs", key)


@dataclass
class Engine:
    """A source, its state directory and the options it was packed with."""

    source: str
    state_dir: str
    cipher: Cipher
    bin_size: int
    index: Index
    secret: bytes

    @classmethod
    def open(cls, source: str, state_dir: str | None, cipher: Cipher, bin_size: int) -> "Engine":
        if not os.path.isdir(source):
            raise UsageError(f"{source}: source is not a directory")
        source = os.path.realpath(source)
        state_dir = os.path.abspath(state_dir or default_state_dir(source))
        os.makedirs(state_dir, mode=0o700, exist_ok=True)
        secret = load_or_create_dataset_secret(state_dir)
        index = Index(state_dir)
        index.bind(
            {
                "source": source,
                "bin_size": bin_size,
                "cipher": cipher.name,
                "recipients": sorted(cipher.recipients),
            }
        )
        return cls(source, state_dir, cipher, bin_size, index, secret)

    def scan(
        self,
        *,
        skip_unreadable: bool = False,
        advance: Callable[[int], None] | None = None,
        on_seal: Callable[[dict], None] | None = None,
        car_dir: str | None = None,
    ) -> ScanReport:
        """Scan the source into the index; with `car_dir`, write each new bin's CAR there as it is laid out."""
        if car_dir is not None:
            os.makedirs(car_dir, exist_ok=True)
        return Scan(
            self.source, self.index, self.cipher, self.secret, self.bin_size,
            skip_unreadable=skip_unreadable, advance=advance, on_seal=on_seal, car_dir=car_dir,
        ).run()

    def reader(self) -> BinReader:
        return BinReader(self.index, self.source, self.cipher, self.secret)

    def bins(self) -> list[dict]:
        return sorted(self.index.all_bins(), key=lambda b: b["bin"])

    def write(self, out_dir: str, advance: Callable[[int], None] = lambda n: None) -> list[str]:
        """Write every bin's CAR and the manifests; returns the CAR paths.

        A stale bin (its source changed after it was sealed) can no longer be
        generated; it is kept if an earlier run wrote it, and otherwise left out
        of OUT and of manifest.csv — the data it held is in newer bins.
        """
        os.makedirs(out_dir, exist_ok=True)
        reader = self.reader()
        written, listed = [], []
        for result in self.bins():
            path = os.path.join(out_dir, car_name(result["bin"]))
            if result["stale"]:
                if already_written(path, result["car_size"], car.header(result["root"])):
                    written.append(path)
                    listed.append(result)
                continue
            written.append(write_car(reader, result["bin"], out_dir, advance))
            listed.append(result)
        write_manifests(listed, out_dir)
        return written

    def close(self) -> None:
        self.index.close()
