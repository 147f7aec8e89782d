"""FUSE views over the engine (pyfuse3 + trio), and the `mount`/`umount` commands.

    packview   the pack view: bins as CAR files, manifests, status (no format logic)
    blocks     aligned windows regenerated once, cached, read ahead
    workers    BinReader in worker processes (or threads)
    daemon     mount lifecycle: detach, serve, scan in the background, unmount
    commands   `packerfs mount` and `packerfs umount`
"""
