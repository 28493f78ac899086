"""Following an agent from another machine: mirror its newest model version into a local repository.

A server that cannot read the trainer's repository folder runs a
``RepositoryFollower`` next to it. The follower listens to the agent's
announcements (PUB), also polls every ``poll_s``, and on start catches up to the
newest version (after being offline it installs only the newest, not every
version in between). For a version newer than any local one it fetches the
manifest and the model bytes from the agent's ``ModelFetchService``
(``cl_agent/fetch.py``) in chunks, appending to a partial file that a later
attempt resumes (``cl_agent/transfer.py``), checks the sha256 against the manifest, and installs the
version under the same number (``ModelRepository.install``, atomic). The local
``Server`` then hot-swaps it as usual. A corrupt or failed transfer is counted,
never installed, and retried after ``retry_s`` (doubling up to ``poll_s``).
An agent that does not answer at all (down, or a wrong address) is warned about
once it has been silent for ``silent_warn_s``, then at most every
``silent_repeat_s`` while it stays silent, not once per attempt; a failure that
repeats word for word (an endpoint that answers, but is not the agent's fetch
endpoint) is logged once, then at most every ``silent_repeat_s`` (``cl_agent/silence.py``).

Announcements: the follower logs the announce endpoint it subscribes to at
start. When that endpoint was not given explicitly (``learn_announce``) and the
agent's ``versions`` reply names its own ``announce_endpoint``, the follower
moves its subscription to that port on the fetch endpoint's host. A version
found by polling that no announcement named, although the subscription had been
up for a while, is warned about once: announcements are not reaching this server.
A version whose manifest says ``"announced": false`` (a rollback that could not
bind the announce endpoint) is not: polling is how it was meant to arrive.
"""

from __future__ import annotations

import logging
import os
import re
import threading
import time
from typing import Callable

import zmq

from cl_agent.config import ServeSection
from cl_agent.errors import CLAgentError
from cl_agent.fetch import CHUNK_BYTES, FetchClient, FetchError
from cl_agent.repository import ModelRepository, parse_announcement
from cl_agent.silence import SilenceWatch
from cl_agent.transfer import download

log = logging.getLogger(__name__)

NO_ANSWER = ("timeout", "stopped")  # FetchError reasons that mean the agent sent nothing back
SUBSCRIBED_S = 1.0  # a version published this long after the subscription came up must have been announced
ANNOUNCE_GRACE_S = 2.0  # how long after polling found such a version its announcement may still come


class RepositoryFollower:
    """Mirror the agent's newest version into ``local_repository``; one thread, ``start()``/``stop()``.

    Syncs at start (catching up after being offline), on each announcement of a
    newer version, and every ``poll_s``. A failed or corrupt transfer is counted
    and retried after ``retry_s`` (doubling up to ``poll_s``). ``on_install`` is
    called with each installed version (e.g. ``Server.check_now``). A second thread
    warns when the agent has sent no answer for ``silent_warn_s`` (since the start or
    its last answer), again every ``silent_repeat_s`` while that lasts, and says when
    it answers again.
    """

    def __init__(
        self,
        fetch_endpoint: str,
        announce_endpoint: str | None,
        local_repository: ModelRepository,
        *,
        poll_s: float = 5.0,
        retry_s: float = 1.0,
        timeout_s: float = 5.0,
        retries: int = 3,
        chunk_bytes: int = CHUNK_BYTES,
        max_model_bytes: int = 4 << 30,
        curve_secret_key: str | os.PathLike | None = None,
        curve_server_key: str | os.PathLike | None = None,
        on_install: Callable[[int], None] | None = None,
        context: zmq.Context | None = None,
        silent_warn_s: float = 10.0,
        silent_repeat_s: float = 60.0,
        learn_announce: bool = True,
        announce_source: str = "given",
    ):
        if poll_s <= 0 or retry_s <= 0:
            raise CLAgentError(f"poll_s and retry_s must be > 0, got {poll_s}, {retry_s}")
        if silent_warn_s <= 0 or silent_repeat_s <= 0:
            raise CLAgentError(f"silent_warn_s and silent_repeat_s must be > 0, got {silent_warn_s}, {silent_repeat_s}")
        self.repository = local_repository
        self.announce_endpoint = announce_endpoint or None  # the one subscribed to (changes when learned)
        self.announce_source = announce_source  # where announce_endpoint came from, for the log
        self.learn_announce = learn_announce  # take the announce endpoint the agent reports
        self.poll_s = poll_s
        self.retry_s = retry_s
        self.max_model_bytes = max_model_bytes
        self.on_install = on_install
        self._context = context or zmq.Context.instance()
        self._stop = threading.Event()
        self.client = FetchClient(
            fetch_endpoint,
            local_repository.model_name,
            timeout_s=timeout_s,
            retries=retries,
            chunk_bytes=chunk_bytes,
            curve_secret_key=curve_secret_key,
            curve_server_key=curve_server_key,
            context=self._context,
            stop=self._stop,
        )
        self.counters = {"syncs": 0, "installs": 0, "announcements": 0, "corrupt": 0, "fetch_errors": 0, "bytes": 0}
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._watcher: threading.Thread | None = None
        self._warned_behind: int | None = None
        self._curve = bool(curve_secret_key)
        self.silence = SilenceWatch(log, fetch_endpoint, warn_s=silent_warn_s, repeat_s=silent_repeat_s)
        self._announced = 0  # the highest version an announcement named
        self._subscribed_at: float | None = None  # when the SUB socket connected to announce_endpoint
        self._listed: tuple[float, list[int]] | None = None  # the last version list and when it was asked for
        self._unannounced: tuple[int, float] | None = None  # a version polling found unannounced, and when
        self._unannounced_warned = False
        self._agent_announce_noted = False  # the agent's reply about its announce endpoint was looked at

    @property
    def version(self) -> int | None:
        """The newest version in the local repository."""
        return self.repository.latest_version()

    def start(self) -> "RepositoryFollower":
        self._stop.clear()
        if self.announce_endpoint:
            log.info("following %s: announcements from %s (%s), polling every %.1f s",
                     self.client.endpoint, self.announce_endpoint, self.announce_source, self.poll_s)
        else:
            log.info("following %s: no announce endpoint, polling every %.1f s", self.client.endpoint, self.poll_s)
        self.silence.restart()
        self._thread = threading.Thread(target=self._loop, name="repository-follower", daemon=True)
        self._watcher = threading.Thread(target=self._watch_silence, name="repository-follower-silence", daemon=True)
        self._thread.start()
        self._watcher.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        for thread in (self._thread, self._watcher):
            if thread is not None:
                thread.join(timeout=15)
        self._thread = self._watcher = None

    def __enter__(self) -> "RepositoryFollower":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def check_now(self) -> None:
        self._wake.set()

    def sync_once(self) -> int | None:
        """Install the agent's newest version if it is newer than every local one; returns it, or None."""
        self.counters["syncs"] += 1
        asked_at = time.monotonic()
        versions = self.client.list_versions()
        self._answered()
        self._note_agent_announce()
        previous, self._listed = self._listed, (asked_at, versions)
        if not versions:
            return None
        newest, local = versions[-1], self.repository.last_version_ever()
        if (
            previous is not None and self._subscribed_at is not None and previous[0] >= self._subscribed_at + SUBSCRIBED_S
            and newest not in previous[1] and newest > self._announced and self._unannounced is None
        ):
            # Published after the previous listing, which came well after the subscription: it should have been announced.
            self._unannounced = (newest, time.monotonic())
        if newest <= local:
            if newest < local and self._warned_behind != newest:
                self._warned_behind = newest
                log.warning(
                    "the agent's newest version %d is below this repository's %d (was the agent's repository reset?): "
                    "not following until it passes %d; clear %s to follow it now", newest, local, local, self.repository.model_dir,
                )
            return None
        manifest = self.client.manifest(newest)
        self._answered()
        if self._unannounced is not None and self._unannounced[0] == newest and manifest.get("announced") is False:
            # Published without an announcement (a rollback while the agent held the endpoint): polling is how it comes.
            self._unannounced = None
        try:
            path = download(
                self.client, newest, manifest, self.repository.model_dir, self.max_model_bytes, self.counters, self._stop, self._answered
            )
        except FetchError as e:
            if e.reason == "corrupt":
                self.counters["corrupt"] += 1
            raise
        try:
            self.repository.install(newest, path, manifest)
        finally:
            path.unlink(missing_ok=True)
        self.counters["installs"] += 1
        log.info("installed version %d from %s", newest, self.client.endpoint)
        if self.on_install is not None:
            self.on_install(newest)
        return newest

    def _note_agent_announce(self) -> None:
        """Look once at the announce endpoint the agent reported; move the subscription there if it is not given."""
        if self._agent_announce_noted:
            return
        self._agent_announce_noted = True
        reported = self.client.agent_announce_endpoint
        if reported is None:
            log.info("the agent at %s does not report its announce endpoint; announcements are expected from %s",
                     self.client.endpoint, self.announce_endpoint or "nowhere (polling only)")
            return
        if not reported:
            log.info("the agent at %s does not announce versions; polling every %.1f s", self.client.endpoint, self.poll_s)
            return
        seen_from_here = derived_announce_endpoint(self.client.endpoint, reported)
        if seen_from_here is None:  # not tcp://HOST:PORT on both sides: no way to tell its address from here
            log.info("the agent announces on %s; announcements are expected from %s",
                     reported, self.announce_endpoint or "nowhere (polling only)")
            return
        if seen_from_here == self.announce_endpoint:
            return
        if self.learn_announce:
            log.info("the agent announces on %s: subscribing to %s instead of %s",
                     reported, seen_from_here, self.announce_endpoint or "nothing")
            self.announce_endpoint = seen_from_here
        else:
            log.warning("the agent reports its announce endpoint as %s (from here %s), but this server listens on %s "
                        "(serve.follow_announce_endpoint): new versions may only arrive by polling",
                        reported, seen_from_here, self.announce_endpoint)

    def _subscribe(self, sub: zmq.Socket | None, current: str | None) -> tuple[zmq.Socket | None, str | None]:
        """The SUB socket connected to ``announce_endpoint`` (moved from ``current`` when it changed), and its endpoint."""
        if self.announce_endpoint == current:
            return sub, current
        if sub is None:
            sub = self._context.socket(zmq.SUB)
            sub.linger = 0
            sub.setsockopt(zmq.SUBSCRIBE, self.repository.model_name.encode())
        elif current:
            sub.disconnect(current)
        sub.connect(self.announce_endpoint)
        self._subscribed_at = time.monotonic()
        return sub, self.announce_endpoint

    def _check_unannounced(self, now: float) -> None:
        """Warn once when a version polling found was not announced within ``ANNOUNCE_GRACE_S``."""
        if self._unannounced is None or self._unannounced_warned:
            return
        version, found_at = self._unannounced
        if self._announced >= version:
            self._unannounced = None
        elif now - found_at >= ANNOUNCE_GRACE_S:
            self._unannounced_warned = True
            log.warning(
                "version %d reached this server by polling, and no announcement of it arrived from %s: announcements "
                "are not reaching this server (is that the agent's repository.announce_endpoint, bound to an address "
                "this machine can reach? set serve.follow_announce_endpoint or --follow-announce); new versions "
                "arrive up to %.1f s late", version, self.announce_endpoint, self.poll_s,
            )

    def _loop(self) -> None:
        sub, subscribed = self._subscribe(None, None) if self.announce_endpoint else (None, None)
        next_sync = time.monotonic()  # at start: catch up to whatever was published while offline
        delay = self.retry_s
        try:
            while not self._stop.is_set():
                if self.announce_endpoint != subscribed:  # learned from the agent's version list
                    sub, subscribed = self._subscribe(sub, subscribed)
                self._check_unannounced(time.monotonic())
                if sub is not None and sub.poll(50):
                    try:
                        body = parse_announcement(sub.recv_multipart())
                    except ValueError as e:
                        log.warning("ignoring a malformed announcement: %s", e)
                        continue
                    self.counters["announcements"] += 1
                    self._announced = max(self._announced, body["version"])
                    if body["version"] > self.repository.last_version_ever():
                        next_sync = time.monotonic()
                elif self._wake.wait(0 if sub is not None else 0.05):
                    self._wake.clear()
                    next_sync = time.monotonic()
                if self._stop.is_set() or time.monotonic() < next_sync:
                    continue
                try:
                    self.sync_once()
                except (CLAgentError, OSError) as e:  # counted and retried; the local server keeps serving
                    if self._stop.is_set():
                        break
                    if not isinstance(e, FetchError) or e.reason != "corrupt":
                        self.counters["fetch_errors"] += 1
                    if isinstance(e, FetchError) and e.reason in NO_ANSWER:
                        # no answer at all: _watch_silence warns about that, at a bounded rate
                        log.debug("no answer from %s, retrying in %.1f s: %s", self.client.endpoint, delay, e)
                    else:
                        if isinstance(e, FetchError):
                            self._answered()  # an error reply, or a bad one: the agent is there
                        self.report_failure(e, delay, time.monotonic())
                    next_sync = time.monotonic() + delay
                    delay = min(self.poll_s, delay * 2)
                    continue
                self.silence.succeeded()
                delay = self.retry_s
                next_sync = time.monotonic() + self.poll_s
        finally:
            if sub is not None:
                sub.close(0)
            self.client.close()

    def report_failure(self, error: Exception, delay: float, now: float) -> bool:
        """Log a failed sync: a new error at once, the same error again at most every ``silent_repeat_s``; True if logged."""
        return self.silence.report_failure(error, delay, now)

    def _answered(self) -> None:
        """The agent sent something back: the silence, if any, is over."""
        self.silence.answered()

    def check_silence(self, now: float) -> bool:
        """Warn if the agent has not answered for ``silent_warn_s`` and the last warning is ``silent_repeat_s`` old; True if it warned."""
        return self.silence.check(now, self._silence_warning)

    def _silence_warning(self, silent_s: float) -> str:
        try:
            local = self.version
        except OSError:  # the folder is being replaced or unreadable: the warning is still worth giving
            local = "unknown"
        curve = ", and does it accept this server's CURVE key" if self._curve else ""
        return (
            f"the agent's fetch endpoint {self.client.endpoint} has not answered for {silent_s:.0f} s (is the agent running, "
            f"is this its repository.fetch_endpoint{curve}?); still trying; the local repository has "
            + ("no version yet" if local is None else f"version {local}")
        )

    def _watch_silence(self) -> None:
        while not self._stop.wait(min(1.0, self.silence.warn_s / 4)):
            self.check_silence(time.monotonic())


def derived_announce_endpoint(fetch_endpoint: str, announce_endpoint: str) -> str | None:
    """The agent's announce endpoint seen from a follower: the fetch endpoint's host, the announce port.

    ``tcp://agent.lan:5560`` and ``tcp://127.0.0.1:5557`` give ``tcp://agent.lan:5557``;
    None when either is not ``tcp://HOST:PORT``.
    """
    fetch = re.match(r"^tcp://(.+):(\d+)$", fetch_endpoint)
    announce = re.match(r"^tcp://(.+):(\d+)$", announce_endpoint)
    if not fetch or not announce:
        return None
    return f"tcp://{fetch.group(1)}:{announce.group(2)}"


def follower_from_config(
    serve: ServeSection, announce_endpoint: str, local_repository: ModelRepository, on_install: Callable[[int], None] | None = None
) -> RepositoryFollower | None:
    """The follower ``cl-agent serve`` runs when ``serve.follow_fetch_endpoint`` is set (None otherwise).

    ``announce_endpoint`` is ``repository.announce_endpoint``, whose port is used when
    ``serve.follow_announce_endpoint`` is empty.
    """
    if not serve.follow_fetch_endpoint:
        return None
    if serve.follow_announce_endpoint:
        announce, source = serve.follow_announce_endpoint, "serve.follow_announce_endpoint"
    else:
        announce = derived_announce_endpoint(serve.follow_fetch_endpoint, announce_endpoint)
        source = ("the --follow host with this config's repository.announce_endpoint port, "
                  "until the agent reports its own")
    if not announce:
        log.warning("no announce endpoint for %s: polling every %.1f s only, until the agent reports its own",
                    serve.follow_fetch_endpoint, serve.follow_poll_s)
    return RepositoryFollower(
        serve.follow_fetch_endpoint,
        announce,
        local_repository,
        poll_s=serve.follow_poll_s,
        curve_secret_key=serve.follow_curve_secret_key or None,
        curve_server_key=serve.follow_curve_server_key or None,
        on_install=on_install,
        learn_announce=not serve.follow_announce_endpoint,
        announce_source=source,
    )
