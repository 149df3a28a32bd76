"""Messages between the supervisor and the server process: one JSON object per
SOCK_SEQPACKET datagram, descriptors as SCM_RIGHTS.

supervisor -> server: ``serve`` {id, regions, fresh} with fds [uffd, state memfd];
``stop`` {id}. server -> supervisor: ``ready`` {pid}; ``ended`` {id, rc, error} (serving
stopped on its own: the VMM is gone or an error); ``stopped`` {id} (after a ``stop``: nothing
writes that VMM's shared record any more).
"""

from __future__ import annotations

import json
import socket
from typing import Any, Final

__all__ = ["MAX_CONTROL_BYTES", "recv_message", "send_message"]

MAX_CONTROL_BYTES: Final = 256 * 1024


def send_message(sock: socket.socket, message: dict[str, Any], fds: list[int] | None = None) -> None:
    data = json.dumps(message).encode()
    if fds:
        socket.send_fds(sock, [data], fds)
    else:
        sock.send(data)


def recv_message(sock: socket.socket) -> tuple[dict[str, Any], list[int]] | None:
    """One message and its descriptors; None at EOF."""
    data, fds, _flags, _addr = socket.recv_fds(sock, MAX_CONTROL_BYTES, 4)
    if not data:
        for fd in fds:
            socket.close(fd)
        return None
    message = json.loads(data)
    if not isinstance(message, dict):
        raise ValueError(f"control message is not an object: {data[:80]!r}")
    return message, list(fds)
