//! The lifecycle verbs that touch shared inodes: `split` (a guest takes private copies of
//! shared files back), `export` (the merged view as a standalone tree or tarball) and `destroy`.

use std::collections::HashSet;
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
use rusqlite::{OptionalExtension, params};
use serde::Serialize;

use crate::error::{Error, PathContext, Result};
use crate::fold::clear_scratch;
use crate::fsx::{self, Stat, Visit};
use crate::guest::{
    DESTROYING, GuestPaths, GuestRecord, OfflineGuest, check_offline, guest_record, remove_doomed,
};
use crate::mountinfo::MountTable;
use crate::overlay::{MountState, state_in};
use crate::policy::Marker;
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
/// directory means every shared file below it), keeping its hardlink groups and inode flags,
/// and marks them `private` in its record.
///
/// # Algorithm
/// A path is taken below the guest's top: `..` is refused (it would leave the guest), and no
/// symlink or mount point inside the guest is followed (the error names the component). For
/// each store link, its hardlink group: the paths of this guest that were one inode before
/// unify linked them (the same `orig_ino` in the index) and still link an object of that
/// key. One copy (content with holes, owner, mode, xattrs, mtime, and the guest's own inode
/// flags: the object's, less the immutable flag of an immutable object) is written to `tmp/`
/// and fsynced; for each path of the group a link of it is renamed over the path, with the
/// directory's mtime journalled and put back (an immutable object's flag is cleared for that,
/// journalled, and set again at the end). An immutable or append-only flag of the guest is
/// set once every path is in place. So the group stays one inode, now private: a write
/// through one path reaches the others, as it did before unify. The path never disappears and
/// always holds the same content and metadata; a killed run leaves only names in `tmp/`. The
/// index rows become private files at once (inode, no object, marker `private`), so `list`
/// and `stats` count them right. Then a rule `private PATH` (or `private PATH/**`) is put
/// first in the guest's `[policy]`, so the next `unify` does not share them again.
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
        base: base.as_fd(),
        base_path: &gpaths.base,
        tmp: tmp.as_fd(),
        guest_id,
        seq: 0,
        done: HashSet::new(),
        unlocked: HashSet::new(),
        report: SplitReport {
            guest: name.to_string(),
            ..SplitReport::default()
        },
    };
    let mut rules = Vec::new();
    for path in paths {
        let shown = path.trim_start_matches('/').as_bytes();
        let Some(rel) = guest_rel(path) else {
            splitter.fail(
                shown,
                "leaves the guest: `..` is never followed; name the path from the guest's / \
                 without it (like /etc/shadow)",
            );
            continue;
        };
        if !path.starts_with('/') || rel.is_empty() {
            splitter.fail(
                shown,
                "name a guest-absolute path below / (like /usr/bin/ls)",
            );
            continue;
        }
        match splitter.split_path(&rel) {
            Ok(is_dir) => rules.push(format!(
                "private {}{}",
                glob_escape(&format!("/{}", String::from_utf8_lossy(&rel))),
                if is_dir { "/**" } else { "" }
            )),
            Err(e) => splitter.fail(&rel, e),
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

/// The inode flags (`chattr`) a guest may have set on a file that a private copy keeps:
/// `s u c S i a d A m j t C`. Those the filesystem sets itself (extents, inline data, …) are
/// not the guest's and are left to the new inode.
const GUEST_FLAGS: libc::c_long = 0x1 // s: secure deletion
    | 0x2 // u: undeletable
    | 0x4 // c: compressed
    | 0x8 // S: synchronous updates
    | crate::sys::FS_IMMUTABLE_FL // i
    | crate::sys::FS_APPEND_FL // a
    | 0x40 // d: no dump
    | 0x80 // A: no atime updates
    | 0x400 // m: no compression
    | 0x4000 // j: data journalling
    | 0x8000 // t: no tail merging
    | 0x0080_0000; // C: no copy on write

/// The flags that forbid renaming or linking the inode: set on a copy only once it has all
/// its names.
const GUARD_FLAGS: libc::c_long = crate::sys::FS_IMMUTABLE_FL | crate::sys::FS_APPEND_FL;

/// The guest-absolute path `path` as a path below the guest's top, without `.` or empty
/// components; `None` if it has a `..` component (which would leave the guest).
fn guest_rel(path: &str) -> Option<Vec<u8>> {
    let mut rel = Vec::with_capacity(path.len());
    for part in path.split('/').filter(|p| !p.is_empty() && *p != ".") {
        if part == ".." {
            return None;
        }
        if !rel.is_empty() {
            rel.push(b'/');
        }
        rel.extend_from_slice(part.as_bytes());
    }
    Some(rel)
}

/// The error for the entry `name` of `dir` (host path `shown`), a symlink inside a guest.
fn symlink_in_guest(dir: BorrowedFd<'_>, name: &[u8], shown: PathBuf) -> Error {
    let target = nix::fcntl::readlinkat(dir, OsStr::from_bytes(name))
        .map(|t| format!(" (-> {})", t.as_bytes().escape_ascii()))
        .unwrap_or_default();
    Error::BadRecord {
        path: shown,
        message: format!(
            "a symlink inside the guest{target}, never followed: name the path it points to, \
             as the guest sees it"
        ),
    }
}

/// Opens the directory `rel` of the guest tree `base` (host path `base_path`) beneath it;
/// when that fails for a component that is a symlink, no directory or a mount point, the
/// error names that component and says so.
fn open_guest_dir(base: BorrowedFd<'_>, base_path: &Path, rel: &[u8]) -> Result<OwnedFd> {
    let e = match fsx::open_dir_beneath(base, base_path, rel) {
        Ok(fd) => return Ok(fd),
        Err(e @ (Error::Symlink { .. } | Error::NotADirectory { .. })) => e,
        Err(e @ Error::CrossFilesystem { .. }) => e,
        Err(e) => return Err(e),
    };
    // Again a component at a time, to find the one that stopped it.
    let Ok(mut dir) = fsx::open_beneath(base, b"", OFlag::O_RDONLY | OFlag::O_DIRECTORY) else {
        return Err(e);
    };
    let mut end = 0;
    for part in rel.split(|&b| b == b'/') {
        end += part.len();
        let shown = fsx::join(base_path, &rel[..end]);
        end += 1;
        let Ok(st) = fsx::lstat_at(dir.as_fd(), part) else {
            break;
        };
        if st.mode & libc::S_IFMT == libc::S_IFLNK {
            return Err(symlink_in_guest(dir.as_fd(), part, shown));
        }
        if !st.is_dir() {
            return Err(Error::NotADirectory { path: shown });
        }
        match fsx::open_beneath(dir.as_fd(), part, OFlag::O_RDONLY | OFlag::O_DIRECTORY) {
            Ok(sub) => dir = sub,
            Err(nix::errno::Errno::EXDEV) => {
                return Err(Error::BadRecord {
                    path: shown,
                    message: "a mount point inside the guest, never crossed: split what is \
                              below it in the guest it belongs to"
                        .into(),
                });
            }
            Err(_) => break,
        }
    }
    Err(e)
}

/// One path of a hardlink group to replace by the group's private copy.
struct Member {
    rel: Vec<u8>,
    parent: OwnedFd,
    object: String,
}

/// The state of one `split`.
struct Splitter<'a> {
    root: &'a HostRoot,
    base: BorrowedFd<'a>,
    base_path: &'a Path,
    tmp: BorrowedFd<'a>,
    guest_id: i64,
    seq: u64,
    /// Paths made private by this run (a group's other paths are split with the first).
    done: HashSet<Vec<u8>>,
    /// Immutable objects whose flag this run cleared (journalled; set again at the end).
    unlocked: HashSet<String>,
    report: SplitReport,
}

impl Splitter<'_> {
    fn fail(&mut self, rel: &[u8], error: impl std::fmt::Display) {
        let failure = Failure::at(&self.report.guest, rel, error);
        self.report.failures.push(failure);
    }

    /// Splits the file at `rel`, or every shared file below the directory at `rel`; returns
    /// whether it is a directory.
    fn split_path(&mut self, rel: &[u8]) -> Result<bool> {
        let (parent_rel, name) = fsx::split_parent(rel);
        let parent = open_guest_dir(self.base, self.base_path, parent_rel)?;
        let shown = fsx::join(self.base_path, rel);
        let st = fsx::lstat_at(parent.as_fd(), name).at(&shown)?;
        if st.is_file() {
            self.split_file(rel, &st);
            return Ok(false);
        }
        if st.mode & libc::S_IFMT == libc::S_IFLNK {
            return Err(symlink_in_guest(parent.as_fd(), name, shown));
        }
        if !st.is_dir() {
            return Err(Error::BadRecord {
                path: shown,
                message: "not a regular file or directory; only files are shared".into(),
            });
        }
        let dir = open_guest_dir(self.base, self.base_path, rel)?;
        let mut files = Vec::new();
        let mut single = Vec::new();
        let _ = fsx::walk_tree(dir.as_fd(), &mut |visit| {
            match visit {
                Visit::File(sub, st) if st.nlink > 1 => files.push((sub.to_vec(), st)),
                Visit::File(sub, st) => single.push((sub.to_vec(), st)),
                Visit::Dir(_) | Visit::DirEnd(_) => {}
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
        // A file a killed split already copied has one link, and maybe a row that still
        // names the object.
        for (sub, st) in single {
            let mut full = rel.to_vec();
            full.push(b'/');
            full.extend_from_slice(&sub);
            if let Err(e) = self.forget_stale_link(&full, &st) {
                self.fail(&full, e);
            }
        }
        files.sort_by(|a, b| a.0.cmp(&b.0));
        for (sub, st) in files {
            let mut full = rel.to_vec();
            full.push(b'/');
            full.extend_from_slice(&sub);
            self.split_file(&full, &st);
        }
        Ok(true)
    }

    /// Replaces the store link at `rel` (of inode `st`), with the other paths of its
    /// hardlink group, by one private copy; a file that is no store link is noted as
    /// private already.
    fn split_file(&mut self, rel: &[u8], st: &Stat) {
        if self.done.contains(rel) {
            return;
        }
        match store::object_of_inode(self.root, st) {
            Ok(Some(object)) => {
                if let Err(e) = self.split_group(rel, st, object) {
                    self.fail(rel, e);
                }
            }
            Ok(None) => {
                // A split killed after its rename left the row naming the object: it is the
                // copy's now.
                if let Err(e) = self.forget_stale_link(rel, st) {
                    self.fail(rel, e);
                }
                self.report.already_private.push(guest_abs(rel));
            }
            Err(e) => self.fail(rel, e),
        }
    }

    /// Records `rel` (inode `st`, no store link) as private if its row still names an object.
    fn forget_stale_link(&self, rel: &[u8], st: &Stat) -> Result<()> {
        let idx = &self.root.index;
        let (dir, name) = crate::index::split_path(rel);
        let linked: Option<Option<i64>> = idx
            .conn
            .prepare_cached(&format!(
                "SELECT object_id FROM files WHERE {}",
                crate::index::AT_PATH
            ))
            .and_then(|mut stmt| {
                stmt.query_row(params![self.guest_id, dir, name], |r| r.get(0))
                    .optional()
            })
            .map_err(|e| idx.err(e))?;
        if linked.flatten().is_some() {
            self.record_private(rel, st)?;
        }
        Ok(())
    }

    /// The paths of this guest that were one inode with `rel` before unify linked them
    /// (`orig_ino` of their rows), still links of an object of the same key: the hardlink
    /// group the guest saw. `rel` first.
    fn group_of(&self, rel: &[u8], object: String) -> Result<Vec<Member>> {
        let idx = &self.root.index;
        let (dir, name) = crate::index::split_path(rel);
        let parent = open_guest_dir(self.base, self.base_path, dir)?;
        let mut members = vec![Member {
            rel: rel.to_vec(),
            parent,
            object: object.clone(),
        }];
        let orig: Option<i64> = idx
            .conn
            .prepare_cached(&format!(
                "SELECT orig_ino FROM files WHERE {}",
                crate::index::AT_PATH
            ))
            .and_then(|mut stmt| {
                stmt.query_row(params![self.guest_id, dir, name], |r| r.get(0))
                    .optional()
            })
            .map_err(|e| idx.err(e))?
            .flatten();
        let Some(orig) = orig else {
            return Ok(members);
        };
        let others: Vec<Vec<u8>> = idx
            .conn
            .prepare_cached(
                "SELECT path FROM paths WHERE guest_id = ?1 AND orig_ino = ?2
                   AND object_id IS NOT NULL ORDER BY path",
            )
            .and_then(|mut stmt| {
                stmt.query_map(params![self.guest_id, orig], |r| r.get(0))?
                    .collect::<rusqlite::Result<_>>()
            })
            .map_err(|e| idx.err(e))?;
        let key = store::parse_object_name(&object).map(|(key, ..)| key);
        for other in others {
            if other == rel || self.done.contains(&other) {
                continue;
            }
            let (dir, name) = crate::index::split_path(&other);
            // A path changed since the index saw it is no longer of the group.
            let Ok(parent) = fsx::open_dir_beneath(self.base, self.base_path, dir) else {
                continue;
            };
            let Ok(st) = fsx::lstat_at(parent.as_fd(), name) else {
                continue;
            };
            if !st.is_file() {
                continue;
            }
            if let Some(linked) = store::object_of_inode(self.root, &st)?
                && store::parse_object_name(&linked).map(|(key, ..)| key) == key
            {
                members.push(Member {
                    rel: other,
                    parent,
                    object: linked,
                });
            }
        }
        Ok(members)
    }

    /// Gives `rel` (a link of store object `object`, inode `st`) and the other paths of its
    /// hardlink group one private copy.
    fn split_group(&mut self, rel: &[u8], st: &Stat, object: String) -> Result<()> {
        let members = self.group_of(rel, object)?;
        let (_, name) = fsx::split_parent(rel);
        let shown = fsx::join(self.base_path, rel);
        let src = fsx::open_beneath(
            members[0].parent.as_fd(),
            name,
            OFlag::O_RDONLY | OFlag::O_NONBLOCK,
        )
        .at(&shown)?;
        let now = fsx::fstat(&src).at(&shown)?;
        if (now.dev, now.ino) != (st.dev, st.ino) {
            return Err(Error::BadRecord {
                path: shown,
                message: "changed while split ran; run split again".into(),
            });
        }
        let src = std::fs::File::from(src);
        let xattrs = fsx::read_xattrs(&src).at(&shown)?;
        // The guest's own flags: the object's, but for the immutable flag the store gives an
        // immutable object.
        let mut flags = crate::sys::get_flags(&src).at(&shown)? as libc::c_long & GUEST_FLAGS;
        if store::parse_object_name(&members[0].object)
            .is_some_and(|(_, kind, _)| kind == Marker::Immutable)
        {
            flags &= !crate::sys::FS_IMMUTABLE_FL;
        }
        self.seq += 1;
        let anchor = format!("{:x}", self.seq);
        let out: OwnedFd = nix::fcntl::openat(
            self.tmp,
            anchor.as_str(),
            OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_WRONLY | OFlag::O_CLOEXEC | OFlag::O_NOFOLLOW,
            Mode::from_bits_truncate(0o600),
        )
        .at(&shown)?;
        let mut out = std::fs::File::from(out);
        fsx::copy_content(&src, &mut out, st.size).at(&shown)?;
        fsx::set_file_metadata(&out, st.uid, st.gid, st.mode, &xattrs, st.mtime_ns).at(&shown)?;
        crate::sys::add_flags(&out, flags & !GUARD_FLAGS).at(&shown)?;
        out.sync_all().at(&shown)?;
        // Each path of the group: a link of the copy renamed over it.
        let mut placed = Vec::new();
        for (i, member) in members.iter().enumerate() {
            let link = format!("{anchor}.{i}");
            match self.place(&anchor, &link, member) {
                Ok(()) => placed.push(member.rel.clone()),
                Err(e) if i == 0 => return Err(e),
                Err(e) => self.fail(&member.rel, e),
            }
        }
        nix::unistd::unlinkat(
            self.tmp,
            anchor.as_str(),
            nix::unistd::UnlinkatFlags::NoRemoveDir,
        )
        .at(&shown)?;
        // The guest's immutable or append-only flag, once the copy has its names.
        if flags & GUARD_FLAGS != 0
            && let Err(e) = crate::sys::add_flags(&out, flags & GUARD_FLAGS)
        {
            self.fail(
                rel,
                format!("split, but its flags could not be set again: {e}"),
            );
        }
        let copy = fsx::fstat(&out).at(&shown)?;
        for p in &placed {
            self.record_private(p, &copy)?;
            self.done.insert(p.clone());
            self.report.split.push(guest_abs(p));
        }
        self.report.copied_bytes += st.size;
        Ok(())
    }

    /// Links the copy (named `anchor` in `tmp/`) as `link` there and renames that over
    /// the member's path: the directory's mtime journalled and put back, an immutable
    /// object's flag cleared (journalled) for the rename.
    fn place(&mut self, anchor: &str, link: &str, m: &Member) -> Result<()> {
        let name = fsx::split_parent(&m.rel).1;
        let shown = fsx::join(self.base_path, &m.rel);
        nix::unistd::linkat(
            self.tmp,
            anchor,
            self.tmp,
            link,
            nix::fcntl::AtFlags::empty(),
        )
        .at(&shown)?;
        let dir_rel = fsx::split_parent(&m.rel).0;
        let dir_mtime = fsx::fstat(&m.parent).at(&shown)?.mtime_ns;
        let idx = &self.root.index;
        idx.exec(
            "INSERT INTO journal(op, guest_id, path, value) VALUES ('dir', ?1, ?2, ?3)",
            params![self.guest_id, dir_rel, dir_mtime],
        )?;
        let row = idx.conn.last_insert_rowid();
        if !self.unlocked.contains(&m.object) && store::object_is_immutable(self.root, &m.object)? {
            store::unlock_object(self.root, &m.object)?;
            self.unlocked.insert(m.object.clone());
        }
        let renamed =
            nix::fcntl::renameat(self.tmp, link, &m.parent, OsStr::from_bytes(name)).at(&shown);
        fsx::set_mtime(&m.parent, dir_mtime).at(&shown)?;
        idx.exec("DELETE FROM journal WHERE id = ?1", [row])?;
        renamed
    }

    /// Makes the row of `rel` say what it is now: a private file, inode `copy`, no store
    /// link, marked private; so `list` and `stats` count it at once.
    fn record_private(&self, rel: &[u8], copy: &Stat) -> Result<()> {
        let (dir, name) = crate::index::split_path(rel);
        self.root.index.exec(
            &format!(
                "UPDATE files SET object_id = NULL, orig_ino = NULL, phash = NULL, chash = NULL,
                                  xhash = NULL, ino = ?4, nlink = ?5, blocks = ?6,
                                  ctime_ns = ?7, marker = ?8
                 WHERE {}",
                crate::index::AT_PATH
            ),
            params![
                self.guest_id,
                dir,
                name,
                copy.ino as i64,
                copy.nlink as i64,
                copy.blocks as i64,
                copy.ctime_ns,
                Marker::Private.code()
            ],
        )?;
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
    /// A directory: the mode of the guest's top directory (octal, `0755`), which the top of
    /// `dest` does not get: it is 0700, because the tree holds the guest's setuid-root files.
    /// `chmod` it to this mode to open the tree.
    pub guest_top_mode: Option<String>,
}

/// The mode of an exported tree's top directory: the tree holds the guest's setuid-root
/// files, setuid-root for every host user who can reach them (as the root is, see
/// `HostRoot::restrict_access`).
const TOP_MODE: u32 = 0o700;

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
/// file (unifying the copy on its new host shares them again). Other users are kept out: a
/// tarball is 0600, a directory's top 0700 rather than the guest's mode (in the
/// report), since the guest's setuid-root files are setuid-root on this host too.
///
/// # Algorithm
/// A mounted guest is read through its mount point. An unmounted one gets a read-only overlay
/// of its two layers (`lowerdir=upper:base`) under `tmp/view`, so the kernel itself merges
/// them (whiteouts, opaque directories), unmounted afterwards. `tar --one-file-system` reads
/// it; for a directory a second tar unpacks into `dest`, made 0700 first and kept so
/// (`--no-overwrite-dir`); its top then takes the guest's owner, xattrs and mtime.
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
    let mut guest_top_mode = None;
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
        // The guest's owner, xattrs and mtime, but never its mode: no other user may enter
        // (the mode goes after the xattrs, so an ACL's mask closes too).
        let closed = Stat {
            mode: (st.mode & !0o7777) | TOP_MODE,
            ..st
        };
        fsx::set_dir_metadata(fsx::open_dir(dest)?.as_fd(), &closed, &xattrs).at(dest)?;
        guest_top_mode = Some(format!("{:04o}", st.mode & 0o7777));
    }
    Ok(ExportReport {
        guest: name.to_string(),
        dest: dest.to_path_buf(),
        tar: as_tar,
        from_running_guest: running,
        guest_top_mode,
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

    #[test]
    fn a_guest_path_loses_dot_and_empty_components_and_never_climbs_out() {
        assert_eq!(
            guest_rel("/usr//./bin/ls/").as_deref(),
            Some(&b"usr/bin/ls"[..])
        );
        assert_eq!(guest_rel("/").as_deref(), Some(&b""[..]));
        assert_eq!(guest_rel("/../../etc/shadow"), None);
        assert_eq!(guest_rel("/usr/../etc/shadow"), None);
        assert_eq!(guest_rel("/usr/..x/y").as_deref(), Some(&b"usr/..x/y"[..]));
    }
}
