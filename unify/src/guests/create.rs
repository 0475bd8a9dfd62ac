//! Creating guests: a staging directory `guests/.NAME.creating/` whose `base/` is filled — by a
//! clone of a cached template (store links linked again, everything else copied) or by an
//! import — and which is renamed into place only once complete. A killed creation leaves no
//! guest: the next writer removes the staging directory.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{AtFlags, OFlag, RenameFlags};
use nix::sys::stat::{Mode, SFlag};
use serde::Serialize;

use crate::error::{Error, PathContext, Result};
use crate::fsx::{self, Stat};
use crate::guest::{CREATING, GuestRecord, Origin, now_unix, validate_guest_name};
use crate::root::HostRoot;
use crate::store;

/// How [`NewGuest::clone_tree`] treats regular files.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CloneMode {
    /// A file that is a store link gets a new link to the same object (a copy if the object
    /// is full); every other file is copied.
    LinkObjects,
    /// Every file is copied (a tree that will be changed in place, like a template being built
    /// on another).
    CopyAll,
    /// Every file is a new link to the source's inode (a snapshot of a guest, a rollback to
    /// one): the trees share every inode, and neither is ever changed in place. A file that
    /// cannot be linked — it carries the guest's own immutable or append-only flag, or its
    /// inode is at the link limit — is copied, its inode flags with it. Directories, made anew,
    /// get the source's inode flags too.
    LinkAll,
}

/// What a clone did.
#[derive(Clone, Debug, Default, Serialize)]
pub struct CloneReport {
    /// Regular files (paths).
    pub files: u64,
    /// Of those, new links to store objects.
    pub linked: u64,
    /// Of those, copied.
    pub copied: u64,
    /// Bytes copied (the bytes the new tree costs, besides directories and inodes).
    pub copied_bytes: u64,
    /// Of the linked files ([`CloneMode::LinkAll`]), those whose inode is the guest's own (not
    /// a store object).
    #[serde(skip_serializing_if = "is_zero")]
    pub linked_own: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// A directory tree below the root, edited fd-relatively (no symlink in it is ever followed):
/// a new guest's `base/`, or a template tree being built.
pub struct Tree {
    path: PathBuf,
    fd: OwnedFd,
}

impl std::fmt::Debug for Tree {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tree")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

impl Tree {
    /// Opens the directory `rel` below the root.
    ///
    /// # Errors
    /// [`Error::Symlink`], [`Error::NotADirectory`], [`Error::Io`].
    pub fn open(root: &HostRoot, rel: &Path) -> Result<Tree> {
        Ok(Tree {
            path: root.path().join(rel),
            fd: root.open_dir_below(rel)?,
        })
    }

    /// Makes the directory `rel` below the root (its missing parents too, 0700) and opens it.
    ///
    /// # Errors
    /// As [`Tree::open`], and [`Error::Io`] if a directory cannot be made.
    pub fn create(root: &HostRoot, rel: &Path) -> Result<Tree> {
        let mut done = PathBuf::new();
        for part in rel.components() {
            let parent = root.open_dir_below(&done)?;
            done.push(part);
            match nix::sys::stat::mkdirat(
                &parent,
                part.as_os_str(),
                Mode::from_bits_truncate(0o700),
            ) {
                Ok(()) | Err(Errno::EEXIST) => {}
                Err(e) => return Err(e).at(root.path().join(&done)),
            }
        }
        Tree::open(root, rel)
    }

    /// Its host path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Writes the file `rel` (its directory must exist) with `bytes`, root-owned with `mode`:
    /// a new inode renamed over whatever was there, never through a symlink.
    ///
    /// # Errors
    /// I/O errors naming the path.
    pub fn write_file(&self, rel: &str, bytes: &[u8], mode: u32) -> Result<()> {
        use std::io::Write;
        let shown = self.path.join(rel);
        let (parent, name) = fsx::split_parent(rel.as_bytes());
        let dir = fsx::open_dir_beneath(self.fd.as_fd(), &self.path, parent)?;
        let tmp = format!(".{}.cowherd-new", String::from_utf8_lossy(name));
        let _ = nix::unistd::unlinkat(&dir, tmp.as_str(), nix::unistd::UnlinkatFlags::NoRemoveDir);
        let fd: OwnedFd = nix::fcntl::openat(
            &dir,
            tmp.as_str(),
            OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_WRONLY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Mode::from_bits_truncate(mode),
        )
        .at(&shown)?;
        let mut file = std::fs::File::from(fd);
        file.write_all(bytes).at(&shown)?;
        nix::unistd::fchown(&file, Some(0.into()), Some(0.into())).at(&shown)?;
        nix::sys::stat::fchmod(&file, Mode::from_bits_truncate(mode)).at(&shown)?;
        nix::fcntl::renameat(&dir, tmp.as_str(), &dir, OsStr::from_bytes(name)).at(&shown)
    }

    /// Removes the entry `rel` (with everything below it, for a directory), if it is there.
    ///
    /// # Errors
    /// I/O errors naming the path.
    pub fn remove(&self, root: &HostRoot, rel: &str) -> Result<()> {
        let (parent, name) = fsx::split_parent(rel.as_bytes());
        match fsx::open_dir_beneath(self.fd.as_fd(), &self.path, parent) {
            Ok(dir) => store::remove_guest_tree(root, dir.as_fd(), &self.path.join(rel), name),
            Err(e) if not_there(&e, true) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Removes every regular file below the directory `rel` (keeping the directories, which
    /// packages may need with their owners), and returns how many.
    ///
    /// # Errors
    /// I/O errors naming the path.
    pub fn remove_files_below(&self, rel: &str) -> Result<u64> {
        let dir = match fsx::open_dir_beneath(self.fd.as_fd(), &self.path, rel.as_bytes()) {
            Ok(dir) => dir,
            Err(e) if not_there(&e, true) => return Ok(0),
            Err(e) => return Err(e),
        };
        let mut files = Vec::new();
        let _ = fsx::walk_tree(dir.as_fd(), &mut |visit| {
            if let fsx::Visit::File(path, _) = visit {
                files.push(path.to_vec());
            }
            std::ops::ControlFlow::Continue(())
        });
        let shown = self.path.join(rel);
        for file in &files {
            let (parent, name) = fsx::split_parent(file);
            let at = fsx::open_dir_beneath(dir.as_fd(), &shown, parent)?;
            match nix::unistd::unlinkat(
                &at,
                OsStr::from_bytes(name),
                nix::unistd::UnlinkatFlags::NoRemoveDir,
            ) {
                Ok(()) | Err(Errno::ENOENT) => {}
                Err(e) => return Err(e).at(fsx::join(&shown, file)),
            }
        }
        Ok(files.len() as u64)
    }

    /// The names in the directory `rel` (none if it is not there).
    ///
    /// # Errors
    /// [`Error::Symlink`] if `rel` (or a directory on the way) is a symlink: what the caller
    /// looks for would be elsewhere, unseen. I/O errors naming the path.
    pub fn names(&self, rel: &str) -> Result<Vec<String>> {
        let dir = match fsx::open_dir_beneath(self.fd.as_fd(), &self.path, rel.as_bytes()) {
            Ok(dir) => dir,
            Err(e) if not_there(&e, false) => return Ok(Vec::new()),
            Err(e) => return Err(e),
        };
        let names = fsx::read_names(dir.as_fd()).at(self.path.join(rel))?;
        Ok(names
            .into_iter()
            .map(|n| String::from_utf8_lossy(&n).into_owned())
            .collect())
    }

    /// Whether `rel` is a regular file (not a symlink).
    pub fn is_file(&self, rel: &str) -> bool {
        let (parent, name) = fsx::split_parent(rel.as_bytes());
        fsx::open_dir_beneath(self.fd.as_fd(), &self.path, parent)
            .ok()
            .and_then(|dir| fsx::lstat_at(dir.as_fd(), name).ok())
            .is_some_and(|st| st.is_file())
    }

    /// Whether `rel` exists, as anything but a symlink on the way to it.
    pub fn exists(&self, rel: &str) -> bool {
        fsx::open_beneath(self.fd.as_fd(), rel.as_bytes(), OFlag::O_PATH).is_ok()
    }
}

/// Detaches, deepest first, every mount of this namespace at or below `dir`: what a killed
/// bootstrapper left mounted in its tree (its `/proc`, `/dev`), which would keep the tree from
/// being removed.
fn detach_mounts_below(dir: &Path) {
    let Ok(mounts) = crate::mountinfo::read_mountinfo(Path::new("/proc/self/mountinfo")) else {
        return;
    };
    let mut points: Vec<PathBuf> = mounts
        .into_iter()
        .map(|m| m.mount_point)
        .filter(|point| point.starts_with(dir))
        .collect();
    points.sort_by_key(|point| std::cmp::Reverse(point.components().count()));
    for point in points {
        let _ = nix::mount::umount2(&point, nix::mount::MntFlags::MNT_DETACH);
    }
}

/// Whether opening a directory of a tree failed because there is none: missing, not a
/// directory, or (if `symlink_too`) a symlink, never followed, so nothing of the tree is there.
fn not_there(e: &Error, symlink_too: bool) -> bool {
    match e {
        Error::NotADirectory { .. } => true,
        Error::Symlink { .. } => symlink_too,
        _ => e.errno() == Some(libc::ENOENT),
    }
}

/// Removes the entry `rel` below the root, with everything below it (a template build's
/// staging directory, a cached version).
///
/// # Errors
/// I/O errors naming the path.
pub fn remove_below_root(root: &HostRoot, rel: &Path) -> Result<()> {
    let parent = rel.parent().unwrap_or(Path::new(""));
    let name = rel.file_name().unwrap_or_default();
    let dir = root.open_dir_below(parent)?;
    store::remove_guest_tree(
        root,
        dir.as_fd(),
        &root.path().join(parent),
        name.as_bytes(),
    )
}

/// The staging directory of a template build in progress, below `templates/NAME/`.
pub const TEMPLATE_STAGING: &str = ".building";

/// The prefix of a template version being removed, below `templates/NAME/` (`.removing.3`).
pub const TEMPLATE_REMOVING: &str = ".removing.";

/// Finishes what killed template builds and removals left: removes their directories
/// (`templates/*/.building`, `templates/*/.removing.*`) as far as it can (see
/// `guest::recover_destroys`), then drops the index rows of template trees (`@template/N/V`)
/// whose version directory is gone.
pub(crate) fn recover_template_builds(root: &HostRoot) -> Result<()> {
    let dir = root.path().join("templates");
    for entry in std::fs::read_dir(&dir).at(&dir)? {
        let template = entry.at(&dir)?.file_name();
        let tdir = dir.join(&template);
        let Ok(entries) = std::fs::read_dir(&tdir) else {
            continue;
        };
        for inner in entries.flatten() {
            let name = inner.file_name();
            let name = name.to_string_lossy();
            if name == TEMPLATE_STAGING || name.starts_with(TEMPLATE_REMOVING) {
                let rel = Path::new("templates")
                    .join(&template)
                    .join(inner.file_name());
                detach_mounts_below(&root.path().join(&rel));
                // A killed build's tools die with it, but their death is asynchronous: one may
                // still add a file for a moment. Retry for up to two seconds, then leave the
                // rest to the next writer.
                for _ in 0..20 {
                    if remove_below_root(root, &rel).is_ok() {
                        break;
                    }
                    std::thread::sleep(std::time::Duration::from_millis(100));
                }
            }
        }
    }
    let names: Vec<String> = {
        let mut stmt = root
            .index
            .conn
            .prepare("SELECT name FROM guests WHERE name LIKE '@template/%'")
            .map_err(|e| root.index.err(e))?;
        stmt.query_map([], |r| r.get(0))
            .and_then(|rows| rows.collect::<rusqlite::Result<_>>())
            .map_err(|e| root.index.err(e))?
    };
    for name in names {
        let rel = name.trim_start_matches("@template/");
        let gone =
            rel.contains("..") || std::fs::symlink_metadata(dir.join(rel).join("tree")).is_err();
        if gone {
            crate::unify::forget_tree(root, &name)?;
        }
    }
    Ok(())
}

/// Renames `from` to `to`, both below the root, refusing to replace anything at `to`, after
/// flushing the filesystem (`syncfs`).
///
/// # Errors
/// [`Error::Io`] (`EEXIST` if `to` exists).
pub fn rename_below_root(root: &HostRoot, from: &Path, to: &Path) -> Result<()> {
    let dir_of = |p: &Path| root.open_dir_below(p.parent().unwrap_or(Path::new("")));
    let (from_dir, to_dir) = (dir_of(from)?, dir_of(to)?);
    // What is renamed into place (a template version) is on disk first.
    nix::unistd::syncfs(&from_dir).at(root.path().join(from))?;
    nix::fcntl::renameat2(
        &from_dir,
        from.file_name().unwrap_or_default(),
        &to_dir,
        to.file_name().unwrap_or_default(),
        RenameFlags::RENAME_NOREPLACE,
    )
    .at(root.path().join(to))
}

/// Clones the tree `src` (relative to the root) into the empty directory `dest`: directories,
/// symlinks and special files made anew with the same owner, mode, mtime and xattrs, hardlinks
/// within the tree kept, regular files linked or copied as `mode` says; `dest` itself gets
/// `src`'s metadata. The paths of one store object are separate files that share content,
/// not a hardlink group: in [`CloneMode::CopyAll`] each gets its own copy.
///
/// # Algorithm
/// Depth first, fd-relative on both sides (no symlink followed, no mount crossed). A regular
/// file whose inode is a store object is linked to it (an immutable object's flag is cleared
/// for that, journalled, and set again); past the link limit, or in [`CloneMode::CopyAll`], it
/// is copied (holes kept). In [`CloneMode::LinkAll`] every regular file is linked to its
/// source inode; one that carries the guest's immutable or append-only flag (no link can be
/// made to it) is copied, and its copy gets the source's flags once the whole tree is done, as
/// does every directory whose source carries flags. A directory gets its metadata after its
/// entries, so its mtime is the source's.
///
/// # Errors
/// I/O and index errors, naming the path.
pub fn clone_tree(
    root: &HostRoot,
    src: &Path,
    dest: &Tree,
    mode: CloneMode,
) -> Result<CloneReport> {
    let from = root.open_dir_below(src)?;
    let mut cloner = Cloner {
        root,
        base: dest.fd.as_fd(),
        mode,
        src_path: root.path().join(src),
        dest_path: dest.path.clone(),
        inodes: HashMap::new(),
        flagged: Vec::new(),
        report: CloneReport::default(),
    };
    let result = cloner
        .dir(from.as_fd(), dest.fd.as_fd(), &mut Vec::new())
        .and_then(|()| cloner.set_copied_flags())
        .and_then(|()| {
            let st = fsx::fstat(&from).at(&cloner.src_path)?;
            let xattrs = fsx::xattrs_at(from.as_fd(), b".").at(&cloner.src_path)?;
            fsx::set_dir_metadata(dest.fd.as_fd(), &st, &xattrs).at(&dest.path)
        });
    if let Some(e) = store::restore_immutable(root)?.into_iter().next() {
        return Err(e);
    }
    result.map(|()| cloner.report)
}

/// A guest being created in `guests/.NAME.creating/`.
pub struct NewGuest {
    record: GuestRecord,
    staging: PathBuf,
    dir: OwnedFd,
    base: Tree,
}

impl std::fmt::Debug for NewGuest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NewGuest")
            .field("name", &self.record.name)
            .finish_non_exhaustive()
    }
}

impl NewGuest {
    /// Starts creating guest `name`: a fresh staging directory with an empty `base/` (0755,
    /// root), `upper/`, `work/` and `rootfs/`. A staging directory a killed creation of the same
    /// name left is removed first.
    ///
    /// # Errors
    /// [`Error::BadGuestName`], [`Error::GuestExists`], I/O errors.
    pub fn begin(root: &HostRoot, name: &str, origin: Origin) -> Result<NewGuest> {
        validate_guest_name(name)?;
        let dest = root.guests_dir().join(name);
        if std::fs::symlink_metadata(&dest).is_ok() {
            return Err(Error::GuestExists {
                name: name.to_string(),
                path: dest,
            });
        }
        let staged = format!(".{name}{CREATING}");
        store::remove_guest_tree(
            root,
            root.guests_fd(),
            &root.guests_dir(),
            staged.as_bytes(),
        )?;
        let staging = root.guests_dir().join(&staged);
        let mode = |m| Mode::from_bits_truncate(m);
        nix::sys::stat::mkdirat(root.guests_fd(), staged.as_str(), mode(0o755)).at(&staging)?;
        let dir = fsx::open_dir_beneath(root.guests_fd(), &root.guests_dir(), staged.as_bytes())?;
        for (sub, m) in [
            ("base", 0o755),
            ("upper", 0o755),
            ("work", 0o700),
            ("rootfs", 0o755),
        ] {
            nix::sys::stat::mkdirat(&dir, sub, mode(m)).at(staging.join(sub))?;
        }
        let base = Tree {
            fd: fsx::open_dir_beneath(dir.as_fd(), &staging, b"base")?,
            path: staging.join("base"),
        };
        let record = GuestRecord {
            name: name.to_string(),
            created_unix: now_unix(),
            hostname: None,
            mount_point: None,
            origin,
            policy: None,
        };
        Ok(NewGuest {
            record,
            staging,
            dir,
            base,
        })
    }

    /// The record that [`finish`](Self::finish) will write (set the hostname or a policy).
    pub fn record_mut(&mut self) -> &mut GuestRecord {
        &mut self.record
    }

    /// The new guest's `base/`, to fill (with [`clone_tree`], say) and to edit.
    pub fn base(&self) -> &Tree {
        &self.base
    }

    /// A directory of the staging area, reachable by root only and outside the new guest's
    /// tree, for files a tool makes before they go into the tree (keys, say). Removed by
    /// [`finish`](Self::finish).
    ///
    /// # Errors
    /// I/O errors.
    pub fn scratch_path(&self) -> Result<PathBuf> {
        let path = self.staging.join("tmp");
        match nix::sys::stat::mkdirat(&self.dir, "tmp", Mode::from_bits_truncate(0o700)) {
            Ok(()) | Err(Errno::EEXIST) => Ok(path),
            Err(e) => Err(e).at(path),
        }
    }

    /// Writes the record and renames the staging directory to `guests/NAME`: from here on the
    /// guest exists, complete.
    ///
    /// # Errors
    /// [`Error::GuestExists`] if the name was taken meanwhile, I/O errors.
    pub fn finish(self, root: &HostRoot) -> Result<GuestRecord> {
        // The upper root shows as the guest's `/`: it gets base's root metadata.
        let st = fsx::fstat(&self.base.fd).at(&self.base.path)?;
        let xattrs = fsx::xattrs_at(self.base.fd.as_fd(), b".").at(&self.base.path)?;
        let upper = fsx::open_dir_beneath(self.dir.as_fd(), &self.staging, b"upper")?;
        fsx::set_dir_metadata(upper.as_fd(), &st, &xattrs).at(self.staging.join("upper"))?;
        self.record.save(&self.staging.join("guest.toml"))?;
        store::remove_guest_tree(root, self.dir.as_fd(), &self.staging, b"tmp")?;
        // Every byte of the tree on disk before its name says it is complete: a power loss
        // leaves a whole guest or a staging directory, never a guest of empty files.
        nix::unistd::syncfs(root.guests_fd()).at(&self.staging)?;
        let name = self.record.name.clone();
        let staged = self.staging.file_name().unwrap_or_default().to_os_string();
        nix::fcntl::renameat2(
            root.guests_fd(),
            staged.as_os_str(),
            root.guests_fd(),
            name.as_str(),
            RenameFlags::RENAME_NOREPLACE,
        )
        .map_err(|e| match e {
            Errno::EEXIST => Error::GuestExists {
                name: name.clone(),
                path: root.guests_dir().join(&name),
            },
            e => Error::Io {
                path: root.guests_dir().join(&name),
                error: e.into(),
            },
        })?;
        root.index.guest_id(&name)?;
        Ok(self.record)
    }
}

/// The state of one clone.
struct Cloner<'a> {
    root: &'a HostRoot,
    /// The new tree's top.
    base: BorrowedFd<'a>,
    mode: CloneMode,
    src_path: PathBuf,
    dest_path: PathBuf,
    /// Source inodes with several links, to the first path they were cloned to and whether
    /// that path is a copy (not a link of the source inode).
    inodes: HashMap<u64, (Vec<u8>, bool)>,
    /// Copies, and in [`CloneMode::LinkAll`] directories, that get the source's inode flags
    /// once the whole tree is cloned (a flag such as `+i` would stop the other paths of its
    /// hardlink group being linked to the copy, or entries being made in the directory).
    flagged: Vec<(Vec<u8>, libc::c_long)>,
    report: CloneReport,
}

impl Cloner<'_> {
    /// Clones the entries of `src` into `dest` (both at guest path `rel`).
    fn dir(&mut self, src: BorrowedFd<'_>, dest: BorrowedFd<'_>, rel: &mut Vec<u8>) -> Result<()> {
        let names = fsx::read_names(src).at(fsx::join(&self.src_path, rel))?;
        let parent_len = rel.len();
        for name in names {
            rel.truncate(parent_len);
            if parent_len > 0 {
                rel.push(b'/');
            }
            rel.extend_from_slice(&name);
            self.entry(src, dest, &name, rel)?;
        }
        rel.truncate(parent_len);
        Ok(())
    }

    fn entry(
        &mut self,
        src: BorrowedFd<'_>,
        dest: BorrowedFd<'_>,
        name: &[u8],
        rel: &mut Vec<u8>,
    ) -> Result<()> {
        let shown = fsx::join(&self.src_path, rel);
        let (st, rdev) =
            nix::sys::stat::fstatat(src, OsStr::from_bytes(name), AtFlags::AT_SYMLINK_NOFOLLOW)
                .map(|s| (Stat::from(s), s.st_rdev))
                .at(&shown)?;
        let dest_shown = fsx::join(&self.dest_path, rel);
        let kind = st.mode & libc::S_IFMT;
        if kind == libc::S_IFDIR {
            nix::sys::stat::mkdirat(
                dest,
                OsStr::from_bytes(name),
                Mode::from_bits_truncate(0o700),
            )
            .at(&dest_shown)?;
            let parent = fsx::split_parent(rel).0;
            let from = fsx::open_dir_beneath(src, &fsx::join(&self.src_path, parent), name)?;
            let to = fsx::open_dir_beneath(dest, &fsx::join(&self.dest_path, parent), name)?;
            self.dir(from.as_fd(), to.as_fd(), rel)?;
            let xattrs = fsx::xattrs_at(from.as_fd(), b".").at(&shown)?;
            fsx::set_dir_metadata(to.as_fd(), &st, &xattrs).at(&dest_shown)?;
            if self.mode == CloneMode::LinkAll {
                // The guest's own `chattr +a`/`+i` of a directory (a fold put it on base's
                // inode) is part of its tree: the snapshot's directory gets it too, once the
                // whole tree is cloned (an append-only directory keeps no rename or unlink out).
                let flags = crate::sys::user_flags(&from).at(&shown)?;
                if flags != 0 {
                    self.flagged.push((rel.clone(), libc::c_long::from(flags)));
                }
            }
            return Ok(());
        }
        // A store object's paths are separate files that merely share content (often of
        // unrelated packages): each is linked to the object or copied on its own, never
        // hardlinked to the others (a copy changed in place would change them all).
        let object = if kind == libc::S_IFREG && st.nlink > 1 {
            store::object_of_inode(self.root, &st)?
        } else {
            None
        };
        if st.nlink > 1
            && object.is_none()
            && let Some((first, first_copied)) = self.inodes.get(&st.ino)
        {
            // Another path of a hardlink group already cloned: link to it.
            let first_copied = *first_copied;
            let (parent, first_name) = fsx::split_parent(first);
            let dir = fsx::open_dir_beneath(self.base, &self.dest_path, parent)?;
            nix::unistd::linkat(
                &dir,
                OsStr::from_bytes(first_name),
                dest,
                OsStr::from_bytes(name),
                AtFlags::empty(),
            )
            .at(&dest_shown)?;
            if kind == libc::S_IFREG {
                self.report.files += 1;
                // In a link clone this path, like the first, is a link of the source inode or
                // a path of its copy (whose bytes are counted once).
                if self.mode == CloneMode::LinkAll {
                    if first_copied {
                        self.report.copied += 1;
                    } else {
                        self.report.linked += 1;
                        self.report.linked_own += 1;
                    }
                }
            }
            return Ok(());
        }
        let copied_before = self.report.copied;
        match kind {
            libc::S_IFREG => self.file(src, dest, name, rel, &st, object.as_deref())?,
            libc::S_IFLNK => {
                let target = nix::fcntl::readlinkat(src, OsStr::from_bytes(name)).at(&shown)?;
                nix::unistd::symlinkat(target.as_os_str(), dest, OsStr::from_bytes(name))
                    .at(&dest_shown)?;
                self.metadata_at(src, dest, name, rel, &st, true)?;
            }
            _ => {
                let sflag = SFlag::from_bits_truncate(kind);
                nix::sys::stat::mknodat(
                    dest,
                    OsStr::from_bytes(name),
                    sflag,
                    Mode::from_bits_truncate(st.mode & 0o7777),
                    rdev,
                )
                .at(&dest_shown)?;
                self.metadata_at(src, dest, name, rel, &st, false)?;
            }
        }
        if st.nlink > 1 && object.is_none() {
            let copied = self.report.copied > copied_before;
            self.inodes.insert(st.ino, (rel.clone(), copied));
        }
        Ok(())
    }

    /// Clones one regular file: a new link to its store object `object`, or a copy.
    fn file(
        &mut self,
        src: BorrowedFd<'_>,
        dest: BorrowedFd<'_>,
        name: &[u8],
        rel: &[u8],
        st: &Stat,
        object: Option<&str>,
    ) -> Result<()> {
        self.report.files += 1;
        let dest_shown = fsx::join(&self.dest_path, rel);
        if self.mode != CloneMode::CopyAll
            && let Some(object) = object
        {
            let rel_obj = store::object_rel(object);
            let link = || {
                nix::unistd::linkat(
                    self.root.objects_fd(),
                    rel_obj.as_str(),
                    dest,
                    OsStr::from_bytes(name),
                    AtFlags::empty(),
                )
            };
            let linked = match link() {
                Err(Errno::EPERM) => {
                    store::unlock_object(self.root, object)?;
                    link()
                }
                other => other,
            };
            match linked {
                Ok(()) => {
                    self.report.linked += 1;
                    return Ok(());
                }
                // Full: a copy now, the next unify starts the object's successor.
                Err(Errno::EMLINK) => {}
                Err(e) => return Err(e).at(&dest_shown),
            }
        }
        if self.mode == CloneMode::LinkAll && object.is_none() {
            let link = nix::unistd::linkat(
                src,
                OsStr::from_bytes(name),
                dest,
                OsStr::from_bytes(name),
                AtFlags::empty(),
            );
            match link {
                Ok(()) => {
                    self.report.linked += 1;
                    self.report.linked_own += 1;
                    return Ok(());
                }
                // The guest's own `+i`/`+a`, or the link limit: a copy, with its flags.
                Err(Errno::EPERM | Errno::EMLINK) => {}
                Err(e) => return Err(e).at(&dest_shown),
            }
        }
        let shown = fsx::join(&self.src_path, rel);
        let from = fsx::open_beneath(src, name, OFlag::O_RDONLY | OFlag::O_NONBLOCK).at(&shown)?;
        let from = std::fs::File::from(from);
        let out: OwnedFd = nix::fcntl::openat(
            dest,
            OsStr::from_bytes(name),
            OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_WRONLY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Mode::from_bits_truncate(0o600),
        )
        .at(&dest_shown)?;
        let mut out = std::fs::File::from(out);
        fsx::copy_content(&from, &mut out, st.size).at(&dest_shown)?;
        let xattrs = fsx::read_xattrs(&from).at(&shown)?;
        fsx::set_file_metadata(&out, st.uid, st.gid, st.mode, &xattrs, st.mtime_ns)
            .at(&dest_shown)?;
        if self.mode == CloneMode::LinkAll {
            let flags = crate::sys::user_flags(&from).at(&shown)?;
            if flags != 0 {
                self.flagged.push((rel.to_vec(), libc::c_long::from(flags)));
            }
        }
        self.report.copied += 1;
        self.report.copied_bytes += st.blocks * 512;
        Ok(())
    }

    /// Sets the inode flags of the copies [`CloneMode::LinkAll`] made of flagged files, and of
    /// its flagged directories.
    fn set_copied_flags(&mut self) -> Result<()> {
        for (rel, flags) in std::mem::take(&mut self.flagged) {
            let shown = fsx::join(&self.dest_path, &rel);
            let fd = fsx::open_beneath(self.base, &rel, OFlag::O_RDONLY | OFlag::O_NONBLOCK)
                .at(&shown)?;
            crate::sys::add_flags(fd, flags).at(&shown)?;
        }
        Ok(())
    }

    /// Gives a symlink or special file made anew the source's owner, xattrs and mtime.
    fn metadata_at(
        &mut self,
        src: BorrowedFd<'_>,
        dest: BorrowedFd<'_>,
        name: &[u8],
        rel: &[u8],
        st: &Stat,
        symlink: bool,
    ) -> Result<()> {
        let dest_shown = fsx::join(&self.dest_path, rel);
        let shown = fsx::join(&self.src_path, rel);
        nix::unistd::fchownat(
            dest,
            OsStr::from_bytes(name),
            Some(st.uid.into()),
            Some(st.gid.into()),
            AtFlags::AT_SYMLINK_NOFOLLOW,
        )
        .at(&dest_shown)?;
        if !symlink {
            nix::sys::stat::fchmodat(
                dest,
                OsStr::from_bytes(name),
                Mode::from_bits_truncate(st.mode & 0o7777),
                nix::sys::stat::FchmodatFlags::FollowSymlink,
            )
            .at(&dest_shown)?;
        }
        let entry = fsx::entry_path(dest, name);
        for (key, value) in fsx::xattrs_at(src, name).at(&shown)? {
            xattr::set(&entry, OsStr::from_bytes(&key), &value).at(&dest_shown)?;
        }
        let mtime = nix::sys::time::TimeSpec::new(
            st.mtime_ns.div_euclid(1_000_000_000),
            st.mtime_ns.rem_euclid(1_000_000_000),
        );
        nix::sys::stat::utimensat(
            dest,
            OsStr::from_bytes(name),
            &nix::sys::time::TimeSpec::UTIME_OMIT,
            &mtime,
            nix::sys::stat::UtimensatFlags::NoFollowSymlink,
        )
        .at(&dest_shown)
    }
}
