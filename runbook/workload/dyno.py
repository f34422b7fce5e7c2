"""One process of the app (``web.N`` or ``worker.N``), like a Heroku dyno.

``python -m runbook.workload.dyno STATE_DIR web 1``

* boots like a real app: waits ``boot_seconds`` (app state) before its first connection;
* reads ``DATABASE_URL`` from the config vars it booted with. Heroku restarts every dyno when
  any config var changes: so does this process when the config-var mapping differs from the one
  it booted with - it closes its connection at once (the transaction in flight is finished first,
  as on SIGTERM), waits ``boot_seconds`` again and runs with the new config vars. Maintenance mode
  is not a config var: it restarts nothing;
* exits when the formation no longer includes it, or on SIGTERM, after finishing
  the transaction in flight (a boot wait is cut short within ~0.05 s);
* web: in maintenance mode stops serving writes but keeps its pooled connection
  open (a stale connection, as on Heroku); worker: maintenance does not stop it;
* each write is a real transaction; the ledger gets ``intent`` (with ``began``, the wall clock
  before the first statement) before COMMIT and ``ack`` after it; a failed write (its
  transaction, or the connection it needed) gets an ``error`` record;
* connects without server-side prepared statements (``prepare_threshold=None``): PgBouncer's
  transaction pooling (1.18) does not support them.
"""

from __future__ import annotations

import logging
import random
import signal
import sys
import time
import uuid
from pathlib import Path

import psycopg

from ..pg import url_endpoint
from .ledger import LedgerWriter, error_message
from .state import AppState, StateWatcher

log = logging.getLogger("tern.app")

_stop = False


def _on_term(signum, frame):  # noqa: ARG001
    global _stop
    _stop = True


class Dyno:
    def __init__(self, state_dir: Path, kind: str, index: int) -> None:
        self.state_dir = Path(state_dir)
        self.kind = kind
        self.index = index
        self.name = f"{kind}.{index}"
        self.watcher = StateWatcher(self.state_dir)
        self.ledger = LedgerWriter(self.state_dir, self.name)
        self.conn: psycopg.Connection | None = None
        self.url: str | None = None
        self.endpoint = ""
        self.rng = random.Random()
        self.products = 1000
        self.warehouses = 8
        self.errors = 0
        self.config: dict[str, str] | None = None   # the config vars this process booted with
        self.last_error = ""

    # -- connection -------------------------------------------------------
    def ensure_connection(self, url: str) -> bool:
        if url != self.url:
            self.disconnect()
            self.url = url
        if self.conn is not None and not self.conn.closed:
            return True
        try:
            host, port, _ = url_endpoint(url)
            # no server-side prepared statements: PgBouncer's transaction pooling does not support them
            self.conn = psycopg.connect(url, autocommit=False, connect_timeout=2, prepare_threshold=None,
                                        application_name=f"tern-app:{self.name}")
            self.endpoint = f"{host}:{port}"
            with self.conn.cursor() as cur:
                cur.execute("SELECT coalesce(max(id), 1000) FROM products")
                self.products = cur.fetchone()[0]
            self.conn.commit()
            log.info("%s connected to %s", self.name, self.endpoint)
            return True
        except psycopg.Error as exc:
            self.errors += 1
            self.last_error = error_message(exc)
            log.warning("%s cannot connect: %s", self.name, self.last_error)
            self.disconnect()
            return False

    def disconnect(self) -> None:
        if self.conn is not None:
            try:
                self.conn.close()
            except Exception:  # noqa: BLE001
                pass
        self.conn = None

    # -- work -------------------------------------------------------------
    def place_order(self) -> tuple[str, str]:
        """A web request: an order with lines, stock movements and stock updates."""
        ref = str(uuid.uuid4())
        cur = self.conn.cursor()
        n_lines = self.rng.randint(1, 3)
        cur.execute(
            "INSERT INTO orders (order_ref, channel, customer_email, status, total_cents, invoice_number, notes)"
            " VALUES (%s, 'web', %s, 'paid', 0, nextval('invoice_number_seq'), %s) RETURNING id",
            (ref, f"shopper{self.rng.randint(1, 5000)}@example.com", f"placed by {self.name}"))
        order_id = cur.fetchone()[0]
        total = 0
        for _ in range(n_lines):
            product = self.rng.randint(1, self.products)
            warehouse = self.rng.randint(1, self.warehouses)
            qty = self.rng.randint(1, 5)
            price = 100 + product % 1000
            total += qty * price
            cur.execute("INSERT INTO order_lines (order_id, product_id, quantity, unit_price_cents)"
                        " VALUES (%s, %s, %s, %s)", (order_id, product, qty, price))
            cur.execute("INSERT INTO stock_movements (movement_ref, warehouse_id, product_id, delta, reason, order_id)"
                        " VALUES (%s, %s, %s, %s, 'order', %s)", (str(uuid.uuid4()), warehouse, product, -qty, order_id))
            cur.execute("UPDATE stock_levels SET quantity = quantity - %s, updated_at = now()"
                        " WHERE warehouse_id = %s AND product_id = %s", (qty, warehouse, product))
        cur.execute("UPDATE orders SET total_cents = %s WHERE id = %s", (total, order_id))
        return "orders", ref

    def restock(self) -> tuple[str, str]:
        """A background job: receive stock into a warehouse."""
        ref = str(uuid.uuid4())
        product = self.rng.randint(1, self.products)
        warehouse = self.rng.randint(1, self.warehouses)
        qty = self.rng.randint(10, 100)
        cur = self.conn.cursor()
        cur.execute("INSERT INTO stock_movements (movement_ref, warehouse_id, product_id, delta, reason)"
                    " VALUES (%s, %s, %s, %s, 'restock')", (ref, warehouse, product, qty))
        cur.execute("UPDATE stock_levels SET quantity = quantity + %s, updated_at = now()"
                    " WHERE warehouse_id = %s AND product_id = %s", (qty, warehouse, product))
        if self.rng.random() < 0.05:
            cur.execute("INSERT INTO audit_events (actor, payload) VALUES (%s, %s)",
                        (self.name, psycopg.types.json.Jsonb({"job": "restock", "ref": ref})))
        return "stock_movements", ref

    @property
    def table(self) -> str:
        return "orders" if self.kind == "web" else "stock_movements"

    def one_write(self) -> bool:
        try:
            began = time.time()   # before the first statement: the transaction's start, as the client sees it
            table, key = self.place_order() if self.kind == "web" else self.restock()
            self.ledger.intent(time.time(), table, key, self.endpoint, began=began)
            self.conn.commit()
        except psycopg.Error as exc:
            self.errors += 1
            msg = error_message(exc)
            self.ledger.error(time.time(), self.table, self.endpoint, msg)
            log.warning("%s write failed on %s: %s", self.name, self.endpoint, msg)
            try:
                self.conn.rollback()
            except psycopg.Error:
                self.disconnect()
            if self.conn is not None and self.conn.closed:
                self.disconnect()
            return False
        self.ledger.ack(time.time(), table, key, self.endpoint)
        return True

    # -- lifecycle --------------------------------------------------------
    def stopping(self, state: AppState) -> bool:
        """SIGTERM received, or the formation no longer includes this process."""
        return _stop or self.index > state.formation.get(self.kind, 0)

    def boot(self, why: str) -> bool:
        """Boot as a real app does: wait ``boot_seconds``, then run with the config vars read when the
        boot began (a change during the boot is a new release: the main loop restarts again).
        The wait ends within ~0.05 s on SIGTERM or a formation shrink: then False."""
        state = self.watcher.get()
        config = dict(state.config_vars)
        try:
            seconds = max(0.0, float(state.boot_seconds or 0.0))
        except (TypeError, ValueError):
            seconds = 0.0
        if seconds > 0:
            log.info("%s booting (%s): %.2fs", self.name, why, seconds)
        deadline = time.monotonic() + seconds
        while not self.stopping(state):
            left = deadline - time.monotonic()
            if left <= 0:
                self.config = config
                return True
            time.sleep(min(left, 0.05))
            state = self.watcher.get()
        return False

    def changed_vars(self, state: AppState) -> list[str]:
        """Names (never values) of the config vars that differ from those this process booted with."""
        booted = self.config or {}
        now = state.config_vars
        return sorted(k for k in set(booted) | set(now) if booted.get(k) != now.get(k))

    # -- main loop --------------------------------------------------------
    def run(self) -> int:
        if self.boot("start"):
            self.serve()
        self.disconnect()
        self.ledger.close()
        log.info("%s stopped", self.name)
        return 0

    def serve(self) -> None:
        next_at = time.monotonic()
        while not _stop:
            state = self.watcher.get()
            if self.index > state.formation.get(self.kind, 0):
                break
            changed = self.changed_vars(state)
            if changed:
                # Heroku restarts the dyno: the connection closes now (no transaction is in flight
                # between two iterations), the new process boots, then connects with the new config
                log.info("%s restarting: config vars changed (%s)", self.name, ", ".join(changed))
                self.disconnect()
                if not self.boot("restart"):
                    break
                next_at = time.monotonic()
                continue
            url = self.config.get("DATABASE_URL")
            if not url:
                time.sleep(0.1)
                continue
            if self.kind == "web" and state.maintenance:
                # the router answers 503; the dyno keeps whatever pooled connection it had
                time.sleep(0.01)
                next_at = time.monotonic()
                continue
            share = state.worker_share if self.kind == "worker" else 1.0 - state.worker_share
            count = max(1, state.formation.get(self.kind, 1))
            rate = state.rate * share / count
            if time.time() < state.burst_until:
                rate *= state.burst_factor
            if rate <= 0:
                time.sleep(0.05)
                continue
            now = time.monotonic()
            if now < next_at:
                time.sleep(min(next_at - now, 0.05))
                continue
            # a write is due: it needs a connection (the pooled one, or a new one)
            if not self.ensure_connection(url):
                # the write fails as its client sees it; no catching up on the requests that failed
                self.ledger.error(time.time(), self.table, self.endpoint_of(url), self.last_error)
                next_at = max(next_at + 1.0 / rate, time.monotonic())
                time.sleep(0.05)
                continue
            ok = self.one_write()
            next_at = max(next_at + 1.0 / rate, time.monotonic() - 0.5)
            if not ok:
                time.sleep(0.02)

    @staticmethod
    def endpoint_of(url: str) -> str:
        host, port, _ = url_endpoint(url)
        return f"{host}:{port}"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    state_dir, kind, index = argv[0], argv[1], int(argv[2])
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s {kind}.{index} %(levelname)s %(message)s")
    from ..redact import RedactingFilter

    for h in logging.getLogger().handlers:
        h.addFilter(RedactingFilter())
    signal.signal(signal.SIGTERM, _on_term)
    signal.signal(signal.SIGINT, _on_term)
    return Dyno(Path(state_dir), kind, index).run()


if __name__ == "__main__":
    sys.exit(main())
