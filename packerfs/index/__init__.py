"""The LMDB index in the state directory."""

from packerfs.index.store import Index, IndexMismatch

__all__ = ["Index", "IndexMismatch"]
