"""The probe that tells a Dask scheduler from whatever else answers at an address."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pytest
from solidflow_dask_bridge import probe
from solidflow_dask_bridge.protocol import BridgeError


@contextmanager
def server(answer: Callable[[socket.socket], None]) -> Iterator[int]:
    """A loopback TCP server that runs `answer` on every connection; yields its port."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    stop = threading.Event()

    def serve() -> None:
        listener.settimeout(0.1)
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except OSError:
                continue
            with conn, contextlib.suppress(OSError):
                answer(conn)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield listener.getsockname()[1]
    finally:
        stop.set()
        thread.join(5)
        listener.close()


def quiet(conn: socket.socket) -> None:
    conn.settimeout(10)
    try:
        while conn.recv(1024):
            pass
    except OSError:
        pass


def http(status: str, body: bytes) -> Callable[[socket.socket], None]:
    def answer(conn: socket.socket) -> None:
        conn.settimeout(10)
        request = b""
        while b"\r\n\r\n" not in request:
            chunk = conn.recv(1024)
            if not chunk:
                return
            request += chunk
        conn.sendall(b"HTTP/1.1 " + status.encode() + b"\r\nContent-Length: %d\r\n\r\n" % len(body) + body)

    return answer


def dask_like(conn: socket.socket) -> None:
    conn.sendall(b":\x00\x00\x00\x00\x00\x00\x00\x83\xabcompression\xc0\xa6python\xafpickle-protocol\x05")
    quiet(conn)


def error_of(address: str, timeout: float = 3.0) -> str:
    with pytest.raises(BridgeError) as e:
        probe.check_scheduler(address, timeout)
    assert e.value.kind == "not_a_scheduler"
    return e.value.message


def test_addresses_are_read_like_distributed_reads_them() -> None:
    assert probe.tcp_target("tcp://10.0.0.1:8786") == probe.Target("10.0.0.1", 8786)
    assert probe.tcp_target("dask-scheduler:8787") == probe.Target("dask-scheduler", 8787)
    assert probe.tcp_target("tcp://[::1]:9000") == probe.Target("::1", 9000)
    assert probe.tcp_target("tcp://host") == probe.Target("host", 8786)
    assert probe.tcp_target("tls://host:8786") is None
    assert probe.tcp_target("inproc://x") is None


def test_a_quiet_listener_fails_within_the_timeout() -> None:
    with server(quiet) as port:
        started = time.monotonic()
        message = error_of("tcp://127.0.0.1:%d" % port, timeout=3.0)
        assert time.monotonic() - started < 10
    assert "is not a Dask scheduler" in message and "sent no Dask handshake" in message, message
    assert "8786" in message, message


def test_a_dashboard_names_its_scheduler() -> None:
    body = b'{"type": "Scheduler", "address": "tcp://127.0.0.1:45678", "services": {"dashboard": 8787}}'
    with server(http("200 OK", body)) as port:
        message = error_of("127.0.0.1:%d" % port)
    assert "is the Dask dashboard" in message and "`address: tcp://127.0.0.1:45678`" in message, message


def test_another_http_server_is_named_as_one() -> None:
    with server(http("404 Not Found", b"nope")) as port:
        message = error_of("tcp://127.0.0.1:%d" % port)
    assert "an HTTP server" in message and "404 Not Found" in message, message


def test_a_service_that_speaks_first_is_quoted() -> None:
    def ssh(conn: socket.socket) -> None:
        conn.sendall(b"SSH-2.0-OpenSSH_9.2\r\n")
        quiet(conn)

    with server(ssh) as port:
        message = error_of("tcp://127.0.0.1:%d" % port)
    assert "SSH-2.0-OpenSSH_9.2" in message, message


def test_a_dask_handshake_passes_and_unreachable_is_left_to_distributed() -> None:
    with server(dask_like) as port:
        probe.check_scheduler("tcp://127.0.0.1:%d" % port, 3.0)
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()
    probe.check_scheduler("tcp://127.0.0.1:%d" % port, 1.0)
    probe.check_scheduler("tls://127.0.0.1:%d" % port, 1.0)


def test_an_http_answer_on_the_dashboard_port_names_the_dashboard_and_8786() -> None:
    target = probe.Target("dask_scheduler.dns-name", 8787)
    message = probe.describe("dask_scheduler.dns-name:8787", target, b"HTTP/1.1 302 Found\r\n\r\n", 1.0)
    assert "usually the Dask dashboard" in message and "`tcp://dask_scheduler.dns-name:8786`" in message, message
