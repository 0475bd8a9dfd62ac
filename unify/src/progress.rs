//! The progress interface the library reports through; only the CLI knows how to draw it.

/// A stage of a long operation, as shown to the user.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// Walking guest trees and comparing them with the index (unit: files).
    Scan,
    /// Reading candidate files (unit: bytes).
    Hash,
    /// Replacing guest files by store links (unit: files).
    Link,
    /// Re-hashing store objects (unit: bytes).
    Verify,
    /// Upgrading guests (unit: guests).
    Upgrade,
}

impl Phase {
    /// A short lowercase name.
    pub fn name(self) -> &'static str {
        match self {
            Phase::Scan => "scan",
            Phase::Hash => "hash",
            Phase::Link => "link",
            Phase::Verify => "verify",
            Phase::Upgrade => "upgrade",
        }
    }

    /// Whether the phase counts bytes (else files).
    pub fn counts_bytes(self) -> bool {
        matches!(self, Phase::Hash | Phase::Verify)
    }
}

/// Receives progress from long operations. Called from several threads at once.
pub trait Progress: Sync {
    /// A phase starts; `total` is known for some phases.
    fn start(&self, phase: Phase, total: Option<u64>);
    /// `n` more units of the current phase are done.
    fn advance(&self, n: u64);
    /// The current phase is over.
    fn finish(&self);
}

/// A [`Progress`] that shows nothing.
#[derive(Debug, Default, Clone, Copy)]
pub struct NoProgress;

impl Progress for NoProgress {
    fn start(&self, _: Phase, _: Option<u64>) {}
    fn advance(&self, _: u64) {}
    fn finish(&self) {}
}
