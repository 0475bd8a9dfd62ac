//! Shared fixture tools for cowherd's integration tests.
//!
//! Everything here works on real parts: real files, real xattrs (capabilities, ACLs), real device
//! nodes, real tmpfs mounts and real inode flags. Nothing is mocked. Each test binary uses a
//! different subset of these tools, hence the `dead_code` allowance.
#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::ffi::OsStr;
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

use nix::fcntl::AT_FDCWD;
use nix::mount::{MntFlags, MsFlags};
use nix::sys::stat::{Mode, SFlag, UtimensatFlags};
use nix::sys::time::TimeSpec;
use rand::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::Value;

/// The mtime every fixture entry gets unless a test asks for another one, so that files built
/// the same way in different guests are identical in content *and* metadata.
pub const DEFAULT_MTIME: (i64, i64) = (1_600_000_000, 123_456_789);

// ---------------------------------------------------------------------------------------------
// Scratch directories and mounts
// ---------------------------------------------------------------------------------------------

/// A temporary directory under `CARGO_TARGET_TMPDIR` (the repository's filesystem, where the
/// cowherd root and the guests must live together).
///
/// On drop it clears `FS_IMMUTABLE_FL` everywhere below it (immutable store objects could not be
/// deleted otherwise) and removes it. Set `COWHERD_TEST_KEEP=1` to keep it for inspection.
pub struct Scratch {
    dir: Option<tempfile::TempDir>,
    path: PathBuf,
}

impl Scratch {
    pub fn new(tag: &str) -> Self {
        let base = Path::new(env!("CARGO_TARGET_TMPDIR"));
        fs::create_dir_all(base).expect("create CARGO_TARGET_TMPDIR");
        let dir = tempfile::Builder::new()
            .prefix(&format!("{tag}-"))
            .tempdir_in(base)
            .expect("create scratch dir");
        let path = dir.path().to_path_buf();
        Scratch {
            dir: Some(dir),
            path,
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn join(&self, rel: impl AsRef<Path>) -> PathBuf {
        self.path.join(rel)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let Some(dir) = self.dir.take() else { return };
        if std::env::var_os("COWHERD_TEST_KEEP").is_some() {
            let kept = dir.keep();
            eprintln!("COWHERD_TEST_KEEP: kept {}", kept.display());
            return;
        }
        clear_immutable(&self.path);
        if let Err(e) = dir.close() {
            eprintln!("warning: could not remove {}: {e}", self.path.display());
        }
    }
}

/// `chattr -R -f -i DIR`: removes the immutable flag from everything below `dir` (chattr skips
/// symlinks, fifos and device nodes).
pub fn clear_immutable(dir: &Path) {
    let _ = std::process::Command::new("chattr")
        .args(["-R", "-f", "-i"])
        .arg(dir)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status();
}

/// A tmpfs mounted at `target` for as long as the guard lives; unmounted (lazily) on drop, also
/// when the test panics.
pub struct TmpfsMount {
    target: PathBuf,
}

impl TmpfsMount {
    pub fn new(target: &Path) -> Self {
        fs::create_dir_all(target).expect("create mount point");
        nix::mount::mount(
            Some("tmpfs"),
            target,
            Some("tmpfs"),
            MsFlags::MS_NOSUID,
            Some("size=64m,mode=0755"),
        )
        .unwrap_or_else(|e| panic!("mount tmpfs on {}: {e}", target.display()));
        TmpfsMount {
            target: target.to_path_buf(),
        }
    }

    pub fn path(&self) -> &Path {
        &self.target
    }
}

impl Drop for TmpfsMount {
    fn drop(&mut self) {
        if let Err(e) = nix::mount::umount2(&self.target, MntFlags::MNT_DETACH) {
            eprintln!("warning: umount {}: {e}", self.target.display());
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Tree building
// ---------------------------------------------------------------------------------------------

/// Kind of device node for [`TreeBuilder::device`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dev {
    Char,
    Block,
}

/// Builds a directory tree with exact metadata. Paths are relative to the builder's root and
/// given as raw bytes (`&str`, `b"..."` and `Vec<u8>` all work), so names may be non-UTF-8 or
/// contain newlines. Missing parent directories are created with mode 0755.
///
/// Every entry created by the builder gets `DEFAULT_MTIME`, owner 0:0 and mode 0644 (files) /
/// 0755 (directories) unless said otherwise. Directories registered with `read_only_dir` get mode
/// 0555 in `finish()` (also run on drop), i.e. after everything was put into them.
pub struct TreeBuilder {
    root: PathBuf,
    read_only: Vec<PathBuf>,
    finished: bool,
}

impl TreeBuilder {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        let root = root.into();
        fs::create_dir_all(&root).unwrap_or_else(|e| panic!("mkdir {}: {e}", root.display()));
        TreeBuilder {
            root,
            read_only: Vec::new(),
            finished: false,
        }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Absolute path of a builder-relative name.
    pub fn path(&self, rel: impl AsRef<[u8]>) -> PathBuf {
        let rel = rel.as_ref();
        let rel = rel.strip_prefix(b"/").unwrap_or(rel);
        self.root.join(OsStr::from_bytes(rel))
    }

    fn parent(&self, p: &Path) {
        if let Some(parent) = p.parent() {
            fs::create_dir_all(parent)
                .unwrap_or_else(|e| panic!("mkdir -p {}: {e}", parent.display()));
        }
    }

    /// Regular file, mode 0644, owner 0:0, `DEFAULT_MTIME`.
    pub fn file(&mut self, rel: impl AsRef<[u8]>, bytes: &[u8]) -> &mut Self {
        self.file_with(rel, bytes, 0o644, 0, 0, DEFAULT_MTIME)
    }

    /// Regular file with explicit metadata. `mode` may carry setuid/setgid/sticky bits: it is
    /// applied after the chown (which would clear them).
    pub fn file_with(
        &mut self,
        rel: impl AsRef<[u8]>,
        bytes: &[u8],
        mode: u32,
        uid: u32,
        gid: u32,
        mtime: (i64, i64),
    ) -> &mut Self {
        let p = self.path(rel);
        self.parent(&p);
        let mut f = File::create(&p).unwrap_or_else(|e| panic!("create {}: {e}", p.display()));
        f.write_all(bytes)
            .unwrap_or_else(|e| panic!("write {}: {e}", p.display()));
        drop(f);
        set_owner_mode(&p, uid, gid, mode);
        set_mtime(&p, mtime);
        self
    }

    /// Directory with the given mode (parents 0755).
    pub fn dir(&mut self, rel: impl AsRef<[u8]>, mode: u32) -> &mut Self {
        let p = self.path(rel);
        fs::create_dir_all(&p).unwrap_or_else(|e| panic!("mkdir {}: {e}", p.display()));
        fs::set_permissions(&p, fs::Permissions::from_mode(mode))
            .unwrap_or_else(|e| panic!("chmod {}: {e}", p.display()));
        self
    }

    /// Directory that gets mode 0555 in `finish()`, after it was filled.
    pub fn read_only_dir(&mut self, rel: impl AsRef<[u8]>) -> &mut Self {
        let p = self.path(rel);
        fs::create_dir_all(&p).unwrap_or_else(|e| panic!("mkdir {}: {e}", p.display()));
        self.read_only.push(p);
        self
    }

    /// Symlink `rel -> target` (target stored verbatim, never resolved), `DEFAULT_MTIME`.
    pub fn symlink(&mut self, rel: impl AsRef<[u8]>, target: impl AsRef<[u8]>) -> &mut Self {
        let p = self.path(rel);
        self.parent(&p);
        std::os::unix::fs::symlink(OsStr::from_bytes(target.as_ref()), &p)
            .unwrap_or_else(|e| panic!("symlink {}: {e}", p.display()));
        set_mtime(&p, DEFAULT_MTIME);
        self
    }

    /// Hard link `new` to the existing `existing`.
    pub fn hardlink(&mut self, existing: impl AsRef<[u8]>, new: impl AsRef<[u8]>) -> &mut Self {
        let (old, new) = (self.path(existing), self.path(new));
        self.parent(&new);
        fs::hard_link(&old, &new)
            .unwrap_or_else(|e| panic!("link {} {}: {e}", old.display(), new.display()));
        self
    }

    /// Extended attribute on `rel` (not following symlinks).
    pub fn xattr(
        &mut self,
        rel: impl AsRef<[u8]>,
        name: impl AsRef<[u8]>,
        value: &[u8],
    ) -> &mut Self {
        let p = self.path(rel);
        let name = OsStr::from_bytes(name.as_ref());
        xattr::set(&p, name, value)
            .unwrap_or_else(|e| panic!("setxattr {} {name:?}: {e}", p.display()));
        self
    }

    /// `security.capability` = cap_net_raw+ep.
    pub fn cap_net_raw(&mut self, rel: impl AsRef<[u8]>) -> &mut Self {
        self.xattr(rel, "security.capability", &cap_net_raw_ep())
    }

    /// `system.posix_acl_access` = user::rw- user:1000:r-- group::r-- mask::r-- other::r--.
    pub fn acl(&mut self, rel: impl AsRef<[u8]>) -> &mut Self {
        self.xattr(rel, "system.posix_acl_access", &sample_acl())
    }

    /// Named pipe, mode 0644.
    pub fn fifo(&mut self, rel: impl AsRef<[u8]>) -> &mut Self {
        self.node(rel, SFlag::S_IFIFO, 0o644, 0)
    }

    /// Character or block device node, mode 0660.
    pub fn device(
        &mut self,
        rel: impl AsRef<[u8]>,
        kind: Dev,
        major: u64,
        minor: u64,
    ) -> &mut Self {
        let flag = match kind {
            Dev::Char => SFlag::S_IFCHR,
            Dev::Block => SFlag::S_IFBLK,
        };
        self.node(rel, flag, 0o660, nix::sys::stat::makedev(major, minor))
    }

    /// A special file (fifo or device) with `mode` (umask ignored) and the default mtime.
    fn node(&mut self, rel: impl AsRef<[u8]>, kind: SFlag, mode: u32, dev: u64) -> &mut Self {
        let p = self.path(rel);
        self.parent(&p);
        nix::sys::stat::mknod(&p, kind, Mode::from_bits_truncate(mode), dev)
            .unwrap_or_else(|e| panic!("mknod {}: {e}", p.display()));
        fs::set_permissions(&p, fs::Permissions::from_mode(mode)).unwrap();
        set_mtime(&p, DEFAULT_MTIME);
        self
    }

    /// Sparse regular file of `size` bytes: a hole everywhere except `data` written at `offset`.
    pub fn sparse(
        &mut self,
        rel: impl AsRef<[u8]>,
        size: u64,
        offset: u64,
        data: &[u8],
    ) -> &mut Self {
        let p = self.path(rel);
        self.parent(&p);
        let f = File::create(&p).unwrap_or_else(|e| panic!("create {}: {e}", p.display()));
        f.set_len(size).unwrap();
        f.write_all_at(data, offset).unwrap();
        drop(f);
        set_owner_mode(&p, 0, 0, 0o644);
        set_mtime(&p, DEFAULT_MTIME);
        self
    }

    /// Set the mtime of `rel` (not following symlinks).
    pub fn mtime(&mut self, rel: impl AsRef<[u8]>, secs: i64, nsecs: i64) -> &mut Self {
        set_mtime(&self.path(rel), (secs, nsecs));
        self
    }

    /// Owner and mode of an existing entry (mode applied after the chown).
    pub fn owner_mode(
        &mut self,
        rel: impl AsRef<[u8]>,
        uid: u32,
        gid: u32,
        mode: u32,
    ) -> &mut Self {
        set_owner_mode(&self.path(rel), uid, gid, mode);
        self
    }

    /// Apply the deferred read-only modes (deepest first). Idempotent; also run on drop.
    pub fn finish(&mut self) -> &mut Self {
        if !self.finished {
            self.finished = true;
            let mut dirs = std::mem::take(&mut self.read_only);
            dirs.sort_by_key(|d| std::cmp::Reverse(d.components().count()));
            for d in dirs {
                fs::set_permissions(&d, fs::Permissions::from_mode(0o555))
                    .unwrap_or_else(|e| panic!("chmod 0555 {}: {e}", d.display()));
            }
        }
        self
    }
}

impl Drop for TreeBuilder {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            self.finish();
        }
    }
}

/// lchown + chmod (chmod after chown, which clears setuid bits).
pub fn set_owner_mode(p: &Path, uid: u32, gid: u32, mode: u32) {
    std::os::unix::fs::lchown(p, Some(uid), Some(gid))
        .unwrap_or_else(|e| panic!("chown {}: {e}", p.display()));
    fs::set_permissions(p, fs::Permissions::from_mode(mode))
        .unwrap_or_else(|e| panic!("chmod {}: {e}", p.display()));
}

/// utimensat(AT_SYMLINK_NOFOLLOW): set mtime, leave atime alone.
pub fn set_mtime(p: &Path, (secs, nsecs): (i64, i64)) {
    nix::sys::stat::utimensat(
        AT_FDCWD,
        p,
        &TimeSpec::UTIME_OMIT,
        &TimeSpec::new(secs, nsecs),
        UtimensatFlags::NoFollowSymlink,
    )
    .unwrap_or_else(|e| panic!("utimensat {}: {e}", p.display()));
}

/// mtime of `p` (not following symlinks) as (sec, nsec).
pub fn mtime_of(p: &Path) -> (i64, i64) {
    let m = fs::symlink_metadata(p).unwrap_or_else(|e| panic!("lstat {}: {e}", p.display()));
    (m.mtime(), m.mtime_nsec())
}

/// Overwrite the content of an existing file in place (same inode, no truncation) and then put
/// its mtime back, so that only ctime tells that it changed.
pub fn overwrite_keep_mtime(p: &Path, bytes: &[u8]) {
    let before = mtime_of(p);
    let f = OpenOptions::new()
        .write(true)
        .open(p)
        .unwrap_or_else(|e| panic!("open {} for writing: {e}", p.display()));
    f.write_all_at(bytes, 0).unwrap();
    f.sync_all().unwrap();
    drop(f);
    set_mtime(p, before);
}

/// Replace `p` by a copy with the same content, mode, owner, xattrs and mtime (a new inode, put
/// in place by rename; the directory's mtime is put back too): what a guest sees does not
/// change, but unify has work to do again.
pub fn rewrite_as_new_inode(p: &Path) {
    let m = fs::symlink_metadata(p).unwrap();
    let dir = p.parent().unwrap();
    let dir_mtime = mtime_of(dir);
    let tmp = p.with_file_name(".test-rewrite.tmp");
    fs::write(&tmp, fs::read(p).unwrap()).unwrap();
    set_owner_mode(&tmp, m.uid(), m.gid(), m.mode() & 0o7777);
    for name in xattr::list(p).unwrap() {
        if let Some(v) = xattr::get(p, &name).unwrap() {
            xattr::set(&tmp, &name, &v).unwrap();
        }
    }
    set_mtime(&tmp, (m.mtime(), m.mtime_nsec()));
    fs::rename(&tmp, p).unwrap();
    set_mtime(dir, dir_mtime);
}

/// Deterministic pseudo-random bytes for `tag` (same tag → same bytes, in every guest).
pub fn content(tag: &str, len: usize) -> Vec<u8> {
    let seed: [u8; 32] = *blake3::hash(tag.as_bytes()).as_bytes();
    let mut rng = ChaCha8Rng::from_seed(seed);
    let mut v = vec![0u8; len];
    rng.fill_bytes(&mut v);
    v
}

/// A VFS_CAP_REVISION_2 `security.capability` blob for `cap_net_raw+ep` (what
/// `setcap cap_net_raw+ep` writes on a ping binary).
pub fn cap_net_raw_ep() -> Vec<u8> {
    const VFS_CAP_REVISION_2: u32 = 0x0200_0000;
    const VFS_CAP_FLAGS_EFFECTIVE: u32 = 0x0000_0001;
    const CAP_NET_RAW: u32 = 13;
    let words = [
        VFS_CAP_REVISION_2 | VFS_CAP_FLAGS_EFFECTIVE,
        1 << CAP_NET_RAW, // permitted[0]
        0,                // inheritable[0]
        0,                // permitted[1]
        0,                // inheritable[1]
    ];
    words.iter().flat_map(|w| w.to_le_bytes()).collect()
}

/// A `system.posix_acl_access` blob (POSIX_ACL_XATTR_VERSION 2):
/// user::rw- user:1000:r-- group::r-- mask::r-- other::r--.
pub fn sample_acl() -> Vec<u8> {
    const UNDEFINED: u32 = u32::MAX;
    // (tag, perm, id); tags: USER_OBJ 1, USER 2, GROUP_OBJ 4, GROUP 8, MASK 0x10, OTHER 0x20.
    let entries: [(u16, u16, u32); 5] = [
        (0x01, 6, UNDEFINED),
        (0x02, 4, 1000),
        (0x04, 4, UNDEFINED),
        (0x10, 4, UNDEFINED),
        (0x20, 4, UNDEFINED),
    ];
    let mut v = 2u32.to_le_bytes().to_vec();
    for (tag, perm, id) in entries {
        v.extend_from_slice(&tag.to_le_bytes());
        v.extend_from_slice(&perm.to_le_bytes());
        v.extend_from_slice(&id.to_le_bytes());
    }
    v
}

// ---------------------------------------------------------------------------------------------
// The rich guest
// ---------------------------------------------------------------------------------------------

/// Paths of a `rich_guest` and what the default policy must do with them.
pub mod rich {
    /// Identical (content + every attribute) in every variant and marked `cow`: after
    /// `unify --all` each of these is one shared inode across all guests.
    pub const SHARED: &[&[u8]] = &[
        b"usr/bin/tool-a",
        b"usr/bin/tool-b",
        b"usr/bin/dash",
        b"usr/bin/su",   // setuid root
        b"usr/bin/ping", // security.capability cap_net_raw+ep
        b"usr/lib/big.bin",
        b"usr/lib/sparse.img",
        b"usr/lib/hl/a", // hardlink group a, b, c
        b"usr/lib/hl/b",
        b"usr/lib/hl/c",
        b"usr/lib/libacl.so",   // system.posix_acl_access
        b"usr/lib/trusted.dat", // trusted.* xattr
        b"usr/share/doc/dup-1", // equal to dup-2 inside the guest too
        b"usr/share/doc/dup-2",
        b"usr/share/names/caf\xe9.txt",
        b"usr/share/names/new\nline.txt",
        b"usr/share/names/\xff\xfe",
        b"usr/share/ro/dup-1", // in a 0555 directory
        b"usr/share/ro/dup-2",
        b"usr/share/same/base.txt",
        b"usr/share/same/owner.txt",
        b"usr/share/same/group.txt",
        b"usr/share/same/mode.txt",
        b"usr/share/same/mtime.txt",
        b"usr/share/same/xattr.txt",
        b"usr/share/same/xattr-value.txt",
    ];

    /// Equal bytes, each differing from `base.txt` in exactly one attribute (owner, group, mode,
    /// mtime by 1 ns, presence of a user xattr, value of a user xattr): no two of them may share
    /// an inode, in any guest.
    pub const ALMOST_EQUAL: &[&[u8]] = &[
        b"usr/share/same/base.txt",
        b"usr/share/same/owner.txt",
        b"usr/share/same/group.txt",
        b"usr/share/same/mode.txt",
        b"usr/share/same/mtime.txt",
        b"usr/share/same/xattr.txt",
        b"usr/share/same/xattr-value.txt",
    ];

    /// Identical in every variant but private by the default policy (/etc, /var, /dev, dpkg
    /// conffiles, a hardlink group with mixed markers): never shared across guests.
    pub const PRIVATE_SAME: &[&[u8]] = &[
        b"etc/passwd",
        b"etc/services",
        b"etc/shadow",
        b"etc/mixed.conf",
        b"usr/share/mixed.conf", // hardlinked to etc/mixed.conf: mixed markers → private
        b"usr/share/foo/foo.conf", // listed in var/lib/dpkg/info/foo.conffiles
        b"var/lib/dpkg/status",
        b"var/lib/dpkg/info/foo.conffiles",
    ];

    /// Empty regular files: never shared, not even inside one guest.
    pub const EMPTY: &[&[u8]] = &[
        b"usr/share/empty/empty-1",
        b"usr/share/empty/empty-2",
        b"etc/machine-id",
        b"var/log/empty.log",
    ];

    /// Same path, different bytes in each variant.
    pub const PER_VARIANT: &[&[u8]] = &[b"usr/bin/variant-tool", b"etc/hostname"];
}

/// Build a rich guest tree in `dir`. Variants differ only in a few files (`rich::PER_VARIANT`
/// and `usr/local/variant-<n>/…`), so guests built from different variants are near-identical.
///
/// Contents: relative, absolute (pointing at the host: /etc/passwd, /usr/lib), `../../..` and
/// dangling symlinks; a hardlink group of three; a setuid root file; a file with
/// security.capability; a file with a POSIX ACL; a file with a trusted.* xattr; files that differ
/// from an otherwise equal file only in owner / group / mode / mtime / a user xattr; a sparse file
/// (1 MiB hole + data); a fifo; char and block devices; empty files; non-UTF-8 and newline names;
/// a read-only (0555) directory holding duplicable files; private /etc, /var, /dev files; cow
/// /usr files; a 1.5 MiB file; a hardlink group spanning /etc and /usr; a dpkg conffile in /usr.
pub fn rich_guest(dir: &Path, variant: u32) {
    let mut t = TreeBuilder::new(dir);
    t.dir("", 0o755);
    for d in [
        "etc",
        "usr",
        "usr/bin",
        "usr/lib",
        "usr/share",
        "var",
        "dev",
    ] {
        t.dir(d, 0o755);
    }

    // /usr: cow
    t.file_with(
        "usr/bin/tool-a",
        &content("tool-a", 20 * 1024),
        0o755,
        0,
        0,
        DEFAULT_MTIME,
    )
    .file_with(
        "usr/bin/tool-b",
        &content("tool-b", 5000),
        0o755,
        0,
        0,
        DEFAULT_MTIME,
    )
    .file_with(
        "usr/bin/dash",
        &content("dash", 30 * 1024),
        0o755,
        0,
        0,
        DEFAULT_MTIME,
    )
    .symlink("usr/bin/sh", "dash")
    .file_with(
        "usr/bin/su",
        &content("su", 12 * 1024),
        0o4755,
        0,
        0,
        DEFAULT_MTIME,
    )
    .file_with(
        "usr/bin/ping",
        &content("ping", 9 * 1024),
        0o755,
        0,
        0,
        DEFAULT_MTIME,
    )
    .cap_net_raw("usr/bin/ping")
    .file_with(
        "usr/bin/variant-tool",
        &content(&format!("variant-tool-{variant}"), 8192),
        0o755,
        0,
        0,
        DEFAULT_MTIME,
    )
    .file("usr/lib/big.bin", &content("big", 1536 * 1024 + 3))
    .sparse(
        "usr/lib/sparse.img",
        (1 << 20) + 4096,
        1 << 20,
        &content("sparse", 4096),
    )
    .file("usr/lib/hl/a", &content("hardlinked", 6 * 1024))
    .hardlink("usr/lib/hl/a", "usr/lib/hl/b")
    .hardlink("usr/lib/hl/a", "usr/lib/hl/c")
    .file("usr/lib/libacl.so", &content("libacl", 7 * 1024))
    .acl("usr/lib/libacl.so")
    .mtime("usr/lib/libacl.so", DEFAULT_MTIME.0, DEFAULT_MTIME.1)
    .file("usr/lib/trusted.dat", &content("trusted", 3 * 1024))
    .xattr("usr/lib/trusted.dat", "trusted.cowherd-test", b"t")
    .symlink("usr/lib/passwd-link", "/etc/passwd")
    .symlink("usr/lib/up", "../../..")
    .symlink("usr/lib/dangling", "/nonexistent/cowherd/dangling")
    .symlink("usr/lib/host-lib", "/usr/lib")
    .file("usr/share/doc/dup-1", &content("doc-dup", 10 * 1024))
    .file("usr/share/doc/dup-2", &content("doc-dup", 10 * 1024))
    .file(b"usr/share/names/caf\xe9.txt", &content("latin1", 4000))
    .file(b"usr/share/names/new\nline.txt", &content("newline", 4100))
    .file(b"usr/share/names/\xff\xfe", &content("ff-fe", 4200))
    .fifo("usr/share/fifo")
    .device("usr/share/devices/null", Dev::Char, 1, 3)
    .device("usr/share/devices/loop0", Dev::Block, 7, 0)
    .file("usr/share/empty/empty-1", b"")
    .file("usr/share/empty/empty-2", b"");

    // Equal bytes, one attribute apart.
    let same = content("same", 4096);
    let (s, ns) = DEFAULT_MTIME;
    t.file_with("usr/share/same/base.txt", &same, 0o644, 0, 0, (s, ns))
        .file_with("usr/share/same/owner.txt", &same, 0o644, 1000, 0, (s, ns))
        .file_with("usr/share/same/group.txt", &same, 0o644, 0, 1000, (s, ns))
        .file_with("usr/share/same/mode.txt", &same, 0o600, 0, 0, (s, ns))
        .file_with("usr/share/same/mtime.txt", &same, 0o644, 0, 0, (s, ns + 1))
        .file_with("usr/share/same/xattr.txt", &same, 0o644, 0, 0, (s, ns))
        .xattr("usr/share/same/xattr.txt", "user.cowherd.tag", b"1")
        .file_with(
            "usr/share/same/xattr-value.txt",
            &same,
            0o644,
            0,
            0,
            (s, ns),
        )
        .xattr("usr/share/same/xattr-value.txt", "user.cowherd.tag", b"2");

    // Read-only directory with duplicable files (filled first, 0555 in finish()).
    t.read_only_dir("usr/share/ro")
        .file("usr/share/ro/dup-1", &content("ro-dup", 5000))
        .file("usr/share/ro/dup-2", &content("ro-dup", 5000));

    // Hardlink group with mixed markers, dpkg conffile in /usr.
    t.file("etc/mixed.conf", &content("mixed", 2048))
        .hardlink("etc/mixed.conf", "usr/share/mixed.conf")
        .file("usr/share/foo/foo.conf", &content("foo.conf", 3000))
        .file(
            "var/lib/dpkg/info/foo.conffiles",
            b"/usr/share/foo/foo.conf\n",
        );

    // Private areas.
    t.file(
        "etc/passwd",
        b"root:x:0:0:root:/root:/bin/sh\nuser:x:1000:1000::/home/user:/bin/sh\n",
    )
    .file("etc/services", &content("services", 12 * 1024))
    .file_with(
        "etc/shadow",
        &content("shadow", 700),
        0o640,
        0,
        42,
        DEFAULT_MTIME,
    )
    .file("etc/hostname", format!("guest-{variant}\n").as_bytes())
    .file("etc/machine-id", b"")
    .file("var/lib/dpkg/status", &content("dpkg-status", 16 * 1024))
    .file("var/log/empty.log", b"")
    .device("dev/null", Dev::Char, 1, 3)
    .device("dev/sda", Dev::Block, 8, 0);

    // Per-variant unique files.
    t.file(
        format!("usr/local/variant-{variant}/unique.bin"),
        &content(&format!("unique-{variant}"), 9000),
    )
    .file(
        format!("usr/local/variant-{variant}/notes.txt"),
        format!("variant {variant}\n").as_bytes(),
    );
    t.finish();
}

// ---------------------------------------------------------------------------------------------
// Manifests
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    File,
    Dir,
    Symlink,
    Fifo,
    CharDev,
    BlockDev,
    Socket,
}

/// What a guest sees of one path. Never ctime, atime, nlink or inode numbers; `hardlinks` is the
/// set of the *other* paths of the same tree sharing this inode (empty for directories).
/// Directory sizes are recorded as 0 (they depend on past entries, not on the tree).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    pub kind: Kind,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub mtime: (i64, i64),
    pub size: u64,
    pub rdev: Option<u64>,
    pub target: Option<Vec<u8>>,
    pub blake3: Option<blake3::Hash>,
    pub xattrs: BTreeMap<Vec<u8>, Vec<u8>>,
    pub hardlinks: BTreeSet<Vec<u8>>,
}

pub type Manifest = BTreeMap<Vec<u8>, Entry>;

fn rel_bytes(root: &Path, p: &Path) -> Vec<u8> {
    p.strip_prefix(root)
        .expect("walk stays below its root")
        .as_os_str()
        .as_bytes()
        .to_vec()
}

/// Printable form of a raw relative path.
pub fn show(rel: &[u8]) -> String {
    if rel.is_empty() {
        ".".to_string()
    } else {
        rel.escape_ascii().to_string()
    }
}

/// Manifest of the tree at `dir` (the root itself is the entry with the empty path). Never
/// follows symlinks; hashes regular files with BLAKE3.
pub fn manifest(dir: &Path) -> Manifest {
    let mut out = Manifest::new();
    let mut by_inode: HashMap<(u64, u64), Vec<Vec<u8>>> = HashMap::new();
    for e in walkdir::WalkDir::new(dir)
        .follow_links(false)
        .sort_by_file_name()
    {
        let e = e.unwrap_or_else(|e| panic!("walk {}: {e}", dir.display()));
        let p = e.path();
        let rel = rel_bytes(dir, p);
        let m = fs::symlink_metadata(p).unwrap_or_else(|e| panic!("lstat {}: {e}", p.display()));
        let ft = m.file_type();
        let kind = if ft.is_file() {
            Kind::File
        } else if ft.is_dir() {
            Kind::Dir
        } else if ft.is_symlink() {
            Kind::Symlink
        } else if ft.is_fifo() {
            Kind::Fifo
        } else if ft.is_char_device() {
            Kind::CharDev
        } else if ft.is_block_device() {
            Kind::BlockDev
        } else {
            Kind::Socket
        };
        let blake3 = (kind == Kind::File).then(|| {
            let f = File::open(p).unwrap_or_else(|e| panic!("open {}: {e}", p.display()));
            *blake3::Hasher::new()
                .update_reader(f)
                .unwrap_or_else(|e| panic!("read {}: {e}", p.display()))
                .finalize()
                .as_bytes()
        });
        let target = (kind == Kind::Symlink).then(|| {
            fs::read_link(p)
                .unwrap_or_else(|e| panic!("readlink {}: {e}", p.display()))
                .into_os_string()
                .as_bytes()
                .to_vec()
        });
        let mut xattrs = BTreeMap::new();
        for name in xattr::list(p).unwrap_or_else(|e| panic!("listxattr {}: {e}", p.display())) {
            if let Some(v) = xattr::get(p, &name)
                .unwrap_or_else(|e| panic!("getxattr {} {name:?}: {e}", p.display()))
            {
                xattrs.insert(name.as_bytes().to_vec(), v);
            }
        }
        if kind != Kind::Dir {
            by_inode
                .entry((m.dev(), m.ino()))
                .or_default()
                .push(rel.clone());
        }
        out.insert(
            rel,
            Entry {
                kind,
                mode: m.mode(),
                uid: m.uid(),
                gid: m.gid(),
                mtime: (m.mtime(), m.mtime_nsec()),
                size: if kind == Kind::Dir { 0 } else { m.size() },
                rdev: matches!(kind, Kind::CharDev | Kind::BlockDev).then(|| m.rdev()),
                target,
                blake3: blake3.map(blake3::Hash::from_bytes),
                xattrs,
                hardlinks: BTreeSet::new(),
            },
        );
    }
    for paths in by_inode.into_values().filter(|v| v.len() > 1) {
        for p in &paths {
            let others = paths.iter().filter(|q| *q != p).cloned().collect();
            out.get_mut(p).unwrap().hardlinks = others;
        }
    }
    out
}

/// What to compare in [`compare_manifests`].
#[derive(Clone, Copy, Debug)]
pub struct CompareOpts {
    /// Compare directory mtimes too.
    pub dir_mtimes: bool,
    /// Paths present only in `after` are returned instead of being reported as problems.
    pub allow_extra: bool,
}

/// Differences between two manifests, ignoring inode identity (hardlink sets). Returns the list
/// of problems (human readable) and the paths present only in `after`.
pub fn compare_manifests(
    before: &Manifest,
    after: &Manifest,
    opts: CompareOpts,
) -> (Vec<String>, Vec<Vec<u8>>) {
    let mut problems = Vec::new();
    let mut extra = Vec::new();
    for (rel, b) in before {
        let Some(a) = after.get(rel) else {
            problems.push(format!("{}: missing after (was {:?})", show(rel), b.kind));
            continue;
        };
        let mut a = a.clone();
        a.hardlinks = b.hardlinks.clone();
        if !opts.dir_mtimes && b.kind == Kind::Dir && a.kind == Kind::Dir {
            a.mtime = b.mtime;
        }
        if &a != b {
            let mut what = Vec::new();
            if a.kind != b.kind {
                what.push(format!("kind {:?} -> {:?}", b.kind, a.kind));
            }
            if a.mode != b.mode {
                what.push(format!("mode {:o} -> {:o}", b.mode, a.mode));
            }
            if (a.uid, a.gid) != (b.uid, b.gid) {
                what.push(format!("owner {}:{} -> {}:{}", b.uid, b.gid, a.uid, a.gid));
            }
            if a.mtime != b.mtime {
                what.push(format!("mtime {:?} -> {:?}", b.mtime, a.mtime));
            }
            if a.size != b.size {
                what.push(format!("size {} -> {}", b.size, a.size));
            }
            if a.rdev != b.rdev {
                what.push(format!("rdev {:?} -> {:?}", b.rdev, a.rdev));
            }
            if a.target != b.target {
                what.push("symlink target changed".to_string());
            }
            if a.blake3 != b.blake3 {
                what.push("CONTENT changed".to_string());
            }
            if a.xattrs != b.xattrs {
                let names = |m: &BTreeMap<Vec<u8>, Vec<u8>>| -> Vec<String> {
                    m.keys().map(|k| show(k)).collect()
                };
                what.push(format!(
                    "xattrs {:?} -> {:?} (or values differ)",
                    names(&b.xattrs),
                    names(&a.xattrs)
                ));
            }
            problems.push(format!("{}: {}", show(rel), what.join(", ")));
        }
    }
    for rel in after.keys().filter(|k| !before.contains_key(*k)) {
        if opts.allow_extra {
            extra.push(rel.clone());
        } else {
            problems.push(format!("{}: new path after", show(rel)));
        }
    }
    (problems, extra)
}

fn fail_with(what: &str, problems: &[String]) -> ! {
    let shown: Vec<&str> = problems.iter().take(40).map(String::as_str).collect();
    panic!(
        "{what}: {} problem(s):\n  {}{}",
        problems.len(),
        shown.join("\n  "),
        if problems.len() > 40 { "\n  …" } else { "" }
    );
}

/// Everything a guest sees is unchanged (content, type, mode, owner, mtime — also of
/// directories —, size, rdev, symlink target, every xattr), except inode identity.
pub fn assert_same_content_and_metadata(before: &Manifest, after: &Manifest) {
    assert_unchanged(before, after, true, "tree changed");
}

/// Like [`assert_same_content_and_metadata`] but directory mtimes are not compared.
pub fn assert_same_files(before: &Manifest, after: &Manifest) {
    assert_unchanged(
        before,
        after,
        false,
        "tree changed (directory mtimes not compared)",
    );
}

fn assert_unchanged(before: &Manifest, after: &Manifest, dir_mtimes: bool, what: &str) {
    let opts = CompareOpts {
        dir_mtimes,
        allow_extra: false,
    };
    let (problems, _) = compare_manifests(before, after, opts);
    if !problems.is_empty() {
        fail_with(what, &problems);
    }
}

/// Every hardlink group of `before` is still together in `after` (after may have *more* paths
/// sharing an inode: unify links equal files together).
pub fn assert_groups_kept(before: &Manifest, after: &Manifest) {
    let mut problems = Vec::new();
    for (rel, b) in before {
        let Some(a) = after.get(rel) else { continue };
        for other in &b.hardlinks {
            if !a.hardlinks.contains(other) {
                problems.push(format!(
                    "{} and {} were one inode, now they are not",
                    show(rel),
                    show(other)
                ));
            }
        }
    }
    if !problems.is_empty() {
        fail_with("hardlink groups split", &problems);
    }
}

/// `du`-like: sum of st_blocks*512 over every inode reachable under `dirs` (not following
/// symlinks), each (dev, ino) counted once even when reachable through several dirs.
pub fn allocated_bytes(dirs: &[&Path]) -> u64 {
    let mut seen = HashSet::new();
    let mut total = 0;
    for d in dirs {
        for e in walkdir::WalkDir::new(d).follow_links(false) {
            let e = e.unwrap_or_else(|e| panic!("walk {}: {e}", d.display()));
            let m = fs::symlink_metadata(e.path()).unwrap();
            if seen.insert((m.dev(), m.ino())) {
                total += m.blocks() * 512;
            }
        }
    }
    total
}

/// Like [`allocated_bytes`] but counting regular files only (no directories, symlinks, …).
pub fn allocated_file_bytes(dirs: &[&Path]) -> u64 {
    let mut seen = HashSet::new();
    let mut total = 0;
    for d in dirs {
        for e in walkdir::WalkDir::new(d).follow_links(false) {
            let e = e.unwrap_or_else(|e| panic!("walk {}: {e}", d.display()));
            let m = fs::symlink_metadata(e.path()).unwrap();
            if m.is_file() && seen.insert((m.dev(), m.ino())) {
                total += m.blocks() * 512;
            }
        }
    }
    total
}

/// (dev, ino, nlink) per relative raw path.
pub type InodeMap = BTreeMap<Vec<u8>, (u64, u64, u64)>;

/// (dev, ino, nlink) of every path under `dir` (relative raw paths; the root is "").
pub fn inode_map(dir: &Path) -> InodeMap {
    walkdir::WalkDir::new(dir)
        .follow_links(false)
        .into_iter()
        .map(|e| {
            let e = e.unwrap_or_else(|e| panic!("walk {}: {e}", dir.display()));
            let m = fs::symlink_metadata(e.path()).unwrap();
            (rel_bytes(dir, e.path()), (m.dev(), m.ino(), m.nlink()))
        })
        .collect()
}

/// (dev, ino) of `p`, not following symlinks.
pub fn ino(p: &Path) -> (u64, u64) {
    let m = fs::symlink_metadata(p).unwrap_or_else(|e| panic!("lstat {}: {e}", p.display()));
    (m.dev(), m.ino())
}

pub fn nlink(p: &Path) -> u64 {
    fs::symlink_metadata(p)
        .unwrap_or_else(|e| panic!("lstat {}: {e}", p.display()))
        .nlink()
}

/// `dir` joined with a raw relative path.
pub fn at(dir: &Path, rel: impl AsRef<[u8]>) -> PathBuf {
    dir.join(OsStr::from_bytes(rel.as_ref()))
}

/// Regular files below `dir` (recursive, not following symlinks), sorted.
pub fn files_under(dir: &Path) -> Vec<PathBuf> {
    if !dir.exists() {
        return Vec::new();
    }
    let mut v: Vec<PathBuf> = walkdir::WalkDir::new(dir)
        .follow_links(false)
        .into_iter()
        .map(|e| e.unwrap())
        .filter(|e| e.file_type().is_file())
        .map(|e| e.into_path())
        .collect();
    v.sort();
    v
}

/// Inode flags as printed by `lsattr -d` (e.g. `----i---------e-------`).
pub fn inode_flags(p: &Path) -> String {
    let out = std::process::Command::new("lsattr")
        .arg("-d")
        .arg(p)
        .output()
        .expect("run lsattr");
    assert!(
        out.status.success(),
        "lsattr -d {} failed: {}",
        p.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string()
}

/// FS_IMMUTABLE_FL set on `p` (lsattr's lowercase `i`).
pub fn is_immutable(p: &Path) -> bool {
    inode_flags(p).contains('i')
}

// ---------------------------------------------------------------------------------------------
// The store
// ---------------------------------------------------------------------------------------------

/// One file of `$ROOT/store/objects/ab/<key>.<marker><n>`.
#[derive(Clone, Debug)]
pub struct StoreObject {
    pub path: PathBuf,
    /// The `<key>` part of the name (hex BLAKE3).
    pub key: String,
    /// 'c' (copy-on-write) or 'i' (immutable), the first letter of the suffix.
    pub marker: char,
    /// The full suffix after the last '.', e.g. "c0".
    pub suffix: String,
    pub dev_ino: (u64, u64),
    pub nlink: u64,
}

pub fn store_objects(root: &Path) -> Vec<StoreObject> {
    files_under(&root.join("store/objects"))
        .into_iter()
        .map(|path| {
            let name = path.file_name().unwrap().to_string_lossy().to_string();
            let (key, suffix) = name.rsplit_once('.').unwrap_or((name.as_str(), ""));
            let m = fs::symlink_metadata(&path).unwrap();
            StoreObject {
                key: key.to_string(),
                marker: suffix.chars().next().unwrap_or('?'),
                suffix: suffix.to_string(),
                dev_ino: (m.dev(), m.ino()),
                nlink: m.nlink(),
                path,
            }
        })
        .collect()
}

/// Map (dev, ino) → store object, to ask "is this guest file a store link, and which one?".
pub fn store_inodes(root: &Path) -> HashMap<(u64, u64), StoreObject> {
    store_objects(root)
        .into_iter()
        .map(|o| (o.dev_ino, o))
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Running cowherd
// ---------------------------------------------------------------------------------------------

/// Path of the cowherd binary under test.
pub fn cowherd_bin() -> PathBuf {
    assert_cmd::cargo::cargo_bin("cowherd")
}

/// `cowherd --root ROOT` (COWHERD_ROOT removed from the environment, 5 min timeout).
pub fn cowherd(root: &Path) -> assert_cmd::Command {
    let mut c = cowherd_no_root();
    c.arg("--root").arg(root);
    c
}

/// `cowherd` without `--root` (for --help and the like).
pub fn cowherd_no_root() -> assert_cmd::Command {
    let mut c = assert_cmd::Command::cargo_bin("cowherd").expect("cowherd binary is built");
    c.env_remove("COWHERD_ROOT")
        .env("NO_COLOR", "1")
        .timeout(Duration::from_secs(300));
    c
}

/// `cowherd --root <scratch>/root init`, asserting success. Returns the root.
pub fn init_root(scratch: &Path) -> PathBuf {
    let root = scratch.join("root");
    cowherd(&root).arg("init").assert().success();
    root
}

/// `cowherd --root ROOT adopt SRC --name NAME`, asserting success.
pub fn adopt(root: &Path, src: &Path, name: &str) {
    cowherd(root)
        .arg("adopt")
        .arg(src)
        .arg("--name")
        .arg(name)
        .assert()
        .success();
}

/// `$ROOT/guests/NAME/base`.
pub fn base(root: &Path, name: &str) -> PathBuf {
    root.join("guests").join(name).join("base")
}

/// Build one guest per (name, builder) under `<scratch>/src/NAME` and adopt it.
pub fn adopt_built(root: &Path, scratch: &Path, name: &str, build: impl FnOnce(&Path)) {
    let src = scratch.join("src").join(name);
    build(&src);
    adopt(root, &src, name);
}

/// Run, assert exit 0 and parse stdout as JSON.
pub fn run_json(cmd: &mut assert_cmd::Command) -> Value {
    let out = cmd.output().expect("run cowherd");
    assert!(
        out.status.success(),
        "cowherd failed ({}):\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    json_of(&out)
}

/// Parse a command's stdout as JSON (panics with stdout and stderr if it is not).
pub fn json_of(out: &Output) -> Value {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "stdout is not JSON ({e}):\nstdout: {}\nstderr: {}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

/// Assert the command failed with `code` and printed exactly one line on stderr starting with
/// `error:`; returns that line.
pub fn assert_one_line_error(out: &Output, code: i32) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert_eq!(
        out.status.code(),
        Some(code),
        "expected exit code {code}; stdout: {}\nstderr: {stderr}",
        String::from_utf8_lossy(&out.stdout)
    );
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "expected a one-line error, got:\n{stderr}");
    assert!(
        lines[0].starts_with("error:"),
        "error line must start with `error:`: {:?}",
        lines[0]
    );
    lines[0].to_string()
}

/// Fail loudly unless we run as root (the suite sets owners, creates devices, mounts tmpfs and
/// sets inode flags: skipping silently would hide that nothing was tested).
pub fn assert_root() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "this test needs root (uid 0): run the suite as root, like CI does"
    );
}

// ---------------------------------------------------------------------------------------------
// JSON field lookup
// ---------------------------------------------------------------------------------------------

/// The number under the shallowest key accepted by `pred` (breadth-first: top-level summary
/// fields win over per-guest ones; arrays count as one level). `None` if there is none.
pub fn find_number(v: &Value, pred: &dyn Fn(&str) -> bool) -> Option<u64> {
    let mut queue = VecDeque::from([v]);
    while let Some(v) = queue.pop_front() {
        match v {
            Value::Object(m) => {
                for (k, x) in m {
                    if pred(&k.to_ascii_lowercase())
                        && let Some(n) = x.as_u64()
                    {
                        return Some(n);
                    }
                }
                queue.extend(m.values());
            }
            Value::Array(a) => queue.extend(a.iter()),
            _ => {}
        }
    }
    None
}

fn number_or_panic(v: &Value, what: &str, pred: &dyn Fn(&str) -> bool) -> u64 {
    find_number(v, pred).unwrap_or_else(|| {
        panic!(
            "no numeric field for {what} in the JSON summary:\n{}",
            serde_json::to_string_pretty(v).unwrap()
        )
    })
}

/// Sum of the numbers under the keys accepted by `pred`, at the shallowest level where any key
/// is accepted (breadth-first, arrays count as one level). `None` if no key is accepted.
pub fn sum_numbers(v: &Value, pred: &dyn Fn(&str) -> bool) -> Option<u64> {
    let mut level = vec![v];
    while !level.is_empty() {
        let mut found = None;
        let mut next = Vec::new();
        for v in level {
            match v {
                Value::Object(m) => {
                    for (k, x) in m {
                        if pred(&k.to_ascii_lowercase())
                            && let Some(n) = x.as_u64()
                        {
                            *found.get_or_insert(0) += n;
                        }
                    }
                    next.extend(m.values());
                }
                Value::Array(a) => next.extend(a.iter()),
                _ => {}
            }
        }
        if found.is_some() {
            return found;
        }
        level = next;
    }
    None
}

/// Files read for hashing by this run: the sum of the keys containing "hashed" that are not
/// byte counts (`hashed_files` + `partial_hashed_files`, or `files_hashed`, …).
pub fn hashed_files(v: &Value) -> u64 {
    sum_numbers(v, &|k| k.contains("hashed") && !k.contains("byte")).unwrap_or_else(|| {
        panic!(
            "no numeric key containing \"hashed\" in the JSON summary:\n{}",
            serde_json::to_string_pretty(v).unwrap()
        )
    })
}

/// Files (paths) linked by this run: first key containing "linked" that is not a byte count
/// (`linked_files`, `files_linked`, `linked`; for --dry-run also `would_link…`).
pub fn linked_files(v: &Value) -> u64 {
    number_or_panic(v, "files linked (a key containing \"linked\")", &|k| {
        (k.contains("linked") || k.contains("would_link")) && !k.contains("byte")
    })
}

/// Bytes saved by this run: first key containing "saved" (`saved_bytes`, `bytes_saved`).
pub fn saved_bytes(v: &Value) -> u64 {
    number_or_panic(v, "saved bytes (a key containing \"saved\")", &|k| {
        k.contains("saved") && !k.contains("ratio") && !k.contains("percent")
    })
}

/// Guest names in `cowherd list --json`: a top-level array (of names or of objects with a
/// "name"), or an object with a "guests" array/map.
pub fn guest_names(v: &Value) -> BTreeSet<String> {
    fn from(v: &Value) -> BTreeSet<String> {
        match v {
            Value::Array(a) => a
                .iter()
                .filter_map(|g| match g {
                    Value::String(s) => Some(s.clone()),
                    Value::Object(o) => o
                        .get("name")
                        .or_else(|| o.get("guest"))
                        .and_then(Value::as_str)
                        .map(str::to_string),
                    _ => None,
                })
                .collect(),
            Value::Object(o) => o.keys().cloned().collect(),
            _ => BTreeSet::new(),
        }
    }
    match v {
        Value::Object(o) if o.contains_key("guests") => from(&o["guests"]),
        other => from(other),
    }
}

/// Per-guest objects of `stats --json` keyed by guest name (from a "guests" array of objects
/// with "name", or a "guests" map).
pub fn stats_per_guest(v: &Value) -> BTreeMap<String, Value> {
    let guests = v.get("guests").unwrap_or_else(|| {
        panic!(
            "stats --json has no \"guests\":\n{}",
            serde_json::to_string_pretty(v).unwrap()
        )
    });
    match guests {
        Value::Array(a) => a
            .iter()
            .map(|g| {
                let name = g
                    .get("name")
                    .or_else(|| g.get("guest"))
                    .and_then(Value::as_str)
                    .expect("per-guest stats carry a \"name\"")
                    .to_string();
                (name, g.clone())
            })
            .collect(),
        Value::Object(o) => o.iter().map(|(k, g)| (k.clone(), g.clone())).collect(),
        _ => panic!("\"guests\" is neither array nor object"),
    }
}

/// The totals object of `stats --json` ("total" or "totals").
pub fn stats_total(v: &Value) -> Value {
    v.get("total")
        .or_else(|| v.get("totals"))
        .cloned()
        .unwrap_or_else(|| {
            panic!(
                "stats --json has no \"total\":\n{}",
                serde_json::to_string_pretty(v).unwrap()
            )
        })
}

/// Logical, physical and saved bytes of one stats object (keys containing "logical",
/// "physical", "saved").
pub fn logical_physical_saved(v: &Value) -> (u64, u64, u64) {
    let get = |word: &'static str| {
        number_or_panic(v, word, &move |k: &str| {
            k.contains(word) && !k.contains("ratio") && !k.contains("percent")
        })
    };
    (get("logical"), get("physical"), get("saved"))
}

// ---------------------------------------------------------------------------------------------
// Overlay guests
// ---------------------------------------------------------------------------------------------

/// `$ROOT/guests/NAME/rootfs` (the overlay mount point of a guest not adopted in place).
pub fn rootfs(root: &Path, name: &str) -> PathBuf {
    root.join("guests").join(name).join("rootfs")
}

/// `$ROOT/guests/NAME/upper` (the guest's copy-on-write layer).
pub fn upper(root: &Path, name: &str) -> PathBuf {
    root.join("guests").join(name).join("upper")
}

/// Mount points a test mounts on; on drop each is unmounted lazily (`umount -l`), every mount
/// stacked on it, also when the test panics. Register a path *before* mounting on it.
#[derive(Default)]
pub struct MountedGuests {
    points: Vec<PathBuf>,
}

impl MountedGuests {
    pub fn watch(&mut self, point: impl Into<PathBuf>) {
        self.points.push(point.into());
    }
}

impl Drop for MountedGuests {
    fn drop(&mut self) {
        for p in self.points.iter().rev() {
            // EINVAL once nothing is mounted there any more.
            for _ in 0..8 {
                if nix::mount::umount2(p, MntFlags::MNT_DETACH).is_err() {
                    break;
                }
            }
        }
    }
}

/// A child process that is killed (SIGKILL) and reaped when the guard drops, also on panic.
pub struct KillOnDrop(pub std::process::Child);

impl KillOnDrop {
    pub fn spawn(cmd: &mut std::process::Command) -> Self {
        KillOnDrop(cmd.spawn().unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}")))
    }

    pub fn id(&self) -> u32 {
        self.0.id()
    }
}

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Polls `cond` every 5 ms until it holds; panics naming `what` after 10 s.
pub fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !cond() {
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// The mounts at `point` in this mount namespace, bottom first (parsed by cowherd's own
/// mountinfo reader).
pub fn mounts_at(point: &Path) -> Vec<cowherd_unify::MountEntry> {
    cowherd_unify::read_mountinfo(Path::new("/proc/self/mountinfo"))
        .expect("read /proc/self/mountinfo")
        .into_iter()
        .filter(|m| m.mount_point == point)
        .collect()
}

/// The `"mount"` object of guest `name` in `cowherd list --json` (`{"state": "unmounted"}`,
/// `{"state": "mounted", "path": …}` or `{"state": "foreign", "path": …, "why": …}`).
pub fn listed_mount(root: &Path, name: &str) -> Value {
    let list = run_json(cowherd(root).args(["list", "--json"]));
    list.as_array()
        .and_then(|rows| rows.iter().find(|r| r["name"] == name))
        .map(|r| r["mount"].clone())
        .unwrap_or_else(|| panic!("no guest {name} in `list --json`:\n{list:#}"))
}

/// Drops `p`'s pages from the page cache: fsync (so none is dirty), then
/// `posix_fadvise(POSIX_FADV_DONTNEED)` over the whole file.
pub fn evict_page_cache(p: &Path) {
    let f = File::open(p).unwrap_or_else(|e| panic!("open {}: {e}", p.display()));
    f.sync_all()
        .unwrap_or_else(|e| panic!("fsync {}: {e}", p.display()));
    nix::fcntl::posix_fadvise(
        &f,
        0,
        0,
        nix::fcntl::PosixFadviseAdvice::POSIX_FADV_DONTNEED,
    )
    .unwrap_or_else(|e| panic!("posix_fadvise DONTNEED {}: {e}", p.display()));
}

/// Bytes of `p` resident in the page cache, as `fincore --bytes --noheadings --output RES`
/// (util-linux) reports them. Fails the test if fincore is missing.
pub fn resident_bytes(p: &Path) -> u64 {
    let out = std::process::Command::new("fincore")
        .args(["--bytes", "--noheadings", "--output", "RES"])
        .arg(p)
        .output()
        .unwrap_or_else(|e| panic!("run fincore (util-linux) on {}: {e}", p.display()));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "fincore {} failed: {}",
        p.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    stdout.trim().parse().unwrap_or_else(|e| {
        panic!(
            "fincore {}: not a byte count ({e}): {stdout:?}",
            p.display()
        )
    })
}

/// Copies the host's `programs` (absolute paths) and the shared libraries `ldd` lists for them
/// into the same paths below `dir`, and makes an empty `proc/`: a guest tree in which those
/// programs run (for `cowherd exec`).
pub fn minimal_userland(dir: &Path, programs: &[&str]) {
    let copy = |p: &Path| {
        let dest = dir.join(p.strip_prefix("/").unwrap());
        fs::create_dir_all(dest.parent().unwrap()).unwrap();
        fs::copy(p, &dest).unwrap_or_else(|e| panic!("copy {}: {e}", p.display()));
    };
    for program in programs {
        copy(Path::new(program));
        let out = std::process::Command::new("ldd")
            .arg(program)
            .output()
            .expect("ldd runs");
        for lib in String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .filter(|w| w.starts_with('/'))
        {
            copy(Path::new(lib));
        }
    }
    fs::create_dir_all(dir.join("proc")).unwrap();
}

/// The seed of a randomised test: the number in `$VAR`, else the clock's nanoseconds; printed,
/// so that a failing run can be repeated.
pub fn seed(var: &str) -> u64 {
    let seed = std::env::var(var)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
        });
    eprintln!("seed {seed} (rerun with {var}={seed})");
    seed
}

/// `cowherd umount NAMES…`, asserting success. A forked child of this multi-threaded test
/// process (another test starting a command) briefly holds a copy of every file open here,
/// which `umount` rightly refuses ("in use by"): such a refusal is retried for a few seconds.
pub fn umount_ok(root: &Path, names: &[&str]) {
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let out = cowherd(root).arg("umount").args(names).output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        if out.status.success() {
            return;
        }
        assert!(
            stderr.contains("in use by") && std::time::Instant::now() < deadline,
            "cowherd umount {names:?} failed: {stderr}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A `sleep` in a new mount namespace (`unshare -m`), holding a copy of every mount of this
/// moment until it is dropped; returned once it runs there.
pub fn other_mount_namespace() -> KillOnDrop {
    let child = KillOnDrop::spawn(
        std::process::Command::new("unshare")
            .args(["-m", "sleep", "30"])
            .current_dir("/")
            .stdin(std::process::Stdio::null()),
    );
    let pid = child.id().to_string();
    let ns = |pid: &str| fs::read_link(format!("/proc/{pid}/ns/mnt")).ok();
    wait_for("unshare -m to exec sleep in a new mount namespace", || {
        let comm = fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
        comm.trim() == "sleep" && ns(&pid) != ns("self")
    });
    child
}

/// `setpriv --reuid=65534 --regid=65534 --clear-groups -- PROGRAM`: a command that runs as the
/// unprivileged user `nobody` (util-linux `setpriv`); add its arguments.
pub fn as_user_nobody(program: impl AsRef<OsStr>) -> std::process::Command {
    let mut c = std::process::Command::new("setpriv");
    c.args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
        .arg(program)
        .env_remove("COWHERD_ROOT")
        .env("NO_COLOR", "1")
        .stdin(std::process::Stdio::null());
    c
}

// ---------------------------------------------------------------------------------------------
// Mount namespaces and the kernel's merged view
// ---------------------------------------------------------------------------------------------

/// Moves this test's thread — and the processes it starts — into a mount namespace of its own
/// with private propagation. Its overlays are then seen by no other process: other tests of
/// the host that copy the mount table (`unshare -m`) cannot pin them (`cowherd umount` would
/// refuse: "in use by … mount namespace"), and theirs cannot pin this test's guests. Read
/// mount tables as `/proc/thread-self/…` there, never `/proc/self/…`.
pub fn own_mount_namespace() {
    nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNS).expect("unshare(CLONE_NEWNS)");
    nix::mount::mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None::<&str>,
    )
    .expect("mount --make-rprivate /");
}

/// A mount at `point` that is detached (`umount -l`) on drop unless it was unmounted already:
/// a panic never leaves it behind.
struct ViewMount {
    point: PathBuf,
    mounted: bool,
}

impl Drop for ViewMount {
    fn drop(&mut self) {
        if self.mounted {
            let _ = nix::mount::umount2(&self.point, MntFlags::MNT_DETACH);
        }
    }
}

/// The merged view of the unmounted guest `name`, measured by the kernel: a read-only overlay
/// with both layers as lower layers (upper on top, so its whiteouts and opaque directories are
/// honoured and nothing is written), mounted at `<root>/../view-NAME` — outside the guest's
/// directory — for as long as [`manifest`] reads it.
pub fn merged_manifest(root: &Path, name: &str) -> Manifest {
    let guest = root.join("guests").join(name);
    let point = root.with_file_name(format!("view-{name}"));
    fs::create_dir_all(&point).unwrap();
    let data = format!(
        "lowerdir={}:{}",
        guest.join("upper").display(),
        guest.join("base").display()
    );
    let mut view = ViewMount {
        point: point.clone(),
        mounted: false,
    };
    nix::mount::mount(
        Some("overlay"),
        &point,
        Some("overlay"),
        MsFlags::MS_RDONLY,
        Some(data.as_str()),
    )
    .unwrap_or_else(|e| panic!("mount the merged view of {name} ({data}): {e}"));
    view.mounted = true;
    let seen = manifest(&point);
    // EBUSY for a moment if another test's thread forked while manifest() held an fd in here
    // (the child keeps it until its exec).
    let mut tries = 0;
    while let Err(e) = nix::mount::umount2(&point, MntFlags::empty()) {
        tries += 1;
        assert!(
            e == nix::errno::Errno::EBUSY && tries < 200,
            "umount {}: {e}",
            point.display()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    view.mounted = false;
    seen
}

// ---------------------------------------------------------------------------------------------
// A stub package manager, for upgrades without the archive
// ---------------------------------------------------------------------------------------------

/// Files the stub package manager rewrites at each upgrade.
pub const STUB_FILES: usize = 30;

/// The guests' `apt-get`: a stub with one package, `stub`, whose version is
/// `/var/lib/stub/version`; `update` succeeds, `-s dist-upgrade` lists `stub` at the next
/// version, and `dist-upgrade` rewrites [`STUB_FILES`] files one by one (each a new file with the
/// package's mtime renamed into place, as dpkg does) with the next version's content, then the
/// version. So a kill
/// mid-upgrade leaves a guest's upper layer with some files of each version: the mix a real
/// half-done upgrade leaves, which the next writer must never let stand.
pub const STUB_APT: &str = r#"#!/bin/sh
sim=; up=
for a in "$@"; do case "$a" in update) up=1;; -s) sim=1;; esac; done
v=$(cat /var/lib/stub/version)
n=$((v + 1))
if [ -n "$up" ]; then echo "Hit:1 stub"; exit 0; fi
if [ -n "$sim" ]; then echo "Inst stub [$v] ($n stub [all])"; exit 0; fi
i=0
while [ $i -lt 30 ]; do
  printf 'stub package, version %s, file %s: %0300d\n' "$n" "$i" 0 > /usr/lib/stub/f$i.dpkg-new
  touch -m -d @1700000000 /usr/lib/stub/f$i.dpkg-new
  mv /usr/lib/stub/f$i.dpkg-new /usr/lib/stub/f$i
  i=$((i + 1))
done
echo "$n" > /var/lib/stub/version.dpkg-new
mv /var/lib/stub/version.dpkg-new /var/lib/stub/version
echo "Setting up stub ($n) ..."
"#;

/// The content of stub file `i` at version `v`, as [`STUB_APT`] writes it.
pub fn stub_content(v: u64, i: usize) -> Vec<u8> {
    format!("stub package, version {v}, file {i}: {:0300}\n", 0).into_bytes()
}

/// The programs the upgrade's script and [`STUB_APT`] run, copied into `dir` with their
/// libraries; the stub as `/usr/bin/apt-get` at version 1 with its [`STUB_FILES`] files.
pub fn stub_apt_tree(dir: &Path) {
    minimal_userland(
        dir,
        &[
            "/bin/sh",
            "/bin/cat",
            "/bin/rm",
            "/bin/mv",
            "/bin/chmod",
            "/bin/grep",
            "/bin/sed",
            "/bin/touch",
            "/bin/ln",
        ],
    );
    let mut t = TreeBuilder::new(dir);
    t.file_with(
        "usr/bin/apt-get",
        STUB_APT.as_bytes(),
        0o755,
        0,
        0,
        DEFAULT_MTIME,
    )
    .file("var/lib/stub/version", b"1\n")
    .dir("usr/sbin", 0o755)
    .dir("tmp", 0o1777);
    for i in 0..STUB_FILES {
        t.file(format!("usr/lib/stub/f{i}"), &stub_content(1, i));
    }
    t.finish();
}

// ---------------------------------------------------------------------------------------------
// Inode flags and reports
// ---------------------------------------------------------------------------------------------

/// `chattr FLAGS PATH`, asserting success.
pub fn chattr(flags: &str, p: &Path) {
    let st = std::process::Command::new("chattr")
        .arg(flags)
        .arg(p)
        .status()
        .unwrap();
    assert!(st.success(), "chattr {flags} {}", p.display());
}

/// Runs `chattr -R -f -i -a` over a directory on drop (before [`Scratch`] removes it, which
/// clears only `i`).
pub struct ClearFlagsOnDrop(pub PathBuf);

impl Drop for ClearFlagsOnDrop {
    fn drop(&mut self) {
        let _ = std::process::Command::new("chattr")
            .args(["-R", "-f", "-i", "-a"])
            .arg(&self.0)
            .stderr(std::process::Stdio::null())
            .status();
    }
}

/// Every difference counts in [`compare_manifests`], directory mtimes too.
pub const EXACT: CompareOpts = CompareOpts {
    dir_mtimes: true,
    allow_extra: false,
};

/// Guest `guest`'s line in a JSON report with a `guests` array (`upgrade --json`).
pub fn report_line<'a>(report: &'a Value, guest: &str) -> &'a Value {
    report["guests"]
        .as_array()
        .unwrap()
        .iter()
        .find(|g| g["guest"] == guest)
        .unwrap_or_else(|| panic!("no line for {guest} in {report:#}"))
}
