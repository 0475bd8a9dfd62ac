//! The lifecycle verbs that touch shared inodes: `split` (a guest takes private copies of
//! shared files back), `export` (the merged view as a standalone tree or tarball) and `destroy`.

use std::ffi::OsStr;
use std::ops::ControlFlow;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use nix::fcntl::OFlag;
use nix::mount::{MntFlags, MsFlags};
use nix::sys::stat::Mode;
use rusqlite::params;
use serde::Serialize;

use crate::error::{Error, PathContext, Result};
use crate::fold::clear_scratch;
use crate::fsx::{self, Stat, Visit};
use crate::guest::{
    DESTROYING, GuestPaths, GuestRecord, OfflineGuest, check_offline, guest_record, remove_doomed,
};
use crate::mountinfo::MountTable;
use crate::overlay::{MountState, state_in};
use crate::report::{Failure, guest_abs};
use crate::root::HostRoot;
use crate::store;

/// What `destroy` removed.
#[derive(Clone, Debug, Default, Serialize)]
pub struct DestroyReport {
    /// The guest.
    pub guest: String,
    /// Its in-place mount point, left for its runtime (an empty directory).
    pub mount_point_left: Option<PathBuf>,
}

/// Removes guest `name`: its directory (base, upper, work, record) and its index rows. Store
/// objects it linked stay until `gc` finds them unused.
///
/// # Algorithm
/// The guest must be offline. `guests/NAME` is renamed to `guests/.NAME.destroying` (from then
/// on the guest is gone; the next writer finishes a killed run), its index rows are deleted,
/// and the tree is removed fd-relative, never crossing a mount. A link to an immutable store
/// object cannot be unlinked: the object's flag is cleared for it, journalled, and set again.
///
/// # Errors
/// [`Error::Mounted`] / [`Error::InUse`], [`Error::NoSuchGuest`], I/O and index errors.
pub fn destroy(root: &HostRoot, name: &str) -> Result<DestroyReport> {
    let record = OfflineGuest::open(root, name)?.record;
    let doomed = format!(".{name}{DESTROYING}");
    nix::fcntl::renameat(root.guests_fd(), name, root.guests_fd(), doomed.as_str())
        .at(root.guests_dir().join(name))?;
    let idx = &root.index;
    let id = idx.guest_id(name)?;
    idx.drop_rows(id)?;
    idx.exec("DELETE FROM journal WHERE guest_id = ?1", [id])?;
    idx.exec("DELETE FROM guests WHERE id = ?1", [id])?;
    remove_doomed(root, &doomed)?;
    Ok(DestroyReport {
        guest: name.to_string(),
        mount_point_left: record.mount_point,
    })
}

/// What `split` did.
#[derive(Clone, Debug, Default, Serialize)]
pub struct SplitReport {
    /// The guest.
    pub guest: String,
    /// Paths that were store links and now are private copies.
    pub split: Vec<String>,
    /// Bytes copied.
    pub copied_bytes: u64,
    /// Paths named that were private already.
    pub already_private: Vec<String>,
    /// Rules added to the guest's policy, so the next unify leaves the paths alone.
    pub rules_added: Vec<String>,
    /// Paths that could not be split.
    pub failures: Vec<Failure>,
}

/// Gives guest `name` private copies of the shared files at `paths` (guest-absolute; a
/// directory means every shared file below it), and marks them `private` in its record.
///
/// # Algorithm
/// For each store link: a copy (content with holes, owner, mode, xattrs, mtime) is written to
/// `tmp/new/` and fsynced; the directory's mtime is journalled; the copy is renamed over the
/// link (an immutable object's flag is cleared for that, journalled, and set again); the
/// directory's mtime is put back. The path never disappears and always holds the same content
/// and metadata; a killed run leaves only names in `tmp/`. Then a rule `private PATH` (or
/// `private PATH/**`) is put first in the guest's `[policy]`, so the next `unify` does not share
/// them again.
///
/// # Errors
/// [`Error::Mounted`] / [`Error::InUse`], record and index errors; a path that cannot be split
/// is a [`Failure`] in the report.
pub fn split(root: &HostRoot, name: &str, paths: &[String]) -> Result<SplitReport> {
    let OfflineGuest {
        mut record,
        paths: gpaths,
        dir: guest_dir,
    } = OfflineGuest::open(root, name)?;
    let base = fsx::open_dir_beneath(guest_dir.as_fd(), &gpaths.dir, b"base")?;
    clear_scratch(root, guest_dir.as_fd(), &gpaths)?;
    let mode = Mode::from_bits_truncate(0o700);
    nix::sys::stat::mkdirat(&guest_dir, "tmp", mode).at(&gpaths.tmp)?;
    let tmp = fsx::open_dir_beneath(guest_dir.as_fd(), &gpaths.dir, b"tmp")?;
    let guest_id = root.index.guest_id(name)?;
    let mut splitter = Splitter {
        root,
        base_path: &gpaths.base,
        tmp: tmp.as_fd(),
        guest_id,
        seq: 0,
        report: SplitReport {
            guest: name.to_string(),
            ..SplitReport::default()
        },
    };
    let mut rules = Vec::new();
    for path in paths {
        let rel = path
            .trim_start_matches('/')
            .trim_end_matches('/')
            .as_bytes();
        if !path.starts_with('/') || rel.is_empty() {
            splitter.fail(rel, "name a guest-absolute path below / (like /usr/bin/ls)");
            continue;
        }
        match splitter.split_path(base.as_fd(), rel) {
            Ok(is_dir) => rules.push(format!(
                "private {}{}",
                glob_escape(&format!("/{}", String::from_utf8_lossy(rel))),
                if is_dir { "/**" } else { "" }
            )),
            Err(e) => splitter.fail(rel, e),
        }
    }
    let mut report = splitter.report;
    for e in store::restore_immutable(root)? {
        report.failures.push(Failure::guest(name, e.to_string()));
    }
    clear_scratch(root, guest_dir.as_fd(), &gpaths)?;
    add_private_rules(root, &mut record, &rules, &mut report)?;
    Ok(report)
}

/// Puts the rules first in the guest's `[policy]` (those not there yet) and saves the record.
fn add_private_rules(
    root: &HostRoot,
    record: &mut GuestRecord,
    rules: &[String],
    report: &mut SplitReport,
) -> Result<()> {
    let policy = record.policy.get_or_insert_with(Default::default);
    let new: Vec<String> = rules
        .iter()
        .filter(|r| !policy.rules.contains(r))
        .cloned()
        .collect();
    if new.is_empty() {
        return Ok(());
    }
    policy.rules.splice(0..0, new.iter().cloned());
    report.rules_added = new;
    record.save(&root.guests_dir().join(&record.name).join("guest.toml"))
}

/// Escapes the characters a policy glob would read as patterns.
fn glob_escape(path: &str) -> String {
    let mut out = String::with_capacity(path.len());
    for c in path.chars() {
        if "*?[]{}\\".contains(c) {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// The state of one `split`.
struct Splitter<'a> {
    root: &'a HostRoot,
    base_path: &'a Path,
    tmp: BorrowedFd<'a>,
    guest_id: i64,
    seq: u64,
    report: SplitReport,
}

impl Splitter<'_> {
    fn fail(&mut self, rel: &[u8], error: impl std::fmt::Display) {
        let failure = Failure::at(&self.report.guest, rel, error);
        self.report.failures.push(failure);
    }

    /// Splits the file at `rel`, or every shared file below the directory at `rel`; returns
    /// whether it is a directory.
    fn split_path(&mut self, base: BorrowedFd<'_>, rel: &[u8]) -> Result<bool> {
        let (parent_rel, name) = fsx::split_parent(rel);
        let parent = fsx::open_dir_beneath(base, self.base_path, parent_rel)?;
        let shown = fsx::join(self.base_path, rel);
        let st = fsx::lstat_at(parent.as_fd(), name).at(&shown)?;
        if st.is_file() {
            self.split_file(parent.as_fd(), rel, &st);
            return Ok(false);
        }
        if !st.is_dir() {
            return Err(Error::BadRecord {
                path: shown,
                message: "not a regular file or directory; only files are shared".into(),
            });
        }
        let dir = fsx::open_dir_beneath(base, self.base_path, rel)?;
        let mut files = Vec::new();
        let _ = fsx::walk_tree(dir.as_fd(), &mut |visit| {
            match visit {
                Visit::File(sub, st) if st.nlink > 1 => files.push((sub.to_vec(), st)),
                Visit::File(..) | Visit::Dir(_) | Visit::DirEnd(_) => {}
                Visit::Error {
                    rel: sub, error, ..
                } => {
                    let mut full = rel.to_vec();
                    full.push(b'/');
                    full.extend_from_slice(sub);
                    self.fail(&full, error);
                }
            }
            ControlFlow::Continue(())
        });
        files.sort_by(|a, b| a.0.cmp(&b.0));
        for (sub, st) in files {
            let mut full = rel.to_vec();
            full.push(b'/');
            full.extend_from_slice(&sub);
            match fsx::open_dir_beneath(base, self.base_path, fsx::split_parent(&full).0) {
                Ok(parent) => self.split_file(parent.as_fd(), &full, &st),
                Err(e) => self.fail(&full, e),
            }
        }
        Ok(true)
    }

    /// Replaces the store link at `rel` (entry of `parent`) by a private copy; a file that is
    /// no store link is noted as private already.
    fn split_file(&mut self, parent: BorrowedFd<'_>, rel: &[u8], st: &Stat) {
        match store::object_of_inode(self.root, st) {
            Ok(Some(object)) => {
                if let Err(e) = self.replace_by_copy(parent, rel, st, &object) {
                    self.fail(rel, e);
                }
            }
            Ok(None) => self.report.already_private.push(guest_abs(rel)),
            Err(e) => self.fail(rel, e),
        }
    }

    fn replace_by_copy(
        &mut self,
        parent: BorrowedFd<'_>,
        rel: &[u8],
        st: &Stat,
        object: &str,
    ) -> Result<()> {
        let name = fsx::split_parent(rel).1;
        let shown = fsx::join(self.base_path, rel);
        let src =
            fsx::open_beneath(parent, name, OFlag::O_RDONLY | OFlag::O_NONBLOCK).at(&shown)?;
        let src = std::fs::File::from(src);
        let xattrs = fsx::read_xattrs(&src).at(&shown)?;
        self.seq += 1;
        let tmp_name = format!("{:x}", self.seq);
        let out: OwnedFd = nix::fcntl::openat(
            self.tmp,
            tmp_name.as_str(),
            OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_WRONLY | OFlag::O_CLOEXEC | OFlag::O_NOFOLLOW,
            Mode::from_bits_truncate(0o600),
        )
        .at(&shown)?;
        let mut out = std::fs::File::from(out);
        fsx::copy_content(&src, &mut out, st.size).at(&shown)?;
        fsx::set_file_metadata(&out, st.uid, st.gid, st.mode, &xattrs, st.mtime_ns).at(&shown)?;
        out.sync_all().at(&shown)?;
        // The directory's mtime: journalled, put back after the rename.
        let dir_rel = fsx::split_parent(rel).0;
        let dir_mtime = fsx::fstat(parent).at(&shown)?.mtime_ns;
        let idx = &self.root.index;
        idx.exec(
            "INSERT INTO journal(op, guest_id, path, value) VALUES ('dir', ?1, ?2, ?3)",
            params![self.guest_id, dir_rel, dir_mtime],
        )?;
        let row = idx.conn.last_insert_rowid();
        if crate::sys::is_immutable(src.as_fd()).unwrap_or(false) {
            store::unlock_object(self.root, object)?;
        }
        let renamed =
            nix::fcntl::renameat(self.tmp, tmp_name.as_str(), parent, OsStr::from_bytes(name))
                .at(&shown);
        fsx::set_mtime(parent, dir_mtime).at(&shown)?;
        idx.exec("DELETE FROM journal WHERE id = ?1", [row])?;
        renamed?;
        let (dir, name) = crate::index::split_path(rel);
        idx.exec(
            &format!("DELETE FROM files WHERE {}", crate::index::AT_PATH),
            params![self.guest_id, dir, name],
        )?;
        self.report.split.push(guest_abs(rel));
        self.report.copied_bytes += st.size;
        Ok(())
    }
}

/// What `export` wrote.
#[derive(Clone, Debug, Serialize)]
pub struct ExportReport {
    /// The guest.
    pub guest: String,
    /// The tree or tarball written (`-`: standard output).
    pub dest: PathBuf,
    /// A tarball (else a directory tree).
    pub tar: bool,
    /// Read from the running guest's mount (its files may have changed meanwhile).
    pub from_running_guest: bool,
}

/// A read-only overlay of a guest's two layers (`lowerdir=upper:base`): the merged view of an
/// unmounted guest. Unmounted on drop.
struct View {
    path: PathBuf,
}

impl View {
    fn mount(root: &HostRoot, record: &GuestRecord, paths: &GuestPaths) -> Result<View> {
        check_offline(root, record, &MountTable::all().at("/proc/self/mountinfo")?)?;
        let guest_dir =
            fsx::open_dir_beneath(root.guests_fd(), &root.guests_dir(), record.name.as_bytes())?;
        clear_scratch(root, guest_dir.as_fd(), paths)?;
        crate::overlay::match_root_metadata(root, paths)?;
        let path = paths.tmp.join("view");
        fsx::ensure_dir(&path, 0o700)?;
        let data = crate::overlay::view_options(paths)?;
        nix::mount::mount(
            Some("cowherd"),
            &path,
            Some("overlay"),
            MsFlags::MS_RDONLY,
            Some(data.as_os_str()),
        )
        .at(&path)?;
        Ok(View { path })
    }
}

impl Drop for View {
    fn drop(&mut self) {
        let _ = nix::mount::umount2(&self.path, MntFlags::MNT_DETACH);
        let _ = std::fs::remove_dir(&self.path);
    }
}

/// GNU tar's options that keep every byte, owner, mode, nanosecond mtime, xattr and ACL, and
/// holes.
const TAR_KEEP: [&str; 7] = [
    "--format=posix",
    "--pax-option=delete=atime,delete=ctime",
    "--numeric-owner",
    "--xattrs",
    "--xattrs-include=*",
    "--acls",
    "--sparse",
];

fn tar() -> Command {
    let mut cmd = Command::new("tar");
    cmd.env("LC_ALL", "C");
    cmd
}

fn run(cmd: &mut Command, what: &Path) -> Result<()> {
    let status = cmd.status().map_err(|e| Error::Io {
        path: what.to_path_buf(),
        error: if e.kind() == std::io::ErrorKind::NotFound {
            std::io::Error::other("GNU tar not found: install the tar package")
        } else {
            e
        },
    })?;
    if status.success() {
        Ok(())
    } else {
        Err(Error::Io {
            path: what.to_path_buf(),
            error: std::io::Error::other(format!("tar failed ({status}); see its messages above")),
        })
    }
}

/// Writes guest `name`'s merged view — what it sees — to `dest`: a new directory, or with
/// `tar` a POSIX tarball (`-`: standard output), with every byte, owner, mode, nanosecond
/// mtime, xattr, ACL and hole (GNU tar with [`TAR_KEEP`]). Hardlinks are not kept: the paths of
/// one store object are separate files of the guest, so every path is written as its own
/// file (unifying the copy on its new host shares them again).
///
/// # Algorithm
/// A mounted guest is read through its mount point. An unmounted one gets a read-only overlay
/// of its two layers (`lowerdir=upper:base`) under `tmp/view`, so the kernel itself merges
/// them (whiteouts, opaque directories), unmounted afterwards. `tar --one-file-system` reads
/// it; for a directory a second tar unpacks into `dest`.
///
/// # Errors
/// [`Error::GuestExists`]-style [`Error::BadRecord`] if `dest` exists, [`Error::InUse`] for a
/// guest mounted elsewhere, [`Error::Io`] from tar or mount(2).
pub fn export(root: &HostRoot, name: &str, dest: &Path, as_tar: bool) -> Result<ExportReport> {
    let record = guest_record(root, name)?;
    let paths = GuestPaths::new(root, &record);
    let to_stdout = as_tar && dest == Path::new("-");
    if !to_stdout && std::fs::symlink_metadata(dest).is_ok() {
        return Err(Error::BadRecord {
            path: dest.to_path_buf(),
            message: "exists already; export writes a new file or directory".into(),
        });
    }
    let table = MountTable::own().at("/proc/self/mountinfo")?;
    let (source, _view, running) = match state_in(&table, &paths) {
        MountState::Mounted { path } => (path, None, true),
        MountState::Foreign { path, why } => {
            return Err(Error::ForeignMount {
                name: name.into(),
                path,
                why,
            });
        }
        MountState::Unmounted => {
            let view = View::mount(root, &record, &paths)?;
            (view.path.clone(), Some(view), false)
        }
    };
    let mut create = tar();
    create
        .args([
            "--create",
            "--one-file-system",
            // Every path is stored as its own file: paths linked to one store object are
            // separate files that share content, not a hardlink group to recreate.
            "--hard-dereference",
            "--file",
            "-",
            "--directory",
        ])
        .arg(&source)
        .args(TAR_KEEP)
        .arg(".");
    if as_tar {
        if !to_stdout {
            // Made here, not by tar: never through a symlink planted at DEST, never readable
            // by other users (it holds the guest's secrets).
            let file = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .custom_flags(libc::O_NOFOLLOW)
                .open(dest)
                .at(dest)?;
            create.stdout(file);
        }
        run(&mut create, dest)?;
    } else {
        // 0700 while tar fills it (`--no-overwrite-dir` keeps it so), the guest root's
        // metadata once complete.
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(dest)
            .at(dest)?;
        create.stdout(Stdio::piped());
        let mut producer = create.spawn().map_err(|e| Error::Io {
            path: dest.to_path_buf(),
            error: e,
        })?;
        let pipe = producer
            .stdout
            .take()
            .map(Stdio::from)
            .unwrap_or_else(Stdio::null);
        let unpacked = run(
            tar()
                .args([
                    "--extract",
                    "--file",
                    "-",
                    "--same-owner",
                    "--preserve-permissions",
                ])
                .args(["--no-overwrite-dir", "--directory"])
                .arg(dest)
                .args(TAR_KEEP)
                .stdin(pipe),
            dest,
        );
        let produced = producer.wait().map_err(|e| Error::Io {
            path: source.clone(),
            error: e,
        })?;
        unpacked?;
        if !produced.success() {
            return Err(Error::Io {
                path: source,
                error: std::io::Error::other(format!(
                    "tar failed ({produced}); see its messages above"
                )),
            });
        }
        let from = fsx::open_dir(&source)?;
        let st = fsx::fstat(&from).at(&source)?;
        let xattrs = fsx::xattrs_at(from.as_fd(), b".").at(&source)?;
        fsx::set_dir_metadata(fsx::open_dir(dest)?.as_fd(), &st, &xattrs).at(dest)?;
    }
    Ok(ExportReport {
        guest: name.to_string(),
        dest: dest.to_path_buf(),
        tar: as_tar,
        from_running_guest: running,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn glob_escape_protects_pattern_characters() {
        assert_eq!(glob_escape("/usr/bin/ls"), "/usr/bin/ls");
        assert_eq!(glob_escape("/odd/[a]*?{b}"), "/odd/\\[a\\]\\*\\?\\{b\\}");
    }
}
