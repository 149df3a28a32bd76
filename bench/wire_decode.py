"""Decode speed of the wire codec over the recorded QEMU 7.2 main streams, per record scanner.

    python3 bench/wire_decode.py                 # C and Python scanners
    python3 bench/wire_decode.py --scanner c --repeat 15

Each repeat decodes the four main streams (236 MB of page records and
sections), fed in 256 KiB chunks as a socket reader would; it prints the
median and best time and the best rate.
"""

from __future__ import annotations

import argparse
import lzma
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from postcopy.wire import (  # noqa: E402
    PYTHON_SCANNER,
    ConnectionClosed,
    MainStreamDecoder,
    NeedData,
    RecordScanner,
    c_scanner,
)

CAPTURES = ROOT / "tests" / "data" / "qemu-7.2"
MAIN_STREAMS = (
    "64M-postcopy-immediate",
    "64M-precopy1s-then-postcopy",
    "64M-postcopy-preempt-cap16M",
    "64M-postcopy-recover-pause-cap16M",
)
CHUNK = 256 * 1024


def decode(data: bytes, scanner: RecordScanner) -> int:
    """Events decoded from ``data``, fed in CHUNK-sized pieces."""
    dec = MainStreamDecoder(scanner=scanner)
    n = 0
    view = memoryview(data)
    for i in range(0, len(data), CHUNK):
        dec.receive_data(bytes(view[i : i + CHUNK]))
        while not isinstance(dec.next_event(), NeedData):
            n += 1
    dec.receive_data(b"")
    while not isinstance(dec.next_event(), ConnectionClosed):
        n += 1
    return n


def measure(streams: list[bytes], scanner: RecordScanner, repeat: int) -> list[float]:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        for data in streams:
            decode(data, scanner)
        times.append(time.perf_counter() - t)
    return times


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--scanner", choices=("c", "python", "both"), default="both")
    ap.add_argument(
        "--repeat", type=int, default=9, help="repeats for the C scanner (Python: a third)"
    )
    args = ap.parse_args(argv)
    streams = [
        lzma.decompress((CAPTURES / name / "capture" / "conn0.s2d.bin.xz").read_bytes())
        for name in MAIN_STREAMS
    ]
    total = sum(len(s) for s in streams)
    chosen: list[tuple[RecordScanner, int]] = []
    if args.scanner in ("c", "both"):
        chosen.append((c_scanner(), args.repeat))
    if args.scanner in ("python", "both"):
        chosen.append((PYTHON_SCANNER, max(1, args.repeat // 3)))
    print(
        f"{len(streams)} QEMU 7.2 main streams, {total / 1e6:.1f} MB, fed in {CHUNK // 1024} KiB chunks"
    )
    for scanner, repeat in chosen:
        times = measure(streams, scanner, repeat)
        print(
            f"  {scanner.name:>6} scanner: median {statistics.median(times) * 1e3:8.1f} ms, "
            f"best {min(times) * 1e3:8.1f} ms = {total / min(times) / 1e9:6.2f} GB/s  ({repeat} runs)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
