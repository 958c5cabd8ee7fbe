//! Raw events in PostgreSQL's binary `COPY` format: the cheapest way into the events table for
//! a large batch (no SQL to parse per row, no text to convert).
//!
//! The format (PostgreSQL docs, "COPY … Binary Format"): a signature, a flags word and an
//! empty header extension; per row, the number of fields and each field as a length (−1 for
//! NULL) and its bytes in the type's binary form; a trailer of −1.

use chrono::{DateTime, TimeZone, Utc};

use crate::domain::Event;

/// The statement the rows of [`encode_events`] are sent to.
pub const COPY_EVENTS: &str = "COPY events (user_id, campaign_id, event_type, count, \
    occurred_at, email_account_id, idempotency_key) FROM STDIN (FORMAT binary)";

const SIGNATURE: &[u8] = b"PGCOPY\n\xff\r\n\0";
/// Fields per row of [`COPY_EVENTS`].
const FIELDS: i16 = 7;

/// `events` as the data of [`COPY_EVENTS`].
pub fn encode_events(events: &[&Event]) -> Vec<u8> {
    let mut data = Vec::with_capacity(SIGNATURE.len() + 8 + events.len() * 120 + 2);
    data.extend_from_slice(SIGNATURE);
    data.extend_from_slice(&0i32.to_be_bytes()); // flags: no OIDs
    data.extend_from_slice(&0i32.to_be_bytes()); // no header extension
    for event in events {
        data.extend_from_slice(&FIELDS.to_be_bytes());
        text(&mut data, Some(event.user_id.as_str()));
        text(&mut data, Some(event.campaign_id.as_str()));
        field(&mut data, &event.event_type.code().to_be_bytes());
        // Counts are at most 1,000,000, so they fit an int4.
        field(&mut data, &(event.count as i32).to_be_bytes());
        field(&mut data, &timestamptz(event.occurred_at).to_be_bytes());
        text(&mut data, event.email_account_id.as_deref());
        text(&mut data, event.idempotency_key.as_deref());
    }
    data.extend_from_slice(&(-1i16).to_be_bytes());
    data
}

fn field(data: &mut Vec<u8>, bytes: &[u8]) {
    // A field is an id, a key (both at most 128 bytes) or a number: its length fits.
    data.extend_from_slice(&(bytes.len() as i32).to_be_bytes());
    data.extend_from_slice(bytes);
}

fn text(data: &mut Vec<u8>, value: Option<&str>) {
    match value {
        Some(value) => field(data, value.as_bytes()),
        None => data.extend_from_slice(&(-1i32).to_be_bytes()),
    }
}

/// A `timestamptz` in binary: microseconds since 2000-01-01 00:00:00 UTC.
fn timestamptz(at: DateTime<Utc>) -> i64 {
    let epoch = Utc
        .with_ymd_and_hms(2000, 1, 1, 0, 0, 0)
        .single()
        .unwrap_or_default();
    (at - epoch).num_microseconds().unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{CampaignId, EventType, UserId};

    #[test]
    fn one_row_is_laid_out_as_postgres_reads_it() {
        let event = Event {
            user_id: UserId::parse("user_id", "u").expect("id"),
            campaign_id: CampaignId::parse("campaign_id", "c1").expect("id"),
            event_type: EventType::Opened,
            count: 3,
            occurred_at: Utc
                .with_ymd_and_hms(2000, 1, 1, 0, 0, 1)
                .single()
                .expect("time"),
            email_account_id: None,
            idempotency_key: Some("k".into()),
        };
        let data = encode_events(&[&event]);
        let mut expected = b"PGCOPY\n\xff\r\n\0".to_vec();
        expected.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0, 0]);
        expected.extend_from_slice(&[0, 7]);
        expected.extend_from_slice(&[0, 0, 0, 1, b'u']);
        expected.extend_from_slice(&[0, 0, 0, 2, b'c', b'1']);
        expected.extend_from_slice(&[0, 0, 0, 2, 0, 2]);
        expected.extend_from_slice(&[0, 0, 0, 4, 0, 0, 0, 3]);
        expected.extend_from_slice(&[0, 0, 0, 8, 0, 0, 0, 0, 0, 0x0f, 0x42, 0x40]);
        expected.extend_from_slice(&[0xff, 0xff, 0xff, 0xff]);
        expected.extend_from_slice(&[0, 0, 0, 1, b'k']);
        expected.extend_from_slice(&[0xff, 0xff]);
        assert_eq!(data, expected);
    }
}
