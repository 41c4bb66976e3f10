"""What a client may send before the app has its request, in time and in size, against vit-serve: clients that
send slowly, or not at all, are let go at their deadline, with 408 where they sent part of a request; headers
that pass the limit get 431; and everyone else is served meanwhile. And how many connections it may hold: more
than the soft limit on open files that it was started with."""

import resource
import socket
import time

import httpx
import numpy as np
import pytest

from app.http_protocol import MAX_HEADER_BYTES
from tests.support.images import image_bytes
from tests.support.raw_http import everything_until_closed, multipart_request, one_answer, parsed
from tests.support.server import TCP_ESTABLISHED, process_tree, running_server, tcp_sockets

RECEIVE_TIMEOUT_S = 1.5
KEEP_ALIVE_S = 3
SLACK_S = 3.0  # a loaded machine's lateness; the deadlines themselves are asserted from below
PNG = image_bytes(np.arange(28 * 28, dtype=np.uint8).reshape(28, 28))


@pytest.fixture(scope="module")
def server_env():
    return {
        "VIT_DEVICE": "cpu",
        "VIT_WORKERS": "1",
        "VIT_RECEIVE_TIMEOUT_S": str(RECEIVE_TIMEOUT_S),
        "VIT_KEEP_ALIVE_S": str(KEEP_ALIVE_S),
    }


@pytest.fixture(scope="module")
def server_app():
    return None  # vit-serve, as the image runs it: the headers' deadline is its HTTP protocol's


@pytest.fixture
def connect(server):
    """Raw connections to the server, all closed after the test."""
    sockets = []

    def new_connection() -> socket.socket:
        sockets.append(socket.create_connection(("127.0.0.1", server.port), timeout=30))
        return sockets[-1]

    yield new_connection
    for sock in sockets:
        sock.close()


def refused(server, status: int) -> float:
    """How many requests the server's HTTP protocol answered `status` before the app had them, by its metrics."""
    metrics = httpx.get(f"{server.base_url}/metrics", timeout=10).text
    line = f'vit_requests_total{{method="unknown",route="unmatched",status="{status}"}} '
    return sum(float(row.removeprefix(line)) for row in metrics.splitlines() if row.startswith(line))


def test_headers_that_stall_get_408_at_the_deadline_the_connection_closes_and_it_is_counted(connect, server):
    before = refused(server, 408)
    sock = connect()
    sock.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Ty")
    elapsed_s, raw = everything_until_closed(sock, RECEIVE_TIMEOUT_S + SLACK_S)
    status, headers, body = parsed(raw)
    assert status == 408 and headers["connection"] == "close"
    assert body == {"detail": f"the request's headers did not arrive within {RECEIVE_TIMEOUT_S:g} s of its first byte"}
    assert elapsed_s >= RECEIVE_TIMEOUT_S - 0.1
    assert refused(server, 408) == before + 1  # answered before the app, and still in its metrics


def test_a_body_that_stalls_gets_408_through_the_app_and_the_connection_closes(connect, server):
    head, body = multipart_request(PNG)
    sock = connect()
    sock.sendall(head + body[: len(body) // 2])
    elapsed_s, raw = everything_until_closed(sock, RECEIVE_TIMEOUT_S + SLACK_S)
    status, headers, answer = parsed(raw)
    assert status == 408 and headers["connection"] == "close"
    assert answer == {"detail": f"the request body did not arrive within {RECEIVE_TIMEOUT_S:g} s of its headers"}
    assert headers["x-request-id"]  # answered by the app, as its other errors are
    assert elapsed_s >= RECEIVE_TIMEOUT_S - 0.1
    metrics = httpx.get(f"{server.base_url}/metrics").text
    assert 'vit_requests_total{method="POST",route="/predict",status="408"} 1.0' in metrics


def test_a_v2_infer_body_that_stalls_gets_408_in_the_protocols_shape(connect, server):
    name = httpx.get(f"{server.base_url}/model").json()["name"]
    sock = connect()
    sock.sendall(
        f"POST /v2/models/{name}/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        "Content-Length: 1000\r\n\r\n{".encode()
    )
    _, raw = everything_until_closed(sock, RECEIVE_TIMEOUT_S + SLACK_S)
    status, _, answer = parsed(raw)
    assert status == 408
    assert answer == {"error": f"the request body did not arrive within {RECEIVE_TIMEOUT_S:g} s of its headers"}


def test_a_connection_that_never_sends_a_byte_is_closed_after_the_keep_alive(connect):
    elapsed_s, raw = everything_until_closed(connect(), KEEP_ALIVE_S + SLACK_S)
    assert raw == b""  # nothing was asked, so nothing is answered: the close of an idle connection
    assert elapsed_s >= KEEP_ALIVE_S - 0.1


def test_each_request_on_a_connection_gets_the_whole_deadline_from_its_own_first_byte(connect):
    head, body = multipart_request(PNG)
    sock = connect()
    for _ in range(3):  # idle between requests for longer than the deadline in all, and within the keep-alive
        sock.sendall(head[:20])
        time.sleep(RECEIVE_TIMEOUT_S / 2)  # half the deadline for the headers, then the rest of the request
        sock.sendall(head[20:] + body)
        assert parsed(one_answer(sock))[0] == 200
        time.sleep(RECEIVE_TIMEOUT_S * 0.8)


def test_hundreds_of_stalled_clients_are_let_go_and_everyone_else_is_served_meanwhile(connect, server):
    held = lambda: len(tcp_sockets([server.process.pid], server.port, TCP_ESTABLISHED)[server.process.pid])
    head, body = multipart_request(PNG)
    stalled = [connect() for _ in range(300)]
    for index, sock in enumerate(stalled):
        sock.sendall(b"GET /model HTTP/1.1\r\nHo" if index % 2 else head + body[:100])
    time.sleep(0.2)
    assert held() >= len(stalled)
    answer = httpx.post(f"{server.base_url}/predict", files={"file": ("x.png", PNG, "image/png")}, timeout=10)
    assert answer.status_code == 200
    statuses = [parsed(everything_until_closed(sock, RECEIVE_TIMEOUT_S + SLACK_S)[1])[0] for sock in stalled]
    assert statuses == [408] * len(stalled)
    assert held() == 0


def test_a_body_left_unread_by_an_early_answer_is_skipped_and_the_connection_serves_on(connect):
    body = b"x" * 1_000_000
    sock = connect()
    sock.sendall(b"POST /health/live HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(body))
    assert parsed(one_answer(sock))[0] == 405  # answered from the headers alone
    sock.sendall(body + b"GET /health/live HTTP/1.1\r\nHost: x\r\n\r\n")
    assert parsed(one_answer(sock))[0] == 200  # the rest of that body was not taken for the next request's headers


def test_the_rest_of_a_body_that_an_early_answer_left_unread_may_not_trickle_past_the_deadline(connect):
    sock = connect()
    sock.sendall(b"POST /health/live HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000\r\n\r\n")
    assert parsed(one_answer(sock))[0] == 405
    sock.sendall(b"x" * 1000)  # and no more
    elapsed_s, rest = everything_until_closed(sock, RECEIVE_TIMEOUT_S + SLACK_S)
    assert rest == b""  # it has had its answer
    assert elapsed_s >= RECEIVE_TIMEOUT_S - 0.1


def request_with_headers_of(size: int) -> bytes:
    """A GET whose request line and headers are `size` bytes, the blank line that ends them included."""
    head = b"GET /health/live HTTP/1.1\r\nHost: x\r\nX-Padding: "
    return head + b"a" * (size - len(head) - 4) + b"\r\n\r\n"


@pytest.mark.parametrize("pieces", [1, 3])
def test_headers_up_to_the_limit_are_read_and_one_byte_more_gets_431(connect, server, pieces):
    before = refused(server, 431)
    for size, expected in ((MAX_HEADER_BYTES, 200), (MAX_HEADER_BYTES + 1, 431)):
        request, sock = request_with_headers_of(size), connect()
        for start in range(0, len(request), len(request) // pieces + 1):
            sock.sendall(request[start : start + len(request) // pieces + 1])
            time.sleep(0.05)  # each piece its own read
        if expected == 200:
            assert parsed(one_answer(sock))[0] == 200
        else:
            status, headers, body = parsed(everything_until_closed(sock, SLACK_S)[1])
            assert (status, headers["connection"]) == (431, "close")
            assert body == {"detail": f"the request line and headers pass {MAX_HEADER_BYTES} bytes"}
    assert refused(server, 431) == before + 1


def test_a_header_that_never_ends_is_cut_off_and_the_server_answers_the_others_meanwhile(connect, server):
    sock = connect()
    sock.sendall(b"GET /health/live HTTP/1.1\r\nHost: x\r\nX-Padding: ")
    sent_mb = 0
    with pytest.raises(OSError):  # reset by the server, which has stopped reading
        while sent_mb < 1000:
            sock.sendall(b"a" * 2**20)
            sent_mb += 1
    assert sent_mb < 16  # what the kernel's buffers took before the server closed, not what it gathered
    started = time.monotonic()
    assert httpx.get(f"{server.base_url}/health/live", timeout=10).status_code == 200
    # Without the limit the parser gathered the line for as long as it came, and the loop answered nobody else:
    # seconds at 100 MB. The bound only tells a frozen loop from a busy machine.
    assert time.monotonic() - started < 1.0


@pytest.mark.parametrize(
    ("request_bytes", "named"),
    [
        (  # the ambiguity that request smuggling lives on: llhttp's "Transfer-Encoding can't be present with ..."
            b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
            ("Transfer-Encoding", "Content-Length"),
        ),
        (b"GET /model HTTP/1.1\r\nHost x\r\n\r\n", ("header",)),  # "Invalid header token"
    ],
)
def test_bytes_that_are_no_http_request_get_400_in_the_apis_shape_with_the_parsers_reason_and_are_counted(
    connect, server, request_bytes, named
):
    before = refused(server, 400)
    sock = connect()
    sock.sendall(request_bytes)
    status, headers, body = parsed(everything_until_closed(sock, SLACK_S)[1])
    assert (status, headers["connection"], headers["content-type"]) == (400, "close", "application/json")
    # uvicorn's was text/plain, "Invalid HTTP request received.", whatever the fault
    assert body["detail"].startswith("invalid HTTP request: ") and all(word in body["detail"] for word in named), body
    assert refused(server, 400) == before + 1


def established(server) -> int:
    """The connections that the server's processes hold open."""
    held = tcp_sockets(process_tree(server.process.pid), server.port, TCP_ESTABLISHED)
    return len(set().union(*held.values()))


def held_connections_then_a_prediction(server, count: int) -> httpx.Response:
    """`count` idle connections opened and accepted, then a /predict on a new one."""
    held = [socket.create_connection(("127.0.0.1", server.port), timeout=30) for _ in range(count)]
    try:
        deadline = time.monotonic() + 15
        while (accepted := established(server)) < count:
            assert time.monotonic() < deadline, f"the server holds {accepted} of the {count} connections"
            time.sleep(0.1)
        return httpx.post(f"{server.base_url}/predict", files={"file": ("boot.png", PNG, "image/png")}, timeout=30)
    finally:
        for sock in held:
            sock.close()


def test_a_server_started_with_a_low_soft_limit_on_open_files_holds_more_connections_than_it(server_env):
    # Linux's default soft limit, and a container's under Docker 25 and containerd 2, is 1024. Past it, each new
    # connection was accepted and closed at once, without a line in the log: here, a reset.
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    soft = 128
    if hard < 4 * soft:
        pytest.skip(f"this machine's hard limit on open files, {hard}, leaves no room above a soft limit of {soft}")
    with running_server(server_env, app=None, open_files=(soft, hard)) as server:
        answer = held_connections_then_a_prediction(server, 3 * soft)
        assert answer.status_code == 200, answer.text
        _, log = server.stop()
    assert "RLIMIT_NOFILE" not in log


def test_a_hard_limit_on_open_files_too_low_to_raise_is_named_at_start(server_env):
    with running_server(server_env, app=None, open_files=(256, 256)) as server:
        answer = httpx.post(f"{server.base_url}/predict", files={"file": ("boot.png", PNG, "image/png")}, timeout=30)
        assert answer.status_code == 200
        _, log = server.stop()
    assert log.count("this process may open 256 files (RLIMIT_NOFILE, its hard limit)") == 1, log
