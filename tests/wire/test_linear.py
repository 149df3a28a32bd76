"""Input that arrives in small pieces costs time linear in its size (issue 14).

The work is counted, not timed: ``ReceiveBuffer.copied`` counts every byte the
receive buffer and the item copies copy, and RAM setup entries are counted as
they are built.  The quadratic versions copied the whole section so far on
every short read (a 1 MiB section in 64-byte pieces: ~8 GB) and re-parsed the
RAM setup from its first block after every short read.
"""

from __future__ import annotations

from collections.abc import Iterable

import pytest

from postcopy.wire import ConnectionClosed, MainStreamDecoder, NeedData, encode
from postcopy.wire import _events as ev

HEADER = (ev.StreamHeader(version=3), ev.Configuration(machine_type="pc-q35-7.2"))


def _stream(*events: ev.WireEvent) -> bytes:
    return b"".join(encode(e) for e in (*HEADER, *events, ev.EndOfStream()))


def _feed(data: bytes, piece: int, **kw: object) -> tuple[list[bytes], MainStreamDecoder]:
    """The wire form of every event decoded from ``data`` fed in ``piece``-byte pieces."""
    dec = MainStreamDecoder(**kw)  # type: ignore[arg-type]
    out: list[bytes] = []

    def drain() -> None:
        while not isinstance(e := dec.next_event(), NeedData):
            out.append(type(e).__name__.encode() + b":" + (b"" if isinstance(e, ConnectionClosed) else encode(e)))
            if isinstance(e, ConnectionClosed):
                return

    for i in range(0, len(data), piece):
        dec.receive_data(data[i : i + piece])
        drain()
    dec.receive_data(b"")
    drain()
    return out, dec


def _device(n: int) -> ev.DeviceSection:
    # the payload holds footer look-alikes (7e + section id) that are not followed by a valid item
    chunk = bytes(range(256)) + b"\x7e\x00\x00\x00\x05\xff"
    return ev.DeviceSection(section_id=5, idstr="dev", instance_id=0, version_id=1,
                            payload=(chunk * (n // len(chunk) + 1))[:n])


@pytest.mark.parametrize("piece", [1, 7, 64])
def test_device_section_in_small_pieces_decodes_as_whole(piece: int) -> None:
    data = _stream(_device(48 * 1024), ev.Ping(value=1), _device(3000))
    whole, _ = _feed(data, len(data))
    assert _feed(data, piece)[0] == whole
    assert b"DeviceSection" in whole[2]
    assert b"Ping" in whole[3]


def test_device_section_in_small_pieces_is_copied_a_bounded_number_of_times() -> None:
    size = 1024 * 1024
    data = _stream(_device(size))
    events, dec = _feed(data, 64)
    assert len(events[2]) > size
    # each byte: into the tail, sealed, into the section copy, into the payload (quadratic: ~8 GB)
    assert dec._buf.copied < 4 * len(data), dec._buf.copied


def test_device_section_fed_whole_is_not_copied_up_to_the_limit() -> None:
    # many small sections in one large read: each is copied about once, not the whole buffer each
    data = _stream(*[_device(100) for _ in range(2000)])
    events, dec = _feed(data, len(data))
    assert len(events) == 2 + 2000 + 2
    assert dec._buf.copied < 2 * len(data) + 2000 * 4096, dec._buf.copied


def _setup(blocks: int, *, page_sizes: bool) -> tuple[ev.WireEvent, ...]:
    entries = tuple(ev.RamBlockEntry(idstr=f"block{i}", used_length=2 << 20,
                                     page_size=(2 << 20) if page_sizes and i % 3 == 0 else None)
                    for i in range(blocks))
    return (
        ev.SectionStart(section_id=2, idstr="ram", instance_id=0, version_id=4),
        ev.RamSetup(total_bytes=(2 << 20) * blocks, blocks=entries),
        ev.RamEos(),
        ev.SectionFooter(section_id=2),
    )


@pytest.mark.python_source     # counts RamBlockEntry's calls through the module attribute
@pytest.mark.parametrize("page_sizes", [False, True])
def test_ram_setup_byte_at_a_time_decodes_as_whole_and_parses_each_block_once(
    monkeypatch: pytest.MonkeyPatch, page_sizes: bool
) -> None:
    blocks = 300
    advise = (ev.PostcopyAdvise(pagesize_summary=(2 << 20) | 4096, target_page_size=4096),) if page_sizes else ()
    data = _stream(*advise, *_setup(blocks, page_sizes=page_sizes))
    whole, _ = _feed(data, len(data))
    built = 0
    real = ev.RamBlockEntry

    def counting(**kw: object) -> ev.RamBlockEntry:
        nonlocal built
        built += 1
        return real(**kw)  # type: ignore[arg-type]

    monkeypatch.setattr(ev, "RamBlockEntry", counting)
    pieces, dec = _feed(data, 1)
    assert pieces == whole
    assert built == blocks  # quadratic version: a re-parse from the first block per short read
    assert dec._buf.copied < 4 * len(data), dec._buf.copied


def test_capability_list_byte_at_a_time_decodes_as_whole() -> None:
    caps = tuple(f"cap{i}" for i in range(200))
    data = b"".join(encode(e) for e in (ev.StreamHeader(version=3),
                                        ev.Configuration(machine_type="pc", capabilities=caps),
                                        ev.EndOfStream()))
    whole, _ = _feed(data, len(data))
    assert _feed(data, 1)[0] == whole
    assert b"cap199" in whole[1]


def _capture_pieces(data: bytes, sizes: Iterable[int]) -> list[bytes]:
    out, i = [], 0
    for n in sizes:
        if i >= len(data):
            break
        out.append(data[i : i + n])
        i += n
    if i < len(data):
        out.append(data[i:])
    return out


@pytest.mark.parametrize("piece", [1400, 4096, 65537])
def test_capture_in_small_pieces_is_copied_a_bounded_number_of_times(load_capture, piece: int) -> None:
    data = load_capture("64M-postcopy-immediate/capture/conn0.s2d.bin.xz")[: 24 << 20]
    dec = MainStreamDecoder()
    n = 0
    for p in _capture_pieces(data, iter(lambda: piece, None)):
        dec.receive_data(p)
        while not isinstance(dec.next_event(), NeedData):
            n += 1
    assert n > 100
    assert dec.offset + dec.buffered == len(data)
    assert dec._buf.copied < 4 * len(data), dec._buf.copied


def test_short_read_of_a_large_item_is_not_retried_byte_by_byte() -> None:
    # a PACKAGED blob: the decoder learns its length once, then waits for all of it
    data = _stream(ev.Packaged(events=tuple(ev.Ping(value=i) for i in range(20000))))
    assert len(data) > 100_000
    events, dec = _feed(data, 1)
    assert any(e.startswith(b"Packaged") for e in events)
    assert dec._buf.copied < 4 * len(data), dec._buf.copied
