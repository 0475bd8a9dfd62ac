//! What to generate ([`SynthSpec`]) and what was generated ([`GenReport`]).

use std::path::PathBuf;

/// The parameters of a synthetic guest set. The same spec always yields the same trees.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SynthSpec {
    /// Seed of every random choice: contents, sizes, timestamps, package names, divergence.
    pub seed: u64,
    /// Number of guests, written as `g01`, `g02`, … (zero padded to the width of the count).
    pub guests: usize,
    /// Approximate number of regular files in the base tree shared by all guests. The tree
    /// always has a fixed core of about 300 files, and packages are added until the count is
    /// reached; per-guest files (identity, user data, logs, `/opt/app`) come on top.
    pub files_per_guest: usize,
    /// Largest size of any generated file, in bytes (the cap of the long tail).
    pub max_file_size: u64,
}

impl SynthSpec {
    /// The spec of `cowherd demo`: 12 guests of about 400 base files, capped at 256 KiB.
    #[must_use]
    pub fn demo() -> Self {
        Self {
            seed: 0x00C0_FFEE_D15C_0DE5,
            guests: 12,
            files_per_guest: 400,
            max_file_size: 256 * 1024,
        }
    }

    /// The benchmark spec: `guests` guests of about 10 000 base files, capped at 16 MiB.
    #[must_use]
    pub fn bench(guests: usize) -> Self {
        Self {
            seed: 0xBE7C_4DA7_A5EE_D001,
            guests,
            files_per_guest: 10_000,
            max_file_size: 16 * 1024 * 1024,
        }
    }
}

/// What [`generate_synthetic`](crate::generate_synthetic) wrote.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct GenReport {
    /// The guest roots, `out/g01`, `out/g02`, … in order.
    pub guests: Vec<PathBuf>,
    /// Regular files written over all guests, counted once per inode (the extra names of a
    /// hard-link group are not counted).
    pub files: u64,
    /// Total size of those regular files, in bytes.
    pub bytes: u64,
}
