"""Hot set files (postcopy/hotset.py): the format round-trips, damaged or foreign files are
refused with a reason, and a well-formed hot set of another guest is cut to what fits."""

from __future__ import annotations

import struct
import zlib
from array import array
from pathlib import Path

import pytest

from postcopy._datapath import SourcePath
from postcopy.hotset import MAGIC, VERSION, HotBlock, HotSet, HotSetError
from postcopy.spec import GuestSpec
from uffd import PAGE_4K

RAM = HotBlock("pc.ram", 64 << 20, 4096)
BIOS = HotBlock("pc.bios", 256 << 10, 4096)
HUGE = HotBlock("huge", 8 << 20, 2 << 20)


def sample() -> HotSet:
    # first-request order, not address order: the bios between two runs of pc.ram
    return HotSet((RAM, BIOS, HUGE), array("Q", [0, 5000, 3, 1, 10, 1, 0, 7, 1, 2, 512, 512]))


def test_round_trip_keeps_blocks_runs_and_order(tmp_path: Path) -> None:
    hs = sample()
    data = hs.encode()
    assert data[:8] == MAGIC
    assert struct.unpack_from(">HHIQ", data, 8) == (VERSION, 0, 3, 4)
    assert len(data) == 24 + sum(1 + len(b.idstr) + 16 for b in hs.blocks) + 16 * 4 + 4
    back = HotSet.decode(data)
    assert back == hs
    assert back.pages == 3 + 1 + 1 + 512
    assert back.nruns == 4
    path = tmp_path / "hot"
    hs.save(path)
    assert HotSet.load(path) == hs
    assert [p.name for p in tmp_path.iterdir()] == ["hot"]      # no temporary file left behind


def test_empty_hot_set_round_trips() -> None:
    hs = HotSet((RAM,))
    assert HotSet.decode(hs.encode()) == hs
    assert hs.pages == 0


def _reseal(body: bytes) -> bytes:
    return body + struct.pack(">I", zlib.crc32(body))


@pytest.mark.parametrize(("damage", "message"), [
    (lambda d: b"NOTAHOTS" + d[8:], "not a hot set"),
    (lambda d: d[:-1], "checksum mismatch"),
    (lambda d: d[:-5] + bytes([d[-5] ^ 1]) + d[-4:], "checksum mismatch"),
    (lambda d: _reseal(d[:8] + struct.pack(">H", 2) + d[10:-4]), "version 2"),
    (lambda d: _reseal(d[:10] + struct.pack(">H", 1) + d[12:-4]), "flags 0x0001"),
    (lambda d: _reseal(d[:-4 - 16]), "3 runs need 48 bytes"),
    (lambda d: b"PCHOT", "too short"),
])
def test_damaged_files_are_refused_with_a_reason(damage, message: str) -> None:  # type: ignore[no-untyped-def]
    data = HotSet((RAM, BIOS), array("Q", [0, 1, 1, 1, 2, 2, 0, 9, 1])).encode()
    with pytest.raises(HotSetError, match=message):
        HotSet.decode(damage(data))


def test_a_run_naming_no_block_or_no_pages_is_refused() -> None:
    body = bytearray(HotSet((RAM,), array("Q", [0, 1, 1])).encode()[:-4])
    struct.pack_into(">I", body, len(body) - 16, 7)         # block 7 of 1
    with pytest.raises(HotSetError, match="run 0: block 7 of 1"):
        HotSet.decode(_reseal(bytes(body)))
    struct.pack_into(">II", body, len(body) - 16, 0, 0)     # 0 pages
    with pytest.raises(HotSetError, match="0 pages"):
        HotSet.decode(_reseal(bytes(body)))


def test_inconsistent_block_geometry_is_refused() -> None:
    bad = HotSet((HotBlock("odd", 3 << 20, 2 << 20),)).encode()
    with pytest.raises(HotSetError, match="inconsistent"):
        HotSet.decode(bad)


def test_load_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "junk"
    path.write_bytes(b"hello, this is not a hot set at all")
    with pytest.raises(HotSetError, match=f"^{path}: not a hot set"):
        HotSet.load(path)
    with pytest.raises(HotSetError, match="No such file"):
        HotSet.load(tmp_path / "missing")


def test_resolve_matches_blocks_by_idstr_and_keeps_the_order() -> None:
    here = (BIOS, HotBlock("extra", 1 << 20, 4096), RAM, HUGE)
    r = sample().resolve(here)
    assert list(r.runs) == [2, 5000, 3, 0, 10, 1, 2, 7, 1, 3, 512, 512]
    assert r.pages == 517
    assert r.warnings == ()


def test_resolve_leaves_out_what_does_not_fit_with_warnings() -> None:
    # a guest without "huge", whose pc.ram shrank to 20 MiB (5120 pages), and whose bios has 2 MiB pages
    here = (HotBlock("pc.ram", 20 << 20, 4096), HotBlock("pc.bios", 2 << 20, 2 << 20))
    hs = HotSet((RAM, BIOS, HUGE), array("Q", [0, 5000, 200, 0, 6000, 4, 1, 10, 1, 2, 0, 512, 0, 3, 1]))
    r = hs.resolve(here)
    assert list(r.runs) == [0, 5000, 120, 0, 3, 1]
    assert r.pages == 121
    text = "\n".join(r.warnings)
    assert "'huge' is not in this migration" in text
    assert "'pc.bios' had 4096-byte pages, this one has 2097152" in text
    assert "84 hot set pages lie past the end of their block" in text


def test_resolve_warns_when_nothing_fits() -> None:
    r = sample().resolve((HotBlock("other", 1 << 20, 4096),))
    assert r.pages == 0
    assert len(r.runs) == 0
    assert r.warnings[-1] == "no page of the hot set fits this migration's blocks: nothing is pushed first"


def test_the_data_path_refuses_runs_outside_their_block() -> None:
    spec = GuestSpec.simple(8 << 20, PAGE_4K, vcpus=1)
    memory = spec.build_memory()
    try:
        path = SourcePath(list(memory), 3)
        path.set_hot(array("Q", [0, 0, 2048, 1, 63, 1]))      # the whole main block, the bios' last page
        path.set_hot(array("Q"))
        for bad in ([0, 2047, 2], [9, 0, 1], [1, 0, 0]):
            with pytest.raises(ValueError, match="outside its block"):
                path.set_hot(array("Q", bad))
        with pytest.raises(ValueError, match="triples"):
            path.set_hot(array("Q", [0, 1]))
        path.record_hot(True)
        assert len(path.hot_recorded()) == 0
        path.record_hot(False)
    finally:
        memory.close()
