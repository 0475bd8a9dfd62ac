//! fd-relative filesystem helpers: guest trees are untrusted, so nothing here follows a symlink.

use std::ffi::OsStr;
use std::ops::ControlFlow;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Path, PathBuf};

use nix::fcntl::AtFlags;
use nix::fcntl::{OFlag, OpenHow, ResolveFlag};
use nix::sys::stat::{FileStat, Mode};

use crate::error::{Error, PathContext, Result};

/// One extended attribute: name and value.
pub(crate) type Xattr = (Vec<u8>, Vec<u8>);

/// The unlock step of [`remove_tree`]: makes the entry `name` of directory `dir` unlinkable;
/// hands back the flags to set again on its inode after the unlink, when it keeps other links.
pub(crate) type Unlock<'a> =
    dyn FnMut(BorrowedFd<'_>, &[u8], &Stat, &Path) -> Result<Option<Relock>> + 'a;

/// Flags to set again on an inode after one of its names is unlinked.
pub(crate) struct Relock {
    /// The inode, held open across the unlink.
    pub fd: OwnedFd,
    /// Its immutable and append-only flags before they were cleared.
    pub flags: libc::c_long,
}

/// The prefix of overlayfs's own xattrs (`trusted.overlay.opaque`, `.origin`, …).
pub(crate) const OVERLAY_XATTR: &[u8] = b"trusted.overlay.";

/// Whether an xattr is overlayfs's bookkeeping (`trusted.overlay.*`), which never belongs in a
/// tree; but not a guest's own `trusted.overlay.*` xattr, which overlayfs keeps escaped as
/// `trusted.overlay.overlay.*` in any layer and shows unescaped.
pub(crate) fn is_overlay_bookkeeping(name: &[u8]) -> bool {
    name.starts_with(OVERLAY_XATTR) && !name.starts_with(b"trusted.overlay.overlay.")
}

/// The stat fields cowherd compares and stores.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Stat {
    pub dev: u64,
    pub ino: u64,
    pub mode: u32,
    pub nlink: u64,
    pub uid: u32,
    pub gid: u32,
    pub size: u64,
    pub blocks: u64,
    pub mtime_ns: i64,
    pub ctime_ns: i64,
}

impl Stat {
    /// Whether this is a regular file.
    pub fn is_file(&self) -> bool {
        self.mode & libc::S_IFMT == libc::S_IFREG
    }

    /// Whether this is a directory.
    pub fn is_dir(&self) -> bool {
        self.mode & libc::S_IFMT == libc::S_IFDIR
    }

    /// Whether content and metadata are as recorded: same inode, size, mtime, ctime, mode
    /// and owner.
    pub fn unchanged_since(&self, then: &Stat) -> bool {
        self.same_content_identity(then) && self.ctime_ns == then.ctime_ns
    }

    /// Like [`Stat::unchanged_since`] but without ctime, which our own link-count changes
    /// move.
    pub fn same_content_identity(&self, then: &Stat) -> bool {
        self.ino == then.ino
            && self.dev == then.dev
            && self.size == then.size
            && self.mtime_ns == then.mtime_ns
            && self.mode == then.mode
            && self.uid == then.uid
            && self.gid == then.gid
    }
}

impl From<FileStat> for Stat {
    fn from(s: FileStat) -> Self {
        Stat {
            dev: s.st_dev,
            ino: s.st_ino,
            mode: s.st_mode,
            nlink: s.st_nlink,
            uid: s.st_uid,
            gid: s.st_gid,
            size: s.st_size as u64,
            blocks: s.st_blocks as u64,
            mtime_ns: s.st_mtime * 1_000_000_000 + s.st_mtime_nsec,
            ctime_ns: s.st_ctime * 1_000_000_000 + s.st_ctime_nsec,
        }
    }
}

impl From<&std::fs::Metadata> for Stat {
    fn from(m: &std::fs::Metadata) -> Self {
        use std::os::unix::fs::MetadataExt;
        Stat {
            dev: m.dev(),
            ino: m.ino(),
            mode: m.mode(),
            nlink: m.nlink(),
            uid: m.uid(),
            gid: m.gid(),
            size: m.size(),
            blocks: m.blocks(),
            mtime_ns: m.mtime() * 1_000_000_000 + m.mtime_nsec(),
            ctime_ns: m.ctime() * 1_000_000_000 + m.ctime_nsec(),
        }
    }
}

/// Joins a host directory and a relative byte path, for messages.
pub(crate) fn join(dir: &Path, rel: &[u8]) -> PathBuf {
    if rel.is_empty() {
        dir.to_path_buf()
    } else {
        dir.join(OsStr::from_bytes(rel))
    }
}

/// Splits `a/b/c` into (`a/b`, `c`); a bare name has an empty parent.
pub(crate) fn split_parent(rel: &[u8]) -> (&[u8], &[u8]) {
    match rel.iter().rposition(|&b| b == b'/') {
        Some(i) => (&rel[..i], &rel[i + 1..]),
        None => (&[], rel),
    }
}

fn beneath() -> ResolveFlag {
    ResolveFlag::RESOLVE_BENEATH | ResolveFlag::RESOLVE_NO_SYMLINKS | ResolveFlag::RESOLVE_NO_XDEV
}

/// Opens `rel` below `dir` without following any symlink and without leaving `dir`'s mount.
///
/// # Errors
/// `ELOOP` for a symlink on the way, `EXDEV` for a mount point crossed, and the usual open errors.
pub(crate) fn open_beneath(dir: BorrowedFd<'_>, rel: &[u8], flags: OFlag) -> nix::Result<OwnedFd> {
    let rel: &[u8] = if rel.is_empty() { b"." } else { rel };
    let how = OpenHow::new()
        .flags(flags | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC)
        .resolve(beneath());
    nix::fcntl::openat2(dir, OsStr::from_bytes(rel), how)
}

/// Opens the directory `rel` below `dir` (whose host path is `dir_path`), see [`open_beneath`].
///
/// # Errors
/// [`Error::Symlink`] for a symlink on the way, [`Error::CrossFilesystem`] for a mount point
/// crossed, [`Error::NotADirectory`], or [`Error::Io`].
pub(crate) fn open_dir_beneath(
    dir: BorrowedFd<'_>,
    dir_path: &Path,
    rel: &[u8],
) -> Result<OwnedFd> {
    let shown = || join(dir_path, rel);
    open_beneath(dir, rel, OFlag::O_RDONLY | OFlag::O_DIRECTORY).map_err(|e| match e {
        nix::errno::Errno::ELOOP => Error::Symlink { path: shown() },
        nix::errno::Errno::EXDEV => Error::CrossFilesystem {
            path: shown(),
            other: dir_path.to_path_buf(),
        },
        nix::errno::Errno::ENOTDIR => Error::NotADirectory { path: shown() },
        e => Error::Io {
            path: shown(),
            error: e.into(),
        },
    })
}

/// Opens a host directory given by absolute path; the last component must not be a symlink.
pub(crate) fn open_dir(path: &Path) -> Result<OwnedFd> {
    nix::fcntl::open(
        path,
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| match e {
        nix::errno::Errno::ELOOP => Error::Symlink {
            path: path.to_path_buf(),
        },
        nix::errno::Errno::ENOTDIR => Error::NotADirectory {
            path: path.to_path_buf(),
        },
        e => Error::Io {
            path: path.to_path_buf(),
            error: e.into(),
        },
    })
}

/// `fstatat(dir, name, AT_SYMLINK_NOFOLLOW)`.
pub(crate) fn lstat_at(dir: BorrowedFd<'_>, name: &[u8]) -> nix::Result<Stat> {
    nix::sys::stat::fstatat(dir, OsStr::from_bytes(name), AtFlags::AT_SYMLINK_NOFOLLOW)
        .map(Stat::from)
}

/// `fstat(fd)`.
pub(crate) fn fstat(fd: impl AsFd) -> nix::Result<Stat> {
    nix::sys::stat::fstat(fd).map(Stat::from)
}

/// `lstat` of a host path, with the path in the error.
pub(crate) fn lstat_path(path: &Path) -> Result<Stat> {
    std::fs::symlink_metadata(path)
        .map(|m| Stat::from(&m))
        .at(path)
}

/// Creates `path` as a directory (and its parents) if missing.
pub(crate) fn ensure_dir(path: &Path, mode: u32) -> Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(mode)
        .create(path)
        .at(path)
}

/// Reads all extended attributes of an open file, sorted by name.
pub(crate) fn read_xattrs(file: &std::fs::File) -> std::io::Result<Vec<Xattr>> {
    use xattr::FileExt;
    let mut out = Vec::new();
    for name in file.list_xattr()? {
        if let Some(value) = file.get_xattr(&name)? {
            out.push((name.as_bytes().to_vec(), value));
        }
    }
    out.sort();
    Ok(out)
}

/// Sets a file's mtime (and leaves atime alone).
pub(crate) fn set_mtime(fd: impl AsFd, mtime_ns: i64) -> nix::Result<()> {
    use nix::sys::time::TimeSpec;
    let mt = TimeSpec::new(
        mtime_ns.div_euclid(1_000_000_000),
        mtime_ns.rem_euclid(1_000_000_000),
    );
    nix::sys::stat::futimens(fd, &TimeSpec::UTIME_OMIT, &mt)
}

/// Writes `bytes` to `path` atomically (temporary file, fsync, rename).
pub(crate) fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    let dir = path.parent().unwrap_or(Path::new("."));
    let tmp = dir.join(format!(
        ".{}.tmp{}",
        path.file_name()
            .map(|n| n.to_string_lossy())
            .unwrap_or_default(),
        std::process::id()
    ));
    let mut f = std::fs::File::create(&tmp).at(&tmp)?;
    f.write_all(bytes).at(&tmp)?;
    f.sync_all().at(&tmp)?;
    std::fs::rename(&tmp, path).at(path)
}

/// The names in directory `dir` (without `.` and `..`), read through a fresh open file
/// description so that `dir`'s offset is left alone.
pub(crate) fn read_names(dir: BorrowedFd<'_>) -> nix::Result<Vec<Vec<u8>>> {
    let fd = open_beneath(dir, b"", OFlag::O_RDONLY | OFlag::O_DIRECTORY)?;
    let mut listing = nix::dir::Dir::from_fd(fd)?;
    let mut names = Vec::new();
    for entry in listing.iter() {
        let name = entry?.file_name().to_bytes().to_vec();
        if name != b"." && name != b".." {
            names.push(name);
        }
    }
    Ok(names)
}

/// A path naming the entry `name` of the open directory `dir`, for the path-only calls that
/// take no directory fd (the `l*xattr` family): `/proc/self/fd/<dir>/<name>`. The kernel
/// resolves the directory through its fd, and the `l*` calls do not follow `name` itself.
pub(crate) fn entry_path(dir: BorrowedFd<'_>, name: &[u8]) -> PathBuf {
    use std::os::fd::AsRawFd;
    let mut p = format!("/proc/self/fd/{}/", dir.as_raw_fd()).into_bytes();
    p.extend_from_slice(name);
    PathBuf::from(std::ffi::OsString::from_vec(p))
}

/// The extended attributes of the entry `name` of `dir` (not following a symlink), sorted.
pub(crate) fn xattrs_at(dir: BorrowedFd<'_>, name: &[u8]) -> std::io::Result<Vec<Xattr>> {
    let path = entry_path(dir, name);
    let mut out = Vec::new();
    for key in xattr::list(&path)? {
        if let Some(value) = xattr::get(&path, &key)? {
            out.push((key.as_bytes().to_vec(), value));
        }
    }
    out.sort();
    Ok(out)
}

/// Directories this deep below the top of a removal are moved up to the top before they are
/// emptied, so that removing a tree of any depth holds a bounded number of descriptors and
/// stack frames.
const FLATTEN_DEPTH: usize = 32;

/// Removes the entry `name` of `dir` — with everything below it, if it is a directory —
/// fd-relative, never following a symlink or crossing a mount point. When an unlink fails with
/// `EPERM` (an immutable or append-only inode, or a directory so flagged), `unlock` is called
/// for that entry and the unlink tried once more; flags `unlock` hands back are set again on
/// the inode afterwards (it keeps other links).
///
/// # Algorithm
/// Depth first, one descriptor a level, down to [`FLATTEN_DEPTH`]; a directory found there is
/// renamed up into the top directory (as `.cowherd-deep.<n>`) and removed in a later round,
/// so a hostile tree thousands of levels deep is removed with at most that many descriptors.
///
/// # Errors
/// The first failure; the rest of the tree is still removed as far as it can be. A mount point
/// below `name` is a failure (`EXDEV`), never entered.
pub(crate) fn remove_tree(
    dir: BorrowedFd<'_>,
    shown: &Path,
    name: &[u8],
    unlock: &mut Unlock<'_>,
) -> Result<()> {
    use nix::unistd::UnlinkatFlags;
    let path = join(shown, name);
    let Some(st) = lstat_or_gone(dir, name, &path)? else {
        return Ok(());
    };
    if !st.is_dir() {
        return unlink_entry(dir, name, &st, &path, UnlinkatFlags::NoRemoveDir, unlock);
    }
    let top = open_unlocked_dir(dir, shown, name, &st, unlock)?;
    let mut moved_up = 0;
    loop {
        let children = read_names(top.as_fd()).at(&path)?;
        if children.is_empty() {
            break;
        }
        for child in children {
            let removal = Removal {
                top: top.as_fd(),
                unlock: &mut *unlock,
                moved_up: &mut moved_up,
            };
            removal.remove(top.as_fd(), &path, &child, 1)?;
        }
    }
    unlink_entry(dir, name, &st, &path, UnlinkatFlags::RemoveDir, unlock)
}

/// `lstat` of entry `name` of `dir`, `None` if it is gone.
fn lstat_or_gone(dir: BorrowedFd<'_>, name: &[u8], path: &Path) -> Result<Option<Stat>> {
    match lstat_at(dir, name) {
        Ok(st) => Ok(Some(st)),
        Err(nix::errno::Errno::ENOENT) => Ok(None),
        Err(e) => Err(e).at(path),
    }
}

/// Opens directory `name` of `dir` for emptying; an immutable or append-only one is unlocked
/// first (it keeps its entries otherwise).
fn open_unlocked_dir(
    dir: BorrowedFd<'_>,
    shown: &Path,
    name: &[u8],
    st: &Stat,
    unlock: &mut Unlock<'_>,
) -> Result<OwnedFd> {
    let sub = open_dir_beneath(dir, shown, name)?;
    let guards = (crate::sys::FS_IMMUTABLE_FL | crate::sys::FS_APPEND_FL) as libc::c_int;
    if crate::sys::get_flags(&sub).is_ok_and(|f| f & guards != 0) {
        unlock(dir, name, st, &join(shown, name))?;
    }
    Ok(sub)
}

/// Unlinks one entry, unlocking it once on `EPERM` and relocking what `unlock` hands back.
fn unlink_entry(
    dir: BorrowedFd<'_>,
    name: &[u8],
    st: &Stat,
    path: &Path,
    how: nix::unistd::UnlinkatFlags,
    unlock: &mut Unlock<'_>,
) -> Result<()> {
    let unlink = || nix::unistd::unlinkat(dir, OsStr::from_bytes(name), how);
    match unlink() {
        Err(nix::errno::Errno::EPERM) => {
            let relock = unlock(dir, name, st, path)?;
            unlink().at(path)?;
            if let Some(r) = relock {
                crate::sys::add_flags(&r.fd, r.flags).at(path)?;
            }
            Ok(())
        }
        other => other.at(path),
    }
}

/// One round of [`remove_tree`] below its top directory.
struct Removal<'a, 'u> {
    top: BorrowedFd<'a>,
    unlock: &'a mut Unlock<'u>,
    moved_up: &'a mut u64,
}

impl Removal<'_, '_> {
    /// Removes entry `name` of `dir` (at `depth` below the top) and what is below it, or moves
    /// it up to the top if it is a directory at [`FLATTEN_DEPTH`].
    fn remove(
        mut self,
        dir: BorrowedFd<'_>,
        shown: &Path,
        name: &[u8],
        depth: usize,
    ) -> Result<()> {
        self.remove_at(dir, shown, name, depth)
    }

    fn remove_at(
        &mut self,
        dir: BorrowedFd<'_>,
        shown: &Path,
        name: &[u8],
        depth: usize,
    ) -> Result<()> {
        use nix::unistd::UnlinkatFlags;
        let path = join(shown, name);
        let Some(st) = lstat_or_gone(dir, name, &path)? else {
            return Ok(());
        };
        if !st.is_dir() {
            return unlink_entry(
                dir,
                name,
                &st,
                &path,
                UnlinkatFlags::NoRemoveDir,
                self.unlock,
            );
        }
        if depth >= FLATTEN_DEPTH {
            return self.move_up(dir, name, &st, &path);
        }
        let sub = open_unlocked_dir(dir, shown, name, &st, self.unlock)?;
        let mut first = None;
        for child in read_names(sub.as_fd()).at(&path)? {
            if let Err(e) = self.remove_at(sub.as_fd(), &path, &child, depth + 1) {
                first.get_or_insert(e);
            }
        }
        match first {
            Some(e) => Err(e),
            None => unlink_entry(dir, name, &st, &path, UnlinkatFlags::RemoveDir, self.unlock),
        }
    }

    /// Renames directory `name` of `dir` into the top directory under a fresh name.
    fn move_up(&mut self, dir: BorrowedFd<'_>, name: &[u8], st: &Stat, path: &Path) -> Result<()> {
        use nix::fcntl::RenameFlags;
        let mut unlocked = false;
        loop {
            *self.moved_up += 1;
            let to = format!(".cowherd-deep.{}", self.moved_up);
            let renamed = nix::fcntl::renameat2(
                dir,
                OsStr::from_bytes(name),
                self.top,
                to.as_str(),
                RenameFlags::RENAME_NOREPLACE,
            );
            match renamed {
                Ok(()) => return Ok(()),
                Err(nix::errno::Errno::EEXIST) => {}
                Err(nix::errno::Errno::EPERM) if !unlocked => {
                    (self.unlock)(dir, name, st, path)?;
                    unlocked = true;
                }
                Err(e) => return Err(e).at(path),
            }
        }
    }
}

/// Gives directory `fd` the owner, xattrs, mode and mtime of `st`, in that order (a chown
/// may clear mode bits, an ACL xattr sets some). `xattrs` replace the directory's own, except
/// overlayfs's bookkeeping ([`is_overlay_bookkeeping`]), which never belongs to a tree: it is
/// left out, and removed if present.
pub(crate) fn set_dir_metadata(
    fd: BorrowedFd<'_>,
    st: &Stat,
    xattrs: &[Xattr],
) -> std::io::Result<()> {
    use xattr::FileExt;
    let file = std::fs::File::from(fd.try_clone_to_owned()?);
    nix::unistd::fchown(fd, Some(st.uid.into()), Some(st.gid.into()))?;
    let wanted: Vec<&Xattr> = xattrs
        .iter()
        .filter(|(k, _)| !is_overlay_bookkeeping(k))
        .collect();
    for key in file.list_xattr()? {
        if !wanted.iter().any(|(k, _)| k.as_slice() == key.as_bytes()) {
            file.remove_xattr(&key)?;
        }
    }
    for (key, value) in wanted {
        if file.get_xattr(OsStr::from_bytes(key))?.as_deref() != Some(value.as_slice()) {
            file.set_xattr(OsStr::from_bytes(key), value)?;
        }
    }
    nix::sys::stat::fchmod(fd, Mode::from_bits_truncate(st.mode & 0o7777))?;
    set_mtime(fd, st.mtime_ns)?;
    Ok(())
}

/// Copies the content of `src` (from its start) to `out`, keeping holes: blocks of zeros are
/// skipped, not written. Returns the BLAKE3 hash of the content.
///
/// # Errors
/// Read and write errors.
pub(crate) fn copy_content(
    src: &std::fs::File,
    out: &mut std::fs::File,
    size: u64,
) -> std::io::Result<[u8; 32]> {
    use std::io::{Read, Seek, SeekFrom, Write};
    let mut reader = src;
    reader.seek(SeekFrom::Start(0))?;
    let mut hasher = blake3::Hasher::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = reader.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        if buf[..n].iter().all(|&b| b == 0) {
            out.seek(SeekFrom::Current(n as i64))?;
        } else {
            out.write_all(&buf[..n])?;
        }
    }
    out.set_len(size)?;
    Ok(*hasher.finalize().as_bytes())
}

/// Gives the open file `out` an owner, mode, xattrs and mtime, in that order (a chown clears
/// setuid bits and capabilities).
///
/// # Errors
/// The failing call's error.
pub(crate) fn set_file_metadata(
    out: &std::fs::File,
    uid: u32,
    gid: u32,
    mode: u32,
    xattrs: &[Xattr],
    mtime_ns: i64,
) -> std::io::Result<()> {
    use xattr::FileExt;
    nix::unistd::fchown(out, Some(uid.into()), Some(gid.into()))?;
    nix::sys::stat::fchmod(out, Mode::from_bits_truncate(mode & 0o7777))?;
    for (k, v) in xattrs {
        out.set_xattr(OsStr::from_bytes(k), v)?;
    }
    set_mtime(out, mtime_ns)?;
    Ok(())
}

/// What [`walk_tree`] meets.
pub(crate) enum Visit<'a> {
    /// A regular file: its path relative to the walk's base, and its `lstat`.
    File(&'a [u8], Stat),
    /// A directory about to be walked (listed already): its files and subdirectories follow,
    /// then [`Visit::DirEnd`]. The base is `b""`.
    Dir(&'a [u8]),
    /// The end of a directory's walk: every entry below it was visited.
    DirEnd(&'a [u8]),
    /// An entry that could not be read; `dir` when it is a directory whose subtree is unknown.
    Error {
        rel: &'a [u8],
        dir: bool,
        error: nix::errno::Errno,
    },
}

/// Walks the tree below `base`, depth first, calling `visit` for every regular file and at the
/// start and end of every directory it lists; stops early when `visit` breaks.
///
/// # Algorithm
/// Every step is relative to the directory's own fd: a directory is listed once
/// (`getdents`), each regular file gets one `fstatat(dir, name, AT_SYMLINK_NOFOLLOW)` (a
/// one-component lookup), and a subdirectory is entered with `openat2(dir, name,
/// RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_XDEV)`. So no symlink is followed, not
/// even one swapped in for a directory during the walk, and no mount point is crossed (mounted
/// directories are skipped silently, like files of another device). An entry that vanishes
/// during the walk is skipped. Open fds: two per directory level while it is listed, one
/// while its subdirectories are walked. The walk is a loop over a stack of levels on the heap,
/// not a recursion: a tree of any depth runs on a thread's small stack.
///
/// # Errors
/// None returned: a directory or file that cannot be read is passed to `visit` as
/// [`Visit::Error`] and the walk goes on.
pub(crate) fn walk_tree(
    base: BorrowedFd<'_>,
    visit: &mut dyn FnMut(Visit<'_>) -> ControlFlow<()>,
) -> ControlFlow<()> {
    // A fresh open file description: listing must not move the offset of `base`.
    let opened = open_beneath(base, b"", OFlag::O_RDONLY | OFlag::O_DIRECTORY)
        .and_then(|dir| fstat(&dir).map(|st| (dir, st.dev)));
    match opened {
        Ok((dir, dev)) => walk_dir(dir, dev, &mut Vec::with_capacity(256), visit),
        Err(error) => visit(Visit::Error {
            rel: b"",
            dir: true,
            error,
        }),
    }
}

/// One listed directory of [`walk_tree`] whose subdirectories are being walked.
struct Level {
    /// The directory, for the lookups of its subdirectories.
    fd: OwnedFd,
    /// Its subdirectories' names, end to end.
    subdirs: Vec<u8>,
    /// Where each name in `subdirs` ends.
    ends: Vec<usize>,
    /// The next subdirectory to walk (index into `ends`).
    next: usize,
    /// The length of the directory's own relative path.
    rel_len: usize,
}

/// Walks the directory `dir` (at `rel`) and everything below it. Iterative: a tree of any
/// depth costs one [`Level`] on the heap a level, never a stack frame (a guest's 2,000-level
/// tree overflowed an I/O thread's stack when this recursed).
fn walk_dir(
    dir: OwnedFd,
    dev: u64,
    rel: &mut Vec<u8>,
    visit: &mut dyn FnMut(Visit<'_>) -> ControlFlow<()>,
) -> ControlFlow<()> {
    use nix::errno::Errno;
    let mut levels: Vec<Level> = Vec::new();
    levels.extend(list_dir(dir, dev, rel, visit)?);
    while let Some(level) = levels.last_mut() {
        let Some(&end) = level.ends.get(level.next) else {
            let rel_len = level.rel_len;
            levels.pop();
            rel.truncate(rel_len);
            visit(Visit::DirEnd(rel))?;
            continue;
        };
        let start = match level.next {
            0 => 0,
            i => level.ends[i - 1],
        };
        level.next += 1;
        let name = &level.subdirs[start..end];
        rel.truncate(level.rel_len);
        if level.rel_len > 0 {
            rel.push(b'/');
        }
        rel.extend_from_slice(name);
        match open_beneath(level.fd.as_fd(), name, OFlag::O_RDONLY | OFlag::O_DIRECTORY) {
            Ok(child) => levels.extend(list_dir(child, dev, rel, visit)?),
            // Gone, replaced by a symlink or a file, or a mount point: not part of the tree.
            Err(Errno::ENOENT | Errno::ELOOP | Errno::ENOTDIR | Errno::EXDEV) => {}
            Err(error) => visit(Visit::Error {
                rel,
                dir: true,
                error,
            })?,
        }
    }
    ControlFlow::Continue(())
}

/// Lists one directory of [`walk_tree`] (at `rel`), visiting its files as they are listed;
/// returns the [`Level`] whose subdirectories are to be walked next, or `None` when the
/// directory cannot be read (visited as an error). Only the subdirectories' names are held
/// (a directory of 18,000 man pages costs nothing; a walker per guest walks at once).
fn list_dir(
    dir: OwnedFd,
    dev: u64,
    rel: &mut Vec<u8>,
    visit: &mut dyn FnMut(Visit<'_>) -> ControlFlow<()>,
) -> ControlFlow<(), Option<Level>> {
    use nix::dir::{Dir, Type};
    use nix::errno::Errno;
    let unreadable = |rel: &[u8], error, visit: &mut dyn FnMut(Visit<'_>) -> _| {
        visit(Visit::Error {
            rel,
            dir: true,
            error,
        })
    };
    // Lookups go through a second fd: the listing's borrows the first.
    let lookup = match nix::unistd::dup(&dir) {
        Ok(fd) => fd,
        Err(error) => {
            unreadable(rel, error, visit)?;
            return ControlFlow::Continue(None);
        }
    };
    let mut listing = match Dir::from_fd(dir) {
        Ok(d) => d,
        Err(error) => {
            unreadable(rel, error, visit)?;
            return ControlFlow::Continue(None);
        }
    };
    let fd = lookup.as_fd();
    let parent_len = rel.len();
    visit(Visit::Dir(rel))?;
    let mut subdirs: Vec<u8> = Vec::new();
    let mut ends: Vec<usize> = Vec::new();
    for entry in listing.iter() {
        let entry = match entry {
            Ok(e) => e,
            Err(error) => {
                // The listing is incomplete: what is below this directory is unknown.
                rel.truncate(parent_len);
                unreadable(rel, error, visit)?;
                visit(Visit::DirEnd(rel))?;
                return ControlFlow::Continue(None);
            }
        };
        let name = entry.file_name().to_bytes();
        if name == b"." || name == b".." {
            continue;
        }
        let is_dir = match entry.file_type() {
            Some(Type::Directory) => true,
            Some(Type::File) | None => {
                rel.truncate(parent_len);
                if parent_len > 0 {
                    rel.push(b'/');
                }
                rel.extend_from_slice(name);
                match lstat_at(fd, name) {
                    Ok(st) if st.is_file() => {
                        if st.dev == dev {
                            visit(Visit::File(rel, st))?;
                        }
                        false
                    }
                    Ok(st) => st.is_dir(),
                    Err(Errno::ENOENT) => false,
                    Err(error) => {
                        visit(Visit::Error {
                            rel,
                            dir: false,
                            error,
                        })?;
                        false
                    }
                }
            }
            Some(_) => false,
        };
        if is_dir {
            subdirs.extend_from_slice(name);
            ends.push(subdirs.len());
        }
    }
    drop(listing);
    rel.truncate(parent_len);
    ControlFlow::Continue(Some(Level {
        fd: lookup,
        subdirs,
        ends,
        next: 0,
        rel_len: parent_len,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{MetadataExt, symlink};

    /// A path relative to the walk's base and its inode.
    type Found = (Vec<u8>, u64);

    /// Every file [`walk_tree`] visits below `dir`, with its inode, and every error's path.
    fn walk(dir: &Path) -> (Vec<Found>, Vec<Vec<u8>>) {
        let base = open_dir(dir).unwrap();
        let (mut files, mut errors) = (Vec::new(), Vec::new());
        let flow = walk_tree(base.as_fd(), &mut |v| {
            match v {
                Visit::File(rel, st) => files.push((rel.to_vec(), st.ino)),
                Visit::Error { rel, .. } => errors.push(rel.to_vec()),
                Visit::Dir(_) | Visit::DirEnd(_) => {}
            }
            ControlFlow::Continue(())
        });
        assert!(flow.is_continue());
        files.sort();
        (files, errors)
    }

    fn ino(path: &Path) -> u64 {
        std::fs::symlink_metadata(path).unwrap().ino()
    }

    #[test]
    fn walk_tree_visits_every_regular_file_and_follows_no_symlink() {
        let tmp = tempfile::tempdir().unwrap();
        let (tree, outside) = (tmp.path().join("tree"), tmp.path().join("outside"));
        std::fs::create_dir_all(tree.join("a/b/c")).unwrap();
        std::fs::create_dir_all(&outside).unwrap();
        std::fs::write(outside.join("secret"), b"host").unwrap();
        std::fs::write(tree.join("top"), b"1").unwrap();
        std::fs::write(tree.join("a/b/c/deep"), b"2").unwrap();
        let odd = OsStr::from_bytes(b"new\nline \xff");
        std::fs::write(tree.join("a").join(odd), b"3").unwrap();
        std::fs::hard_link(tree.join("top"), tree.join("a/top-link")).unwrap();
        symlink(&outside, tree.join("a/to-outside")).unwrap();
        symlink(outside.join("secret"), tree.join("to-secret")).unwrap();
        nix::unistd::mkfifo(&tree.join("fifo"), Mode::from_bits_truncate(0o600)).unwrap();
        std::fs::create_dir(tree.join("empty")).unwrap();

        let (files, errors) = walk(&tree);
        let want = |rel: &[u8]| (rel.to_vec(), ino(&join(&tree, rel)));
        let mut expected = vec![
            want(b"top"),
            want(b"a/b/c/deep"),
            want(b"a/new\nline \xff"),
            want(b"a/top-link"),
        ];
        expected.sort();
        assert_eq!(files, expected);
        assert!(errors.is_empty(), "{errors:?}");
    }

    #[test]
    fn walk_tree_skips_a_filesystem_mounted_inside_the_tree() {
        let tmp = tempfile::tempdir().unwrap();
        let tree = tmp.path();
        std::fs::create_dir_all(tree.join("mnt")).unwrap();
        std::fs::write(tree.join("kept"), b"1").unwrap();
        nix::mount::mount(
            Some("tmpfs"),
            &tree.join("mnt"),
            Some("tmpfs"),
            nix::mount::MsFlags::empty(),
            None::<&str>,
        )
        .expect("mounting tmpfs needs root");
        std::fs::write(tree.join("mnt/foreign"), b"2").unwrap();
        let (files, errors) = walk(tree);
        nix::mount::umount(&tree.join("mnt")).unwrap();
        assert_eq!(files, vec![(b"kept".to_vec(), ino(&tree.join("kept")))]);
        assert!(errors.is_empty(), "{errors:?}");
    }

    /// Regression: the walk recursed once per directory level, so a guest tree 2,000 levels
    /// deep overflowed the stack of an I/O pool thread and aborted `unify`; 1,000 levels
    /// overflow 128 KiB.
    #[test]
    fn walk_tree_descends_thousands_of_levels_on_a_small_stack() {
        let tmp = tempfile::tempdir().unwrap();
        let flags = OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC;
        let mut fd = open_dir(tmp.path()).unwrap();
        for _ in 0..1000 {
            nix::sys::stat::mkdirat(&fd, "d", Mode::from_bits_truncate(0o755)).unwrap();
            fd = nix::fcntl::openat(&fd, "d", flags, Mode::empty()).unwrap();
        }
        drop(nix::fcntl::openat(
            &fd,
            "bottom",
            OFlag::O_CREAT | OFlag::O_WRONLY,
            Mode::empty(),
        ));
        drop(fd);
        let base = open_dir(tmp.path()).unwrap();
        let (files, dirs, ends) = std::thread::Builder::new()
            .stack_size(128 * 1024)
            .spawn(move || {
                let (mut files, mut dirs, mut ends) = (Vec::new(), 0, 0);
                let flow = walk_tree(base.as_fd(), &mut |v| {
                    match v {
                        Visit::File(rel, _) => files.push(rel.len()),
                        Visit::Dir(_) => dirs += 1,
                        Visit::DirEnd(_) => ends += 1,
                        Visit::Error { rel, error, .. } => panic!("{} {error}", rel.len()),
                    }
                    ControlFlow::Continue(())
                });
                assert!(flow.is_continue());
                (files, dirs, ends)
            })
            .unwrap()
            .join()
            .unwrap();
        assert_eq!(files, [1000 * 2 + "bottom".len()]);
        assert_eq!((dirs, ends), (1001, 1001));
    }

    #[test]
    fn walk_tree_stops_when_the_visitor_breaks() {
        let tmp = tempfile::tempdir().unwrap();
        for d in ["x", "y", "z"] {
            std::fs::create_dir(tmp.path().join(d)).unwrap();
            std::fs::write(tmp.path().join(d).join("f"), b"1").unwrap();
        }
        let base = open_dir(tmp.path()).unwrap();
        let mut seen = 0;
        let flow = walk_tree(base.as_fd(), &mut |_| {
            seen += 1;
            ControlFlow::Break(())
        });
        assert!(flow.is_break());
        assert_eq!(seen, 1);
    }
}
