use chrono::{DateTime, Duration, NaiveDate, TimeZone, Utc};

use super::{CampaignId, FieldViolation, UserId, ValidationError, validate_id};

/// Largest count a legacy column holds: the legacy table's columns are `int` (32 bits).
pub const LEGACY_COLUMN_MAX: i64 = i32::MAX as i64;

/// Largest `count` one event may carry.
pub const MAX_EVENT_COUNT: u32 = 1_000_000;

/// The kinds of campaign events. What each is called where (its stored code, its rollup
/// column, its legacy column) is in [`EVENT_TYPES`], in this order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum EventType {
    Sent,
    Opened,
    Clicked,
    Replied,
    PositiveReply,
    Bounced,
}

/// Every name one event type goes by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EventTypeNames {
    pub event_type: EventType,
    /// The code stored in the events table, and the value of the API's `EventType`: never
    /// renumber.
    pub code: i16,
    /// Its name in the API's `EventType` (after `EVENT_TYPE_`).
    pub api_name: &'static str,
    /// The column of its totals in the rollup tables (`campaign_day_totals`,
    /// `all_day_totals`), and the field of `EventTotals` in the API.
    pub column: &'static str,
    /// Its column in the legacy table, if it has one.
    pub legacy_column: Option<&'static str>,
}

/// The one table of event types, in [`EventType`] order: adding a type starts here, and the
/// rest (codes, column lists, the legacy columns and their count) is derived from it.
#[rustfmt::skip]
pub const EVENT_TYPES: [EventTypeNames; 6] = [
    //    the type                 code  API name          rollup column       legacy column
    names(EventType::Sent,          1, "SENT",           "sent",             Some("sent")),
    names(EventType::Opened,        2, "OPENED",         "opened",           Some("opened")),
    names(EventType::Clicked,       3, "CLICKED",        "clicked",          None),
    names(EventType::Replied,       4, "REPLIED",        "replied",          Some("replied")),
    names(EventType::PositiveReply, 5, "POSITIVE_REPLY", "positive_replies", Some("positive_replies")),
    names(EventType::Bounced,       6, "BOUNCED",        "bounced",          Some("bounced")),
];

const fn names(
    event_type: EventType,
    code: i16,
    api_name: &'static str,
    column: &'static str,
    legacy_column: Option<&'static str>,
) -> EventTypeNames {
    EventTypeNames {
        event_type,
        code,
        api_name,
        column,
        legacy_column,
    }
}

/// How many event types have a legacy column.
pub const LEGACY_COLUMN_COUNT: usize = {
    let mut count = 0;
    let mut i = 0;
    while i < EVENT_TYPES.len() {
        if EVENT_TYPES[i].legacy_column.is_some() {
            count += 1;
        }
        i += 1;
    }
    count
};

/// The event types of the legacy table's columns, in column order.
pub const LEGACY_COLUMNS: [EventType; LEGACY_COLUMN_COUNT] = {
    let mut columns = [EventType::Sent; LEGACY_COLUMN_COUNT];
    let (mut i, mut j) = (0, 0);
    while i < EVENT_TYPES.len() {
        if EVENT_TYPES[i].legacy_column.is_some() {
            columns[j] = EVENT_TYPES[i].event_type;
            j += 1;
        }
        i += 1;
    }
    columns
};

/// One count per legacy column, in [`LEGACY_COLUMNS`] order.
pub type LegacyCounts = [i64; LEGACY_COLUMN_COUNT];

impl EventType {
    pub const ALL: [EventType; EVENT_TYPES.len()] = {
        let mut all = [EventType::Sent; EVENT_TYPES.len()];
        let mut i = 0;
        while i < EVENT_TYPES.len() {
            all[i] = EVENT_TYPES[i].event_type;
            i += 1;
        }
        all
    };

    /// Its names.
    pub fn names(self) -> &'static EventTypeNames {
        &EVENT_TYPES[self.index()]
    }

    /// Its position in [`EVENT_TYPES`] (and in a rollup row's totals).
    pub fn index(self) -> usize {
        self as usize
    }

    /// The stable code stored in the database.
    pub fn code(self) -> i16 {
        self.names().code
    }

    /// Whether the legacy table has a column for this type (all but `clicked`).
    pub fn in_legacy(self) -> bool {
        self.names().legacy_column.is_some()
    }

    /// Its position among the legacy columns, if it has one.
    pub fn legacy_index(self) -> Option<usize> {
        LEGACY_COLUMNS.iter().position(|t| *t == self)
    }

    /// The legacy table's column for this type (`clicked` has none and says so).
    pub fn legacy_column(self) -> &'static str {
        self.names()
            .legacy_column
            .unwrap_or("clicked (no legacy column)")
    }

    /// The type stored under `code`, if any.
    pub fn from_code(code: i16) -> Option<Self> {
        Self::ALL.into_iter().find(|t| t.code() == code)
    }
}

/// The rollup columns of every event type, in [`EVENT_TYPES`] order, comma-separated.
pub fn rollup_columns() -> &'static str {
    static COLUMNS: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
        let columns: Vec<&str> = EVENT_TYPES.iter().map(|t| t.column).collect();
        columns.join(", ")
    });
    &COLUMNS
}

/// The window of accepted `occurred_at` values: from 2000-01-01 to one day after `now`.
pub fn event_time_window(now: DateTime<Utc>) -> (DateTime<Utc>, DateTime<Utc>) {
    let earliest = Utc.with_ymd_and_hms(2000, 1, 1, 0, 0, 0).single();
    (
        earliest.expect("2000-01-01 is a valid UTC time"),
        now + Duration::days(1),
    )
}

/// An event as a client sent it, before validation.
#[derive(Debug, Clone, Default)]
pub struct RawEvent {
    pub user_id: String,
    pub campaign_id: String,
    /// `None` when the client left the type unspecified or sent an unknown value.
    pub event_type: Option<EventType>,
    /// 0 means 1.
    pub count: u32,
    /// `None` means now.
    pub occurred_at: Option<DateTime<Utc>>,
    /// Empty means none.
    pub email_account_id: String,
    /// Empty means none.
    pub idempotency_key: String,
}

/// A validated event, ready to be stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    pub user_id: UserId,
    pub campaign_id: CampaignId,
    pub event_type: EventType,
    /// At least 1, at most [`MAX_EVENT_COUNT`].
    pub count: u32,
    pub occurred_at: DateTime<Utc>,
    pub email_account_id: Option<String>,
    pub idempotency_key: Option<String>,
}

impl Event {
    /// Validates `raw` against every rule, naming each broken one; `now` fills a missing
    /// `occurred_at` and bounds it.
    pub fn validate(raw: RawEvent, now: DateTime<Utc>) -> Result<Self, ValidationError> {
        let user_id = UserId::parse("user_id", raw.user_id);
        let campaign_id = CampaignId::parse("campaign_id", raw.campaign_id);
        let event_type = raw
            .event_type
            .ok_or_else(|| FieldViolation::new("event_type", "must be specified"));
        let count = match raw.count {
            0 => Ok(1),
            n if n > MAX_EVENT_COUNT => Err(FieldViolation::new(
                "count",
                format!("must be at most {MAX_EVENT_COUNT}, got {n}"),
            )),
            n => Ok(n),
        };
        let occurred_at = check_occurred_at(raw.occurred_at, now);
        let email_account_id = optional_id("email_account_id", raw.email_account_id);
        let idempotency_key = optional_id("idempotency_key", raw.idempotency_key);
        match (
            user_id,
            campaign_id,
            event_type,
            count,
            occurred_at,
            email_account_id,
            idempotency_key,
        ) {
            (
                Ok(user_id),
                Ok(campaign_id),
                Ok(event_type),
                Ok(count),
                Ok(occurred_at),
                Ok(email_account_id),
                Ok(idempotency_key),
            ) => Ok(Event {
                user_id,
                campaign_id,
                event_type,
                count,
                occurred_at,
                email_account_id,
                idempotency_key,
            }),
            (a, b, c, d, e, f, g) => Err(ValidationError::from_failures([
                a.err(),
                b.err(),
                c.err(),
                d.err(),
                e.err(),
                f.err(),
                g.err(),
            ])),
        }
    }

    /// The UTC calendar day the event counts on.
    pub fn day(&self) -> NaiveDate {
        self.occurred_at.date_naive()
    }
}

fn check_occurred_at(
    occurred_at: Option<DateTime<Utc>>,
    now: DateTime<Utc>,
) -> Result<DateTime<Utc>, FieldViolation> {
    let at = occurred_at.unwrap_or(now);
    let (earliest, latest) = event_time_window(now);
    if at < earliest || at > latest {
        return Err(FieldViolation::new(
            "occurred_at",
            format!(
                "must lie between {} and {}, got {}",
                earliest.to_rfc3339(),
                latest.to_rfc3339(),
                at.to_rfc3339()
            ),
        ));
    }
    Ok(at)
}

fn optional_id(field: &str, value: String) -> Result<Option<String>, FieldViolation> {
    if value.is_empty() {
        return Ok(None);
    }
    validate_id(field, &value)?;
    Ok(Some(value))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The one test of the event-type table: codes as stored since the first schema, the
    /// enum in table order, the legacy columns in the legacy table's order.
    #[test]
    fn the_event_type_table_keeps_codes_and_orders() {
        let codes: Vec<i16> = EventType::ALL.iter().map(|t| t.code()).collect();
        assert_eq!(codes, [1, 2, 3, 4, 5, 6]);
        for (index, names) in EVENT_TYPES.iter().enumerate() {
            assert_eq!(names.event_type.index(), index);
            assert_eq!(EventType::from_code(names.code), Some(names.event_type));
        }
        assert_eq!(
            LEGACY_COLUMNS.map(EventType::legacy_column),
            ["sent", "opened", "replied", "positive_replies", "bounced"]
        );
        assert_eq!(EventType::Clicked.legacy_index(), None);
        assert_eq!(EventType::Replied.legacy_index(), Some(2));
        assert_eq!(
            rollup_columns(),
            "sent, opened, clicked, replied, positive_replies, bounced"
        );
    }

    fn raw() -> RawEvent {
        RawEvent {
            user_id: "u1".into(),
            campaign_id: "c1".into(),
            event_type: Some(EventType::Sent),
            ..RawEvent::default()
        }
    }

    fn now() -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 11, 21, 12, 0, 0).unwrap()
    }

    #[test]
    fn defaults_count_to_one_and_time_to_now() {
        let event = Event::validate(raw(), now()).unwrap();
        assert_eq!(event.count, 1);
        assert_eq!(event.occurred_at, now());
        assert_eq!(event.email_account_id, None);
        assert_eq!(event.idempotency_key, None);
    }

    #[test]
    fn names_every_bad_field_at_once() {
        let bad = RawEvent {
            user_id: String::new(),
            campaign_id: "c\u{0}".into(),
            event_type: None,
            count: MAX_EVENT_COUNT + 1,
            occurred_at: Some(now() + Duration::days(2)),
            email_account_id: "e".repeat(129),
            idempotency_key: "k\t".into(),
        };
        let fields: Vec<_> = Event::validate(bad, now())
            .unwrap_err()
            .violations
            .into_iter()
            .map(|v| v.field)
            .collect();
        assert_eq!(
            fields,
            [
                "user_id",
                "campaign_id",
                "event_type",
                "count",
                "occurred_at",
                "email_account_id",
                "idempotency_key"
            ]
        );
    }

    #[test]
    fn time_window_edges() {
        let (earliest, latest) = event_time_window(now());
        for (at, ok) in [
            (earliest, true),
            (earliest - Duration::seconds(1), false),
            (latest, true),
            (latest + Duration::seconds(1), false),
        ] {
            let event = RawEvent {
                occurred_at: Some(at),
                ..raw()
            };
            assert_eq!(Event::validate(event, now()).is_ok(), ok, "{at}");
        }
    }

    #[test]
    fn day_is_the_utc_calendar_day() {
        let event = RawEvent {
            occurred_at: Some(Utc.with_ymd_and_hms(2025, 12, 31, 23, 59, 59).unwrap()),
            ..raw()
        };
        let event = Event::validate(event, now()).unwrap();
        assert_eq!(event.day(), NaiveDate::from_ymd_opt(2025, 12, 31).unwrap());
    }

    #[test]
    fn codes_round_trip() {
        for t in EventType::ALL {
            assert_eq!(EventType::from_code(t.code()), Some(t));
        }
        assert_eq!(EventType::from_code(0), None);
    }
}
