//! `stats` and `gc`: reading the index and the store back.

use serde::Serialize;

use crate::error::{PathContext, Result};
use crate::fsx;
use crate::guest::guest_names;
use crate::index::ORIGINAL_INODE;
use crate::report::display_path;
use crate::root::HostRoot;
use crate::store;

/// One guest's numbers in [`Stats`].
#[derive(Clone, Debug, Serialize)]
pub struct GuestStats {
    /// The guest.
    pub name: String,
    /// Regular files indexed.
    pub files: u64,
    /// Of those, linked to store objects.
    pub linked_files: u64,
    /// Allocated bytes of its files as independent copies (original hardlinks counted once).
    pub logical_bytes: u64,
    /// Allocated bytes of its own (unlinked) inodes.
    pub private_bytes: u64,
    /// Allocated bytes of the store objects it links to.
    pub shared_bytes: u64,
    /// Its private bytes plus its share of each object it links to (the object's bytes divided
    /// by the number of guests linking it).
    pub physical_bytes: u64,
    /// `logical_bytes - physical_bytes`.
    pub saved_bytes: u64,
    /// When it was last unified (seconds since the epoch).
    pub last_unify: Option<i64>,
    /// Its snapshots (counted apart: none of the figures above includes them).
    pub snapshots: u64,
    /// Allocated bytes only its snapshots hold, store objects only they link among them (what
    /// removing them all would free, the objects with the next `gc`).
    pub snapshot_bytes: u64,
}

/// Whole-root numbers in [`Stats`].
#[derive(Clone, Debug, Serialize)]
pub struct Totals {
    /// Guests.
    pub guests: u64,
    /// Regular files indexed.
    pub files: u64,
    /// Store objects.
    pub objects: u64,
    /// Sum of the guests' logical bytes.
    pub logical_bytes: u64,
    /// Bytes actually allocated: every distinct inode once (private inodes and objects).
    pub physical_bytes: u64,
    /// `logical_bytes - physical_bytes`.
    pub saved_bytes: u64,
    /// `logical_bytes / physical_bytes`.
    pub ratio: f64,
    /// The index's size on disk (`index.db` and its write-ahead log).
    pub index_bytes: u64,
    /// Snapshots of all guests (counted apart: not in the figures above).
    pub snapshots: u64,
    /// Allocated bytes only snapshots hold.
    pub snapshot_bytes: u64,
}

/// A store object and what sharing it saves.
#[derive(Clone, Debug, Serialize)]
pub struct TopObject {
    /// The object's name.
    pub object: String,
    /// Indexed paths linked to it.
    pub links: u64,
    /// Its size.
    pub size: u64,
    /// Allocated bytes saved by sharing it (`(links - 1) * blocks`).
    pub saved_bytes: u64,
    /// One path linked to it, `guest:/path`.
    pub example: String,
}

/// What `cowherd stats` shows, from the index as of each guest's last unify.
#[derive(Clone, Debug, Serialize)]
pub struct Stats {
    /// Per guest.
    pub guests: Vec<GuestStats>,
    /// For the whole root.
    pub total: Totals,
    /// The objects that save the most.
    pub top: Vec<TopObject>,
}

/// Computes [`Stats`] from the index.
///
/// # Errors
/// Index errors.
pub fn stats(root: &HostRoot, top: usize) -> Result<Stats> {
    let idx = &root.index;
    let c = &idx.conn;
    let q = |sql: &str, p: &[&dyn rusqlite::ToSql]| -> Result<i64> {
        c.query_row(sql, p, |r| r.get::<_, Option<i64>>(0))
            .map(|v| v.unwrap_or(0))
            .map_err(|e| idx.err(e))
    };
    // Once for all guests: the (guest, object) pairs, and per object how many guests link it.
    c.execute_batch(
        "DROP TABLE IF EXISTS temp.og; DROP TABLE IF EXISTS temp.ogn;
         CREATE TEMP TABLE og AS SELECT DISTINCT guest_id, object_id FROM paths
             WHERE object_id IS NOT NULL;
         CREATE INDEX temp.og_guest ON og(guest_id);
         CREATE TEMP TABLE ogn AS SELECT object_id, COUNT(*) AS n FROM og GROUP BY object_id;
         CREATE UNIQUE INDEX temp.ogn_object ON ogn(object_id);",
    )
    .map_err(|e| idx.err(e))?;
    let mut guests = Vec::new();
    for name in guest_names(root)? {
        let (snapshots, snapshot_bytes) = crate::snapshot::snapshot_usage(root, &name)?;
        let Some((id, last_unify)) = c
            .query_row(
                "SELECT id, last_unify FROM guests WHERE name = ?1",
                [&name],
                |r| Ok((r.get::<_, i64>(0)?, r.get::<_, Option<i64>>(1)?)),
            )
            .ok()
        else {
            guests.push(GuestStats {
                name,
                files: 0,
                linked_files: 0,
                logical_bytes: 0,
                private_bytes: 0,
                shared_bytes: 0,
                physical_bytes: 0,
                saved_bytes: 0,
                last_unify: None,
                snapshots,
                snapshot_bytes,
            });
            continue;
        };
        let logical_bytes = 512
            * q(
                &format!(
                    "SELECT SUM(b) FROM (
                       SELECT MAX(CASE WHEN f.object_id IS NULL THEN f.blocks ELSE o.blocks END)
                              AS b
                       FROM paths f LEFT JOIN objects o ON o.id = f.object_id
                       WHERE f.guest_id = ?1 GROUP BY {ORIGINAL_INODE})"
                ),
                &[&id],
            )? as u64;
        let private_bytes = 512
            * q(
                "SELECT SUM(b) FROM (SELECT MAX(blocks) AS b FROM paths
                 WHERE guest_id = ?1 AND object_id IS NULL GROUP BY ino)",
                &[&id],
            )? as u64;
        let (share, shared_blocks): (f64, i64) = c
            .query_row(
                "SELECT COALESCE(SUM(o.blocks * 512.0 / n.n), 0), COALESCE(SUM(o.blocks), 0)
                 FROM og JOIN objects o ON o.id = og.object_id
                 JOIN ogn n ON n.object_id = og.object_id
                 WHERE og.guest_id = ?1",
                [id],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .map_err(|e| idx.err(e))?;
        let (files, linked_files): (i64, i64) = c
            .query_row(
                "SELECT COUNT(*), COUNT(object_id) FROM paths WHERE guest_id = ?1",
                [id],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .map_err(|e| idx.err(e))?;
        let physical_bytes = private_bytes + share.round() as u64;
        guests.push(GuestStats {
            name,
            files: files as u64,
            linked_files: linked_files as u64,
            logical_bytes,
            private_bytes,
            shared_bytes: 512 * shared_blocks as u64,
            physical_bytes,
            saved_bytes: logical_bytes.saturating_sub(physical_bytes),
            last_unify,
            snapshots,
            snapshot_bytes,
        });
    }
    let logical: u64 = guests.iter().map(|g| g.logical_bytes).sum();
    let physical = 512
        * (q(
            "SELECT SUM(b) FROM (SELECT MAX(blocks) AS b FROM files WHERE object_id IS NULL
             GROUP BY ino)",
            &[],
        )? + q("SELECT SUM(blocks) FROM objects", &[])?) as u64;
    let index_bytes = ["index.db", "index.db-wal"]
        .iter()
        .filter_map(|f| std::fs::metadata(root.path().join(f)).ok())
        .map(|m| m.len())
        .sum();
    let total = Totals {
        guests: guests.len() as u64,
        files: guests.iter().map(|g| g.files).sum(),
        objects: q("SELECT COUNT(*) FROM objects", &[])? as u64,
        logical_bytes: logical,
        physical_bytes: physical,
        saved_bytes: logical.saturating_sub(physical),
        ratio: if physical == 0 {
            1.0
        } else {
            logical as f64 / physical as f64
        },
        index_bytes,
        snapshots: guests.iter().map(|g| g.snapshots).sum(),
        snapshot_bytes: guests.iter().map(|g| g.snapshot_bytes).sum(),
    };
    // The objects that save the most, each with one path that links it: a guest's rather than
    // a template's (`@…`), the first by name. One pass over the files for the links, one for
    // the examples.
    c.execute_batch(
        "DROP TABLE IF EXISTS temp.links;
         CREATE TEMP TABLE links AS SELECT object_id, COUNT(*) AS n FROM files
             WHERE object_id IS NOT NULL GROUP BY object_id;",
    )
    .map_err(|e| idx.err(e))?;
    let mut stmt = c
        .prepare(
            "SELECT o.id, o.name, t.n, o.size, o.blocks
             FROM links t JOIN objects o ON o.id = t.object_id
             ORDER BY (t.n - 1) * o.blocks DESC, o.name LIMIT ?1",
        )
        .map_err(|e| idx.err(e))?;
    let rows: Vec<(i64, String, i64, i64, i64)> = stmt
        .query_map([top as i64], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?))
        })
        .and_then(|rows| rows.collect())
        .map_err(|e| idx.err(e))?;
    let wanted: std::collections::HashSet<i64> = rows.iter().map(|r| r.0).collect();
    // Per object, the first (template last, guest name, path) of its paths.
    let mut examples: std::collections::HashMap<i64, (bool, String, Vec<u8>)> = Default::default();
    if !wanted.is_empty() {
        let mut scan = c
            .prepare(
                "SELECT f.object_id, g.name, f.path FROM paths f JOIN guests g ON g.id = f.guest_id
                 WHERE f.object_id IS NOT NULL",
            )
            .map_err(|e| idx.err(e))?;
        let mut all = scan.query([]).map_err(|e| idx.err(e))?;
        while let Some(r) = all.next().map_err(|e| idx.err(e))? {
            let object: i64 = r.get(0).map_err(|e| idx.err(e))?;
            if !wanted.contains(&object) {
                continue;
            }
            let guest: String = r.get(1).map_err(|e| idx.err(e))?;
            let path: Vec<u8> = r.get(2).map_err(|e| idx.err(e))?;
            let candidate = (guest.starts_with('@'), guest, path);
            match examples.get(&object) {
                Some(best) if *best <= candidate => {}
                _ => {
                    examples.insert(object, candidate);
                }
            }
        }
    }
    let mut top = Vec::with_capacity(rows.len());
    for (id, object, links, size, blocks) in rows {
        let (_, guest, path) = examples.remove(&id).unwrap_or_default();
        top.push(TopObject {
            object,
            links: links as u64,
            size: size as u64,
            saved_bytes: ((links - 1).max(0) * blocks * 512) as u64,
            example: format!("{guest}:/{}", display_path(&path)),
        });
    }
    Ok(Stats { guests, total, top })
}

/// What `cowherd gc` removed (or would remove).
#[derive(Clone, Debug, Default, Serialize)]
pub struct GcReport {
    /// Nothing was removed.
    pub dry_run: bool,
    /// Objects removed (or that would be).
    pub removed: Vec<String>,
    /// Their allocated bytes.
    pub removed_bytes: u64,
    /// Objects still linked from somewhere.
    pub kept: u64,
}

/// Removes store objects no guest links to any more (link count 1: only the store's name).
///
/// # Errors
/// I/O errors on the store, index errors.
pub fn gc(root: &HostRoot, dry_run: bool) -> Result<GcReport> {
    let mut report = GcReport {
        dry_run,
        ..GcReport::default()
    };
    let objects_dir = root.objects_dir();
    for fan in std::fs::read_dir(&objects_dir).at(&objects_dir)? {
        let fan = fan.at(&objects_dir)?;
        if !fan.file_type().at(fan.path())?.is_dir() {
            continue;
        }
        for entry in std::fs::read_dir(fan.path()).at(fan.path())? {
            let entry = entry.at(fan.path())?;
            let Ok(name) = entry.file_name().into_string() else {
                continue;
            };
            if store::parse_object_name(&name).is_none() {
                continue;
            }
            let rel = store::object_rel(&name);
            let st = fsx::lstat_at(root.objects_fd(), rel.as_bytes()).at(entry.path())?;
            if st.nlink > 1 {
                report.kept += 1;
                continue;
            }
            report.removed_bytes += st.blocks * 512;
            report.removed.push(name);
        }
    }
    if dry_run || report.removed.is_empty() {
        return Ok(report);
    }
    // The rows go first, in one pass over the files: a row left behind by a kill could name
    // an inode number the filesystem gives to a new object later. An object file left without
    // its row by a kill is found by name, and removed by the next gc.
    let idx = &root.index;
    let tx = idx.conn.unchecked_transaction().map_err(|e| idx.err(e))?;
    idx.conn
        .execute_batch(
            "DROP TABLE IF EXISTS temp.gone;
             CREATE TEMP TABLE gone(id INTEGER PRIMARY KEY);",
        )
        .map_err(|e| idx.err(e))?;
    for name in &report.removed {
        idx.exec(
            "INSERT OR IGNORE INTO gone(id) SELECT id FROM objects WHERE name = ?1",
            [name],
        )?;
    }
    idx.conn
        .execute_batch(
            "UPDATE files SET object_id = NULL WHERE object_id IN (SELECT id FROM gone);
             DELETE FROM objects WHERE id IN (SELECT id FROM gone);
             DROP TABLE temp.gone;",
        )
        .map_err(|e| idx.err(e))?;
    tx.commit().map_err(|e| idx.err(e))?;
    for name in &report.removed {
        if store::object_is_immutable(root, name)? {
            store::set_object_immutable(root, name, false)?;
        }
        let rel = store::object_rel(name);
        nix::unistd::unlinkat(
            root.objects_fd(),
            rel.as_str(),
            nix::unistd::UnlinkatFlags::NoRemoveDir,
        )
        .at(root.objects_dir().join(&rel))?;
    }
    Ok(report)
}

/// A point in the store's history: the newest object so far (see [`already_stored`]).
///
/// # Errors
/// Index errors.
pub fn store_mark(root: &HostRoot) -> Result<i64> {
    root.index
        .conn
        .query_row("SELECT COALESCE(MAX(id), 0) FROM objects", [], |r| r.get(0))
        .map_err(|e| root.index.err(e))
}

/// How much of a guest was in the store already at `mark`: its files linked to objects that
/// existed then.
#[derive(Clone, Debug, Default, Serialize)]
pub struct AlreadyStored {
    /// The guest's regular files.
    pub files: u64,
    /// Their bytes.
    pub bytes: u64,
    /// Of those, files linked to objects older than the mark.
    pub stored_files: u64,
    /// Their bytes.
    pub stored_bytes: u64,
}

/// How much of guest `name` (as of its last unify) links objects that existed at `mark`
/// ([`store_mark`]): for an import, what the store held already.
///
/// # Errors
/// Index errors.
pub fn already_stored(root: &HostRoot, name: &str, mark: i64) -> Result<AlreadyStored> {
    let idx = &root.index;
    idx.conn
        .query_row(
            "SELECT COUNT(*), COALESCE(SUM(size), 0),
                    COALESCE(SUM(object_id IS NOT NULL AND object_id <= ?2), 0),
                    COALESCE(SUM(CASE WHEN object_id IS NOT NULL AND object_id <= ?2 THEN size END), 0)
             FROM paths WHERE guest_id = (SELECT id FROM guests WHERE name = ?1)",
            rusqlite::params![name, mark],
            |r| {
                Ok(AlreadyStored {
                    files: r.get::<_, i64>(0)? as u64,
                    bytes: r.get::<_, i64>(1)? as u64,
                    stored_files: r.get::<_, i64>(2)? as u64,
                    stored_bytes: r.get::<_, i64>(3)? as u64,
                })
            },
        )
        .map_err(|e| idx.err(e))
}
