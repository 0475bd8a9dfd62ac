//! Candidates: the files a run may link, and the size groups worth reading (the cheapest stage).

use rusqlite::named_params;

use crate::error::Result;
use crate::guest::OpenGuest;
use crate::index::Index;
use crate::root::HostRoot;

/// Materialises the eligible files of the selected guests (`temp.cand`) and their size groups
/// (`temp.sg`).
///
/// # Algorithm
/// `temp.sel` holds the selected guest ids. `temp.cand` copies the rows of their files whose
/// marker is not private, whose size is at least `min_size`, that are not linked yet and whose
/// inode was not found carrying flags someone set (`files.flags`, read when the file was
/// hashed: a flagged file is never eligible), with the grouping mtime (`mt`: 0 under
/// `ignore_mtime`). A row's hashes count only with its flags read: those of a row whose flags
/// are unknown (hashed by a cowherd that did not read them) are left out, so it is read again. `temp.sg` keeps only the size groups
/// (size, mode, uid, gid, mt) worth reading: two distinct inodes, or an object of the same
/// metadata already in the store — or every group, with `every_file`, which reads every
/// candidate in full (`has_obj` set: no partial-hash stage).
///
/// # Errors
/// Index errors.
pub(crate) fn build_candidates(
    root: &HostRoot,
    guests: &[OpenGuest],
    min_size: u64,
    ignore_mtime: bool,
    every_file: bool,
) -> Result<()> {
    let ids: Vec<i64> = guests.iter().map(|g| g.id).collect();
    candidate_tables(&root.index, &ids, min_size, ignore_mtime, every_file)
}

/// [`build_candidates`] over an index and guest ids.
pub(crate) fn candidate_tables(
    idx: &Index,
    ids: &[i64],
    min_size: u64,
    ignore_mtime: bool,
    every_file: bool,
) -> Result<()> {
    idx.conn
        .execute_batch(
            "DROP TABLE IF EXISTS temp.sel; DROP TABLE IF EXISTS temp.cand;
             DROP TABLE IF EXISTS temp.sg; DROP TABLE IF EXISTS temp.plan;
             CREATE TEMP TABLE sel(id INTEGER PRIMARY KEY);",
        )
        .map_err(|e| idx.err(e))?;
    for id in ids {
        idx.exec("INSERT INTO sel(id) VALUES (?1)", [id])?;
    }
    let ign = ignore_mtime;
    idx.conn
        .execute(
            "CREATE TEMP TABLE cand AS
             SELECT guest_id, path, dir, name, ino, nlink, size, blocks, mode, uid, gid, mtime_ns,
                    ctime_ns, CASE WHEN :ign THEN 0 ELSE mtime_ns END AS mt, marker,
                    CASE WHEN flags IS NULL THEN NULL ELSE phash END AS phash,
                    CASE WHEN flags IS NULL THEN NULL ELSE chash END AS chash,
                    CASE WHEN flags IS NULL THEN NULL ELSE xhash END AS xhash, flags
             FROM paths
             WHERE guest_id IN (SELECT id FROM sel) AND marker > 0 AND size >= :min
               AND object_id IS NULL AND COALESCE(flags, 0) = 0",
            named_params! {":ign": ign, ":min": min_size as i64},
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
                    :every OR EXISTS(SELECT 1 FROM objects o
                           WHERE o.size = c.size AND o.mode = c.mode AND o.uid = c.uid
                             AND o.gid = c.gid AND o.ign_mtime = :ign
                             AND (:ign OR o.mtime_ns = c.mt)) AS has_obj
             FROM cand c GROUP BY size, mode, uid, gid, mt
             HAVING inodes >= 2 OR has_obj",
            named_params! {":ign": ign, ":every": every_file},
        )
        .map_err(|e| idx.err(e))?;
    Ok(())
}
