"""Decoder of the main channel (source -> destination), including PACKAGED blobs."""

from __future__ import annotations

import struct
from collections.abc import Mapping

from . import _events as ev
from ._constants import (
    CMD,
    COMMAND_FIXED_LENGTH,
    DEFAULT_HOST_PAGE_SIZE,
    DEFAULT_MAX_PACKAGED_LENGTH,
    DEFAULT_TARGET_PAGE_SIZE,
    MAX_CONFIG_NAME_LENGTH,
    MAX_DEVICE_SECTION_LENGTH,
    MAX_RAM_SETUP_LENGTH,
    MAX_VMDESC_LENGTH,
    QEMU_VM_FILE_MAGIC,
    QEMU_VM_FILE_VERSION,
    RAM_CHANNEL_MAIN,
    RAM_FLAG_EOS,
    RAM_FLAG_MEM_SIZE,
    SECTION,
    Command,
    SectionType,
)
from ._decoder import BE32, BE64, NEED_DATA, BaseDecoder, NeedData, Short, describe_bytes
from ._errors import LocalProtocolError, RemoteProtocolError
from ._ram import RamRecordReader
from ._scanner import RecordScanner, default_scanner

__all__ = ["MainStreamDecoder"]

_BE16_PAIR = struct.Struct(">HH")       # a command's number and length
#: command number -> (the command, its fixed length or None, what is being decoded)
_COMMANDS = {int(c): (c, COMMAND_FIXED_LENGTH.get(c), f"{c.name} command") for c in Command}

_SUBSECTIONS = ("configuration/target-page-bits", "configuration/capabilities", "configuration/uuid")


def _text(b: bytes | bytearray | memoryview) -> str:
    return bytes(b).decode("utf-8", "surrogateescape")


class _SetupProgress:
    """How far the RAM setup at the front has been parsed (blocks read so far)."""

    __slots__ = ("blocks", "entries", "names", "pos", "running", "total")

    def __init__(self, total: int) -> None:
        self.total = total
        self.pos = 8  # after the MEM_SIZE word
        self.running = 0
        self.entries: list[ev.RamBlockEntry] = []
        self.blocks: list[ev.RamBlockLayout] = []
        self.names: set[str] = set()


class MainStreamDecoder(BaseDecoder):
    """Main channel: header, configuration, sections, RAM, commands, EOF.

    Local knowledge the stream does not carry:

    * ``block_page_sizes``: optional host page sizes of huge-page backed blocks
      (idstr -> bytes), checked against the stream.  Not needed: once postcopy
      is advised, the RAM setup's optional page-size fields are recognised from
      the bytes themselves (see ``_inferred_page_size``); a block without one
      has ``host_page_size``.  Without ADVISE a hint sets the block's page size.
    * ``recovery=True``: a postcopy-recovery connection (no header; it starts
      with commands); pass the ``layout`` learnt from the original stream.

    ``scanner`` scans the page records (default: ``default_scanner()``, the C
    scanner when the compiled core is built, else the Python reference).
    """

    def __init__(
        self,
        *,
        recovery: bool = False,
        layout: ev.RamLayout | None = None,
        block_page_sizes: Mapping[str, int] | None = None,
        host_page_size: int = DEFAULT_HOST_PAGE_SIZE,
        target_page_size: int = DEFAULT_TARGET_PAGE_SIZE,
        max_packaged_length: int = DEFAULT_MAX_PACKAGED_LENGTH,
        require_configuration: bool = True,
        scanner: RecordScanner | None = None,
        _nested: bool = False,
    ) -> None:
        super().__init__()
        self.scanner = scanner if scanner is not None else default_scanner()
        self.block_page_sizes = dict(block_page_sizes or {})
        self.host_page_size = host_page_size
        self.target_page_size = target_page_size
        self.max_packaged_length = max_packaged_length
        self.require_configuration = require_configuration
        self._nested = _nested
        self._state = "items" if (recovery or _nested) else "header"
        self._iterables: dict[int, str] = {}
        self._advised = False
        self._postcopy = recovery  # a recovery stream only happens after RUN
        self._footer_id = 0
        self._saw_eof = False
        self._dev_search_from = 0
        self._setup: _SetupProgress | None = None
        #: capability-list progress of the configuration: (list start, capabilities read, next pos)
        self._config_caps: tuple[int, list[str], int] | None = None
        self._ram: RamRecordReader | None = None
        self.layout: ev.RamLayout | None = None
        if layout is not None:
            self._set_layout(layout)

    # -- public state --------------------------------------------------------

    @property
    def postcopy(self) -> bool:
        """True once LISTEN was decoded: page records then follow postcopy rules."""
        return self._postcopy

    def _complete(self) -> bool:
        return self._saw_eof

    def _set_layout(self, layout: ev.RamLayout) -> None:
        self.layout = layout
        if layout.section_id is not None:
            self._iterables[layout.section_id] = "ram"
        # built at the first RAM section that needs it: a decoder of commands alone (a PACKAGED
        # blob, the control items between page runs) never pays for a record scanner
        self._ram = None

    # -- the state machine ---------------------------------------------------

    def _step(self) -> ev.WireEvent | NeedData:
        st = self._state
        if st == "ram_records":
            self._expecting = "RAM page record"
            assert self._ram is not None
            event = self._ram.step(self)
            if isinstance(event, ev.RamEos) or self._pending:
                self._state = "footer"
            return event
        if self._buf.size == 0:
            return NEED_DATA
        if st == "items":
            return self._item()
        if st == "header":
            return self._header()
        if st == "config":
            return self._configuration()
        if st == "ram_setup":
            return self._ram_setup()
        if st == "ram_setup_eos":
            self._expecting = "RAM setup EOS"
            word = BE64.unpack(self._need(8))[0]
            if word != RAM_FLAG_EOS:
                raise self._fail("bad_flags", f"RAM setup must end with EOS (0x10), got {word:#018x}")
            self._buf.consume(8)
            self._state = "footer"
            return ev.RamEos()
        if st == "footer":
            self._expecting = "section footer"
            view = self._need(5)
            if view[0] != SECTION.FOOTER or BE32.unpack_from(view, 1)[0] != self._footer_id:
                raise self._fail("bad_footer", f"expected footer 7e {self._footer_id:08x} for section "
                                 f"{self._footer_id}, got {describe_bytes(view)}")
            self._buf.consume(5)
            self._state = "items"
            return ev.SectionFooter(section_id=self._footer_id)
        if st == "after_eof":
            return self._after_eof()
        raise self._fail("trailing_data", f"{len(self._buf)} bytes after the end of the stream: "
                         f"{describe_bytes(self._buf.peek(len(self._buf)) or b'')}")

    def _header(self) -> ev.WireEvent:
        self._expecting = "stream header"
        view = self._need(8)
        magic, version = struct.unpack(">II", view)
        if magic != QEMU_VM_FILE_MAGIC:
            raise self._fail("bad_magic", f"stream starts with {describe_bytes(view[:4])}, not the QEVM "
                             f"magic 51 45 56 4d (a recovery stream starts with commands: recovery=True)")
        if version != QEMU_VM_FILE_VERSION:
            raise self._fail("bad_version", f"stream version {version}, expected {QEMU_VM_FILE_VERSION}"
                             + (" (version 2 is the unsupported compat format)" if version == 2 else ""))
        self._buf.consume(8)
        self._state = "config"
        return ev.StreamHeader(version=version)

    def _configuration(self) -> ev.WireEvent | NeedData:
        self._expecting = "configuration section"
        view = self._need(1)
        if view[0] != SECTION.CONFIGURATION:
            if self.require_configuration:
                raise self._fail("unknown_section_type", f"expected the configuration section (0x07) after "
                                 f"the header, got byte {view[0]:#04x}")
            self._state = "items"
            return self._item()
        cap = 5 + MAX_CONFIG_NAME_LENGTH * 65 + 512

        def need(n: int) -> bytearray:
            return self._grow(n, cap)

        n = BE32.unpack_from(need(5), 1)[0]
        if n > MAX_CONFIG_NAME_LENGTH:
            raise self._fail("frame_too_large", f"machine type name of {n} bytes exceeds "
                             f"{MAX_CONFIG_NAME_LENGTH}")
        pos = 5 + n
        name = _text(need(pos)[5:pos])
        found: dict[str, object] = {}
        last = -1
        while True:
            if len(self._buf) == pos and self._buf.eof:
                break
            data = need(pos + 1)
            if data[pos] != SECTION.SUBSECTION:
                break
            sub_len = need(pos + 2)[pos + 1]
            head = need(pos + 2 + sub_len + 4)
            sub = _text(head[pos + 2 : pos + 2 + sub_len])
            version = BE32.unpack_from(head, pos + 2 + sub_len)[0]
            if sub not in _SUBSECTIONS:
                raise self._fail("unknown_subsection", f"configuration subsection {sub!r} is unknown "
                                 f"(known: {', '.join(_SUBSECTIONS)})", pos)
            if _SUBSECTIONS.index(sub) <= last or version != 1:
                raise self._fail("bad_value", f"configuration subsection {sub!r} version {version} "
                                 "out of order or not version 1", pos)
            last = _SUBSECTIONS.index(sub)
            body = pos + 2 + sub_len + 4
            if sub == "configuration/target-page-bits":
                found["target_page_bits"] = BE32.unpack_from(need(body + 4), body)[0]
                pos = body + 4
            elif sub == "configuration/uuid":
                found["uuid"] = bytes(need(body + 16)[body : body + 16])
                pos = body + 16
            else:
                count = BE32.unpack_from(need(body + 4), body)[0]
                pos = body + 4
                # the list can be long: resume at the first capability not read yet
                list_at = pos
                if self._config_caps is not None and self._config_caps[0] == list_at:
                    caps, pos = self._config_caps[1], self._config_caps[2]
                else:
                    caps = []
                while len(caps) < count:
                    if pos > MAX_CONFIG_NAME_LENGTH * 64:
                        raise self._fail("frame_too_large", f"capability list of {count} entries too long")
                    clen = need(pos + 1)[pos]
                    caps.append(_text(need(pos + 1 + clen)[pos + 1 : pos + 1 + clen]))
                    pos += 1 + clen
                    self._config_caps = (list_at, caps, pos)
                found["capabilities"] = tuple(caps)
        self._config_caps = None
        event = ev.Configuration(machine_type=name, **found)  # type: ignore[arg-type]
        self._buf.consume(pos)
        self._drop_acc()
        self._state = "items"
        return event

    def _item(self) -> ev.WireEvent | NeedData:
        self._expecting = "section or command header"
        t = self._buf.front()[0]       # _step saw a byte buffered
        if t == SECTION.COMMAND:
            return self._command()
        if t == SECTION.EOF:
            self._buf.consume(1)
            self._saw_eof = True
            self._state = "after_eof"
            return ev.EndOfStream()
        if t in (SECTION.START, SECTION.FULL):
            return self._full_header(t)
        if t in (SECTION.PART, SECTION.END):
            view = self._need(5)
            sid = BE32.unpack_from(view, 1)[0]
            if self._iterables.get(sid) is None:
                raise self._fail("unknown_section", f"section {'PART' if t == 2 else 'END'} for section id "
                                 f"{sid}, which no START introduced (known: {sorted(self._iterables)})")
            if self.layout is None:
                raise self._fail("no_ram_setup", f"RAM section {sid} continues without a RAM setup")
            if self._ram is None:
                self._ram = RamRecordReader(self.layout, RAM_CHANNEL_MAIN, postcopy=self._postcopy,
                                            scanner=self.scanner)
            self._buf.consume(5)
            self._footer_id = sid
            self._state = "ram_records"
            return ev.SectionPart(section_id=sid) if t == SECTION.PART else ev.SectionEnd(section_id=sid)
        names = {int(s): s.name for s in SectionType}
        raise self._fail("unknown_section_type", f"unknown section type byte {t:#04x}"
                         + (f" ({names[t]} is not valid here)" if t in names else ""))

    def _full_header(self, t: int) -> ev.WireEvent:
        kind = "START" if t == SECTION.START else "FULL"
        self._expecting = f"section {kind} header"
        view = self._need(6)
        sid = BE32.unpack_from(view, 1)[0]
        idlen = view[5]
        if idlen == 0:
            raise self._fail("empty_idstr", f"section {kind} {sid} has an empty idstr")
        hdr = 6 + idlen + 8
        view = self._need(hdr)
        idstr = _text(view[6 : 6 + idlen])
        instance_id, version_id = struct.unpack_from(">II", view, 6 + idlen)
        if t == SECTION.FULL:
            return self._device_section(sid, idstr, instance_id, version_id, hdr)
        if idstr != "ram" or self._nested:
            raise self._fail("unsupported_section", f"iterable section {idstr!r} (id {sid}) "
                             + ("inside a PACKAGED blob " if self._nested else "")
                             + "is not supported: only 'ram' is self-delimiting")
        self._buf.consume(hdr)
        self._iterables[sid] = idstr
        self._footer_id = sid
        self._state = "ram_setup"
        return ev.SectionStart(section_id=sid, idstr=idstr, instance_id=instance_id, version_id=version_id)

    def _plausible_next(self, data: bytearray, q: int, at_end: bool, more: bool) -> bool | None:
        """Is there a valid item start at ``q``?  None: cannot tell yet (``more``: bytes past
        ``data`` are buffered already)."""
        if q >= len(data):
            return True if at_end else None
        t = data[q]
        if t == SECTION.EOF:
            # Device state is full of zero bytes, and EOF is 0x00: "7e <sid> 00" inside it is no
            # footer unless the stream can end there (nothing may follow EOF but a VMDESCRIPTION,
            # and nothing at all inside a PACKAGED blob).
            if q + 1 >= len(data):
                return True if at_end or not (more or self._nested) else None
            if self._nested or data[q + 1] != SECTION.VMDESCRIPTION:
                return False
            if len(data) < q + 7:
                return False if at_end else None
            return BE32.unpack_from(data, q + 2)[0] <= MAX_VMDESC_LENGTH and data[q + 6] == ord("{")
        if t == SECTION.COMMAND:
            if len(data) < q + 5:
                return False if at_end else None
            cmd, ln = struct.unpack_from(">HH", data, q + 1)
            known = _COMMANDS.get(cmd)
            return known is not None and (known[1] is None or known[1] == ln)
        if t in (SECTION.START, SECTION.FULL):
            if len(data) < q + 6 or len(data) < q + 6 + data[q + 5]:
                return False if at_end else None
            name = bytes(data[q + 6 : q + 6 + data[q + 5]])  # (a bytes slice: mypyc iterates bytes, not bytearray)
            return bool(name) and all(0x20 <= c < 0x7F for c in name)
        if t in (SECTION.PART, SECTION.END):
            if len(data) < q + 5:
                return False if at_end else None
            return BE32.unpack_from(data, q + 1)[0] in self._iterables
        return False

    def _device_section(self, sid: int, idstr: str, instance_id: int, version_id: int, hdr: int) -> ev.WireEvent:
        """A device section ends at the first footer ``7e <sid>`` followed by a plausible item.

        The bytes are copied once into the item copy (``_grow``, at least
        doubling it per look) and the footer search resumes where the last look
        stopped (``_dev_search_from``), so a section that arrives in small
        pieces costs time linear in its size.
        """
        self._expecting = f"device section {idstr!r}"
        limit = hdr + MAX_DEVICE_SECTION_LENGTH + 5 + 512
        buffered = len(self._buf)
        pattern = bytes((SECTION.FOOTER,)) + BE32.pack(sid)
        have = len(self._acc) if self._acc_at == self._buf.consumed else 0
        want = max(hdr, min(have + 1, buffered))
        verdict: bool | None = False
        while True:
            data = self._grow(want, limit)
            avail = len(data)
            at_end = avail == buffered and (self._nested or self._buf.eof)
            p = data.find(pattern, max(hdr, self._dev_search_from))
            while p >= 0:
                verdict = self._plausible_next(data, p + 5, at_end, avail < buffered)
                if verdict is None:
                    break
                if verdict:
                    if p - hdr > MAX_DEVICE_SECTION_LENGTH:
                        break
                    payload = bytes(memoryview(data)[hdr:p])
                    self._buf.consume(p + 5)
                    self._dev_search_from = 0
                    self._drop_acc()
                    return ev.DeviceSection(section_id=sid, idstr=idstr, instance_id=instance_id,
                                            version_id=version_id, payload=payload)
                p = data.find(pattern, p + 1)
            if p >= 0 and verdict is None:  # a footer whose next item has not fully arrived
                self._dev_search_from = p
            else:
                self._dev_search_from = max(hdr, avail - 4)
            if p >= 0 and verdict is not None:  # a footer past the limit
                break
            if avail >= min(buffered, limit):
                break
            want = avail + 1  # more is buffered: look at (at least twice) more of it
        if avail - hdr > MAX_DEVICE_SECTION_LENGTH:
            raise self._fail("device_section_too_large", f"device section {idstr!r} (id {sid}) has no "
                             f"footer within {MAX_DEVICE_SECTION_LENGTH} bytes")
        if self._nested:
            raise self._fail("bad_footer", f"device section {idstr!r} (id {sid}) has no footer "
                             f"7e {sid:08x} before the end of the PACKAGED blob")
        raise Short(buffered + 1)

    def _ram_setup(self) -> ev.WireEvent:
        """The RAM setup: MEM_SIZE total, then (idstr, used_length[, page size]) per block.

        Parsed as it arrives: the bytes are copied once into the item copy
        (``_grow``) and the parse resumes at the first block not read yet
        (``_setup``), so a setup that arrives in small pieces costs time linear
        in its size.
        """
        self._expecting = "RAM setup"
        tps = self.target_page_size
        cap = MAX_RAM_SETUP_LENGTH + 1 + 255 + 16
        st = self._setup
        if st is None:
            word = BE64.unpack_from(self._grow(8, cap), 0)[0]
            total, flags = word & ~(tps - 1), word & (tps - 1)
            if flags != RAM_FLAG_MEM_SIZE:
                raise self._fail("mem_size", f"RAM setup starts with flags {flags:#x}, expected MEM_SIZE (0x4)")
            st = self._setup = _SetupProgress(total)
        total = st.total
        while st.running < total:
            pos = st.pos
            if pos > MAX_RAM_SETUP_LENGTH:
                raise self._fail("frame_too_large", f"RAM setup longer than {MAX_RAM_SETUP_LENGTH} bytes")
            idlen = self._grow(pos + 1, cap)[pos]
            if idlen == 0:
                raise self._fail("empty_idstr", "RAM setup block with an empty idstr", pos)
            data = self._grow(pos + 1 + idlen + 8, cap)
            idstr = _text(data[pos + 1 : pos + 1 + idlen])
            used = BE64.unpack_from(data, pos + 1 + idlen)[0]
            end = pos + 1 + idlen + 8
            running = st.running + used
            if running > total:
                raise self._fail("mem_size", f"block sizes exceed the MEM_SIZE total {total:#x} at block "
                                 f"{idstr!r} (sum {running:#x})", pos)
            hint = self.block_page_sizes.get(idstr)
            local = self.host_page_size if hint is None else hint
            page_size = None
            if self._advised:
                page_size = self._inferred_page_size(end, last=running == total)
                end += 0 if page_size is None else 8
                local = self.host_page_size if page_size is None else page_size
                if hint is not None and local != hint:
                    raise self._fail("page_size_mismatch", f"block {idstr!r}: sender's page size "
                                     f"{local:#x} differs from the local {hint:#x}", pos)
            if idstr in st.names:
                raise self._fail("bad_value", f"block {idstr!r} listed twice in the RAM setup", pos)
            # the whole entry has arrived: only now move on (a Short above retries it)
            st.names.add(idstr)
            st.entries.append(ev.RamBlockEntry(idstr=idstr, used_length=used, page_size=page_size))
            st.blocks.append(ev.RamBlockLayout(idstr=idstr, used_length=used, host_page_size=local))
            st.pos, st.running = end, running
        event = ev.RamSetup(total_bytes=total, blocks=tuple(st.entries))
        self._set_layout(ev.RamLayout(blocks=tuple(st.blocks), section_id=self._footer_id, target_page_size=tps))
        self._buf.consume(st.pos)
        self._setup = None
        self._drop_acc()
        self._state = "ram_setup_eos"
        return event

    def _inferred_page_size(self, pos: int, *, last: bool) -> int | None:
        """The optional be64 page size at ``pos`` of the RAM setup, read from the stream itself.

        QEMU's ``ram_save_setup`` (ram.c) writes it after a block's used_length only
        when postcopy-ram is on and ``block->page_size`` differs from the host page
        size (7.2: ``qemu_host_page_size``; 9.0+: max(real host page size, target
        page size)); the receiver (7.2 ``ram_load_precopy``, 8.0+ ``parse_ramblock``)
        decides from its own blocks.  The stream still says it unambiguously:

        * before another block, the next byte is that block's idstr length (1..255),
          while a be64 page size (< 2**56) starts with 0x00;
        * after the last block comes EOS (be64 0x10) -- not a page size, which is a
          power of two >= 1 KiB -- so a power of two there is the page size and EOS
          follows it.
        """
        cap = MAX_RAM_SETUP_LENGTH + 1 + 255 + 16
        if not last and self._grow(pos + 1, cap)[pos] != 0:
            return None
        word: int = BE64.unpack_from(self._grow(pos + 8, cap), pos)[0]
        if last and word == RAM_FLAG_EOS:
            return None
        if word < 1024 or word & (word - 1) or word % self.target_page_size:
            raise self._fail("bad_value", f"RAM setup: {word:#018x} after a block's used_length is neither "
                             + ("EOS nor " if last else "") + "a page size (a power of two >= the target "
                             f"page size {self.target_page_size:#x})", pos)
        return word

    def _after_eof(self) -> ev.WireEvent:
        view = self._need(1)
        if view[0] == SECTION.VMDESCRIPTION and not self._nested:
            self._expecting = "VMDESCRIPTION"
            n = BE32.unpack_from(self._need(5), 1)[0]
            if n > MAX_VMDESC_LENGTH:
                raise self._fail("frame_too_large", f"VMDESCRIPTION of {n} bytes exceeds {MAX_VMDESC_LENGTH}")
            json = bytes(self._need(5 + n)[5:])
            self._buf.consume(5 + n)
            self._state = "done"
            return ev.VmDescription(json=json)
        raise self._fail("trailing_data", f"{len(self._buf)} bytes after QEMU_VM_EOF: "
                         f"{describe_bytes(self._buf.peek(len(self._buf)) or b'')}")

    # -- commands --------------------------------------------------------------

    def _command(self) -> ev.WireEvent:
        self._expecting = "command"
        view = self._need(5)
        cmd_no, ln = _BE16_PAIR.unpack_from(view, 1)
        known = _COMMANDS.get(cmd_no)
        if known is None:
            raise self._fail("unknown_command", f"unknown command {cmd_no} (len {ln}); known: "
                             + ", ".join(f"{c.value} {c.name}" for c in Command))
        cmd, fixed, self._expecting = known
        if fixed is not None and ln != fixed:
            raise self._fail("bad_length", f"command {cmd.name} has len {ln}, expected {fixed}")
        if cmd == CMD.PACKAGED:
            return self._packaged()
        p = bytes(self._need(5 + ln)[5:])
        event = self._command_event(cmd, p)
        self._buf.consume(5 + ln)
        return event

    def _command_event(self, cmd: Command, p: bytes) -> ev.WireEvent:
        # the switch's commands first (PING, LISTEN, RUN): they are decoded inside the downtime
        if cmd == CMD.PING:
            return ev.Ping(value=BE32.unpack(p)[0])
        if cmd == CMD.POSTCOPY_LISTEN:
            self._enter_postcopy()
            return ev.PostcopyListen()
        if cmd == CMD.POSTCOPY_RUN:
            return ev.PostcopyRun()
        if cmd == CMD.OPEN_RETURN_PATH:
            return ev.OpenReturnPath()
        if cmd == CMD.POSTCOPY_RESUME:
            return ev.PostcopyResume()
        if cmd == CMD.ENABLE_COLO:
            return ev.EnableColo()
        if cmd == CMD.SWITCHOVER_START:
            return ev.SwitchoverStart()
        if cmd == CMD.POSTCOPY_ADVISE:
            if len(p) == 0:
                return ev.PostcopyAdvise(pagesize_summary=None, target_page_size=None)
            if len(p) != 16:
                raise self._fail("bad_length", f"POSTCOPY_ADVISE has len {len(p)}, expected 0 or 16")
            summary, tps = struct.unpack(">QQ", p)
            if tps != self.target_page_size:
                raise self._fail("target_page_size", f"POSTCOPY_ADVISE target page size {tps:#x} differs "
                                 f"from the local {self.target_page_size:#x}")
            self._advised = True
            return ev.PostcopyAdvise(pagesize_summary=summary, target_page_size=tps)
        if cmd == CMD.RECV_BITMAP:
            if len(p) < 2 or p[0] != len(p) - 1:
                raise self._fail("bad_length" if p[:1] != b"\0" else "empty_idstr",
                                 f"RECV_BITMAP has len {len(p)} for an idstr of "
                                 f"{p[0] if p else 'no'} bytes (len must be 1 + idstr length >= 2)")
            idstr = _text(p[1:])
            self._check_block(idstr, "RECV_BITMAP")
            return ev.RecvBitmapRequest(idstr=idstr)
        assert cmd == CMD.POSTCOPY_RAM_DISCARD
        return self._discard(p)

    def _enter_postcopy(self) -> None:
        self._postcopy = True
        if self._ram is not None:
            self._ram.scanner.postcopy = True

    def _check_block(self, idstr: str, what: str) -> ev.RamBlockLayout | None:
        if self.layout is None:
            return None
        block = self.layout.block(idstr)
        if block is None:
            raise self._fail("unknown_block", f"{what} names unknown block {idstr!r} (known: "
                             f"{', '.join(b.idstr for b in self.layout.blocks)})")
        return block

    def _discard(self, p: bytes) -> ev.WireEvent:
        if len(p) < 20:
            raise self._fail("bad_length", f"POSTCOPY_RAM_DISCARD has len {len(p)}, at least 20 needed")
        version, n = p[0], p[1]
        if version != 0:
            raise self._fail("bad_value", f"POSTCOPY_RAM_DISCARD version {version}, expected 0")
        if n == 0:
            raise self._fail("empty_idstr", "POSTCOPY_RAM_DISCARD with an empty idstr")
        if 3 + n > len(p) or (len(p) - 3 - n) % 16:
            raise self._fail("bad_length", f"POSTCOPY_RAM_DISCARD len {len(p)} is not 3 + idstr ({n}) "
                             "+ 16 per range")
        if p[2 + n] != 0:
            raise self._fail("bad_value", f"POSTCOPY_RAM_DISCARD: byte after the idstr is {p[2 + n]:#04x}, "
                             "expected NUL")
        idstr = _text(p[2 : 2 + n])
        ranges = tuple(struct.unpack_from(">QQ", p, i) for i in range(3 + n, len(p), 16))
        block = self._check_block(idstr, "POSTCOPY_RAM_DISCARD")
        tps = self.target_page_size
        for start, length in ranges:
            if start % tps or length % tps:
                raise self._fail("unaligned", f"discard {idstr!r} {start:#x}+{length:#x} is not aligned to "
                                 f"the target page size {tps:#x}")
            if block is not None and start + length > block.used_length:
                raise self._fail("offset_out_of_block", f"discard {idstr!r} {start:#x}+{length:#x} runs "
                                 f"past the block's used_length {block.used_length:#x}")
        return ev.PostcopyRamDiscard(idstr=idstr, ranges=ranges, version=version)

    def _packaged(self) -> ev.WireEvent:
        if self._nested:
            raise self._fail("nested_packaged", "PACKAGED inside a PACKAGED blob")
        length = BE32.unpack_from(self._need(9), 5)[0]
        if length > self.max_packaged_length:
            raise self._fail("packaged_too_large", f"PACKAGED length {length} exceeds the limit "
                             f"{self.max_packaged_length}")
        self._expecting = f"PACKAGED blob of {length} bytes"
        blob = self._need(9 + length)[9:]
        inner = MainStreamDecoder(
            _nested=True, layout=self.layout, block_page_sizes=self.block_page_sizes,
            host_page_size=self.host_page_size, target_page_size=self.target_page_size,
            scanner=self.scanner,
        )
        inner._advised = self._advised
        inner._iterables = dict(self._iterables)
        inner._buf.consumed = self._buf.consumed + 9
        inner.receive_data(bytes(blob))
        inner.receive_data(b"")
        events: list[ev.WireEvent] = []
        try:
            while True:
                e = inner.next_event()
                if isinstance(e, ev.ConnectionClosed):
                    break
                assert not isinstance(e, NeedData)
                events.append(e)
        except RemoteProtocolError as exc:
            raise exc._as(LocalProtocolError) from None
        if any(isinstance(e, ev.PostcopyListen) for e in events):
            self._enter_postcopy()
        self._buf.consume(9 + length)
        return ev.Packaged(events=tuple(events))


