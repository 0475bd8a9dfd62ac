//! Crash recovery, run by every writer before it starts: finish adoptions, remove leftover
//! temporary links, restore directory mtimes and immutable flags, empty `store/tmp`.

use std::ffi::OsStr;
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::ffi::OsStrExt;

use rusqlite::OptionalExtension;

use crate::error::{PathContext, Result};
use crate::fsx;
use crate::guest::recover_adoptions;
use crate::root::HostRoot;
use crate::store::{self, TEMP_PREFIX};

/// Repairs what a killed run left behind.
///
/// # Algorithm
/// * `guests/.NAME.adopting` with a `base` is renamed to `guests/NAME`, without one removed;
///   `guests/.NAME.destroying`, `guests/.NAME.creating`, `templates/*/.building` and
///   `templates/*/.removing.*` are removed, with the index rows of template trees that are
///   gone; the `chattr` flags a fold journalled are set.
/// * Each journalled directory is listed; every `.cowherd~…` entry whose inode is a store
///   object's (per the index, confirmed on the object itself) is unlinked — it is a second name
///   of a store object, never guest data. Object rows are committed before any replacement;
///   then the directory's mtime is set back to the journalled one.
/// * Objects whose immutable flag was cleared for linking get it back.
/// * `store/tmp` is emptied (unfinished copies, never linked anywhere).
///
/// # Errors
/// Index errors and I/O errors other than "gone".
pub(crate) fn recover(root: &HostRoot) -> Result<()> {
    recover_adoptions(root)?;
    crate::guest::recover_destroys(root)?;
    crate::create::recover_template_builds(root)?;
    crate::guest::apply_flag_journal(root, None)?;
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
