"""``postcopy inspect``: decode recorded migration streams and print their structure.

The project's analyze-migration tool.  It reads a main channel, a preempt
channel and/or a return path (plain or .xz), or a whole capture directory
(``capture*/connN.{s2d,d2s}.bin[.xz]``), and prints commands in order (long
runs collapsed), sections, pages per block, discards, page requests and
bitmaps.  ``--json`` prints a stable JSON document to stdout.
"""

from __future__ import annotations

import argparse
import json
import lzma
import re
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from postcopy.cli import UserError
from postcopy.wire import (
    DEFAULT_MAX_PACKAGED_LENGTH,
    NEED_DATA,
    Command,
    ConnectionClosed,
    DeviceSection,
    EndOfStream,
    MainStreamDecoder,
    Packaged,
    PageRequest,
    Ping,
    PostcopyAdvise,
    PostcopyRamDiscard,
    PreemptDecoder,
    RamLayout,
    RamPages,
    RamSetup,
    RecvBitmap,
    RecvBitmapRequest,
    RemoteProtocolError,
    ReturnPathDecoder,
    RpMessage,
    SectionEnd,
    SectionPart,
    SectionStart,
    tally_pages,
)
from postcopy.wire import _events as ev

__all__ = ["add_arguments", "inspect_paths", "parse_size", "run"]

FORMAT = "postcopy-inspect/1"
KINDS = ("main", "recovery", "preempt", "return_path")
_COMMAND_EVENTS: dict[type, str] = {
    ev.OpenReturnPath: "OPEN_RETURN_PATH", ev.Ping: "PING", ev.PostcopyAdvise: "POSTCOPY_ADVISE",
    ev.PostcopyListen: "POSTCOPY_LISTEN", ev.PostcopyRun: "POSTCOPY_RUN",
    ev.PostcopyRamDiscard: "POSTCOPY_RAM_DISCARD", ev.Packaged: "PACKAGED", ev.EnableColo: "ENABLE_COLO",
    ev.PostcopyResume: "POSTCOPY_RESUME", ev.RecvBitmapRequest: "RECV_BITMAP",
    ev.SwitchoverStart: "SWITCHOVER_START",
}
_RP_EVENTS: dict[type, str] = {
    ev.Shut: "SHUT", ev.Pong: "PONG", ev.RecvBitmap: "RECV_BITMAP", ev.ResumeAck: "RESUME_ACK",
    ev.SwitchoverAck: "SWITCHOVER_ACK",
}


def parse_size(text: str) -> int:
    """``4096``, ``0x200000``, ``4K``, ``2M``, ``1G`` -> bytes."""
    m = re.fullmatch(r"\s*(0x[0-9a-fA-F]+|\d+)\s*([KkMmGg]?)i?[Bb]?\s*", text)
    if not m:
        raise UserError(f"cannot read size {text!r}: use e.g. 4096, 4K, 2M, 1G or 0x200000")
    value = int(m.group(1), 0)
    return value << {"": 0, "k": 10, "m": 20, "g": 30}[m.group(2).lower()]


def _block_page_sizes(items: Iterable[str]) -> dict[str, int]:
    out: dict[str, int] = {}
    for item in items:
        name, sep, size = item.rpartition("=")
        if not sep or not name:
            raise UserError(f"--block-page-size {item!r}: expected IDSTR=SIZE, e.g. mem0=2M")
        out[name] = parse_size(size)
    return out


def _read(path: Path) -> bytes:
    try:
        if path.suffix == ".xz":
            return lzma.open(path).read()
        return path.read_bytes()
    except (OSError, lzma.LZMAError) as exc:
        raise UserError(f"cannot read {path}: {exc}") from None


def _guess_kind(path: Path, data: bytes, in_resume_dir: bool = False) -> str:
    if ".d2s" in path.name:
        return "return_path"
    if data[:4] == b"QEVM":
        return "main"
    # A recovery main stream starts with a command; a preempt stream with a be64 offset.
    if data[:1] == b"\x08" or (in_resume_dir and not data):
        return "recovery" if data else "preempt"
    return "preempt"


class _StreamReport:
    """Collects what one decoded stream holds."""

    def __init__(self, path: str, kind: str, size: int) -> None:
        self.path, self.kind, self.size = path, kind, size
        self.counts: dict[str, int] = dict.fromkeys(
            [c.name for c in Command] if kind in ("main", "recovery") else
            [m.name for m in RpMessage] if kind == "return_path" else [], 0)
        self.sections: dict[str, int] = {}
        self.items: list[dict[str, Any]] = []
        self.pages: dict[str, dict[str, int]] = {}
        self.discards: list[dict[str, Any]] = []
        self.page_requests: list[dict[str, Any]] = []
        self.bitmaps: list[dict[str, Any]] = []
        self.end = "open"
        self.error: dict[str, Any] | None = None
        self.decoded = 0
        self.machine_type: str | None = None

    def item(self, offset: int, what: str, detail: str = "", **extra: Any) -> dict[str, Any]:
        last = self.items[-1] if self.items else None
        # Collapse runs: same kind of item with no detail of its own.
        if last is not None and last["what"] == what and not detail and not last["detail"]:
            last["count"] += 1
            for k, v in extra.items():
                last[k] = last.get(k, 0) + v
            return last
        entry = {"offset": offset, "what": what, "detail": detail, "count": 1, **extra}
        self.items.append(entry)
        return entry

    def as_json(self) -> dict[str, Any]:
        return {
            "path": self.path, "kind": self.kind, "bytes": self.size, "decoded_bytes": self.decoded,
            "end": self.end, "error": self.error, "machine_type": self.machine_type,
            "counts": self.counts, "sections": self.sections, "pages": self.pages,
            "discards": self.discards, "page_requests": self.page_requests, "bitmaps": self.bitmaps,
            "items": self.items,
        }


def _command_detail(e: ev.WireEvent) -> str:
    match e:
        case Ping(value=v):
            return str(v)
        case PostcopyAdvise(pagesize_summary=s, target_page_size=t):
            return "dirty bitmaps only" if s is None else f"pagesize_summary={s:#x} target_page_size={t:#x}"
        case PostcopyRamDiscard(idstr=i, ranges=r):
            return f"{i}: " + ", ".join(f"{s:#x}+{n:#x}" for s, n in r)
        case RecvBitmapRequest(idstr=i):
            return i
        case Packaged(events=inner):
            names: list[str] = []
            for x in inner:
                name = (f"{_COMMAND_EVENTS[type(x)]}" + (f" {x.value}" if isinstance(x, Ping) else "")
                        if type(x) in _COMMAND_EVENTS else "device" if isinstance(x, DeviceSection)
                        else type(x).__name__)
                if names and names[-1].startswith("device") and name == "device":
                    n = int(names[-1].split("×")[1]) if "×" in names[-1] else 1
                    names[-1] = f"device×{n + 1}"
                else:
                    names.append(name)
            return ", ".join(n.replace("device×", "") + " device sections" if n.startswith("device×")
                             else n for n in names)
    return ""


def _analyze(path: str, data: bytes, kind: str, *, layout: RamLayout | None,
             block_page_sizes: dict[str, int], max_packaged: int) -> tuple[_StreamReport, RamLayout | None]:
    rep = _StreamReport(path, kind, len(data))
    if kind in ("main", "recovery"):
        if kind == "recovery" and layout is None:
            raise UserError(f"{path}: a recovery stream has no RAM setup: pass --setup-from ORIGINAL_MAIN_STREAM")
        dec: Any = MainStreamDecoder(recovery=kind == "recovery", layout=layout,
                                     block_page_sizes=block_page_sizes, max_packaged_length=max_packaged)
    elif kind == "preempt":
        if layout is None:
            raise UserError(f"{path}: a preempt stream has no RAM setup: pass --setup-from MAIN_STREAM")
        dec = PreemptDecoder(layout=layout)
    else:
        dec = ReturnPathDecoder(layout=layout)
    if data:  # b"" would be the EOF itself (a preempt channel that stayed silent)
        dec.receive_data(data)
    dec.receive_data(b"")
    section: dict[str, Any] | None = None
    names: tuple[str, ...] = (layout and tuple(b.idstr for b in layout.blocks)) or ()
    loose: dict[str, Any] | None = None  # preempt: one entry for the page records
    try:
        while True:
            at = dec.offset
            e = dec.next_event()
            assert e is not NEED_DATA
            if isinstance(e, ConnectionClosed):
                rep.end = "eof" if (kind in ("main", "recovery") and e.complete) or kind not in (
                    "main", "recovery") else "closed"
                break
            t = type(e)
            if t in _COMMAND_EVENTS and kind != "return_path":
                name = _COMMAND_EVENTS[t]
                rep.counts[name] += 1
                rep.item(at, name, _command_detail(e))
                if isinstance(e, Packaged):
                    for x in e.events:
                        if type(x) in _COMMAND_EVENTS:
                            rep.counts[_COMMAND_EVENTS[type(x)]] += 1
                        elif isinstance(x, DeviceSection):
                            rep.sections["FULL"] = rep.sections.get("FULL", 0) + 1
                if isinstance(e, PostcopyRamDiscard):
                    rep.discards.extend({"block": e.idstr, "start": s, "length": n} for s, n in e.ranges)
            elif t in _RP_EVENTS:
                rep.counts[_RP_EVENTS[t]] += 1
                detail = ""
                if isinstance(e, RecvBitmap):
                    rep.bitmaps.append({"block": e.idstr, "bytes": len(e.bitmap),
                                        "received_pages": e.received_pages()})
                    detail = f"{e.idstr}: {len(e.bitmap)} bytes, {e.received_pages()} pages received"
                elif hasattr(e, "value"):
                    detail = str(e.value)
                rep.item(at, _RP_EVENTS[t], detail)
            elif isinstance(e, PageRequest):
                name = "REQ_PAGES_ID" if e.idstr is not None else "REQ_PAGES"
                rep.counts[name] += 1
                rep.page_requests.append({"id": e.idstr is not None, "block": e.idstr, "start": e.start,
                                          "length": e.length})
                rep.item(at, "REQ_PAGES*", "")
            elif isinstance(e, ev.StreamHeader):
                rep.item(at, "header", f"QEVM version {e.version}")
            elif isinstance(e, ev.Configuration):
                rep.machine_type = e.machine_type
                rep.item(at, "configuration", e.machine_type)
            elif isinstance(e, SectionStart):
                rep.sections["START"] = rep.sections.get("START", 0) + 1
                section = rep.item(at, f"SECTION_START {e.idstr}",
                                   f"section {e.section_id}, instance {e.instance_id}, version {e.version_id}")
            elif isinstance(e, RamSetup):
                section = None
                rep.item(at, "RAM setup", f"{len(e.blocks)} blocks, {e.total_bytes:#x} bytes: " + ", ".join(
                    f"{b.idstr} {b.used_length:#x}" + (f" (page size {b.page_size:#x})" if b.page_size else "")
                    for b in e.blocks))
                layout = dec.layout
                names = tuple(b.idstr for b in layout.blocks)
            elif isinstance(e, (SectionPart, SectionEnd)):
                label = "SECTION_PART" if isinstance(e, SectionPart) else "SECTION_END"
                rep.sections[label[8:]] = rep.sections.get(label[8:], 0) + 1
                section = rep.item(at, f"{label} ram", "", pages=0)
            elif isinstance(e, RamPages):
                counts = tally_pages(e.records, len(e.blocks))
                total = 0
                for name, (normal, zero) in zip(e.blocks, counts, strict=True):
                    if normal or zero:
                        p = rep.pages.setdefault(name, {"normal": 0, "zero": 0})
                        p["normal"] += normal
                        p["zero"] += zero
                        total += normal + zero
                target = section if kind != "preempt" else loose
                if target is None:
                    target = loose = rep.item(at, "page records", "", pages=0)
                target["pages"] = target.get("pages", 0) + total
            elif isinstance(e, DeviceSection):
                rep.sections["FULL"] = rep.sections.get("FULL", 0) + 1
                rep.item(at, "SECTION_FULL", "")
            elif isinstance(e, EndOfStream):
                rep.item(at, "EOF")
            elif isinstance(e, ev.RamEos) and kind == "preempt":
                rep.item(at, "EOS")
                loose = None
            elif isinstance(e, ev.VmDescription):
                rep.item(at, "VMDESCRIPTION", f"{len(e.json)} bytes")
    except RemoteProtocolError as exc:
        rep.end = "truncated" if exc.kind == "truncated" else "error"
        rep.error = {"kind": exc.kind, "offset": exc.offset, "message": str(exc)}
    rep.decoded = dec.offset
    if kind in ("main",) and getattr(dec, "layout", None) is not None:
        layout = dec.layout
    del names
    return rep, layout


def _discover(directory: Path) -> list[tuple[Path, bool]]:
    """Connection files under a capture directory, originals before the resumed ones."""
    found: list[tuple[Path, bool]] = []
    dirs = [directory, *sorted(p for p in directory.iterdir() if p.is_dir() and p.name.startswith("capture"))]
    for d in dirs:
        found.extend((f, "resume" in d.name) for f in sorted(d.iterdir())
                     if re.fullmatch(r"conn\d+\.(s2d|d2s)\.bin(\.xz)?", f.name))
    return found


def _index_kinds(folder: Path, in_resume_dir: bool) -> dict[str, str]:
    """Stream kinds of a capture folder's connections from its ``index.jsonl[.xz]``.

    QEMU tells its channels apart by connection order only
    (``migration_ioc_process_incoming``): the first connection opened is the
    main channel (a recovery stream in a resumed capture), any later one the
    preempt channel, which carries no magic.  The proxy's index records the
    order (``{"conn": N, "ev": "open"}``).  Reverse directions are return paths.
    """
    index = next((folder / n for n in ("index.jsonl.xz", "index.jsonl") if (folder / n).exists()), None)
    if index is None:
        return {}
    try:
        text = _read(index).decode() if index.suffix == ".xz" else index.read_text()
    except (OSError, lzma.LZMAError, UnicodeDecodeError) as exc:
        raise UserError(f"cannot read {index}: {exc}") from None
    opened: list[int] = []
    for line in text.splitlines():
        if '"open"' not in line:
            continue
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as exc:
            raise UserError(f"{index}: bad line {line[:80]!r}: {exc}") from None
        if entry.get("ev") == "open" and entry.get("conn") not in opened:
            opened.append(int(entry["conn"]))
    kinds: dict[str, str] = {}
    for rank, conn in enumerate(opened):
        main = "recovery" if in_resume_dir else "main"
        kinds[f"conn{conn}.s2d"] = main if rank == 0 else "preempt"
        kinds[f"conn{conn}.d2s"] = "return_path"
    return kinds


def _kind_of(path: Path, data: bytes, in_resume_dir: bool, cache: dict[Path, dict[str, str]]) -> str:
    folder = path.parent
    if folder not in cache:
        cache[folder] = _index_kinds(folder, in_resume_dir)
    by_index = cache[folder].get(path.name.split(".bin")[0])
    if by_index == "recovery" and data[:4] == b"QEVM":
        by_index = "main"  # a start-over after a failed recovery is a fresh stream
    return by_index or _guess_kind(path, data, in_resume_dir)


def inspect_paths(paths: list[Path], *, kind: str = "auto", block_page_sizes: dict[str, int] | None = None,
                  setup_from: Path | None = None,
                  max_packaged: int = DEFAULT_MAX_PACKAGED_LENGTH) -> dict[str, Any]:
    """Decode every stream and return the JSON-ready report."""
    bps = dict(block_page_sizes or {})
    layout: RamLayout | None = None
    if setup_from is not None:
        _, layout = _analyze(str(setup_from), _read(setup_from), "main", layout=None,
                             block_page_sizes=bps, max_packaged=max_packaged)
    files: list[tuple[Path, bool]] = []
    for p in paths:
        if p.is_dir():
            found = _discover(p)
            if not found:
                raise UserError(f"{p}: no connN.s2d/d2s.bin[.xz] files in it or in its capture*/ folders")
            files.extend(found)
        elif p.exists():
            files.append((p, "resume" in p.parent.name))
        else:
            raise UserError(f"{p}: no such file or directory")
    # Main streams first (they define the RAM layout), then the rest, in path order.
    loaded = [(f, r, _read(f)) for f, r in files]
    index_cache: dict[Path, dict[str, str]] = {}
    kinds = [kind if kind != "auto" else _kind_of(f, d, r, index_cache) for f, r, d in loaded]
    order = sorted(range(len(loaded)), key=lambda i: (loaded[i][1], kinds[i] not in ("main", "recovery"), i))
    reports: list[_StreamReport] = []
    for i in order:
        f, _, data = loaded[i]
        if ".d2s" in f.name and not data and kinds[i] == "return_path":
            # e.g. the preempt connection's reverse direction: nothing to decode
            rep = _StreamReport(str(f), "return_path", 0)
            rep.end = "eof"
            reports.append(rep)
            continue
        rep, new_layout = _analyze(str(f), data, kinds[i], layout=layout, block_page_sizes=bps,
                                   max_packaged=max_packaged)
        layout = new_layout or layout
        reports.append(rep)
    return _summary(reports)


def _summary(reports: list[_StreamReport]) -> dict[str, Any]:
    commands = dict.fromkeys((c.name for c in Command), 0)
    rp = dict.fromkeys((m.name for m in RpMessage), 0)
    pages: dict[str, dict[str, int]] = {}
    for r in reports:
        target = rp if r.kind == "return_path" else commands
        for k, v in r.counts.items():
            target[k] = target.get(k, 0) + v
        for b, c in r.pages.items():
            p = pages.setdefault(b, {"normal": 0, "zero": 0})
            p["normal"] += c["normal"]
            p["zero"] += c["zero"]
    # One flat object with the spec's names: return-path names win where both
    # directions share a name (RECV_BITMAP); the command is also CMD_RECV_BITMAP.
    counts = {**commands, **rp, "CMD_RECV_BITMAP": commands["RECV_BITMAP"]}
    return {"format": FORMAT, "counts": counts, "command_counts": commands, "return_path_counts": rp,
            "pages": pages, "streams": [r.as_json() for r in reports]}


def _human(report: dict[str, Any], out: Any) -> None:
    for s in report["streams"]:
        state = {"eof": "complete", "closed": "closed before its EOF", "truncated": "cut mid-item",
                 "error": "PROTOCOL ERROR", "open": "?"}[s["end"]]
        print(f"{s['path']}", file=out)
        print(f"  {s['kind'].replace('_', ' ')}: {s['bytes']:,} bytes, {s['decoded_bytes']:,} decoded, {state}",
              file=out)
        for it in s["items"]:
            count = f" ×{it['count']}" if it["count"] > 1 else ""
            pages = f" ({it['pages']:,} pages)" if it.get("pages") else ""
            detail = f"  {it['detail']}" if it["detail"] else ""
            print(f"  @{it['offset']:<10} {it['what']}{count}{pages}{detail}", file=out)
        if s["error"]:
            print(f"  error [{s['error']['kind']}]: {s['error']['message']}", file=out)
        if s["pages"]:
            width = max(len(b) for b in s["pages"])
            print(f"  {'block':<{width}}  {'normal':>8}  {'zero':>8}", file=out)
            for b, c in s["pages"].items():
                print(f"  {b:<{width}}  {c['normal']:>8,}  {c['zero']:>8,}", file=out)
        if s["page_requests"]:
            ids = sum(1 for r in s["page_requests"] if r["id"])
            print(f"  page requests: {len(s['page_requests'])} ({ids} with idstr)", file=out)
        print(file=out)
    nonzero = {k: v for k, v in report["command_counts"].items() if v}
    rp = {k: v for k, v in report["return_path_counts"].items() if v}
    print("commands: " + (", ".join(f"{k} {v}" for k, v in nonzero.items()) or "none"), file=out)
    print("return path: " + (", ".join(f"{k} {v}" for k, v in rp.items()) or "none"), file=out)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("paths", nargs="+", type=Path, metavar="PATH",
                        help="stream files (.bin or .bin.xz) or capture directories")
    parser.add_argument("--json", action="store_true", help="print a JSON document to stdout")
    parser.add_argument("--kind", choices=("auto", *KINDS), default="auto",
                        help="stream kind of the files (default: guess from name and first bytes)")
    parser.add_argument("--block-page-size", action="append", default=[], metavar="IDSTR=SIZE",
                        help="host page size of a huge-page backed block, e.g. mem0=2M (repeatable); not "
                             "needed (the RAM setup says it), given only to check the stream against it")
    parser.add_argument("--setup-from", type=Path, metavar="MAIN_STREAM",
                        help="main stream whose RAM setup a recovery or preempt stream refers to")
    parser.add_argument("--max-packaged-length", type=parse_size, default=DEFAULT_MAX_PACKAGED_LENGTH,
                        metavar="SIZE", help="largest PACKAGED blob accepted (default 256M)")


def run(args: argparse.Namespace) -> int:
    report = inspect_paths(list(args.paths), kind=args.kind,
                           block_page_sizes=_block_page_sizes(args.block_page_size),
                           setup_from=args.setup_from, max_packaged=args.max_packaged_length)
    if args.json:
        json.dump(report, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        _human(report, sys.stdout)
    return 1 if any(s["end"] == "error" for s in report["streams"]) else 0
