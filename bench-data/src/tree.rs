//! The in-memory model of one guest tree: guest-absolute paths mapped to entries.

use std::collections::BTreeMap;
use std::sync::Arc;

use crate::content::Body;

/// Owner, mode and timestamp of one inode (atime is set equal to mtime).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Meta {
    /// Permission bits including setuid/setgid/sticky (no file-type bits).
    pub(crate) mode: u32,
    pub(crate) uid: u32,
    pub(crate) gid: u32,
    /// Seconds since the epoch.
    pub(crate) secs: i64,
    /// Nanoseconds, `< 1e9`.
    pub(crate) nanos: u32,
}

impl Meta {
    /// Root-owned with `mode`, at `secs`.`nanos`.
    pub(crate) const fn root(mode: u32, secs: i64, nanos: u32) -> Self {
        Self {
            mode,
            uid: 0,
            gid: 0,
            secs,
            nanos,
        }
    }

    /// The same metadata owned by `uid:gid`.
    pub(crate) const fn owned(self, uid: u32, gid: u32) -> Self {
        Self { uid, gid, ..self }
    }

    /// The same metadata with permission bits `mode`.
    pub(crate) const fn mode(self, mode: u32) -> Self {
        Self { mode, ..self }
    }

    /// The same metadata at another time.
    pub(crate) const fn at(self, secs: i64, nanos: u32) -> Self {
        Self {
            secs,
            nanos,
            ..self
        }
    }
}

/// How a regular file's bytes are produced: the body kind plus the key and variant its random
/// stream is derived from. Equal `(key, variant, body)` means equal bytes, whatever the path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Content {
    /// Stream key; usually the file's own path, a shared name for files that are duplicates.
    pub(crate) key: Arc<str>,
    /// Version of the content: 0 for the base tree, other values for per-guest divergence.
    pub(crate) variant: u64,
    pub(crate) body: Body,
}

/// What lives at a path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Node {
    Dir(Meta),
    File(Meta, Content),
    Symlink(Meta, String),
    /// Another name of the regular file at the given guest path (same inode).
    Hardlink(String),
}

/// Extended attributes of one inode: `(name, value)` pairs sorted by name.
pub(crate) type Xattrs = Vec<(String, Arc<[u8]>)>;

/// A guest tree. Paths are guest-absolute (`/usr/bin/ls`), `/` is the root directory.
///
/// The map is ordered, so a directory always comes before everything below it.
#[derive(Debug, Clone)]
pub(crate) struct Tree {
    pub(crate) entries: BTreeMap<String, Node>,
    /// Metadata of directories created implicitly as parents.
    pub(crate) dir_meta: Meta,
    /// Extended attributes of regular files and directories, by path (absent: none).
    pub(crate) xattrs: BTreeMap<String, Xattrs>,
}

impl Tree {
    /// An empty tree holding only `/` with `dir_meta`.
    pub(crate) fn new(dir_meta: Meta) -> Self {
        let mut entries = BTreeMap::new();
        entries.insert("/".to_owned(), Node::Dir(dir_meta));
        Self {
            entries,
            dir_meta,
            xattrs: BTreeMap::new(),
        }
    }

    /// Creates the missing parents of `path` with the default directory metadata.
    fn parents(&mut self, path: &str) {
        let mut end = 0;
        while let Some(i) = path[end + 1..].find('/') {
            end += 1 + i;
            let parent = &path[..end];
            match self.entries.get(parent) {
                None => {
                    self.entries
                        .insert(parent.to_owned(), Node::Dir(self.dir_meta));
                }
                Some(node) => debug_assert!(
                    matches!(node, Node::Dir(_)),
                    "{parent} is not a directory (adding {path})"
                ),
            }
        }
    }

    /// Inserts (or replaces) `path`, creating its parents. A replaced entry is a new inode:
    /// the extended attributes of the old one are dropped.
    pub(crate) fn put(&mut self, path: &str, node: Node) {
        debug_assert!(path.starts_with('/') && !path.ends_with('/') && !path.contains("//"));
        self.parents(path);
        self.xattrs.remove(path);
        self.entries.insert(path.to_owned(), node);
    }

    /// Sets extended attribute `name` of the regular file or directory at `path`.
    pub(crate) fn set_xattr(&mut self, path: &str, name: &str, value: &[u8]) {
        debug_assert!(matches!(
            self.entries.get(path),
            Some(Node::File(..) | Node::Dir(_))
        ));
        let list = self.xattrs.entry(path.to_owned()).or_default();
        match list.binary_search_by(|(n, _)| n.as_str().cmp(name)) {
            Ok(i) => list[i].1 = Arc::from(value),
            Err(i) => list.insert(i, (name.to_owned(), Arc::from(value))),
        }
    }

    /// Inserts a directory with explicit metadata.
    pub(crate) fn dir(&mut self, path: &str, meta: Meta) {
        self.put(path, Node::Dir(meta));
    }

    /// Inserts a regular file whose stream key is its own path, at variant 0.
    pub(crate) fn file(&mut self, path: &str, meta: Meta, body: Body) {
        self.keyed(path, meta, path, 0, body);
    }

    /// Inserts a regular file whose content comes from `key` and `variant`.
    pub(crate) fn keyed(&mut self, path: &str, meta: Meta, key: &str, variant: u64, body: Body) {
        let content = Content {
            key: Arc::from(key),
            variant,
            body,
        };
        self.put(path, Node::File(meta, content));
    }

    /// Inserts a symbolic link to `target`.
    pub(crate) fn symlink(&mut self, path: &str, target: &str, meta: Meta) {
        self.put(path, Node::Symlink(meta, target.to_owned()));
    }

    /// Makes `path` another name of the regular file at `to`.
    pub(crate) fn hardlink(&mut self, path: &str, to: &str) {
        debug_assert!(matches!(self.entries.get(to), Some(Node::File(..))));
        self.put(path, Node::Hardlink(to.to_owned()));
    }

    /// The regular file at `path`, if any.
    pub(crate) fn file_mut(&mut self, path: &str) -> Option<(&mut Meta, &mut Content)> {
        match self.entries.get_mut(path) {
            Some(Node::File(meta, content)) => Some((meta, content)),
            _ => None,
        }
    }

    /// Number of regular files (inodes, not names).
    pub(crate) fn regular_files(&self) -> usize {
        self.entries
            .values()
            .filter(|n| matches!(n, Node::File(..)))
            .count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parents_are_created_and_ordered_first() {
        let m = Meta::root(0o755, 1, 0);
        let mut t = Tree::new(m);
        t.file("/usr/lib/x/a.py", m.mode(0o644), Body::Empty);
        t.file("/usr-x", m.mode(0o644), Body::Empty);
        let keys: Vec<&str> = t.entries.keys().map(String::as_str).collect();
        assert_eq!(
            keys,
            [
                "/",
                "/usr",
                "/usr-x",
                "/usr/lib",
                "/usr/lib/x",
                "/usr/lib/x/a.py"
            ]
        );
        t.set_xattr("/usr-x", "user.b", b"2");
        t.set_xattr("/usr-x", "user.a", b"1");
        t.set_xattr("/usr-x", "user.b", b"3");
        let names: Vec<(&str, &[u8])> = t.xattrs["/usr-x"]
            .iter()
            .map(|(n, v)| (n.as_str(), &v[..]))
            .collect();
        assert_eq!(names, [("user.a", &b"1"[..]), ("user.b", &b"3"[..])]);
        t.file("/usr-x", m.mode(0o644), Body::Empty);
        assert!(
            !t.xattrs.contains_key("/usr-x"),
            "a new inode has no xattrs"
        );
    }
}
