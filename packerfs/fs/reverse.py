"""`packerfs mount --reverse CARS MNT`: open the CAR set, check the keys, serve the reverse view.

    serve_reverse()   in the mount daemon (or --foreground): index CARS into LMDB in the
                      state directory (an unchanged CAR is taken from the index unread),
                      build the tree, try the keys on the first file, mount, and serve until
                      unmounted or SIGINT/SIGTERM. SIGHUP re-reads CARS (new CARs appear).

The plaintext is regenerated in worker processes (packerfs.fs.workers), each with
its own CarSet over the same LMDB index and its own FileReader, so decryption and
hashing run on every core while the daemon only copies bytes to the kernel.

Everything that can be wrong with the keys is found before the file system is
mounted, and reported in one line by `packerfs mount` (exit 1): an identity file
that is missing or unreadable (KeyRing), identities that open none of the files
(age), gpg without the secret key or unable to unlock it (OpenPGP).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import struct
import sys
import time

from packerfs.errors import FormatError, IncompleteSet, KeyProblem, PackerfsError

log = logging.getLogger("packerfs.fs")

THREADS = 4  # threads reading blocks and decrypting if every worker process died
KEY_CHECK_FILES = 5  # files tried (in path order, complete ones first) before giving up on a key check


def default_reverse_state_dir(cars) -> str:
    """Under the user's cache directory, keyed by the CAR directory's real path (or the URLs)."""
    from packerfs.unpack.carset import CarSources

    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    where = CarSources.of(cars)
    shown = json.dumps([s if "://" in s else os.path.realpath(s) for s in where.specs] + list(where.pieces))
    key = hashlib.sha256(os.fsencode(shown if where.remote or len(where.specs) > 1 else os.path.realpath(where.specs[0]))).hexdigest()[:16]
    return os.path.join(base, "packerfs", f"reverse-{key}")


def open_generation(number: int, cars, store, keyring, dataset=None, snapshot=None):
    """A CarSet over the LMDB index `store`, its FileReader and tree, as a Generation.

    `snapshot`: the id of the snapshot whose tree to show (UsageError if no bin names it), or None
    for the newest complete one."""
    from packerfs.fs.reverseview import Generation
    from packerfs.unpack import CarSet, FileReader
    from packerfs.unpack.snapshots import set_choice

    started = time.monotonic()
    session = store.session()
    carset = CarSet.open(cars, dataset=dataset, index=session, keyring=keyring)
    try:
        set_choice(carset, snapshot)
        if not carset.cars:
            why = "; ".join(carset.problems + carset.ignored) or "no *.car files"
            raise PackerfsError(f"no usable packerfs CAR files in {_show(cars)}: {why}")
        reader = FileReader(carset, keyring)  # builds the tree: FormatError for an unsafe manifest
    except BaseException:
        carset.close()
        raise
    seconds = time.monotonic() - started
    info = {
        "index": {
            "cars_reused": len(session.reused),
            "cars_scanned": len(session.scanned),
            "blocks": len(session),
            "seconds": round(seconds, 3),
        }
    }
    return Generation(number, carset, reader, info)


# ---------------------------------------------------------------- worker processes
#
# The `cryptography` AEAD call and Python's copies hold the GIL, so the plaintext is
# regenerated in worker processes (packerfs.fs.workers), each with its own CarSet over
# the same LMDB index (every CAR is taken from it unread) and its own FileReader. A
# read's key is (generation number, path); the daemon tells every worker to open a
# generation (the exact CARs the daemon's has) before it serves it, and to close it
# once the daemon closed its own.

_GEN = struct.Struct("<I")


def encode_key(key) -> bytes:
    """The worker's key for the view's window key (Generation, inode, path)."""
    gen, _, path = key
    return _GEN.pack(gen.number) + path


def open_message(gen) -> bytes:
    from packerfs.unpack.snapshots import LEGACY

    carset = gen.carset
    return json.dumps({
        "open": gen.number,
        "cars": [car.path for car in carset.cars],
        "sources": carset.sources.to_json(),
        "dataset": carset.dataset.hex() if carset.dataset else None,
        # the worker's tree must be the daemon's: the snapshot it chose, or the merged manifests
        "snapshot": gen.tree.snapshot.id if gen.tree.snapshot is not None else LEGACY,
    }).encode()


def close_message(number: int) -> bytes:
    return json.dumps({"close": number}).encode()


class GenerationReaders:
    """A worker process's reader: FileReaders of the generations the daemon serves."""

    def __init__(self, state_dir: str, keyring):
        from packerfs.unpack.lmdb_index import CarIndexStore

        self.keyring = keyring
        self.store = CarIndexStore(state_dir, maintain=False)  # the daemon owns the store's upkeep
        self.gens: dict[int, tuple] = {}

    def control(self, message: bytes) -> bytes:
        from packerfs.unpack import CarSet, FileReader

        request = json.loads(message)
        if "close" in request:
            gen = self.gens.pop(request["close"], None)
            if gen is not None:
                gen[0].close()
            return b""
        number = request["open"]
        if number in self.gens:
            return b""
        from packerfs.unpack.snapshots import set_choice

        from packerfs.unpack.carset import CarSources

        carset = CarSet.open(
            CarSources.from_json(request["sources"]), dataset=request["dataset"], index=self.store.session(),
            keyring=self.keyring,
        )
        try:
            set_choice(carset, request.get("snapshot"))
            if [car.path for car in carset.cars] != request["cars"]:
                raise PackerfsError(
                    f"generation {number}: the worker's CAR set differs from the daemon's "
                    f"({'; '.join(carset.problems) or 'CARs changed while opening'})"
                )
            reader = FileReader(carset, self.keyring)
        except BaseException:
            carset.close()
            raise
        self.gens[number] = (carset, reader)
        return b""

    def read(self, key: bytes, offset: int, size: int) -> bytes:
        number = _GEN.unpack_from(key)[0]
        gen = self.gens.get(number)
        if gen is None:
            raise PackerfsError(f"generation {number} is not open in worker process {os.getpid()}")
        return gen[1].read(key[_GEN.size :], offset, size)

    def read_into(self, key: bytes, offset: int, buffer) -> int:
        """read() into the worker's shared-memory slot: the plaintext is decrypted straight there."""
        number = _GEN.unpack_from(key)[0]
        gen = self.gens.get(number)
        if gen is None:
            raise PackerfsError(f"generation {number} is not open in worker process {os.getpid()}")
        return gen[1].read_into(key[_GEN.size :], offset, buffer)

    def close(self) -> None:
        for carset, _ in self.gens.values():
            carset.close()
        self.gens.clear()
        self.store.close()


def _show(cars) -> str:
    return cars if isinstance(cars, str) else str(cars) if not isinstance(cars, (list, tuple)) else " ".join(map(str, cars))


def check_key(gen) -> None:
    """KeyProblem (one line) unless the keys open a file of the set; a no-op for plain sets."""
    carset, tree = gen.carset, gen.tree
    if carset.cipher == "plain":
        return
    with_header = [fv for fv in (tree.files[p] for p in sorted(tree.files)) if 1 in fv.refs]
    candidates = [fv for fv in with_header if fv.complete] + [fv for fv in with_header if not fv.complete]
    last = None
    for fv in candidates[:KEY_CHECK_FILES]:
        try:
            gen.reader.plaintext(fv.path)
            return
        except KeyProblem as exc:
            raise KeyProblem(
                f"cannot decrypt {os.fsdecode(fv.path)!r} of the CAR set: {_strip(exc, fv.path).rstrip('.')}"
            ) from None
        except (IncompleteSet, FormatError) as exc:
            last = exc  # a damaged or partial file says nothing about the key: try the next one
    if last is not None:
        log.warning("the keys could not be checked at mount time (%s); reads will tell", last)
    elif tree.files:
        log.warning("the keys could not be checked at mount time: no file's first part is in the set")


def _strip(exc: Exception, path: bytes) -> str:
    text = str(exc)
    prefix = os.fsdecode(path) + ": "
    return text[len(prefix) :] if text.startswith(prefix) else text


class Reloader:
    """SIGHUP: open a new generation over the same index (in a thread) and install it."""

    def __init__(self, view, cars, store, keyring, dataset, workers=None, snapshot=None):
        self.view = view
        self.snapshot = snapshot  # kept at a reload when given (--snapshot); else the newest then
        self.workers = workers
        self.cars = cars
        self.store = store
        self.keyring = keyring
        self.dataset = dataset
        self.running = False
        self.again = False

    async def __call__(self) -> None:
        import trio

        if self.running:
            self.again = True  # one more pass once this one is done
            return
        self.running = True
        try:
            while True:
                self.again = False
                await self._reload_once(trio)
                if not self.again:
                    break
        finally:
            self.running = False

    async def _reload_once(self, trio) -> None:
        view = self.view
        number = view.gen.number + 1
        dataset = view.gen.carset.dataset
        log.info("SIGHUP: re-reading %s", _show(self.cars))
        try:
            gen = await trio.to_thread.run_sync(
                open_generation, number, self.cars, self.store, self.keyring, dataset, self.snapshot
            )
        except PackerfsError as exc:
            message = f"reload failed, still serving generation {view.gen.number}: {exc}"
            log.error("%s", message)
            view.state.add_error(message)
            return
        except Exception as exc:  # noqa: BLE001 - the mount keeps serving what it had
            log.exception("reload failed")
            view.state.add_error(f"reload failed: {type(exc).__name__}: {exc}")
            return
        if self.workers is not None and self.workers.alive:
            errors = await self.workers.control(open_message(gen))
            if errors:
                await self.workers.control(close_message(gen.number))
                gen.carset.close()
                message = f"reload failed, still serving generation {view.gen.number}: " + "; ".join(errors)
                log.error("%s", message)
                view.state.add_error(message)
                return
        stale = view.install(gen)
        index = gen.summary["index"]
        log.info(
            "generation %d: %d CARs (%d from the index, %d scanned) in %.3f s, %d files, %d incomplete, "
            "missing bins %s; %d cached names invalidated",
            gen.number, len(gen.carset.cars), index["cars_reused"], index["cars_scanned"], index["seconds"],
            gen.summary["files"], gen.summary["incomplete_count"], gen.summary["missing_bins"] or "none", stale,
        )


def serve_reverse(
    cars,
    mountpoint: str,
    state_dir: str,
    keyring,
    *,
    dataset=None,
    snapshot=None,
    allow_other: bool = False,
    ready=lambda: None,
    log_path: str | None = None,
) -> int:
    """Mount the reverse view of `cars` at `mountpoint`; serve until unmounted or signalled."""
    from packerfs.fs.daemon import check_mountpoint, lock_state, serve_view
    from packerfs.fs.service import PROCESSES, WINDOW, unwind_on_signals
    from packerfs.fs.reverseview import ReverseState, ReverseView
    from packerfs.fs.workers import ProcessReaders
    from packerfs.unpack.lmdb_index import CarIndexStore

    check_mountpoint(mountpoint)
    lock_fd = lock_state(state_dir, mountpoint)
    # Forked first: before the index is opened, any thread started or /dev/fuse opened.
    workers = None
    if PROCESSES:
        workers = ProcessReaders(lambda: GenerationReaders(state_dir, keyring), PROCESSES, WINDOW, encode_key)
    unwind_on_signals()
    store = None
    view = None
    gen = None
    try:
        started = time.monotonic()
        store = CarIndexStore(state_dir)
        gen = open_generation(1, cars, store, keyring, dataset, snapshot)
        check_key(gen)
        if workers is not None:
            workers.open_engines(message=open_message(gen))  # each opens generation 1 over the index
        info = {
            "cars_dir": _show(cars),
            "state_dir": state_dir,
            "mountpoint": mountpoint,
            "pid": os.getpid(),
            "log": log_path,
            "mount_seconds": round(time.monotonic() - started, 3),
        }
        view = ReverseView(gen, ReverseState(info), threads=THREADS, workers=workers)
        gen = None  # the view owns it now
        summary = view.gen.summary
        log.info(
            "%d CARs (%d from the index, %d scanned, %d blocks) in %.3f s; %d files (%d incomplete), "
            "missing bins %s, %d CARs skipped; keys checked; %d worker processes; mounting at %s",
            len(summary["cars"]), summary["index"]["cars_reused"], summary["index"]["cars_scanned"],
            summary["index"]["blocks"], info["mount_seconds"], summary["files"], summary["incomplete_count"],
            summary["missing_bins"] or "none", len(summary["skipped_cars"]), PROCESSES if workers else 0, mountpoint,
        )
        for problem in summary["skipped_cars"] + summary["lost"] + summary["notes"]:
            log.warning("%s", problem)
        # Decrypting threads hold the GIL in short bursts; let the FUSE loop have it back sooner than every 5 ms.
        sys.setswitchinterval(0.001)
        serve_view(
            view, mountpoint, allow_other=allow_other, ready=ready,
            services=[view.cache.run, *([workers.run] if workers is not None else [])],
            on_hangup=Reloader(view, cars, store, keyring, dataset, workers, snapshot),
        )
    finally:
        if workers is not None:
            workers.close()
        if gen is not None:
            gen.carset.close()
        if view is not None:
            view.close()
        if store is not None:
            store.close()
        os.close(lock_fd)
    return 0
