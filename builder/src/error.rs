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
    /// A hostname the kernel, or a resolver, would refuse.
    #[error(
        "invalid hostname {hostname:?}: use letters, digits and `-` in dot-separated labels of 1 to 63 characters"
    )]
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
    /// A program the builder runs is not installed on the host.
    #[error("`{program}` is not installed on this host: install the {package} package")]
    MissingProgram {
        /// The program (`unshare`, `mmdebstrap`, `rsync`, …).
        program: &'static str,
        /// The Debian package that has it.
        package: &'static str,
    },
    /// A file of the template cache is not what cowherd wrote.
    #[error("{path}: {message} (remove that version with `cowherd template remove`)")]
    BadCache {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        message: String,
    },
    /// A step of a template build failed.
    #[error("building template {template}: {step} failed: {message}")]
    Step {
        /// The template.
        template: String,
        /// The step or tool.
        step: String,
        /// How it failed.
        message: String,
    },
    /// A template that has no built version.
    #[error("template {template} is not built: run `cowherd template build {template}`")]
    NotBuilt {
        /// The template (`name` or `name@version`).
        template: String,
    },
    /// A built template that guests were built from.
    #[error(
        "template {template} is in use by guests {guests}: destroy them first, or keep it (`template rebuild` makes a new version beside it)"
    )]
    TemplateInUse {
        /// `name@version`.
        template: String,
        /// The guests, comma-separated.
        guests: String,
    },
    /// The download cache of a fleet upgrade could not start.
    #[error("download cache at {at}: {message}")]
    DownloadCache {
        /// Its directory, or the address it was to listen on.
        at: String,
        /// What is wrong.
        message: String,
    },
    /// A template definition is wrong or unknown.
    #[error(transparent)]
    Template(#[from] crate::template::TemplateError),
    /// An error of the store, the index or a guest's layout.
    #[error(transparent)]
    Unify(#[from] cowherd_unify::Error),
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
