"""The command line as users and scripts see it: outputs, --json, exit codes, one-line errors."""

import json
import os
import shutil
import subprocess
import sys

import pytest

from conftest import ROOT, make_small_tree, packerfs, run_tool, write_random

MiB = 1 << 20
COMMANDS = ["commp", "keygen", "pack", "unpack", "verify", "ls", "status", "demo"]


def one_line_error(result: subprocess.CompletedProcess) -> str:
    text = result.stderr.decode().strip()
    assert "Traceback" not in text
    assert len(text.splitlines()) == 1, text
    assert text.startswith("packerfs: error: ")
    return text


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_explains_itself(command):
    result = packerfs(command, "--help")
    assert b"usage: packerfs " + command.encode() in result.stdout
    assert len(result.stdout) > 200


def test_commp_json_and_text(tmp_path):
    path = tmp_path / "payload.bin"
    write_random(path, 3 * MiB + 17, 1)
    rows = json.loads(packerfs("commp", path, "--json").stdout)
    assert list(rows[0]) == ["file", "piece_cid", "piece_cid_v2", "piece_size", "payload_size"]
    assert rows[0]["payload_size"] == 3 * MiB + 17 and rows[0]["piece_size"] == 4 * MiB
    assert rows[0]["piece_cid"].startswith("baga6ea4sea") and rows[0]["piece_cid_v2"].startswith("bafkzcib")
    text = packerfs("commp", path).stdout.decode()
    assert rows[0]["piece_cid"] in text


def test_commp_errors_are_one_line(tmp_path):
    tiny = tmp_path / "tiny"
    tiny.write_bytes(b"x" * 10)
    assert "65" in one_line_error(packerfs("commp", tiny, check=False))
    missing = packerfs("commp", tmp_path / "nope", check=False)
    assert missing.returncode == 1 and "nope" in one_line_error(missing)


def test_keygen_writes_0600_identity_and_refuses_overwrite(tmp_path):
    key = tmp_path / "key.txt"
    out = json.loads(packerfs("keygen", "-o", key, "--json").stdout)
    assert out["recipient"].startswith("age1")
    assert (key.stat().st_mode & 0o777) == 0o600
    again = packerfs("keygen", "-o", key, check=False)
    assert again.returncode == 2 and str(key) in one_line_error(again)


@pytest.fixture
def age_pack(tmp_path):
    src = make_small_tree(tmp_path / "src")
    key = tmp_path / "key.txt"
    recipient = json.loads(packerfs("keygen", "-o", key, "--json").stdout)["recipient"]
    cars = tmp_path / "cars"
    packerfs("pack", src, cars, "-r", recipient, "--bin-size", "4MiB", "-t", tmp_path / "state")
    return src, cars, key


def test_pack_verify_ls_unpack(tmp_path, age_pack):
    src, cars, key = age_pack
    verified = json.loads(packerfs("verify", cars, "-i", key, "--json").stdout)
    assert verified["ok"] and verified["cars"] == len(list(cars.glob("*.car")))
    rows = {r["path"]: r for r in json.loads(packerfs("ls", cars, "-i", key, "--json").stdout)}
    assert rows["sub/big.bin"]["parts"] >= 3 and rows["sub/link"]["target"] == "../a.txt"
    out = tmp_path / "out"
    done = json.loads(packerfs("unpack", cars, out, "-i", key, "--json").stdout)
    assert done["complete"] and done["files"] == 27 and done["symlinks"] == 2
    assert run_tool("diff", "-r", "--no-dereference", src, out).returncode == 0
    again = packerfs("unpack", cars, out, "-i", key, check=False)
    assert again.returncode == 1 and "--force" in one_line_error(again)
    packerfs("unpack", cars, out, "-i", key, "--force")


def test_unpack_failures_have_exit_codes(tmp_path, age_pack):
    src, cars, key = age_pack
    other = tmp_path / "other.txt"
    packerfs("keygen", "-o", other)
    wrong = packerfs("unpack", cars, tmp_path / "o1", "-i", other, check=False)
    assert wrong.returncode == 1
    one_line_error(wrong)
    assert not (tmp_path / "o1").exists() or not any((tmp_path / "o1").rglob("*.txt"))
    missing = packerfs("unpack", cars, tmp_path / "o2", "-i", tmp_path / "absent-key", check=False)
    assert missing.returncode != 0 and "absent-key" in one_line_error(missing)
    # a missing bin: complete files restored, exit 3, incomplete ones listed
    (cars / "bin-000002.car").unlink()
    partial = packerfs("unpack", cars, tmp_path / "o3", "-i", key, check=False)
    assert partial.returncode == 3
    assert b"big.bin" in partial.stderr and b"missing bins: 2" in partial.stderr
    assert (tmp_path / "o3" / "a.txt").read_bytes() == (src / "a.txt").read_bytes()
    # verify reports the set incomplete (exit 3: a bin the snapshot needs is lost) and names the missing CAR
    failed = packerfs("verify", cars, "-i", key, check=False)
    assert failed.returncode == 3 and b"bin-000002.car" in failed.stderr + failed.stdout


def test_corrupt_car_is_named_with_offset(tmp_path, age_pack):
    src, cars, key = age_pack
    victim = cars / "bin-000003.car"
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0x40
    victim.write_bytes(bytes(data))
    result = packerfs("unpack", cars, tmp_path / "out", "-i", key, check=False)
    assert result.returncode == 1
    message = one_line_error(result)
    assert "bin-000003.car" in message and "offset" in message
    assert not list((tmp_path / "out").rglob(".pfs-*.partial")) if (tmp_path / "out").exists() else True


@pytest.mark.interop
def test_gpg_pack_parts_decrypt_with_stock_gpg(tmp_path, gpg_rsa_key, ipfs_car):
    """Split OpenPGP streams pulled out with ipfs-car and concatenated decrypt with `gpg -d`."""
    src = tmp_path / "src"
    original = write_random(src / "big.bin", 9 * MiB + 5, 7)
    cars = tmp_path / "cars"
    # --show-names: stock ipfs-car must find the parts under their real name (big.bin.gpg.partNNNN…)
    packerfs(
        "pack", src, cars, "--gpg-recipient", gpg_rsa_key["fpr"], "--gpg-homedir", gpg_rsa_key["home"],
        "--bin-size", "4MiB", "-t", tmp_path / "state", "--show-names",
    )
    extracted = tmp_path / "extracted"
    for car_path in sorted(cars.glob("*.car")):
        run_tool(ipfs_car, "unpack", car_path, "-o", extracted, check=True)
    parts = sorted(extracted.glob("big.bin.gpg.part*"))
    assert len(parts) >= 3
    decrypted = run_tool(
        "gpg", "--homedir", gpg_rsa_key["home"], "--batch", "--pinentry-mode", "loopback", "--passphrase", "",
        "-d", input=b"".join(p.read_bytes() for p in parts),
    )
    assert decrypted.returncode == 0, decrypted.stderr
    assert decrypted.stdout == original
    out = tmp_path / "out"
    packerfs("unpack", cars, out, "--gpg-homedir", gpg_rsa_key["home"])
    assert (out / "big.bin").read_bytes() == original


def test_packer_front_end_round_trip(tmp_path, age_pack):
    src, cars, key = age_pack
    out = tmp_path / "restored"
    result = run_tool(
        sys.executable, "-m", "packerfs.packer_cli", "-u", "-s", cars, "-t", tmp_path / "t", "-o", out, "-e", key, cwd=ROOT
    )
    assert result.returncode == 0, result.stderr
    assert run_tool("diff", "-r", "--no-dereference", src, out).returncode == 0
    usage = run_tool(sys.executable, "-m", "packerfs.packer_cli", cwd=ROOT)
    assert usage.returncode == 2 and b"SYNOPSIS" in usage.stdout


def test_status_json(tmp_path, age_pack):
    status = json.loads(packerfs("status", "-t", tmp_path / "state", "--json").stdout)
    assert status["state"] == "ready" and status["bins_sealed"] >= 4 and status["retired_bins"] == [] and status["snapshots"] == 1
    missing = packerfs("status", "-t", tmp_path / "nothing", check=False)
    assert missing.returncode == 1
    one_line_error(missing)


def test_demo_runs_the_main_job(tmp_path):
    result = packerfs("demo", "--dir", tmp_path / "demo")
    text = result.stdout.decode()
    assert "$ packerfs pack" in text and "$ packerfs unpack" in text and "$ packerfs snapshots" in text
    # the first pack's tree, then the tree after a deletion and an edit: both restored exactly
    assert text.count("restored tree matches the source") == 2 and "DIFFERS" not in text


@pytest.fixture
def small_disk(tmp_path):
    """A 6 MiB tmpfs: writing more fails with ENOSPC, like a full drive."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    where = tmp_path / "small"
    where.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=6m", "tmpfs", str(where)], check=True, timeout=30)
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], timeout=30)


def test_full_disk_while_packing_is_one_line_and_resumable(tmp_path, small_disk):
    src = tmp_path / "src"
    write_random(src / "a.bin", 5 * MiB, 1)
    write_random(src / "b.bin", 5 * MiB, 2)
    out = small_disk / "cars"
    args = ["pack", src, out, "--no-encryption", "--bin-size", "4MiB", "-t", tmp_path / "state"]
    full = packerfs(*args, check=False)
    assert full.returncode == 1
    message = one_line_error(full)
    assert "disk full" in message or "No space" in message
    assert "bin-" in message and "b'" not in message, "the message names the CAR being written"
    assert not list(out.glob("*.partial")), "the unfinished CAR is removed, never left looking like one"
    # whatever is there under a final name is a complete, sealed CAR: every block reads and checks out
    from packerfs.ipld.car import CarReader

    for car_path in out.glob("*.car"):
        with CarReader(car_path) as reader:
            assert sum(1 for _ in reader.blocks()) > 0
    done_before = {p.name for p in out.glob("*.car")}
    # with room again, the same command finishes the job, keeping what was sealed
    roomy = tmp_path / "roomy"
    shutil.copytree(out, roomy)
    packerfs("pack", src, roomy, "--no-encryption", "--bin-size", "4MiB", "-t", tmp_path / "state")
    assert done_before <= {p.name for p in roomy.glob("*.car")}
    assert json.loads(packerfs("verify", roomy, "--json").stdout)["ok"]
    assert not list(roomy.glob("*.partial"))


def test_full_disk_while_unpacking_leaves_no_false_file(tmp_path, small_disk):
    src = tmp_path / "src"
    write_random(src / "small.txt", 1000, 1)
    write_random(src / "z-big.bin", 9 * MiB, 2)
    cars = tmp_path / "cars"
    packerfs("pack", src, cars, "--no-encryption", "--bin-size", "4MiB", "-t", tmp_path / "state")
    out = small_disk / "restored"
    result = packerfs("unpack", cars, out, check=False)
    assert result.returncode == 1
    message = one_line_error(result)
    assert "disk full" in message or "No space" in message
    assert not (out / "z-big.bin").exists()
    assert not list(out.rglob(".pfs-*.partial"))


def test_one_writer_per_state_directory(tmp_path):
    """A pack refuses a state directory another packerfs process (a mount, another pack) is writing."""
    from packerfs.index.lock import lock_state

    src = tmp_path / "src"
    write_random(src / "a", 100, 1)
    held = lock_state(str(tmp_path / "state"), "serving /mnt/somewhere")
    try:
        result = packerfs("pack", src, tmp_path / "out", "--no-encryption", "-t", tmp_path / "state", check=False)
        assert result.returncode == 2
        assert "serving /mnt/somewhere" in one_line_error(result)
    finally:
        os.close(held)
    packerfs("pack", src, tmp_path / "out", "--no-encryption", "-t", tmp_path / "state")
