"""AppControl over the Heroku Platform API (v3).

* config vars: ``GET/PATCH /apps/{app}/config-vars`` (``null`` deletes). ``DATABASE_URL``
  belongs to the Postgres add-on's attachment: before setting it by hand, the add-on is
  attached under another name (so it is never orphaned) and the ``DATABASE`` attachment removed.
* maintenance: ``PATCH /apps/{app} {"maintenance": ...}``; formation: ``PATCH
  /apps/{app}/formation {"updates": [...]}`` then wait for the dynos to match.
* 429 and 5xx are retried with exponential backoff (tenacity); other errors are clear
  messages. The API key comes from a credential reference and is never logged.
"""

from __future__ import annotations

import json
import os
import time
import urllib.error
import urllib.request
from typing import Any, Callable, Mapping

from tenacity import retry, retry_if_exception, stop_after_attempt, wait_exponential

from ..errors import ConfigError, RunbookError, TimeoutExpired
from ..redact import redact
from ..secrets import resolve
from . import AppControl

API = "https://api.heroku.com"
ACCEPT = "application/vnd.heroku+json; version=3"
SOURCE_ATTACHMENT = "TERN_SOURCE_DATABASE"


class HerokuApiError(RunbookError):
    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


def _retryable(exc: BaseException) -> bool:
    return isinstance(exc, HerokuApiError) and (exc.status == 429 or exc.status >= 500 or exc.status == 0)


class HerokuApp(AppControl):
    def __init__(self, app: str, *, api_key_ref: str, base_url: str | None = None,
                 sleep: Callable[[float], None] = time.sleep, attempts: int = 6) -> None:
        self.app = app
        self._key_ref = api_key_ref
        self.base_url = (base_url or os.environ.get("TERN_HEROKU_API_URL") or API).rstrip("/")
        self.sleep = sleep
        self._request = retry(retry=retry_if_exception(_retryable), stop=stop_after_attempt(attempts),
                              wait=wait_exponential(multiplier=0.2, max=10), sleep=sleep, reraise=True)(self._once)

    # -- HTTP ------------------------------------------------------------------------
    def _once(self, method: str, path: str, body: Any = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(f"{self.base_url}{path}", data=data, method=method, headers={
            "Accept": ACCEPT, "Content-Type": "application/json", "User-Agent": "tern",
            "Authorization": f"Bearer {resolve(self._key_ref)}"})
        try:
            with urllib.request.urlopen(req, timeout=30) as resp:
                raw = resp.read()
        except urllib.error.HTTPError as exc:
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
        return f"Heroku API {method} {path} failed with {status}: {redact(detail)}"

    def request(self, method: str, path: str, body: Any = None) -> Any:
        return self._request(method, path, body)

    # -- config vars -------------------------------------------------------------------
    def config_vars(self) -> dict[str, str]:
        return self.request("GET", f"/apps/{self.app}/config-vars") or {}

    def config_var(self, name: str) -> str | None:
        return self.config_vars().get(name)

    def set_config_vars(self, changes: Mapping[str, str | None]) -> None:
        if "DATABASE_URL" in changes:
            self.detach_database_attachment()
        self.request("PATCH", f"/apps/{self.app}/config-vars", dict(changes))

    def detach_database_attachment(self) -> None:
        """Free DATABASE_URL for a manual value, keeping the add-on attached under another name."""
        attachments = self.request("GET", f"/apps/{self.app}/addon-attachments") or []
        database = next((a for a in attachments if a.get("name") == "DATABASE"), None)
        if database is None:
            return  # already detached (idempotent)
        addon = database["addon"]["id"]
        others = [a for a in attachments if a["addon"]["id"] == addon and a.get("name") != "DATABASE"]
        if not others:
            self.request("POST", "/addon-attachments", {"addon": addon, "app": self.app,
                                                         "name": SOURCE_ATTACHMENT, "confirm": self.app})
        self.request("DELETE", f"/addon-attachments/{database['id']}")

    # -- maintenance and formation -------------------------------------------------------
    def maintenance(self) -> bool:
        return bool(self.request("GET", f"/apps/{self.app}")["maintenance"])

    def set_maintenance(self, on: bool) -> None:
        self.request("PATCH", f"/apps/{self.app}", {"maintenance": bool(on)})

    def formation(self) -> dict[str, int]:
        return {f["type"]: int(f["quantity"]) for f in self.request("GET", f"/apps/{self.app}/formation") or []}

    def running(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for d in self.request("GET", f"/apps/{self.app}/dynos") or []:
            if d.get("state") in ("up", "starting", "restarting"):
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
        deadline = time.monotonic() + timeout
        while True:
            running = self.running()
            stopped = all(running.get(t, 0) <= n for t, n in quantities.items())
            if stopped:
                return previous
            if time.monotonic() > deadline:
                raise TimeoutExpired(f"Heroku dynos still running after {timeout:.0f}s: {running}")
            self.sleep(1.0)

    def smoke_test(self, host: str, port: int, *, since: float, timeout: float) -> str:
        """GET the app's smoke URL (``TERN_SMOKE_URL``: an endpoint of the app that writes and reads back)."""
        url = os.environ.get("TERN_SMOKE_URL")
        if not url:
            raise ConfigError("set TERN_SMOKE_URL to an app endpoint that writes and reads back one row")
        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(url, timeout=10) as resp:
                    if 200 <= resp.status < 300:
                        return f"{url} answered {resp.status}"
                    last = str(resp.status)
            except (urllib.error.URLError, OSError) as exc:
                last = redact(exc)
            self.sleep(1.0)
        raise TimeoutExpired(f"smoke test {url} failed for {timeout:.0f}s: {last}")
