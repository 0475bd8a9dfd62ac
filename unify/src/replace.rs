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
use crate::progress::{Phase, Progress};
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
         FROM plan WHERE id > ?1 ORDER BY id LIMIT ?2",
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

/// Replaces every planned path by a link to its object, a directory batch at a time; returns
/// the bytes freed (inodes all of whose links were replaced).
///
/// # Algorithm
/// Batches of [`CHUNK`] plan rows in path order. For each batch, on this thread: open and
/// journal (mtime, committed) every directory not already open from the previous batch. Then
/// the batch's replacements ([`replace_one`]) run on the I/O pool while this thread finishes
/// the previous batch: puts back the mtimes of its directories that the new batch does not
/// touch, and records its links in the index (one transaction). So the index writes, which
/// are serial, overlap the link syscalls instead of following them.
///
/// # Errors
/// Index errors abort (every finished replacement stands and is safe; the journal puts the
/// directory mtimes back on the next run). A path that cannot be replaced is reported in
/// `report.failures`.
pub(crate) fn replace_all(
    root: &HostRoot,
    guests: &HashMap<i64, &OpenGuest>,
    list_paths: bool,
    report: &mut UnifyReport,
    progress: &dyn Progress,
    pool: &rayon::ThreadPool,
) -> Result<u64> {
    let idx = &root.index;
    // Sort the plan by directory so each directory is opened and journalled once per batch.
    idx.conn
        .execute_batch(
            "CREATE TEMP TABLE plan_sorted AS SELECT * FROM plan ORDER BY guest_id, path;
             DELETE FROM plan; INSERT INTO plan SELECT NULL, guest_id, path, dir, name, object_id,
               object_name, object_ino, ino, nlink, blocks, size, mode, uid, gid, mtime_ns,
               ctime_ns
             FROM plan_sorted ORDER BY guest_id, path; DROP TABLE plan_sorted;",
        )
        .map_err(|e| idx.err(e))?;
    let total: i64 = idx
        .conn
        .query_row("SELECT COUNT(*) FROM plan", [], |r| r.get(0))
        .map_err(|e| idx.err(e))?;
    if total == 0 {
        return Ok(0);
    }
    progress.start(Phase::Link, Some(total as u64));
    // Dropped at the end of this function, after the last close of a replaced inode.
    let releaser = Releaser::new(CLOSERS);
    let mut freed = Freed::default();
    let objects = ObjectsDir {
        fd: root.objects_fd(),
        path: root.objects_dir(),
    };
    let mut ctimes: HashMap<u64, i64> = HashMap::new();
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
                        "INSERT INTO journal(op, guest_id, path, value) VALUES ('dir', ?1, ?2, ?3)",
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

        let open = &open;
        let objects = &objects;
        let releaser = &releaser;
        let ctimes = &mut ctimes;
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
                &mut freed,
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
    progress.finish();
    Ok(freed.bytes())
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

/// The inodes whose links a run replaced: per inode, links replaced, `nlink` and `st_blocks`
/// as hashed. An inode is freed once all its links are replaced.
#[derive(Default)]
struct Freed(HashMap<u64, (u64, u64, u64)>);

impl Freed {
    fn add(&mut self, then: &Stat) {
        let e = self.0.entry(then.ino).or_insert((0, 0, 0));
        e.0 += 1;
        e.1 = e.1.max(then.nlink);
        e.2 = e.2.max(then.blocks);
    }

    /// Bytes of the inodes freed.
    fn bytes(&self) -> u64 {
        self.0
            .values()
            .filter(|(n, nlink, _)| n >= nlink)
            .map(|(_, _, blocks)| blocks * 512)
            .sum()
    }
}
