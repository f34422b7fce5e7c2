"""A local stand-in for the Heroku Platform API: the endpoints tern uses, with their semantics."""

from __future__ import annotations

import json
import threading
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class HerokuState:
    def __init__(self, app: str, key: str) -> None:
        self.app = app
        self.key = key
        self.addon = str(uuid.uuid4())
        self.config = {"DATABASE_URL": "postgres://u:heroku-db-secret@ec2-1.compute-1.amazonaws.com:5432/d",
                       "HEROKU_POSTGRESQL_RED_URL": "postgres://u:heroku-db-secret@ec2-1.compute-1.amazonaws.com:5432/d"}
        self.attachments = [{"id": str(uuid.uuid4()), "name": "DATABASE", "addon": {"id": self.addon}},
                            {"id": str(uuid.uuid4()), "name": "HEROKU_POSTGRESQL_RED", "addon": {"id": self.addon}}]
        self.maintenance = False
        self.formation = {"web": 2, "worker": 3}
        self.throttle = 0       # answer 429 to the next N requests
        self.fail_5xx = 0       # answer 503 to the next N requests
        self.requests: list[tuple[str, str, object, str]] = []
        self.lock = threading.Lock()


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
                    for k, v in body.items():
                        if k == "DATABASE_URL" and any(a["name"] == "DATABASE" for a in state.attachments):
                            return self._send(422, {"id": "invalid_params",
                                                    "message": "Cannot overwrite attachment values DATABASE_URL."})
                        if v is None:
                            state.config.pop(k, None)
                        else:
                            state.config[k] = v
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
                a = {"id": str(uuid.uuid4()), "name": body["name"], "addon": {"id": body["addon"]}}
                state.attachments.append(a)
                state.config[f"{body['name']}_URL"] = state.config.get("HEROKU_POSTGRESQL_RED_URL", "")
                return self._send(201, a)
            if p.startswith("/addon-attachments/") and method == "DELETE":
                att = p.rsplit("/", 1)[1]
                found = [a for a in state.attachments if a["id"] == att]
                if not found:
                    return self._send(404, {"id": "not_found", "message": "no such attachment"})
                state.attachments.remove(found[0])
                state.config.pop(f"{found[0]['name']}_URL", None)
                return self._send(200, found[0])
            return self._send(404, {"id": "not_found", "message": f"no route {method} {p}"})

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
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> "HerokuStub":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()
