//! The host root: its on-disk layout, the one-filesystem rule and the writer lock.
//!
//! ```text
//! $ROOT (default /var/lib/cowherd), one filesystem
//! ├── index.db                 SQLite (WAL): guests, files, objects, journal
//! ├── policy.toml              default marker policy
//! ├── lock                     flock(2): one writer at a time
//! ├── store/
//! │   ├── objects/ab/<key>.c0  shared inodes ("c" cow, "i" immutable; 0,1,… past EMLINK)
//! │   └── tmp/                 objects being copied in; emptied by every writer
//! ├── templates/<name>/
//! │   ├── <version>/           a built template (1, 2, …): tree/ (unified into the store)
//! │   │                        and template.toml (what was built, from what, when)
//! │   ├── .building/           a build in progress; removed by the next writer
//! │   └── .removing.<version>/ a version being removed; removed by the next writer
//! └── guests/<name>/
//!     ├── guest.toml           the guest's record
//!     ├── base/                lower layer: the guest's tree
//!     ├── upper/  work/        private copy-on-write layer
//!     └── rootfs/              overlay mount point
//! ```

use std::fs::File;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};

use std::os::unix::fs::OpenOptionsExt;

use nix::fcntl::{Flock, FlockArg, OFlag};

use crate::error::{Error, PathContext, Result};
use crate::fsx::{self, Stat};
use crate::index::Index;
use crate::policy::DEFAULT_POLICY_TOML;

/// The default host root.
pub const DEFAULT_ROOT: &str = "/var/lib/cowherd";

/// Directories every root has, relative to it.
const LAYOUT: [&str; 5] = ["store", "store/objects", "store/tmp", "templates", "guests"];

/// Whether a command only reads the root or may change it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    /// Reads only; takes no lock.
    Read,
    /// Changes guests or the store; holds the exclusive lock and first repairs what an
    /// interrupted run left behind.
    Write,
}

/// An opened host root.
pub struct HostRoot {
    path: PathBuf,
    dev: u64,
    root_fd: OwnedFd,
    objects_fd: OwnedFd,
    tmp_fd: OwnedFd,
    guests_fd: OwnedFd,
    link_max: u64,
    _lock: Option<Flock<File>>,
    pub(crate) index: Index,
}

impl std::fmt::Debug for HostRoot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HostRoot")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

impl HostRoot {
    /// Creates the layout at `path` (idempotent), reachable by root only; returns its
    /// canonical path.
    ///
    /// # Errors
    /// I/O errors creating the directories, [`Error::Symlink`] if a part of the layout is a
    /// symlink, [`Error::Index`] if the database cannot be created.
    pub(crate) fn create_layout(path: &Path) -> Result<PathBuf> {
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            fsx::ensure_dir(parent, 0o755)?;
        }
        fsx::ensure_dir(path, 0o700)?;
        let path = std::fs::canonicalize(path).at(path)?;
        for dir in LAYOUT {
            let p = path.join(dir);
            match std::fs::symlink_metadata(&p) {
                Ok(m) if m.file_type().is_symlink() => return Err(Error::Symlink { path: p }),
                Ok(_) => {}
                Err(_) => fsx::ensure_dir(&p, 0o700)?,
            }
        }
        let policy = path.join("policy.toml");
        if std::fs::symlink_metadata(&policy).is_err() {
            fsx::write_atomic(&policy, DEFAULT_POLICY_TOML.as_bytes())?;
        }
        let db = path.join("index.db");
        if std::fs::symlink_metadata(&db).is_err() && store_has_objects(&path) {
            return Err(Error::IndexMissing { path });
        }
        create_index_file(&db)?;
        Index::open(&db)?;
        Ok(path)
    }

    /// Opens the layout at `path` for writing with a new, empty index (`index rebuild`): the
    /// layout must exist, `index.db` must not.
    ///
    /// # Errors
    /// [`Error::NotARoot`] without a layout; as [`HostRoot::open`].
    pub(crate) fn open_new_index(path: &Path) -> Result<HostRoot> {
        if LAYOUT
            .iter()
            .any(|dir| !std::fs::symlink_metadata(path.join(dir)).is_ok_and(|m| m.is_dir()))
        {
            return Err(Error::NotARoot {
                path: path.to_path_buf(),
            });
        }
        create_index_file(&path.join("index.db"))?;
        HostRoot::open(path, Access::Write)
    }

    /// Opens an initialised root's layout, lock (for [`Access::Write`]) and index, without
    /// repairing anything (see `HostRoot::open`).
    ///
    /// # Errors
    /// [`Error::NotARoot`] if `path` has no index, [`Error::Io`] (`EACCES`, saying that the
    /// root is root's only) for another user, [`Error::CrossFilesystem`] or
    /// [`Error::Symlink`] if the layout is broken, [`Error::Locked`] if another writer is
    /// running (for [`Access::Write`]).
    pub(crate) fn open_layout(path: &Path, access: Access) -> Result<HostRoot> {
        match std::fs::symlink_metadata(path.join("index.db")) {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(if store_has_objects(path) {
                    Error::IndexMissing {
                        path: path.to_path_buf(),
                    }
                } else {
                    Error::NotARoot {
                        path: path.to_path_buf(),
                    }
                });
            }
            // Not "no index": the root is there, and closed to this user.
            Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
                return Err(root_only(path));
            }
            Err(e) => return Err(e).at(path.join("index.db")),
        }
        let path = std::fs::canonicalize(path).at(path)?;
        let root_fd = fsx::open_dir(&path)?;
        let dev = fsx::fstat(&root_fd).at(&path)?.dev;
        let sub = |rel: &str| fsx::open_dir_beneath(root_fd.as_fd(), &path, rel.as_bytes());
        for dir in LAYOUT {
            let fd = sub(dir)?;
            if fsx::fstat(&fd).at(path.join(dir))?.dev != dev {
                return Err(Error::CrossFilesystem {
                    path: path.join(dir),
                    other: path.clone(),
                });
            }
        }
        let objects_fd = sub("store/objects")?;
        let tmp_fd = sub("store/tmp")?;
        let guests_fd = sub("guests")?;
        let link_max = nix::unistd::fpathconf(&objects_fd, nix::unistd::PathconfVar::LINK_MAX)
            .ok()
            .flatten()
            .map_or(65_000, |v| v as u64);
        let lock = match access {
            Access::Read => None,
            Access::Write => Some(take_lock(&path.join("lock"))?),
        };
        let index = Index::open(&path.join("index.db"))?;
        Ok(HostRoot {
            path,
            dev,
            root_fd,
            objects_fd,
            tmp_fd,
            guests_fd,
            link_max,
            _lock: lock,
            index,
        })
    }

    /// Makes the root reachable by root only: the root and the top directories of the layout
    /// 0700, the index (with its WAL files) and the lock 0600. A guest's setuid-root file is
    /// setuid-root on the host too, so no other user may reach a guest tree or the store.
    ///
    /// # Errors
    /// [`Error::Io`] naming the path that could not be changed.
    pub(crate) fn restrict_access(&self) -> Result<()> {
        use nix::sys::stat::{Mode, fchmod};
        let restrict = |fd: BorrowedFd<'_>, shown: &Path, mode: u32| -> Result<()> {
            if fsx::fstat(fd).at(shown)?.mode & 0o7777 != mode {
                fchmod(fd, Mode::from_bits_truncate(mode)).at(shown)?;
            }
            Ok(())
        };
        restrict(self.root_fd.as_fd(), &self.path, 0o700)?;
        for dir in ["store", "guests", "templates"] {
            let fd = fsx::open_dir_beneath(self.root_fd.as_fd(), &self.path, dir.as_bytes())?;
            restrict(fd.as_fd(), &self.path.join(dir), 0o700)?;
        }
        for file in ["index.db", "index.db-wal", "index.db-shm", "lock"] {
            let flags = OFlag::O_RDONLY | OFlag::O_NONBLOCK;
            match fsx::open_beneath(self.root_fd.as_fd(), file.as_bytes(), flags) {
                Ok(fd) => restrict(fd.as_fd(), &self.path.join(file), 0o600)?,
                Err(nix::errno::Errno::ENOENT) => {}
                Err(e) => return Err(e).at(self.path.join(file)),
            }
        }
        Ok(())
    }

    /// Opens the directory `rel` below the root (no symlink followed, no mount crossed).
    ///
    /// # Errors
    /// As `fsx::open_dir_beneath`.
    pub(crate) fn open_dir_below(&self, rel: &Path) -> Result<OwnedFd> {
        use std::os::unix::ffi::OsStrExt;
        fsx::open_dir_beneath(self.root_fd.as_fd(), &self.path, rel.as_os_str().as_bytes())
    }

    /// How the root was opened: [`Access::Write`] holds its lock until the root is dropped.
    pub fn access(&self) -> Access {
        if self._lock.is_some() {
            Access::Write
        } else {
            Access::Read
        }
    }

    /// The root's canonical path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The directory holding the guests.
    pub fn guests_dir(&self) -> PathBuf {
        self.path.join("guests")
    }

    /// The store's object directory.
    pub fn objects_dir(&self) -> PathBuf {
        self.path.join("store/objects")
    }

    /// The store's scratch directory.
    pub(crate) fn tmp_dir(&self) -> PathBuf {
        self.path.join("store/tmp")
    }

    /// The default policy file.
    pub fn policy_path(&self) -> PathBuf {
        self.path.join("policy.toml")
    }

    /// The filesystem every part of the root is on.
    pub(crate) fn dev(&self) -> u64 {
        self.dev
    }

    /// The filesystem's limit of links per inode.
    pub(crate) fn link_max(&self) -> u64 {
        self.link_max
    }

    pub(crate) fn objects_fd(&self) -> BorrowedFd<'_> {
        self.objects_fd.as_fd()
    }

    pub(crate) fn tmp_fd(&self) -> BorrowedFd<'_> {
        self.tmp_fd.as_fd()
    }

    pub(crate) fn guests_fd(&self) -> BorrowedFd<'_> {
        self.guests_fd.as_fd()
    }

    /// Checks that `stat` (of something at `path`) is on the root's filesystem.
    pub(crate) fn check_same_fs(&self, stat: &Stat, path: &Path) -> Result<()> {
        if stat.dev == self.dev {
            Ok(())
        } else {
            Err(Error::CrossFilesystem {
                path: path.to_path_buf(),
                other: self.objects_dir(),
            })
        }
    }
}

/// The error of a user other than root reaching for a root: it is reachable by root only
/// ([`HostRoot::restrict_access`]), so `EACCES` says who may use it, not that it is missing.
fn root_only(path: &Path) -> Error {
    Error::Io {
        path: path.to_path_buf(),
        error: std::io::Error::new(
            std::io::ErrorKind::PermissionDenied,
            "permission denied: a cowherd root is reachable by root only (its guests' \
             setuid-root files would be setuid-root for every host user); run cowherd as root",
        ),
    }
}

/// Whether `store/objects` below `root` holds anything (then its index must be rebuilt, not
/// started empty: an empty index would not know the guests' links are store links).
fn store_has_objects(root: &Path) -> bool {
    std::fs::read_dir(root.join("store/objects")).is_ok_and(|mut fans| fans.next().is_some())
}

/// Creates `index.db` (if missing) readable by root only, never through a symlink. SQLite
/// gives its -wal and -shm files the mode of the database file.
fn create_index_file(db: &Path) -> Result<()> {
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(db)
        .at(db)?;
    Ok(())
}

fn take_lock(path: &Path) -> Result<Flock<File>> {
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .open(path)
        .at(path)?;
    Flock::lock(file, FlockArg::LockExclusiveNonblock).map_err(|(_, errno)| {
        if errno == nix::errno::Errno::EWOULDBLOCK {
            Error::Locked {
                path: path.to_path_buf(),
            }
        } else {
            Error::Io {
                path: path.to_path_buf(),
                error: errno.into(),
            }
        }
    })
}
