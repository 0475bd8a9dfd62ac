//! The library's error type: every variant names the path it concerns.

use std::path::PathBuf;

use crate::policy::PolicyError;

/// Everything that can go wrong in the unify library.
///
/// Each variant carries the path it concerns, and its message says what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An I/O or system-call failure on a path.
    #[error("{path}: {error}")]
    Io {
        /// The path the call was about.
        path: PathBuf,
        /// The underlying error (shown in the message, so not chained as a source).
        error: std::io::Error,
    },
    /// The host root does not exist or was never initialised.
    #[error("{path} is not a cowherd root (no index.db): run `cowherd --root {path} init` first")]
    NotARoot {
        /// The root asked for.
        path: PathBuf,
    },
    /// The root's layout and store are there, its index is not.
    #[error(
        "{path} has a store but no index.db: run `cowherd --root {path} index rebuild` \
         (it re-hashes the store and rescans the guests; no guest file changes)"
    )]
    IndexMissing {
        /// The root.
        path: PathBuf,
    },
    /// Two parts of the layout are on different filesystems.
    #[error(
        "{path} is on a different filesystem than {other}; hardlinks cannot cross filesystems \
         (move it onto the filesystem of {other})"
    )]
    CrossFilesystem {
        /// The offending path.
        path: PathBuf,
        /// The path it must share a filesystem with.
        other: PathBuf,
    },
    /// A path that must be a real directory is a symlink (or resolves through one).
    #[error("{path} is a symlink or passes through one; refusing to follow it (use the real path)")]
    Symlink {
        /// The offending path.
        path: PathBuf,
    },
    /// Another cowherd process holds the root's lock.
    #[error("another cowherd process is working on {path} (lock held); wait for it to finish")]
    Locked {
        /// The lock file.
        path: PathBuf,
    },
    /// A guest name is not acceptable.
    #[error(
        "invalid guest name {name:?}: use 1-64 characters of a-z A-Z 0-9 . _ - not starting with . or -"
    )]
    BadGuestName {
        /// The rejected name.
        name: String,
    },
    /// The guest asked for does not exist.
    #[error("no guest named {name:?} in {path} (see `cowherd list`)")]
    NoSuchGuest {
        /// The name asked for.
        name: String,
        /// The guests directory.
        path: PathBuf,
    },
    /// A guest with this name exists already.
    #[error("a guest named {name:?} exists already at {path}")]
    GuestExists {
        /// The name asked for.
        name: String,
        /// Its directory.
        path: PathBuf,
    },
    /// A guest is mounted, so its layers must not change.
    #[error(
        "guest {name} is mounted at {path}; unmount it first (`cowherd umount {name}`), or fold and unify it at its next restart (`cowherd mount --fold {name}`)"
    )]
    Mounted {
        /// The guest.
        name: String,
        /// The mount found.
        path: PathBuf,
    },
    /// Another filesystem is mounted inside a guest's directory (in its base, say): cowherd
    /// never crosses a mount, and the guest's layers must not change under it.
    #[error(
        "a {fstype} filesystem is mounted at {path}, inside guest {name}'s directory: unmount it \
         (`umount {path}`) first; cowherd never crosses a mount"
    )]
    MountInside {
        /// The guest.
        name: String,
        /// The mount point.
        path: PathBuf,
        /// Its filesystem type.
        fstype: String,
    },
    /// Processes (or mounts) keep a guest's overlay in use.
    #[error("guest {name} is in use by {by}; stop those first")]
    InUse {
        /// The guest.
        name: String,
        /// What uses it: `pid 12 (nginx: open file), pid 40 (sh: cwd)`.
        by: String,
    },
    /// A guest's mount point holds a mount cowherd did not make with its own options.
    #[error(
        "guest {name}: {path} is mounted, but not as cowherd mounts it ({why}); it is not trusted: unmount it (`cowherd umount {name}`) and run `cowherd mount {name}`"
    )]
    ForeignMount {
        /// The guest.
        name: String,
        /// The mount point.
        path: PathBuf,
        /// What differs.
        why: String,
    },
    /// The guest must be mounted for this.
    #[error("guest {name} is not mounted; mount it first (`cowherd mount {name}`)")]
    NotMounted {
        /// The guest.
        name: String,
    },
    /// A private overlay was asked for on a root opened for reading only: mounting a guest's
    /// layers needs the root's lock, so that no `mount`, `fold` or `unify` of the guest races it.
    #[error(
        "guest {name} is not mounted: running a command in it mounts its overlay privately, which \
         needs the root's lock (the root was opened for reading only); run the command again"
    )]
    NeedsLock {
        /// The guest.
        name: String,
    },
    /// A path overlayfs cannot take as a layer or mount point.
    #[error("{path}: {why}")]
    BadMountPath {
        /// The path.
        path: PathBuf,
        /// Why, and what to do.
        why: String,
    },
    /// A record or policy file could not be read.
    #[error("{path}: {message}")]
    BadRecord {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        message: String,
    },
    /// A marker policy is invalid.
    #[error(transparent)]
    Policy(#[from] PolicyError),
    /// The index database failed (a damaged file: the message names `index rebuild`).
    #[error("index {path}: {error}{}", crate::index::damage_hint(.path, .error))]
    Index {
        /// The database file.
        path: PathBuf,
        /// The SQLite error.
        error: rusqlite::Error,
    },
    /// Something that must be a directory is not.
    #[error("{path} is not a directory")]
    NotADirectory {
        /// The offending path.
        path: PathBuf,
    },
    /// A tree holding overlayfs's own metadata, which a guest's overlay would obey instead of
    /// showing (DESIGN-NOTES fact 15).
    #[error(
        "{path} holds {count} entries that overlayfs would take for its own metadata \
         (whiteouts: 0/0 character devices; trusted.overlay.* xattrs), e.g. {first}: a guest \
         would not see them as they are; remove them (image layers belong unpacked) and try again"
    )]
    OverlayMetadata {
        /// The tree.
        path: PathBuf,
        /// How many entries.
        count: usize,
        /// The first few, guest-absolute.
        first: String,
    },
    /// A snapshot name is not acceptable.
    #[error(
        "invalid snapshot name {name:?}: use 1-64 characters of a-z A-Z 0-9 . _ - not starting \
         with . or -"
    )]
    BadSnapshotName {
        /// The rejected name.
        name: String,
    },
    /// A snapshot of this name exists already.
    #[error(
        "guest {guest} has a snapshot named {name:?} already ({path}): choose another --name, \
         or remove it first (`cowherd snapshot remove {guest} {name}`)"
    )]
    SnapshotExists {
        /// The guest.
        guest: String,
        /// The name asked for.
        name: String,
        /// Its directory.
        path: PathBuf,
    },
    /// The snapshot asked for does not exist.
    #[error(
        "guest {guest} has no snapshot named {name:?} in {path} (see `cowherd snapshot list {guest}`)"
    )]
    NoSuchSnapshot {
        /// The guest.
        guest: String,
        /// The name asked for.
        name: String,
        /// The guest's snapshots directory.
        path: PathBuf,
    },
    /// A rollback without a snapshot to go back to.
    #[error(
        "guest {guest} has no snapshot to roll back to ({path} holds none): make one with \
         `cowherd snapshot {guest}`"
    )]
    NoSnapshots {
        /// The guest.
        guest: String,
        /// The guest's snapshots directory.
        path: PathBuf,
    },
    /// A guest's upper layer could not be folded whole, so base is not what the guest sees.
    #[error(
        "guest {name}: its upper layer could not be folded into base ({why}), so no snapshot \
         or rollback can take its whole tree; fix that entry and run `cowherd fold {name}`"
    )]
    NotFolded {
        /// The guest.
        name: String,
        /// The first entry that stayed, and why.
        why: String,
    },
}

/// The library's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Attaches a path to `std::io` and `nix` errors.
pub(crate) trait PathContext<T> {
    /// Turns the error into [`Error::Io`] naming `path`.
    fn at(self, path: impl Into<PathBuf>) -> Result<T>;
}

impl<T> PathContext<T> for std::io::Result<T> {
    fn at(self, path: impl Into<PathBuf>) -> Result<T> {
        self.map_err(|error| Error::Io {
            path: path.into(),
            error,
        })
    }
}

impl<T> PathContext<T> for nix::Result<T> {
    fn at(self, path: impl Into<PathBuf>) -> Result<T> {
        self.map_err(|e| Error::Io {
            path: path.into(),
            error: std::io::Error::from(e),
        })
    }
}

impl Error {
    /// The `errno` behind this error, if it came from a system call.
    pub fn errno(&self) -> Option<i32> {
        match self {
            Error::Io { error, .. } => error.raw_os_error(),
            _ => None,
        }
    }
}
