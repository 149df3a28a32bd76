"""Decoder of the postcopy-preempt channel: bare page records, optional final EOS."""

from __future__ import annotations

from . import _events as ev
from ._constants import RAM_CHANNEL_PREEMPT
from ._decoder import NEED_DATA, BaseDecoder, NeedData, describe_bytes
from ._errors import LocalProtocolError
from ._ram import RamRecordReader
from ._scanner import RecordScanner, default_scanner

__all__ = ["PreemptDecoder"]


class PreemptDecoder(BaseDecoder):
    """Preempt channel (source -> destination): needs the RAM ``layout`` of the main stream.

    Records follow postcopy rules (whole host pages, back to back).  How it ends
    depends on the source (``PeerProfile.preempt_eos``):

    * 7.1/7.2, and 8.0+ with machine types <= 7.2 (``x-preempt-pre-7-2``): EOS
      after the main stream's EOF (``migration_completion_postcopy`` calls
      ``postcopy_preempt_shutdown_file`` only when ``preempt_pre_7_2``);
    * 8.0+ otherwise: no EOS, and the source does not close it first either.
      The destination ends the channel itself once the main stream's EOF has
      been read and every requested page was placed: call :meth:`end_locally`.

    EOF from the peer at a record boundary is a clean ``ConnectionClosed``
    whether or not EOS came (``saw_eos`` tells which). ``scanner`` as for
    ``MainStreamDecoder``.
    """

    def __init__(self, *, layout: ev.RamLayout, scanner: RecordScanner | None = None) -> None:
        super().__init__()
        self.layout = layout
        self.scanner = scanner if scanner is not None else default_scanner()
        self._ram = RamRecordReader(layout, RAM_CHANNEL_PREEMPT, postcopy=True, scanner=self.scanner)
        self._saw_eos = False

    @property
    def saw_eos(self) -> bool:
        return self._saw_eos

    @property
    def at_boundary(self) -> bool:
        """True when no partial record is buffered (the channel may be ended here)."""
        return len(self._buf) == 0

    def end_locally(self) -> ev.ConnectionClosed:
        """The destination ends the channel itself (8.0+ sources send no EOS).

        Call after the main stream's EOF, once ``next_event()`` has returned
        NEED_DATA (everything received was decoded).  Returns the final
        ``ConnectionClosed``; raises RemoteProtocolError ``truncated`` when a
        record was left half-received.  The decoder takes no more input after.
        """
        if self._pending:
            raise LocalProtocolError("end_locally() with events not yet taken by next_event()",
                                     kind="bad_value")
        if not self._buf.eof:
            self.receive_data(b"")
        event = self.next_event()
        if not isinstance(event, ev.ConnectionClosed):
            self._pending.appendleft(event)  # type: ignore[arg-type]
            raise LocalProtocolError("end_locally() with complete records not yet decoded: call "
                                     "next_event() until NEED_DATA first", kind="bad_value")
        return event

    def _step(self) -> ev.WireEvent | NeedData:
        if self._saw_eos:
            if len(self._buf):
                raise self._fail("trailing_data", f"{len(self._buf)} bytes after the preempt channel's EOS: "
                                 f"{describe_bytes(self._buf.peek(len(self._buf)) or b'')}")
            return NEED_DATA
        event = self._ram.step(self)
        if isinstance(event, ev.RamEos) or self._pending:
            self._saw_eos = True
        return event
