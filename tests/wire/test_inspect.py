"""``postcopy inspect --json`` on the captures."""

from __future__ import annotations

import json
import struct

from postcopy.cli import main


def _json(capsys, *argv) -> dict:
    assert main(["inspect", "--json", *map(str, argv)]) == 0
    return json.loads(capsys.readouterr().out)


def _count_requests(rp: bytes) -> tuple[int, int]:
    """Independent minimal RP walk (as the capture's rp_decode.py does)."""
    off = ids = plain = 0
    while off + 4 <= len(rp):
        typ, ln = struct.unpack_from(">HH", rp, off)
        off += 4 + ln
        if typ == 5:  # RECV_BITMAP: size, bitmap, end mark outside the frame
            off += 16 + struct.unpack_from(">Q", rp, off)[0]
        ids += typ == 3
        plain += typ == 4
    return ids, plain


def test_recovery_capture_reports_bitmaps_and_resume_ack(capsys, captures_dir):
    report = _json(capsys, captures_dir / "64M-postcopy-recover-pause-cap16M")
    assert report["counts"]["RECV_BITMAP"] == 6
    assert report["counts"]["RESUME_ACK"] == 1
    assert report["command_counts"]["RECV_BITMAP"] == 6
    assert report["command_counts"]["POSTCOPY_RESUME"] == 1
    kinds = [(s["kind"], s["end"]) for s in report["streams"]]
    assert kinds == [("main", "closed"), ("return_path", "eof"), ("recovery", "eof"), ("return_path", "eof")]
    assert all(s["decoded_bytes"] == s["bytes"] for s in report["streams"])
    assert next(b["block"] for b in report["streams"][3]["bitmaps"]) == "pc.ram"


def test_immediate_capture_counts(capsys, captures_dir, load_capture):
    report = _json(capsys, captures_dir / "64M-postcopy-immediate")
    ids, plain = _count_requests(load_capture("64M-postcopy-immediate/capture/conn0.d2s.bin.xz"))
    assert (report["counts"]["REQ_PAGES_ID"], report["counts"]["REQ_PAGES"]) == (ids, plain)
    assert ids + plain == 6  # README: "6 page requests"
    c = report["command_counts"]
    assert (c["OPEN_RETURN_PATH"], c["PACKAGED"], c["POSTCOPY_ADVISE"]) == (1, 1, 1)
    assert (c["POSTCOPY_LISTEN"], c["POSTCOPY_RUN"], c["PING"]) == (1, 1, 4)
    main_stream = report["streams"][0]
    assert [d for d in main_stream["discards"] if d["block"] == "pc.ram"] == [
        {"block": "pc.ram", "start": 0, "length": 0x4000000}]
    assert report["pages"]["pc.ram"]["normal"] > 0


def test_preempt_capture_and_human_output(capsys, captures_dir):
    report = _json(capsys, captures_dir / "64M-postcopy-preempt-cap16M")
    assert report["counts"]["REQ_PAGES_ID"] + report["counts"]["REQ_PAGES"] == 125
    assert [s["kind"] for s in report["streams"]] == ["main", "return_path", "return_path", "preempt"]
    assert main(["inspect", str(captures_dir / "64M-postcopy-preempt-cap16M")]) == 0
    out = capsys.readouterr().out
    assert "PACKAGED  POSTCOPY_LISTEN" in out
    assert "pc.ram" in out


def test_inspect_user_errors(capsys, tmp_path, captures_dir):
    assert main(["inspect", str(tmp_path / "missing.bin")]) == 2
    assert "no such file" in capsys.readouterr().err
    lone = captures_dir / "64M-postcopy-preempt-cap16M/capture/conn1.s2d.bin.xz"
    assert main(["inspect", str(lone)]) == 2
    assert "--setup-from" in capsys.readouterr().err
    assert main(["inspect", "--setup-from",
                 str(captures_dir / "64M-postcopy-preempt-cap16M/capture/conn0.s2d.bin.xz"), str(lone)]) == 0
    assert "preempt" in capsys.readouterr().out
    bad = tmp_path / "bad.s2d.bin"
    bad.write_bytes(b"QEVM\0\0\0\x03\x07\0\0\0\x01x\x08\0\x63\0\0")
    assert main(["inspect", "--json", str(bad)]) == 1
    err = json.loads(capsys.readouterr().out)["streams"][0]["error"]
    assert err["kind"] == "unknown_command"
    assert "99" in err["message"]
