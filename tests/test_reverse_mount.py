"""The FUSE reverse view (`packerfs mount --reverse CARS MNT`), through real mounts of what
`packerfs pack` wrote.

The rules of test_mount.py hold here too: the daemon is always another process
(`packerfs mount --reverse`, daemonized); this process reads the mount only in
subprocesses with a timeout or in daemon threads joined with a timeout; every
mount is undone in `finally` (`packerfs umount`, then SIGKILL and
`fusermount3 -uz`).
"""

from __future__ import annotations

import errno
import os
import random
import shutil
import signal
import subprocess
from contextlib import contextmanager
from pathlib import Path

import pytest

from conftest import packerfs
from packerfs.crypt import KeyRing, write_age_identity
from packerfs.unpack import CarSet, dag
from conftest import within
from test_mount import OP_TIMEOUT, Mount, mount, mounted_at, pid_alive, wait_for
from test_unpack import HUGE, assert_same_tree, make_tree, make_writable

pytestmark = pytest.mark.fuse

MiB = 1 << 20
STATUS = ".packerfs-status"
BIN = "4MiB"
AGE_CHUNK, AGE_TAG = 64 << 10, 16


# ---------------------------------------------------------------- helpers


@contextmanager
def reverse_mount(cars: Path, mnt: Path, state: Path, *options):
    """test_mount's mount() (start, status, stop with every fallback) over a directory of CARs."""
    with mount(cars, mnt, state, "--reverse", *options) as m:
        yield m


def preads(path: Path, ranges) -> list:
    """pread each (offset, size) of a file on the mount: bytes, or the errno it failed with."""

    def run():
        out = []
        fd = os.open(path, os.O_RDONLY)
        try:
            for offset, size in ranges:
                try:
                    out.append(os.pread(fd, size, offset))
                except OSError as exc:
                    out.append(exc.errno)
        finally:
            os.close(fd)
        return out

    return within(OP_TIMEOUT, run)


def random_ranges(rng: random.Random, size: int, n: int) -> list[tuple[int, int]]:
    sizes = [1, 100, 4096, 65536 + 17, 131072, MiB + 3, 3 * MiB]
    return [(rng.randrange(0, size + 1), rng.choice(sizes)) for _ in range(n)]


def source_of(src: Path, path: bytes) -> Path:
    return Path(os.fsdecode(os.fsencode(src) + b"/" + path))


def pack(src: Path, out: Path, state: Path, *options) -> Path:
    packerfs("pack", src, out, "-t", state, "--bin-size", BIN, *options, timeout=120)
    return out


def copy_cars(cars: Path, dest: Path, skip=()) -> Path:
    dest.mkdir(parents=True)
    for car in sorted(cars.glob("*.car")):
        if car.name not in skip:
            shutil.copy2(car, dest / car.name)
    return dest


def car_name(number: int) -> str:
    return f"bin-{number:06d}.car"


# ---------------------------------------------------------------- packs (made once)


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    root = tmp_path_factory.mktemp("reverse")
    src = make_tree(root / "src", many=40)  # every restored OpenPGP file costs a gpg call
    yield root, src
    make_writable(root)


@pytest.fixture(scope="module")
def age_key(work):
    root, _ = work
    key = root / "age-key.txt"
    return key, write_age_identity(str(key))


@pytest.fixture(scope="module")
def age_pack(work, age_key):
    root, src = work
    key, recipient = age_key
    return {"cars": pack(src, root / "age-cars", root / "age-state", "-r", recipient), "options": ["-i", key]}


@pytest.fixture(scope="module")
def packs(request, work, age_pack):
    """The same tree packed by `packerfs pack` with each cipher: {name: {cars, options}}."""
    root, src = work
    ssh_key = request.getfixturevalue("ssh_rsa_key")
    gpg_key = request.getfixturevalue("gpg_rsa_key")
    return {
        "plain": {"cars": pack(src, root / "plain-cars", root / "plain-state", "--no-encryption"), "options": []},
        "age-x25519": age_pack,
        "age-ssh-rsa-4096": {
            "cars": pack(src, root / "ssh-cars", root / "ssh-state", "-r", f"{ssh_key}.pub"),
            "options": ["-i", ssh_key],
        },
        "gpg-rsa-4096": {
            "cars": pack(src, root / "gpg-cars", root / "gpg-state", "--gpg-recipient", gpg_key["fpr"],
                         "--gpg-homedir", gpg_key["home"]),
            "options": ["--gpg-homedir", gpg_key["home"]],
        },
    }


# ---------------------------------------------------------------- the tree, exactly


@pytest.mark.parametrize("cipher", ["plain", "age-x25519", "age-ssh-rsa-4096", "gpg-rsa-4096"])
def test_mount_equals_source(cipher, packs, work, tmp_path):
    _, src = work
    pack_ = packs[cipher]
    state, mnt = tmp_path / "state", tmp_path / "mnt"
    with reverse_mount(pack_["cars"], mnt, state, *pack_["options"]) as m:
        status = m.status()
        assert status["complete"] and status["missing_bins"] == [] and status["incomplete"] == []
        assert status["errors"] == [] and status["skipped_cars"] == []
        assert status["cars"] == sorted(p.name for p in pack_["cars"].glob("*.car"))
        assert status["index"]["cars_scanned"] == len(status["cars"])
        # names, contents, modes, mtimes, symlink targets, empty directories (diff -r --no-dereference too)
        within(60, assert_same_tree, src, mnt)
        assert STATUS not in within(OP_TIMEOUT, os.listdir, mnt)  # not listed: only the tree is

        # random pread ranges equal the source's bytes, across parts in different CARs
        rng = random.Random(cipher)
        for path in (HUGE, b"sizes/1m-plus1", b"uni/tab\tin name", b"empty"):
            data = source_of(src, path).read_bytes()
            ranges = random_ranges(rng, len(data), 25)
            for (offset, size), got in zip(ranges, preads(source_of(mnt, path), ranges)):
                assert got == data[offset : offset + size], (path, offset, size)

        # read-only
        def try_writes():
            codes = []
            for action in (
                lambda: open(mnt / "empty", "r+b"),
                lambda: open(mnt / "new-file", "wb"),
                lambda: os.mkdir(mnt / "new-dir"),
                lambda: os.unlink(mnt / "empty"),
                lambda: os.chmod(mnt / "empty", 0o600),
            ):
                try:
                    action()
                    codes.append(None)
                except OSError as exc:
                    codes.append(exc.errno)
            return codes

        assert within(OP_TIMEOUT, try_writes) == [errno.EROFS] * 5

    # a remount with the same CARs takes every one from the index, reading none of them again
    with reverse_mount(pack_["cars"], mnt, state, *pack_["options"]) as m:
        index = m.status()["index"]
        assert index["cars_reused"] == len(status["cars"]) and index["cars_scanned"] == 0
        data = source_of(src, HUGE).read_bytes()
        assert within(OP_TIMEOUT, source_of(mnt, HUGE).read_bytes) == data


# ---------------------------------------------------------------- faults


def _plain_range_of_leaf(carset: CarSet, path: bytes, part: int, leaf: int) -> tuple[int, int, object]:
    """The plaintext range an age file's reads touch when leaf `leaf` of part `part` is damaged,
    and that leaf's section."""
    fv = carset.tree().files[path]
    ref = fv.refs[part]
    start = ref.offset
    leaves = list(dag.FileDag(carset).leaves(ref.cid, ref.length))
    for cid, size in leaves[:leaf]:
        start += size
    cid, size = leaves[leaf]
    base = fv.stream - fv.size - AGE_TAG * -(-fv.size // AGE_CHUNK)  # header + nonce
    first = (start - base) // (AGE_CHUNK + AGE_TAG)
    last = (start + size - 1 - base) // (AGE_CHUNK + AGE_TAG)
    loc = carset.locate(cid)
    return first * AGE_CHUNK, (last + 1) * AGE_CHUNK, loc


def test_flipped_byte_fails_only_the_affected_range(age_pack, work, tmp_path):
    _, src = work
    full = CarSet.open(str(age_pack["cars"]), keyring=KeyRing([str(age_pack["options"][1])]))  # names hidden
    lo, hi, loc = _plain_range_of_leaf(full, HUGE, 2, 1)
    car = full.car_by_id[loc.car]
    cars = copy_cars(age_pack["cars"], tmp_path / "cars")
    victim = cars / car.name
    with open(victim, "r+b") as f:
        f.seek(loc.data_offset + 1000)
        byte = f.read(1)
        f.seek(loc.data_offset + 1000)
        f.write(bytes([byte[0] ^ 0x40]))
    data = source_of(src, HUGE).read_bytes()
    state = tmp_path / "state"
    with reverse_mount(cars, tmp_path / "mnt", state, *age_pack["options"]) as m:
        assert m.status()["complete"]  # the damage shows on reading
        far = [(0, 4096), (0, MiB), (len(data) - MiB, MiB), (hi + 2 * MiB, 65536)]
        bad = [((lo + hi) // 2, 4096), (lo, hi - lo), (hi - 4096, 4096)]
        got = preads(source_of(m.mnt, HUGE), bad + far + [(lo - 10, 20)])
        assert got[: len(bad)] == [errno.EIO] * len(bad)
        for (offset, size), value in zip(far, got[len(bad) : -1]):
            assert value == data[offset : offset + size], (offset, size)
        assert got[-1] in (errno.EIO, data[lo - 10 : lo])  # a read that runs into the damage stops short
        # other files read normally, the whole copy fails
        assert within(OP_TIMEOUT, source_of(m.mnt, b"sizes/exact1m").read_bytes) == source_of(src, b"sizes/exact1m").read_bytes()
        copy = subprocess.run(["cp", source_of(m.mnt, HUGE), tmp_path / "copy"], capture_output=True, timeout=OP_TIMEOUT)
        assert copy.returncode != 0 and b"Input/output error" in copy.stderr
        errors = m.status()["errors"]
        assert any(str(victim) in e and f"offset {loc.section_offset}" in e for e in errors), errors
    log = (state / "mount.log").read_text()
    assert str(victim) in log and f"offset {loc.section_offset}" in log and "EIO" in log


def test_missing_car_is_contained_and_sighup_adds_it(age_pack, work, tmp_path):
    _, src = work
    full = CarSet.open(str(age_pack["cars"]), keyring=KeyRing([str(age_pack["options"][1])]))  # names hidden
    fv = full.tree().files[HUGE]
    assert fv.parts >= 3
    missing = fv.refs[2].bin  # a middle part: the header (part 1) and the final chunk are present
    affected = {e["path"] for e in full.by_bin[missing].entries if e["kind"] == "file" and e["parts"] > 1}
    cars = copy_cars(age_pack["cars"], tmp_path / "cars", skip={car_name(missing)})
    data = source_of(src, HUGE).read_bytes()
    part2 = fv.refs[2]
    inside = part2.offset * AGE_CHUNK // (AGE_CHUNK + AGE_TAG) + MiB  # plaintext well inside part 2
    state, mnt = tmp_path / "state", tmp_path / "mnt"
    with reverse_mount(cars, mnt, state, *age_pack["options"]) as m:
        status = m.status()
        assert status["missing_bins"] == [missing] and not status["complete"]
        listed = {e["path"]: e for e in status["incomplete"]}
        assert os.fsdecode(HUGE) in listed and set(listed) == {os.fsdecode(p) for p in affected}
        assert listed[os.fsdecode(HUGE)]["missing_bins"] == [missing]
        # the affected file: its missing range is EIO, what lies in present bins reads
        got = preads(source_of(mnt, HUGE), [(inside, 4096), (0, 65536), (len(data) - 1000, 1000)])
        assert got == [errno.EIO, data[:65536], data[-1000:]]
        # every file of the other bins reads normally
        complete = [e for e in full.tree() if e.kind == "file" and e.path not in affected
                    and missing not in e.bins]
        assert len(complete) > 10

        def read_all():
            return {e.path: source_of(mnt, e.path).read_bytes() for e in complete}

        for path, content in within(60, read_all).items():
            assert content == source_of(src, path).read_bytes(), path

        # the CAR arrives: SIGHUP shows it, without rescanning the others
        shutil.copy2(age_pack["cars"] / car_name(missing), cars / car_name(missing))
        os.kill(m.pid, signal.SIGHUP)
        status = wait_for(lambda: (s := m.status())["generation"] == 2 and s, 20, "the reload after SIGHUP")
        assert status["complete"] and status["missing_bins"] == [] and status["incomplete"] == []
        assert status["index"]["cars_scanned"] == 1 and status["index"]["cars_reused"] == len(status["cars"]) - 1
        assert preads(source_of(mnt, HUGE), [(inside, 4096)]) == [data[inside : inside + 4096]]
        within(60, assert_same_tree, src, mnt)
        assert pid_alive(m.pid)


def _gpg(home: Path, *args, passphrase: str | None = None, input: bytes | None = None) -> bytes:
    unlock = ["--pinentry-mode", "loopback", "--passphrase", passphrase] if passphrase is not None else []
    result = subprocess.run(["gpg", "--homedir", home, "--batch", *unlock, *args], input=input,
                            capture_output=True, timeout=120)
    assert result.returncode == 0, result.stderr.decode()
    return result.stdout


def test_key_problems_fail_the_mount_in_one_line(age_pack, packs, work, tmp_path):
    other = tmp_path / "other-key.txt"
    write_age_identity(str(other))
    empty_home = tmp_path / "gpg-empty"
    empty_home.mkdir(mode=0o700)
    # a gpg key with a passphrase, which the mount daemon cannot ask for
    locked = tmp_path / "gpg-locked"
    locked.mkdir(mode=0o700)
    _gpg(locked, "--quick-gen-key", "Locked <locked@packerfs.test>", "ed25519", "sign", "never", passphrase="s3cret")
    fpr = _gpg(locked, "--with-colons", "--list-keys", "locked@packerfs.test").decode().split("fpr:::::::::")[1].split(":")[0]
    _gpg(locked, "--quick-add-key", fpr, "cv25519", "encr", "never", passphrase="s3cret")
    src = tmp_path / "small"
    (src / "d").mkdir(parents=True)
    (src / "d" / "f.txt").write_bytes(b"locked away\n")
    locked_cars = pack(src, tmp_path / "locked-cars", tmp_path / "locked-state", "--gpg-recipient", fpr,
                       "--gpg-homedir", locked)
    subprocess.run(["gpgconf", "--homedir", locked, "--kill", "gpg-agent"], capture_output=True, timeout=60)
    cases = [
        (age_pack["cars"], ["-i", other], "none of the identities"),
        (age_pack["cars"], ["-i", tmp_path / "no-such-key.txt"], "cannot read identity file"),
        (age_pack["cars"], [], "no age identity was given"),
        (packs["gpg-rsa-4096"]["cars"], ["--gpg-homedir", empty_home], "no secret key"),
        (locked_cars, ["--gpg-homedir", locked], "must be unlocked in gpg-agent"),
    ]
    try:
        for i, (cars, options, words) in enumerate(cases):
            m = Mount(cars, tmp_path / f"mnt{i}", tmp_path / f"state{i}", ["--reverse", *options])
            try:
                result = m.start(check=False)
                message = result.stderr.decode().strip()
                assert result.returncode == 1, message
                assert len(message.splitlines()) == 1 and words in message, message
                assert not mounted_at(m.mnt)
            finally:
                m.stop()
        # the batch commands say the same, in one line, and unpack writes nothing
        for command in (["ls", locked_cars], ["unpack", locked_cars, tmp_path / "locked-out"]):
            result = packerfs(*command, "--gpg-homedir", locked, check=False, timeout=120)
            message = result.stderr.decode().strip()
            assert result.returncode == 1 and len(message.splitlines()) == 1, message
            assert "must be unlocked in gpg-agent" in message, message
        assert not (tmp_path / "locked-out").exists() or not any((tmp_path / "locked-out").iterdir())
        # once gpg-agent holds the passphrase, the same mount works
        message = _gpg(locked, "--trust-model", "always", "--encrypt", "-r", fpr, input=b"x")
        assert _gpg(locked, "--decrypt", passphrase="s3cret", input=message) == b"x"
        with reverse_mount(locked_cars, tmp_path / "mnt-unlocked", tmp_path / "state-unlocked",
                           "--gpg-homedir", locked) as m:
            assert within(OP_TIMEOUT, (m.mnt / "d" / "f.txt").read_bytes) == b"locked away\n"
    finally:
        for home in (empty_home, locked):
            subprocess.run(["gpgconf", "--homedir", home, "--kill", "gpg-agent"], capture_output=True, timeout=60)


# ---------------------------------------------------------------- the LMDB index (no FUSE)


def test_lmdb_index_reuses_unchanged_cars_and_rescans_changed_ones(age_pack, work, tmp_path, monkeypatch):
    from packerfs.crypt import KeyRing
    from packerfs.unpack import FileReader
    from packerfs.unpack import lmdb_index
    from packerfs.unpack.lmdb_index import CarIndexStore

    _, src = work
    cars = copy_cars(age_pack["cars"], tmp_path / "cars")
    keyring = KeyRing([str(age_pack["options"][1])])
    data = source_of(src, HUGE).read_bytes()
    names = sorted(p.name for p in cars.glob("*.car"))

    def open_set(store):
        carset = CarSet.open(str(cars), index=store.session(), keyring=keyring)
        reader = FileReader(carset, keyring)
        assert reader.read(HUGE, 0, len(data)) == data
        return carset

    store = CarIndexStore(str(tmp_path / "state"))
    try:
        first = open_set(store)
        assert len(first.index.scanned) == len(names) and first.index.reused == []
        blocks = len(first.index)
        first.close()
        again = open_set(store)
        assert again.index.scanned == [] and len(again.index.reused) == len(names) and len(again.index) == blocks
        again.close()
        # a CAR rewritten (same name, new mtime) is scanned again under a new id; the rest come from the index
        touched = cars / names[1]
        os.utime(touched, ns=(1, 2))
        third = open_set(store)
        assert third.index.scanned == [str(touched)] and len(third.index.reused) == len(names) - 1
        assert third.by_bin[2].id not in again.car_by_id
        third.close()
        # a CAR damaged since: reported like any bad CAR, its bin missing, the others still from the index
        with open(touched, "r+b") as f:
            f.truncate(touched.stat().st_size // 2)
        fourth = CarSet.open(str(cars), index=store.session(), keyring=keyring)
        assert len(fourth.problems) == 1 and names[1] in fourth.problems[0] and fourth.missing_bins == [2]
        assert len(fourth.index.reused) == len(names) - 1
        fourth.close()
    finally:
        store.close()
    # garbage (records of replaced CARs) beyond its share: the next store starts over, and reads are right
    shutil.copy2(age_pack["cars"] / names[1], touched)
    monkeypatch.setattr(lmdb_index, "GARBAGE_MIN", 0)
    monkeypatch.setattr(lmdb_index, "GARBAGE_SHARE", 0.1)
    store = CarIndexStore(str(tmp_path / "state"))
    try:
        assert store.started_over
        fresh = open_set(store)
        assert len(fresh.index.scanned) == len(names)
        fresh.close()
    finally:
        store.close()
