//! A tree's manifest: what every path of a tree held when cowherd wrote it (an import), kept
//! beside the guest, so that a later resync tells the guest's own changes from the machine's.
//!
//! ```text
//! guests/<name>/
//! ├── import.manifest        what the last import (or resync) wrote into base/
//! ├── import.manifest.new    a resync's manifest until its tree has become base/
//! ├── linkdest/              a resync's --link-dest: base's directories and regular files
//! │                          (hardlinks), no symlink, no device; removed after the copy
//! └── discarded/<UTC time>/  what `--discard-guest-changes` took from the guest:
//!     ├── changes            one line a change: "modified base /etc/motd"
//!     ├── base/…             the guest's versions of the paths it had changed in base
//!     └── upper/             the guest's upper layer as it was
//! ```
//!
//! The file is text, one entry a line, so that a person can read it:
//! `KIND MODE UID GID SIZE MTIME_NS XATTR_HASH EXTRA PATH`, where KIND is one of `f d l c b p s`,
//! EXTRA is a symlink's target or a device's number (else `-`), and EXTRA and PATH have every
//! byte outside `!`..`~` (and `\`) written as `\xHH`. The first line is
//! `cowherd-manifest 1 INO`: the inode number of the directory the manifest describes, so that
//! a manifest written for a tree that never became the guest's base is recognised.

use std::collections::HashSet;
use std::ffi::OsStr;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{AtFlags, OFlag};
use nix::sys::stat::Mode;

use crate::error::{Error, PathContext, Result};
use crate::fsx::{self, Stat};
use crate::root::HostRoot;

/// The name of a guest's manifest, in `guests/<name>/`.
pub const MANIFEST_FILE: &str = "import.manifest";
/// A resync's manifest until its tree has become the guest's base.
const MANIFEST_NEW: &str = "import.manifest.new";
/// A resync's `--link-dest` tree, in `guests/<name>/`.
pub const LINKDEST_DIR: &str = "linkdest";
/// Where discarded guest versions are kept, in `guests/<name>/`.
pub const DISCARDED_DIR: &str = "discarded";
/// Deeper trees are refused: a walk holds one descriptor a level.
const MAX_DEPTH: usize = 4096;
const HEADER: &str = "cowherd-manifest 1";

/// What one path held.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Entry {
    /// `f d l c b p s`.
    kind: u8,
    /// Permission bits (`0o7777`).
    mode: u32,
    uid: u32,
    gid: u32,
    /// Regular files only.
    size: u64,
    /// Regular files only (a directory's moves with its entries, a symlink's is not shown).
    mtime_ns: i64,
    /// Hash of the xattrs, overlayfs's bookkeeping left out.
    xhash: [u8; 32],
    /// A symlink's target, a device's number.
    extra: Vec<u8>,
}

impl Entry {
    fn of(st: &Stat, rdev: u64, xattrs: &[fsx::Xattr], target: Vec<u8>) -> Entry {
        let kind = match st.mode & libc::S_IFMT {
            libc::S_IFREG => b'f',
            libc::S_IFDIR => b'd',
            libc::S_IFLNK => b'l',
            libc::S_IFCHR => b'c',
            libc::S_IFBLK => b'b',
            libc::S_IFIFO => b'p',
            _ => b's',
        };
        let kept: Vec<fsx::Xattr> = xattrs
            .iter()
            .filter(|(k, _)| !fsx::is_overlay_bookkeeping(k))
            .cloned()
            .collect();
        let file = kind == b'f';
        Entry {
            kind,
            mode: st.mode & 0o7777,
            uid: st.uid,
            gid: st.gid,
            size: if file { st.size } else { 0 },
            mtime_ns: if file { st.mtime_ns } else { 0 },
            xhash: crate::key::xattr_hash(&kept),
            extra: match kind {
                b'l' => target,
                b'c' | b'b' => rdev.to_string().into_bytes(),
                _ => Vec::new(),
            },
        }
    }
}

/// What every path of a tree held: kind, permissions, owner, xattrs, and a regular file's size
/// and mtime, a symlink's target, a device's number.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TreeManifest {
    /// Sorted by path (relative, `b""` the top).
    entries: Vec<(Vec<u8>, Entry)>,
}

/// Overlayfs's own metadata found in a tree: it would be obeyed by the overlay, not shown.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct OverlayMetadata {
    /// Guest-absolute paths of 0/0 character devices (overlayfs whiteouts) and of entries
    /// carrying `trusted.overlay.*` xattrs.
    pub paths: Vec<PathBuf>,
}

impl TreeManifest {
    /// Takes the manifest of the tree at `dir`, never following a symlink or crossing a
    /// mount (a mount point is recorded, not entered), and lists the entries overlayfs would
    /// read as its own metadata (DESIGN-NOTES fact 15).
    ///
    /// # Errors
    /// [`Error::Io`] naming the entry that cannot be read, or a tree deeper than 4096 levels.
    pub fn take(dir: &Path) -> Result<(TreeManifest, OverlayMetadata)> {
        let top = fsx::open_dir(dir)?;
        let mut entries = Vec::new();
        let mut foreign = OverlayMetadata::default();
        walk(
            top.as_fd(),
            dir,
            &mut |rel, _, _, st, rdev, xattrs, target| {
                if st.mode & libc::S_IFMT == libc::S_IFCHR && rdev == 0
                    || xattrs
                        .iter()
                        .any(|(k, _)| k.starts_with(fsx::OVERLAY_XATTR))
                {
                    foreign.paths.push(guest_path(rel));
                }
                entries.push((rel.to_vec(), Entry::of(st, rdev, xattrs, target)));
                Ok(true)
            },
        )?;
        entries.sort_by(|a, b| a.0.cmp(&b.0));
        Ok((TreeManifest { entries }, foreign))
    }

    /// The number of paths.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether it holds no path.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    fn get(&self, rel: &[u8]) -> Option<(usize, &Entry)> {
        self.entries
            .binary_search_by(|(p, _)| p.as_slice().cmp(rel))
            .ok()
            .map(|i| (i, &self.entries[i].1))
    }

    fn to_text(&self, tree_ino: u64) -> Vec<u8> {
        let mut out = format!("{HEADER} {tree_ino}\n").into_bytes();
        for (rel, e) in &self.entries {
            out.extend_from_slice(
                format!(
                    "{} {:o} {} {} {} {} {} ",
                    e.kind as char,
                    e.mode,
                    e.uid,
                    e.gid,
                    e.size,
                    e.mtime_ns,
                    hex(&e.xhash)
                )
                .as_bytes(),
            );
            if e.extra.is_empty() {
                out.push(b'-');
            } else {
                escape_into(&e.extra, &mut out);
            }
            out.push(b' ');
            out.push(b'/');
            escape_into(rel, &mut out);
            out.push(b'\n');
        }
        out
    }

    fn parse(text: &[u8]) -> Option<(TreeManifest, u64)> {
        let mut lines = text.split(|&b| b == b'\n');
        let head = std::str::from_utf8(lines.next()?).ok()?;
        let ino = head.strip_prefix(HEADER)?.trim().parse().ok()?;
        let mut entries = Vec::new();
        for line in lines.filter(|l| !l.is_empty()) {
            let f: Vec<&[u8]> = line.split(|&b| b == b' ').collect();
            if f.len() != 9 || f[0].len() != 1 {
                return None;
            }
            fn num(b: &[u8]) -> Option<&str> {
                std::str::from_utf8(b).ok()
            }
            let xhash = unhex(num(f[6])?)?;
            let extra = if f[7] == b"-" {
                Vec::new()
            } else {
                unescape(f[7])?
            };
            let rel = unescape(f[8].strip_prefix(b"/")?)?;
            entries.push((
                rel,
                Entry {
                    kind: f[0][0],
                    mode: u32::from_str_radix(num(f[1])?, 8).ok()?,
                    uid: num(f[2])?.parse().ok()?,
                    gid: num(f[3])?.parse().ok()?,
                    size: num(f[4])?.parse().ok()?,
                    mtime_ns: num(f[5])?.parse().ok()?,
                    xhash,
                    extra,
                },
            ));
        }
        entries.sort_by(|a, b| a.0.cmp(&b.0));
        Some((TreeManifest { entries }, ino))
    }

    /// Writes the manifest of the tree in `guest_dir/tree_name` as `guest_dir/<file>`
    /// (temporary file, fsync, rename), naming the tree's inode.
    fn save_as(&self, guest_dir: &Path, tree_name: &str, file: &str) -> Result<()> {
        let tree = guest_dir.join(tree_name);
        let ino = fsx::lstat_path(&tree)?.ino;
        let path = guest_dir.join(file);
        fsx::write_atomic(&path, &self.to_text(ino))?;
        std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o600))
            .at(&path)
    }

    /// Records this as the manifest of `guest_dir/base` (an import's staging directory, or a
    /// guest's directory).
    ///
    /// # Errors
    /// [`Error::Io`] naming the file.
    pub fn save_for_base(&self, guest_dir: &Path) -> Result<()> {
        self.save_as(guest_dir, "base", MANIFEST_FILE)
    }

    /// Records this as the manifest of `guest_dir/<tree_name>`, a tree that is to become the
    /// guest's base by an exchange; [`load_manifest`] takes it once it has.
    ///
    /// # Errors
    /// [`Error::Io`] naming the file.
    pub fn save_pending(&self, guest_dir: &Path, tree_name: &str) -> Result<()> {
        self.save_as(guest_dir, tree_name, MANIFEST_NEW)
    }
}

/// The manifest of the guest's base, if it has one: a pending one (a resync's, see
/// [`TreeManifest::save_pending`]) is taken if its tree has become base (renamed over the old
/// one) and removed if not.
///
/// # Errors
/// [`Error::Io`] naming the file; [`Error::BadRecord`] for a file that is not a manifest.
pub fn load_manifest(guest_dir: &Path) -> Result<Option<TreeManifest>> {
    let base_ino = fsx::lstat_path(&guest_dir.join("base"))?.ino;
    let pending = guest_dir.join(MANIFEST_NEW);
    let current = guest_dir.join(MANIFEST_FILE);
    match std::fs::read(&pending) {
        Ok(text) => match TreeManifest::parse(&text) {
            Some((_, ino)) if ino == base_ino => {
                std::fs::rename(&pending, &current).at(&current)?
            }
            _ => std::fs::remove_file(&pending).at(&pending)?,
        },
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => {
            return Err(Error::Io {
                path: pending,
                error: e,
            });
        }
    }
    let text = match std::fs::read(&current) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(error) => {
            return Err(Error::Io {
                path: current,
                error,
            });
        }
    };
    match TreeManifest::parse(&text) {
        Some((manifest, ino)) if ino == base_ino => Ok(Some(manifest)),
        Some(_) => Err(Error::BadRecord {
            path: current,
            message: "it describes another tree than the guest's base; remove it and resync \
                      with --discard-guest-changes"
                .into(),
        }),
        None => Err(Error::BadRecord {
            path: current,
            message: "not a cowherd manifest; remove it and resync with --discard-guest-changes"
                .into(),
        }),
    }
}

/// How the guest changed a path since its manifest.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ChangeKind {
    /// Not in the manifest.
    Added,
    /// In the manifest, gone (or hidden by a whiteout).
    Removed,
    /// Another kind, permissions, owner, xattrs, size, mtime or target.
    Modified,
}

/// Where the guest's change is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Layer {
    /// Folded into base.
    Base,
    /// Still in the upper layer.
    Upper,
}

/// One path the guest changed since its manifest was taken.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct GuestChange {
    /// The path inside the guest (`/etc/motd`); an added or removed directory stands for
    /// everything below it.
    pub path: PathBuf,
    /// What happened to it.
    pub kind: ChangeKind,
    /// Where the change is.
    pub layer: Layer,
    #[serde(skip)]
    rel: Vec<u8>,
}

impl std::fmt::Display for GuestChange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = match self.kind {
            ChangeKind::Added => "added",
            ChangeKind::Removed => "removed",
            ChangeKind::Modified => "modified",
        };
        let layer = match self.layer {
            Layer::Base => "base",
            Layer::Upper => "upper",
        };
        write!(
            f,
            "{kind} {layer} /{}",
            crate::report::display_path(&self.rel)
        )
    }
}

/// What the guest `guest_dir` changed since `manifest`: its base compared with the manifest,
/// and everything in its upper layer. With `linkdest`, also makes that directory a copy of
/// base's directories holding hardlinks of its regular files — the only tree a resync hands
/// to rsync as `--link-dest` (rsync follows symlinks there, DESIGN-NOTES fact 13).
///
/// # Algorithm
/// One fd-relative walk of base (no symlink followed, no mount crossed): an entry missing
/// from the manifest is `Added` (once, for its topmost directory), one that differs is
/// `Modified`, and manifest entries the walk did not meet are `Removed` (once, for the
/// topmost). Then one walk of upper: a 0/0 character device is a whiteout (`Removed`), an
/// opaque directory `Modified`, a directory copied up only for its entries is no change
/// unless its own permissions, owner or xattrs differ, and every other entry is `Added` or
/// `Modified`. A regular file of base that cannot be linked into `linkdest` (link limit, an
/// immutable object) is left out of it: rsync then copies it.
///
/// # Errors
/// [`Error::Io`] naming the entry that cannot be read or linked.
pub fn guest_changes(
    guest_dir: &Path,
    manifest: &TreeManifest,
    linkdest: Option<&Path>,
) -> Result<Vec<GuestChange>> {
    let base = guest_dir.join("base");
    let top = fsx::open_dir(&base)?;
    let mut seen = vec![false; manifest.entries.len()];
    let mut changes = Vec::new();
    let mut shadow = match linkdest {
        Some(dir) => Some(Shadow::new(dir)?),
        None => None,
    };
    walk(
        top.as_fd(),
        &base,
        &mut |rel, parent, name, st, rdev, xattrs, target| {
            if let Some(shadow) = shadow.as_mut() {
                shadow.add(rel, parent, name, st)?;
            }
            let entry = Entry::of(st, rdev, xattrs, target);
            match manifest.get(rel) {
                Some((i, recorded)) => {
                    seen[i] = true;
                    if *recorded != entry {
                        changes.push(change(rel, ChangeKind::Modified, Layer::Base));
                    }
                }
                None => {
                    let (dir, _) = fsx::split_parent(rel);
                    if rel.is_empty() || manifest.get(dir).is_some() {
                        changes.push(change(rel, ChangeKind::Added, Layer::Base));
                    }
                }
            }
            Ok(true)
        },
    )?;
    for (i, (rel, _)) in manifest.entries.iter().enumerate() {
        if seen[i] || rel.is_empty() {
            continue;
        }
        let (dir, _) = fsx::split_parent(rel);
        if manifest.get(dir).is_some_and(|(p, _)| seen[p]) {
            changes.push(change(rel, ChangeKind::Removed, Layer::Base));
        }
    }
    upper_changes(guest_dir, manifest, &mut changes)?;
    changes.sort_by(|a, b| (a.layer as u8, &a.rel).cmp(&(b.layer as u8, &b.rel)));
    Ok(changes)
}

fn change(rel: &[u8], kind: ChangeKind, layer: Layer) -> GuestChange {
    GuestChange {
        path: guest_path(rel),
        kind,
        layer,
        rel: rel.to_vec(),
    }
}

/// The guest's changes in its upper layer (see [`guest_changes`]).
fn upper_changes(
    guest_dir: &Path,
    manifest: &TreeManifest,
    changes: &mut Vec<GuestChange>,
) -> Result<()> {
    let upper = guest_dir.join("upper");
    let top = match fsx::open_dir(&upper) {
        Ok(fd) => fd,
        Err(e) if e.errno() == Some(libc::ENOENT) => return Ok(()),
        Err(e) => return Err(e),
    };
    // Directories whose whole subtree is already one change.
    let mut covered: HashSet<Vec<u8>> = HashSet::new();
    walk(
        top.as_fd(),
        &upper,
        &mut |rel, _, _, st, rdev, xattrs, _| {
            if rel.is_empty() {
                return Ok(true);
            }
            let (dir, _) = fsx::split_parent(rel);
            if covered.contains(dir) {
                if st.is_dir() {
                    covered.insert(rel.to_vec());
                }
                return Ok(true);
            }
            let recorded = manifest.get(rel).map(|(_, e)| e);
            let is_whiteout = st.mode & libc::S_IFMT == libc::S_IFCHR && rdev == 0;
            let opaque = st.is_dir()
                && xattrs.iter().any(|(k, v)| {
                    k.as_slice() == b"trusted.overlay.opaque" && v.as_slice() == b"y"
                });
            let kind = match recorded {
                _ if is_whiteout => recorded.map(|_| ChangeKind::Removed),
                None => Some(ChangeKind::Added),
                Some(_) if opaque || !st.is_dir() => Some(ChangeKind::Modified),
                Some(r) => {
                    let entry = Entry::of(st, 0, xattrs, Vec::new());
                    (r.kind != b'd'
                        || r.mode != entry.mode
                        || r.uid != entry.uid
                        || r.gid != entry.gid
                        || r.xhash != entry.xhash)
                        .then_some(ChangeKind::Modified)
                }
            };
            if let Some(kind) = kind {
                changes.push(change(rel, kind, Layer::Upper));
            }
            if st.is_dir() && (recorded.is_none() || opaque) {
                covered.insert(rel.to_vec());
            }
            Ok(!is_whiteout)
        },
    )
}

/// The paths among `changes` whose entry in `new` differs from the one in `old`: the machine
/// changed them too, so the guest's version kept there is not the machine's newer one.
pub fn changed_by_both(
    changes: &[GuestChange],
    old: &TreeManifest,
    new: &TreeManifest,
) -> Vec<PathBuf> {
    changes
        .iter()
        .filter(|c| old.get(&c.rel).map(|(_, e)| e) != new.get(&c.rel).map(|(_, e)| e))
        .map(|c| c.path.clone())
        .collect()
}

/// Puts the guest's base-layer changes into `tree` (`guest_dir/<tree_name>`, a resync's new
/// tree): an added or modified entry of base is linked there (copied when it cannot be linked:
/// an immutable object, the link limit), a directory with everything below it; a removed one
/// is removed. Upper-layer changes stay where they are.
///
/// # Errors
/// [`Error::Io`] naming the entry.
pub fn keep_guest_changes(
    root: &HostRoot,
    guest_dir: &Path,
    tree_name: &str,
    changes: &[GuestChange],
) -> Result<()> {
    let base_path = guest_dir.join("base");
    let tree_path = guest_dir.join(tree_name);
    let base = fsx::open_dir(&base_path)?;
    let tree = fsx::open_dir(&tree_path)?;
    for c in changes.iter().filter(|c| c.layer == Layer::Base) {
        let (dir, name) = fsx::split_parent(&c.rel);
        let shown = fsx::join(&tree_path, &c.rel);
        if c.rel.is_empty() {
            // The top itself: its metadata.
            let st = fsx::fstat(&base).at(&base_path)?;
            let xattrs = fsx::xattrs_at(base.as_fd(), b".").at(&base_path)?;
            fsx::set_dir_metadata(tree.as_fd(), &st, &xattrs).at(&shown)?;
            continue;
        }
        let to = make_parents(
            root,
            base.as_fd(),
            &base_path,
            tree.as_fd(),
            &tree_path,
            dir,
        )?;
        if c.kind == ChangeKind::Removed {
            remove_entry(root, to.as_fd(), &tree_path, dir, name)?;
            continue;
        }
        let from = fsx::open_dir_beneath(base.as_fd(), &base_path, dir)?;
        copy_entry(root, from.as_fd(), to.as_fd(), &shown, name)?;
    }
    Ok(())
}

/// Keeps the guest's versions of what it changed, before a resync replaces them with the
/// machine's: base-layer entries are linked (or copied) into `guest_dir/discarded/<stamp>/base`,
/// the upper layer is moved whole to `…/upper` and replaced by an empty one, and `…/changes`
/// lists the changes. Returns the directory.
///
/// # Errors
/// [`Error::Io`] naming the entry.
pub fn discard_guest_changes(
    root: &HostRoot,
    guest_dir: &Path,
    changes: &[GuestChange],
) -> Result<PathBuf> {
    let top = guest_dir.join(DISCARDED_DIR);
    fsx::ensure_dir(&top, 0o700)?;
    let stamp = utc_stamp();
    let mut dest = top.join(&stamp);
    let mut n = 1;
    while std::fs::symlink_metadata(&dest).is_ok() {
        n += 1;
        dest = top.join(format!("{stamp}.{n}"));
    }
    fsx::ensure_dir(&dest.join("base"), 0o700)?;
    let mut list = Vec::new();
    for c in changes {
        list.extend_from_slice(c.to_string().as_bytes());
        list.push(b'\n');
    }
    fsx::write_atomic(&dest.join("changes"), &list)?;
    let base_path = guest_dir.join("base");
    let base = fsx::open_dir(&base_path)?;
    let kept_path = dest.join("base");
    let kept = fsx::open_dir(&kept_path)?;
    for c in changes.iter().filter(|c| c.layer == Layer::Base) {
        if c.rel.is_empty() && c.kind == ChangeKind::Added {
            // No manifest: everything of base is the guest's.
            for name in fsx::read_names(base.as_fd()).at(&base_path)? {
                let shown = kept_path.join(OsStr::from_bytes(&name));
                copy_entry(root, base.as_fd(), kept.as_fd(), &shown, &name)?;
            }
            continue;
        }
        if c.kind == ChangeKind::Removed || c.rel.is_empty() {
            continue;
        }
        let (dir, name) = fsx::split_parent(&c.rel);
        let to = make_parents(
            root,
            base.as_fd(),
            &base_path,
            kept.as_fd(),
            &kept_path,
            dir,
        )?;
        let from = fsx::open_dir_beneath(base.as_fd(), &base_path, dir)?;
        copy_entry(
            root,
            from.as_fd(),
            to.as_fd(),
            &fsx::join(&kept_path, &c.rel),
            name,
        )?;
    }
    if changes.iter().any(|c| c.layer == Layer::Upper) {
        let guest = fsx::open_dir(guest_dir)?;
        let dest_fd = fsx::open_dir(&dest)?;
        // An empty upper is made aside and exchanged with the guest's in one step: the guest
        // always has an upper layer, the old one is always somewhere.
        nix::sys::stat::mkdirat(&dest_fd, "upper", Mode::from_bits_truncate(0o755))
            .at(dest.join("upper"))?;
        nix::fcntl::renameat2(
            &guest,
            "upper",
            &dest_fd,
            "upper",
            nix::fcntl::RenameFlags::RENAME_EXCHANGE,
        )
        .at(guest_dir.join("upper"))?;
        // The overlay's scratch of the old upper.
        let work = guest_dir.join("work");
        if let Ok(work_fd) = fsx::open_dir(&work) {
            for name in fsx::read_names(work_fd.as_fd()).at(&work)? {
                crate::store::remove_guest_tree(root, work_fd.as_fd(), &work, &name)?;
            }
        }
    }
    let guest = fsx::open_dir(guest_dir)?;
    nix::unistd::fsync(&guest).at(guest_dir)?;
    Ok(dest)
}

/// Now as `YYYYMMDDTHHMMSSZ` (UTC).
fn utc_stamp() -> String {
    crate::snapshot::utc_stamp(crate::guest::now_unix())
}

/// Opens directory `rel` of `to`, making every missing directory on the way with the
/// metadata of the same directory of `from` (never following a symlink in either); an entry
/// in the way that is not a directory is removed first.
fn make_parents(
    root: &HostRoot,
    from: BorrowedFd<'_>,
    from_path: &Path,
    to: BorrowedFd<'_>,
    to_path: &Path,
    rel: &[u8],
) -> Result<OwnedFd> {
    let mut done: Vec<u8> = Vec::new();
    let mut dir = fsx::open_beneath(to, b"", OFlag::O_RDONLY | OFlag::O_DIRECTORY).at(to_path)?;
    for part in rel.split(|&b| b == b'/').filter(|p| !p.is_empty()) {
        let parent_shown = fsx::join(to_path, &done);
        if !done.is_empty() {
            done.push(b'/');
        }
        done.extend_from_slice(part);
        let shown = fsx::join(to_path, &done);
        dir = match fsx::open_beneath(dir.as_fd(), part, OFlag::O_RDONLY | OFlag::O_DIRECTORY) {
            Ok(fd) => fd,
            Err(Errno::ENOENT | Errno::ENOTDIR | Errno::ELOOP) => {
                if fsx::lstat_at(dir.as_fd(), part).is_ok() {
                    crate::store::remove_guest_tree(root, dir.as_fd(), &parent_shown, part)?;
                }
                let src = fsx::open_dir_beneath(from, from_path, &done)?;
                make_dir_like(dir.as_fd(), part, src.as_fd(), &shown)?
            }
            Err(e) => return Err(e).at(&shown),
        };
    }
    Ok(dir)
}

/// Makes directory `name` of `dir` with the owner, mode, xattrs and mtime of the open
/// directory `like`, and opens it.
fn make_dir_like(
    dir: BorrowedFd<'_>,
    name: &[u8],
    like: BorrowedFd<'_>,
    shown: &Path,
) -> Result<OwnedFd> {
    let st = fsx::fstat(like).at(shown)?;
    let xattrs = fsx::xattrs_at(like, b".").at(shown)?;
    nix::sys::stat::mkdirat(
        dir,
        OsStr::from_bytes(name),
        Mode::from_bits_truncate(0o700),
    )
    .at(shown)?;
    let made = fsx::open_beneath(dir, name, OFlag::O_RDONLY | OFlag::O_DIRECTORY).at(shown)?;
    fsx::set_dir_metadata(made.as_fd(), &st, &xattrs).at(shown)?;
    Ok(made)
}

/// Removes the entry `name` of `dir` (`rel_dir` below `tree_path`) with everything below it;
/// nothing if it is not there.
fn remove_entry(
    root: &HostRoot,
    dir: BorrowedFd<'_>,
    tree_path: &Path,
    rel_dir: &[u8],
    name: &[u8],
) -> Result<()> {
    if fsx::lstat_at(dir, name).is_err() {
        return Ok(());
    }
    crate::store::remove_guest_tree(root, dir, &fsx::join(tree_path, rel_dir), name)
}

/// The temporary name an entry is linked or copied to before it is renamed into place.
const TEMP_NAME: &str = ".cowherd~keep";

/// Puts the entry `name` of `from` at `name` of `to` (`shown`), replacing what is there: a
/// non-directory by a hardlink (a copy for a regular file that cannot be linked: an immutable
/// store object, the link limit), renamed into place; a directory made with the same metadata
/// and filled likewise — or, if `to` has a directory there already, given the metadata only.
fn copy_entry(
    root: &HostRoot,
    from: BorrowedFd<'_>,
    to: BorrowedFd<'_>,
    shown: &Path,
    name: &[u8],
) -> Result<()> {
    let st = fsx::lstat_at(from, name).at(shown)?;
    let existing = fsx::lstat_at(to, name).ok();
    let parent_shown = shown.parent().unwrap_or(Path::new("/")).to_path_buf();
    if st.is_dir() {
        let src = fsx::open_beneath(from, name, OFlag::O_RDONLY | OFlag::O_DIRECTORY).at(shown)?;
        if existing.is_some_and(|e| e.is_dir()) {
            let there =
                fsx::open_beneath(to, name, OFlag::O_RDONLY | OFlag::O_DIRECTORY).at(shown)?;
            let xattrs = fsx::xattrs_at(src.as_fd(), b".").at(shown)?;
            return fsx::set_dir_metadata(there.as_fd(), &st, &xattrs).at(shown);
        }
        if existing.is_some() {
            crate::store::remove_guest_tree(root, to, &parent_shown, name)?;
        }
        let made = make_dir_like(to, name, src.as_fd(), shown)?;
        for child in fsx::read_names(src.as_fd()).at(shown)? {
            let child_shown = shown.join(OsStr::from_bytes(&child));
            copy_entry(root, src.as_fd(), made.as_fd(), &child_shown, &child)?;
        }
        // Its entries moved its mtime.
        return fsx::set_mtime(&made, st.mtime_ns).at(shown);
    }
    let _ = nix::unistd::unlinkat(to, TEMP_NAME, nix::unistd::UnlinkatFlags::NoRemoveDir);
    match nix::unistd::linkat(
        from,
        OsStr::from_bytes(name),
        to,
        TEMP_NAME,
        AtFlags::empty(),
    ) {
        Ok(()) => {}
        Err(Errno::EPERM | Errno::EMLINK) if st.is_file() => {
            copy_file(from, name, to, &st, shown)?;
        }
        Err(e) => return Err(e).at(shown),
    }
    if existing.is_some_and(|e| e.is_dir()) {
        crate::store::remove_guest_tree(root, to, &parent_shown, name)?;
    }
    nix::fcntl::renameat(to, TEMP_NAME, to, OsStr::from_bytes(name)).at(shown)
}

/// Copies the regular file `name` of `from` to [`TEMP_NAME`] in `to`: content (holes kept),
/// owner, mode, xattrs, mtime.
fn copy_file(
    from: BorrowedFd<'_>,
    name: &[u8],
    to: BorrowedFd<'_>,
    st: &Stat,
    shown: &Path,
) -> Result<()> {
    let src = fsx::open_beneath(from, name, OFlag::O_RDONLY).at(shown)?;
    let src = std::fs::File::from(src);
    let xattrs = fsx::read_xattrs(&src).at(shown)?;
    let out = nix::fcntl::openat(
        to,
        TEMP_NAME,
        OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_WRONLY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::from_bits_truncate(0o600),
    )
    .at(shown)?;
    let mut out = std::fs::File::from(out);
    fsx::copy_content(&src, &mut out, st.size).at(shown)?;
    fsx::set_file_metadata(&out, st.uid, st.gid, st.mode, &xattrs, st.mtime_ns).at(shown)?;
    out.sync_all().at(shown)
}

/// A resync's `--link-dest` tree being made beside a walk of base: its directories, and
/// hardlinks of its regular files.
struct Shadow {
    path: PathBuf,
    /// The directories on the walk's current path: relative path and descriptor.
    stack: Vec<(Vec<u8>, OwnedFd)>,
}

impl Shadow {
    fn new(path: &Path) -> Result<Shadow> {
        nix::unistd::mkdir(path, Mode::from_bits_truncate(0o700)).at(path)?;
        let fd = fsx::open_dir(path)?;
        Ok(Shadow {
            path: path.to_path_buf(),
            stack: vec![(Vec::new(), fd)],
        })
    }

    /// Mirrors the entry `rel` (`name` of `parent`) that the walk of base met.
    fn add(&mut self, rel: &[u8], parent: BorrowedFd<'_>, name: &[u8], st: &Stat) -> Result<()> {
        if rel.is_empty() || !(st.is_dir() || st.is_file()) {
            return Ok(());
        }
        let (dir, _) = fsx::split_parent(rel);
        while self.stack.len() > 1 && self.stack.last().is_some_and(|(r, _)| r.as_slice() != dir) {
            self.stack.pop();
        }
        let Some((top_rel, top)) = self.stack.last() else {
            return Ok(());
        };
        if top_rel.as_slice() != dir {
            // Its directory was not mirrored (it could not be made): rsync copies this.
            return Ok(());
        }
        let shown = fsx::join(&self.path, rel);
        if st.is_dir() {
            nix::sys::stat::mkdirat(
                top,
                OsStr::from_bytes(name),
                Mode::from_bits_truncate(0o700),
            )
            .at(&shown)?;
            let fd = fsx::open_beneath(top.as_fd(), name, OFlag::O_RDONLY | OFlag::O_DIRECTORY)
                .at(&shown)?;
            self.stack.push((rel.to_vec(), fd));
            return Ok(());
        }
        match nix::unistd::linkat(
            parent,
            OsStr::from_bytes(name),
            top,
            OsStr::from_bytes(name),
            AtFlags::empty(),
        ) {
            Ok(()) | Err(Errno::EPERM | Errno::EMLINK) => Ok(()),
            Err(e) => Err(e).at(&shown),
        }
    }
}

/// The visit of [`walk`]: the entry's path relative to the top (`b""` the top itself), its
/// parent directory and name (`"."` of the top for the top), its stat, device number, xattrs
/// and symlink target; returns whether to descend into a directory.
type Visit<'a> = dyn FnMut(&[u8], BorrowedFd<'_>, &[u8], &Stat, u64, &[fsx::Xattr], Vec<u8>) -> Result<bool>
    + 'a;

/// Walks every entry of the tree at `top` (host path `top_path`), depth first in name order,
/// never following a symlink and never entering a mount point (it is visited, not entered).
///
/// # Algorithm
/// A loop over a stack of levels kept on the heap (one open directory and its sorted names
/// each), not recursion: a hostile tree thousands of levels deep costs a descriptor a level
/// and no stack. Deeper than [`MAX_DEPTH`] is an error.
fn walk(top: BorrowedFd<'_>, top_path: &Path, visit: &mut Visit<'_>) -> Result<()> {
    struct Level {
        dir: OwnedFd,
        names: std::vec::IntoIter<Vec<u8>>,
        /// Length of the walk's path at this level.
        len: usize,
    }
    let st = nix::sys::stat::fstat(top).at(top_path)?;
    let xattrs = fsx::xattrs_at(top, b".").at(top_path)?;
    if !visit(
        b"",
        top,
        b".",
        &Stat::from(st),
        st.st_rdev,
        &xattrs,
        Vec::new(),
    )? {
        return Ok(());
    }
    let dev = st.st_dev;
    let listed = |dir: OwnedFd, rel: &[u8]| -> Result<Level> {
        let mut names = fsx::read_names(dir.as_fd()).at(fsx::join(top_path, rel))?;
        names.sort();
        Ok(Level {
            dir,
            names: names.into_iter(),
            len: rel.len(),
        })
    };
    let mut rel: Vec<u8> = Vec::new();
    let first = fsx::open_beneath(top, b"", OFlag::O_RDONLY | OFlag::O_DIRECTORY).at(top_path)?;
    let mut stack = vec![listed(first, &rel)?];
    while let Some(level) = stack.last_mut() {
        let Some(name) = level.names.next() else {
            stack.pop();
            continue;
        };
        rel.truncate(level.len);
        if !rel.is_empty() {
            rel.push(b'/');
        }
        rel.extend_from_slice(&name);
        let dir = level.dir.as_fd();
        let st = match nix::sys::stat::fstatat(
            dir,
            OsStr::from_bytes(&name),
            AtFlags::AT_SYMLINK_NOFOLLOW,
        ) {
            Ok(st) => st,
            Err(Errno::ENOENT) => continue,
            Err(e) => return Err(e).at(fsx::join(top_path, &rel)),
        };
        let stat = Stat::from(st);
        let xattrs = fsx::xattrs_at(dir, &name).at(fsx::join(top_path, &rel))?;
        let target = if st.st_mode & libc::S_IFMT == libc::S_IFLNK {
            nix::fcntl::readlinkat(dir, OsStr::from_bytes(&name))
                .at(fsx::join(top_path, &rel))?
                .as_bytes()
                .to_vec()
        } else {
            Vec::new()
        };
        let descend = visit(&rel, dir, &name, &stat, st.st_rdev, &xattrs, target)?;
        if !(descend && stat.is_dir() && st.st_dev == dev) {
            continue;
        }
        let sub = match fsx::open_beneath(dir, &name, OFlag::O_RDONLY | OFlag::O_DIRECTORY) {
            Ok(sub) => sub,
            // A mount point of the same filesystem (a bind mount): visited, not entered.
            Err(Errno::EXDEV) => continue,
            Err(e) => return Err(e).at(fsx::join(top_path, &rel)),
        };
        if stack.len() >= MAX_DEPTH {
            return Err(Error::Io {
                path: fsx::join(top_path, &rel),
                error: std::io::Error::other(format!(
                    "more than {MAX_DEPTH} directories deep; flatten the tree"
                )),
            });
        }
        let level = listed(sub, &rel)?;
        stack.push(level);
    }
    Ok(())
}

/// The first three paths, comma-separated, `…` after them if there are more: for messages.
pub(crate) fn first_paths(paths: &[PathBuf]) -> String {
    let mut first: Vec<String> = paths
        .iter()
        .take(3)
        .map(|p| p.display().to_string())
        .collect();
    if paths.len() > 3 {
        first.push("…".to_string());
    }
    first.join(", ")
}

/// A relative byte path as a guest-absolute path (`/etc/motd`).
fn guest_path(rel: &[u8]) -> PathBuf {
    let mut p = b"/".to_vec();
    p.extend_from_slice(rel);
    PathBuf::from(OsStr::from_bytes(&p))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> Option<[u8; 32]> {
    let mut out = [0u8; 32];
    if s.len() != 64 {
        return None;
    }
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(s.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

/// Writes `bytes` with every byte outside `!`..`~`, and `\`, as `\xHH`.
fn escape_into(bytes: &[u8], out: &mut Vec<u8>) {
    for &b in bytes {
        if (b'!'..=b'~').contains(&b) && b != b'\\' {
            out.push(b);
        } else {
            out.extend_from_slice(format!("\\x{b:02x}").as_bytes());
        }
    }
}

fn unescape(bytes: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\' {
            let h = std::str::from_utf8(bytes.get(i + 2..i + 4)?).ok()?;
            if bytes.get(i + 1) != Some(&b'x') {
                return None;
            }
            out.push(u8::from_str_radix(h, 16).ok()?);
            i += 4;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn escaped_bytes_read_back_the_same(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            let mut out = Vec::new();
            escape_into(&bytes, &mut out);
            prop_assert!(!out.contains(&b' ') && !out.contains(&b'\n'));
            prop_assert_eq!(unescape(&out), Some(bytes));
        }

        #[test]
        fn a_manifest_reads_back_the_same(
            paths in proptest::collection::btree_set(proptest::collection::vec(any::<u8>(), 1..20), 0..20),
            ino in any::<u64>(),
        ) {
            let entries: Vec<(Vec<u8>, Entry)> = paths
                .into_iter()
                .enumerate()
                .map(|(i, p)| {
                    (p.clone(), Entry {
                        kind: b"fdlcbps"[i % 7],
                        mode: (i as u32 * 37) & 0o7777,
                        uid: i as u32,
                        gid: 7,
                        size: i as u64 * 1000,
                        mtime_ns: -(i as i64) * 3,
                        xhash: [i as u8; 32],
                        extra: if i % 7 == 2 { p } else { Vec::new() },
                    })
                })
                .collect();
            let m = TreeManifest { entries };
            let (back, back_ino) = TreeManifest::parse(&m.to_text(ino)).unwrap();
            prop_assert_eq!(back, m);
            prop_assert_eq!(back_ino, ino);
        }
    }

    #[test]
    fn utc_stamp_has_the_documented_shape() {
        let s = utc_stamp();
        assert_eq!(s.len(), 16, "{s}");
        assert!(s.starts_with("20") && s.ends_with('Z') && s.as_bytes()[8] == b'T');
    }
}
