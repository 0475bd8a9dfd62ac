//! Fold: a stopped guest's upper layer moved down into its base, so that what it changed
//! (package upgrades, new files) can be shared again by the next `unify`, with the merged view
//! — what the overlay shows the guest — unchanged at every instant.
//!
//! What an upper layer holds (`index=off,metacopy=off,redirect_dir=off`): files, symlinks,
//! special files and directories the guest made or changed (copied up whole); whiteouts — 0/0
//! character devices, possibly several links of one inode — for what it deleted; opaque
//! directories (`trusted.overlay.opaque=y`) for a directory it removed and made again; and
//! `trusted.overlay.*` bookkeeping xattrs (`origin`, `impure`, `uuid`) that never belong in
//! base. An upper layer written with `metacopy` or `redirect_dir` on (a mount made by hand)
//! holds files whose bytes or names live elsewhere; fold refuses it.

use std::collections::{BTreeSet, HashSet};
use std::ffi::OsStr;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use nix::errno::Errno;
use nix::fcntl::{AtFlags, OFlag, RenameFlags};
use nix::sys::stat::Mode;
use serde::Serialize;

use crate::error::{Error, PathContext, Result};
use crate::fsx::{self, OVERLAY_XATTR, Stat, Xattr};
use crate::guest::{GuestPaths, OfflineGuest};
use crate::overlay::match_root_metadata;
use crate::report::{Failure, guest_abs};
use crate::root::HostRoot;
use crate::store;
use crate::sys::{self, FS_APPEND_FL, FS_IMMUTABLE_FL};

/// Where overlayfs keeps the `chattr +i` / `+a` a guest sets on its files (`i`, `a`): the upper
/// inode itself carries no such flag.
const PROTATTR: &[u8] = b"trusted.overlay.protattr";

/// The inode flags a `protattr` value stands for.
fn protattr_flags(value: &[u8]) -> libc::c_long {
    value.iter().fold(0, |flags, c| match c {
        b'i' => flags | FS_IMMUTABLE_FL,
        b'a' => flags | FS_APPEND_FL,
        _ => flags,
    })
}

/// The immutable and append-only flags of an upper entry: from its `protattr` xattr, and from
/// the inode itself (a killed fold's replayed journal may have set them there).
fn guarded_flags(upper: BorrowedFd<'_>, name: &[u8], st: &Stat, xattrs: &[Xattr]) -> libc::c_long {
    let from_xattr = xattrs
        .iter()
        .find(|(k, _)| k == PROTATTR)
        .map_or(0, |(_, v)| protattr_flags(v));
    let on_inode = if st.is_file() || st.is_dir() {
        let flags = OFlag::O_RDONLY | OFlag::O_NONBLOCK | OFlag::O_NOFOLLOW;
        fsx::open_beneath(upper, name, flags)
            .ok()
            .and_then(|fd| sys::get_flags(&fd).ok())
            .map_or(0, libc::c_long::from)
    } else {
        0
    };
    from_xattr | (on_inode & (FS_IMMUTABLE_FL | FS_APPEND_FL))
}

/// The deepest directory fold descends to (two descriptors a level): a deeper upper tree is
/// reported, not folded, and stays in the upper layer.
const MAX_DEPTH: usize = 256;

/// How `fold` behaves.
#[derive(Clone, Copy, Debug, Default)]
pub struct FoldOptions {
    /// Report what would move; change nothing.
    pub dry_run: bool,
    /// Record every entry in the report (always done for a dry run).
    pub list_entries: bool,
}

/// What fold does with one entry of the upper layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FoldAction {
    /// A file, symlink or special file moves down, over whatever base had there.
    Move,
    /// A whiteout: the base entry it hides is deleted.
    Delete,
    /// A directory base lacked is made.
    Create,
    /// A base directory takes the upper one's owner, mode, mtime and xattrs.
    Update,
    /// An opaque upper directory (or one over a base non-directory): the base entry is
    /// replaced, and base entries the upper directory lacks are deleted.
    Replace,
}

/// One entry of [`FoldReport::entries`].
#[derive(Clone, Debug, Serialize)]
pub struct FoldEntry {
    /// What happens to it.
    pub action: FoldAction,
    /// The guest-absolute path, escaped as by [`display_path`].
    pub path: String,
    /// `file`, `symlink`, `directory`, `fifo`, `socket`, `char device`, `block device`.
    pub kind: &'static str,
}

/// What `fold` did (or, in a dry run, would do).
#[derive(Clone, Debug, Default, Serialize)]
pub struct FoldReport {
    /// The guest.
    pub guest: String,
    /// Nothing was changed.
    pub dry_run: bool,
    /// Files, symlinks and special files moved down.
    pub moved: u64,
    /// Bytes of the regular files moved down (each inode once).
    pub moved_bytes: u64,
    /// Base entries deleted (whiteouts, and what opaque directories hid).
    pub deleted: u64,
    /// Directories made or updated in base.
    pub directories: u64,
    /// The upper and work directories are empty now.
    pub upper_emptied: bool,
    /// Entries that could not be folded; with any, the upper layer stays as it was.
    pub failures: Vec<Failure>,
    /// Every entry, when asked for.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub entries: Vec<FoldEntry>,
}

fn kind_of(st: &Stat) -> &'static str {
    match st.mode & libc::S_IFMT {
        libc::S_IFREG => "file",
        libc::S_IFDIR => "directory",
        libc::S_IFLNK => "symlink",
        libc::S_IFIFO => "fifo",
        libc::S_IFSOCK => "socket",
        libc::S_IFCHR => "char device",
        libc::S_IFBLK => "block device",
        _ => "unknown",
    }
}

/// A whiteout: a character device 0/0.
fn is_whiteout(st: &Stat, rdev: u64) -> bool {
    st.mode & libc::S_IFMT == libc::S_IFCHR && rdev == 0
}

/// `fstatat` with the device number, which [`Stat`] does not keep.
fn lstat_rdev(dir: BorrowedFd<'_>, name: &[u8]) -> nix::Result<(Stat, u64)> {
    nix::sys::stat::fstatat(dir, OsStr::from_bytes(name), AtFlags::AT_SYMLINK_NOFOLLOW)
        .map(|s| (Stat::from(s), s.st_rdev))
}

/// The value of one overlay xattr in a sorted list.
fn overlay_xattr<'x>(xattrs: &'x [(Vec<u8>, Vec<u8>)], key: &str) -> Option<&'x [u8]> {
    let mut name = OVERLAY_XATTR.to_vec();
    name.extend_from_slice(key.as_bytes());
    xattrs
        .iter()
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.as_slice())
}

/// Folds guest `name`'s upper layer into its base.
///
/// # Algorithm
/// The guest must be offline (`check_offline`: mounted nowhere on the host). `tmp/` is emptied
/// of what a killed run left, then:
///
/// 1. **Base becomes the merged view**, touching only base entries the upper layer hides, so
///    the merged view does not change (save ctimes and link counts). For each upper entry:
///    * a whiteout: the base entry it hides is renamed into `tmp/trash/`;
///    * a file, symlink or special file: its `trusted.overlay.*` xattrs are removed, its inode
///      is hardlinked to `tmp/new/<n>` and that name renamed over the base entry (a base
///      directory in the way goes to the trash first) — a move without a copy, and without
///      touching the upper layer; a base entry that already is this inode was done by an
///      earlier run;
///    * a directory: a base non-directory in the way goes to the trash; a missing one is made;
///      for an opaque one — or one inside an opaque one, which overlayfs does not mark but
///      which hides base all the same — every base entry it lacks goes to the trash; its
///      entries are folded, then its owner, xattrs (without `trusted.overlay.*`), mode and
///      lastly mtime are given to the base directory.
/// 2. **Swap**, only if step 1 failed nowhere: a new empty directory with the upper root's
///    owner, mode, xattrs and mtime is exchanged with `upper/` by one
///    `renameat2(RENAME_EXCHANGE)`. The old upper, the trash and the contents of `work/` are
///    then removed.
/// 3. The `chattr +i`/`+a` flags a guest set, which overlayfs keeps in the upper inode's
///    `trusted.overlay.protattr` (moved down with it), are journalled before the swap and
///    set on the base inodes once the old upper is gone (`clear_scratch`); a killed run's
///    rows are applied by the next writer, and again after the next removal of `tmp/`.
///
/// A kill during step 1 leaves hidden changes and names under `tmp/`; after the swap, only
/// garbage under `tmp/`. The next run starts over, and step 1 skips what is done.
///
/// # Errors
/// [`Error::Mounted`] / [`Error::InUse`] for a guest in use, [`Error::BadRecord`] for an upper
/// layer written with `metacopy` or `redirect_dir`, I/O errors on the guest's own directories.
/// An entry that cannot be folded is a [`Failure`] in the report; the upper layer then stays.
pub fn fold(root: &HostRoot, name: &str, opts: &FoldOptions) -> Result<FoldReport> {
    let guest = OfflineGuest::open(root, name)?;
    let (paths, dir) = (&guest.paths, &guest.dir);
    let base = guest.open_dir("base")?;
    let upper = match guest.open_dir("upper") {
        Ok(fd) => fd,
        Err(Error::Io { error, .. }) if error.raw_os_error() == Some(libc::ENOENT) => {
            fsx::ensure_dir(&paths.upper, 0o755)?;
            guest.open_dir("upper")?
        }
        Err(e) => return Err(e),
    };
    for (fd, path) in [(&base, &paths.base), (&upper, &paths.upper)] {
        root.check_same_fs(&fsx::fstat(fd).at(path)?, path)?;
    }
    let mut folder = Folder {
        root,
        guest: name,
        paths,
        opts: *opts,
        scratch: None,
        seq: 0,
        seen: HashSet::new(),
        flags: Vec::new(),
        report: FoldReport {
            guest: name.to_string(),
            dry_run: opts.dry_run,
            ..FoldReport::default()
        },
    };
    if !opts.dry_run {
        clear_scratch(root, dir.as_fd(), paths)?;
        folder.scratch = Some(Scratch::make(dir.as_fd(), &paths.tmp)?);
        // A never-mounted upper has its own root metadata, not what the guest sees.
        match_root_metadata(root, paths)?;
    }
    let (upper_root, _) = lstat_rdev(upper.as_fd(), b".").at(&paths.upper)?;
    let root_xattrs = fsx::xattrs_at(upper.as_fd(), b".").at(&paths.upper)?;
    let opaque = folder.opaque(&root_xattrs, &paths.upper)?;
    if !opts.dry_run && folder.unguard(dir.as_fd(), b"base", b"").is_none() {
        return Ok(folder.report);
    }
    let mut rel = Vec::new();
    folder.fold_dir(upper.as_fd(), Some(base.as_fd()), &mut rel, opaque)?;
    if !opts.dry_run {
        folder.give_metadata(base.as_fd(), b"", &upper_root, &root_xattrs);
    }
    let mut report = folder.report;
    if opts.dry_run || !report.failures.is_empty() {
        return Ok(report);
    }
    let guest_id = root.index.guest_id(name)?;
    journal_flags(root, guest_id, &folder.flags)?;
    swap_upper(dir.as_fd(), paths, &upper_root, &root_xattrs)?;
    clear_scratch(root, dir.as_fd(), paths)?;
    let work = guest.open_dir("work")?;
    for child in fsx::read_names(work.as_fd()).at(&paths.work)? {
        store::remove_guest_tree(root, work.as_fd(), &paths.work, &child)?;
    }
    report.upper_emptied = true;
    for e in store::restore_immutable(root)? {
        report.failures.push(Failure::guest(name, e.to_string()));
    }
    Ok(report)
}

/// Journals (committed) the `chattr` flags to give base entries once the upper layer, whose
/// `protattr` xattrs carry them now, is swapped out.
fn journal_flags(root: &HostRoot, guest_id: i64, flags: &[(Vec<u8>, libc::c_long)]) -> Result<()> {
    let idx = &root.index;
    let tx = idx.conn.unchecked_transaction().map_err(|e| idx.err(e))?;
    for (rel, bits) in flags {
        idx.exec(
            "INSERT INTO journal(op, guest_id, path, value) VALUES ('flags', ?1, ?2, ?3)",
            rusqlite::params![guest_id, rel, bits],
        )?;
    }
    tx.commit().map_err(|e| idx.err(e))
}

/// Removes `tmp/` of a guest with everything a fold or split left in it, then puts back the
/// flags cleared on the way: the immutable flags of store objects, and the `chattr` flags a
/// fold journalled for base entries that shared an inode with the old upper layer.
pub(crate) fn clear_scratch(
    root: &HostRoot,
    guest_dir: BorrowedFd<'_>,
    paths: &GuestPaths,
) -> Result<()> {
    store::remove_guest_tree(root, guest_dir, &paths.dir, b"tmp")?;
    let guest_id = root.index.guest_id(&paths.name)?;
    crate::guest::apply_flag_journal(root, Some(guest_id))
}

/// `tmp/new/` (names linked before they are renamed into base) and `tmp/trash/` (base entries
/// on their way out) of a running fold.
struct Scratch {
    new: OwnedFd,
    trash: OwnedFd,
}

impl Scratch {
    fn make(guest_dir: BorrowedFd<'_>, tmp: &Path) -> Result<Scratch> {
        let mkdir = |dir: BorrowedFd<'_>, name: &str, shown: &Path| -> Result<OwnedFd> {
            nix::sys::stat::mkdirat(dir, name, Mode::from_bits_truncate(0o700)).at(shown)?;
            fsx::open_dir_beneath(dir, shown.parent().unwrap_or(shown), name.as_bytes())
        };
        let tmp_fd = mkdir(guest_dir, "tmp", tmp)?;
        Ok(Scratch {
            new: mkdir(tmp_fd.as_fd(), "new", &tmp.join("new"))?,
            trash: mkdir(tmp_fd.as_fd(), "trash", &tmp.join("trash"))?,
        })
    }
}

/// Exchanges `upper/` with a new empty directory carrying the upper root's metadata; the old
/// upper ends in `tmp/upper`.
fn swap_upper(
    guest_dir: BorrowedFd<'_>,
    paths: &GuestPaths,
    upper_root: &Stat,
    xattrs: &[Xattr],
) -> Result<()> {
    let tmp = fsx::open_dir_beneath(guest_dir, &paths.dir, b"tmp")?;
    let fresh = paths.tmp.join("upper");
    nix::sys::stat::mkdirat(&tmp, "upper", Mode::from_bits_truncate(0o700)).at(&fresh)?;
    let fd = fsx::open_dir_beneath(tmp.as_fd(), &paths.tmp, b"upper")?;
    fsx::set_dir_metadata(fd.as_fd(), upper_root, xattrs).at(&fresh)?;
    // The merged root is the upper root: it keeps the `protattr` of a `chattr` of `/` (which
    // Linux 6.18 itself does not read back for the root after a remount).
    if let Some((_, v)) = xattrs.iter().find(|(k, _)| k == PROTATTR) {
        let file = std::fs::File::from(fd.try_clone().at(&fresh)?);
        xattr::FileExt::set_xattr(&file, OsStr::from_bytes(PROTATTR), v).at(&fresh)?;
    }
    nix::fcntl::renameat2(
        guest_dir,
        "upper",
        &tmp,
        "upper",
        RenameFlags::RENAME_EXCHANGE,
    )
    .at(&paths.upper)
}

/// The state of one fold.
struct Folder<'a> {
    root: &'a HostRoot,
    guest: &'a str,
    paths: &'a GuestPaths,
    opts: FoldOptions,
    /// `None` in a dry run.
    scratch: Option<Scratch>,
    /// The number of the next name under `tmp/new` or `tmp/trash`.
    seq: u64,
    /// Inodes moved down, to count each file's bytes once.
    seen: HashSet<u64>,
    /// The `chattr` flags the guest set (`protattr`), by path, for base once upper is gone.
    flags: Vec<(Vec<u8>, libc::c_long)>,
    report: FoldReport,
}

impl Folder<'_> {
    fn note(&mut self, action: FoldAction, rel: &[u8], st: &Stat) {
        match action {
            FoldAction::Move => {
                self.report.moved += 1;
                if st.is_file() && self.seen.insert(st.ino) {
                    self.report.moved_bytes += st.size;
                }
            }
            FoldAction::Delete => self.report.deleted += 1,
            FoldAction::Create | FoldAction::Update | FoldAction::Replace => {
                self.report.directories += 1
            }
        }
        if self.opts.dry_run || self.opts.list_entries {
            self.report.entries.push(FoldEntry {
                action,
                path: guest_abs(rel),
                kind: kind_of(st),
            });
        }
    }

    fn fail(&mut self, rel: &[u8], error: impl std::fmt::Display) {
        self.report
            .failures
            .push(Failure::at(self.guest, rel, error));
    }

    /// Whether a directory with these xattrs is opaque; refuses what fold cannot merge.
    fn opaque(&self, xattrs: &[Xattr], shown: &Path) -> Result<bool> {
        if overlay_xattr(xattrs, "redirect").is_some()
            || overlay_xattr(xattrs, "metacopy").is_some()
        {
            return Err(unsupported(shown));
        }
        match overlay_xattr(xattrs, "opaque") {
            None => Ok(false),
            Some(b"y") => Ok(true),
            Some(_) => Err(unsupported(shown)),
        }
    }

    fn next_name(&mut self) -> String {
        self.seq += 1;
        format!("{:x}", self.seq)
    }

    /// Clears the immutable and append-only flags that keep fold from replacing, trashing or
    /// updating the base entry `name` of `base` (a guest's `chattr` moved down by an earlier
    /// fold, an immutable store object): the guest sees that path from upper, so nothing it
    /// sees changes. A store object's flag comes back with `restore_immutable`; what else
    /// keeps other links is handed back, to [`relock`](Self::relock) after the change.
    /// `None` (reported) if the flags cannot be cleared.
    fn unguard(
        &mut self,
        base: BorrowedFd<'_>,
        name: &[u8],
        rel: &[u8],
    ) -> Option<Option<fsx::Relock>> {
        let guards = FS_IMMUTABLE_FL | FS_APPEND_FL;
        let open = OFlag::O_RDONLY | OFlag::O_NONBLOCK | OFlag::O_NOFOLLOW;
        let Ok(st) = fsx::lstat_at(base, name) else {
            return Some(None);
        };
        let flagged = (st.is_file() || st.is_dir())
            && fsx::open_beneath(base, name, open)
                .ok()
                .and_then(|fd| sys::get_flags(&fd).ok())
                .is_some_and(|f| libc::c_long::from(f) & guards != 0);
        if !flagged {
            return Some(None);
        }
        let shown = fsx::join(&self.paths.base, rel);
        match store::unlock_entry(self.root, base, name, &st, &shown) {
            Ok(relock) => Some(relock),
            Err(e) => {
                self.fail(
                    rel,
                    format!("cannot clear the flags of the base entry: {e}"),
                );
                None
            }
        }
    }

    /// Sets again the flags [`unguard`](Self::unguard) handed back.
    fn relock(&mut self, relock: Option<fsx::Relock>, rel: &[u8]) {
        if let Some(r) = relock
            && let Err(e) = sys::add_flags(&r.fd, r.flags)
        {
            self.fail(
                rel,
                format!("cannot set the flags of a replaced inode again: {e}"),
            );
        }
    }

    /// Moves base entry `name` of `base` into the trash.
    fn trash(&mut self, base: BorrowedFd<'_>, name: &[u8], rel: &[u8]) -> bool {
        let n = self.next_name();
        if self.scratch.is_none() {
            return true;
        }
        let Some(relock) = self.unguard(base, name, rel) else {
            return false;
        };
        let Some(s) = &self.scratch else { return true };
        let moved = nix::fcntl::renameat(base, OsStr::from_bytes(name), &s.trash, n.as_str());
        self.relock(relock, rel);
        match moved {
            Ok(()) => true,
            Err(e) => {
                self.fail(
                    rel,
                    format!("cannot remove the base entry it replaces: {e}"),
                );
                false
            }
        }
    }

    /// Folds the upper directory `upper` into the base directory `base` (`None`: base has no
    /// directory there, in a dry run).
    fn fold_dir(
        &mut self,
        upper: BorrowedFd<'_>,
        base: Option<BorrowedFd<'_>>,
        rel: &mut Vec<u8>,
        opaque: bool,
    ) -> Result<()> {
        let upper_shown = fsx::join(&self.paths.upper, rel);
        let names = fsx::read_names(upper).at(&upper_shown)?;
        let parent_len = rel.len();
        if let (true, Some(base)) = (opaque, base) {
            let keep: BTreeSet<&[u8]> = names.iter().map(Vec::as_slice).collect();
            let base_names = match fsx::read_names(base) {
                Ok(n) => n,
                Err(e) => {
                    self.fail(rel, format!("cannot list the base directory: {e}"));
                    return Ok(());
                }
            };
            for name in base_names.iter().filter(|n| !keep.contains(n.as_slice())) {
                push(rel, parent_len, name);
                if let Ok(st) = fsx::lstat_at(base, name) {
                    self.note(FoldAction::Delete, rel, &st);
                }
                self.trash(base, name, &rel.clone());
            }
        }
        for name in &names {
            push(rel, parent_len, name);
            self.fold_entry(upper, base, name, rel, opaque)?;
        }
        rel.truncate(parent_len);
        Ok(())
    }

    /// Folds the entry `name` of `upper` (guest path `rel`). `hidden`: its directory is opaque
    /// (or inside an opaque one), so nothing of base below it shows: a directory there
    /// replaces base's as an opaque one does, whether or not it is marked opaque itself
    /// (overlayfs never marks a directory made inside an opaque one).
    fn fold_entry(
        &mut self,
        upper: BorrowedFd<'_>,
        base: Option<BorrowedFd<'_>>,
        name: &[u8],
        rel: &mut Vec<u8>,
        hidden: bool,
    ) -> Result<()> {
        let (st, rdev) = match lstat_rdev(upper, name) {
            Ok(s) => s,
            Err(Errno::ENOENT) => return Ok(()),
            Err(e) => {
                self.fail(rel, e);
                return Ok(());
            }
        };
        let below = match base.map(|b| fsx::lstat_at(b, name)) {
            None | Some(Err(Errno::ENOENT)) => None,
            Some(Ok(b)) => Some(b),
            Some(Err(e)) => {
                self.fail(rel, format!("cannot read the base entry: {e}"));
                return Ok(());
            }
        };
        if is_whiteout(&st, rdev) {
            if let (Some(b), Some(base)) = (below, base) {
                self.note(FoldAction::Delete, rel, &b);
                self.trash(base, name, &rel.clone());
            }
            return Ok(());
        }
        let xattrs = match fsx::xattrs_at(upper, name) {
            Ok(x) => x,
            Err(e) => {
                self.fail(rel, format!("cannot read xattrs: {e}"));
                return Ok(());
            }
        };
        let flags = guarded_flags(upper, name, &st, &xattrs);
        if flags != 0 {
            self.flags.push((rel.clone(), flags));
        }
        if st.is_dir() {
            let opaque = self.opaque(&xattrs, &fsx::join(&self.paths.upper, rel))? || hidden;
            self.fold_subdir(upper, base, name, rel, (&st, &xattrs), below, opaque)
        } else {
            if overlay_xattr(&xattrs, "metacopy").is_some() {
                return Err(unsupported(&fsx::join(&self.paths.upper, rel)));
            }
            if below.is_some_and(|b| b.ino == st.ino) {
                return Ok(());
            }
            self.note(FoldAction::Move, rel, &st);
            if let (Some(base), false) = (base, self.opts.dry_run) {
                self.move_down(upper, base, name, rel, below, &xattrs);
            }
            Ok(())
        }
    }

    /// Folds an upper directory: makes or replaces the base one, folds its entries, gives it
    /// the upper one's metadata.
    #[allow(clippy::too_many_arguments)]
    fn fold_subdir(
        &mut self,
        upper: BorrowedFd<'_>,
        base: Option<BorrowedFd<'_>>,
        name: &[u8],
        rel: &mut Vec<u8>,
        (st, xattrs): (&Stat, &[Xattr]),
        below: Option<Stat>,
        opaque: bool,
    ) -> Result<()> {
        let exists = below.is_some_and(|b| b.is_dir());
        if rel.iter().filter(|&&b| b == b'/').count() >= MAX_DEPTH {
            self.fail(
                rel,
                format!("deeper than {MAX_DEPTH} directories: not folded"),
            );
            return Ok(());
        }
        let action = match below {
            Some(b) if !b.is_dir() => FoldAction::Replace,
            Some(_) if opaque => FoldAction::Replace,
            Some(_) => FoldAction::Update,
            None => FoldAction::Create,
        };
        self.note(action, rel, st);
        if below.is_some_and(|b| !b.is_dir())
            && let Some(base) = base
            && !self.trash(base, name, &rel.clone())
        {
            return Ok(());
        }
        let parent = fsx::split_parent(rel).0.to_vec();
        let child_upper =
            match fsx::open_dir_beneath(upper, &fsx::join(&self.paths.upper, &parent), name) {
                Ok(fd) => fd,
                Err(e) => {
                    self.fail(rel, e);
                    return Ok(());
                }
            };
        let child_base = match base {
            Some(base) if !self.opts.dry_run => {
                // A flagged base directory takes no new entry and no metadata: unguard it.
                if exists && self.unguard(base, name, rel).is_none() {
                    return Ok(());
                }
                let made = nix::sys::stat::mkdirat(
                    base,
                    OsStr::from_bytes(name),
                    Mode::from_bits_truncate(0o700),
                );
                if let (false, Err(e)) = (exists, made)
                    && e != Errno::EEXIST
                {
                    self.fail(rel, format!("cannot make the base directory: {e}"));
                    return Ok(());
                }
                match fsx::open_dir_beneath(base, &fsx::join(&self.paths.base, &parent), name) {
                    Ok(fd) => Some(fd),
                    Err(e) => {
                        self.fail(rel, e);
                        return Ok(());
                    }
                }
            }
            Some(base) if exists => {
                fsx::open_dir_beneath(base, &fsx::join(&self.paths.base, &parent), name).ok()
            }
            _ => None,
        };
        self.fold_dir(
            child_upper.as_fd(),
            child_base.as_ref().map(AsFd::as_fd),
            rel,
            opaque,
        )?;
        if let (Some(fd), false) = (&child_base, self.opts.dry_run) {
            self.give_metadata(fd.as_fd(), rel, st, xattrs);
        }
        Ok(())
    }

    /// Gives the base directory `fd` (guest path `rel`) an upper directory's metadata; a
    /// failure is reported.
    fn give_metadata(&mut self, fd: BorrowedFd<'_>, rel: &[u8], st: &Stat, xattrs: &[Xattr]) {
        if let Err(e) = fsx::set_dir_metadata(fd, st, xattrs) {
            self.fail(rel, format!("cannot set the directory's metadata: {e}"));
        }
    }

    /// Moves a non-directory down: strips overlay xattrs, links it to `tmp/new/<n>`, renames
    /// that over the base entry (trashing a base directory in the way).
    #[allow(clippy::too_many_arguments)]
    fn move_down(
        &mut self,
        upper: BorrowedFd<'_>,
        base: BorrowedFd<'_>,
        name: &[u8],
        rel: &[u8],
        below: Option<Stat>,
        xattrs: &[Xattr],
    ) {
        if below.is_some_and(|b| b.is_dir()) && !self.trash(base, name, rel) {
            return;
        }
        let entry = fsx::entry_path(upper, name);
        // `protattr` stays until the swap: it carries the guest's chattr flags (see `fold`).
        let strip = |k: &[u8]| fsx::is_overlay_bookkeeping(k) && k != PROTATTR;
        for (key, _) in xattrs.iter().filter(|(k, _)| strip(k)) {
            if let Err(e) = xattr::remove(&entry, OsStr::from_bytes(key)) {
                self.fail(
                    rel,
                    format!("cannot remove {}: {e}", String::from_utf8_lossy(key)),
                );
                return;
            }
        }
        let n = self.next_name();
        let Some(s) = &self.scratch else { return };
        let linked = nix::unistd::linkat(
            upper,
            OsStr::from_bytes(name),
            &s.new,
            n.as_str(),
            AtFlags::empty(),
        );
        if let Err(e) = linked {
            let hint = if e == Errno::EPERM {
                " (immutable or append-only in upper: chattr -ia it)"
            } else {
                ""
            };
            self.fail(rel, format!("cannot link it down: {e}{hint}"));
            return;
        }
        let new = s.new.try_clone().ok();
        let Some(new) = new else { return };
        let Some(relock) = self.unguard(base, name, rel) else {
            let _ =
                nix::unistd::unlinkat(&new, n.as_str(), nix::unistd::UnlinkatFlags::NoRemoveDir);
            return;
        };
        let renamed = nix::fcntl::renameat(&new, n.as_str(), base, OsStr::from_bytes(name));
        self.relock(relock, rel);
        if let Err(e) = renamed {
            let _ =
                nix::unistd::unlinkat(&new, n.as_str(), nix::unistd::UnlinkatFlags::NoRemoveDir);
            self.fail(rel, format!("cannot rename it into base: {e}"));
        }
    }
}

/// Sets `rel` to its first `parent_len` bytes joined with `name`.
fn push(rel: &mut Vec<u8>, parent_len: usize, name: &[u8]) {
    rel.truncate(parent_len);
    if parent_len > 0 {
        rel.push(b'/');
    }
    rel.extend_from_slice(name);
}

fn unsupported(path: &Path) -> Error {
    Error::BadRecord {
        path: path.to_path_buf(),
        message: "written by an overlay mounted with metacopy or redirect_dir on (by hand?); \
                  fold cannot merge it: mount the guest with `cowherd mount` only, and move \
                  this upper layer's changes down by hand"
            .into(),
    }
}
