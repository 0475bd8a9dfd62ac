//! `fold` moves a stopped guest's upper layer down into its base, and what the guest sees — the
//! overlay's merged view — never changes: not after a fold and remount, not in a dry run, not at
//! any instant of a fold killed with SIGKILL; that includes what overlayfs keeps for the guest
//! in `trusted.overlay.*` xattrs of upper (its `chattr +i/+a`, its own escaped overlay xattrs).
//! Everything runs as root on real overlay mounts, each test in a mount namespace of its own.

mod common;

use std::collections::BTreeSet;
use std::ffi::OsStr;
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::thread::sleep;
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::sys::stat::{Mode, SFlag};
use nix::unistd::Pid;
use rand::{Rng, RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::Value;

use common::*;

// ---------------------------------------------------------------------------------------------
// The merged view, and mounting guests
// ---------------------------------------------------------------------------------------------

/// `cowherd mount NAME`, asserting success and `list --json` saying so; the mount point is
/// watched by `mounts`, so that it is unmounted even if the test panics. Returns the rootfs.
fn mount_guest(root: &Path, name: &str, mounts: &mut MountedGuests) -> PathBuf {
    let point = rootfs(root, name);
    mounts.watch(&point);
    cowherd(root).args(["mount", name]).assert().success();
    assert_eq!(listed_mount(root, name)["state"], "mounted", "{name}");
    point
}

/// `cowherd umount NAME`, asserting success.
fn umount_guest(root: &Path, name: &str) {
    umount_ok(root, &[name]);
    assert_eq!(listed_mount(root, name)["state"], "unmounted", "{name}");
}

/// `cowherd fold NAME --json ARGS…`, asserting exit 0: the guest's report.
fn fold_json(root: &Path, name: &str, args: &[&str]) -> Value {
    let v = run_json(cowherd(root).args(["fold", name, "--json"]).args(args));
    match v {
        Value::Array(mut reports) if reports.len() == 1 => reports.remove(0),
        other => panic!("fold --json of one guest is not a one-report array:\n{other:#}"),
    }
}

/// `$ROOT/guests/NAME/SUB`.
fn guest_dir(root: &Path, name: &str, sub: &str) -> PathBuf {
    root.join("guests").join(name).join(sub)
}

/// The names in directory `dir`.
fn names_in(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("read_dir {}: {e}", dir.display()))
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

/// Base holds nothing that means something only to overlayfs: no `trusted.overlay.*` xattr
/// on any entry (symlinks not followed; escaped ones, `trusted.overlay.overlay.*`, belong to the
/// guest) and no whiteout (a 0/0 character device).
fn assert_no_overlay_traces(base: &Path) {
    let mut problems = Vec::new();
    for e in walkdir::WalkDir::new(base).follow_links(false) {
        let e = e.unwrap();
        let m = fs::symlink_metadata(e.path()).unwrap();
        if m.file_type().is_char_device() && m.rdev() == 0 {
            problems.push(format!("{}: a whiteout", e.path().display()));
        }
        for x in xattr::list(e.path()).unwrap() {
            let x_bytes = x.as_encoded_bytes();
            // `trusted.overlay.overlay.*` is the guest's own `trusted.overlay.*`, escaped.
            if x_bytes.starts_with(b"trusted.overlay.")
                && !x_bytes.starts_with(b"trusted.overlay.overlay.")
            {
                problems.push(format!("{}: {}", e.path().display(), x.to_string_lossy()));
            }
        }
    }
    assert!(
        problems.is_empty(),
        "overlay traces in base:\n  {}",
        problems.join("\n  ")
    );
}

/// Asserts that `after` shows exactly what `before` showed, directory mtimes included.
fn assert_same_view(before: &Manifest, after: &Manifest, what: &str) {
    let opts = CompareOpts {
        dir_mtimes: true,
        allow_extra: false,
    };
    let (problems, _) = compare_manifests(before, after, opts);
    let shown: Vec<&str> = problems.iter().take(30).map(String::as_str).collect();
    assert!(
        problems.is_empty(),
        "{what}: {} difference(s):\n  {}",
        problems.len(),
        shown.join("\n  ")
    );
}

// ---------------------------------------------------------------------------------------------
// Guests, and changes made through their overlay
// ---------------------------------------------------------------------------------------------

/// A file all guests but guest 0 have; guest 0 writes an identical one through its overlay.
const SHARED_LATER: &str = "usr/share/extra/bc.bin";

/// Guest `g` of a near-identical set: /usr with shared files several directories deep, a user
/// xattr on a file and on a directory, symlinks, a hardlink pair, a fifo, a directory owned by
/// another user, a directory tree to rename; private /etc; `usr/local/g<g>` of its own, and
/// [`SHARED_LATER`] in every guest but guest 0.
fn guest_tree(dir: &Path, g: usize) {
    let mut t = TreeBuilder::new(dir);
    for p in 0..4 {
        for s in 0..3 {
            for f in 0..6 {
                let tag = format!("lib-{p}-{s}-{f}");
                t.file(
                    format!("usr/lib/pkg{p}/sub{s}/deep/f{f}.so"),
                    &content(&tag, 2000 + f * 700),
                );
            }
        }
    }
    for f in 0..5 {
        t.file(
            format!("usr/share/old/{}/x{f}", ["a", "b/c"][f % 2]),
            &content(&format!("old-{f}"), 1500),
        );
    }
    t.file_with(
        "usr/bin/tool",
        &content("tool", 9000),
        0o755,
        0,
        0,
        DEFAULT_MTIME,
    )
    .symlink("usr/bin/sh", "tool")
    .symlink("usr/lib/current", "pkg1/sub0")
    .symlink("usr/lib/host", "/usr/lib")
    .symlink("usr/share/old/a/up", "../../..")
    .file("usr/lib/tagged.so", &content("tagged", 4000))
    .xattr("usr/lib/tagged.so", "user.cowherd.tag", b"one")
    .file("usr/lib/hl/a", &content("hl", 5000))
    .hardlink("usr/lib/hl/a", "usr/lib/hl/b")
    .fifo("usr/share/fifo")
    .file("usr/share/doc/readme", &content("readme", 3000))
    .file("usr/share/doc/more/notes", &content("notes", 2500))
    .dir("usr/share/tagged-dir", 0o755)
    .xattr("usr/share/tagged-dir", "user.cowherd.dir", b"d")
    .file("usr/share/tagged-dir/inside", &content("inside", 1200))
    .file_with(
        "usr/share/owned/file",
        &content("owned", 1800),
        0o640,
        1000,
        1000,
        DEFAULT_MTIME,
    )
    .owner_mode("usr/share/owned", 1000, 1000, 0o750)
    .file("etc/hostname", format!("guest-{g}\n").as_bytes())
    .file("etc/conf.d/a.conf", &content("a.conf", 900))
    .file(
        format!("usr/local/g{g}/own.bin"),
        &content(&format!("own-{g}"), 6000),
    );
    if g != 0 {
        t.file(SHARED_LATER, &content("bc", 7000));
    }
    t.finish();
}

/// Builds guests `a`, `b`, … (one per name, from [`guest_tree`]) in a fresh root and unifies
/// them all. Returns the root.
fn unified_guests(s: &Scratch, names: &[&str]) -> PathBuf {
    let root = init_root(s.path());
    for (g, name) in names.iter().enumerate() {
        adopt_built(&root, s.path(), name, |d| guest_tree(d, g));
    }
    cowherd(&root).args(["unify", "--all"]).assert().success();
    root
}

/// `lchown`.
fn chown(p: &Path, uid: u32, gid: u32) {
    std::os::unix::fs::lchown(p, Some(uid), Some(gid))
        .unwrap_or_else(|e| panic!("chown {}: {e}", p.display()));
}

fn chmod(p: &Path, mode: u32) {
    fs::set_permissions(p, fs::Permissions::from_mode(mode))
        .unwrap_or_else(|e| panic!("chmod {}: {e}", p.display()));
}

fn write(p: &Path, bytes: &[u8]) {
    fs::write(p, bytes).unwrap_or_else(|e| panic!("write {}: {e}", p.display()));
}

fn mkfifo(p: &Path) {
    nix::unistd::mkfifo(p, Mode::from_bits_truncate(0o600))
        .unwrap_or_else(|e| panic!("mkfifo {}: {e}", p.display()));
}

fn symlink(target: &str, p: &Path) {
    std::os::unix::fs::symlink(target, p)
        .unwrap_or_else(|e| panic!("symlink {}: {e}", p.display()));
}

/// `mv src dst` as a guest's `mv` does it: `rename`, and for a lower directory, which overlayfs
/// refuses to rename with EXDEV (`redirect_dir=off`), a full copy (`cp -a`) and a removal.
/// Returns whether it had to copy.
fn mv(src: &Path, dst: &Path) -> bool {
    match fs::rename(src, dst) {
        Ok(()) => false,
        Err(e) if e.raw_os_error() == Some(libc::EXDEV) => {
            let st = Command::new("cp")
                .args(["-a", "--reflink=never"])
                .arg(src)
                .arg(dst)
                .status()
                .unwrap();
            assert!(st.success(), "cp -a {} {}", src.display(), dst.display());
            fs::remove_dir_all(src).unwrap();
            true
        }
        Err(e) => panic!("rename {} {}: {e}", src.display(), dst.display()),
    }
}

/// One change of each kind a guest makes, through its mounted rootfs `m` (guest 0's tree):
/// including [`SHARED_LATER`] written byte-for-byte and attribute-for-attribute like the other
/// guests' copy.
fn scripted_changes(m: &Path) {
    let p = |rel: &str| m.join(rel);
    fs::create_dir_all(p("usr/share/extra")).unwrap();
    write(&p(SHARED_LATER), &content("bc", 7000));
    chmod(&p(SHARED_LATER), 0o644);
    set_mtime(&p(SHARED_LATER), DEFAULT_MTIME);
    write(&p("usr/share/new.txt"), b"a new file\n");
    fs::create_dir_all(p("usr/newdir/a/b")).unwrap();
    write(&p("usr/newdir/a/b/c.txt"), b"deep and new\n");
    // Edits in place, an append, a truncate; one path of the hardlink pair.
    OpenOptions::new()
        .write(true)
        .open(p("usr/lib/pkg0/sub0/deep/f0.so"))
        .unwrap()
        .write_all_at(b"patched", 100)
        .unwrap();
    let mut f = OpenOptions::new()
        .append(true)
        .open(p("usr/lib/pkg0/sub0/deep/f1.so"))
        .unwrap();
    f.write_all(b"appended").unwrap();
    drop(f);
    File::options()
        .write(true)
        .open(p("usr/lib/pkg0/sub0/deep/f2.so"))
        .unwrap()
        .set_len(100)
        .unwrap();
    let mut f = OpenOptions::new()
        .append(true)
        .open(p("usr/lib/hl/a"))
        .unwrap();
    f.write_all(b"only a").unwrap();
    drop(f);
    // Deletes: a file, a whole lower directory, a lower fifo.
    fs::remove_file(p("usr/lib/pkg0/sub1/deep/f0.so")).unwrap();
    fs::remove_dir_all(p("usr/lib/pkg2")).unwrap();
    fs::remove_file(p("usr/share/fifo")).unwrap();
    // Owner and mode of files and directories.
    chmod(&p("usr/bin/tool"), 0o700);
    chown(&p("usr/lib/pkg1/sub0/deep/f0.so"), 1000, 1000);
    chmod(&p("usr/lib/pkg1"), 0o750);
    chown(&p("usr/lib/pkg1/sub1"), 1000, 100);
    chown(&p("usr/share/owned"), 0, 0);
    // User xattrs set and removed, on files and directories.
    xattr::set(p("usr/lib/pkg1/sub2/deep/f3.so"), "user.cowherd.new", b"v").unwrap();
    xattr::remove(p("usr/lib/tagged.so"), "user.cowherd.tag").unwrap();
    xattr::remove(p("usr/share/tagged-dir"), "user.cowherd.dir").unwrap();
    xattr::set(p("usr/lib/pkg3"), "user.cowherd.dir", b"new").unwrap();
    // Renames: a lower directory (copy + remove), a lower file.
    assert!(
        mv(&p("usr/share/old"), &p("usr/share/renamed")),
        "renaming a lower directory inside the overlay should fail with EXDEV"
    );
    mv(
        &p("usr/lib/pkg3/sub0/deep/f0.so"),
        &p("usr/lib/pkg3/sub0/deep/f0-renamed.so"),
    );
    // A directory replaced by a file; a file by a directory; a file by a directory and back; a
    // directory removed and made again (opaque).
    fs::remove_dir_all(p("usr/lib/pkg3/sub1")).unwrap();
    write(&p("usr/lib/pkg3/sub1"), b"was a directory\n");
    fs::remove_file(p("usr/lib/pkg3/sub2/deep/f1.so")).unwrap();
    fs::create_dir(p("usr/lib/pkg3/sub2/deep/f1.so")).unwrap();
    write(&p("usr/lib/pkg3/sub2/deep/f1.so/inside"), b"was a file\n");
    fs::remove_file(p("usr/lib/pkg3/sub2/deep/f2.so")).unwrap();
    fs::create_dir(p("usr/lib/pkg3/sub2/deep/f2.so")).unwrap();
    write(&p("usr/lib/pkg3/sub2/deep/f2.so/x"), b"x");
    fs::remove_dir_all(p("usr/lib/pkg3/sub2/deep/f2.so")).unwrap();
    write(&p("usr/lib/pkg3/sub2/deep/f2.so"), b"a file again\n");
    fs::remove_dir_all(p("usr/share/doc")).unwrap();
    fs::create_dir(p("usr/share/doc")).unwrap();
    write(&p("usr/share/doc/fresh"), b"fresh doc\n");
    // Symlinks made and replaced, a symlink replaced by a directory, a fifo, a hardlink.
    symlink("tool", &p("usr/bin/new-link"));
    fs::remove_file(p("usr/bin/sh")).unwrap();
    symlink("/bin/busybox", &p("usr/bin/sh"));
    fs::remove_file(p("usr/lib/current")).unwrap();
    fs::create_dir(p("usr/lib/current")).unwrap();
    mkfifo(&p("usr/share/new-fifo"));
    fs::hard_link(
        p("usr/lib/pkg1/sub2/deep/f4.so"),
        p("usr/lib/pkg1/sub2/deep/f4-link.so"),
    )
    .unwrap();
    // The root directory's own metadata, odd names, xattrs of other namespaces (an ACL on a
    // directory, a capability), a device node.
    chmod(m, 0o750);
    xattr::set(m, "user.cowherd.root", b"r").unwrap();
    write(
        &m.join(OsStr::from_bytes(b"usr/share/caf\xe9\nname")),
        b"odd name\n",
    );
    xattr::set(p("usr/lib/pkg0/sub0/deep/f3.so"), "trusted.cowherd", b"t").unwrap();
    xattr::set(
        p("usr/lib/pkg0/sub0/deep/f4.so"),
        "security.capability",
        &cap_net_raw_ep(),
    )
    .unwrap();
    xattr::set(p("usr/lib/pkg0"), "system.posix_acl_access", &sample_acl()).unwrap();
    let dev = nix::sys::stat::makedev(1, 3);
    nix::sys::stat::mknod(
        &p("usr/share/null"),
        SFlag::S_IFCHR,
        Mode::from_bits_truncate(0o666),
        dev,
    )
    .unwrap();
    // Times set by hand, a private file.
    set_mtime(&p("usr/lib/pkg1/sub2"), (1_500_000_000, 5));
    set_mtime(&p("usr/lib/pkg1/sub2/deep/f5.so"), (1_400_000_000, 7));
    write(&p("etc/hostname"), b"renamed-guest\n");
}

/// Kinds of random change a guest makes.
#[derive(Clone, Copy, Debug)]
enum Op {
    NewFile,
    NewDir,
    Edit,
    Append,
    Truncate,
    DeleteFile,
    RemoveTree,
    Chmod,
    Chown,
    SetXattr,
    RemoveXattr,
    MoveDir,
    MoveFile,
    DirToFile,
    FileToDir,
    FileToDirAndBack,
    Opaque,
    NewSymlink,
    ReplaceSymlink,
    Fifo,
    Touch,
    Hardlink,
}

/// Every kind, about equally often.
const MIXED: &[(Op, u32)] = &[
    (Op::NewFile, 6),
    (Op::NewDir, 3),
    (Op::Edit, 4),
    (Op::Append, 4),
    (Op::Truncate, 3),
    (Op::DeleteFile, 4),
    (Op::RemoveTree, 2),
    (Op::Chmod, 4),
    (Op::Chown, 3),
    (Op::SetXattr, 3),
    (Op::RemoveXattr, 2),
    (Op::MoveDir, 2),
    (Op::MoveFile, 2),
    (Op::DirToFile, 1),
    (Op::FileToDir, 2),
    (Op::FileToDirAndBack, 1),
    (Op::Opaque, 1),
    (Op::NewSymlink, 2),
    (Op::ReplaceSymlink, 2),
    (Op::Fifo, 1),
    (Op::Touch, 3),
    (Op::Hardlink, 1),
];

/// Mostly new and changed files (what a package upgrade leaves in upper), some of the rest.
const BULK: &[(Op, u32)] = &[
    (Op::NewFile, 60),
    (Op::Append, 12),
    (Op::Edit, 4),
    (Op::Chmod, 8),
    (Op::Chown, 3),
    (Op::DeleteFile, 6),
    (Op::SetXattr, 2),
    (Op::Touch, 2),
    (Op::NewSymlink, 1),
    (Op::Hardlink, 1),
    (Op::MoveFile, 1),
];

/// Changes of a few kinds made one after the other, each batch of the kill test.
const STRUCTURE: &[Op] = &[
    Op::RemoveTree,
    Op::RemoveTree,
    Op::Opaque,
    Op::MoveDir,
    Op::FileToDir,
    Op::DirToFile,
    Op::NewDir,
    Op::NewDir,
    Op::Chmod,
    Op::Chown,
];

#[derive(Clone, Copy)]
enum Want {
    File,
    Dir,
    Symlink,
}

/// Random changes through a mounted guest's rootfs, as the guest would make them (seeded).
/// Paths are picked among what the tree held when [`Changes::new`] walked it and what the
/// changes made since; a pick that is gone (or changed type) is dropped and another is tried.
struct Changes {
    rootfs: PathBuf,
    rng: ChaCha8Rng,
    files: Vec<PathBuf>,
    dirs: Vec<PathBuf>,
    symlinks: Vec<PathBuf>,
    seq: u64,
    /// Paths below these are never picked (a test checks them afterwards).
    avoid: Vec<PathBuf>,
    /// How many changes of each kind were made.
    made: std::collections::BTreeMap<String, usize>,
}

impl Changes {
    fn new(rootfs: &Path, seed: u64) -> Self {
        let mut c = Changes {
            rootfs: rootfs.to_path_buf(),
            rng: ChaCha8Rng::seed_from_u64(seed),
            files: Vec::new(),
            dirs: Vec::new(),
            symlinks: Vec::new(),
            seq: 0,
            avoid: Vec::new(),
            made: Default::default(),
        };
        for e in walkdir::WalkDir::new(rootfs).min_depth(1) {
            let e = e.unwrap();
            let rel = e.path().strip_prefix(rootfs).unwrap().to_path_buf();
            let ft = e.file_type();
            let list = if ft.is_file() {
                &mut c.files
            } else if ft.is_dir() {
                &mut c.dirs
            } else if ft.is_symlink() {
                &mut c.symlinks
            } else {
                continue;
            };
            list.push(rel);
        }
        c.files.sort();
        c.dirs.sort();
        c.symlinks.sort();
        c
    }

    fn list(&mut self, want: Want) -> &mut Vec<PathBuf> {
        match want {
            Want::File => &mut self.files,
            Want::Dir => &mut self.dirs,
            Want::Symlink => &mut self.symlinks,
        }
    }

    /// A random known path that is still there with the wanted type and has at least
    /// `min_depth` components.
    fn pick(&mut self, want: Want, min_depth: usize) -> Option<PathBuf> {
        for _ in 0..50 {
            let len = self.list(want).len();
            if len == 0 {
                return None;
            }
            let i = self.rng.random_range(0..len);
            let rel = self.list(want)[i].clone();
            let there = fs::symlink_metadata(self.rootfs.join(&rel)).is_ok_and(|m| match want {
                Want::File => m.is_file(),
                Want::Dir => m.is_dir(),
                Want::Symlink => m.file_type().is_symlink(),
            });
            if !there || self.avoid.iter().any(|a| rel.starts_with(a)) {
                self.list(want).swap_remove(i);
            } else if rel.components().count() >= min_depth {
                return Some(rel);
            }
        }
        None
    }

    /// A file (mostly) or a directory.
    fn pick_any(&mut self) -> Option<PathBuf> {
        let want = if self.rng.random_bool(0.7) {
            Want::File
        } else {
            Want::Dir
        };
        self.pick(want, 1)
    }

    /// A new name in the directory of `rel` (or in `rel` itself, with `inside`).
    fn fresh(&mut self, rel: &Path, inside: bool, what: &str) -> PathBuf {
        self.seq += 1;
        let dir = if inside {
            rel
        } else {
            rel.parent().unwrap_or(Path::new(""))
        };
        dir.join(format!("{what}-{}", self.seq))
    }

    fn bytes(&mut self, max: usize) -> Vec<u8> {
        let mut v = vec![0u8; self.rng.random_range(0..=max)];
        self.rng.fill_bytes(&mut v);
        v
    }

    fn choose<T: Copy>(&mut self, from: &[T]) -> T {
        from[self.rng.random_range(0..from.len())]
    }

    /// Makes `n` changes, their kinds drawn with the given weights.
    fn run(&mut self, n: usize, weights: &[(Op, u32)]) {
        let total: u32 = weights.iter().map(|(_, w)| w).sum();
        for _ in 0..n {
            let mut x = self.rng.random_range(0..total);
            let &(op, _) = weights
                .iter()
                .find(|(_, w)| {
                    let hit = x < *w;
                    x = x.saturating_sub(*w);
                    hit
                })
                .unwrap();
            self.apply(op);
        }
    }

    /// Makes one change of kind `op`; false if there was nothing to make it on.
    fn apply(&mut self, op: Op) -> bool {
        let made = self.try_apply(op).is_some();
        if made {
            *self.made.entry(format!("{op:?}")).or_default() += 1;
        }
        made
    }

    fn try_apply(&mut self, op: Op) -> Option<()> {
        let root = self.rootfs.clone();
        match op {
            Op::NewFile => {
                let d = self.pick(Want::Dir, 1)?;
                let rel = self.fresh(&d, true, "new");
                let bytes = self.bytes(4000);
                write(&root.join(&rel), &bytes);
                let mode = self.choose(&[0o644, 0o600, 0o755]);
                chmod(&root.join(&rel), mode);
                if self.rng.random_bool(0.2) {
                    xattr::set(root.join(&rel), "user.cowherd.new", &self.bytes(30)).unwrap();
                }
                self.files.push(rel);
            }
            Op::NewDir => {
                let d = self.pick(Want::Dir, 1)?;
                let rel = self.fresh(&d, true, "dir");
                fs::create_dir_all(root.join(&rel).join("sub")).unwrap();
                for f in ["f1", "sub/f2"] {
                    let bytes = self.bytes(3000);
                    write(&root.join(&rel).join(f), &bytes);
                    self.files.push(rel.join(f));
                }
                self.dirs.extend([rel.join("sub"), rel]);
            }
            Op::Edit | Op::Append | Op::Truncate => {
                let rel = self.pick(Want::File, 1)?;
                let p = root.join(&rel);
                let f = OpenOptions::new().write(true).open(&p).unwrap();
                let len = f.metadata().unwrap().len();
                match op {
                    Op::Edit => {
                        let at = self.rng.random_range(0..=len);
                        f.write_all_at(&self.bytes(300), at).unwrap()
                    }
                    Op::Append => f.write_all_at(&self.bytes(300), len).unwrap(),
                    _ => f.set_len(len / 2).unwrap(),
                }
            }
            Op::DeleteFile => fs::remove_file(root.join(self.pick(Want::File, 1)?)).unwrap(),
            Op::RemoveTree => fs::remove_dir_all(root.join(self.pick(Want::Dir, 3)?)).unwrap(),
            Op::Chmod => {
                let rel = self.pick_any()?;
                let p = root.join(&rel);
                let mode = if p.is_dir() {
                    self.choose(&[0o700, 0o750, 0o711, 0o1777, 0o555])
                } else {
                    self.choose(&[0o600, 0o640, 0o755, 0o4755, 0o444])
                };
                chmod(&p, mode);
            }
            Op::Chown => {
                let rel = self.pick_any()?;
                let (uid, gid) = self.choose(&[(0, 0), (1000, 1000), (65534, 65534), (0, 1000)]);
                chown(&root.join(rel), uid, gid);
            }
            Op::SetXattr => {
                let rel = self.pick_any()?;
                let key = format!("user.cowherd.k{}", self.rng.random_range(0..3));
                let value = self.bytes(40);
                xattr::set(root.join(rel), key, &value).unwrap();
            }
            Op::RemoveXattr => {
                let p = root.join(self.pick_any()?);
                let key = xattr::list(&p)
                    .unwrap()
                    .find(|k| k.as_encoded_bytes().starts_with(b"user."))?;
                xattr::remove(&p, key).unwrap();
            }
            Op::MoveDir => {
                let rel = self.pick(Want::Dir, 3)?;
                let to = self.fresh(&rel, false, "moved");
                mv(&root.join(&rel), &root.join(&to));
                self.dirs.push(to);
            }
            Op::MoveFile => {
                let rel = self.pick(Want::File, 1)?;
                let to = self.fresh(&rel, false, "renamed");
                mv(&root.join(&rel), &root.join(&to));
                self.files.push(to);
            }
            Op::DirToFile => {
                let rel = self.pick(Want::Dir, 3)?;
                fs::remove_dir_all(root.join(&rel)).unwrap();
                write(&root.join(&rel), &self.bytes(2000));
                self.files.push(rel);
            }
            Op::FileToDir | Op::FileToDirAndBack => {
                let rel = self.pick(Want::File, 2)?;
                let p = root.join(&rel);
                fs::remove_file(&p).unwrap();
                fs::create_dir(&p).unwrap();
                write(&p.join("inside"), &self.bytes(1000));
                if let Op::FileToDirAndBack = op {
                    fs::remove_dir_all(&p).unwrap();
                    write(&p, &self.bytes(1000));
                } else {
                    self.dirs.push(rel);
                }
            }
            Op::Opaque => {
                let rel = self.pick(Want::Dir, 3)?;
                let p = root.join(&rel);
                fs::remove_dir_all(&p).unwrap();
                fs::create_dir(&p).unwrap();
                write(&p.join("again"), &self.bytes(1000));
            }
            Op::NewSymlink => {
                let d = self.pick(Want::Dir, 1)?;
                let rel = self.fresh(&d, true, "link");
                let target = self.choose(&["../lib", "/etc/passwd", "f1", "no/such/thing"]);
                symlink(target, &root.join(&rel));
                self.symlinks.push(rel);
            }
            Op::ReplaceSymlink => {
                let p = root.join(self.pick(Want::Symlink, 1)?);
                fs::remove_file(&p).unwrap();
                symlink(&format!("replaced-{}", self.rng.next_u32()), &p);
            }
            Op::Fifo => {
                let d = self.pick(Want::Dir, 1)?;
                mkfifo(&root.join(self.fresh(&d, true, "fifo")));
            }
            Op::Touch => {
                let want = self.choose(&[Want::File, Want::Dir, Want::Symlink]);
                let p = root.join(self.pick(want, 1)?);
                let t = (
                    self.rng.random_range(1_000_000_000..1_700_000_000),
                    self.rng.random_range(0..1_000_000_000),
                );
                set_mtime(&p, t);
            }
            Op::Hardlink => {
                let rel = self.pick(Want::File, 1)?;
                let to = self.fresh(&rel, false, "hl");
                fs::hard_link(root.join(&rel), root.join(&to)).unwrap();
                self.files.push(to);
            }
        }
        Some(())
    }
}

// ---------------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------------

#[test]
fn fold_round_trip_keeps_the_merged_view() {
    assert_root();
    own_mount_namespace();
    let seed = seed("COWHERD_FOLD_SEED");
    let s = Scratch::new("fold-round-trip");
    let names = ["a", "b", "c"];
    let root = unified_guests(&s, &names);
    let mut mounts = MountedGuests::default();
    let points: Vec<PathBuf> = names
        .iter()
        .map(|n| mount_guest(&root, n, &mut mounts))
        .collect();
    let others_before: Vec<Manifest> = points[1..].iter().map(|p| manifest(p)).collect();

    let mut changes = Changes::new(&points[0], seed);
    changes.avoid = ["usr/lib/pkg2", "usr/share/doc", "usr/share/extra"]
        .map(PathBuf::from)
        .into();
    scripted_changes(&points[0]);
    changes.run(400, MIXED);
    eprintln!("random changes through a's rootfs: {:?}", changes.made);
    let want = manifest(&points[0]);
    umount_guest(&root, "a");

    // The upper layer holds what the kernel makes of it (design fact 11).
    let upper = guest_dir(&root, "a", "upper");
    let wh = fs::symlink_metadata(upper.join("usr/lib/pkg2")).unwrap();
    assert!(
        wh.file_type().is_char_device() && wh.rdev() == 0,
        "rm -rf of a lower dir"
    );
    assert_eq!(
        xattr::get(upper.join("usr/share/doc"), "trusted.overlay.opaque").unwrap(),
        Some(b"y".to_vec()),
        "rm -rf d; mkdir d"
    );
    assert_same_view(
        &want,
        &merged_manifest(&root, "a"),
        "merged view when unmounted",
    );

    let report = fold_json(&root, "a", &[]);
    assert_eq!(report["upper_emptied"], true, "{report:#}");
    assert_eq!(report["failures"], serde_json::json!([]), "{report:#}");
    for key in ["moved", "deleted", "directories"] {
        assert!(report[key].as_u64().unwrap() > 0, "{key} in {report:#}");
    }
    assert_eq!(names_in(&upper), Vec::<String>::new(), "upper after fold");
    let work = guest_dir(&root, "a", "work");
    assert_eq!(names_in(&work), Vec::<String>::new(), "work after fold");
    let base_a = base(&root, "a");
    assert_no_overlay_traces(&base_a);
    assert_same_view(&want, &manifest(&base_a), "base after fold");
    assert_same_view(
        &want,
        &merged_manifest(&root, "a"),
        "merged view after fold",
    );

    cowherd(&root).args(["unify", "a"]).assert().success();
    let point = mount_guest(&root, "a", &mut mounts);
    assert_same_view(&want, &manifest(&point), "a after fold, unify, mount");

    // What a wrote like b and c have it is shared with them now.
    let b_copy = ino(&base(&root, "b").join(SHARED_LATER));
    assert!(
        store_inodes(&root).contains_key(&b_copy),
        "b's copy is a store link"
    );
    assert_eq!(
        ino(&base_a.join(SHARED_LATER)),
        b_copy,
        "a's copy is b's inode"
    );
    for (p, before) in points[1..].iter().zip(&others_before) {
        assert_same_view(before, &manifest(p), &format!("{}", p.display()));
    }
    for n in names {
        umount_guest(&root, n);
    }
}

/// The kill test's guest: 24 packages × 4 directories × 12 files of 0.5–3 KiB.
fn crash_tree(dir: &Path) {
    let mut t = TreeBuilder::new(dir);
    for p in 0..24 {
        for d in 0..4 {
            for f in 0..12 {
                let tag = format!("crash-{p}-{d}-{f}");
                t.file(
                    format!("usr/lib/pkg{p:02}/d{d}/f{f:02}"),
                    &content(&tag, 500 + (f * 211) % 2500),
                );
            }
        }
    }
    t.file("etc/hostname", b"crash\n");
    t.finish();
}

/// How a run of [`fold_killed_after`] ended.
enum Ended {
    /// SIGKILL landed while it was running.
    Killed,
    /// It exited on its own, successfully, after this long.
    Finished(Duration),
}

/// Runs `cowherd fold NAME` (stderr to `log`) and sends it SIGKILL after `delay` unless it
/// exited by then (`None`: let it finish). A run that exits on its own must succeed.
fn fold_killed_after(root: &Path, name: &str, delay: Option<Duration>, log: &Path) -> Ended {
    use std::os::unix::process::ExitStatusExt;
    let started = Instant::now();
    let mut child = KillOnDrop::spawn(
        Command::new(cowherd_bin())
            .env_remove("COWHERD_ROOT")
            .arg("--root")
            .arg(root)
            .args(["fold", name])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(File::create(log).unwrap()),
    );
    let mut exited = false;
    if let Some(delay) = delay {
        // Sleep in small steps, so that a run ending early is noticed.
        while !exited && started.elapsed() < delay {
            exited = child.0.try_wait().unwrap().is_some();
            sleep(Duration::from_millis(1).min(delay.saturating_sub(started.elapsed())));
        }
        if !exited {
            // ESRCH only if it exited in the meantime.
            let _ = kill(Pid::from_raw(child.id() as i32), Signal::SIGKILL);
        }
    }
    let status = child.0.wait().unwrap();
    let took = started.elapsed();
    if status.signal() == Some(libc::SIGKILL) {
        return Ended::Killed;
    }
    assert!(
        status.success(),
        "fold exited on its own with {status}: {}",
        fs::read_to_string(log).unwrap_or_default()
    );
    Ended::Finished(took)
}

/// At least this many SIGKILLs must land while `fold` runs.
const KILLS: usize = 50;
/// Kills aimed at one batch of changes before a run is let finish.
const KILLS_PER_BATCH: usize = 8;
/// New files per batch, in `usr/new/b<N>/d<DD>/`.
const NEW_DIRS: usize = 30;
const NEW_PER_DIR: usize = 150;
/// Random changes per batch, besides [`STRUCTURE`].
const BATCH: usize = 1200;

/// One batch of changes through the kill test's guest, mounted at `point`: `NEW_DIRS` ×
/// `NEW_PER_DIR` new small files, the previous batch's new files removed (`rm -rf` of a lower
/// directory), [`STRUCTURE`] and `BATCH` random changes.
fn crash_batch(point: &Path, n: usize, c: &mut Changes) {
    for d in 0..NEW_DIRS {
        let dir = point.join(format!("usr/new/b{n}/d{d:02}"));
        fs::create_dir_all(&dir).unwrap();
        for f in 0..NEW_PER_DIR {
            let bytes = c.bytes(200);
            write(&dir.join(format!("f{f:03}")), &bytes);
        }
    }
    if n > 1 {
        fs::remove_dir_all(point.join(format!("usr/new/b{}", n - 1))).unwrap();
    }
    for &op in STRUCTURE {
        c.apply(op);
    }
    c.run(BATCH, BULK);
}

#[test]
fn sigkill_during_fold_never_changes_the_merged_view() {
    assert_root();
    own_mount_namespace();
    let seed = seed("COWHERD_FOLD_SEED");
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x6b11);
    let s = Scratch::new("fold-crash");
    let root = init_root(s.path());
    adopt_built(&root, s.path(), "a", crash_tree);
    cowherd(&root).args(["unify", "a"]).assert().success();
    let (upper, work, base_a) = (
        guest_dir(&root, "a", "upper"),
        guest_dir(&root, "a", "work"),
        base(&root, "a"),
    );
    let mut mounts = MountedGuests::default();
    // What a run costs before it touches anything: a fold with nothing to fold.
    let t = Instant::now();
    cowherd(&root).args(["fold", "a"]).assert().success();
    let idle = t.elapsed();

    let started = Instant::now();
    let mut changes: Option<Changes> = None;
    // How long an uninterrupted fold of one batch takes: measured on the first batch, doubled
    // (the later ones also delete the files of the batch before); then on each batch whose
    // first run ended before its kill, with a quarter more.
    let mut window: Option<Duration> = None;
    let (mut landed, mut past_start, mut runs, mut batches) = (0, 0, 0, 0);
    let mut want = Manifest::new();
    while landed < KILLS {
        batches += 1;
        assert!(
            batches <= 20,
            "{landed} kills landed in {runs} runs of 20 batches"
        );
        let point = mount_guest(&root, "a", &mut mounts);
        let c = changes.get_or_insert_with(|| Changes::new(&point, seed));
        crash_batch(&point, batches, c);
        // A file the guest makes immutable: overlayfs keeps the flag in `protattr`, fold
        // journals it and sets it on base once the old upper is gone — also across kills.
        let pinned = point.join(format!("pinned-{batches}"));
        write(&pinned, b"pinned\n");
        chattr("+i", &pinned);
        umount_guest(&root, "a");
        want = merged_manifest(&root, "a");
        // About what this batch's fold still needs (`None`: let it finish).
        let mut left = window;
        let mut kills = 0;
        loop {
            runs += 1;
            let delay =
                left.map(|l| Duration::from_micros(rng.random_range(0..=l.as_micros() as u64)));
            let log = s.join(format!("fold-{runs}.log"));
            let ended = fold_killed_after(&root, "a", delay, &log);
            let what =
                format!("merged view after run {runs}, killed after {delay:?} (seed {seed})");
            assert_same_view(&want, &merged_manifest(&root, "a"), &what);
            match ended {
                Ended::Finished(took) => {
                    if kills == 0 {
                        window = Some(if batches == 1 {
                            2 * took
                        } else {
                            took + took / 4
                        });
                    }
                    break;
                }
                Ended::Killed => {
                    landed += 1;
                    kills += 1;
                    let (l, d) = (left.unwrap(), delay.unwrap());
                    past_start += usize::from(d > idle);
                    // The next run redoes its start and skips what this one did.
                    left = (kills < KILLS_PER_BATCH).then(|| l.min(l + idle - d).max(2 * idle));
                }
            }
        }
        assert_eq!(
            names_in(&upper),
            Vec::<String>::new(),
            "upper after batch {batches}"
        );
        assert_eq!(
            names_in(&work),
            Vec::<String>::new(),
            "work after batch {batches}"
        );
        for b in 1..=batches {
            let pinned = base_a.join(format!("pinned-{b}"));
            assert!(
                is_immutable(&pinned),
                "{pinned:?} lost its flag by batch {batches}"
            );
        }
    }
    eprintln!(
        "{landed} kills landed in {runs} runs over {batches} batches ({past_start} later than an \
         idle fold's {idle:?}); kills aimed within {window:?}; {:?} in all; \
         random changes: {:?}",
        started.elapsed(),
        changes.map(|c| c.made).unwrap_or_default()
    );
    assert!(
        past_start >= KILLS / 2,
        "only {past_start} kills landed after fold's start"
    );

    let report = fold_json(&root, "a", &[]);
    assert_eq!(report["upper_emptied"], true, "{report:#}");
    assert_eq!(report["failures"], serde_json::json!([]), "{report:#}");
    assert_eq!(
        names_in(&upper),
        Vec::<String>::new(),
        "upper after the last fold"
    );
    assert!(
        !root.join("guests/a/tmp").exists(),
        "tmp/ left after the last fold"
    );
    assert_same_view(
        &want,
        &merged_manifest(&root, "a"),
        "merged view after the last fold",
    );
    assert_same_view(&want, &manifest(&base_a), "base after the last fold");
    assert_no_overlay_traces(&base_a);
}

#[test]
fn fold_dry_run_lists_what_would_move_and_changes_nothing() {
    assert_root();
    own_mount_namespace();
    let s = Scratch::new("fold-dry-run");
    let root = unified_guests(&s, &["a", "b"]);
    let mut mounts = MountedGuests::default();
    scripted_changes(&mount_guest(&root, "a", &mut mounts));
    umount_guest(&root, "a");
    let (guest, upper, base_a) = (
        root.join("guests/a"),
        guest_dir(&root, "a", "upper"),
        base(&root, "a"),
    );
    let view = merged_manifest(&root, "a");
    let (inodes, base_before, upper_before) =
        (inode_map(&guest), manifest(&base_a), manifest(&upper));

    let report = fold_json(&root, "a", &["--dry-run"]);
    assert_eq!(report["dry_run"], true, "{report:#}");
    assert_eq!(report["upper_emptied"], false, "{report:#}");
    let entries: BTreeSet<(String, String)> = report["entries"]
        .as_array()
        .unwrap_or_else(|| panic!("no entries in {report:#}"))
        .iter()
        .map(|e| {
            (
                e["action"].as_str().unwrap().into(),
                e["path"].as_str().unwrap().into(),
            )
        })
        .collect();
    for (action, path) in [
        ("move", "/usr/share/new.txt"),
        ("move", "/usr/share/extra/bc.bin"),
        ("move", "/usr/lib/pkg0/sub0/deep/f0.so"),
        ("move", "/usr/bin/sh"),
        ("move", "/usr/lib/pkg3/sub1"),
        ("delete", "/usr/lib/pkg0/sub1/deep/f0.so"),
        ("delete", "/usr/lib/pkg2"),
        ("delete", "/usr/share/old"),
        ("delete", "/usr/share/fifo"),
        ("create", "/usr/newdir"),
        ("create", "/usr/newdir/a/b"),
        ("create", "/usr/share/renamed"),
        ("update", "/usr/lib/pkg1"),
        ("update", "/usr/share/tagged-dir"),
        ("replace", "/usr/share/doc"),
        ("replace", "/usr/lib/pkg3/sub2/deep/f1.so"),
        ("replace", "/usr/lib/current"),
    ] {
        assert!(
            entries.contains(&(action.into(), path.into())),
            "no {action} {path} in the dry run's entries:\n{entries:#?}"
        );
    }
    let count = |action: &str| entries.iter().filter(|(a, _)| a == action).count() as u64;
    assert_eq!(report["moved"], count("move"), "{report:#}");
    assert_eq!(
        report["directories"],
        count("create") + count("update") + count("replace"),
        "{report:#}"
    );

    assert_eq!(
        inode_map(&guest),
        inodes,
        "inodes of guests/a after a dry run"
    );
    assert_same_view(&base_before, &manifest(&base_a), "base after a dry run");
    assert_same_view(&upper_before, &manifest(&upper), "upper after a dry run");
    assert_same_view(
        &view,
        &merged_manifest(&root, "a"),
        "merged view after a dry run",
    );
}

#[test]
fn fold_refuses_a_mounted_guest() {
    assert_root();
    own_mount_namespace();
    let s = Scratch::new("fold-mounted");
    let root = unified_guests(&s, &["a"]);
    let mut mounts = MountedGuests::default();
    let point = mount_guest(&root, "a", &mut mounts);
    write(&point.join("usr/share/new.txt"), b"written while running\n");
    fs::remove_dir_all(point.join("usr/lib/pkg2")).unwrap();
    let layers = [base(&root, "a"), guest_dir(&root, "a", "upper")];
    let before: Vec<(InodeMap, Manifest)> =
        layers.iter().map(|l| (inode_map(l), manifest(l))).collect();
    let view = manifest(&point);

    let out = cowherd(&root).args(["fold", "a"]).output().unwrap();
    let line = assert_one_line_error(&out, 1);
    let shown = point.display().to_string();
    assert!(
        line.contains(&shown),
        "the error names the mount {shown}: {line}"
    );
    assert!(
        line.contains("cowherd umount a"),
        "the error says what to do: {line}"
    );

    assert!(
        !root.join("guests/a/tmp").exists(),
        "fold made tmp/ of a mounted guest"
    );
    for (layer, (inodes, m)) in layers.iter().zip(&before) {
        assert_eq!(&inode_map(layer), inodes, "{}", layer.display());
        assert_same_view(m, &manifest(layer), &layer.display().to_string());
    }
    assert_same_view(&view, &manifest(&point), "the running guest");
    assert_eq!(listed_mount(&root, "a")["state"], "mounted");
    umount_guest(&root, "a");
}

#[test]
fn mount_fold_folds_unifies_and_mounts() {
    assert_root();
    own_mount_namespace();
    let s = Scratch::new("fold-mount-fold");
    let root = unified_guests(&s, &["a", "b", "c"]);
    let mut mounts = MountedGuests::default();
    let point = mount_guest(&root, "a", &mut mounts);
    scripted_changes(&point);
    let want = manifest(&point);
    umount_guest(&root, "a");

    cowherd(&root)
        .args(["mount", "--fold", "a"])
        .assert()
        .success();
    assert_eq!(listed_mount(&root, "a")["state"], "mounted");
    let upper = guest_dir(&root, "a", "upper");
    assert_eq!(
        names_in(&upper),
        Vec::<String>::new(),
        "upper of the fresh mount"
    );
    assert_same_view(&want, &manifest(&point), "a after mount --fold");
    assert_eq!(
        names_in(&upper),
        Vec::<String>::new(),
        "upper after reading a"
    );
    let b_copy = ino(&base(&root, "b").join(SHARED_LATER));
    assert!(
        store_inodes(&root).contains_key(&b_copy),
        "b's copy is a store link"
    );
    assert_eq!(
        ino(&base(&root, "a").join(SHARED_LATER)),
        b_copy,
        "a's copy is b's inode"
    );
    assert_no_overlay_traces(&base(&root, "a"));
    umount_guest(&root, "a");
}

/// A guest's `chattr +i` / `chattr +a` on its files and directories is part of what it sees;
/// overlayfs keeps it in upper as a `trusted.overlay.protattr` xattr, not as an inode flag.
#[test]
fn fold_keeps_immutable_and_append_only_flags_set_inside_the_guest() {
    assert_root();
    own_mount_namespace();
    let s = Scratch::new("fold-protattr");
    let _unflag = ClearFlagsOnDrop(s.path().to_path_buf());
    let root = unified_guests(&s, &["a"]);
    let mut mounts = MountedGuests::default();
    let point = mount_guest(&root, "a", &mut mounts);
    write(&point.join("usr/share/pinned.conf"), b"do not touch\n");
    fs::create_dir(point.join("usr/share/journal")).unwrap();
    let flagged = [
        ("+i", "usr/share/pinned.conf"),
        ("+a", "usr/lib/pkg0/sub0/deep/f0.so"),
        ("+a", "usr/share/journal"),
    ];
    for (flag, rel) in flagged {
        chattr(flag, &point.join(rel));
    }
    let flags = |point: &Path| -> Vec<String> {
        flagged
            .iter()
            .map(|(_, rel)| inode_flags(&point.join(rel)))
            .collect()
    };
    let before = flags(&point);
    for ((flag, rel), f) in flagged.iter().zip(&before) {
        assert!(f.contains(&flag[1..]), "{rel}: {f} after chattr {flag}");
    }
    umount_guest(&root, "a");
    let upper = guest_dir(&root, "a", "upper");
    assert_eq!(
        xattr::get(
            upper.join("usr/share/pinned.conf"),
            "trusted.overlay.protattr"
        )
        .unwrap(),
        Some(b"i".to_vec()),
        "where overlayfs keeps a guest's chattr +i"
    );

    let report = fold_json(&root, "a", &[]);
    assert_eq!(report["upper_emptied"], true, "{report:#}");
    let point = mount_guest(&root, "a", &mut mounts);
    assert_eq!(
        flags(&point),
        before,
        "inode flags of {:?} after fold and mount",
        flagged.map(|(_, rel)| rel)
    );
    umount_guest(&root, "a");
}

/// overlayfs (Linux ≥ 6.7) lets a guest set `trusted.overlay.*` xattrs of its own — the layers
/// of a nested overlay or a composefs image it builds — and stores them escaped, as
/// `trusted.overlay.overlay.*`, in upper; a lower layer's escaped xattrs show the same way.
#[test]
fn fold_keeps_the_guests_own_trusted_overlay_xattrs() {
    assert_root();
    own_mount_namespace();
    let s = Scratch::new("fold-escaped");
    let root = unified_guests(&s, &["a"]);
    let mut mounts = MountedGuests::default();
    let point = mount_guest(&root, "a", &mut mounts);
    let layer = point.join("srv/image/layer");
    fs::create_dir_all(layer.join("etc")).unwrap();
    write(&layer.join("etc/issue"), b"nested\n");
    xattr::set(layer.join("etc"), "trusted.overlay.opaque", b"y").unwrap();
    xattr::set(layer.join("etc/issue"), "trusted.overlay.metacopy", b"").unwrap();
    xattr::set(
        point.join("usr/lib/tagged.so"),
        "trusted.overlay.origin",
        b"guest",
    )
    .unwrap();
    let want = manifest(&point);
    umount_guest(&root, "a");
    let upper = guest_dir(&root, "a", "upper");
    assert_eq!(
        xattr::get(
            upper.join("srv/image/layer/etc"),
            "trusted.overlay.overlay.opaque"
        )
        .unwrap(),
        Some(b"y".to_vec()),
        "where overlayfs keeps a guest's trusted.overlay.opaque"
    );
    assert_same_view(
        &want,
        &merged_manifest(&root, "a"),
        "merged view before fold",
    );

    let report = fold_json(&root, "a", &[]);
    assert_eq!(report["upper_emptied"], true, "{report:#}");
    assert_same_view(
        &want,
        &merged_manifest(&root, "a"),
        "merged view after fold",
    );
    let point = mount_guest(&root, "a", &mut mounts);
    assert_same_view(&want, &manifest(&point), "a after fold and mount");
    umount_guest(&root, "a");
}

/// Regression: a base entry carrying `chattr +i` (moved down by an earlier fold) blocked the next
/// fold of that path for good, and `mount --fold` then refused to start the guest.
#[test]
fn fold_replaces_a_base_entry_that_an_earlier_fold_made_immutable() {
    assert_root();
    own_mount_namespace();
    let s = Scratch::new("fold-reflag");
    let _unflag = ClearFlagsOnDrop(s.path().to_path_buf());
    let root = unified_guests(&s, &["a"]);
    let mut mounts = MountedGuests::default();
    let point = mount_guest(&root, "a", &mut mounts);
    write(&point.join("usr/share/resolv.conf"), b"nameserver 1\n");
    fs::create_dir(point.join("usr/share/locked")).unwrap();
    chattr("+i", &point.join("usr/share/resolv.conf"));
    chattr("+a", &point.join("usr/share/locked"));
    umount_guest(&root, "a");
    fold_json(&root, "a", &[]);
    assert!(is_immutable(
        &base(&root, "a").join("usr/share/resolv.conf")
    ));

    // The guest lifts the flags and changes both paths.
    let point = mount_guest(&root, "a", &mut mounts);
    chattr("-i", &point.join("usr/share/resolv.conf"));
    write(&point.join("usr/share/resolv.conf"), b"nameserver 2\n");
    chattr("-a", &point.join("usr/share/locked"));
    chmod(&point.join("usr/share/locked"), 0o750);
    let want = manifest(&point);
    umount_guest(&root, "a");
    let report = fold_json(&root, "a", &[]);
    assert_eq!(report["failures"], serde_json::json!([]), "{report:#}");
    assert_eq!(report["upper_emptied"], true, "{report:#}");
    let b = base(&root, "a");
    assert_eq!(
        fs::read(b.join("usr/share/resolv.conf")).unwrap(),
        b"nameserver 2\n"
    );
    assert!(!inode_flags(&b.join("usr/share/resolv.conf")).contains('i'));
    assert!(!inode_flags(&b.join("usr/share/locked")).contains('a'));
    assert_same_view(
        &want,
        &merged_manifest(&root, "a"),
        "merged view after the second fold",
    );
}

/// Regression: folding a guest that was never mounted gave base's root the new upper root's
/// owner, mode, mtime and xattrs (`mount --fold` right after `adopt` does exactly that).
#[test]
fn fold_of_a_guest_never_mounted_keeps_its_root_metadata() {
    assert_root();
    own_mount_namespace();
    let s = Scratch::new("fold-pristine");
    let root = init_root(s.path());
    adopt_built(&root, s.path(), "a", |d| {
        guest_tree(d, 0);
        chown(d, 5, 6);
        chmod(d, 0o711);
        xattr::set(d, "user.keep", b"1").unwrap();
        set_mtime(d, (1_500_000_000, 7));
    });
    let before = manifest(&base(&root, "a"));
    let report = fold_json(&root, "a", &[]);
    assert_eq!(report["failures"], serde_json::json!([]), "{report:#}");
    assert_same_view(
        &before,
        &manifest(&base(&root, "a")),
        "base after folding nothing",
    );
    let mut mounts = MountedGuests::default();
    let point = mount_guest(&root, "a", &mut mounts);
    assert_same_view(&before, &manifest(&point), "what the guest sees");
}

/// A guest can make a directory tree deeper than fold descends: it is reported and stays in
/// the upper layer, the merged view is unchanged, and `mount --fold` still starts the guest.
#[test]
fn a_tree_too_deep_to_fold_is_reported_and_the_guest_still_starts() {
    assert_root();
    own_mount_namespace();
    let s = Scratch::new("fold-deep");
    let root = unified_guests(&s, &["a"]);
    let mut mounts = MountedGuests::default();
    let point = mount_guest(&root, "a", &mut mounts);
    let mut deep = point.join("srv");
    for _ in 0..300 {
        deep.push("d");
    }
    fs::create_dir_all(&deep).unwrap();
    write(&deep.join("bottom"), b"deep\n");
    write(&point.join("usr/share/shallow"), b"shallow\n");
    umount_guest(&root, "a");
    let want = merged_manifest(&root, "a");
    let out = cowherd(&root)
        .args(["fold", "a", "--json"])
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(3),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report = json_of(&out);
    let failures = report[0]["failures"].to_string();
    assert!(failures.contains("deeper than 256"), "{failures}");
    assert_eq!(report[0]["upper_emptied"], false);
    assert_same_view(
        &want,
        &merged_manifest(&root, "a"),
        "merged view after a partial fold",
    );
    mounts.watch(guest_dir(&root, "a", "rootfs"));
    cowherd(&root)
        .args(["mount", "--fold", "a"])
        .assert()
        .success();
    assert_eq!(fs::read(deep.join("bottom")).unwrap(), b"deep\n");
}
