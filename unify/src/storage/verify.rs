//! `verify`: every store object re-hashed against its name, every index entry compared with
//! its file; and `verify --repair`, which fixes what can be fixed without guessing.

use std::collections::BTreeSet;
use std::ffi::OsStr;
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::ffi::OsStrExt;

use nix::fcntl::RenameFlags;
use rayon::prelude::*;
use serde::Serialize;

use crate::error::{PathContext, Result};
use crate::fsx::{self, Stat};
use crate::guest::guest_names;
use crate::key::{self, KeyParts};
use crate::policy::Marker;
use crate::progress::{Phase, Progress};
use crate::report::display_path;
use crate::root::HostRoot;
use crate::store::{self, ObjectSpec};

/// Where `verify --repair` moves what is in `store/objects` but is no object.
pub(crate) const LOST_FOUND: &str = "store/lost+found";

/// A problem `verify` found, or one `verify --repair` fixed.
#[derive(Clone, Debug, Serialize)]
pub struct Problem {
    /// The object or `guest:/path`.
    pub what: String,
    /// What is wrong (and the command that repairs it), or what the repair did.
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
    /// is wrong, or entries of the store that are not objects (left after a repair: those
    /// that no command can repair).
    pub corrupt: Vec<Problem>,
    /// Guest files whose index entry is stale (changed or gone since the last unify).
    pub stale: Vec<Problem>,
    /// What `--repair` fixed.
    pub repaired: Vec<Problem>,
}

/// How `verify` runs.
#[derive(Clone, Copy, Debug, Default)]
pub struct VerifyOptions {
    /// Fix what can be fixed: immutable flags set or cleared as the object's name says, an
    /// object whose content or metadata changed in place filed under its new key, entries that
    /// are not objects moved to `store/lost+found`, stale index entries rescanned.
    pub repair: bool,
}

/// What is wrong with one store entry, and how `--repair` fixes it.
enum Fault {
    /// Not a store object: moved to [`LOST_FOUND`].
    Stray,
    /// Cannot be read: nothing cowherd can do.
    Unreadable(String),
    /// Content or metadata no longer match the key: filed under its new key.
    Rekey(Box<KeyParts>, Stat),
    /// The immutable flag is missing (`true`) or should not be there (`false`).
    Flag(bool),
    /// Inode flags no object carries (`+A`, `+d`, `+a`, …: a guest's, linked into the store
    /// before such files were left out): cleared.
    Foreign(u32),
}

impl Fault {
    fn message(&self) -> String {
        match self {
            Fault::Stray => "not a store object (cowherd never makes this name); \
                             `cowherd verify --repair` moves it to store/lost+found"
                .into(),
            Fault::Unreadable(e) => format!(
                "cannot read: {e}; check the disk (dmesg), then restore the file from a backup"
            ),
            Fault::Rekey(..) => "content or metadata no longer match its key (changed in place \
                                 on the host?); `cowherd verify --repair` files it under the key \
                                 of what it holds now (the guests linking it keep seeing that)"
                .into(),
            Fault::Flag(true) => "immutable object lacks the immutable flag; \
                                  `cowherd verify --repair` sets it again"
                .into(),
            Fault::Flag(false) => "copy-on-write object carries the immutable flag; \
                                   `cowherd verify --repair` clears it"
                .into(),
            Fault::Foreign(flags) => format!(
                "carries inode flags no store object should (lsattr: {}): files with other \
                 flags would share them; `cowherd verify --repair` clears them",
                crate::report::flag_letters(*flags)
            ),
        }
    }
}

/// Re-hashes every store object and checks every guest's index entries; with
/// [`VerifyOptions::repair`], fixes what it can and reports it in
/// [`VerifyReport::repaired`].
///
/// # Algorithm
/// The store's entries are listed (`objects/ab/<name>`); each object is read in parallel:
/// content and xattr hashes with its metadata make the key its name must hold (with or
/// without the mtime), and the immutable flag must match the name's kind. Then every guest's
/// rows are compared with one `fstatat` per path. Repairs run after, on this thread: flags
/// with `ioctl(FS_IOC_SETFLAGS)`; a changed object renamed (no replace) to
/// `<new key>.<kind><seq>` and its row updated, so the guests' rows keep pointing at it;
/// strays renamed into `store/lost+found`; guests with stale rows rescanned.
///
/// # Errors
/// Index errors and unreadable store directories; an unreadable object is a [`Problem`].
pub fn verify(
    root: &HostRoot,
    opts: &VerifyOptions,
    progress: &dyn Progress,
) -> Result<VerifyReport> {
    let mut report = VerifyReport::default();
    let (names, strays) = list_store(root)?;
    let mut faults: Vec<(String, Fault)> = strays.into_iter().map(|s| (s, Fault::Stray)).collect();
    let total: u64 = names
        .iter()
        .filter_map(|n| fsx::lstat_at(root.objects_fd(), store::object_rel(n).as_bytes()).ok())
        .map(|s| s.size)
        .sum();
    progress.start(Phase::Verify, Some(total));
    let objects_fd = root.objects_fd();
    let checked: Vec<(u64, Option<(String, Fault)>)> = names
        .par_iter()
        .map(|name| {
            let (size, fault) = check_object(objects_fd, name);
            progress.advance(size);
            (size, fault.map(|f| (name.clone(), f)))
        })
        .collect();
    progress.finish();
    for (size, fault) in checked {
        report.objects_checked += 1;
        report.bytes_checked += size;
        faults.extend(fault);
    }
    for (name, fault) in faults {
        let problem = Problem {
            what: name.clone(),
            problem: fault.message(),
        };
        if !opts.repair {
            report.corrupt.push(problem);
            continue;
        }
        match repair(root, &name, &fault) {
            Ok(Some(done)) => report.repaired.push(Problem {
                what: name,
                problem: done,
            }),
            Ok(None) => report.corrupt.push(problem),
            Err(e) => report.corrupt.push(Problem {
                what: name,
                problem: format!("{}; the repair failed: {e}", problem.problem),
            }),
        }
    }
    let stale_guests = check_index(root, &mut report)?;
    if opts.repair && !stale_guests.is_empty() {
        let names: Vec<String> = stale_guests.into_iter().collect();
        let rescanned = crate::unify::rescan(root, &names, progress)?;
        for f in rescanned.failures {
            report.corrupt.push(Problem {
                what: format!("{}:{}", f.guest, f.path),
                problem: f.error,
            });
        }
        report.repaired.extend(
            std::mem::take(&mut report.stale)
                .into_iter()
                .map(|p| Problem {
                    what: p.what,
                    problem: format!("{}: its index entry was brought up to date", p.problem),
                }),
        );
    }
    Ok(report)
}

/// The names of the store's objects, and the entries of `store/objects` that are not objects
/// (as `ab/name`, or `name` at the top).
pub(crate) fn list_store(root: &HostRoot) -> Result<(Vec<String>, Vec<String>)> {
    let objects_dir = root.objects_dir();
    let mut names = Vec::new();
    let mut strays = Vec::new();
    for fan in std::fs::read_dir(&objects_dir).at(&objects_dir)? {
        let fan = fan.at(&objects_dir)?;
        let fan_name = fan.file_name();
        if !fan.file_type().at(fan.path())?.is_dir() {
            strays.push(display_path(fan_name.as_encoded_bytes()));
            continue;
        }
        for entry in std::fs::read_dir(fan.path()).at(fan.path())? {
            let entry = entry.at(fan.path())?;
            match entry.file_name().into_string() {
                Ok(n)
                    if store::parse_object_name(&n).is_some()
                        && n.starts_with(&*fan_name.to_string_lossy()) =>
                {
                    names.push(n)
                }
                Ok(n) => strays.push(format!("{}/{n}", fan_name.to_string_lossy())),
                Err(n) => strays.push(format!(
                    "{}/{}",
                    fan_name.to_string_lossy(),
                    display_path(n.as_encoded_bytes())
                )),
            }
        }
    }
    names.sort();
    Ok((names, strays))
}

/// What reading a store object back gives.
pub(crate) struct ReadObject {
    /// Its stat.
    pub st: Stat,
    /// Its key parts now, with its mtime.
    pub parts: KeyParts,
    /// Whether its name's key is that of `parts`: `Some(false)` with the mtime,
    /// `Some(true)` without it (`--ignore-mtime`), `None` if neither.
    pub ign_mtime: Option<bool>,
    /// The kind its name says.
    pub kind: Marker,
    /// Its sequence number.
    pub seq: u32,
    /// Whether it carries the immutable flag.
    pub immutable: bool,
    /// Flags someone set besides the immutable flag.
    pub foreign_flags: u32,
}

/// Reads object `name` back: hashes, metadata, flag. `Err` holds its size so far and why it
/// cannot be read (or is no regular file).
pub(crate) fn read_object(
    objects: BorrowedFd<'_>,
    name: &str,
) -> std::result::Result<ReadObject, (u64, String)> {
    let Some((key, kind, seq)) = store::parse_object_name(name) else {
        return Err((0, "not a store object name".into()));
    };
    let rel = store::object_rel(name);
    let flags = nix::fcntl::OFlag::O_RDONLY | nix::fcntl::OFlag::O_NONBLOCK;
    let fd = fsx::open_beneath(objects, rel.as_bytes(), flags).map_err(|e| (0, e.to_string()))?;
    let st = fsx::fstat(&fd).map_err(|e| (0, e.to_string()))?;
    if !st.is_file() {
        return Err((0, "not a regular file".into()));
    }
    let immutable = crate::sys::is_immutable(fd.as_fd()).unwrap_or(false);
    let foreign_flags =
        crate::sys::user_flags(fd.as_fd()).unwrap_or(0) & !(crate::sys::FS_IMMUTABLE_FL as u32);
    let file = std::fs::File::from(fd);
    let (chash, _) =
        key::content_hash(&file, st.size).map_err(|e| (st.size, format!("cannot read: {e}")))?;
    let xattrs =
        fsx::read_xattrs(&file).map_err(|e| (st.size, format!("cannot read xattrs: {e}")))?;
    let parts = KeyParts {
        chash,
        xhash: key::xattr_hash(&xattrs),
        size: st.size,
        mode: st.mode,
        uid: st.uid,
        gid: st.gid,
        mtime_ns: Some(st.mtime_ns),
    };
    let without_mtime = KeyParts {
        mtime_ns: None,
        ..parts
    };
    let ign_mtime = if parts.key() == key {
        Some(false)
    } else if without_mtime.key() == key {
        Some(true)
    } else {
        None
    };
    Ok(ReadObject {
        st,
        parts,
        ign_mtime,
        kind,
        seq,
        immutable,
        foreign_flags,
    })
}

/// Re-hashes one object; returns its size and what is wrong, if anything.
fn check_object(objects: BorrowedFd<'_>, name: &str) -> (u64, Option<Fault>) {
    let read = match read_object(objects, name) {
        Ok(read) => read,
        Err((size, why)) if why == "not a regular file" => return (size, Some(Fault::Stray)),
        Err((size, why)) => return (size, Some(Fault::Unreadable(why))),
    };
    let fault = if read.ign_mtime.is_none() {
        Some(Fault::Rekey(Box::new(read.parts), read.st))
    } else if read.kind == Marker::Immutable && !read.immutable {
        Some(Fault::Flag(true))
    } else if read.kind == Marker::Cow && read.immutable {
        Some(Fault::Flag(false))
    } else if read.foreign_flags != 0 {
        Some(Fault::Foreign(read.foreign_flags))
    } else {
        None
    };
    (read.st.size, fault)
}

/// Repairs one fault; returns what was done, or `None` if nothing can be.
fn repair(root: &HostRoot, name: &str, fault: &Fault) -> Result<Option<String>> {
    match fault {
        Fault::Unreadable(_) => Ok(None),
        Fault::Flag(on) => {
            store::set_object_immutable(root, name, *on)?;
            Ok(Some(if *on {
                "the immutable flag is set again".into()
            } else {
                "the immutable flag is cleared".into()
            }))
        }
        Fault::Foreign(_) => {
            let rel = store::object_rel(name);
            let fd = fsx::open_beneath(
                root.objects_fd(),
                rel.as_bytes(),
                nix::fcntl::OFlag::O_RDONLY | nix::fcntl::OFlag::O_NONBLOCK,
            )
            .at(root.objects_dir().join(&rel))?;
            let cleared = crate::sys::clear_foreign_flags(&fd).at(root.objects_dir().join(&rel))?;
            Ok(Some(format!(
                "inode flags cleared (lsattr: {})",
                crate::report::flag_letters(cleared)
            )))
        }
        Fault::Stray => {
            let dir = root.path().join(LOST_FOUND);
            fsx::ensure_dir(&dir, 0o700)?;
            let lost = root.open_dir_below(std::path::Path::new(LOST_FOUND))?;
            let (fan, entry) = match name.split_once('/') {
                Some((fan, entry)) => (Some(fan), entry),
                None => (None, name),
            };
            let from = match fan {
                Some(fan) => {
                    fsx::open_dir_beneath(root.objects_fd(), &root.objects_dir(), fan.as_bytes())?
                }
                None => root.open_dir_below(std::path::Path::new("store/objects"))?,
            };
            let target = name.replace('/', "_");
            nix::fcntl::renameat2(
                &from,
                OsStr::from_bytes(entry.as_bytes()),
                &lost,
                OsStr::from_bytes(target.as_bytes()),
                RenameFlags::RENAME_NOREPLACE,
            )
            .at(root.objects_dir().join(name))?;
            Ok(Some(format!("moved to {LOST_FOUND}/{target}")))
        }
        Fault::Rekey(parts, st) => rekey(root, name, parts, st).map(Some),
    }
}

/// Files object `name`, whose content or metadata changed in place, under the key of what it
/// holds now (`parts`): renamed to the first free `<key>.<kind><seq>` and its row updated (the
/// pair journalled as a `rekey`, which the next writer finishes if this run is killed).
fn rekey(root: &HostRoot, name: &str, parts: &KeyParts, st: &Stat) -> Result<String> {
    let (_, kind, _) = store::parse_object_name(name).expect("checked before");
    let idx = &root.index;
    let ign_mtime: bool = idx
        .conn
        .query_row(
            "SELECT ign_mtime FROM objects WHERE name = ?1",
            [name],
            |r| r.get(0),
        )
        .unwrap_or(false);
    let parts = KeyParts {
        mtime_ns: (!ign_mtime).then_some(st.mtime_ns),
        ..*parts
    };
    let key = parts.key();
    let (new_name, seq) = (0..)
        .map(|seq| (store::object_name(&key, kind, seq), seq))
        .find(|(n, _)| fsx::lstat_at(root.objects_fd(), store::object_rel(n).as_bytes()).is_err())
        .expect("some sequence number is free");
    // An immutable inode cannot be renamed: its flag comes off, journalled (under the new name
    // too if it is to keep the flag, so a kill after the rename still sets it), and is set
    // again on the new name.
    if kind == Marker::Immutable {
        store::journal_mutable(root, &new_name)?;
    }
    if crate::sys::is_immutable(store::open_object(root, name)?.as_fd()).unwrap_or(false) {
        store::unlock_object(root, name)?;
    }
    let new_rel = store::object_rel(&new_name);
    match nix::sys::stat::mkdirat(
        root.objects_fd(),
        &new_name[..2],
        nix::sys::stat::Mode::from_bits_truncate(0o755),
    ) {
        Ok(()) | Err(nix::errno::Errno::EEXIST) => {}
        Err(e) => return Err(e).at(root.objects_dir().join(&new_name[..2])),
    }
    // The rename and the row's new name are one change: journalled (committed) first, so that
    // the next writer's recovery renames the row if this run is killed between the two.
    let journalled = crate::recover::journal_rekey(root, name, &new_name)?;
    let renamed = nix::fcntl::renameat2(
        root.objects_fd(),
        store::object_rel(name).as_str(),
        root.objects_fd(),
        new_rel.as_str(),
        RenameFlags::RENAME_NOREPLACE,
    )
    .at(root.objects_dir().join(&new_rel));
    if renamed.is_err() {
        idx.exec("DELETE FROM journal WHERE id = ?1", [journalled])?;
    }
    renamed?;
    if !crate::recover::rename_object_row(root, name, &new_name)? {
        let spec = ObjectSpec {
            parts: &parts,
            kind,
            ign_mtime,
        };
        store::record_object(root, &spec, &new_name, seq, st)?;
    }
    idx.exec("DELETE FROM journal WHERE id = ?1", [journalled])?;
    if kind == Marker::Immutable {
        store::set_object_immutable(root, &new_name, true)?;
    }
    if let Some(e) = store::restore_immutable(root)?.into_iter().next() {
        return Err(e);
    }
    Ok(format!("filed under its new key as {new_name}"))
}

/// Compares every guest's index rows with the files; returns the guests with stale rows.
fn check_index(root: &HostRoot, report: &mut VerifyReport) -> Result<BTreeSet<String>> {
    let idx = &root.index;
    let mut stale_guests = BTreeSet::new();
    for name in guest_names(root)? {
        let Ok(guest) = crate::guest::open_guest(root, &name) else {
            continue;
        };
        let mut stmt = idx
            .conn
            .prepare(
                "SELECT f.path, f.ino, f.size, f.mtime_ns, f.ctime_ns, f.object_id, o.ino
                 FROM paths f LEFT JOIN objects o ON o.id = f.object_id WHERE f.guest_id = ?1",
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
                    problem: format!(
                        "{p}; `cowherd unify {name}` (or `cowherd verify --repair`) rescans it"
                    ),
                });
                stale_guests.insert(name.clone());
            }
        }
    }
    Ok(stale_guests)
}
