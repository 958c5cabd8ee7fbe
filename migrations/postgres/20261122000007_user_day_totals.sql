-- A user's daily totals over all their campaigns: the series of one user (a year by day)
-- reads a row per day instead of a row per campaign and day. Grown in the same transaction
-- as the campaign rollups it sums. See docs/storage.md.
CREATE TABLE IF NOT EXISTS user_day_totals (
    user_id          TEXT NOT NULL,
    day              DATE NOT NULL,
    sent             BIGINT NOT NULL DEFAULT 0,
    opened           BIGINT NOT NULL DEFAULT 0,
    clicked          BIGINT NOT NULL DEFAULT 0,
    replied          BIGINT NOT NULL DEFAULT 0,
    positive_replies BIGINT NOT NULL DEFAULT 0,
    bounced          BIGINT NOT NULL DEFAULT 0,
    PRIMARY KEY (user_id, day)
);

-- Upgrade in place: what the campaign rollups hold, summed per user and day.
INSERT INTO user_day_totals (user_id, day, sent, opened, clicked, replied, positive_replies,
                             bounced)
SELECT user_id, day, SUM(sent), SUM(opened), SUM(clicked), SUM(replied), SUM(positive_replies),
       SUM(bounced)
FROM campaign_day_totals
GROUP BY user_id, day
ON CONFLICT DO NOTHING;
