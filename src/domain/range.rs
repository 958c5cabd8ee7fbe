use std::collections::BTreeMap;

use chrono::{Datelike, Days, Months, NaiveDate};

use super::{EventTotals, FieldViolation, TotalOverflow, ValidationError, echo};

/// Longest date range a read may cover, in days (both ends included).
pub const MAX_RANGE_DAYS: i64 = 3_660;

/// Parses a `YYYY-MM-DD` date held by the request field `field`.
pub fn parse_date(field: &str, value: &str) -> Result<NaiveDate, FieldViolation> {
    let bad = || {
        FieldViolation::new(
            field,
            format!("must be a date as YYYY-MM-DD, got {}", echo(value)),
        )
    };
    // chrono accepts unpadded fields ("2026-1-5"); the contract is the strict form.
    if value.len() != 10 {
        return Err(bad());
    }
    NaiveDate::parse_from_str(value, "%Y-%m-%d").map_err(|_| bad())
}

/// An inclusive range of UTC calendar days.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DateRange {
    pub start: NaiveDate,
    pub end: NaiveDate,
}

impl DateRange {
    /// Validates `start_date` and `end_date` as a request sent them.
    pub fn parse(start_date: &str, end_date: &str) -> Result<Self, ValidationError> {
        let start = parse_date("start_date", start_date);
        let end = parse_date("end_date", end_date);
        let (start, end) = match (start, end) {
            (Ok(start), Ok(end)) => (start, end),
            (start, end) => {
                return Err(ValidationError::from_failures([start.err(), end.err()]));
            }
        };
        Self::new(start, end)
    }

    /// Checks that `start <= end` and that the range is at most [`MAX_RANGE_DAYS`] long.
    pub fn new(start: NaiveDate, end: NaiveDate) -> Result<Self, ValidationError> {
        if start > end {
            return Err(ValidationError::single(
                "end_date",
                format!("must not be before start_date ({start}), got {end}"),
            ));
        }
        let days = (end - start).num_days() + 1;
        if days > MAX_RANGE_DAYS {
            return Err(ValidationError::single(
                "end_date",
                format!("the range covers {days} days, at most {MAX_RANGE_DAYS} are allowed"),
            ));
        }
        Ok(Self { start, end })
    }

    pub fn contains(&self, day: NaiveDate) -> bool {
        self.start <= day && day <= self.end
    }
}

/// Bucket size of a series.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Granularity {
    #[default]
    Day,
    /// ISO weeks, starting on Monday.
    Week,
    /// Calendar months.
    Month,
}

impl Granularity {
    /// The first day of the bucket holding `day`.
    pub fn bucket_start(self, day: NaiveDate) -> NaiveDate {
        match self {
            Granularity::Day => day,
            Granularity::Week => day - Days::new(u64::from(day.weekday().num_days_from_monday())),
            Granularity::Month => day.with_day(1).expect("day 1 exists in every month"),
        }
    }

    /// The first day of the bucket after the one starting on `bucket_start`.
    fn next_bucket(self, bucket_start: NaiveDate) -> NaiveDate {
        match self {
            Granularity::Day => bucket_start + Days::new(1),
            Granularity::Week => bucket_start + Days::new(7),
            Granularity::Month => bucket_start + Months::new(1),
        }
    }
}

/// Sums daily totals into the buckets of `granularity`, in date order. Days outside `range`
/// are ignored. With `fill_empty`, every bucket touching the range is present (zeros where
/// nothing happened); without it, only buckets with activity are. A bucket whose total
/// would pass `u64::MAX` fails the series.
pub fn bucket_series(
    daily: impl IntoIterator<Item = (NaiveDate, EventTotals)>,
    range: DateRange,
    granularity: Granularity,
    fill_empty: bool,
) -> Result<Vec<(NaiveDate, EventTotals)>, TotalOverflow> {
    let mut buckets: BTreeMap<NaiveDate, EventTotals> = BTreeMap::new();
    if fill_empty {
        let last = granularity.bucket_start(range.end);
        let mut bucket = granularity.bucket_start(range.start);
        while bucket <= last {
            buckets.insert(bucket, EventTotals::default());
            bucket = granularity.next_bucket(bucket);
        }
    }
    for (day, metrics) in daily {
        if range.contains(day) && !metrics.is_zero() {
            buckets
                .entry(granularity.bucket_start(day))
                .or_default()
                .add_all(metrics)?;
        }
    }
    Ok(buckets.into_iter().collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(s: &str) -> NaiveDate {
        parse_date("d", s).unwrap()
    }

    #[test]
    fn strict_date_format() {
        assert!(parse_date("start_date", "2026-01-05").is_ok());
        for bad in [
            "2026-1-5",
            "2026/01/05",
            "05-01-2026",
            "2026-02-30",
            "",
            "2026-01-05T00:00",
        ] {
            let err = parse_date("start_date", bad).unwrap_err();
            assert_eq!(err.field, "start_date", "{bad}");
        }
    }

    #[test]
    fn range_rules() {
        assert!(DateRange::parse("2026-01-02", "2026-01-01").is_err());
        assert!(DateRange::parse("2026-01-01", "2026-01-01").is_ok());
        // 3,660 days inclusive is the most allowed.
        let start = d("2020-01-01");
        let last_ok = start + Days::new(3_659);
        assert!(DateRange::new(start, last_ok).is_ok());
        assert!(DateRange::new(start, last_ok + Days::new(1)).is_err());
        let both_bad = DateRange::parse("x", "y").unwrap_err();
        assert_eq!(both_bad.violations.len(), 2);
    }

    #[test]
    fn iso_week_and_month_edges() {
        let w = Granularity::Week;
        assert_eq!(w.bucket_start(d("2026-12-31")), d("2026-12-28"));
        assert_eq!(w.bucket_start(d("2027-01-01")), d("2026-12-28"));
        assert_eq!(w.bucket_start(d("2027-01-03")), d("2026-12-28"));
        assert_eq!(w.bucket_start(d("2027-01-04")), d("2027-01-04"));
        assert_eq!(w.bucket_start(d("2026-12-28")), d("2026-12-28"));
        let m = Granularity::Month;
        assert_eq!(m.bucket_start(d("2026-12-31")), d("2026-12-01"));
        assert_eq!(m.bucket_start(d("2028-02-29")), d("2028-02-01"));
    }

    #[test]
    fn fill_empty_covers_every_bucket_touching_the_range() {
        let range = DateRange::new(d("2026-01-30"), d("2026-04-02")).unwrap();
        let sent = EventTotals {
            sent: 2,
            ..EventTotals::default()
        };
        let daily = [
            (d("2026-03-15"), sent),
            (d("2026-03-16"), sent),
            (d("2026-05-01"), sent),
        ];
        let filled = bucket_series(daily, range, Granularity::Month, true).unwrap();
        let starts: Vec<_> = filled.iter().map(|(s, _)| *s).collect();
        assert_eq!(
            starts,
            [
                d("2026-01-01"),
                d("2026-02-01"),
                d("2026-03-01"),
                d("2026-04-01")
            ]
        );
        assert_eq!(filled[2].1.sent, 4);
        assert!(filled[0].1.is_zero());
        let sparse = bucket_series(daily, range, Granularity::Month, false).unwrap();
        assert_eq!(
            sparse,
            vec![(
                d("2026-03-01"),
                EventTotals {
                    sent: 4,
                    ..EventTotals::default()
                }
            )]
        );
    }

    #[test]
    fn a_bucket_past_u64_is_an_error() {
        let range = DateRange::new(d("2026-03-01"), d("2026-03-31")).unwrap();
        let huge = EventTotals {
            sent: u64::MAX / 2 + 1,
            ..EventTotals::default()
        };
        let daily = [(d("2026-03-15"), huge), (d("2026-03-16"), huge)];
        assert!(bucket_series(daily, range, Granularity::Day, false).is_ok());
        assert_eq!(
            bucket_series(daily, range, Granularity::Month, false),
            Err(TotalOverflow)
        );
    }
}
