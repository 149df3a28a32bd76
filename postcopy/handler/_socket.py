"""The handler's unix socket, visible only once it accepts connections."""

from __future__ import annotations

import contextlib
import os
import socket
from pathlib import Path

__all__ = ["listen_unix"]


def listen_unix(path: Path, backlog: int) -> socket.socket:
    """A listening unix socket at ``path`` (a stale socket there is replaced).

    The socket is bound under a temporary name and renamed into place after
    listen(): a VMM that polls for the path and connects at once never meets a
    bound socket that is not listening yet (ECONNREFUSED, and a VMM that gives up).
    """
    if path.is_socket():
        path.unlink()   # a stale socket of an earlier run
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(str(tmp))
        sock.listen(backlog)
        os.rename(tmp, path)
    except OSError:
        sock.close()
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    return sock
