"""``postcopy dest --headless/--save --touch IDSTR[:STRIDE]``: the reader that faults a headless destination's
memory as a guest would (the QEMU recovery tests use it to have requests outstanding at a pause)."""

from __future__ import annotations

import threading
import time

import pytest

from postcopy import wire
from postcopy.cli import main
from postcopy.owner import HeadlessMemory
from postcopy.session import MigrationFailed
from postcopy.touch import TouchPattern
from uffd.memtouch import write_byte

LAYOUT = wire.RamLayout(blocks=(wire.RamBlockLayout(idstr="pc.ram", used_length=(8 << 20) + 4096),
                                wire.RamBlockLayout(idstr="/rom@etc/acpi/rsdp", used_length=4096)), section_id=2)


def test_pattern_parses_idstr_and_stride() -> None:
    assert TouchPattern.parse("pc.ram") == TouchPattern("pc.ram", 4096)
    assert TouchPattern.parse("pc.ram:16384") == TouchPattern("pc.ram", 16384)
    assert TouchPattern.parse("/rom@etc/acpi/tables") == TouchPattern("/rom@etc/acpi/tables", 4096)
    with pytest.raises(ValueError, match="multiple of 4096"):
        TouchPattern.parse("pc.ram:5000")
    with pytest.raises(ValueError, match="no RAM block"):
        TouchPattern.parse(":4096")


@pytest.mark.parametrize("stride", [4096, 3 * 4096])
def test_reader_reads_every_stride_of_the_block_top_down(stride: int) -> None:
    owner = HeadlessMemory(touch=TouchPattern("pc.ram", stride))
    blocks = owner.provide_blocks(LAYOUT)
    try:
        for off in range(0, blocks[0].used_length, 4096):
            write_byte(blocks[0], off, 1)
        owner.start()
        assert owner.toucher is not None
        assert owner.toucher.wait()
        stats = owner.touch_stats()
        assert stats is not None
        assert stats.planned == -(-blocks[0].used_length // stride)
        assert stats.pages == stats.planned
        assert stats.done
        assert stats.as_dict()["done"] is True
    finally:
        owner.close()


def test_a_stopped_reader_ends_between_calls() -> None:
    owner = HeadlessMemory(touch=TouchPattern("pc.ram"))
    owner.provide_blocks(LAYOUT)
    owner.start()
    assert owner.toucher is not None
    assert owner.toucher.stop()
    stats = owner.touch_stats()
    assert stats is not None
    assert 0 < stats.pages <= stats.planned
    owner.close()


def test_a_missing_block_fails_as_a_ram_layout_error() -> None:
    owner = HeadlessMemory(touch=TouchPattern("mem0"))
    with pytest.raises(MigrationFailed, match="--touch mem0: the stream has no such RAM block") as e:
        owner.provide_blocks(LAYOUT)
    assert e.value.kind == "ram_layout"


def test_close_waits_for_the_reader() -> None:
    owner = HeadlessMemory(touch=TouchPattern("pc.ram"))
    owner.provide_blocks(LAYOUT)
    done = threading.Event()

    def run() -> None:
        owner.start()
        done.set()

    threading.Thread(target=run).start()
    assert done.wait(5)
    time.sleep(0.001)
    owner.close()           # stops the reader between two calls, then unmaps
    assert owner.toucher is not None
    assert not owner.toucher._thread.is_alive()


def test_cli_errors(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["dest", "--listen", "127.0.0.1:0", "--touch", "pc.ram"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("postcopy dest: --touch reads the memory of a destination with no guest: "
                   "use it with --headless or --save")
    assert main(["dest", "--listen", "127.0.0.1:0", "--headless", "--touch", "pc.ram:5000"]) == 2
    assert "the stride 5000 must be a positive multiple of 4096" in capsys.readouterr().err
