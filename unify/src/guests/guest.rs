//! Guests: the on-disk layout of one guest, the `guest.toml` record, adoption of an existing
//! tree, listing, the offline check, and opening a guest for unification (its base directory fd
//! and marker policy).
//!
//! ```text
//! guests/<name>/
//! ├── guest.toml   the record: origin, hostname, mount point (adopt --in-place), marker policy
//! ├── base/        overlay lower layer: the guest's tree; unified files are store hardlinks
//! ├── upper/       overlay upper layer: what the guest changed (copies up, new files,
//! │                whiteouts); private to the guest, emptied into base/ by `fold`
//! ├── work/        overlayfs work directory (emptied by `fold`)
//! ├── rootfs/      the overlay's mount point, unless the record names another
//! ├── tmp/         scratch of fold and split (new names, trash, the old upper); never part of
//! │                what the guest sees, emptied by the next fold, split or destroy
//! └── resync/      an import's second pass being built (`import --resync`), swapped with
//!                  base/ when complete; a stale one is removed by the next resync
//! ```

use std::ffi::OsStr;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use nix::fcntl::OFlag;
use serde::{Deserialize, Serialize};

use crate::error::{Error, PathContext, Result};
use crate::fsx;
use crate::mountinfo::{MountEntry, MountTable, overlay_layers};
use crate::policy::{Policy, PolicyFile, load_policy_file, read_dpkg_conffiles};
use crate::root::HostRoot;
use crate::store;

/// Suffix of a guest directory whose adoption has not finished (`guests/.NAME.adopting`).
const ADOPTING: &str = ".adopting";
/// Suffix of a guest directory being destroyed (`guests/.NAME.destroying`).
pub(crate) const DESTROYING: &str = ".destroying";
/// Suffix of a guest directory being created (`guests/.NAME.creating`).
pub(crate) const CREATING: &str = ".creating";

/// Where a guest came from.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OriginKind {
    /// An existing directory tree moved in with `cowherd adopt`.
    Adopted,
    /// Created from a cached template.
    Template,
    /// Imported from a physical machine.
    Import,
}

/// The guest's origin as recorded in `guest.toml`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Origin {
    /// How the guest came to be.
    pub kind: OriginKind,
    /// The source path or address, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// The template it was made from, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub template: Option<String>,
}

/// The contents of `guests/<name>/guest.toml`.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GuestRecord {
    /// The guest's name (also its directory name).
    pub name: String,
    /// When the guest was created (seconds since the epoch).
    pub created_unix: i64,
    /// Its hostname inside `cowherd exec` (default: its name).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
    /// Where its overlay is mounted when that is not `guests/<name>/rootfs`: the path its
    /// runtime expects (set by `adopt --in-place`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mount_point: Option<PathBuf>,
    /// Where it came from.
    pub origin: Origin,
    /// Per-guest marker rules, tried before the root's `policy.toml`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy: Option<PolicyFile>,
}

impl GuestRecord {
    /// Reads a record.
    ///
    /// # Errors
    /// [`Error::Io`] if unreadable, [`Error::BadRecord`] if not valid TOML of this form.
    pub fn load(path: &Path) -> Result<GuestRecord> {
        let text = std::fs::read_to_string(path).at(path)?;
        toml::from_str(&text).map_err(|e| Error::BadRecord {
            path: path.to_path_buf(),
            message: e.to_string(),
        })
    }

    fn to_toml(&self) -> String {
        toml::to_string(self).expect("a guest record always serializes")
    }

    /// Writes the record to `path` atomically.
    ///
    /// # Errors
    /// [`Error::Io`].
    pub(crate) fn save(&self, path: &Path) -> Result<()> {
        fsx::write_atomic(path, self.to_toml().as_bytes())
    }

    /// The hostname a command run in the guest sees.
    pub fn hostname(&self) -> &str {
        self.hostname.as_deref().unwrap_or(&self.name)
    }
}

/// The paths of one guest's directory (the picture at the top of this module).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GuestPaths {
    /// The guest's name.
    pub name: String,
    /// `guests/<name>`.
    pub dir: PathBuf,
    /// The lower layer.
    pub base: PathBuf,
    /// The upper layer.
    pub upper: PathBuf,
    /// The overlay work directory.
    pub work: PathBuf,
    /// Where the overlay is mounted: `rootfs/`, or the record's mount point.
    pub mount_point: PathBuf,
    /// Scratch of fold and split.
    pub tmp: PathBuf,
}

impl GuestPaths {
    /// The paths of guest `name` of `root`, with its record's mount point.
    pub fn new(root: &HostRoot, record: &GuestRecord) -> GuestPaths {
        let dir = root.guests_dir().join(&record.name);
        GuestPaths {
            name: record.name.clone(),
            base: dir.join("base"),
            upper: dir.join("upper"),
            work: dir.join("work"),
            mount_point: record
                .mount_point
                .clone()
                .unwrap_or_else(|| dir.join("rootfs")),
            tmp: dir.join("tmp"),
            dir,
        }
    }
}

/// Checks a guest name: 1–64 of `[A-Za-z0-9._-]`, not starting with `.` or `-`.
///
/// # Errors
/// [`Error::BadGuestName`].
pub fn validate_guest_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && !name.starts_with(['.', '-'])
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(Error::BadGuestName {
            name: name.to_string(),
        })
    }
}

pub(crate) fn now_unix() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// Moves the tree at `src` into `guests/<name>/base` by `rename` and records it. With
/// `in_place`, `src` becomes the guest's mount point: an empty directory is left there and its
/// path recorded, so a runtime configured for `src` finds the guest's overlay where it looked
/// before.
///
/// # Algorithm
/// The guest directory is built as `guests/.<name>.adopting` (record, `upper/`, `work/`,
/// `rootfs/`), the tree is renamed into it as `base`, then the directory is renamed to
/// `guests/<name>`, then (`in_place`) an empty directory is made at `src`. A run killed in
/// between is completed by the next writer.
///
/// # Errors
/// [`Error::BadGuestName`], [`Error::GuestExists`], [`Error::Symlink`] if `src` is a
/// symlink, [`Error::NotADirectory`], [`Error::CrossFilesystem`] if `src` is not on the
/// root's filesystem (adopt never copies), [`Error::BadRecord`] for a directory inside or
/// above the root (or, `in_place`, a path that is not UTF-8), [`Error::Io`].
pub fn adopt(root: &HostRoot, src: &Path, name: &str, in_place: bool) -> Result<GuestRecord> {
    validate_guest_name(name)?;
    let st = fsx::lstat_path(src)?;
    if st.mode & libc::S_IFMT == libc::S_IFLNK {
        return Err(Error::Symlink {
            path: src.to_path_buf(),
        });
    }
    if !st.is_dir() {
        return Err(Error::NotADirectory {
            path: src.to_path_buf(),
        });
    }
    root.check_same_fs(&st, src)?;
    let abs = std::fs::canonicalize(src).at(src)?;
    if abs.starts_with(root.path()) || root.path().starts_with(&abs) {
        return Err(Error::BadRecord {
            path: abs,
            message: format!(
                "cannot adopt a directory inside or above the cowherd root {}",
                root.path().display()
            ),
        });
    }
    let dest = root.guests_dir().join(name);
    if std::fs::symlink_metadata(&dest).is_ok() {
        return Err(Error::GuestExists {
            name: name.to_string(),
            path: dest,
        });
    }
    let (_, foreign) = crate::manifest::TreeManifest::take(&abs)?;
    if !foreign.paths.is_empty() {
        return Err(Error::OverlayMetadata {
            path: abs,
            count: foreign.paths.len(),
            first: crate::manifest::first_paths(&foreign.paths),
        });
    }
    let staging = root.guests_dir().join(format!(".{name}{ADOPTING}"));
    if std::fs::symlink_metadata(&staging).is_ok() {
        std::fs::remove_dir_all(&staging).at(&staging)?;
    }
    fsx::ensure_dir(&staging, 0o755)?;
    for (dir, mode) in [("upper", 0o755), ("work", 0o700), ("rootfs", 0o755)] {
        fsx::ensure_dir(&staging.join(dir), mode)?;
    }
    if in_place && abs.to_str().is_none() {
        return Err(Error::BadRecord {
            path: abs,
            message: "a mount point recorded in guest.toml must be UTF-8; rename the directory"
                .into(),
        });
    }
    let record = GuestRecord {
        name: name.to_string(),
        created_unix: now_unix(),
        hostname: None,
        mount_point: in_place.then(|| abs.clone()),
        origin: Origin {
            kind: OriginKind::Adopted,
            path: Some(abs.to_string_lossy().into_owned()),
            template: None,
        },
        policy: None,
    };
    record.save(&staging.join("guest.toml"))?;
    std::fs::rename(&abs, staging.join("base")).map_err(|e| {
        if e.raw_os_error() == Some(libc::EXDEV) {
            Error::CrossFilesystem {
                path: abs.clone(),
                other: root.guests_dir(),
            }
        } else {
            Error::Io {
                path: abs.clone(),
                error: e,
            }
        }
    })?;
    nix::fcntl::renameat2(
        root.guests_fd(),
        staging.file_name().unwrap_or_default(),
        root.guests_fd(),
        name,
        nix::fcntl::RenameFlags::RENAME_NOREPLACE,
    )
    .at(&dest)?;
    make_mount_point(&record)?;
    root.index.guest_id(name)?;
    Ok(record)
}

/// Makes the empty directory an in-place guest is mounted on, if it is missing.
fn make_mount_point(record: &GuestRecord) -> Result<()> {
    match &record.mount_point {
        Some(p) if std::fs::symlink_metadata(p).is_err() => fsx::ensure_dir(p, 0o755),
        _ => Ok(()),
    }
}

/// Finishes or undoes adoptions a killed run left in `guests/.NAME.adopting`.
pub(crate) fn recover_adoptions(root: &HostRoot) -> Result<()> {
    let dir = root.guests_dir();
    for entry in std::fs::read_dir(&dir).at(&dir)? {
        let entry = entry.at(&dir)?;
        let file_name = entry.file_name();
        let raw = file_name.as_bytes();
        let Some(name) = raw
            .strip_prefix(b".")
            .and_then(|n| n.strip_suffix(ADOPTING.as_bytes()))
        else {
            continue;
        };
        let staging = entry.path();
        let name = OsStr::from_bytes(name);
        if std::fs::symlink_metadata(staging.join("base")).is_ok() {
            if std::fs::symlink_metadata(dir.join(name)).is_err() {
                std::fs::rename(&staging, dir.join(name)).at(&staging)?;
                make_mount_point(&GuestRecord::load(&dir.join(name).join("guest.toml"))?)?;
            }
        } else {
            std::fs::remove_dir_all(&staging).at(&staging)?;
        }
    }
    Ok(())
}

/// Removes `guests/<doomed>` and puts back the immutable flags cleared on the way.
pub(crate) fn remove_doomed(root: &HostRoot, doomed: &str) -> Result<()> {
    store::remove_guest_tree(
        root,
        root.guests_fd(),
        &root.guests_dir(),
        doomed.as_bytes(),
    )
}

/// Finishes destroys and removes creations a killed run left (`guests/.NAME.destroying`,
/// `guests/.NAME.creating`), as far as it can: what cannot be removed now stays for the next
/// writer (it is no guest's), so that one bad leftover never stops every command.
pub(crate) fn recover_destroys(root: &HostRoot) -> Result<()> {
    let dir = root.guests_dir();
    for entry in std::fs::read_dir(&dir).at(&dir)? {
        let name = entry.at(&dir)?.file_name();
        if let Some(name) = name.to_str()
            && name.starts_with('.')
            && (name.ends_with(DESTROYING) || name.ends_with(CREATING))
        {
            let _ = remove_doomed(root, name);
        }
    }
    Ok(())
}

/// Sets the inode flags of the `flags` journal rows (of one guest, or all) on the base entries
/// they name and removes the `protattr` xattr that carried them in the upper layer. A row is
/// dropped once its guest has no `tmp/`: while the old upper layer may still be there, removing
/// it clears the flags of the inodes it shares with base, and the row must set them again.
///
/// # Errors
/// Index errors, and setting a flag failing otherwise than by the entry being gone.
pub(crate) fn apply_flag_journal(root: &HostRoot, guest_id: Option<i64>) -> Result<()> {
    let idx = &root.index;
    let rows: Vec<(i64, String, Vec<u8>, i64)> = {
        let mut stmt = idx
            .conn
            .prepare(
                "SELECT j.id, g.name, j.path, j.value FROM journal j JOIN guests g ON g.id = j.guest_id
                 WHERE j.op = 'flags' AND (?1 IS NULL OR j.guest_id = ?1)",
            )
            .map_err(|e| idx.err(e))?;
        stmt.query_map([guest_id], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?))
        })
        .and_then(|rows| rows.collect())
        .map_err(|e| idx.err(e))?
    };
    for (id, name, rel, bits) in rows {
        let mut path = format!("{name}/base").into_bytes();
        if !rel.is_empty() {
            path.push(b'/');
            path.extend_from_slice(&rel);
        }
        let shown = fsx::join(&root.guests_dir(), &path);
        let flags = OFlag::O_RDONLY | OFlag::O_NONBLOCK | OFlag::O_NOFOLLOW;
        match fsx::open_beneath(root.guests_fd(), &path, flags) {
            Ok(fd) => {
                let bits = bits as libc::c_long;
                let set = crate::sys::get_flags(&fd).at(&shown)? as libc::c_long;
                // Applied already: an immutable inode takes no xattr change.
                if set & bits != bits {
                    let file = std::fs::File::from(fd);
                    match xattr::FileExt::remove_xattr(&file, "trusted.overlay.protattr") {
                        Ok(()) => {}
                        Err(e) if e.raw_os_error() == Some(libc::ENODATA) => {}
                        Err(e) => return Err(e).at(&shown),
                    }
                    crate::sys::add_flags(&file, bits).at(&shown)?;
                }
            }
            Err(nix::errno::Errno::ENOENT | nix::errno::Errno::ELOOP) => {}
            Err(e) => return Err(e).at(shown),
        }
        let scratch = root.guests_dir().join(&name).join("tmp");
        if std::fs::symlink_metadata(scratch).is_err() {
            idx.exec("DELETE FROM journal WHERE id = ?1", [id])?;
        }
    }
    Ok(())
}

/// The names of all guests, sorted.
///
/// # Errors
/// [`Error::Io`] if the guests directory cannot be read.
pub fn guest_names(root: &HostRoot) -> Result<Vec<String>> {
    let dir = root.guests_dir();
    let mut names = Vec::new();
    for entry in std::fs::read_dir(&dir).at(&dir)? {
        let entry = entry.at(&dir)?;
        let Ok(name) = entry.file_name().into_string() else {
            continue;
        };
        if validate_guest_name(&name).is_ok() {
            names.push(name);
        }
    }
    names.sort();
    Ok(names)
}

/// Reads a guest's record.
///
/// # Errors
/// [`Error::NoSuchGuest`] if there is no such guest, else as [`GuestRecord::load`].
pub fn guest_record(root: &HostRoot, name: &str) -> Result<GuestRecord> {
    validate_guest_name(name)?;
    let path = root.guests_dir().join(name).join("guest.toml");
    if std::fs::symlink_metadata(root.guests_dir().join(name)).is_err() {
        return Err(Error::NoSuchGuest {
            name: name.to_string(),
            path: root.guests_dir(),
        });
    }
    GuestRecord::load(&path)
}

/// A guest opened for unification.
pub(crate) struct OpenGuest {
    pub name: String,
    pub id: i64,
    pub base_path: PathBuf,
    pub base_fd: OwnedFd,
    pub policy: Policy,
}

impl OpenGuest {
    /// The guest's base directory fd.
    pub fn base(&self) -> BorrowedFd<'_> {
        self.base_fd.as_fd()
    }

    /// Host path of a guest-relative path, for messages.
    pub fn host_path(&self, rel: &[u8]) -> PathBuf {
        fsx::join(&self.base_path, rel)
    }

    /// Opens the parent directory of a guest path.
    pub fn open_parent(&self, rel: &[u8]) -> Result<OwnedFd> {
        let (parent, _) = fsx::split_parent(rel);
        fsx::open_dir_beneath(self.base(), &self.base_path, parent)
    }

    /// Opens a guest file for reading without following symlinks or updating its atime.
    pub fn open_file(&self, rel: &[u8]) -> nix::Result<OwnedFd> {
        use nix::fcntl::OFlag;
        let flags = OFlag::O_RDONLY | OFlag::O_NONBLOCK;
        match fsx::open_beneath(self.base(), rel, flags | OFlag::O_NOATIME) {
            Err(nix::errno::Errno::EPERM) => fsx::open_beneath(self.base(), rel, flags),
            other => other,
        }
    }
}

/// Opens guest `name` for unification.
///
/// # Errors
/// [`Error::NoSuchGuest`], [`Error::Symlink`] if the guest's directory or base is a
/// symlink, [`Error::CrossFilesystem`] if its base is on another filesystem (a mount),
/// policy errors naming the file. Whether the guest is offline is the caller's to check
/// ([`check_offline`]): reading base is safe while it is mounted, changing it is not.
pub(crate) fn open_guest(root: &HostRoot, name: &str) -> Result<OpenGuest> {
    let record = guest_record(root, name)?;
    let rel = format!("{name}/base");
    let base_path = root.guests_dir().join(&rel);
    let base_fd = fsx::open_dir_beneath(root.guests_fd(), &root.guests_dir(), rel.as_bytes())?;
    let record_path = root.guests_dir().join(name).join("guest.toml");
    open_tree(
        root,
        name,
        base_path,
        base_fd,
        record.policy.as_ref(),
        &record_path,
    )
}

/// Opens a tree of the root for unification under the index name `name`: a guest's base, or a
/// cached template's tree. Its own `policy` (from the file `policy_path`) is tried before the
/// root's `policy.toml`.
///
/// # Errors
/// [`Error::CrossFilesystem`] if the tree is on another filesystem, policy errors naming the
/// file, index errors.
pub(crate) fn open_tree(
    root: &HostRoot,
    name: &str,
    base_path: PathBuf,
    base_fd: OwnedFd,
    policy: Option<&PolicyFile>,
    policy_path: &Path,
) -> Result<OpenGuest> {
    let st = fsx::fstat(&base_fd).at(&base_path)?;
    root.check_same_fs(&st, &base_path)?;
    let default = load_policy_file(&root.policy_path())?;
    let own = policy.cloned().unwrap_or_default();
    let conffiles_on = own
        .dpkg_conffiles
        .or(default.dpkg_conffiles)
        .unwrap_or(true);
    let conffiles = if conffiles_on {
        read_dpkg_conffiles(base_fd.as_fd())?
    } else {
        Default::default()
    };
    let own_rules = own.parse_rules().map_err(|e| e.in_file(policy_path))?;
    let default_rules = default
        .parse_rules()
        .map_err(|e| e.in_file(&root.policy_path()))?;
    let policy = Policy::compile(&own_rules, &default_rules, conffiles)?;
    let id = root.index.guest_id(name)?;
    Ok(OpenGuest {
        name: name.to_string(),
        id,
        base_path,
        base_fd,
        policy,
    })
}

/// A guest checked to be offline, with its record, paths and directory fd: what every verb
/// that changes a guest's layers starts from.
pub(crate) struct OfflineGuest {
    pub record: GuestRecord,
    pub paths: GuestPaths,
    /// `guests/<name>`, opened beneath the guests directory.
    pub dir: OwnedFd,
}

impl OfflineGuest {
    /// Opens guest `name`, refusing it while it is in use anywhere on the host
    /// ([`check_offline`]).
    ///
    /// # Errors
    /// [`Error::NoSuchGuest`], [`Error::Mounted`], [`Error::InUse`], record and I/O errors.
    pub fn open(root: &HostRoot, name: &str) -> Result<OfflineGuest> {
        let record = guest_record(root, name)?;
        check_offline(
            root,
            &record,
            &MountTable::all().at("/proc/self/mountinfo")?,
        )?;
        let paths = GuestPaths::new(root, &record);
        let dir = fsx::open_dir_beneath(root.guests_fd(), &root.guests_dir(), name.as_bytes())?;
        Ok(OfflineGuest { record, paths, dir })
    }

    /// Opens the directory `rel` of the guest's directory (`base`, `upper`, `tmp`…).
    pub fn open_dir(&self, rel: &str) -> Result<OwnedFd> {
        fsx::open_dir_beneath(self.dir.as_fd(), &self.paths.dir, rel.as_bytes())
    }
}

/// Refuses guest `name` while it is in use anywhere on the host: its overlay or any mount in
/// its directory, in this mount namespace or another ([`check_offline`]). For a caller outside
/// this crate about to change the guest's layers (an import's resync).
///
/// # Errors
/// [`Error::NoSuchGuest`], [`Error::Mounted`], [`Error::InUse`], record and I/O errors.
pub fn ensure_offline(root: &HostRoot, name: &str) -> Result<()> {
    let record = guest_record(root, name)?;
    check_offline(
        root,
        &record,
        &MountTable::all().at("/proc/self/mountinfo")?,
    )
}

/// Refuses a guest that is in use: a mount at or below its directory or at its mount point (its
/// overlay, say), or an overlay in any mount namespace of the host that has one of its
/// directories as a layer (a copy of its overlay held by a process in another namespace).
/// Changing a lower layer under a mounted overlay is undefined (kernel docs), and so is
/// changing an upper layer directly.
///
/// # Errors
/// [`Error::Mounted`] naming the mount, [`Error::InUse`] naming a process of the other
/// namespace.
pub(crate) fn check_offline(
    root: &HostRoot,
    record: &GuestRecord,
    table: &MountTable,
) -> Result<()> {
    let paths = GuestPaths::new(root, record);
    let mounted = |name: &str, path: &Path| Error::Mounted {
        name: name.to_string(),
        path: path.to_path_buf(),
    };
    let uses = |m: &MountEntry| overlay_layers(m).iter().any(|l| l.starts_with(&paths.dir));
    for m in &table.own {
        if m.mount_point == paths.mount_point || uses(m) {
            return Err(mounted(&record.name, &m.mount_point));
        }
        if m.mount_point.starts_with(&paths.dir) {
            return Err(Error::MountInside {
                name: record.name.clone(),
                path: m.mount_point.clone(),
                fstype: m.fstype.clone(),
            });
        }
    }
    for (process, mounts) in &table.others {
        if mounts.iter().any(uses) {
            return Err(Error::InUse {
                name: record.name.clone(),
                by: format!("{process}, whose mount namespace holds its overlay"),
            });
        }
    }
    Ok(())
}
