//! Snapshots of a stopped guest's tree made of links, rollback to one, and changes through
//! the overlay that either complete or leave the guest as its snapshot (an upgrade).
//!
//! ```text
//! guests/<name>/
//! ├── base/ upper/ work/ …        the guest (see the guest module)
//! ├── attempt.toml                a change in flight through the overlay (an upgrade):
//! │                               the snapshot it goes back to unless it completes
//! └── snapshots/                  0700
//!     ├── <snap>/
//!     │   ├── snapshot.toml       name, time, what made it
//!     │   └── tree/               the guest's merged view then: directories made anew,
//!     │                           every file a hardlink of base's inode (a store object
//!     │                           or the guest's own); a file with the guest's +i/+a a copy
//!     ├── .<snap>.making/         a snapshot being made (removed by the next writer)
//!     ├── .<snap>.removing/       a snapshot being removed (finished by the next writer)
//!     └── .rollback/              a rollback in flight: snapshot.toml and tree/ (the clone
//!                                 of the snapshot, then the tree it replaced), pending
//!                                 (the clone's inode until base is exchanged with it)
//! ```
//!
//! A snapshot shares every inode with base and the store, and nothing ever changes those in
//! place: a guest's writes copy up into its upper layer, `fold` and `unify` replace base
//! entries by rename, `split` writes new inodes, `verify --repair` renames objects. So a
//! snapshot costs its directories and the inodes base dropped since, and `gc` keeps the
//! objects it links (their link count says they are in use). Snapshots are not guests: no
//! command indexes, unifies, folds or repairs them.

use std::collections::HashMap;
use std::os::fd::AsFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Instant;

use nix::errno::Errno;
use nix::fcntl::RenameFlags;
use nix::sys::stat::Mode;
use serde::{Deserialize, Serialize};

use crate::create::{CloneMode, Tree, clone_tree};
use crate::error::{Error, PathContext, Result};
use crate::fold::{FoldOptions, fold};
use crate::fsx;
use crate::guest::{OfflineGuest, guest_record, now_unix};
use crate::root::HostRoot;
use crate::store;

/// A guest's snapshots, below its directory.
pub const SNAPSHOTS_DIR: &str = "snapshots";
/// The record of a change through the overlay in flight, in the guest's directory.
pub const ATTEMPT_FILE: &str = "attempt.toml";
const RECORD: &str = "snapshot.toml";
const TREE: &str = "tree";
const MAKING: &str = ".making";
const REMOVING: &str = ".removing";
const ROLLBACK: &str = ".rollback";
const ROLLBACK_NEW: &str = ".rollback.new";
const PENDING: &str = "pending";

/// What `snapshots/NAME/snapshot.toml` records.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct SnapshotRecord {
    /// The snapshot's name.
    pub name: String,
    /// When it was made (seconds since the epoch).
    pub created_unix: i64,
    /// What made it: `snapshot`, `upgrade`, `rollback to NAME` (the tree a rollback replaced).
    pub made_by: String,
}

/// A snapshot as `snapshot list` shows it.
#[derive(Clone, Debug, Serialize)]
pub struct SnapshotInfo {
    /// The guest.
    pub guest: String,
    /// Its record.
    #[serde(flatten)]
    pub record: SnapshotRecord,
    /// Regular files (paths) of its tree.
    pub files: u64,
    /// Allocated bytes of the inodes only this snapshot links, store objects that nothing else
    /// but the store's own name links among them (what removing it frees, the objects with the
    /// next `gc`).
    pub alone_bytes: u64,
}

/// What making a snapshot did.
#[derive(Clone, Debug, Serialize)]
pub struct SnapshotReport {
    /// The guest.
    pub guest: String,
    /// The new snapshot's record.
    #[serde(flatten)]
    pub record: SnapshotRecord,
    /// Entries the fold before it moved from upper into base.
    pub folded: u64,
    /// Regular files of the snapshot.
    pub files: u64,
    /// Of those, links of base's inodes.
    pub linked: u64,
    /// Of those, copies (files with the guest's immutable or append-only flag, or at the
    /// link limit).
    pub copied: u64,
    /// Bytes of those copies.
    pub copied_bytes: u64,
    /// Seconds it took, the fold included.
    pub seconds: f64,
}

/// What a rollback did (or, dry, would do).
#[derive(Clone, Debug, Serialize)]
pub struct RollbackReport {
    /// The guest.
    pub guest: String,
    /// Nothing was changed.
    pub dry_run: bool,
    /// The snapshot whose tree the guest has now.
    pub restored: String,
    /// The snapshot that keeps the tree it replaced (roll back to it to undo).
    pub kept_as: String,
    /// Regular files of the restored tree.
    pub files: u64,
    /// Seconds it took.
    pub seconds: f64,
}

/// Checks a snapshot name: as a guest name, 1–64 of `[A-Za-z0-9._-]`, not starting with `.`
/// or `-`.
///
/// # Errors
/// [`Error::BadSnapshotName`].
pub fn validate_snapshot_name(name: &str) -> Result<()> {
    crate::guest::validate_guest_name(name).map_err(|_| Error::BadSnapshotName {
        name: name.to_string(),
    })
}

fn snapshots_rel(guest: &str) -> PathBuf {
    Path::new("guests").join(guest).join(SNAPSHOTS_DIR)
}

fn snapshots_path(root: &HostRoot, guest: &str) -> PathBuf {
    root.guests_dir().join(guest).join(SNAPSHOTS_DIR)
}

/// `guests/<guest>/snapshots`, made (0700) if missing, never through a symlink.
fn snapshots_dir(root: &HostRoot, guest: &str) -> Result<std::os::fd::OwnedFd> {
    let gdir = fsx::open_dir_beneath(root.guests_fd(), &root.guests_dir(), guest.as_bytes())?;
    match nix::sys::stat::mkdirat(&gdir, SNAPSHOTS_DIR, Mode::from_bits_truncate(0o700)) {
        Ok(()) | Err(Errno::EEXIST) => {}
        Err(e) => return Err(e).at(snapshots_path(root, guest)),
    }
    fsx::open_dir_beneath(
        gdir.as_fd(),
        &root.guests_dir().join(guest),
        SNAPSHOTS_DIR.as_bytes(),
    )
}

fn load_record(path: &Path) -> Result<SnapshotRecord> {
    let text = std::fs::read_to_string(path).at(path)?;
    toml::from_str(&text).map_err(|e| Error::BadRecord {
        path: path.to_path_buf(),
        message: e.message().to_string(),
    })
}

fn save_record(record: &SnapshotRecord, path: &Path) -> Result<()> {
    let text = toml::to_string(record).expect("a snapshot record serializes");
    fsx::write_atomic(path, text.as_bytes())
}

/// The records of guest `guest`'s snapshots, oldest first: by their time, and within one second
/// by when each directory was put in place (its ctime: the rename that completed it; nothing
/// changes a snapshot's directory after), then by name.
///
/// # Errors
/// [`Error::NoSuchGuest`], I/O errors, a damaged record.
pub fn snapshot_records(root: &HostRoot, guest: &str) -> Result<Vec<SnapshotRecord>> {
    guest_record(root, guest)?;
    let dir = snapshots_path(root, guest);
    let entries = match std::fs::read_dir(&dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e).at(&dir),
    };
    let mut found = Vec::new();
    for entry in entries {
        let entry = entry.at(&dir)?;
        let Some(name) = entry.file_name().to_str().map(str::to_owned) else {
            continue;
        };
        if validate_snapshot_name(&name).is_err() || !entry.file_type().at(entry.path())?.is_dir() {
            continue;
        }
        let record = load_record(&entry.path().join(RECORD))?;
        if record.name == name {
            let st = entry.metadata().at(entry.path())?;
            found.push((record, (st.ctime(), st.ctime_nsec())));
        }
    }
    found.sort_by(|(a, a_put), (b, b_put)| {
        (a.created_unix, a_put, &a.name).cmp(&(b.created_unix, b_put, &b.name))
    });
    Ok(found.into_iter().map(|(record, _)| record).collect())
}

/// A name for a new snapshot of `guest`: `stem`, or `stem-2`, `stem-3`… if taken.
fn free_name(root: &HostRoot, guest: &str, stem: &str) -> String {
    let dir = snapshots_path(root, guest);
    let taken = |n: &str| {
        std::fs::symlink_metadata(dir.join(n)).is_ok()
            || std::fs::symlink_metadata(dir.join(format!(".{n}{MAKING}"))).is_ok()
    };
    if !taken(stem) {
        return stem.to_string();
    }
    (2..)
        .map(|n| format!("{stem}-{n}"))
        .find(|n| !taken(n))
        .expect("some suffix is free")
}

/// Folds guest `guest` and refuses if anything stayed in its upper layer: a snapshot and a
/// rollback need the whole merged view in base. Returns the entries moved.
fn fold_all(root: &HostRoot, guest: &str) -> Result<u64> {
    let report = fold(root, guest, &FoldOptions::default())?;
    match report.failures.first() {
        Some(f) => Err(Error::NotFolded {
            name: guest.to_string(),
            why: f.to_string(),
        }),
        None => Ok(report.moved + report.deleted),
    }
}

/// Makes a snapshot of stopped guest `guest`: its merged view, as a read-only tree of links
/// under `guests/GUEST/snapshots/NAME/` (`name`, or the time in UTC), recorded as made by
/// `made_by`.
///
/// # Algorithm
/// The guest must be offline. It is folded first (its upper layer moved into base; a fold
/// that leaves anything in upper refuses the snapshot), so base is what the guest sees. Then
/// `snapshots/.NAME.making/tree` is made as a clone of base in [`CloneMode::LinkAll`]:
/// directories made anew with base's metadata, every file a new link of base's inode (an
/// immutable store object's flag cleared for that, journalled, and set again), a file with
/// the guest's own immutable or append-only flag copied with its flags. With its record
/// written and the filesystem synced, it is renamed to `snapshots/NAME` (never replacing
/// one). A killed run leaves only `.NAME.making`, which the next writer removes.
///
/// # Errors
/// [`Error::BadSnapshotName`], [`Error::SnapshotExists`], [`Error::Mounted`] /
/// [`Error::InUse`], [`Error::NotFolded`], I/O and index errors.
pub fn snapshot(
    root: &HostRoot,
    guest: &str,
    name: Option<&str>,
    made_by: &str,
) -> Result<SnapshotReport> {
    let started = Instant::now();
    if let Some(name) = name {
        validate_snapshot_name(name)?;
    }
    OfflineGuest::open(root, guest)?;
    if let Some(name) = name {
        let path = snapshots_path(root, guest).join(name);
        if std::fs::symlink_metadata(&path).is_ok() {
            return Err(Error::SnapshotExists {
                guest: guest.to_string(),
                name: name.to_string(),
                path,
            });
        }
    }
    let folded = fold_all(root, guest)?;
    let name = match name {
        Some(name) => name.to_string(),
        None => free_name(root, guest, &utc_stamp(now_unix())),
    };
    let record = SnapshotRecord {
        name: name.clone(),
        created_unix: now_unix(),
        made_by: made_by.to_string(),
    };
    let clone = link_clone(
        root,
        &Path::new("guests").join(guest).join("base"),
        guest,
        &format!(".{name}{MAKING}"),
        &record,
    )?;
    let dir = snapshots_dir(root, guest)?;
    nix::unistd::syncfs(&dir).at(snapshots_path(root, guest))?;
    nix::fcntl::renameat2(
        &dir,
        format!(".{name}{MAKING}").as_str(),
        &dir,
        name.as_str(),
        RenameFlags::RENAME_NOREPLACE,
    )
    .map_err(|e| match e {
        Errno::EEXIST => Error::SnapshotExists {
            guest: guest.to_string(),
            name: name.clone(),
            path: snapshots_path(root, guest).join(&name),
        },
        e => Error::Io {
            path: snapshots_path(root, guest).join(&name),
            error: e.into(),
        },
    })?;
    Ok(SnapshotReport {
        guest: guest.to_string(),
        record,
        folded,
        files: clone.files,
        linked: clone.linked,
        copied: clone.copied,
        copied_bytes: clone.copied_bytes,
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// Makes `snapshots/<entry>/` of guest `guest` anew: its record, and `tree/` as a link clone
/// of the tree `src` (relative to the root).
fn link_clone(
    root: &HostRoot,
    src: &Path,
    guest: &str,
    entry: &str,
    record: &SnapshotRecord,
) -> Result<crate::create::CloneReport> {
    let dir = snapshots_dir(root, guest)?;
    let shown = snapshots_path(root, guest);
    // A leftover of the same name (a killed run's) goes first.
    store::remove_guest_tree(root, dir.as_fd(), &shown, entry.as_bytes())?;
    nix::sys::stat::mkdirat(&dir, entry, Mode::from_bits_truncate(0o700)).at(shown.join(entry))?;
    let entry_rel = snapshots_rel(guest).join(entry);
    let tree = Tree::create(root, &entry_rel.join(TREE))?;
    let report = clone_tree(root, src, &tree, CloneMode::LinkAll)?;
    save_record(record, &shown.join(entry).join(RECORD))?;
    Ok(report)
}

/// Guest `guest`'s snapshots with their size: regular files, and the bytes only each holds.
///
/// # Errors
/// As [`snapshot_records`], and I/O errors reading the trees.
pub fn snapshots(root: &HostRoot, guest: &str) -> Result<Vec<SnapshotInfo>> {
    let dir = snapshots_path(root, guest);
    snapshot_records(root, guest)?
        .into_iter()
        .map(|record| {
            let usage = usage(root, &[dir.join(&record.name).join(TREE)])?;
            Ok(SnapshotInfo {
                guest: guest.to_string(),
                record,
                files: usage.files,
                alone_bytes: usage.alone_bytes,
            })
        })
        .collect()
}

/// How many snapshots guest `guest` has, and the bytes only they hold (all of them together:
/// what removing every one would free).
///
/// # Errors
/// As [`snapshots`].
pub fn snapshot_usage(root: &HostRoot, guest: &str) -> Result<(u64, u64)> {
    let dir = snapshots_path(root, guest);
    let trees: Vec<PathBuf> = snapshot_records(root, guest)?
        .iter()
        .map(|r| dir.join(&r.name).join(TREE))
        .collect();
    Ok((trees.len() as u64, usage(root, &trees)?.alone_bytes))
}

/// Files and alone-held bytes of a set of trees.
struct Usage {
    files: u64,
    alone_bytes: u64,
}

/// Walks `trees` (no symlink followed, no mount crossed) counting each regular file's
/// inode's links in them: an inode all of whose links are there is held by them alone, and so
/// is a store object all of whose links but the store's own name are there (`gc` removes it
/// once they are gone).
fn usage(root: &HostRoot, trees: &[PathBuf]) -> Result<Usage> {
    let mut inodes: HashMap<(u64, u64), (u64, fsx::Stat)> = HashMap::new();
    let mut files = 0;
    for tree in trees {
        let fd = fsx::open_dir(tree)?;
        let mut failed = None;
        let _ = fsx::walk_tree(fd.as_fd(), &mut |visit| {
            match visit {
                fsx::Visit::File(_, st) => {
                    files += 1;
                    inodes.entry((st.dev, st.ino)).or_insert((0, st)).0 += 1;
                }
                fsx::Visit::Error { rel, error, .. } => {
                    failed = Some(Error::Io {
                        path: fsx::join(tree, rel),
                        error: error.into(),
                    });
                    return std::ops::ControlFlow::Break(());
                }
                fsx::Visit::Dir(_) | fsx::Visit::DirEnd(_) => {}
            }
            std::ops::ControlFlow::Continue(())
        });
        if let Some(e) = failed {
            return Err(e);
        }
    }
    let mut alone_bytes = 0;
    for (seen, st) in inodes.values() {
        let alone = *seen >= st.nlink
            || (*seen + 1 == st.nlink && store::object_of_inode(root, st)?.is_some());
        if alone {
            alone_bytes += st.blocks * 512;
        }
    }
    Ok(Usage { files, alone_bytes })
}

/// Removes snapshot `name` of guest `guest`; returns what it was.
///
/// # Algorithm
/// Renamed to `.NAME.removing` (from then on it is gone; the next writer finishes a killed
/// run), then removed fd-relative, the immutable flags of store objects cleared for the
/// unlink and set again.
///
/// # Errors
/// [`Error::NoSuchSnapshot`], I/O and index errors.
pub fn remove_snapshot(root: &HostRoot, guest: &str, name: &str) -> Result<SnapshotInfo> {
    validate_snapshot_name(name)?;
    let info = snapshots(root, guest)?
        .into_iter()
        .find(|s| s.record.name == name)
        .ok_or_else(|| Error::NoSuchSnapshot {
            guest: guest.to_string(),
            name: name.to_string(),
            path: snapshots_path(root, guest),
        })?;
    let dir = snapshots_dir(root, guest)?;
    let doomed = format!(".{name}{REMOVING}");
    nix::fcntl::renameat2(
        &dir,
        name,
        &dir,
        doomed.as_str(),
        RenameFlags::RENAME_NOREPLACE,
    )
    .at(snapshots_path(root, guest).join(name))?;
    store::remove_guest_tree(
        root,
        dir.as_fd(),
        &snapshots_path(root, guest),
        doomed.as_bytes(),
    )?;
    Ok(info)
}

/// Makes stopped guest `guest`'s tree exactly snapshot `name`'s again (default: the newest),
/// keeping the tree it replaces as a new snapshot (made by `rollback to NAME`), so that a
/// rollback can be undone by another.
///
/// # Algorithm
/// The guest must be offline; it is folded first (its whole merged view in base, upper
/// empty). In `snapshots/.rollback/`: the record of the snapshot-to-be, `tree/` as a link
/// clone of the snapshot's tree, and `pending` holding the inode of that clone's top; synced.
/// Then one `renameat2(RENAME_EXCHANGE)` swaps base and the clone: the guest has the
/// snapshot's tree, and `.rollback/tree` holds the old base. `pending` is removed and
/// `.rollback` renamed to the new snapshot's name. A killed run is finished by the next
/// writer: a `.rollback` whose pending inode is base's top was exchanged (it is kept as the
/// snapshot), one whose is not was not (it is removed), one without `pending` only needs its
/// rename. The snapshot itself is never changed.
///
/// # Errors
/// [`Error::NoSnapshots`], [`Error::NoSuchSnapshot`], [`Error::Mounted`] / [`Error::InUse`],
/// [`Error::NotFolded`], I/O and index errors.
pub fn rollback(
    root: &HostRoot,
    guest: &str,
    name: Option<&str>,
    dry_run: bool,
) -> Result<RollbackReport> {
    let started = Instant::now();
    if let Some(name) = name {
        validate_snapshot_name(name)?;
    }
    OfflineGuest::open(root, guest)?;
    let records = snapshot_records(root, guest)?;
    let target = match name {
        Some(name) => {
            records
                .iter()
                .find(|r| r.name == name)
                .ok_or_else(|| Error::NoSuchSnapshot {
                    guest: guest.to_string(),
                    name: name.to_string(),
                    path: snapshots_path(root, guest),
                })?
        }
        None => records.last().ok_or_else(|| Error::NoSnapshots {
            guest: guest.to_string(),
            path: snapshots_path(root, guest),
        })?,
    }
    .clone();
    let now = now_unix();
    let kept_as = free_name(root, guest, &format!("{}-before-rollback", utc_stamp(now)));
    let target_tree = snapshots_rel(guest).join(&target.name).join(TREE);
    if dry_run {
        return Ok(RollbackReport {
            guest: guest.to_string(),
            dry_run,
            restored: target.name,
            kept_as,
            files: usage(root, &[root.path().join(&target_tree)])?.files,
            seconds: started.elapsed().as_secs_f64(),
        });
    }
    fold_all(root, guest)?;
    let record = SnapshotRecord {
        name: kept_as.clone(),
        created_unix: now,
        made_by: format!("rollback to {}", target.name),
    };
    // `.rollback` is born with its `pending` (made as `.rollback.new`, then renamed): a
    // `.rollback` without one was exchanged.
    let shown = snapshots_path(root, guest);
    let dir = snapshots_dir(root, guest)?;
    store::remove_guest_tree(root, dir.as_fd(), &shown, ROLLBACK_NEW.as_bytes())?;
    nix::sys::stat::mkdirat(&dir, ROLLBACK_NEW, Mode::from_bits_truncate(0o700))
        .at(shown.join(ROLLBACK_NEW))?;
    let tree = Tree::create(root, &snapshots_rel(guest).join(ROLLBACK_NEW).join(TREE))?;
    let top = fsx::lstat_path(tree.path())?;
    fsx::write_atomic(
        &shown.join(ROLLBACK_NEW).join(PENDING),
        format!("{}\n", top.ino).as_bytes(),
    )?;
    nix::fcntl::renameat2(
        &dir,
        ROLLBACK_NEW,
        &dir,
        ROLLBACK,
        RenameFlags::RENAME_NOREPLACE,
    )
    .at(shown.join(ROLLBACK))?;
    let staged = fsx::open_dir_beneath(dir.as_fd(), &shown, ROLLBACK.as_bytes())?;
    let tree = Tree::open(root, &snapshots_rel(guest).join(ROLLBACK).join(TREE))?;
    let clone = clone_tree(root, &target_tree, &tree, CloneMode::LinkAll)?;
    save_record(&record, &shown.join(ROLLBACK).join(RECORD))?;
    nix::unistd::syncfs(&dir).at(&shown)?;
    let gdir = fsx::open_dir_beneath(root.guests_fd(), &root.guests_dir(), guest.as_bytes())?;
    nix::fcntl::renameat2(&gdir, "base", &staged, TREE, RenameFlags::RENAME_EXCHANGE)
        .at(root.guests_dir().join(guest).join("base"))?;
    finish_rollback(root, guest)?;
    Ok(RollbackReport {
        guest: guest.to_string(),
        dry_run,
        restored: target.name,
        kept_as,
        files: clone.files,
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// Finishes or undoes guest `guest`'s `snapshots/.rollback` (see [`rollback`]).
fn finish_rollback(root: &HostRoot, guest: &str) -> Result<()> {
    let shown = snapshots_path(root, guest);
    let staged = shown.join(ROLLBACK);
    let dir = snapshots_dir(root, guest)?;
    let pending = staged.join(PENDING);
    match std::fs::read_to_string(&pending) {
        Ok(text) => {
            let base_top = std::fs::symlink_metadata(root.guests_dir().join(guest).join("base"))
                .at(root.guests_dir().join(guest).join("base"))?
                .ino();
            if text.trim().parse::<u64>().ok() != Some(base_top) {
                // Never exchanged: the guest is as it was.
                return store::remove_guest_tree(root, dir.as_fd(), &shown, ROLLBACK.as_bytes());
            }
            std::fs::remove_file(&pending).at(&pending)?;
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).at(&pending),
    }
    // Exchanged. The overlay shows the guest's `/` with the (empty) upper root's metadata:
    // it gets the restored tree's.
    let gdir = fsx::open_dir_beneath(root.guests_fd(), &root.guests_dir(), guest.as_bytes())?;
    let gshown = root.guests_dir().join(guest);
    let (st, xattrs) = base_top(&gdir, &gshown)?;
    let upper = fsx::open_dir_beneath(gdir.as_fd(), &gshown, b"upper")?;
    fsx::set_dir_metadata(upper.as_fd(), &st, &xattrs).at(gshown.join("upper"))?;
    let record = match load_record(&staged.join(RECORD)) {
        Ok(record) => record,
        // Exchanged (no pending) but no record: keep the tree under a name of its own.
        Err(_) => {
            let record = SnapshotRecord {
                name: utc_stamp(now_unix()),
                created_unix: now_unix(),
                made_by: "rollback".into(),
            };
            save_record(&record, &staged.join(RECORD))?;
            record
        }
    };
    let name = free_name(root, guest, &record.name);
    if name != record.name {
        save_record(
            &SnapshotRecord {
                name: name.clone(),
                ..record
            },
            &staged.join(RECORD),
        )?;
    }
    nix::fcntl::renameat2(
        &dir,
        ROLLBACK,
        &dir,
        name.as_str(),
        RenameFlags::RENAME_NOREPLACE,
    )
    .at(shown.join(&name))?;
    nix::unistd::fsync(&gdir).at(gshown)
}

/// The metadata of the top of the base of the guest whose directory is `gdir` (shown as
/// `gshown`): what the guest's `/` must show once its upper layer is empty.
fn base_top(
    gdir: &std::os::fd::OwnedFd,
    gshown: &Path,
) -> Result<(fsx::Stat, Vec<crate::fsx::Xattr>)> {
    let base = fsx::open_dir_beneath(gdir.as_fd(), gshown, b"base")?;
    let st = fsx::fstat(&base).at(gshown.join("base"))?;
    let xattrs = fsx::xattrs_at(base.as_fd(), b".").at(gshown.join("base"))?;
    Ok((st, xattrs))
}

/// What `attempt.toml` records.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
struct AttemptRecord {
    /// The snapshot the guest goes back to unless the attempt completes.
    snapshot: String,
    /// `run` while the change is in the upper layer only; `fold` once it is to be kept.
    phase: String,
    /// What the change is (`upgrade`).
    what: String,
}

fn attempt_path(root: &HostRoot, guest: &str) -> PathBuf {
    root.guests_dir().join(guest).join(ATTEMPT_FILE)
}

/// Starts a change of stopped guest `guest` through its overlay (an upgrade), after snapshot
/// `snapshot` of its folded tree: until [`keep_attempt`] says the change is to be kept, a
/// killed run's next writer — or [`abandon_attempt`] — takes the guest back to the snapshot
/// by discarding its upper layer.
///
/// # Errors
/// I/O errors.
pub fn begin_attempt(root: &HostRoot, guest: &str, snapshot: &str, what: &str) -> Result<()> {
    let record = AttemptRecord {
        snapshot: snapshot.to_string(),
        phase: "run".into(),
        what: what.to_string(),
    };
    let text = toml::to_string(&record).expect("an attempt record serializes");
    fsx::write_atomic(&attempt_path(root, guest), text.as_bytes())
}

/// Marks guest `guest`'s change as to be kept, then folds it into base: from here a killed
/// run's next writer finishes the fold instead of going back. Returns the entries folded.
///
/// # Errors
/// [`Error::NotFolded`] (the attempt then stays to be kept: the next fold finishes it), I/O
/// and index errors.
pub fn keep_attempt(root: &HostRoot, guest: &str) -> Result<u64> {
    let path = attempt_path(root, guest);
    let mut record: AttemptRecord = toml::from_str(&std::fs::read_to_string(&path).at(&path)?)
        .map_err(|e| Error::BadRecord {
            path: path.clone(),
            message: e.message().to_string(),
        })?;
    record.phase = "fold".into();
    let text = toml::to_string(&record).expect("an attempt record serializes");
    fsx::write_atomic(&path, text.as_bytes())?;
    let folded = fold_all(root, guest)?;
    std::fs::remove_file(&path).at(&path)?;
    Ok(folded)
}

/// Takes guest `guest` back to the snapshot its change started from: the upper layer the
/// change wrote is replaced by an empty one in one exchange (base was not touched: it is the
/// snapshot's tree), then removed.
///
/// # Errors
/// I/O and index errors.
pub fn abandon_attempt(root: &HostRoot, guest: &str) -> Result<()> {
    let path = attempt_path(root, guest);
    let gdir = fsx::open_dir_beneath(root.guests_fd(), &root.guests_dir(), guest.as_bytes())?;
    let gshown = root.guests_dir().join(guest);
    let doomed = ".upper.abandoned";
    store::remove_guest_tree(root, gdir.as_fd(), &gshown, doomed.as_bytes())?;
    // The empty upper gets base's top metadata: the snapshot's `/` (the change may have
    // touched the old upper's top).
    let (st, xattrs) = base_top(&gdir, &gshown)?;
    nix::sys::stat::mkdirat(&gdir, doomed, Mode::from_bits_truncate(0o700))
        .at(gshown.join(doomed))?;
    let fresh = fsx::open_dir_beneath(gdir.as_fd(), &gshown, doomed.as_bytes())?;
    fsx::set_dir_metadata(fresh.as_fd(), &st, &xattrs).at(gshown.join(doomed))?;
    nix::fcntl::renameat2(&gdir, "upper", &gdir, doomed, RenameFlags::RENAME_EXCHANGE)
        .at(gshown.join("upper"))?;
    nix::unistd::fsync(&gdir).at(&gshown)?;
    match std::fs::remove_file(&path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).at(&path),
    }
    store::remove_guest_tree(root, gdir.as_fd(), &gshown, doomed.as_bytes())?;
    let work = fsx::open_dir_beneath(gdir.as_fd(), &gshown, b"work")?;
    for child in fsx::read_names(work.as_fd()).at(gshown.join("work"))? {
        store::remove_guest_tree(root, work.as_fd(), &gshown.join("work"), &child)?;
    }
    Ok(())
}

/// Finishes what killed snapshot, rollback and attempt runs left, for every guest:
/// `.NAME.making` and `.NAME.removing` removed, `.rollback` finished or undone
/// ([`rollback`]), an attempt still in its `run` phase abandoned and one in its `fold` phase
/// folded ([`begin_attempt`]). A guest that is in use is left for a later writer.
pub(crate) fn recover_snapshots(root: &HostRoot) -> Result<()> {
    for guest in crate::guest::guest_names(root)? {
        let gshown = root.guests_dir().join(&guest);
        let attempt = gshown.join(ATTEMPT_FILE);
        let dir = gshown.join(SNAPSHOTS_DIR);
        let leftovers: Vec<String> = match std::fs::read_dir(&dir) {
            Ok(entries) => entries
                .filter_map(|e| e.ok()?.file_name().into_string().ok())
                .filter(|n| n.starts_with('.'))
                .collect(),
            Err(_) => Vec::new(),
        };
        let has_attempt = std::fs::symlink_metadata(&attempt).is_ok();
        if leftovers.is_empty() && !has_attempt {
            continue;
        }
        // Only an offline guest is touched; a guest in use keeps its leftovers for later.
        if OfflineGuest::open(root, &guest).is_err() {
            continue;
        }
        for name in &leftovers {
            if name == ROLLBACK {
                finish_rollback(root, &guest)?;
            } else if name.ends_with(MAKING) || name.ends_with(REMOVING) || name == ROLLBACK_NEW {
                let fd = snapshots_dir(root, &guest)?;
                store::remove_guest_tree(root, fd.as_fd(), &dir, name.as_bytes())?;
            }
        }
        if std::fs::symlink_metadata(gshown.join(".upper.abandoned")).is_ok() {
            let gdir =
                fsx::open_dir_beneath(root.guests_fd(), &root.guests_dir(), guest.as_bytes())?;
            store::remove_guest_tree(root, gdir.as_fd(), &gshown, b".upper.abandoned")?;
        }
        if has_attempt {
            let text = std::fs::read_to_string(&attempt).at(&attempt)?;
            match toml::from_str::<AttemptRecord>(&text) {
                Ok(r) if r.phase == "fold" => {
                    keep_attempt(root, &guest)?;
                }
                // `run`, or a record cut short before its first phase was written.
                _ => abandon_attempt(root, &guest)?,
            }
        }
    }
    Ok(())
}

/// Whether guest `guest` has a change through its overlay in flight (a killed upgrade that
/// the next writer has not yet settled).
pub fn attempt_in_flight(root: &HostRoot, guest: &str) -> bool {
    std::fs::symlink_metadata(attempt_path(root, guest)).is_ok()
}

/// Seconds since the epoch as `YYYYMMDDTHHMMSSZ` (UTC), a snapshot's default name.
pub fn utc_stamp(secs: i64) -> String {
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Civil date from days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}{m:02}{d:02}T{:02}{:02}{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utc_stamps_are_civil_dates() {
        assert_eq!(utc_stamp(0), "19700101T000000Z");
        assert_eq!(utc_stamp(1_796_412_225), "20261204T192345Z");
        assert_eq!(utc_stamp(951_782_400), "20000229T000000Z");
    }

    #[test]
    fn snapshot_names_follow_guest_names() {
        for good in ["a", "pre-upgrade", "20261204T203345Z", "x.y_z"] {
            assert!(validate_snapshot_name(good).is_ok(), "{good}");
        }
        for bad in ["", ".x", "-x", "a/b", "..", "a b", &"x".repeat(65)] {
            assert!(validate_snapshot_name(bad).is_err(), "{bad}");
        }
    }
}
