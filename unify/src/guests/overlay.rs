//! Overlay guests: a guest runs on an overlay whose lower layer is its unified `base/` and whose
//! upper layer is its private `upper/`. Mounting and unmounting it, reading back an existing
//! mount (and trusting only cowherd's own options), and finding the processes that keep it busy.
//!
//! The options are fixed: `index=off` (with `index=on` two hardlinked lower paths change
//! together after a copy-up, so one path's write would show at another — and unification makes
//! unrelated paths share an inode), `metacopy=off` and `redirect_dir=off` (so that an unmounted
//! upper layer stays a plain tree that `fold` can read).

use std::ffi::OsString;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::mount::{MntFlags, MsFlags};
use serde::Serialize;

use crate::error::{Error, PathContext, Result};
use crate::fsx::{self, Xattr};
use crate::guest::{GuestPaths, GuestRecord, guest_record};
use crate::mountinfo::{MountEntry, MountTable, Process, all_pids, overlay_layers};
use crate::root::{Access, HostRoot};

/// The options every guest overlay is mounted with, besides its layers.
pub const OVERLAY_OPTIONS: &str = "index=off,metacopy=off,redirect_dir=off";

/// Whether a guest's overlay is mounted, as seen from this mount namespace.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "state", rename_all = "lowercase")]
pub enum MountState {
    /// Nothing is mounted at its mount point.
    Unmounted,
    /// Its overlay is mounted with cowherd's layers and options.
    Mounted {
        /// The mount point.
        path: PathBuf,
    },
    /// Something else is mounted there (by hand, with other options or layers): not trusted.
    Foreign {
        /// The mount point.
        path: PathBuf,
        /// What differs from cowherd's mount.
        why: String,
    },
}

/// What [`mount`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum MountOutcome {
    /// Mounted now.
    Mounted,
    /// It was mounted already, as cowherd mounts it.
    AlreadyMounted,
}

/// What [`umount`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum UmountOutcome {
    /// Unmounted now.
    Unmounted,
    /// Nothing was mounted.
    NotMounted,
}

/// A module parameter of overlayfs (`/sys/module/overlay/parameters/NAME`): the default of an
/// option a mount does not name.
fn module_default(name: &str) -> Option<String> {
    std::fs::read_to_string(format!("/sys/module/overlay/parameters/{name}"))
        .ok()
        .map(|v| v.trim().to_string())
}

/// The effective value of an on/off overlay option: as given at mount time (mountinfo shows
/// only options that differ from the module default), else the module's default.
fn effective(m: &MountEntry, key: &str) -> String {
    match m.option(key) {
        Some(Some(v)) => v.to_string_lossy().into_owned(),
        Some(None) => "on".into(),
        None => match (key, module_default(key).as_deref()) {
            (_, Some("Y")) => "on".into(),
            // redirect_dir=follow (the default with redirect_always_follow) creates no redirect.
            _ => "off".into(),
        },
    }
}

/// Why `m` is not the overlay cowherd would mount for `paths`, or `None` if it is.
fn distrust(m: &MountEntry, paths: &GuestPaths) -> Option<String> {
    if m.fstype != "overlay" {
        return Some(format!("a {} filesystem, not an overlay", m.fstype));
    }
    let layer = |key: &str, want: &Path| -> Option<String> {
        let got = m.option(key).flatten().map(Path::new);
        (got != Some(want)).then(|| {
            format!(
                "{key} is {}, not {}",
                got.map_or("unset".into(), |p| p.display().to_string()),
                want.display()
            )
        })
    };
    layer("lowerdir", &paths.base)
        .or_else(|| layer("upperdir", &paths.upper))
        .or_else(|| layer("workdir", &paths.work))
        .or_else(|| {
            ["index", "metacopy"]
                .into_iter()
                .find(|k| effective(m, k) != "off")
                .map(|k| format!("{k}=on"))
        })
        .or_else(|| (effective(m, "redirect_dir") == "on").then(|| "redirect_dir=on".into()))
        .or_else(|| m.option("userxattr").map(|_| "userxattr".into()))
}

/// The state of a guest's mount point in `table` (this namespace).
pub(crate) fn state_in(table: &MountTable, paths: &GuestPaths) -> MountState {
    // The last mount at a path is the one on top.
    match table
        .own
        .iter()
        .rev()
        .find(|m| m.mount_point == paths.mount_point)
    {
        None => MountState::Unmounted,
        Some(m) => match distrust(m, paths) {
            None => MountState::Mounted {
                path: m.mount_point.clone(),
            },
            Some(why) => MountState::Foreign {
                path: m.mount_point.clone(),
                why,
            },
        },
    }
}

/// Whether guest `name` is mounted, and how.
///
/// # Errors
/// [`Error::NoSuchGuest`], record errors, reading `/proc/self/mountinfo`.
pub fn mount_state(root: &HostRoot, name: &str) -> Result<MountState> {
    let record = guest_record(root, name)?;
    let table = MountTable::own().at("/proc/self/mountinfo")?;
    Ok(state_in(&table, &GuestPaths::new(root, &record)))
}

/// Where guest `name` is mounted, for running commands in it.
///
/// # Errors
/// [`Error::NotMounted`], [`Error::ForeignMount`] (not trusted), record errors.
pub fn mounted_rootfs(root: &HostRoot, name: &str) -> Result<PathBuf> {
    match mount_state(root, name)? {
        MountState::Mounted { path } => Ok(path),
        MountState::Unmounted => Err(Error::NotMounted { name: name.into() }),
        MountState::Foreign { path, why } => Err(Error::ForeignMount {
            name: name.into(),
            path,
            why,
        }),
    }
}

/// Whether each guest of the root is mounted, and how (one read of the mount table).
///
/// # Errors
/// Reading the guests directory or `/proc/self/mountinfo`, record errors.
pub fn mount_states(root: &HostRoot) -> Result<Vec<(String, MountState)>> {
    let table = MountTable::own().at("/proc/self/mountinfo")?;
    crate::guest::guest_names(root)?
        .into_iter()
        .map(|name| {
            let record = guest_record(root, &name)?;
            let state = state_in(&table, &GuestPaths::new(root, &record));
            Ok((name, state))
        })
        .collect()
}

/// Checks that overlayfs can take `path` in its option string: no `,` `:` `\` or whitespace,
/// which the mount options would have to escape.
fn check_option_path(path: &Path) -> Result<()> {
    let bad = path
        .as_os_str()
        .as_bytes()
        .iter()
        .find(|b| b",:\\".contains(b) || b.is_ascii_whitespace() || b.is_ascii_control());
    match bad {
        None => Ok(()),
        Some(&b) => Err(Error::BadMountPath {
            path: path.to_path_buf(),
            why: format!(
                "holds {:?}, which overlayfs cannot take in a layer path; use a root and mount point without it",
                b as char
            ),
        }),
    }
}

/// An overlay option string: `key=path` pairs, then [`OVERLAY_OPTIONS`].
fn options(layers: &[(&str, &[&Path])]) -> Result<OsString> {
    for p in layers.iter().flat_map(|(_, paths)| paths.iter()) {
        check_option_path(p)?;
    }
    Ok(checked_options(layers))
}

/// [`options`] for paths [`check_option_path`] accepted.
fn checked_options(layers: &[(&str, &[&Path])]) -> OsString {
    let mut data = Vec::new();
    for (key, paths) in layers {
        data.extend_from_slice(key.as_bytes());
        data.push(b'=');
        for (i, p) in paths.iter().enumerate() {
            if i > 0 {
                data.push(b':');
            }
            data.extend_from_slice(p.as_os_str().as_bytes());
        }
        data.push(b',');
    }
    data.extend_from_slice(OVERLAY_OPTIONS.as_bytes());
    OsString::from_vec(data)
}

/// The mount option string of a guest's overlay.
pub(crate) fn mount_options(paths: &GuestPaths) -> Result<OsString> {
    check_option_path(&paths.mount_point)?;
    options(&[
        ("lowerdir", &[&paths.base]),
        ("upperdir", &[&paths.upper]),
        ("workdir", &[&paths.work]),
    ])
}

/// The option string of a read-only view of an unmounted guest: both layers as lower layers,
/// upper on top, so that the kernel shows the merged view without writing anything.
pub(crate) fn view_options(paths: &GuestPaths) -> Result<OsString> {
    options(&[("lowerdir", &[&paths.upper, &paths.base])])
}

/// Makes the directories a mount needs, checks they are real directories on the root's
/// filesystem, and checks the mount point.
fn prepare(root: &HostRoot, record: &GuestRecord, paths: &GuestPaths) -> Result<()> {
    for (dir, mode) in [(&paths.upper, 0o755), (&paths.work, 0o700)] {
        if std::fs::symlink_metadata(dir).is_err() {
            fsx::ensure_dir(dir, mode)?;
        }
    }
    check_layers(root, &[&paths.base, &paths.upper, &paths.work])?;
    match_root_metadata(root, paths)?;
    prepare_mount_point(record, paths)
}

/// Checks that each of `dirs` is a real directory on the root's filesystem.
fn check_layers(root: &HostRoot, dirs: &[&PathBuf]) -> Result<()> {
    for dir in dirs {
        let st = fsx::lstat_path(dir)?;
        if !st.is_dir() {
            return Err(Error::NotADirectory {
                path: dir.to_path_buf(),
            });
        }
        root.check_same_fs(&st, dir)?;
    }
    Ok(())
}

/// Makes the guest's `rootfs/` if missing (a recorded mount point is the runtime's to make)
/// and checks that its mount point is a real directory, reached through no symlink: mount(2)
/// would follow one.
fn prepare_mount_point(record: &GuestRecord, paths: &GuestPaths) -> Result<()> {
    if record.mount_point.is_none() && std::fs::symlink_metadata(&paths.mount_point).is_err() {
        fsx::ensure_dir(&paths.mount_point, 0o755)?;
    }
    let target = &paths.mount_point;
    let st = fsx::lstat_path(target)?;
    if !st.is_dir() {
        return Err(Error::NotADirectory {
            path: target.clone(),
        });
    }
    if &std::fs::canonicalize(target).at(target)? != target {
        return Err(Error::Symlink {
            path: target.clone(),
        });
    }
    Ok(())
}

/// Whether the guest's upper layer is pristine (empty, never mounted: no `trusted.overlay.*`
/// xattrs on its root), with the guest's directory and its upper layer open.
fn pristine_upper(root: &HostRoot, paths: &GuestPaths) -> Result<(OwnedFd, OwnedFd, bool)> {
    let guest = fsx::open_dir_beneath(root.guests_fd(), &root.guests_dir(), paths.name.as_bytes())?;
    let upper = fsx::open_dir_beneath(guest.as_fd(), &paths.dir, b"upper")?;
    let pristine = fsx::read_names(upper.as_fd()).at(&paths.upper)?.is_empty()
        && !fsx::xattrs_at(upper.as_fd(), b".")
            .at(&paths.upper)?
            .iter()
            .any(|(k, _)| k.starts_with(fsx::OVERLAY_XATTR));
    Ok((guest, upper, pristine))
}

/// Gives a pristine upper layer (empty, never mounted: no `trusted.overlay.*` xattrs) the
/// owner, mode, xattrs and mtime of base's root: the overlay shows its root directory with the
/// upper root's metadata, and the guest must see its own.
pub(crate) fn match_root_metadata(root: &HostRoot, paths: &GuestPaths) -> Result<()> {
    let (guest, upper, pristine) = pristine_upper(root, paths)?;
    if pristine {
        let base = fsx::open_dir_beneath(guest.as_fd(), &paths.dir, b"base")?;
        let st = fsx::fstat(&base).at(&paths.base)?;
        let xattrs = fsx::xattrs_at(base.as_fd(), b".").at(&paths.base)?;
        fsx::set_dir_metadata(upper.as_fd(), &st, &xattrs).at(&paths.upper)?;
    }
    Ok(())
}

/// The owner, mode, xattrs and mtime the guest's overlay would show its root directory with:
/// those of base's root for a pristine upper layer (which [`mount`] would give them), else
/// those of the upper root. Read only.
fn merged_root_metadata(root: &HostRoot, paths: &GuestPaths) -> Result<(fsx::Stat, Vec<Xattr>)> {
    let (guest, upper, pristine) = pristine_upper(root, paths)?;
    let (fd, shown) = if pristine {
        let base = fsx::open_dir_beneath(guest.as_fd(), &paths.dir, b"base")?;
        (base, &paths.base)
    } else {
        (upper, &paths.upper)
    };
    let st = fsx::fstat(&fd).at(shown)?;
    let xattrs = fsx::xattrs_at(fd.as_fd(), b".").at(shown)?;
    Ok((st, xattrs))
}

/// The layers of a guest's overlay for one command, to be mounted on [`target`](Self::target)
/// inside that command's private mount namespace (see [`private_overlay`]): it is never
/// mounted on the host, and goes away with the command's namespaces.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OverlayLayers {
    lower: Vec<PathBuf>,
    upper: PathBuf,
    work: PathBuf,
    target: PathBuf,
}

impl OverlayLayers {
    /// The layers, each path checked for the option string.
    fn new(lower: Vec<PathBuf>, upper: PathBuf, work: PathBuf, target: PathBuf) -> Result<Self> {
        for path in lower.iter().chain([&upper, &work, &target]) {
            check_option_path(path)?;
        }
        Ok(Self {
            lower,
            upper,
            work,
            target,
        })
    }

    /// The lower layers, top first.
    pub fn lower(&self) -> &[PathBuf] {
        &self.lower
    }

    /// The upper layer: where the command's changes go.
    pub fn upper(&self) -> &Path {
        &self.upper
    }

    /// The overlay's work directory.
    pub fn work(&self) -> &Path {
        &self.work
    }

    /// Where to mount it: the guest's mount point.
    pub fn target(&self) -> &Path {
        &self.target
    }

    /// The mount(2) data: `lowerdir=…,upperdir=…,workdir=…` and [`OVERLAY_OPTIONS`]. Its paths
    /// hold no `,` `:` `\` or whitespace (checked when the layers were made).
    pub fn mount_data(&self) -> OsString {
        let lower: Vec<&Path> = self.lower.iter().map(PathBuf::as_path).collect();
        checked_options(&[
            ("lowerdir", &lower),
            ("upperdir", &[&self.upper]),
            ("workdir", &[&self.work]),
        ])
    }
}

/// Prepares guest `name`'s overlay for a mount private to one command (`cowherd exec` of an
/// unmounted guest) and returns its layers; [`OverlayLayers::mount_data`] is the mount's data.
/// The caller mounts it in a mount namespace of its own, made private first: the overlay is
/// then never seen on the host, and the kernel drops it when the namespace ends.
///
/// Without `scratch`, the overlay is the guest's own (base, upper, work), prepared as [`mount`]
/// prepares it: `upper/`, `work/` and `rootfs/` made if missing, a pristine upper layer given
/// base's root metadata. With `scratch = Some(dir)`, it is a throwaway view: the guest's upper
/// and base layers are both lower layers (the guest's upper layer is only read), and the upper
/// and work directories are `dir/upper` and `dir/work`, made here (`dir` too if missing),
/// 0700; `dir/upper`'s root then takes the metadata of the root the guest shows. Nothing the
/// command does reaches the guest. Both must not exist yet; `dir` must be on a filesystem that
/// can hold an overlay's upper layer, and should be reachable by root only (the command may
/// write setuid files there).
///
/// # Errors
/// [`Error::NeedsLock`] unless the root was opened with [`crate::Access::Write`] (its lock
/// keeps `mount`, `fold` and `unify` of the guest from racing the command);
/// [`Error::Mounted`], [`Error::MountInside`] or [`Error::InUse`] if the guest is in use in
/// any mount namespace (a private overlay beside another mount of the same layers would be
/// undefined); [`Error::BadMountPath`] for a path holding `,` `:` `\` or whitespace;
/// [`Error::Symlink`], [`Error::NotADirectory`], [`Error::CrossFilesystem`], [`Error::Io`]
/// (`dir/upper` or `dir/work` existing already among them).
pub fn private_overlay(
    root: &HostRoot,
    name: &str,
    scratch: Option<&Path>,
) -> Result<OverlayLayers> {
    let record = guest_record(root, name)?;
    if root.access() != Access::Write {
        return Err(Error::NeedsLock { name: name.into() });
    }
    let paths = GuestPaths::new(root, &record);
    let table = MountTable::all().at("/proc/self/mountinfo")?;
    crate::guest::check_offline(root, &record, &table)?;
    let Some(dir) = scratch else {
        let layers = OverlayLayers::new(
            vec![paths.base.clone()],
            paths.upper.clone(),
            paths.work.clone(),
            paths.mount_point.clone(),
        )?;
        prepare(root, &record, &paths)?;
        return Ok(layers);
    };
    check_layers(root, &[&paths.base, &paths.upper])?;
    prepare_mount_point(&record, &paths)?;
    if std::fs::symlink_metadata(dir).is_err() {
        fsx::ensure_dir(dir, 0o700)?;
    }
    let dir = std::fs::canonicalize(dir).at(dir)?;
    let layers = OverlayLayers::new(
        vec![paths.upper.clone(), paths.base.clone()],
        dir.join("upper"),
        dir.join("work"),
        paths.mount_point.clone(),
    )?;
    let (st, xattrs) = merged_root_metadata(root, &paths)?;
    for made in [&layers.upper, &layers.work] {
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(made)
            .at(made)?;
    }
    let upper = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECTORY | libc::O_NOFOLLOW)
        .open(&layers.upper)
        .at(&layers.upper)?;
    fsx::set_dir_metadata(upper.as_fd(), &st, &xattrs).at(&layers.upper)?;
    Ok(layers)
}

/// Mounts guest `name`'s overlay at its mount point (idempotent).
///
/// # Algorithm
/// The mount point's state is read from `/proc/self/mountinfo`: mounted as cowherd mounts it
/// → nothing to do; mounted otherwise → refused, never trusted. Then no other overlay of the
/// host (in any mount namespace) may use the guest's layers. `upper/`, `work/` and `rootfs/`
/// are made if missing; the overlay is mounted with [`OVERLAY_OPTIONS`] named explicitly (a
/// kernel may default `index` to on), and read back from mountinfo to confirm.
///
/// # Errors
/// [`Error::ForeignMount`] for a mount made otherwise, [`Error::InUse`] if another overlay
/// uses the layers, [`Error::BadMountPath`], [`Error::Symlink`], [`Error::NotADirectory`],
/// [`Error::Io`] from mount(2).
pub fn mount(root: &HostRoot, name: &str) -> Result<MountOutcome> {
    let record = guest_record(root, name)?;
    let paths = GuestPaths::new(root, &record);
    let table = MountTable::all().at("/proc/self/mountinfo")?;
    match state_in(&table, &paths) {
        MountState::Mounted { .. } => return Ok(MountOutcome::AlreadyMounted),
        MountState::Foreign { path, why } => {
            return Err(Error::ForeignMount {
                name: name.into(),
                path,
                why,
            });
        }
        MountState::Unmounted => {}
    }
    crate::guest::check_offline(root, &record, &table)?;
    let data = mount_options(&paths)?;
    prepare(root, &record, &paths)?;
    nix::mount::mount(
        Some("cowherd"),
        &paths.mount_point,
        Some("overlay"),
        MsFlags::empty(),
        Some(data.as_os_str()),
    )
    .at(&paths.mount_point)?;
    let table = MountTable::own().at("/proc/self/mountinfo")?;
    if let MountState::Foreign { path, why } = state_in(&table, &paths) {
        let _ = nix::mount::umount2(&paths.mount_point, MntFlags::MNT_DETACH);
        return Err(Error::ForeignMount {
            name: name.into(),
            path,
            why: format!("the kernel mounted it with {why}"),
        });
    }
    Ok(MountOutcome::Mounted)
}

/// A process that keeps a guest's overlay busy, and how.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Holder {
    /// The process.
    pub pid: i32,
    /// Its command name.
    pub command: String,
    /// How it uses the overlay: `root`, `cwd`, `exe`, `open file`, `mapped file`, or `mount
    /// namespace` (its namespace holds a copy of the overlay).
    pub how: &'static str,
}

impl std::fmt::Display for Holder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "pid {} ({}: {})", self.pid, self.command, self.how)
    }
}

/// How `pid` uses the filesystem `dev`: its root, cwd, executable, an open file or a mapping.
fn process_use(pid: i32, dev: u64) -> Option<&'static str> {
    use std::os::unix::fs::MetadataExt;
    let on =
        |link: &str| std::fs::metadata(format!("/proc/{pid}/{link}")).is_ok_and(|m| m.dev() == dev);
    if on("root") {
        return Some("root");
    }
    if on("cwd") {
        return Some("cwd");
    }
    if on("exe") {
        return Some("exe");
    }
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .into_iter()
        .flatten();
    if fds
        .flatten()
        .any(|fd| std::fs::metadata(fd.path()).is_ok_and(|m| m.dev() == dev))
    {
        return Some("open file");
    }
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap_or_default();
    let want = format!("{:02x}:{:02x}", libc::major(dev), libc::minor(dev));
    maps.lines()
        .any(|l| l.split_whitespace().nth(3) == Some(want.as_str()))
        .then_some("mapped file")
}

/// The processes that keep the overlay of `paths` busy: by using the filesystem `dev` (if it
/// is mounted here), or by holding a copy of the overlay in another mount namespace.
fn holders(table: &MountTable, paths: &GuestPaths, dev: Option<u64>) -> Vec<Holder> {
    let me = std::process::id() as i32;
    let mut found = Vec::new();
    if let Some(dev) = dev {
        for pid in all_pids().into_iter().filter(|&p| p != me) {
            if let Some(how) = process_use(pid, dev) {
                let p = Process::of(pid);
                found.push(Holder {
                    pid,
                    command: p.command,
                    how,
                });
            }
        }
    }
    for (process, mounts) in &table.others {
        let held = mounts
            .iter()
            .any(|m| overlay_layers(m).iter().any(|l| l.starts_with(&paths.dir)));
        if held && !found.iter().any(|h| h.pid == process.pid) {
            found.push(Holder {
                pid: process.pid,
                command: process.command.clone(),
                how: "mount namespace",
            });
        }
    }
    found
}

/// Unmounts guest `name`'s overlay (idempotent), refusing while a process uses it. Any other
/// mount of this namespace that uses the guest's directories (a read-only view an interrupted
/// `export` left, a mount made by hand inside `guests/NAME`) is unmounted too.
///
/// # Algorithm
/// Every process of the host is checked for a root, cwd, executable, open file or mapping on
/// those mounts, and every other mount namespace for a copy of the guest's overlay (a command
/// started with `cowherd exec` runs in one): unmounting here would leave the overlay alive
/// there, and a later fold or unify would change its layers under it. Then `umount2` (not
/// lazy) of each, deepest first.
///
/// # Errors
/// [`Error::InUse`] naming the processes, or the mounts below the mount point that keep it
/// busy; [`Error::Io`] from umount(2).
pub fn umount(root: &HostRoot, name: &str) -> Result<UmountOutcome> {
    let record = guest_record(root, name)?;
    let paths = GuestPaths::new(root, &record);
    let table = MountTable::all().at("/proc/self/mountinfo")?;
    let mut ours: Vec<&MountEntry> = table
        .own
        .iter()
        .filter(|m| {
            m.mount_point == paths.mount_point
                || m.mount_point.starts_with(&paths.dir)
                || overlay_layers(m).iter().any(|l| l.starts_with(&paths.dir))
        })
        .collect();
    let mut busy = Vec::new();
    for m in &ours {
        busy.extend(holders(&table, &paths, Some(m.st_dev())));
    }
    busy.extend(holders(&table, &paths, None));
    busy.sort_by_key(|h| h.pid);
    busy.dedup_by_key(|h| h.pid);
    if !busy.is_empty() {
        return Err(in_use(name, &busy));
    }
    if ours.is_empty() {
        return Ok(UmountOutcome::NotMounted);
    }
    // Deepest first; of two mounts at one point, the later (on top) first.
    ours.reverse();
    ours.sort_by_key(|m| std::cmp::Reverse(m.mount_point.components().count()));
    for m in ours {
        match nix::mount::umount2(&m.mount_point, MntFlags::empty()) {
            Ok(()) | Err(Errno::EINVAL | Errno::ENOENT) => {}
            Err(Errno::EBUSY) => {
                let below: Vec<String> = table
                    .own
                    .iter()
                    .filter(|b| {
                        b.mount_point != m.mount_point && b.mount_point.starts_with(&m.mount_point)
                    })
                    .map(|b| b.mount_point.display().to_string())
                    .collect();
                return Err(Error::InUse {
                    name: name.into(),
                    by: if below.is_empty() {
                        format!(
                            "something the kernel does not name ({}: EBUSY)",
                            m.mount_point.display()
                        )
                    } else {
                        format!(
                            "mounts below {} ({})",
                            m.mount_point.display(),
                            below.join(", ")
                        )
                    },
                });
            }
            Err(e) => return Err(e).at(&m.mount_point),
        }
    }
    Ok(UmountOutcome::Unmounted)
}

fn in_use(name: &str, holders: &[Holder]) -> Error {
    const SHOWN: usize = 8;
    let mut list: Vec<String> = holders.iter().take(SHOWN).map(Holder::to_string).collect();
    if holders.len() > SHOWN {
        list.push(format!("and {} more", holders.len() - SHOWN));
    }
    Error::InUse {
        name: name.into(),
        by: list.join(", "),
    }
}

/// Quotes a word for a systemd unit's command line, if it needs quoting.
fn unit_word(word: &str) -> String {
    if word
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"/._-=+:@".contains(&b))
    {
        word.to_string()
    } else {
        format!(
            "\"{}\"",
            word.replace('\\', "\\\\")
                .replace('"', "\\\"")
                .replace('%', "%%")
        )
    }
}

/// A systemd unit that mounts guest `name` before its runtime starts and unmounts it after
/// it stops (`fold`: fold and unify it at each start, `mount --fold`). `exe` is the cowherd
/// binary.
///
/// # Errors
/// [`Error::NoSuchGuest`] and record errors.
pub fn systemd_unit(root: &HostRoot, name: &str, exe: &Path, fold: bool) -> Result<String> {
    let record = guest_record(root, name)?;
    let paths = GuestPaths::new(root, &record);
    let cowherd = format!(
        "{} --root {}",
        unit_word(&exe.to_string_lossy()),
        unit_word(&root.path().to_string_lossy())
    );
    let fold = if fold { " --fold" } else { "" };
    Ok(format!(
        "# cowherd: the overlay of guest {name}, mounted before its runtime starts.\n\
         # Install as /etc/systemd/system/cowherd-{name}.service, then:\n\
         #   systemctl daemon-reload && systemctl enable --now cowherd-{name}.service\n\
         [Unit]\n\
         Description=cowherd overlay of guest {name}\n\
         RequiresMountsFor={} {}\n\
         Before=lxc.service lxc@{name}.service systemd-nspawn@{name}.service\n\
         \n\
         [Service]\n\
         Type=oneshot\n\
         RemainAfterExit=yes\n\
         ExecStart={cowherd} mount{fold} {name}\n\
         ExecStop={cowherd} umount {name}\n\
         \n\
         [Install]\n\
         WantedBy=multi-user.target\n",
        unit_word(&root.path().to_string_lossy()),
        unit_word(&paths.mount_point.to_string_lossy()),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mountinfo::parse_mountinfo;

    fn paths() -> GuestPaths {
        let dir = PathBuf::from("/r/guests/g");
        GuestPaths {
            name: "g".into(),
            base: dir.join("base"),
            upper: dir.join("upper"),
            work: dir.join("work"),
            mount_point: dir.join("rootfs"),
            tmp: dir.join("tmp"),
            dir,
        }
    }

    fn entry(options: &str) -> MountEntry {
        let line = format!("50 1 0:60 / /r/guests/g/rootfs rw - overlay cowherd rw,{options}");
        parse_mountinfo(line.as_bytes()).remove(0)
    }

    #[test]
    fn only_cowherds_own_layers_and_options_are_trusted() {
        let layers =
            "lowerdir=/r/guests/g/base,upperdir=/r/guests/g/upper,workdir=/r/guests/g/work";
        // With the module defaults off (the kernel shows only options that differ).
        if module_default("index").as_deref() != Some("Y")
            && module_default("metacopy").as_deref() != Some("Y")
        {
            assert_eq!(distrust(&entry(layers), &paths()), None);
        }
        assert_eq!(
            distrust(
                &entry(&format!("{layers},index=off,metacopy=off")),
                &paths()
            ),
            None
        );
        for (options, why) in [
            ("index=on,metacopy=off", "index=on"),
            ("index=off,metacopy=on", "metacopy=on"),
            ("index=off,metacopy=off,redirect_dir=on", "redirect_dir=on"),
            ("index=off,metacopy=off,userxattr", "userxattr"),
        ] {
            let got = distrust(&entry(&format!("{layers},{options}")), &paths());
            assert_eq!(got.as_deref(), Some(why), "{options}");
        }
        let other = "lowerdir=/elsewhere,upperdir=/r/guests/g/upper,workdir=/r/guests/g/work,index=off,metacopy=off";
        assert!(
            distrust(&entry(other), &paths())
                .unwrap()
                .contains("lowerdir is /elsewhere")
        );
        let two = "lowerdir=/r/guests/g/base:/x,upperdir=/r/guests/g/upper,workdir=/r/guests/g/work,index=off,metacopy=off";
        assert!(distrust(&entry(two), &paths()).is_some());
    }

    #[test]
    fn mount_options_name_the_layers_and_fixed_options() {
        let data = mount_options(&paths()).unwrap();
        assert_eq!(
            data,
            OsString::from(
                "lowerdir=/r/guests/g/base,upperdir=/r/guests/g/upper,workdir=/r/guests/g/work,index=off,metacopy=off,redirect_dir=off"
            )
        );
        let mut odd = paths();
        odd.base = PathBuf::from("/r/gue,sts/g/base");
        assert!(matches!(
            mount_options(&odd),
            Err(Error::BadMountPath { .. })
        ));
    }

    #[test]
    fn private_layers_name_each_lower_and_refuse_what_overlayfs_cannot_take() {
        let path = PathBuf::from;
        let layers = OverlayLayers::new(
            vec![path("/g/upper"), path("/g/base")],
            path("/s/upper"),
            path("/s/work"),
            path("/g/rootfs"),
        )
        .unwrap();
        assert_eq!(
            layers.mount_data(),
            OsString::from(
                "lowerdir=/g/upper:/g/base,upperdir=/s/upper,workdir=/s/work,index=off,metacopy=off,redirect_dir=off"
            )
        );
        for bad in ["/s/a,b", "/s/a:b", "/s/a\\b", "/s/a b"] {
            let made = OverlayLayers::new(
                vec![path("/g/base")],
                path(bad),
                path("/s/work"),
                path("/g/rootfs"),
            );
            assert!(matches!(made, Err(Error::BadMountPath { .. })), "{bad}");
        }
    }

    #[test]
    fn unit_words_with_spaces_are_quoted() {
        assert_eq!(unit_word("/usr/bin/cowherd"), "/usr/bin/cowherd");
        assert_eq!(unit_word("/srv/my root"), "\"/srv/my root\"");
    }
}
