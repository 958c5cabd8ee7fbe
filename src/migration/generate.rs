//! A legacy table of a realistic shape, for tests, benchmarks and rehearsals: `campaigns`
//! campaigns spread over `users` users, one row per campaign per day for `days` days, about
//! 93% of rows all zeros as in the real table, and a few rows that look wrong. The same
//! seed always gives the same rows.

use chrono::{Days, NaiveDate};
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::backfill::LegacyRow;

/// What to generate.
#[derive(Debug, Clone)]
pub struct LegacyShape {
    pub campaigns: u32,
    pub users: u32,
    pub days: u32,
    /// The last day generated.
    pub end_date: NaiveDate,
    pub seed: u64,
}

/// Share of rows that are all zeros, in percent.
const ZERO_PERCENT: u32 = 93;
/// One row in this many looks wrong (negative, NULL, positive > replied, huge).
const ODD_EVERY: u32 = 997;

/// The rows of `shape`, campaign by campaign, day by day.
pub fn legacy_rows(shape: &LegacyShape) -> impl Iterator<Item = LegacyRow> + '_ {
    let mut rng = ChaCha8Rng::seed_from_u64(shape.seed);
    let first = shape.end_date - Days::new(u64::from(shape.days.saturating_sub(1)));
    let users = shape.users.max(1);
    (0..shape.campaigns)
        .flat_map(move |campaign| (0..shape.days).map(move |day| (campaign, day)))
        .map(move |(campaign, day)| {
            let stat_date = first + Days::new(u64::from(day));
            // One campaign in 200 has a row under a second user (legacy bugs do that).
            let owner = if campaign % 200 == 199 && day == 0 {
                campaign + 1
            } else {
                campaign
            };
            let counts = if rng.random_range(0..100) < ZERO_PERCENT {
                [Some(0); 5]
            } else {
                let sent = rng.random_range(1..500i64);
                let opened = rng.random_range(0..=sent);
                let replied = rng.random_range(0..=opened / 4 + 1);
                let positive = rng.random_range(0..=replied);
                let bounced = rng.random_range(0..=sent / 20);
                let mut counts = [
                    Some(sent),
                    Some(opened),
                    Some(replied),
                    Some(positive),
                    Some(bounced),
                ];
                match rng.random_range(0..ODD_EVERY) {
                    0 => counts[0] = Some(-sent),
                    1 => counts[1] = None,
                    2 => counts[3] = Some(replied + 1),
                    3 => counts[0] = Some(5_000_000),
                    _ => {}
                }
                counts
            };
            LegacyRow {
                campaign_id: format!("campaign-{campaign:07}"),
                user_id: format!("user-{:05}", owner % users),
                stat_date,
                counts,
            }
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shape(seed: u64) -> LegacyShape {
        LegacyShape {
            campaigns: 50,
            users: 7,
            days: 60,
            end_date: NaiveDate::from_ymd_opt(2025, 12, 31).unwrap(),
            seed,
        }
    }

    #[test]
    fn same_seed_same_rows_and_a_realistic_shape() {
        let rows: Vec<_> = legacy_rows(&shape(7)).collect();
        assert_eq!(rows, legacy_rows(&shape(7)).collect::<Vec<_>>());
        assert_ne!(rows, legacy_rows(&shape(8)).collect::<Vec<_>>());
        assert_eq!(rows.len(), 50 * 60);
        let zeros = rows.iter().filter(|r| r.counts == [Some(0); 5]).count();
        let share = zeros * 100 / rows.len();
        assert!((88..=97).contains(&share), "{share}% all-zero rows");
        assert_eq!(
            rows.last().unwrap().stat_date,
            NaiveDate::from_ymd_opt(2025, 12, 31).unwrap()
        );
    }
}
