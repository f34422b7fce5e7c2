-- Seed data; %(scale)s multiplies the row counts (scale 1: ~1k products, ~8k stock levels, ~5k orders).
INSERT INTO warehouses (code, name, region)
SELECT 'WH' || lpad(g::text, 2, '0'), 'Warehouse ' || g, (ARRAY['us-east','us-west','eu-west','ap-south'])[1 + g % 4]
FROM generate_series(1, 8) AS g;

INSERT INTO products (sku, name, price_cents, attributes, thumbnail)
SELECT 'SKU-' || lpad(g::text, 8, '0'),
       'Product ' || g || ' ' || md5(g::text),
       100 + (g * 37) % 100000,
       CASE WHEN g % 200 = 0
            -- a document over 100 KB: DMS's limited LOB mode would truncate it
            THEN jsonb_build_object('kind', 'catalog', 'id', g,
                    'history', (SELECT jsonb_agg(jsonb_build_object('rev', r, 'text', md5((g * r)::text) || repeat('x', 40)))
                                FROM generate_series(1, 1500) AS r))
            ELSE jsonb_build_object('color', (ARRAY['red','green','blue','black'])[1 + g % 4], 'weight_g', g % 5000,
                                    'tags', jsonb_build_array('t' || g % 7, 't' || g % 11))
       END,
       decode(repeat(md5(g::text), 1 + g % 64), 'hex')
FROM generate_series(1, 1000 * %(scale)s) AS g;

INSERT INTO stock_levels (warehouse_id, product_id, quantity)
SELECT w.id, p.id, (w.id * 7 + p.id * 13) % 500
FROM warehouses w CROSS JOIN products p;

INSERT INTO orders (order_ref, channel, customer_email, status, total_cents, invoice_number, notes)
SELECT md5('order' || g)::uuid, 'seed', 'customer' || (g % 997) || '@example.com',
       (ARRAY['paid','shipped','delivered','refunded'])[1 + g % 4], 0, nextval('invoice_number_seq'),
       CASE WHEN g % 10 = 0 THEN NULL ELSE 'note ' || g END
FROM generate_series(1, 5000 * %(scale)s) AS g;

INSERT INTO order_lines (order_id, product_id, quantity, unit_price_cents)
SELECT o.id, 1 + (o.id * k) % (1000 * %(scale)s), 1 + k, 100 + k
FROM orders o CROSS JOIN generate_series(1, 3) AS k;

UPDATE orders o SET total_cents = s.total
FROM (SELECT order_id, sum(quantity * unit_price_cents) AS total FROM order_lines GROUP BY order_id) s
WHERE s.order_id = o.id;

INSERT INTO stock_movements (movement_ref, warehouse_id, product_id, delta, reason)
SELECT md5('movement' || g)::uuid, 1 + g % 8, 1 + g % (1000 * %(scale)s), (g % 21) - 10, 'seed'
FROM generate_series(1, 10000 * %(scale)s) AS g;

INSERT INTO audit_events (actor, payload)
SELECT 'seed', jsonb_build_object('event', 'import', 'n', g) FROM generate_series(1, 200) AS g;

ANALYZE;
