"""The snapshot's memory owners: SavingMemory (destination) and SnapshotMemory (source), and the CLI around them."""

from __future__ import annotations

import pytest

from postcopy import wire
from postcopy.cli import main
from postcopy.saved import SavingMemory, SnapshotMemory, stream_head
from postcopy.session import MigrationFailed
from postcopy.snapshot import Snapshot, SnapshotError
from uffd import RamBlock

CONFIG = wire.Configuration(machine_type="pc-i440fx-7.2")
LAYOUT = wire.RamLayout(blocks=(wire.RamBlockLayout(idstr="pc.ram", used_length=8 << 20),
                                wire.RamBlockLayout(idstr="/rom@etc/acpi/rsdp", used_length=4096)), section_id=2)
DEVS = (wire.DeviceSection(section_id=5, idstr="timer", instance_id=0, version_id=2, payload=b"\x01\x02"),
        wire.DeviceSection(section_id=6, idstr="cpu", instance_id=0, version_id=12, payload=b"\xaa" * 100))


def _saved(tmp_path) -> Snapshot:
    owner = SavingMemory(tmp_path / "snap")
    blocks = owner.provide_blocks(LAYOUT)
    view = blocks[0].view()
    view[0x100000:0x100004] = b"ABCD"             # one nonzero page; the rest stays zero (holes)
    view[(8 << 20) - 1] = 0x55
    view.release()
    blocks[1].view()[0] = 1
    owner.load_device_state(DEVS, configuration=CONFIG, in_package=(False, True))
    snap = owner.save()
    owner.close()
    return snap


def test_saving_memory_writes_what_it_received(tmp_path) -> None:
    snap = _saved(tmp_path)
    assert snap.machine_type == "pc-i440fx-7.2"
    assert [(b.idstr, b.used_length, b.page_size) for b in snap.blocks] == [
        ("pc.ram", 8 << 20, 4096), ("/rom@etc/acpi/rsdp", 4096, 4096)]
    data = snap.path("pc.ram").read_bytes()
    assert data[0x100000:0x100004] == b"ABCD"
    assert data[-1] == 0x55
    assert data.count(0) == len(data) - 5
    assert snap.allocated_bytes() <= 4 * 4096 + 4096 * 4       # sparse: holes where zero (fs block rounding)
    assert snap.stream_head() == stream_head(CONFIG)
    assert tuple(snap.device_sections()) == DEVS
    assert [d.in_package for d in snap.devices] == [False, True]


def test_saving_memory_refuses_a_directory_holding_a_snapshot(tmp_path) -> None:
    _saved(tmp_path)
    with pytest.raises(SnapshotError, match="already holds a snapshot"):
        SavingMemory(tmp_path / "snap")


def test_saving_memory_needs_a_configuration(tmp_path) -> None:
    owner = SavingMemory(tmp_path / "snap")
    owner.provide_blocks(LAYOUT)
    with pytest.raises(MigrationFailed, match="no configuration section"):
        owner.load_device_state(DEVS)
    with pytest.raises(SnapshotError, match="nothing to save"):
        owner.save()
    owner.close()


def test_snapshot_memory_serves_the_saved_vm(tmp_path) -> None:
    snap = _saved(tmp_path)
    owner = SnapshotMemory.open(snap.directory)
    try:
        assert owner.configuration() == CONFIG
        assert owner.save_device_state() == DEVS
        blocks = owner.ram_blocks()
        assert [(b.idstr, b.used_length, b.backing) for b in blocks] == [
            ("pc.ram", 8 << 20, "file"), ("/rom@etc/acpi/rsdp", 4096, "file")]
        assert bytes(blocks[0].view()[0x100000:0x100004]) == b"ABCD"
        blocks[0].view()[0x100000] = 0       # a private map: the file keeps its bytes
        assert snap.path("pc.ram").read_bytes()[0x100000] == ord("A")
        assert not hasattr(owner, "provide_blocks")     # a SourceMemory only: no destination takes it
    finally:
        owner.close()


def test_map_file_checks_the_size(tmp_path) -> None:
    f = tmp_path / "x.raw"
    f.write_bytes(bytes(4096 * 3))
    with pytest.raises(ValueError, match="not a positive multiple"):
        RamBlock.map_file("x", f, 2 << 20)
    b = RamBlock.map_file("x", f)
    assert b.used_length == 3 * 4096
    b.close()


def test_cli_says_what_is_wrong_in_one_sentence(tmp_path, capsys) -> None:
    assert main(["source", "--from-snapshot", str(tmp_path / "none"), "--connect", "127.0.0.1:1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"postcopy source: {tmp_path / 'none'}: no such snapshot directory"
    _saved(tmp_path)
    assert main(["dest", "--listen", "127.0.0.1:0", "--save", str(tmp_path / "snap")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("postcopy dest: ")
    assert "already holds a snapshot" in err
    assert main(["dest", "--listen", "127.0.0.1:0", "--headless", "--verify"]) == 2
    assert "--verify" in capsys.readouterr().err
