use std::fmt;

/// Longest prefix of a client's value echoed back in an error, in characters.
pub const ECHO_CHARS: usize = 32;

/// A client's value as an error message may quote it: escaped (no control characters reach
/// a terminal or a log), and cut to [`ECHO_CHARS`] characters with its full size said, so
/// that an error never grows with the input.
pub fn echo(value: &str) -> String {
    let mut chars = value.chars();
    let prefix: String = chars.by_ref().take(ECHO_CHARS).collect();
    if chars.next().is_none() {
        format!("{prefix:?}")
    } else {
        format!("{:?}… ({} bytes)", prefix, value.len())
    }
}

/// One rule broken by one field of a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldViolation {
    /// Path of the field in the request, e.g. `events[3].count`.
    pub field: String,
    /// What is wrong with it, for a person to read.
    pub description: String,
}

impl FieldViolation {
    pub fn new(field: impl Into<String>, description: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            description: description.into(),
        }
    }
}

impl fmt::Display for FieldViolation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.description)
    }
}

/// Every rule a request broke; never empty.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ValidationError {
    pub violations: Vec<FieldViolation>,
}

impl ValidationError {
    pub fn single(field: impl Into<String>, description: impl Into<String>) -> Self {
        Self {
            violations: vec![FieldViolation::new(field, description)],
        }
    }

    /// The violations among `failures`, in order.
    pub fn from_failures(failures: impl IntoIterator<Item = Option<FieldViolation>>) -> Self {
        Self {
            violations: failures.into_iter().flatten().collect(),
        }
    }

    /// Nests every field path under `prefix`: `count` becomes `events[3].count`.
    pub fn within(mut self, prefix: &str) -> Self {
        for violation in &mut self.violations {
            violation.field = format!("{prefix}.{}", violation.field);
        }
        self
    }
}

impl fmt::Display for ValidationError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut first = true;
        for violation in &self.violations {
            if !first {
                f.write_str("; ")?;
            }
            first = false;
            write!(f, "{violation}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn echo_quotes_short_values_and_cuts_long_ones() {
        assert_eq!(echo("2026-1-5"), "\"2026-1-5\"");
        assert_eq!(echo("a\u{0}\u{1b}[31m"), "\"a\\0\\u{1b}[31m\"");
        let long = "x".repeat(1 << 20);
        let echoed = echo(&long);
        assert!(echoed.len() < 64, "{echoed}");
        assert!(echoed.ends_with("(1048576 bytes)"), "{echoed}");
    }
}

/// A request carries more items than a documented limit allows.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: at most {limit} items are allowed, got {actual}")]
pub struct LimitExceeded {
    pub field: &'static str,
    pub limit: usize,
    pub actual: usize,
}

impl LimitExceeded {
    /// Fails when `actual` is over `limit`.
    pub fn check(field: &'static str, limit: usize, actual: usize) -> Result<(), Self> {
        if actual > limit {
            Err(Self {
                field,
                limit,
                actual,
            })
        } else {
            Ok(())
        }
    }
}
