"""The HTTP link to a Visdom server: one keep-alive connection with connect and read timeouts, and
delivery with backoff while the server is away.

Why not the stock client for I/O: it has no timeouts (a server that accepts and never answers blocks
it forever, its constructor too), prints a traceback per failed call and reports failure only as a
return value. `requests` pools connections and reconnects silently, which would hide a server
restart; one `http.client` connection gives both the timeouts and a reliable "new connection" signal.
A new connection may reach a new server (restarted, or back after an outage), so the first send on it
closes the env's windows and creates every pane whole, in layout order: the env ends complete.
No torch or visdom import: `runner dashboards replay` uses this module too.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import logging
import os
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote, urlsplit

from dashboards.visdom_panes import Cursor, Panes
from dashboards.visdom_series import Message

log = logging.getLogger("runner.telemetry")

SAVE_EVERY = 30.0  # seconds between asking the server to write the env to its -env_path
BACKOFF = (1.0, 30.0)  # first and longest wait between reconnection attempts
CONNECT_TIMEOUT, READ_TIMEOUT = 1.0, 3.0
PROBE_TIMEOUT = 1.0  # the first answer of a server that was away: a hung one costs this, not READ_TIMEOUT


class Unreachable(Exception):
    """The server did not answer in time, refused the connection, or refused us."""


class Rejected(Exception):
    """The server answered this one message with an error (it is skipped)."""


def _reason(exc: BaseException) -> str:
    if isinstance(exc, (socket.timeout, TimeoutError)):
        return "no answer in time"
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    return str(exc) or type(exc).__name__


class VisdomConnection:
    """One keep-alive HTTP connection to a Visdom server, with connect and read timeouts, and login."""

    def __init__(self, url: str, connect_timeout: float = CONNECT_TIMEOUT, read_timeout: float = READ_TIMEOUT) -> None:
        parts = urlsplit(url if "://" in url else f"http://{url}")
        self.url = url
        self.https = parts.scheme == "https"
        self.host = parts.hostname or "127.0.0.1"
        self.port = parts.port or (443 if self.https else 80)
        self.base = parts.path.rstrip("/")
        self.connect_timeout, self.read_timeout = connect_timeout, read_timeout
        self._conn: http.client.HTTPConnection | None = None
        self._cookie = ""

    @property
    def connected(self) -> bool:
        return self._conn is not None

    def connect(self) -> None:
        kind = http.client.HTTPSConnection if self.https else http.client.HTTPConnection
        conn = kind(self.host, self.port, timeout=self.connect_timeout)
        conn.auto_open = 0  # never reconnect silently: a new connection must be noticed
        try:
            conn.connect()
        except OSError as exc:
            conn.close()
            raise Unreachable(_reason(exc)) from None
        self._conn = conn
        user, password = os.environ.get("VISDOM_USERNAME"), os.environ.get("VISDOM_PASSWORD")
        if user and password:  # what the stock client does: the server hashes the sha256 again
            digest = hashlib.sha256(password.encode()).hexdigest()
            self._request(self.base or "/", json.dumps({"username": user, "password": digest}), self.read_timeout)

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def post(self, message: Message, timeout: float | None = None) -> str:
        """POST one message; the read timeout grows by a second per MB sent."""
        wait = (timeout or self.read_timeout) + len(message.body) / 1e6
        return self._request(f"{self.base}/{message.endpoint}", message.body, wait)

    def _request(self, path: str, body: str, timeout: float) -> str:
        if self._conn is None:
            raise Unreachable("not connected")
        headers = {"Content-Type": "application/json"}
        if self._cookie:
            headers["Cookie"] = self._cookie
        if self._conn.sock is None:  # the server ended the keep-alive connection
            self.close()
            raise Unreachable("connection closed by the server")
        try:
            self._conn.sock.settimeout(timeout)
            self._conn.request("POST", path, body=body.encode(), headers=headers)
            response = self._conn.getresponse()
            text = response.read().decode(errors="replace")
        except (OSError, http.client.HTTPException) as exc:
            self.close()
            raise Unreachable(_reason(exc)) from None
        cookie = response.getheader("Set-Cookie")
        if cookie:
            self._cookie = cookie.split(";", 1)[0]
        if response.status in (400, 401, 403):
            self.close()
            hint = " (login required? set VISDOM_USERNAME and VISDOM_PASSWORD)" if response.status == 400 else ""
            raise Unreachable(f"HTTP {response.status}{hint}")
        if response.status >= 300:
            raise Rejected(f"HTTP {response.status} on {path.rsplit('/', 1)[-1] or '/'}")
        return text


class VisdomLink:
    """Delivery to one server: what it lacks of the panes, backoff while it is away, every pane whole
    (after closing the env's windows) on a new connection.

    Two ways to deliver: `deliver` (blocking: replay, and the last send of a run), and `submit` (a
    batch the sink built, posted by the link's own thread, so that the sink thread never waits on the
    network: a hung server costs the run nothing but this thread's time). One batch at a time; the
    sink builds the next from `sent` once the link is `ready`, so nothing piles up while it is away.
    """

    def __init__(self, url: str, env: str, log_path: Path | None = None, connect_timeout: float = CONNECT_TIMEOUT,
                 read_timeout: float = READ_TIMEOUT) -> None:
        self.conn = VisdomConnection(url, connect_timeout, read_timeout)
        self.env, self.log_path = env, log_path
        self.sent: Cursor = {}
        self.state = "new"  # new → up ⇄ down
        self.backoff = BACKOFF[0]
        self.next_attempt = 0.0  # while down: the next reconnection attempt; while up: the paced next batch
        self.down_since = 0.0
        self.last_save = time.monotonic()
        self.rejected: set[str] = set()
        self._cond = threading.Condition()
        self._job: Job | None = None
        self._busy = False
        self._thread: threading.Thread | None = None

    def unreachable_for(self) -> float:
        """Seconds since the server stopped answering (0 while it answers)."""
        return time.monotonic() - self.down_since if self.state == "down" else 0.0

    # --- blocking ---

    def deliver(self, panes: Panes, final: bool = False) -> None:
        """Send what the server lacks of `panes`, now. `final`: try even while backing off, then save the
        env to the server's disk. Not while a submitted batch is in flight (`wait_idle` first)."""
        if self.state == "down" and time.monotonic() < self.next_attempt and not final:
            return
        for attempt in (1, 2):
            reused = self.conn.connected
            try:
                if not reused:
                    self._open()
                after = dict(self.sent)
                for message in panes.changes(after):
                    self._post(message)
                self.sent = after
                if final or time.monotonic() - self.last_save >= SAVE_EVERY:
                    self._save()
            except Unreachable as exc:
                if reused and attempt == 1:
                    continue  # a keep-alive connection the server dropped: one more try on a new one
                self._went_away(str(exc))
                return
            break
        self._answered()

    # --- in the background ---

    def ready(self, now: float, force: bool = False) -> bool:
        """No batch in flight, and the next one is due (backoff while down, pacing while up; `force`:
        whatever the pacing, but never before the backoff ends)."""
        return not self._busy and (now >= self.next_attempt or (force and self.state != "down"))

    def submit(self, messages: list[Message] | None, after: Cursor | None = None, pace: float = 0.0) -> None:
        """Post `messages` (built from `sent`; `after`: the cursor they bring the server to) on the link's
        thread; None: connect only (then `sent` is empty: the next batch is every pane whole). The next
        batch is `ready` `pace` times this one's duration after it ends."""
        with self._cond:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="visdom-link", daemon=True)
                self._thread.start()
            self._job, self._busy = Job(messages, after, pace), True
            self._cond.notify_all()

    def wait_idle(self, timeout: float) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: not self._busy, timeout)

    def _run(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._job is not None)
                job, self._job = self._job, None
            if job.stop:
                return
            started = time.monotonic()
            try:
                self._do(job)
            except Exception:
                log.exception("Visdom delivery failed")
                self.conn.close()
            with self._cond:
                if self.state == "up":
                    self.next_attempt = time.monotonic() + job.pace * (time.monotonic() - started)
                self._busy = False
                self._cond.notify_all()

    def _do(self, job: Job) -> None:
        try:
            if job.messages is None:
                self._open()
                return  # the next batch, built from the empty `sent`, brings every pane whole
            for message in job.messages:
                self._post(message)
            self.sent = job.after or {}
            if time.monotonic() - self.last_save >= SAVE_EVERY:
                self._save()
        except Unreachable as exc:
            if job.messages is not None and self.state == "up":
                self.conn.close()  # maybe a keep-alive connection the server dropped: reconnect next time
                self.sent = {}
                return
            self._went_away(str(exc))
            return
        self._answered()

    # --- both ---

    def _open(self) -> None:
        self.conn.connect()
        self.sent = {}  # maybe a new server: every pane whole, in order
        probe = PROBE_TIMEOUT if self.state == "down" else None
        self._post(Message(f"env/{quote(self.env, safe='')}", json.dumps({"eid": self.env})), timeout=probe)
        self._post(Message.of("close", {"eid": self.env, "win": None}))  # windows come back in layout order

    def _save(self) -> None:
        self._post(Message.of("save", {"data": [self.env], "eid": self.env}), timeout=30.0)
        self.last_save = time.monotonic()

    def _post(self, message: Message, timeout: float | None = None) -> None:
        try:
            self.conn.post(message, timeout)
        except Rejected as exc:
            if message.endpoint not in self.rejected:
                self.rejected.add(message.endpoint)
                log.warning("Visdom at %s rejected an update (%s); skipped", self.conn.url, exc)

    def _answered(self) -> None:
        if self.state == "down":
            log.warning("Visdom at %s is back after %.0f s: env %r re-sent in full", self.conn.url,
                        self.unreachable_for(), self.env)
        self.state, self.backoff = "up", BACKOFF[0]

    def _went_away(self, reason: str) -> None:
        self.conn.close()
        if self.state != "down":
            where = f"; updates go to {self.log_path}" if self.log_path else ""
            log.warning("Visdom at %s is unreachable (%s)%s; retrying in the background", self.conn.url, reason, where)
            self.down_since = time.monotonic()
        self.state = "down"
        self.next_attempt = time.monotonic() + self.backoff
        self.backoff = min(self.backoff * 2, BACKOFF[1])

    def stop(self, timeout: float) -> bool:
        """End the link's thread after the batch in flight, waiting at most `timeout`; False if it is
        still stuck in one (then the link must not be used from here)."""
        if self._thread is None:
            return True
        idle = self.wait_idle(timeout)
        with self._cond:
            self._job = Job(None, stop=True)
            self._cond.notify_all()
        if idle:
            self._thread.join(timeout)
            self._thread = None
        return idle

    def close(self) -> None:
        self.conn.close()


@dataclass(frozen=True, slots=True)
class Job:
    """A batch for the link's thread: messages (None: connect only), the cursor they reach, the pacing."""

    messages: list[Message] | None
    after: Cursor | None = None
    pace: float = 0.0
    stop: bool = False  # end the thread


def normalize_url(url: str, port: int) -> str:
    """`host`, `host:port`, `http://host/base/` → `http://host:port/base` (`port` when none is given)."""
    parts = urlsplit(url if "://" in url else f"http://{url}")
    if parts.port is None:
        parts = parts._replace(netloc=f"{parts.netloc}:{port}")
    return parts._replace(path=parts.path.rstrip("/")).geturl()
