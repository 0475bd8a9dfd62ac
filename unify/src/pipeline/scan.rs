//! Scan: walk the guests' base trees and bring their rows in the index up to date, one stat per
//! file.

use std::collections::{HashMap, HashSet};
use std::ops::ControlFlow;
use std::os::fd::AsFd;
use std::path::Path;
use std::sync::mpsc::SyncSender;

use rayon::prelude::*;
use rusqlite::{Connection, OpenFlags, params};

use crate::error::{Error, Result};
use crate::fsx::{self, Stat, Visit};
use crate::guest::OpenGuest;
use crate::index::{AT_PATH, split_path};
use crate::progress::Progress;
use crate::report::{Failure, UnifyReport};
use crate::root::HostRoot;
use crate::store::TEMP_PREFIX;

/// Rows written per transaction.
const BATCH: usize = 4096;
/// Entries a walker sends at once.
const CHUNK: usize = 1024;

/// What a walker found that the index must learn.
enum Found {
    /// A regular file that is new (`known` false) or changed since its row was written.
    File {
        rel: Vec<u8>,
        stat: Stat,
        marker: i64,
        known: bool,
    },
    /// An unchanged file whose marker is now different.
    Marker { rel: Vec<u8>, marker: i64 },
    /// A recorded path that is gone or no longer a regular file.
    Gone { rel: Vec<u8> },
    /// An entry that could not be read.
    Failure { rel: Vec<u8>, error: String },
    /// The guest's rows could not be read: the scan stops.
    Fatal(Error),
}

/// A chunk of one guest's walk; `done` on its last chunk.
struct Chunk {
    guest: usize,
    found: Vec<Found>,
    unchanged: u64,
    done: bool,
}

/// What the index says of one path.
struct Known {
    ino: u64,
    size: u64,
    mtime_ns: i64,
    ctime_ns: i64,
    linked: bool,
    marker: i64,
    seen: bool,
}

/// Walks `guests` in parallel and brings their `files` rows up to date.
///
/// # Algorithm
/// One walker per guest (on the I/O pool) reads the guest's rows once through its own
/// read-only connection, then walks the tree from the guest's already-opened base directory
/// fd-relative ([`fsx::walk_tree`]: a base or directory swapped for a symlink meanwhile is not
/// followed, no mount point is crossed). One `fstatat` per regular file decides:
/// * a path still linked to its store object (same inode as recorded) — nothing to do;
/// * same inode, size, mtime and ctime as recorded — unchanged, hashes kept;
/// * otherwise — new or changed: the row is rewritten and its hashes cleared.
///
/// A walker reads a directory's rows when the walk enters it and drops them when it leaves:
/// rows left unseen there are deleted paths, and so are the rows of recorded directories the
/// walk never entered (unless below a directory that could not be read: those rows are kept).
/// Walkers send only what changed, in chunks through a bounded channel, to this thread, the one
/// index writer; an unchanged tree costs no write. Memory holds, per walker, the rows of the
/// directories on its current path and the guest's directory names, never a guest's rows.
///
/// # Errors
/// Index errors abort; a file or directory that cannot be read is reported in
/// `report.failures` and skipped.
pub(crate) fn scan_guests(
    root: &HostRoot,
    guests: &[OpenGuest],
    report: &mut UnifyReport,
    progress: &dyn Progress,
    pool: &rayon::ThreadPool,
) -> Result<()> {
    let index_path = root.index.path.as_path();
    // A few chunks in flight per walker is enough to keep the one writer busy.
    let (tx, rx) = std::sync::mpsc::sync_channel::<Chunk>(16);
    std::thread::scope(|scope| -> Result<()> {
        scope.spawn(move || {
            pool.install(|| {
                guests
                    .par_iter()
                    .enumerate()
                    .for_each_with(tx, |tx, (i, guest)| {
                        walk(index_path, guest, i, tx, progress);
                    });
            });
        });
        // On an error `rx` is dropped on return, which stops the walkers' sends.
        let mut writer = Writer::new(root)?;
        // Guests whose rows changed: only those need their hardlink groups and directories
        // looked at again (an unchanged guest costs no query).
        let mut touched = vec![false; guests.len()];
        for chunk in rx {
            let guest = &guests[chunk.guest];
            report.files_scanned += chunk.unchanged;
            touched[chunk.guest] |= chunk
                .found
                .iter()
                .any(|f| !matches!(f, Found::Failure { .. }));
            for found in chunk.found {
                match found {
                    Found::File {
                        rel,
                        stat,
                        marker,
                        known,
                    } => {
                        report.files_scanned += 1;
                        if known {
                            report.files_changed += 1;
                        } else {
                            report.files_new += 1;
                        }
                        writer.file(guest.id, &rel, &stat, marker)?;
                    }
                    Found::Marker { rel, marker } => {
                        report.files_scanned += 1;
                        let (dir, name) = split_path(&rel);
                        writer.exec(
                            &format!("UPDATE files SET marker = ?4 WHERE {AT_PATH}"),
                            params![guest.id, dir, name, marker],
                        )?;
                    }
                    Found::Gone { rel } => {
                        report.files_removed += 1;
                        let (dir, name) = split_path(&rel);
                        writer.exec(
                            &format!("DELETE FROM files WHERE {AT_PATH}"),
                            params![guest.id, dir, name],
                        )?;
                    }
                    Found::Failure { rel, error } => {
                        report.failures.push(Failure::new(guest, &rel, error));
                    }
                    Found::Fatal(e) => return Err(e),
                }
            }
            if chunk.done && touched[chunk.guest] {
                mark_conflicts(root, guest)?;
                root.index.drop_empty_dirs(guest.id)?;
            }
        }
        writer.commit()
    })
}

/// The rows of one directory, keyed by file name.
type DirRows = HashMap<Vec<u8>, Known>;

/// A walker's read-only view of one guest's rows, a directory at a time.
struct Rows {
    conn: Connection,
    guest_id: i64,
    index_path: std::path::PathBuf,
}

impl Rows {
    fn open(index_path: &Path, guest_id: i64) -> Result<Rows> {
        let wrap = |error| Error::Index {
            path: index_path.to_path_buf(),
            error,
        };
        let conn = Connection::open_with_flags(
            index_path,
            OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(wrap)?;
        conn.busy_timeout(std::time::Duration::from_secs(30))
            .map_err(wrap)?;
        // A walker reads each directory's rows once, in key order: a small cache will do.
        conn.pragma_update(None, "cache_size", -512).map_err(wrap)?;
        Ok(Rows {
            conn,
            guest_id,
            index_path: index_path.to_path_buf(),
        })
    }

    fn err(&self, error: rusqlite::Error) -> Error {
        Error::Index {
            path: self.index_path.clone(),
            error,
        }
    }

    /// The rows of directory `dir` (relative to the base, `b""` for the top), keyed by name.
    fn dir(&self, dir: &[u8]) -> Result<DirRows> {
        let mut stmt = self
            .conn
            .prepare_cached(
                "SELECT f.name, f.ino, f.size, f.mtime_ns, f.ctime_ns, f.object_id IS NOT NULL,
                        f.marker
                 FROM dirs d JOIN files f ON f.dir = d.id
                 WHERE d.guest_id = ?1 AND d.path = ?2",
            )
            .map_err(|e| self.err(e))?;
        stmt.query_map(params![self.guest_id, dir], |r| {
            Ok((
                r.get::<_, Vec<u8>>(0)?,
                Known {
                    ino: r.get::<_, i64>(1)? as u64,
                    size: r.get::<_, i64>(2)? as u64,
                    mtime_ns: r.get(3)?,
                    ctime_ns: r.get(4)?,
                    linked: r.get(5)?,
                    marker: r.get(6)?,
                    seen: false,
                },
            ))
        })
        .and_then(|rows| rows.collect::<rusqlite::Result<DirRows>>())
        .map_err(|e| self.err(e))
    }

    /// The recorded directories (ids and paths) that hold files.
    fn dirs(&self) -> Result<Vec<(i64, Vec<u8>)>> {
        let mut stmt = self
            .conn
            .prepare_cached(
                "SELECT id, path FROM dirs d WHERE guest_id = ?1
                   AND EXISTS (SELECT 1 FROM files f WHERE f.dir = d.id)",
            )
            .map_err(|e| self.err(e))?;
        stmt.query_map([self.guest_id], |r| Ok((r.get(0)?, r.get(1)?)))
            .and_then(|rows| rows.collect())
            .map_err(|e| self.err(e))
    }

    /// The file names recorded in directory row `id`.
    fn names(&self, id: i64) -> Result<Vec<Vec<u8>>> {
        let mut stmt = self
            .conn
            .prepare_cached("SELECT name FROM files WHERE dir = ?1")
            .map_err(|e| self.err(e))?;
        stmt.query_map([id], |r| r.get(0))
            .and_then(|rows| rows.collect())
            .map_err(|e| self.err(e))
    }
}

/// `dir`/`name` (`name` alone in the top directory).
fn join(dir: &[u8], name: &[u8]) -> Vec<u8> {
    let mut rel = Vec::with_capacity(dir.len() + 1 + name.len());
    rel.extend_from_slice(dir);
    if !dir.is_empty() {
        rel.push(b'/');
    }
    rel.extend_from_slice(name);
    rel
}

/// Whether `path` is `dir` or below it (`b""` is the top: everything is below it).
fn within(path: &[u8], dir: &[u8]) -> bool {
    dir.is_empty() || (path.starts_with(dir) && matches!(path.get(dir.len()), None | Some(&b'/')))
}

/// Walks one guest and sends what changed; stops early if the writer has gone.
fn walk(
    index_path: &Path,
    guest: &OpenGuest,
    index: usize,
    tx: &SyncSender<Chunk>,
    progress: &dyn Progress,
) {
    let fatal = |e: Error| {
        let _ = tx.send(Chunk {
            guest: index,
            found: vec![Found::Fatal(e)],
            unchanged: 0,
            done: true,
        });
    };
    let rows = match Rows::open(index_path, guest.id) {
        Ok(r) => r,
        Err(e) => return fatal(e),
    };
    let mut chunk = Chunk {
        guest: index,
        found: Vec::with_capacity(CHUNK),
        unchanged: 0,
        done: false,
    };
    // The rows of the directories on the walk's current path, innermost last.
    let mut open: Vec<(Vec<u8>, DirRows)> = Vec::new();
    // Directories walked, and those whose subtree could not be read (their rows are kept).
    let mut entered: HashSet<Vec<u8>> = HashSet::new();
    let mut unreadable: Vec<Vec<u8>> = Vec::new();
    let mut failed: Option<Error> = None;
    let mut abs = Vec::with_capacity(256);
    let flow = fsx::walk_tree(guest.base_fd.as_fd(), &mut |visit| {
        let (rel, stat) = match visit {
            Visit::Dir(rel) => {
                match rows.dir(rel) {
                    Ok(known) => open.push((rel.to_vec(), known)),
                    Err(e) => {
                        failed = Some(e);
                        return ControlFlow::Break(());
                    }
                }
                entered.insert(rel.to_vec());
                return ControlFlow::Continue(());
            }
            Visit::DirEnd(rel) => {
                for (name, k) in open.pop().map(|(_, known)| known).unwrap_or_default() {
                    if !k.seen {
                        chunk.found.push(Found::Gone {
                            rel: join(rel, &name),
                        });
                    }
                }
                return send_full(&mut chunk, index, tx);
            }
            Visit::File(rel, stat) => (rel, stat),
            Visit::Error { rel, dir, error } => {
                if dir {
                    // A directory that cannot be read: keep the rows below it rather than drop them.
                    unreadable.push(rel.to_vec());
                }
                match open.last_mut() {
                    // The listing of the directory being walked broke off: keep all its rows.
                    Some((at, known)) if dir && at.as_slice() == rel => {
                        known.values_mut().for_each(|k| k.seen = true);
                    }
                    Some((_, known)) => {
                        if let Some(k) = known.get_mut(fsx::split_parent(rel).1) {
                            k.seen = true;
                        }
                    }
                    None => {}
                }
                chunk.found.push(Found::Failure {
                    rel: rel.to_vec(),
                    error: std::io::Error::from(error).to_string(),
                });
                return ControlFlow::Continue(());
            }
        };
        let name = fsx::split_parent(rel).1;
        if name.starts_with(TEMP_PREFIX) {
            return ControlFlow::Continue(());
        }
        progress.advance(1);
        abs.clear();
        abs.push(b'/');
        abs.extend_from_slice(rel);
        let marker = guest.policy.marker_for(&abs).code();
        match open.last_mut().and_then(|(_, known)| known.get_mut(name)) {
            Some(k) => {
                k.seen = true;
                let same_inode = k.ino == stat.ino;
                let unchanged = (same_inode && k.linked)
                    || (same_inode
                        && k.size == stat.size
                        && k.mtime_ns == stat.mtime_ns
                        && k.ctime_ns == stat.ctime_ns);
                if !unchanged {
                    chunk.found.push(Found::File {
                        rel: rel.to_vec(),
                        stat,
                        marker,
                        known: true,
                    });
                } else if k.marker != marker {
                    chunk.found.push(Found::Marker {
                        rel: rel.to_vec(),
                        marker,
                    });
                } else {
                    chunk.unchanged += 1;
                }
            }
            None => chunk.found.push(Found::File {
                rel: rel.to_vec(),
                stat,
                marker,
                known: false,
            }),
        }
        send_full(&mut chunk, index, tx)
    });
    if let Some(e) = failed {
        return fatal(e);
    }
    if flow.is_break() {
        return;
    }
    // Recorded directories the walk never entered: gone (or no longer directories), unless
    // below one that could not be read.
    let recorded = match rows.dirs() {
        Ok(d) => d,
        Err(e) => return fatal(e),
    };
    for (id, dir) in recorded {
        if entered.contains(&dir) || unreadable.iter().any(|u| within(&dir, u)) {
            continue;
        }
        let names = match rows.names(id) {
            Ok(n) => n,
            Err(e) => return fatal(e),
        };
        for name in names {
            chunk.found.push(Found::Gone {
                rel: join(&dir, &name),
            });
        }
        if send_full(&mut chunk, index, tx).is_break() {
            return;
        }
    }
    chunk.done = true;
    let _ = tx.send(chunk);
}

/// Sends `chunk` once it holds [`CHUNK`] entries; breaks if the writer has gone.
fn send_full(chunk: &mut Chunk, index: usize, tx: &SyncSender<Chunk>) -> ControlFlow<()> {
    if chunk.found.len() < CHUNK {
        return ControlFlow::Continue(());
    }
    let next = Chunk {
        guest: index,
        found: Vec::with_capacity(CHUNK),
        unchanged: 0,
        done: false,
    };
    match tx.send(std::mem::replace(chunk, next)) {
        Ok(()) => ControlFlow::Continue(()),
        Err(_) => ControlFlow::Break(()),
    }
}

/// The index side of the scan: one long transaction, committed every [`BATCH`] writes.
struct Writer<'a> {
    root: &'a HostRoot,
    pending: usize,
    /// The directory row of the last file written, per guest id: files come in walk order,
    /// so most files find their directory here.
    last_dir: HashMap<i64, (Vec<u8>, i64)>,
}

impl<'a> Writer<'a> {
    fn new(root: &'a HostRoot) -> Result<Writer<'a>> {
        root.index
            .conn
            .execute_batch("BEGIN")
            .map_err(|e| root.index.err(e))?;
        Ok(Writer {
            root,
            pending: 0,
            last_dir: HashMap::new(),
        })
    }

    fn commit(&mut self) -> Result<()> {
        self.root
            .index
            .conn
            .execute_batch("COMMIT")
            .map_err(|e| self.root.index.err(e))
    }

    /// Runs one write, committing every [`BATCH`] of them.
    fn exec(&mut self, sql: &str, p: impl rusqlite::Params) -> Result<()> {
        self.root.index.exec(sql, p)?;
        self.pending += 1;
        if self.pending >= BATCH {
            self.pending = 0;
            self.root
                .index
                .conn
                .execute_batch("COMMIT; BEGIN")
                .map_err(|e| self.root.index.err(e))?;
        }
        Ok(())
    }

    /// Writes the row of a new or changed file, its hashes cleared. A file that already is a
    /// link of a store object (a guest built from a template, say) is recorded as linked to it:
    /// nothing to hash, nothing to link.
    fn file(&mut self, guest_id: i64, rel: &[u8], st: &Stat, marker: i64) -> Result<()> {
        let object = if st.nlink > 1 {
            let found = crate::store::object_of_inode(self.root, st)?;
            match found {
                Some(name) => Some(self.root.index.object_id(&name)?),
                None => None,
            }
        } else {
            None
        };
        let (dir, name) = split_path(rel);
        let dir_id = match self.last_dir.get(&guest_id) {
            Some((path, id)) if path == dir => *id,
            _ => {
                let id = self.root.index.dir_id(guest_id, dir)?;
                self.last_dir.insert(guest_id, (dir.to_vec(), id));
                id
            }
        };
        self.exec(
            "INSERT OR REPLACE INTO files(dir, name, ino, nlink, size, blocks, mtime_ns,
                ctime_ns, mode, uid, gid, marker, object_id)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13)",
            params![
                dir_id,
                name,
                st.ino as i64,
                st.nlink as i64,
                st.size as i64,
                st.blocks as i64,
                st.mtime_ns,
                st.ctime_ns,
                st.mode,
                st.uid,
                st.gid,
                marker,
                object
            ],
        )
    }
}

/// A hardlink group whose paths got different markers is left alone (treated as private).
fn mark_conflicts(root: &HostRoot, guest: &OpenGuest) -> Result<()> {
    root.index.exec(
        "UPDATE files SET marker = 0
         WHERE dir IN (SELECT id FROM dirs WHERE guest_id = ?1) AND object_id IS NULL
           AND nlink > 1
           AND ino IN (SELECT ino FROM paths WHERE guest_id = ?1 AND nlink > 1
                       GROUP BY ino HAVING MIN(marker) <> MAX(marker))",
        [guest.id],
    )?;
    Ok(())
}
