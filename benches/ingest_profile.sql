-- Where a batch of 1,000 events spends its time in PostgreSQL: each statement of the write,
-- shaped as the service sends it (the same tables, conflict targets and row counts), under
-- EXPLAIN ANALYZE, in one transaction that is rolled back. Run it against the database the
-- throughput benchmark leaves behind (its tables hold the benchmark's history, bloat and
-- all):
--
--   psql -h 127.0.0.1 -U postgres -d cs_bench -f benches/ingest_profile.sql | grep -E 'on |Execution'
--
-- The rows are the benchmark's own shape (100 users, 10 campaigns each, days spread over
-- 2025), with fresh idempotency keys; inputs come from a temporary table instead of the
-- service's arrays, which PostgreSQL reads alike.
BEGIN;
CREATE TEMPORARY TABLE batch ON COMMIT DROP AS
SELECT 'user-' || (i % 100) AS user_id,
       'campaign-' || ((i % 100) * 10 + (i / 100) % 10) AS campaign_id,
       (1 + i % 4)::int2 AS event_type,
       1 AS count,
       ('2025-01-01'::date + ((i * 7919) % 365)::int)::timestamptz + interval '10 hours' AS occurred_at,
       'profile-key-' || i || '-' || txid_current() AS idempotency_key
FROM generate_series(900000000::int8, 900000999::int8) AS i;

-- 1. The idempotency keys (the first statement also claims campaigns and share-locks the
--    phase; both are cheap once the owners are known).
EXPLAIN (ANALYZE, COSTS OFF)
INSERT INTO idempotency_keys (user_id, idempotency_key)
SELECT user_id, idempotency_key FROM batch ORDER BY 1, 2
ON CONFLICT DO NOTHING RETURNING user_id, idempotency_key;

-- 2. The raw events (the service sends a batch this large by binary COPY).
EXPLAIN (ANALYZE, COSTS OFF)
INSERT INTO events (user_id, campaign_id, event_type, count, occurred_at, idempotency_key)
SELECT user_id, campaign_id, event_type, count, occurred_at, idempotency_key FROM batch;

-- 3. The campaign rollups, one row per (user, campaign, day), summed in memory first.
EXPLAIN (ANALYZE, COSTS OFF)
INSERT INTO campaign_day_totals AS t (user_id, campaign_id, day, sent, opened, clicked,
                                      replied, positive_replies, bounced)
SELECT user_id, campaign_id, occurred_at::date,
       SUM((event_type = 1)::int), SUM((event_type = 2)::int), SUM((event_type = 3)::int),
       SUM((event_type = 4)::int), 0, 0
FROM batch GROUP BY 1, 2, 3 ORDER BY 1, 2, 3
ON CONFLICT (user_id, campaign_id, day) DO UPDATE SET sent = t.sent + excluded.sent,
    opened = t.opened + excluded.opened, clicked = t.clicked + excluded.clicked,
    replied = t.replied + excluded.replied;

-- 4. The all-users rollup, one row per day (in one stripe).
EXPLAIN (ANALYZE, COSTS OFF)
INSERT INTO all_day_totals AS t (day, stripe, sent, opened, clicked, replied,
                                 positive_replies, bounced)
SELECT occurred_at::date, 7, SUM((event_type = 1)::int), SUM((event_type = 2)::int),
       SUM((event_type = 3)::int), SUM((event_type = 4)::int), 0, 0
FROM batch GROUP BY 1 ORDER BY 1
ON CONFLICT (day, stripe) DO UPDATE SET sent = t.sent + excluded.sent,
    opened = t.opened + excluded.opened, clicked = t.clicked + excluded.clicked,
    replied = t.replied + excluded.replied;

-- 5. The legacy rows (DUAL_WRITE through NEW_PRIMARY), one per (campaign, day), clicks
--    excepted.
EXPLAIN (ANALYZE, COSTS OFF)
INSERT INTO campaign_daily_stat_entries AS l (campaign_id, user_id, stat_date, sent, opened,
                                              replied, positive_replies, bounced,
                                              created_at, updated_at)
SELECT campaign_id, MIN(user_id), occurred_at::date, SUM((event_type = 1)::int),
       SUM((event_type = 2)::int), SUM((event_type = 4)::int), 0, 0, now(), now()
FROM batch WHERE event_type <> 3 GROUP BY campaign_id, occurred_at::date ORDER BY 1, 3
ON CONFLICT (campaign_id, stat_date) DO UPDATE SET
    sent = COALESCE(l.sent, 0) + excluded.sent, opened = COALESCE(l.opened, 0) + excluded.opened,
    replied = COALESCE(l.replied, 0) + excluded.replied, updated_at = now()
RETURNING campaign_id, stat_date;
ROLLBACK;
