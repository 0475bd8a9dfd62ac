//! `unify`: the pipeline's driver — scan → candidates → partial hash → full hash → plan →
//! replace, one module a stage.

use std::collections::HashMap;

use crate::candidates::build_candidates;
use crate::error::{Error, PathContext, Result};
use crate::guest::{OpenGuest, check_offline, guest_names, guest_record, open_guest, open_tree};
use crate::hash::{FullHash, Job, hash_window, keep_hashes, partial_stage, record_window};
use crate::mountinfo::MountTable;
use crate::plan::{PlanOptions, Planner, list_planned, planned_savings};
use crate::policy::PolicyFile;
use crate::progress::{NoProgress, Phase, Progress};
use crate::replace::Replacer;
use crate::report::{Failure, UnifyReport};
use crate::root::HostRoot;
use crate::scan::scan_guests;
use crate::store;
use std::path::Path;

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
    /// Make every eligible file a store object, even one no other file shares: a template's
    /// tree, which the guests built from it will share.
    pub every_file: bool,
}

impl Default for UnifyOptions {
    fn default() -> Self {
        UnifyOptions {
            dry_run: false,
            ignore_mtime: false,
            min_size: 1,
            max_links: None,
            list_paths: false,
            every_file: false,
        }
    }
}

/// Unifies the named guests (all guests if `names` is empty).
///
/// # Algorithm
/// 1. **Scan** each guest into the index (one `lstat` per file; unchanged files keep their hashes,
///    files already linked to the store are recognised by inode).
/// 2. **Group** eligible files (marker not private, size ≥ `min_size`, not yet linked, no inode
///    flags someone set — read by the hash stages, a flagged file is listed in
///    `skipped_flagged` and left alone) by
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
/// Guests must be offline (not mounted, see `check_offline`): named guests that are not make
/// the run fail before it starts; with all guests, mounted ones are skipped and listed in
/// `skipped_mounted`.
///
/// # Errors
/// Fatal errors (index, store, a named guest that cannot be opened or is mounted) are
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
    let table = MountTable::all().at("/proc/self/mountinfo")?;
    let mut guests = Vec::new();
    for name in &names {
        let opened = guest_record(root, name).and_then(|record| {
            let guest = open_guest(root, name)?;
            check_offline(root, &record, &table)?;
            Ok(guest)
        });
        match opened {
            Ok(g) => guests.push(g),
            // A host always has running guests: --all leaves them for their next restart.
            Err(Error::Mounted { .. } | Error::InUse { .. } | Error::MountInside { .. }) if all => {
                report.skipped_mounted.push(name.clone());
            }
            Err(e) if !all => return Err(e),
            Err(e) => report.failures.push(Failure::guest(name, e.to_string())),
        }
    }
    run(root, guests, report, opts, progress)
}

/// The pipeline over opened trees (guests or template trees), after the driver chose them.
fn run(
    root: &HostRoot,
    guests: Vec<OpenGuest>,
    mut report: UnifyReport,
    opts: &UnifyOptions,
    progress: &dyn Progress,
) -> Result<UnifyReport> {
    report.guests = guests.iter().map(|g| g.name.clone()).collect();
    if guests.is_empty() {
        return Ok(report);
    }

    let pool = io_pool(root)?;
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
    build_candidates(
        root,
        &guests,
        opts.min_size,
        opts.ignore_mtime,
        opts.every_file,
    )?;
    lap(&mut report, "group");
    partial_stage(root, &by_id, &mut report, progress, &pool)?;
    lap(&mut report, "partial");
    let plan_opts = PlanOptions {
        dry_run: opts.dry_run,
        ignore_mtime: opts.ignore_mtime,
        max_links: opts.max_links,
        every_file: opts.every_file,
    };
    let mut planner = Planner::new(root, &by_id, &plan_opts)?;
    let mut replacer = (!opts.dry_run).then(|| Replacer::new(root, &by_id, opts.list_paths, &pool));
    pipeline(
        root,
        &by_id,
        &mut planner,
        replacer.as_mut(),
        &mut report,
        progress,
        &pool,
    )?;
    lap(&mut report, "hash+link");
    let copied_blocks = planner.copied_blocks();
    if let Some(replacer) = replacer {
        report.saved_bytes = replacer.freed_bytes().saturating_sub(copied_blocks * 512);
        // Dropping the replacer waits for the last replaced inode to be freed.
        drop(replacer);
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
        report.saved_bytes = planned_savings(root)?.saturating_sub(copied_blocks * 512);
    }
    keep_hashes(root)?;
    Ok(report)
}

/// The full hash, plan and replace, overlapped: the size groups are read a window at a time
/// ([`FullHash`]), and while one window is read on the I/O pool, this thread records the hashes
/// of the window before, plans its groups and replaces their paths (the link syscalls on the
/// same pool). So the disk reads while the linker links, instead of idling after the last
/// read until every path is linked.
///
/// # Algorithm
/// Groups that need no reading (hashed by an earlier run) are planned first, while the first
/// window is read. Then, window after window: join the reader of window k, record its hashes
/// in `temp.cand` and its groups in `temp.ready`, start the reader of window k+1, plan the
/// ready groups ([`Planner::plan_ready`]) and replace their paths ([`Replacer::replace_new`]).
/// Every guarantee of the replace step holds per path, as in a run of one window; memory holds
/// one window of jobs and one of results.
///
/// # Errors
/// Index errors abort (what is linked stays linked and safe); per-file failures are reported.
fn pipeline(
    root: &HostRoot,
    guests: &HashMap<i64, &OpenGuest>,
    planner: &mut Planner<'_>,
    mut replacer: Option<&mut Replacer<'_>>,
    report: &mut UnifyReport,
    progress: &dyn Progress,
    pool: &rayon::ThreadPool,
) -> Result<()> {
    let mut full = FullHash::prepare(root)?;
    progress.start(Phase::Hash, Some(full.bytes));
    let mut link = |planner: &mut Planner<'_>, report: &mut UnifyReport| -> Result<()> {
        let clock = std::time::Instant::now();
        planner.plan_ready(report)?;
        let planned = clock.elapsed().as_secs_f64();
        *report.seconds.entry("plan").or_default() += planned;
        if let Some(replacer) = replacer.as_deref_mut() {
            replacer.replace_new(report, &NoProgress)?;
        }
        *report.seconds.entry("link").or_default() += clock.elapsed().as_secs_f64() - planned;
        Ok(())
    };
    let mut window = full.next_window(root)?;
    std::thread::scope(|scope| -> Result<()> {
        let read = |jobs: Vec<Job>| {
            scope.spawn(move || {
                let clock = std::time::Instant::now();
                let results = hash_window(guests, &jobs, progress, pool);
                (jobs, results, clock.elapsed().as_secs_f64())
            })
        };
        let mut reading = window.take().map(read);
        // What needs no reading goes while the first window is read.
        link(planner, report)?;
        while let Some(reader) = reading.take() {
            let (jobs, results, seconds) = reader.join().map_err(|_| Error::Io {
                path: root.path().to_path_buf(),
                error: std::io::Error::other("a hashing thread panicked"),
            })?;
            *report.seconds.entry("hash").or_default() += seconds;
            record_window(root, guests, &jobs, results, report)?;
            drop(jobs);
            reading = full.next_window(root)?.map(read);
            link(planner, report)?;
        }
        Ok(())
    })?;
    progress.finish();
    Ok(())
}

/// The pool of I/O threads of a run. The phases wait on the disk more than on the CPU: they
/// run on eight threads a core so that reads, stats and renames overlap (on 2 cores, 16
/// threads against 8 took the cold scan of 40 guests, 400k files, from 2.42 s to 2.07 s).
fn io_pool(root: &HostRoot) -> Result<rayon::ThreadPool> {
    let threads = (8 * std::thread::available_parallelism().map_or(2, |n| n.get())).clamp(8, 64);
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .thread_name(|i| format!("cowherd-io-{i}"))
        .build()
        .map_err(|e| Error::Io {
            path: root.path().to_path_buf(),
            error: std::io::Error::other(e),
        })
}

/// Scans guests `names` into the index and nothing more: their rows brought up to date, files
/// that are links of store objects recognised by inode; nothing is hashed or linked. A mounted
/// guest's base is read as it is (nothing is written to it). For `verify --repair` and
/// `index rebuild`.
///
/// # Errors
/// Index errors; a guest that cannot be opened or a file that cannot be read is a failure in
/// the report.
pub(crate) fn rescan(
    root: &HostRoot,
    names: &[String],
    progress: &dyn Progress,
) -> Result<UnifyReport> {
    let mut report = UnifyReport::default();
    let mut guests = Vec::new();
    for name in names {
        match open_guest(root, name) {
            Ok(g) => guests.push(g),
            Err(e) => report.failures.push(Failure::guest(name, e.to_string())),
        }
    }
    report.guests = guests.iter().map(|g| g.name.clone()).collect();
    if guests.is_empty() {
        return Ok(report);
    }
    let pool = io_pool(root)?;
    progress.start(Phase::Scan, None);
    scan_guests(root, &guests, &mut report, progress, &pool)?;
    progress.finish();
    Ok(report)
}

/// A tree of the root that is not a guest, to unify into the store: a cached template's.
#[derive(Clone, Copy, Debug)]
pub struct TreeSpec<'a> {
    /// Its name in the index; it starts with `@` (never a guest's name).
    pub index_name: &'a str,
    /// The tree, relative to the root (`templates/NAME/1/tree`).
    pub rel: &'a Path,
    /// Its own marker rules, tried before the root's `policy.toml`.
    pub policy: Option<&'a PolicyFile>,
}

/// Unifies one tree of the root that is not a guest (see [`TreeSpec`]), as [`unify`] does a
/// guest: a cached template becomes store objects that guests built from it link to.
///
/// # Errors
/// As [`unify`]; [`Error::BadRecord`] for an index name not starting with `@`.
pub fn unify_tree(
    root: &HostRoot,
    tree: &TreeSpec<'_>,
    opts: &UnifyOptions,
    progress: &dyn Progress,
) -> Result<UnifyReport> {
    if !tree.index_name.starts_with('@') {
        return Err(Error::BadRecord {
            path: root.path().join(tree.rel),
            message: format!("index name {:?} must start with @", tree.index_name),
        });
    }
    let base_path = root.path().join(tree.rel);
    let base_fd = root.open_dir_below(tree.rel)?;
    let opened = open_tree(
        root,
        tree.index_name,
        base_path.clone(),
        base_fd,
        tree.policy,
        &base_path,
    )?;
    let report = UnifyReport {
        dry_run: opts.dry_run,
        ..UnifyReport::default()
    };
    run(root, vec![opened], report, opts, progress)
}

/// Drops the index rows of a tree unified with [`unify_tree`] (a removed template version).
///
/// # Errors
/// Index errors.
pub fn forget_tree(root: &HostRoot, index_name: &str) -> Result<()> {
    let id: Option<i64> = root
        .index
        .conn
        .query_row("SELECT id FROM guests WHERE name = ?1", [index_name], |r| {
            r.get(0)
        })
        .ok();
    if let Some(id) = id {
        root.index.drop_rows(id)?;
        root.index.exec("DELETE FROM guests WHERE id = ?1", [id])?;
    }
    Ok(())
}
