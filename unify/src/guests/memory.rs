//! `stats --memory`: the page cache and inode cache that sharing saves right now, for the
//! mounted guests. Two guests whose lower files are links of one store object read it through
//! one inode: its pages are cached once (DESIGN-NOTES fact 6), where separate copies would be
//! cached once per guest.

use std::collections::{BTreeMap, HashSet};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use nix::fcntl::OFlag;
use rayon::prelude::*;
use serde::Serialize;

use crate::error::{PathContext, Result};
use crate::fsx;
use crate::guest::{GuestPaths, guest_record};
use crate::index::ORIGINAL_INODE;
use crate::mountinfo::MountTable;
use crate::overlay::{MountState, state_in};
use crate::report::display_path;
use crate::root::HostRoot;
use crate::store;

/// One store object in [`MemoryStats::top`].
#[derive(Clone, Debug, Serialize)]
pub struct MemoryObject {
    /// The object's name.
    pub object: String,
    /// Mounted guests reading it through their overlay.
    pub guests: u64,
    /// Its bytes in the page cache now.
    pub resident_bytes: u64,
    /// `resident_bytes × (guests − 1)`.
    pub saved_bytes: u64,
    /// One path linked to it, `guest:/path`.
    pub example: String,
}

/// What `cowherd stats --memory` shows.
#[derive(Clone, Debug, Default, Serialize)]
pub struct MemoryStats {
    /// The guests mounted now (as cowherd mounts them).
    pub mounted_guests: Vec<String>,
    /// Store objects that mounted guests read through their overlay.
    pub objects: u64,
    /// Bytes of those objects in the page cache now (`mincore`).
    pub resident_bytes: u64,
    /// Page cache saved now: for each object, its resident bytes times the number of mounted
    /// guests reading it, minus its resident bytes — what separate copies, cached as much,
    /// would take more.
    pub page_cache_saved_bytes: u64,
    /// Files of the mounted guests' base trees (per the index).
    pub files: u64,
    /// Distinct inodes behind those files: each store object once, plus each guest's own.
    pub inodes: u64,
    /// Distinct inodes behind them without sharing: every guest's files on inodes of its own.
    pub inodes_unshared: u64,
    /// The size of one cached inode (`ext4_inode_cache` in `/proc/slabinfo`), if known.
    pub inode_object_bytes: Option<u64>,
    /// `(inodes_unshared − inodes) × inode_object_bytes`: inode cache saved with every inode
    /// cached.
    pub inode_cache_saved_bytes: Option<u64>,
    /// The objects that save the most page cache now.
    pub top: Vec<MemoryObject>,
}

/// The size of one `ext4_inode_cache` slab object, from `/proc/slabinfo`.
fn inode_object_bytes() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/slabinfo").ok()?;
    text.lines()
        .find(|l| l.starts_with("ext4_inode_cache "))
        .and_then(|l| l.split_whitespace().nth(3)?.parse().ok())
}

/// Whether the upper layer hides the lower path `rel`, so the guest does not read it: upper
/// holds the path itself (copied up, replaced, whited out), or an ancestor that is not a
/// directory (whiteout, file, symlink) or is an opaque directory. Each component is looked up
/// on its own, following no symlink.
fn shadowed(upper: BorrowedFd<'_>, rel: &[u8]) -> bool {
    let parts: Vec<&[u8]> = rel.split(|&b| b == b'/').collect();
    let Some((last, ancestors)) = parts.split_last() else {
        return false;
    };
    let mut dir: Option<OwnedFd> = None;
    for part in ancestors {
        let at = dir.as_ref().map_or(upper, AsFd::as_fd);
        match fsx::lstat_at(at, part) {
            Err(_) => return false,
            Ok(st) if !st.is_dir() => return true,
            Ok(_) => {}
        }
        let opaque = xattr::get(fsx::entry_path(at, part), "trusted.overlay.opaque");
        if matches!(opaque, Ok(Some(v)) if v == b"y") {
            return true;
        }
        let Ok(next) = fsx::open_beneath(at, part, OFlag::O_RDONLY | OFlag::O_DIRECTORY) else {
            return true;
        };
        dir = Some(next);
    }
    let at = dir.as_ref().map_or(upper, AsFd::as_fd);
    fsx::lstat_at(at, last).is_ok()
}

/// Measures what sharing saves in memory for the mounted guests now.
///
/// # Algorithm
/// The mounted guests come from the mount table. For each of their linked files (index rows
/// with an object) the path is looked up in the guest's upper layer: a path the guest has
/// copied up (or deleted) no longer reads the object. So each object gets the number of
/// mounted guests that read it. Its resident bytes come from `mincore` on the object itself
/// (mapped, no page faulted in), in parallel. The inode counts come from the index: distinct
/// objects plus each guest's own inodes, against each guest's inodes before unification.
///
/// # Errors
/// Index errors, reading the mount table; an object that cannot be read counts as not
/// resident.
pub fn memory_stats(root: &HostRoot, top: usize) -> Result<MemoryStats> {
    let table = MountTable::own().at("/proc/self/mountinfo")?;
    let mut mounted: Vec<(i64, String, GuestPaths)> = Vec::new();
    for name in crate::guest::guest_names(root)? {
        let paths = GuestPaths::new(root, &guest_record(root, &name)?);
        if let MountState::Mounted { .. } = state_in(&table, &paths) {
            mounted.push((root.index.guest_id(&name)?, name, paths));
        }
    }
    let mut stats = MemoryStats {
        mounted_guests: mounted.iter().map(|(_, n, _)| n.clone()).collect(),
        inode_object_bytes: inode_object_bytes(),
        ..MemoryStats::default()
    };
    let idx = &root.index;
    let q = |sql: &str, id: i64| -> Result<u64> {
        idx.conn
            .query_row(sql, [id], |r| r.get::<_, Option<i64>>(0))
            .map(|v| v.unwrap_or(0) as u64)
            .map_err(|e| idx.err(e))
    };
    // Per object: the mounted guests that read it, and one example path.
    let mut readers: BTreeMap<i64, (String, u64, u64, String)> = BTreeMap::new();
    for (id, name, paths) in &mounted {
        stats.files += q("SELECT COUNT(*) FROM paths WHERE guest_id = ?1", *id)?;
        stats.inodes_unshared += q(
            &format!("SELECT COUNT(DISTINCT {ORIGINAL_INODE}) FROM paths f WHERE f.guest_id = ?1"),
            *id,
        )?;
        stats.inodes += q(
            "SELECT COUNT(DISTINCT ino) FROM paths WHERE guest_id = ?1 AND object_id IS NULL",
            *id,
        )?;
        let upper = fsx::open_dir(&paths.upper)?;
        let mut stmt = idx
            .conn
            .prepare(
                "SELECT f.object_id, o.name, o.size, f.path FROM paths f
                 JOIN objects o ON o.id = f.object_id WHERE f.guest_id = ?1 ORDER BY f.object_id",
            )
            .map_err(|e| idx.err(e))?;
        let mut rows = stmt.query([id]).map_err(|e| idx.err(e))?;
        let mut last = None;
        while let Some(r) = rows.next().map_err(|e| idx.err(e))? {
            let object: i64 = r.get(0).map_err(|e| idx.err(e))?;
            let path: Vec<u8> = r.get(3).map_err(|e| idx.err(e))?;
            if last == Some(object) || shadowed(upper.as_fd(), &path) {
                continue;
            }
            last = Some(object);
            let entry = readers.entry(object).or_insert_with(|| {
                let mut abs = b"/".to_vec();
                abs.extend_from_slice(&path);
                (
                    r.get(1).unwrap_or_default(),
                    r.get::<_, i64>(2).unwrap_or(0) as u64,
                    0,
                    format!("{name}:{}", display_path(&abs)),
                )
            });
            entry.2 += 1;
        }
    }
    stats.inodes += distinct_objects(root, &mounted)?;
    stats.objects = readers.len() as u64;
    let objects = root.objects_fd();
    let mut measured: Vec<MemoryObject> = readers
        .into_par_iter()
        .map(|(_, (object, size, guests, example))| {
            let flags = OFlag::O_RDONLY | OFlag::O_NONBLOCK;
            let resident = fsx::open_beneath(objects, store::object_rel(&object).as_bytes(), flags)
                .ok()
                .and_then(|fd| crate::sys::resident_bytes(&fd, size).ok())
                .unwrap_or(0);
            MemoryObject {
                object,
                guests,
                resident_bytes: resident,
                saved_bytes: resident * guests.saturating_sub(1),
                example,
            }
        })
        .collect();
    stats.resident_bytes = measured.iter().map(|o| o.resident_bytes).sum();
    stats.page_cache_saved_bytes = measured.iter().map(|o| o.saved_bytes).sum();
    stats.inode_cache_saved_bytes = stats
        .inode_object_bytes
        .map(|b| stats.inodes_unshared.saturating_sub(stats.inodes) * b);
    measured.sort_by(|a, b| {
        b.saved_bytes
            .cmp(&a.saved_bytes)
            .then(a.object.cmp(&b.object))
    });
    measured.truncate(top);
    stats.top = measured;
    Ok(stats)
}

/// Store objects linked by any of the mounted guests.
fn distinct_objects(root: &HostRoot, mounted: &[(i64, String, GuestPaths)]) -> Result<u64> {
    let idx = &root.index;
    let mut seen = HashSet::new();
    for (id, _, _) in mounted {
        let mut stmt = idx
            .conn
            .prepare_cached(
                "SELECT DISTINCT object_id FROM paths WHERE guest_id = ?1 AND object_id IS NOT NULL",
            )
            .map_err(|e| idx.err(e))?;
        let ids = stmt
            .query_map([id], |r| r.get::<_, i64>(0))
            .and_then(|rows| rows.collect::<rusqlite::Result<Vec<i64>>>())
            .map_err(|e| idx.err(e))?;
        seen.extend(ids);
    }
    Ok(seen.len() as u64)
}
