"""What goes into a session (inputs) and what comes out (actions).

Inputs are things that happened, named with participles; actions are things
the shell must do, named with verbs. Both are frozen, slotted dataclasses.
Connections are small integers the shell assigns; a session never sees a
socket, a thread or a clock (``now`` is passed in, in seconds).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from .. import wire
from ._errors import MigrationFailed
from ._status import MigrationStatus

__all__ = [
    "AcceptPreempt",
    "Action",
    "AnswerBitmapRequest",
    "AttachReturnPath",
    "BreakLink",
    "BulkFinished",
    "Channel",
    "ChannelEnded",
    "ChannelFailed",
    "CheckComplete",
    "CloseChannels",
    "CloseConnection",
    "CollectConnections",
    "Connect",
    "ConnectFailed",
    "Connected",
    "ConnectionAccepted",
    "ConnectionClosed",
    "ConnectionSpoke",
    "ConnectionsCollected",
    "DataPathFailed",
    "DirtyScanned",
    "Discard",
    "DiscardsSent",
    "EndRound",
    "Finish",
    "GuestStopped",
    "HoldStream",
    "Input",
    "MarkAllDirty",
    "OperatorCommand",
    "PauseRequested",
    "PlacePages",
    "PrepareMemory",
    "ReceivePages",
    "ReceiveStream",
    "RecoverRequested",
    "RegisterMemory",
    "ReloadDirty",
    "ResendRequests",
    "ResetBeforeRun",
    "ResumeRequested",
    "ResumeStream",
    "ReturnPathMessage",
    "RoundFinished",
    "ScanDirty",
    "Send",
    "SendDiscards",
    "SendReturnPath",
    "StartBulk",
    "StartGuest",
    "StartPostcopy",
    "StartPreemptReceiver",
    "StartReturnPath",
    "StartRound",
    "StartTracking",
    "StatusChanged",
    "StopGuest",
    "StopTracking",
    "StreamChecked",
    "StreamItem",
    "ThrottleGuest",
    "Write",
    "WriterPriority",
]


class Channel(Enum):
    MAIN = "main"
    PREEMPT = "preempt"


# -- inputs: connections (destination) ----------------------------------------------


@dataclass(frozen=True, slots=True)
class ConnectionAccepted:
    """A new connection on a listener; nothing read from it yet."""

    conn: int
    peer_host: str


@dataclass(frozen=True, slots=True)
class ConnectionSpoke:
    """A pending connection's first byte (b"Q": a stream header; b"\\x08": a command)."""

    conn: int
    first: bytes


@dataclass(frozen=True, slots=True)
class ConnectionsCollected:
    """The answer to :class:`CollectConnections`: every connection that was waiting on a
    listener, accepted now, as ``(conn, peer_host)`` in accept order."""

    accepted: tuple[tuple[int, str], ...]


@dataclass(frozen=True, slots=True)
class ConnectionClosed:
    """A connection ended: EOF, reset, a receive timeout or a failed write."""

    conn: int
    reason: str


@dataclass(frozen=True, slots=True)
class StreamItem:
    """One decoded item of a main channel (control items only once pages go to C)."""

    conn: int
    event: wire.WireEvent


@dataclass(frozen=True, slots=True)
class ChannelEnded:
    """The preempt channel's receiver saw its EOS."""

    conn: int


@dataclass(frozen=True, slots=True)
class DataPathFailed:
    """The C data path or the codec refused a stream (a malformed record, a placement
    error); ``conn`` when it is known whose."""

    kind: str
    message: str
    conn: int | None = None


@dataclass(frozen=True, slots=True)
class StreamChecked:
    """After :class:`CheckComplete`: how many target pages never arrived."""

    missing_pages: int


# -- inputs: the source's channels --------------------------------------------------


@dataclass(frozen=True, slots=True)
class Connected:
    channel: Channel


@dataclass(frozen=True, slots=True)
class ConnectFailed:
    channel: Channel
    reason: str


@dataclass(frozen=True, slots=True)
class ChannelFailed:
    """A channel of the source failed (a write error, the return path closed or silent)."""

    reason: str


@dataclass(frozen=True, slots=True)
class ReturnPathMessage:
    """A return-path message other than a page request (those the C loop serves).
    ``received_at``: when the return path read it (monotonic s; 0: when handled)."""

    event: wire.WireEvent
    received_at: float = 0.0


@dataclass(frozen=True, slots=True)
class GuestStopped:
    """The memory owner stopped the guest; its device state, to send inside PACKAGED."""

    device_sections: tuple[wire.DeviceSection, ...]
    stopped_at: float
    """When the guest stopped (the shell's monotonic clock, seconds): the downtime starts there."""


@dataclass(frozen=True, slots=True)
class BulkFinished:
    """The background stream sent every dirty page."""


@dataclass(frozen=True, slots=True)
class RoundFinished:
    """Precopy: the C stream made its pass over the dirty pages (or :class:`EndRound` cut it short)."""

    bytes: int
    """Bytes it wrote on the main channel."""
    ended: bool = False


@dataclass(frozen=True, slots=True)
class DirtyScanned:
    """After :class:`ScanDirty`: target pages the guest wrote since the last scan (now dirty);
    ``runs``: the discard ranges every dirty page would make now (-1: not counted)."""

    pages: int
    runs: int = -1


@dataclass(frozen=True, slots=True)
class DiscardsSent:
    """After :class:`SendDiscards`: how many ranges went out (``chunk_pages``: the
    target pages a range was widened to, 1 when not)."""

    ranges: int
    chunk_pages: int = 1


# -- inputs: operator commands (QMP) ------------------------------------------------


@dataclass(frozen=True, slots=True)
class PauseRequested:
    """migrate-pause."""


@dataclass(frozen=True, slots=True)
class RecoverRequested:
    """Destination: migrate-recover (a recovery may now come from any peer)."""


@dataclass(frozen=True, slots=True)
class ResumeRequested:
    """Source: migrate with resume."""


@dataclass(frozen=True, slots=True)
class StartPostcopy:
    """Source: migrate-start-postcopy."""


OperatorCommand = PauseRequested | RecoverRequested | ResumeRequested | StartPostcopy

Input = (
    ConnectionAccepted | ConnectionsCollected | ConnectionSpoke | ConnectionClosed | StreamItem | ChannelEnded | DataPathFailed
    | StreamChecked | Connected | ConnectFailed | ChannelFailed | ReturnPathMessage | GuestStopped
    | BulkFinished | RoundFinished | DirtyScanned | DiscardsSent | OperatorCommand
)


# -- actions --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class StatusChanged:
    status: MigrationStatus


@dataclass(frozen=True, slots=True)
class Finish:
    """The migration ended; ``error`` is None when it completed."""

    error: MigrationFailed | None


@dataclass(frozen=True, slots=True)
class CloseConnection:
    """Write ``reply`` (may be empty), then close the connection."""

    conn: int
    reply: bytes = b""


@dataclass(frozen=True, slots=True)
class ReceiveStream:
    """Read ``conn`` as a main channel, decoding every item (the stream up to RUN,
    or a recovery handshake)."""

    conn: int
    recovery: bool


@dataclass(frozen=True, slots=True)
class HoldStream:
    """Decode no further item of main channel ``conn`` until :class:`ResumeStream`."""

    conn: int


@dataclass(frozen=True, slots=True)
class ResumeStream:
    conn: int


@dataclass(frozen=True, slots=True)
class CollectConnections:
    """Accept every connection already waiting on the listeners, now, and answer with
    :class:`ConnectionsCollected` before any other input (a connection the peer made
    before the stream's next bytes is then known before them)."""


@dataclass(frozen=True, slots=True)
class AcceptPreempt:
    """``conn`` is the preempt channel; hold it until :class:`StartPreemptReceiver`."""

    conn: int


@dataclass(frozen=True, slots=True)
class ReceivePages:
    """The main channel ``conn`` goes on in C: pages placed, control items back here.
    ``silence_breaks``: after RUN, silence on it means a broken link (before RUN a held
    switchover may keep a healthy source quiet for long)."""

    conn: int
    silence_breaks: bool = True


@dataclass(frozen=True, slots=True)
class StartPreemptReceiver:
    """Receive the urgent pages of the preempt channel ``conn`` (LISTEN came). ``requests``:
    the source reads page requests on this channel's way back (it said so with
    PREEMPT_REQUESTS_PING): send them there from now on, not on the return path."""

    conn: int
    requests: bool = False


@dataclass(frozen=True, slots=True)
class Send:
    """Write these bytes on ``conn`` (a handshake reply) or on the source's main channel."""

    conn: int | None
    data: bytes


@dataclass(frozen=True, slots=True)
class SendReturnPath:
    """Write one return-path message (shares the fault service's lock)."""

    data: bytes


@dataclass(frozen=True, slots=True)
class AttachReturnPath:
    """Page requests go out on ``conn`` (None: keep them outstanding)."""

    conn: int | None


@dataclass(frozen=True, slots=True)
class AnswerBitmapRequest:
    conn: int
    idstr: str


@dataclass(frozen=True, slots=True)
class ResendRequests:
    """Every outstanding page request again, on the attached return path."""


@dataclass(frozen=True, slots=True)
class PrepareMemory:
    """The stream's RAM setup: the memory owner provides these blocks."""

    layout: wire.RamLayout


@dataclass(frozen=True, slots=True)
class PlacePages:
    """Precopy pages of main channel ``conn``: plain writes, nothing registered yet."""

    conn: int
    pages: wire.RamPages


@dataclass(frozen=True, slots=True)
class Discard:
    block_index: int
    ranges: tuple[tuple[int, int], ...]


@dataclass(frozen=True, slots=True)
class RegisterMemory:
    """LISTEN: register the RAM blocks with userfaultfd and serve faults."""


@dataclass(frozen=True, slots=True)
class StartGuest:
    """RUN: the memory owner loads this device state and starts the guest.

    ``device_sections``: every device section before RUN, in stream order;
    ``in_package``: for each of them, whether it came inside PACKAGED;
    ``configuration``: the stream's configuration section (None: it had none).
    An owner that keeps a VM as received (a snapshot) needs all three.
    """

    device_sections: tuple[wire.DeviceSection, ...]
    configuration: wire.Configuration | None = None
    in_package: tuple[bool, ...] = ()


@dataclass(frozen=True, slots=True)
class BreakLink:
    """Stop the channels' receivers and shut their sockets (the other side notices)."""


@dataclass(frozen=True, slots=True)
class ResetBeforeRun:
    """No guest runs here yet: drop everything received and the channels."""


@dataclass(frozen=True, slots=True)
class CheckComplete:
    """The stream ended: count the pages never received (answer with StreamChecked)."""


@dataclass(frozen=True, slots=True)
class Connect:
    channel: Channel


@dataclass(frozen=True, slots=True)
class Write:
    """Source: write these bytes on a channel; ``last``: nothing may follow on it."""

    channel: Channel
    data: bytes
    last: bool = False


@dataclass(frozen=True, slots=True)
class CloseChannels:
    """Source: stop the data path's loops and close both channels (joining their threads)."""


@dataclass(frozen=True, slots=True)
class StartReturnPath:
    """Source: read the return path (the C loop serves page requests)."""


@dataclass(frozen=True, slots=True)
class StopGuest:
    """Source: stop the guest and save its device state (answer with GuestStopped)."""


@dataclass(frozen=True, slots=True)
class MarkAllDirty:
    """Source: every page is to be sent (a fresh stream)."""


@dataclass(frozen=True, slots=True)
class ReloadDirty:
    """Source, recovery: dirty = not received by the destination."""

    block_index: int
    received_le: bytes


@dataclass(frozen=True, slots=True)
class StartBulk:
    """Source: the background stream of every dirty page (answer with BulkFinished)."""


@dataclass(frozen=True, slots=True)
class StartTracking:
    """Source, precopy: from now on the kernel tracks the guest's writes."""


@dataclass(frozen=True, slots=True)
class StartRound:
    """Source, precopy: one pass of the C stream over the dirty pages, guest running
    (answer with :class:`RoundFinished`). ``resume``: go on with the pass a sync period
    cut (from where it stopped, to the end of the pass) instead of a new pass."""

    index: int
    resume: bool = False


@dataclass(frozen=True, slots=True)
class EndRound:
    """Source, precopy: cut the round in progress short (the switch is due)."""


@dataclass(frozen=True, slots=True)
class ScanDirty:
    """Source, precopy: OR the pages written since the last scan into the dirty
    bitmaps and protect them again (answer with :class:`DirtyScanned`)."""


@dataclass(frozen=True, slots=True)
class SendDiscards:
    """Source, at the switch: POSTCOPY_RAM_DISCARD for every run of dirty host pages
    (QEMU's encoding, 12 ranges a command; answer with :class:`DiscardsSent`).
    ``before_stop``: the guest still runs (the drain before the stop): remember what
    goes now; the discards after the stop then cover only the pages dirty since.
    ``max_ranges`` (guest stopped; 0: no bound): more runs than this are widened to
    aligned chunks, sent again (the destination's cost, in the downtime, is per range)."""

    before_stop: bool = False
    max_ranges: int = 0


@dataclass(frozen=True, slots=True)
class ThrottleGuest:
    """Source, precopy (auto-converge): let the guest's vCPUs run only ``100 - percent``
    % of the time from now on (0: full speed again)."""

    percent: int


@dataclass(frozen=True, slots=True)
class WriterPriority:
    """Source, precopy: run the guest's writers (vCPUs) at ``nice`` so that the migration's
    threads go first; 0: each back at the priority it had."""

    nice: int


@dataclass(frozen=True, slots=True)
class StopTracking:
    """Source: no more dirty tracking (the guest is stopped for good)."""


Action = (
    StatusChanged | Finish | CloseConnection | ReceiveStream | HoldStream | ResumeStream | CollectConnections
    | AcceptPreempt | ReceivePages
    | StartPreemptReceiver | Send | SendReturnPath | AttachReturnPath | AnswerBitmapRequest | ResendRequests
    | PrepareMemory | PlacePages | Discard | RegisterMemory | StartGuest | BreakLink | ResetBeforeRun
    | CheckComplete | Connect | Write | CloseChannels | StartReturnPath | StopGuest | MarkAllDirty | ReloadDirty
    | StartBulk | StartTracking | StartRound | EndRound | ScanDirty | SendDiscards | StopTracking | ThrottleGuest
    | WriterPriority
)
