use super::EventType;

/// Totals per event type.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct EventTotals {
    pub sent: u64,
    pub opened: u64,
    pub clicked: u64,
    pub replied: u64,
    pub positive_replies: u64,
    pub bounced: u64,
}

/// A total that would pass `u64::MAX`: reported, never wrapped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("a total exceeds {}", u64::MAX)]
pub struct TotalOverflow;

impl EventTotals {
    /// Adds `count` events of `event_type`; fails rather than wrap.
    pub fn add(&mut self, event_type: EventType, count: u64) -> Result<(), TotalOverflow> {
        let slot = match event_type {
            EventType::Sent => &mut self.sent,
            EventType::Opened => &mut self.opened,
            EventType::Clicked => &mut self.clicked,
            EventType::Replied => &mut self.replied,
            EventType::PositiveReply => &mut self.positive_replies,
            EventType::Bounced => &mut self.bounced,
        };
        *slot = slot.checked_add(count).ok_or(TotalOverflow)?;
        Ok(())
    }

    /// Adds every total of `other`; fails rather than wrap.
    pub fn add_all(&mut self, other: EventTotals) -> Result<(), TotalOverflow> {
        for event_type in EventType::ALL {
            self.add(event_type, other.get(event_type))?;
        }
        Ok(())
    }

    /// The total of `event_type`.
    pub fn get(&self, event_type: EventType) -> u64 {
        match event_type {
            EventType::Sent => self.sent,
            EventType::Opened => self.opened,
            EventType::Clicked => self.clicked,
            EventType::Replied => self.replied,
            EventType::PositiveReply => self.positive_replies,
            EventType::Bounced => self.bounced,
        }
    }

    pub fn is_zero(&self) -> bool {
        *self == EventTotals::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sums_are_checked_not_wrapped() {
        let mut metrics = EventTotals::default();
        metrics.add(EventType::Sent, u64::MAX - 1).unwrap();
        metrics.add(EventType::Sent, 1).unwrap();
        assert_eq!(metrics.sent, u64::MAX);
        assert_eq!(metrics.add(EventType::Sent, 1), Err(TotalOverflow));
        assert_eq!(metrics.sent, u64::MAX, "a failed add changes nothing");
        let one_click = EventTotals {
            clicked: 1,
            ..EventTotals::default()
        };
        assert!(metrics.add_all(one_click).is_ok());
        assert_eq!(metrics.add_all(metrics), Err(TotalOverflow));
    }
}
