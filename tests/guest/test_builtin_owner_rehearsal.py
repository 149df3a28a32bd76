"""A destination's built-in guest plays its device state load before the stream (owner.py
DEVICE_STATE_REHEARSALS): the Python of RUN's load then runs specialized. The rehearsal must leave
nothing behind: no state loaded, the unstarted guest as it was built."""

from __future__ import annotations

import pytest

from postcopy import owner as owner_module
from postcopy.guest import Guest, Pattern
from postcopy.owner import DEVICE_STATE_REHEARSALS, BuiltinGuest
from postcopy.spec import GuestSpec


def test_the_load_rehearsal_runs_and_leaves_no_state(monkeypatch: pytest.MonkeyPatch) -> None:
    decoded: list[int] = []
    real = owner_module.decode_device_state

    def counting(payload: bytes, spec: GuestSpec) -> tuple[bytes, int]:
        decoded.append(len(payload))
        return real(payload, spec)

    monkeypatch.setattr(owner_module, "decode_device_state", counting)
    spec = GuestSpec.simple(4 << 20, vcpus=2)
    dest = BuiltinGuest(spec)
    assert len(decoded) == DEVICE_STATE_REHEARSALS
    other = BuiltinGuest(spec)
    try:
        assert dest.source_stopped_ns == 0
        with pytest.raises(AssertionError, match="load_device_state first"):
            dest.start()        # no state was left loaded: RUN must bring its own
        unstarted = dest._unstarted
        assert unstarted is not None
        fresh = other._unstarted
        assert fresh is not None
        assert unstarted.save_state() == fresh.save_state()     # the guest is as built
    finally:
        dest.memory.close()
        other.memory.close()


def test_a_source_rehearses_its_device_state_save(monkeypatch: pytest.MonkeyPatch) -> None:
    encoded: list[int] = []
    real = owner_module.encode_device_state

    def counting(spec: GuestSpec, state: bytes, stopped_ns: int) -> bytes:
        encoded.append(len(state))
        return real(spec, state, stopped_ns)

    monkeypatch.setattr(owner_module, "encode_device_state", counting)
    spec = GuestSpec.simple(4 << 20, vcpus=2)
    memory = spec.build_memory()
    guest = Guest(memory, nvcpus=2, pattern=Pattern.RANDOM, seed=spec.seed)
    try:
        BuiltinGuest(spec, memory, guest)
        assert encoded == [guest.state_size()] * DEVICE_STATE_REHEARSALS
    finally:
        guest.close()
        memory.close()
