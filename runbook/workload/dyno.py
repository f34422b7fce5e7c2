"""One process of the app (``web.N`` or ``worker.N``), like a Heroku dyno.

``python -m runbook.workload.dyno STATE_DIR web 1``

* reads ``DATABASE_URL`` from the config-var store and reconnects when it changes
  (Heroku restarts dynos on a config change; reconnecting is the same for the database);
* exits when the formation no longer includes it, or on SIGTERM, after finishing
  the transaction in flight;
* web: in maintenance mode stops serving writes but keeps its pooled connection
  open (a stale connection, as on Heroku); worker: maintenance does not stop it;
* each write is a real transaction; the ledger gets ``intent`` before COMMIT and
  ``ack`` after it.
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
from .ledger import LedgerWriter
from .state import StateWatcher

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

    # -- connection -------------------------------------------------------
    def ensure_connection(self, url: str) -> bool:
        if url != self.url:
            self.disconnect()
            self.url = url
        if self.conn is not None and not self.conn.closed:
            return True
        try:
            host, port, _ = url_endpoint(url)
            self.conn = psycopg.connect(url, autocommit=False, connect_timeout=2,
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
            log.warning("%s cannot connect: %s", self.name, str(exc).strip().splitlines()[0] if str(exc) else exc)
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

    def one_write(self) -> bool:
        try:
            table, key = self.place_order() if self.kind == "web" else self.restock()
            self.ledger.intent(time.time(), table, key, self.endpoint)
            self.conn.commit()
        except psycopg.Error as exc:
            self.errors += 1
            msg = str(exc).strip().splitlines()[0] if str(exc) else type(exc).__name__
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

    # -- main loop --------------------------------------------------------
    def run(self) -> int:
        next_at = time.monotonic()
        while not _stop:
            state = self.watcher.get()
            if self.index > state.formation.get(self.kind, 0):
                break
            url = state.config_vars.get("DATABASE_URL")
            if not url:
                time.sleep(0.1)
                continue
            if self.kind == "web" and state.maintenance:
                # the router answers 503; the dyno keeps whatever pooled connection it had
                time.sleep(0.01)
                next_at = time.monotonic()
                continue
            if not self.ensure_connection(url):
                time.sleep(0.05)
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
            ok = self.one_write()
            next_at = max(next_at + 1.0 / rate, time.monotonic() - 0.5)
            if not ok:
                time.sleep(0.02)
        self.disconnect()
        self.ledger.close()
        log.info("%s stopped", self.name)
        return 0


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
