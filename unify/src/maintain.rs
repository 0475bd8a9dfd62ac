//! `stats`, `verify` and `gc`: reading the index and the store back.

use std::os::fd::{AsFd, BorrowedFd};

use rayon::prelude::*;
use serde::Serialize;

use crate::error::{PathContext, Result};
use crate::fsx;
use crate::guest::guest_names;
use crate::key::{self, KeyParts};
use crate::policy::Marker;
use crate::progress::{Phase, Progress};
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
    let mut guests = Vec::new();
    for name in guest_names(root)? {
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
            });
            continue;
        };
        let logical_bytes = 512
            * q(
                "SELECT SUM(b) FROM (SELECT MAX(orig_blocks) AS b FROM files
                 WHERE guest_id = ?1 GROUP BY orig_ino)",
                &[&id],
            )? as u64;
        let private_bytes = 512
            * q(
                "SELECT SUM(b) FROM (SELECT MAX(blocks) AS b FROM files
                 WHERE guest_id = ?1 AND object_id IS NULL GROUP BY ino)",
                &[&id],
            )? as u64;
        let share: f64 = c
            .query_row(
                "SELECT COALESCE(SUM(o.blocks * 512.0 /
                    (SELECT COUNT(DISTINCT f2.guest_id) FROM files f2 WHERE f2.object_id = o.id)), 0)
                 FROM objects o WHERE o.id IN (SELECT object_id FROM files WHERE guest_id = ?1)",
                [id],
                |r| r.get(0),
            )
            .map_err(|e| idx.err(e))?;
        let physical_bytes = private_bytes + share.round() as u64;
        guests.push(GuestStats {
            name,
            files: q("SELECT COUNT(*) FROM files WHERE guest_id = ?1", &[&id])? as u64,
            linked_files: q(
                "SELECT COUNT(object_id) FROM files WHERE guest_id = ?1",
                &[&id],
            )? as u64,
            logical_bytes,
            private_bytes,
            shared_bytes: 512
                * q(
                    "SELECT SUM(blocks) FROM objects WHERE id IN
                     (SELECT object_id FROM files WHERE guest_id = ?1)",
                    &[&id],
                )? as u64,
            physical_bytes,
            saved_bytes: logical_bytes.saturating_sub(physical_bytes),
            last_unify,
        });
    }
    let logical: u64 = guests.iter().map(|g| g.logical_bytes).sum();
    let physical = 512
        * (q(
            "SELECT SUM(b) FROM (SELECT MAX(blocks) AS b FROM files WHERE object_id IS NULL
             GROUP BY ino)",
            &[],
        )? + q("SELECT SUM(blocks) FROM objects", &[])?) as u64;
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
    };
    // The objects that save the most, each with one path that links it: a guest's rather than
    // a template's (`@…`), the first by name.
    let mut stmt = c
        .prepare(
            "SELECT o.id, o.name, t.links, o.size, o.blocks
             FROM (SELECT object_id, COUNT(*) AS links FROM files
                   WHERE object_id IS NOT NULL GROUP BY object_id) t
             JOIN objects o ON o.id = t.object_id
             ORDER BY (t.links - 1) * o.blocks DESC, o.name LIMIT ?1",
        )
        .map_err(|e| idx.err(e))?;
    let rows: Vec<(i64, String, i64, i64, i64)> = stmt
        .query_map([top as i64], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?))
        })
        .and_then(|rows| rows.collect())
        .map_err(|e| idx.err(e))?;
    let mut example = c
        .prepare(
            "SELECT g.name, f.path FROM files f JOIN guests g ON g.id = f.guest_id
             WHERE f.object_id = ?1 ORDER BY g.name LIKE '@%', g.name, f.path LIMIT 1",
        )
        .map_err(|e| idx.err(e))?;
    let mut top = Vec::with_capacity(rows.len());
    for (id, object, links, size, blocks) in rows {
        let (guest, path): (String, Vec<u8>) = example
            .query_row([id], |r| Ok((r.get(0)?, r.get(1)?)))
            .map_err(|e| idx.err(e))?;
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

/// A problem `verify` found.
#[derive(Clone, Debug, Serialize)]
pub struct Problem {
    /// The object or `guest:/path`.
    pub what: String,
    /// What is wrong.
    pub problem: String,
}

/// What `cowherd verify` found.
#[derive(Clone, Debug, Default, Serialize)]
pub struct VerifyReport {
    /// Store objects re-hashed.
    pub objects_checked: u64,
    /// Bytes read.
    pub bytes_checked: u64,
    /// Objects whose content or metadata no longer match their key, or whose immutable flag
    /// is wrong, or files in the store that are not objects.
    pub corrupt: Vec<Problem>,
    /// Guest files whose index entry is stale (changed or gone since the last unify).
    pub stale: Vec<Problem>,
}

/// Re-hashes every store object and checks every guest's index entries.
///
/// # Errors
/// Index errors and unreadable store directories; an unreadable object is a [`Problem`].
pub fn verify(root: &HostRoot, progress: &dyn Progress) -> Result<VerifyReport> {
    let mut report = VerifyReport::default();
    let objects_dir = root.objects_dir();
    let mut names = Vec::new();
    for fan in std::fs::read_dir(&objects_dir).at(&objects_dir)? {
        let fan = fan.at(&objects_dir)?;
        if !fan.file_type().at(fan.path())?.is_dir() {
            report.corrupt.push(Problem {
                what: display_path(fan.file_name().as_encoded_bytes()),
                problem: "not an object directory".into(),
            });
            continue;
        }
        for entry in std::fs::read_dir(fan.path()).at(fan.path())? {
            let entry = entry.at(fan.path())?;
            match entry.file_name().into_string() {
                Ok(n)
                    if store::parse_object_name(&n).is_some()
                        && n.starts_with(&*fan.file_name().to_string_lossy()) =>
                {
                    names.push(n)
                }
                Ok(n) => report.corrupt.push(Problem {
                    what: n,
                    problem: "not a store object name".into(),
                }),
                Err(n) => report.corrupt.push(Problem {
                    what: display_path(n.as_encoded_bytes()),
                    problem: "not a store object name".into(),
                }),
            }
        }
    }
    let total: u64 = names
        .iter()
        .filter_map(|n| fsx::lstat_at(root.objects_fd(), store::object_rel(n).as_bytes()).ok())
        .map(|s| s.size)
        .sum();
    progress.start(Phase::Verify, Some(total));
    let objects_fd = root.objects_fd();
    let results: Vec<(u64, Option<Problem>)> = names
        .par_iter()
        .map(|name| {
            let (size, problem) = check_object(objects_fd, name);
            progress.advance(size);
            (
                size,
                problem.map(|p| Problem {
                    what: name.clone(),
                    problem: p,
                }),
            )
        })
        .collect();
    progress.finish();
    for (size, problem) in results {
        report.objects_checked += 1;
        report.bytes_checked += size;
        report.corrupt.extend(problem);
    }
    check_index(root, &mut report)?;
    Ok(report)
}

/// Re-hashes one object; returns its size and what is wrong, if anything.
fn check_object(objects: BorrowedFd<'_>, name: &str) -> (u64, Option<String>) {
    let Some((key, kind, _)) = store::parse_object_name(name) else {
        return (0, Some("not a store object name".into()));
    };
    let rel = store::object_rel(name);
    let flags = nix::fcntl::OFlag::O_RDONLY | nix::fcntl::OFlag::O_NONBLOCK;
    let fd = match fsx::open_beneath(objects, rel.as_bytes(), flags) {
        Ok(fd) => fd,
        Err(e) => return (0, Some(e.to_string())),
    };
    let st = match fsx::fstat(&fd) {
        Ok(st) => st,
        Err(e) => return (0, Some(e.to_string())),
    };
    if !st.is_file() {
        return (0, Some("not a regular file".into()));
    }
    let immutable = crate::sys::is_immutable(fd.as_fd()).unwrap_or(false);
    let file = std::fs::File::from(fd);
    let (chash, _) = match key::content_hash(&file, st.size) {
        Ok(h) => h,
        Err(e) => return (st.size, Some(format!("cannot read: {e}"))),
    };
    let xattrs = match fsx::read_xattrs(&file) {
        Ok(x) => x,
        Err(e) => return (st.size, Some(format!("cannot read xattrs: {e}"))),
    };
    let parts = KeyParts {
        chash,
        xhash: key::xattr_hash(&xattrs),
        size: st.size,
        mode: st.mode,
        uid: st.uid,
        gid: st.gid,
        mtime_ns: Some(st.mtime_ns),
    };
    let matches = parts.key() == key
        || KeyParts {
            mtime_ns: None,
            ..parts
        }
        .key()
            == key;
    let problem = if !matches {
        Some("content or metadata no longer match its key (changed in place on the host?)".into())
    } else if kind == Marker::Immutable && !immutable {
        Some("immutable object lacks the immutable flag (run `cowherd unify` to restore it)".into())
    } else if kind == Marker::Cow && immutable {
        Some("copy-on-write object carries the immutable flag (chattr -i it)".into())
    } else {
        None
    };
    (st.size, problem)
}

/// Compares every guest's index rows with the files.
fn check_index(root: &HostRoot, report: &mut VerifyReport) -> Result<()> {
    let idx = &root.index;
    for name in guest_names(root)? {
        let Ok(guest) = crate::guest::open_guest(root, &name) else {
            continue;
        };
        let mut stmt = idx
            .conn
            .prepare(
                "SELECT f.path, f.ino, f.size, f.mtime_ns, f.ctime_ns, f.object_id, o.ino
                 FROM files f LEFT JOIN objects o ON o.id = f.object_id WHERE f.guest_id = ?1",
            )
            .map_err(|e| idx.err(e))?;
        let mut rows = stmt.query([guest.id]).map_err(|e| idx.err(e))?;
        while let Some(r) = rows.next().map_err(|e| idx.err(e))? {
            let path: Vec<u8> = r.get(0).map_err(|e| idx.err(e))?;
            let get = |i| r.get::<_, Option<i64>>(i).map_err(|e| idx.err(e));
            let (ino, size, mtime, ctime, object, object_ino) =
                (get(1)?, get(2)?, get(3)?, get(4)?, get(5)?, get(6)?);
            let now = fsx::open_beneath(guest.base(), &path, nix::fcntl::OFlag::O_PATH)
                .ok()
                .and_then(|fd| fsx::fstat(&fd).ok());
            let problem = match now {
                None => Some("gone"),
                Some(st) if !st.is_file() => Some("no longer a regular file"),
                Some(st) if object.is_some() => (Some(st.ino as i64) != object_ino)
                    .then_some("no longer linked to its store object"),
                Some(st) => (Some(st.ino as i64) != ino
                    || Some(st.size as i64) != size
                    || Some(st.mtime_ns) != mtime
                    || Some(st.ctime_ns) != ctime)
                    .then_some("changed since the last unify"),
            };
            if let Some(p) = problem {
                let mut abs = b"/".to_vec();
                abs.extend_from_slice(&path);
                report.stale.push(Problem {
                    what: format!("{name}:{}", display_path(&abs)),
                    problem: p.into(),
                });
            }
        }
    }
    Ok(())
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
            if !dry_run {
                // The row goes first: a row left behind by a kill could name an inode number
                // the filesystem gives to a new object later.
                root.index.exec(
                    "UPDATE files SET object_id = NULL WHERE object_id IN (SELECT id FROM objects WHERE name = ?1)",
                    [&name],
                )?;
                root.index
                    .exec("DELETE FROM objects WHERE name = ?1", [&name])?;
                if store::object_is_immutable(root, &name)? {
                    store::set_object_immutable(root, &name, false)?;
                }
                nix::unistd::unlinkat(
                    root.objects_fd(),
                    rel.as_str(),
                    nix::unistd::UnlinkatFlags::NoRemoveDir,
                )
                .at(entry.path())?;
            }
            report.removed.push(name);
        }
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
             FROM files WHERE guest_id = (SELECT id FROM guests WHERE name = ?1)",
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
