"""Source trees behind one interface (base.Source): a local directory (posix) or an object store
(objects: s3://, gs://, az://, abfs://). Nothing outside this package knows which."""

from __future__ import annotations

from typing import Mapping

from packerfs.source.base import Source, SourceFile
from packerfs.source.walk import Entry, Fingerprint, ScanProblem

__all__ = ["Entry", "Fingerprint", "ScanProblem", "Source", "SourceFile", "is_url", "open_source", "source_key"]

URL_SCHEMES = ("s3", "gs", "gcs", "az", "abfs", "abfss")


def is_url(spec: str) -> bool:
    """Does SRC name an object store rather than a local directory?"""
    scheme, sep, _ = spec.partition("://")
    return bool(sep) and scheme.lower() in URL_SCHEMES


def source_key(spec: str) -> str:
    """What identifies a source for its default state directory: its real path, or its URL."""
    import os

    if is_url(spec):
        from packerfs.source.objects import parse_url

        return parse_url(spec).url
    return os.path.realpath(spec)


def open_source(spec: str, options: Mapping[str, str] | None = None) -> Source:
    """The source SRC names. `options` (from -o KEY=VALUE) go to an object store's file system;
    a local directory takes none."""
    from packerfs.errors import UsageError

    if is_url(spec):
        from packerfs.source.objects import open_object_source

        return open_object_source(spec, dict(options or {}))
    if options:
        raise UsageError(f"{spec}: --source-option applies to object-store sources (s3://, gs://, az://) only")
    import os

    from packerfs.source.posix import PosixSource

    if not os.path.isdir(spec):
        raise UsageError(f"{spec}: source is not a directory")
    return PosixSource(spec)
