"""Streams of QEMU versions newer than 7.2, built from the protocol spec (no such QEMU runs here).

Each item below is what a newer source sends (QEMU function in brackets):
SWITCHOVER_START (10.0+, ``qemu_savevm_maybe_send_switchover_start``), an
empty SECTION_PART "ram" before it (10.1+, ``save_postcopy_prepare``), FULL
sections of early_setup devices before the RAM setup (8.0+), PING 0x42 inside
PACKAGED before RUN (10.2+, ``postcopy_start``), no EOS on the preempt channel
(8.0+ machine types, ``migration_completion_postcopy``), SWITCHOVER_ACK on the
return path (8.1+, ``migrate_send_rp_switchover_ack``), and RAM setups whose
page-size fields must be found without hints (``ram_save_setup``).
"""

from __future__ import annotations

import struct

import pytest

from postcopy.wire import (
    NEED_DATA,
    ChannelKind,
    Command,
    Configuration,
    ConnectionClosed,
    DeviceSection,
    EndOfStream,
    LocalProtocolError,
    MainStreamDecoder,
    OpenReturnPath,
    Packaged,
    PageRequest,
    PeerProfile,
    Ping,
    Pong,
    PostcopyAdvise,
    PostcopyListen,
    PostcopyRamDiscard,
    PostcopyResume,
    PostcopyRun,
    PreemptDecoder,
    RamBlockEntry,
    RamEos,
    RamPages,
    RamSetup,
    RecvBitmapRequest,
    RemoteProtocolError,
    ReturnPathDecoder,
    RpMessage,
    SectionEnd,
    SectionFooter,
    SectionPart,
    SectionStart,
    Shut,
    StreamHeader,
    SwitchoverAck,
    SwitchoverStart,
    classify_channel,
    encode,
    machine_type_version,
)

PAGE = 0x08
ZERO = 0x02
CONT = 0x20
EOS = struct.pack(">Q", 0x10)
MIB2 = 2 << 20


def _page(offset: int, idstr: str | None, fill: int, *, zero: bool = False) -> bytes:
    flags = (ZERO if zero else PAGE) | (CONT if idstr is None else 0)
    name = b"" if idstr is None else bytes((len(idstr),)) + idstr.encode()
    return struct.pack(">Q", offset | flags) + name + (bytes((fill,)) if zero else bytes((fill,)) * 4096)


def _host_page(idstr: str, offset: int, size: int, fill: int) -> bytes:
    """A whole host page as postcopy sends it: target pages back to back, idstr on the first."""
    return b"".join(_page(offset + i, idstr if i == 0 else None, fill) for i in range(0, size, 4096))


def _dev(sid: int, idstr: str, payload: bytes = b"\x01\x02\x03") -> DeviceSection:
    return DeviceSection(section_id=sid, idstr=idstr, instance_id=0, version_id=1, payload=payload)


def _newer_stream(machine: str, blocks: list[tuple[str, int, int | None]], *, summary: int) -> tuple[bytes, list]:
    """A pure-postcopy main stream of a 10.2 source with every newer item in it."""
    setup = RamSetup(total_bytes=sum(b[1] for b in blocks),
                     blocks=tuple(RamBlockEntry(idstr=i, used_length=n, page_size=p) for i, n, p in blocks))
    first, size, psize = blocks[0][0], blocks[0][1], blocks[0][2] or 4096
    head = [
        StreamHeader(), Configuration(machine_type=machine), OpenReturnPath(), Ping(value=1),
        PostcopyAdvise(pagesize_summary=summary, target_page_size=4096),
        _dev(1, "early-device"),  # 8.0+: early_setup devices before the RAM setup
        SectionStart(section_id=2, idstr="ram", instance_id=0, version_id=4), setup, RamEos(),
        SectionFooter(section_id=2),
        SectionPart(section_id=2), RamEos(), SectionFooter(section_id=2),  # 10.1+: empty chunk
        SwitchoverStart(),  # 10.0+
        PostcopyRamDiscard(idstr=first, ranges=((0, size),)),
        Ping(value=2),
        Packaged(events=(PostcopyListen(), _dev(3, "timer"), _dev(4, "cpu"), Ping(value=3),
                         Ping(value=0x42), PostcopyRun())),  # 10.2+: PING 0x42 before RUN
        Ping(value=4),
    ]
    data = b"".join(encode(e) for e in head)
    data += encode(SectionPart(section_id=2)) + _host_page(first, psize, psize, 7) + EOS
    data += encode(SectionFooter(section_id=2))
    data += encode(SectionEnd(section_id=2)) + EOS + encode(SectionFooter(section_id=2)) + encode(EndOfStream())
    return data, head


def _decode(data: bytes, **kw) -> tuple[MainStreamDecoder, list]:
    dec = MainStreamDecoder(**kw)
    dec.receive_data(data)
    dec.receive_data(b"")
    return dec, dec.events()


def test_newer_source_stream_decodes_and_reencodes():
    data, head = _newer_stream("pc-q35-10.2", [("pc.ram", 4 * MIB2, None), ("pc.bios", 0x40000, None)],
                               summary=4096)
    dec, events = _decode(data)
    assert events[-1] == ConnectionClosed(complete=True)
    assert events[: len(head)] == head
    assert b"".join(encode(e) for e in events) == data
    assert SwitchoverStart() in events
    [pkg] = [e for e in events if isinstance(e, Packaged)]
    assert pkg.events[-2:] == (Ping(value=0x42), PostcopyRun())
    assert dec.postcopy
    pages = [e for e in events if isinstance(e, RamPages)]
    assert sum(len(p) for p in pages) == 1


def test_switchover_start_in_a_precopy_stream_byte_by_byte():
    """SWITCHOVER_START also ends a plain precopy (``migration_switchover_start``): fed one byte at a time."""
    data = b"".join(encode(e) for e in (
        StreamHeader(), Configuration(machine_type="pc-i440fx-10.0"), SwitchoverStart(), EndOfStream()))
    dec = MainStreamDecoder()
    out = []
    for i in range(len(data)):
        dec.receive_data(data[i : i + 1])
        out.extend(dec.events())
    dec.receive_data(b"")
    out.extend(dec.events())
    assert [type(e) for e in out] == [StreamHeader, Configuration, SwitchoverStart, EndOfStream, ConnectionClosed]
    assert encode(SwitchoverStart()) == b"\x08\x00\x0b\x00\x00"


def test_switchover_start_with_a_payload_is_refused():
    data = encode(StreamHeader()) + encode(Configuration(machine_type="pc-q35-10.0")) + b"\x08\x00\x0b\x00\x01\x00"
    dec = MainStreamDecoder()
    dec.receive_data(data)
    with pytest.raises(RemoteProtocolError) as info:
        dec.events()
    assert info.value.kind == "bad_length"
    assert "SWITCHOVER_START" in str(info.value)


# ----------------------------------------------------------------- huge pages without hints


@pytest.mark.parametrize("blocks", [
    [("mem0", 4 * MIB2, MIB2), ("pc.bios", 0x40000, None), ("pc.rom", 0x20000, None)],  # huge first
    [("pc.bios", 0x40000, None), ("mem0", 4 * MIB2, MIB2)],  # huge last: its field sits before EOS
    [("mem0", 4 * MIB2, MIB2), ("mem1", 2 << 30, 1 << 30)],  # two huge sizes, 1 GiB pages last
    [("pc.ram", 4 * MIB2, None), ("vga.vram", 0x100000, None)],  # none huge
])
def test_page_sizes_are_inferred_from_the_ram_setup(blocks):
    summary = 4096
    for _, _, p in blocks:
        summary |= p or 4096
    data, _ = _newer_stream("pc-q35-10.2", blocks, summary=summary)
    dec, events = _decode(data)
    assert events[-1] == ConnectionClosed(complete=True)
    [setup] = [e for e in events if isinstance(e, RamSetup)]
    assert [(b.idstr, b.page_size) for b in setup.blocks] == [(i, p) for i, _, p in blocks]
    assert dec.layout is not None
    assert [b.host_page_size for b in dec.layout.blocks] == [p or 4096 for _, _, p in blocks]
    assert b"".join(encode(e) for e in events) == data


def test_page_size_hint_still_checks_the_stream():
    blocks = [("mem0", 4 * MIB2, MIB2), ("pc.bios", 0x40000, None)]
    data, _ = _newer_stream("pc-q35-10.2", blocks, summary=MIB2 | 4096)
    dec, events = _decode(data, block_page_sizes={"mem0": MIB2})
    assert events[-1] == ConnectionClosed(complete=True)
    dec = MainStreamDecoder(block_page_sizes={"pc.bios": MIB2})  # wrong: the stream has no field there
    dec.receive_data(data)
    with pytest.raises(RemoteProtocolError) as info:
        dec.events()
    assert info.value.kind == "page_size_mismatch"
    assert "'pc.bios'" in str(info.value)


def test_a_ram_setup_word_that_is_no_page_size_is_refused():
    setup = struct.pack(">Q", 0x2000 | 4) + b"\x06pc.ram" + struct.pack(">Q", 0x2000) + struct.pack(">Q", 0x3000)
    data = (encode(StreamHeader()) + encode(Configuration(machine_type="pc-i440fx-7.2"))
            + encode(PostcopyAdvise(pagesize_summary=4096, target_page_size=4096))
            + encode(SectionStart(section_id=2, idstr="ram", instance_id=0, version_id=4)) + setup)
    dec = MainStreamDecoder()
    dec.receive_data(data)
    with pytest.raises(RemoteProtocolError) as info:
        dec.events()
    assert info.value.kind == "bad_value"
    assert "neither EOS nor a page size" in str(info.value)


def test_without_advise_no_page_size_field_is_read():
    """Precopy-only streams never carry the field (``migrate_postcopy_ram()`` is off)."""
    setup = RamSetup(total_bytes=0x2000, blocks=(RamBlockEntry(idstr="pc.ram", used_length=0x2000),))
    data = b"".join(encode(e) for e in (
        StreamHeader(), Configuration(machine_type="pc-i440fx-7.2"),
        SectionStart(section_id=2, idstr="ram", instance_id=0, version_id=4), setup, RamEos(),
        SectionFooter(section_id=2), EndOfStream()))
    dec, events = _decode(data)
    assert events[-1] == ConnectionClosed(complete=True)
    assert dec.layout is not None
    assert dec.layout.blocks[0].host_page_size == 4096


# ----------------------------------------------------------------- the preempt channel


def _layout():
    data, _ = _newer_stream("pc-q35-10.2", [("mem0", 2 * MIB2, MIB2), ("pc.bios", 0x40000, None)],
                            summary=MIB2 | 4096)
    dec, _ = _decode(data)
    assert dec.layout is not None
    return dec.layout


def test_preempt_without_eos_ends_cleanly_at_peer_eof():
    pre = PreemptDecoder(layout=_layout())
    pre.receive_data(_host_page("mem0", MIB2, MIB2, 9) + _page(0x1000, "pc.bios", 3))
    pre.receive_data(b"")
    events = pre.events()
    assert events[-1] == ConnectionClosed(complete=True)
    assert not pre.saw_eos
    assert sum(len(e) for e in events if isinstance(e, RamPages)) == 512 + 1


def test_preempt_ended_by_the_destination_itself():
    """8.0+: no EOS and the source keeps the channel open; the destination ends it after main's EOF."""
    pre = PreemptDecoder(layout=_layout())
    pre.receive_data(_page(0x2000, "pc.bios", 3))
    assert isinstance(pre.next_event(), RamPages)
    assert pre.next_event() is NEED_DATA
    assert pre.at_boundary
    assert pre.end_locally() == ConnectionClosed(complete=True)
    with pytest.raises(LocalProtocolError):
        pre.receive_data(b"x")


def test_preempt_ended_locally_mid_record_is_truncated():
    pre = PreemptDecoder(layout=_layout())
    pre.receive_data(_page(0x2000, "pc.bios", 3)[:100])
    assert pre.next_event() is NEED_DATA
    assert not pre.at_boundary
    with pytest.raises(RemoteProtocolError) as info:
        pre.end_locally()
    assert info.value.kind == "truncated"


def test_preempt_end_locally_refuses_undecoded_records():
    pre = PreemptDecoder(layout=_layout())
    pre.receive_data(_page(0x2000, "pc.bios", 3))
    with pytest.raises(LocalProtocolError):
        pre.end_locally()
    assert isinstance(pre.next_event(), RamPages)  # nothing was lost
    assert pre.next_event() == ConnectionClosed(complete=True)


def test_preempt_with_eos_as_72_sends_it():
    pre = PreemptDecoder(layout=_layout())
    pre.receive_data(_page(0x2000, "pc.bios", 3) + EOS)
    pre.receive_data(b"")
    events = pre.events()
    assert isinstance(events[-2], RamEos)
    assert pre.saw_eos


def test_channels_are_told_apart_by_order():
    """``migration_ioc_process_incoming``: first connection main, later ones preempt (no magic)."""
    assert classify_channel(b"", main_open=False, paused=False) is ChannelKind.MAIN
    assert classify_channel(b"", main_open=True, paused=False) is ChannelKind.PREEMPT
    assert classify_channel(b"", main_open=True, paused=True) is ChannelKind.PREEMPT  # silent preempt
    assert classify_channel(b"\x08\x00", main_open=False, paused=True) is NEED_DATA
    assert classify_channel(b"\x08\x00\x0a\x00", main_open=False, paused=True) is ChannelKind.RECOVERY
    assert classify_channel(b"QEVM\0\0\0\3", main_open=False, paused=True) is ChannelKind.MAIN


# ----------------------------------------------------------------- the return path and the peer


def test_switchover_ack_on_the_return_path():
    data = b"".join(encode(e) for e in (Pong(value=1), SwitchoverAck(), Pong(value=2), Shut(value=0)))
    assert encode(SwitchoverAck()) == b"\x00\x07\x00\x00"
    dec = ReturnPathDecoder()
    dec.receive_data(data)
    dec.receive_data(b"")
    assert dec.events() == [Pong(value=1), SwitchoverAck(), Pong(value=2), Shut(value=0),
                            ConnectionClosed(complete=True)]


def test_machine_type_versions():
    assert machine_type_version("pc-i440fx-7.2") == (7, 2)
    assert machine_type_version("pc-q35-10.1") == (10, 1)
    assert machine_type_version("virt-9.2") == (9, 2)
    assert machine_type_version("microvm") is None
    assert machine_type_version("pc") is None


def test_peer_profile_never_offers_unknown_return_path_messages():
    old = PeerProfile.from_stream(Configuration(machine_type="pc-i440fx-7.2"))
    assert RpMessage.SWITCHOVER_ACK not in old.rp_messages()
    assert old.rp_messages() == frozenset(RpMessage) - {RpMessage.SWITCHOVER_ACK}
    with pytest.raises(LocalProtocolError) as info:
        old.check_sendable(SwitchoverAck())
    assert info.value.kind == "unknown_message"
    assert "8.1" in str(info.value)
    for ev in (Shut(value=0), Pong(value=1), PageRequest(start=0, length=4096, idstr="pc.ram")):
        old.check_sendable(ev)
    # a newer machine type alone is not enough: the source must have asked for it
    new = PeerProfile.from_stream(Configuration(machine_type="pc-q35-8.1"))
    assert not new.knows_rp(RpMessage.SWITCHOVER_ACK)
    asked = PeerProfile.from_stream(Configuration(machine_type="pc-q35-8.1"), capabilities={"switchover-ack"})
    assert asked.knows_rp(RpMessage.SWITCHOVER_ACK)
    asked.check_sendable(SwitchoverAck())
    # a 7.2 machine type on an unknown (maybe newer) binary: only what 7.2 knows
    assert not PeerProfile.from_stream(Configuration(machine_type="pc-i440fx-7.2"),
                                       capabilities={"switchover-ack"}).knows_rp(RpMessage.SWITCHOVER_ACK)
    assert PeerProfile.from_stream(Configuration(machine_type="pc-i440fx-7.2"), capabilities={"switchover-ack"},
                                   version=(9, 0)).knows_rp(RpMessage.SWITCHOVER_ACK)


def test_peer_profile_commands_and_preempt_behaviour():
    old = PeerProfile.from_stream(Configuration(machine_type="pc-i440fx-7.2"))
    assert not old.knows_command(Command.SWITCHOVER_START)
    with pytest.raises(LocalProtocolError):
        old.check_sendable(SwitchoverStart())
    with pytest.raises(LocalProtocolError):  # also inside a package
        old.check_sendable(Packaged(events=(PostcopyListen(), SwitchoverStart(), PostcopyRun())))
    old.check_sendable(Packaged(events=(PostcopyListen(), Ping(value=0x42), PostcopyRun())))
    assert old.preempt_eos is True
    assert old.preempt_connects_early is True
    assert not old.may_send_switchover_start
    new = PeerProfile.from_stream(Configuration(machine_type="pc-q35-10.0"))
    assert new.knows_command(Command.SWITCHOVER_START)
    assert new.may_send_switchover_start
    assert new.preempt_eos is False
    compat = PeerProfile.from_stream(Configuration(machine_type="pc-q35-9.2"), version=(10, 1))
    assert not compat.may_send_switchover_start  # hw_compat_9_2: send-switchover-start off
    assert PeerProfile.from_stream(Configuration(machine_type="microvm")).preempt_eos is None


# ----------------------------------------------------------------- postcopy inspect on such a capture


def test_inspect_pairs_a_huge_page_capture_without_hints(tmp_path, capsys):
    """A capture folder of a 2 MiB-page guest: main, silent-then-busy preempt (no EOS), a resumed pair."""
    import json

    from postcopy.cli import main as cli

    blocks = [("mem0", 2 * MIB2, MIB2), ("pc.bios", 0x40000, None)]
    data, _ = _newer_stream("pc-q35-10.2", blocks, summary=MIB2 | 4096)
    cut = data.index(encode(SectionEnd(section_id=2)))
    first, resumed = tmp_path / "capture", tmp_path / "capture-resume"
    first.mkdir()
    resumed.mkdir()
    (first / "conn0.s2d.bin").write_bytes(data[:cut])  # paused before its end
    (first / "conn0.d2s.bin").write_bytes(encode(Pong(value=1)))
    (first / "conn1.s2d.bin").write_bytes(_host_page("mem0", 0, MIB2, 5))  # preempt, no EOS
    (first / "conn1.d2s.bin").write_bytes(b"")
    recovery = b"".join(encode(e) for e in (
        RecvBitmapRequest(idstr="mem0"), RecvBitmapRequest(idstr="pc.bios"), PostcopyResume()))
    recovery += encode(SectionEnd(section_id=2)) + EOS + encode(SectionFooter(section_id=2)) + encode(EndOfStream())
    # the resumed preempt connection is opened first by the proxy's clock: the index decides, not the name
    (resumed / "conn0.s2d.bin").write_bytes(b"")
    (resumed / "conn1.s2d.bin").write_bytes(recovery)
    (resumed / "conn0.d2s.bin").write_bytes(b"")
    (resumed / "conn1.d2s.bin").write_bytes(encode(Shut(value=0)))
    (first / "index.jsonl").write_text('{"t": 1, "conn": 0, "ev": "open"}\n{"t": 2, "conn": 1, "ev": "open"}\n')
    (resumed / "index.jsonl").write_text('{"t": 3, "conn": 1, "ev": "open"}\n{"t": 4, "conn": 0, "ev": "open"}\n')
    assert cli(["inspect", "--json", str(tmp_path)]) == 0
    report = json.loads(capsys.readouterr().out)
    kinds = {s["path"].split(str(tmp_path))[1]: (s["kind"], s["end"]) for s in report["streams"]}
    assert kinds["/capture/conn0.s2d.bin"] == ("main", "closed")
    assert kinds["/capture/conn1.s2d.bin"] == ("preempt", "eof")
    assert kinds["/capture-resume/conn1.s2d.bin"] == ("recovery", "eof")
    assert kinds["/capture-resume/conn0.s2d.bin"][0] == "preempt"
    assert all(s["decoded_bytes"] == s["bytes"] for s in report["streams"])
    assert report["pages"]["mem0"]["normal"] == 2 * 512  # one host page on main, one on preempt
    assert report["command_counts"]["SWITCHOVER_START"] == 1
    # --block-page-size is now only a check
    assert cli(["inspect", "--json", "--block-page-size", "mem0=2M", str(tmp_path)]) == 0
    capsys.readouterr()
    assert cli(["inspect", "--json", "--block-page-size", "mem0=1G", str(first / "conn0.s2d.bin")]) == 1
    err = json.loads(capsys.readouterr().out)["streams"][0]["error"]
    assert err["kind"] == "page_size_mismatch"
