//! The backend-independent half of a write: which campaigns a batch claims, which events are
//! duplicates, and how the rollups change. Backends only run the SQL.
//!
//! Everything a backend locks is handed to it in one sorted order, so that concurrent
//! transactions take their row locks in the same order and cannot deadlock each other.

use std::collections::{BTreeMap, HashMap, HashSet};

use chrono::NaiveDate;

use super::error::{LEGACY_COLUMN_MAX, LegacyOverflow};
use super::{Refusal, StorageError};
use crate::domain::{
    CampaignId, EVENT_TYPES, Event, EventTotals, EventType, LEGACY_COLUMN_COUNT, LEGACY_COLUMNS,
    LegacyCounts, Scope, StorageSource, UserId,
};
use crate::migration::WriteTargets;
use crate::migration::ambiguous::{AmbiguityKind, Resolution, ResolveFilter};
use crate::migration::backfill::{LegacyRow, ReadRow, RollupCopy, RowContext};
use std::sync::LazyLock;

/// Each campaign of the batch with the user that claims it (the first event's), sorted.
pub(super) fn campaign_claims(events: &[Event]) -> Vec<(&CampaignId, &UserId)> {
    let mut claims: BTreeMap<&CampaignId, &UserId> = BTreeMap::new();
    for event in events {
        claims.entry(&event.campaign_id).or_insert(&event.user_id);
    }
    claims.into_iter().collect()
}

/// Campaign owners this process has seen committed. A campaign's owner never changes once
/// set, so a remembered owner is never stale; and only owners read in a transaction that
/// then committed are remembered (a claim rolled back is not). A write whose campaigns are
/// all known skips the claim and the owners' read: two statements of seven.
#[derive(Debug, Default)]
pub(super) struct OwnerCache {
    owners: std::sync::RwLock<HashMap<String, String>>,
}

/// Owners remembered before the cache starts over (about 20 MB of ids at most).
const OWNER_CACHE_CAPACITY: usize = 200_000;

impl OwnerCache {
    /// The owners known among `claims`' campaigns, and the claims whose owner is not known.
    pub fn split<'a>(
        &self,
        claims: Vec<(&'a CampaignId, &'a UserId)>,
    ) -> (HashMap<String, String>, Vec<(&'a CampaignId, &'a UserId)>) {
        let owners = self.owners.read().unwrap_or_else(|e| e.into_inner());
        let mut known = HashMap::new();
        let mut unknown = Vec::new();
        for (campaign, user) in claims {
            match owners.get(campaign.as_str()) {
                Some(owner) => {
                    known.insert(campaign.as_str().to_owned(), owner.clone());
                }
                None => unknown.push((campaign, user)),
            }
        }
        (known, unknown)
    }

    /// Remembers `owners`, read in a transaction that has committed.
    pub fn remember(&self, owners: HashMap<String, String>) {
        if owners.is_empty() {
            return;
        }
        let mut known = self.owners.write().unwrap_or_else(|e| e.into_inner());
        if known.len() + owners.len() > OWNER_CACHE_CAPACITY {
            known.clear();
        }
        known.extend(owners);
    }
}

/// What a batch asks of the database before it can be planned: the campaigns to claim (those
/// whose owner this process does not know yet) and the idempotency keys to insert. The first
/// statement of a write sends both, and reads the phase under a shared lock.
#[derive(Debug)]
pub(super) struct BatchClaims<'a> {
    /// Owners of the batch's campaigns known without asking.
    pub known_owners: HashMap<String, String>,
    /// Each campaign whose owner is not known, with the user that claims it, sorted.
    pub claims: Vec<(&'a CampaignId, &'a UserId)>,
    /// The distinct `(user, idempotency key)` pairs, sorted.
    pub keys: Vec<(&'a UserId, &'a str)>,
}

impl<'a> BatchClaims<'a> {
    /// What `events` ask of the database, given the owners `cache` knows.
    pub fn of(events: &'a [Event], cache: &OwnerCache) -> Self {
        let (known_owners, claims) = cache.split(campaign_claims(events));
        Self {
            known_owners,
            claims,
            keys: idempotency_keys(events),
        }
    }
}

/// What the database answered to a batch's [`BatchClaims`].
#[derive(Debug)]
pub(super) struct ClaimsAnswer {
    /// Where the phase (share-locked until commit) sends writes.
    pub targets: WriteTargets,
    /// The owners of the claimed campaigns, as stored.
    pub owners: HashMap<String, String>,
    /// The `(user, key)` pairs the database had not seen before.
    pub fresh: HashSet<(String, String)>,
}

/// Everything one batch writes, decided from its events and the database's answer: the plan
/// a backend applies in as few statements as it can.
#[derive(Debug)]
pub(super) struct BatchPlan<'a> {
    /// Per event, whether its idempotency key was seen before (nothing of it is written).
    pub duplicates: Vec<bool>,
    /// The events written (all but the duplicates), in order.
    pub accepted: Vec<&'a Event>,
    /// The raw events the new storage receives.
    pub new_events: Vec<&'a Event>,
    /// How each campaign rollup row grows, sorted.
    pub campaign_days: BTreeMap<CampaignDayKey<'a>, DayTotals>,
    /// How each day of the all-users rollup grows, sorted.
    pub all_days: BTreeMap<NaiveDate, DayTotals>,
    /// The stripe of the all-users rollup this batch adds to.
    pub stripe: i16,
    /// How each legacy row grows (empty when the phase does not write legacy), sorted.
    pub legacy: BTreeMap<LegacyKey<'a>, (&'a str, LegacyCounts)>,
    /// The owners the database answered, to remember once the batch commits.
    pub read_owners: HashMap<String, String>,
}

/// Plans the batch: refuses it if an event names another user's campaign, drops duplicates,
/// and sums what each rollup and legacy row gains.
pub(super) fn plan_batch<'a>(
    events: &'a [Event],
    known_owners: HashMap<String, String>,
    answer: ClaimsAnswer,
) -> Result<BatchPlan<'a>, StorageError> {
    let mut owners = known_owners;
    owners.extend(answer.owners.iter().map(|(c, u)| (c.clone(), u.clone())));
    check_owners(events, &owners)?;
    let (accepted, duplicates) = accepted_events(events, answer.fresh);
    let new_events = events_for_new_storage(&accepted, answer.targets);
    let campaign_days = campaign_day_deltas(&new_events);
    let all_days = all_day_deltas(&campaign_days);
    let legacy = if answer.targets.legacy {
        legacy_deltas(&accepted)
    } else {
        BTreeMap::new()
    };
    Ok(BatchPlan {
        duplicates,
        accepted,
        new_events,
        campaign_days,
        all_days,
        stripe: next_stripe(),
        legacy,
        read_owners: answer.owners,
    })
}

/// The refusal of a plan whose `refused` legacy rows would pass their column; `current`
/// holds those rows as stored.
pub(super) fn legacy_refusal(
    events: &[Event],
    plan: &BatchPlan<'_>,
    current: &[LegacyCountsRow],
) -> StorageError {
    Refusal::LegacyOverflow(legacy_overflows(
        events,
        &plan.accepted,
        &plan.legacy,
        current,
    ))
    .into()
}

/// Refuses the batch if any event names a campaign owned by another user; `owners` maps each
/// campaign of the batch to its owner as stored.
pub(super) fn check_owners(
    events: &[Event],
    owners: &HashMap<String, String>,
) -> Result<(), StorageError> {
    let foreign: Vec<(usize, CampaignId)> = events
        .iter()
        .enumerate()
        .filter(|(_, e)| {
            owners
                .get(e.campaign_id.as_str())
                .is_some_and(|owner| owner != e.user_id.as_str())
        })
        .map(|(index, e)| (index, e.campaign_id.clone()))
        .collect();
    if foreign.is_empty() {
        Ok(())
    } else {
        Err(Refusal::NotOwner(foreign).into())
    }
}

/// The distinct `(user, idempotency key)` pairs of the batch, sorted.
pub(super) fn idempotency_keys(events: &[Event]) -> Vec<(&UserId, &str)> {
    let mut keys: Vec<(&UserId, &str)> = events
        .iter()
        .filter_map(|e| Some((&e.user_id, e.idempotency_key.as_deref()?)))
        .collect();
    keys.sort_unstable();
    keys.dedup();
    keys
}

/// The events to store: those without a key, and the first event of each key that the
/// database had not seen before (`fresh`). The rest are duplicates.
pub(super) fn accepted_events(
    events: &[Event],
    mut fresh: HashSet<(String, String)>,
) -> (Vec<&Event>, Vec<bool>) {
    let mut accepted = Vec::with_capacity(events.len());
    let mut duplicates = Vec::with_capacity(events.len());
    for event in events {
        let is_new = match &event.idempotency_key {
            None => true,
            Some(key) => fresh.remove(&(event.user_id.as_str().to_owned(), key.clone())),
        };
        if is_new {
            accepted.push(event);
        }
        duplicates.push(!is_new);
    }
    (accepted, duplicates)
}

/// The accepted events the new storage receives: all of them while the phase writes it,
/// else only those the legacy table has no column for (`clicked`), which live nowhere else.
pub(super) fn events_for_new_storage<'a>(
    accepted: &[&'a Event],
    targets: WriteTargets,
) -> Vec<&'a Event> {
    accepted
        .iter()
        .copied()
        .filter(|e| targets.new || !e.event_type.in_legacy())
        .collect()
}

/// The totals of one rollup row, one per event type in [`EVENT_TYPES`] order (the order of
/// [`rollup_columns`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(super) struct DayTotals(pub [i64; EVENT_TYPES.len()]);

/// SQL text derived once from the event-type table.
macro_rules! derived_sql {
    ($build:expr) => {{
        static SQL: LazyLock<String> = LazyLock::new($build);
        SQL.as_str()
    }};
}

/// How a rollup row grows on conflict (the target table aliased `t`).
pub(super) fn rollup_grows() -> &'static str {
    derived_sql!(|| {
        let sets: Vec<String> = EVENT_TYPES
            .iter()
            .map(|t| format!("{0} = t.{0} + excluded.{0}", t.column))
            .collect();
        format!(" DO UPDATE SET {}", sets.join(", "))
    })
}

/// Where campaign-rollup deltas come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Origin {
    /// Recorded events.
    Events,
    /// Legacy history a backfill or a COPY resolution copied: also added to the rows'
    /// backfilled part, which rollup repair keeps.
    Copied,
}

/// The campaign rollups' provenance columns, in [`EVENT_TYPES`] order: what backfills (and
/// COPY resolutions) added to the row from the legacy table, which no raw event accounts for
/// and rollup repair keeps. NULL in a row they never touched.
pub(super) fn backfilled_columns() -> &'static str {
    derived_sql!(|| {
        let columns: Vec<String> = EVENT_TYPES
            .iter()
            .map(|t| format!("backfilled_{}", t.column))
            .collect();
        columns.join(", ")
    })
}

/// The campaign rollups' backfilled part as six BIGINTs, in [`EVENT_TYPES`] order (0 where
/// nothing was copied).
pub(super) fn backfilled_part() -> &'static str {
    derived_sql!(|| {
        let parts: Vec<String> = EVENT_TYPES
            .iter()
            .map(|t| format!("CAST(COALESCE(backfilled_{}, 0) AS BIGINT)", t.column))
            .collect();
        parts.join(", ")
    })
}

/// How a campaign rollup row grows on conflict by copied legacy history: its totals, and its
/// backfilled part by as much (the target table aliased `t`).
pub(super) fn copy_grows() -> &'static str {
    derived_sql!(|| {
        let sets: Vec<String> = EVENT_TYPES
            .iter()
            .map(|t| {
                format!(
                    "backfilled_{0} = COALESCE(t.backfilled_{0}, 0) + excluded.backfilled_{0}",
                    t.column
                )
            })
            .collect();
        format!("{}, {}", rollup_grows(), sets.join(", "))
    })
}

/// The legacy table's count columns, in [`LEGACY_COLUMNS`] order, comma-separated.
pub(super) fn legacy_column_list() -> &'static str {
    derived_sql!(|| LEGACY_COLUMNS.map(EventType::legacy_column).join(", "))
}

impl DayTotals {
    /// Adds `count` events of `event_type`.
    pub fn add(&mut self, event_type: EventType, count: i64) {
        self.0[event_type.index()] += count;
    }

    /// Adds every total of `other`.
    pub fn add_all(&mut self, other: DayTotals) {
        for (mine, theirs) in self.0.iter_mut().zip(other.0) {
            *mine += theirs;
        }
    }

    /// One column of every row, as an array parameter.
    pub fn column<'a, K: 'a>(
        rows: impl IntoIterator<Item = (K, &'a DayTotals)>,
        index: usize,
    ) -> Vec<i64> {
        rows.into_iter()
            .map(|(_, totals)| totals.0[index])
            .collect()
    }
}

/// Key of one campaign rollup row: user, campaign, UTC day.
pub(super) type CampaignDayKey<'a> = (&'a str, &'a str, NaiveDate);

/// How each campaign rollup row grows, summed over the accepted events, sorted by key (the
/// order rows are locked in).
pub(super) fn campaign_day_deltas<'a>(
    accepted: &[&'a Event],
) -> BTreeMap<CampaignDayKey<'a>, DayTotals> {
    let mut deltas: BTreeMap<CampaignDayKey<'a>, DayTotals> = BTreeMap::new();
    for event in accepted {
        deltas
            .entry((
                event.user_id.as_str(),
                event.campaign_id.as_str(),
                event.day(),
            ))
            .or_default()
            .add(event.event_type, i64::from(event.count));
    }
    deltas
}

/// How the campaign rollups grow with a backfill's `copies`, sorted by key.
pub(super) fn copy_deltas(copies: &[RollupCopy]) -> BTreeMap<CampaignDayKey<'_>, DayTotals> {
    let mut deltas: BTreeMap<CampaignDayKey<'_>, DayTotals> = BTreeMap::new();
    for copy in copies {
        let totals = deltas
            .entry((copy.user_id.as_str(), copy.campaign_id.as_str(), copy.day))
            .or_default();
        for (event_type, count) in LEGACY_COLUMNS.into_iter().zip(copy.missing) {
            totals.add(event_type, count);
        }
    }
    deltas
}

/// Each campaign of a backfill's `copies` with its legacy user, sorted.
pub(super) fn copy_claims(copies: &[RollupCopy]) -> Vec<(&str, &str)> {
    let claims: BTreeMap<&str, &str> = copies
        .iter()
        .map(|c| (c.campaign_id.as_str(), c.user_id.as_str()))
        .collect();
    claims.into_iter().collect()
}

/// How each day's all-users row grows with `deltas`, sorted by day.
pub(super) fn all_day_deltas(
    deltas: &BTreeMap<CampaignDayKey<'_>, DayTotals>,
) -> BTreeMap<NaiveDate, DayTotals> {
    let mut days: BTreeMap<NaiveDate, DayTotals> = BTreeMap::new();
    for ((_, _, day), totals) in deltas {
        days.entry(*day).or_default().add_all(*totals);
    }
    days
}

/// How many rows each day of the all-users rollup is split into.
pub(super) const ALL_DAY_STRIPES: u32 = 16;

/// The stripe of the all-users rollup the backfill adds to: its batches take turns anyway, and
/// one stripe keeps a day's backfilled history in one row (fewer rows for every read).
pub(super) const BACKFILL_STRIPE: i16 = 0;

/// The stripe of the all-users rollup the next write adds to. Writes of one replica take
/// turns, so that up to [`ALL_DAY_STRIPES`] concurrent transactions never wait on one
/// another's row; reads sum the stripes, so the choice never changes an answer.
pub(super) fn next_stripe() -> i16 {
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let turn = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    // Always below 16, so it fits.
    (turn % ALL_DAY_STRIPES) as i16
}

/// Adds `count` events of `event_type` to a legacy row's `counts`; types without a legacy
/// column are ignored.
fn add_to_legacy_counts(counts: &mut LegacyCounts, event_type: EventType, count: i64) {
    if let Some(column) = event_type.legacy_index() {
        counts[column] += count;
    }
}

/// How much each legacy row `(campaign, day)` grows, with the owner to create it under,
/// sorted by key. Only events the legacy table has a column for count; rows that would stay
/// all zeros are left out.
pub(super) fn legacy_deltas<'a>(
    accepted: &[&'a Event],
) -> BTreeMap<LegacyKey<'a>, (&'a str, LegacyCounts)> {
    let mut deltas: BTreeMap<LegacyKey<'a>, (&str, LegacyCounts)> = BTreeMap::new();
    for event in accepted.iter().filter(|e| e.event_type.in_legacy()) {
        let entry = deltas
            .entry((event.campaign_id.as_str(), event.day()))
            .or_insert((event.user_id.as_str(), LegacyCounts::default()));
        add_to_legacy_counts(&mut entry.1, event.event_type, i64::from(event.count));
    }
    deltas
}

/// Condition of the legacy upsert's `DO UPDATE` (target aliased `l`): every count still fits
/// its `int` column. A row it refuses is not returned by `RETURNING`, so the write can tell
/// and roll back instead of failing on the column (or, on SQLite, storing past it).
pub(super) fn legacy_counts_fit() -> &'static str {
    derived_sql!(|| {
        let fits: Vec<String> = LEGACY_COLUMNS
            .map(EventType::legacy_column)
            .iter()
            .map(|c| {
                format!("CAST(COALESCE(l.{c}, 0) AS BIGINT) + excluded.{c} <= {LEGACY_COLUMN_MAX}")
            })
            .collect();
        format!(
            " WHERE {} RETURNING campaign_id, stat_date",
            fits.join(" AND ")
        )
    })
}

/// A legacy row's key.
pub(super) type LegacyKey<'a> = (&'a str, NaiveDate);

/// The legacy rows whose growth alone passes [`LEGACY_COLUMN_MAX`]: refused before any SQL.
pub(super) fn oversized_legacy_deltas<'a>(
    deltas: &BTreeMap<LegacyKey<'a>, (&'a str, LegacyCounts)>,
) -> Vec<LegacyKey<'a>> {
    deltas
        .iter()
        .filter(|(_, (_, counts))| counts.iter().any(|n| *n > LEGACY_COLUMN_MAX))
        .map(|(key, _)| *key)
        .collect()
}

/// The legacy rows of `deltas` the upsert did not write (`written`: what it returned).
pub(super) fn unwritten_legacy_rows<'a>(
    deltas: &BTreeMap<LegacyKey<'a>, (&'a str, LegacyCounts)>,
    written: &HashSet<(String, NaiveDate)>,
) -> Vec<LegacyKey<'a>> {
    deltas
        .keys()
        .filter(|(campaign, day)| !written.contains(&((*campaign).to_owned(), *day)))
        .copied()
        .collect()
}

/// A legacy row as read back after a refused write: campaign, day and its counts.
pub(super) type LegacyCountsRow = (String, NaiveDate, [Option<i64>; LEGACY_COLUMN_COUNT]);

/// The columns of a legacy row read back after a refused write (see [`legacy_counts_row`]).
pub(super) fn legacy_counts_select() -> &'static str {
    derived_sql!(|| {
        let counts: Vec<String> = LEGACY_COLUMNS
            .map(EventType::legacy_column)
            .iter()
            .map(|c| format!("CAST({c} AS BIGINT)"))
            .collect();
        format!(
            "SELECT campaign_id, stat_date, {} FROM campaign_daily_stat_entries",
            counts.join(", ")
        )
    })
}

// Rows read into tuples name one field per column: these types follow the table by hand.
const _: () = assert!(LEGACY_COLUMN_COUNT == 5 && EVENT_TYPES.len() == 6);

/// A row of [`legacy_counts_select`].
pub(super) type LegacyCountsColumns = (
    String,
    NaiveDate,
    Option<i64>,
    Option<i64>,
    Option<i64>,
    Option<i64>,
    Option<i64>,
);

/// A row of [`LEGACY_COUNTS_SELECT`] as a [`LegacyCountsRow`].
pub(super) fn legacy_counts_row(
    (campaign, day, s, o, r, p, b): LegacyCountsColumns,
) -> LegacyCountsRow {
    (campaign, day, [s, o, r, p, b])
}

/// Names every count the batch would take past [`LEGACY_COLUMN_MAX`], with the positions of
/// the `events` (those `accepted`) adding to it; `current` holds the refused rows as stored.
pub(super) fn legacy_overflows(
    events: &[Event],
    accepted: &[&Event],
    deltas: &BTreeMap<LegacyKey<'_>, (&str, LegacyCounts)>,
    current: &[LegacyCountsRow],
) -> Vec<LegacyOverflow> {
    let stored: HashMap<(&str, NaiveDate), [Option<i64>; LEGACY_COLUMN_COUNT]> = current
        .iter()
        .map(|(campaign, day, counts)| ((campaign.as_str(), *day), *counts))
        .collect();
    let mut overflows = Vec::new();
    for (key, (_, growth)) in deltas {
        let now = stored.get(key).copied().unwrap_or_default();
        for (column, (event_type, delta)) in LEGACY_COLUMNS.into_iter().zip(*growth).enumerate() {
            let current = now[column].unwrap_or(0);
            if current.saturating_add(delta) <= LEGACY_COLUMN_MAX {
                continue;
            }
            let positions = events
                .iter()
                .enumerate()
                .filter(|(_, e)| {
                    accepted.iter().any(|a| std::ptr::eq(*a, *e))
                        && (e.campaign_id.as_str(), e.day()) == *key
                        && e.event_type == event_type
                })
                .map(|(i, _)| i)
                .collect();
            overflows.push(LegacyOverflow {
                events: positions,
                campaign_id: key.0.to_owned(),
                day: key.1,
                event_type,
                current,
            });
        }
    }
    overflows
}

/// The rows a read answered by LEGACY sums over: the legacy table's rows, and the clicks of
/// the new storage, which the legacy table has no column for (clicks are recorded in the new
/// storage in every phase, so an acknowledged click is always visible). Both arms have the
/// same columns, so the callers' conditions on `user_id`, `campaign_id` and `stat_date`
/// reach each arm's indexes.
pub(super) const LEGACY_READ_ROWS: &str = "(SELECT user_id, campaign_id, stat_date, \
    sent, opened, replied, positive_replies, bounced, CAST(0 AS BIGINT) AS clicked \
    FROM campaign_daily_stat_entries \
    UNION ALL SELECT user_id, campaign_id, day, 0, 0, 0, 0, 0, clicked \
    FROM campaign_day_totals WHERE clicked > 0) AS l";

/// What a read of `source` sums, and its day column: the legacy rows (with the new
/// storage's clicks), the all-users rollup for the operator's view of every campaign
/// (`scope` of no user and no campaigns), or the campaign rollups.
pub(super) fn read_rows(
    source: StorageSource,
    scope: Option<&Scope>,
) -> (&'static str, &'static str) {
    let every_campaign = scope.is_some_and(|s| s.user.is_none() && s.campaigns.is_empty());
    match source {
        StorageSource::Legacy => (LEGACY_READ_ROWS, "stat_date"),
        StorageSource::New if every_campaign => ("all_day_totals", "day"),
        StorageSource::New => ("campaign_day_totals", "day"),
    }
}

/// An aggregate row of either storage: a key and the summed `sent, opened, replied,
/// positive_replies, bounced, clicked` (the legacy columns first).
pub(super) type Sums<K> = (K, i64, i64, i64, i64, i64, i64);

/// The key and metrics of an aggregate row; negative (legacy) sums read as 0.
pub(super) fn sums_metrics<K>(
    (key, sent, opened, replied, positive_replies, bounced, clicked): Sums<K>,
) -> (K, EventTotals) {
    let n = |v: i64| u64::try_from(v).unwrap_or(0);
    let metrics = EventTotals {
        sent: n(sent),
        opened: n(opened),
        clicked: n(clicked),
        replied: n(replied),
        positive_replies: n(positive_replies),
        bounced: n(bounced),
    };
    (key, metrics)
}

/// Aggregate `(campaign, sums…)` rows as one entry per campaign.
pub(super) fn campaign_sums(rows: Vec<Sums<String>>) -> HashMap<CampaignId, EventTotals> {
    rows.into_iter()
        .map(sums_metrics)
        .filter_map(|(campaign, metrics)| {
            Some((CampaignId::parse("campaign_id", campaign).ok()?, metrics))
        })
        .collect()
}

/// The select list of a backfill batch: each legacy row with the five counts the new storage
/// holds for its `(user, campaign, day)`, the campaign's owner there, and the resolution of
/// its key if an operator resolved it. With [`BACKFILL_SOURCE`], one statement, so that both
/// sides come from one snapshot. Backends add the checkpoint condition, the order and the
/// limit.
pub(super) const BACKFILL_COLUMNS: &str = "SELECT l.campaign_id, l.user_id, l.stat_date, \
    CAST(l.sent AS BIGINT), CAST(l.opened AS BIGINT), CAST(l.replied AS BIGINT), \
    CAST(l.positive_replies AS BIGINT), CAST(l.bounced AS BIGINT), \
    COALESCE(r.sent, 0), COALESCE(r.opened, 0), COALESCE(r.replied, 0), \
    COALESCE(r.positive_replies, 0), COALESCE(r.bounced, 0), \
    (SELECT c.user_id FROM campaigns c WHERE c.campaign_id = l.campaign_id), x.resolution";
/// Where [`BACKFILL_COLUMNS`] come from.
pub(super) const BACKFILL_SOURCE: &str = " FROM campaign_daily_stat_entries l \
    LEFT JOIN campaign_day_totals r \
    ON r.user_id = l.user_id AND r.campaign_id = l.campaign_id AND r.day = l.stat_date \
    LEFT JOIN resolved_legacy_rows x ON x.campaign_id = l.campaign_id AND x.stat_date = l.stat_date";

/// A row of [`BACKFILL_COLUMNS`].
pub(super) type BackfillRow = (
    String,
    String,
    NaiveDate,
    Option<i64>,
    Option<i64>,
    Option<i64>,
    Option<i64>,
    Option<i64>,
    i64,
    i64,
    i64,
    i64,
    i64,
    Option<String>,
    Option<String>,
);

/// An unresolved ambiguous row: [`BackfillRow`]'s columns and the kind it was reported for.
pub(super) type UnresolvedRow = (
    String,
    String,
    NaiveDate,
    Option<i64>,
    Option<i64>,
    Option<i64>,
    Option<i64>,
    Option<i64>,
    i64,
    i64,
    i64,
    i64,
    i64,
    Option<String>,
    Option<String>,
    Option<String>,
);

/// The unresolved ambiguous rows of the last completed backfill, as [`UnresolvedRow`]s.
pub(super) fn unresolved_rows_query() -> String {
    format!(
        "{BACKFILL_COLUMNS}, i.kind{BACKFILL_SOURCE}{}",
        super::sql::UNRESOLVED_ROWS_JOIN
    )
}

/// The unresolved rows `filter` covers, with their context, as the backfill reads them.
pub(super) fn unresolved_rows(
    rows: Vec<UnresolvedRow>,
    filter: &ResolveFilter,
    several_users: &HashSet<String>,
) -> Vec<ReadRow> {
    let covered = rows
        .into_iter()
        .filter(|row| {
            let kind = row.15.as_deref().and_then(AmbiguityKind::from_name);
            filter.matches(&row.0, row.2, kind)
        })
        .map(
            |(c, u, d, s, o, r, p, b, ns, no, nr, np, nb, owner, resolution, _)| {
                (
                    c, u, d, s, o, r, p, b, ns, no, nr, np, nb, owner, resolution,
                )
            },
        )
        .collect();
    backfill_rows(covered, several_users)
}

/// The rows of a backfill batch with their context; `several_users` holds the batch's
/// campaigns that appear under more than one user in the legacy table.
pub(super) fn backfill_rows(
    rows: Vec<BackfillRow>,
    several_users: &HashSet<String>,
) -> Vec<ReadRow> {
    rows.into_iter()
        .map(
            |(
                campaign_id,
                user_id,
                stat_date,
                s,
                o,
                r,
                p,
                b,
                ns,
                no,
                nr,
                np,
                nb,
                owner,
                resolution,
            )| {
                ReadRow {
                    context: RowContext {
                        in_new: [ns, no, nr, np, nb],
                        several_users: several_users.contains(&campaign_id),
                        owner,
                        resolution: resolution.as_deref().and_then(Resolution::from_name),
                    },
                    row: LegacyRow {
                        campaign_id,
                        user_id,
                        stat_date,
                        counts: [s, o, r, p, b],
                    },
                }
            },
        )
        .collect()
}

/// A checkpoint before every legacy key: where a fresh backfill starts.
pub(super) fn before_all_keys() -> (String, NaiveDate) {
    (
        String::new(),
        NaiveDate::from_ymd_opt(1, 1, 1).expect("a valid date"),
    )
}

/// A row of [`super::sql::RUN_ISSUES`]: campaign, user, day, reason, kind, resolution.
pub(super) type RunIssueRow = (
    String,
    String,
    NaiveDate,
    String,
    Option<String>,
    Option<String>,
);

pub(super) fn run_issue_from_row(
    (campaign_id, user_id, stat_date, reason, kind, resolution): RunIssueRow,
) -> crate::migration::RunIssue {
    crate::migration::RunIssue {
        campaign_id,
        user_id,
        stat_date,
        reason,
        kind: kind.as_deref().and_then(AmbiguityKind::from_name),
        resolution: resolution.as_deref().and_then(Resolution::from_name),
    }
}

#[cfg(test)]
mod tests {
    use chrono::{TimeZone, Utc};

    use super::*;
    use crate::domain::RawEvent;
    use crate::storage::RecordOutcome;

    fn event(user: &str, campaign: &str, key: Option<&str>, count: u32) -> Event {
        let now = Utc.with_ymd_and_hms(2026, 11, 21, 12, 0, 0).unwrap();
        Event::validate(
            RawEvent {
                user_id: user.into(),
                campaign_id: campaign.into(),
                event_type: Some(EventType::Sent),
                count,
                idempotency_key: key.unwrap_or_default().into(),
                ..RawEvent::default()
            },
            now,
        )
        .unwrap()
    }

    #[test]
    fn first_event_claims_and_foreign_events_are_named() {
        let events = [event("u1", "c1", None, 1), event("u2", "c1", None, 1)];
        let claims = campaign_claims(&events);
        assert_eq!(claims.len(), 1);
        assert_eq!(claims[0].1.as_str(), "u1");
        let owners = HashMap::from([("c1".to_owned(), "u1".to_owned())]);
        match check_owners(&events, &owners) {
            Err(StorageError::Refused(Refusal::NotOwner(bad))) => assert_eq!(bad[0].0, 1),
            other => panic!("expected an ownership error, got {other:?}"),
        }
    }

    #[test]
    fn a_key_repeated_in_one_batch_counts_once() {
        let events = [
            event("u1", "c1", Some("k"), 2),
            event("u1", "c1", Some("k"), 2),
            event("u1", "c1", None, 3),
        ];
        let fresh = HashSet::from([("u1".to_owned(), "k".to_owned())]);
        let (accepted, duplicates) = accepted_events(&events, fresh);
        assert_eq!(duplicates, [false, true, false]);
        assert_eq!(
            RecordOutcome::of(&duplicates),
            RecordOutcome {
                stored: 2,
                duplicates: 1
            }
        );
        let deltas = campaign_day_deltas(&accepted);
        assert_eq!(
            deltas.values().copied().collect::<Vec<_>>(),
            [DayTotals([5, 0, 0, 0, 0, 0])]
        );
        let days = all_day_deltas(&deltas);
        assert_eq!(days.values().map(|t| t.0[0]).sum::<i64>(), 5);
    }

    #[test]
    fn stripes_take_turns_within_their_range() {
        let turns: std::collections::BTreeSet<i16> =
            (0..ALL_DAY_STRIPES * 2).map(|_| next_stripe()).collect();
        assert_eq!(turns.len(), ALL_DAY_STRIPES as usize);
        assert!(
            turns
                .iter()
                .all(|s| (0..ALL_DAY_STRIPES as i16).contains(s))
        );
    }
}
