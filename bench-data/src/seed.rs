//! Deterministic randomness: stable key hashing and a small seeded ChaCha wrapper.
//!
//! Everything the generator decides comes from [`Rand`] streams whose 256-bit seeds are derived
//! from the spec's seed and a key (a path, a package name, a guest index, …) by [`stream_seed`].
//! Only `next_u64`/`fill_bytes` of ChaCha8 are used, whose output is fixed by the algorithm, so
//! the trees do not depend on how a `rand` version maps raw output to ranges.

use rand_chacha::ChaCha8Rng;
use rand_chacha::rand_core::{RngCore, SeedableRng};

/// One step of SplitMix64: a well-mixed bijection of `x`.
fn splitmix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

/// Derives a 256-bit ChaCha seed from the spec seed, a key and a variant number.
///
/// Four independent lanes absorb the key bytes; the length and the variant are folded in so
/// that no two (key, variant) pairs collide by construction of a prefix.
pub(crate) fn stream_seed(seed: u64, key: &str, variant: u64) -> [u8; 32] {
    let mut lanes = [
        splitmix(seed ^ 0x6A09_E667_F3BC_C908),
        splitmix(seed ^ 0xBB67_AE85_84CA_A73B),
        splitmix(seed ^ 0x3C6E_F372_FE94_F82B),
        splitmix(seed ^ 0xA54F_F53A_5F1D_36F1),
    ];
    let absorb = |lanes: &mut [u64; 4], word: u64| {
        for (i, lane) in lanes.iter_mut().enumerate() {
            *lane = splitmix(lane.rotate_left(17 + i as u32) ^ word);
        }
    };
    for chunk in key.as_bytes().chunks(8) {
        let mut word = [0u8; 8];
        word[..chunk.len()].copy_from_slice(chunk);
        absorb(&mut lanes, u64::from_le_bytes(word));
    }
    absorb(&mut lanes, key.len() as u64);
    absorb(&mut lanes, variant);
    let mut out = [0u8; 32];
    for (dst, lane) in out.chunks_mut(8).zip(lanes) {
        dst.copy_from_slice(&lane.to_le_bytes());
    }
    out
}

/// A seeded ChaCha8 stream with the few sampling helpers the generator needs.
pub(crate) struct Rand(ChaCha8Rng);

impl Rand {
    /// The stream for `key` and `variant` under the spec seed `seed`.
    pub(crate) fn new(seed: u64, key: &str, variant: u64) -> Self {
        Self(ChaCha8Rng::from_seed(stream_seed(seed, key, variant)))
    }

    /// The next raw 64-bit output.
    pub(crate) fn next_u64(&mut self) -> u64 {
        self.0.next_u64()
    }

    /// Fills `buf` with stream bytes.
    pub(crate) fn fill(&mut self, buf: &mut [u8]) {
        self.0.fill_bytes(buf);
    }

    /// A number in `0..n` (`0` when `n` is 0), by multiply-shift.
    pub(crate) fn below(&mut self, n: u64) -> u64 {
        ((u128::from(self.next_u64()) * u128::from(n)) >> 64) as u64
    }

    /// A number in `lo..=hi`.
    pub(crate) fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.below(hi - lo + 1)
    }

    /// An index into a collection of `len` items (`len` must not be 0).
    pub(crate) fn index(&mut self, len: usize) -> usize {
        self.below(len as u64) as usize
    }

    /// A uniformly chosen element of a non-empty slice.
    pub(crate) fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.index(items.len())]
    }

    /// A uniformly chosen string of a non-empty list.
    pub(crate) fn pick_str(&mut self, items: &[&'static str]) -> &'static str {
        items[self.index(items.len())]
    }

    /// A float in `[0, 1)` with 53 random bits.
    pub(crate) fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// `true` with probability `p`.
    pub(crate) fn chance(&mut self, p: f64) -> bool {
        self.unit() < p
    }

    /// A standard normal sample (Box–Muller).
    pub(crate) fn normal(&mut self) -> f64 {
        let u1 = 1.0 - self.unit(); // (0, 1]
        let u2 = self.unit();
        (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
    }

    /// A log-normal size with the given median and shape, clamped to `min..=max`.
    pub(crate) fn lognormal(&mut self, median: f64, sigma: f64, min: u64, max: u64) -> u64 {
        let v = (median * (sigma * self.normal()).exp()).round();
        // `as` saturates for huge or non-finite floats.
        (v as u64).clamp(min, max.max(min))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn streams_are_reproducible_and_keyed() {
        let mut a = Rand::new(7, "/usr/bin/ls", 0);
        let mut b = Rand::new(7, "/usr/bin/ls", 0);
        for _ in 0..4 {
            assert_eq!(a.next_u64(), b.next_u64());
        }
        assert_ne!(
            stream_seed(7, "/usr/bin/ls", 0),
            stream_seed(7, "/usr/bin/ls", 1)
        );
        assert_ne!(
            stream_seed(7, "/usr/bin/ls", 0),
            stream_seed(8, "/usr/bin/ls", 0)
        );
        assert_ne!(
            stream_seed(7, "/usr/bin/ls", 0),
            stream_seed(7, "/usr/bin/lz", 0)
        );
        assert_ne!(stream_seed(7, "ab", 0), stream_seed(7, "ab\0", 0));
    }

    #[test]
    fn samplers_stay_in_range() {
        let mut r = Rand::new(1, "k", 0);
        for _ in 0..1000 {
            assert!(r.below(10) < 10);
            let x = r.range(3, 5);
            assert!((3..=5).contains(&x));
            let u = r.unit();
            assert!((0.0..1.0).contains(&u));
            let s = r.lognormal(3000.0, 1.5, 0, 100_000);
            assert!(s <= 100_000);
        }
        assert_eq!(r.below(0), 0);
    }
}
