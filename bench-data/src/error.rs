//! The error type of the generator; every variant names the path it failed on.

use std::io;
use std::path::PathBuf;

/// Why [`generate_synthetic`](crate::generate_synthetic) or
/// [`generate_real`](crate::generate_real) failed.
///
/// Every variant carries the host path involved; the generator stops at the first error and
/// leaves what it wrote so far in place.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum GenError {
    /// A guest directory already exists; the generator never writes into an existing tree.
    #[error("{}: guest directory already exists", path.display())]
    Exists {
        /// The guest directory (`out/<name>`).
        path: PathBuf,
    },
    /// Creating a directory failed.
    #[error("{}: cannot create directory: {source}", path.display())]
    CreateDir {
        /// The directory being created.
        path: PathBuf,
        /// The underlying error.
        source: io::Error,
    },
    /// Creating or writing a regular file failed.
    #[error("{}: cannot write file: {source}", path.display())]
    WriteFile {
        /// The file being written.
        path: PathBuf,
        /// The underlying error.
        source: io::Error,
    },
    /// Creating a symbolic link failed.
    #[error("{}: cannot create symlink: {source}", path.display())]
    Symlink {
        /// The link being created.
        path: PathBuf,
        /// The underlying error.
        source: io::Error,
    },
    /// Creating a hard link failed.
    #[error("{}: cannot create hard link to {}: {source}", path.display(), target.display())]
    Hardlink {
        /// The new name being created.
        path: PathBuf,
        /// The existing file it should share an inode with.
        target: PathBuf,
        /// The underlying error.
        source: io::Error,
    },
    /// Setting the owner, mode or timestamps failed (changing owners needs root).
    #[error("{}: cannot set {what}: {source}", path.display())]
    Metadata {
        /// The path whose metadata was being set.
        path: PathBuf,
        /// Which metadata: `"owner"`, `"mode"`, `"xattrs"` or `"timestamps"`.
        what: &'static str,
        /// The underlying error.
        source: io::Error,
    },
    /// An external command (`tar`) could not be run or failed.
    #[error("{what}: {detail}")]
    Command {
        /// The command and what it was for.
        what: String,
        /// The exit status or the error starting it, and where its log is.
        detail: String,
    },
    /// The builder could not build a template's tree (or set up, or tidy, the cowherd root
    /// it builds in).
    #[error(
        "{}: template {template}: {source} (log: {})",
        root.display(),
        log.display()
    )]
    Builder {
        /// The cowherd root the tree is built in (`<cache>/root`).
        root: PathBuf,
        /// The builder template (`bench-<suite>-<role>`).
        template: String,
        /// The build's log (`<cache>/<suite>-<role>.log`).
        log: PathBuf,
        /// The builder's error (boxed: it is large).
        source: Box<cowherd_builder::Error>,
    },
    /// Reading or removing an unpacked template tree failed.
    #[error("{}: cannot read template: {source}", path.display())]
    ReadTemplate {
        /// The path being read.
        path: PathBuf,
        /// The underlying error.
        source: io::Error,
    },
}
