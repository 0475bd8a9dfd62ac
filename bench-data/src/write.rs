//! Writing a [`Tree`] to disk with exact modes, owners and timestamps.

use std::fs::{self, File, FileTimes, OpenOptions};
use std::io::{self, BufWriter};
use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _, fchown, lchown, symlink};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use nix::fcntl::AT_FDCWD;
use nix::sys::stat::{UtimensatFlags, utimensat};
use nix::sys::time::TimeSpec;
use xattr::FileExt as _;

use crate::content::{Scratch, write_content};
use crate::error::GenError;
use crate::tree::{Meta, Node, Tree, Xattrs};

/// Regular files and bytes written.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct Written {
    pub(crate) files: u64,
    pub(crate) bytes: u64,
}

/// The host path of guest path `path` under `root`.
fn host(root: &Path, path: &str) -> PathBuf {
    if path == "/" {
        root.to_path_buf()
    } else {
        root.join(&path[1..])
    }
}

fn meta_err<'a>(path: &'a Path, what: &'static str) -> impl FnOnce(io::Error) -> GenError + 'a {
    move |source| GenError::Metadata {
        path: path.to_path_buf(),
        what,
        source,
    }
}

fn system_time(meta: &Meta) -> SystemTime {
    let secs = u64::try_from(meta.secs).expect("timestamps are after 1970");
    SystemTime::UNIX_EPOCH + Duration::new(secs, meta.nanos)
}

/// Sets atime and mtime of `path` without following a final symlink.
fn set_times_at(path: &Path, meta: &Meta) -> Result<(), GenError> {
    let t = TimeSpec::new(meta.secs, i64::from(meta.nanos));
    utimensat(AT_FDCWD, path, &t, &t, UtimensatFlags::NoFollowSymlink)
        .map_err(|e| meta_err(path, "timestamps")(io::Error::from(e)))
}

/// Writes `tree` under `root`, which must not exist yet. Content streams use `seed`.
///
/// Order: directories, files and symlinks in path order (parents first); then hard links
/// (their targets are complete by then); then directory modes and times, deepest first, so
/// that creating entries does not disturb a parent's mtime afterwards.
pub(crate) fn write_tree(tree: &Tree, root: &Path, seed: u64) -> Result<Written, GenError> {
    let mut written = Written::default();
    let mut scratch = Scratch::new();
    let mut links = Vec::new();
    for (path, node) in &tree.entries {
        let at = host(root, path);
        match node {
            Node::Dir(meta) => {
                fs::create_dir(&at).map_err(|source| {
                    if path == "/" && source.kind() == io::ErrorKind::AlreadyExists {
                        GenError::Exists { path: at.clone() }
                    } else {
                        GenError::CreateDir {
                            path: at.clone(),
                            source,
                        }
                    }
                })?;
                lchown(&at, Some(meta.uid), Some(meta.gid)).map_err(meta_err(&at, "owner"))?;
            }
            Node::File(meta, content) => {
                let xattrs = tree.xattrs.get(path);
                written.bytes += write_file(&at, meta, xattrs, |out| {
                    write_content(content, seed, &mut scratch, out)
                })?;
                written.files += 1;
            }
            Node::Symlink(meta, target) => {
                symlink(target, &at).map_err(|source| GenError::Symlink {
                    path: at.clone(),
                    source,
                })?;
                lchown(&at, Some(meta.uid), Some(meta.gid)).map_err(meta_err(&at, "owner"))?;
                set_times_at(&at, meta)?;
            }
            Node::Hardlink(to) => links.push((at, host(root, to))),
        }
    }
    for (at, to) in links {
        fs::hard_link(&to, &at).map_err(|source| GenError::Hardlink {
            path: at.clone(),
            target: to.clone(),
            source,
        })?;
    }
    for (path, node) in tree.entries.iter().rev() {
        if let Node::Dir(meta) = node {
            let at = host(root, path);
            fs::set_permissions(&at, fs::Permissions::from_mode(meta.mode))
                .map_err(meta_err(&at, "mode"))?;
            for (name, value) in tree.xattrs.get(path).into_iter().flatten() {
                xattr::set(&at, name, value).map_err(meta_err(&at, "xattrs"))?;
            }
            set_times_at(&at, meta)?;
        }
    }
    Ok(written)
}

/// Creates `at` (which must not exist), fills it with `body` through a buffer, then sets
/// owner, mode, extended attributes and times. Returns the number of bytes written.
fn write_file(
    at: &Path,
    meta: &Meta,
    xattrs: Option<&Xattrs>,
    body: impl FnOnce(&mut BufWriter<File>) -> io::Result<u64>,
) -> Result<u64, GenError> {
    let write_err = |source| GenError::WriteFile {
        path: at.to_path_buf(),
        source,
    };
    let file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(o_nofollow())
        .open(at)
        .map_err(write_err)?;
    let mut out = BufWriter::with_capacity(64 * 1024, file);
    let size = body(&mut out).map_err(write_err)?;
    let file = out.into_inner().map_err(|e| write_err(e.into_error()))?;
    // chown clears setuid/setgid bits, so it goes before chmod.
    fchown(&file, Some(meta.uid), Some(meta.gid)).map_err(meta_err(at, "owner"))?;
    file.set_permissions(fs::Permissions::from_mode(meta.mode))
        .map_err(meta_err(at, "mode"))?;
    // After chown, which clears `security.capability`.
    for (name, value) in xattrs.into_iter().flatten() {
        file.set_xattr(name, value)
            .map_err(meta_err(at, "xattrs"))?;
    }
    let t = system_time(meta);
    file.set_times(FileTimes::new().set_accessed(t).set_modified(t))
        .map_err(meta_err(at, "timestamps"))?;
    Ok(size)
}

/// `O_NOFOLLOW`, so a file is never written through a symlink.
fn o_nofollow() -> i32 {
    nix::fcntl::OFlag::O_NOFOLLOW.bits()
}
