use std::io::Read;

/// How many buckets users are hashed into; a percentage step of 0.01% is one bucket.
pub const BUCKETS: u32 = 10_000;

/// The bucket of `user_id` under `salt`:
///
/// `murmur3_x86_32(utf8(salt) ++ ":" ++ utf8(user_id), seed = 0) mod 10_000`
///
/// A user reads NEW iff `bucket < percentage × 100`. Fixed forever: pinned test vectors
/// guard it, and it depends on nothing of the process or platform. Allocates nothing.
pub fn bucket(salt: &str, user_id: &str) -> u32 {
    let mut input = salt.as_bytes().chain(&b":"[..]).chain(user_id.as_bytes());
    // Reading from memory cannot fail.
    let hash = murmur3::murmur3_32(&mut input, 0).unwrap_or(0);
    hash % BUCKETS
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The hash is the standard MurmurHash3 x86 32-bit (reference values).
    #[test]
    fn standard_murmur3() {
        let hash = |s: &str| murmur3::murmur3_32(&mut s.as_bytes(), 0).unwrap();
        assert_eq!(hash(""), 0);
        assert_eq!(hash("hello"), 0x248b_fa47);
        assert_eq!(
            hash("The quick brown fox jumps over the lazy dog"),
            0x2e4f_f723
        );
    }

    /// Pinned vectors: these must never change, or users would switch storages. (Checked
    /// against an independent MurmurHash3 implementation, Python's `mmh3`, when pinned.)
    #[test]
    fn pinned_vectors() {
        let pinned = [
            ("", "", 7430),
            ("s1", "user-1", 9968),
            ("s1", "user-2", 4833),
            ("s1", "user-3", 7061),
            ("s1", "42", 503),
            ("s1", "alice@example.com", 7726),
            ("s1", "bob", 9553),
            ("s2", "user-1", 6506),
            ("s2", "user-2", 1872),
            ("rollout-2026", "u_000001", 8488),
            ("rollout-2026", "*", 2603),
            ("ß", "日本", 6170),
        ];
        for (salt, user, expected) in pinned {
            assert_eq!(bucket(salt, user), expected, "bucket({salt:?}, {user:?})");
        }
    }
}
