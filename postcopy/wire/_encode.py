"""``encode(event) -> bytes``: the exact wire form of every codec event."""

from __future__ import annotations

import struct

from . import _events as ev
from ._constants import (
    QEMU_VM_FILE_MAGIC,
    RAM_FLAG_EOS,
    RAM_FLAG_MEM_SIZE,
    RECV_BITMAP_END_MARK,
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
    return struct.pack(">BHH", SectionType.COMMAND, cmd, len(payload)) + payload


def _rp(msg: RpMessage, payload: bytes = b"") -> bytes:
    return struct.pack(">HH", msg, len(payload)) + payload


def _config(e: ev.Configuration) -> bytes:
    name = e.machine_type.encode("utf-8", "surrogateescape")
    out = [bytes((SectionType.CONFIGURATION,)), BE32.pack(len(name)), name]

    def sub(n: str, body: bytes) -> None:
        out.extend((bytes((SectionType.SUBSECTION,)), _counted(n), BE32.pack(1), body))

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
    match event:
        case ev.StreamHeader(version=v):
            return struct.pack(">II", QEMU_VM_FILE_MAGIC, v)
        case ev.Configuration():
            return _config(event)
        case ev.OpenReturnPath():
            return _command(Command.OPEN_RETURN_PATH)
        case ev.Ping(value=v):
            return _command(Command.PING, BE32.pack(v))
        case ev.PostcopyAdvise(pagesize_summary=s, target_page_size=t):
            return _command(Command.POSTCOPY_ADVISE, b"" if s is None else struct.pack(">QQ", s, t))
        case ev.PostcopyListen():
            return _command(Command.POSTCOPY_LISTEN)
        case ev.PostcopyRun():
            return _command(Command.POSTCOPY_RUN)
        case ev.PostcopyResume():
            return _command(Command.POSTCOPY_RESUME)
        case ev.EnableColo():
            return _command(Command.ENABLE_COLO)
        case ev.SwitchoverStart():
            return _command(Command.SWITCHOVER_START)
        case ev.PostcopyRamDiscard(idstr=i, ranges=r, version=v):
            payload = bytes((v,)) + _counted(i) + b"\0" + b"".join(struct.pack(">QQ", s, n) for s, n in r)
            if len(payload) > 0xFFFF:
                raise LocalProtocolError(f"discard for {i!r} with {len(r)} ranges exceeds a command's "
                                         "65535-byte payload", kind="frame_too_large")
            return _command(Command.POSTCOPY_RAM_DISCARD, payload)
        case ev.RecvBitmapRequest(idstr=i):
            return _command(Command.RECV_BITMAP, _counted(i))
        case ev.Packaged(events=inner):
            blob = b"".join(encode(e, scanner=scanner) for e in inner)
            if len(blob) >= 1 << 32:
                raise LocalProtocolError(f"PACKAGED blob of {len(blob)} bytes exceeds be32",
                                         kind="packaged_too_large")
            return _command(Command.PACKAGED, BE32.pack(len(blob))) + blob
        case ev.SectionStart(section_id=s, idstr=i, instance_id=n, version_id=v):
            return _full_header(SectionType.START, s, i, n, v)
        case ev.SectionPart(section_id=s):
            return bytes((SectionType.PART,)) + BE32.pack(s)
        case ev.SectionEnd(section_id=s):
            return bytes((SectionType.END,)) + BE32.pack(s)
        case ev.SectionFooter(section_id=s):
            return bytes((SectionType.FOOTER,)) + BE32.pack(s)
        case ev.RamSetup(total_bytes=t, blocks=blocks):
            out = [BE64.pack(t | RAM_FLAG_MEM_SIZE)]
            for b in blocks:
                out.append(_counted(b.idstr) + BE64.pack(b.used_length))
                if b.page_size is not None:
                    out.append(BE64.pack(b.page_size))
            return b"".join(out)
        case ev.RamEos():
            return BE64.pack(RAM_FLAG_EOS)
        case ev.RamPages(blocks=blocks, records=recs, buffer=buf, target_page_size=tps):
            return (scanner or default_scanner()).encode(blocks, tps, recs, buf)
        case ev.DeviceSection(section_id=s, idstr=i, instance_id=n, version_id=v, payload=p):
            return (_full_header(SectionType.FULL, s, i, n, v) + p
                    + bytes((SectionType.FOOTER,)) + BE32.pack(s))
        case ev.EndOfStream():
            return bytes((SectionType.EOF,))
        case ev.VmDescription(json=j):
            return bytes((SectionType.VMDESCRIPTION,)) + BE32.pack(len(j)) + j
        case ev.ConnectionClosed():
            return b""
        case ev.Shut(value=v):
            return _rp(RpMessage.SHUT, BE32.pack(v))
        case ev.Pong(value=v):
            return _rp(RpMessage.PONG, BE32.pack(v))
        case ev.PageRequest(start=s, length=n, idstr=None):
            return _rp(RpMessage.REQ_PAGES, struct.pack(">QI", s, n))
        case ev.PageRequest(start=s, length=n, idstr=i):
            return _rp(RpMessage.REQ_PAGES_ID, struct.pack(">QI", s, n) + _counted(i))  # type: ignore[arg-type]
        case ev.RecvBitmap(idstr=i, bitmap=bm):
            return (_rp(RpMessage.RECV_BITMAP, _counted(i)) + BE64.pack(len(bm)) + bm
                    + BE64.pack(RECV_BITMAP_END_MARK))
        case ev.ResumeAck(value=v):
            return _rp(RpMessage.RESUME_ACK, BE32.pack(v))
        case ev.SwitchoverAck():
            return _rp(RpMessage.SWITCHOVER_ACK)
    raise LocalProtocolError(f"cannot encode {type(event).__name__}: not a wire event", kind="bad_value")
