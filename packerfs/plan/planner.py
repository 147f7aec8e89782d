"""Where each entry goes, decided from metadata alone.

The scan decides, entry by entry, which bin holds it and where a file is cut
into parts, before any content is read: every decision is a function of the
listing (names, sizes, the tree's shape) and of the bounds in costs.py. A
PlanBin is the bin being decided: it keeps the same Budget a BinLayout keeps,
but counts what has been laid out by its bound instead of its exact bytes, so
planning needs no content, and the exact CAR a sealer then lays out from the
same decisions is never larger than what the plan promised.

Because the decisions need nothing but metadata, they can be made for a whole
data set up front (`packerfs plan`), the bins can then be sealed anywhere and
in any order (packerfs.pack.seal), and the totals give the pack a real ETA.
"""

from __future__ import annotations

from packerfs import manifest
from packerfs.plan import costs
from packerfs.plan.layout import Budget, Frame


class PlanBin:
    """One bin being planned: its budget, its open directories, and what it will hold."""

    def __init__(self, number: int, capacity: int, recipients: list[str], cipher_name: str, sealing=None):
        """`sealing` (--hide-names): the ManifestSealer the bin's layout will seal its manifest with."""
        self.number = number
        self.hidden = sealing is not None
        self.budget = Budget(capacity, manifest.manifest_fixed_bound(recipients, cipher_name), sealing)
        self.opened_dirs: set[bytes] = set()
        self.is_empty = True
        # its first part continues a stream cut in the previous bin from that bin's state at the seam
        # (OpenPGP), so the two are sealed one after the other in one process
        self.continues = False
        # what the plan table shows
        self.entries = 0  # manifest entries: directories, symlinks and file parts
        self.file_parts = 0
        self.stream_bytes = 0
        self.first: bytes | None = None  # the first and last paths placed here
        self.last: bytes | None = None
        root = self.open_frame(b"", b"")
        self.budget.add_link(root, len(manifest.DIRNAME))

    @property
    def frames(self) -> list[Frame]:
        return self.budget.frames

    def open_frame(self, path: bytes, name: bytes) -> Frame:
        return self.budget.open_frame(path, name)

    def close_frame(self) -> None:
        # the directory's blocks take at most its bound; its link was counted in the parent on opening
        self.budget.emitted += self.frames.pop().bound()

    def add_manifest_entry(self, entry: dict | None, bound: int) -> None:
        self.budget.manifest_bytes += bound
        self.entries += 1

    def placed(self, path: bytes) -> None:
        if self.first is None:
            self.first = path
        self.last = path
        self.is_empty = False

    def add_part(self, path: bytes, name_length: int, stream_bytes: int) -> None:
        """A file part of `stream_bytes` stream bytes, linked under a name of `name_length` bytes."""
        self.budget.emitted += costs.file_bound(stream_bytes)
        self.budget.add_link(self.frames[-1], name_length)
        self.file_parts += 1
        self.stream_bytes += stream_bytes
        self.placed(path)

    def add_stored(self, path: bytes, name_length: int, block_length: int) -> None:
        """A symlink: one stored block, linked under its name."""
        self.budget.emitted += costs.section_length(block_length)
        self.budget.add_link(self.frames[-1], name_length)
        self.placed(path)

    def add_meta_file(self, name: bytes, length: int, manifest_extra: int) -> None:
        """A file under `.packerfs/` (a snapshot part), as BinLayout.emit_meta_file counts it."""
        self.budget.manifest_bytes += manifest_extra
        self.budget.reserved += costs.dir_link_bound(name)
        self.budget.emitted += costs.file_bound(length)
        self.is_empty = False

    def car_bound(self) -> int:
        """The most bytes this bin's CAR can take, as planned so far."""
        return self.budget.total()


def sync_frames(layout, chain: list) -> bool:
    """Make the layout's open directories exactly `chain` (directory Entries, root first).

    One function for the planner (a PlanBin) and the sealer (a BinLayout), so both open and
    close the same directories at the same points. True if anything changed.

    With hidden names no directory is laid out: every part is linked from the bin's root, and the
    chain's directories only get their manifest entries (once per bin), as they would on opening."""
    changed = False
    if layout.hidden:
        for dir_entry in chain:
            if dir_entry.path not in layout.opened_dirs:
                add_dir_entry(layout, dir_entry)
                changed = True
        return changed
    keep = 0
    frames = layout.frames
    # frames[0] is the root, matched by chain[0] (the root entry, path b"")
    while keep + 1 < len(frames) and keep + 1 < len(chain) and frames[keep + 1].path == chain[keep + 1].path:
        keep += 1
    while len(frames) > keep + 1:
        layout.close_frame()
        changed = True
    if len(frames) == 1 and b"" not in layout.opened_dirs:
        add_dir_entry(layout, chain[0])
        changed = True
    for dir_entry in chain[keep + 1 :]:
        layout.open_frame(dir_entry.path, dir_entry.name)
        add_dir_entry(layout, dir_entry)
        changed = True
    return changed


def add_dir_entry(layout, dir_entry) -> None:
    layout.add_manifest_entry(manifest_base(dir_entry), manifest.entry_bound("dir", dir_entry.path))
    layout.opened_dirs.add(dir_entry.path)


def manifest_base(entry) -> dict:
    return {"path": entry.path, "kind": entry.kind, "mode": entry.mode, "mtime_ns": entry.mtime_ns}
