//! Hashing: the partial-hash and full-hash stages, once per inode, in parallel.

use std::collections::HashMap;

use nix::errno::Errno;
use rayon::prelude::*;
use rusqlite::{Connection, named_params, params};

use crate::error::{Error, PathContext, Result};
use crate::fsx::{self, Stat};
use crate::guest::OpenGuest;
use crate::key::{self, Hash32, PARTIAL_MIN_SIZE};
use crate::progress::{Phase, Progress};
use crate::report::{Failure, FlaggedPath, UnifyReport, flag_letters, guest_abs};
use crate::root::HostRoot;
use crate::sys;

/// Hash jobs per parallel batch.
const HASH_BATCH: i64 = 256;

/// Which hash a stage computes.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Stage {
    Partial,
    Full,
}

/// One inode to read.
pub(crate) struct Job {
    ino: i64,
    guest_id: i64,
    path: Vec<u8>,
    size: u64,
    mtime_ns: i64,
    ctime_ns: i64,
    /// Its size group (`size`, `mode`, `uid`, `gid`, `mt`).
    group: (i64, i64, i64, i64, i64),
}

/// Full-hash jobs (inodes) per window at most; a window ends at a size group's end. Each
/// window's paths are linked a directory batch at a time, journalling every directory it
/// touches once: fewer, larger windows journal fewer directories twice, smaller ones overlap
/// reading and linking sooner.
const WINDOW_JOBS: usize = 16_384;
/// Bytes per window at most (likewise).
const WINDOW_BYTES: u64 = 1 << 30;

/// What reading one inode gave.
pub(crate) enum Hashed {
    Partial(Hash32),
    Full {
        chash: Hash32,
        phash: Option<Hash32>,
        xhash: Hash32,
    },
    Changed,
    /// The inode carries flags someone set ([`sys::user_flags`]): not eligible, not read.
    Flagged(u32),
}

/// Makes `temp.jobs`: the inodes `stage` must read, one row each, in size-group order.
/// Returns their number and bytes.
fn make_jobs(root: &HostRoot, stage: Stage) -> Result<(i64, i64)> {
    let idx = &root.index;
    let filter = match stage {
        Stage::Partial => {
            "sg.size > :pmin AND NOT sg.has_obj AND c.chash IS NULL AND c.phash IS NULL
             AND COALESCE(c.flags, 0) = 0"
        }
        Stage::Full => {
            "c.chash IS NULL AND COALESCE(c.flags, 0) = 0 AND (sg.size <= :pmin OR sg.has_obj OR EXISTS(
                SELECT 1 FROM cand d WHERE d.size = c.size AND d.mode = c.mode AND d.uid = c.uid
                  AND d.gid = c.gid AND d.mt = c.mt AND d.phash = c.phash AND d.ino <> c.ino))"
        }
    };
    idx.conn
        .execute_batch("DROP TABLE IF EXISTS temp.jobs")
        .map_err(|e| idx.err(e))?;
    idx.conn
        .execute(
            &format!(
                "CREATE TEMP TABLE jobs AS
                 SELECT c.ino, c.guest_id, c.path, c.size, c.mtime_ns, c.ctime_ns, c.mode, c.uid,
                        c.gid, c.mt
                 FROM cand c JOIN sg USING (size, mode, uid, gid, mt)
                 WHERE {filter} GROUP BY c.ino ORDER BY c.size, c.mode, c.uid, c.gid, c.mt"
            ),
            named_params! {":pmin": PARTIAL_MIN_SIZE as i64},
        )
        .map_err(|e| idx.err(e))?;
    idx.conn
        .query_row(
            "SELECT COUNT(*), COALESCE(SUM(size), 0) FROM jobs",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .map_err(|e| idx.err(e))
}

/// The partial-hash stage: first and last 4 KiB of the large files of size groups without an
/// object, so only inodes whose partial hash repeats are read in full.
///
/// # Errors
/// Index errors; a file that cannot be read is a failure in the report.
pub(crate) fn partial_stage(
    root: &HostRoot,
    guests: &HashMap<i64, &OpenGuest>,
    report: &mut UnifyReport,
    progress: &dyn Progress,
    pool: &rayon::ThreadPool,
) -> Result<()> {
    let stage = Stage::Partial;
    let idx = &root.index;
    let (count, _) = make_jobs(root, stage)?;
    if count == 0 {
        return Ok(());
    }
    progress.start(Phase::Hash, Some(count as u64 * 2 * key::PARTIAL_BLOCK));
    let mut last = 0i64;
    loop {
        let jobs = read_jobs(&idx.conn, last).map_err(|e| idx.err(e))?;
        let Some((rowid, _)) = jobs.last() else { break };
        last = *rowid;
        let results: Vec<(&Job, std::result::Result<Hashed, Error>)> = pool.install(|| {
            jobs.par_iter()
                .map(|(_, job)| {
                    let out = hash_job(guests[&job.guest_id], job, stage);
                    progress.advance(2 * key::PARTIAL_BLOCK);
                    (job, out)
                })
                .collect()
        });
        let tx = idx.conn.unchecked_transaction().map_err(|e| idx.err(e))?;
        for (job, result) in results {
            record(idx, guests, job, result, report)?;
        }
        tx.commit().map_err(|e| idx.err(e))?;
    }
    progress.finish();
    Ok(())
}

fn read_jobs(conn: &Connection, after: i64) -> rusqlite::Result<Vec<(i64, Job)>> {
    read_jobs_limit(conn, after, HASH_BATCH)
}

fn read_jobs_limit(conn: &Connection, after: i64, limit: i64) -> rusqlite::Result<Vec<(i64, Job)>> {
    let mut stmt = conn.prepare_cached(
        "SELECT rowid, ino, guest_id, path, size, mtime_ns, ctime_ns, mode, uid, gid, mt
         FROM jobs WHERE rowid > ?1 ORDER BY rowid LIMIT ?2",
    )?;
    stmt.query_map(params![after, limit], |r| {
        let size: i64 = r.get(4)?;
        Ok((
            r.get(0)?,
            Job {
                ino: r.get(1)?,
                guest_id: r.get(2)?,
                path: r.get(3)?,
                size: size as u64,
                mtime_ns: r.get(5)?,
                ctime_ns: r.get(6)?,
                group: (size, r.get(7)?, r.get(8)?, r.get(9)?, r.get(10)?),
            },
        ))
    })?
    .collect()
}

/// The full-hash stage, read a window at a time so that each window's size groups can be
/// planned and linked while the next window is read (see `unify::run`).
pub(crate) struct FullHash {
    /// The last job handed out.
    last: i64,
    /// Bytes to read in all.
    pub bytes: u64,
}

impl FullHash {
    /// Makes `temp.jobs` for the full hash (in size-group order) and puts into `temp.ready` the
    /// size groups that need no reading at all (their members were hashed before, or none
    /// needs it).
    ///
    /// # Errors
    /// Index errors.
    pub(crate) fn prepare(root: &HostRoot) -> Result<FullHash> {
        let idx = &root.index;
        let (_, bytes) = make_jobs(root, Stage::Full)?;
        idx.conn
            .execute_batch(
                "CREATE INDEX temp.jobs_group ON jobs(size, mode, uid, gid, mt);
                 INSERT OR IGNORE INTO ready SELECT size, mode, uid, gid, mt FROM sg
                 WHERE NOT EXISTS (SELECT 1 FROM jobs j WHERE j.size = sg.size
                     AND j.mode = sg.mode AND j.uid = sg.uid AND j.gid = sg.gid AND j.mt = sg.mt);",
            )
            .map_err(|e| idx.err(e))?;
        Ok(FullHash {
            last: 0,
            bytes: bytes as u64,
        })
    }

    /// The next window of jobs: up to [`WINDOW_JOBS`] or [`WINDOW_BYTES`], then on to the end
    /// of the last size group, so that a window holds whole groups. `None` when done.
    ///
    /// # Errors
    /// Index errors.
    pub(crate) fn next_window(&mut self, root: &HostRoot) -> Result<Option<Vec<Job>>> {
        let idx = &root.index;
        let mut window: Vec<Job> = Vec::new();
        let mut bytes = 0u64;
        loop {
            let batch =
                read_jobs_limit(&idx.conn, self.last, HASH_BATCH).map_err(|e| idx.err(e))?;
            if batch.is_empty() {
                break;
            }
            let mut full = false;
            for (rowid, job) in batch {
                let past = window.len() >= WINDOW_JOBS || bytes >= WINDOW_BYTES;
                if past && window.last().is_some_and(|j| j.group != job.group) {
                    full = true;
                    break;
                }
                self.last = rowid;
                bytes += job.size;
                window.push(job);
            }
            if full {
                break;
            }
        }
        Ok((!window.is_empty()).then_some(window))
    }
}

/// Reads a window's jobs on the pool; no index access, so it runs beside the index writer.
/// The results are in the jobs' order.
pub(crate) fn hash_window(
    guests: &HashMap<i64, &OpenGuest>,
    jobs: &[Job],
    progress: &dyn Progress,
    pool: &rayon::ThreadPool,
) -> Vec<Result<Hashed>> {
    pool.install(|| {
        jobs.par_iter()
            .map(|job| {
                let out = hash_job(guests[&job.guest_id], job, Stage::Full);
                progress.advance(job.size);
                out
            })
            .collect()
    })
}

/// Records a window's full hashes in `temp.cand` (one transaction) and its size groups in
/// `temp.ready`, for the planner.
///
/// # Errors
/// Index errors.
pub(crate) fn record_window(
    root: &HostRoot,
    guests: &HashMap<i64, &OpenGuest>,
    jobs: &[Job],
    results: Vec<Result<Hashed>>,
    report: &mut UnifyReport,
) -> Result<()> {
    let idx = &root.index;
    let tx = idx.conn.unchecked_transaction().map_err(|e| idx.err(e))?;
    for (job, result) in jobs.iter().zip(results) {
        record(idx, guests, job, result, report)?;
    }
    let mut last = None;
    for job in jobs {
        if last != Some(job.group) {
            let (size, mode, uid, gid, mt) = job.group;
            idx.exec(
                "INSERT OR IGNORE INTO ready(size, mode, uid, gid, mt) VALUES (?1, ?2, ?3, ?4, ?5)",
                params![size, mode, uid, gid, mt],
            )?;
            last = Some(job.group);
        }
    }
    tx.commit().map_err(|e| idx.err(e))
}

/// Records one job's outcome: its hashes in `temp.cand` (with its flags, none), or a skip or
/// failure in the report. A flagged inode gets its flags and no hashes in `temp.cand`, so no
/// later stage takes it, and each of its paths is listed in `report.skipped_flagged`.
fn record(
    idx: &crate::index::Index,
    guests: &HashMap<i64, &OpenGuest>,
    job: &Job,
    result: Result<Hashed>,
    report: &mut UnifyReport,
) -> Result<()> {
    match result {
        Ok(Hashed::Partial(p)) => {
            report.partial_hashed_files += 1;
            idx.exec(
                "UPDATE cand SET phash = ?2, flags = 0 WHERE ino = ?1",
                params![job.ino, &p[..]],
            )?;
        }
        Ok(Hashed::Full {
            chash,
            phash,
            xhash,
        }) => {
            report.hashed_files += 1;
            report.hashed_bytes += job.size;
            idx.exec(
                "UPDATE cand SET chash = ?2, phash = ?3, xhash = ?4, flags = 0 WHERE ino = ?1",
                params![
                    job.ino,
                    &chash[..],
                    phash.as_ref().map(|p| &p[..]),
                    &xhash[..]
                ],
            )?;
        }
        Ok(Hashed::Changed) => report.skipped_changed += 1,
        Ok(Hashed::Flagged(flags)) => {
            idx.exec(
                "UPDATE cand SET phash = NULL, chash = NULL, xhash = NULL, flags = ?2
                 WHERE ino = ?1",
                params![job.ino, flags],
            )?;
            // Every path of the inode (a hardlink group has several).
            let mut stmt = idx
                .conn
                .prepare_cached("SELECT guest_id, path FROM cand WHERE ino = ?1 ORDER BY 1, 2")
                .map_err(|e| idx.err(e))?;
            let paths = stmt
                .query_map([job.ino], |r| {
                    Ok((r.get::<_, i64>(0)?, r.get::<_, Vec<u8>>(1)?))
                })
                .and_then(|rows| rows.collect::<rusqlite::Result<Vec<_>>>())
                .map_err(|e| idx.err(e))?;
            for (guest_id, path) in paths {
                report.skipped_flagged.push(FlaggedPath {
                    guest: guests[&guest_id].name.clone(),
                    path: guest_abs(&path),
                    flags: flag_letters(flags),
                });
            }
        }
        Err(e) => report.failures.push(Failure::new(
            guests[&job.guest_id],
            &job.path,
            e.to_string(),
        )),
    }
    Ok(())
}

fn hash_job(guest: &OpenGuest, job: &Job, stage: Stage) -> Result<Hashed> {
    let shown = guest.host_path(&job.path);
    let fd = match guest.open_file(&job.path) {
        Ok(fd) => fd,
        Err(Errno::ENOENT | Errno::ELOOP | Errno::ENOTDIR) => return Ok(Hashed::Changed),
        Err(e) => return Err(e).at(&shown),
    };
    let same = |st: &Stat| {
        st.is_file()
            && st.ino as i64 == job.ino
            && st.size == job.size
            && st.mtime_ns == job.mtime_ns
            && st.ctime_ns == job.ctime_ns
    };
    if !same(&fsx::fstat(&fd).at(&shown)?) {
        return Ok(Hashed::Changed);
    }
    // A flag someone set (a guest's `chattr +i`, `+a`, `+A`, …) makes the file ineligible: its
    // inode cannot be linked or replaced (`+i`, `+a`), or sharing it would spread or drop the
    // flags. Read here, on the fd the hash needs anyway: one ioctl per inode read.
    let flags = sys::user_flags(&fd).at(&shown)?;
    if flags != 0 {
        return Ok(Hashed::Flagged(flags));
    }
    let file = std::fs::File::from(fd);
    let out = match stage {
        Stage::Partial => Hashed::Partial(key::partial_hash(&file, job.size).at(&shown)?),
        Stage::Full => {
            let (chash, phash) = match key::content_hash(&file, job.size) {
                Ok(h) => h,
                Err(e) if e.kind() == std::io::ErrorKind::InvalidData => {
                    return Ok(Hashed::Changed);
                }
                Err(e) => return Err(e).at(&shown),
            };
            let xattrs = fsx::read_xattrs(&file).at(&shown)?;
            Hashed::Full {
                chash,
                phash,
                xhash: key::xattr_hash(&xattrs),
            }
        }
    };
    if !same(&fsx::fstat(&file).at(&shown)?) {
        return Ok(Hashed::Changed);
    }
    Ok(out)
}

/// Writes the hashes and flags this run read (kept in `temp.cand` while it runs) into the
/// `files` rows that are still not linked, so the next run need not read those files again —
/// a flagged file's row keeps its flags, and no run reads or lists it again until it changes
/// (a `chattr` moves the ctime, so the scan rewrites the row). A linked path never gets them
/// (its object has them): rows are written once, not grown and shrunk.
///
/// # Errors
/// Index errors.
pub(crate) fn keep_hashes(root: &HostRoot) -> Result<()> {
    root.index.exec(
        "UPDATE files SET phash = c.phash, chash = c.chash, xhash = c.xhash, flags = c.flags
         FROM cand c
         WHERE files.dir = c.dir AND files.name = c.name AND files.object_id IS NULL
           AND c.flags IS NOT NULL
           AND (files.phash IS NOT c.phash OR files.chash IS NOT c.chash
                OR files.xhash IS NOT c.xhash OR files.flags IS NOT c.flags)",
        [],
    )?;
    Ok(())
}
