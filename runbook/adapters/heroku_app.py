"""AppControl over the Heroku Platform API (v3).

* config vars: ``GET/PATCH /apps/{app}/config-vars`` (``null`` deletes). A var an add-on
  attachment owns (attachment ``NAME`` owns ``NAME_URL``: ``DATABASE`` owns ``DATABASE_URL``)
  cannot be written: Heroku answers 422 "Cannot overwrite attachment values". To write one,
  tern moves that attachment off - the add-on first attached under :data:`KEEPER_ATTACHMENT`
  when it has no other attachment, so it is never orphaned - then writes it. The other vars of
  the same change are written first: the switch's rollback URL (``TERN_SOURCE_DATABASE_URL``,
  a name no attachment owns) is kept before ``DATABASE_URL`` leaves the attachment, so a run
  that dies between the calls resumes with the source URL still known.
  Every config var change (and attaching or detaching) restarts the dynos.
* maintenance: ``PATCH /apps/{app} {"maintenance": ...}``; formation: ``PATCH
  /apps/{app}/formation {"updates": [...]}`` then wait for the dynos (``GET /apps/{app}/dynos``)
  to match. Dyno states are starting, up, down, crashed, idle: a ``crashed`` or ``idle`` dyno
  runs no process; a ``down`` one is being stopped and its processes may run for the SIGTERM
  grace (30 s, then SIGKILL), so it counts as running until it is gone or its ``updated_at`` is
  older than the grace plus a margin. A scale-down therefore waits up to that grace plus the
  margin, even past a shorter ``timeout``: workers that take 30 s to stop are not reported
  stopped early.
* smoke test: a token-carrying write through the app, read back on the new leader (the
  ``TERN_SMOKE_URL`` contract is in :meth:`HerokuApp.smoke_test`).
* rate limit (4,500 tokens an account, refilled at about 75 a minute): every answer's
  ``RateLimit-Remaining`` is kept; at or below a small reserve each call first waits one
  token's refill time. 429 and 5xx are retried with exponential backoff (tenacity), a 429
  at least one refill time. Other errors are clear messages. The API key comes from a
  credential reference and is never logged.
"""

from __future__ import annotations

import json
import os
import secrets
import time
import urllib.error
import urllib.parse
import urllib.request
from datetime import datetime
from typing import Any, Callable, Mapping

from tenacity import RetryCallState, retry, retry_if_exception, stop_after_attempt, wait_exponential

from ..errors import ConfigError, DatabaseError, RunbookError, TimeoutExpired, VerificationError
from ..pg import url_endpoint
from ..redact import redact
from ..secrets import resolve
from . import AppControl

API = "https://api.heroku.com"
ACCEPT = "application/vnd.heroku+json; version=3"
# The add-on's attachment while DATABASE_URL points elsewhere. It owns TERN_HEROKU_SOURCE_URL, never the
# switch's rollback var TERN_SOURCE_DATABASE_URL (which older tern versions attached as TERN_SOURCE_DATABASE:
# Heroku then refused the switch's write of it; such an attachment is moved off like any other owner).
KEEPER_ATTACHMENT = "TERN_HEROKU_SOURCE"
SMOKE_SQL = "SELECT 1 FROM tern_smoke WHERE token = %(token)s"
STOP_GRACE = 30.0        # Heroku: SIGTERM, then SIGKILL 30 s later
STOP_MARGIN = 15.0       # on top of the grace: the platform's own delay, clock skew against updated_at
TOKEN_SECONDS = 0.8      # one rate-limit token's refill time (about 75 a minute)
RATE_LIMIT_RESERVE = 20  # at or below this many tokens left, every call first waits TOKEN_SECONDS
RUNNING_STATES = ("up", "starting")

ReadBack = Callable[[str, str, Mapping[str, str]], bool]


class HerokuApiError(RunbookError):
    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


def _seconds_ago(stamp: Any, now: float) -> float | None:
    """How long ago an API timestamp (``2012-01-01T12:00:00Z``) was; None when unreadable."""
    try:
        return now - datetime.fromisoformat(str(stamp).replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def _retryable(exc: BaseException) -> bool:
    return isinstance(exc, HerokuApiError) and (exc.status == 429 or exc.status >= 500 or exc.status == 0)


class HerokuApp(AppControl):
    def __init__(self, app: str, *, api_key_ref: str, base_url: str | None = None,
                 sleep: Callable[[float], None] = time.sleep, attempts: int = 6,
                 read_back: ReadBack | None = None, stop_grace: float = STOP_GRACE,
                 stop_margin: float = STOP_MARGIN, poll_interval: float = 1.0,
                 token_seconds: float = TOKEN_SECONDS, rate_limit_reserve: int = RATE_LIMIT_RESERVE) -> None:
        self.app = app
        self._key_ref = api_key_ref
        self.base_url = (base_url or os.environ.get("TERN_HEROKU_API_URL") or API).rstrip("/")
        self.sleep = sleep
        self.read_back = read_back or _read_back
        self.stop_grace = stop_grace
        self.stop_margin = stop_margin
        self.poll_interval = poll_interval
        self.token_seconds = token_seconds
        self.rate_limit_reserve = rate_limit_reserve
        self.rate_limit_remaining: int | None = None    # from the last answer's RateLimit-Remaining
        self._backoff = wait_exponential(multiplier=0.2, max=10)
        self._request = retry(retry=retry_if_exception(_retryable), stop=stop_after_attempt(attempts),
                              wait=self._wait, sleep=sleep, reraise=True)(self._once)

    # -- HTTP ------------------------------------------------------------------------
    def _wait(self, state: RetryCallState) -> float:
        """Exponential backoff; after a 429, at least one token's refill time."""
        wait = self._backoff(state)
        exc = state.outcome.exception() if state.outcome else None
        if isinstance(exc, HerokuApiError) and exc.status == 429:
            return max(wait, self.token_seconds)
        return wait

    def _note_remaining(self, headers: Any) -> None:
        try:
            self.rate_limit_remaining = int(headers.get("RateLimit-Remaining"))
        except (TypeError, ValueError, AttributeError):
            pass

    def _once(self, method: str, path: str, body: Any = None) -> Any:
        if self.rate_limit_remaining is not None and self.rate_limit_remaining <= self.rate_limit_reserve:
            self.sleep(self.token_seconds)   # nearly out of tokens: no faster than they refill
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(f"{self.base_url}{path}", data=data, method=method, headers={
            "Accept": ACCEPT, "Content-Type": "application/json", "User-Agent": "tern",
            "Authorization": f"Bearer {resolve(self._key_ref)}"})
        try:
            with urllib.request.urlopen(req, timeout=30) as resp:
                self._note_remaining(resp.headers)
                raw = resp.read()
        except urllib.error.HTTPError as exc:
            self._note_remaining(exc.headers)
            if exc.code == 429:
                self.rate_limit_remaining = None   # the retry's own wait is at least one refill time
            detail = ""
            try:
                detail = json.loads(exc.read() or b"{}").get("message", "")
            except (ValueError, AttributeError):
                pass
            raise HerokuApiError(self._explain(method, path, exc.code, detail), exc.code) from None
        except (urllib.error.URLError, OSError) as exc:
            raise HerokuApiError(f"Heroku API unreachable ({method} {path}): {redact(exc)}", 0) from None
        return json.loads(raw) if raw else None

    def _explain(self, method: str, path: str, status: int, detail: str) -> str:
        if status == 401:
            return "Heroku rejected the API key (401): check HEROKU_API_KEY"
        if status == 403:
            return f"Heroku refused {method} {path} (403): the key lacks access to app {self.app}"
        if status == 404:
            return f"Heroku: not found ({method} {path}): is the app name {self.app!r} right? {redact(detail)}"
        if status == 422 and "attachment" in detail.lower():
            # names only (Heroku's message lists the vars, never their values)
            return (f"Heroku refused {method} {path} (422): {redact(detail)} An add-on attachment owns these "
                    "config vars (attachment NAME owns NAME_URL): they change only by detaching the attachment "
                    f"or attaching under another name (heroku addons:attach --as). List them with "
                    f"heroku addons:info / GET /apps/{self.app}/addon-attachments")
        if status == 429:
            return (f"Heroku API {method} {path}: rate limit reached (429) and still reached after the retries: "
                    "another client is spending this account's tokens; wait a minute and run again")
        return f"Heroku API {method} {path} failed with {status}: {redact(detail)}"

    def request(self, method: str, path: str, body: Any = None) -> Any:
        return self._request(method, path, body)

    # -- config vars -------------------------------------------------------------------
    def config_vars(self) -> dict[str, str]:
        return self.request("GET", f"/apps/{self.app}/config-vars") or {}

    def config_var(self, name: str) -> str | None:
        return self.config_vars().get(name)

    def set_config_vars(self, changes: Mapping[str, str | None]) -> None:
        changes = dict(changes)
        if not changes:
            return
        attachments = self.attachments() if any(k.endswith("_URL") for k in changes) else []
        owners = {f"{a['name']}_URL": a for a in attachments}
        owned = [k for k in changes if k in owners]
        if not owned:
            self.request("PATCH", f"/apps/{self.app}/config-vars", changes)
            return
        moving = {owners[k]["id"]: owners[k] for k in owned}
        keepers = self._keepers_needed(list(moving.values()), attachments)   # checked before any write
        free = {k: v for k, v in changes.items() if k not in owners}
        if free:
            self.request("PATCH", f"/apps/{self.app}/config-vars", free)
        for addon in keepers:
            self.request("POST", "/addon-attachments", {"addon": addon, "app": self.app,
                                                         "name": KEEPER_ATTACHMENT, "confirm": self.app})
        for att in moving.values():
            self._delete_attachment(att["id"])
        self.request("PATCH", f"/apps/{self.app}/config-vars", {k: changes[k] for k in owned})

    def attachments(self) -> list[dict[str, Any]]:
        return self.request("GET", f"/apps/{self.app}/addon-attachments") or []

    def _keepers_needed(self, moving: list[dict[str, Any]], attachments: list[dict[str, Any]]) -> list[str]:
        """The add-ons that would be left without an attachment once ``moving`` is removed."""
        moving_ids = {a["id"] for a in moving}
        addons = list(dict.fromkeys(a["addon"]["id"] for a in moving))
        orphans = [addon for addon in addons
                   if not any(a["addon"]["id"] == addon and a["id"] not in moving_ids for a in attachments)]
        taken = [a for a in attachments if a.get("name") == KEEPER_ATTACHMENT]
        if orphans and (len(orphans) > 1 or taken):
            raise ConfigError(f"Heroku app {self.app}: cannot keep add-on {orphans[0]} attached as "
                              f"{KEEPER_ATTACHMENT} (that name is taken or needed twice); attach it under "
                              "another name first, then run again")
        return orphans

    def _delete_attachment(self, attachment_id: str) -> None:
        try:
            self.request("DELETE", f"/addon-attachments/{attachment_id}")
        except HerokuApiError as exc:
            if exc.status != 404:   # 404: already gone (a retried DELETE whose first answer was lost)
                raise

    # -- maintenance and formation -------------------------------------------------------
    def maintenance(self) -> bool:
        return bool(self.request("GET", f"/apps/{self.app}")["maintenance"])

    def set_maintenance(self, on: bool) -> None:
        self.request("PATCH", f"/apps/{self.app}", {"maintenance": bool(on)})

    def formation(self) -> dict[str, int]:
        return {f["type"]: int(f["quantity"]) for f in self.request("GET", f"/apps/{self.app}/formation") or []}

    def dynos(self) -> list[dict[str, Any]]:
        return self.request("GET", f"/apps/{self.app}/dynos") or []

    def _runs(self, dyno: Mapping[str, Any], now: float) -> bool:
        """Whether a process of ``dyno`` may run: up or starting; down (being stopped) until the SIGTERM
        grace plus the margin has passed since its last state change; never crashed or idle."""
        state = dyno.get("state")
        if state in RUNNING_STATES:
            return True
        if state == "down":
            ago = _seconds_ago(dyno.get("updated_at"), now)
            return ago is None or ago < self.stop_grace + self.stop_margin
        return False

    def running(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        now = time.time()
        for d in self.dynos():
            if self._runs(d, now):
                counts[d["type"]] = counts.get(d["type"], 0) + 1
        return counts

    def scale(self, quantities: Mapping[str, int], *, timeout: float) -> dict[str, int]:
        for t, n in quantities.items():
            if int(n) < 0:
                raise ConfigError(f"process type {t} cannot be scaled to {n}")
        if not quantities:
            return {}
        current = self.formation()
        previous = {t: current.get(t, 0) for t in quantities}
        self.request("PATCH", f"/apps/{self.app}/formation",
                     {"updates": [{"type": t, "quantity": int(n)} for t, n in quantities.items()]})
        # a dyno being stopped may run for the SIGTERM grace: waiting for it is bounded by that, not by timeout
        start, stop_bound = time.monotonic(), max(timeout, self.stop_grace + self.stop_margin)
        while True:
            extra, missing = self._mismatch(quantities, self.dynos(), time.time())
            if not extra and not missing:
                return previous
            waited = time.monotonic() - start
            if waited > (stop_bound if extra else timeout):
                why = "; ".join(x for x in (
                    extra and f"still running: {', '.join(extra)} (SIGTERM grace {self.stop_grace:g}s)",
                    missing and f"not up: {', '.join(missing)}") if x)
                raise TimeoutExpired(f"Heroku dynos of app {self.app} do not match the formation "
                                     f"{dict(quantities)} after {waited:.0f}s: {why}")
            self.sleep(self.poll_interval)

    def _mismatch(self, quantities: Mapping[str, int], dynos: list[dict[str, Any]],
                  now: float) -> tuple[list[str], list[str]]:
        """The dynos of these types that may still run beyond the formation (being stopped, or numbered
        past it), and the wanted ones that are not up (with their state: starting, crashed, absent)."""
        extra, seen = [], {}
        for d in dynos:
            kind, name, state = d.get("type"), str(d.get("name", "")), d.get("state")
            if kind not in quantities:
                continue
            number = name.rsplit(".", 1)[-1]
            past = number.isdigit() and int(number) > int(quantities[kind])
            if self._runs(d, now) and (state == "down" or past):
                extra.append(f"{name} {state}")
            if state != "down" and seen.get(name) != "up":
                seen[name] = state
        missing = [f"{t}.{i} {seen.get(f'{t}.{i}', 'absent')}" for t, n in quantities.items()
                   for i in range(1, int(n) + 1) if seen.get(f"{t}.{i}") != "up"]
        return extra, missing

    def smoke_test(self, host: str, port: int, *, since: float, timeout: float) -> str:
        """Prove a write through the app reached the new leader ``host:port``.

        The ``TERN_SMOKE_URL`` contract (an endpoint of the app, not of the Heroku API):

        * tern sends ``POST TERN_SMOKE_URL`` with the JSON body ``{"token": "<random hex>"}``,
          a fresh token per attempt; no Heroku credential is sent (a secret the endpoint
          wants goes in the URL, which tern never prints beyond scheme, host and path);
        * the app inserts one row carrying that token through its own ``DATABASE_URL``,
          commits, and only then answers 2xx with a JSON object echoing it: ``{"token": ...}``;
        * tern then connects to the new leader with the app's ``DATABASE_URL`` (which must point
          at ``host:port``) and runs ``TERN_SMOKE_SQL`` in a read-only transaction with the
          parameter ``%(token)s`` (default: ``SELECT 1 FROM tern_smoke WHERE token = %(token)s``;
          write a literal ``%`` as ``%%``). A row back proves the write landed on the leader.

        Non-2xx answers and unreachable endpoints (dynos restarting, maintenance page) are
        retried until ``timeout``. A 2xx answer that does not echo the token, or a token not
        found on the leader (the write went to another database, e.g. a dyno still on the old
        one), fails at once. ``since`` is not needed: the token is fresh.
        """
        url = os.environ.get("TERN_SMOKE_URL")
        if not url:
            raise ConfigError("set TERN_SMOKE_URL to an app endpoint that writes a row with the token tern "
                              "posts and echoes the token (see runbook/adapters/heroku_app.py)")
        sql = os.environ.get("TERN_SMOKE_SQL") or SMOKE_SQL
        if "%(token)s" not in sql:
            raise ConfigError("TERN_SMOKE_SQL must look the row up by the parameter %(token)s")
        shown = _shown(url)
        database_url = self.config_var("DATABASE_URL")
        if not database_url or url_endpoint(database_url)[:2] != (host, port):
            where = "is not set" if not database_url else "points at {}:{}".format(*url_endpoint(database_url)[:2])
            raise VerificationError(f"smoke test: the app's DATABASE_URL {where}, not the new leader {host}:{port}")
        deadline = time.monotonic() + timeout
        last = "no attempt"
        while True:
            token = secrets.token_hex(16)
            answered, answer = self._smoke_post(url, token)
            if not answered:
                last = answer
            else:
                if not isinstance(answer, dict) or answer.get("token") != token:
                    raise ConfigError(f"smoke test: {shown} answered 2xx without echoing the token tern sent: "
                                      "it does not follow the TERN_SMOKE_URL contract, so it proves no write")
                if not self.read_back(database_url, sql, {"token": token}):
                    raise VerificationError(f"smoke test: the app acknowledged smoke token {token} but the row is "
                                            f"not on the new leader {host}:{port}: the write went to another "
                                            "database (a dyno still on the old one?)")
                return f"smoke token {token} written through {shown} and read back from {host}:{port}"
            if time.monotonic() >= deadline:
                raise TimeoutExpired(f"smoke test {shown} failed for {timeout:.0f}s: {last}")
            self.sleep(1.0)

    def _smoke_post(self, url: str, token: str) -> tuple[bool, Any]:
        """``(True, its JSON or None)`` when the endpoint answered 2xx, else ``(False, why not)``."""
        req = urllib.request.Request(url, data=json.dumps({"token": token}).encode(), method="POST", headers={
            "Content-Type": "application/json", "Accept": "application/json", "User-Agent": "tern"})
        try:
            with urllib.request.urlopen(req, timeout=10) as resp:
                raw = resp.read()
        except urllib.error.HTTPError as exc:
            return False, f"HTTP {exc.code}"
        except (urllib.error.URLError, OSError) as exc:
            return False, redact(exc)
        try:
            return True, json.loads(raw or b"null")
        except ValueError:
            return True, None


def _shown(url: str) -> str:
    """A URL as tern prints it: no credentials, query or fragment (they may carry a secret)."""
    parts = urllib.parse.urlsplit(url)
    netloc = parts.hostname or ""
    if parts.port:
        netloc += f":{parts.port}"
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def _read_back(database_url: str, sql: str, params: Mapping[str, str]) -> bool:
    """Whether ``sql`` finds a row on the database of ``database_url`` (in a read-only transaction)."""
    import psycopg

    from ..pg import connect

    with connect(database_url, purpose="smoke-test", autocommit=False, timeout=10) as conn:
        try:   # closed without a commit: whatever the operator's query did is rolled back
            conn.execute("SET TRANSACTION READ ONLY")
            row = conn.execute(sql, dict(params)).fetchone()
        except psycopg.Error as exc:
            host, port, db = url_endpoint(database_url)
            raise DatabaseError(f"smoke test: TERN_SMOKE_SQL failed on {host}:{port}/{db}: "
                                f"{redact(exc).strip()}") from None
    return row is not None
