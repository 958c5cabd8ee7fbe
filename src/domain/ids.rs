use std::fmt;

use super::FieldViolation;
use super::text::validate_text;

/// Longest id accepted, in bytes.
pub const MAX_ID_BYTES: usize = 128;

/// Checks an id: 1 to [`MAX_ID_BYTES`] bytes, no control characters.
pub fn validate_id(field: &str, value: &str) -> Result<(), FieldViolation> {
    if value.is_empty() {
        return Err(FieldViolation::new(field, "must not be empty"));
    }
    validate_text(field, value, MAX_ID_BYTES)
}

macro_rules! id_type {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
        pub struct $name(String);

        impl $name {
            /// Validates `value` as the id held by the request field `field`.
            pub fn parse(field: &str, value: impl Into<String>) -> Result<Self, FieldViolation> {
                let value = value.into();
                validate_id(field, &value)?;
                Ok(Self(value))
            }

            pub fn as_str(&self) -> &str {
                &self.0
            }

            pub fn into_string(self) -> String {
                self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
    };
}

id_type!(
    /// The account that owns campaigns; the unit of the read rollout.
    UserId
);
id_type!(
    /// A campaign; it belongs to the first user that records an event for it.
    CampaignId
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_plain_ids_up_to_the_limit() {
        assert!(validate_id("user_id", "u-1").is_ok());
        assert!(validate_id("user_id", &"x".repeat(MAX_ID_BYTES)).is_ok());
    }

    #[test]
    fn refuses_empty_long_and_control_characters() {
        assert_eq!(validate_id("f", "").unwrap_err().field, "f");
        assert!(validate_id("f", &"x".repeat(MAX_ID_BYTES + 1)).is_err());
        assert!(validate_id("f", "a\nb").is_err());
        assert!(validate_id("f", "a\u{7f}b").is_err());
        // Multi-byte characters count in bytes.
        assert!(validate_id("f", &"é".repeat(65)).is_err());
    }
}
