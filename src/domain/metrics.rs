use std::ops::AddAssign;

use super::EventType;

/// Totals per event type.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Metrics {
    pub sent: u64,
    pub opened: u64,
    pub clicked: u64,
    pub replied: u64,
    pub positive_replies: u64,
    pub bounced: u64,
}

impl Metrics {
    /// Adds `count` events of `event_type`.
    pub fn add(&mut self, event_type: EventType, count: u64) {
        let slot = match event_type {
            EventType::Sent => &mut self.sent,
            EventType::Opened => &mut self.opened,
            EventType::Clicked => &mut self.clicked,
            EventType::Replied => &mut self.replied,
            EventType::PositiveReply => &mut self.positive_replies,
            EventType::Bounced => &mut self.bounced,
        };
        *slot += count;
    }

    pub fn is_zero(&self) -> bool {
        *self == Metrics::default()
    }
}

impl AddAssign for Metrics {
    fn add_assign(&mut self, other: Metrics) {
        self.sent += other.sent;
        self.opened += other.opened;
        self.clicked += other.clicked;
        self.replied += other.replied;
        self.positive_replies += other.positive_replies;
        self.bounced += other.bounced;
    }
}
