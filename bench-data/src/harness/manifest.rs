//! What every path of a guest set looks like to the guest: type, mode, owner, mtime, content
//! (BLAKE3), symlink target and extended attributes, plus the inode it is on. Comparing the
//! manifest after a tool ran with the master's tells whether the tool changed what a guest
//! sees ([`compare`]) and which paths it made share an inode ([`sharing`]).

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::{self, Read as _};
use std::os::unix::ffi::OsStrExt as _;
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};

use rayon::prelude::*;
use serde::Serialize;

/// The type of a path.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Kind {
    /// A directory.
    Dir,
    /// A regular file.
    File,
    /// A symbolic link.
    Symlink,
    /// A device node, FIFO or socket.
    Other,
}

/// The metadata a guest sees and that must be equal for two paths to share an inode.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default)]
pub struct Meta {
    /// `st_mode` without the file-type bits.
    pub mode: u32,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
    /// Modification time: seconds and nanoseconds.
    pub mtime: (i64, i64),
    /// Extended attributes `(name, value)`, sorted by name.
    pub xattrs: Vec<(Vec<u8>, Vec<u8>)>,
}

/// One path of the manifest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// Its type.
    pub kind: Kind,
    /// Its metadata.
    pub meta: Meta,
    /// `st_size`.
    pub size: u64,
    /// BLAKE3 of the content of a regular file.
    pub hash: Option<[u8; 32]>,
    /// The target of a symlink.
    pub target: Option<Vec<u8>>,
    /// `(dev, ino)`.
    pub inode: (u64, u64),
}

/// Every path of a guest set, keyed `<guest>/<path inside the guest>` (the guest's root is
/// `<guest>`). Names that are not UTF-8 are escaped (`\xff`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Manifest {
    /// The paths, in order.
    pub entries: BTreeMap<String, Entry>,
}

/// Escapes a name's bytes as text: valid UTF-8 as is, other bytes `\xNN`, backslash doubled.
fn escape(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len());
    for chunk in bytes.utf8_chunks() {
        for c in chunk.valid().chars() {
            if c == '\\' {
                out.push_str("\\\\");
            } else {
                out.push(c);
            }
        }
        for b in chunk.invalid() {
            out.push_str(&format!("\\x{b:02x}"));
        }
    }
    out
}

fn hash_file(path: &Path) -> io::Result<[u8; 32]> {
    let mut file = File::open(path)?;
    let mut hasher = blake3::Hasher::new();
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(*hasher.finalize().as_bytes())
}

fn xattrs_of(path: &Path) -> io::Result<Vec<(Vec<u8>, Vec<u8>)>> {
    let mut out = Vec::new();
    for name in xattr::list(path)? {
        if let Some(value) = xattr::get(path, &name)? {
            out.push((name.as_bytes().to_vec(), value));
        }
    }
    out.sort();
    Ok(out)
}

impl Manifest {
    /// Walks each `(name, dir)` guest (never following symlinks) and records every path;
    /// regular files are hashed once per inode, in parallel.
    ///
    /// # Errors
    ///
    /// Walking, `lstat`, reading a file, a link or extended attributes failed.
    pub fn build(guests: &[(String, PathBuf)]) -> io::Result<Manifest> {
        let mut entries = BTreeMap::new();
        // One host path per regular-file inode, to hash.
        let mut to_hash: HashMap<(u64, u64), PathBuf> = HashMap::new();
        for (name, dir) in guests {
            for item in walkdir::WalkDir::new(dir).follow_links(false) {
                let item = item?;
                let path = item.path();
                let m = item.metadata()?;
                let rel = path.strip_prefix(dir).expect("below the guest");
                let key = if rel.as_os_str().is_empty() {
                    name.clone()
                } else {
                    format!("{name}/{}", escape(rel.as_os_str().as_bytes()))
                };
                let ft = m.file_type();
                let kind = if ft.is_dir() {
                    Kind::Dir
                } else if ft.is_file() {
                    Kind::File
                } else if ft.is_symlink() {
                    Kind::Symlink
                } else {
                    Kind::Other
                };
                let inode = (m.dev(), m.ino());
                let target = if kind == Kind::Symlink {
                    Some(std::fs::read_link(path)?.as_os_str().as_bytes().to_vec())
                } else {
                    None
                };
                let xattrs = if kind == Kind::Symlink {
                    Vec::new()
                } else {
                    xattrs_of(path)?
                };
                if kind == Kind::File {
                    to_hash.entry(inode).or_insert_with(|| path.to_path_buf());
                }
                let meta = Meta {
                    mode: m.mode() & 0o7777,
                    uid: m.uid(),
                    gid: m.gid(),
                    mtime: (m.mtime(), m.mtime_nsec()),
                    xattrs,
                };
                entries.insert(
                    key,
                    Entry {
                        kind,
                        meta,
                        size: m.len(),
                        hash: None,
                        target,
                        inode,
                    },
                );
            }
        }
        let hashes: HashMap<(u64, u64), [u8; 32]> = to_hash
            .into_par_iter()
            .map(|(inode, path)| hash_file(&path).map(|h| (inode, h)))
            .collect::<io::Result<_>>()?;
        for entry in entries.values_mut() {
            if entry.kind == Kind::File {
                entry.hash = hashes.get(&entry.inode).copied();
            }
        }
        Ok(Manifest { entries })
    }

    /// Regular files (names, not inodes).
    #[must_use]
    pub fn file_names(&self) -> u64 {
        self.entries
            .values()
            .filter(|e| e.kind == Kind::File)
            .count() as u64
    }

    /// Distinct regular-file inodes and their total size.
    #[must_use]
    pub fn file_inodes(&self) -> (u64, u64) {
        let mut seen = HashMap::new();
        for e in self.entries.values().filter(|e| e.kind == Kind::File) {
            seen.insert(e.inode, e.size);
        }
        (seen.len() as u64, seen.values().sum())
    }
}

/// How a guest set after a tool ran differs from its master.
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize)]
pub struct Diff {
    /// Paths of the master that are gone.
    pub missing: u64,
    /// Paths that are not in the master (left-over temporary names, result files).
    pub extra: u64,
    /// Paths whose type changed.
    pub kind_changed: u64,
    /// Regular files whose bytes, or symlinks whose targets, changed.
    pub content_changed: u64,
    /// Non-directories (and directories' mode, owner, xattrs) whose mode, owner, mtime or
    /// extended attributes changed.
    pub meta_changed: u64,
    /// Directories whose mtime alone changed (tools that do not restore it after linking).
    pub dir_mtime_changed: u64,
    /// Directories whose size changed: the filesystem gave them another block (a temporary
    /// name that did not fit); not content, but a guest can see it in `ls -ld`.
    pub dir_size_changed: u64,
    /// A few of the differing paths, with what differs: content first.
    pub examples: Vec<String>,
    /// How many of `examples` are about metadata (they are the last ones).
    #[serde(skip)]
    meta_examples: usize,
}

impl Diff {
    /// Every path is there with its type and content (bytes, symlink target).
    #[must_use]
    pub fn content_identical(&self) -> bool {
        self.missing == 0 && self.extra == 0 && self.kind_changed == 0 && self.content_changed == 0
    }

    /// Content identical and no metadata changed (directory mtimes aside).
    #[must_use]
    pub fn identical(&self) -> bool {
        self.content_identical() && self.meta_changed == 0
    }

    /// Keeps up to 8 examples, differences in content (or missing, extra, retyped paths)
    /// before metadata ones (`meta`).
    fn example(&mut self, path: &str, what: &str, meta: bool) {
        let line = format!("{path}: {what}");
        if meta {
            self.examples.push(line);
        } else {
            // Before the first metadata example.
            let at = self.examples.len() - self.meta_examples;
            self.examples.insert(at, line);
        }
        if meta {
            self.meta_examples += 1;
        }
        if self.examples.len() > 8 {
            let last_is_meta = self.meta_examples > 0;
            self.examples.pop();
            if last_is_meta {
                self.meta_examples -= 1;
            }
        }
    }
}

/// Compares `after` with `master` path by path (inodes are not compared).
#[must_use]
pub fn compare(master: &Manifest, after: &Manifest) -> Diff {
    let mut diff = Diff::default();
    for (path, m) in &master.entries {
        let Some(a) = after.entries.get(path) else {
            diff.missing += 1;
            diff.example(path, "missing", false);
            continue;
        };
        if a.kind != m.kind {
            diff.kind_changed += 1;
            diff.example(path, "type changed", false);
            continue;
        }
        if m.kind == Kind::Dir && a.size != m.size {
            diff.dir_size_changed += 1;
            diff.example(path, "directory size changed", true);
        } else if a.hash != m.hash || a.target != m.target || a.size != m.size {
            diff.content_changed += 1;
            diff.example(path, "content changed", false);
        }
        if a.meta != m.meta {
            let only_mtime = Meta {
                mtime: m.meta.mtime,
                ..a.meta.clone()
            } == m.meta;
            if m.kind == Kind::Dir && only_mtime {
                diff.dir_mtime_changed += 1;
            } else {
                diff.meta_changed += 1;
                let what = if a.meta.xattrs != m.meta.xattrs {
                    "xattrs changed"
                } else if (a.meta.uid, a.meta.gid) != (m.meta.uid, m.meta.gid) {
                    "owner changed"
                } else if a.meta.mode != m.meta.mode {
                    "mode changed"
                } else {
                    "mtime changed"
                };
                diff.example(path, what, true);
            }
        }
    }
    for path in after.entries.keys() {
        if !master.entries.contains_key(path) {
            diff.extra += 1;
            diff.example(path, "not in the master", false);
        }
    }
    diff
}

/// Which paths a tool made share an inode.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Sharing {
    /// Regular-file paths now on an inode shared with paths that were on another inode in the
    /// master: per shared inode, its paths minus those of its largest master inode (the
    /// fewest paths a tool can have replaced to get there).
    pub linked_paths: u64,
    /// Regular-file paths now sharing an inode with a path whose owner, mode, mtime or
    /// extended attributes differed in the master (all paths of such an inode count).
    pub wrong_links: u64,
    /// Regular-file inodes after the run.
    pub inodes: u64,
}

/// The sharing `after` shows compared with `master` (paths not in the master are ignored).
#[must_use]
pub fn sharing(master: &Manifest, after: &Manifest) -> Sharing {
    let mut groups: HashMap<(u64, u64), Vec<&str>> = HashMap::new();
    for (path, e) in &after.entries {
        if e.kind == Kind::File {
            groups.entry(e.inode).or_default().push(path);
        }
    }
    let mut out = Sharing {
        inodes: groups.len() as u64,
        ..Sharing::default()
    };
    for paths in groups.values().filter(|p| p.len() > 1) {
        let origins: Vec<&Entry> = paths
            .iter()
            .filter_map(|p| master.entries.get(*p))
            .filter(|e| e.kind == Kind::File)
            .collect();
        let mut per_inode: HashMap<(u64, u64), u64> = HashMap::new();
        for e in &origins {
            *per_inode.entry(e.inode).or_default() += 1;
        }
        let largest = per_inode.values().copied().max().unwrap_or(0);
        out.linked_paths += origins.len() as u64 - largest;
        if let Some(first) = origins.first()
            && origins.iter().any(|e| e.meta != first.meta)
        {
            out.wrong_links += origins.len() as u64;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::escape;

    #[test]
    fn names_are_escaped_unambiguously() {
        assert_eq!(escape(b"usr/bin/ls"), "usr/bin/ls");
        assert_eq!(escape(b"a\\b"), "a\\\\b");
        assert_eq!(escape(b"caf\xe9"), "caf\\xe9");
    }
}
