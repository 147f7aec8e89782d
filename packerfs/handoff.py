"""Hand-off files for deal tools, from the same bin results as manifest.csv.

`packerfs handoff FORMAT` (packerfs.commands.handoff) turns the bins of a pack into what one deal tool
takes. Each format here is a pure function of the bins and that format's own terms, returning the text
to print or write; no argument parsing. The bins come from a state directory (bins_from_state) or from
a pack's output directory alone (bins_from_output, which reads OUT/manifest.csv).

The formats follow each tool's own source and documentation, read for this module (the function
docstrings say which command, flag and file; where a fact could not be confirmed they say so):

    boost-offline  `boost offline-deal` command lines (filecoin-project/boost, cmd/boost/deal_cmd.go)
    boost-ddo      the `boost allocate --piece-file` file (cmd/boost/direct_deal.go); Curio's client
                   `sptool toolbox mk12-client allocate --piece-file` documents the same format
    curio-urls     the `curio market add-url --file` file (filecoin-project/curio, cmd/curio/market.go)
    singularity    `singularity prep add-piece` command lines (data-preservation-programs/singularity)
    graphsplit     graphsplit's manifest.csv (filedrive-team/go-graphsplit), which SP scripts read

The raw CAR size always travels next to the padded piece size where the format has room for it
(boost-ddo has none: boost refuses a seventh column). padding_warnings() is the deal-size check: one line per current bin whose piece would be more
than half padding.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
import shlex
import tempfile
import uuid as uuidlib
from dataclasses import dataclass, field
from typing import Iterable

from packerfs.errors import FormatError, UsageError

FORMATS = {
    "boost-offline": "`boost offline-deal` command lines, one per bin and provider",
    "boost-ddo": "a `boost allocate --piece-file` file: pieceCid,pieceSize,miner,tmin,tmax,expiration",
    "curio-urls": "a `curio market add-url --file` file: uuid,raw size,url,header…",
    "singularity": "`singularity prep add-piece` command lines, one per bin",
    "graphsplit": "graphsplit's manifest.csv: payload_cid,filename,piece_cid,piece_size (unpadded),detail",
}

# Epochs are 30 s: 2880 a day (go-state-types builtin.EpochsInDay; EpochsInYear is 365 days).
EPOCHS_PER_DAY = 2880
# `boost offline-deal --duration` default (cmd/boost/deal_cmd.go: 518400, "2880 * 180 == 180 days").
BOOST_DEFAULT_DURATION = 180 * EPOCHS_PER_DAY
# Verified-registry limits, which `boost allocate` also uses as its flag defaults (go-state-types
# builtin/v13/verifreg: MinimumVerifiedAllocationTerm, MaximumVerifiedAllocationTerm,
# MaximumVerifiedAllocationExpiration). The expiration is an offset: boost adds the chain head.
DDO_TERM_MIN = 180 * EPOCHS_PER_DAY  # 518,400
DDO_TERM_MAX = 5 * 365 * EPOCHS_PER_DAY  # 5,256,000
DDO_EXPIRATION = 60 * EPOCHS_PER_DAY  # 172,800

MANIFEST_REQUIRED = ("car_file", "piece_cid", "piece_size", "payload_cid", "car_size")
_CAR_NAME = re.compile(r"[A-Za-z0-9._-]+")
_PROVIDER = re.compile(r"[ft]0[0-9]+")
_HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")  # an HTTP token (RFC 9110 tchar)


@dataclass(frozen=True)
class Bin:
    """One sealed bin as manifest.csv lists it."""

    car_file: str
    piece_cid: str
    piece_size: int  # padded
    payload_cid: str
    car_size: int  # raw: the CAR file's length
    piece_cid_v2: str = ""
    status: str = "current"

    @property
    def padding(self) -> float:
        """The share of the padded piece that is not CAR bytes."""
        return 1 - self.car_size / self.piece_size


# ---------------------------------------------------------------- reading the bins


def bins_from_state(state_dir: str) -> list[Bin]:
    """The bins of a state directory, through the rows manifest.csv is written from."""
    from packerfs.index import Index
    from packerfs.pack.writer import manifest_rows

    index = Index(state_dir, readonly=True)
    try:
        results = index.all_bins()
    finally:
        index.close()
    return [_bin_from_row(row, f"{state_dir}: bin {row.get('car_file')}") for row in manifest_rows(results)]


def bins_from_output(out_dir: str) -> list[Bin]:
    """The bins listed in OUT/manifest.csv, for a machine that has only the output of a pack."""
    if not os.path.isdir(out_dir):
        raise UsageError(f"{out_dir}: not a directory; OUT is the directory `packerfs pack` wrote")
    path = os.path.join(out_dir, "manifest.csv")
    try:
        with open(path, newline="", encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        raise UsageError(f"{path}: not found; OUT must be a directory `packerfs pack` wrote (or give -t STATE)") from None
    except UnicodeDecodeError:
        raise FormatError("not UTF-8 text: not a packerfs manifest", path=path) from None
    reader = csv.DictReader(io.StringIO(text))
    missing = [c for c in MANIFEST_REQUIRED if c not in (reader.fieldnames or ())]
    if missing:
        raise FormatError(f"no {', '.join(missing)} column: not a packerfs manifest.csv", path=path)
    try:
        return [_bin_from_row(row, f"{path}: line {reader.line_num}") for row in reader]
    except csv.Error as exc:
        raise FormatError(f"line {reader.line_num}: {exc}", path=path) from None


def _bin_from_row(row: dict, where: str) -> Bin:
    def number(key: str) -> int:
        value = row.get(key)
        try:
            n = int(value)
        except (TypeError, ValueError):
            raise FormatError(f"{where}: {key} {value!r} is not a number") from None
        if n <= 0:
            raise FormatError(f"{where}: {key} {n} is not positive")
        return n

    for key in MANIFEST_REQUIRED:
        if not str(row.get(key) or "").strip():
            raise FormatError(f"{where}: empty {key}")
    car_file = str(row["car_file"])
    if not _CAR_NAME.fullmatch(car_file):
        raise FormatError(f"{where}: car_file {car_file!r} is not a plain file name")
    piece_size = number("piece_size")
    if piece_size & (piece_size - 1) or piece_size < 128:
        raise FormatError(f"{where}: piece_size {piece_size} is not a padded piece size (a power of two)")
    car_size = number("car_size")
    for key in ("piece_cid", "payload_cid", "piece_cid_v2"):
        if not re.fullmatch(r"[A-Za-z0-9]*", str(row.get(key) or "")):
            raise FormatError(f"{where}: {key} {row.get(key)!r} is not a CID")
    return Bin(
        car_file=car_file,
        piece_cid=str(row["piece_cid"]),
        piece_size=piece_size,
        payload_cid=str(row["payload_cid"]),
        car_size=car_size,
        piece_cid_v2=str(row.get("piece_cid_v2") or ""),
        status=str(row.get("status") or "current"),
    )


def select(bins: Iterable[Bin], *, include_retired: bool = False) -> list[Bin]:
    """The bins deal tools should take: the current ones (all of them with include_retired)."""
    return [b for b in bins if include_retired or b.status == "current"]


# ---------------------------------------------------------------- deal-size sanity


def padding_warnings(bins: Iterable) -> list[str]:
    """One line per current bin whose piece would be more than half padding (car_size < piece_size/2).

    `bins` may hold Bin records, manifest rows (car_file, car_size, piece_size, status) or bin
    results as the index and Engine.bins() give them (bin, car_size, piece_size, status).
    Storage providers commonly refuse such pieces: they seal padding as if it were data.
    """
    lines = []
    for b in bins:
        if isinstance(b, Bin):
            name, car_size, piece_size, status = b.car_file, b.car_size, b.piece_size, b.status
        else:
            name = b.get("car_file")
            if name is None:
                from packerfs.pack.writer import car_name

                name = car_name(b["bin"])
            car_size, piece_size = int(b["car_size"]), int(b["piece_size"])
            status = b.get("status") or "current"
        if status != "current" or not piece_size or car_size * 2 >= piece_size:
            continue
        padding = 1 - car_size / piece_size
        lines.append(
            f"{name}: {car_size:,} bytes in a {piece_size:,}-byte piece, {padding:.1%} padding; storage "
            f"providers often reject pieces that are more than half padding"
        )
    return lines


# ---------------------------------------------------------------- checks of the options


def check_provider(text: str) -> str:
    """A storage provider's actor ID address: f0… (mainnet) or t0… (testnets)."""
    value = text.strip()
    if not _PROVIDER.fullmatch(value):
        raise UsageError(
            f"--provider {text!r}: not a storage provider ID address; write it as f0 followed by digits "
            f"(t0… on a testnet), e.g. f01234"
        )
    return value


def check_epochs(flag: str, value: int | None, *, minimum: int = 0) -> int | None:
    if value is not None and value < minimum:
        raise UsageError(f"{flag} {value}: must be at least {minimum} epochs")
    return value


def check_ddo_terms(term_min: int, term_max: int, expiration: int) -> tuple[int, int, int]:
    """The verified registry's bounds on an allocation (see DDO_* above); boost checks tmax >= tmin."""
    if term_min < DDO_TERM_MIN:
        raise UsageError(f"--term-min {term_min}: the verified registry needs at least {DDO_TERM_MIN} epochs (180 days)")
    if term_max > DDO_TERM_MAX:
        raise UsageError(f"--term-max {term_max}: the verified registry allows at most {DDO_TERM_MAX} epochs (5 years)")
    if term_max < term_min:
        raise UsageError(f"--term-max {term_max} is below --term-min {term_min}")
    if not 0 < expiration <= DDO_EXPIRATION:
        raise UsageError(
            f"--expiration {expiration}: must be 1 to {DDO_EXPIRATION} epochs (60 days) after the chain head"
        )
    return term_min, term_max, expiration


def check_header(text: str) -> str:
    """'Name: value' for a curio add-url row, where headers are split on ',' and then on the first ':'."""
    name, sep, value = text.partition(":")
    name, value = name.strip(), value.strip()
    if not sep or not _HEADER_NAME.fullmatch(name):
        raise UsageError(f"--header {text!r}: write it as 'Name: value', e.g. --header 'Authorization: Bearer TOKEN'")
    if "," in value or any(c in value for c in "\r\n\0"):
        raise UsageError(
            f"--header {name}: a value with a comma or a line break cannot be written: curio splits "
            f"the headers of an add-url row on commas"
        )
    return f"{name}: {value}"


def check_url_base(text: str) -> str:
    """An http(s) URL that the CAR file names are appended to; it becomes one field of a comma-split row."""
    value = text.strip()
    if not re.match(r"https?://[^/\s]", value):
        raise UsageError(f"--url-base {text!r}: give an http:// or https:// URL, e.g. https://cars.example.org/set1")
    if any(c in value for c in ",?#") or any(c.isspace() for c in value):
        raise UsageError(
            f"--url-base {text!r}: no commas, spaces, '?' or '#': the CAR name is appended to it and "
            f"curio splits rows on commas (put credentials in --header)"
        )
    return value.rstrip("/")


# ---------------------------------------------------------------- boost


@dataclass
class BoostTerms:
    """The deal terms `boost offline-deal` takes; None leaves boost's own default."""

    duration: int | None = None  # epochs; boost's default is 518400 (180 days)
    storage_price: int | None = None  # attoFIL per epoch per GiB; boost's default is 1
    verified: bool | None = None  # boost's default is true
    start_epoch: int | None = None  # boost's default is the chain head + 5760 (2 days)
    provider_collateral: int | None = None
    remove_unsealed_copy: bool = False
    skip_ipni_announce: bool = False
    wallet: str | None = None
    car_size_flag: bool = False  # also pass --car-size (older clients required it)
    json: bool = False  # `boost --json offline-deal`: the output is what --deals reads


def boost_offline(bins: list[Bin], providers: list[str], terms: BoostTerms) -> str:
    """`boost offline-deal` command lines, one per bin and provider, with the CAR named after '#'.

    Flags from filecoin-project/boost cmd/boost/deal_cmd.go (the boost v2 client): --provider,
    --commp, --piece-size, --payload-cid (required), --duration, --storage-price (attoFIL per epoch
    per GiB; v1 clients called it --storage-price-per-epoch and priced the whole piece),
    --verified (a bool flag, true unless --verified=false), --start-epoch, --provider-collateral,
    --remove-unsealed-copy, --skip-ipni-announce, --wallet; --json is a global flag, before the
    command. In that source --car-size belongs to the online `boost deal` only, so the raw CAR size
    rides in the trailing shell comment; terms.car_size_flag adds --car-size for the older (v1)
    clients that required it on offline deals too (which release dropped it is not confirmed here).
    """
    lines = []
    for b in bins:
        for provider in providers:
            words = ["boost"] + (["--json"] if terms.json else []) + [
                "offline-deal",
                "--provider", provider,
                "--commp", b.piece_cid,
                "--piece-size", str(b.piece_size),
                "--payload-cid", b.payload_cid,
            ]
            if terms.car_size_flag:
                words += ["--car-size", str(b.car_size)]
            if terms.duration is not None:
                words += ["--duration", str(terms.duration)]
            if terms.storage_price is not None:
                words += ["--storage-price", str(terms.storage_price)]
            if terms.verified is not None:
                words.append(f"--verified={'true' if terms.verified else 'false'}")
            if terms.start_epoch is not None:
                words += ["--start-epoch", str(terms.start_epoch)]
            if terms.provider_collateral is not None:
                words += ["--provider-collateral", str(terms.provider_collateral)]
            if terms.remove_unsealed_copy:
                words.append("--remove-unsealed-copy")
            if terms.skip_ipni_announce:
                words.append("--skip-ipni-announce")
            if terms.wallet:
                words += ["--wallet", terms.wallet]
            lines.append(f"{shlex.join(words)}  # {b.car_file} car-size {b.car_size}")
    return "".join(line + "\n" for line in lines)


def boost_ddo(bins: list[Bin], providers: list[str], term_min: int, term_max: int, expiration: int) -> str:
    """The `boost allocate --piece-file` file: 'pieceCid,pieceSize,miner,tmin,tmax,expiration' per line.

    From filecoin-project/boost cmd/boost/direct_deal.go: no header; each line is split on ',' into
    exactly six non-empty fields; pieceSize is the padded size, miner must be an ID address, tmin,
    tmax and expiration are epochs, tmax >= tmin, and expiration is added to the chain head. There
    is no column for the raw CAR size (boost refuses a seventh).
    """
    term_min, term_max, expiration = check_ddo_terms(term_min, term_max, expiration)
    lines = [
        f"{b.piece_cid},{b.piece_size},{provider},{term_min},{term_max},{expiration}"
        for b in bins
        for provider in providers
    ]
    return "".join(line + "\n" for line in lines)


# ---------------------------------------------------------------- curio


@dataclass(frozen=True)
class Deal:
    """One deal in the output of `boost --json offline-deal`."""

    uuid: str
    commp: str
    payload_cid: str
    provider: str
    where: str  # FILE line N, for messages


def read_deals(path: str) -> list[Deal]:
    """The deals in a file of `boost --json offline-deal` outputs, one JSON object per deal.

    boost prints each as an indented object (cmd.PrintJson: json.MarshalIndent), with the keys
    dealUuid, provider, clientWallet, payloadCid, commp, startEpoch, endEpoch, providerCollateral;
    so objects may span lines, or be one per line. A deal's uuid is what curio's add-url takes.
    """
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        raise UsageError(f"--deals {path}: no such file") from None
    except UnicodeDecodeError:
        raise UsageError(f"--deals {path}: not UTF-8 text; give the output of `boost --json offline-deal`") from None
    except OSError as exc:
        raise UsageError(f"--deals {path}: cannot read: {exc.strerror}") from None
    decoder = json.JSONDecoder()
    deals: dict[str, Deal] = {}
    pos = counted = 0
    line = 1
    while True:
        while pos < len(text) and text[pos].isspace():
            pos += 1
        if pos >= len(text):
            break
        line += text.count("\n", counted, pos)
        counted = pos
        where = f"{path} line {line}"
        try:
            obj, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as exc:
            raise UsageError(
                f"--deals {where}: not JSON ({exc.msg}); give the output of `boost --json offline-deal …`, "
                f"one object per deal"
            ) from None
        if not isinstance(obj, dict):
            raise UsageError(f"--deals {where}: a JSON {type(obj).__name__}, not a deal object")
        if "error" in obj and "dealUuid" not in obj:
            raise UsageError(f"--deals {where}: a boost error, not a deal: {str(obj['error'])[:200]}")
        raw = obj.get("dealUuid")
        try:
            deal_uuid = str(uuidlib.UUID(str(raw)))
        except ValueError:
            raise UsageError(f"--deals {where}: dealUuid {raw!r} is not a UUID") from None
        commp, payload = str(obj.get("commp") or ""), str(obj.get("payloadCid") or "")
        if not commp and not payload:
            raise UsageError(f"--deals {where}: deal {deal_uuid} names neither commp nor payloadCid")
        deal = Deal(deal_uuid, commp, payload, str(obj.get("provider") or ""), where)
        seen = deals.get(deal_uuid)
        if seen is not None and (seen.commp, seen.payload_cid) != (deal.commp, deal.payload_cid):
            raise UsageError(f"--deals {where}: deal {deal_uuid} is also in {seen.where}, for another piece")
        deals.setdefault(deal_uuid, deal)
    if not deals:
        raise UsageError(f"--deals {path}: no deals in it; give the output of `boost --json offline-deal …`")
    return list(deals.values())


@dataclass
class CurioRows:
    text: str
    unmatched: list[Deal] = field(default_factory=list)  # deals for no bin handed off (other sets, retired bins)


def curio_urls(
    bins: list[Bin], deals: list[Deal], url_base: str, headers: list[str], providers: list[str] | None = None,
    *, by_piece: bool = False,
) -> CurioRows:
    """The `curio market add-url --file` file: 'uuid,raw size,url,header1,header2…' per deal.

    From filecoin-project/curio cmd/curio/market.go and its CLI docs: no header line; each line is
    split on the first three commas (strings.SplitN(line, ",", 4)), so no field but the last may hold
    a comma; the rest is split on ',' into headers, each cut at its first ':' with spaces trimmed.
    The uuid is the deal's (boost offline-deal prints it), the raw size is the CAR's length. The
    curio versions read index parts[3] unconditionally, so a row without any header fails there
    (the command warns). The URL is url_base/<CAR file name> (a file server over OUT), or with
    by_piece url_base/piece/<piece CID> (FRC-0066, as `packerfs serve` answers).
    """
    url_base = check_url_base(url_base)
    headers = [check_header(h) for h in headers]
    if providers:
        deals = [d for d in deals if d.provider in providers]
    of_piece = {b.piece_cid: b for b in bins}
    of_payload = {b.payload_cid: b for b in bins}
    of_bin: dict[str, list[Deal]] = {}
    unmatched = []
    for d in deals:
        b = of_piece.get(d.commp) if d.commp else of_payload.get(d.payload_cid)
        if b is None:
            unmatched.append(d)
            continue
        if d.commp and d.payload_cid and d.payload_cid != b.payload_cid:
            raise UsageError(
                f"--deals {d.where}: deal {d.uuid} has the piece of {b.car_file} but payloadCid "
                f"{d.payload_cid}, not its {b.payload_cid}"
            )
        of_bin.setdefault(b.car_file, []).append(d)
    missing = [b.car_file for b in bins if b.car_file not in of_bin]
    if missing:
        shown = ", ".join(missing[:8]) + (f" and {len(missing) - 8} more" if len(missing) > 8 else "")
        scope = f" to {', '.join(providers)}" if providers else ""
        raise UsageError(
            f"--deals: no deal{scope} for {len(missing)} of {len(bins)} bins: {shown}; make their deals "
            f"(`packerfs handoff boost-offline --boost-json`) and add the output to the file"
        )
    rows = []
    for b in bins:
        for d in of_bin[b.car_file]:
            url = f"{url_base}/piece/{b.piece_cid}" if by_piece else f"{url_base}/{b.car_file}"
            rows.append(",".join([d.uuid, str(b.car_size), url, *headers]))
    return CurioRows("".join(row + "\n" for row in rows), unmatched)


# ---------------------------------------------------------------- singularity


def singularity(bins: list[Bin], preparation: str, file_base: str | None) -> str:
    """`singularity prep add-piece` command lines, one per bin.

    From data-preservation-programs/singularity docs/en/cli-reference/prep/add-piece.md and its
    handler: `singularity prep add-piece [options] <preparation id|name>` with --piece-cid (a commP,
    v1: the handler refuses other CID types), --piece-size (padded, a power of two; bytes parse in
    every version), --file-path, --root-cid and --file-size (the CAR's length; added in 2023 for boost
    online deals). With --root-cid and --file-size given, singularity reads nothing from --file-path.
    """
    if not preparation.strip():
        raise UsageError("--preparation: give the singularity preparation's id or name")
    lines = []
    for b in bins:
        words = ["singularity", "prep", "add-piece", "--piece-cid", b.piece_cid, "--piece-size", str(b.piece_size)]
        if file_base is not None:
            words += ["--file-path", os.path.join(file_base, b.car_file)]
        words += ["--root-cid", b.payload_cid, "--file-size", str(b.car_size), preparation]
        lines.append(shlex.join(words))
    return "".join(line + "\n" for line in lines)


# ---------------------------------------------------------------- graphsplit


GRAPHSPLIT_COLUMNS = ["payload_cid", "filename", "piece_cid", "piece_size", "detail"]


def graphsplit(bins: list[Bin]) -> str:
    """graphsplit's manifest.csv: 'payload_cid,filename,piece_cid,piece_size,detail' with a header.

    Columns as filedrive-team/go-graphsplit's README documents them for `graphsplit chunk
    --calc-commp=true`; its code writes the header as 'playload_cid,…', and SP scripts skip the
    header and take the columns by position. graphsplit's piece_size is the *unpadded* piece size
    (commp.go: CommPRet.Size is an abi.UnpaddedPieceSize, the padded size x 127/128; the README's
    example is 16646144), which those scripts pass to `lotus client deal --manual-piece-size`; so it
    is here too. graphsplit's detail is the slice's UnixFS tree as JSON, written unquoted; packerfs
    CARs are encrypted, so here detail is a JSON object with the raw CAR size, the padded piece size
    and the piece CID v2, quoted as RFC 4180 CSV so that csv readers see five fields.
    """
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(GRAPHSPLIT_COLUMNS)
    for b in bins:
        detail = {"car_size": b.car_size, "padded_piece_size": b.piece_size}
        if b.piece_cid_v2:
            detail["piece_cid_v2"] = b.piece_cid_v2
        writer.writerow(
            [b.payload_cid, b.car_file, b.piece_cid, b.piece_size // 128 * 127, json.dumps(detail, separators=(",", ":"))]
        )
    return buffer.getvalue()


# ---------------------------------------------------------------- writing


def check_output_path(path: str) -> str:
    """A file name -o can write: not a directory, in a directory that exists."""
    directory = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise UsageError(f"-o {path}: is a directory; give a file name")
    if not os.path.isdir(directory):
        raise UsageError(f"-o {path}: no directory {directory}")
    return directory


def write_atomic(path: str, text: str) -> None:
    """Write `text` to `path` through a temporary file in the same directory, then rename it."""
    directory = check_output_path(path)
    fd, temp = tempfile.mkstemp(dir=directory, prefix="." + os.path.basename(path) + ".", suffix=".partial")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as out:
            mask = os.umask(0)
            os.umask(mask)
            os.fchmod(out.fileno(), 0o666 & ~mask)  # mkstemp makes it 0600; give it a plain file's mode
            out.write(text)
            out.flush()
            os.fsync(out.fileno())
        os.replace(temp, path)
    except BaseException:
        try:
            os.unlink(temp)
        except OSError:
            pass
        raise


__all__ = [
    "FORMATS", "Bin", "BoostTerms", "CurioRows", "Deal",
    "bins_from_output", "bins_from_state", "boost_ddo", "boost_offline", "check_output_path", "check_provider",
    "curio_urls",
    "graphsplit", "padding_warnings", "read_deals", "select", "singularity", "write_atomic",
]
