//! Guests: the `guest.toml` record, adoption of an existing tree, listing, and opening a guest
//! for unification (its base directory fd, mount check and marker policy).

use std::ffi::OsStr;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Error, PathContext, Result};
use crate::fsx;
use crate::policy::{Policy, PolicyFile, load_policy_file, read_dpkg_conffiles};
use crate::root::HostRoot;

/// Suffix of a guest directory whose adoption has not finished (`guests/.NAME.adopting`).
const ADOPTING: &str = ".adopting";

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

fn now_unix() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// Moves the tree at `src` into `guests/<name>/base` by `rename` and records it.
///
/// # Algorithm
/// The guest directory is built as `guests/.<name>.adopting` (record, `upper/`, `work/`,
/// `rootfs/`), the tree is renamed into it as `base`, then the directory is renamed to
/// `guests/<name>`. A run killed in between is completed by the next writer.
///
/// # Errors
/// [`Error::BadGuestName`], [`Error::GuestExists`], [`Error::Symlink`] if `src` is a
/// symlink, [`Error::NotADirectory`], [`Error::CrossFilesystem`] if `src` is not on the
/// root's filesystem (adopt never copies), [`Error::Io`].
pub fn adopt(root: &HostRoot, src: &Path, name: &str) -> Result<GuestRecord> {
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
    let staging = root.guests_dir().join(format!(".{name}{ADOPTING}"));
    if std::fs::symlink_metadata(&staging).is_ok() {
        std::fs::remove_dir_all(&staging).at(&staging)?;
    }
    fsx::ensure_dir(&staging, 0o755)?;
    for (dir, mode) in [("upper", 0o755), ("work", 0o700), ("rootfs", 0o755)] {
        fsx::ensure_dir(&staging.join(dir), mode)?;
    }
    let record = GuestRecord {
        name: name.to_string(),
        created_unix: now_unix(),
        origin: Origin {
            kind: OriginKind::Adopted,
            path: Some(abs.to_string_lossy().into_owned()),
            template: None,
        },
        policy: None,
    };
    fsx::write_atomic(&staging.join("guest.toml"), record.to_toml().as_bytes())?;
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
    root.index.guest_id(name)?;
    Ok(record)
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
            }
        } else {
            std::fs::remove_dir_all(&staging).at(&staging)?;
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
/// [`Error::Mounted`] if the guest is in use, policy errors naming the file.
pub(crate) fn open_guest(root: &HostRoot, name: &str) -> Result<OpenGuest> {
    let record = guest_record(root, name)?;
    let rel = format!("{name}/base");
    let base_path = root.guests_dir().join(&rel);
    let base_fd = fsx::open_dir_beneath(root.guests_fd(), &root.guests_dir(), rel.as_bytes())?;
    let st = fsx::fstat(&base_fd).at(&base_path)?;
    root.check_same_fs(&st, &base_path)?;
    check_not_mounted(&root.guests_dir().join(name), name)?;

    let default = load_policy_file(&root.policy_path())?;
    let guest_policy = record.policy.clone().unwrap_or_default();
    let conffiles_on = guest_policy
        .dpkg_conffiles
        .or(default.dpkg_conffiles)
        .unwrap_or(true);
    let conffiles = if conffiles_on {
        read_dpkg_conffiles(base_fd.as_fd())?
    } else {
        Default::default()
    };
    let guest_rules = guest_policy
        .parse_rules()
        .map_err(|e| e.in_file(&root.guests_dir().join(name).join("guest.toml")))?;
    let default_rules = default
        .parse_rules()
        .map_err(|e| e.in_file(&root.policy_path()))?;
    let policy = Policy::compile(&guest_rules, &default_rules, conffiles)?;
    let id = root.index.guest_id(name)?;
    Ok(OpenGuest {
        name: name.to_string(),
        id,
        base_path,
        base_fd,
        policy,
    })
}

/// Refuses a guest any part of which is a mount point, or whose base is an overlay's lower layer.
fn check_not_mounted(guest_dir: &Path, name: &str) -> Result<()> {
    let info = "/proc/self/mountinfo";
    let text = std::fs::read(info).at(info)?;
    let guest = guest_dir.as_os_str().as_bytes();
    let base = guest_dir.join("base");
    let base = base.as_os_str().as_bytes();
    for line in text.split(|&b| b == b'\n') {
        let fields: Vec<&[u8]> = line.split(|&b| b == b' ').collect();
        let Some(mount_point) = fields.get(4).map(|f| unescape_mountinfo(f)) else {
            continue;
        };
        let inside = mount_point.starts_with(guest)
            && (mount_point.len() == guest.len() || mount_point[guest.len()] == b'/');
        let lower = fields
            .last()
            .is_some_and(|opts| opts.windows(base.len()).any(|w| w == base));
        if inside || lower {
            return Err(Error::Mounted {
                name: name.to_string(),
                path: PathBuf::from(OsStr::from_bytes(&mount_point)),
            });
        }
    }
    Ok(())
}

/// Decodes the `\ooo` escapes of /proc/self/mountinfo.
fn unescape_mountinfo(field: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(field.len());
    let mut i = 0;
    while i < field.len() {
        if field[i] == b'\\'
            && i + 4 <= field.len()
            && field[i + 1..i + 4]
                .iter()
                .all(|c| (b'0'..=b'7').contains(c))
        {
            let v = (field[i + 1] - b'0') * 64 + (field[i + 2] - b'0') * 8 + (field[i + 3] - b'0');
            out.push(v);
            i += 4;
        } else {
            out.push(field[i]);
            i += 1;
        }
    }
    out
}
