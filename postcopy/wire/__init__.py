"""Sans-IO codec of QEMU's migration stream (byte-compatible with QEMU 7.2).

Decoders (``MainStreamDecoder``, ``PreemptDecoder``, ``ReturnPathDecoder``)
take bytes with ``receive_data`` (b"" = EOF) and give events with
``next_event`` (or ``NEED_DATA``); ``encode(event)`` gives the exact bytes back.
No sockets, clocks or event loops here, and nothing of the C core at import: the
bulk work on page records goes through a ``RecordScanner`` (``scanner=``),
by default the C one of ``uffd._native`` when it is built, else ``PYTHON_SCANNER``.
"""

from __future__ import annotations

from ._constants import (
    DEFAULT_HOST_PAGE_SIZE,
    DEFAULT_MAX_PACKAGED_LENGTH,
    DEFAULT_TARGET_PAGE_SIZE,
    MAX_DEVICE_SECTION_LENGTH,
    MAX_RAM_SETUP_LENGTH,
    MAX_RECV_BITMAP_BYTES,
    RECV_BITMAP_END_MARK,
    RP_MAX_FRAME_LENGTH,
    Command,
    RpMessage,
    SectionType,
)
from ._decoder import NEED_DATA, NeedData
from ._encode import encode
from ._errors import ERROR_KINDS, LocalProtocolError, ProtocolError, RemoteProtocolError
from ._events import (
    RAM_RECORD,
    Configuration,
    ConnectionClosed,
    DeviceSection,
    EnableColo,
    EndOfStream,
    WireEvent,
    OpenReturnPath,
    Packaged,
    PageRequest,
    Ping,
    Pong,
    PostcopyAdvise,
    PostcopyListen,
    PostcopyRamDiscard,
    PostcopyResume,
    PostcopyRun,
    RamBlockLayout,
    RamBlockEntry,
    RamEos,
    RamLayout,
    RamPages,
    RamRecord,
    RamSetup,
    RecvBitmap,
    RecvBitmapRequest,
    ResumeAck,
    SectionEnd,
    SectionFooter,
    SectionPart,
    SectionStart,
    Shut,
    StreamHeader,
    SwitchoverAck,
    SwitchoverStart,
    VmDescription,
)
from ._main import MainStreamDecoder
from ._preempt import PreemptDecoder
from ._return_path import ReturnPathDecoder, recv_bitmap_size
from ._ramscan_ref import PYTHON_SCANNER
from ._scanner import ChannelScanner, RecordScanner, c_scanner, default_scanner
from ._channels import ChannelKind, classify_channel
from ._peer import BASELINE_VERSION, PeerProfile, machine_type_version

__all__ = [
    "BASELINE_VERSION",
    "DEFAULT_HOST_PAGE_SIZE",
    "DEFAULT_MAX_PACKAGED_LENGTH",
    "DEFAULT_TARGET_PAGE_SIZE",
    "ERROR_KINDS",
    "MAX_DEVICE_SECTION_LENGTH",
    "MAX_RAM_SETUP_LENGTH",
    "MAX_RECV_BITMAP_BYTES",
    "NEED_DATA",
    "PYTHON_SCANNER",
    "RAM_RECORD",
    "RECV_BITMAP_END_MARK",
    "RP_MAX_FRAME_LENGTH",
    "ChannelKind",
    "ChannelScanner",
    "Command",
    "Configuration",
    "ConnectionClosed",
    "DeviceSection",
    "EnableColo",
    "EndOfStream",
    "LocalProtocolError",
    "MainStreamDecoder",
    "NeedData",
    "OpenReturnPath",
    "Packaged",
    "PageRequest",
    "PeerProfile",
    "Ping",
    "Pong",
    "PostcopyAdvise",
    "PostcopyListen",
    "PostcopyRamDiscard",
    "PostcopyResume",
    "PostcopyRun",
    "PreemptDecoder",
    "ProtocolError",
    "RamBlockEntry",
    "RamBlockLayout",
    "RamEos",
    "RamLayout",
    "RamPages",
    "RamRecord",
    "RamSetup",
    "RecordScanner",
    "RecvBitmap",
    "RecvBitmapRequest",
    "RemoteProtocolError",
    "ResumeAck",
    "ReturnPathDecoder",
    "RpMessage",
    "SectionEnd",
    "SectionFooter",
    "SectionPart",
    "SectionStart",
    "SectionType",
    "Shut",
    "StreamHeader",
    "SwitchoverAck",
    "SwitchoverStart",
    "VmDescription",
    "WireEvent",
    "c_scanner",
    "classify_channel",
    "default_scanner",
    "encode",
    "machine_type_version",
    "recv_bitmap_size",
    "tally_pages",
]


def tally_pages(records: bytes, nblocks: int, *, scanner: RecordScanner | None = None) -> list[tuple[int, int]]:
    """(normal, zero) page-record counts per block index of ``RamPages.records``."""
    return (scanner or default_scanner()).tally(records, nblocks)
