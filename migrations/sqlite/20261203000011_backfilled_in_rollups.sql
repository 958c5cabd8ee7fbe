-- What a backfill copied into a rollup row from the legacy table (the part of the row that no
-- raw event accounts for, which rollup repair keeps) moves from a table of its own into the
-- row itself: `backfilled_totals` repeated every copied key. NULL: nothing backfilled.
ALTER TABLE campaign_day_totals ADD COLUMN backfilled_sent INTEGER;
ALTER TABLE campaign_day_totals ADD COLUMN backfilled_opened INTEGER;
ALTER TABLE campaign_day_totals ADD COLUMN backfilled_clicked INTEGER;
ALTER TABLE campaign_day_totals ADD COLUMN backfilled_replied INTEGER;
ALTER TABLE campaign_day_totals ADD COLUMN backfilled_positive_replies INTEGER;
ALTER TABLE campaign_day_totals ADD COLUMN backfilled_bounced INTEGER;

-- A backfilled key always has its rollup row (the two were written in one transaction).
UPDATE campaign_day_totals
SET backfilled_sent = b.sent, backfilled_opened = b.opened, backfilled_clicked = b.clicked,
    backfilled_replied = b.replied, backfilled_positive_replies = b.positive_replies,
    backfilled_bounced = b.bounced
FROM backfilled_totals b
WHERE campaign_day_totals.user_id = b.user_id AND campaign_day_totals.campaign_id = b.campaign_id
  AND campaign_day_totals.day = b.day;

DROP TABLE backfilled_totals;
