//! The builder's error type: each variant carries the path it concerns, if any, and its message
//! says what to do.

use std::path::PathBuf;

/// Everything that can go wrong while building guests or running commands inside them.
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
    /// No command was given to run.
    #[error("no command to run: give the program and its arguments after `--`")]
    EmptyCommand,
    /// A hostname the kernel would refuse.
    #[error("invalid hostname {hostname:?}: use 1 to 64 bytes")]
    BadHostname {
        /// The rejected hostname.
        hostname: String,
    },
    /// The guest's root directory does not exist or is not a directory.
    #[error("{path} is not a directory: give the guest's root tree (is the guest mounted?)")]
    NotADirectory {
        /// The root asked for.
        path: PathBuf,
    },
    /// The guest's tree has no `/proc` directory to mount proc on.
    #[error(
        "{path} is missing or not a directory: a guest tree needs an empty one (create it with `mkdir {path}`)"
    )]
    NoProc {
        /// The `proc` directory expected inside the guest's tree.
        path: PathBuf,
    },
    /// A util-linux program needed to start a command is not installed on the host.
    #[error("the `{program}` program is not in {searched}: install the util-linux package")]
    MissingProgram {
        /// The program (`unshare`, `setpriv`).
        program: &'static str,
        /// The directories searched, as a `PATH` value.
        searched: &'static str,
    },
    /// Setting up the command's namespaces failed.
    #[error("{path}: cannot {step}: {error} (running a command in a guest needs root)")]
    Namespace {
        /// The guest's root directory, or the mount being detached.
        path: PathBuf,
        /// What was being done.
        step: &'static str,
        /// The underlying error.
        error: std::io::Error,
    },
}
