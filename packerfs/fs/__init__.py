"""FUSE views over the engine (pyfuse3 + trio), and the `mount`/`umount` commands.

    packview   the pack view: bins as CAR files, manifests, status (no format logic)
    reverseview  the reverse view: a CAR set as the original tree, read by FileReader
    reverse    mount --reverse: CAR set indexed into LMDB, keys checked, SIGHUP reloads
    blocks     aligned windows regenerated once, cached, read ahead
    workers    worker processes regenerating bytes for either view (or threads)
    daemon     mount lifecycle: detach, serve, scan in the background, unmount
    commands   `packerfs mount` and `packerfs umount`
"""
