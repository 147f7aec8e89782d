"""`packerfs handoff`: each format against a fixture written from that tool's documented format.

The fixtures (tests/fixtures/handoff, see its README) are examples and flag tables taken from each
tool's docs and source. Every test parses the fixture and packerfs's output with the same rules,
modelled on how the tool reads its input: urfave/cli flag parsing for the command lines (boost and
singularity are urfave/cli v2 programs), strings.Split / SplitN for boost's piece file and curio's
add-url file, encoding/csv for graphsplit's manifest.
"""

import argparse
import csv
import io
import json
import os
import re
import shlex
import uuid
from pathlib import Path
from types import SimpleNamespace

import pytest

from conftest import make_small_tree, packerfs, write_random
from packerfs.commands import run
from packerfs.errors import UsageError
from packerfs.handoff import Bin, padding_warnings, read_deals

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "handoff"
PROVIDER = "f01000"
CID = re.compile(r"ba[a-z2-7]{50,}")  # CIDv1, base32


# ---------------------------------------------------------------- parsers, as the tools read


def urfave(line: str, spec: dict) -> dict:
    """Parse a command line as urfave/cli v2 would for the command `spec` describes.

    Global flags come before the command; `--name value`, `--name=value`, and for bool flags
    `--name` or `--name=true|false`; parsing stops at the first word that is not a flag, and the
    rest are arguments. Unknown flags, missing required flags, bad numbers and a wrong number of
    arguments fail, as they make the tool fail. A trailing shell comment is dropped, as sh does.
    """
    words = shlex.split(line, comments=True)
    command = spec["command"]
    assert words[0] == command[0], line
    words = words[1:]

    def take(table: dict, words: list, into: dict, kind_of) -> list:
        while words and words[0].startswith("-"):
            word = words.pop(0)
            name, eq, value = word.lstrip("-").partition("=")
            assert name in table, f"flag provided but not defined: -{name} (in {line!r})"
            kind = kind_of(table[name])
            if kind == "bool":
                value = value if eq else "true"
                assert value in ("true", "false"), f"--{name}={value}: not a bool"
            elif not eq:
                assert words, f"--{name} needs a value"
                value = words.pop(0)
            if kind == "uint":
                assert value.isdigit(), f"--{name} {value!r}: not an unsigned integer"
            elif kind == "int":
                assert re.fullmatch(r"-?[0-9]+", value), f"--{name} {value!r}: not an integer"
            into[name] = value
        return words

    parsed = {"globals": {}, "flags": {}, "args": []}
    words = take(spec["global_flags"], words, parsed["globals"], lambda t: t)
    assert words[: len(command) - 1] == command[1:], f"not `{' '.join(command)}`: {line!r}"
    words = words[len(command) - 1 :]
    words = take(spec["flags"], words, parsed["flags"], lambda t: t["type"])
    parsed["args"] = words
    for name, flag in spec["flags"].items():
        assert not flag.get("required") or name in parsed["flags"], f"Required flag {name!r} not set: {line!r}"
    assert len(words) == len(spec["args"]), f"arguments {words} where {spec['args']} are expected: {line!r}"
    return parsed


def piece_file_line(line: str) -> dict:
    """A line of `boost allocate --piece-file`, parsed as cmd/boost/direct_deal.go does."""
    parts = line.split(",")
    assert len(parts) == 6, f"invalid line format. Expected pieceCid, pieceSize, MinerAddr, TMin, TMax, Exp at {line}"
    assert all(parts), f"empty column value in the input file at {line}"
    piece, size, miner, tmin, tmax, exp = parts
    assert CID.fullmatch(piece) and piece.startswith("baga6ea4sea"), piece
    assert re.fullmatch(r"[ft]0[0-9]+", miner), f"{miner}: IDFromAddress needs an ID address"
    for field in (size, tmin, tmax, exp):
        assert field.isdigit(), field
    assert int(tmax) >= int(tmin)
    return {
        "piece_cid": piece, "piece_size": int(size), "miner": miner, "tmin": int(tmin), "tmax": int(tmax), "exp": int(exp)
    }


def add_url_row(line: str) -> dict:
    """A row of `curio market add-url --file`, parsed as cmd/curio/market.go does:
    strings.SplitN(line, ",", 4), then the headers split on ',' and cut at the first ':'."""
    parts = line.split(",", 3)
    assert len(parts) >= 3 and all(parts[:3]), f"empty column value in the input file at {line}"
    deal, size, url = parts[:3]
    uuid.UUID(deal)
    assert size.isdigit(), f"failed to parse size {size!r}"
    headers = {}
    if len(parts) == 4 and parts[3]:
        for item in parts[3].split(","):
            key, sep, value = item.partition(":")
            assert sep, "invalid header format, expected key:value"
            headers[key.strip()] = value.strip()
    return {"uuid": deal, "raw_size": int(size), "url": url, "headers": headers, "columns": len(parts)}


def read_csv_strict(text: str) -> list[list[str]]:
    """RFC 4180 records, as Go's encoding/csv reads them (every record as wide as the first)."""
    records = list(csv.reader(io.StringIO(text), strict=True))
    assert records and all(len(r) == len(records[0]) for r in records), "wrong number of fields"
    return records


def json_stream(text: str) -> list[dict]:
    decoder, pos, objs = json.JSONDecoder(), 0, []
    while pos < len(text.rstrip()):
        while text[pos].isspace():
            pos += 1
        obj, pos = decoder.raw_decode(text, pos)
        objs.append(obj)
    return objs


def spec(name: str) -> dict:
    return json.loads((FIXTURES / name).read_text())


def fixture_lines(name: str) -> list[str]:
    return (FIXTURES / name).read_text().splitlines()


# ---------------------------------------------------------------- one pack for the module


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    """A pack with current and retired bins: big.bin's bins retire when it is deleted and packed again."""
    base = tmp_path_factory.mktemp("handoff")
    src = make_small_tree(base / "src")
    out, state = base / "out", base / "state"
    for _ in range(2):
        packerfs("pack", src, out, "-t", state, "--no-encryption", "--bin-size", "4MiB")
        (src / "sub" / "big.bin").unlink(missing_ok=True)
    with open(out / "manifest.csv") as f:
        rows = list(csv.DictReader(f))
    current = [r for r in rows if r["status"] == "current"]
    assert current and len(current) < len(rows), "the second pack should retire big.bin's bins"
    return SimpleNamespace(base=base, out=out, state=state, rows=rows, current=current)


def handoff(*args, check=True):
    return packerfs("handoff", *args, check=check)


def from_args(packed, source: str) -> list:
    return ["-t", packed.state] if source == "state" else [packed.out]


SOURCES = pytest.mark.parametrize("source", ["state", "out"])


# ---------------------------------------------------------------- boost offline-deal


def test_boost_offline_fixtures_parse():
    v2 = spec("boost-offline-deal.v2.flags.json")
    for line in fixture_lines("boost-offline-deal.example.sh"):
        urfave(line, v2)


@SOURCES
def test_boost_offline_lines(packed, source):
    result = handoff(
        "boost-offline", *from_args(packed, source), "--provider", PROVIDER, "-p", "t0999", "--duration", "1526400",
        "--storage-price", "0", "--no-verified", "--start-epoch", "4000000", "--remove-unsealed-copy",
        "--skip-ipni-announce", "--boost-json",
    )
    lines = result.stdout.decode().splitlines()
    assert len(lines) == 2 * len(packed.current), "one line per current bin and provider"
    v2 = spec("boost-offline-deal.v2.flags.json")
    for i, line in enumerate(lines):
        row, provider = packed.current[i // 2], (PROVIDER, "t0999")[i % 2]
        parsed = urfave(line, v2)
        assert parsed["globals"] == {"json": "true"}
        assert parsed["flags"] == {
            "provider": provider, "commp": row["piece_cid"], "piece-size": row["piece_size"],
            "payload-cid": row["payload_cid"], "duration": "1526400", "storage-price": "0", "verified": "false",
            "start-epoch": "4000000", "remove-unsealed-copy": "true", "skip-ipni-announce": "true",
        }
        # The raw CAR size and the file travel in the comment (v2's offline-deal has no --car-size).
        assert line.endswith(f"  # {row['car_file']} car-size {row['car_size']}")


def test_boost_offline_car_size_flag_for_v1_clients(packed):
    v1 = spec("boost-offline-deal.v1.flags.json")
    plain = handoff("boost-offline", packed.out, "-p", PROVIDER).stdout.decode().splitlines()
    with pytest.raises(AssertionError, match="Required flag 'car-size'"):
        urfave(plain[0], v1)
    lines = handoff("boost-offline", packed.out, "-p", PROVIDER, "--car-size-flag").stdout.decode().splitlines()
    for line, row in zip(lines, packed.current, strict=True):
        parsed = urfave(line, v1)
        assert parsed["flags"]["car-size"] == row["car_size"]
        with pytest.raises(AssertionError, match="not defined: -car-size"):
            urfave(line, spec("boost-offline-deal.v2.flags.json"))


# ---------------------------------------------------------------- boost allocate --piece-file


@SOURCES
def test_boost_ddo_piece_file(packed, source):
    documented = [piece_file_line(line) for line in fixture_lines("boost-allocate.piece-file.txt")]
    text = handoff("boost-ddo", *from_args(packed, source), "-p", PROVIDER).stdout.decode()
    ours = [piece_file_line(line) for line in text.splitlines()]  # the first line too: no header
    assert [(r["piece_cid"], r["piece_size"]) for r in ours] == [
        (r["piece_cid"], int(r["piece_size"])) for r in packed.current
    ]
    # Without terms, boost's own flag defaults, as in the fixture's first line.
    assert {(r["miner"], r["tmin"], r["tmax"], r["exp"]) for r in ours} == {
        (PROVIDER, documented[0]["tmin"], documented[0]["tmax"], documented[0]["exp"])
    }
    text = handoff(
        "boost-ddo", *from_args(packed, source), "-p", PROVIDER, "-p", "f02000",
        "--term-min", "600000", "--term-max", "1051200", "--expiration", "86400",
    ).stdout.decode()
    ours = [piece_file_line(line) for line in text.splitlines()]
    assert len(ours) == 2 * len(packed.current)
    assert {(r["tmin"], r["tmax"], r["exp"]) for r in ours} == {(600000, 1051200, 86400)}
    assert [r["miner"] for r in ours[:2]] == [PROVIDER, "f02000"]


# ---------------------------------------------------------------- curio market add-url --file


def boost_json(deals: list[dict]) -> str:
    """Deals as `boost --json offline-deal` prints them: MarshalIndent of a map, keys sorted, two spaces."""
    template = json_stream((FIXTURES / "boost-json-offline-deal.json").read_text())[0]
    return "".join(json.dumps({**template, **d}, indent=2, sort_keys=True) + "\n" for d in deals)


def test_read_deals_reads_the_boost_json_fixture(tmp_path):
    documented = json_stream((FIXTURES / "boost-json-offline-deal.json").read_text())
    expected = [(o["dealUuid"], o["commp"], o["payloadCid"], o["provider"]) for o in documented]
    deals = read_deals(str(FIXTURES / "boost-json-offline-deal.json"))  # indented objects, as boost prints
    assert [(d.uuid, d.commp, d.payload_cid, d.provider) for d in deals] == expected
    assert deals[1].where.endswith("line 11")
    compact = tmp_path / "compact.json"  # one object per line
    compact.write_text("".join(json.dumps(o) + "\n" for o in documented + documented[:1]))  # a repeat is one deal
    deals = read_deals(str(compact))
    assert [(d.uuid, d.commp, d.payload_cid, d.provider) for d in deals] == expected
    assert deals[1].where.endswith("line 2")


def test_curio_add_url_fixture_parses():
    rows = [add_url_row(line) for line in fixture_lines("curio-add-url.csv")]
    assert rows[0]["headers"] == {"Authorization": "Bearer token"}
    assert rows[1]["headers"] == {"Authorization": "Bearer token", "X-Request-Source": "client"}


@SOURCES
def test_curio_urls(packed, source, tmp_path):
    uuids = {r["car_file"]: str(uuid.uuid4()) for r in packed.rows}
    deals = [{"dealUuid": uuids[r["car_file"]], "commp": r["piece_cid"], "payloadCid": r["payload_cid"]} for r in packed.rows]
    other = str(uuid.uuid4())  # a second provider's deal for the first bin
    deals.append({"dealUuid": other, "commp": packed.current[0]["piece_cid"], "payloadCid": "", "provider": "f09999"})
    deals_file = tmp_path / "deals.json"
    deals_file.write_text(boost_json(deals))
    documented = [add_url_row(line) for line in fixture_lines("curio-add-url.csv")]

    result = handoff(
        "curio-urls", *from_args(packed, source), "--deals", deals_file, "--url-base", "https://cars.example.org/set1/",
        "--header", "Authorization: Bearer abc", "-H", "X-Source:packerfs", "--provider", PROVIDER,
    )
    rows = [add_url_row(line) for line in result.stdout.decode().splitlines()]
    assert {r["columns"] for r in rows} == {documented[0]["columns"]} == {4}
    assert [(r["uuid"], r["raw_size"], r["url"]) for r in rows] == [
        (uuids[c["car_file"]], int(c["car_size"]), f"https://cars.example.org/set1/{c['car_file']}") for c in packed.current
    ]
    assert {tuple(r["headers"].items()) for r in rows} == {(("Authorization", "Bearer abc"), ("X-Source", "packerfs"))}
    assert b"for none of these bins" in result.stderr  # the retired bins' deals (and f09999's, filtered out)

    # No --provider: both deals of the first bin; no --header: three columns and a warning.
    result = handoff(
        "curio-urls", *from_args(packed, source), "--deals", deals_file, "--url-base", "http://h/c", "--url-path", "piece"
    )
    rows = [add_url_row(line) for line in result.stdout.decode().splitlines()]
    assert [r["uuid"] for r in rows[:2]] == [uuids[packed.current[0]["car_file"]], other]
    assert rows[0]["url"] == f"http://h/c/piece/{packed.current[0]['piece_cid']}"  # as `packerfs serve` answers
    assert {r["columns"] for r in rows} == {3}
    assert b"no header" in result.stderr


# ---------------------------------------------------------------- singularity prep add-piece


@SOURCES
def test_singularity(packed, source):
    add_piece = spec("singularity-add-piece.flags.json")
    for line in fixture_lines("singularity-add-piece.example.sh"):
        urfave(line, add_piece)
    result = handoff("singularity", *from_args(packed, source), "--preparation", "my data set")
    lines = result.stdout.decode().splitlines()
    for line, row in zip(lines, packed.current, strict=True):
        parsed = urfave(line, add_piece)
        size = int(parsed["flags"]["piece-size"])
        assert size == int(row["piece_size"]) and size & (size - 1) == 0
        assert parsed["flags"]["piece-cid"] == row["piece_cid"]  # commP v1: singularity refuses other CIDs
        assert parsed["flags"]["root-cid"] == row["payload_cid"]
        assert parsed["flags"]["file-size"] == row["car_size"]
        assert parsed["args"] == ["my data set"]
        if source == "out":
            assert parsed["flags"]["file-path"] == os.path.join(os.path.abspath(packed.out), row["car_file"])
        else:
            assert "file-path" not in parsed["flags"]
    if source == "state":
        assert b"no --file-path" in result.stderr
        lines = handoff(
            "singularity", *from_args(packed, source), "--preparation", "1", "--file-path-base", "/mnt/cars"
        ).stdout.decode().splitlines()
        assert [urfave(line, add_piece)["flags"]["file-path"] for line in lines] == [
            f"/mnt/cars/{r['car_file']}" for r in packed.current
        ]


# ---------------------------------------------------------------- graphsplit manifest.csv


def graphsplit_rows(text: str) -> tuple[list[str], list[dict]]:
    records = read_csv_strict(text)
    header, rows = records[0], records[1:]
    parsed = []
    for r in rows:
        payload, filename, piece, piece_size, detail = r  # SP scripts take these by position
        assert CID.fullmatch(payload) and CID.fullmatch(piece) and filename.endswith(".car")
        padded = int(piece_size) * 128 // 127  # graphsplit's piece_size is unpadded
        assert padded * 127 == int(piece_size) * 128 and padded & (padded - 1) == 0
        parsed.append({"payload_cid": payload, "filename": filename, "piece_cid": piece, "padded": padded,
                       "detail": json.loads(detail)})
    return header, parsed


@SOURCES
def test_graphsplit_manifest(packed, source):
    documented_header, documented = graphsplit_rows((FIXTURES / "graphsplit-manifest.csv").read_text())
    header, rows = graphsplit_rows(handoff("graphsplit", *from_args(packed, source)).stdout.decode())
    assert header == documented_header
    assert [(r["payload_cid"], r["filename"], r["piece_cid"], r["padded"]) for r in rows] == [
        (c["payload_cid"], c["car_file"], c["piece_cid"], int(c["piece_size"])) for c in packed.current
    ]
    assert [r["detail"] for r in rows] == [
        {"car_size": int(c["car_size"]), "padded_piece_size": int(c["piece_size"]), "piece_cid_v2": c["piece_cid_v2"]}
        for c in packed.current
    ]


def test_all_includes_retired_bins(packed):
    _, rows = graphsplit_rows(handoff("graphsplit", packed.out, "--all").stdout.decode())
    assert [r["filename"] for r in rows] == [c["car_file"] for c in packed.rows]


# ---------------------------------------------------------------- -o FILE and --json


def test_output_file_and_json(packed, tmp_path):
    target = tmp_path / "pieces.txt"
    target.write_text("old\n")
    expected = handoff("boost-ddo", packed.out, "-p", PROVIDER).stdout
    result = handoff("boost-ddo", "-t", packed.state, "-p", PROVIDER, "-o", target, "--json")
    assert target.read_bytes() == expected
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pieces.txt"], "no temporary file left behind"
    report = json.loads(result.stdout)
    assert report["file"] == str(target) and report["lines"] == len(packed.current) and "text" not in report
    assert [b["car_size"] for b in report["bins"]] == [int(c["car_size"]) for c in packed.current]
    assert handoff("boost-ddo", packed.out, "-p", PROVIDER, "-o", target).stdout == b""


# ---------------------------------------------------------------- deal-size sanity


def test_padding_warnings_function():
    half = Bin("bin-000001.car", "baga", 2 * 1024 * 1024, "bafy", 1024 * 1024)  # exactly half: allowed
    over = Bin("bin-000002.car", "baga", 2_097_152, "bafy", 1_044_159)
    retired = Bin("bin-000003.car", "baga", 2_097_152, "bafy", 1000, status="retired")
    full = Bin("bin-000004.car", "baga", 4_194_304, "bafy", 3_342_969)
    (line,) = padding_warnings([half, over, retired, full])
    assert line.startswith("bin-000002.car: 1,044,159 bytes in a 2,097,152-byte piece, 50.2% padding")
    assert "\n" not in line
    # Bin results as the index and Engine.bins() give them, and manifest rows.
    results = [{"bin": 7, "car_size": 300, "piece_size": 1024, "status": "current"},
               {"bin": 8, "car_size": 300, "piece_size": 1024, "status": "retired"},
               {"car_file": "bin-000009.car", "car_size": 900, "piece_size": 1024}]
    lines = padding_warnings(results)
    assert [line.split(":")[0] for line in lines] == ["bin-000007.car"]
    assert "70.7% padding" in lines[0]


def test_padding_warning_on_stderr(tmp_path):
    src = tmp_path / "src"
    write_random(src / "almost-1MiB", 1_043_000, 7)  # its CAR just passes 1 MiB x 127/128: a 2 MiB piece
    out = tmp_path / "out"
    packerfs("pack", src, out, "-t", tmp_path / "state", "--no-encryption", "--bin-size", "4MiB")
    (row,) = csv.DictReader(open(out / "manifest.csv"))
    car_size, piece_size = int(row["car_size"]), int(row["piece_size"])
    assert car_size * 2 < piece_size, "the test's file no longer makes a mostly-padding piece"
    result = handoff("graphsplit", out)
    warnings = [line for line in result.stderr.decode().splitlines() if line.startswith("packerfs: warning:")]
    assert warnings == [f"packerfs: warning: {padding_warnings([row])[0]}"]
    assert f"{car_size:,} bytes in a {piece_size:,}-byte piece" in warnings[0]


# ---------------------------------------------------------------- --bin-size presets


def test_bin_size_presets(tmp_path):
    from packerfs.commands.options import bin_size_from_args

    def size(text):
        return bin_size_from_args(argparse.Namespace(bin_size=text))

    assert size("pdp") == size("PDP") == 1_065_353_216 == (1 << 30) * 127 // 128
    assert size("32GiB-sector") == 34_091_302_912
    assert size("64gib-sector") == 68_182_605_824
    with pytest.raises(UsageError, match="pdp, 32GiB-sector, 64GiB-sector"):
        size("pdq")
    assert b"pdp" in packerfs("pack", "--help").stdout
    src = tmp_path / "src"
    write_random(src / "f", 1000, 1)
    result = packerfs(
        "pack", src, tmp_path / "out", "-t", tmp_path / "state", "--no-encryption", "--bin-size", "pdp", "--json"
    )
    assert {c["bin_size"] for c in json.loads(result.stdout)["cars"]} == {1_065_353_216}


# ---------------------------------------------------------------- errors: one line, exit 2 (or 1)


def error_cases(packed, tmp_path):
    good = tmp_path / "good.json"
    first = packed.current[0]
    good.write_text(
        boost_json([{"dealUuid": str(uuid.uuid4()), "commp": first["piece_cid"], "payloadCid": first["payload_cid"]}])
    )
    mismatch = tmp_path / "mismatch.json"  # the fixture's payloadCid with this pack's commp
    mismatch.write_text(boost_json([{"dealUuid": str(uuid.uuid4()), "commp": first["piece_cid"]}]))
    not_json = tmp_path / "not.json"
    not_json.write_text('{"dealUuid": "9e68fb16-ff9a-488e-ad0a-1289b512d176", "commp": "baga"}\nsent deal proposal\n')
    boost_error = tmp_path / "error.json"
    boost_error.write_text('{"error": "deal proposal rejected: no ask"}\n')
    no_manifest = tmp_path / "empty-out"
    no_manifest.mkdir()
    bad_manifest = tmp_path / "bad-out"
    bad_manifest.mkdir()
    (bad_manifest / "manifest.csv").write_text("car_file,piece_cid\nbin-000001.car,baga\n")
    out, state = str(packed.out), str(packed.state)
    curio = ["curio-urls", out, "--url-base", "https://h/c", "--deals"]
    missing = ", ".join(c["car_file"] for c in packed.current[1:])
    return [
        (["boost-offline", out], 2, "boost-offline needs --provider"),
        (["boost-ddo", out, "-p", "f1abcdef"], 2, "not a storage provider ID address"),
        (["boost-ddo", out, "-p", PROVIDER, "--term-min", "600000", "--term-max", "518400"], 2, "below --term-min"),
        (["boost-ddo", out, "-p", PROVIDER, "--expiration", "999999"], 2, "--expiration 999999"),
        (["boost-offline", out, "-p", PROVIDER, "--duration", "0"], 2, "--duration 0"),
        (["graphsplit", out, "--url-base", "https://h"], 2, "--url-base does not apply to graphsplit"),
        (["boost-ddo", out, "-p", PROVIDER, "--no-verified"], 2, "does not apply to boost-ddo"),
        (["curio-urls", out, "--url-base", "https://h"], 2, "needs --url-base URL"),
        (curio + [str(not_json)], 2, "line 2: not JSON"),
        (curio + [str(boost_error)], 2, "a boost error, not a deal: deal proposal rejected"),
        (curio + [str(tmp_path / "absent.json")], 2, "no such file"),
        (curio + [str(good)], 2, f"no deal for {len(packed.current) - 1} of {len(packed.current)} bins: {missing}"),
        (curio + [str(mismatch)], 2, f"has the piece of {first['car_file']} but payloadCid"),
        (curio + [str(good), "-H", "NoColon"], 2, "write it as 'Name: value'"),
        (curio + [str(good), "-H", "Cookie: a=1, b=2"], 2, "comma"),
        (["curio-urls", out, "--url-base", "ftp://h", "--deals", str(good)], 2, "http:// or https://"),
        (["curio-urls", out, "--url-base", "https://h/?t=1", "--deals", str(good)], 2, "no commas, spaces, '?'"),
        (["singularity", out], 2, "needs --preparation"),
        (["boost-offline", out, "-p", PROVIDER, "--wallet", "0xabc"], 2, "not a Filecoin address"),
        (["graphsplit", out, "--url-path", "piece"], 2, "--url-path does not apply"),
        (["graphsplit"], 2, "give OUT"),
        (["graphsplit", str(no_manifest)], 2, "manifest.csv: not found"),
        (["graphsplit", str(bad_manifest)], 1, "no piece_size, payload_cid, car_size column"),
        (["graphsplit", "-t", str(tmp_path)], 1, "no packerfs index here"),
        (["graphsplit", out, "-o", str(tmp_path / "no" / "such" / "file")], 2, "no directory"),
        (["boost-ddo", "-t", state, "-p", PROVIDER, "-o", str(tmp_path)], 2, "is a directory"),
    ]


def test_errors_are_one_line(packed, tmp_path, capsys):
    for argv, code, message in error_cases(packed, tmp_path):
        assert run(["handoff", *argv]) == code, argv
        captured = capsys.readouterr()
        lines = captured.err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("packerfs: error: "), (argv, captured.err)
        assert message in lines[0], (argv, lines[0])
        assert captured.out == ""


def test_error_in_a_subprocess_has_no_traceback(packed):
    result = handoff("boost-ddo", packed.out, "-p", "f1abc", check=False)
    assert result.returncode == 2 and result.stdout == b""
    assert result.stderr.decode().splitlines() == [
        "packerfs: error: --provider 'f1abc': not a storage provider ID address; write it as f0 followed by "
        "digits (t0… on a testnet), e.g. f01234"
    ]
