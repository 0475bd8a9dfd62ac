//! Scan: walk a guest's base tree and bring its rows in the index up to date, one stat per file.

use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;

use rusqlite::{OptionalExtension, params};

use crate::error::{PathContext, Result};
use crate::fsx::{self, Stat};
use crate::guest::OpenGuest;
use crate::progress::Progress;
use crate::report::{Failure, UnifyReport};
use crate::root::HostRoot;
use crate::store::TEMP_PREFIX;

/// Rows written per transaction.
const BATCH: usize = 4096;

/// Walks `guest` and updates its `files` rows.
///
/// # Algorithm
/// The walk starts at the guest's already-opened base directory (through `/proc/self/fd`, so
/// a base swapped for a symlink meanwhile is not followed), never follows symlinks and never
/// leaves the filesystem. For each regular file one `lstat` decides:
/// * a path still linked to its store object (same inode as recorded) — nothing to do;
/// * same inode, size, mtime and ctime as recorded — unchanged, hashes kept;
/// * otherwise — new or changed: the row is rewritten and its hashes cleared.
///
/// Rows not seen (deleted files) are found without a write per unchanged file: if fewer
/// recorded rows were seen than exist, each recorded path is checked once more.
///
/// # Errors
/// Index errors abort; a file or directory that cannot be read is reported in
/// `report.failures` and skipped.
pub(crate) fn scan_guest(
    root: &HostRoot,
    guest: &OpenGuest,
    report: &mut UnifyReport,
    progress: &dyn Progress,
) -> Result<()> {
    let idx = &root.index;
    let proc_path = format!("/proc/self/fd/{}", guest.base_fd.as_raw_fd());
    let prefix_len = proc_path.len() + 1;
    let existing: i64 = idx
        .conn
        .query_row(
            "SELECT COUNT(*) FROM files WHERE guest_id = ?1",
            [guest.id],
            |r| r.get(0),
        )
        .map_err(|e| idx.err(e))?;
    let mut seen_existing: i64 = 0;

    let tx = idx.conn.unchecked_transaction().map_err(|e| idx.err(e))?;
    let mut pending = 0usize;
    {
        let mut select = idx
            .conn
            .prepare_cached(
                "SELECT ino, size, mtime_ns, ctime_ns, object_id, marker
                 FROM files WHERE guest_id = ?1 AND path = ?2",
            )
            .map_err(|e| idx.err(e))?;
        let mut insert = idx
            .conn
            .prepare_cached(
                "INSERT OR REPLACE INTO files(guest_id, path, dev, ino, nlink, size, blocks, mtime_ns,
                    ctime_ns, mode, uid, gid, marker, phash, chash, xhash, object_id, orig_ino,
                    orig_blocks, gen)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, NULL, NULL, NULL,
                    NULL, ?4, ?7, 0)",
            )
            .map_err(|e| idx.err(e))?;
        let mut set_marker = idx
            .conn
            .prepare_cached("UPDATE files SET marker = ?3 WHERE guest_id = ?1 AND path = ?2")
            .map_err(|e| idx.err(e))?;

        let mut abs = Vec::with_capacity(256);
        let walker = walkdir::WalkDir::new(&proc_path)
            .follow_links(false)
            .same_file_system(true);
        for entry in walker {
            let entry = match entry {
                Ok(e) => e,
                Err(e) => {
                    let rel = e
                        .path()
                        .map(|p| {
                            p.as_os_str()
                                .as_bytes()
                                .get(prefix_len..)
                                .unwrap_or(b"")
                                .to_vec()
                        })
                        .unwrap_or_default();
                    report
                        .failures
                        .push(Failure::new(guest, &rel, e.to_string()));
                    continue;
                }
            };
            if !entry.file_type().is_file() {
                continue;
            }
            let full = entry.path().as_os_str().as_bytes();
            let rel = &full[prefix_len.min(full.len())..];
            if entry.file_name().as_bytes().starts_with(TEMP_PREFIX) {
                continue;
            }
            let st = match entry.metadata() {
                Ok(m) => Stat::from(&m),
                Err(e) => {
                    report
                        .failures
                        .push(Failure::new(guest, rel, e.to_string()));
                    continue;
                }
            };
            report.files_scanned += 1;
            progress.advance(1);
            abs.clear();
            abs.push(b'/');
            abs.extend_from_slice(rel);
            let marker = guest.policy.marker_for(&abs).code();

            type Row = (i64, i64, i64, i64, Option<i64>, i64);
            let row: Option<Row> = select
                .query_row(params![guest.id, rel], |r| {
                    Ok((
                        r.get(0)?,
                        r.get(1)?,
                        r.get(2)?,
                        r.get(3)?,
                        r.get(4)?,
                        r.get(5)?,
                    ))
                })
                .optional()
                .map_err(|e| idx.err(e))?;
            let unchanged = match row {
                Some((ino, size, mtime, ctime, object, _)) => {
                    seen_existing += 1;
                    let same_inode = ino as u64 == st.ino;
                    (same_inode && object.is_some())
                        || (same_inode
                            && size as u64 == st.size
                            && mtime == st.mtime_ns
                            && ctime == st.ctime_ns)
                }
                None => false,
            };
            if unchanged {
                if row.is_some_and(|r| r.5 != marker) {
                    set_marker
                        .execute(params![guest.id, rel, marker])
                        .map_err(|e| idx.err(e))?;
                    pending += 1;
                }
            } else {
                if row.is_some() {
                    report.files_changed += 1;
                } else {
                    report.files_new += 1;
                }
                insert
                    .execute(params![
                        guest.id,
                        rel,
                        st.dev as i64,
                        st.ino as i64,
                        st.nlink as i64,
                        st.size as i64,
                        st.blocks as i64,
                        st.mtime_ns,
                        st.ctime_ns,
                        st.mode,
                        st.uid,
                        st.gid,
                        marker
                    ])
                    .map_err(|e| idx.err(e))?;
                pending += 1;
            }
            if pending >= BATCH {
                idx.conn
                    .execute_batch("COMMIT; BEGIN")
                    .map_err(|e| idx.err(e))?;
                pending = 0;
            }
        }
    }
    tx.commit().map_err(|e| idx.err(e))?;

    if seen_existing < existing {
        report.files_removed += drop_vanished(root, guest)?;
    }
    // A hardlink group whose paths got different markers is left alone (treated as private).
    idx.exec(
        "UPDATE files SET marker = 0 WHERE guest_id = ?1 AND object_id IS NULL AND nlink > 1
           AND ino IN (SELECT ino FROM files WHERE guest_id = ?1 AND nlink > 1
                       GROUP BY ino HAVING MIN(marker) <> MAX(marker))",
        [guest.id],
    )?;
    Ok(())
}

/// Deletes the rows of paths that are gone or no longer regular files.
fn drop_vanished(root: &HostRoot, guest: &OpenGuest) -> Result<u64> {
    let idx = &root.index;
    let paths: Vec<Vec<u8>> = {
        let mut stmt = idx
            .conn
            .prepare("SELECT path FROM files WHERE guest_id = ?1")
            .map_err(|e| idx.err(e))?;
        stmt.query_map([guest.id], |r| r.get(0))
            .and_then(|rows| rows.collect())
            .map_err(|e| idx.err(e))?
    };
    let tx = idx.conn.unchecked_transaction().map_err(|e| idx.err(e))?;
    let mut removed = 0;
    for rel in paths {
        let gone = match fsx::open_beneath(guest.base(), &rel, nix::fcntl::OFlag::O_PATH) {
            Ok(fd) => !fsx::fstat(&fd).at(guest.host_path(&rel))?.is_file(),
            Err(_) => true,
        };
        if gone {
            idx.exec(
                "DELETE FROM files WHERE guest_id = ?1 AND path = ?2",
                params![guest.id, rel],
            )?;
            removed += 1;
        }
    }
    tx.commit().map_err(|e| idx.err(e))?;
    Ok(removed)
}
