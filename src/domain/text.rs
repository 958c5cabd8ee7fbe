//! Free text a request carries (a reason, an actor): bounded and printable, like ids.

use super::FieldViolation;

/// Longest reason or actor accepted, in bytes.
pub const MAX_TEXT_BYTES: usize = 1024;

/// The actor recorded when a request names none.
pub const UNKNOWN_ACTOR: &str = "unknown";

/// Checks text held by the request field `field`: at most `max` bytes, and no control
/// characters. PostgreSQL text cannot hold NUL, and other control characters would fake
/// lines in logs, terminals and audit listings; both backends refuse them alike.
pub fn validate_text(field: &str, value: &str, max: usize) -> Result<(), FieldViolation> {
    if value.len() > max {
        return Err(FieldViolation::new(
            field,
            format!("must be at most {max} bytes, got {}", value.len()),
        ));
    }
    if value.chars().any(char::is_control) {
        return Err(FieldViolation::new(
            field,
            "must not contain control characters (NUL, newlines, escapes, …)",
        ));
    }
    Ok(())
}

/// The reason of an audited change: required (`why` says what it must explain), at most
/// [`MAX_TEXT_BYTES`], printable.
pub fn parse_reason(value: String, why: &str) -> Result<String, FieldViolation> {
    if value.trim().is_empty() {
        return Err(FieldViolation::new("reason", why));
    }
    validate_text("reason", &value, MAX_TEXT_BYTES)?;
    Ok(value)
}

/// The actor of an audited change: [`UNKNOWN_ACTOR`] when empty, else at most
/// [`MAX_TEXT_BYTES`], printable.
pub fn parse_actor(value: String) -> Result<String, FieldViolation> {
    if value.is_empty() {
        return Ok(UNKNOWN_ACTOR.to_owned());
    }
    validate_text("actor", &value, MAX_TEXT_BYTES)?;
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reasons_and_actors_are_bounded_and_printable() {
        assert_eq!(parse_reason("ok ✓".into(), "why").unwrap(), "ok ✓");
        assert_eq!(
            parse_reason("  ".into(), "why").unwrap_err().field,
            "reason"
        );
        assert!(parse_reason("a\0b".into(), "why").is_err());
        assert!(parse_reason("line\nfake row".into(), "why").is_err());
        assert!(parse_reason("x".repeat(MAX_TEXT_BYTES), "why").is_ok());
        assert!(parse_reason("x".repeat(MAX_TEXT_BYTES + 1), "why").is_err());
        assert_eq!(parse_actor(String::new()).unwrap(), UNKNOWN_ACTOR);
        assert_eq!(parse_actor("\u{1b}[31m".into()).unwrap_err().field, "actor");
    }
}
