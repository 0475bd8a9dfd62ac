//! `unify`: scan → size groups → partial hash → full hash → plan objects → replace paths.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use nix::errno::Errno;
use nix::fcntl::OFlag;
use rayon::prelude::*;
use rusqlite::{Connection, named_params, params};

use crate::error::{Error, PathContext, Result};
use crate::fsx::{self, Stat};
use crate::guest::{OpenGuest, guest_names, open_guest};
use crate::key::{self, Hash32, KeyParts, PARTIAL_MIN_SIZE};
use crate::policy::Marker;
use crate::progress::{Phase, Progress};
use crate::release::Releaser;
use crate::report::{Failure, LinkedPath, UnifyReport};
use crate::root::HostRoot;
use crate::scan::scan_guests;
use crate::store::{self, Object, ObjectSpec};

/// How `unify` behaves.
#[derive(Clone, Debug)]
pub struct UnifyOptions {
    /// Hash and report, but change no guest file and create no object.
    pub dry_run: bool,
    /// Leave mtime out of the key (the shared inode keeps the first file's mtime).
    pub ignore_mtime: bool,
    /// Smallest file size to link; never below 1 (empty files are never shared).
    pub min_size: u64,
    /// Most links a store object may have (its `st_nlink`, counting the store's own name);
    /// the filesystem's limit applies too.
    pub max_links: Option<u64>,
    /// Record every linked path in the report.
    pub list_paths: bool,
}

impl Default for UnifyOptions {
    fn default() -> Self {
        UnifyOptions {
            dry_run: false,
            ignore_mtime: false,
            min_size: 1,
            max_links: None,
            list_paths: false,
        }
    }
}

/// Paths replaced per journal batch.
const CHUNK: i64 = 1024;
/// Closer threads freeing replaced inodes. Freeing waits on the device when the filesystem
/// discards freed blocks; on the 2-core benchmark host 2 closers took 11.0 s for the link phase
/// of 87k paths, 8 took 8.5 s and 32 took 8.1 s.
const CLOSERS: usize = 16;
/// Hash jobs per parallel batch.
const HASH_BATCH: i64 = 256;

/// Unifies the named guests (all guests if `names` is empty).
///
/// # Algorithm
/// 1. **Scan** each guest into the index (one `lstat` per file; unchanged files keep their hashes,
///    files already linked to the store are recognised by inode).
/// 2. **Group** eligible files (marker not private, size ≥ `min_size`, not yet linked) by
///    (size, mode, uid, gid, mtime); a group needs two distinct inodes or an existing object
///    with the same metadata, else nothing in it is read.
/// 3. **Partial hash** (first and last 4 KiB) of large files in groups without an object; only
///    inodes whose partial hash repeats go on. 4. **Full hash** of the rest, once per inode, in
///    parallel, with the xattrs read from the same fd.
/// 5. **Plan**: for each (key, marker) group find a store object with room for the links
///    (EMLINK starts `<key>.c1`), else make one by adopting an inode whose every link is in the
///    group, else by copying.
/// 6. **Replace**, a directory batch at a time: journal the directories' mtimes, then for each
///    path `linkat(object, tmp)`, re-`lstat` the path (inode, size, mtime, ctime, mode, owner as
///    hashed), `renameat(tmp, path)`; restore the directory mtimes; drop the journal rows.
///    The replaced inode is held open across the rename and closed on closer threads, so
///    freeing it (slow on a filesystem mounted with `discard`) overlaps the next renames.
///
/// # Errors
/// Fatal errors (index, store, a guest that cannot be opened when it is the only one) are
/// returned; a failure on one file is recorded in the report and the file skipped.
pub fn unify(
    root: &HostRoot,
    names: &[String],
    opts: &UnifyOptions,
    progress: &dyn Progress,
) -> Result<UnifyReport> {
    let mut report = UnifyReport {
        dry_run: opts.dry_run,
        ..UnifyReport::default()
    };
    let all = names.is_empty();
    let names = if all {
        guest_names(root)?
    } else {
        names.to_vec()
    };
    if all {
        root.index.prune_guests(&names)?;
    }
    let mut guests = Vec::new();
    for name in &names {
        match open_guest(root, name) {
            Ok(g) => guests.push(g),
            Err(e) if names.len() == 1 => return Err(e),
            Err(e) => report.failures.push(Failure::guest(name, e.to_string())),
        }
    }
    report.guests = guests.iter().map(|g| g.name.clone()).collect();
    if guests.is_empty() {
        return Ok(report);
    }

    // The phases wait on the disk more than on the CPU: run them on more threads than cores
    // so that reads, stats and renames overlap.
    let threads = (4 * std::thread::available_parallelism().map_or(2, |n| n.get())).clamp(4, 32);
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .thread_name(|i| format!("cowherd-io-{i}"))
        .build()
        .map_err(|e| Error::Io {
            path: root.path().to_path_buf(),
            error: std::io::Error::other(e),
        })?;
    let mut clock = std::time::Instant::now();
    let mut lap = |report: &mut UnifyReport, phase: &'static str| {
        let now = std::time::Instant::now();
        *report.seconds.entry(phase).or_default() += (now - clock).as_secs_f64();
        clock = now;
    };
    progress.start(Phase::Scan, None);
    scan_guests(root, &guests, &mut report, progress, &pool)?;
    progress.finish();
    lap(&mut report, "scan");

    let opts = UnifyOptions {
        min_size: opts.min_size.max(1),
        ..opts.clone()
    };
    let by_id: HashMap<i64, &OpenGuest> = guests.iter().map(|g| (g.id, g)).collect();
    build_candidates(root, &guests, &opts)?;
    lap(&mut report, "group");
    hash_stage(root, &by_id, Stage::Partial, &mut report, progress, &pool)?;
    hash_stage(root, &by_id, Stage::Full, &mut report, progress, &pool)?;
    lap(&mut report, "hash");
    let copied_blocks = plan(root, &by_id, &opts, &mut report)?;
    lap(&mut report, "plan");
    if !opts.dry_run {
        let freed = replace_all(root, &by_id, &opts, &mut report, progress, &pool)?;
        report.saved_bytes = freed.saturating_sub(copied_blocks * 512);
        lap(&mut report, "link");
        for e in store::restore_immutable(root)? {
            report.failures.push(Failure {
                guest: String::new(),
                path: String::new(),
                error: e.to_string(),
            });
        }
        root.index.exec(
            "UPDATE guests SET last_unify = strftime('%s','now') WHERE id IN (SELECT id FROM sel)",
            [],
        )?;
    } else {
        report.linked_files = root
            .index
            .conn
            .query_row("SELECT COUNT(*) FROM plan", [], |r| r.get::<_, i64>(0))
            .map_err(|e| root.index.err(e))? as u64;
        if opts.list_paths {
            list_planned(root, &by_id, &mut report)?;
        }
    }
    if opts.dry_run {
        report.saved_bytes = planned_savings(root)?.saturating_sub(copied_blocks * 512);
    }
    Ok(report)
}

/// Materialises the eligible files of the selected guests and their size groups.
fn build_candidates(root: &HostRoot, guests: &[OpenGuest], opts: &UnifyOptions) -> Result<()> {
    let idx = &root.index;
    idx.conn
        .execute_batch(
            "DROP TABLE IF EXISTS temp.sel; DROP TABLE IF EXISTS temp.cand;
             DROP TABLE IF EXISTS temp.sg; DROP TABLE IF EXISTS temp.plan;
             CREATE TEMP TABLE sel(id INTEGER PRIMARY KEY);",
        )
        .map_err(|e| idx.err(e))?;
    for g in guests {
        idx.exec("INSERT INTO sel(id) VALUES (?1)", [g.id])?;
    }
    let ign = opts.ignore_mtime;
    idx.conn
        .execute(
            "CREATE TEMP TABLE cand AS
             SELECT guest_id, path, ino, nlink, size, blocks, mode, uid, gid, mtime_ns, ctime_ns,
                    CASE WHEN :ign THEN 0 ELSE mtime_ns END AS mt, marker, phash, chash, xhash
             FROM files
             WHERE guest_id IN (SELECT id FROM sel) AND marker > 0 AND size >= :min
               AND object_id IS NULL",
            named_params! {":ign": ign, ":min": opts.min_size as i64},
        )
        .map_err(|e| idx.err(e))?;
    idx.conn
        .execute_batch(
            "CREATE INDEX temp.cand_group ON cand(size, mode, uid, gid, mt);
             CREATE INDEX temp.cand_ino ON cand(ino);",
        )
        .map_err(|e| idx.err(e))?;
    idx.conn
        .execute(
            "CREATE TEMP TABLE sg AS
             SELECT size, mode, uid, gid, mt, COUNT(DISTINCT ino) AS inodes,
                    EXISTS(SELECT 1 FROM objects o
                           WHERE o.size = c.size AND o.mode = c.mode AND o.uid = c.uid
                             AND o.gid = c.gid AND o.ign_mtime = :ign
                             AND (:ign OR o.mtime_ns = c.mt)) AS has_obj
             FROM cand c GROUP BY size, mode, uid, gid, mt
             HAVING inodes >= 2 OR has_obj",
            named_params! {":ign": ign},
        )
        .map_err(|e| idx.err(e))?;
    Ok(())
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Stage {
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

enum Hashed {
    Partial(Hash32),
    Full {
        chash: Hash32,
        phash: Option<Hash32>,
        xhash: Hash32,
    },
    Changed,
}

fn hash_stage(
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
                    for table in ["files", "cand"] {
                        idx.exec(
                            &format!("UPDATE {table} SET phash = ?2 WHERE ino = ?1 AND guest_id IN (SELECT id FROM sel)"),
                            params![job.ino, &p[..]],
                        )?;
                    }
                }
                Ok(Hashed::Full {
                    chash,
                    phash,
                    xhash,
                }) => {
                    report.hashed_files += 1;
                    report.hashed_bytes += job.size;
                    for table in ["files", "cand"] {
                        idx.exec(
                            &format!(
                                "UPDATE {table} SET chash = ?2, phash = ?3, xhash = ?4
                                 WHERE ino = ?1 AND guest_id IN (SELECT id FROM sel)"
                            ),
                            params![
                                job.ino,
                                &chash[..],
                                phash.as_ref().map(|p| &p[..]),
                                &xhash[..]
                            ],
                        )?;
                    }
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

/// Opens a guest file for reading without following symlinks or updating its atime.
fn open_for_read(guest: &OpenGuest, rel: &[u8]) -> nix::Result<OwnedFd> {
    let flags = OFlag::O_RDONLY | OFlag::O_NONBLOCK;
    match fsx::open_beneath(guest.base(), rel, flags | OFlag::O_NOATIME) {
        Err(Errno::EPERM) => fsx::open_beneath(guest.base(), rel, flags),
        other => other,
    }
}

fn hash_job(guest: &OpenGuest, job: &Job, stage: Stage) -> Result<Hashed> {
    let shown = guest.host_path(&job.path);
    let fd = match open_for_read(guest, &job.path) {
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

/// A candidate row of one key group.
struct Member {
    guest_id: i64,
    path: Vec<u8>,
    stat: Stat,
}

/// Picks or makes the object for every (key, marker) group and writes `temp.plan`.
/// Returns the blocks of objects made by copying (they cost space).
fn plan(
    root: &HostRoot,
    guests: &HashMap<i64, &OpenGuest>,
    opts: &UnifyOptions,
    report: &mut UnifyReport,
) -> Result<u64> {
    let idx = &root.index;
    idx.conn
        .execute_batch(
            "CREATE TEMP TABLE plan(
                id INTEGER PRIMARY KEY, guest_id INTEGER, path BLOB, object_id INTEGER,
                object_name TEXT, object_ino INTEGER, ino INTEGER, nlink INTEGER, blocks INTEGER,
                size INTEGER, mode INTEGER, uid INTEGER, gid INTEGER, mtime_ns INTEGER,
                ctime_ns INTEGER);",
        )
        .map_err(|e| idx.err(e))?;
    let mut planner = Planner {
        root,
        guests,
        opts,
        // The most links an object may have between runs: the user's cap, and one below the
        // filesystem's limit so the temporary name always fits.
        max_nlink: opts
            .max_links
            .unwrap_or(u64::MAX)
            .min(root.link_max() - 1)
            .max(2),
        planned_links: HashMap::new(),
        touched_immutable: BTreeSet::new(),
        copied_blocks: 0,
    };
    let tx = idx.conn.unchecked_transaction().map_err(|e| idx.err(e))?;
    {
        let mut stmt = idx
            .conn
            .prepare(
                "SELECT guest_id, path, ino, nlink, size, blocks, mode, uid, gid, mtime_ns, ctime_ns,
                        marker, chash, xhash
                 FROM cand WHERE chash IS NOT NULL AND xhash IS NOT NULL
                 ORDER BY size, mode, uid, gid, mt, chash, xhash, marker, ino",
            )
            .map_err(|e| idx.err(e))?;
        let mut rows = stmt.query([]).map_err(|e| idx.err(e))?;
        let mut group: Vec<Member> = Vec::new();
        let mut group_key: Option<(KeyParts, Marker)> = None;
        loop {
            let parsed = match rows.next().map_err(|e| idx.err(e))? {
                Some(row) => {
                    match read_member(row, root.dev(), opts.ignore_mtime).map_err(|e| idx.err(e))? {
                        Some(parsed) => Some(parsed),
                        None => continue,
                    }
                }
                None => None,
            };
            let boundary = match (&parsed, &group_key) {
                (Some((p, m, _)), Some((gp, gm))) => p != gp || m != gm,
                (None, _) => true,
                (Some(_), None) => false,
            };
            if boundary && let Some((parts, marker)) = group_key.take() {
                planner.group(&parts, marker, &group, report);
                group.clear();
            }
            match parsed {
                Some((parts, marker, member)) => {
                    group_key = Some((parts, marker));
                    group.push(member);
                }
                None => break,
            }
        }
    }
    for name in &planner.touched_immutable {
        idx.exec(
            "INSERT INTO journal(op, path) SELECT 'mutable', ?1
             WHERE NOT EXISTS(SELECT 1 FROM journal WHERE op = 'mutable' AND path = ?1)",
            [name.as_bytes()],
        )?;
    }
    tx.commit().map_err(|e| idx.err(e))?;
    // Journalled and committed: now the flags may come off for linking.
    for name in &planner.touched_immutable {
        store::set_object_immutable(root, name, false)?;
    }
    Ok(planner.copied_blocks)
}

/// The stat columns `ino, nlink, size, blocks, mode, uid, gid, mtime_ns, ctime_ns` of a row,
/// starting at column `first`.
fn row_stat(r: &rusqlite::Row<'_>, first: usize, dev: u64) -> rusqlite::Result<Stat> {
    Ok(Stat {
        dev,
        ino: r.get::<_, i64>(first)? as u64,
        nlink: r.get::<_, i64>(first + 1)? as u64,
        size: r.get::<_, i64>(first + 2)? as u64,
        blocks: r.get::<_, i64>(first + 3)? as u64,
        mode: r.get(first + 4)?,
        uid: r.get(first + 5)?,
        gid: r.get(first + 6)?,
        mtime_ns: r.get(first + 7)?,
        ctime_ns: r.get(first + 8)?,
    })
}

/// One `cand` row as a group member with its key parts, or `None` if its hashes are malformed.
fn read_member(
    r: &rusqlite::Row<'_>,
    dev: u64,
    ignore_mtime: bool,
) -> rusqlite::Result<Option<(KeyParts, Marker, Member)>> {
    let stat = row_stat(r, 2, dev)?;
    let marker = Marker::from_code(r.get(11)?).unwrap_or(Marker::Private);
    let chash: Vec<u8> = r.get(12)?;
    let xhash: Vec<u8> = r.get(13)?;
    let (Some(chash), Some(xhash)) = (key::hash_from_blob(&chash), key::hash_from_blob(&xhash))
    else {
        return Ok(None);
    };
    let parts = KeyParts {
        chash,
        xhash,
        size: stat.size,
        mode: stat.mode,
        uid: stat.uid,
        gid: stat.gid,
        mtime_ns: (!ignore_mtime).then_some(stat.mtime_ns),
    };
    let member = Member {
        guest_id: r.get(0)?,
        path: r.get(1)?,
        stat,
    };
    Ok(Some((parts, marker, member)))
}

/// The run-wide state of the planning pass.
struct Planner<'a> {
    root: &'a HostRoot,
    guests: &'a HashMap<i64, &'a OpenGuest>,
    opts: &'a UnifyOptions,
    /// The most links an object may end up with.
    max_nlink: u64,
    /// Links planned per object name in this run (not made yet).
    planned_links: HashMap<String, u64>,
    /// Immutable objects this run links to: their flag comes off for the run.
    touched_immutable: BTreeSet<String>,
    /// Blocks of objects made by copying.
    copied_blocks: u64,
}

impl Planner<'_> {
    /// Plans one (key, marker) group, in chunks that fit the link limit; failures go to the
    /// report.
    fn group(
        &mut self,
        parts: &KeyParts,
        marker: Marker,
        group: &[Member],
        report: &mut UnifyReport,
    ) {
        let spec = ObjectSpec {
            parts,
            kind: marker,
            ign_mtime: self.opts.ignore_mtime,
        };
        let shared = group.iter().any(|m| m.stat.ino != group[0].stat.ino);
        // Members are sorted by inode; cut at inode boundaries so hardlink groups stay whole.
        for chunk in link_chunks(group, self.max_nlink - 1) {
            match self.chunk(&spec, chunk, shared) {
                Ok(Some(planned)) => {
                    if marker == Marker::Immutable && !self.opts.dry_run {
                        self.touched_immutable.insert(planned.object_name);
                    }
                    report.objects_created += u64::from(planned.created);
                }
                Ok(None) => {}
                Err(e) => {
                    let m = &chunk[0];
                    report.failures.push(Failure::new(
                        self.guests[&m.guest_id],
                        &m.path,
                        e.to_string(),
                    ));
                }
            }
        }
    }

    /// Chooses the object of one chunk of a key group (`shared`: the whole group has more than
    /// one inode) and records the paths to replace.
    fn chunk(
        &mut self,
        spec: &ObjectSpec<'_>,
        chunk: &[Member],
        shared: bool,
    ) -> Result<Option<Planned>> {
        let root = self.root;
        let mut paths_per_ino: BTreeMap<u64, u64> = BTreeMap::new();
        for m in chunk {
            *paths_per_ino.entry(m.stat.ino).or_default() += 1;
        }
        let needed = chunk.len() as u64;
        let found = store::find_object(root, spec, needed, self.max_nlink, &self.planned_links)?;
        let (object, created) = match found {
            Ok(object) => (object, false),
            // A key held by one inode only is not worth an object.
            Err(_) if !shared => return Ok(None),
            Err(seq) => {
                // An inode all of whose links are in this chunk can become the object itself.
                let adoptable = chunk
                    .iter()
                    .filter(|m| m.stat.nlink == paths_per_ino[&m.stat.ino])
                    .max_by_key(|m| m.stat.nlink);
                if self.opts.dry_run {
                    let name = store::object_name(&spec.parts.key(), spec.kind, seq);
                    if adoptable.is_none() {
                        self.copied_blocks += chunk[0].stat.blocks;
                    }
                    record_plan(root, chunk, None, &name, adoptable.map(|m| m.stat.ino))?;
                    *self.planned_links.entry(name.clone()).or_default() += needed;
                    return Ok(Some(Planned {
                        object_name: name,
                        created: true,
                    }));
                }
                let adopted = match adoptable {
                    Some(m) => adopt_member(root, self.guests[&m.guest_id], spec, seq, m)?,
                    None => None,
                };
                let object = match adopted {
                    Some(object) => object,
                    None => {
                        let m = &chunk[0];
                        let object = copy_member(root, self.guests[&m.guest_id], spec, seq, m)?;
                        self.copied_blocks += object.blocks;
                        object
                    }
                };
                (object, true)
            }
        };
        record_plan(root, chunk, Some(&object), &object.name, Some(object.ino))?;
        *self.planned_links.entry(object.name.clone()).or_default() += needed;
        Ok(Some(Planned {
            object_name: object.name,
            created,
        }))
    }
}

/// Splits a group (sorted by inode) into runs of at most `cap` paths, never splitting an inode.
fn link_chunks(group: &[Member], cap: u64) -> Vec<&[Member]> {
    let mut chunks = Vec::new();
    let mut start = 0;
    let mut i = 0;
    while i < group.len() {
        let mut j = i;
        while j < group.len() && group[j].stat.ino == group[i].stat.ino {
            j += 1;
        }
        if (j - start) as u64 > cap && i > start {
            chunks.push(&group[start..i]);
            start = i;
        }
        i = j;
    }
    if start < group.len() {
        chunks.push(&group[start..]);
    }
    chunks
}

/// The outcome of planning one chunk.
struct Planned {
    object_name: String,
    created: bool,
}

fn record_plan(
    root: &HostRoot,
    group: &[Member],
    object: Option<&Object>,
    name: &str,
    object_ino: Option<u64>,
) -> Result<()> {
    let idx = &root.index;
    let mut insert = idx
        .conn
        .prepare_cached(
            "INSERT INTO plan(guest_id, path, object_id, object_name, object_ino, ino, nlink, blocks,
                              size, mode, uid, gid, mtime_ns, ctime_ns)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14)",
        )
        .map_err(|e| idx.err(e))?;
    for m in group {
        if Some(m.stat.ino) == object_ino {
            if let Some(object) = object {
                idx.exec(
                    "UPDATE files SET object_id = ?3 WHERE guest_id = ?1 AND path = ?2",
                    params![m.guest_id, m.path, object.id],
                )?;
            }
            continue;
        }
        let s = &m.stat;
        insert
            .execute(params![
                m.guest_id,
                m.path,
                object.map(|o| o.id),
                name,
                object_ino.map(|i| i as i64),
                s.ino as i64,
                s.nlink as i64,
                s.blocks as i64,
                s.size as i64,
                s.mode,
                s.uid,
                s.gid,
                s.mtime_ns,
                s.ctime_ns
            ])
            .map_err(|e| idx.err(e))?;
    }
    Ok(())
}

/// Opens the parent directory of a guest path.
fn open_parent(guest: &OpenGuest, rel: &[u8]) -> Result<OwnedFd> {
    let (parent, _) = fsx::split_parent(rel);
    fsx::open_dir_beneath(guest.base(), &guest.base_path, parent)
}

fn adopt_member(
    root: &HostRoot,
    guest: &OpenGuest,
    spec: &ObjectSpec<'_>,
    seq: u32,
    m: &Member,
) -> Result<Option<Object>> {
    let dir = open_parent(guest, &m.path)?;
    let (_, name) = fsx::split_parent(&m.path);
    let now = fsx::lstat_at(dir.as_fd(), name).at(guest.host_path(&m.path))?;
    if !now.unchanged_since(&m.stat) || now.nlink != m.stat.nlink {
        return Ok(None);
    }
    store::adopt_inode(root, spec, seq, dir.as_fd(), name).map(Some)
}

fn copy_member(
    root: &HostRoot,
    guest: &OpenGuest,
    spec: &ObjectSpec<'_>,
    seq: u32,
    m: &Member,
) -> Result<Object> {
    let shown = guest.host_path(&m.path);
    let fd = open_for_read(guest, &m.path).at(&shown)?;
    if !fsx::fstat(&fd).at(&shown)?.unchanged_since(&m.stat) {
        return Err(Error::Io {
            path: shown,
            error: std::io::Error::other("changed since it was hashed; not copied"),
        });
    }
    let file = std::fs::File::from(fd);
    let xattrs = fsx::read_xattrs(&file).at(&shown)?;
    store::copy_in(root, spec, seq, &file, &xattrs, m.stat.mtime_ns)
}

/// One row of the plan, read back for replacement.
struct Step {
    id: i64,
    guest_id: i64,
    path: Vec<u8>,
    object_id: i64,
    object_name: String,
    object_ino: u64,
    then: Stat,
}

fn read_steps(conn: &Connection, after: i64, dev: u64) -> rusqlite::Result<Vec<Step>> {
    let mut stmt = conn.prepare_cached(
        "SELECT id, guest_id, path, object_id, object_name, object_ino, ino, nlink, size, blocks,
                mode, uid, gid, mtime_ns, ctime_ns
         FROM plan WHERE id > ?1 ORDER BY id LIMIT ?2",
    )?;
    stmt.query_map(params![after, CHUNK], |r| {
        Ok(Step {
            id: r.get(0)?,
            guest_id: r.get(1)?,
            path: r.get(2)?,
            object_id: r.get(3)?,
            object_name: r.get(4)?,
            object_ino: r.get::<_, i64>(5)? as u64,
            then: row_stat(r, 6, dev)?,
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
fn replace_all(
    root: &HostRoot,
    guests: &HashMap<i64, &OpenGuest>,
    opts: &UnifyOptions,
    report: &mut UnifyReport,
    progress: &dyn Progress,
    pool: &rayon::ThreadPool,
) -> Result<u64> {
    let idx = &root.index;
    // Sort the plan by directory so each directory is opened and journalled once per batch.
    idx.conn
        .execute_batch(
            "CREATE TEMP TABLE plan_sorted AS SELECT * FROM plan ORDER BY guest_id, path;
             DELETE FROM plan; INSERT INTO plan SELECT NULL, guest_id, path, object_id, object_name,
               object_ino, ino, nlink, blocks, size, mode, uid, gid, mtime_ns, ctime_ns
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
            let state = open_parent(guest, &s.path)
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
                opts,
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
    opts: &UnifyOptions,
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
                if opts.list_paths {
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
        idx.exec(
            "UPDATE files SET object_id = ?3, ino = ?4 WHERE guest_id = ?1 AND path = ?2",
            params![s.guest_id, s.path, s.object_id, s.object_ino as i64],
        )?;
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

/// Bytes a dry run would free: inodes all of whose links are planned to be replaced (the rule
/// of [`Freed`], over plan rows that have no object yet).
fn planned_savings(root: &HostRoot) -> Result<u64> {
    root.index
        .conn
        .query_row(
            "SELECT COALESCE(SUM(blocks), 0) * 512 FROM
               (SELECT ino, MAX(blocks) AS blocks, MAX(nlink) AS nlink, COUNT(*) AS n
                FROM plan GROUP BY ino) WHERE n >= nlink",
            [],
            |r| r.get::<_, i64>(0),
        )
        .map(|v| v as u64)
        .map_err(|e| root.index.err(e))
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

/// Fills `report.linked` from the plan of a dry run.
fn list_planned(
    root: &HostRoot,
    guests: &HashMap<i64, &OpenGuest>,
    report: &mut UnifyReport,
) -> Result<()> {
    let idx = &root.index;
    let mut stmt = idx
        .conn
        .prepare("SELECT guest_id, path, object_name, size FROM plan ORDER BY guest_id, path")
        .map_err(|e| idx.err(e))?;
    let rows = stmt
        .query_map([], |r| {
            Ok((
                r.get::<_, i64>(0)?,
                r.get::<_, Vec<u8>>(1)?,
                r.get::<_, String>(2)?,
                r.get::<_, i64>(3)?,
            ))
        })
        .map_err(|e| idx.err(e))?;
    for row in rows {
        let (gid, path, object, size) = row.map_err(|e| idx.err(e))?;
        report
            .linked
            .push(LinkedPath::new(guests[&gid], &path, &object, size as u64));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn member(ino: u64) -> Member {
        Member {
            guest_id: 1,
            path: Vec::new(),
            stat: Stat {
                dev: 1,
                ino,
                mode: 0,
                nlink: 1,
                uid: 0,
                gid: 0,
                size: 1,
                blocks: 8,
                mtime_ns: 0,
                ctime_ns: 0,
            },
        }
    }

    #[test]
    fn link_chunks_cut_at_inode_boundaries_within_the_cap() {
        let group: Vec<Member> = [1, 1, 2, 3, 3, 3, 4].into_iter().map(member).collect();
        let sizes: Vec<Vec<u64>> = link_chunks(&group, 3)
            .iter()
            .map(|c| c.iter().map(|m| m.stat.ino).collect())
            .collect();
        assert_eq!(sizes, vec![vec![1, 1, 2], vec![3, 3, 3], vec![4]]);
        assert_eq!(link_chunks(&group, 100).len(), 1);
        // An inode with more paths than the cap stays whole.
        let big: Vec<Member> = [5, 5, 5, 5].into_iter().map(member).collect();
        assert_eq!(link_chunks(&big, 2).len(), 1);
    }
}
