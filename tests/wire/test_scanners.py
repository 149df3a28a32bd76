"""The codec is sans-IO: importing it loads no compiled code, and the pure-Python
record scanner decodes and encodes the real QEMU captures exactly as the C one does."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest

from postcopy.wire import (
    PYTHON_SCANNER,
    ConnectionClosed,
    LocalProtocolError,
    MainStreamDecoder,
    NeedData,
    PreemptDecoder,
    RamLayout,
    RamPages,
    RecordScanner,
    WireEvent,
    c_scanner,
    default_scanner,
    encode,
    tally_pages,
)
from postcopy.wire._events import REC_PAGE, REC_ZERO

ROOT = Path(__file__).resolve().parents[2]
MAIN = [
    "64M-postcopy-immediate/capture/conn0.s2d.bin.xz",
    "64M-precopy1s-then-postcopy/capture/conn0.s2d.bin.xz",
    "64M-postcopy-preempt-cap16M/capture/conn0.s2d.bin.xz",
    "64M-postcopy-recover-pause-cap16M/capture/conn0.s2d.bin.xz",
]
RESUME = "64M-postcopy-recover-pause-cap16M/capture-resume/conn0.s2d.bin.xz"
PREEMPT = "64M-postcopy-preempt-cap16M/capture/conn1.s2d.bin.xz"
CHUNK = 100_003  # records straddle chunk ends, so both scanners resume mid-record


def _python(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_importing_the_codec_loads_no_compiled_code() -> None:
    proc = _python("""
        import sys
        import postcopy.wire
        loaded = sorted(m for m in sys.modules if m == "uffd" or m.startswith(("uffd.", "_cffi")))
        print(loaded)
        assert "uffd._native" not in sys.modules, loaded
        assert not loaded, loaded
    """)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


def test_the_codec_works_without_the_compiled_core(captures_dir: Path) -> None:
    proc = _python(f"""
        import lzma, sys
        sys.modules["uffd"] = None  # as if the C core were not built: importing it fails
        from postcopy.wire import PYTHON_SCANNER, ConnectionClosed, MainStreamDecoder, default_scanner, encode
        assert default_scanner() is PYTHON_SCANNER
        data = lzma.open({str(captures_dir / MAIN[2])!r}).read()
        dec = MainStreamDecoder()
        dec.receive_data(data)
        dec.receive_data(b"")
        events = dec.events()
        assert events[-1] == ConnectionClosed(complete=True), events[-1]
        assert b"".join(encode(e) for e in events) == data
        print(len(events))
    """)
    assert proc.returncode == 0, proc.stderr
    assert int(proc.stdout) > 100


def test_default_scanner_is_the_c_one_when_it_is_built() -> None:
    assert default_scanner() is c_scanner()
    assert c_scanner().name == "c"
    assert PYTHON_SCANNER.name == "python"


def _decode(decoder: MainStreamDecoder | PreemptDecoder, data: bytes) -> list[WireEvent]:
    events: list[WireEvent] = []
    for i in range(0, len(data), CHUNK):
        decoder.receive_data(data[i : i + CHUNK])
        while not isinstance(e := decoder.next_event(), NeedData):
            events.append(e)
    decoder.receive_data(b"")
    events.extend(decoder.events())
    assert isinstance(events[-1], ConnectionClosed)
    assert decoder.offset == len(data)
    return events


def _both(
    make: Callable[[RecordScanner], MainStreamDecoder | PreemptDecoder], data: bytes
) -> list[WireEvent]:
    """Decode with both scanners; they must give identical events (RamPages compare their bytes)."""
    c_events = _decode(make(c_scanner()), data)
    py_events = _decode(make(PYTHON_SCANNER), data)
    assert len(py_events) == len(c_events)
    for i, (py, c) in enumerate(zip(py_events, c_events, strict=True)):
        assert py == c, f"event {i}: {py!r} != {c!r}"
    pages = [e for e in c_events if isinstance(e, RamPages)]
    assert pages, "no page records: the comparison would prove nothing"
    for e in pages:
        assert tally_pages(e.records, len(e.blocks), scanner=PYTHON_SCANNER) == tally_pages(
            e.records, len(e.blocks), scanner=c_scanner()
        )
        assert encode(e, scanner=PYTHON_SCANNER) == encode(e, scanner=c_scanner())
    assert b"".join(encode(e, scanner=PYTHON_SCANNER) for e in py_events) == data
    return c_events


def _layout(load_capture: Callable[[str], bytes], rel: str) -> RamLayout:
    dec = MainStreamDecoder()
    _decode(dec, load_capture(rel))
    assert dec.layout is not None
    return dec.layout


@pytest.mark.parametrize("rel", MAIN)
def test_python_and_c_scanners_decode_main_streams_identically(
    load_capture: Callable[[str], bytes], rel: str
) -> None:
    _both(lambda s: MainStreamDecoder(scanner=s), load_capture(rel))


def test_python_and_c_scanners_decode_recovery_and_preempt_identically(
    load_capture: Callable[[str], bytes],
) -> None:
    layout = _layout(load_capture, MAIN[3])
    _both(
        lambda s: MainStreamDecoder(recovery=True, layout=layout, scanner=s), load_capture(RESUME)
    )
    layout = _layout(load_capture, MAIN[2])
    _both(lambda s: PreemptDecoder(layout=layout, scanner=s), load_capture(PREEMPT))


def test_per_record_view_agrees_with_the_packed_records(
    load_capture: Callable[[str], bytes],
) -> None:
    """``RamPages.iter_records`` / ``page_data``: the slow per-record view of the same records."""
    data = load_capture(MAIN[0])
    pages = [e for e in _decode(MainStreamDecoder(), data) if isinstance(e, RamPages)]
    seen_zero = seen_page = False
    for e in pages[:20]:
        records = list(e.iter_records())
        assert len(records) == len(e)
        normal = sum(1 for r in records if r.kind == REC_PAGE)
        zero = sum(1 for r in records if r.kind == REC_ZERO)
        assert tally_pages(e.records, len(e.blocks))[0] == (normal, zero)
        for i, r in enumerate(records):
            assert r.offset % e.target_page_size == 0
            if r.kind == REC_PAGE:
                seen_page = True
                assert len(e.page_data(i)) == e.target_page_size
                assert bytes(e.page_data(i)) == bytes(
                    e.buffer[r.data_pos : r.data_pos + e.target_page_size]
                )
            else:
                seen_zero = True
                with pytest.raises(LocalProtocolError, match="ZERO record"):
                    e.page_data(i)
    assert seen_zero
    assert seen_page
