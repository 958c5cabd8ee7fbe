-- What the backfill copied into each rollup row from the legacy table: the part of a rollup
-- that no raw event accounts for. Rollup repair recomputes a row as these plus its raw
-- events. Rows the backfill never touched have no row here.
CREATE TABLE IF NOT EXISTS backfilled_totals (
    user_id          TEXT NOT NULL,
    campaign_id      TEXT NOT NULL,
    day              TEXT NOT NULL,
    sent             INTEGER NOT NULL DEFAULT 0,
    opened           INTEGER NOT NULL DEFAULT 0,
    clicked          INTEGER NOT NULL DEFAULT 0,
    replied          INTEGER NOT NULL DEFAULT 0,
    positive_replies INTEGER NOT NULL DEFAULT 0,
    bounced          INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (user_id, campaign_id, day)
) WITHOUT ROWID;

-- Backfills before this table existed: what rollups hold beyond their raw events is taken as
-- backfilled history (every raw event is still kept at this upgrade).
INSERT INTO backfilled_totals (user_id, campaign_id, day, sent, opened, clicked, replied,
                               positive_replies, bounced)
SELECT r.user_id, r.campaign_id, r.day,
       MAX(r.sent - COALESCE(e.sent, 0), 0),
       MAX(r.opened - COALESCE(e.opened, 0), 0),
       MAX(r.clicked - COALESCE(e.clicked, 0), 0),
       MAX(r.replied - COALESCE(e.replied, 0), 0),
       MAX(r.positive_replies - COALESCE(e.positive_replies, 0), 0),
       MAX(r.bounced - COALESCE(e.bounced, 0), 0)
FROM campaign_day_totals r
LEFT JOIN (
    SELECT user_id, campaign_id, substr(occurred_at, 1, 10) AS day,
           SUM(CASE WHEN event_type = 1 THEN count ELSE 0 END) AS sent,
           SUM(CASE WHEN event_type = 2 THEN count ELSE 0 END) AS opened,
           SUM(CASE WHEN event_type = 3 THEN count ELSE 0 END) AS clicked,
           SUM(CASE WHEN event_type = 4 THEN count ELSE 0 END) AS replied,
           SUM(CASE WHEN event_type = 5 THEN count ELSE 0 END) AS positive_replies,
           SUM(CASE WHEN event_type = 6 THEN count ELSE 0 END) AS bounced
    FROM events GROUP BY 1, 2, 3
) e ON e.user_id = r.user_id AND e.campaign_id = r.campaign_id AND e.day = r.day
WHERE r.sent > COALESCE(e.sent, 0) OR r.opened > COALESCE(e.opened, 0)
   OR r.clicked > COALESCE(e.clicked, 0) OR r.replied > COALESCE(e.replied, 0)
   OR r.positive_replies > COALESCE(e.positive_replies, 0)
   OR r.bounced > COALESCE(e.bounced, 0)
ON CONFLICT DO NOTHING;
