"""Privacy of what a CAR shows (issue 14): hidden names, size padding, sealed manifests.

    names            hidden_name(key, version, part, suffix), names_key(dataset secret)
    padding          padme(), the skippable-frame padding of a zstd stream, stored zstd frames
    sealed_manifest  seal_manifest() / open_manifest(): a manifest as a deterministic age/OpenPGP stream

Building blocks with narrow interfaces; pack and unpack wire them in.
"""

from packerfs.privacy.names import NAME_LEN, hidden_name, names_key
from packerfs.privacy.padding import Padding, StoredFrame, padded_size, padme
from packerfs.privacy.sealed_manifest import open_manifest, seal_manifest

__all__ = [
    "NAME_LEN",
    "hidden_name",
    "names_key",
    "padme",
    "padded_size",
    "Padding",
    "StoredFrame",
    "seal_manifest",
    "open_manifest",
]
