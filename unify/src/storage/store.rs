//! The content-addressed store: object names, lookup, creation (by adopting a guest's inode or by
//! copying), and the immutable flag.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;

use nix::errno::Errno;
use nix::fcntl::AtFlags;
use nix::fcntl::OFlag;
use nix::sys::stat::Mode;
use rusqlite::{OptionalExtension, params};

use crate::error::{Error, PathContext, Result};
use crate::fsx::{self, Stat, Xattr};
use crate::key::KeyParts;
use crate::policy::Marker;
use crate::root::HostRoot;
use crate::sys;

/// Prefix of the temporary names `unify` links next to a guest file before renaming over it:
/// `.cowherd~<pid>.<n>` in hex. Short on purpose: a long name is likelier not to fit in the
/// directory's last block, and ext4 never gives back a block it adds to a directory. A leftover
/// one is always a second link to a store object recorded in the index.
pub(crate) const TEMP_PREFIX: &[u8] = b".cowherd~";

/// A store object as recorded in the index.
#[derive(Clone, Debug)]
pub(crate) struct Object {
    pub id: i64,
    pub name: String,
    pub ino: u64,
    pub blocks: u64,
}

/// `ab/<name>` for an object named `ab…`.
pub(crate) fn object_rel(name: &str) -> String {
    format!("{}/{}", &name[..2], name)
}

/// The object name for a key, marker and sequence number: `<key>.c0`, `<key>.i1`, …
pub(crate) fn object_name(key: &str, kind: Marker, seq: u32) -> String {
    let letter = if kind == Marker::Immutable { 'i' } else { 'c' };
    format!("{key}.{letter}{seq}")
}

/// Splits an object name into key, marker and sequence number.
pub(crate) fn parse_object_name(name: &str) -> Option<(&str, Marker, u32)> {
    let (key, rest) = name.split_once('.')?;
    if key.len() != 64 || !key.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    let kind = match rest.as_bytes().first()? {
        b'c' => Marker::Cow,
        b'i' => Marker::Immutable,
        _ => return None,
    };
    Some((key, kind, rest[1..].parse().ok()?))
}

/// The temporary name for step `n` of this run.
pub(crate) fn temp_name(n: u64) -> Vec<u8> {
    let mut out = TEMP_PREFIX.to_vec();
    out.extend_from_slice(format!("{:x}.{n:x}", std::process::id()).as_bytes());
    out
}

/// What the index knows of an object, and what a new one is made from.
pub(crate) struct ObjectSpec<'a> {
    pub parts: &'a KeyParts,
    pub kind: Marker,
    pub ign_mtime: bool,
}

impl ObjectSpec<'_> {
    fn name(&self, seq: u32) -> String {
        object_name(&self.parts.key(), self.kind, seq)
    }
}

/// Finds an object for `spec` that can take `needed` more links without its link count
/// passing `max_nlink`.
///
/// Returns the object, or the sequence number a new object must get.
///
/// # Algorithm
/// Tries `<key>.c0`, `.c1`, … in turn: first the index, then the store itself (an object
/// created by a run killed before its index commit is found by name and recorded). The first
/// one whose current link count, plus the links `planned` for it earlier in this run, leaves
/// room for `needed` links is taken.
pub(crate) fn find_object(
    root: &HostRoot,
    spec: &ObjectSpec<'_>,
    needed: u64,
    max_nlink: u64,
    planned: &HashMap<String, u64>,
) -> Result<std::result::Result<Object, u32>> {
    for seq in 0.. {
        let name = spec.name(seq);
        let rel = object_rel(&name);
        let st = match fsx::lstat_at(root.objects_fd(), rel.as_bytes()) {
            Ok(st) => st,
            Err(Errno::ENOENT) => {
                // In a dry run, an object planned but not made still fills up.
                let pending = planned.get(&name).copied().unwrap_or(0);
                if pending > 0 && 1 + pending + needed > max_nlink {
                    continue;
                }
                root.index
                    .exec("DELETE FROM objects WHERE name = ?1", [&name])?;
                return Ok(Err(seq));
            }
            Err(e) => return Err(e).at(root.objects_dir().join(&rel)),
        };
        let object = record_object(root, spec, &name, seq, &st)?;
        let pending = planned.get(&name).copied().unwrap_or(0);
        if st.nlink + pending + needed <= max_nlink {
            return Ok(Ok(object));
        }
    }
    unreachable!("the sequence loop returns")
}

/// Records (or refreshes) the index row of an object found or created at `name`.
pub(crate) fn record_object(
    root: &HostRoot,
    spec: &ObjectSpec<'_>,
    name: &str,
    seq: u32,
    st: &Stat,
) -> Result<Object> {
    let idx = &root.index;
    let existing: Option<(i64, i64)> = idx
        .conn
        .query_row("SELECT id, ino FROM objects WHERE name = ?1", [name], |r| {
            Ok((r.get(0)?, r.get(1)?))
        })
        .optional()
        .map_err(|e| idx.err(e))?;
    let id = match existing {
        Some((id, ino)) if ino as u64 == st.ino => id,
        Some((id, _)) => {
            idx.exec(
                "UPDATE objects SET ino = ?2, blocks = ?3 WHERE id = ?1",
                params![id, st.ino as i64, st.blocks as i64],
            )?;
            id
        }
        None => {
            let p = spec.parts;
            idx.exec(
                "INSERT INTO objects(name, kind, seq, ign_mtime, size, mode, uid, gid, mtime_ns,
                                     blocks, ino)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)",
                params![
                    name,
                    spec.kind.code(),
                    seq,
                    spec.ign_mtime,
                    p.size as i64,
                    p.mode,
                    p.uid,
                    p.gid,
                    st.mtime_ns,
                    st.blocks as i64,
                    st.ino as i64
                ],
            )?;
            idx.conn.last_insert_rowid()
        }
    };
    Ok(Object {
        id,
        name: name.to_string(),
        ino: st.ino,
        blocks: st.blocks,
    })
}

fn ensure_fanout_dir(root: &HostRoot, name: &str) -> Result<()> {
    match nix::sys::stat::mkdirat(
        root.objects_fd(),
        &name[..2],
        Mode::from_bits_truncate(0o755),
    ) {
        Ok(()) | Err(Errno::EEXIST) => Ok(()),
        Err(e) => Err(e).at(root.objects_dir().join(&name[..2])),
    }
}

/// Makes the inode behind `dir`/`file` the new object `<key>.<kind><seq>` by linking it into
/// the store. The caller has checked the inode is unchanged and has no links outside the
/// paths being unified.
pub(crate) fn adopt_inode(
    root: &HostRoot,
    spec: &ObjectSpec<'_>,
    seq: u32,
    dir: BorrowedFd<'_>,
    file: &[u8],
) -> Result<Object> {
    let name = spec.name(seq);
    ensure_fanout_dir(root, &name)?;
    let rel = object_rel(&name);
    let shown = root.objects_dir().join(&rel);
    match nix::unistd::linkat(
        dir,
        OsStr::from_bytes(file),
        root.objects_fd(),
        rel.as_str(),
        AtFlags::empty(),
    ) {
        Ok(()) | Err(Errno::EEXIST) => {}
        Err(e) => return Err(e).at(&shown),
    }
    let st = fsx::lstat_at(root.objects_fd(), rel.as_bytes()).at(&shown)?;
    record_object(root, spec, &name, seq, &st)
}

/// Creates the new object `<key>.<kind><seq>` as a copy of the open file `src`: content
/// (holes kept), owner, mode, xattrs and mtime, checked against the expected content hash,
/// fsynced before it is named.
pub(crate) fn copy_in(
    root: &HostRoot,
    spec: &ObjectSpec<'_>,
    seq: u32,
    src: &std::fs::File,
    xattrs: &[Xattr],
    mtime_ns: i64,
) -> Result<Object> {
    let name = spec.name(seq);
    ensure_fanout_dir(root, &name)?;
    let tmp_name = format!("{name}.{}", std::process::id());
    let tmp_shown = root.tmp_dir().join(&tmp_name);
    let fd: OwnedFd = nix::fcntl::openat(
        root.tmp_fd(),
        tmp_name.as_str(),
        OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_WRONLY | OFlag::O_CLOEXEC | OFlag::O_NOFOLLOW,
        Mode::from_bits_truncate(0o600),
    )
    .at(&tmp_shown)?;
    let mut out = std::fs::File::from(fd);
    let result = (|| -> Result<()> {
        let hash = fsx::copy_content(src, &mut out, spec.parts.size).at(&tmp_shown)?;
        if hash != spec.parts.chash {
            return Err(Error::Io {
                path: tmp_shown.clone(),
                error: std::io::Error::other("source changed while it was copied into the store"),
            });
        }
        let p = spec.parts;
        fsx::set_file_metadata(&out, p.uid, p.gid, p.mode, xattrs, mtime_ns).at(&tmp_shown)?;
        out.sync_all().at(&tmp_shown)?;
        let rel = object_rel(&name);
        nix::unistd::linkat(
            root.tmp_fd(),
            tmp_name.as_str(),
            root.objects_fd(),
            rel.as_str(),
            AtFlags::empty(),
        )
        .at(root.objects_dir().join(&rel))
    })();
    let _ = nix::unistd::unlinkat(
        root.tmp_fd(),
        tmp_name.as_str(),
        nix::unistd::UnlinkatFlags::NoRemoveDir,
    );
    result?;
    let rel = object_rel(&name);
    let st = fsx::lstat_at(root.objects_fd(), rel.as_bytes()).at(root.objects_dir().join(&rel))?;
    record_object(root, spec, &name, seq, &st)
}

/// Opens a store object for reading (works on immutable inodes).
pub(crate) fn open_object(root: &HostRoot, name: &str) -> Result<OwnedFd> {
    let rel = object_rel(name);
    fsx::open_beneath(
        root.objects_fd(),
        rel.as_bytes(),
        OFlag::O_RDONLY | OFlag::O_NONBLOCK,
    )
    .at(root.objects_dir().join(rel))
}

/// Sets or clears the immutable flag of a store object.
pub(crate) fn set_object_immutable(root: &HostRoot, name: &str, on: bool) -> Result<()> {
    let fd = open_object(root, name)?;
    sys::set_immutable(fd.as_fd(), on).at(root.objects_dir().join(object_rel(name)))?;
    Ok(())
}

/// Whether a store object carries the immutable flag.
pub(crate) fn object_is_immutable(root: &HostRoot, name: &str) -> Result<bool> {
    let fd = open_object(root, name)?;
    sys::is_immutable(fd.as_fd()).at(root.objects_dir().join(object_rel(name)))
}

/// Journals (committed) that the immutable flag of object `name` is being cleared, so that
/// [`restore_immutable`] sets it again, also after a crash.
pub(crate) fn journal_mutable(root: &HostRoot, name: &str) -> Result<()> {
    root.index.exec(
        "INSERT INTO journal(op, path) SELECT 'mutable', ?1
         WHERE NOT EXISTS(SELECT 1 FROM journal WHERE op = 'mutable' AND path = ?1)",
        [name.as_bytes()],
    )?;
    Ok(())
}

/// The name of the store object whose inode `st` is, if any: of the index's objects recorded
/// with that inode number (a stale row may share it with a new object), the one whose file is
/// that inode.
pub(crate) fn object_of_inode(root: &HostRoot, st: &Stat) -> Result<Option<String>> {
    let idx = &root.index;
    let names: Vec<String> = idx
        .conn
        .prepare_cached("SELECT name FROM objects WHERE ino = ?1")
        .and_then(|mut stmt| {
            stmt.query_map([st.ino as i64], |r| r.get(0))?
                .collect::<rusqlite::Result<_>>()
        })
        .map_err(|e| idx.err(e))?;
    Ok(names.into_iter().find(|n| {
        fsx::lstat_at(root.objects_fd(), object_rel(n).as_bytes())
            .is_ok_and(|o| o.ino == st.ino && o.dev == st.dev)
    }))
}

/// Clears the immutable flag of object `name` for a change, journalled first (committed), so
/// that [`restore_immutable`] sets it again — also after a crash.
pub(crate) fn unlock_object(root: &HostRoot, name: &str) -> Result<()> {
    journal_mutable(root, name)?;
    set_object_immutable(root, name, false)
}

/// Makes the entry `name` of `dir` (of inode `st`) unlinkable: clears its immutable and
/// append-only flags. A store object's flag is cleared journalled ([`unlock_object`]) and comes
/// back with [`restore_immutable`]. Any other inode's flags are cleared directly and, if it
/// has other links (an object the index does not know, say), handed back to be set again
/// right after the unlink.
///
/// # Errors
/// Index errors, and [`Error::Io`] naming `shown` if the flags cannot be cleared, or for a
/// special file (never opened: it could be a host device).
pub(crate) fn unlock_entry(
    root: &HostRoot,
    dir: BorrowedFd<'_>,
    name: &[u8],
    st: &Stat,
    shown: &std::path::Path,
) -> Result<Option<fsx::Relock>> {
    if let Some(object) = object_of_inode(root, st)? {
        unlock_object(root, &object)?;
        return Ok(None);
    }
    if !st.is_file() && !st.is_dir() {
        return Err(Error::Io {
            path: shown.to_path_buf(),
            error: std::io::Error::other(
                "cannot be removed (EPERM), and a special file is never opened to clear its flags",
            ),
        });
    }
    let flags = OFlag::O_RDONLY | OFlag::O_NONBLOCK | OFlag::O_NOFOLLOW;
    let fd = fsx::open_beneath(dir, name, flags).at(shown)?;
    let guards = sys::FS_IMMUTABLE_FL | sys::FS_APPEND_FL;
    let was = libc::c_long::from(sys::get_flags(&fd).at(shown)?) & guards;
    sys::clear_unlink_guards(&fd).at(shown)?;
    Ok((st.nlink > 1 && !st.is_dir() && was != 0).then_some(fsx::Relock { fd, flags: was }))
}

/// Removes the entry `name` of `dir` and everything below it ([`fsx::remove_tree`]), unlocking
/// what carries the immutable or append-only flag ([`unlock_entry`]), then puts back the
/// immutable flags of the store objects unlocked on the way.
///
/// # Errors
/// The removal's first error, else the first object whose flag could not be set again.
pub(crate) fn remove_guest_tree(
    root: &HostRoot,
    dir: BorrowedFd<'_>,
    shown: &std::path::Path,
    name: &[u8],
) -> Result<()> {
    let result = fsx::remove_tree(dir, shown, name, &mut |dir, name, st, shown| {
        unlock_entry(root, dir, name, st, shown)
    });
    if let Some(e) = restore_immutable(root)?.into_iter().next() {
        return Err(e);
    }
    result
}

/// Sets the immutable flag again on every object whose `mutable` journal row says it was
/// cleared for linking.
pub(crate) fn restore_immutable(root: &HostRoot) -> Result<Vec<Error>> {
    let names: Vec<Vec<u8>> = {
        let mut stmt = root
            .index
            .conn
            .prepare("SELECT path FROM journal WHERE op = 'mutable'")
            .map_err(|e| root.index.err(e))?;
        stmt.query_map([], |r| r.get(0))
            .and_then(|rows| rows.collect())
            .map_err(|e| root.index.err(e))?
    };
    let mut errors = Vec::new();
    for name in names {
        let name_str = String::from_utf8_lossy(&name).into_owned();
        match set_object_immutable(root, &name_str, true) {
            Ok(()) => {}
            Err(e) if e.errno() == Some(libc::ENOENT) => {}
            Err(e) => {
                errors.push(e);
                continue;
            }
        }
        root.index.exec(
            "DELETE FROM journal WHERE op = 'mutable' AND path = ?1",
            [&name],
        )?;
    }
    Ok(errors)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn object_names_round_trip() {
        let key = "ab".repeat(32);
        for (kind, seq) in [(Marker::Cow, 0), (Marker::Immutable, 7)] {
            let name = object_name(&key, kind, seq);
            assert_eq!(parse_object_name(&name), Some((key.as_str(), kind, seq)));
        }
        assert_eq!(
            object_rel(&object_name(&key, Marker::Cow, 0)),
            format!("ab/{key}.c0")
        );
        assert_eq!(parse_object_name("xyz.c0"), None);
    }

    #[test]
    fn temp_names_are_short_and_distinct() {
        let (a, b) = (temp_name(1), temp_name(2));
        assert!(a.starts_with(TEMP_PREFIX) && b.starts_with(TEMP_PREFIX));
        assert_ne!(a, b);
        assert!(temp_name(u64::from(u32::MAX)).len() < 32);
    }
}
