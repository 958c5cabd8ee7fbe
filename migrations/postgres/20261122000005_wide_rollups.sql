-- Wide daily rollups: one row per (user, campaign, day) with a column per metric, replacing
-- the row per (user, campaign, day, event type) of `daily_rollups`. The primary key is the
-- only index: it serves one campaign's totals, a user's series (its campaigns' rows lie
-- together) and the backfill's lookups. See docs/storage.md.
CREATE TABLE IF NOT EXISTS campaign_day_totals (
    user_id          TEXT NOT NULL,
    campaign_id      TEXT NOT NULL,
    day              DATE NOT NULL,
    sent             BIGINT NOT NULL DEFAULT 0,
    opened           BIGINT NOT NULL DEFAULT 0,
    clicked          BIGINT NOT NULL DEFAULT 0,
    replied          BIGINT NOT NULL DEFAULT 0,
    positive_replies BIGINT NOT NULL DEFAULT 0,
    bounced          BIGINT NOT NULL DEFAULT 0,
    PRIMARY KEY (user_id, campaign_id, day)
);

-- The operator's all-users view: each day's totals over every user, split into stripes so
-- that concurrent writers rarely wait on one another's row. Reads sum a day's stripes, so
-- which stripe a write lands in never changes an answer.
CREATE TABLE IF NOT EXISTS all_day_totals (
    day              DATE NOT NULL,
    stripe           SMALLINT NOT NULL,
    sent             BIGINT NOT NULL DEFAULT 0,
    opened           BIGINT NOT NULL DEFAULT 0,
    clicked          BIGINT NOT NULL DEFAULT 0,
    replied          BIGINT NOT NULL DEFAULT 0,
    positive_replies BIGINT NOT NULL DEFAULT 0,
    bounced          BIGINT NOT NULL DEFAULT 0,
    PRIMARY KEY (day, stripe)
);

-- Upgrade in place: what the narrow rollups held, pivoted.
INSERT INTO campaign_day_totals (user_id, campaign_id, day, sent, opened, clicked, replied,
                                 positive_replies, bounced)
SELECT user_id, campaign_id, day,
       SUM(CASE WHEN event_type = 1 THEN total ELSE 0 END),
       SUM(CASE WHEN event_type = 2 THEN total ELSE 0 END),
       SUM(CASE WHEN event_type = 3 THEN total ELSE 0 END),
       SUM(CASE WHEN event_type = 4 THEN total ELSE 0 END),
       SUM(CASE WHEN event_type = 5 THEN total ELSE 0 END),
       SUM(CASE WHEN event_type = 6 THEN total ELSE 0 END)
FROM daily_rollups
GROUP BY user_id, campaign_id, day
ON CONFLICT DO NOTHING;

INSERT INTO all_day_totals (day, stripe, sent, opened, clicked, replied, positive_replies,
                            bounced)
SELECT day, 0, SUM(sent), SUM(opened), SUM(clicked), SUM(replied), SUM(positive_replies),
       SUM(bounced)
FROM campaign_day_totals
GROUP BY day
ON CONFLICT DO NOTHING;

DROP TABLE daily_rollups;
