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
use crate::report::{Failure, UnifyReport};
use crate::root::HostRoot;

/// Hash jobs per parallel batch.
const HASH_BATCH: i64 = 256;

/// Which hash a stage computes.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Stage {
    Partial,
    Full,
}

/// One inode to read.
struct Job {
    ino: i64,
    guest_id: i64,
    path: Vec<u8>,
    size: u64,
    mtime_ns: i64,
    ctime_ns: i64,
}

/// What reading one inode gave.
enum Hashed {
    Partial(Hash32),
    Full {
        chash: Hash32,
        phash: Option<Hash32>,
        xhash: Hash32,
    },
    Changed,
}

pub(crate) fn hash_stage(
    root: &HostRoot,
    guests: &HashMap<i64, &OpenGuest>,
    stage: Stage,
    report: &mut UnifyReport,
    progress: &dyn Progress,
    pool: &rayon::ThreadPool,
) -> Result<()> {
    let idx = &root.index;
    let filter = match stage {
        Stage::Partial => {
            "sg.size > :pmin AND NOT sg.has_obj AND c.chash IS NULL AND c.phash IS NULL"
        }
        Stage::Full => {
            "c.chash IS NULL AND (sg.size <= :pmin OR sg.has_obj OR EXISTS(
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
                 SELECT c.ino, c.guest_id, c.path, c.size, c.mtime_ns, c.ctime_ns
                 FROM cand c JOIN sg USING (size, mode, uid, gid, mt)
                 WHERE {filter} GROUP BY c.ino"
            ),
            named_params! {":pmin": PARTIAL_MIN_SIZE as i64},
        )
        .map_err(|e| idx.err(e))?;
    let (count, bytes): (i64, i64) = idx
        .conn
        .query_row(
            "SELECT COUNT(*), COALESCE(SUM(size), 0) FROM jobs",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .map_err(|e| idx.err(e))?;
    if count == 0 {
        return Ok(());
    }
    let total = match stage {
        Stage::Partial => count as u64 * 2 * key::PARTIAL_BLOCK,
        Stage::Full => bytes as u64,
    };
    progress.start(Phase::Hash, Some(total));
    let mut last = 0i64;
    loop {
        let jobs = read_jobs(&idx.conn, last).map_err(|e| idx.err(e))?;
        let Some((rowid, _)) = jobs.last() else { break };
        last = *rowid;
        let results: Vec<(&Job, std::result::Result<Hashed, Error>)> = pool.install(|| {
            jobs.par_iter()
                .map(|(_, job)| {
                    let out = hash_job(guests[&job.guest_id], job, stage);
                    progress.advance(match stage {
                        Stage::Partial => 2 * key::PARTIAL_BLOCK,
                        Stage::Full => job.size,
                    });
                    (job, out)
                })
                .collect()
        });
        let tx = idx.conn.unchecked_transaction().map_err(|e| idx.err(e))?;
        for (job, result) in results {
            match result {
                Ok(Hashed::Partial(p)) => {
                    report.partial_hashed_files += 1;
                    idx.exec(
                        "UPDATE cand SET phash = ?2 WHERE ino = ?1",
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
                    let hashes = params![
                        job.ino,
                        &chash[..],
                        phash.as_ref().map(|p| &p[..]),
                        &xhash[..]
                    ];
                    idx.exec(
                        "UPDATE cand SET chash = ?2, phash = ?3, xhash = ?4 WHERE ino = ?1",
                        hashes,
                    )?;
                }
                Ok(Hashed::Changed) => report.skipped_changed += 1,
                Err(e) => report.failures.push(Failure::new(
                    guests[&job.guest_id],
                    &job.path,
                    e.to_string(),
                )),
            }
        }
        tx.commit().map_err(|e| idx.err(e))?;
    }
    progress.finish();
    Ok(())
}

fn read_jobs(conn: &Connection, after: i64) -> rusqlite::Result<Vec<(i64, Job)>> {
    let mut stmt = conn.prepare_cached(
        "SELECT rowid, ino, guest_id, path, size, mtime_ns, ctime_ns FROM jobs
         WHERE rowid > ?1 ORDER BY rowid LIMIT ?2",
    )?;
    stmt.query_map(params![after, HASH_BATCH], |r| {
        Ok((
            r.get(0)?,
            Job {
                ino: r.get(1)?,
                guest_id: r.get(2)?,
                path: r.get(3)?,
                size: r.get::<_, i64>(4)? as u64,
                mtime_ns: r.get(5)?,
                ctime_ns: r.get(6)?,
            },
        ))
    })?
    .collect()
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

/// Writes the hashes this run computed (kept in `temp.cand` while it runs) into the `files`
/// rows that are still not linked, so the next run need not read those files again. A linked
/// path never gets them (its object has them): rows are written once, not grown and shrunk.
///
/// # Errors
/// Index errors.
pub(crate) fn keep_hashes(root: &HostRoot) -> Result<()> {
    root.index.exec(
        "UPDATE files SET phash = c.phash, chash = c.chash, xhash = c.xhash
         FROM cand c
         WHERE files.dir = c.dir AND files.name = c.name AND files.object_id IS NULL
           AND (c.phash IS NOT NULL OR c.chash IS NOT NULL)
           AND (files.phash IS NOT c.phash OR files.chash IS NOT c.chash
                OR files.xhash IS NOT c.xhash)",
        [],
    )?;
    Ok(())
}
