"""The Heroku stand-in itself, over plain HTTP: as strict as Heroku's documentation, not kinder."""

from __future__ import annotations

import json
import signal
import time
import urllib.error
import urllib.request

import pytest

from runbook.standins.heroku import HerokuStandIn, MemoryBackend

SOURCE_URL = "postgres://u:heroku-db-secret@ec2-1.compute-1.amazonaws.com:5432/d"


def standin(**kw) -> HerokuStandIn:
    backend = MemoryBackend({"DATABASE_URL": SOURCE_URL}, {"web": 1, "worker": 1},
                            ignore_sigterm=kw.pop("ignore_sigterm", ()))
    kw.setdefault("boot_seconds", 0.05)
    kw.setdefault("grace_seconds", 0.3)
    return HerokuStandIn(backend, **kw)


def call(s: HerokuStandIn, method: str, path: str, body=None, *, key: str | None = None):
    """(status, JSON answer, RateLimit-Remaining) of one API call."""
    req = urllib.request.Request(f"{s.url}{path}", method=method,
                                 data=None if body is None else json.dumps(body).encode(),
                                 headers={"Accept": "application/vnd.heroku+json; version=3",
                                          "Content-Type": "application/json",
                                          "Authorization": f"Bearer {key or s.key}"})
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:
            return resp.status, json.loads(resp.read() or b"null"), resp.headers.get("RateLimit-Remaining")
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"null"), exc.headers.get("RateLimit-Remaining")


def wait_for(probe, timeout=5.0):
    deadline = time.monotonic() + timeout
    while not probe():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_rate_limit_header_429_and_refill():
    with standin(rate_limit=3, refill_per_second=1.0) as s:
        answers = [call(s, "GET", f"/apps/{s.app}") for _ in range(4)]
        assert [a[0] for a in answers] == [200, 200, 200, 429]
        assert [a[2] for a in answers] == ["2", "1", "0", "0"]
        assert answers[-1][1]["id"] == "rate_limit" and s.limited == 1
        time.sleep(1.05)                                       # 1 token/s: one back
        assert call(s, "GET", f"/apps/{s.app}")[0] == 200
        assert call(s, "GET", f"/apps/{s.app}", key="wrong-key-999")[0] == 401


def test_attachment_name_decides_the_owned_var_and_refusals_restart_nothing():
    with standin() as s:
        path = f"/apps/{s.app}/config-vars"
        status, answer, _ = call(s, "POST", "/addon-attachments", {"addon": s.addon, "app": s.app,
                                                                   "name": "TERN_SOURCE_DATABASE"})
        assert status == 201 and s.config["TERN_SOURCE_DATABASE_URL"] == SOURCE_URL and s.restarts == 1
        for change in ({"TERN_SOURCE_DATABASE_URL": "postgres://x:new-secret@h/d", "OTHER": "1"},
                       {"TERN_SOURCE_DATABASE_URL": None}, {"DATABASE_URL": None}):
            status, answer, _ = call(s, "PATCH", path, change)
            assert status == 422 and answer["id"] == "invalid_params"
            assert answer["message"].startswith("Cannot overwrite attachment values")
            assert "secret" not in answer["message"]              # names only
        assert "OTHER" not in s.config and s.restarts == 1          # refused as a whole; no release
        assert call(s, "DELETE", f"/addon-attachments/{s.attachments[-1]['id']}")[0] == 200
        assert "TERN_SOURCE_DATABASE_URL" not in s.config and s.restarts == 2   # detaching removes it
        assert call(s, "PATCH", path, {"TERN_SOURCE_DATABASE_URL": "postgres://x:y@h/d"})[0] == 200
        assert call(s, "PATCH", path, {"bad-name": "1"})[0] == 422
        taken = call(s, "POST", "/addon-attachments", {"addon": s.addon, "app": s.app, "name": "DATABASE"})
        assert taken[0] == 422 and taken[1]["id"] == "confirmation_required"


def test_a_restart_sigterms_the_old_dyno_and_kills_it_after_the_grace():
    with standin(ignore_sigterm=("web",), grace_seconds=1.0, boot_seconds=0.5) as s:
        old = s.dynos_of("web")[0]
        process = old.process
        assert call(s, "PATCH", f"/apps/{s.app}/config-vars", {"FEATURE": "on"})[0] == 200
        listed = call(s, "GET", f"/apps/{s.app}/dynos")[1]
        web = [(d["name"], d["state"], d["id"]) for d in listed if d["type"] == "web"]
        assert web[0] == ("web.1", "down", old.id) and web[1][:2] == ("web.1", "starting") and web[1][2] != old.id
        assert process.signals == [signal.SIGTERM] and process.alive        # ignores it: still running
        wait_for(lambda: [d.state for d in s.dynos_of("web")] == ["up"], timeout=2)
        assert process.signals == [signal.SIGTERM, signal.SIGKILL] and not process.alive
        assert s.dynos_of("web")[0].env["FEATURE"] == "on"


def test_crashed_formation_maintenance_and_the_router():
    with standin(boot_seconds=0.6) as s:
        s.crash("worker.1")
        wait_for(lambda: s.dynos_of("worker")[0].state == "crashed")
        states = {d["name"]: d["state"] for d in call(s, "GET", f"/apps/{s.app}/dynos")[1]}
        assert states == {"web.1": "up", "worker.1": "crashed"}
        assert call(s, "PATCH", f"/apps/{s.app}/formation", {"updates": [{"type": "clock", "quantity": 1}]})[0] == 404
        assert call(s, "PATCH", f"/apps/{s.app}/formation", {"updates": [{"type": "web", "quantity": -1}]})[0] == 422
        status, formation, _ = call(s, "PATCH", f"/apps/{s.app}/formation",
                                    {"updates": [{"type": "web", "quantity": 2}, {"type": "worker", "quantity": 0}]})
        assert status == 200 and {f["type"]: f["quantity"] for f in formation} == {"web": 2, "worker": 0}
        assert [(d.name, d.state) for d in s.dynos_of("web")] == [("web.1", "up"), ("web.2", "starting")]
        assert s.dynos_of("worker") == []                          # crashed: nothing to stop
        smoke = urllib.request.Request(f"{s.url}/smoke", data=b'{"token": "t1"}', method="POST",
                                       headers={"Content-Type": "application/json"})
        assert call(s, "PATCH", f"/apps/{s.app}", {"maintenance": True})[1]["maintenance"] is True
        with pytest.raises(urllib.error.HTTPError, match="503"):
            urllib.request.urlopen(smoke, timeout=5)              # the maintenance page
        call(s, "PATCH", f"/apps/{s.app}", {"maintenance": False})
        call(s, "PATCH", f"/apps/{s.app}/config-vars", {"X": "1"})   # restart: no web dyno up for 0.6 s
        with pytest.raises(urllib.error.HTTPError, match="503"):
            urllib.request.urlopen(smoke, timeout=5)
        wait_for(lambda: any(d.state == "up" for d in s.dynos_of("web")))
        with urllib.request.urlopen(smoke, timeout=5) as resp:
            assert json.loads(resp.read()) == {"token": "t1"}
        assert s.backend.databases == {("ec2-1.compute-1.amazonaws.com", 5432): {"t1"}}
