"""Clients for the agent: labeled batches (acked, retried) and camera frames (lossy).

``LabeledClient`` follows the zguide's Lazy Pirate pattern over a DEALER
socket: every message waits for its reply up to ``timeout_s``; on a timeout the
socket is closed and reopened (a dead agent's queue is thrown away) and every
unanswered message is sent again with the same (sender, seq), so the agent
stores it at most once; after ``retries`` timeouts in a row without any reply
``AgentUnavailable`` is raised (the messages stay pending and a later call goes
on retrying them). Up to ``window`` messages are in flight at once, which lets
the agent group their fsyncs.

Sequence numbers start at the current time in microseconds, so a client that
restarts with the same sender id never reuses a (sender, seq) pair that the
agent would take for a retry.
"""

from __future__ import annotations

import json
import logging
import socket as socket_module
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import zmq

from cl_agent.errors import CLAgentError
from cl_agent.codec import encode_image
from cl_agent.config import WireSection
from cl_agent.peer import CONTROL, LABELED, Role, wrong_endpoint
from cl_agent.wire import WireError, check_outgoing_size, decode_reply, pack_message

log = logging.getLogger(__name__)


class AgentUnavailable(CLAgentError):
    """No reply from the agent after the configured retries."""


class AgentRefused(AgentUnavailable):
    """The agent refused this client's connection in the handshake: CURVE on one side only, or a client key it
    does not authorize. Sending again cannot help, so it is raised at once, not after the retries.
    ``refusal`` is why, without what became of the messages."""

    def __init__(self, message: str, refusal: str | None = None):
        super().__init__(message)
        self.refusal = refusal or message


@dataclass
class Ack:
    """The agent's answer to one labeled message (``ok`` False for a nack, with ``reason``)."""

    seq: int
    ok: bool
    reason: str | None = None
    detail: str = ""
    accepted: int = 0
    duplicate: bool = False
    experience: int | None = None
    header: dict = field(default_factory=dict)


def default_sender(prefix: str = "") -> str:
    return f"{prefix or socket_module.gethostname()}-{uuid.uuid4().hex[:8]}"


def _curve_client(sock: zmq.Socket, curve_secret_key: str | Path | None, curve_server_key: str | Path | None) -> None:
    if curve_secret_key or curve_server_key:
        from cl_agent.security import make_client

        if not (curve_secret_key and curve_server_key):
            raise CLAgentError("CURVE needs both the client's secret key file and the agent's public key file")
        make_client(sock, curve_secret_key, curve_server_key)


def connect(sock: zmq.Socket, endpoint: str, curve: tuple = (None, None)) -> zmq.Socket:
    """Set up CURVE (``curve``: client secret key file, agent public key file) and connect ``sock``;
    on any failure the socket is closed and the error names the endpoint."""
    try:
        _curve_client(sock, *curve)
        sock.connect(endpoint)
    except zmq.ZMQError as e:
        sock.close(linger=0)
        raise CLAgentError(f"cannot connect to {endpoint!r}: {e} (expected an endpoint like tcp://HOST:PORT)") from None
    except BaseException:
        sock.close(linger=0)
        raise
    return sock


def tries(count: int) -> str:
    """``count`` tries, in words ("1 try", "3 tries")."""
    return f"{count} {'try' if count == 1 else 'tries'}"


def message_limit(max_message_bytes: int | None) -> int:
    """The receiver's ``wire.max_message_bytes``: as given (>= 1), or the default limit."""
    if max_message_bytes is None:
        return WireSection().max_message_bytes
    if isinstance(max_message_bytes, bool) or not isinstance(max_message_bytes, int) or max_message_bytes < 1:
        raise CLAgentError(f"max_message_bytes must be an integer >= 1, got {max_message_bytes!r}")
    return max_message_bytes


def _check_size(parts: list[bytes], limit: int, what: str) -> None:
    """A message above the agent's limit is refused here, with nothing sent: the agent's socket would drop
    the connection, and every resend would drop it again (holding up the messages behind it)."""
    try:
        check_outgoing_size(parts, limit, what)
    except WireError as e:
        raise CLAgentError(f"not sent: {e.detail}; send fewer or smaller images") from None


def _check_label_count(images: int, labels: Sequence) -> None:
    """One label per image, checked here: the agent would refuse the batch (label_count_mismatch)."""
    if len(labels) != images:
        raise CLAgentError(f"not sent: {len(labels)} {'label' if len(labels) == 1 else 'labels'} for {images} "
                           f"{'image' if images == 1 else 'images'}; give one label per image")


_AUTH_REJECTED = ("rejected this client's CURVE key (is its public key in the agent's "
                  "ingest.curve.authorized_clients_dir, and is --curve-server the agent's public key?)")


def auth_rejected_message(endpoint: str) -> str:
    """The error for a CURVE client key the agent does not authorize."""
    return f"the agent at {endpoint} {_AUTH_REJECTED}"


class HandshakeWatch:
    """Follows a socket's handshakes through its monitor; the one reader of the client sockets' monitors.

    ``refusal`` says why the agent refused them: CURVE on one side only, or (a request socket, no
    ``socket_type``) a client key it does not authorize. ``unclear`` counts handshakes that failed without
    detail (under CURVE: most likely a --curve-server key that is not the agent's).

    With ``socket_type`` (a FrameClient's push or pub) it follows each connection as well: ``connected``
    once the handshake succeeded and, for pub, the agent's subscription arrived on ``sock`` (read here
    too). A socket type that does not pair with the agent's frame socket is a refusal (the agent hangs up
    in the handshake and libzmq does not retry), an unauthorized key is not (libzmq keeps retrying it: it
    is noted for ``FrameClient.not_connected_message``), and a run of handshakes failing without detail is
    warned about once. Without ``socket_type`` (a DEALER asking ``role``, the agent's labeled or control
    endpoint) a hang-up in the handshake that libzmq does not retry is a refusal too: the endpoint's socket
    does not take a DEALER (the agent's frame endpoint, a PULL or SUB, does this)."""

    EVENTS = zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_AUTH | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
    CONNECTION_EVENTS = (
        EVENTS | zmq.EVENT_CONNECTED | zmq.EVENT_DISCONNECTED | zmq.EVENT_HANDSHAKE_SUCCEEDED
        | zmq.EVENT_CONNECT_DELAYED | zmq.EVENT_CONNECT_RETRIED
    )

    def __init__(self, sock: zmq.Socket, endpoint: str, curve: bool, socket_type: str | None = None,
                 role: Role = LABELED):
        self.endpoint = endpoint
        self.curve = curve
        self.socket_type = socket_type
        self.role = role  # request sockets: the endpoint they expect, named when it refuses a DEALER
        self.refusal: str | None = None
        self.unclear = 0
        self.handshaken = False  # a handshake with the agent has succeeded (and the connection not lost since)
        self.subscribed = False  # pub: the agent's subscription has arrived on the current connection
        # The agent can take frames now (as of the last read): handshake done and, for pub, subscribed. An
        # attribute, kept by _set_connection, not a property: FrameClient reads it at every send.
        self.connected = False
        self.tcp_connected = False  # some TCP connection was ever accepted (for the not-connected message)
        self.auth_rejected = False  # some handshake ever failed CURVE authentication (ditto)
        self.unclear_failures = 0  # connections in a row whose handshake failed without detail
        self._handshaking = False  # a TCP connection is up, its handshake not finished
        self._auth_failed = False  # the current connection's handshake failed CURVE authentication
        self._unclear = False  # the current connection's handshake failed without detail
        self._unclear_since: float | None = None  # when the first of the unclear failures in a row came
        self._unclear_warned = False  # once per watch
        self._hung_up_at: float | None = None  # when the agent hung up mid-handshake, until libzmq tries again
        self.monitor = sock.get_monitor_socket(self.CONNECTION_EVENTS)
        self._socket = sock

    def _set_connection(self, handshaken: bool, subscribed: bool) -> None:
        self.handshaken, self.subscribed = handshaken, subscribed
        self.connected = handshaken and (self.socket_type != "pub" or subscribed)

    def read(self) -> str | None:
        """Read the monitor without blocking; the refusal, if one came."""
        from zmq.utils.monitor import parse_monitor_message

        # EVENTS first: far cheaper per call than a receive that raises zmq.Again
        while self.refusal is None and not self.monitor.closed and self.monitor.get(zmq.EVENTS) & zmq.POLLIN:
            parts = self.monitor.recv_multipart(zmq.NOBLOCK)
            if len(parts) != 2 or len(parts[0]) != 6:
                # The rest of an event whose first part an interrupted read took (a KeyboardInterrupt
                # between the two receives): drop it, the next event starts afresh.
                continue
            message = parse_monitor_message(parts)
            self._on_event(message["event"], message["value"])
        if self.refusal is None and self.socket_type == "pub" and not self._socket.closed:
            self._read_subscriptions()
        if self.refusal is None and self._hung_up_at is not None and time.monotonic() - self._hung_up_at >= RETRY_GRACE_S:
            self.refusal = (refused_message(self.endpoint, self.socket_type) if self.socket_type is not None
                            else dealer_refused_message(self.endpoint, self.role))
        return self.refusal

    def settles_in(self) -> float | None:
        """Seconds until a hang-up in the handshake, not retried by then, is taken for a refusal (None: none
        pending): a wait on the monitor alone would not wake up for it, as no event comes."""
        if self.refusal is not None or self._hung_up_at is None:
            return None
        return max(0.0, self._hung_up_at + RETRY_GRACE_S - time.monotonic())

    def _on_event(self, event: int, value: int) -> None:
        if event in (zmq.EVENT_CONNECT_DELAYED, zmq.EVENT_CONNECT_RETRIED):
            self._hung_up_at = None  # libzmq reconnects: the agent went away (e.g. restarted), it did not refuse
        elif event == zmq.EVENT_CONNECTED:
            self._handshaking, self._auth_failed, self._unclear, self._hung_up_at = True, False, False, None
            self.tcp_connected = True
        elif event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
            self._handshaking, self.unclear_failures, self._unclear_since = False, 0, None
            self._set_connection(True, self.subscribed)
        elif event == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
            self._auth_failed = self.auth_rejected = True
            if self.socket_type is None and value == 400:  # 400: the ZAP handler denied the key
                self.refusal = auth_rejected_message(self.endpoint)
        elif event == zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL and value == zmq.PROTOCOL_ERROR_ZMTP_MECHANISM_MISMATCH:
            self.refusal = mechanism_message(self.endpoint, self.curve)
        elif event == zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL:
            if self.socket_type is not None and not self._auth_failed:
                self.refusal = refused_message(self.endpoint, self.socket_type)
        elif event == zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL:
            self._unclear = True
            self.unclear += 1
        elif event == zmq.EVENT_DISCONNECTED:
            if self._handshaking and self._unclear:
                # libzmq retries these: a proxy with no agent behind it, an agent that died mid-handshake,
                # or a mismatch under CURVE. Not a refusal; a run of them is worth one warning.
                self.unclear_failures += 1
                now = time.monotonic()
                if self._unclear_since is None:
                    self._unclear_since = now
                if (self.socket_type is not None and not self._unclear_warned and self.unclear_failures >= UNCLEAR_FAILURES
                        and now - self._unclear_since >= UNCLEAR_WARN_AFTER_S):
                    self._unclear_warned = True
                    log.warning(failing_handshakes_message(
                        self.endpoint, self.socket_type, self.curve, self.unclear_failures, now - self._unclear_since))
            elif self._handshaking and not self._auth_failed:
                # The agent hung up before the handshake ended without a word. A socket-type mismatch
                # does this, and libzmq then never reconnects; an agent that died in that moment does
                # it too, and libzmq reconnects at once (CONNECT_RETRIED). Wait to see which.
                self._hung_up_at = time.monotonic()
            self._handshaking = False
            self._set_connection(False, False)

    def _read_subscriptions(self) -> None:
        """pub: read the agent's (un)subscriptions that XPUB hands up (first byte 1: subscribe, 0: unsubscribe)."""
        while self._socket.get(zmq.EVENTS) & zmq.POLLIN:
            try:
                message = self._socket.recv(zmq.NOBLOCK)
            except zmq.Again:
                break
            if message[:1] in (b"\x00", b"\x01"):
                self._set_connection(self.handshaken, message[:1] == b"\x01")

    def hint(self) -> str:
        """What the handshakes showed, for a timeout message ("" when nothing is known)."""
        if self.refusal is None and self.unclear and self.curve:
            return (f"; {self.unclear} CURVE handshakes failed without detail: is --curve-server the agent's "
                    "public key (the .key file next to its ingest.curve.server_secret_key)?")
        return ""

    def close(self) -> None:
        if not self.monitor.closed:
            if not self._socket.closed:  # connect() closes the socket when the endpoint is bad
                self._socket.disable_monitor()
            self.monitor.close(linger=0)


def dealer_refused_message(endpoint: str, role: Role) -> str:
    """The error for a request (DEALER) connection hung up on in the handshake: a socket that does not take a
    DEALER, most likely the agent's frame endpoint (a PULL or SUB)."""
    return (f"{endpoint} refused a DEALER connection: it is not {role.name} ({role.key}, default port {role.port}), "
            f"most likely the agent's frame endpoint (a PULL or SUB socket); check that the address is its {role.key}")


def control_status(
    endpoint: str,
    *,
    timeout_s: float = 5.0,
    curve_secret_key: str | Path | None = None,
    curve_server_key: str | Path | None = None,
    context: zmq.Context | None = None,
) -> dict:
    """Ask the agent's control endpoint (``cl-agent ingest`` or ``run``) for its ingestion counters with a
    ``status`` message; returns the reply's ``counters``.

    AgentRefused when the agent refuses the connection (CURVE), AgentUnavailable when nothing answers within
    ``timeout_s``, CLAgentError naming the endpoint's role when another of the project's endpoints answers."""
    sock = (context or zmq.Context.instance()).socket(zmq.DEALER)
    sock.linger = 0
    watch = HandshakeWatch(sock, endpoint, bool(curve_secret_key or curve_server_key), role=CONTROL)
    try:
        connect(sock, endpoint, (curve_secret_key, curve_server_key))
        seq = time.time_ns() // 1000
        sock.send_multipart([b"", *pack_message("status", default_sender("status"), seq)], zmq.NOBLOCK)
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        poller.register(watch.monitor, zmq.POLLIN)
        deadline = time.monotonic() + timeout_s
        while True:
            remaining = deadline - time.monotonic()
            settles = watch.settles_in()
            wait_s = remaining if settles is None else min(remaining, settles + 0.001)
            ready = dict(poller.poll(wait_s * 1000)) if remaining > 0 else {}
            if watch.read() is not None:
                raise AgentRefused(watch.refusal, watch.refusal)
            if sock in ready:
                parts = sock.recv_multipart()
                break
            if remaining <= 0:
                raise AgentUnavailable(
                    f"nothing answered at {endpoint} within {timeout_s:g} s: is the agent (cl-agent ingest or run) "
                    f"running, and is this its {CONTROL.key} (default port {CONTROL.port}), not the frame endpoint?"
                    + watch.hint()
                )
    except zmq.Again:
        raise AgentUnavailable(f"cannot send to {endpoint}: no connection takes the message") from None
    finally:
        watch.close()
        sock.close(linger=0)
    try:
        header = decode_reply(parts[1:] if parts and parts[0] == b"" else parts, WireSection())
    except WireError as e:
        raise CLAgentError(f"{endpoint} answered with a malformed reply ({e.detail}): is it the agent's {CONTROL.key}?") from None
    wrong = wrong_endpoint(endpoint, header, CONTROL)
    if wrong:
        raise CLAgentError(wrong)
    counters = header.get("counters")
    if header.get("kind") != "status" or not isinstance(counters, dict):
        raise CLAgentError(f"{endpoint} answered {header.get('kind')!r} without counters: is it the agent's {CONTROL.key}?")
    return counters


class LabeledClient:
    def __init__(
        self,
        endpoint: str,
        sender: str | None = None,
        *,
        timeout_s: float = 2.5,
        retries: int = 3,
        window: int = 8,
        start_seq: int | None = None,
        curve_secret_key: str | Path | None = None,
        curve_server_key: str | Path | None = None,
        context: zmq.Context | None = None,
        max_message_bytes: int | None = None,
    ):
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        self.max_message_bytes = message_limit(max_message_bytes)
        self.endpoint = endpoint
        self.sender = sender or default_sender()
        self.timeout_s = timeout_s
        self.retries = retries
        self.window = window
        self.next_seq = time.time_ns() // 1000 if start_seq is None else start_seq
        self._curve = (curve_secret_key, curve_server_key)
        self._context = context or zmq.Context.instance()
        self._pending: OrderedDict[int, tuple[list[bytes], float]] = OrderedDict()  # seq -> (parts, sent at)
        self._done: dict[int, Ack] = {}
        self.reconnects = 0
        self.resent = 0
        self._socket: zmq.Socket | None = None
        self._handshakes: HandshakeWatch | None = None
        self._refused = False  # the last wait ended in a refusal: the next one starts on a new connection
        self._connect()

    # ---------------------------------------------------------------- socket

    def _connect(self) -> None:
        sock = self._context.socket(zmq.DEALER)
        sock.linger = 0
        self._handshakes = HandshakeWatch(sock, self.endpoint, bool(self._curve[0] or self._curve[1]))
        try:
            self._socket = connect(sock, self.endpoint, self._curve)
        except BaseException:
            self._handshakes.close()
            raise

    def _reconnect(self) -> None:
        self._handshakes.close()
        self._socket.close(linger=0)
        self.reconnects += 1
        self._connect()
        now = time.monotonic()
        for seq, (parts, _) in list(self._pending.items()):
            self._send(parts)
            self._pending[seq] = (parts, now)
            self.resent += 1

    def _send(self, parts: list[bytes]) -> None:
        """Queue a message without blocking. When no connection can take it (say, a refused CURVE
        handshake), it stays pending: the timeout reconnects and resends it, then gives up after
        ``retries``. A blocking send would wait there for ever."""
        try:
            self._socket.send_multipart([b"", *parts], zmq.NOBLOCK)
        except zmq.Again:
            pass

    def close(self) -> None:
        if self._socket is not None:
            self._handshakes.close()
            self._socket.close(linger=0)
            self._socket = None

    def __enter__(self) -> "LabeledClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---------------------------------------------------------------- sending

    def submit_encoded(
        self,
        payloads: Sequence[bytes],
        shapes: Sequence[Sequence[int]],
        labels: Sequence[str | int],
        *,
        encoding: str = "jpeg",
        kind: str = "labeled",
    ) -> int:
        """Send without waiting for the ack (waits only while ``window`` messages are in flight); returns the seq."""
        if kind == "labeled":
            _check_label_count(len(payloads), labels)
        while len(self._pending) >= self.window:
            self._pump()
        seq = self.next_seq
        try:
            parts = pack_message(kind, self.sender, seq, list(payloads), encoding=encoding, shapes=shapes, labels=labels if kind == "labeled" else None)
        except ValueError as e:  # a bad label, or payloads and shapes that do not match: nothing sent
            raise CLAgentError(f"not sent: {e}") from None
        _check_size(parts, self.max_message_bytes, f"a {kind} message of {len(payloads)} images")  # nothing sent or queued
        self.next_seq += 1
        self._pending[seq] = (parts, time.monotonic())  # first: a signal in the send leaves it pending, maybe sent
        self._send(parts)
        return seq

    def submit(self, images: Sequence[np.ndarray], labels: Sequence[str | int], *, encoding: str = "jpeg", quality: int = 90) -> int:
        """Encode uint8 (H, W, 3) RGB images and submit them (see ``submit_encoded``)."""
        _check_label_count(len(images), labels)
        encoded = [encode_image(image, encoding, quality) for image in images]
        return self.submit_encoded([p for p, _ in encoded], [s for _, s in encoded], labels, encoding=encoding)

    def send(self, images: Sequence[np.ndarray], labels: Sequence[str | int], *, encoding: str = "jpeg", quality: int = 90) -> Ack:
        """Send one labeled batch and wait for its ack or nack."""
        return self.wait(self.submit(images, labels, encoding=encoding, quality=quality))

    def send_encoded(self, payloads: Sequence[bytes], shapes: Sequence[Sequence[int]], labels: Sequence[str | int], *, encoding: str = "jpeg") -> Ack:
        return self.wait(self.submit_encoded(payloads, shapes, labels, encoding=encoding))

    def end_experience(self) -> Ack:
        """Ask the agent to cut the open experience now; ``experience`` in the ack is its index."""
        return self.wait(self.submit_encoded([], [], [], kind="end_experience"))

    def wait(self, seq: int) -> Ack:
        """Block until message ``seq`` is answered."""
        while seq not in self._done:
            if seq not in self._pending:
                raise KeyError(f"seq {seq} was never sent by this client or its answer was already taken")
            self._pump()
        return self._done.pop(seq)

    def flush(self) -> list[Ack]:
        """Wait for every message in flight; returns all answers not yet taken, in seq order."""
        while self._pending:
            self._pump()
        done = [self._done[s] for s in sorted(self._done)]
        self._done.clear()
        return done

    def poll_acks(self, timeout_s: float = 0.0) -> list[Ack]:
        """Answers that have arrived, in seq order; with ``timeout_s`` it first waits that long at most for one
        when none has (and a message is in flight). Nothing is resent here."""
        if timeout_s > 0 and self._pending and not self._done:
            self._socket.poll(timeout_s * 1000)
        while self._pending and self._socket.poll(0):
            try:
                self._on_reply(self._socket.recv_multipart(zmq.NOBLOCK))
            except zmq.Again:
                break
        done = [self._done[s] for s in sorted(self._done)]
        self._done.clear()
        return done

    @property
    def in_flight(self) -> int:
        return len(self._pending)

    def _pump(self) -> None:
        """Wait for replies; on a timeout reconnect and resend (Lazy Pirate); raise after ``retries`` silent timeouts,
        or at once with AgentRefused when the agent refuses the handshake (CURVE on one side only, an unauthorized
        key): no resend can get through then."""
        if self._refused:
            self._refused = False
            self._reconnect()
        failures = 0
        poller = zmq.Poller()
        poller.register(self._socket, zmq.POLLIN)
        poller.register(self._handshakes.monitor, zmq.POLLIN)
        while True:
            oldest = next(iter(self._pending.values()))[1]
            wait_s = max(0.0, oldest + self.timeout_s - time.monotonic())
            settles = self._handshakes.settles_in()  # a hang-up in the handshake: look again when it settles
            ready = dict(poller.poll((wait_s if settles is None else min(wait_s, settles + 0.001)) * 1000))
            if self._handshakes.read() is not None:
                self._refused = True
                count = len(self._pending)
                raise AgentRefused(
                    f"{self._handshakes.refusal}; {count} {'message' if count == 1 else 'messages'} not delivered "
                    "(still pending, sent again on the next call)",
                    self._handshakes.refusal,
                )
            if self._socket not in ready and (self._handshakes.monitor in ready or settles is not None and settles < wait_s):
                continue  # a handshake event (or a hang-up's grace ending) that settles nothing: keep waiting
            if self._socket in ready:
                got = 0
                while True:
                    try:
                        parts = self._socket.recv_multipart(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    got += self._on_reply(parts)
                if got:
                    return
                continue
            failures += 1
            if failures > self.retries:
                raise AgentUnavailable(
                    f"no reply from {self.endpoint} after {self.retries} retries ({tries(self.retries + 1)} of "
                    f"{self.timeout_s:g} s each; {len(self._pending)} {'message' if len(self._pending) == 1 else 'messages'} "
                    "still pending, resent on the next call)" + self._handshakes.hint()
                )
            self._reconnect()
            poller = zmq.Poller()
            poller.register(self._socket, zmq.POLLIN)
            poller.register(self._handshakes.monitor, zmq.POLLIN)

    def _on_reply(self, parts: list[bytes]) -> int:
        body = parts[1:] if parts and parts[0] == b"" else parts
        try:
            header = json.loads(body[0])
        except (IndexError, UnicodeDecodeError, json.JSONDecodeError):
            return 0
        seq = header.get("seq")
        if seq not in self._pending:
            return 0  # a late duplicate answer
        del self._pending[seq]
        ok = header.get("kind") == "ack"
        self._done[seq] = Ack(
            seq=seq,
            ok=ok,
            reason=None if ok else header.get("reason", "unknown"),
            detail=header.get("detail", ""),
            accepted=header.get("accepted", 0),
            duplicate=bool(header.get("duplicate", False)),
            experience=header.get("experience"),
            header=header,
        )
        return 1


# The frame socket the agent binds for each camera socket type, and the other pairing.
_FRAME_PAIRS = {"push": ("PUSH", "pull", "PULL"), "pub": ("PUB", "sub", "SUB")}
WAIT_POLL_MS = 100  # send_encoded(wait=True) looks at the handshake monitor at least this often while it waits
CHECK_INTERVAL_S = 0.02  # send reads the handshake monitor at most this often (a read costs several us)
UNCLEAR_FAILURES = 3  # handshakes in a row that fail without detail (libzmq retries those) before a warning,
UNCLEAR_WARN_AFTER_S = 1.0  # ... and for this long: under load a few come before a refusal that settles it
RETRY_GRACE_S = 0.3  # a hang-up in the handshake not followed by a reconnect attempt within this long is a refusal


class PeerRefused(CLAgentError):
    """The agent closed the connection during the handshake: its frame socket does not take this socket type,
    or one side uses CURVE and the other does not. libzmq does not retry such a connection."""


class NotConnected(CLAgentError):
    """No connection to the agent came up within the wait (nothing listening there, or a handshake that never ends)."""


def refused_message(endpoint: str, socket_type: str) -> str:
    """The error for a frame connection the agent refused in the handshake, naming both socket types and the fix."""
    ours, agent_value, agent_kind = _FRAME_PAIRS[socket_type]
    other = "pub" if socket_type == "push" else "push"
    other_ours, other_value, _ = _FRAME_PAIRS[other]
    message = (
        f"the agent at {endpoint} refused a {ours} connection: its frame socket is not a {agent_kind} "
        f"(it expects {other_ours}, from ingest.frame_socket: {other_value}, or REQ, from router); "
        f"use --socket {other} (socket_type={other!r}) or set ingest.frame_socket: {agent_value} on the agent; "
        "or the endpoint is not the agent's frame endpoint at all (check it is ingest.frame_endpoint, "
        "not the labeled or control one)"
    )
    return message


def failing_handshakes_message(endpoint: str, socket_type: str, curve: bool, failures: int, seconds: float) -> str:
    """The warning for handshakes that keep failing without detail (libzmq keeps retrying them)."""
    message = f"{failures} handshakes in a row with {endpoint} failed without detail over {seconds:.1f} s; still trying. "
    return message + _unclear_causes(socket_type, curve)


def _unclear_causes(socket_type: str, curve: bool) -> str:
    """What handshakes failing without detail most likely mean."""
    if curve:
        ours, _, agent_kind = _FRAME_PAIRS[socket_type]
        return (
            f"Under CURVE this is how a socket-type mismatch shows (this client sends {ours}, which an agent's "
            f"{agent_kind} frame socket takes; see --socket and ingest.frame_socket), or the agent cannot use this "
            "client's keys (is --curve-server the agent's public key?)"
        )
    return "Something accepts connections there and closes them: is the agent up behind this address?"


def mechanism_message(endpoint: str, curve: bool) -> str:
    """The error for a connection refused because one side uses CURVE and the other does not."""
    if curve:
        return (f"the agent at {endpoint} refused the connection: this client uses CURVE and the agent does not "
                "(drop --curve-secret/--curve-server, or set ingest.curve.enabled: true on the agent)")
    return (f"the agent at {endpoint} refused the connection: the agent uses CURVE and this client has no keys "
            "(pass --curve-secret and --curve-server, or set ingest.curve.enabled: false on the agent)")


class FrameClient:
    """Sends camera frames; never blocks: a frame the socket cannot take now is dropped and counted.

    A socket monitor watches the handshakes. ZeroMQ closes a connection whose socket types do not
    pair (PUB to the agent's PULL, PUSH to its SUB or ROUTER) and never retries it, so every frame
    would vanish; instead ``send`` raises ``PeerRefused`` (a CLAgentError) naming both socket types.
    The same holds when only one side uses CURVE. A client key the agent does not authorize is not
    reported this way (the handshake fails with an AUTH event and libzmq keeps retrying).

    ``connected`` is True once the agent can take frames: the handshake succeeded and, for pub, the
    agent's subscription arrived (frames published before it are discarded by ZeroMQ). ``sent`` counts
    every frame the socket took; ``sent_unconnected`` the part of them taken while no connection was up
    (by the last monitor read), which is delivered only if one comes up before ``close`` ends.
    ``require_connected(timeout_s)`` waits for the connection and names the likely cause when none came.
    """

    def __init__(
        self,
        endpoint: str,
        sender: str | None = None,
        *,
        socket_type: str = "push",
        hwm: int = 16,
        curve_secret_key: str | Path | None = None,
        curve_server_key: str | Path | None = None,
        context: zmq.Context | None = None,
        max_message_bytes: int | None = None,
    ):
        # XPUB, not PUB: the agent's SUB takes either, and XPUB shows when its subscription arrived and (with
        # NODROP) refuses a frame at the high-water mark, where PUB would discard it and report it sent.
        kinds = {"push": zmq.PUSH, "pub": zmq.XPUB}
        self.max_message_bytes = message_limit(max_message_bytes)
        if socket_type not in kinds:
            raise ValueError(f"socket_type must be push or pub, got {socket_type!r}")
        self.endpoint = endpoint
        self.socket_type = socket_type
        self._curve = bool(curve_secret_key or curve_server_key)
        self.sender = sender or default_sender("camera")
        self.seq = 0
        self.sent = 0
        self.dropped = 0
        self.sent_unconnected = 0  # of ``sent``, taken while no connection was up: delivered only if one comes
        self._next_check = 0.0  # monotonic time of send's next look at the monitor
        self._context = context or zmq.Context.instance()
        self._socket = self._context.socket(kinds[socket_type])
        self._socket.linger = 500  # close() still delivers what is queued, for half a second at most
        self._socket.sndhwm = hwm
        if socket_type == "pub":
            self._socket.setsockopt(zmq.XPUB_VERBOSE, 1)  # every subscription is passed up, a reconnect's too
            self._socket.setsockopt(zmq.XPUB_NODROP, 1)
        self._watch = HandshakeWatch(self._socket, endpoint, self._curve, socket_type)
        try:
            connect(self._socket, endpoint, (curve_secret_key, curve_server_key))
        except BaseException:
            self.close()
            raise

    @property
    def connected(self) -> bool:
        """The agent can take frames now (as of the last monitor read): handshake done and, for pub, subscribed."""
        return self._watch.connected

    def check(self) -> None:
        """Raise PeerRefused if the agent refused this socket type (reads the monitor; never blocks)."""
        if self._watch.read() is not None:
            raise PeerRefused(self._watch.refusal)

    def wait_connected(self, timeout_s: float) -> bool:
        """Wait up to ``timeout_s`` for the connection (see ``connected``): True once it is up, False if not yet;
        PeerRefused if refused."""
        deadline = time.monotonic() + timeout_s
        poller = zmq.Poller()
        poller.register(self._watch.monitor, zmq.POLLIN)
        if self.socket_type == "pub":
            poller.register(self._socket, zmq.POLLIN)  # the subscription arrives on the socket itself
        while True:
            self.check()
            remaining = deadline - time.monotonic()
            if self.connected or remaining <= 0:
                return self.connected
            poller.poll(min(remaining, 0.05) * 1000)

    def require_connected(self, timeout_s: float) -> None:
        """``wait_connected``, raising NotConnected (naming the endpoint and the likely cause) when no
        connection came up in ``timeout_s``, PeerRefused when the agent refused this one."""
        if not self.wait_connected(timeout_s):
            raise NotConnected(self.not_connected_message(timeout_s))

    def not_connected_message(self, waited_s: float) -> str:
        """Why no connection is up after ``waited_s`` seconds, from what the monitor saw."""
        where = f"no connection to {self.endpoint} within {waited_s:g} s: "
        watch = self._watch
        if watch.auth_rejected:
            return where + "the agent " + _AUTH_REJECTED
        if watch.unclear_failures:
            return where + f"{watch.unclear_failures} handshakes failed without detail. " + _unclear_causes(self.socket_type, self._curve)
        if watch.handshaken:  # pub only: the handshake is done, the subscription never came
            return where + "the handshake succeeded but no subscription arrived (is this the agent's SUB frame socket?)"
        if watch.tcp_connected:
            return where + ("something accepted the TCP connection but no ZeroMQ handshake finished "
                            "(is this the agent's ingest.frame_endpoint?)")
        return where + ("nothing accepted a connection there (is the agent running, and is this its "
                        "ingest.frame_endpoint, host and port?)")

    def send_encoded(self, payload: bytes, shape: Sequence[int], *, encoding: str = "jpeg", wait: bool = False,
                     **fields) -> bool:
        """Send one encoded frame; returns False if it was dropped (the agent's queue or ours is full).
        With ``wait`` a full queue is waited out instead (for a recording, where every frame counts and none
        goes stale): the frame is sent once the socket takes it, and True is returned.

        Raises PeerRefused once the agent has refused this socket type."""
        now = time.monotonic()
        if self._watch.refusal is not None or now >= self._next_check:
            self._next_check = now + CHECK_INTERVAL_S
            self.check()
        parts = pack_message("frame", self.sender, self.seq, [payload], encoding=encoding, shapes=[shape], **fields)
        _check_size(parts, self.max_message_bytes, "a frame")
        self.seq += 1  # also for dropped frames: the agent counts the gaps
        while True:
            try:
                self._socket.send_multipart(parts, zmq.NOBLOCK, copy=False)
                break
            except zmq.Again:
                if not wait:
                    self.dropped += 1
                    return False
            self._socket.poll(WAIT_POLL_MS, zmq.POLLOUT)  # room in the queue, or look at the monitor again
            self.check()
        self.sent += 1
        if not self._watch.connected:
            self.sent_unconnected += 1
        return True

    def send(self, image: np.ndarray, *, encoding: str = "jpeg", quality: int = 80) -> bool:
        """Encode a uint8 (H, W, 3) RGB frame and send it."""
        payload, shape = encode_image(image, encoding, quality)
        return self.send_encoded(payload, shape, encoding=encoding)

    def close(self, linger_s: float | None = None) -> None:
        """Close the socket; queued frames still go out for ``linger_s`` seconds (default 0.5), then are discarded."""
        watch, sock = getattr(self, "_watch", None), getattr(self, "_socket", None)  # None: __init__ was cut short
        if watch is not None:
            watch.close()
        if sock is not None:
            sock.close(linger=None if linger_s is None else round(linger_s * 1000))

    def __enter__(self) -> "FrameClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
