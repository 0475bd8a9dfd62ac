//! Replace: every planned path becomes a link to its object — link to a temporary name,
//! re-check, rename over — a journalled directory batch at a time.

use std::collections::{BTreeMap, HashMap};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use nix::errno::Errno;
use nix::fcntl::OFlag;
use rayon::prelude::*;
use rusqlite::{Connection, params};

use crate::error::{Error, PathContext, Result};
use crate::fsx::{self, Stat};
use crate::guest::OpenGuest;
use crate::index;
use crate::progress::Progress;
use crate::release::Releaser;
use crate::report::{Failure, LinkedPath, UnifyReport};
use crate::root::HostRoot;
use crate::store;

/// Paths replaced per journal batch.
const CHUNK: i64 = 1024;
/// Closer threads freeing replaced inodes. Freeing waits on the device when the filesystem
/// discards freed blocks; on the 2-core benchmark host 2 closers took 11.0 s for the link phase
/// of 87k paths, 8 took 8.5 s and 32 took 8.1 s.
const CLOSERS: usize = 16;

/// One row of the plan, read back for replacement.
struct Step {
    id: i64,
    guest_id: i64,
    path: Vec<u8>,
    /// Its `files` row: directory id and name.
    dir: i64,
    name: Vec<u8>,
    object_id: i64,
    object_name: String,
    object_ino: u64,
    then: Stat,
}

fn read_steps(conn: &Connection, after: i64, dev: u64) -> rusqlite::Result<Vec<Step>> {
    let mut stmt = conn.prepare_cached(
        "SELECT id, guest_id, path, object_id, object_name, object_ino, ino, nlink, size, blocks,
                mode, uid, gid, mtime_ns, ctime_ns, dir, name
         FROM work WHERE id > ?1 ORDER BY id LIMIT ?2",
    )?;
    stmt.query_map(params![after, CHUNK], |r| {
        Ok(Step {
            id: r.get(0)?,
            guest_id: r.get(1)?,
            path: r.get(2)?,
            dir: r.get(15)?,
            name: r.get(16)?,
            object_id: r.get(3)?,
            object_name: r.get(4)?,
            object_ino: r.get::<_, i64>(5)? as u64,
            then: index::row_stat(r, 6, dev)?,
        })
    })?
    .collect()
}

/// A directory that batches of replacements touch: opened and journalled by the first batch
/// that has a path in it, its mtime put back (and its journal row deleted) once a batch has
/// finished and the next one has no path in it.
struct OpenedDir {
    /// Its fd, its mtime before any replacement and its journal row; or why it could not be
    /// opened.
    state: std::result::Result<(OwnedFd, i64, i64), String>,
    /// The last batch with a path in it.
    batch: u64,
}

/// The open directories of the replacement batches, by guest and directory path.
type OpenDirs = BTreeMap<(i64, Vec<u8>), OpenedDir>;

/// What the replacements of one batch came to: the index of each step and its outcome.
type Outcomes = Vec<(usize, Result<Outcome>)>;

/// Replaces planned paths by links to their objects, as the plan grows: each
/// [`Replacer::replace_new`] takes the rows planned since the last one (a window of the
/// pipeline). Owns what lives across windows: the closer threads, the count of freed inodes,
/// the ctimes of hardlink groups in progress.
pub(crate) struct Replacer<'a> {
    root: &'a HostRoot,
    guests: &'a HashMap<i64, &'a OpenGuest>,
    list_paths: bool,
    pool: &'a rayon::ThreadPool,
    /// Dropped with the replacer, after the last close of a replaced inode.
    releaser: Releaser,
    freed: Freed,
    ctimes: HashMap<u64, i64>,
    /// The last plan row handed to a window.
    cursor: i64,
}

impl<'a> Replacer<'a> {
    pub(crate) fn new(
        root: &'a HostRoot,
        guests: &'a HashMap<i64, &'a OpenGuest>,
        list_paths: bool,
        pool: &'a rayon::ThreadPool,
    ) -> Self {
        Replacer {
            root,
            guests,
            list_paths,
            pool,
            releaser: Releaser::new(CLOSERS),
            freed: Freed::default(),
            ctimes: HashMap::new(),
            cursor: 0,
        }
    }

    /// The bytes freed so far (inodes all of whose links were replaced).
    pub(crate) fn freed_bytes(&self) -> u64 {
        self.freed.bytes()
    }

    /// Replaces every path planned since the last call by a link to its object, a directory
    /// batch at a time; every directory it touched has its mtime back when it returns.
    ///
    /// # Algorithm
    /// The new plan rows are copied to `temp.work` in path order. Batches of [`CHUNK`] rows:
    /// for each, on this thread, open and journal (mtime, committed) every directory not
    /// already open from the previous batch. Then the batch's replacements ([`replace_one`])
    /// run on the I/O pool while this thread finishes the previous batch: puts back the mtimes
    /// of its directories that the new batch does not touch, and records its links in the
    /// index (one transaction). So the index writes, which are serial, overlap the link
    /// syscalls instead of following them.
    ///
    /// # Errors
    /// Index errors abort (every finished replacement stands and is safe; the journal puts the
    /// directory mtimes back on the next run). A path that cannot be replaced is reported in
    /// `report.failures`.
    pub(crate) fn replace_new(
        &mut self,
        report: &mut UnifyReport,
        progress: &dyn Progress,
    ) -> Result<()> {
        let root = self.root;
        let guests = self.guests;
        let idx = &root.index;
        // In path order, so each directory is opened and journalled once per batch.
        idx.conn
            .execute_batch(
                "DROP TABLE IF EXISTS temp.work;
                 CREATE TEMP TABLE work(id INTEGER PRIMARY KEY, guest_id INTEGER, path BLOB,
                     dir INTEGER, name BLOB, object_id INTEGER, object_name TEXT,
                     object_ino INTEGER, ino INTEGER, nlink INTEGER, blocks INTEGER, size INTEGER,
                     mode INTEGER, uid INTEGER, gid INTEGER, mtime_ns INTEGER, ctime_ns INTEGER);",
            )
            .map_err(|e| idx.err(e))?;
        idx.exec(
            "INSERT INTO work SELECT NULL, guest_id, path, dir, name, object_id, object_name,
                 object_ino, ino, nlink, blocks, size, mode, uid, gid, mtime_ns, ctime_ns
             FROM plan WHERE id > ?1 AND object_id IS NOT NULL ORDER BY guest_id, path",
            [self.cursor],
        )?;
        self.cursor = idx
            .conn
            .query_row("SELECT COALESCE(MAX(id), 0) FROM plan", [], |r| r.get(0))
            .map_err(|e| idx.err(e))?;
        let objects = ObjectsDir {
            fd: root.objects_fd(),
            path: root.objects_dir(),
        };
        let mut open = OpenDirs::new();
        // The previous batch: its steps and outcomes, finished while the next one runs.
        let mut previous: Option<(Vec<Step>, Outcomes)> = None;
        let mut last = 0i64;
        for batch in 1u64.. {
            let steps = read_steps(&idx.conn, last, root.dev()).map_err(|e| idx.err(e))?;
            if let Some(step) = steps.last() {
                last = step.id;
            }

            // Open and journal the batch's new directories before touching any.
            let tx = idx.conn.unchecked_transaction().map_err(|e| idx.err(e))?;
            for s in &steps {
                let key = (s.guest_id, fsx::split_parent(&s.path).0.to_vec());
                if let Some(dir) = open.get_mut(&key) {
                    dir.batch = batch;
                    continue;
                }
                let guest = guests[&s.guest_id];
                let state = guest
                    .open_parent(&s.path)
                    .and_then(|fd| {
                        let mtime = fsx::fstat(&fd).at(guest.host_path(&key.1))?.mtime_ns;
                        Ok((fd, mtime))
                    })
                    .map_err(|e| e.to_string());
                let state = match state {
                    Ok((fd, mtime)) => {
                        idx.exec(
                            "INSERT INTO journal(op, guest_id, path, value)
                             VALUES ('dir', ?1, ?2, ?3)",
                            params![key.0, key.1, mtime],
                        )?;
                        Ok((fd, mtime, idx.conn.last_insert_rowid()))
                    }
                    Err(e) => Err(e),
                };
                open.insert(key, OpenedDir { state, batch });
            }
            tx.commit().map_err(|e| idx.err(e))?;
            // Directories the new batch does not touch: done once the previous batch is.
            let retired: OpenDirs;
            (open, retired) = std::mem::take(&mut open)
                .into_iter()
                .partition(|(_, d)| d.batch == batch);
            // An inode whose every link is replaced is not seen again: its ctime can go.
            for ino in self.freed.take_done() {
                self.ctimes.remove(&ino);
            }

            let open = &open;
            let objects = &objects;
            let releaser = &self.releaser;
            let ctimes = &mut self.ctimes;
            let pool = self.pool;
            let freed = &mut self.freed;
            let list_paths = self.list_paths;
            let outcomes = std::thread::scope(|scope| -> Result<_> {
                let running = scope
                    .spawn(|| replace_batch(&steps, open, objects, guests, ctimes, releaser, pool));
                let finished = finish_batch(
                    root,
                    guests,
                    list_paths,
                    previous.take(),
                    retired,
                    report,
                    freed,
                );
                let outcomes = running.join().map_err(|_| Error::Io {
                    path: root.path().to_path_buf(),
                    error: std::io::Error::other("a replacement thread panicked"),
                })?;
                finished.map(|()| outcomes)
            })?;
            if steps.is_empty() {
                break;
            }
            progress.advance(steps.len() as u64);
            previous = Some((steps, outcomes));
        }
        Ok(())
    }
}

/// Steps with their index in the batch.
type Indexed<'s> = Vec<(usize, &'s Step)>;

/// Runs one batch's replacements. Paths of single-link inodes are independent: they are
/// replaced in parallel, which overlaps the filesystem's latency. Paths of inodes with
/// several links go one after the other, so each sees the ctime the previous replacement left.
fn replace_batch(
    steps: &[Step],
    open: &OpenDirs,
    objects: &ObjectsDir<'_>,
    guests: &HashMap<i64, &OpenGuest>,
    ctimes: &mut HashMap<u64, i64>,
    releaser: &Releaser,
    pool: &rayon::ThreadPool,
) -> Outcomes {
    let attempt = |s: &Step, ctimes: &mut HashMap<u64, i64>| {
        let (parent, name) = fsx::split_parent(&s.path);
        match &open[&(s.guest_id, parent.to_vec())].state {
            Ok((fd, _, _)) => replace_one(
                objects,
                guests[&s.guest_id],
                fd.as_fd(),
                name,
                s,
                ctimes,
                releaser,
            ),
            Err(e) => Err(Error::Io {
                path: guests[&s.guest_id].host_path(parent),
                error: std::io::Error::other(e.clone()),
            }),
        }
    };
    let (single, multi): (Indexed<'_>, Indexed<'_>) = steps
        .iter()
        .enumerate()
        .partition(|(_, s)| s.then.nlink <= 1);
    let mut outcomes: Outcomes = pool.install(|| {
        single
            .par_iter()
            .map(|&(i, s)| (i, attempt(s, &mut HashMap::new())))
            .collect()
    });
    outcomes.extend(multi.into_iter().map(|(i, s)| (i, attempt(s, ctimes))));
    outcomes
}

/// Finishes a batch whose replacements are done (if any): reports its outcomes, puts back the mtimes
/// of the `retired` directories and drops their journal rows, and records the links in the
/// index, in one transaction.
fn finish_batch(
    root: &HostRoot,
    guests: &HashMap<i64, &OpenGuest>,
    list_paths: bool,
    batch: Option<(Vec<Step>, Outcomes)>,
    retired: OpenDirs,
    report: &mut UnifyReport,
    freed: &mut Freed,
) -> Result<()> {
    let idx = &root.index;
    let (steps, outcomes) = batch.unwrap_or_default();
    let mut done = Vec::new();
    for (i, outcome) in outcomes {
        let s = &steps[i];
        let guest = guests[&s.guest_id];
        match outcome {
            Ok(Outcome::Linked) => {
                report.linked_files += 1;
                if list_paths {
                    report.linked.push(LinkedPath::new(
                        guest,
                        &s.path,
                        &s.object_name,
                        s.then.size,
                    ));
                }
                freed.add(&s.then);
                done.push(s);
            }
            Ok(Outcome::Changed) => report.skipped_changed += 1,
            Err(e) => report
                .failures
                .push(Failure::new(guest, &s.path, e.to_string())),
        }
    }
    let mut journal = Vec::new();
    for ((guest_id, dir), opened) in &retired {
        if let Ok((fd, mtime, row)) = &opened.state {
            if let Err(e) = fsx::set_mtime(fd, *mtime) {
                let guest = guests[guest_id];
                report
                    .failures
                    .push(Failure::new(guest, dir, format!("restoring mtime: {e}")));
            }
            journal.push(*row);
        }
    }
    let tx = idx.conn.unchecked_transaction().map_err(|e| idx.err(e))?;
    for row in journal {
        idx.exec("DELETE FROM journal WHERE id = ?1", [row])?;
    }
    for s in done {
        index::record_link(idx, s.dir, &s.name, s.object_id, s.object_ino, &s.then)?;
    }
    tx.commit().map_err(|e| idx.err(e))
}

enum Outcome {
    Linked,
    Changed,
}

/// The store's object directory, shareable between threads (the root's index is not).
struct ObjectsDir<'a> {
    fd: BorrowedFd<'a>,
    path: std::path::PathBuf,
}

/// Replaces `dir`/`name` by a link to the step's object: link to a temporary name, re-check,
/// rename over. The name never disappears. The replaced inode goes to `releaser`.
fn replace_one(
    objects: &ObjectsDir<'_>,
    guest: &OpenGuest,
    dir: BorrowedFd<'_>,
    name: &[u8],
    s: &Step,
    ctimes: &mut HashMap<u64, i64>,
    releaser: &Releaser,
) -> Result<Outcome> {
    use std::ffi::OsStr;
    use std::os::unix::ffi::OsStrExt;
    let shown = || guest.host_path(&s.path);
    let expected_ctime = ctimes.get(&s.then.ino).copied().unwrap_or(s.then.ctime_ns);
    let check = |st: &Stat| st.same_content_identity(&s.then) && st.ctime_ns == expected_ctime;
    let now = match fsx::lstat_at(dir, name) {
        Ok(st) => st,
        Err(Errno::ENOENT) => return Ok(Outcome::Changed),
        Err(e) => return Err(e).at(shown()),
    };
    if now.ino == s.object_ino {
        return Ok(Outcome::Linked);
    }
    if !check(&now) {
        return Ok(Outcome::Changed);
    }
    let tmp = store::temp_name(s.id as u64);
    let object_rel = store::object_rel(&s.object_name);
    nix::unistd::linkat(
        objects.fd,
        object_rel.as_str(),
        dir,
        OsStr::from_bytes(&tmp),
        nix::fcntl::AtFlags::empty(),
    )
    .at(objects.path.join(&object_rel))?;
    let unlink_tmp = || {
        let _ = nix::unistd::unlinkat(
            dir,
            OsStr::from_bytes(&tmp),
            nix::unistd::UnlinkatFlags::NoRemoveDir,
        );
    };
    // Hold the replaced inode, so that freeing it happens on a closer thread, not in
    // `renameat`; with several links, its ctime after the rename is the next path's check.
    let keep = fsx::open_beneath(dir, name, OFlag::O_PATH).ok();
    // Re-check right before the rename: nothing may have changed since hashing.
    match fsx::lstat_at(dir, name) {
        Ok(st) if check(&st) => {}
        Ok(_) | Err(Errno::ENOENT) => {
            unlink_tmp();
            return Ok(Outcome::Changed);
        }
        Err(e) => {
            unlink_tmp();
            return Err(e).at(shown());
        }
    }
    if let Err(e) = nix::fcntl::renameat(dir, OsStr::from_bytes(&tmp), dir, OsStr::from_bytes(name))
    {
        unlink_tmp();
        return Err(e).at(shown());
    }
    if let Some(fd) = keep {
        if now.nlink > 1
            && let Ok(st) = fsx::fstat(&fd)
        {
            ctimes.insert(s.then.ino, st.ctime_ns);
        }
        releaser.release(fd);
    }
    Ok(Outcome::Linked)
}

/// What the replacements freed: inodes all of whose links were replaced. A single-link inode
/// is counted at once; an inode with several links is followed until its last link is
/// replaced, then forgotten, so memory holds only the hardlink groups in progress, never one
/// entry per file.
#[derive(Default)]
struct Freed {
    /// Bytes of the inodes freed so far.
    bytes: u64,
    /// Per inode with several links: links replaced, `nlink` and `st_blocks` as hashed.
    partial: HashMap<u64, (u64, u64, u64)>,
    /// Inodes whose last link was replaced since the last [`Freed::take_done`].
    done: Vec<u64>,
}

impl Freed {
    fn add(&mut self, then: &Stat) {
        if then.nlink <= 1 {
            self.bytes += then.blocks * 512;
            return;
        }
        let e = self.partial.entry(then.ino).or_insert((0, 0, 0));
        e.0 += 1;
        e.1 = e.1.max(then.nlink);
        e.2 = e.2.max(then.blocks);
        if e.0 >= e.1 {
            self.bytes += e.2 * 512;
            self.partial.remove(&then.ino);
            self.done.push(then.ino);
        }
    }

    /// The inodes completed since the last call (their ctimes are no longer needed).
    fn take_done(&mut self) -> Vec<u64> {
        std::mem::take(&mut self.done)
    }

    /// Bytes of the inodes freed.
    fn bytes(&self) -> u64 {
        self.bytes
    }
}
