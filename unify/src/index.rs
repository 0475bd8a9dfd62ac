//! The SQLite index: guests, files, objects and the crash journal. A cache: losing it costs a
//! re-hash, never data.

use std::path::{Path, PathBuf};

use rusqlite::{Connection, OptionalExtension, params};

use crate::error::{Error, Result};
use crate::fsx::Stat;

/// Schema version stored in `PRAGMA user_version`.
const SCHEMA_VERSION: i64 = 1;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS guests(
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    last_unify INTEGER
);
-- One row per regular file of a guest. path: guest-relative bytes, no leading '/'.
-- phash/chash/xhash: partial content hash, full content hash, hash of all xattrs (NULL until hashed).
-- object_id: the store object this path is a link to. orig_ino/orig_blocks: the inode before linking.
CREATE TABLE IF NOT EXISTS files(
    guest_id INTEGER NOT NULL,
    path BLOB NOT NULL,
    dev INTEGER NOT NULL,
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
    phash BLOB,
    chash BLOB,
    xhash BLOB,
    object_id INTEGER,
    orig_ino INTEGER NOT NULL,
    orig_blocks INTEGER NOT NULL,
    gen INTEGER NOT NULL,
    PRIMARY KEY(guest_id, path)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS files_ino ON files(ino);
CREATE INDEX IF NOT EXISTS files_group ON files(size, mode, uid, gid);
CREATE INDEX IF NOT EXISTS files_object ON files(object_id);
-- One row per store object: store/objects/<name[0..2]>/<name>.
CREATE TABLE IF NOT EXISTS objects(
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    kind INTEGER NOT NULL,
    seq INTEGER NOT NULL,
    chash BLOB NOT NULL,
    xhash BLOB NOT NULL,
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
        conn.pragma_update(None, "cache_size", -65536)
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
                self.exec("DELETE FROM files WHERE guest_id = ?1", params![id])?;
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
