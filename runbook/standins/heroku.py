"""A local stand-in for the Heroku Platform API, as strict as Heroku's documentation.

It serves, on 127.0.0.1 (a random port, a daemon thread), the endpoints
:class:`runbook.adapters.heroku_app.HerokuApp` uses, with the platform's behaviour:

* **Add-on attachments own config vars.** Attachment ``NAME`` owns ``NAME_URL``: attaching an
  add-on as ``TERN_SOURCE_DATABASE`` makes ``TERN_SOURCE_DATABASE_URL`` its. A ``PATCH
  /apps/{app}/config-vars`` that sets or deletes an owned var is refused as a whole with 422
  "Cannot overwrite attachment values ..." (logged in :attr:`HerokuStandIn.refused`).
  Attaching sets ``NAME_URL``, detaching removes it.
* **Every config change restarts the dynos** (a PATCH that changes something, attaching,
  detaching): each dyno gets SIGTERM and a new one of the same name starts at once (new id and
  ``created_at``), ``starting`` for ``boot_seconds``, then ``up``. :attr:`HerokuStandIn.restarts`
  counts these releases.
* **Stopping honours the SIGTERM grace** (Dev Center, "Dyno Shutdown Behavior": 30 s, then
  SIGKILL). A dyno being stopped (scale-down, restart) is listed ``down`` until its processes
  exit - Heroku's log says "State changed from up to down", then "Stopping all processes with
  SIGTERM" - *(unverified: that the API keeps listing it meanwhile)*; one that ignores SIGTERM
  is killed after ``grace_seconds``.
* **Documented dyno states** (starting, up, down, crashed): a process that died on its own is
  ``crashed``, not running. Heroku restarts crashed dynos after a cool-off; this stand-in
  leaves them crashed until the next restart or scale.
* **Rate limit**: a bucket of ``rate_limit`` tokens refilled at ``refill_per_second`` (Heroku:
  4,500, about 75 a minute); each API call takes one; every answer carries
  ``RateLimit-Remaining``; an empty bucket answers 429 ``rate_limit``.
* maintenance (``GET``/``PATCH /apps/{app}``), formation (``GET``, batch ``PATCH``), dynos (``GET``).
* ``POST /smoke`` (no API key; not the Platform API): the app's endpoint following tern's
  ``TERN_SMOKE_URL`` contract. The router answers 503 in maintenance or with no web dyno ``up``;
  otherwise the token is written through the ``DATABASE_URL`` the up web dyno booted with.

The app behind it is a :class:`Backend`: :class:`MemoryBackend` (unit tests) or
:class:`LocalAppBackend` (the sandbox's real dyno processes of :mod:`runbook.workload`: config
vars in its state file, a restart stops the processes and starts new ones after the boot delay).
No error it answers carries a config var's value (messages name vars only).
"""

from __future__ import annotations

import json
import os
import re
import secrets
import signal
import threading
import time
import uuid
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Mapping
from urllib.parse import urlsplit

GRACE_SECONDS = 30.0            # SIGTERM, then SIGKILL 30 s later
RATE_LIMIT = 4500               # request tokens per account
REFILL_PER_SECOND = 75 / 60     # about 75 tokens a minute
CONFIG_KEY = re.compile(r"^\w+$")
ATTACHMENT_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_]*$")
# what TERN_SMOKE_SQL is when the LocalAppBackend's router writes the smoke row
LOCAL_SMOKE_SQL = "SELECT 1 FROM orders WHERE order_ref = %(token)s::uuid AND channel = 'tern-smoke'"


def endpoint(url: str) -> tuple[str, int]:
    parts = urlsplit(url)
    return parts.hostname or "", parts.port or 5432


def _iso() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


@dataclass
class Dyno:
    name: str                       # web.1
    state: str                      # starting, up, down, crashed
    boot_at: float = 0.0            # monotonic: when a starting dyno's process starts
    id: str = field(default_factory=lambda: str(uuid.uuid4()))
    created_at: str = field(default_factory=_iso)
    updated_at: str = field(default_factory=_iso)
    process: Any = None             # the backend's handle, once started
    env: dict[str, str] = field(default_factory=dict)   # the config vars it booted with
    term_at: float | None = None    # monotonic: when it got SIGTERM
    killed: bool = False

    @property
    def type(self) -> str:
        return self.name.split(".")[0]

    @property
    def index(self) -> int:
        return int(self.name.split(".")[1])

    def set(self, state: str) -> None:
        self.state = state
        self.updated_at = _iso()

    def to_json(self, app: str) -> dict[str, Any]:
        return {"id": self.id, "name": self.name, "type": self.type, "state": self.state, "size": "standard-1X",
                "command": f"run {self.type}", "created_at": self.created_at, "updated_at": self.updated_at,
                "app": {"name": app}}


# -- the app behind the API -------------------------------------------------------------
class Backend(ABC):
    """The app behind the stand-in: config vars, maintenance flag, formation, processes."""

    process_types: tuple[str, ...]

    @abstractmethod
    def config(self) -> dict[str, str]: ...

    @abstractmethod
    def write_config(self, config: Mapping[str, str]) -> None: ...

    @abstractmethod
    def maintenance(self) -> bool: ...

    @abstractmethod
    def set_maintenance(self, on: bool) -> None: ...

    @abstractmethod
    def formation(self) -> dict[str, int]: ...

    @abstractmethod
    def set_formation(self, formation: Mapping[str, int]) -> None: ...

    @abstractmethod
    def running(self) -> dict[str, Any]:
        """Processes already running when the stand-in starts: dyno name -> handle (adopted as ``up``)."""

    @abstractmethod
    def start(self, name: str, env: Mapping[str, str]) -> Any:
        """Start the process of dyno ``name``; returns its handle."""

    @abstractmethod
    def signal(self, handle: Any, sig: int) -> None: ...

    @abstractmethod
    def alive(self, handle: Any) -> bool: ...

    @abstractmethod
    def smoke(self, token: str, database_url: str) -> None:
        """What the app's smoke endpoint does: commit a row carrying ``token`` at ``database_url``."""


@dataclass
class FakeProcess:
    name: str
    ignores_sigterm: bool = False
    alive: bool = True
    signals: list[int] = field(default_factory=list)


class MemoryBackend(Backend):
    """An app in memory. ``ignore_sigterm``: process types whose processes ignore SIGTERM (only
    SIGKILL ends them); ``crash_on_boot``: types whose new processes die at once. Smoke tokens
    land in :attr:`databases`, keyed by the ``(host, port)`` written to."""

    def __init__(self, config: Mapping[str, str], formation: Mapping[str, int], *,
                 ignore_sigterm: tuple[str, ...] = (), crash_on_boot: tuple[str, ...] = ()) -> None:
        self._config = dict(config)
        self._formation = dict(formation)
        self._maintenance = False
        self.process_types = tuple(formation)
        self.ignore_sigterm = set(ignore_sigterm)
        self.crash_on_boot = set(crash_on_boot)
        self.processes: list[FakeProcess] = []      # every process ever started
        self.databases: dict[tuple[str, int], set[str]] = {}

    def config(self) -> dict[str, str]:
        return dict(self._config)

    def write_config(self, config: Mapping[str, str]) -> None:
        self._config = dict(config)

    def maintenance(self) -> bool:
        return self._maintenance

    def set_maintenance(self, on: bool) -> None:
        self._maintenance = bool(on)

    def formation(self) -> dict[str, int]:
        return dict(self._formation)

    def set_formation(self, formation: Mapping[str, int]) -> None:
        self._formation = dict(formation)

    def running(self) -> dict[str, Any]:
        return {}

    def start(self, name: str, env: Mapping[str, str]) -> FakeProcess:
        kind = name.split(".")[0]
        proc = FakeProcess(name, ignores_sigterm=kind in self.ignore_sigterm, alive=kind not in self.crash_on_boot)
        self.processes.append(proc)
        return proc

    def signal(self, handle: FakeProcess, sig: int) -> None:
        handle.signals.append(sig)
        if sig == signal.SIGKILL or not handle.ignores_sigterm:
            handle.alive = False

    def alive(self, handle: FakeProcess) -> bool:
        return handle.alive

    def live(self, kind: str) -> list[FakeProcess]:
        """Processes of ``kind`` still alive (whatever the API says of their dynos)."""
        return [p for p in self.processes if p.alive and p.name.split(".")[0] == kind]

    def smoke(self, token: str, database_url: str) -> None:
        self.databases.setdefault(endpoint(database_url), set()).add(token)

    def read_back(self, database_url: str, sql: str, params: Mapping[str, str]) -> bool:
        """Stands in for tern's query on a database (``HerokuApp(read_back=...)``): is the token's row there?"""
        return params["token"] in self.databases.get(endpoint(database_url), set())


class LocalAppBackend(Backend):
    """The sandbox's app (:class:`runbook.adapters.local_app.LocalApp`): config vars, maintenance and
    formation in its state file, dynos as its real processes. The smoke endpoint commits an order
    (channel ``tern-smoke``, ``order_ref`` = the token) through the web dyno's ``DATABASE_URL``,
    as a web request would: look it up with :data:`LOCAL_SMOKE_SQL`."""

    def __init__(self, state_dir: str | Path) -> None:
        from ..adapters.local_app import PROCESS_TYPES, LocalApp

        self.app = LocalApp(state_dir)
        self.process_types = PROCESS_TYPES

    def _state(self):
        from ..workload.state import read_state

        return read_state(self.app.state_dir)

    def _write(self, **changes) -> None:
        from ..workload.state import write_state

        state = self._state()
        for k, v in changes.items():
            setattr(state, k, v)
        write_state(self.app.state_dir, state)

    def config(self) -> dict[str, str]:
        return dict(self._state().config_vars)

    def write_config(self, config: Mapping[str, str]) -> None:
        self._write(config_vars=dict(config))

    def maintenance(self) -> bool:
        return self.app.maintenance()

    def set_maintenance(self, on: bool) -> None:
        self.app.set_maintenance(on)

    def formation(self) -> dict[str, int]:
        return self.app.formation()

    def set_formation(self, formation: Mapping[str, int]) -> None:
        self._write(formation=dict(formation))   # a dyno beyond its type's quantity also exits on its own

    def running(self) -> dict[str, int]:
        return self.app.pids()

    def start(self, name: str, env: Mapping[str, str]) -> int:
        return self.app.spawn(name)

    def signal(self, handle: int, sig: int) -> None:
        try:
            os.kill(handle, sig)
        except ProcessLookupError:
            pass

    def alive(self, handle: int) -> bool:
        return self.app._alive(handle)

    def smoke(self, token: str, database_url: str) -> None:
        import psycopg

        with psycopg.connect(database_url, autocommit=True, connect_timeout=5,
                             application_name="tern-app:smoke") as conn:
            conn.execute("INSERT INTO orders (order_ref, channel, customer_email, status, total_cents, notes) "
                         "VALUES (%s::uuid, 'tern-smoke', 'smoke@tern.invalid', 'smoke', 0, 'tern smoke test')",
                         (token,))


# -- the platform -------------------------------------------------------------------------
class HerokuStandIn:
    """The Platform API of one app over ``backend``. Use as a context manager (starts the server
    and the thread that moves dynos through their states); :attr:`url` is the API's base URL."""

    def __init__(self, backend: Backend, *, app: str = "shop", key: str | None = None,
                 addon_url: str | None = None, attachments: tuple[str, ...] = ("DATABASE",),
                 boot_seconds: float = 1.0, grace_seconds: float = GRACE_SECONDS,
                 rate_limit: int = RATE_LIMIT, refill_per_second: float = REFILL_PER_SECOND,
                 tick: float = 0.02) -> None:
        self.backend = backend
        self.app = app
        self.key = key or secrets.token_urlsafe(24)
        self.boot_seconds = boot_seconds
        self.grace_seconds = grace_seconds
        self.tick = tick
        self.lock = threading.RLock()
        # the Postgres add-on: its URL is the app's DATABASE_URL unless given
        self.addon = str(uuid.uuid4())
        self.addons = {self.addon: addon_url or backend.config().get("DATABASE_URL", "")}
        self.attachments: list[dict[str, Any]] = []
        for name in attachments:
            self.attach(self.addon, name, release=False)
        self.restarts = 0
        self.refused: list[list[str]] = []      # the attachment-owned vars of each refused PATCH
        # rate limit, and faults a test injects
        self.rate_limit = rate_limit
        self.refill_per_second = refill_per_second
        self._tokens = float(rate_limit)
        self._refilled = time.monotonic()
        self.limited = 0                        # 429s answered for an empty bucket
        self.throttle = 0                       # answer 429 to the next N API calls
        self.fail_5xx = 0                       # answer 503 to the next N API calls
        self.smoke_mode = "ok"                  # "no_token": 2xx without the echo; "old": writes to the add-on's db
        self.smoke_unavailable = 0              # the next N smoke calls answer 503
        self.requests: list[tuple[str, str, Any, str]] = []
        # the dynos: adopt the processes already running, start the rest of the formation now
        self.dynos: list[Dyno] = []
        running = backend.running()
        for kind, quantity in backend.formation().items():
            for i in range(1, quantity + 1):
                name = f"{kind}.{i}"
                env = backend.config()
                handle = running[name] if name in running else backend.start(name, env)
                self.dynos.append(Dyno(name, "up", process=handle, env=env))
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05},
                                          daemon=True, name="heroku-standin-http"),
                         threading.Thread(target=self._run, daemon=True, name="heroku-standin-dynos")]

    def __enter__(self) -> "HerokuStandIn":
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self.server.shutdown()
        self.server.server_close()
        for t in self._threads:
            t.join(timeout=5)

    # -- views for tests and the rehearsal --------------------------------------------------
    @property
    def config(self) -> dict[str, str]:
        return self.backend.config()

    @property
    def maintenance(self) -> bool:
        return self.backend.maintenance()

    @property
    def formation(self) -> dict[str, int]:
        return self.backend.formation()

    def dynos_of(self, kind: str) -> list[Dyno]:
        with self.lock:
            return [d for d in self.dynos if d.type == kind]

    def crash(self, name: str) -> None:
        """The process of dyno ``name`` dies on its own (SIGKILL from outside): the dyno turns ``crashed``."""
        with self.lock:
            for d in self.dynos:
                if d.name == name and d.state == "up":
                    self.backend.signal(d.process, signal.SIGKILL)

    # -- attachments and config vars, as Heroku keeps them -------------------------------
    def owned(self) -> dict[str, dict[str, Any]]:
        """Config var -> the attachment that owns it."""
        return {f"{a['name']}_URL": a for a in self.attachments}

    def attach(self, addon: str, name: str, *, release: bool = True) -> dict[str, Any]:
        a = {"id": str(uuid.uuid4()), "name": name, "addon": {"id": addon}, "app": {"name": self.app}}
        with self.lock:
            self.attachments.append(a)
            config = self.backend.config()
            config[f"{name}_URL"] = self.addons[addon]
            self.backend.write_config(config)
            if release:
                self._release()
        return a

    def detach(self, attachment: dict[str, Any]) -> None:
        with self.lock:
            self.attachments.remove(attachment)
            config = self.backend.config()
            config.pop(f"{attachment['name']}_URL", None)
            self.backend.write_config(config)
            self._release()

    def patch_config(self, body: Mapping[str, Any]) -> list[str]:
        """Apply a config-vars PATCH; returns the attachment-owned vars it touches (then nothing changed)."""
        with self.lock:
            refused = [k for k in body if k in self.owned()]
            if refused:
                self.refused.append(refused)
                return refused
            before = self.backend.config()
            after = dict(before)
            for k, v in body.items():
                if v is None:
                    after.pop(k, None)
                else:
                    after[k] = str(v)
            if after != before:
                self.backend.write_config(after)
                self._release()
            return []

    # -- dynos -------------------------------------------------------------------------------
    def _release(self) -> None:
        """A new release (config change): every dyno restarts onto it."""
        self.restarts += 1
        now = time.monotonic()
        for d in [d for d in self.dynos if d.state != "down"]:
            self._stop_dyno(d, now)
            self.dynos.append(Dyno(d.name, "starting", boot_at=now + self.boot_seconds))

    def _stop_dyno(self, d: Dyno, now: float) -> None:
        if d.process is None or d.state == "crashed":   # nothing runs: gone at once
            self.dynos.remove(d)
            return
        self.backend.signal(d.process, signal.SIGTERM)
        d.set("down")
        d.term_at = now

    def scale(self, updates: Mapping[str, int]) -> None:
        with self.lock:
            formation = self.backend.formation()
            formation.update(updates)
            self.backend.set_formation(formation)
            now = time.monotonic()
            for kind, quantity in updates.items():
                current = {d.index: d for d in self.dynos if d.type == kind and d.state != "down"}
                for index, d in current.items():
                    if index > quantity:
                        self._stop_dyno(d, now)
                for index in range(1, quantity + 1):
                    if index not in current:
                        self.dynos.append(Dyno(f"{kind}.{index}", "starting", boot_at=now + self.boot_seconds))

    def _run(self) -> None:
        while not self._stop.wait(self.tick):
            with self.lock:
                self.step()

    def step(self) -> None:
        """Move every dyno on: boot the starting ones, mark the dead ``crashed``, drop (or kill) the stopping."""
        now = time.monotonic()
        for d in list(self.dynos):
            if d.state == "starting" and now >= d.boot_at:
                d.env = self.backend.config()
                d.process = self.backend.start(d.name, d.env)
                d.set("up")
            elif d.state == "up" and not self.backend.alive(d.process):
                d.set("crashed")
            elif d.state == "down":
                if not self.backend.alive(d.process):
                    self.dynos.remove(d)
                elif not d.killed and now >= d.term_at + self.grace_seconds:
                    self.backend.signal(d.process, signal.SIGKILL)
                    d.killed = True

    # -- rate limit ------------------------------------------------------------------------------
    def take_token(self) -> bool:
        now = time.monotonic()
        self._tokens = min(float(self.rate_limit), self._tokens + (now - self._refilled) * self.refill_per_second)
        self._refilled = now
        if self._tokens < 1:
            self.limited += 1
            return False
        self._tokens -= 1
        return True

    @property
    def remaining(self) -> int:
        return int(self._tokens)

    # -- the app's smoke endpoint (not the Platform API) ---------------------------------------
    def smoke_target(self) -> tuple[int, dict[str, Any] | str]:
        """Where the router sends a smoke request: ``(status, answer)`` or ``(0, database_url)``."""
        if self.smoke_unavailable:
            self.smoke_unavailable -= 1
            return 503, {"error": "Application Error"}
        if self.backend.maintenance():
            return 503, {"error": "Offline for Maintenance"}
        web = [d for d in self.dynos if d.type == "web" and d.state == "up"]
        if not web:
            return 503, {"error": "Application Error"}   # H10/H20: no web dyno up
        if self.smoke_mode == "no_token":
            return 200, {"ok": True}
        url = self.addons[self.addon] if self.smoke_mode == "old" else web[0].env.get("DATABASE_URL")
        if not url:
            return 500, {"error": "DATABASE_URL is not set"}
        return 0, url


def _handler(s: HerokuStandIn):
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):  # quiet: requests carry config values
            pass

        def _send(self, code: int, body: Any = None) -> None:
            raw = b"" if body is None else json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(raw)))
            if urlsplit(self.path).path != "/smoke":
                self.send_header("RateLimit-Remaining", str(s.remaining))
            self.end_headers()
            self.wfile.write(raw)

        def _handle(self, method: str) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            try:
                body = json.loads(self.rfile.read(length)) if length else None
            except ValueError:
                return self._send(400, {"id": "bad_request", "message": "Request body is not JSON."})
            with s.lock:
                s.requests.append((method, self.path, body, self.headers.get("Authorization", "")))
            if urlsplit(self.path).path == "/smoke":
                return self._smoke(method, body)
            with s.lock:
                if self.headers.get("Authorization") != f"Bearer {s.key}":
                    return self._send(401, {"id": "unauthorized", "message": "Invalid credentials provided."})
                if "version=3" not in (self.headers.get("Accept") or ""):
                    return self._send(400, {"id": "bad_request", "message": "Accept version=3"})
                if s.throttle or not s.take_token():
                    s.throttle = max(0, s.throttle - 1)
                    return self._send(429, {"id": "rate_limit", "message": "Your account reached the API rate limit"})
                if s.fail_5xx:
                    s.fail_5xx -= 1
                    return self._send(503, {"id": "unavailable", "message": "try again"})
                return self._route(method, body)

        def _route(self, method: str, body: Any) -> None:
            app, p = f"/apps/{s.app}", self.path
            if p.startswith("/apps/") and not (p == app or p.startswith(app + "/")):
                return self._send(404, {"id": "not_found", "message": "Couldn't find that app."})
            if p == f"{app}/config-vars" and method in ("GET", "PATCH"):
                if method == "PATCH":
                    if not isinstance(body, dict) or not all(CONFIG_KEY.match(k) and (v is None or isinstance(v, str))
                                                             for k, v in body.items()):
                        return self._send(422, {"id": "invalid_params",
                                                "message": "Config vars: names are \\w+, values strings or null."})
                    refused = s.patch_config(body)
                    if refused:
                        return self._send(422, {"id": "invalid_params",
                                                "message": f"Cannot overwrite attachment values {', '.join(refused)}."})
                return self._send(200, s.config)
            if p == app and method in ("GET", "PATCH"):
                if method == "PATCH" and isinstance(body, dict) and "maintenance" in body:
                    s.backend.set_maintenance(bool(body["maintenance"]))
                return self._send(200, {"name": s.app, "maintenance": s.backend.maintenance()})
            if p == f"{app}/formation" and method in ("GET", "PATCH"):
                if method == "PATCH":
                    updates = {u.get("type"): u.get("quantity") for u in (body or {}).get("updates", [])}
                    unknown = [t for t in updates if t not in s.backend.process_types]
                    if unknown:
                        return self._send(404, {"id": "not_found", "message": "Couldn't find that process type."})
                    if not all(isinstance(q, int) and q >= 0 for q in updates.values()):
                        return self._send(422, {"id": "invalid_params", "message": "Quantity must be 0 or more."})
                    s.scale(updates)
                formation = s.backend.formation()
                return self._send(200, [{"type": t, "quantity": formation.get(t, 0), "size": "standard-1X",
                                         "command": f"run {t}"} for t in s.backend.process_types])
            if p == f"{app}/dynos" and method == "GET":
                return self._send(200, [d.to_json(s.app) for d in s.dynos])
            if p == f"{app}/addon-attachments" and method == "GET":
                return self._send(200, s.attachments)
            if p == "/addon-attachments" and method == "POST":
                return self._attach(body or {})
            if p.startswith("/addon-attachments/") and method == "DELETE":
                found = [a for a in s.attachments if a["id"] == p.rsplit("/", 1)[1]]
                if not found:
                    return self._send(404, {"id": "not_found", "message": "Couldn't find that add on attachment."})
                s.detach(found[0])
                return self._send(200, found[0])
            return self._send(404, {"id": "not_found", "message": f"no route {method} {urlsplit(p).path}"})

        def _attach(self, body: dict[str, Any]) -> None:
            if body.get("addon") not in s.addons:
                return self._send(404, {"id": "not_found", "message": "Couldn't find that add-on."})
            name = str(body.get("name") or "")
            if not ATTACHMENT_NAME.match(name):
                return self._send(422, {"id": "invalid_params", "message": "Name is invalid."})
            taken = [a for a in s.attachments if a["name"] == name]
            if taken and body.get("confirm") != s.app:
                return self._send(422, {"id": "confirmation_required",
                                        "message": f"{name} is already attached to this app."})
            for a in taken:
                s.detach(a)
            return self._send(201, s.attach(body["addon"], name))

        def _smoke(self, method: str, body: Any) -> None:
            if method != "POST":
                return self._send(200, {"ok": True})   # a page that answers 2xx and proves nothing
            if not isinstance(body, dict) or not body.get("token"):
                return self._send(400, {"error": "POST a JSON object with a token"})
            with s.lock:
                status, target = s.smoke_target()
            if status:
                return self._send(status, target)
            try:
                s.backend.smoke(body["token"], target)   # outside the lock: it may reach a database
            except Exception as exc:  # noqa: BLE001 - the app answers 500, naming no URL
                return self._send(500, {"error": type(exc).__name__})
            return self._send(201, {"token": body["token"]})

        def do_GET(self):
            self._handle("GET")

        def do_PATCH(self):
            self._handle("PATCH")

        def do_POST(self):
            self._handle("POST")

        def do_DELETE(self):
            self._handle("DELETE")

    return Handler
