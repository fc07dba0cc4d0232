//! Fast hashes for backend-local maps: the Fx hash of rustc for maps keyed by trigger OIDs, and
//! a keyed hash for row keys.
//!
//! The row keys come from users' writes, and a delivery worker folds many users' transactions in
//! one batch: keys made to collide would slow everyone's delivery. So row keys are hashed with
//! keys drawn once per process, which an attacker does not know, and every word goes through a
//! folded multiply by one of them (as foldhash and wyhash do): a starting value alone would not
//! do, since Fx's steps let a difference in the top bit of one word be cancelled by the next
//! word whatever the start (SipHash, std's keyed default, would cost as much as the rest of
//! capturing a row). `finish` mixes all bits down (MurmurHash3's fmix64), so that the low bits,
//! which pick a hash table's bucket, depend on all of the key.

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
        fmix64(self.hash)
    }
}

fn fmix64(mut h: u64) -> u64 {
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^ (h >> 33)
}

/// The high and low halves of `a * b`, folded together.
fn folded_multiply(a: u64, b: u64) -> u64 {
    let product = u128::from(a) * u128::from(b);
    (product as u64) ^ ((product >> 64) as u64)
}

pub type FxHashMap<K, V> = HashMap<K, V, BuildHasherDefault<FxHasher>>;

/// The keyed hash of a byte string (a row key), with this process's keys.
pub fn hash_bytes(bytes: &[u8]) -> u64 {
    static KEYS: OnceLock<(u64, u64)> = OnceLock::new();
    let &(start, multiplier) = KEYS.get_or_init(|| {
        // RandomState draws its keys from the operating system. The multiplier is odd and has
        // high bits set, so that no word's bits are lost in the product.
        let draw = |salt: u64| {
            let mut hasher = RandomState::new().build_hasher();
            hasher.write_u64(salt);
            hasher.finish()
        };
        (draw(0), draw(1) | (1 << 63) | 1)
    });
    let mut hash = folded_multiply(start ^ bytes.len() as u64, multiplier);
    let mut chunks = bytes.chunks_exact(8);
    for chunk in &mut chunks {
        hash = folded_multiply(hash ^ u64::from_le_bytes(chunk.try_into().expect("8 bytes")), multiplier);
    }
    let rest = chunks.remainder();
    if !rest.is_empty() {
        let mut word = [0u8; 8];
        word[..rest.len()].copy_from_slice(rest);
        hash = folded_multiply(hash ^ u64::from_le_bytes(word), multiplier);
    }
    fmix64(hash)
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
    fn a_flipped_top_bit_cancelled_by_the_next_word_does_not_collide() {
        // With Fx's steps alone these two keys collide whatever the starting value.
        let (mut a, mut b) = ([0x41u8; 16], [0x41u8; 16]);
        b[7] ^= 0x80;
        b[8] ^= 0x10;
        assert_ne!(hash(&a), hash(&b));
        a[0] = 0x42;
        b[0] = 0x42;
        assert_ne!(hash(&a), hash(&b));
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
