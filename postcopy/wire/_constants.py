"""Wire constants of QEMU's migration stream (7.2 numbering) and the codec's limits."""

from __future__ import annotations

__all__ = [
    "DEFAULT_HOST_PAGE_SIZE",
    "DEFAULT_MAX_PACKAGED_LENGTH",
    "DEFAULT_TARGET_PAGE_SIZE",
    "MAX_CONFIG_NAME_LENGTH",
    "MAX_DEVICE_SECTION_LENGTH",
    "MAX_RAM_SETUP_LENGTH",
    "MAX_RECV_BITMAP_BYTES",
    "MAX_VMDESC_LENGTH",
    "RECV_BITMAP_END_MARK",
    "RP_MAX_FRAME_LENGTH",
    "Command",
    "RpMessage",
    "SectionType",
]

import enum
from types import SimpleNamespace

QEMU_VM_FILE_MAGIC = 0x5145564D  # "QEVM"
QEMU_VM_FILE_VERSION = 3

DEFAULT_TARGET_PAGE_SIZE = 4096
DEFAULT_HOST_PAGE_SIZE = 4096

# Limits, checked before anything is buffered or allocated for an item.
#: PACKAGED blob: QEMU allows up to 4 GiB; a real pc machine sends ~13 KiB.
DEFAULT_MAX_PACKAGED_LENGTH = 16 * 1024 * 1024  # QEMU: MAX_VM_CMD_PACKAGED_SIZE (1 << 24)
#: QEMU's source refuses RP frames larger than its 512-byte receive buffer.
RP_MAX_FRAME_LENGTH = 512
#: RECV_BITMAP body when the block size is unknown: 64 MiB covers a 2 TiB block at 4 KiB.
MAX_RECV_BITMAP_BYTES = 64 * 1024 * 1024
#: Opaque FULL device section outside a PACKAGED blob (found by its footer).
MAX_DEVICE_SECTION_LENGTH = 16 * 1024 * 1024
#: RAM setup record list (MEM_SIZE + block entries); ~20 bytes per block.
MAX_RAM_SETUP_LENGTH = 1024 * 1024
#: Machine-type name in the configuration section.
MAX_CONFIG_NAME_LENGTH = 1024
#: VMDESCRIPTION JSON after a precopy EOF.
MAX_VMDESC_LENGTH = 64 * 1024 * 1024

RECV_BITMAP_END_MARK = 0x0123456789ABCDEF


class SectionType(enum.IntEnum):
    EOF = 0x00
    START = 0x01
    PART = 0x02
    END = 0x03
    FULL = 0x04
    SUBSECTION = 0x05
    VMDESCRIPTION = 0x06
    CONFIGURATION = 0x07
    COMMAND = 0x08
    FOOTER = 0x7E


class Command(enum.IntEnum):
    """MIG_CMD_* as numbered by QEMU 7.2 (PACKAGED is 7)."""

    OPEN_RETURN_PATH = 1
    PING = 2
    POSTCOPY_ADVISE = 3
    POSTCOPY_LISTEN = 4
    POSTCOPY_RUN = 5
    POSTCOPY_RAM_DISCARD = 6
    PACKAGED = 7
    ENABLE_COLO = 8
    POSTCOPY_RESUME = 9
    RECV_BITMAP = 10
    SWITCHOVER_START = 11  # 10.0+


#: Fixed ``len`` of fixed-length commands (the others are checked by their decoder).
COMMAND_FIXED_LENGTH: dict[Command, int] = {
    Command.OPEN_RETURN_PATH: 0,
    Command.PING: 4,
    Command.POSTCOPY_LISTEN: 0,
    Command.POSTCOPY_RUN: 0,
    Command.PACKAGED: 4,
    Command.ENABLE_COLO: 0,
    Command.POSTCOPY_RESUME: 0,
    Command.SWITCHOVER_START: 0,
}


class RpMessage(enum.IntEnum):
    """Return-path message types (enum mig_rp_message_type)."""

    SHUT = 1
    PONG = 2
    REQ_PAGES_ID = 3
    REQ_PAGES = 4
    RECV_BITMAP = 5
    RESUME_ACK = 6
    SWITCHOVER_ACK = 7  # 8.1+


RP_FIXED_LENGTH: dict[RpMessage, int] = {
    RpMessage.SHUT: 4,
    RpMessage.PONG: 4,
    RpMessage.REQ_PAGES: 12,
    RpMessage.RESUME_ACK: 4,
    RpMessage.SWITCHOVER_ACK: 0,
}

# The members again, as plain attributes, for the codec's per-item paths: on 3.11 a lookup like
# ``SectionType.COMMAND`` goes through EnumType.__getattr__'s slow hook (~0.2 us, six times a
# plain class attribute), and the switch's items are coded inside the downtime. Same members.
SECTION = SimpleNamespace(**SectionType.__members__)
CMD = SimpleNamespace(**Command.__members__)
RP = SimpleNamespace(**RpMessage.__members__)

# RAM_SAVE_FLAG_*: the low bits of a page record's be64 offset word.
RAM_FLAG_FULL = 0x001  # obsolete; never sent
RAM_FLAG_ZERO = 0x002
RAM_FLAG_MEM_SIZE = 0x004
RAM_FLAG_PAGE = 0x008
RAM_FLAG_EOS = 0x010
RAM_FLAG_CONTINUE = 0x020
RAM_FLAG_XBZRLE = 0x040
RAM_FLAG_HOOK = 0x080
RAM_FLAG_COMPRESS_PAGE = 0x100
RAM_FLAG_MULTIFD_FLUSH = 0x200

RAM_CHANNEL_MAIN = 0  # RAM_CHANNEL_PRECOPY
RAM_CHANNEL_PREEMPT = 1  # RAM_CHANNEL_POSTCOPY
