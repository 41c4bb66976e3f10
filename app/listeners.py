"""Where vit-serve's workers listen: on Linux each worker binds a socket of its own to the port, with
SO_REUSEPORT; elsewhere they share one, as uvicorn's supervisor makes them. A single worker's socket is
bound here too (bound_socket), before the app starts.

Workers that share a listening socket race to accept, and whoever wins takes the connections then
waiting, so the connections of keep-alive clients (a load balancer's pool, wrk) can pile up on some
workers while others get none (README, How serving works). Given a socket each, Linux hands every
new connection to one of them by a hash of its addresses, and they spread evenly.

The price: connections still waiting in a worker's own backlog when it dies are reset instead of
accepted by another worker. macOS and the BSDs take SO_REUSEPORT without spreading anything, so the
workers share one socket there.
"""

from __future__ import annotations

import logging
import socket
import sys

import uvicorn
from uvicorn.config import STARTUP_FAILURE

logger = logging.getLogger("app.listeners")
SPREADS_CONNECTIONS = sys.platform == "linux" and hasattr(socket, "SO_REUSEPORT")


class WorkerSocket:
    """The address, as each worker is given it: unpickled in a worker, it is that worker's own socket.

    uvicorn's supervisor pickles the same list of sockets into every worker that it starts, restarts
    included, so each of them binds its own, and none is open in the supervisor.
    """

    def __init__(self, host: str, port: int) -> None:
        self.host = host
        self.port = port

    def __reduce__(self) -> tuple:
        return bound_socket, (self.host, self.port, True)

    def close(self) -> None:
        """Nothing to close: the supervisor holds no socket."""


def worker_sockets(config: uvicorn.Config) -> list[socket.socket | WorkerSocket]:
    """What uvicorn's supervisor hands every worker. Ends the process with uvicorn's start-up failure
    status if the port is taken."""
    if not SPREADS_CONNECTIONS or config.uds is not None or config.fd is not None:
        return [config.bind_socket()]
    # Bound without SO_REUSEPORT, the check fails while any server listens on the port, another vit-serve
    # too: a second server must not start and quietly take half of the first one's connections.
    with bound_socket(config.host, config.port, reuse_port=False) as check:
        port = check.getsockname()[1]  # the port the kernel picked, for 0
        logger.info("workers listen on %s, each on a socket of its own", address(check))
    return [WorkerSocket(config.host, port)]


def address(sock: socket.socket) -> str:
    """http://HOST:PORT of a bound socket, with the port that the kernel picked for 0."""
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if sock.family == socket.AF_INET6 else f"http://{host}:{port}"


def bound_socket(host: str, port: int, reuse_port: bool) -> socket.socket:
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn: past TIME_WAIT of an earlier run
    if reuse_port:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind((host, port))
    except OSError as error:
        sock.close()
        # In a worker this runs before logging is set up; uvicorn's supervisor stops at this status.
        print(f"cannot listen on {host}:{port}: {error}", file=sys.stderr)
        raise SystemExit(STARTUP_FAILURE) from None
    return sock
