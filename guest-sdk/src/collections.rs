//! Hash maps and sets for plugin state, with a hasher that is fast on short keys.
//!
//! Per-record state lookups (a campaign id, a user id) dominate the cost of a windowed
//! aggregate, and the standard library's SipHash was a large part of that in profiles of
//! the example aggregate, more so inside WebAssembly than natively. These aliases use
//! [foldhash](https://docs.rs/foldhash)'s fast hasher, seeded once per plugin instance from
//! the host's secure random source, so keys an attacker chooses cannot be aimed at one
//! bucket. They serialize like the standard collections, so switching a state type from
//! `std::collections::HashMap` keeps existing snapshots readable.

use std::hash::BuildHasher;
use std::sync::OnceLock;

use foldhash::fast::{FoldHasher, SeedableRandomState};
use foldhash::SharedSeed;

/// `std::collections::HashMap` with the [`KeyHasher`].
pub type HashMap<K, V> = std::collections::HashMap<K, V, KeyHasher>;

/// `std::collections::HashSet` with the [`KeyHasher`].
pub type HashSet<T> = std::collections::HashSet<T, KeyHasher>;

/// Builds fast hashers seeded from the standard library's random source once per process.
#[derive(Clone, Debug)]
pub struct KeyHasher(SeedableRandomState);

fn seeds() -> &'static (u64, SharedSeed) {
    static SEEDS: OnceLock<(u64, SharedSeed)> = OnceLock::new();
    SEEDS.get_or_init(|| {
        // std's RandomState draws its keys from the OS (WASI `random`) once per thread.
        let random = std::collections::hash_map::RandomState::new();
        (random.hash_one(0u8), SharedSeed::from_u64(random.hash_one(1u8)))
    })
}

impl Default for KeyHasher {
    fn default() -> Self {
        let (per_hasher, shared) = seeds();
        Self(SeedableRandomState::with_seed(*per_hasher, shared))
    }
}

impl BuildHasher for KeyHasher {
    type Hasher = FoldHasher<'static>;

    #[inline]
    fn build_hasher(&self) -> Self::Hasher {
        self.0.build_hasher()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serializes_like_the_standard_collections() {
        let mut ours: HashMap<String, u32> = HashMap::default();
        ours.insert("a".into(), 1);
        let std_map: std::collections::HashMap<String, u32> = [("a".to_string(), 1)].into();
        let bytes = postcard::to_allocvec(&std_map).unwrap();
        assert_eq!(postcard::to_allocvec(&ours).unwrap(), bytes);
        let back: HashMap<String, u32> = postcard::from_bytes(&bytes).unwrap();
        assert_eq!(back, ours);
    }
}
