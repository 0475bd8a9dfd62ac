//! Importing an existing machine as a guest ("physical-to-guest"): its tree is copied with
//! rsync (over ssh, from an rsync daemon, or from a local directory) or unpacked from a tarball
//! into a new guest's staging directory, given the fixups a guest needs (no host disks in
//! `/etc/fstab`, no hardware services, guest-style networking), and only then becomes a guest.
//! A second pass ([`ImportOptions::resync`]) brings an imported guest up to date with its
//! source, moving only what changed.
//!
//! The copied tree is hostile input: every fixup is done fd-relative, with `openat2(2)`
//! `RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_XDEV`, so a symlink or a mount planted in
//! it is never followed or crossed.

use std::collections::BTreeSet;
use std::ffi::{OsStr, OsString};
use std::fmt;
use std::io::Write as _;
use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Component, Path, PathBuf};
use std::process::{Output, Stdio};
use std::str::FromStr;

use crate::programs::{Leash, STANDARD_PATH, find_program};
use cowherd_unify::{
    DISCARDED_DIR, GuestChange, HostRoot, LINKDEST_DIR, MANIFEST_FILE, NewGuest, Origin,
    OriginKind, TreeManifest, changed_by_both, discard_guest_changes, ensure_offline,
    guest_changes, guest_record, keep_guest_changes, load_manifest, parse_mountinfo,
    remove_below_root, validate_guest_name,
};
use nix::errno::Errno;
use nix::fcntl::{AtFlags, OFlag, OpenHow, RenameFlags, ResolveFlag};
use nix::sys::stat::{FileStat, Mode, SFlag};
use serde::Serialize;

/// What rsync leaves out of every import: the contents of the pseudo and volatile
/// filesystems (the directories themselves are kept, empty, with their metadata: a guest needs
/// an empty `/proc`), and the usual swap files. Patterns are anchored at the source's root.
pub const EXCLUDED: [&str; 10] = [
    "/proc/*",
    "/sys/*",
    "/dev/*",
    "/run/*",
    "/tmp/*",
    "/mnt/*",
    "/media/*",
    "/lost+found/*",
    "/swapfile",
    "/swap.img",
];

/// Source directories whose contents are never copied ([`EXCLUDED`]); a mount below them is
/// not reported as left out.
const VOLATILE_DIRS: [&str; 8] = [
    "/proc",
    "/sys",
    "/dev",
    "/run",
    "/tmp",
    "/mnt",
    "/media",
    "/lost+found",
];

/// Kernel and runtime filesystems that `--include-mount` may not name.
const PSEUDO_DIRS: [&str; 4] = ["/proc", "/sys", "/dev", "/run"];

/// rsync's exit code for "some files vanished before they could be transferred": normal on a
/// running machine, not an error.
const RSYNC_VANISHED: i32 = 24;

/// rsync's I/O timeout: a source that sends nothing for this long (a dead host, a hung
/// network) fails the import instead of hanging it.
const IO_TIMEOUT_SECS: u32 = 600;

/// Suffix of the machine's originals that a fixup replaced or disabled.
pub const ORIG_SUFFIX: &str = ".cowherd-orig";

/// The `/etc/fstab` an imported guest gets.
pub const NEUTRAL_FSTAB: &str = "\
# /etc/fstab of a cowherd guest, written by `cowherd import`.
# A guest mounts none of the machine's disks: its runtime provides /, /proc, /sys, /dev and
# /run. The machine's own fstab is kept as /etc/fstab.cowherd-orig.
";

/// The `/etc/network/interfaces` (ifupdown) an imported guest gets when the machine's
/// configured physical interfaces.
pub const GUEST_INTERFACES: &str = "\
# /etc/network/interfaces of a cowherd guest, written by `cowherd import`.
# A guest has one virtual interface, eth0, which takes its address by DHCP. The machine's
# own configuration is kept as /etc/network/interfaces.cowherd-orig.

auto lo
iface lo inet loopback

auto eth0
iface eth0 inet dhcp
";

/// The systemd units of hardware a guest does not have, masked in an imported guest
/// (`/etc/systemd/system/UNIT -> /dev/null`, as `systemctl mask` does) when the unit, or its
/// template, is installed.
pub const MASKED_UNITS: [&str; 11] = [
    "hwclock.service",
    "hwclock-save.service",
    "smartd.service",
    "smartmontools.service",
    "getty@tty1.service",
    "getty@tty2.service",
    "getty@tty3.service",
    "getty@tty4.service",
    "getty@tty5.service",
    "getty@tty6.service",
    "serial-getty@ttyS0.service",
];

/// Where systemd's unit files are, relative to the tree's root.
const UNIT_DIRS: [&str; 3] = [
    "etc/systemd/system",
    "usr/lib/systemd/system",
    "lib/systemd/system",
];

/// Where an imported guest's own `resync` builds its new tree, in the guest's directory
/// (`guests/NAME/resync`); after the swap it holds the old base until that is removed.
const RESYNC_DIR: &str = "resync";

/// Where a machine comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Source {
    /// `[user@]host:/path`: rsync over a remote shell (ssh, or [`ImportOptions::rsh`]).
    Ssh {
        /// The remote user (the remote shell's default if `None`).
        user: Option<String>,
        /// The host name or address (an IPv6 address without brackets).
        host: String,
        /// The absolute path of the machine's root on the host (`/` for a whole machine).
        path: PathBuf,
    },
    /// `rsync://host[:port]/module[/path]` (or `host::module[/path]`): an rsync daemon.
    Daemon {
        /// The URL, `rsync://…`, without trailing slashes.
        url: String,
    },
    /// A local directory: a machine's root mounted here, or a tree on this host.
    Local(PathBuf),
    /// A tarball of a root filesystem (`.tar`, `.tar.gz`/`.tgz`, `.tar.xz`/`.txz`,
    /// `.tar.zst`/`.tzst`, `.tar.bz2`/`.tbz2`, …), unpacked with GNU tar.
    Tarball(PathBuf),
}

/// Name endings that make a local path a [`Source::Tarball`].
const TARBALL_ENDINGS: [&str; 17] = [
    ".tar",
    ".tar.gz",
    ".tgz",
    ".tar.xz",
    ".txz",
    ".tar.zst",
    ".tar.zstd",
    ".tzst",
    ".tar.bz2",
    ".tbz",
    ".tbz2",
    ".tar.lz",
    ".tar.lzma",
    ".tlz",
    ".tar.lzo",
    ".tar.Z",
    ".taz",
];

impl Source {
    /// Whether rsync copies it (everything but a tarball).
    fn is_rsync(&self) -> bool {
        !matches!(self, Source::Tarball(_))
    }

    /// The rsync argument naming the directory `rel` of the source (its root for an empty
    /// `rel`), with the trailing slash that makes rsync copy its contents.
    fn rsync_arg(&self, rel: &Path) -> OsString {
        let join = |base: &[u8]| {
            let mut arg = base.to_vec();
            if !rel.as_os_str().is_empty() {
                if arg.last() != Some(&b'/') {
                    arg.push(b'/');
                }
                arg.extend_from_slice(rel.as_os_str().as_bytes());
            }
            if arg.last() != Some(&b'/') {
                arg.push(b'/');
            }
            OsString::from(OsStr::from_bytes(&arg))
        };
        match self {
            Source::Ssh { .. } => join(self.to_string().as_bytes()),
            Source::Daemon { url } => join(url.as_bytes()),
            Source::Local(path) | Source::Tarball(path) => join(path.as_os_str().as_bytes()),
        }
    }

    /// The same source with a local path made absolute and canonical, as it is recorded.
    fn resolved(&self) -> Result<Source, ImportError> {
        let canonical = |path: &Path| {
            std::fs::canonicalize(path).map_err(|error| ImportError::SourceMissing {
                path: path.to_path_buf(),
                error,
            })
        };
        Ok(match self {
            Source::Local(path) => Source::Local(canonical(path)?),
            Source::Tarball(path) => Source::Tarball(canonical(path)?),
            other => other.clone(),
        })
    }
}

impl fmt::Display for Source {
    /// The source as [`FromStr`] reads it back (a relative local path holding a `:` gets a
    /// leading `./`, as rsync wants it).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Source::Ssh { user, host, path } => {
                if let Some(user) = user {
                    write!(f, "{user}@")?;
                }
                if host.contains(':') {
                    write!(f, "[{host}]")?;
                } else {
                    write!(f, "{host}")?;
                }
                write!(f, ":{}", path.display())
            }
            Source::Daemon { url } => write!(f, "{url}"),
            Source::Local(path) | Source::Tarball(path) => {
                let shown = path.display().to_string();
                if !shown.starts_with(['/', '.']) && looks_remote(&shown) {
                    write!(f, "./{shown}")
                } else {
                    write!(f, "{shown}")
                }
            }
        }
    }
}

/// rsync's rule: a `:` before the first `/` makes an argument remote.
fn looks_remote(spec: &str) -> bool {
    let colon = spec.find(':');
    let slash = spec.find('/');
    match (colon, slash) {
        (Some(c), Some(s)) => c < s,
        (Some(_), None) => true,
        _ => false,
    }
}

impl FromStr for Source {
    type Err = ImportError;

    /// Reads `[user@]host:/path` (ssh), `rsync://host[:port]/module[/path]` or
    /// `host::module[/path]` (an rsync daemon), a local directory, or a local tarball (by its
    /// name's ending, see [`Source::Tarball`]). As for rsync, a `:` before the first `/` makes
    /// a source remote: write `./a:b` for a local `a:b`.
    ///
    /// # Errors
    /// [`ImportError::BadSource`] saying what is wrong.
    fn from_str(spec: &str) -> Result<Source, ImportError> {
        let bad = |why: &str| ImportError::BadSource {
            spec: spec.to_string(),
            why: why.to_string(),
        };
        if spec.is_empty() {
            return Err(bad("it is empty"));
        }
        if spec.chars().any(char::is_control) {
            return Err(bad("it holds a control character"));
        }
        if let Some(rest) = spec.strip_prefix("rsync://") {
            return parse_daemon(rest).map_err(bad);
        }
        if spec.starts_with(['/', '.']) || !looks_remote(spec) {
            // `./a:b` is how a local `a:b` is written.
            let local = match spec.strip_prefix("./") {
                Some(rest) if !rest.is_empty() && looks_remote(rest) => rest,
                _ => spec,
            };
            let path = PathBuf::from(local);
            return Ok(if is_tarball_name(spec) {
                Source::Tarball(path)
            } else {
                Source::Local(path)
            });
        }
        let (user, rest) = match spec.split_once('@') {
            Some((user, rest)) if !user.contains(':') => (Some(user), rest),
            _ => (None, spec),
        };
        if let Some(user) = user
            && (user.is_empty()
                || user.starts_with('-')
                || user.contains(['/', '[', ']'])
                || user.contains(char::is_whitespace))
        {
            return Err(bad(
                "the user name before `@` is empty, starts with `-` or holds `/`, brackets or a space",
            ));
        }
        let (host, path) = if let Some(bracketed) = rest.strip_prefix('[') {
            let (host, after) = bracketed
                .split_once(']')
                .ok_or_else(|| bad("an IPv6 address opened with `[` is not closed with `]`"))?;
            let path = after
                .strip_prefix(':')
                .ok_or_else(|| bad("`[address]` must be followed by `:/path`"))?;
            if host.is_empty()
                || !host
                    .bytes()
                    .all(|b| b.is_ascii_hexdigit() || b":.%".contains(&b))
            {
                return Err(bad("not an IPv6 address between `[` and `]`"));
            }
            (host, path)
        } else {
            rest.split_once(':')
                .ok_or_else(|| bad("no `:` after the host"))?
        };
        if let Some(daemon_path) = path.strip_prefix(':') {
            if user.is_some() {
                return Err(bad(
                    "give the daemon's user with RSYNC_USERNAME, not as user@",
                ));
            }
            let host = if host.contains(':') {
                format!("[{host}]")
            } else {
                host.to_string()
            };
            return parse_daemon(&format!("{host}/{daemon_path}")).map_err(bad);
        }
        if !host.contains(':') {
            // Else an IPv6 address, checked between its brackets.
            check_host(host).map_err(bad)?;
        }
        if !path.starts_with('/') {
            return Err(bad(
                "give the absolute path of the machine's root on the host, as in host:/",
            ));
        }
        Ok(Source::Ssh {
            user: user.map(str::to_string),
            host: host.to_string(),
            path: PathBuf::from(path),
        })
    }
}

/// Whether a local path names a tarball, by its ending.
fn is_tarball_name(path: &str) -> bool {
    TARBALL_ENDINGS
        .iter()
        .any(|ending| path.len() > ending.len() && path.ends_with(ending))
}

/// A host name or IPv4 address: no whitespace, `/`, `@`, `:` or brackets.
fn check_host(host: &str) -> Result<(), &'static str> {
    if host.is_empty() {
        return Err("the host is empty");
    }
    if host.starts_with('-') {
        return Err("the host starts with `-`");
    }
    if host
        .chars()
        .any(|c| c.is_whitespace() || "/@:[]".contains(c))
    {
        return Err("the host holds a space, `/`, `@`, `:` or a bracket");
    }
    Ok(())
}

/// Reads the part of a daemon URL after `rsync://`: `host[:port]/module[/path]`.
fn parse_daemon(rest: &str) -> Result<Source, &'static str> {
    let (authority, path) = rest
        .split_once('/')
        .ok_or("an rsync daemon source needs a module: rsync://host/module/")?;
    if let Some(bracketed) = authority.strip_prefix('[') {
        let (host, after) = bracketed
            .split_once(']')
            .ok_or("an IPv6 address opened with `[` is not closed with `]`")?;
        if host.is_empty()
            || !host
                .bytes()
                .all(|b| b.is_ascii_hexdigit() || b":.%".contains(&b))
        {
            return Err("not an IPv6 address between `[` and `]`");
        }
        check_port(after)?;
    } else {
        let (host, port) = match authority.split_once(':') {
            Some((host, port)) => (host, format!(":{port}")),
            None => (authority, String::new()),
        };
        check_port(&port)?;
        check_host(host)?;
    }
    let trimmed = path.trim_end_matches('/');
    let module = trimmed.split('/').next().unwrap_or_default();
    if module.is_empty() {
        return Err("an rsync daemon source needs a module: rsync://host/module/");
    }
    if trimmed.contains("//") {
        return Err("the path holds an empty component (`//`)");
    }
    Ok(Source::Daemon {
        url: format!("rsync://{authority}/{trimmed}"),
    })
}

/// `""` or `:PORT` with a port number of 1 to 65535.
fn check_port(port: &str) -> Result<(), &'static str> {
    match port.strip_prefix(':') {
        None if port.is_empty() => Ok(()),
        Some(digits)
            if digits.parse::<u16>().is_ok_and(|p| p > 0)
                && digits.bytes().all(|b| b.is_ascii_digit()) =>
        {
            Ok(())
        }
        _ => Err("the port must be a number from 1 to 65535"),
    }
}

/// How an import runs.
#[derive(Clone, Debug, Default)]
pub struct ImportOptions {
    /// Mount points of the source (absolute, as on the source: `/srv`, `/home`) whose
    /// filesystems are copied too; every other mounted filesystem below the source's root is
    /// left out (its mount point stays, as an empty directory).
    pub include_mounts: Vec<PathBuf>,
    /// The remote shell for an ssh source (rsync's `-e`, e.g. `ssh -p 2222 -i KEY`); `ssh`
    /// if `None`.
    pub rsh: Option<String>,
    /// Bring an existing imported guest up to date with its source instead of making a new
    /// one: only what changed is transferred (the final pass after stopping the machine's
    /// services), and the fixups are applied again.
    pub resync: bool,
    /// What a resync does with the paths the guest changed since its last import (folded into
    /// base or still in its upper layer).
    pub guest_changes: GuestChanges,
}

/// What a resync does with what the guest changed since its last import.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum GuestChanges {
    /// Refuse the resync, listing them ([`ImportError::GuestChanged`]).
    #[default]
    Refuse,
    /// Keep the guest's version of each changed path; the paths the machine changed too are
    /// listed in [`ImportReport::not_taken`].
    Keep,
    /// Take the machine's version; the guest's versions are kept in
    /// `guests/NAME/discarded/<time>/` ([`ImportReport::discarded_to`]).
    Discard,
}

/// What an import did.
#[derive(Clone, Debug, Default, Serialize)]
pub struct ImportReport {
    /// The guest.
    pub guest: String,
    /// Where it came from (as recorded in its `guest.toml`).
    pub source: String,
    /// Whether this was a resync of an existing guest.
    pub resync: bool,
    /// Entries of the source copied (files, directories, symlinks, special files), summed
    /// over the rsync passes; for a tarball, the entries unpacked.
    pub files: u64,
    /// Total size of the regular files (bytes).
    pub bytes: u64,
    /// Regular files whose data was transferred (rsync's "regular files transferred"); for a
    /// tarball, every regular file.
    pub transferred_files: u64,
    /// File data that had to be transferred (rsync's "literal data": what the source sent
    /// besides the blocks the destination had); for a tarball, its size.
    pub transferred_bytes: u64,
    /// Everything rsync sent and received, file list and checksums included.
    pub wire_bytes: u64,
    /// The fixups applied, one line each, naming the paths changed.
    pub fixups: Vec<String>,
    /// What every rsync pass left out (patterns anchored at the source's root).
    pub excluded: Vec<String>,
    /// Mounted filesystems of the source below its root that were left out (their mount
    /// points stay, empty); not known for an rsync daemon.
    pub excluded_mounts: Vec<String>,
    /// Mounted filesystems copied because [`ImportOptions::include_mounts`] named them.
    pub included_mounts: Vec<String>,
    /// The machine's hostname (from its `/etc/hostname`), recorded as the guest's.
    pub hostname: Option<String>,
    /// Things to check by hand: network configuration left alone, files that vanished during
    /// the copy, paths a fixup did not follow.
    pub warnings: Vec<String>,
    /// A resync: the paths the guest had changed since its last import (kept or discarded,
    /// as [`ImportOptions::guest_changes`] chose).
    pub guest_changes: Vec<GuestChange>,
    /// `--keep-guest-changes`: the paths the machine changed too, whose newer version was not
    /// taken.
    pub not_taken: Vec<PathBuf>,
    /// `--discard-guest-changes`: where the guest's versions were kept.
    pub discarded_to: Option<PathBuf>,
}

/// Everything that can go wrong importing a machine.
#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    /// An error of the guest store (a bad or taken guest name, a mounted guest, …).
    #[error(transparent)]
    Unify(#[from] cowherd_unify::Error),
    /// An I/O failure on a path of the new guest or of the host.
    #[error("{path}: {error}")]
    Io {
        /// The path the call was about.
        path: PathBuf,
        /// The underlying error (shown in the message, so not chained as a source).
        error: std::io::Error,
    },
    /// A source that cannot be read as one.
    #[error("bad source {spec:?}: {why}")]
    BadSource {
        /// The source as given.
        spec: String,
        /// What is wrong with it.
        why: String,
    },
    /// A local source directory or tarball that is not there.
    #[error("cannot import from {path}: {error}")]
    SourceMissing {
        /// The path given.
        path: PathBuf,
        /// Why it cannot be used.
        error: std::io::Error,
    },
    /// A program the import runs is not installed.
    #[error(
        "the `{program}` program is not installed: install the {package} package (looked for in $PATH and {path})",
        path = STANDARD_PATH
    )]
    MissingProgram {
        /// The program.
        program: String,
        /// The package (Debian's name) that has it.
        package: &'static str,
    },
    /// rsync (or tar) could not copy the source: unreachable, refused, or failed midway.
    #[error("cannot import from {from}: {message}")]
    Copy {
        /// The source.
        from: String,
        /// The copying program's own last meaningful message, and its exit code.
        message: String,
    },
    /// An `--include-mount` path that cannot be one.
    #[error("bad included mount {path:?}: {why}")]
    BadIncludeMount {
        /// The path given.
        path: PathBuf,
        /// Why it is refused.
        why: &'static str,
    },
    /// A resync of a guest that was not imported.
    #[error(
        "guest {name} was not imported (its origin is {kind}): only an imported guest can be resynced"
    )]
    NotImported {
        /// The guest.
        name: String,
        /// Its recorded origin kind.
        kind: String,
    },
    /// A resync from another source than the guest was imported from.
    #[error(
        "guest {name} was imported from {recorded}, not {given}: resync it from the same source"
    )]
    OtherSource {
        /// The guest.
        name: String,
        /// The source in its record.
        recorded: String,
        /// The source given.
        given: String,
    },
    /// A resync of a mounted guest: its base must not change under its overlay.
    #[error(
        "guest {name} is mounted at {path}: unmount it (`cowherd umount {name}`) before resyncing it"
    )]
    Mounted {
        /// The guest.
        name: String,
        /// Its mount point.
        path: PathBuf,
    },
    /// A resync of a guest that changed paths since its last import, without a choice of
    /// what to do with them.
    #[error(
        "guest {name} changed {count} paths since its last import ({first}): resync with \
         --keep-guest-changes to keep the guest's versions, or --discard-guest-changes to take \
         the machine's (the guest's are kept in {discard_dir})"
    )]
    GuestChanged {
        /// The guest.
        name: String,
        /// How many changes.
        count: usize,
        /// The first few, for the message.
        first: String,
        /// Where discarded versions would go.
        discard_dir: String,
        /// Every change.
        changes: Vec<GuestChange>,
    },
    /// A resync of a guest imported before cowherd kept a manifest of what it imported.
    #[error(
        "guest {name} has no manifest of its last import ({path}): its own changes cannot be \
         told from the machine's; resync with --discard-guest-changes (every file of the guest \
         is kept in {discard_dir} first)"
    )]
    NoManifest {
        /// The guest.
        name: String,
        /// The manifest's path.
        path: PathBuf,
        /// Where discarded versions would go.
        discard_dir: String,
    },
    /// A machine whose tree holds overlayfs's own metadata, which a guest's overlay would obey
    /// instead of showing.
    #[error(
        "{source_shown} holds {count} entries that overlayfs would take for its own metadata \
         (whiteouts: 0/0 character devices; trusted.overlay.* xattrs), e.g. {first}: a guest \
         would not see them as they are; remove them on the machine (container image layers \
         belong unpacked, not as layers) and import again"
    )]
    OverlayMetadata {
        /// The source.
        source_shown: String,
        /// How many entries.
        count: usize,
        /// The first few.
        first: String,
    },
    /// A local source that is the cowherd root, or inside it.
    #[error(
        "cannot import from {path}: it is inside the cowherd root {root} (to copy a guest, make \
         a template of it: `guest = \"NAME\"` in a template definition)"
    )]
    SourceInRoot {
        /// The source.
        path: PathBuf,
        /// The root.
        root: PathBuf,
    },
    /// A resync from a tarball.
    #[error(
        "guest {name}: a tarball cannot be resynced (it is unpacked whole); destroy the guest and import the new tarball"
    )]
    TarballResync {
        /// The guest.
        name: String,
    },
}

/// Attaches a path to `std::io` and `nix` errors.
trait At<T> {
    fn at(self, path: impl Into<PathBuf>) -> Result<T, ImportError>;
}

impl<T> At<T> for std::io::Result<T> {
    fn at(self, path: impl Into<PathBuf>) -> Result<T, ImportError> {
        self.map_err(|error| ImportError::Io {
            path: path.into(),
            error,
        })
    }
}

impl<T> At<T> for nix::Result<T> {
    fn at(self, path: impl Into<PathBuf>) -> Result<T, ImportError> {
        self.map_err(|errno| ImportError::Io {
            path: path.into(),
            error: errno.into(),
        })
    }
}

/// Imports the machine at `source` as guest `name` of `root`, or, with
/// [`ImportOptions::resync`], brings the imported guest `name` up to date with it.
///
/// `root` must be opened for writing ([`cowherd_unify::Access::Write`]): its lock keeps
/// other writers, whose recovery would remove the staging directory, away for the whole
/// import. Whether the new guest is then unified is the caller's business.
///
/// # Algorithm
/// **Import.** The name must be free. The guest is made in the root's staging directory
/// `guests/.NAME.creating/` ([`NewGuest`]), whose `base/` is filled:
/// * by rsync `-aHAXS --numeric-ids --one-file-system --modify-window=-1` (timestamps
///   compared to the nanosecond) from the source, leaving out the contents of the pseudo and
///   volatile directories and the swap files ([`EXCLUDED`], and for a local source the swap
///   files its host's `/proc/swaps` names below it); no other mounted filesystem of the
///   source is crossed, so their mount points arrive as empty directories; then one more
///   rsync pass per [`ImportOptions::include_mounts`] path copies that filesystem into its
///   mount point. The mounts left out are listed (for an ssh source, by reading its
///   `/proc/self/mountinfo` through the remote shell);
/// * or by GNU tar (`--xattrs --xattrs-include=* --acls --numeric-owner -p`) for a tarball.
///
/// rsync (or tar) runs as PID 1 of a PID namespace of its own that dies with the calling
/// thread (`setpriv --pdeathsig KILL -- unshare --pid --kill-child`): a killed caller leaves
/// no process writing into the staging directory.
///
/// The fixups ([`apply_fixups`]) are applied in the staging tree, the record (origin
/// [`OriginKind::Import`] with the source, the machine's hostname) is written, and the
/// staging directory is renamed to `guests/NAME`: only a complete import becomes a guest. A
/// failed import removes its staging directory; a killed one leaves it to the next writer of
/// the root (the next import of that name, or any command that changes the root), which
/// removes it before it starts.
///
/// **Resync.** The guest must exist, have been imported from this very source, and be
/// unmounted. Its new tree is built in `guests/NAME/resync/` by the same rsync passes with
/// `--link-dest=guests/NAME/base`: an unchanged file becomes a new link to the base's inode
/// (a store object after `unify`), a changed one is transferred as a delta against the base's
/// file. The fixups are applied to it (so the `.cowherd-orig` files hold the source's latest
/// originals), then it is exchanged with `base/` by one `renameat2(RENAME_EXCHANGE)` and the
/// old base is removed. No inode of the old base, which other guests may share through the
/// store, is ever changed: rsync would otherwise change a shared inode's mode, owner or
/// xattrs in place. A killed resync leaves the guest as it was (or, after the exchange,
/// complete); the next resync removes the leftover `resync/`, and so does `destroy`.
///
/// # Errors
/// [`ImportError::Unify`] for a bad or taken name (`GuestExists`, checked before anything is
/// copied) or a missing guest (resync); [`ImportError::Mounted`] for a mounted one (resync);
/// [`ImportError::MissingProgram`] naming the package without rsync (or tar, ssh, or
/// util-linux's setpriv and unshare);
/// [`ImportError::SourceMissing`] for a local source that is not there;
/// [`ImportError::Copy`], one line naming the source and the copying program's own message,
/// for an unreachable or failing source; [`ImportError::BadIncludeMount`];
/// [`ImportError::NotImported`], [`ImportError::OtherSource`],
/// [`ImportError::TarballResync`] for a resync that cannot be; [`ImportError::Io`].
pub fn import(
    root: &HostRoot,
    name: &str,
    source: &Source,
    opts: &ImportOptions,
) -> Result<ImportReport, ImportError> {
    validate_guest_name(name)?;
    let included = included_mounts(&opts.include_mounts)?;
    if !included.is_empty() && !source.is_rsync() {
        return Err(ImportError::BadIncludeMount {
            path: opts.include_mounts[0].clone(),
            why: "a tarball holds no mounts: include mounts only with an rsync source",
        });
    }
    if let Source::Local(top) = source {
        // rsync would only say it cannot change into it.
        for rel in &included {
            let found = Beneath::open(top).and_then(|tree| tree.lstat(rel));
            let why = match found {
                Ok(Some(st)) if kind(&st) == SFlag::S_IFDIR => continue,
                Ok(Some(_)) | Err(Errno::ELOOP | Errno::ENOTDIR) => {
                    "the machine's own tree holds a symlink or a file there, not a mount point's directory"
                }
                _ => {
                    "the source has no directory there: --include-mount names one of the source's mount points, as in /srv"
                }
            };
            return Err(ImportError::BadIncludeMount {
                path: Path::new("/").join(rel),
                why,
            });
        }
    }
    if opts.resync {
        resync(root, name, source, opts, &included)
    } else {
        first_import(root, name, source, opts, &included)
    }
}

/// The import of a new guest (see [`import`]).
fn first_import(
    root: &HostRoot,
    name: &str,
    source: &Source,
    opts: &ImportOptions,
    included: &[PathBuf],
) -> Result<ImportReport, ImportError> {
    let dest = root.guests_dir().join(name);
    if std::fs::symlink_metadata(&dest).is_ok() {
        return Err(cowherd_unify::Error::GuestExists {
            name: name.to_string(),
            path: dest,
        }
        .into());
    }
    let source = source.resolved()?;
    check_source(&source)?;
    check_not_in_root(root, &source)?;
    let tools = Tools::find(&source, opts)?;
    let origin = Origin {
        kind: OriginKind::Import,
        path: Some(source.to_string()),
        template: None,
    };
    let mut guest = NewGuest::begin(root, name, origin)?;
    let base = guest.base().path().to_path_buf();
    let staging = base
        .parent()
        .and_then(|dir| dir.strip_prefix(root.path()).ok())
        .map(Path::to_path_buf);
    let mut report = ImportReport {
        guest: name.to_string(),
        source: source.to_string(),
        ..ImportReport::default()
    };
    let filled = fill(
        &tools,
        root,
        &source,
        opts,
        included,
        &base,
        None,
        &mut report,
    );
    let result = filled.and_then(|()| {
        let tree = Beneath::open(&base).at(&base)?;
        let fixups = fixups_in(&tree)?;
        report.fixups = fixups.fixups;
        report.warnings.extend(fixups.warnings);
        report.hostname = machine_hostname(&tree);
        guest.record_mut().hostname = report.hostname.clone();
        // What this import wrote: a resync tells the guest's own changes by it.
        let manifest = take_manifest(&base, &source)?;
        let staging_dir = base.parent().unwrap_or(Path::new("/"));
        manifest.save_for_base(staging_dir)?;
        Ok(())
    });
    match result {
        Ok(()) => {
            guest.finish(root)?;
            Ok(report)
        }
        Err(e) => {
            drop(guest);
            if let Some(staging) = staging {
                // Else the next writer's recovery removes it.
                let _ = remove_below_root(root, &staging);
            }
            Err(e)
        }
    }
}

/// The resync of an imported guest (see [`import`]).
fn resync(
    root: &HostRoot,
    name: &str,
    source: &Source,
    opts: &ImportOptions,
    included: &[PathBuf],
) -> Result<ImportReport, ImportError> {
    let record = guest_record(root, name)?;
    if record.origin.kind != OriginKind::Import {
        return Err(ImportError::NotImported {
            name: name.to_string(),
            kind: format!("{:?}", record.origin.kind).to_lowercase(),
        });
    }
    if !source.is_rsync() {
        return Err(ImportError::TarballResync {
            name: name.to_string(),
        });
    }
    let source = source.resolved()?;
    let recorded = record.origin.path.clone().unwrap_or_default();
    if recorded.parse::<Source>().ok().as_ref() != Some(&source) {
        return Err(ImportError::OtherSource {
            name: name.to_string(),
            recorded,
            given: source.to_string(),
        });
    }
    // Mounted here, or held by a process of another mount namespace: refused.
    match ensure_offline(root, name) {
        Err(cowherd_unify::Error::Mounted { name, path }) => {
            return Err(ImportError::Mounted { name, path });
        }
        other => other?,
    }
    check_source(&source)?;
    check_not_in_root(root, &source)?;
    let tools = Tools::find(&source, opts)?;
    let guest_dir = root.guests_dir().join(name);
    let base = guest_dir.join("base");
    let scratch_rel = Path::new("guests").join(name).join(RESYNC_DIR);
    let linkdest_rel = Path::new("guests").join(name).join(LINKDEST_DIR);
    let scratch = root.path().join(&scratch_rel);
    let linkdest = root.path().join(&linkdest_rel);
    remove_below_root(root, &scratch_rel)?;
    remove_below_root(root, &linkdest_rel)?;
    let discard_dir = guest_dir.join(DISCARDED_DIR).display().to_string();
    // What the guest changed since the last import, found by one walk of base that also
    // makes the only tree rsync is given as --link-dest: base's directories and regular
    // files, no symlink (rsync would follow one out of the guest, DESIGN-NOTES fact 13).
    let manifest = load_manifest(&guest_dir)?;
    let changes = match &manifest {
        Some(manifest) => guest_changes(&guest_dir, manifest, Some(&linkdest)),
        None if opts.guest_changes == GuestChanges::Discard => {
            guest_changes(&guest_dir, &TreeManifest::default(), Some(&linkdest))
        }
        None => {
            return Err(ImportError::NoManifest {
                name: name.to_string(),
                path: guest_dir.join(MANIFEST_FILE),
                discard_dir,
            });
        }
    };
    let changes = match changes {
        Ok(changes) => changes,
        Err(e) => {
            let _ = remove_below_root(root, &linkdest_rel);
            return Err(e.into());
        }
    };
    if !changes.is_empty() && opts.guest_changes == GuestChanges::Refuse {
        let _ = remove_below_root(root, &linkdest_rel);
        let mut first: Vec<String> = changes.iter().take(3).map(|c| c.to_string()).collect();
        if changes.len() > 3 {
            first.push("…".to_string());
        }
        return Err(ImportError::GuestChanged {
            name: name.to_string(),
            count: changes.len(),
            first: first.join(", "),
            discard_dir,
            changes,
        });
    }
    std::fs::create_dir(&scratch).at(&scratch)?;
    std::fs::set_permissions(&scratch, std::fs::Permissions::from_mode(0o700)).at(&scratch)?;
    let mut report = ImportReport {
        guest: name.to_string(),
        source: source.to_string(),
        resync: true,
        ..ImportReport::default()
    };
    let filled = fill(
        &tools,
        root,
        &source,
        opts,
        included,
        &scratch,
        Some(&linkdest),
        &mut report,
    );
    let _ = remove_below_root(root, &linkdest_rel);
    let result = filled.and_then(|()| {
        let tree = Beneath::open(&scratch).at(&scratch)?;
        let fixups = fixups_in(&tree)?;
        let hostname = machine_hostname(&tree);
        let new_manifest = take_manifest(&scratch, &source)?;
        // Named before anything of the guest's goes in: the next resync compares with what
        // the machine sent, not with what the guest kept.
        new_manifest.save_pending(&guest_dir, RESYNC_DIR)?;
        match opts.guest_changes {
            GuestChanges::Keep if !changes.is_empty() => {
                keep_guest_changes(root, &guest_dir, RESYNC_DIR, &changes)?;
                if let Some(old) = &manifest {
                    report.not_taken = changed_by_both(&changes, old, &new_manifest);
                }
            }
            GuestChanges::Discard if !changes.is_empty() => {
                report.discarded_to = Some(discard_guest_changes(root, &guest_dir, &changes)?);
            }
            _ => {}
        }
        Ok((fixups, hostname))
    });
    let (fixups, hostname) = match result {
        Ok(done) => done,
        Err(e) => {
            let _ = remove_below_root(root, &scratch_rel);
            return Err(e);
        }
    };
    report.guest_changes = changes;
    report.fixups = fixups.fixups;
    report.warnings.extend(fixups.warnings);
    if hostname.is_some() && hostname != record.hostname {
        report.warnings.push(format!(
            "the machine's hostname is now {}; the guest's record keeps {}",
            hostname.as_deref().unwrap_or_default(),
            record.hostname()
        ));
    }
    report.hostname = hostname;
    let dir = nix::fcntl::open(
        &guest_dir,
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .at(&guest_dir)?;
    // The new base on disk before it becomes the base (a power loss leaves the old one).
    nix::unistd::syncfs(&dir).at(&scratch)?;
    nix::fcntl::renameat2(&dir, RESYNC_DIR, &dir, "base", RenameFlags::RENAME_EXCHANGE)
        .at(&base)?;
    // The pending manifest now describes base: it becomes the guest's.
    load_manifest(&guest_dir)?;
    if let Err(e) = remove_below_root(root, &scratch_rel) {
        report.warnings.push(format!(
            "the old base, now {}, could not be removed ({e}); the next resync or `cowherd destroy {name}` removes it",
            scratch.display()
        ));
    }
    if let Some(dir) = &report.discarded_to {
        report.warnings.push(format!(
            "the guest's versions of the {} paths it had changed are kept in {} (listed in its `changes` file); remove it when they are no longer wanted",
            report.guest_changes.len(),
            dir.display()
        ));
    }
    Ok(report)
}

/// The manifest of a tree rsync or tar just filled; refused if it holds overlayfs's own
/// metadata (DESIGN-NOTES fact 15).
fn take_manifest(tree: &Path, source: &Source) -> Result<TreeManifest, ImportError> {
    let (manifest, foreign) = TreeManifest::take(tree)?;
    if foreign.paths.is_empty() {
        return Ok(manifest);
    }
    let mut first: Vec<String> = foreign
        .paths
        .iter()
        .take(3)
        .map(|p| p.display().to_string())
        .collect();
    if foreign.paths.len() > 3 {
        first.push("…".to_string());
    }
    Err(ImportError::OverlayMetadata {
        source_shown: source.to_string(),
        count: foreign.paths.len(),
        first: first.join(", "),
    })
}

/// Refuses a local source that is the root or inside it (a guest's own tree, the store).
fn check_not_in_root(root: &HostRoot, source: &Source) -> Result<(), ImportError> {
    let path = match source {
        Source::Local(path) | Source::Tarball(path) => path,
        _ => return Ok(()),
    };
    let abs = std::fs::canonicalize(path).unwrap_or_else(|_| path.clone());
    let root_abs = std::fs::canonicalize(root.path()).unwrap_or_else(|_| root.path().into());
    if abs.starts_with(&root_abs) {
        return Err(ImportError::SourceInRoot {
            path: path.clone(),
            root: root_abs,
        });
    }
    Ok(())
}

/// The root's path relative to the source's top, when the source's tree holds it (a local
/// directory above the root, `root@localhost:/`, or a machine whose cowherd root is at the
/// same path): it is left out of every import.
fn root_below_source(root: &HostRoot, source: &Source) -> Option<PathBuf> {
    let top = match source {
        Source::Local(path) => std::fs::canonicalize(path).unwrap_or_else(|_| path.clone()),
        Source::Ssh { path, .. } => path.clone(),
        _ => return None,
    };
    let root_abs = std::fs::canonicalize(root.path()).unwrap_or_else(|_| root.path().into());
    root_abs
        .strip_prefix(&top)
        .ok()
        .filter(|rel| !rel.as_os_str().is_empty())
        .map(Path::to_path_buf)
}

/// Checks a local source before anything is made: a directory, or a tarball file.
fn check_source(source: &Source) -> Result<(), ImportError> {
    let missing = |path: &Path, why: &str| ImportError::SourceMissing {
        path: path.to_path_buf(),
        error: std::io::Error::other(why.to_string()),
    };
    match source {
        Source::Local(path) => match std::fs::metadata(path) {
            Ok(meta) if meta.is_dir() => Ok(()),
            Ok(_) => Err(missing(
                path,
                "not a directory (a tarball's name must end in .tar, .tar.gz, .tar.xz, .tar.zst, …)",
            )),
            Err(error) => Err(ImportError::SourceMissing {
                path: path.clone(),
                error,
            }),
        },
        Source::Tarball(path) => match std::fs::metadata(path) {
            Ok(meta) if meta.is_file() => Ok(()),
            Ok(_) => Err(missing(path, "not a regular file")),
            Err(error) => Err(ImportError::SourceMissing {
                path: path.clone(),
                error,
            }),
        },
        Source::Ssh { .. } | Source::Daemon { .. } => Ok(()),
    }
}

/// The included mount points, checked and made relative (`srv`), shallowest first.
fn included_mounts(paths: &[PathBuf]) -> Result<Vec<PathBuf>, ImportError> {
    let mut out = Vec::new();
    for path in paths {
        let bad = |why| ImportError::BadIncludeMount {
            path: path.clone(),
            why,
        };
        if !path.is_absolute() {
            return Err(bad(
                "give the mount point's absolute path on the source, as in /srv",
            ));
        }
        let mut rel = PathBuf::new();
        for part in path.components() {
            match part {
                Component::RootDir | Component::CurDir => {}
                Component::Normal(part) => rel.push(part),
                Component::ParentDir | Component::Prefix(_) => {
                    return Err(bad("`..` is not allowed"));
                }
            }
        }
        if rel.as_os_str().is_empty() {
            return Err(bad("the source's root is copied anyway"));
        }
        if PSEUDO_DIRS
            .iter()
            .any(|dir| Path::new("/").join(&rel).starts_with(dir))
        {
            return Err(bad(
                "/proc, /sys, /dev and /run are the kernel's and the runtime's, never copied",
            ));
        }
        if !out.contains(&rel) {
            out.push(rel);
        }
    }
    out.sort_by_key(|rel| rel.components().count());
    Ok(out)
}

/// The programs an import runs, found before anything is made.
struct Tools {
    /// The copying program dies with its caller.
    leash: Leash,
    /// rsync or tar.
    copier: PathBuf,
    /// The remote shell's argv, to list an ssh source's mounts.
    rsh: Option<Vec<String>>,
}

impl Tools {
    fn find(source: &Source, opts: &ImportOptions) -> Result<Tools, ImportError> {
        let need = |program: &str, package: &'static str| {
            find_program(program).ok_or_else(|| ImportError::MissingProgram {
                program: program.to_string(),
                package,
            })
        };
        let leash = Leash::find().map_err(|program| ImportError::MissingProgram {
            program: program.to_string(),
            package: "util-linux",
        })?;
        let copier = if source.is_rsync() {
            need("rsync", "rsync")?
        } else {
            need("tar", "tar")?
        };
        let rsh = match source {
            Source::Ssh { .. } => {
                let argv = split_rsh(opts.rsh.as_deref().unwrap_or("ssh"));
                let program = argv.first().map_or("ssh", String::as_str);
                if !program.contains('/') {
                    need(program, "openssh-client")?;
                }
                Some(argv)
            }
            _ => None,
        };
        Ok(Tools { leash, copier, rsh })
    }

    /// `program` with `args` on the [`Leash`] (it and all it forks die with the caller),
    /// stdin closed, output captured.
    fn run(&self, program: &Path, args: &[OsString]) -> std::io::Result<Output> {
        self.leash
            .command(program)
            .args(args)
            .stdin(Stdio::null())
            .output()
    }
}

/// Splits a remote-shell command into words as rsync does: on whitespace, with single and
/// double quotes grouping (and a backslash escaping in double quotes).
fn split_rsh(rsh: &str) -> Vec<String> {
    let mut words = Vec::new();
    let mut word = String::new();
    let mut in_word = false;
    let mut quote = None;
    let mut chars = rsh.chars();
    while let Some(c) = chars.next() {
        match (quote, c) {
            (None, c) if c.is_whitespace() => {
                if in_word {
                    words.push(std::mem::take(&mut word));
                    in_word = false;
                }
            }
            (None, '\'' | '"') => {
                quote = Some(c);
                in_word = true;
            }
            (Some(q), c) if c == q => quote = None,
            (Some('"'), '\\') => {
                if let Some(next) = chars.next() {
                    word.push(next);
                }
            }
            (_, c) => {
                word.push(c);
                in_word = true;
            }
        }
    }
    if in_word {
        words.push(word);
    }
    words
}

/// Fills `dest` from the source: the rsync passes (main, then one per included mount; each
/// with `--link-dest` into `link_dest` if given), or tar. Counts into `report`.
#[allow(clippy::too_many_arguments)]
fn fill(
    tools: &Tools,
    root: &HostRoot,
    source: &Source,
    opts: &ImportOptions,
    included: &[PathBuf],
    dest: &Path,
    link_dest: Option<&Path>,
    report: &mut ImportReport,
) -> Result<(), ImportError> {
    if let Source::Tarball(tarball) = source {
        return untar(tools, tarball, dest, report);
    }
    let mut swaps = local_swap_files(source);
    let mut excluded: Vec<String> = EXCLUDED.iter().map(|s| s.to_string()).collect();
    // A cowherd root is never copied into a guest (its index, its store, every guest).
    if let Some(rel) = root_below_source(root, source) {
        report.warnings.push(format!(
            "left out /{}: the path of this host's cowherd root (a cowherd root is never copied into a guest)",
            rel.display()
        ));
        swaps.push(rel);
    }
    for swap in &swaps {
        let pattern = Path::new("/").join(swap).display().to_string();
        if !excluded.contains(&pattern) {
            excluded.push(pattern);
        }
    }
    let main = Pass {
        shown: source.to_string(),
        from: source.rsync_arg(Path::new("")),
        to: dest.to_path_buf(),
        excludes: excluded.clone(),
        link_dest: link_dest.map(Path::to_path_buf),
    };
    rsync(tools, source, opts, &main, report)?;
    report.excluded = excluded;
    for rel in included {
        // rsync resolves the destination path itself, following symlinks: make every
        // directory on the way here, beneath the staging tree, refusing one the machine
        // planted as a symlink (or anything but a directory) — and likewise in `link_dest`.
        real_dirs(dest, rel)?;
        let link_dest = link_dest.filter(|base| real_dirs(base, rel).is_ok());
        let excludes = swaps
            .iter()
            .filter_map(|swap| {
                swap.strip_prefix(rel)
                    .ok()
                    .map(|below| Path::new("/").join(below).display().to_string())
            })
            .collect();
        let pass = Pass {
            shown: format!("{source} (mount /{})", rel.display()),
            from: source.rsync_arg(rel),
            to: dest.join(rel),
            excludes,
            link_dest: link_dest.map(|base| base.join(rel)),
        };
        rsync(tools, source, opts, &pass, report)?;
        report
            .included_mounts
            .push(Path::new("/").join(rel).display().to_string());
    }
    match source_mounts(tools, source) {
        Ok(Some(mounts)) => {
            report.excluded_mounts = mounts
                .into_iter()
                .filter(|mount| !included.iter().any(|rel| mount == rel))
                .map(|rel| Path::new("/").join(rel).display().to_string())
                .collect();
        }
        Ok(None) => report.warnings.push(
            "the mounts of an rsync daemon's module are not known: only the module's own filesystem was copied"
                .to_string(),
        ),
        Err(why) => report.warnings.push(format!(
            "could not list the source's mounts ({why}): only its root filesystem (and the mounts included) were copied"
        )),
    }
    Ok(())
}

/// Makes the directories of `rel` below `top` (0755 where missing), beneath it and following
/// no symlink: an included mount's destination (or `--link-dest`) that the machine's own tree
/// made a symlink or a file is refused.
fn real_dirs(top: &Path, rel: &Path) -> Result<(), ImportError> {
    let tree = Beneath::open(top).at(top)?;
    tree.make_dirs(rel).map_err(|e| ImportError::BadIncludeMount {
        path: Path::new("/").join(rel),
        why: match e {
            Errno::ELOOP | Errno::ENOTDIR | Errno::EEXIST => {
                "the machine's own tree holds a symlink or a file there, not a mount point's directory"
            }
            _ => "its directory cannot be made in the guest",
        },
    })
}

/// One rsync run.
struct Pass {
    /// The source, for messages.
    shown: String,
    from: OsString,
    to: PathBuf,
    excludes: Vec<String>,
    link_dest: Option<PathBuf>,
}

/// Runs one rsync pass and adds its statistics to `report`.
fn rsync(
    tools: &Tools,
    source: &Source,
    opts: &ImportOptions,
    pass: &Pass,
    report: &mut ImportReport,
) -> Result<(), ImportError> {
    let timeout = format!("--timeout={IO_TIMEOUT_SECS}");
    let mut args: Vec<OsString> = [
        "-aHAXS",
        "--numeric-ids",
        "--one-file-system",
        "--stats",
        "--no-human-readable",
        // Timestamps equal to the nanosecond, not to the second (rsync's default): else a
        // directory made in the same second as the source's mtime keeps its own, and a file
        // changed within its mtime's second looks unchanged to a resync.
        "--modify-window=-1",
        &timeout,
    ]
    .iter()
    .map(OsString::from)
    .collect();
    if let (Source::Ssh { .. }, Some(rsh)) = (source, &opts.rsh) {
        args.push(format!("--rsh={rsh}").into());
    }
    for pattern in &pass.excludes {
        args.push(format!("--exclude={pattern}").into());
    }
    if let Some(link_dest) = &pass.link_dest {
        let mut arg = OsString::from("--link-dest=");
        arg.push(link_dest);
        args.push(arg);
    }
    // No source or destination is ever read as an option.
    args.push("--".into());
    args.push(pass.from.clone());
    let mut to = pass.to.clone().into_os_string();
    to.push("/");
    args.push(to);
    let output = tools.run(&tools.copier, &args).at(&tools.copier)?;
    let code = output.status.code();
    let stderr = String::from_utf8_lossy(&output.stderr);
    if code == Some(RSYNC_VANISHED) {
        report.warnings.push(format!(
            "files vanished from {} while they were copied (normal on a running machine; resync after stopping its services)",
            pass.shown
        ));
    } else if code != Some(0) {
        return Err(ImportError::Copy {
            from: pass.shown.clone(),
            message: copy_message("rsync", &stderr, code),
        });
    }
    let stats = parse_stats(&String::from_utf8_lossy(&output.stdout));
    report.files += stats.files;
    report.bytes += stats.bytes;
    report.transferred_files += stats.transferred_files;
    report.transferred_bytes += stats.literal_bytes;
    report.wire_bytes += stats.wire_bytes;
    Ok(())
}

/// Unpacks a tarball into `dest` with GNU tar and counts what it holds.
fn untar(
    tools: &Tools,
    tarball: &Path,
    dest: &Path,
    report: &mut ImportReport,
) -> Result<(), ImportError> {
    let mut args: Vec<OsString> = ["--extract", "--xattrs", "--xattrs-include=*", "--acls"]
        .iter()
        .chain(&["--numeric-owner", "--same-permissions", "--same-owner"])
        .map(OsString::from)
        .collect();
    args.push("--file".into());
    args.push(tarball.into());
    args.push("--directory".into());
    args.push(dest.into());
    let output = tools.run(&tools.copier, &args).at(&tools.copier)?;
    if !output.status.success() {
        return Err(ImportError::Copy {
            from: tarball.display().to_string(),
            message: copy_message(
                "tar",
                &String::from_utf8_lossy(&output.stderr),
                output.status.code(),
            ),
        });
    }
    let (files, bytes, regular) = count_tree(dest).at(dest)?;
    report.files = files;
    report.bytes = bytes;
    report.transferred_files = regular;
    report.transferred_bytes = std::fs::metadata(tarball).at(tarball)?.len();
    Ok(())
}

/// Entries, bytes of regular files and regular files below `dir` (never following a symlink).
fn count_tree(dir: &Path) -> std::io::Result<(u64, u64, u64)> {
    let (mut entries, mut bytes, mut regular) = (0, 0, 0);
    let mut todo = vec![dir.to_path_buf()];
    while let Some(dir) = todo.pop() {
        for entry in std::fs::read_dir(&dir)? {
            let entry = entry?;
            let kind = entry.file_type()?;
            entries += 1;
            if kind.is_dir() {
                todo.push(entry.path());
            } else if kind.is_file() {
                regular += 1;
                bytes += entry.metadata()?.len();
            }
        }
    }
    Ok((entries, bytes, regular))
}

/// What `rsync --stats --no-human-readable` printed that an import reports.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Stats {
    files: u64,
    bytes: u64,
    transferred_files: u64,
    literal_bytes: u64,
    wire_bytes: u64,
}

/// Reads rsync's `--stats` lines (digits with or without thousands separators).
fn parse_stats(stdout: &str) -> Stats {
    let mut stats = Stats::default();
    for line in stdout.lines() {
        let Some((key, value)) = line.split_once(':') else {
            continue;
        };
        let number = || -> u64 {
            value
                .split_whitespace()
                .next()
                .map(|word| {
                    word.chars()
                        .filter(char::is_ascii_digit)
                        .collect::<String>()
                })
                .and_then(|digits| digits.parse().ok())
                .unwrap_or(0)
        };
        match key.trim() {
            "Number of files" => stats.files = number(),
            "Total file size" => stats.bytes = number(),
            "Number of regular files transferred" => stats.transferred_files = number(),
            "Literal data" => stats.literal_bytes = number(),
            "Total bytes sent" | "Total bytes received" => stats.wire_bytes += number(),
            _ => {}
        }
    }
    stats
}

/// The copying program's last meaningful line of stderr (not rsync's closing "rsync error:
/// … (code N)" summary, nor "connection unexpectedly closed"), on one line, with its exit code.
fn copy_message(program: &str, stderr: &str, code: Option<i32>) -> String {
    let lines: Vec<&str> = stderr
        .split(['\n', '\r'])
        .map(str::trim)
        .filter(|line| !line.is_empty())
        .collect();
    let summary = |line: &&str| {
        line.starts_with("rsync error:")
            || line.contains("connection unexpectedly closed")
            || line.contains("tar: Exiting with failure status")
    };
    // A side's "Broken pipe" only echoes the other side's failure, which came first (a
    // receiver's "No space left on device", say).
    let echo = |line: &&str| line.contains("Broken pipe");
    let line = lines
        .iter()
        .rev()
        .find(|line| !summary(line) && !echo(line))
        .or_else(|| lines.iter().rev().find(|line| !summary(line)))
        .or(lines.last())
        .map(|line| {
            let line = line.strip_prefix("rsync: ").unwrap_or(line);
            match line
                .strip_prefix('[')
                .and_then(|rest| rest.split_once("] "))
            {
                Some((_, rest)) => rest.to_string(),
                None => line.to_string(),
            }
        });
    let code = code.map_or_else(
        || "killed by a signal".to_string(),
        |c| format!("exit code {c}"),
    );
    match line {
        Some(line) => format!("{} ({program} {code})", line.replace(char::is_control, " ")),
        None => format!("{program} failed ({code})"),
    }
}

/// For a local source, the swap files its host's `/proc/swaps` names below it (relative).
fn local_swap_files(source: &Source) -> Vec<PathBuf> {
    let Source::Local(root) = source else {
        return Vec::new();
    };
    let Ok(swaps) = std::fs::read_to_string("/proc/swaps") else {
        return Vec::new();
    };
    swaps
        .lines()
        .skip(1)
        .filter_map(|line| {
            let mut words = line.split_whitespace();
            let (path, kind) = (words.next()?, words.next()?);
            let path = Path::new(path);
            (kind == "file")
                .then(|| path.strip_prefix(root).ok().map(Path::to_path_buf))
                .flatten()
                .filter(|rel| !rel.as_os_str().is_empty())
        })
        .collect()
}

/// The mount points strictly below the source's root, relative to it, leaving out those of
/// [`VOLATILE_DIRS`] (whose contents are never copied anyway). `None` for a daemon.
fn source_mounts(tools: &Tools, source: &Source) -> Result<Option<Vec<PathBuf>>, String> {
    let (text, root) = match source {
        Source::Local(root) => (
            std::fs::read("/proc/self/mountinfo")
                .map_err(|e| format!("/proc/self/mountinfo: {e}"))?,
            root.clone(),
        ),
        Source::Ssh { user, host, path } => {
            let argv = tools.rsh.clone().unwrap_or_else(|| vec!["ssh".to_string()]);
            let program = find_program(&argv[0]).unwrap_or_else(|| PathBuf::from(&argv[0]));
            let target = match user {
                Some(user) => format!("{user}@{host}"),
                None => host.clone(),
            };
            let mut args: Vec<OsString> = argv[1..].iter().map(OsString::from).collect();
            args.extend([target, "cat".into(), "/proc/self/mountinfo".into()].map(OsString::from));
            let output = tools
                .run(&program, &args)
                .map_err(|e| format!("{}: {e}", argv[0]))?;
            if !output.status.success() {
                return Err(copy_message(
                    &argv[0],
                    &String::from_utf8_lossy(&output.stderr),
                    output.status.code(),
                ));
            }
            (output.stdout, path.clone())
        }
        Source::Daemon { .. } | Source::Tarball(_) => return Ok(None),
    };
    let mut mounts = BTreeSet::new();
    for mount in parse_mountinfo(&text) {
        let Ok(rel) = mount.mount_point.strip_prefix(&root) else {
            continue;
        };
        let absolute = Path::new("/").join(rel);
        if rel.as_os_str().is_empty() || VOLATILE_DIRS.iter().any(|dir| absolute.starts_with(dir)) {
            continue;
        }
        mounts.insert(rel.to_path_buf());
    }
    Ok(Some(mounts.into_iter().collect()))
}

/// The machine's hostname: the first word of its `/etc/hostname`, if it is a valid one.
fn machine_hostname(tree: &Beneath) -> Option<String> {
    let text = tree.read(Path::new("etc/hostname")).ok().flatten()?;
    let text = String::from_utf8(text).ok()?;
    let name = text
        .lines()
        .map(str::trim)
        .find(|line| !line.is_empty() && !line.starts_with('#'))?;
    // The same rule as a guest built with --hostname.
    crate::identity::validate_hostname(name)
        .ok()
        .map(|()| name.to_string())
}

// ---------------------------------------------------------------------------------------------
// Fixups
// ---------------------------------------------------------------------------------------------

/// What [`apply_fixups`] did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Fixups {
    /// One line per change, naming the guest paths.
    pub fixups: Vec<String>,
    /// Things left alone that a human should look at.
    pub warnings: Vec<String>,
}

/// Gives a machine's tree (at `tree`, fd-relative) what it needs to run as a guest, keeping
/// every original it changes as `NAME.cowherd-orig` beside it:
/// * `/etc/fstab` becomes [`NEUTRAL_FSTAB`] (comments only: a guest mounts none of the
///   machine's disks);
/// * udev's persistent-net rules (`/etc/udev/rules.d/*persistent-net*`) are disabled
///   (renamed, so udev no longer reads them);
/// * with systemd, the hardware units of [`MASKED_UNITS`] that are installed are masked
///   (`/etc/systemd/system/UNIT -> /dev/null`); with sysvinit, the `getty` lines of
///   `/etc/inittab` on real ttys (`tty1`, `ttyS0`, …) are commented out (the console's stay);
/// * ifupdown's `/etc/network/interfaces` becomes [`GUEST_INTERFACES`] (eth0 by DHCP, and
///   loopback) if it, or a file it sources, configures an interface other than `lo`; other
///   network stacks (netplan, NetworkManager, systemd-networkd, ifcfg files) are left alone
///   and named in the warnings;
/// * the machine's identity (hostname, machine-id, ssh host keys) is not touched.
///
/// Idempotent: on a tree already fixed, it changes nothing and reports nothing. A symlink or
/// mount on the way to a path is never followed: that fixup is skipped, with a warning.
///
/// # Errors
/// [`ImportError::Io`] naming the path, for failures other than a symlink or mount on the way
/// (`tree` itself must be a real directory).
pub fn apply_fixups(tree: &Path) -> Result<Fixups, ImportError> {
    fixups_in(&Beneath::open(tree).at(tree)?)
}

/// [`apply_fixups`] on an opened tree.
fn fixups_in(tree: &Beneath) -> Result<Fixups, ImportError> {
    let mut fixer = Fixer {
        tree,
        out: Fixups::default(),
    };
    fixer.fstab()?;
    fixer.udev_rules()?;
    fixer.systemd_units()?;
    fixer.inittab()?;
    fixer.interfaces()?;
    fixer.other_network_stacks();
    Ok(fixer.out)
}

/// The fixups' state: the tree and what was done.
struct Fixer<'a> {
    tree: &'a Beneath,
    out: Fixups,
}

impl Fixer<'_> {
    /// Turns a symlink or mount on the way to `rel` (`ELOOP`, `EXDEV`) into a warning and
    /// `None`; other errors fail the import.
    fn guard<T>(&mut self, rel: &str, result: nix::Result<T>) -> Result<Option<T>, ImportError> {
        match result {
            Ok(value) => Ok(Some(value)),
            Err(Errno::ELOOP | Errno::EXDEV) => {
                self.out.warnings.push(format!(
                    "/{rel}: a symlink or mount point on the way to it; not followed, left as it is"
                ));
                Ok(None)
            }
            Err(errno) => Err(errno).at(self.tree.path.join(rel)),
        }
    }

    /// The `lstat` of `rel`, `None` if it is not there (or behind a symlink: warned).
    fn lstat(&mut self, rel: &str) -> Result<Option<FileStat>, ImportError> {
        let stat = self.tree.lstat(Path::new(rel));
        Ok(self.guard(rel, stat)?.flatten())
    }

    /// The contents of the regular file `rel`, `None` if it is missing or not a regular file.
    fn read(&mut self, rel: &str) -> Result<Option<Vec<u8>>, ImportError> {
        let read = self.tree.read(Path::new(rel));
        Ok(self.guard(rel, read)?.flatten())
    }

    /// The stat and contents of the regular file `rel`: `None` if it is missing, or (with a
    /// warning) if it is anything but a regular file, which a fixup leaves alone.
    fn regular(&mut self, rel: &str) -> Result<Option<(FileStat, Vec<u8>)>, ImportError> {
        let Some(st) = self.lstat(rel)? else {
            return Ok(None);
        };
        if kind(&st) != SFlag::S_IFREG {
            self.not_regular(rel)?;
            return Ok(None);
        }
        Ok(self.read(rel)?.map(|old| (st, old)))
    }

    /// Warns that `rel` is not a regular file, which a fixup leaves alone.
    fn not_regular(&mut self, rel: &str) -> Result<(), ImportError> {
        self.out.warnings.push(format!(
            "/{rel} is not a regular file (a symlink?): not followed, left as it is"
        ));
        Ok(())
    }

    fn fstab(&mut self) -> Result<(), ImportError> {
        let rel = "etc/fstab";
        let Some(st) = self.lstat(rel)? else {
            return Ok(());
        };
        if kind(&st) == SFlag::S_IFDIR {
            return self.not_regular(rel);
        }
        let old = if kind(&st) == SFlag::S_IFREG {
            self.read(rel)?.unwrap_or_default()
        } else {
            Vec::new()
        };
        if old == NEUTRAL_FSTAB.as_bytes() {
            return Ok(());
        }
        let mounts = String::from_utf8_lossy(&old)
            .lines()
            .filter(|line| !line.trim().is_empty() && !line.trim_start().starts_with('#'))
            .count();
        let replaced =
            self.tree
                .replace_keeping_orig(Path::new(rel), NEUTRAL_FSTAB.as_bytes(), &st);
        if self.guard(rel, replaced)?.is_some() {
            self.out.fixups.push(format!(
                "/{rel}: replaced by a neutral one (a guest mounts none of the machine's disks); the machine's, with {mounts} mount line(s), kept as /{rel}{ORIG_SUFFIX}"
            ));
        }
        Ok(())
    }

    fn udev_rules(&mut self) -> Result<(), ImportError> {
        let dir = "etc/udev/rules.d";
        let names = self.tree.names(Path::new(dir));
        let Some(names) = self.guard(dir, names)? else {
            return Ok(());
        };
        for name in names {
            let bytes = name.as_bytes();
            let persistent = bytes.windows(14).any(|w| w == b"persistent-net");
            if !persistent || bytes.ends_with(ORIG_SUFFIX.as_bytes()) {
                continue;
            }
            let rel = Path::new(dir).join(&name);
            let shown = rel.display().to_string();
            let disabled = self.tree.rename_to_orig(&rel);
            if self.guard(&shown, disabled)?.is_some() {
                self.out.fixups.push(format!(
                    "/{shown}: udev persistent-net rules disabled (renamed to /{shown}{ORIG_SUFFIX}): a guest's NIC is not the machine's"
                ));
            }
        }
        Ok(())
    }

    fn systemd_units(&mut self) -> Result<(), ImportError> {
        let quiet = |tree: &Beneath, rel: &str| tree.lstat(Path::new(rel)).ok().flatten();
        let has_systemd = UNIT_DIRS[1..]
            .iter()
            .any(|dir| quiet(self.tree, dir).is_some_and(|st| kind(&st) == SFlag::S_IFDIR));
        if !has_systemd {
            return Ok(());
        }
        for unit in MASKED_UNITS {
            let template = unit
                .split_once('@')
                .map(|(prefix, _)| format!("{prefix}@.service"));
            let installed = UNIT_DIRS.iter().any(|dir| {
                std::iter::once(unit.to_string())
                    .chain(template.clone())
                    .any(|name| quiet(self.tree, &format!("{dir}/{name}")).is_some())
            });
            if !installed {
                continue;
            }
            let rel = format!("{}/{unit}", UNIT_DIRS[0]);
            let masked = self.tree.mask(Path::new(&rel));
            match self.guard(&rel, masked)? {
                Some(true) => self.out.fixups.push(format!(
                    "masked {unit} (/{rel} -> /dev/null): no such hardware in a guest"
                )),
                Some(false) => {}
                // The same symlink would stop every other unit.
                None => break,
            }
        }
        Ok(())
    }

    fn inittab(&mut self) -> Result<(), ImportError> {
        let rel = "etc/inittab";
        let Some((st, old)) = self.regular(rel)? else {
            return Ok(());
        };
        let (new, commented) = comment_tty_gettys(&String::from_utf8_lossy(&old));
        if commented == 0 {
            return Ok(());
        }
        let replaced = self
            .tree
            .replace_keeping_orig(Path::new(rel), new.as_bytes(), &st);
        if self.guard(rel, replaced)?.is_some() {
            self.out.fixups.push(format!(
                "/{rel}: {commented} getty line(s) on real ttys commented out (the console's kept); the original kept as /{rel}{ORIG_SUFFIX}"
            ));
        }
        Ok(())
    }

    fn interfaces(&mut self) -> Result<(), ImportError> {
        let rel = "etc/network/interfaces";
        let Some((st, old)) = self.regular(rel)? else {
            return Ok(());
        };
        if old == GUEST_INTERFACES.as_bytes() {
            return Ok(());
        }
        let mut config = parse_interfaces(&String::from_utf8_lossy(&old));
        let mut sourced = Vec::new();
        if config.sources {
            let dir = "etc/network/interfaces.d";
            let names = self.tree.names(Path::new(dir));
            for name in self.guard(dir, names)?.unwrap_or_default() {
                let file = Path::new(dir).join(&name).display().to_string();
                if let Some(text) = self.read(&file)? {
                    let more = parse_interfaces(&String::from_utf8_lossy(&text));
                    if !more.physical.is_empty() {
                        sourced.push(format!("/{file}"));
                    }
                    config.physical.extend(more.physical);
                }
            }
        }
        if config.physical.is_empty() {
            return Ok(());
        }
        let replaced =
            self.tree
                .replace_keeping_orig(Path::new(rel), GUEST_INTERFACES.as_bytes(), &st);
        if self.guard(rel, replaced)?.is_some() {
            let mut line = format!(
                "/{rel}: {} replaced by eth0 (dhcp) and lo; the machine's kept as /{rel}{ORIG_SUFFIX}",
                config.physical.join(", ")
            );
            if config.sources {
                line.push_str(" (the files it sourced are no longer read");
                if !sourced.is_empty() {
                    line.push_str(": ");
                    line.push_str(&sourced.join(", "));
                }
                line.push(')');
            }
            self.out.fixups.push(line);
        }
        Ok(())
    }

    /// Names the network configuration ifupdown's fixup does not cover.
    fn other_network_stacks(&mut self) {
        let stacks: [(&str, &str, NameFilter); 5] = [
            ("netplan", "etc/netplan", |n| {
                n.ends_with(b".yaml") || n.ends_with(b".yml")
            }),
            (
                "NetworkManager",
                "etc/NetworkManager/system-connections",
                |_| true,
            ),
            ("systemd-networkd", "etc/systemd/network", |n| {
                n.ends_with(b".network")
            }),
            ("ifcfg (Red Hat)", "etc/sysconfig/network-scripts", |n| {
                n.starts_with(b"ifcfg-") && n != b"ifcfg-lo"
            }),
            ("ifcfg (SUSE)", "etc/sysconfig/network", |n| {
                n.starts_with(b"ifcfg-") && n != b"ifcfg-lo"
            }),
        ];
        for (stack, dir, counts) in stacks {
            let Ok(names) = self.tree.names(Path::new(dir)) else {
                continue;
            };
            let files: Vec<String> = names
                .iter()
                .filter(|name| counts(name.as_bytes()))
                .map(|name| format!("/{dir}/{}", name.to_string_lossy()))
                .collect();
            if !files.is_empty() {
                self.out.warnings.push(format!(
                    "network configured by {stack} ({}): left as it is; check that it configures the guest's eth0",
                    files.join(", ")
                ));
            }
        }
    }
}

/// Which names of a directory count.
type NameFilter = fn(&[u8]) -> bool;

/// The file type bits of a stat.
fn kind(st: &FileStat) -> SFlag {
    SFlag::from_bits_truncate(st.st_mode & SFlag::S_IFMT.bits())
}

/// What an ifupdown `interfaces` file configures.
#[derive(Debug, Default, PartialEq, Eq)]
struct Interfaces {
    /// The interfaces other than `lo` (`eth0 (inet static)`, or a bare name from `auto`,
    /// `allow-*` or `mapping`), once each.
    physical: Vec<String>,
    /// Whether it reads other files (`source`, `source-directory`).
    sources: bool,
}

fn parse_interfaces(text: &str) -> Interfaces {
    let mut out = Interfaces::default();
    let mut named: Vec<String> = Vec::new();
    let mut described: Vec<(String, String)> = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        if line.starts_with('#') {
            continue;
        }
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["iface", name, rest @ ..] if *name != "lo" => {
                if !named.iter().any(|n| n == name) {
                    named.push(name.to_string());
                }
                described.push((name.to_string(), rest.join(" ")));
            }
            [stanza, names @ ..]
                if *stanza == "auto" || *stanza == "mapping" || stanza.starts_with("allow-") =>
            {
                for name in names.iter().filter(|n| **n != "lo") {
                    if !named.iter().any(|n| n == name) {
                        named.push(name.to_string());
                    }
                }
            }
            ["source" | "source-directory", ..] => out.sources = true,
            _ => {}
        }
    }
    out.physical = named
        .into_iter()
        .map(|name| {
            let how: Vec<&str> = described
                .iter()
                .filter(|(n, _)| *n == name)
                .map(|(_, how)| how.as_str())
                .collect();
            if how.is_empty() {
                name
            } else {
                format!("{name} ({})", how.join(", "))
            }
        })
        .collect();
    out
}

/// Comments out the `/etc/inittab` entries that run a getty on a real tty (`tty1`, `ttyS0`,
/// `ttyAMA0`…, not the console); returns the new text and how many were commented out.
fn comment_tty_gettys(text: &str) -> (String, usize) {
    let mut count = 0;
    let mut out = String::with_capacity(text.len() + 64);
    for line in text.split_inclusive('\n') {
        let entry = line.trim_start();
        let fields: Vec<&str> = entry.splitn(4, ':').collect();
        let real_tty = |word: &str| {
            word.strip_prefix("tty").is_some_and(|rest| {
                let digits = rest.trim_start_matches(|c: char| c.is_ascii_alphabetic());
                !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit())
            })
        };
        let getty_on_tty = !entry.starts_with('#')
            && fields.len() == 4
            && fields[3].contains("getty")
            && fields[3].split_whitespace().any(real_tty);
        if getty_on_tty {
            out.push('#');
            count += 1;
        }
        out.push_str(line);
    }
    (out, count)
}

// ---------------------------------------------------------------------------------------------
// Fd-relative access to a hostile tree
// ---------------------------------------------------------------------------------------------

/// The most a fixup reads of one file.
const MAX_READ: u64 = 4 << 20;

/// A directory tree edited fd-relatively: every path is resolved below its top with
/// `openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_XDEV)`, so a symlink (`ELOOP`)
/// or a mount point (`EXDEV`) in the tree is never followed or crossed, and entries are
/// changed with `*at` calls on their opened parent directory.
#[derive(Debug)]
struct Beneath {
    fd: OwnedFd,
    path: PathBuf,
}

impl Beneath {
    /// Opens the tree's top directory (which must not be a symlink).
    ///
    /// # Errors
    /// `open(2)` errors (`ELOOP` for a symlink, `ENOTDIR`).
    fn open(path: &Path) -> nix::Result<Beneath> {
        let fd = nix::fcntl::open(
            path,
            OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Mode::empty(),
        )?;
        Ok(Beneath {
            fd,
            path: path.to_path_buf(),
        })
    }

    /// Opens `rel` below the top (`""` is the top).
    fn open_at(&self, rel: &Path, flags: OFlag) -> nix::Result<OwnedFd> {
        let rel = if rel.as_os_str().is_empty() {
            Path::new(".")
        } else {
            rel
        };
        let how = OpenHow::new()
            .flags(flags | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC)
            .resolve(
                ResolveFlag::RESOLVE_BENEATH
                    | ResolveFlag::RESOLVE_NO_SYMLINKS
                    | ResolveFlag::RESOLVE_NO_XDEV,
            );
        nix::fcntl::openat2(&self.fd, rel, how)
    }

    /// Opens the directory `rel`: `ELOOP` if it is a symlink, `ENOTDIR` if it is something
    /// else (never opened: a device node is not opened for reading).
    fn dir(&self, rel: &Path) -> nix::Result<OwnedFd> {
        let found = self.open_at(rel, OFlag::O_PATH)?;
        match kind(&nix::sys::stat::fstat(&found)?) {
            SFlag::S_IFDIR => {}
            SFlag::S_IFLNK => return Err(Errno::ELOOP),
            _ => return Err(Errno::ENOTDIR),
        }
        let how = OpenHow::new()
            .flags(OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC)
            .resolve(ResolveFlag::RESOLVE_BENEATH | ResolveFlag::RESOLVE_NO_SYMLINKS);
        nix::fcntl::openat2(&found, ".", how)
    }

    /// The opened parent directory of `rel`, and its last component.
    fn parent<'a>(&self, rel: &'a Path) -> nix::Result<(OwnedFd, &'a OsStr)> {
        let name = rel.file_name().ok_or(Errno::EINVAL)?;
        let parent = rel.parent().unwrap_or(Path::new(""));
        Ok((self.dir(parent)?, name))
    }

    /// `lstat` of `rel`; `None` if it (or a directory on the way) is not there.
    fn lstat(&self, rel: &Path) -> nix::Result<Option<FileStat>> {
        let (dir, name) = match self.parent(rel) {
            Ok(found) => found,
            Err(Errno::ENOENT | Errno::ENOTDIR) => return Ok(None),
            Err(e) => return Err(e),
        };
        match nix::sys::stat::fstatat(&dir, name, AtFlags::AT_SYMLINK_NOFOLLOW) {
            Ok(st) => Ok(Some(st)),
            Err(Errno::ENOENT) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// The contents of the regular file `rel` (at most [`MAX_READ`] bytes); `None` if it is
    /// missing or not a regular file.
    fn read(&self, rel: &Path) -> nix::Result<Option<Vec<u8>>> {
        use std::io::Read;
        let fd = match self.open_at(rel, OFlag::O_RDONLY | OFlag::O_NONBLOCK) {
            Ok(fd) => fd,
            Err(Errno::ENOENT | Errno::ENOTDIR) => return Ok(None),
            Err(e) => return Err(e),
        };
        if kind(&nix::sys::stat::fstat(&fd)?) != SFlag::S_IFREG {
            return Ok(None);
        }
        let mut bytes = Vec::new();
        std::fs::File::from(fd)
            .take(MAX_READ)
            .read_to_end(&mut bytes)
            .map_err(io_errno)?;
        Ok(Some(bytes))
    }

    /// The names in directory `rel` (none if it is not there).
    fn names(&self, rel: &Path) -> nix::Result<Vec<OsString>> {
        let fd = match self.dir(rel) {
            Ok(fd) => fd,
            Err(Errno::ENOENT | Errno::ENOTDIR) => return Ok(Vec::new()),
            Err(e) => return Err(e),
        };
        let mut dir = nix::dir::Dir::from_fd(fd)?;
        let mut names = Vec::new();
        for entry in dir.iter() {
            let name = entry?.file_name().to_bytes().to_vec();
            if name != b"." && name != b".." {
                names.push(OsString::from(OsStr::from_bytes(&name)));
            }
        }
        names.sort();
        Ok(names)
    }

    /// Renames `rel` to `rel.cowherd-orig` beside it (replacing an older one).
    fn rename_to_orig(&self, rel: &Path) -> nix::Result<()> {
        let (dir, name) = self.parent(rel)?;
        nix::fcntl::renameat(&dir, name, &dir, orig_name(name).as_os_str())
    }

    /// Replaces the entry `rel` (`st` is its `lstat`) with a regular file holding `bytes`,
    /// keeping the old entry as `rel.cowherd-orig`; `rel` never goes missing. The new file
    /// gets the old one's owner, mode and xattrs if it was a regular file (root, 0644 and none
    /// otherwise).
    fn replace_keeping_orig(&self, rel: &Path, bytes: &[u8], st: &FileStat) -> nix::Result<()> {
        let (dir, name) = self.parent(rel)?;
        let new = temp_name(name, "new");
        let _ = nix::unistd::unlinkat(
            &dir,
            new.as_os_str(),
            nix::unistd::UnlinkatFlags::NoRemoveDir,
        );
        let fd = nix::fcntl::openat(
            &dir,
            new.as_os_str(),
            OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_WRONLY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Mode::from_bits_truncate(0o600),
        )?;
        let mut file = std::fs::File::from(fd);
        let io = io_errno;
        file.write_all(bytes).map_err(io)?;
        let regular = kind(st) == SFlag::S_IFREG;
        let (uid, gid, mode) = if regular {
            (st.st_uid, st.st_gid, st.st_mode & 0o7777)
        } else {
            (0, 0, 0o644)
        };
        // Owner, then mode (a chown clears setuid bits), then xattrs (a chown would drop a
        // capability).
        nix::unistd::fchown(&file, Some(uid.into()), Some(gid.into()))?;
        nix::sys::stat::fchmod(&file, Mode::from_bits_truncate(mode))?;
        if regular {
            let old = self.open_at(rel, OFlag::O_RDONLY | OFlag::O_NONBLOCK)?;
            let old = std::fs::File::from(old);
            for key in xattr::FileExt::list_xattr(&old).map_err(io)? {
                if let Some(value) = xattr::FileExt::get_xattr(&old, &key).map_err(io)? {
                    xattr::FileExt::set_xattr(&file, &key, &value).map_err(io)?;
                }
            }
        }
        file.sync_all().map_err(io)?;
        drop(file);
        self.keep_orig(&dir, name)?;
        nix::fcntl::renameat(&dir, new.as_os_str(), &dir, name)
    }

    /// Links the entry `name` of `dir` to `name.cowherd-orig` (replacing an older one), so
    /// the original stays while `name` is replaced.
    fn keep_orig(&self, dir: &OwnedFd, name: &OsStr) -> nix::Result<()> {
        let link = temp_name(name, "orig");
        let _ = nix::unistd::unlinkat(
            dir,
            link.as_os_str(),
            nix::unistd::UnlinkatFlags::NoRemoveDir,
        );
        nix::unistd::linkat(dir, name, dir, link.as_os_str(), AtFlags::empty())?;
        nix::fcntl::renameat(dir, link.as_os_str(), dir, orig_name(name).as_os_str())
    }

    /// Masks a systemd unit: `rel` becomes a symlink to `/dev/null` (an entry already there
    /// is kept as `rel.cowherd-orig`), its missing parent directories made (root, 0755).
    /// Returns whether anything changed.
    fn mask(&self, rel: &Path) -> nix::Result<bool> {
        let parent = rel.parent().unwrap_or(Path::new(""));
        self.make_dirs(parent)?;
        let (dir, name) = self.parent(rel)?;
        match nix::sys::stat::fstatat(&dir, name, AtFlags::AT_SYMLINK_NOFOLLOW) {
            Ok(st) if kind(&st) == SFlag::S_IFLNK => {
                if nix::fcntl::readlinkat(&dir, name)?.as_os_str() == "/dev/null" {
                    return Ok(false);
                }
                self.keep_orig(&dir, name)?;
            }
            Ok(st) if kind(&st) == SFlag::S_IFDIR => return Err(Errno::EISDIR),
            Ok(_) => self.keep_orig(&dir, name)?,
            Err(Errno::ENOENT) => {}
            Err(e) => return Err(e),
        }
        let new = temp_name(name, "new");
        let _ = nix::unistd::unlinkat(
            &dir,
            new.as_os_str(),
            nix::unistd::UnlinkatFlags::NoRemoveDir,
        );
        nix::unistd::symlinkat("/dev/null", &dir, new.as_os_str())?;
        nix::fcntl::renameat(&dir, new.as_os_str(), &dir, name)?;
        Ok(true)
    }

    /// Makes the directory `rel` and its missing parents (root, 0755), below the top.
    fn make_dirs(&self, rel: &Path) -> nix::Result<()> {
        let mut done = PathBuf::new();
        for part in rel.components() {
            let Component::Normal(part) = part else {
                return Err(Errno::EINVAL);
            };
            let parent = self.dir(&done)?;
            match nix::sys::stat::mkdirat(&parent, part, Mode::from_bits_truncate(0o755)) {
                Ok(()) | Err(Errno::EEXIST) => {}
                Err(e) => return Err(e),
            }
            done.push(part);
        }
        // The last one opened beneath: a symlink planted there is refused (ELOOP).
        self.dir(&done).map(drop)
    }
}

/// `NAME.cowherd-orig`.
fn orig_name(name: &OsStr) -> OsString {
    let mut orig = name.to_os_string();
    orig.push(ORIG_SUFFIX);
    orig
}

/// `.NAME.cowherd-WHAT`: a temporary name beside `NAME`.
fn temp_name(name: &OsStr, what: &str) -> OsString {
    let mut temp = OsString::from(".");
    temp.push(name);
    temp.push(format!(".cowherd-{what}"));
    temp
}

/// The errno of an I/O error (`EIO` if it has none).
fn io_errno(error: std::io::Error) -> Errno {
    error.raw_os_error().map_or(Errno::EIO, Errno::from_raw)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::fs;
    use std::os::unix::fs::symlink;

    #[test]
    fn sources_are_read_as_rsync_reads_them() {
        let ssh = |user: Option<&str>, host: &str, path: &str| Source::Ssh {
            user: user.map(str::to_string),
            host: host.to_string(),
            path: PathBuf::from(path),
        };
        let daemon = |url: &str| Source::Daemon {
            url: url.to_string(),
        };
        let cases = [
            ("root@web01:/", ssh(Some("root"), "web01", "/")),
            (
                "web01.example.org:/srv/machine/",
                ssh(None, "web01.example.org", "/srv/machine/"),
            ),
            ("root@[::1]:/", ssh(Some("root"), "::1", "/")),
            ("rsync://10.0.0.5/root/", daemon("rsync://10.0.0.5/root")),
            (
                "rsync://10.0.0.5:8873/root/sub",
                daemon("rsync://10.0.0.5:8873/root/sub"),
            ),
            ("rsync://[fe80::1]:873/m", daemon("rsync://[fe80::1]:873/m")),
            ("backup::machine/", daemon("rsync://backup/machine")),
            ("/mnt/old-disk", Source::Local("/mnt/old-disk".into())),
            ("./a:b", Source::Local("a:b".into())),
            ("./here", Source::Local("./here".into())),
            ("relative/dir", Source::Local("relative/dir".into())),
            (
                "/backups/web01.tar.zst",
                Source::Tarball("/backups/web01.tar.zst".into()),
            ),
            ("web01.tgz", Source::Tarball("web01.tgz".into())),
            ("/b/x.tar", Source::Tarball("/b/x.tar".into())),
        ];
        for (spec, want) in cases {
            assert_eq!(spec.parse::<Source>().unwrap(), want, "{spec}");
        }
    }

    #[test]
    fn bad_sources_are_refused_saying_why() {
        for (spec, why) in [
            ("", "empty"),
            ("host:relative/path", "absolute path"),
            ("host:", "absolute path"),
            ("@host:/", "user name"),
            ("rsync://host", "module"),
            ("rsync://host/", "module"),
            ("rsync://host:99999/m", "port"),
            ("rsync://host:0/m", "port"),
            ("rsync:///m", "host"),
            ("[::1:/", "not closed"),
            ("[zz]:/", "IPv6"),
            ("a b:/", "space"),
            ("user@host::mod", "RSYNC_USERNAME"),
            ("host:/a\nb", "control"),
            ("-oProxyCommand=x:/", "starts with `-`"),
            ("-l@host:/", "starts with `-`"),
            ("rsync://-host/m", "starts with `-`"),
        ] {
            let err = spec.parse::<Source>().unwrap_err();
            assert!(
                matches!(err, ImportError::BadSource { .. }),
                "{spec}: {err}"
            );
            assert!(err.to_string().contains(why), "{spec}: {err}");
            assert!(
                err.to_string().contains(&format!("{spec:?}")),
                "{spec}: {err}"
            );
        }
    }

    /// Sources whose [`Display`](fmt::Display) [`FromStr`] reads back.
    fn any_source() -> impl Strategy<Value = Source> {
        let word = "[a-z][a-z0-9_-]{0,8}";
        let host = prop_oneof![
            "[a-z][a-z0-9-]{0,10}(\\.[a-z][a-z0-9-]{0,6}){0,2}",
            "(25[0-5]|[0-9]{1,2})(\\.(25[0-5]|[0-9]{1,2})){3}",
            "[0-9a-f]{1,4}(:[0-9a-f]{0,4}){2,7}",
        ];
        let abs_path = "(/[A-Za-z0-9._ :@-]{1,12}){0,4}/?"
            .prop_map(|p| if p.is_empty() { "/".to_string() } else { p });
        prop_oneof![
            (proptest::option::of(word), host.clone(), abs_path.clone()).prop_map(
                |(user, host, path)| Source::Ssh {
                    user,
                    host,
                    path: PathBuf::from(path),
                }
            ),
            (
                host,
                proptest::option::of(1..=65535u16),
                word,
                "(/[A-Za-z0-9._-]{1,8}){0,3}"
            )
                .prop_map(|(host, port, module, path)| {
                    let host = if host.contains(':') {
                        format!("[{host}]")
                    } else {
                        host
                    };
                    let port = port.map(|p| format!(":{p}")).unwrap_or_default();
                    Source::Daemon {
                        url: format!("rsync://{host}{port}/{module}{path}"),
                    }
                }),
            abs_path
                .clone()
                .prop_filter("not a tarball name", |p| !is_tarball_name(p))
                .prop_map(|p| Source::Local(PathBuf::from(p))),
            "[a-z][a-z0-9_:-]{0,10}(/[a-z0-9_:-]{1,8}){0,2}"
                .prop_filter("not a tarball name", |p| !is_tarball_name(p))
                .prop_map(|p| Source::Local(PathBuf::from(p))),
            (abs_path, prop::sample::select(TARBALL_ENDINGS.to_vec())).prop_map(|(p, ending)| {
                Source::Tarball(PathBuf::from(format!(
                    "{}/m{ending}",
                    p.trim_end_matches('/')
                )))
            }),
        ]
    }

    proptest! {
        #[test]
        fn a_source_reads_back_from_its_display(source in any_source()) {
            let shown = source.to_string();
            let parsed: Source = shown.parse().map_err(|e| TestCaseError::fail(format!("{shown}: {e}")))?;
            prop_assert_eq!(parsed, source);
        }

        #[test]
        fn parsing_never_panics_and_a_path_is_local(spec in "\\PC{0,40}") {
            if let Ok(source) = spec.parse::<Source>() {
                if spec.starts_with('/') {
                    prop_assert!(matches!(source, Source::Local(_) | Source::Tarball(_)), "{}", spec);
                }
                if spec.starts_with("rsync://") {
                    prop_assert!(matches!(source, Source::Daemon { .. }), "{}", spec);
                }
            }
        }

        #[test]
        fn the_rsync_argument_ends_in_one_slash(source in any_source()) {
            let arg = source.rsync_arg(Path::new(""));
            let bytes = arg.as_bytes();
            prop_assert!(bytes.ends_with(b"/"));
            let sub = source.rsync_arg(Path::new("srv"));
            prop_assert!(sub.as_bytes().ends_with(b"/srv/"), "{:?}", sub);
        }
    }

    #[test]
    fn rsync_statistics_are_read_with_or_without_separators() {
        let out = "\nNumber of files: 1,234 (reg: 1,000, dir: 200, link: 34)\n\
            Number of created files: 3 (reg: 1, dir: 2)\nNumber of deleted files: 0\n\
            Number of regular files transferred: 17\nTotal file size: 12,345,678 bytes\n\
            Total transferred file size: 9,000 bytes\nLiteral data: 4096 bytes\n\
            Matched data: 0 bytes\nFile list size: 0\nTotal bytes sent: 178\n\
            Total bytes received: 43\n\nsent 178 bytes  received 43 bytes\n";
        assert_eq!(
            parse_stats(out),
            Stats {
                files: 1234,
                bytes: 12_345_678,
                transferred_files: 17,
                literal_bytes: 4096,
                wire_bytes: 221,
            }
        );
    }

    #[test]
    fn the_copy_error_is_the_last_meaningful_line() {
        let refused = "rsync: [Receiver] failed to connect to 127.0.0.1 (127.0.0.1): Connection refused (111)\n\
            rsync error: error in socket IO (code 10) at clientserver.c(165) [Receiver=3.5.0]\n";
        assert_eq!(
            copy_message("rsync", refused, Some(10)),
            "failed to connect to 127.0.0.1 (127.0.0.1): Connection refused (111) (rsync exit code 10)"
        );
        let ssh = "ssh: Could not resolve hostname nowhere.invalid: Name or service not known\r\n\
            rsync: connection unexpectedly closed (0 bytes received so far) [Receiver]\n\
            rsync error: unexplained error (code 255) at io.c(285) [Receiver=3.5.0]\n";
        assert_eq!(
            copy_message("rsync", ssh, Some(255)),
            "ssh: Could not resolve hostname nowhere.invalid: Name or service not known (rsync exit code 255)"
        );
        assert_eq!(
            copy_message("tar", "", None),
            "tar failed (killed by a signal)"
        );
        let only_summary = "rsync error: some files/attrs were not transferred (code 23)\n";
        assert!(copy_message("rsync", only_summary, Some(23)).starts_with("rsync error: some"));
    }

    #[test]
    fn remote_shell_commands_split_like_rsync_splits_them() {
        assert_eq!(
            split_rsh("ssh -p 2222 -i '/k ey' -o \"A=b c\""),
            ["ssh", "-p", "2222", "-i", "/k ey", "-o", "A=b c"]
        );
        assert_eq!(split_rsh("  ssh  "), ["ssh"]);
        assert_eq!(split_rsh("ssh ''"), ["ssh", ""]);
    }

    #[test]
    fn included_mounts_are_checked_and_made_relative() {
        let ok = included_mounts(&["/srv/data".into(), "/srv".into(), "/srv/".into()]).unwrap();
        assert_eq!(ok, [PathBuf::from("srv"), PathBuf::from("srv/data")]);
        for bad in ["srv", "/", "/proc", "/run/user", "/srv/../etc"] {
            let err = included_mounts(&[bad.into()]).unwrap_err();
            assert!(
                matches!(err, ImportError::BadIncludeMount { .. }),
                "{bad}: {err}"
            );
        }
    }

    /// Regression (review): rsync resolves an included mount's destination itself, following
    /// symlinks, so a symlink the machine planted on the way (here `srv` aimed at a host
    /// directory) must be refused, not followed out of the staging tree.
    #[test]
    fn an_included_mounts_destination_never_follows_a_symlink() {
        let dir = tempfile::tempdir().unwrap();
        let staging = dir.path().join("staging");
        let host = dir.path().join("host-etc");
        fs::create_dir_all(&staging).unwrap();
        fs::create_dir_all(&host).unwrap();
        symlink(&host, staging.join("srv")).unwrap();
        fs::write(staging.join("file"), b"x").unwrap();
        for rel in ["srv/www", "srv", "file/www"] {
            let err = real_dirs(&staging, Path::new(rel)).unwrap_err();
            assert!(
                matches!(err, ImportError::BadIncludeMount { .. }),
                "{rel}: {err}"
            );
            assert!(
                err.to_string().contains("symlink or a file"),
                "{rel}: {err}"
            );
        }
        assert_eq!(fs::read_dir(&host).unwrap().count(), 0, "made outside");
        real_dirs(&staging, Path::new("data/www")).unwrap();
        assert!(staging.join("data/www").is_dir());
        real_dirs(&staging, Path::new("data/www")).unwrap();
    }

    #[test]
    fn ifupdown_configuration_is_read_for_physical_interfaces() {
        let text = "source /etc/network/interfaces.d/*\n\nauto lo\niface lo inet loopback\n\n\
            # the uplink\nallow-hotplug enp3s0\niface enp3s0 inet static\n    address 192.0.2.10/24\n\
            iface enp3s0 inet6 auto\nauto br0\niface br0 inet dhcp\n  bridge_ports eth1\n";
        let parsed = parse_interfaces(text);
        assert_eq!(
            parsed.physical,
            ["enp3s0 (inet static, inet6 auto)", "br0 (inet dhcp)"]
        );
        assert!(parsed.sources);
        assert_eq!(
            parse_interfaces("auto lo\niface lo inet loopback\n"),
            Interfaces::default()
        );
    }

    #[test]
    fn only_gettys_on_real_ttys_are_commented_out() {
        let text = "id:2:initdefault:\n1:2345:respawn:/sbin/getty --noclear 38400 tty1\n\
            2:23:respawn:/sbin/getty 38400 tty2\n#3:23:respawn:/sbin/getty 38400 tty3\n\
            T0:23:respawn:/sbin/getty -L ttyS0 9600 vt100\nco:2345:respawn:/sbin/agetty console 115200\n\
            ca:12345:ctrlaltdel:/sbin/shutdown -t1 -a -r now";
        let (new, count) = comment_tty_gettys(text);
        assert_eq!(count, 3);
        assert_eq!(
            new,
            "id:2:initdefault:\n#1:2345:respawn:/sbin/getty --noclear 38400 tty1\n\
            #2:23:respawn:/sbin/getty 38400 tty2\n#3:23:respawn:/sbin/getty 38400 tty3\n\
            #T0:23:respawn:/sbin/getty -L ttyS0 9600 vt100\nco:2345:respawn:/sbin/agetty console 115200\n\
            ca:12345:ctrlaltdel:/sbin/shutdown -t1 -a -r now"
        );
        assert_eq!(comment_tty_gettys(&new), (new.clone(), 0));
    }

    const FSTAB: &str = "UUID=1234 / ext4 errors=remount-ro 0 1\n/dev/sdb1 /srv xfs defaults 0 2\n";
    const INTERFACES: &str = "auto lo\niface lo inet loopback\nauto eth0\niface eth0 inet static\n  address 192.0.2.1/24\n";

    /// A machine's tree with everything the fixups change.
    fn machine(dir: &Path) {
        let write = |rel: &str, text: &str| {
            let path = dir.join(rel);
            fs::create_dir_all(path.parent().unwrap()).unwrap();
            fs::write(path, text).unwrap();
        };
        write("etc/fstab", FSTAB);
        write(
            "etc/udev/rules.d/70-persistent-net.rules",
            "SUBSYSTEM==\"net\"\n",
        );
        write(
            "etc/udev/rules.d/75-persistent-net-generator.rules",
            "# gen\n",
        );
        write("etc/udev/rules.d/99-local.rules", "# mine\n");
        write("etc/network/interfaces", INTERFACES);
        write("etc/inittab", "1:2345:respawn:/sbin/getty 38400 tty1\n");
        write("etc/hostname", "web01\n");
        write("etc/netplan/01-netcfg.yaml", "network: {}\n");
        write("usr/lib/systemd/system/getty@.service", "[Unit]\n");
        write("usr/lib/systemd/system/smartmontools.service", "[Unit]\n");
        write(
            "etc/systemd/system/smartd.service",
            "[Unit]\n# an override\n",
        );
        fs::set_permissions(dir.join("etc/fstab"), fs::Permissions::from_mode(0o640)).unwrap();
    }

    #[test]
    fn the_fixups_make_a_guest_and_keep_every_original() {
        let dir = tempfile::tempdir().unwrap();
        machine(dir.path());
        let done = apply_fixups(dir.path()).unwrap();
        let read = |rel: &str| fs::read_to_string(dir.path().join(rel)).unwrap();
        let link = |rel: &str| fs::read_link(dir.path().join(rel)).unwrap();
        assert_eq!(read("etc/fstab"), NEUTRAL_FSTAB);
        assert_eq!(read("etc/fstab.cowherd-orig"), FSTAB);
        let mode = fs::metadata(dir.path().join("etc/fstab"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(
            mode & 0o7777,
            0o640,
            "the new fstab keeps the old one's mode"
        );
        assert!(
            !dir.path()
                .join("etc/udev/rules.d/70-persistent-net.rules")
                .exists()
        );
        assert!(
            !dir.path()
                .join("etc/udev/rules.d/75-persistent-net-generator.rules")
                .exists()
        );
        assert_eq!(
            read("etc/udev/rules.d/70-persistent-net.rules.cowherd-orig"),
            "SUBSYSTEM==\"net\"\n"
        );
        assert_eq!(read("etc/udev/rules.d/99-local.rules"), "# mine\n");
        assert_eq!(read("etc/network/interfaces"), GUEST_INTERFACES);
        assert_eq!(read("etc/network/interfaces.cowherd-orig"), INTERFACES);
        assert_eq!(
            read("etc/inittab"),
            "#1:2345:respawn:/sbin/getty 38400 tty1\n"
        );
        assert_eq!(read("etc/hostname"), "web01\n");
        for unit in [
            "getty@tty1.service",
            "getty@tty6.service",
            "smartmontools.service",
            "smartd.service",
        ] {
            assert_eq!(
                link(&format!("etc/systemd/system/{unit}")),
                Path::new("/dev/null"),
                "{unit}"
            );
        }
        assert_eq!(
            read("etc/systemd/system/smartd.service.cowherd-orig"),
            "[Unit]\n# an override\n"
        );
        for unit in ["hwclock.service", "serial-getty@ttyS0.service"] {
            assert!(
                fs::symlink_metadata(dir.path().join("etc/systemd/system").join(unit)).is_err(),
                "{unit}"
            );
        }
        assert_eq!(done.fixups.len(), 1 + 2 + 8 + 1 + 1, "{:#?}", done.fixups);
        assert!(
            done.fixups[0].contains("2 mount line(s)"),
            "{}",
            done.fixups[0]
        );
        assert!(
            done.fixups.iter().any(|f| f.contains("eth0 (inet static)")),
            "{:#?}",
            done.fixups
        );
        assert_eq!(done.warnings.len(), 1, "{:#?}", done.warnings);
        assert!(done.warnings[0].contains("netplan"), "{:#?}", done.warnings);

        let again = apply_fixups(dir.path()).unwrap();
        assert_eq!(
            again.fixups,
            Vec::<String>::new(),
            "applied twice, they change nothing"
        );
        assert_eq!(read("etc/fstab.cowherd-orig"), FSTAB);
        assert_eq!(read("etc/network/interfaces.cowherd-orig"), INTERFACES);
        let tree = Beneath::open(dir.path()).unwrap();
        assert_eq!(machine_hostname(&tree).as_deref(), Some("web01"));
    }

    #[test]
    fn the_fixups_never_follow_a_symlink_out_of_the_tree() {
        let outside = tempfile::tempdir().unwrap();
        machine(outside.path());
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir_all(dir.path().join("etc/network")).unwrap();
        fs::create_dir_all(dir.path().join("usr/lib/systemd/system")).unwrap();
        fs::write(dir.path().join("usr/lib/systemd/system/getty@.service"), "").unwrap();
        symlink(
            outside.path().join("etc/fstab"),
            dir.path().join("etc/fstab"),
        )
        .unwrap();
        symlink(outside.path().join("etc/udev"), dir.path().join("etc/udev")).unwrap();
        symlink(
            outside.path().join("etc/systemd"),
            dir.path().join("etc/systemd"),
        )
        .unwrap();
        symlink(
            outside.path().join("etc/network/interfaces"),
            dir.path().join("etc/network/interfaces"),
        )
        .unwrap();
        symlink(
            outside.path().join("etc/inittab"),
            dir.path().join("etc/inittab"),
        )
        .unwrap();
        let done = apply_fixups(dir.path()).unwrap();

        let before = tempfile::tempdir().unwrap();
        machine(before.path());
        for rel in [
            "etc/fstab",
            "etc/udev/rules.d/70-persistent-net.rules",
            "etc/network/interfaces",
            "etc/inittab",
            "etc/systemd/system/smartd.service",
        ] {
            assert_eq!(
                fs::read(outside.path().join(rel)).unwrap(),
                fs::read(before.path().join(rel)).unwrap(),
                "{rel} outside the tree changed"
            );
        }
        assert!(!outside.path().join("etc/fstab.cowherd-orig").exists());
        assert!(
            !outside
                .path()
                .join("etc/systemd/system/getty@tty1.service")
                .exists()
        );
        // The symlinked fstab itself is replaced (a rename, never a write through it).
        assert_eq!(
            fs::read_to_string(dir.path().join("etc/fstab")).unwrap(),
            NEUTRAL_FSTAB
        );
        assert!(
            fs::symlink_metadata(dir.path().join("etc/fstab.cowherd-orig"))
                .unwrap()
                .file_type()
                .is_symlink()
        );
        assert!(
            fs::symlink_metadata(dir.path().join("etc/network/interfaces"))
                .unwrap()
                .file_type()
                .is_symlink()
        );
        for what in ["etc/udev/rules.d", "etc/systemd/system/getty@tty1.service"] {
            assert!(
                done.warnings.iter().any(|w| w.contains(what)),
                "{what}: {:#?}",
                done.warnings
            );
        }
    }
}
