"""The model-fetch endpoint: the agent serves its repository's versions to servers on other machines.

``ModelFetchService`` (a ROUTER at ``repository.fetch_endpoint``, in the agent's
main process) answers version lists, manifests and model bytes; ``FetchClient``
asks it, with a timeout and retries. Model bytes travel in chunks of at most
``chunk_bytes`` (1 MiB), requested by offset, so neither side holds a whole
model in memory and an interrupted download resumes where it stopped. The
follower that uses them to mirror versions is ``cl_agent/follower.py``.

Messages follow the wire protocol (docs/protocol.md): a JSON header part with
``v``, ``kind``, ``sender``, ``seq``; a ``model_chunk`` reply adds one raw part.

| request (header fields)                      | reply                                                   |
| -------------------------------------------- | ------------------------------------------------------- |
| ``list_versions`` (``model``)                | ``versions``: ``model``, ``versions`` (ascending), ``announce_endpoint`` |
| ``get_manifest`` (``model``, ``version``)    | ``manifest``: ``version``, ``manifest`` (the JSON object) |
| ``get_model`` (``model``, ``version``, ``offset``, ``length``) | ``model_chunk``: ``version``, ``offset``, ``size`` (whole file), ``sha256`` (manifest's); part 1 = bytes |
| anything wrong                               | ``error``: ``reason``, ``detail``                       |

``announce_endpoint`` (optional, added later: a follower ignores what it lacks) is the
agent's ``repository.announce_endpoint`` as configured ("" when it does not announce), so a
follower subscribes to the agent's port rather than its own config's default.

Error reasons: the wire layer's codes, ``bad_kind``, ``unknown_model``,
``bad_request``, ``no_version`` (not there, or removed by retention), ``bad_offset``.
``FetchClient`` adds ``timeout``, ``stopped``, ``bad_reply`` and ``wrong_endpoint`` (another
of the project's endpoints answered, e.g. the agent's labeled port; the message names it and
``repository.fetch_endpoint``).
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import re
import threading
import time

import zmq

from cl_agent.config import CurveSection, WireSection
from cl_agent.errors import CLAgentError, bind_failure
from cl_agent.peer import FETCH, wrong_endpoint
from cl_agent.repository import ModelRepository
from cl_agent.wire import PROTOCOL_VERSION, WireError, decode_message, pack_message, reply

log = logging.getLogger(__name__)

CHUNK_BYTES = 1 << 20
SENDER = "fetch"
MAX_REPLY_HEADER_BYTES = 4 << 20  # a manifest travels in the header; metrics make it kilobytes, not megabytes
_SHA_RE = re.compile(r"^[0-9a-f]{64}$")


class FetchError(CLAgentError):
    """A fetch that failed (no answer, an error reply, a bad reply); ``reason`` is a short code."""

    def __init__(self, reason: str, detail: str):
        self.reason, self.detail = reason, detail
        super().__init__(f"fetch failed ({reason}): {detail}")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# --------------------------------------------------------------------------- the agent's side


class ModelFetchService:
    """ROUTER answering list/manifest/chunk requests from ``repository``; one thread, ``start()``/``stop()``."""

    def __init__(
        self,
        repository: ModelRepository,
        endpoint: str,
        *,
        curve: CurveSection | None = None,
        wire: WireSection | None = None,
        chunk_bytes: int = CHUNK_BYTES,
        announce_endpoint: str | None = None,
    ):
        if chunk_bytes < 1:
            raise CLAgentError(f"chunk_bytes must be >= 1, got {chunk_bytes}")
        self.repository = repository
        self.announce_endpoint = announce_endpoint  # repository.announce_endpoint, told to followers; None: not told
        self.requested_endpoint = endpoint
        self.curve = curve or CurveSection()
        self.wire = wire or WireSection()
        self.chunk_bytes = chunk_bytes
        self.endpoint: str | None = None
        self.counters = {"requests": 0, "chunks": 0, "bytes_sent": 0, "errors": 0}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._context: zmq.Context | None = None
        self._auth = None

    def start(self) -> "ModelFetchService":
        # Its own context: a CURVE authenticator belongs to one context (ingestion has its own).
        self._context = zmq.Context()
        router = None
        try:
            if self.curve.enabled:
                from cl_agent.security import make_server, start_authenticator

                self._auth = start_authenticator(self._context, self.curve)
            router = self._context.socket(zmq.ROUTER)
            router.linger = 0
            router.maxmsgsize = self.wire.max_message_bytes
            if self.curve.enabled:
                make_server(router, self.curve)
            try:
                router.bind(self.requested_endpoint)
            except zmq.ZMQError as e:
                raise bind_failure(f"cannot bind repository.fetch_endpoint {self.requested_endpoint}", e) from None
        except BaseException:
            if router is not None:
                router.close(0)
            self._close_context()
            raise
        self.endpoint = router.getsockopt_string(zmq.LAST_ENDPOINT)
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, args=(router,), name="model-fetch", daemon=True)
        self._thread.start()
        log.info("serving model fetches of %s on %s", self.repository.model_name, self.endpoint)
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None
        self._close_context()

    def _close_context(self) -> None:
        if self._auth is not None:
            self._auth.stop()
            self._auth = None
        if self._context is not None:
            self._context.term()
            self._context = None

    def __enter__(self) -> "ModelFetchService":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def _loop(self, router: zmq.Socket) -> None:
        try:
            while not self._stop.is_set():
                if not router.poll(100):
                    continue
                frames = router.recv_multipart()
                split = frames.index(b"") + 1 if b"" in frames[:-1] else 1
                envelope, parts = frames[:split], frames[split:]
                self.counters["requests"] += 1
                try:
                    answer = self.answer(parts)
                except OSError as e:  # the repository folder is unreadable right now; the follower retries
                    answer = self._error(0, "io_error", str(e)[:300])
                router.send_multipart(envelope + answer)
        finally:
            router.close(0)

    def _error(self, seq: int, reason: str, detail: str) -> list[bytes]:
        self.counters["errors"] += 1
        return reply("error", SENDER, seq, reason=reason, detail=detail)

    def answer(self, parts: list[bytes]) -> list[bytes]:
        """The reply parts for one request's parts (without the routing envelope)."""
        try:
            message = decode_message(parts, self.wire)
        except WireError as e:
            return self._error(0, e.reason, e.detail)
        seq, header = message.seq, message.header
        model = header.get("model", self.repository.model_name)
        if model != self.repository.model_name:
            return self._error(seq, "unknown_model", f"this agent serves {self.repository.model_name!r}, not {model!r:.100}")
        if message.kind == "list_versions":
            told = {} if self.announce_endpoint is None else {"announce_endpoint": self.announce_endpoint}
            return reply("versions", SENDER, seq, model=model, versions=self.repository.versions(), **told)
        if message.kind not in ("get_manifest", "get_model"):
            return self._error(seq, "bad_kind", f"expected list_versions, get_manifest or get_model, got {message.kind!r}")
        version = header.get("version")
        if not _is_int(version) or version < 1:
            return self._error(seq, "bad_request", f"version must be an int >= 1, got {version!r:.50}")
        try:
            manifest = self.repository.load_manifest(version)
        except CLAgentError as e:
            return self._error(seq, "no_version", str(e))
        if message.kind == "get_manifest":
            return reply("manifest", SENDER, seq, version=version, manifest=manifest)
        offset, length = header.get("offset", 0), header.get("length", self.chunk_bytes)
        if not _is_int(offset) or offset < 0 or not _is_int(length) or length < 1:
            return self._error(seq, "bad_request", f"offset must be an int >= 0 and length >= 1, got {offset!r:.30}, {length!r:.30}")
        try:
            with open(self.repository.model_path(version), "rb") as f:
                size = os.fstat(f.fileno()).st_size
                if offset > size:
                    return self._error(seq, "bad_offset", f"offset {offset} is past the end of version {version} ({size} bytes)")
                f.seek(offset)
                data = f.read(min(length, self.chunk_bytes))  # INVARIANT: at most chunk_bytes in memory per request
        except FileNotFoundError:
            return self._error(seq, "no_version", f"version {version} was removed")
        self.counters["chunks"] += 1
        self.counters["bytes_sent"] += len(data)
        head = reply("model_chunk", SENDER, seq, version=version, offset=offset, size=size, sha256=manifest.get("sha256"))
        return head + [data]


# --------------------------------------------------------------------------- the remote server's side


class FetchClient:
    """Requests to a ``ModelFetchService``: a REQ socket with a timeout and retries (Lazy Pirate)."""

    def __init__(
        self,
        endpoint: str,
        model_name: str,
        *,
        timeout_s: float = 5.0,
        retries: int = 3,
        chunk_bytes: int = CHUNK_BYTES,
        curve_secret_key: str | os.PathLike | None = None,
        curve_server_key: str | os.PathLike | None = None,
        context: zmq.Context | None = None,
        stop: threading.Event | None = None,
    ):
        if timeout_s <= 0 or retries < 0 or chunk_bytes < 1:
            raise CLAgentError(f"timeout_s must be > 0, retries >= 0, chunk_bytes >= 1; got {timeout_s}, {retries}, {chunk_bytes}")
        if bool(curve_secret_key) != bool(curve_server_key):
            raise CLAgentError("CURVE needs both this server's secret key file and the agent's public key file")
        self.endpoint = endpoint
        self.model_name = model_name
        self.timeout_ms = int(timeout_s * 1000)
        self.retries = retries
        self.chunk_bytes = chunk_bytes
        self._curve = (curve_secret_key, curve_server_key)
        self._context = context or zmq.Context.instance()
        self._socket: zmq.Socket | None = None
        self._seq = itertools.count(1)
        self._stop = stop  # set: a waiting request gives up at once (reason "stopped")
        self.sender = f"follower-{os.getpid()}-{id(self):x}"
        # From the last versions reply: the agent's announce endpoint as it configured it ("" = it does not
        # announce); None while no reply named one (an agent from before the field, or none asked yet).
        self.agent_announce_endpoint: str | None = None

    def _connect(self) -> zmq.Socket:
        socket = self._context.socket(zmq.REQ)
        socket.linger = 0
        socket.maxmsgsize = MAX_REPLY_HEADER_BYTES + self.chunk_bytes
        if self._curve[0]:
            from cl_agent.security import make_client

            try:
                make_client(socket, *self._curve)
            except CLAgentError:
                socket.close(0)
                raise
        socket.connect(self.endpoint)
        return socket

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close(0)
            self._socket = None

    def _call(self, kind: str, expected: str, **fields) -> tuple[dict, list[bytes]]:
        seq = next(self._seq)
        request = pack_message(kind, self.sender, seq, model=self.model_name, **fields)
        for _attempt in range(self.retries + 1):
            if self._socket is None:
                self._socket = self._connect()
            self._socket.send_multipart(request)
            if self._wait_for_reply():
                frames = self._socket.recv_multipart()
                break
            if self._stop is not None and self._stop.is_set():
                self.close()
                raise FetchError("stopped", f"stopped while waiting for {self.endpoint}")
            self.close()  # a REQ socket whose reply is lost cannot send again: start over
        else:
            raise FetchError("timeout", f"no reply from {self.endpoint} after {self.retries + 1} attempts of {self.timeout_ms} ms")
        if len(frames[0]) > MAX_REPLY_HEADER_BYTES:
            raise FetchError("bad_reply", f"reply header of {len(frames[0])} bytes")
        try:
            header = json.loads(frames[0])
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise FetchError("bad_reply", f"reply header is not JSON: {e}") from None
        if not isinstance(header, dict) or header.get("v") != PROTOCOL_VERSION:
            raise FetchError("bad_reply", f"reply is not a protocol {PROTOCOL_VERSION} header: {str(header)[:200]}")
        wrong = wrong_endpoint(self.endpoint, header, FETCH)
        if wrong:  # e.g. the agent's labeled port: a nack, not a version list
            raise FetchError("wrong_endpoint", wrong)
        if header.get("kind") == "error":
            raise FetchError(str(header.get("reason", "error")), str(header.get("detail", "")))
        if header.get("kind") != expected or header.get("seq") != seq:
            raise FetchError("bad_reply", f"expected {expected} #{seq}, got {header.get('kind')!r} #{header.get('seq')!r}")
        return header, frames[1:]

    def _wait_for_reply(self) -> bool:
        """Poll for the reply up to the timeout, in slices, so that a stop does not wait the whole timeout."""
        deadline = time.monotonic() + self.timeout_ms / 1000
        while not (self._stop is not None and self._stop.is_set()):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            if self._socket.poll(min(100, max(1, int(remaining * 1000)))):
                return True
        return False

    def list_versions(self) -> list[int]:
        header, _ = self._call("list_versions", "versions")
        versions = header.get("versions")
        if not isinstance(versions, list) or not all(_is_int(v) and v >= 1 for v in versions):
            raise FetchError("bad_reply", f"versions must be a list of ints >= 1, got {str(versions)[:200]}")
        announce = header.get("announce_endpoint")
        self.agent_announce_endpoint = announce[:300] if isinstance(announce, str) else None
        return sorted(versions)

    def manifest(self, version: int) -> dict:
        header, _ = self._call("get_manifest", "manifest", version=version)
        manifest = header.get("manifest")
        if not isinstance(manifest, dict) or manifest.get("version") != version:
            raise FetchError("bad_reply", f"the manifest does not describe version {version}: {str(manifest)[:200]}")
        if not isinstance(manifest.get("sha256"), str) or not _SHA_RE.match(manifest["sha256"]):
            raise FetchError("bad_reply", f"manifest of version {version} has no sha256: {manifest.get('sha256')!r:.80}")
        return manifest

    def chunk(self, version: int, offset: int) -> tuple[dict, bytes]:
        """(header with ``size`` and ``sha256``, up to ``chunk_bytes`` bytes of the model from ``offset``)."""
        header, rest = self._call("get_model", "model_chunk", version=version, offset=offset, length=self.chunk_bytes)
        if len(rest) != 1 or header.get("version") != version or header.get("offset") != offset:
            raise FetchError("bad_reply", f"chunk reply for version {version} offset {offset} does not match the request")
        if not _is_int(header.get("size")) or header["size"] < 0 or len(rest[0]) > self.chunk_bytes:
            raise FetchError("bad_reply", f"chunk of {len(rest[0])} bytes, size {header.get('size')!r:.30}")
        return header, rest[0]
