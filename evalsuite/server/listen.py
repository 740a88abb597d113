"""The server's listening socket, bound before anything slow happens (standard library only)."""

from __future__ import annotations

import socket


def listening_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to ``host:port`` (port 0: a free one) and listening. Raises ValueError
    naming the address when the port is out of range, the host does not resolve, or the address
    cannot be bound (in use, not this machine's, not permitted)."""
    if not 0 <= port <= 65535:
        raise ValueError(f"--port {port}: valid: 0-65535 (0 picks a free port)")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise ValueError(f"--host {host!r} does not resolve ({e.strerror}); valid: an address or host name of "
                         f"this machine, e.g. 127.0.0.1 (this machine only) or 0.0.0.0 (every interface)") from None
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does: restart over TIME_WAIT
        sock.bind(address)
        sock.listen(2048)
    except OSError as e:
        sock.close()
        raise ValueError(f"cannot listen on {host}:{port}: {e.strerror}; choose another --port (0 picks a free "
                         f"one) or --host") from None
    return sock
