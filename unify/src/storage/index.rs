//! The SQLite index: guests, files, objects and the crash journal. A cache: losing it costs a
//! re-hash, never data.

use std::path::{Path, PathBuf};

use rusqlite::{Connection, OptionalExtension, params};

use crate::error::{Error, Result};
use crate::fsx::Stat;

/// Schema version stored in `PRAGMA user_version`.
const SCHEMA_VERSION: i64 = 4;

/// Pages of SQLite's page cache (of the main connection): 2 MiB. The index of 500 guests is
/// far larger; every query walks it in key order, so a bigger cache buys little and costs
/// resident memory. It also caps what a sort holds in memory before it spills to a temp file
/// (SQLite sizes the sorter by the main cache): a window's plan, sorted into path order, has a
/// row per path, so with 8 MiB the peak grew with the fleet (200 hardlink-cloned guests:
/// 45 MB at 8 MiB, 34 MB at 2 MiB, same time).
const CACHE_KIB: i64 = 2048;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS guests(
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    last_unify INTEGER
);
-- One row per directory of a guest that holds indexed files. path: guest-relative bytes, no
-- leading or trailing '/'; '' for the guest's top directory.
CREATE TABLE IF NOT EXISTS dirs(
    id INTEGER PRIMARY KEY,
    guest_id INTEGER NOT NULL,
    path BLOB NOT NULL,
    UNIQUE(guest_id, path)
);
-- One row per regular file of a guest: its directory and name (the key), its stat as last
-- seen, its marker.
-- object_id: the store object this path is a link to.
-- phash/chash/xhash: partial content hash, full content hash, hash of all xattrs; NULL until
--   hashed, and NULL again once linked (the object holds them).
-- orig_ino: the inode before linking, kept only if it had several links (a hardlink group
--   of the guest, counted once in its logical size).
-- flags: the inode flags someone set on it (chattr: FS_IOC_GETFLAGS without the filesystem's
--   own), read with the hashes; NULL until read and again once the row is rewritten or linked.
--   Not 0: the file is never eligible (see candidates.rs).
CREATE TABLE IF NOT EXISTS files(
    dir INTEGER NOT NULL,
    name BLOB NOT NULL,
    ino INTEGER NOT NULL,
    nlink INTEGER NOT NULL,
    size INTEGER NOT NULL,
    blocks INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL,
    ctime_ns INTEGER NOT NULL,
    mode INTEGER NOT NULL,
    uid INTEGER NOT NULL,
    gid INTEGER NOT NULL,
    marker INTEGER NOT NULL,
    object_id INTEGER,
    phash BLOB,
    chash BLOB,
    xhash BLOB,
    orig_ino INTEGER,
    flags INTEGER,
    PRIMARY KEY(dir, name)
) WITHOUT ROWID;
-- The files with their guest and guest-relative path, for reading.
CREATE VIEW IF NOT EXISTS paths AS
    SELECT d.guest_id AS guest_id,
           CAST(CASE WHEN length(d.path) = 0 THEN f.name ELSE d.path || x'2f' || f.name END
                AS BLOB) AS path,
           f.*
    FROM files f JOIN dirs d ON d.id = f.dir;
-- One row per store object: store/objects/<name[0..2]>/<name>. Its key (in its name) holds
-- its hashes; the metadata is kept for finding an object of a size group.
CREATE TABLE IF NOT EXISTS objects(
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    kind INTEGER NOT NULL,
    seq INTEGER NOT NULL,
    ign_mtime INTEGER NOT NULL,
    size INTEGER NOT NULL,
    mode INTEGER NOT NULL,
    uid INTEGER NOT NULL,
    gid INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL,
    blocks INTEGER NOT NULL,
    ino INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS objects_group ON objects(size, mode, uid, gid);
CREATE INDEX IF NOT EXISTS objects_ino ON objects(ino);
-- Work in flight, replayed by the next run after a crash:
--   op 'dir':     guest_id, path = directory, value = its mtime_ns before we touched it
--   op 'mutable': path = object name whose immutable flag is cleared for linking
--   op 'flags':   guest_id, path = base entry, value = inode flags to set (fold)
CREATE TABLE IF NOT EXISTS journal(
    id INTEGER PRIMARY KEY,
    op TEXT NOT NULL,
    guest_id INTEGER,
    path BLOB,
    value INTEGER
);
";

/// The condition selecting the `files` row of one guest path, with parameters `?1` the
/// guest's id, `?2` the directory part of the path and `?3` the name ([`split_path`]).
pub(crate) const AT_PATH: &str =
    "dir = (SELECT id FROM dirs WHERE guest_id = ?1 AND path = ?2) AND name = ?3";

/// The expression grouping a guest's `paths` rows (aliased `f`) by the inode they had before
/// any of them was linked: rows counted once in the guest's logical size and inode count.
/// An unlinked path's own inode; a linked path's `orig_ino` if it was a hardlink group, else
/// the path itself.
pub(crate) const ORIGINAL_INODE: &str = "CASE WHEN f.object_id IS NULL THEN 'i' || f.ino
     WHEN f.orig_ino IS NOT NULL THEN 'o' || f.orig_ino
     ELSE 'p' || f.dir || '/' || hex(f.name) END";

/// Records that the path of `files` row (`dir`, `name`), whose inode was `then`, is now a link
/// to object `object_id` (inode `object_ino`): its hashes go (the object has them); its inode
/// before is kept if it had several links (see [`ORIGINAL_INODE`]).
pub(crate) fn record_link(
    idx: &Index,
    dir: i64,
    name: &[u8],
    object_id: i64,
    object_ino: u64,
    then: &Stat,
) -> Result<()> {
    idx.exec(
        "UPDATE files SET object_id = ?3, ino = ?4, phash = NULL, chash = NULL, xhash = NULL,
                          orig_ino = ?5, flags = NULL
         WHERE dir = ?1 AND name = ?2",
        params![
            dir,
            name,
            object_id,
            object_ino as i64,
            (then.nlink > 1).then_some(then.ino as i64)
        ],
    )?;
    Ok(())
}

/// Whether SQLite found the index file damaged (`SQLITE_CORRUPT`, `SQLITE_NOTADB`): the fix is
/// `index rebuild`, not a retry.
pub(crate) fn is_damaged(error: &rusqlite::Error) -> bool {
    matches!(
        error.sqlite_error_code(),
        Some(rusqlite::ErrorCode::DatabaseCorrupt | rusqlite::ErrorCode::NotADatabase)
    )
}

/// What [`Error::Index`] adds to SQLite's message when it says the file at `path` (the root's
/// `index.db`) is damaged: the command that makes it again. Empty for any other error.
pub(crate) fn damage_hint(path: &Path, error: &rusqlite::Error) -> String {
    if !is_damaged(error) {
        return String::new();
    }
    let root = path.parent().unwrap_or(path);
    format!(
        ": the index is damaged; run `cowherd --root {} index rebuild` (it keeps the damaged \
         file aside and makes the index again from the store and the guests; no guest file \
         changes)",
        root.display()
    )
}

/// The directory part and the name of a guest path (`a/b/c` → `a/b`, `c`; `c` → ``, `c`).
pub(crate) fn split_path(rel: &[u8]) -> (&[u8], &[u8]) {
    crate::fsx::split_parent(rel)
}

/// An open index database.
pub(crate) struct Index {
    pub conn: Connection,
    pub path: PathBuf,
}

impl Index {
    /// Opens (and creates or upgrades) the index at `path`.
    ///
    /// # Errors
    /// [`Error::Index`] if SQLite cannot open or set up the file.
    pub fn open(path: &Path) -> Result<Index> {
        let wrap = |error| Error::Index {
            path: path.to_path_buf(),
            error,
        };
        let conn = Connection::open(path).map_err(wrap)?;
        conn.busy_timeout(std::time::Duration::from_secs(30))
            .map_err(wrap)?;
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(wrap)?;
        conn.pragma_update(None, "synchronous", "NORMAL")
            .map_err(wrap)?;
        conn.pragma_update(None, "temp_store", "FILE")
            .map_err(wrap)?;
        conn.pragma_update(None, "cache_size", -CACHE_KIB)
            .map_err(wrap)?;
        let version: i64 = conn
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .map_err(wrap)?;
        if version > SCHEMA_VERSION {
            return Err(Error::BadRecord {
                path: path.to_path_buf(),
                message: format!(
                    "index schema {version} is newer than this cowherd understands ({SCHEMA_VERSION}); upgrade cowherd"
                ),
            });
        }
        if version == 1 {
            migrate_v1(&conn).map_err(wrap)?;
        }
        if (1..=2).contains(&version) {
            // Schema 3: objects no longer repeat the hashes their name's key is made of.
            for column in ["chash", "xhash"] {
                let there: bool = conn
                    .query_row(
                        "SELECT COUNT(*) > 0 FROM pragma_table_info('objects') WHERE name = ?1",
                        [column],
                        |r| r.get(0),
                    )
                    .map_err(wrap)?;
                if there {
                    conn.execute_batch(&format!("ALTER TABLE objects DROP COLUMN {column}"))
                        .map_err(wrap)?;
                }
            }
        }
        if (1..=3).contains(&version) {
            // Schema 4: a file's inode flags (its hashes of schema 3 are read again, with them).
            let there: bool = conn
                .query_row(
                    "SELECT COUNT(*) > 0 FROM pragma_table_info('files') WHERE name = 'flags'",
                    [],
                    |r| r.get(0),
                )
                .map_err(wrap)?;
            if !there {
                conn.execute_batch("ALTER TABLE files ADD COLUMN flags INTEGER")
                    .map_err(wrap)?;
            }
        }
        conn.execute_batch(SCHEMA).map_err(wrap)?;
        conn.pragma_update(None, "user_version", SCHEMA_VERSION)
            .map_err(wrap)?;
        Ok(Index {
            conn,
            path: path.to_path_buf(),
        })
    }

    /// Wraps a SQLite error with the database path.
    pub fn err(&self, error: rusqlite::Error) -> Error {
        Error::Index {
            path: self.path.clone(),
            error,
        }
    }

    /// The id of guest `name`, created if new.
    pub fn guest_id(&self, name: &str) -> Result<i64> {
        let found: Option<i64> = self
            .conn
            .query_row("SELECT id FROM guests WHERE name = ?1", [name], |r| {
                r.get(0)
            })
            .optional()
            .map_err(|e| self.err(e))?;
        if let Some(id) = found {
            return Ok(id);
        }
        self.conn
            .execute("INSERT INTO guests(name) VALUES (?1)", [name])
            .map_err(|e| self.err(e))?;
        Ok(self.conn.last_insert_rowid())
    }

    /// The id of directory `dir` (guest-relative) of guest `guest_id`, its row made if new.
    pub fn dir_id(&self, guest_id: i64, dir: &[u8]) -> Result<i64> {
        self.exec(
            "INSERT OR IGNORE INTO dirs(guest_id, path) VALUES (?1, ?2)",
            params![guest_id, dir],
        )?;
        self.conn
            .prepare_cached("SELECT id FROM dirs WHERE guest_id = ?1 AND path = ?2")
            .and_then(|mut stmt| stmt.query_row(params![guest_id, dir], |r| r.get(0)))
            .map_err(|e| self.err(e))
    }

    /// Drops every row of guest (or tree) `guest_id`: its files and directories.
    pub fn drop_rows(&self, guest_id: i64) -> Result<()> {
        self.exec(
            "DELETE FROM files WHERE dir IN (SELECT id FROM dirs WHERE guest_id = ?1)",
            [guest_id],
        )?;
        self.exec("DELETE FROM dirs WHERE guest_id = ?1", [guest_id])?;
        Ok(())
    }

    /// Drops the directory rows of guest `guest_id` that hold no file any more.
    pub fn drop_empty_dirs(&self, guest_id: i64) -> Result<()> {
        self.exec(
            "DELETE FROM dirs WHERE guest_id = ?1
               AND NOT EXISTS (SELECT 1 FROM files WHERE files.dir = dirs.id)",
            [guest_id],
        )?;
        Ok(())
    }

    /// The id of the object row named `name`.
    pub fn object_id(&self, name: &str) -> Result<i64> {
        self.conn
            .prepare_cached("SELECT id FROM objects WHERE name = ?1")
            .and_then(|mut stmt| stmt.query_row([name], |r| r.get(0)))
            .map_err(|e| self.err(e))
    }

    /// Runs `sql` with `params` through the statement cache, wrapping errors.
    pub fn exec(&self, sql: &str, p: impl rusqlite::Params) -> Result<usize> {
        self.conn
            .prepare_cached(sql)
            .and_then(|mut stmt| stmt.execute(p))
            .map_err(|e| self.err(e))
    }

    /// Drops every row of guests not in `keep`.
    pub fn prune_guests(&self, keep: &[String]) -> Result<()> {
        let mut stmt = self
            .conn
            .prepare("SELECT id, name FROM guests")
            .map_err(|e| self.err(e))?;
        let rows: Vec<(i64, String)> = stmt
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
            .and_then(|it| it.collect())
            .map_err(|e| self.err(e))?;
        for (id, name) in rows {
            // Template trees (`@template/...`) are not guests: they stay.
            if !name.starts_with('@') && !keep.contains(&name) {
                self.drop_rows(id)?;
                self.exec("DELETE FROM guests WHERE id = ?1", params![id])?;
            }
        }
        Ok(())
    }
}

/// The stat columns `ino, nlink, size, blocks, mode, uid, gid, mtime_ns, ctime_ns` of a row,
/// starting at column `first` (the one reader of that column order).
pub(crate) fn row_stat(r: &rusqlite::Row<'_>, first: usize, dev: u64) -> rusqlite::Result<Stat> {
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

/// Rewrites an index of schema 1 (one row per file keyed by its whole path, three secondary
/// indexes) as schema 2 (directories as rows, files by directory and name, no secondary index
/// on files), keeping every row: stats, hashes, object links and the journal.
fn migrate_v1(conn: &Connection) -> rusqlite::Result<()> {
    use std::collections::{HashMap, HashSet};
    let tx = conn.unchecked_transaction()?;
    conn.execute_batch(
        "DROP INDEX IF EXISTS files_ino; DROP INDEX IF EXISTS files_group;
         DROP INDEX IF EXISTS files_object; ALTER TABLE files RENAME TO files_v1;",
    )?;
    conn.execute_batch(SCHEMA)?;
    // Original inodes shared by several paths of one guest: the hardlink groups to keep.
    let groups: HashSet<(i64, i64)> = conn
        .prepare(
            "SELECT guest_id, orig_ino FROM files_v1 GROUP BY guest_id, orig_ino
             HAVING COUNT(*) > 1",
        )?
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
        .collect::<rusqlite::Result<_>>()?;
    let mut dirs: HashMap<(i64, Vec<u8>), i64> = HashMap::new();
    let mut read = conn.prepare(
        "SELECT guest_id, path, ino, nlink, size, blocks, mtime_ns, ctime_ns, mode, uid, gid,
                marker, object_id, phash, chash, xhash, orig_ino
         FROM files_v1 ORDER BY guest_id, path",
    )?;
    let mut rows = read.query([])?;
    while let Some(r) = rows.next()? {
        let guest_id: i64 = r.get(0)?;
        let path: Vec<u8> = r.get(1)?;
        let (dir, name) = split_path(&path);
        let dir_id = match dirs.get(&(guest_id, dir.to_vec())) {
            Some(id) => *id,
            None => {
                conn.execute(
                    "INSERT INTO dirs(guest_id, path) VALUES (?1, ?2)",
                    params![guest_id, dir],
                )?;
                let id = conn.last_insert_rowid();
                dirs.insert((guest_id, dir.to_vec()), id);
                id
            }
        };
        let object: Option<i64> = r.get(12)?;
        let orig: i64 = r.get(16)?;
        let linked = object.is_some();
        let hash =
            |i| -> rusqlite::Result<Option<Vec<u8>>> { if linked { Ok(None) } else { r.get(i) } };
        conn.prepare_cached(
            "INSERT INTO files(dir, name, ino, nlink, size, blocks, mtime_ns, ctime_ns, mode, uid,
                               gid, marker, object_id, phash, chash, xhash, orig_ino)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17)",
        )?
        .execute(params![
            dir_id,
            name,
            r.get::<_, i64>(2)?,
            r.get::<_, i64>(3)?,
            r.get::<_, i64>(4)?,
            r.get::<_, i64>(5)?,
            r.get::<_, i64>(6)?,
            r.get::<_, i64>(7)?,
            r.get::<_, i64>(8)?,
            r.get::<_, i64>(9)?,
            r.get::<_, i64>(10)?,
            r.get::<_, i64>(11)?,
            object,
            hash(13)?,
            hash(14)?,
            hash(15)?,
            (linked && groups.contains(&(guest_id, orig))).then_some(orig),
        ])?;
    }
    drop(rows);
    drop(read);
    conn.execute_batch("DROP TABLE files_v1")?;
    tx.commit()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The files table of schema 1, as cowherd 0.1 wrote it.
    const V1_FILES: &str = "
        CREATE TABLE guests(id INTEGER PRIMARY KEY, name TEXT NOT NULL UNIQUE,
                            last_unify INTEGER);
        CREATE TABLE files(guest_id INTEGER NOT NULL, path BLOB NOT NULL, dev INTEGER NOT NULL,
            ino INTEGER NOT NULL, nlink INTEGER NOT NULL, size INTEGER NOT NULL,
            blocks INTEGER NOT NULL, mtime_ns INTEGER NOT NULL, ctime_ns INTEGER NOT NULL,
            mode INTEGER NOT NULL, uid INTEGER NOT NULL, gid INTEGER NOT NULL,
            marker INTEGER NOT NULL, phash BLOB, chash BLOB, xhash BLOB, object_id INTEGER,
            orig_ino INTEGER NOT NULL, orig_blocks INTEGER NOT NULL, gen INTEGER NOT NULL,
            PRIMARY KEY(guest_id, path)) WITHOUT ROWID;
        CREATE INDEX files_ino ON files(ino);
        CREATE INDEX files_group ON files(size, mode, uid, gid);
        CREATE INDEX files_object ON files(object_id);
        CREATE TABLE journal(id INTEGER PRIMARY KEY, op TEXT NOT NULL, guest_id INTEGER,
                             path BLOB, value INTEGER);
        CREATE TABLE objects(id INTEGER PRIMARY KEY, name TEXT NOT NULL UNIQUE,
            kind INTEGER NOT NULL, seq INTEGER NOT NULL, chash BLOB NOT NULL,
            xhash BLOB NOT NULL, ign_mtime INTEGER NOT NULL, size INTEGER NOT NULL,
            mode INTEGER NOT NULL, uid INTEGER NOT NULL, gid INTEGER NOT NULL,
            mtime_ns INTEGER NOT NULL, blocks INTEGER NOT NULL, ino INTEGER NOT NULL);
        CREATE INDEX objects_group ON objects(size, mode, uid, gid);
        CREATE INDEX objects_ino ON objects(ino);
        INSERT INTO objects VALUES (5, 'name.c0', 1, 0, x'00', x'00', 0, 4, 33188, 0, 0, 5, 8, 99);
        PRAGMA user_version = 1;";

    /// A row of schema 1 to write: guest, path, inode, object, original inode, content hash.
    type V1Row<'a> = (i64, &'a [u8], i64, Option<i64>, i64, Option<&'a [u8]>);
    /// A row read back: guest, path, object, content hash, original inode.
    type V2Row = (i64, Vec<u8>, Option<i64>, Option<Vec<u8>>, Option<i64>);

    #[test]
    fn a_schema_3_index_gains_the_flags_column_and_keeps_its_rows() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("index.db");
        {
            let idx = Index::open(&path).unwrap();
            idx.conn
                .execute_batch(
                    "ALTER TABLE files DROP COLUMN flags; PRAGMA user_version = 3;
                     INSERT INTO dirs(id, guest_id, path) VALUES (1, 1, x'');
                     INSERT INTO files(dir, name, ino, nlink, size, blocks, mtime_ns, ctime_ns,
                                       mode, uid, gid, marker, chash)
                     VALUES (1, x'66', 7, 1, 4, 8, 5, 6, 33188, 0, 0, 2, x'01');",
                )
                .unwrap();
        }
        let idx = Index::open(&path).unwrap();
        let row: (i64, Option<Vec<u8>>, Option<i64>) = idx
            .conn
            .query_row("SELECT ino, chash, flags FROM files", [], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?))
            })
            .unwrap();
        assert_eq!(row, (7, Some(vec![1]), None), "flags unknown until read");
        let version: i64 = idx
            .conn
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .unwrap();
        assert_eq!(version, SCHEMA_VERSION);
    }

    #[test]
    fn a_schema_1_index_is_rewritten_keeping_every_row_and_objects_lose_their_hashes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("index.db");
        {
            let conn = Connection::open(&path).unwrap();
            conn.execute_batch(V1_FILES).unwrap();
            conn.execute_batch(
                "INSERT INTO guests(id, name) VALUES (1, 'a'), (2, 'b');
                 INSERT INTO journal(op, guest_id, path, value) VALUES ('dir', 1, x'7573', 7);",
            )
            .unwrap();
            let rows: [V1Row<'_>; 5] = [
                (1, b"top", 10, None, 10, Some(b"h1")),
                (1, b"usr/bin/x", 99, Some(5), 11, Some(b"h2")),
                (1, b"usr/bin/y", 99, Some(5), 11, None),
                (1, b"usr/\xffodd/z", 98, Some(5), 12, None),
                (2, b"usr/bin/x", 99, Some(5), 13, None),
            ];
            for (g, p, ino, object, orig, chash) in rows {
                conn.execute(
                    "INSERT INTO files VALUES (?1, ?2, 1, ?3, 1, 4, 8, 5, 6, 33188, 0, 0, 2,
                                               NULL, ?4, NULL, ?5, ?6, 8, 0)",
                    params![g, p, ino, chash, object, orig],
                )
                .unwrap();
            }
        }
        let idx = Index::open(&path).unwrap();
        let got: Vec<V2Row> = idx
            .conn
            .prepare("SELECT guest_id, path, object_id, chash, orig_ino FROM paths ORDER BY 1, 2")
            .unwrap()
            .query_map([], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?))
            })
            .unwrap()
            .collect::<rusqlite::Result<_>>()
            .unwrap();
        let want: Vec<V2Row> = vec![
            // Unlinked: its hash stays; linked: hashes go, a hardlink group keeps its inode.
            (1, b"top".to_vec(), None, Some(b"h1".to_vec()), None),
            (1, b"usr/bin/x".to_vec(), Some(5), None, Some(11)),
            (1, b"usr/bin/y".to_vec(), Some(5), None, Some(11)),
            (1, b"usr/\xffodd/z".to_vec(), Some(5), None, None),
            (2, b"usr/bin/x".to_vec(), Some(5), None, None),
        ];
        assert_eq!(got, want);
        let journal: i64 = idx
            .conn
            .query_row("SELECT value FROM journal WHERE op = 'dir'", [], |r| {
                r.get(0)
            })
            .unwrap();
        assert_eq!(journal, 7);
        let object: (String, i64) = idx
            .conn
            .query_row("SELECT name, ino FROM objects WHERE id = 5", [], |r| {
                Ok((r.get(0)?, r.get(1)?))
            })
            .unwrap();
        assert_eq!(object, ("name.c0".to_string(), 99));
        let hashes: i64 = idx
            .conn
            .query_row(
                "SELECT COUNT(*) FROM pragma_table_info('objects') WHERE name LIKE '%hash'",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(hashes, 0, "objects keep no hashes since schema 3");
        let version: i64 = idx
            .conn
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .unwrap();
        assert_eq!(version, SCHEMA_VERSION);
        let old: i64 = idx
            .conn
            .query_row(
                "SELECT COUNT(*) FROM sqlite_master WHERE name IN ('files_v1', 'files_ino')",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(old, 0);
    }
}
