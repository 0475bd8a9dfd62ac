//! Crash recovery, run by every writer before it starts: finish adoptions, remove leftover
//! temporary links, restore directory mtimes and immutable flags, empty `store/tmp`.

use std::ffi::OsStr;
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::ffi::OsStrExt;

use rusqlite::OptionalExtension;

use crate::error::{PathContext, Result};
use crate::fsx;
use crate::guest::{DESTROYING, recover_adoptions};
use crate::root::HostRoot;
use crate::store::{self, TEMP_PREFIX};

/// Repairs what a killed run left behind.
///
/// # Algorithm
/// * `guests/.NAME.adopting` with a `base` is renamed to `guests/NAME`, without one removed;
///   `guests/.NAME.destroying` (with the index rows of guest NAME, if a kill came before
///   `destroy` dropped them), `guests/.NAME.creating`, `templates/*/.building` and
///   `templates/*/.removing.*` are removed, with the index rows of template trees that are
///   gone; the `chattr` flags a fold journalled are set.
/// * Each journalled directory is listed; every `.cowherd~…` entry whose inode is a store
///   object's (per the index, confirmed on the object itself) is unlinked — it is a second name
///   of a store object, never guest data. Object rows are committed before any replacement;
///   then the directory's mtime is set back to the journalled one.
/// * Objects whose immutable flag was cleared for linking get it back.
/// * An object `verify --repair` renamed to its new key (a `rekey` journal row) gets its index
///   row renamed too, if the kill came between the two ([`rename_object_row`]).
/// * `store/tmp` is emptied (unfinished copies, never linked anywhere), and `cache/` (a
///   killed upgrade's downloads).
///
/// # Errors
/// Index errors and I/O errors other than "gone".
pub(crate) fn recover(root: &HostRoot) -> Result<()> {
    recover_adoptions(root)?;
    forget_destroyed(root)?;
    crate::guest::recover_destroys(root)?;
    crate::create::recover_template_builds(root)?;
    crate::guest::apply_flag_journal(root, None)?;
    finish_rekeys(root)?;
    crate::snapshot::recover_snapshots(root)?;
    let idx = &root.index;
    let rows: Vec<(i64, Option<i64>, Vec<u8>, i64)> = {
        let mut stmt = idx
            .conn
            .prepare("SELECT id, guest_id, path, value FROM journal WHERE op = 'dir'")
            .map_err(|e| idx.err(e))?;
        stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))
            .and_then(|rows| rows.collect())
            .map_err(|e| idx.err(e))?
    };
    for (id, guest_id, dir, mtime) in rows {
        let name: Option<String> = idx
            .conn
            .query_row("SELECT name FROM guests WHERE id = ?1", [guest_id], |r| {
                r.get(0)
            })
            .optional()
            .map_err(|e| idx.err(e))?;
        if let Some(name) = name {
            clean_dir(root, &name, &dir, mtime)?;
        }
        idx.exec("DELETE FROM journal WHERE id = ?1", [id])?;
    }
    if let Some(e) = store::restore_immutable(root)?.into_iter().next() {
        return Err(e);
    }
    // A killed upgrade's download cache (`cache/upgrade-PID`): a writer holds the lock, so
    // no other run is using one.
    if let Ok(entries) = std::fs::read_dir(root.path().join("cache")) {
        for entry in entries.flatten() {
            let rel = std::path::Path::new("cache").join(entry.file_name());
            let _ = crate::create::remove_below_root(root, &rel);
        }
    }
    let tmp = root.tmp_dir();
    for entry in std::fs::read_dir(&tmp).at(&tmp)? {
        let entry = entry.at(&tmp)?;
        let _ = nix::unistd::unlinkat(
            root.tmp_fd(),
            entry.file_name().as_os_str(),
            nix::unistd::UnlinkatFlags::NoRemoveDir,
        );
    }
    Ok(())
}

/// Drops the index rows of each guest a killed `destroy` renamed for removal
/// (`guests/.NAME.destroying`), as `destroy` does right after the rename: its files,
/// directories, journal rows and name. Left alone if a guest NAME exists again.
///
/// # Errors
/// Index errors, and an unreadable `guests/`.
fn forget_destroyed(root: &HostRoot) -> Result<()> {
    let dir = root.guests_dir();
    for entry in std::fs::read_dir(&dir).at(&dir)? {
        let entry = entry.at(&dir)?.file_name();
        let Some(name) = entry
            .to_str()
            .and_then(|n| n.strip_prefix('.'))
            .and_then(|n| n.strip_suffix(DESTROYING))
        else {
            continue;
        };
        if std::fs::symlink_metadata(dir.join(name)).is_ok() {
            continue;
        }
        let idx = &root.index;
        let id: Option<i64> = idx
            .conn
            .query_row("SELECT id FROM guests WHERE name = ?1", [name], |r| {
                r.get(0)
            })
            .optional()
            .map_err(|e| idx.err(e))?;
        let Some(id) = id else { continue };
        let tx = idx.conn.unchecked_transaction().map_err(|e| idx.err(e))?;
        idx.drop_rows(id)?;
        idx.exec("DELETE FROM journal WHERE guest_id = ?1", [id])?;
        idx.exec("DELETE FROM guests WHERE id = ?1", [id])?;
        tx.commit().map_err(|e| idx.err(e))?;
    }
    Ok(())
}

/// The journal's op for a store object being renamed to a new key (`verify --repair`); its
/// path is `OLD/NEW` (object names hold no `/`).
const REKEY: &str = "rekey";

/// Journals (committed) that store object `old` is about to be renamed to `new`; returns the
/// journal row, to delete once the object's index row is renamed too.
///
/// # Errors
/// Index errors.
pub(crate) fn journal_rekey(root: &HostRoot, old: &str, new: &str) -> Result<i64> {
    let idx = &root.index;
    idx.exec(
        "INSERT INTO journal(op, path) VALUES (?1, ?2)",
        rusqlite::params![REKEY, format!("{old}/{new}").as_bytes()],
    )?;
    Ok(idx.conn.last_insert_rowid())
}

/// Gives the index row of store object `old`, renamed to `new` in the store, that name and the
/// file's stat, in one transaction; a row left for `new` by an object gone since makes way (the
/// guests' rows that named it are cleared: the next unify rescans them). Returns whether a row
/// names the object now: `false` if `old` had none (the caller records it), or if the rename
/// did not happen (`old` still there, or `new` missing: nothing is changed).
///
/// # Errors
/// Index errors.
pub(crate) fn rename_object_row(root: &HostRoot, old: &str, new: &str) -> Result<bool> {
    let at = |name: &str| fsx::lstat_at(root.objects_fd(), store::object_rel(name).as_bytes());
    let (Err(_), Ok(st)) = (at(old), at(new)) else {
        return Ok(false);
    };
    let Some((_, _, seq)) = store::parse_object_name(new) else {
        return Ok(false);
    };
    let idx = &root.index;
    let tx = idx.conn.unchecked_transaction().map_err(|e| idx.err(e))?;
    let row = |name: &str| -> Result<Option<(i64, i64)>> {
        idx.conn
            .query_row("SELECT id, ino FROM objects WHERE name = ?1", [name], |r| {
                Ok((r.get(0)?, r.get(1)?))
            })
            .optional()
            .map_err(|e| idx.err(e))
    };
    let (old_row, new_row) = (row(old)?, row(new)?);
    if old_row.is_none() && new_row.is_some_and(|(_, ino)| ino as u64 == st.ino) {
        // Renamed already.
        return Ok(true);
    }
    if let Some((leftover, _)) = new_row {
        idx.exec(
            "UPDATE files SET object_id = NULL WHERE object_id = ?1",
            [leftover],
        )?;
        idx.exec("DELETE FROM objects WHERE id = ?1", [leftover])?;
    }
    let Some((id, _)) = old_row else {
        tx.commit().map_err(|e| idx.err(e))?;
        return Ok(false);
    };
    idx.exec(
        "UPDATE objects SET name = ?2, seq = ?3, size = ?4, mode = ?5, uid = ?6, gid = ?7,
                            mtime_ns = ?8, blocks = ?9, ino = ?10
         WHERE id = ?1",
        rusqlite::params![
            id,
            new,
            seq,
            st.size as i64,
            st.mode,
            st.uid,
            st.gid,
            st.mtime_ns,
            st.blocks as i64,
            st.ino as i64
        ],
    )?;
    tx.commit().map_err(|e| idx.err(e))?;
    Ok(true)
}

/// Finishes the renames of store objects that a killed `verify --repair` journalled: the row
/// of each object renamed follows it; an object not renamed yet keeps its name (and the next
/// `verify --repair` files it again).
fn finish_rekeys(root: &HostRoot) -> Result<()> {
    let idx = &root.index;
    let rows: Vec<(i64, Vec<u8>)> = {
        let mut stmt = idx
            .conn
            .prepare("SELECT id, path FROM journal WHERE op = ?1")
            .map_err(|e| idx.err(e))?;
        stmt.query_map([REKEY], |r| Ok((r.get(0)?, r.get(1)?)))
            .and_then(|rows| rows.collect())
            .map_err(|e| idx.err(e))?
    };
    for (id, path) in rows {
        let names = std::str::from_utf8(&path)
            .ok()
            .and_then(|p| p.split_once('/'));
        if let Some((old, new)) = names {
            rename_object_row(root, old, new)?;
        }
        idx.exec("DELETE FROM journal WHERE id = ?1", [id])?;
    }
    Ok(())
}

/// Removes our temporary links from one guest directory and restores its mtime.
fn clean_dir(root: &HostRoot, guest: &str, dir: &[u8], mtime: i64) -> Result<()> {
    let mut rel = format!("{guest}/base").into_bytes();
    if !dir.is_empty() {
        rel.push(b'/');
        rel.extend_from_slice(dir);
    }
    let Ok(fd) = fsx::open_dir_beneath(root.guests_fd(), &root.guests_dir(), &rel) else {
        return Ok(());
    };
    let shown = fsx::join(&root.guests_dir(), &rel);
    let listing = format!("/proc/self/fd/{}", fd.as_raw_fd());
    for entry in std::fs::read_dir(&listing).at(&shown)? {
        let entry = entry.at(&shown)?;
        let file_name = entry.file_name();
        let name = file_name.as_bytes();
        if !name.starts_with(TEMP_PREFIX) {
            continue;
        }
        let Ok(ours) = fsx::lstat_at(fd.as_fd(), name) else {
            continue;
        };
        // Ours only if it is a second name of a store object.
        if let Some(object) = store::object_of_inode(root, &ours)? {
            let object = object.as_str();
            let immutable = store::object_is_immutable(root, object).unwrap_or(false);
            if immutable {
                store::set_object_immutable(root, object, false)?;
            }
            nix::unistd::unlinkat(
                fd.as_fd(),
                OsStr::from_bytes(name),
                nix::unistd::UnlinkatFlags::NoRemoveDir,
            )
            .at(fsx::join(&shown, name))?;
            if immutable {
                store::set_object_immutable(root, object, true)?;
            }
        }
    }
    fsx::set_mtime(&fd, mtime).at(&shown)?;
    Ok(())
}
