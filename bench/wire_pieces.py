"""Decode cost of input that arrives in small pieces (issue 14: no quadratic re-parsing).

    python3 bench/wire_pieces.py            # every case
    python3 bench/wire_pieces.py --quick    # smaller sizes

Cases: one large device section, a RAM setup of many blocks, and the recorded
QEMU 7.2 main streams, each fed in small pieces; for every case the time per
MB at two sizes shows whether the cost grows linearly (same time per MB) or
quadratically (time per MB doubling with the size).
"""

from __future__ import annotations

import argparse
import lzma
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from postcopy.wire import ConnectionClosed, MainStreamDecoder, NeedData, encode  # noqa: E402
from postcopy.wire import _events as ev  # noqa: E402

CAPTURES = ROOT / "tests" / "data" / "qemu-7.2"


def device_stream(payload_len: int) -> bytes:
    payload = bytes(range(256)) * (payload_len // 256)
    return b"".join(encode(e) for e in (
        ev.StreamHeader(version=3),
        ev.Configuration(machine_type="pc-q35-7.2"),
        ev.DeviceSection(section_id=5, idstr="dev", instance_id=0, version_id=1, payload=payload),
        ev.EndOfStream(),
    ))


def setup_stream(blocks: int) -> bytes:
    entries = tuple(ev.RamBlockEntry(idstr=f"b{i}", used_length=4096, page_size=None) for i in range(blocks))
    return b"".join(encode(e) for e in (
        ev.StreamHeader(version=3),
        ev.Configuration(machine_type="pc-q35-7.2"),
        ev.SectionStart(section_id=2, idstr="ram", instance_id=0, version_id=4),
        ev.RamSetup(total_bytes=4096 * blocks, blocks=entries),
        ev.RamEos(),
        ev.SectionFooter(section_id=2),
        ev.EndOfStream(),
    ))


def feed(data: bytes, piece: int) -> tuple[int, float]:
    dec = MainStreamDecoder()
    n = 0
    t = time.perf_counter()
    for i in range(0, len(data), piece):
        dec.receive_data(data[i : i + piece])
        while not isinstance(dec.next_event(), NeedData):
            n += 1
    dec.receive_data(b"")
    while not isinstance(dec.next_event(), ConnectionClosed):
        n += 1
    return n, time.perf_counter() - t


def report(name: str, data: bytes, piece: int) -> None:
    n, dt = feed(data, piece)
    mb = len(data) / 1e6
    print(f"  {name:<44} {mb:8.2f} MB in {piece:>5} B pieces: {dt:8.3f} s = {dt / mb:8.3f} s/MB ({n} events)")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--piece", type=int, default=64)
    a = ap.parse_args()
    k = 1 if a.quick else 4
    for size in (256 * 1024 * k, 512 * 1024 * k):
        report(f"device section of {size // 1024} KiB", device_stream(size), a.piece)
    for blocks in (100 * k, 200 * k):
        report(f"RAM setup of {blocks} blocks", setup_stream(blocks), 1)
    data = lzma.decompress((CAPTURES / "64M-postcopy-immediate" / "capture" / "conn0.s2d.bin.xz").read_bytes())
    for piece in (1400, 4096):
        report("capture 64M-postcopy-immediate", data, piece)


if __name__ == "__main__":
    main()
