"""HTTP/1.1 spoken over a raw socket, for the tests that send what a client library will not: half a request,
a stall, headers that never end; and the answers read back as the server wrote them."""

from __future__ import annotations

import json
import socket
import time

import pytest


def multipart_request(data: bytes) -> tuple[bytes, bytes]:
    """A /predict request's head and body, with one part named file."""
    body = (
        b'--b\r\nContent-Disposition: form-data; name="file"; filename="x.png"\r\nContent-Type: image/png\r\n\r\n'
        + data
        + b"\r\n--b--\r\n"
    )
    head = b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n"
    return head + b"Content-Length: %d\r\n\r\n" % len(body), body


def everything_until_closed(sock: socket.socket, within_s: float) -> tuple[float, bytes]:
    """What the server sends until it closes the connection, and after how long; fails if it is still open."""
    started = time.monotonic()
    sock.settimeout(within_s)
    received = b""
    try:
        while chunk := sock.recv(65536):
            received += chunk
    except TimeoutError:
        pytest.fail(f"the connection was still open after {within_s} s, having sent {received[:200]!r}")
    return time.monotonic() - started, received


def one_answer(sock: socket.socket) -> bytes:
    """The next answer on a connection that stays open: its head, and as much body as it declares."""
    received = b""
    while b"\r\n\r\n" not in received:
        received += sock.recv(65536)
    head, _, body = received.partition(b"\r\n\r\n")
    length = int(next(line for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:")).split()[1])
    while len(body) < length:
        body += sock.recv(65536)
    return head + b"\r\n\r\n" + body


def parsed(raw: bytes) -> tuple[int, dict[str, str], dict]:
    """Status, headers (lower-case names) and JSON body of one HTTP/1.1 answer."""
    head, _, body = raw.partition(b"\r\n\r\n")
    status_line, *lines = head.decode().split("\r\n")
    headers = dict(line.lower().split(": ", 1) for line in lines)
    return int(status_line.split()[1]), headers, json.loads(body)
