"""Source trees: the POSIX walker (later: fsspec for object stores)."""

from packerfs.source.walk import Entry, Fingerprint, ScanProblem, walk

__all__ = ["Entry", "Fingerprint", "ScanProblem", "walk"]
