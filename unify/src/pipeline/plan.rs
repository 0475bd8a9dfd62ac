//! Plan: one store object per (key, marker) group, found or made (by adopting an inode or by
//! copying), and the paths to replace (`temp.plan`).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::os::fd::AsFd;

use rusqlite::params;

use crate::error::{Error, PathContext, Result};
use crate::fsx::{self, Stat};
use crate::guest::OpenGuest;
use crate::index;
use crate::key::{self, KeyParts};
use crate::policy::Marker;
use crate::report::{Failure, LinkedPath, UnifyReport};
use crate::root::HostRoot;
use crate::store::{self, Object, ObjectSpec};

/// What planning needs of the run's options.
#[derive(Clone, Copy, Debug)]
pub(crate) struct PlanOptions {
    /// Plan only: make no object (rows name the object a real run would make).
    pub dry_run: bool,
    /// Keys leave the mtime out.
    pub ignore_mtime: bool,
    /// The user's cap on an object's link count.
    pub max_links: Option<u64>,
    /// Make an object even of a key only one inode has.
    pub every_file: bool,
}

/// A candidate row of one key group.
struct Member {
    guest_id: i64,
    path: Vec<u8>,
    /// Its `files` row: directory id and name.
    dir: i64,
    name: Vec<u8>,
    stat: Stat,
}

impl<'a> Planner<'a> {
    /// A planner for one run: makes `temp.plan` (the paths to replace, growing window by
    /// window) and `temp.ready` (the size groups the next [`Planner::plan_ready`] plans).
    ///
    /// # Errors
    /// Index errors.
    pub(crate) fn new(
        root: &'a HostRoot,
        guests: &'a HashMap<i64, &'a OpenGuest>,
        opts: &'a PlanOptions,
    ) -> Result<Self> {
        plan_tables(&root.index)?;
        Ok(Planner {
            root,
            guests,
            opts,
            // The most links an object may have between runs: the user's cap, and one below
            // the filesystem's limit so the temporary name always fits.
            max_nlink: opts
                .max_links
                .unwrap_or(u64::MAX)
                .min(root.link_max() - 1)
                .max(2),
            planned_links: HashMap::new(),
            touched_immutable: BTreeSet::new(),
            unflagged: BTreeSet::new(),
            copied_blocks: 0,
        })
    }

    /// Blocks of the objects made by copying so far (they cost space).
    pub(crate) fn copied_blocks(&self) -> u64 {
        self.copied_blocks
    }

    /// Picks or makes the object of every (key, marker) group of the size groups in
    /// `temp.ready` and appends their paths to `temp.plan`; empties `temp.ready`. The
    /// immutable objects it will link lose their flag (journalled first; `restore_immutable`
    /// sets it again).
    ///
    /// # Errors
    /// Index and store errors; a group that cannot be planned is a failure in the report.
    pub(crate) fn plan_ready(&mut self, report: &mut UnifyReport) -> Result<()> {
        let root = self.root;
        let idx = &root.index;
        let tx = idx.conn.unchecked_transaction().map_err(|e| idx.err(e))?;
        {
            let mut stmt = idx
                .conn
                .prepare_cached(READY_MEMBERS)
                .map_err(|e| idx.err(e))?;
            let mut rows = stmt.query([]).map_err(|e| idx.err(e))?;
            let mut group: Vec<Member> = Vec::new();
            let mut group_key: Option<(KeyParts, Marker)> = None;
            loop {
                let parsed = match rows.next().map_err(|e| idx.err(e))? {
                    Some(row) => {
                        match read_member(row, root.dev(), self.opts.ignore_mtime)
                            .map_err(|e| idx.err(e))?
                        {
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
                    self.group(&parts, marker, &group, report);
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
        idx.exec("DELETE FROM ready", [])?;
        let newly: Vec<String> = self
            .touched_immutable
            .difference(&self.unflagged)
            .cloned()
            .collect();
        for name in &newly {
            store::journal_mutable(root, name)?;
        }
        tx.commit().map_err(|e| idx.err(e))?;
        // Journalled and committed: now the flags may come off for linking.
        for name in newly {
            store::set_object_immutable(root, &name, false)?;
            self.unflagged.insert(name);
        }
        Ok(())
    }
}

/// Makes `temp.plan` and `temp.ready`, empty.
fn plan_tables(idx: &crate::index::Index) -> Result<()> {
    idx.conn
        .execute_batch(
            "DROP TABLE IF EXISTS temp.plan; DROP TABLE IF EXISTS temp.ready;
             CREATE TEMP TABLE plan(
                id INTEGER PRIMARY KEY, guest_id INTEGER, path BLOB, dir INTEGER, name BLOB,
                object_id INTEGER, object_name TEXT, object_ino INTEGER, ino INTEGER,
                nlink INTEGER, blocks INTEGER, size INTEGER, mode INTEGER, uid INTEGER,
                gid INTEGER, mtime_ns INTEGER, ctime_ns INTEGER);
             CREATE TEMP TABLE ready(size INTEGER, mode INTEGER, uid INTEGER, gid INTEGER,
                mt INTEGER, PRIMARY KEY(size, mode, uid, gid, mt)) WITHOUT ROWID;",
        )
        .map_err(|e| idx.err(e))
}

/// The hashed members of the ready size groups, in key-group order. The join starts from
/// `ready` (`CROSS JOIN` fixes the order) and reaches each group's members through
/// `cand_group`: a window's few groups cost their own rows. The other order walks every
/// candidate of the run in index order, fetching each row, once per window.
const READY_MEMBERS: &str = "
    SELECT c.guest_id, c.path, c.ino, c.nlink, c.size, c.blocks, c.mode, c.uid, c.gid,
           c.mtime_ns, c.ctime_ns, c.marker, c.chash, c.xhash, c.dir, c.name
    FROM ready r CROSS JOIN cand c
    WHERE c.size = r.size AND c.mode = r.mode AND c.uid = r.uid AND c.gid = r.gid
      AND c.mt = r.mt AND c.chash IS NOT NULL AND c.xhash IS NOT NULL
    ORDER BY r.size, r.mode, r.uid, r.gid, r.mt, c.chash, c.xhash, c.marker, c.ino";

/// One `cand` row as a group member with its key parts, or `None` if its hashes are malformed.
fn read_member(
    r: &rusqlite::Row<'_>,
    dev: u64,
    ignore_mtime: bool,
) -> rusqlite::Result<Option<(KeyParts, Marker, Member)>> {
    let stat = index::row_stat(r, 2, dev)?;
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
        dir: r.get(14)?,
        name: r.get(15)?,
        stat,
    };
    Ok(Some((parts, marker, member)))
}

/// The run-wide state of planning, window after window.
pub(crate) struct Planner<'a> {
    root: &'a HostRoot,
    guests: &'a HashMap<i64, &'a OpenGuest>,
    opts: &'a PlanOptions,
    /// The most links an object may end up with.
    max_nlink: u64,
    /// Links planned per object name in this run (not made yet).
    planned_links: HashMap<String, u64>,
    /// Immutable objects this run links to: their flag comes off for the run.
    touched_immutable: BTreeSet<String>,
    /// Of those, the ones whose flag is off already.
    unflagged: BTreeSet<String>,
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
            Err(_) if !shared && !self.opts.every_file => return Ok(None),
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
            "INSERT INTO plan(guest_id, path, dir, name, object_id, object_name, object_ino, ino,
                              nlink, blocks, size, mode, uid, gid, mtime_ns, ctime_ns)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16)",
        )
        .map_err(|e| idx.err(e))?;
    for m in group {
        if Some(m.stat.ino) == object_ino {
            // The inode itself became the object: its paths are links to it already.
            if let Some(object) = object {
                index::record_link(idx, m.dir, &m.name, object.id, object.ino, &m.stat)?;
            }
            continue;
        }
        let s = &m.stat;
        insert
            .execute(params![
                m.guest_id,
                m.path,
                m.dir,
                m.name,
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

fn adopt_member(
    root: &HostRoot,
    guest: &OpenGuest,
    spec: &ObjectSpec<'_>,
    seq: u32,
    m: &Member,
) -> Result<Option<Object>> {
    let dir = guest.open_parent(&m.path)?;
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
    let fd = guest.open_file(&m.path).at(&shown)?;
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

/// Bytes a dry run would free: inodes all of whose links are planned to be replaced (the rule
/// of [`Freed`], over plan rows that have no object yet).
pub(crate) fn planned_savings(root: &HostRoot) -> Result<u64> {
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

/// Fills `report.linked` from the plan of a dry run.
pub(crate) fn list_planned(
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
            dir: 1,
            name: Vec::new(),
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

    /// Regression: the ready groups' members were found by walking all of `cand` in index
    /// order once per window (19 s of a 42 s first run at 40 guests).
    #[test]
    fn ready_members_are_reached_from_the_ready_groups_through_the_group_index() {
        let dir = tempfile::tempdir().unwrap();
        let idx = crate::index::Index::open(&dir.path().join("index.db")).unwrap();
        crate::candidates::candidate_tables(&idx, &[], 1, false, false).unwrap();
        plan_tables(&idx).unwrap();
        let mut stmt = idx
            .conn
            .prepare(&format!("EXPLAIN QUERY PLAN {READY_MEMBERS}"))
            .unwrap();
        let steps: Vec<String> = stmt
            .query_map([], |r| r.get::<_, String>(3))
            .unwrap()
            .map(|r| r.unwrap())
            .collect();
        assert!(steps[0].starts_with("SCAN r"), "{steps:?}");
        assert!(
            steps[1].starts_with("SEARCH c USING INDEX cand_group"),
            "{steps:?}"
        );
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
