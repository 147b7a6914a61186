"""Is the address a Dask scheduler? A raw look at it before distributed connects.

distributed's Client waits for a Dask handshake without a deadline once a TCP
connection is accepted, so an address that answers but is not a scheduler (the
dashboard, an HTTP server, any other service) would hang the connect far beyond its
`timeout`. A Dask scheduler writes its handshake (a msgpack frame naming
"compression" and "pickle-protocol") as soon as it accepts a connection; this module
waits for it, and when something else answers says what it is: the dashboard (it
answers `/json/identity.json` with the scheduler's real address), another HTTP
server, a TLS server, or a service that says nothing.
"""

from __future__ import annotations

import contextlib
import json
import socket
import time
from dataclasses import dataclass

from .protocol import BridgeError

# The scheduler's default port, and its dashboard's.
SCHEDULER_PORT = 8786
DASHBOARD_PORT = 8787
# How long a quiet server gets before it is asked an HTTP question.
QUIET_SECONDS = 2.0
# Markers of the handshake a Dask server writes first.
DASK_HANDSHAKE_MARKERS = (b"compression", b"pickle-protocol")


@dataclass
class Target:
    """Where a plain-TCP scheduler address points."""

    host: str
    port: int


def tcp_target(address: str) -> Target | None:
    """The host and port of a `tcp://` (or scheme-less) address; None for other schemes
    (tls://, inproc://, ucx://), which this probe does not look at."""
    scheme, sep, rest = address.partition("://")
    if not sep:
        scheme, rest = "tcp", address
    if scheme != "tcp":
        return None
    rest = rest.split("/", 1)[0]
    if rest.startswith("["):
        host, _, tail = rest[1:].partition("]")
        port_text = tail.lstrip(":")
    elif rest.count(":") == 1:
        host, _, port_text = rest.partition(":")
    else:
        host, port_text = rest, ""
    try:
        port = int(port_text) if port_text else SCHEDULER_PORT
    except ValueError:
        return None
    return Target(host or "127.0.0.1", port)


def looks_like_dask(data: bytes) -> bool:
    """Whether `data` starts like the handshake frame a Dask comm writes."""
    return any(marker in data[:4096] for marker in DASK_HANDSHAKE_MARKERS)


def describe(address: str, target: Target, answer: bytes, waited: float) -> str:
    """Why `answer` (what the address sent, perhaps after an HTTP request) is not a Dask
    scheduler, with what to do."""
    default_hint = "; a Dask scheduler listens on port %d by default (`tcp://%s:%d`)" % (
        SCHEDULER_PORT,
        target.host,
        SCHEDULER_PORT,
    )
    if answer.startswith(b"HTTP/"):
        scheduler = dashboard_scheduler(answer)
        if scheduler:
            return (
                "%s is the Dask dashboard (an HTTP server) of the scheduler at %s, not the scheduler itself: "
                "set `address: %s`" % (address, scheduler, scheduler)
            )
        status = answer.split(b"\r\n", 1)[0].decode("latin-1", "replace")
        what = "an HTTP server (it answered %r)" % status
        if target.port == DASHBOARD_PORT:
            what += "; port %d is usually the Dask dashboard" % DASHBOARD_PORT
        return "%s is not a Dask scheduler: it is %s%s" % (address, what, default_hint)
    if answer[:1] == b"\x15" and answer[1:2] == b"\x03":
        return (
            "%s is not a plain-TCP Dask scheduler: it answered with a TLS alert, so it speaks TLS; use "
            "`tls://%s:%d` with `tls: {ca_file, cert, key}`" % (address, target.host, target.port)
        )
    if answer:
        shown = answer[:60].decode("latin-1", "replace")
        return "%s is not a Dask scheduler: it answered %r, not a Dask handshake%s" % (address, shown, default_hint)
    return (
        "%s is not a Dask scheduler: it accepted the connection but sent no Dask handshake within %.1f s "
        "(a scheduler sends one at once)%s" % (address, waited, default_hint)
    )


def dashboard_scheduler(answer: bytes) -> str | None:
    """The scheduler address in a dashboard's `/json/identity.json` answer."""
    _, _, body = answer.partition(b"\r\n\r\n")
    try:
        identity = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return None
    if isinstance(identity, dict) and identity.get("type") == "Scheduler" and identity.get("address"):
        return str(identity["address"])
    return None


def _read(sock: socket.socket, deadline: float, until_close: bool) -> bytes:
    """Bytes from `sock` until `deadline`: the first chunk, or (`until_close`) all of
    them until the peer closes."""
    chunks: list[bytes] = []
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            break
        sock.settimeout(left)
        try:
            chunk = sock.recv(65536)
        except OSError:  # including the timeout
            break
        if not chunk:
            break
        chunks.append(chunk)
        if not until_close:
            break
    return b"".join(chunks)


def check_scheduler(address: str, timeout: float) -> None:
    """Raises BridgeError("not_a_scheduler") when `address` accepts a TCP connection but
    is not a Dask scheduler, within `timeout` seconds. Returns when it is one, when it
    cannot be reached (distributed then retries and reports that), and for addresses
    that are not plain TCP."""
    target = tcp_target(address)
    if target is None:
        return
    started = time.monotonic()
    deadline = started + timeout
    try:
        sock = socket.create_connection((target.host, target.port), timeout=max(0.1, timeout))
    except OSError:
        return
    with sock:
        first = _read(sock, min(deadline, started + QUIET_SECONDS), until_close=False)
        if looks_like_dask(first):
            return
        answer = first
        if not first:
            # Quiet: an HTTP server waits for a request. Ask the one a dashboard answers.
            request = "GET /json/identity.json HTTP/1.0\r\nHost: %s:%d\r\n\r\n" % (target.host, target.port)
            with contextlib.suppress(OSError):
                sock.sendall(request.encode("ascii"))
            answer = _read(sock, deadline, until_close=True)
            if looks_like_dask(answer):
                return  # a slow scheduler after all
        raise BridgeError("not_a_scheduler", describe(address, target, answer, time.monotonic() - started))
