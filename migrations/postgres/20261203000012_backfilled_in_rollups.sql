-- What a backfill copied into a rollup row from the legacy table (the part of the row that no
-- raw event accounts for, which rollup repair keeps) moves from a table of its own into the
-- row itself. `backfilled_totals` repeated every copied key with its own primary key: as many
-- bytes again as the rollups it described. Six INTEGER columns cost a backfilled row 24 bytes,
-- and a row the backfill never touched (all six NULL) its null bitmap. A backfill copies at
-- most a legacy `int` column's value per key, so INTEGER holds any of them; a value that does
-- not fit stops this upgrade rather than being cut.
ALTER TABLE campaign_day_totals
    ADD COLUMN IF NOT EXISTS backfilled_sent             INTEGER,
    ADD COLUMN IF NOT EXISTS backfilled_opened           INTEGER,
    ADD COLUMN IF NOT EXISTS backfilled_clicked          INTEGER,
    ADD COLUMN IF NOT EXISTS backfilled_replied          INTEGER,
    ADD COLUMN IF NOT EXISTS backfilled_positive_replies INTEGER,
    ADD COLUMN IF NOT EXISTS backfilled_bounced          INTEGER;

-- A backfilled key always has its rollup row (the two were written in one transaction).
UPDATE campaign_day_totals r
SET backfilled_sent = b.sent, backfilled_opened = b.opened, backfilled_clicked = b.clicked,
    backfilled_replied = b.replied, backfilled_positive_replies = b.positive_replies,
    backfilled_bounced = b.bounced
FROM backfilled_totals b
WHERE r.user_id = b.user_id AND r.campaign_id = b.campaign_id AND r.day = b.day;

DROP TABLE backfilled_totals;
