"""Protocol errors of the wire codec.

Decoders raise :class:`LocalProtocolError` internally; the one inbound entry
point, ``next_event()``, turns it into :class:`RemoteProtocolError` (the peer
sent something wrong) and refuses further input.  Every error has a ``kind``,
a short stable string usable as a metrics label.
"""

from __future__ import annotations

from typing import TypeVar

__all__ = ["ERROR_KINDS", "LocalProtocolError", "ProtocolError", "RemoteProtocolError"]

#: Every ``kind`` a codec error may carry (closed set: safe as a metrics label).
ERROR_KINDS: frozenset[str] = frozenset(
    {
        "after_eof",  # data fed after EOF
        "after_error",  # decoder used after it failed
        "bad_footer",  # section footer missing or names another section
        "bad_length",  # fixed-length command / RP message with the wrong len
        "bad_magic",
        "bad_value",  # a field holds a value the format forbids
        "bad_version",
        "bitmap_end_mark",
        "bitmap_size",
        "compressed_page",
        "device_section_too_large",
        "empty_idstr",
        "eos_offset",
        "frame_too_large",  # RP frame len > 512, or a bounded item grew too big
        "host_page_split",
        "mem_size",  # MEM_SIZE record misplaced or block sizes not adding up
        "multifd_flush",
        "nested_packaged",
        "no_previous_block",  # CONTINUE / REQ_PAGES without a block named before
        "no_ram_setup",
        "offset_out_of_block",
        "packaged_too_large",
        "page_size_mismatch",
        "ram_hook",
        "target_page_size",
        "trailing_data",
        "truncated",
        "unaligned",
        "unknown_block",
        "unknown_command",
        "unknown_message",  # unknown return-path message type
        "unknown_section",  # PART/END for a section id never started
        "unknown_section_type",
        "unknown_subsection",
        "unsupported_section",  # iterable section other than "ram"
        "bad_flags",
        "xbzrle",
    }
)


_E = TypeVar("_E", bound="ProtocolError")


class ProtocolError(Exception):
    """Abstract base: the byte stream broke the protocol.

    ``kind`` is one of :data:`ERROR_KINDS`; ``offset`` is the stream offset
    (bytes from the start of the connection) of the offending item, when known.
    """

    kind: str
    offset: int | None

    def __init__(self, message: str, *, kind: str, offset: int | None = None) -> None:
        if type(self) is ProtocolError:
            raise TypeError("ProtocolError is abstract: raise LocalProtocolError or RemoteProtocolError")
        if kind not in ERROR_KINDS:
            raise ValueError(f"unknown protocol error kind {kind!r}")
        self.kind = kind
        self.offset = offset
        if offset is not None:
            message = f"{message} (at stream offset {offset})"
        super().__init__(message)

    def _as(self, cls: type[_E]) -> _E:
        err = cls.__new__(cls)
        Exception.__init__(err, *self.args)
        err.kind = self.kind
        err.offset = self.offset
        return err


class LocalProtocolError(ProtocolError):
    """We were asked to decode or encode something the protocol forbids."""


class RemoteProtocolError(ProtocolError):
    """The peer sent bytes that break the protocol."""
