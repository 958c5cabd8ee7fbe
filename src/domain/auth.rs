//! Who may call: bearer tokens, each with a name and a role, as an operator lists them in the
//! tokens file (one `role name sha256-hex-of-token` line each). Only hashes are held, and a
//! presented token is compared with every one in constant time.

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use super::validate_id;

/// What a token lets its holder do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    /// The read RPCs of `StatsService`, for one user at a time.
    Reader,
    /// Ingest: `RecordEvent`, `RecordEvents`, `StreamEvents`.
    Writer,
    /// Everything: reads (the all-users view too), ingest, `RolloutService` and
    /// `MigrationService`.
    Admin,
}

impl Role {
    /// Every role, least powerful first.
    pub const ALL: [Role; 3] = [Role::Reader, Role::Writer, Role::Admin];

    /// `reader`, `writer` or `admin`: as written in the tokens file.
    pub const fn name(self) -> &'static str {
        match self {
            Role::Reader => "reader",
            Role::Writer => "writer",
            Role::Admin => "admin",
        }
    }

    /// The role [`Role::name`] spells `name`.
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|role| role.name() == name)
    }

    /// Whether this role may do what `needed` may: admin may do everything, the others only
    /// their own part.
    pub fn grants(self, needed: Role) -> bool {
        self == Role::Admin || self == needed
    }
}

/// An authenticated caller: the token's name (the `actor` of every change it makes) and role.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    pub name: String,
    pub role: Role,
}

/// A line of the tokens file that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("tokens file line {line}: {problem}")]
pub struct TokensFileError {
    /// 1-based.
    pub line: usize,
    pub problem: String,
}

#[derive(Clone)]
struct Token {
    caller: Caller,
    sha256: [u8; 32],
}

/// The tokens a server accepts.
#[derive(Clone, Default)]
pub struct Tokens {
    tokens: Vec<Token>,
}

impl std::fmt::Debug for Tokens {
    /// Names and roles only: even hashes of secrets stay out of logs.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list()
            .entries(self.tokens.iter().map(|t| (&t.caller.name, t.caller.role)))
            .finish()
    }
}

/// The SHA-256 of `token` in lowercase hex, as the tokens file holds it
/// (`printf %s "$TOKEN" | sha256sum`).
pub fn token_sha256_hex(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

impl Tokens {
    /// Reads a tokens file: `role name sha256-hex` per line, separated by blanks; empty lines
    /// and lines starting with `#` are skipped. Every problem names its line; names and
    /// hashes must be unique.
    pub fn parse(text: &str) -> Result<Self, TokensFileError> {
        let mut tokens: Vec<Token> = Vec::new();
        for (index, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let problem = |problem: String| TokensFileError {
                line: index + 1,
                problem,
            };
            let fields: Vec<&str> = line.split_whitespace().collect();
            let [role, name, hash] = fields[..] else {
                return Err(problem(format!(
                    "expected `role name sha256-hex`, got {} fields",
                    fields.len()
                )));
            };
            let role = Role::from_name(role).ok_or_else(|| {
                problem(format!("unknown role {role:?} (reader, writer or admin)"))
            })?;
            validate_id("name", name).map_err(|v| problem(v.description))?;
            let mut sha256 = [0u8; 32];
            hex::decode_to_slice(hash, &mut sha256).map_err(|_| {
                problem("the hash must be 64 hex digits (the token's SHA-256)".into())
            })?;
            if tokens.iter().any(|t| t.caller.name == name) {
                return Err(problem(format!("the name {name:?} is listed twice")));
            }
            if tokens.iter().any(|t| t.sha256 == sha256) {
                return Err(problem("this token is listed twice".into()));
            }
            tokens.push(Token {
                caller: Caller {
                    name: name.to_owned(),
                    role,
                },
                sha256,
            });
        }
        Ok(Self { tokens })
    }

    /// How many tokens there are.
    pub fn len(&self) -> usize {
        self.tokens.len()
    }

    /// Whether no token is listed.
    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }

    /// The caller `token` belongs to. Every listed hash is compared, in constant time, so the
    /// time taken says nothing about how close a guess came, nor which token matched.
    pub fn authenticate(&self, token: &str) -> Option<&Caller> {
        let presented: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        let mut found = None;
        for candidate in &self.tokens {
            if bool::from(candidate.sha256.ct_eq(&presented)) {
                found = Some(&candidate.caller);
            }
        }
        found
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file() -> String {
        format!(
            "# role name sha256\n\nadmin ops {}\n  reader dash {}  \nwriter ingest {}\n",
            token_sha256_hex("admin-secret"),
            token_sha256_hex("read-secret"),
            token_sha256_hex("write-secret"),
        )
    }

    #[test]
    fn a_listed_token_names_its_caller_and_others_name_none() {
        let tokens = Tokens::parse(&file()).unwrap();
        assert_eq!(tokens.len(), 3);
        let caller = tokens.authenticate("read-secret").unwrap();
        assert_eq!((caller.name.as_str(), caller.role), ("dash", Role::Reader));
        assert_eq!(
            tokens.authenticate("admin-secret").unwrap().role,
            Role::Admin
        );
        assert!(tokens.authenticate("read-secre").is_none());
        assert!(tokens.authenticate("").is_none());
        assert!(!format!("{tokens:?}").contains(&token_sha256_hex("read-secret")));
    }

    #[test]
    fn admin_grants_everything_and_the_others_only_their_part() {
        for needed in Role::ALL {
            assert!(Role::Admin.grants(needed));
        }
        assert!(Role::Reader.grants(Role::Reader));
        assert!(!Role::Reader.grants(Role::Writer));
        assert!(!Role::Writer.grants(Role::Reader));
        assert!(!Role::Writer.grants(Role::Admin));
    }

    #[test]
    fn a_bad_line_is_refused_by_number() {
        let hash = token_sha256_hex("t");
        let cases = [
            (format!("admin ops {hash} extra"), 1, "fields"),
            (format!("\nroot ops {hash}"), 2, "unknown role"),
            ("admin ops 1234".to_string(), 1, "64 hex digits"),
            (
                format!("admin ops {hash}\nreader ops {}", token_sha256_hex("u")),
                2,
                "twice",
            ),
            (format!("admin a {hash}\nreader b {hash}"), 2, "twice"),
            (format!("admin a\u{7}b {hash}"), 1, "control"),
        ];
        for (text, line, problem) in cases {
            let error = Tokens::parse(&text).unwrap_err();
            assert_eq!(error.line, line, "{text:?}");
            assert!(error.problem.contains(problem), "{text:?}: {error}");
        }
    }
}
