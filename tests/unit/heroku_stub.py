"""A local stand-in for the Heroku Platform API: the endpoints tern uses, with their semantics.

* Add-on attachments own config vars: attachment ``NAME`` owns ``NAME_URL`` (the add-on's
  URL). A ``PATCH /apps/{app}/config-vars`` that sets or deletes any owned var is refused
  as a whole with 422 ``{"id": "invalid_params", "message": "Cannot overwrite attachment
  values A_URL, B_URL."}`` (logged in ``state.refused``). Attaching sets ``NAME_URL``,
  detaching removes it: ownership moves with the attachment.
* Every config var change (a PATCH that changes something, attaching, detaching) restarts
  the dynos: ``state.restarts`` counts them.
* The app itself: ``POST /smoke`` (no API key) is the app's smoke endpoint following
  tern's ``TERN_SMOKE_URL`` contract - it stores the posted token in the database its
  ``DATABASE_URL`` points at (``state.databases``, keyed by ``(host, port)``) and echoes it.
  ``state.smoke_mode`` makes it misbehave: ``"no_token"`` (2xx without the echo), ``"old"``
  (a dyno still on the add-on's database writes there); ``state.smoke_unavailable`` answers
  503 to the next N calls (dynos booting).
"""

from __future__ import annotations

import json
import threading
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

SOURCE_URL = "postgres://u:heroku-db-secret@ec2-1.compute-1.amazonaws.com:5432/d"


def endpoint(url: str) -> tuple[str, int]:
    parts = urlsplit(url)
    return parts.hostname or "", parts.port or 5432


class HerokuState:
    def __init__(self, app: str, key: str) -> None:
        self.app = app
        self.key = key
        self.addon = str(uuid.uuid4())
        self.addons = {self.addon: SOURCE_URL}        # add-on id -> its database URL
        self.config = {"LANG": "en_US.UTF-8"}
        self.attachments: list[dict] = []
        self.restarts = 0
        for name in ("DATABASE", "HEROKU_POSTGRESQL_RED"):
            self.attach(self.addon, name)
        self.restarts = 0
        self.refused: list[list[str]] = []            # attachment-owned vars of each refused PATCH
        self.maintenance = False
        self.formation = {"web": 2, "worker": 3}
        self.throttle = 0       # answer 429 to the next N requests
        self.fail_5xx = 0       # answer 503 to the next N requests
        self.requests: list[tuple[str, str, object, str]] = []
        self.databases: dict[tuple[str, int], set[str]] = {}   # (host, port) -> smoke tokens written there
        self.smoke_mode = "ok"
        self.smoke_unavailable = 0
        self.lock = threading.Lock()

    # -- attachments and config vars, as Heroku keeps them --------------------------------
    def owned(self) -> dict[str, dict]:
        """Config var -> the attachment that owns it."""
        return {f"{a['name']}_URL": a for a in self.attachments}

    def attach(self, addon: str, name: str) -> dict:
        a = {"id": str(uuid.uuid4()), "name": name, "addon": {"id": addon}, "app": {"name": self.app}}
        self.attachments.append(a)
        self.config[f"{name}_URL"] = self.addons[addon]
        self.restarts += 1
        return a

    def detach(self, a: dict) -> None:
        self.attachments.remove(a)
        self.config.pop(f"{a['name']}_URL", None)
        self.restarts += 1

    def patch_config(self, body: dict) -> list[str]:
        """Apply a PATCH; returns the attachment-owned vars it touches (then nothing is applied)."""
        refused = [k for k in body if k in self.owned()]
        if refused:
            self.refused.append(refused)
            return refused
        before = dict(self.config)
        for k, v in body.items():
            if v is None:
                self.config.pop(k, None)
            else:
                self.config[k] = str(v)
        if self.config != before:
            self.restarts += 1
        return []


def make_handler(state: HerokuState):
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):  # quiet
            pass

        def _send(self, code: int, body=None) -> None:
            raw = b"" if body is None else json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(raw)))
            self.end_headers()
            self.wfile.write(raw)

        def _handle(self, method: str) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = json.loads(self.rfile.read(length)) if length else None
            with state.lock:
                state.requests.append((method, self.path, body, self.headers.get("Authorization", "")))
                if urlsplit(self.path).path == "/smoke":
                    return self._smoke(method, body)
                if self.headers.get("Authorization") != f"Bearer {state.key}":
                    return self._send(401, {"id": "unauthorized", "message": "Invalid credentials provided."})
                if "version=3" not in (self.headers.get("Accept") or ""):
                    return self._send(400, {"id": "bad_request", "message": "Accept version=3"})
                if state.throttle:
                    state.throttle -= 1
                    return self._send(429, {"id": "rate_limit", "message": "Your account reached the API rate limit"})
                if state.fail_5xx:
                    state.fail_5xx -= 1
                    return self._send(503, {"id": "unavailable", "message": "try again"})
                return self._route(method, body)

        def _route(self, method: str, body) -> None:
            app = f"/apps/{state.app}"
            p = self.path
            if not (p.startswith(app) or p.startswith("/addon-attachments")):
                return self._send(404, {"id": "not_found", "message": "Couldn't find that app."})
            if p == f"{app}/config-vars":
                if method == "PATCH":
                    refused = state.patch_config(body or {})
                    if refused:
                        return self._send(422, {"id": "invalid_params",
                                                "message": f"Cannot overwrite attachment values {', '.join(refused)}."})
                return self._send(200, state.config)
            if p == app:
                if method == "PATCH":
                    state.maintenance = bool(body["maintenance"])
                return self._send(200, {"name": state.app, "maintenance": state.maintenance})
            if p == f"{app}/formation":
                if method == "PATCH":
                    for u in body["updates"]:
                        state.formation[u["type"]] = u["quantity"]
                return self._send(200, [{"type": t, "quantity": q} for t, q in state.formation.items()])
            if p == f"{app}/dynos":
                return self._send(200, [{"type": t, "state": "up", "name": f"{t}.{i + 1}"}
                                        for t, q in state.formation.items() for i in range(q)])
            if p == f"{app}/addon-attachments":
                return self._send(200, state.attachments)
            if p == "/addon-attachments" and method == "POST":
                if body.get("addon") not in state.addons:
                    return self._send(404, {"id": "not_found", "message": "Couldn't find that add-on."})
                taken = [a for a in state.attachments if a["name"] == body["name"]]
                if taken and body.get("confirm") != state.app:
                    return self._send(422, {"id": "confirmation_required",
                                            "message": f"{body['name']} is already attached to this app."})
                for a in taken:
                    state.detach(a)
                return self._send(201, state.attach(body["addon"], body["name"]))
            if p.startswith("/addon-attachments/") and method == "DELETE":
                att = p.rsplit("/", 1)[1]
                found = [a for a in state.attachments if a["id"] == att]
                if not found:
                    return self._send(404, {"id": "not_found", "message": "Couldn't find that add on attachment."})
                state.detach(found[0])
                return self._send(200, found[0])
            return self._send(404, {"id": "not_found", "message": f"no route {method} {p}"})

        def _smoke(self, method: str, body) -> None:
            """The app's smoke endpoint (not the Platform API): write the token where the app's database is."""
            if method == "GET":
                return self._send(200, {"ok": True})   # a page that answers 2xx and proves nothing
            if not isinstance(body, dict) or not body.get("token"):
                return self._send(400, {"error": "POST a JSON object with a token"})
            if state.smoke_unavailable:
                state.smoke_unavailable -= 1
                return self._send(503, {"error": "Application Error"})
            if state.smoke_mode == "no_token":
                return self._send(200, {"ok": True})
            url = SOURCE_URL if state.smoke_mode == "old" else state.config.get("DATABASE_URL")
            if not url:
                return self._send(500, {"error": "DATABASE_URL is not set"})
            state.databases.setdefault(endpoint(url), set()).add(body["token"])
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


class HerokuStub:
    def __init__(self, app: str = "shop", key: str = "heroku-api-key-123456") -> None:
        self.state = HerokuState(app, key)
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), make_handler(self.state))
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05},
                                       daemon=True)

    def __enter__(self) -> "HerokuStub":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    def read_back(self, database_url: str, sql: str, params) -> bool:
        """Stands in for tern's query on a database: is the smoke token's row there?"""
        return params["token"] in self.state.databases.get(endpoint(database_url), set())
