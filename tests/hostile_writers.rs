//! Hostile guest trees against every command that writes: symlinks aimed at host files, host
//! directories and other guests (absolute and relative, in base and in upper), hardlinks to
//! host files, a filesystem mounted inside a guest, names with newlines and invalid UTF-8, a
//! path longer than `PATH_MAX`, 2,000-deep nesting, 100,000 entries in one directory, and a
//! directory swapped for a symlink to a host directory while the command runs.
//!
//! The host is stood for by canaries in the test's scratch directory, outside the root but on
//! its filesystem (so a guest can hold hardlinks to them), plus a few real host files. Their
//! content, inode, link count, mode, owner, mtime, inode flags and xattrs are compared before
//! and after every command: any change fails. Every command must succeed, report per-path
//! failures (exit 3), or fail with a one-line error; never panic, hang or touch a canary.

mod common;

use std::collections::BTreeMap;
use std::ffi::{OsStr, OsString};
use std::fs::{self, File};
use std::io::Write;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use nix::fcntl::{OFlag, RenameFlags};
use nix::sys::stat::Mode;
use serde_json::Value;

use common::*;

// ---------------------------------------------------------------------------------------------
// The host's canaries
// ---------------------------------------------------------------------------------------------

/// What a host secret holds; no command may copy it into a guest, an export or the store.
const SECRET: &[u8] = b"HOST SECRET: cowherd must never read this into a guest nor write it\n";

/// Files of the swap directory, in the host canary directory and in every guest, equal in
/// content and metadata: a command that followed a swapped-in symlink would find perfect
/// duplicates to link, split or overwrite.
const SWAP_FILES: usize = 8;

/// How many `../` make a relative symlink reach `/` from anywhere in a scratch tree.
const UP: usize = 64;

/// Real host files watched beside the canaries (guests hold symlinks to them). Not
/// `/etc/passwd` or `/etc/shadow`, which a package installed meanwhile on the host may change.
const REAL_HOST_FILES: [&str; 1] = ["/usr/bin/true"];

fn swap_bytes(k: usize) -> Vec<u8> {
    content(&format!("swap-{k}"), 3000 + k)
}

fn tool_bytes() -> Vec<u8> {
    content("hostile-tool", 20_000)
}

fn lib_bytes() -> Vec<u8> {
    content("hostile-lib", 30_000)
}

/// The host's canaries, in `<scratch>/host`.
struct Canaries {
    dir: PathBuf,
    /// 0600, owner 1234:1234, `chattr +A`, a user xattr: a host secret.
    secret: PathBuf,
    /// Equal in content and metadata to every guest's `/usr/bin/tool`.
    tool: PathBuf,
    /// `chattr +i`.
    immutable: PathBuf,
    /// Hardlinked into guests: its link count may drop when a guest drops its link, never rise.
    linked: PathBuf,
    /// The host file an `exec`ed command aims at.
    shadow: PathBuf,
    /// A directory (0750, 1234:1234, xattr) holding the swap files and a subdirectory.
    hostdir: PathBuf,
    /// More trees to watch (the contents of a filesystem mounted inside a guest).
    extra: Vec<PathBuf>,
}

fn host_canaries(s: &Scratch) -> Canaries {
    let dir = s.join("host");
    let mut t = TreeBuilder::new(&dir);
    t.file_with("secret.conf", SECRET, 0o600, 1234, 1234, DEFAULT_MTIME)
        .xattr("secret.conf", "user.canary", b"secret")
        .file_with("tool", &tool_bytes(), 0o755, 0, 0, DEFAULT_MTIME)
        .file("immutable.conf", &content("immutable", 5000))
        .file("linked", &content("linked", 9000))
        .file_with(
            "shadow-canary",
            b"host shadow\n",
            0o640,
            0,
            42,
            DEFAULT_MTIME,
        );
    for k in 0..SWAP_FILES {
        t.file(format!("dir/a{k}"), &swap_bytes(k));
    }
    t.file("dir/sub/c", &content("host-c", 2000))
        .owner_mode("dir", 1234, 1234, 0o750)
        .xattr("dir", "user.canary-dir", b"dir");
    t.finish();
    drop(t);
    set_mtime(&dir.join("dir"), DEFAULT_MTIME);
    chattr("+A", &dir.join("secret.conf"));
    chattr("+i", &dir.join("immutable.conf"));
    Canaries {
        secret: dir.join("secret.conf"),
        tool: dir.join("tool"),
        immutable: dir.join("immutable.conf"),
        linked: dir.join("linked"),
        shadow: dir.join("shadow-canary"),
        hostdir: dir.join("dir"),
        dir,
        extra: Vec::new(),
    }
}

/// What is compared of one host path.
#[derive(Clone, Debug, PartialEq, Eq)]
struct CanaryState {
    dev: u64,
    ino: u64,
    nlink: u64,
    mode: u32,
    uid: u32,
    gid: u32,
    size: u64,
    mtime: (i64, i64),
    hash: Option<blake3::Hash>,
    target: Option<PathBuf>,
    xattrs: BTreeMap<OsString, Vec<u8>>,
    flags: String,
}

type Snapshot = BTreeMap<PathBuf, CanaryState>;

/// `lsattr -d` of a file or directory; what lsattr says when it cannot (a tmpfs).
fn flags_of(p: &Path) -> String {
    let out = Command::new("lsattr").arg("-d").arg(p).output().unwrap();
    if out.status.success() {
        String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .next()
            .unwrap_or_default()
            .to_string()
    } else {
        format!(
            "unreadable: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )
    }
}

fn canary_state(p: &Path) -> CanaryState {
    let m = fs::symlink_metadata(p).unwrap_or_else(|e| panic!("lstat {}: {e}", p.display()));
    let ft = m.file_type();
    let hash = ft.is_file().then(|| {
        blake3::hash(&fs::read(p).unwrap_or_else(|e| panic!("read {}: {e}", p.display())))
    });
    let xattrs = xattr::list(p)
        .unwrap()
        .filter_map(|k| xattr::get(p, &k).unwrap().map(|v| (k, v)))
        .collect();
    CanaryState {
        dev: m.dev(),
        ino: m.ino(),
        nlink: m.nlink(),
        mode: m.mode(),
        uid: m.uid(),
        gid: m.gid(),
        size: if ft.is_dir() { 0 } else { m.size() },
        mtime: (m.mtime(), m.mtime_nsec()),
        hash,
        target: ft.is_symlink().then(|| fs::read_link(p).unwrap()),
        xattrs,
        flags: if ft.is_file() || ft.is_dir() {
            flags_of(p)
        } else {
            String::new()
        },
    }
}

impl Canaries {
    /// Every path below the canary directory and the extra trees, and the real host files.
    fn snapshot(&self) -> Snapshot {
        let mut out = Snapshot::new();
        for top in std::iter::once(&self.dir).chain(&self.extra) {
            for e in walkdir::WalkDir::new(top).follow_links(false) {
                let e = e.unwrap_or_else(|e| panic!("walk {}: {e}", top.display()));
                out.insert(e.path().to_path_buf(), canary_state(e.path()));
            }
        }
        for p in REAL_HOST_FILES.map(Path::new) {
            if p.exists() {
                out.insert(p.to_path_buf(), canary_state(p));
            }
        }
        out
    }

    /// Fails naming every canary that changed since `before`. The hardlinked canary's link
    /// count may only drop (a guest dropping its own link), never rise (cowherd linking a host
    /// inode), and never below 1.
    fn assert_unchanged(&self, before: &Snapshot, what: &str) {
        let after = self.snapshot();
        let mut problems = Vec::new();
        for (p, b) in before {
            let Some(a) = after.get(p) else {
                problems.push(format!("{}: GONE", p.display()));
                continue;
            };
            let mut a = a.clone();
            if *p == self.linked && a.nlink <= b.nlink && a.nlink >= 1 {
                a.nlink = b.nlink;
            }
            if a != *b {
                problems.push(format!(
                    "{}:\n    before {b:?}\n    after  {a:?}",
                    p.display()
                ));
            }
        }
        for p in after.keys().filter(|p| !before.contains_key(*p)) {
            problems.push(format!("{}: NEW on the host", p.display()));
        }
        assert!(
            problems.is_empty(),
            "{what}: host canaries changed:\n  {}",
            problems.join("\n  ")
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Hostile trees
// ---------------------------------------------------------------------------------------------

/// The expensive pieces of a hostile tree.
#[derive(Clone, Copy, Debug)]
struct Heavy {
    /// Entries in `srv/many` (one in 10,000 a symlink to the host secret).
    entries: usize,
    /// Depth of `srv/deep/d/d/…` (a duplicate file and a host symlink at the bottom).
    depth: usize,
    /// `srv/long/…`: 20 directories of 250-byte names, a path longer than `PATH_MAX`.
    long_path: bool,
}

const LIGHT: Heavy = Heavy {
    entries: 0,
    depth: 0,
    long_path: false,
};
const DEEP: Heavy = Heavy {
    entries: 0,
    depth: 2000,
    long_path: true,
};
const HUGE: Heavy = Heavy {
    entries: 100_000,
    depth: 2000,
    long_path: true,
};

/// `../` × [`UP`] followed by `abs` without its leading `/`: reaches `abs` from anywhere.
fn relative_to(abs: &Path) -> Vec<u8> {
    let mut v = b"../".repeat(UP);
    v.extend_from_slice(abs.strip_prefix("/").unwrap().as_os_str().as_bytes());
    v
}

fn bytes(p: &Path) -> &[u8] {
    p.as_os_str().as_bytes()
}

/// What every guest holds, duplicates of each other and of the host canaries: `/usr/bin/tool`
/// (= the host's `tool`), `/usr/lib/libdup.so`, `/usr/share/swap/a*` (= the host directory's).
fn ordinary(t: &mut TreeBuilder) {
    t.file_with("usr/bin/tool", &tool_bytes(), 0o755, 0, 0, DEFAULT_MTIME)
        .file("usr/lib/libdup.so", &lib_bytes())
        .file("etc/hostname", b"guest\n")
        .dir("proc", 0o555);
    for k in 0..SWAP_FILES {
        t.file(format!("usr/share/swap/a{k}"), &swap_bytes(k));
    }
}

/// A guest nothing hostile is in: the target of the hostile guests' symlinks to another guest.
fn clean_guest(dir: &Path) {
    let mut t = TreeBuilder::new(dir);
    ordinary(&mut t);
    t.file("usr/share/clean/only-here", &content("clean", 7000));
    t.finish();
}

/// Creates `names` as nested directories below `top`, one `mkdirat` + `openat` a level (the
/// whole path may be longer than `PATH_MAX`), then calls `leaf` on the deepest one.
fn fd_chain<'n>(
    top: &Path,
    names: impl Iterator<Item = &'n [u8]>,
    leaf: &mut dyn FnMut(BorrowedFd<'_>),
) {
    fs::create_dir_all(top).unwrap();
    let flags = OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
    let mut fd: OwnedFd = nix::fcntl::open(top, flags, Mode::empty()).unwrap();
    for name in names {
        match nix::sys::stat::mkdirat(
            &fd,
            OsStr::from_bytes(name),
            Mode::from_bits_truncate(0o755),
        ) {
            Ok(()) | Err(nix::errno::Errno::EEXIST) => {}
            Err(e) => panic!("mkdirat below {}: {e}", top.display()),
        }
        fd = nix::fcntl::openat(&fd, OsStr::from_bytes(name), flags, Mode::empty()).unwrap();
    }
    leaf(fd.as_fd());
}

/// At the bottom of a deep or long chain: a duplicate of `/usr/lib/libdup.so` (so that unify
/// wants to link it) and a symlink to the host secret.
fn bottom(c_secret: &Path) -> impl FnMut(BorrowedFd<'_>) + '_ {
    move |dir| {
        let fd = nix::fcntl::openat(
            dir,
            "bottom",
            OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_WRONLY | OFlag::O_CLOEXEC,
            Mode::from_bits_truncate(0o644),
        )
        .unwrap();
        let mut f = File::from(fd);
        f.write_all(&lib_bytes()).unwrap();
        nix::unistd::fchown(&f, Some(0.into()), Some(0.into())).unwrap();
        nix::sys::stat::fchmod(&f, Mode::from_bits_truncate(0o644)).unwrap();
        let (s, ns) = DEFAULT_MTIME;
        nix::sys::stat::futimens(
            &f,
            &nix::sys::time::TimeSpec::UTIME_OMIT,
            &nix::sys::time::TimeSpec::new(s, ns),
        )
        .unwrap();
        nix::unistd::symlinkat(c_secret, dir, "escape").unwrap();
    }
}

/// The expensive pieces ([`Heavy`]) below `dir/srv`.
fn heavy_pieces(dir: &Path, c: &Canaries, heavy: Heavy) {
    if heavy.depth > 0 {
        let names = std::iter::repeat_n(&b"d"[..], heavy.depth);
        fd_chain(&dir.join("srv/deep"), names, &mut bottom(&c.secret));
    }
    if heavy.long_path {
        let long: Vec<Vec<u8>> = (0..20u8)
            .map(|i| {
                let mut n = vec![b'p'; 250];
                n[0] = b'a' + i;
                n
            })
            .collect();
        fd_chain(
            &dir.join("srv/long"),
            long.iter().map(Vec::as_slice),
            &mut bottom(&c.secret),
        );
    }
    if heavy.entries > 0 {
        let many = dir.join("srv/many");
        fs::create_dir_all(&many).unwrap();
        for i in 0..heavy.entries {
            let p = many.join(format!("e{i:06}"));
            if i % 10_000 == 0 {
                std::os::unix::fs::symlink(&c.secret, &p).unwrap();
            } else {
                File::create(&p).unwrap();
            }
        }
    }
}

/// Plants everything hostile in a guest tree at `dir` (base or source). `other_guest` is
/// another guest's base.
///
/// Symlinks (absolute and relative) to a host file, to a host directory and to another guest;
/// `/`, `../..` and real host files (`/etc/shadow`, `/usr/bin/true`); a directory-named symlink
/// (`/usr/share/doc`) and the swap partner `/usr/share/swap-link` (both aimed at the host
/// directory); symlinks where the import fixups write (`/etc/fstab`, network interfaces,
/// inittab, udev rules, `/etc/systemd/system`); a hardlink to a host file; names with a
/// newline and invalid UTF-8 (files, a directory, symlinks); and the [`Heavy`] pieces.
fn hostile_guest(dir: &Path, c: &Canaries, other_guest: &Path, heavy: Heavy) {
    let mut t = TreeBuilder::new(dir);
    ordinary(&mut t);
    let secret = bytes(&c.secret);
    let hostdir = bytes(&c.hostdir);
    t.symlink("usr/lib/abs-file", secret)
        .symlink("usr/lib/abs-tool", bytes(&c.tool))
        .symlink("usr/lib/abs-immutable", bytes(&c.immutable))
        .symlink("usr/lib/abs-dir", hostdir)
        .symlink("usr/lib/rel-file", relative_to(&c.secret))
        .symlink("usr/lib/rel-dir", relative_to(&c.hostdir))
        .symlink("usr/lib/other-abs", bytes(other_guest))
        .symlink("usr/lib/other-rel", relative_to(other_guest))
        .symlink(
            "usr/lib/other-file",
            bytes(&other_guest.join("usr/bin/tool")),
        )
        .symlink("usr/lib/root", "/")
        .symlink("usr/lib/up", "../../../../../../../../../..")
        .symlink("etc/shadow-link", "/etc/shadow")
        .symlink("usr/bin/true-link", "/usr/bin/true")
        .symlink("usr/share/doc", hostdir)
        .symlink("usr/share/swap-link", hostdir)
        // Where the import fixups write.
        .symlink("etc/fstab", secret)
        .symlink("etc/network/interfaces", relative_to(&c.secret))
        .symlink("etc/inittab", secret)
        .symlink("etc/udev/rules.d/70-persistent-net.rules", secret)
        .symlink("etc/systemd/system", hostdir)
        // Odd names.
        .file(b"usr/share/names/new\nline", &lib_bytes())
        .file(b"usr/share/names/\xff\xfe", &swap_bytes(0))
        .symlink(b"usr/share/names/to-secret\n\xff", secret)
        .file(b"usr/share/we\nird\xff/inside", &swap_bytes(1))
        .symlink(b"usr/share/we\nird\xff/to-dir", relative_to(&c.hostdir));
    t.finish();
    drop(t);
    fs::create_dir_all(dir.join("usr/share/hl")).unwrap();
    fs::hard_link(&c.linked, dir.join("usr/share/hl/linked")).unwrap();
    heavy_pieces(dir, c, heavy);
}

/// A tmpfs mounted inside a guest tree at `srv/mnt` holding a file; its contents are watched
/// as canaries (they are the host's, not the guest's).
fn mount_inside(c: &mut Canaries, tree: &Path) -> TmpfsMount {
    let m = TmpfsMount::new(&tree.join("srv/mnt"));
    fs::write(m.path().join("mounted-data"), b"belongs to the host\n").unwrap();
    fs::create_dir_all(m.path().join("sub")).unwrap();
    fs::write(m.path().join("sub/more"), SECRET).unwrap();
    c.extra = vec![m.path().to_path_buf()];
    m
}

// ---------------------------------------------------------------------------------------------
// Running commands
// ---------------------------------------------------------------------------------------------

/// `cowherd --root ROOT ARGS…` with a 2-minute limit (a hang fails the test).
fn run(root: &Path, args: &[&OsStr]) -> Output {
    cowherd(root)
        .args(args)
        .timeout(Duration::from_secs(120))
        .output()
        .unwrap_or_else(|e| panic!("cowherd {args:?}: {e} (a hang?)"))
}

fn os(args: &[&str]) -> Vec<OsString> {
    args.iter().map(OsString::from).collect()
}

fn refs(args: &[OsString]) -> Vec<&OsStr> {
    args.iter().map(OsString::as_os_str).collect()
}

/// Whether a line of standard error is the message of a tool cowherd runs (GNU tar, rsync),
/// which cowherd's own error line refers to ("see its messages above").
fn tool_message(line: &str) -> bool {
    ["tar: ", "/usr/bin/tar: ", "rsync: ", "rsync error: "]
        .iter()
        .any(|p| line.starts_with(p))
}

/// What a command may do with hostile input: succeed (0), finish with per-path failures (3),
/// or fail with one line `error: …` (1), after the messages of the tool it ran, if any. Never
/// a panic, a signal or another code. Returns the exit code.
fn outcome(what: &str, out: &Output) -> i32 {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !stderr.contains("panicked") && !stderr.contains("RUST_BACKTRACE"),
        "`{what}` panicked:\n{stderr}"
    );
    let code = out.status.code().unwrap_or_else(|| {
        panic!(
            "`{what}` was killed by a signal: {:?}\n{stderr}",
            out.status
        )
    });
    match code {
        0 | 3 => {}
        1 => {
            let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
            let own: Vec<&str> = lines.iter().copied().filter(|l| !tool_message(l)).collect();
            assert!(
                own.len() == 1 && own[0].starts_with("error:") && lines.last() == own.last(),
                "`{what}` must fail with one line `error: …` (after its tool's messages):\n{stderr}"
            );
        }
        other => panic!(
            "`{what}` exited {other}:\nstdout: {}\nstderr: {stderr}",
            String::from_utf8_lossy(&out.stdout)
        ),
    }
    code
}

/// Runs `args`, checks [`outcome`], and that no canary changed; returns the output.
fn hostile_run(root: &Path, c: &Canaries, args: &[OsString]) -> Output {
    let what = format!("cowherd {}", args.join(OsStr::new(" ")).to_string_lossy());
    let before = c.snapshot();
    let out = run(root, &refs(args));
    eprintln!(
        "{what}: exit {:?}; {}",
        out.status.code(),
        String::from_utf8_lossy(&out.stderr)
            .lines()
            .last()
            .unwrap_or_default()
    );
    c.assert_unchanged(&before, &what);
    outcome(&what, &out);
    out
}

/// A root with the clean guest `other` adopted, and the canaries.
struct Fixture {
    c: Canaries,
    root: PathBuf,
    s: Scratch,
}

impl Fixture {
    fn new(tag: &str) -> Fixture {
        assert_root();
        let s = Scratch::new(tag);
        let c = host_canaries(&s);
        let root = init_root(s.path());
        adopt_built(&root, s.path(), "other", clean_guest);
        Fixture { c, root, s }
    }

    /// Policy: `/usr/bin` immutable (objects get `chattr +i`), the rest as by default.
    fn immutable_usr_bin(&self) {
        let p = self.root.join("policy.toml");
        let policy = fs::read_to_string(&p).unwrap();
        fs::write(
            &p,
            policy.replacen("rules = [", "rules = [\n  \"immutable /usr/bin/**\",", 1),
        )
        .unwrap();
    }

    fn other(&self) -> PathBuf {
        base(&self.root, "other")
    }

    fn add_hostile(&self, name: &str, heavy: Heavy) {
        let other = self.other();
        adopt_built(&self.root, self.s.path(), name, |d| {
            hostile_guest(d, &self.c, &other, heavy)
        });
    }

    fn unify_all(&self) {
        let out = run(&self.root, &refs(&os(&["unify", "--all"])));
        outcome("unify --all", &out);
    }
}

/// The symlinks of a hostile tree are still symlinks with the same targets.
fn assert_symlinks_kept(tree: &Path, c: &Canaries) {
    for (rel, target) in [
        ("usr/lib/abs-file", c.secret.as_path()),
        ("usr/lib/abs-dir", c.hostdir.as_path()),
        ("usr/share/doc", c.hostdir.as_path()),
    ] {
        assert_eq!(
            fs::read_link(tree.join(rel)).ok().as_deref(),
            Some(target),
            "{}: no longer the symlink it was",
            tree.join(rel).display()
        );
    }
}

// ---------------------------------------------------------------------------------------------
// The swap race
// ---------------------------------------------------------------------------------------------

/// A thread exchanging two entries of one directory (`renameat2(RENAME_EXCHANGE)`) in a tight
/// loop: a directory of the guest and a symlink to a host directory. It works through a
/// descriptor of the directory, so it goes on after the guest is renamed (destroy, resync).
struct SwapRace {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<u64>>,
}

impl SwapRace {
    fn start(dir: &Path, a: &'static str, b: &'static str) -> SwapRace {
        let fd: OwnedFd = nix::fcntl::open(
            dir,
            OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .unwrap_or_else(|e| panic!("open {}: {e}", dir.display()));
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut swaps = 0u64;
            while !flag.load(Ordering::Relaxed) {
                match nix::fcntl::renameat2(&fd, a, &fd, b, RenameFlags::RENAME_EXCHANGE) {
                    Ok(()) => swaps += 1,
                    Err(_) => std::thread::yield_now(),
                }
            }
            // Leave the directory where it was, if both are still there.
            if swaps % 2 == 1
                && nix::fcntl::renameat2(&fd, a, &fd, b, RenameFlags::RENAME_EXCHANGE).is_ok()
            {
                swaps += 1;
            }
            swaps
        });
        SwapRace {
            stop,
            thread: Some(thread),
        }
    }

    /// Stops the thread; returns how many exchanges it made.
    fn finish(mut self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.take().unwrap().join().unwrap()
    }
}

impl Drop for SwapRace {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Runs `args` while `dir/swap` and `dir/swap-link` are exchanged; checks the outcome and
/// the canaries; returns the output.
fn raced_run(root: &Path, c: &Canaries, dir: &Path, args: &[OsString]) -> Output {
    let before = c.snapshot();
    let race = SwapRace::start(dir, "swap", "swap-link");
    std::thread::sleep(Duration::from_millis(2));
    let out = run(root, &refs(args));
    let swaps = race.finish();
    let what = format!(
        "cowherd {} racing {swaps} swaps of {}/swap",
        args.join(OsStr::new(" ")).to_string_lossy(),
        dir.display()
    );
    c.assert_unchanged(&before, &what);
    outcome(&what, &out);
    assert!(swaps > 0, "{what}: the race never swapped");
    out
}

/// Mounts `names` with `cowherd mount`; the guard unmounts them on drop.
fn mount(root: &Path, names: &[&str]) -> MountedGuests {
    let mut guard = MountedGuests::default();
    for n in names {
        guard.watch(rootfs(root, n));
    }
    cowherd(root).arg("mount").args(names).assert().success();
    guard
}

// ---------------------------------------------------------------------------------------------
// unify
// ---------------------------------------------------------------------------------------------

/// Hostile cases: the 26 planted entries of [`hostile_guest`] in two guests (100,000 entries
/// in one directory, 2,000 levels, a path over `PATH_MAX`, two hardlinks of one host file),
/// a tmpfs mounted inside a guest, and the swap race over five runs.
#[test]
fn unify_all_never_follows_a_hostile_guest_out_of_its_tree() {
    let mut fx = Fixture::new("h-unify");
    fx.immutable_usr_bin();
    fx.add_hostile("h1", HUGE);
    fx.add_hostile("h2", DEEP);
    let other_before = manifest(&fx.other());

    // A filesystem mounted inside h2: h2 is skipped, the rest unified.
    let mnt = mount_inside(&mut fx.c, &base(&fx.root, "h2"));
    let out = hostile_run(&fx.root, &fx.c, &os(&["unify", "--all", "--json"]));
    assert_eq!(json_of(&out)["skipped_mounted"], serde_json::json!(["h2"]));
    drop(mnt);
    fx.c.extra.clear();

    let out = hostile_run(&fx.root, &fx.c, &os(&["unify", "--all", "--json"]));
    let report = json_of(&out);
    assert!(linked_files(&report) > 0, "nothing was unified: {report:#}");
    // A path longer than PATH_MAX cannot be linked (reported, exit 3); nothing else fails.
    for f in report["failures"].as_array().unwrap() {
        let path = f["path"].as_str().unwrap();
        assert!(path.starts_with("/srv/long/"), "unexpected failure: {f}");
    }
    for g in ["h1", "h2"] {
        let b = base(&fx.root, g);
        assert_symlinks_kept(&b, &fx.c);
        // The guests' own duplicates are shared; the host's equal files are not.
        assert_eq!(
            ino(&b.join("usr/bin/tool")),
            ino(&fx.other().join("usr/bin/tool"))
        );
    }
    assert_same_files(&other_before, &manifest(&fx.other()));

    // The swap race: h1's swap directory (duplicates of the host directory's files) and a
    // symlink to the host directory exchanged while unify runs; fresh inodes each round.
    let share = base(&fx.root, "h1").join("usr/share");
    for round in 0..5 {
        for k in 0..SWAP_FILES {
            rewrite_as_new_inode(&share.join(format!("swap/a{k}")));
        }
        let args = if round % 2 == 0 {
            os(&["unify", "--all"])
        } else {
            os(&["unify", "h1"])
        };
        raced_run(&fx.root, &fx.c, &share, &args);
    }
    assert_same_files(&other_before, &manifest(&fx.other()));
}

// ---------------------------------------------------------------------------------------------
// fold
// ---------------------------------------------------------------------------------------------

/// Gives guest `g` a hostile upper layer: through its overlay (symlinks to the host and to
/// another guest, an opaque directory over a base symlink to the host directory, a whiteout
/// over a base symlink, odd names, changed swap files), then written directly while it is
/// unmounted (a merge directory under a base symlink to the host directory, 2,000 levels and
/// a path over `PATH_MAX`).
fn hostile_upper(fx: &Fixture, g: &str, heavy: Heavy) {
    let c = &fx.c;
    {
        let _m = mount(&fx.root, &[g]);
        let r = rootfs(&fx.root, g);
        let ln = |target: &[u8], rel: &str| {
            std::os::unix::fs::symlink(OsStr::from_bytes(target), r.join(rel)).unwrap()
        };
        ln(bytes(&c.secret), "usr/lib/up-abs-file");
        ln(&relative_to(&c.hostdir), "usr/lib/up-rel-dir");
        ln(bytes(&fx.other()), "usr/lib/up-other");
        ln(&relative_to(&c.tool), "usr/bin/up-rel-tool");
        // An opaque directory over the base symlink /usr/share/doc -> host directory.
        fs::remove_file(r.join("usr/share/doc")).unwrap();
        fs::create_dir(r.join("usr/share/doc")).unwrap();
        fs::write(r.join("usr/share/doc/a0"), b"the guest's own a0").unwrap();
        // A whiteout over a base symlink to a host file.
        fs::remove_file(r.join("usr/lib/abs-file")).unwrap();
        fs::write(
            r.join(OsStr::from_bytes(b"usr/share/names/up\nnew\xfe")),
            b"x",
        )
        .unwrap();
        for k in 0..SWAP_FILES {
            fs::write(
                r.join(format!("usr/share/swap/a{k}")),
                format!("changed {k}"),
            )
            .unwrap();
        }
        fs::write(r.join("usr/share/swap/new-up"), b"new").unwrap();
        umount_ok(&fx.root, &[g]);
    }
    let up = upper(&fx.root, g);
    // A merge directory (no opaque xattr) where base has a symlink to the host directory.
    fs::create_dir_all(up.join("usr/lib/abs-dir/sub")).unwrap();
    fs::write(up.join("usr/lib/abs-dir/planted"), b"planted").unwrap();
    fs::write(up.join("usr/lib/abs-dir/a1"), b"over the host's a1").unwrap();
    fs::write(up.join("usr/lib/abs-dir/sub/c"), b"over the host's sub/c").unwrap();
    fs::create_dir_all(up.join("usr/lib/rel-dir")).unwrap();
    fs::write(up.join("usr/lib/rel-dir/a2"), b"over the host's a2").unwrap();
    // The upper's own swap partner.
    std::os::unix::fs::symlink(&c.hostdir, up.join("usr/share/swap-link")).unwrap();
    heavy_pieces(&up, c, heavy);
}

/// Hostile cases: the base of [`hostile_guest`] (26) and a hostile upper (14, with 2,000
/// levels and a path over `PATH_MAX`), a tmpfs inside the guest, and the swap race (base and
/// upper each swapped, four rounds).
#[test]
fn fold_moves_a_hostile_upper_into_base_without_touching_the_host() {
    let mut fx = Fixture::new("h-fold");
    fx.immutable_usr_bin();
    fx.add_hostile("h1", DEEP);
    fx.unify_all();
    hostile_upper(&fx, "h1", DEEP);
    let other_before = manifest(&fx.other());

    let mnt = mount_inside(&mut fx.c, &base(&fx.root, "h1"));
    let out = hostile_run(&fx.root, &fx.c, &os(&["fold", "h1"]));
    let err = assert_one_line_error(&out, 1);
    assert!(err.contains("srv/mnt"), "{err}");
    drop(mnt);
    fx.c.extra.clear();

    let out = hostile_run(&fx.root, &fx.c, &os(&["fold", "h1", "--json"]));
    eprintln!("fold h1: {}", String::from_utf8_lossy(&out.stdout));
    let b = base(&fx.root, "h1");
    // What moved down is the guest's, and nothing went through a base symlink.
    assert_eq!(
        fs::read_link(b.join("usr/lib/up-abs-file")).unwrap(),
        fx.c.secret
    );
    assert_eq!(
        fs::read(b.join("usr/share/doc/a0")).unwrap(),
        b"the guest's own a0"
    );
    assert!(fs::symlink_metadata(b.join("usr/lib/abs-file")).is_err());
    assert_same_content_and_metadata(&other_before, &manifest(&fx.other()));
    // Again, whatever the first run left (a deep upper stays in upper).
    hostile_run(&fx.root, &fx.c, &os(&["fold", "h1"]));

    // The swap race, in base and in upper at once: a fresh guest each round (a round may
    // leave the symlink where the directory was, as the race made the upper layer say).
    for round in 0..4 {
        let g = format!("r{round}");
        fx.add_hostile(&g, LIGHT);
        {
            let _m = mount(&fx.root, &[&g]);
            let r = rootfs(&fx.root, &g);
            for k in 0..SWAP_FILES {
                fs::write(r.join(format!("usr/share/swap/a{k}")), format!("r{round}")).unwrap();
            }
            fs::write(r.join("usr/share/swap/new"), b"new").unwrap();
            umount_ok(&fx.root, &[&g]);
        }
        let up = upper(&fx.root, &g).join("usr/share");
        std::os::unix::fs::symlink(&fx.c.hostdir, up.join("swap-link")).unwrap();
        let upper_race = SwapRace::start(&up, "swap", "swap-link");
        raced_run(
            &fx.root,
            &fx.c,
            &base(&fx.root, &g).join("usr/share"),
            &os(&["fold", &g]),
        );
        upper_race.finish();
    }
    assert_same_content_and_metadata(&other_before, &manifest(&fx.other()));
}

// ---------------------------------------------------------------------------------------------
// split
// ---------------------------------------------------------------------------------------------

/// Hostile cases: 11 paths through or at symlinks (to host files, the host directory,
/// another guest, `/`, `..`), a hardlink to a host file, a newline name, a non-UTF-8 name,
/// `/usr` and `/srv` (2,000 levels, a path over `PATH_MAX`) walked whole, and the swap race
/// (eight files and the whole directory).
#[test]
fn split_refuses_paths_through_symlinks_and_never_writes_the_host() {
    let fx = Fixture::new("h-split");
    fx.immutable_usr_bin();
    fx.add_hostile("h1", DEEP);
    fx.unify_all();
    let other_before = manifest(&fx.other());

    // Through (or at) a symlink: refused, nothing split.
    for path in [
        "/usr/lib/abs-dir/a0",
        "/usr/lib/rel-dir/a0",
        "/usr/lib/abs-dir",
        "/usr/lib/abs-file",
        "/usr/lib/rel-file",
        "/usr/lib/abs-tool",
        "/usr/lib/other-abs/usr/bin/tool",
        "/usr/lib/other-rel/usr/lib/libdup.so",
        "/usr/share/doc/a0",
        "/usr/lib/root/etc/passwd",
        "/usr/lib/up/etc/shadow",
    ] {
        let out = hostile_run(&fx.root, &fx.c, &os(&["split", "h1", path, "--json"]));
        assert_ne!(
            out.status.code(),
            Some(0),
            "split of {path}, through a symlink, succeeded"
        );
        if out.status.code() == Some(3) {
            let report = json_of(&out);
            assert_eq!(report["split"], serde_json::json!([]), "{path}: {report:#}");
        }
    }
    // Odd but real paths.
    hostile_run(
        &fx.root,
        &fx.c,
        &os(&["split", "h1", "/usr/share/hl/linked"]),
    );
    hostile_run(
        &fx.root,
        &fx.c,
        &os(&["split", "h1", "/usr/share/names/new\nline"]),
    );
    // A non-UTF-8 path cannot be named on the command line: a usage error, nothing else.
    let bad = OsStr::from_bytes(b"/usr/share/names/\xff\xfe");
    let before = fx.c.snapshot();
    let out = run(&fx.root, &[OsStr::new("split"), OsStr::new("h1"), bad]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    fx.c.assert_unchanged(&before, "split of a non-UTF-8 path");
    // Whole directories, with every hostile entry below them.
    hostile_run(&fx.root, &fx.c, &os(&["split", "h1", "/usr"]));
    hostile_run(&fx.root, &fx.c, &os(&["split", "h1", "/srv"]));
    assert_same_content_and_metadata(&other_before, &manifest(&fx.other()));

    // The swap race: another guest's store links split one by one, then the directory.
    fx.add_hostile("h2", LIGHT);
    fx.unify_all();
    let share = base(&fx.root, "h2").join("usr/share");
    for k in 0..SWAP_FILES {
        let path = format!("/usr/share/swap/a{k}");
        raced_run(&fx.root, &fx.c, &share, &os(&["split", "h2", &path]));
    }
    raced_run(
        &fx.root,
        &fx.c,
        &share,
        &os(&["split", "h2", "/usr/share/swap"]),
    );
    assert_same_content_and_metadata(&other_before, &manifest(&fx.other()));
}

// ---------------------------------------------------------------------------------------------
// export
// ---------------------------------------------------------------------------------------------

/// Regular files below `dir` holding the host secret, by path (an export must hold none: no
/// symlink of the guest was followed).
fn secret_copies(dir: &Path) -> Vec<PathBuf> {
    walkdir::WalkDir::new(dir)
        .follow_links(false)
        .into_iter()
        .filter_map(Result::ok)
        .filter(|e| e.file_type().is_file())
        .filter(|e| fs::read(e.path()).is_ok_and(|b| b == SECRET))
        .map(|e| e.into_path())
        .collect()
}

/// Whether `haystack` contains `needle`.
fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// Hostile cases: the base of [`hostile_guest`] (26) and a hostile upper (14) as a tree and
/// as a tarball, a tmpfs inside the guest, a destination that is a symlink to a host file,
/// 2,000 levels and a path over `PATH_MAX`, and the swap race (four rounds).
#[test]
fn export_writes_symlinks_as_symlinks_and_reads_nothing_of_the_host() {
    let mut fx = Fixture::new("h-export");
    fx.add_hostile("h1", LIGHT);
    fx.unify_all();
    hostile_upper(&fx, "h1", LIGHT);
    let other_before = manifest(&fx.other());

    let mnt = mount_inside(&mut fx.c, &base(&fx.root, "h1"));
    let dest = fx.s.join("export-mounted");
    let out = hostile_run(
        &fx.root,
        &fx.c,
        &[os(&["export", "h1"]), vec![dest.clone().into()]].concat(),
    );
    assert_one_line_error(&out, 1);
    drop(mnt);
    fx.c.extra.clear();

    let dest = fx.s.join("export-tree");
    let args = [os(&["export", "h1"]), vec![dest.clone().into()]].concat();
    let out = hostile_run(&fx.root, &fx.c, &args);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    // (usr/lib/abs-dir is a directory now: the upper layer holds one there.)
    assert_eq!(
        fs::read_link(dest.join("usr/lib/abs-tool")).unwrap(),
        fx.c.tool
    );
    assert_eq!(
        fs::read_link(dest.join("usr/share/swap-link")).unwrap(),
        fx.c.hostdir
    );
    assert_eq!(
        fs::read_link(dest.join("usr/lib/up-abs-file")).unwrap(),
        fx.c.secret
    );
    assert_eq!(secret_copies(&dest), Vec::<PathBuf>::new());

    let tarball = fx.s.join("h1.tar");
    let args = [os(&["export", "h1", "--tar"]), vec![tarball.clone().into()]].concat();
    let out = hostile_run(&fx.root, &fx.c, &args);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert!(
        !contains(&fs::read(&tarball).unwrap(), SECRET),
        "the tarball holds the host secret"
    );

    // A destination planted as a symlink to a host file is refused, not written through.
    let planted = fx.s.join("planted.tar");
    std::os::unix::fs::symlink(&fx.c.secret, &planted).unwrap();
    let args = [os(&["export", "h1", "--tar"]), vec![planted.into()]].concat();
    let out = hostile_run(&fx.root, &fx.c, &args);
    assert_one_line_error(&out, 1);

    // 2,000 levels and a path over PATH_MAX: exported or refused, never the host touched.
    fx.add_hostile("h2", DEEP);
    let args = [os(&["export", "h2"]), vec![fx.s.join("export-deep").into()]].concat();
    hostile_run(&fx.root, &fx.c, &args);
    let args = [
        os(&["export", "h2", "--tar"]),
        vec![fx.s.join("deep.tar").into()],
    ]
    .concat();
    hostile_run(&fx.root, &fx.c, &args);

    // The swap race under the read-only view.
    let share = base(&fx.root, "h1").join("usr/share");
    for round in 0..4 {
        let dest = fx.s.join(format!("export-race-{round}"));
        let args = if round % 2 == 0 {
            [os(&["export", "h1"]), vec![dest.clone().into()]].concat()
        } else {
            [os(&["export", "h1", "--tar"]), vec![dest.clone().into()]].concat()
        };
        raced_run(&fx.root, &fx.c, &share, &args);
        if round % 2 == 0 {
            assert_eq!(secret_copies(&dest), Vec::<PathBuf>::new());
        } else {
            assert!(!contains(&fs::read(&dest).unwrap(), SECRET));
        }
    }
    assert_same_content_and_metadata(&other_before, &manifest(&fx.other()));
}

// ---------------------------------------------------------------------------------------------
// destroy and gc
// ---------------------------------------------------------------------------------------------

/// Hostile cases: the 26 entries of [`hostile_guest`] with 2,000 levels and a path over
/// `PATH_MAX`, a hostile upper (14), a tmpfs inside the guest, hardlinks to a host file in
/// five guests, and the swap race (three guests).
#[test]
fn destroy_removes_a_hostile_guest_and_only_its_own_names() {
    let mut fx = Fixture::new("h-destroy");
    fx.immutable_usr_bin();
    fx.add_hostile("h1", DEEP);
    for g in ["r1", "r2", "r3"] {
        fx.add_hostile(g, LIGHT);
    }
    fx.unify_all();
    hostile_upper(&fx, "h1", DEEP);
    fx.add_hostile("h2", LIGHT);
    let other_before = manifest(&fx.other());

    let mnt = mount_inside(&mut fx.c, &base(&fx.root, "h1"));
    let out = hostile_run(&fx.root, &fx.c, &os(&["destroy", "h1"]));
    assert_one_line_error(&out, 1);
    assert!(fx.root.join("guests/h1").exists());
    drop(mnt);
    fx.c.extra.clear();

    let out = hostile_run(&fx.root, &fx.c, &os(&["destroy", "h1"]));
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert!(!fx.root.join("guests/h1").exists());
    for g in ["r1", "r2", "r3"] {
        raced_run(
            &fx.root,
            &fx.c,
            &base(&fx.root, g).join("usr/share"),
            &os(&["destroy", g]),
        );
        assert!(!fx.root.join("guests").join(g).exists());
    }
    hostile_run(&fx.root, &fx.c, &os(&["destroy", "h2"]));
    // Every guest that linked the host file is gone: it has its one name again.
    assert_eq!(nlink(&fx.c.linked), 1, "the host file's link count");
    assert_same_content_and_metadata(&other_before, &manifest(&fx.other()));
    let leftovers: Vec<_> = fs::read_dir(fx.root.join("guests"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(leftovers, [OsString::from("other")]);
}

/// Hostile cases: two unified hostile guests (26 entries each, hardlinks to one host file in
/// both), one destroyed, then `gc`, then `unify` and `gc` again.
#[test]
fn gc_after_hostile_guests_removes_only_unused_store_objects() {
    let fx = Fixture::new("h-gc");
    fx.immutable_usr_bin();
    fx.add_hostile("h1", LIGHT);
    fx.add_hostile("h2", LIGHT);
    fx.unify_all();
    let other_before = manifest(&fx.other());
    hostile_run(&fx.root, &fx.c, &os(&["destroy", "h1"]));
    let out = hostile_run(&fx.root, &fx.c, &os(&["gc", "--json"]));
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    hostile_run(&fx.root, &fx.c, &os(&["unify", "--all"]));
    hostile_run(&fx.root, &fx.c, &os(&["gc"]));
    assert_same_content_and_metadata(&other_before, &manifest(&fx.other()));
    assert_symlinks_kept(&base(&fx.root, "h2"), &fx.c);
    // Every object left is linked by a guest.
    for o in store_objects(&fx.root) {
        assert!(o.nlink > 1, "gc left an unused object {}", o.path.display());
    }
}

// ---------------------------------------------------------------------------------------------
// build
// ---------------------------------------------------------------------------------------------

/// One ustar header block.
fn ustar_header(name: &[u8], kind: u8, link: &[u8], size: usize, mode: u32) -> [u8; 512] {
    fn octal(field: &mut [u8], v: u64) {
        let s = format!("{v:0w$o}\0", w = field.len() - 1);
        field.copy_from_slice(s.as_bytes());
    }
    assert!(
        name.len() <= 100 && link.len() <= 100,
        "name or link too long for ustar"
    );
    let mut h = [0u8; 512];
    h[..name.len()].copy_from_slice(name);
    octal(&mut h[100..108], u64::from(mode));
    octal(&mut h[108..116], 0);
    octal(&mut h[116..124], 0);
    octal(&mut h[124..136], size as u64);
    octal(&mut h[136..148], DEFAULT_MTIME.0 as u64);
    h[148..156].fill(b' ');
    h[156] = kind;
    h[157..157 + link.len()].copy_from_slice(link);
    h[257..263].copy_from_slice(b"ustar\0");
    h[263..265].copy_from_slice(b"00");
    let sum: u64 = h.iter().map(|&b| u64::from(b)).sum();
    let s = format!("{sum:06o}\0 ");
    h[148..156].copy_from_slice(s.as_bytes());
    h
}

/// One entry of a crafted tarball: name, ustar type flag, link target, content.
type TarEntry<'a> = (&'a [u8], u8, &'a [u8], &'a [u8]);

/// A tarball written entry by entry.
fn craft_tar(path: &Path, entries: &[TarEntry<'_>]) {
    let mut out = Vec::new();
    for (name, kind, link, data) in entries {
        let mode = match kind {
            b'5' => 0o755,
            b'2' => 0o777,
            _ => 0o644,
        };
        out.extend_from_slice(&ustar_header(name, *kind, link, data.len(), mode));
        out.extend_from_slice(data);
        out.resize(out.len().div_ceil(512) * 512, 0);
    }
    out.resize(out.len() + 1024, 0);
    fs::write(path, out).unwrap();
}

/// A root filesystem tarball made by tar from `tree`.
fn tar_of(tree: &Path, out: &Path) {
    let status = Command::new("tar")
        .args([
            "--create",
            "--numeric-owner",
            "--xattrs",
            "--xattrs-include=*",
            "--file",
        ])
        .arg(out)
        .arg("--directory")
        .arg(tree)
        .arg(".")
        .status()
        .unwrap();
    assert!(status.success());
}

fn define(root: &Path, name: &str, tarball: &Path) {
    let dir = root.join("templates.d");
    fs::create_dir_all(&dir).unwrap();
    fs::write(
        dir.join(format!("{name}.toml")),
        format!("method = \"tarball\"\nsource = \"{}\"\n", tarball.display()),
    )
    .unwrap();
}

/// Hostile cases: a template tarball with 13 symlinks aimed at host files and directories
/// where the template build cleans and the guest build writes its identity (hostname, hosts,
/// machine-id, random seed, ssh host keys, apt lists and caches, logs, /tmp), built and then
/// built from twice; and a crafted tarball (a file written through a symlink to the host
/// directory, a hardlink to an absolute host path, a symlink replaced by a file).
#[test]
fn build_never_writes_through_a_templates_symlinks() {
    let fx = Fixture::new("h-build");
    let c = &fx.c;
    let tree = fx.s.join("template-tree");
    let mut t = TreeBuilder::new(&tree);
    t.file_with("usr/bin/tool", &tool_bytes(), 0o755, 0, 0, DEFAULT_MTIME)
        .file("usr/lib/libdup.so", &lib_bytes())
        .file("usr/sbin/sshd", &content("sshd", 4000))
        .symlink("etc/hostname", bytes(&c.secret))
        .symlink("etc/hosts", relative_to(&c.secret))
        .symlink("etc/machine-id", bytes(&c.secret))
        .symlink("etc/ssh/ssh_host_ed25519_key", bytes(&c.secret))
        .symlink("etc/ssh/ssh_host_rsa_key.pub", relative_to(&c.secret))
        .symlink("etc/ssh/sshd_config", bytes(&c.secret))
        .symlink("var/lib/dbus/machine-id", bytes(&c.secret))
        .symlink("var/lib/systemd/random-seed", bytes(&c.secret))
        .symlink("var/lib/urandom", bytes(&c.hostdir))
        .symlink("var/log", bytes(&c.hostdir))
        .symlink("var/cache/apt", relative_to(&c.hostdir))
        .symlink("var/lib/apt/lists", bytes(&c.hostdir))
        .symlink("tmp", bytes(&c.hostdir));
    t.finish();
    drop(t);
    let tarball = fx.s.join("hostile.tar");
    tar_of(&tree, &tarball);
    define(&fx.root, "hostile", &tarball);

    let out = hostile_run(&fx.root, &fx.c, &os(&["template", "build", "hostile"]));
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    for g in ["b1", "b2"] {
        let out = hostile_run(&fx.root, &fx.c, &os(&["build", "--template", "hostile", g]));
        assert_eq!(out.status.code(), Some(0), "{out:?}");
        let b = base(&fx.root, g);
        assert_eq!(
            fs::read(b.join("etc/hostname")).unwrap(),
            format!("{g}\n").as_bytes()
        );
        assert!(
            fs::symlink_metadata(b.join("etc/machine-id"))
                .unwrap()
                .is_file()
        );
    }
    hostile_run(&fx.root, &fx.c, &os(&["unify", "--all"]));

    // A crafted tarball: what tar must not do while unpacking a template.
    let (hostdir, secret) = (bytes(&c.hostdir), bytes(&c.secret));
    let rel = relative_to(&c.secret);
    let entries: Vec<TarEntry<'_>> = vec![
        (b"./usr/", b'5', b"", b""),
        (b"./usr/share/", b'5', b"", b""),
        (b"./usr/share/trap", b'2', hostdir, b""),
        (
            b"./usr/share/trap/a0",
            b'0',
            b"",
            b"written through a symlink",
        ),
        (b"./usr/share/trap/new", b'0', b"", b"new through a symlink"),
        (b"./usr/share/hl", b'1', secret, b""),
        (b"./etc/", b'5', b"", b""),
        (b"./etc/hostname", b'2', secret, b""),
        (b"./etc/hostname", b'0', b"", b"replaced\n"),
        (
            b"./etc/rel",
            b'2',
            &rel[rel.len().saturating_sub(100)..],
            b"",
        ),
    ];
    let trap = fx.s.join("trap.tar");
    craft_tar(&trap, &entries);
    define(&fx.root, "trap", &trap);
    let out = hostile_run(&fx.root, &fx.c, &os(&["template", "build", "trap"]));
    if out.status.code() == Some(0) {
        hostile_run(&fx.root, &fx.c, &os(&["build", "--template", "trap", "t1"]));
    }
}

// ---------------------------------------------------------------------------------------------
// import
// ---------------------------------------------------------------------------------------------

/// Hostile cases: a source holding the 26 entries of [`hostile_guest`] (symlinks where the
/// fixups write, a hardlink to a host file) with a tmpfs mounted inside it; a second source
/// with 2,000 levels and a path over `PATH_MAX`.
#[test]
fn import_copies_a_hostile_tree_without_following_it_out() {
    let mut fx = Fixture::new("h-import");
    let src = fx.s.join("machine");
    hostile_guest(&src, &fx.c, &fx.other(), LIGHT);
    let _mnt = mount_inside(&mut fx.c, &src);
    let other_before = manifest(&fx.other());

    let args = [
        os(&["import", "m1", "--json", "--from"]),
        vec![src.clone().into()],
    ]
    .concat();
    let out = hostile_run(&fx.root, &fx.c, &args);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let report: Value = json_of(&out);
    eprintln!("import m1: {report:#}");
    let b = base(&fx.root, "m1");
    assert_symlinks_kept(&b, &fx.c);
    assert_eq!(secret_copies(&b), Vec::<PathBuf>::new());
    assert!(
        fs::read_dir(b.join("srv/mnt")).unwrap().next().is_none(),
        "a mount was copied"
    );
    assert_eq!(
        fs::read(b.join("usr/share/hl/linked")).unwrap(),
        fs::read(&fx.c.linked).unwrap()
    );
    assert_ne!(ino(&b.join("usr/share/hl/linked")), ino(&fx.c.linked));
    assert_same_files(&other_before, &manifest(&fx.other()));

    let deep = fx.s.join("deep-machine");
    hostile_guest(&deep, &fx.c, &fx.other(), DEEP);
    let args = [os(&["import", "m2", "--from"]), vec![deep.into()]].concat();
    hostile_run(&fx.root, &fx.c, &args);
    hostile_run(&fx.root, &fx.c, &os(&["unify", "--all"]));
    assert_same_files(&other_before, &manifest(&fx.other()));
}

/// A machine for resync: the ordinary files, `/opt/x` a symlink to the host directory, and the
/// swap partner.
fn resync_machine(dir: &Path, c: &Canaries) {
    let mut t = TreeBuilder::new(dir);
    ordinary(&mut t);
    t.symlink("opt/x", bytes(&c.hostdir))
        .symlink("usr/share/swap-link", bytes(&c.hostdir));
    // The guest's own swap files differ from the host's (and so from the source's
    // lookalikes) in mtime: rsync's quick check never takes them for the source's, so a file
    // of the host's bytes in the guest can only have been read through the symlink.
    for k in 0..SWAP_FILES {
        t.mtime(format!("usr/share/swap/a{k}"), DEFAULT_MTIME.0 - 86_400, 0);
    }
    t.finish();
}

/// Files equal to the host directory's `a*` in size, mtime, mode and owner, but not in
/// content: what rsync's quick check cannot tell apart.
fn lookalikes(dir: &Path, tag: &str) {
    let mut t = TreeBuilder::new(dir);
    for k in 0..SWAP_FILES {
        let len = swap_bytes(k).len();
        t.file(format!("a{k}"), &content(&format!("{tag}-{k}"), len));
    }
    t.finish();
}

/// Fails unless every swap-like file `a*` below `dir` has the bytes of the same file below
/// `src` (and not the host directory's, which it matches in size, mtime, mode and owner).
fn assert_from_source(dir: &Path, src: &Path, c: &Canaries) {
    for k in 0..SWAP_FILES {
        let f = dir.join(format!("a{k}"));
        let got = fs::read(&f).unwrap();
        assert!(
            got != fs::read(c.hostdir.join(format!("a{k}"))).unwrap(),
            "{} holds the host's {}/a{k}: rsync read it through a symlink in base \
             (DESIGN-NOTES fact 13)",
            f.display(),
            c.hostdir.display()
        );
        assert!(
            got == fs::read(src.join(format!("a{k}"))).unwrap(),
            "{} is not the source's file",
            f.display()
        );
    }
}

/// Imports `src` as guest m1 of a new root.
fn imported(tag: &str) -> (Fixture, PathBuf) {
    let fx = Fixture::new(tag);
    let src = fx.s.join("machine");
    resync_machine(&src, &fx.c);
    let args = [os(&["import", "m1", "--from"]), vec![src.clone().into()]].concat();
    let out = hostile_run(&fx.root, &fx.c, &args);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    (fx, src)
}

/// DESIGN-NOTES fact 13: base holds `/opt/x -> host directory`; the source now has a real
/// `/opt/x` whose files match the host directory's in size, mtime, mode and owner. A resync
/// with `--link-dest=base` must neither hardlink the host's files into the guest nor copy
/// their bytes (a host file read as the basis of an unchanged-looking file).
///
/// Hostile cases: 1 (a symlink in base to a host directory, lookalike files in the source).
#[test]
fn resync_never_links_host_files_through_a_symlink_in_base() {
    let (fx, src) = imported("h-resync");
    assert_eq!(
        fs::read_link(base(&fx.root, "m1").join("opt/x")).unwrap(),
        fx.c.hostdir
    );
    fs::remove_file(src.join("opt/x")).unwrap();
    lookalikes(&src.join("opt/x"), "source");
    let resync = [
        os(&["import", "m1", "--resync", "--from"]),
        vec![src.clone().into()],
    ]
    .concat();
    hostile_run(&fx.root, &fx.c, &resync);
    assert_from_source(
        &base(&fx.root, "m1").join("opt/x"),
        &src.join("opt/x"),
        &fx.c,
    );
}

/// The swap race over four resyncs: base's swap directory is exchanged with a symlink to the
/// host directory while rsync looks files up in base; the source's swap files change each
/// round, keeping the size and mtime of the host directory's.
///
/// Hostile cases: 1 (the race), eight rounds, at least one of which must go through.
#[test]
fn resync_racing_a_directory_swapped_for_a_host_symlink_never_reads_the_host() {
    let (fx, src) = imported("h-resync-race");
    let resync = [
        os(&["import", "m1", "--resync", "--from"]),
        vec![src.clone().into()],
    ]
    .concat();
    let mut succeeded = 0;
    for round in 0..8 {
        lookalikes(&src.join("usr/share/swap"), &format!("round-{round}"));
        let out = raced_run(
            &fx.root,
            &fx.c,
            &base(&fx.root, "m1").join("usr/share"),
            &resync,
        );
        let b = base(&fx.root, "m1").join("usr/share/swap");
        if out.status.success() && fs::symlink_metadata(&b).is_ok_and(|m| m.is_dir()) {
            // Every round's lookalikes share size and mtime, so rsync's quick check may keep
            // an earlier round's file (never the host's).
            for k in 0..SWAP_FILES {
                let got = fs::read(b.join(format!("a{k}"))).unwrap();
                assert!(
                    got != fs::read(fx.c.hostdir.join(format!("a{k}"))).unwrap(),
                    "round {round}: a{k} holds the host's bytes: rsync read it through a \
                     symlink in base (DESIGN-NOTES fact 13)"
                );
                let len = swap_bytes(k).len();
                assert!(
                    (0..=round).any(|r| got == content(&format!("round-{r}-{k}"), len)),
                    "round {round}: a{k} is no round's source file"
                );
            }
        }
        if out.status.success() {
            succeeded += 1;
        }
        // The race may end with the guest's swap directory and its symlink exchanged: put
        // them back, so the guest is as it was imported and the next resync may go through.
        let share = base(&fx.root, "m1").join("usr/share");
        if fs::symlink_metadata(share.join("swap")).is_ok_and(|m| m.file_type().is_symlink()) {
            nix::fcntl::renameat2(
                nix::fcntl::AT_FDCWD,
                &share.join("swap"),
                nix::fcntl::AT_FDCWD,
                &share.join("swap-link"),
                nix::fcntl::RenameFlags::RENAME_EXCHANGE,
            )
            .unwrap();
        }
        // Else the walk of base met the swap mid-race (a symlink where the manifest has a
        // directory: a change of the guest's; or an entry changing kind under it) and the
        // resync refused with one line (checked by `raced_run`), changing nothing.
    }
    assert!(
        succeeded > 0,
        "no resync went through the race: nothing was checked"
    );
}

// ---------------------------------------------------------------------------------------------
// index rebuild, verify --repair
// ---------------------------------------------------------------------------------------------

/// Hostile cases: two unified hostile guests (26 entries each; 2,000 levels and a path over
/// `PATH_MAX` in one), rebuilt with a tmpfs mounted inside one, then without, then from a
/// damaged index.
#[test]
fn index_rebuild_rescans_hostile_guests_without_following_them() {
    let mut fx = Fixture::new("h-reindex");
    fx.immutable_usr_bin();
    fx.add_hostile("h1", DEEP);
    fx.add_hostile("h2", LIGHT);
    fx.unify_all();
    let other_before = manifest(&fx.other());
    let drop_index = |root: &Path| {
        for f in ["index.db", "index.db-wal", "index.db-shm"] {
            let _ = fs::remove_file(root.join(f));
        }
    };

    let mnt = mount_inside(&mut fx.c, &base(&fx.root, "h1"));
    drop_index(&fx.root);
    hostile_run(&fx.root, &fx.c, &os(&["index", "rebuild"]));
    drop(mnt);
    fx.c.extra.clear();
    drop_index(&fx.root);
    let out = hostile_run(&fx.root, &fx.c, &os(&["index", "rebuild"]));
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    fs::write(fx.root.join("index.db"), b"damaged").unwrap();
    hostile_run(&fx.root, &fx.c, &os(&["index", "rebuild"]));
    hostile_run(&fx.root, &fx.c, &os(&["unify", "--all"]));
    assert_same_content_and_metadata(&other_before, &manifest(&fx.other()));
}

/// Hostile cases: two unified hostile guests (2,000 levels and a path over `PATH_MAX` in
/// one) made stale in hostile ways (a linked directory replaced by a symlink to the host
/// directory, a linked file by a symlink to a host file, a hardlink to a host file where a
/// store link was), with a tmpfs mounted inside one, then without.
#[test]
fn verify_repair_rescans_stale_hostile_guests_without_following_them() {
    let mut fx = Fixture::new("h-verify");
    fx.immutable_usr_bin();
    fx.add_hostile("h1", DEEP);
    fx.add_hostile("h2", LIGHT);
    fx.unify_all();
    let other_before = manifest(&fx.other());
    let b = base(&fx.root, "h2");
    // Stale in hostile ways (store links replaced: /usr/bin's are immutable, so not those).
    fs::rename(b.join("usr/share/swap"), b.join("usr/share/swap-old")).unwrap();
    std::os::unix::fs::symlink(&fx.c.hostdir, b.join("usr/share/swap")).unwrap();
    fs::remove_file(b.join("usr/lib/libdup.so")).unwrap();
    std::os::unix::fs::symlink(&fx.c.secret, b.join("usr/lib/libdup.so")).unwrap();
    let newline = b.join(OsStr::from_bytes(b"usr/share/names/new\nline"));
    fs::remove_file(&newline).unwrap();
    fs::hard_link(&fx.c.linked, &newline).unwrap();

    let mnt = mount_inside(&mut fx.c, &base(&fx.root, "h1"));
    hostile_run(&fx.root, &fx.c, &os(&["verify", "--repair"]));
    drop(mnt);
    fx.c.extra.clear();
    hostile_run(&fx.root, &fx.c, &os(&["verify", "--repair", "--json"]));
    hostile_run(&fx.root, &fx.c, &os(&["verify"]));
    assert_same_content_and_metadata(&other_before, &manifest(&fx.other()));
}

// ---------------------------------------------------------------------------------------------
// exec
// ---------------------------------------------------------------------------------------------

/// Inside `exec`, the guest's symlinks resolve in the guest: a symlink to the host's
/// shadow-like canary reads and writes the guest's own file at that path, `..` stops at the
/// guest's root, and a hardlink to a host file is copied up when written.
///
/// Hostile cases: an absolute symlink (read, resolved, written), a relative one reaching
/// past `/`, `cd ..` past `/`, and a hardlink to a host file (written, chmodded, removed).
#[test]
fn exec_resolves_a_guests_symlinks_inside_the_guest() {
    let fx = Fixture::new("h-exec");
    let c = &fx.c;
    let inside = c.shadow.strip_prefix("/").unwrap().to_path_buf();
    adopt_built(&fx.root, fx.s.path(), "x1", |d| {
        minimal_userland(
            d,
            &[
                "/bin/sh",
                "/bin/cat",
                "/usr/bin/readlink",
                "/bin/chmod",
                "/bin/rm",
            ],
        );
        let mut t = TreeBuilder::new(d);
        t.file(bytes(&inside), b"the guest's own\n")
            .symlink("link-to-canary", bytes(&c.shadow))
            .symlink("rel-to-canary", relative_to(&c.shadow));
        t.finish();
        drop(t);
        fs::hard_link(&c.linked, d.join("hl")).unwrap();
    });
    let _m = mount(&fx.root, &["x1"]);
    let shadow = c.shadow.display().to_string();
    let script = format!(
        "readlink -f /link-to-canary; cat /link-to-canary; cat /rel-to-canary; \
         cd / && cd ../../.. && cat .{shadow}; \
         echo x > /link-to-canary; echo y >> /rel-to-canary; \
         echo z >> /hl; chmod 600 /hl; cat /hl > /dev/null; rm /hl"
    );
    let before = c.snapshot();
    let out = cowherd(&fx.root)
        .args(["exec", "x1", "--", "sh", "-c", &script])
        .timeout(Duration::from_secs(60))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(
        lines,
        [
            shadow.as_str(),
            "the guest's own",
            "the guest's own",
            "the guest's own"
        ],
        "inside the guest, its symlinks must resolve to its own files"
    );
    c.assert_unchanged(&before, "exec writing through symlinks and a hardlink");
    assert_eq!(
        fs::read(upper(&fx.root, "x1").join(&inside)).unwrap(),
        b"x\ny\n",
        "the writes went to the guest's upper layer"
    );
    assert_eq!(
        fs::read(base(&fx.root, "x1").join(&inside)).unwrap(),
        b"the guest's own\n"
    );
}
