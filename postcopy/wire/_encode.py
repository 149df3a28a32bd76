"""``encode(event) -> bytes``: the exact wire form of every codec event."""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import Any

from . import _events as ev
from ._constants import (
    CMD,
    QEMU_VM_FILE_MAGIC,
    RAM_FLAG_EOS,
    RAM_FLAG_MEM_SIZE,
    RECV_BITMAP_END_MARK,
    RP,
    SECTION,
    Command,
    RpMessage,
    SectionType,
)
from ._decoder import BE32, BE64
from ._errors import LocalProtocolError
from ._scanner import RecordScanner, default_scanner

__all__ = ["encode"]



def _counted(s: str) -> bytes:
    b = s.encode("utf-8", "surrogateescape")
    return bytes((len(b),)) + b


def _command(cmd: Command, payload: bytes = b"") -> bytes:
    return struct.pack(">BHH", SECTION.COMMAND, cmd, len(payload)) + payload


def _rp(msg: RpMessage, payload: bytes = b"") -> bytes:
    return struct.pack(">HH", msg, len(payload)) + payload


def _config(e: ev.Configuration) -> bytes:
    name = e.machine_type.encode("utf-8", "surrogateescape")
    out = [bytes((SECTION.CONFIGURATION,)), BE32.pack(len(name)), name]

    def sub(n: str, body: bytes) -> None:
        out.extend((bytes((SECTION.SUBSECTION,)), _counted(n), BE32.pack(1), body))

    if e.target_page_bits is not None:
        sub("configuration/target-page-bits", BE32.pack(e.target_page_bits))
    if e.capabilities is not None:
        sub("configuration/capabilities",
            BE32.pack(len(e.capabilities)) + b"".join(_counted(c) for c in e.capabilities))
    if e.uuid is not None:
        sub("configuration/uuid", e.uuid)
    return b"".join(out)


def _full_header(t: SectionType, section_id: int, idstr: str, instance_id: int, version_id: int) -> bytes:
    return bytes((t,)) + BE32.pack(section_id) + _counted(idstr) + struct.pack(">II", instance_id, version_id)


def encode(event: ev.WireEvent, *, scanner: RecordScanner | None = None) -> bytes:
    """The bytes that carry ``event`` (``ConnectionClosed`` is b"").

    ``scanner`` builds the page records of ``RamPages`` (default: ``default_scanner()``).
    """
    encoder = _ENCODERS.get(type(event))
    if encoder is None:
        # TypeError: what the compiled core's own check of the argument raises for it too
        raise TypeError(f"cannot encode {type(event).__name__}: not a wire event")
    return encoder(event, scanner)


def _discard(e: ev.PostcopyRamDiscard) -> bytes:
    payload = bytes((e.version,)) + _counted(e.idstr) + b"\0" + b"".join(struct.pack(">QQ", s, n) for s, n in e.ranges)
    if len(payload) > 0xFFFF:
        raise LocalProtocolError(f"discard for {e.idstr!r} with {len(e.ranges)} ranges exceeds a command's "
                                 "65535-byte payload", kind="frame_too_large")
    return _command(CMD.POSTCOPY_RAM_DISCARD, payload)


def _packaged(e: ev.Packaged, scanner: RecordScanner | None) -> bytes:
    blob = b"".join(encode(inner, scanner=scanner) for inner in e.events)
    if len(blob) >= 1 << 32:
        raise LocalProtocolError(f"PACKAGED blob of {len(blob)} bytes exceeds be32", kind="packaged_too_large")
    return _command(CMD.PACKAGED, BE32.pack(len(blob))) + blob


def _ram_setup(e: ev.RamSetup) -> bytes:
    out = [BE64.pack(e.total_bytes | RAM_FLAG_MEM_SIZE)]
    for b in e.blocks:
        out.append(_counted(b.idstr) + BE64.pack(b.used_length))
        if b.page_size is not None:
            out.append(BE64.pack(b.page_size))
    return b"".join(out)


def _page_request(e: ev.PageRequest) -> bytes:
    if e.idstr is None:
        return _rp(RP.REQ_PAGES, struct.pack(">QI", e.start, e.length))
    return _rp(RP.REQ_PAGES_ID, struct.pack(">QI", e.start, e.length) + _counted(e.idstr))


_Encoder = Callable[[Any, "RecordScanner | None"], bytes]

#: event type -> its encoder (a table, not a chain of type tests: the switch's events are
#: encoded inside the downtime)
_ENCODERS: dict[type, _Encoder] = {
    ev.StreamHeader: lambda e, _: struct.pack(">II", QEMU_VM_FILE_MAGIC, e.version),
    ev.Configuration: lambda e, _: _config(e),
    ev.OpenReturnPath: lambda e, _: _command(CMD.OPEN_RETURN_PATH),
    ev.Ping: lambda e, _: _command(CMD.PING, BE32.pack(e.value)),
    ev.PostcopyAdvise: lambda e, _: _command(
        CMD.POSTCOPY_ADVISE,
        b"" if e.pagesize_summary is None else struct.pack(">QQ", e.pagesize_summary, e.target_page_size)),
    ev.PostcopyListen: lambda e, _: _command(CMD.POSTCOPY_LISTEN),
    ev.PostcopyRun: lambda e, _: _command(CMD.POSTCOPY_RUN),
    ev.PostcopyResume: lambda e, _: _command(CMD.POSTCOPY_RESUME),
    ev.EnableColo: lambda e, _: _command(CMD.ENABLE_COLO),
    ev.SwitchoverStart: lambda e, _: _command(CMD.SWITCHOVER_START),
    ev.PostcopyRamDiscard: lambda e, _: _discard(e),
    ev.RecvBitmapRequest: lambda e, _: _command(CMD.RECV_BITMAP, _counted(e.idstr)),
    ev.Packaged: _packaged,
    ev.SectionStart: lambda e, _: _full_header(SECTION.START, e.section_id, e.idstr, e.instance_id, e.version_id),
    ev.SectionPart: lambda e, _: bytes((SECTION.PART,)) + BE32.pack(e.section_id),
    ev.SectionEnd: lambda e, _: bytes((SECTION.END,)) + BE32.pack(e.section_id),
    ev.SectionFooter: lambda e, _: bytes((SECTION.FOOTER,)) + BE32.pack(e.section_id),
    ev.RamSetup: lambda e, _: _ram_setup(e),
    ev.RamEos: lambda e, _: BE64.pack(RAM_FLAG_EOS),
    ev.RamPages: lambda e, scanner: (scanner or default_scanner()).encode(
        e.blocks, e.target_page_size, e.records, e.buffer),
    ev.DeviceSection: lambda e, _: (
        _full_header(SECTION.FULL, e.section_id, e.idstr, e.instance_id, e.version_id) + e.payload
        + bytes((SECTION.FOOTER,)) + BE32.pack(e.section_id)),
    ev.EndOfStream: lambda e, _: bytes((SECTION.EOF,)),
    ev.VmDescription: lambda e, _: bytes((SECTION.VMDESCRIPTION,)) + BE32.pack(len(e.json)) + e.json,
    ev.ConnectionClosed: lambda e, _: b"",
    ev.Shut: lambda e, _: _rp(RP.SHUT, BE32.pack(e.value)),
    ev.Pong: lambda e, _: _rp(RP.PONG, BE32.pack(e.value)),
    ev.PageRequest: lambda e, _: _page_request(e),
    ev.RecvBitmap: lambda e, _: (_rp(RP.RECV_BITMAP, _counted(e.idstr)) + BE64.pack(len(e.bitmap)) + e.bitmap
                                 + BE64.pack(RECV_BITMAP_END_MARK)),
    ev.ResumeAck: lambda e, _: _rp(RP.RESUME_ACK, BE32.pack(e.value)),
    ev.SwitchoverAck: lambda e, _: _rp(RP.SWITCHOVER_ACK),
}
