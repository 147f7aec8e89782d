"""Source trees: the POSIX walker (later: fsspec for object stores)."""

from packerfs.source.files import lstat_source, open_source_file
from packerfs.source.walk import Entry, Fingerprint, ScanProblem, excluded_paths, walk

__all__ = ["Entry", "Fingerprint", "ScanProblem", "excluded_paths", "lstat_source", "open_source_file", "walk"]
