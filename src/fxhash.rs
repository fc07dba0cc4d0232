//! A fast hash for backend-local maps keyed by row keys and trigger OIDs (the Fx hash of rustc).
//!
//! The row keys come from users' writes, and a delivery worker folds many users' transactions in
//! one batch: keys made to collide would slow everyone's delivery. So the hash of a key starts
//! from a value drawn once per process, which an attacker does not know (SipHash, std's keyed
//! default, would cost as much as the rest of capturing a row). Fx alone leaves the low bits
//! (which pick a hash table's bucket) depending only on the low bits of the last word, so keys
//! such as `"id":12345` crowded into a few buckets; `finish` mixes all bits down (MurmurHash3's
//! fmix64).

use std::collections::hash_map::RandomState;
use std::collections::HashMap;
use std::hash::{BuildHasher, BuildHasherDefault, Hasher};
use std::sync::OnceLock;

const SEED: u64 = 0x51_7c_c1_b7_27_22_0a_95;

#[derive(Default, Clone, Copy)]
pub struct FxHasher {
    hash: u64,
}

impl FxHasher {
    fn add(&mut self, word: u64) {
        self.hash = (self.hash.rotate_left(5) ^ word).wrapping_mul(SEED);
    }
}

impl Hasher for FxHasher {
    fn write(&mut self, bytes: &[u8]) {
        let mut chunks = bytes.chunks_exact(8);
        for chunk in &mut chunks {
            self.add(u64::from_le_bytes(chunk.try_into().expect("8 bytes")));
        }
        let rest = chunks.remainder();
        if !rest.is_empty() {
            let mut word = [0u8; 8];
            word[..rest.len()].copy_from_slice(rest);
            self.add(u64::from_le_bytes(word) ^ ((rest.len() as u64) << 56));
        }
    }

    fn write_u32(&mut self, n: u32) {
        self.add(u64::from(n));
    }

    fn write_u64(&mut self, n: u64) {
        self.add(n);
    }

    fn write_usize(&mut self, n: usize) {
        self.add(n as u64);
    }

    fn finish(&self) -> u64 {
        let mut h = self.hash;
        h ^= h >> 33;
        h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
        h ^= h >> 33;
        h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
        h ^ (h >> 33)
    }
}

pub type FxHashMap<K, V> = HashMap<K, V, BuildHasherDefault<FxHasher>>;

/// The Fx hash of a byte string, started from this process's key.
pub fn hash_bytes(bytes: &[u8]) -> u64 {
    static KEY: OnceLock<u64> = OnceLock::new();
    // RandomState draws its keys from the operating system.
    let key = *KEY.get_or_init(|| RandomState::new().build_hasher().finish());
    let mut hasher = FxHasher { hash: key };
    hasher.write_usize(bytes.len());
    hasher.write(bytes);
    hasher.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hash(bytes: &[u8]) -> u64 {
        hash_bytes(bytes)
    }

    #[test]
    fn equal_bytes_hash_equal_and_near_keys_differ() {
        assert_eq!(hash(b"\x07\x00\"id\":42"), hash(b"\x07\x00\"id\":42"));
        let hashes: std::collections::HashSet<u64> = (0..10_000).map(|i: u32| hash(&i.to_le_bytes())).collect();
        assert_eq!(hashes.len(), 10_000);
        assert_ne!(hash(b"ab"), hash(b"ab\0"));
    }

    #[test]
    fn low_bits_spread_row_keys_over_buckets() {
        // Keys as images store them: a length, then `"id":N`. A table of 16384 buckets uses the
        // low 14 bits; 10000 random keys would fill about 7500 distinct buckets.
        let buckets: std::collections::HashSet<u64> = (10_000..20_000)
            .map(|id: u32| {
                let pair = format!("\"id\":{id}");
                let mut key = (pair.len() as u16).to_le_bytes().to_vec();
                key.extend_from_slice(pair.as_bytes());
                hash(&key) & 0x3fff
            })
            .collect();
        assert!(buckets.len() > 7000, "only {} buckets used", buckets.len());
    }
}
