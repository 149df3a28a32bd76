"""QMP message framing costs time linear in the input, however it is split (issue 14).

``_MessageStream.work`` counts the bytes scanned and parsed; the quadratic
version re-parsed (and re-copied) everything buffered on every read, so a
256 KiB message fed one byte at a time cost ~34 GB of parsing.
"""

from __future__ import annotations

import json

from postcopy.control._server import MAX_MESSAGE_BYTES, _MessageStream, _ParseError


def _feed(stream: _MessageStream, data: bytes, piece: int) -> list[object]:
    out: list[object] = []
    for i in range(0, len(data), piece):
        out += stream.feed(data[i : i + piece])
    return out


def _big_message(size: int) -> bytes:
    # strings with escaped quotes and brackets, nested objects and arrays, UTF-8
    item = {"s": 'a "quoted" [bracket] {brace} \\ é', "n": [1, 2, {"x": None}]}
    items = [item] * (size // len(json.dumps(item)))
    return json.dumps({"execute": "x", "arguments": {"items": items}}).encode()


def test_one_large_message_byte_at_a_time_is_linear() -> None:
    message = _big_message(256 * 1024)
    stream = _MessageStream()
    assert _feed(stream, message, 1) == [json.loads(message)]
    assert stream.work < 4 * len(message), stream.work


def test_many_messages_in_one_read_are_linear() -> None:
    messages = [{"execute": "query-status", "id": i} for i in range(20000)]
    data = b"".join(json.dumps(m).encode() for m in messages)  # no separators at all
    stream = _MessageStream()
    assert stream.feed(data) == messages
    assert stream.work < 4 * len(data), stream.work


def test_multi_line_message_in_small_pieces_is_linear() -> None:
    message = json.dumps(json.loads(_big_message(128 * 1024)), indent=1).encode()
    assert message.count(b"\n") > 10000
    stream = _MessageStream()
    assert _feed(stream, message + b"\n", 3) == [json.loads(message)]
    assert stream.work < 600 * len(message) // 100, stream.work  # < 6 bytes of work per byte


def test_split_messages_and_errors_recover_as_before() -> None:
    data = (b'{"execute": "a", "id": "\xc3\xa9"}{"a" x\n{"execute": "b"}\n}\n'
            b'{"a": "b\nc"}\n[1, {"c": "}"}]null "s\\"t" {"x":\n 1}\n')
    for piece in (1, 2, 5, len(data)):
        got = _feed(_MessageStream(), data, piece)
        desc = [g.desc if isinstance(g, _ParseError) else g for g in got]
        assert desc == [
            {"execute": "a", "id": "é"},
            "JSON parse error, expecting ':' delimiter",
            {"execute": "b"},
            "JSON parse error, expecting value",
            "JSON parse error, invalid control character at",
            "JSON parse error, expecting value",
            [1, {"c": "}"}],
            None,
            's"t',
            {"x": 1},
        ], piece


def test_bound_is_kept_byte_at_a_time() -> None:
    stream = _MessageStream()
    out = _feed(stream, b'{"execute": "' + b"x" * MAX_MESSAGE_BYTES, 4096)
    out += stream.feed(b"xx")
    assert len(out) == 1
    assert isinstance(out[0], _ParseError)
    assert out[0].fatal
    assert stream.work < 3 * MAX_MESSAGE_BYTES
