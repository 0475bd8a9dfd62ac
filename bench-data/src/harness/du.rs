//! Bytes on disk: `st_blocks * 512` summed over every inode reachable from some paths,
//! each `(dev, ino)` counted once however many names it has.

use std::collections::HashSet;
use std::io;
use std::os::unix::fs::MetadataExt as _;
use std::path::Path;

use serde::Serialize;

/// Allocated bytes, inodes and names below some paths.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Usage {
    /// Allocated bytes (`st_blocks * 512`), each inode once.
    pub bytes: u64,
    /// Distinct inodes (directories, files, symlinks, …).
    pub inodes: u64,
    /// Names seen (a hard-linked file counts once per name).
    pub names: u64,
}

/// Counts allocated bytes, each inode once.
#[derive(Debug, Default)]
pub struct DiskCounter {
    seen: HashSet<(u64, u64)>,
    usage: Usage,
}

impl DiskCounter {
    /// An empty counter.
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// Counts one name of inode `(dev, ino)` with `blocks` 512-byte blocks; an inode already
    /// seen adds a name but no bytes.
    pub fn add(&mut self, dev: u64, ino: u64, blocks: u64) {
        self.usage.names += 1;
        if self.seen.insert((dev, ino)) {
            self.usage.inodes += 1;
            self.usage.bytes += blocks * 512;
        }
    }

    /// Counts `root` and everything below it, never following symlinks. A missing `root`
    /// counts nothing.
    ///
    /// # Errors
    ///
    /// Walking or `lstat` failures.
    pub fn add_tree(&mut self, root: &Path) -> io::Result<()> {
        if root.symlink_metadata().is_err() {
            return Ok(());
        }
        for entry in walkdir::WalkDir::new(root).follow_links(false) {
            let entry = entry?;
            let m = entry.metadata()?;
            self.add(m.dev(), m.ino(), m.blocks());
        }
        Ok(())
    }

    /// What was counted so far.
    #[must_use]
    pub fn usage(&self) -> Usage {
        self.usage
    }
}

/// The usage of every path in `roots` together (an inode reachable from two roots counts
/// once).
///
/// # Errors
///
/// Walking or `lstat` failures.
pub fn disk_usage<P: AsRef<Path>>(roots: &[P]) -> io::Result<Usage> {
    let mut counter = DiskCounter::new();
    for root in roots {
        counter.add_tree(root.as_ref())?;
    }
    Ok(counter.usage())
}
