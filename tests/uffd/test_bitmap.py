"""Bitmap: behaviour, QEMU little-endian encoding, and a property test against a set."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from uffd import Bitmap


def model_le_bytes(nbits: int, bits: set[int]) -> bytes:
    out = bytearray(((nbits + 63) // 64) * 8)
    for i in bits:
        out[i // 8] |= 1 << (i % 8)
    return bytes(out)


def test_basic_set_clear_test_count() -> None:
    b = Bitmap(130)
    assert len(b) == b.nbits == 130
    assert b.count() == 0
    b.set(0)
    b.set(129)
    b.set(64)
    assert b.test(0)
    assert b.test(64)
    assert b.test(129)
    assert not b.test(1)
    assert b.count() == 3
    b.clear(64)
    assert not b.test(64)
    assert b.test_and_set(5) is False
    assert b.test_and_set(5) is True
    assert list(b.iter_set()) == [0, 5, 129]


def test_ranges_and_find() -> None:
    b = Bitmap(200)
    b.set_range(60, 80)  # crosses two word boundaries
    assert b.count() == 80
    assert b.find_next_set(0) == 60
    assert b.find_next_zero(60) == 140
    assert b.find_next_set(140) == 200  # none: nbits
    b.clear_range(64, 64)
    assert list(b.iter_set()) == [60, 61, 62, 63, *range(128, 140)]
    assert b.find_next_zero(200) == 200
    b.set_range(0, 200)
    assert b.find_next_zero(0) == 200
    b.set_range(10, 0)  # empty range is a no-op
    assert b.count() == 200


def test_le_bytes_layout_is_qemu_received_bitmap() -> None:
    b = Bitmap(70)  # 9 bytes of bits -> 16 bytes on the wire
    b.set(0)
    b.set(9)
    b.set(69)
    data = b.to_le_bytes()
    assert len(data) == 16
    assert data[0] == 0x01
    assert data[1] == 0x02
    assert data[8] == 0x20
    assert data == model_le_bytes(70, {0, 9, 69})


def test_from_le_bytes_rejects_bad_size_and_padding() -> None:
    with pytest.raises(ValueError, match=r"15 bytes for nbits=70, expected 16"):
        Bitmap.from_le_bytes(70, bytes(15))
    padded = bytearray(16)
    padded[8] = 0x40  # bit 70: padding
    with pytest.raises(ValueError, match="padding bits past nbits=70"):
        Bitmap.from_le_bytes(70, bytes(padded))
    padded[8] = 0x20  # bit 69: valid
    assert list(Bitmap.from_le_bytes(70, padded).iter_set()) == [69]


def test_invert_stays_within_nbits() -> None:
    b = Bitmap(70)
    b.set(3)
    b.invert()
    assert b.count() == 69
    assert not b.test(3)
    assert b.to_le_bytes()[8] == 0x3F  # bits 64..69 only, padding stays zero
    b.invert()
    assert list(b.iter_set()) == [3]


def test_zero_bits() -> None:
    b = Bitmap(0)
    assert b.to_le_bytes() == b""
    assert b.find_next_set(0) == 0
    assert Bitmap.from_le_bytes(0, b"").count() == 0
    b.invert()
    assert b.count() == 0


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda b: b.set(10), r"Bitmap.set: bit 10 is outside 0..9"),
        (lambda b: b.test(-1), r"Bitmap.test: bit -1 is outside"),
        (lambda b: b.clear(10), r"Bitmap.clear: bit 10"),
        (lambda b: b.set_range(5, 6), r"Bitmap.set_range: range start=5 n=6 is outside"),
        (lambda b: b.clear_range(-1, 2), r"Bitmap.clear_range: range start=-1"),
        (lambda b: b.find_next_set(11), r"Bitmap.find_next_set: start=11 is outside 0..10"),
        (lambda b: b.find_next_zero(-1), r"find_next_zero: start=-1"),
    ],
)
def test_bounds_are_checked(call: object, message: str) -> None:
    b = Bitmap(10)
    with pytest.raises(IndexError, match=message):
        call(b)  # type: ignore[operator]
    assert b.count() == 0


def test_bad_sizes() -> None:
    with pytest.raises(ValueError, match="nbits=-1"):
        Bitmap(-1)
    with pytest.raises(TypeError):
        Bitmap(1.5)  # type: ignore[arg-type]


def test_cdata_is_the_c_struct() -> None:
    b = Bitmap(100)
    b.set(99)
    assert b.cdata.nbits == 100
    assert b.cdata.words[1] == 1 << 35


ops = st.lists(
    st.tuples(
        st.sampled_from(["set", "clear", "set_range", "clear_range", "invert"]),
        st.integers(0, 300),
        st.integers(0, 300),
    ),
    max_size=40,
)


@settings(max_examples=300, deadline=None)
@given(nbits=st.integers(0, 300), script=ops, probe=st.integers(0, 300))
def test_matches_set_model(nbits: int, script: list[tuple[str, int, int]], probe: int) -> None:
    b = Bitmap(nbits)
    model: set[int] = set()
    for op, x, y in script:
        if op == "invert":
            b.invert()
            model = set(range(nbits)) - model
        elif op in ("set", "clear"):
            if x >= nbits:
                with pytest.raises(IndexError):
                    getattr(b, op)(x)
                continue
            getattr(b, op)(x)
            (model.add if op == "set" else model.discard)(x)
        else:
            start, n = x, y
            if start + n > nbits:
                with pytest.raises(IndexError):
                    getattr(b, op)(start, n)
                continue
            getattr(b, op)(start, n)
            rng = set(range(start, start + n))
            model = model | rng if op == "set_range" else model - rng
    assert b.count() == len(model)
    assert list(b.iter_set()) == sorted(model)
    data = b.to_le_bytes()
    assert data == model_le_bytes(nbits, model)
    assert list(Bitmap.from_le_bytes(nbits, data).iter_set()) == sorted(model)
    start = min(probe, nbits)
    assert b.find_next_set(start) == min((i for i in model if i >= start), default=nbits)
    assert b.find_next_zero(start) == min(
        (i for i in range(start, nbits) if i not in model), default=nbits
    )
