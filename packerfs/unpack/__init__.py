"""Unpack side: index retrieved CARs, read any file's plaintext, restore, verify, list.

    carset = CarSet.open("cars/")                      # sections + manifests; bad CARs listed
    reader = FileReader(carset, KeyRing([...]))         # random access, thread-safe
    report = restore(carset, "out/", keyring)           # the original tree, safely
    report = verify(carset, "cars/manifest.csv")        # every block, manifests, commP
    rows = ls(carset)
"""

from packerfs.unpack.carset import BlockIndex, Car, CarSet, Location, MemoryBlockIndex
from packerfs.unpack.reader import FileReader
from packerfs.unpack.restore import RestoreReport, restore
from packerfs.unpack.tree import Tree, TreeEntry
from packerfs.unpack.verify import LsRow, VerifyReport, ls, verify

__all__ = [
    "BlockIndex",
    "Car",
    "CarSet",
    "FileReader",
    "Location",
    "LsRow",
    "MemoryBlockIndex",
    "RestoreReport",
    "Tree",
    "TreeEntry",
    "VerifyReport",
    "ls",
    "restore",
    "verify",
]
