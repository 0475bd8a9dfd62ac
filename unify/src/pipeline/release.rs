//! Deferred release of replaced inodes: the last close of a replaced file frees it on closer
//! threads, so the linker does not wait for the filesystem to free blocks.
//!
//! When `renameat` replaces a guest's file by a link to the store, the old inode loses its
//! last link. If nothing else holds it, the kernel frees it inside `renameat`: it truncates
//! the extents, and on ext4 mounted with `discard` it waits for the device to discard each
//! freed extent (`ext4_free_blocks` → `blkdev_issue_discard` → `submit_bio_wait`). Measured on
//! such a host: 20,000 replacements of 24 KiB files in one directory took 4.0 s one after the
//! other, and 1.4 s when an `O_PATH` descriptor of each old inode was held across the rename
//! and closed by 8 closer threads (1.3 s on the same filesystem without `discard`). Threads
//! renaming in one directory gain nothing (3.8 s), because the directory serialises them.
//!
//! The crash model is unchanged: an unlinked inode held open is on ext4's orphan list and is
//! freed at the next mount.

use std::os::fd::OwnedFd;
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

/// Descriptors waiting to be closed, at most; bounds the descriptors cowherd holds open.
const QUEUE: usize = 256;

/// A pool of closer threads; dropping it closes everything queued and joins the threads.
pub(crate) struct Releaser {
    tx: Option<SyncSender<OwnedFd>>,
    threads: Vec<JoinHandle<()>>,
}

impl Releaser {
    /// Starts `threads` closer threads (at least one).
    pub(crate) fn new(threads: usize) -> Self {
        let (tx, rx) = sync_channel::<OwnedFd>(QUEUE);
        let rx = Arc::new(Mutex::new(rx));
        let threads = (0..threads.max(1))
            .filter_map(|i| {
                let rx = Arc::clone(&rx);
                std::thread::Builder::new()
                    .name(format!("cowherd-release-{i}"))
                    .spawn(move || close_loop(&rx))
                    .ok()
            })
            .collect::<Vec<_>>();
        Releaser {
            // Without a thread to receive, descriptors are closed by the caller (`release`).
            tx: (!threads.is_empty()).then_some(tx),
            threads,
        }
    }

    /// Hands `fd` to a closer thread; blocks while the queue is full.
    pub(crate) fn release(&self, fd: OwnedFd) {
        if let Some(tx) = &self.tx {
            // A send fails only when every closer is gone; the fd is then dropped here.
            let _ = tx.send(fd);
        }
    }
}

fn close_loop(rx: &Mutex<Receiver<OwnedFd>>) {
    loop {
        let next = match rx.lock() {
            Ok(rx) => rx.recv(),
            Err(_) => return,
        };
        match next {
            Ok(fd) => drop(fd),
            Err(_) => return,
        }
    }
}

impl Drop for Releaser {
    fn drop(&mut self) {
        self.tx = None;
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Descriptors of this process that point below `dir`.
    fn open_below(dir: &std::path::Path) -> usize {
        std::fs::read_dir("/proc/self/fd")
            .unwrap()
            .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
            .filter(|target| target.starts_with(dir))
            .count()
    }

    #[test]
    fn releaser_closes_every_descriptor_before_drop_returns() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, b"x").unwrap();
        {
            let releaser = Releaser::new(3);
            for _ in 0..1000 {
                releaser.release(std::fs::File::open(&path).unwrap().into());
            }
        }
        assert_eq!(open_below(dir.path()), 0);
    }
}
