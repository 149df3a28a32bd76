"""The snapshot directory: writer, strict reader, sparse block files, device state as received."""

from __future__ import annotations

import json
import lzma
import os

import pytest

from postcopy.snapshot import FORMAT, Snapshot, SnapshotError, SnapshotWriter
from postcopy.wire import (
    ConnectionClosed,
    DeviceSection,
    MainStreamDecoder,
    Packaged,
    RamPages,
    encode,
)

BLOCKS = [("pc.ram", 64 << 20, 4096), ("/rom@etc/acpi/tables", 0x20000, 4096), ("mem1", 4 << 20, 2 << 20)]
HEAD = b"QEVM\0\0\0\x03\x07\0\0\0\x0dpc-i440fx-7.2"


def _dev(sid: int, name: str, payload: bytes) -> DeviceSection:
    return DeviceSection(section_id=sid, idstr=name, instance_id=0, version_id=3, payload=payload)


def _write(tmp_path, **kw) -> Snapshot:
    with SnapshotWriter(tmp_path / "snap", BLOCKS, machine_type="pc-i440fx-7.2", **kw) as w:
        w.set_stream_head(HEAD)
        w.write("pc.ram", 0x100000, b"\x01" * 4096)
        w.write("pc.ram", 0x200000, bytes(4096))  # zero: stays a hole
        m = w.mmap("mem1")  # MAP_SHARED: what is placed lands in the file
        m[2 << 20 : (2 << 20) + 5] = b"hello"
        m.close()
        w.add_device(_dev(3, "timer", b"\x00\x01"), in_package=False)
        w.add_device(_dev(4, "cpu", b"\xaa" * 300 + b"\x7e\x00\x00\x00\x04"), in_package=True)  # footer-like bytes
        return w.commit()


def test_round_trip_sparse_and_shared(tmp_path):
    snap = _write(tmp_path)
    assert [(b.idstr, b.used_length, b.page_size) for b in snap.blocks] == BLOCKS
    assert snap.stream_head() == HEAD
    assert snap.machine_type == "pc-i440fx-7.2"
    ram = snap.mmap("pc.ram")
    assert ram[0x100000:0x101000] == b"\x01" * 4096
    assert ram[0x200000:0x201000] == bytes(4096)
    ram.close()
    assert snap.path("mem1").read_bytes()[2 << 20 : (2 << 20) + 5] == b"hello"
    # 64 MiB block with one page written: the files hold a few pages, not 68 MiB
    assert snap.allocated_bytes() < 8 << 20
    devs = list(snap.device_sections())
    assert [d.idstr for d in devs] == ["timer", "cpu"]
    assert [d.idstr for d in snap.device_sections(in_package=True)] == ["cpu"]
    assert snap.device_bytes() == encode(devs[0]) + encode(devs[1])
    manifest = json.loads((snap.directory / "manifest.json").read_text())
    assert manifest["format"] == FORMAT
    assert manifest["blocks"][1]["file"] == "ram/001-rom_etc_acpi_tables.raw"


def test_zero_punches_a_hole(tmp_path):
    with SnapshotWriter(tmp_path / "s", [("pc.ram", 8 << 20, 4096)]) as w:
        w.set_stream_head(HEAD)
        w.write("pc.ram", 0, os.urandom(4 << 20))
        before = os.fstat(w.fileno("pc.ram")).st_blocks
        w.zero("pc.ram", 0, 2 << 20)
        assert os.fstat(w.fileno("pc.ram")).st_blocks < before
        snap = w.commit()
    assert snap.path("pc.ram").read_bytes()[: 2 << 20] == bytes(2 << 20)


def test_writer_refuses_bad_input(tmp_path):
    with pytest.raises(SnapshotError, match="listed twice"):
        SnapshotWriter(tmp_path / "a", [("x", 4096, 4096), ("x", 4096, 4096)])
    with pytest.raises(SnapshotError, match="not a multiple of its page_size"):
        SnapshotWriter(tmp_path / "b", [("mem", 4096, 2 << 20)])
    with SnapshotWriter(tmp_path / "c", [("pc.ram", 8192, 4096)]) as w:
        with pytest.raises(SnapshotError, match="runs past"):
            w.write("pc.ram", 4096, b"\1" * 8192)
        with pytest.raises(SnapshotError, match="no RAM block 'nope'"):
            w.write("nope", 0, b"\1")
        with pytest.raises(SnapshotError, match="no stream head"):
            w.commit()
    _write(tmp_path)
    with pytest.raises(SnapshotError, match="already holds a snapshot"):
        SnapshotWriter(tmp_path / "snap", BLOCKS)


def _mangle(tmp_path, fn) -> str:
    snap = _write(tmp_path)
    mpath = snap.directory / "manifest.json"
    m = json.loads(mpath.read_text())
    fn(m, snap.directory)
    mpath.write_text(json.dumps(m))
    with pytest.raises(SnapshotError) as info:
        Snapshot.open(snap.directory)
    return str(info.value)


def test_reader_errors_are_clear(tmp_path):
    with pytest.raises(SnapshotError, match="no such snapshot directory"):
        Snapshot.open(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(SnapshotError, match=r"no manifest\.json"):
        Snapshot.open(tmp_path / "empty")
    (tmp_path / "empty" / "manifest.json").write_text("{nope")
    with pytest.raises(SnapshotError, match="not readable JSON"):
        Snapshot.open(tmp_path / "empty")

    def fmt(m, d):
        m["format"] = "postcopy-snapshot-0"
    assert "expected 'postcopy-snapshot-1'" in _mangle(tmp_path / "1", fmt)

    def extra(m, d):
        m["surprise"] = 1
    assert "unknown keys ['surprise']" in _mangle(tmp_path / "2", extra)

    def gone(m, d):
        (d / m["blocks"][0]["file"]).unlink()
    assert "missing (blocks[0]" in _mangle(tmp_path / "3", gone)

    def short(m, d):
        os.truncate(d / m["blocks"][2]["file"], 4096)
    msg = _mangle(tmp_path / "4", short)
    assert "4096 bytes, but block 'mem1' has used_length 4194304" in msg

    def escape(m, d):
        m["blocks"][0]["file"] = "../../etc/passwd"
    assert "not a relative path inside" in _mangle(tmp_path / "5", escape)

    def size(m, d):
        m["blocks"][0]["page_size"] = 3000
    assert "not a power of two" in _mangle(tmp_path / "6", size)

    def dev(m, d):
        m["devices"][1]["offset"] += 1
    assert "does not follow" in _mangle(tmp_path / "7", dev)

    def keys(m, d):
        del m["blocks"][0]["file"]
    assert "exactly the keys" in _mangle(tmp_path / "8", keys)


def test_snapshot_of_a_real_qemu_stream(tmp_path, captures_dir):
    """A QEMU 7.2 stream saved block by block: device sections in order, pages in place, holes elsewhere."""
    with lzma.open(captures_dir / "64M-postcopy-immediate/capture/conn0.s2d.bin.xz") as f:
        data = f.read()
    dec = MainStreamDecoder()
    dec.receive_data(data)
    dec.receive_data(b"")
    w: SnapshotWriter | None = None
    head_end = 0
    devices = []
    while not isinstance(e := dec.next_event(), ConnectionClosed):
        if type(e).__name__ == "Configuration":
            head_end = dec.offset
        if type(e).__name__ == "RamSetup":
            assert dec.layout is not None
            w = SnapshotWriter(tmp_path / "snap", [(b.idstr, b.used_length, b.host_page_size)
                                                   for b in dec.layout.blocks], machine_type="pc-i440fx-7.2")
            w.set_stream_head(data[:head_end])
        if isinstance(e, DeviceSection):
            devices.append(e)
            assert w is not None
            w.add_device(e, in_package=False)
        if isinstance(e, Packaged):
            for x in e.events:
                if isinstance(x, DeviceSection):
                    devices.append(x)
                    assert w is not None
                    w.add_device(x, in_package=True)
        if isinstance(e, RamPages):
            assert w is not None
            for i in range(len(e)):  # per page in Python: fine for a test of 16K pages
                r = e.record(i)
                if r.kind == 2:
                    w.write(e.blocks[r.block], r.offset, e.page_data(i))
    assert w is not None
    snap = w.commit()
    assert list(snap.device_sections()) == devices
    assert snap.stream_head() == data[:head_end]
    assert len(snap.blocks) == 6
    ram = snap.mmap("pc.ram")
    # the guest increments the first byte of every page from 1 MiB up: those pages are non-zero
    assert ram[0x100000] != 0
    assert ram[0x3FFF000] != 0
    ram.close()
