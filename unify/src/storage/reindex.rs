//! `index rebuild`: a lost or damaged `index.db` made again from the store and the guests.

use std::path::Path;

use rayon::prelude::*;
use serde::Serialize;

use crate::error::{Error, Result};
use crate::guest::guest_names;
use crate::policy::Marker;
use crate::progress::{Phase, Progress};
use crate::report::Failure;
use crate::root::{Access, HostRoot};
use crate::store::{self, ObjectSpec};
use crate::verify::{Problem, list_store, read_object};

/// What [`rebuild_index`] did.
#[derive(Clone, Debug, Default, Serialize)]
pub struct RebuildReport {
    /// The damaged index kept aside (renamed), if there was one that could not be opened.
    pub damaged_kept_as: Option<String>,
    /// Store objects found again (re-hashed and recorded).
    pub objects: u64,
    /// Their bytes.
    pub object_bytes: u64,
    /// Immutable objects whose missing flag was set again.
    pub flags_restored: u64,
    /// Store entries not recorded: not objects, unreadable, or no longer matching their name
    /// (`cowherd verify` says more, `verify --repair` fixes what it can).
    pub skipped: Vec<Problem>,
    /// Guests scanned.
    pub guests: Vec<String>,
    /// Their files.
    pub files: u64,
    /// Of those, links of store objects.
    pub linked_files: u64,
    /// Files or guests that could not be read.
    pub failures: Vec<Failure>,
}

/// Makes the index of the root at `path` again: every store object re-hashed and recorded
/// (found by its name, as a run does), then every guest scanned, its store links recognised
/// by inode. An index that still opens is emptied (after the recovery every writer runs); one
/// that does not, or whose rows SQLite finds damaged, is kept aside as
/// `index.db.damaged-<unix time>`. Template trees are not
/// guests: the caller rescans them with [`crate::unify_tree`] under their policies. Returns
/// the root, open for writing.
///
/// # Errors
/// [`Error::NotARoot`] if `path` holds no layout, [`Error::Locked`], I/O errors on the store,
/// index errors.
pub fn rebuild_index(path: &Path, progress: &dyn Progress) -> Result<(HostRoot, RebuildReport)> {
    let mut report = RebuildReport::default();
    let db = path.join("index.db");
    let root = if std::fs::symlink_metadata(&db).is_ok() {
        match HostRoot::open(path, Access::Write) {
            Ok(root) => match empty_index(&root) {
                Ok(()) => root,
                // Damage the open could not see (it reads the schema and the journal only).
                Err(Error::Index { error, .. }) if crate::index::is_damaged(&error) => {
                    drop(root);
                    keep_damaged_aside(path, &mut report)?
                }
                Err(e) => return Err(e),
            },
            Err(Error::Index { .. } | Error::BadRecord { .. }) => {
                keep_damaged_aside(path, &mut report)?
            }
            Err(e) => return Err(e),
        }
    } else {
        HostRoot::open_new_index(path)?
    };
    record_objects(&root, &mut report, progress)?;
    let names = guest_names(&root)?;
    let scanned = crate::unify::rescan(&root, &names, progress)?;
    report.guests = scanned.guests;
    report.failures = scanned.failures;
    let (files, linked): (i64, i64) = root
        .index
        .conn
        .query_row("SELECT COUNT(*), COUNT(object_id) FROM files", [], |r| {
            Ok((r.get(0)?, r.get(1)?))
        })
        .map_err(|e| root.index.err(e))?;
    report.files = files as u64;
    report.linked_files = linked as u64;
    Ok((root, report))
}

/// Empties an index that opens: every row goes, the file stays.
fn empty_index(root: &HostRoot) -> Result<()> {
    root.index
        .conn
        .execute_batch(
            "BEGIN; DELETE FROM files; DELETE FROM dirs; DELETE FROM objects;
             DELETE FROM guests; COMMIT; VACUUM;",
        )
        .map_err(|e| root.index.err(e))
}

/// Renames the damaged `index.db` of the root at `path` to `index.db.damaged-<unix time>`
/// (its WAL files dropped) and opens the root with a new, empty index.
fn keep_damaged_aside(path: &Path, report: &mut RebuildReport) -> Result<HostRoot> {
    let db = path.join("index.db");
    let kept = path.join(format!("index.db.damaged-{}", unix_now()));
    std::fs::rename(&db, &kept).map_err(|e| Error::Io {
        path: db.clone(),
        error: e,
    })?;
    for side in ["index.db-wal", "index.db-shm"] {
        let _ = std::fs::remove_file(path.join(side));
    }
    report.damaged_kept_as = Some(kept.display().to_string());
    HostRoot::open_new_index(path)
}

/// Re-hashes every store object in parallel and records those whose name still matches what
/// they hold; sets a missing immutable flag again.
fn record_objects(
    root: &HostRoot,
    report: &mut RebuildReport,
    progress: &dyn Progress,
) -> Result<()> {
    let (names, strays) = list_store(root)?;
    report
        .skipped
        .extend(strays.into_iter().map(|what| Problem {
            what,
            problem:
                "not a store object; `cowherd verify --repair` moves it to store/lost+found".into(),
        }));
    let total: u64 = names
        .iter()
        .filter_map(|n| {
            crate::fsx::lstat_at(root.objects_fd(), store::object_rel(n).as_bytes()).ok()
        })
        .map(|s| s.size)
        .sum();
    progress.start(Phase::Verify, Some(total));
    let objects_fd = root.objects_fd();
    let read: Vec<_> = names
        .par_iter()
        .map(|name| {
            let out = read_object(objects_fd, name);
            progress.advance(match &out {
                Ok(r) => r.st.size,
                Err((size, _)) => *size,
            });
            (name, out)
        })
        .collect();
    progress.finish();
    let idx = &root.index;
    let tx = idx.conn.unchecked_transaction().map_err(|e| idx.err(e))?;
    for (name, out) in read {
        let object = match out {
            Ok(object) => object,
            Err((_, why)) => {
                report.skipped.push(Problem {
                    what: name.clone(),
                    problem: why,
                });
                continue;
            }
        };
        let Some(ign_mtime) = object.ign_mtime else {
            report.skipped.push(Problem {
                what: name.clone(),
                problem: "content or metadata no longer match its key; \
                          `cowherd verify --repair` files it under its new key"
                    .into(),
            });
            continue;
        };
        let parts = crate::key::KeyParts {
            mtime_ns: (!ign_mtime).then_some(object.st.mtime_ns),
            ..object.parts
        };
        let spec = ObjectSpec {
            parts: &parts,
            kind: object.kind,
            ign_mtime,
        };
        store::record_object(root, &spec, name, object.seq, &object.st)?;
        if object.kind == Marker::Immutable && !object.immutable {
            store::set_object_immutable(root, name, true)?;
            report.flags_restored += 1;
        }
        report.objects += 1;
        report.object_bytes += object.st.size;
    }
    tx.commit().map_err(|e| idx.err(e))
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}
