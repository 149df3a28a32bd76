"""Decoder of the postcopy-preempt channel: bare page records, optional final EOS."""

from __future__ import annotations

from . import _events as ev
from ._constants import RAM_CHANNEL_PREEMPT
from ._decoder import NEED_DATA, BaseDecoder, NeedData, describe_bytes
from ._ram import RamRecordReader
from ._scanner import RecordScanner, default_scanner

__all__ = ["PreemptDecoder"]


class PreemptDecoder(BaseDecoder):
    """Preempt channel (source -> destination): needs the RAM ``layout`` of the main stream.

    Records follow postcopy rules (whole host pages, back to back).  A 7.2
    source ends with EOS after the main stream's EOF; 8.0+ just closes.
    ``scanner`` as for ``MainStreamDecoder``.
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
