//! A full disk, and a filesystem that turns read-only, in the middle of a run: `unify`, `fold`,
//! `build` and `import` on a cowherd root inside a small loop-mounted ext4 filesystem. Each case
//! makes the command run out of space (or out of a writable filesystem) while it works, and
//! checks that it fails as README's exit codes say, with an error naming the root and the cause,
//! that no guest changed, and that the same command run again — once space is freed, or the
//! filesystem is read-write again — completes and leaves nothing behind.
//!
//! Each test runs in a mount namespace of its own: its loop filesystem and overlays are seen by
//! no other process, and are unmounted when the test ends, also on panic.

mod common;

use std::fs::{self, File};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::thread::sleep;
use std::time::{Duration, Instant};

use nix::mount::{MntFlags, MsFlags};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use common::*;

// ---------------------------------------------------------------------------------------------
// A small filesystem of the test's own
// ---------------------------------------------------------------------------------------------

/// An ext4 filesystem in an image file of the test's scratch directory (`mkfs.ext4 -m 0`: no
/// blocks kept for root, so root — cowherd — meets ENOSPC when it is full), loop-mounted at
/// `<scratch>/mnt` with `errors=remount-ro`. Unmounted on drop, also on panic (`mount -o loop`
/// sets autoclear: the loop device goes with the last unmount); the image goes with the
/// scratch directory, so declare this after the [`Scratch`] and before anything that mounts or
/// runs on it.
struct LoopFs {
    image: PathBuf,
    point: PathBuf,
    mounted: bool,
}

impl LoopFs {
    /// A fresh filesystem of `mib` MiB with 4 KiB blocks and `inodes` inodes.
    fn new(s: &Scratch, mib: u64, inodes: u32) -> LoopFs {
        let image = s.join("disk.img");
        File::create(&image)
            .and_then(|f| f.set_len(mib << 20))
            .unwrap_or_else(|e| panic!("create {}: {e}", image.display()));
        run_tool(
            Command::new("mkfs.ext4")
                .args(["-q", "-F", "-m", "0", "-b", "4096", "-N"])
                .arg(inodes.to_string())
                .arg(&image),
            "mkfs.ext4 (e2fsprogs)",
        );
        let point = s.join("mnt");
        fs::create_dir_all(&point).unwrap();
        let mut disk = LoopFs {
            image,
            point,
            mounted: false,
        };
        disk.mount();
        disk
    }

    fn path(&self) -> &Path {
        &self.point
    }

    fn mount(&mut self) {
        run_tool(
            Command::new("mount")
                .args(["-t", "ext4", "-o", "loop,errors=remount-ro"])
                .arg(&self.image)
                .arg(&self.point),
            "mount -o loop",
        );
        self.mounted = true;
    }

    /// Unmounts; a process of this test that just ended may hold the filesystem for a moment.
    fn umount(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while let Err(e) = nix::mount::umount2(&self.point, MntFlags::empty()) {
            assert!(
                e == nix::errno::Errno::EBUSY && Instant::now() < deadline,
                "umount {}: {e}",
                self.point.display()
            );
            sleep(Duration::from_millis(20));
        }
        self.mounted = false;
    }

    /// Bytes an unprivileged — and, with `-m 0`, a privileged — writer may still allocate.
    fn free(&self) -> u64 {
        let st = nix::sys::statvfs::statvfs(&self.point).expect("statvfs");
        st.blocks_available() as u64 * st.fragment_size() as u64
    }

    /// Fills the filesystem with a ballast file (outside the cowherd root) until about `leave`
    /// bytes are free.
    fn fill_leaving(&self, leave: u64) {
        self.sync();
        let free = self.free();
        assert!(
            free > leave,
            "only {free} bytes free before the ballast, {leave} wanted"
        );
        let ballast = File::create(self.ballast()).unwrap();
        nix::fcntl::fallocate(
            &ballast,
            nix::fcntl::FallocateFlags::empty(),
            0,
            (free - leave) as i64,
        )
        .expect("fallocate the ballast");
        ballast.sync_all().unwrap();
        let now = self.free();
        assert!(
            now <= leave && now + (1 << 20) > leave,
            "{now} bytes free after the ballast, about {leave} wanted"
        );
    }

    /// Removes the ballast, and waits until its blocks count as free.
    fn free_ballast(&self) {
        fs::remove_file(self.ballast()).expect("remove the ballast");
        self.sync();
    }

    fn ballast(&self) -> PathBuf {
        self.point.join("ballast")
    }

    /// `syncfs`: what was written so far is on the disk (and freed blocks are free).
    fn sync(&self) {
        let dir = File::open(&self.point).unwrap();
        nix::unistd::syncfs(&dir).expect("syncfs");
    }

    /// The filesystem turns read-only now, as the kernel turns it on an error with
    /// `errors=remount-ro`: every later change fails with EROFS, also through files open for
    /// writing. (`mount -o remount,ro` cannot do that while a file is open for writing: the
    /// kernel refuses with EBUSY as long as cowherd holds its index open; and a read-only
    /// block device under a mounted filesystem only draws a warning.) What was written so far
    /// is synced first, as a remount would; the error aborts the journal, so the filesystem is
    /// read-write again only after `umount`, `e2fsck` and `mount` ([`LoopFs::repair`]).
    fn turn_read_only(&self) {
        self.sync();
        let dev = fs::metadata(&self.point).unwrap().dev();
        let sysfs = format!(
            "/sys/dev/block/{}:{}",
            nix::sys::stat::major(dev),
            nix::sys::stat::minor(dev)
        );
        let name = fs::read_link(&sysfs)
            .unwrap_or_else(|e| panic!("readlink {sysfs}: {e}"))
            .file_name()
            .unwrap()
            .to_os_string();
        let trigger = Path::new("/sys/fs/ext4")
            .join(name)
            .join("trigger_fs_error");
        fs::write(
            &trigger,
            "cowherd full_disk test: read-only in the middle of a run",
        )
        .unwrap_or_else(|e| panic!("write {}: {e}", trigger.display()));
        let probe = self.point.join("probe");
        let err = File::create(&probe).expect_err("the filesystem is read-only");
        assert_eq!(err.raw_os_error(), Some(libc::EROFS), "{err}");
    }

    /// After [`LoopFs::turn_read_only`]: `umount`, `e2fsck -fy` (replays the journal, clears
    /// the error) and `mount` again, read-write, at the same place.
    fn repair(&mut self) {
        self.umount();
        let out = Command::new("e2fsck")
            .arg("-fy")
            .arg(&self.image)
            .output()
            .expect("run e2fsck (e2fsprogs)");
        // 0: clean; 1: errors corrected (the error we made is one).
        assert!(
            matches!(out.status.code(), Some(0 | 1)),
            "e2fsck -fy {}: {}\n{}{}",
            self.image.display(),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        self.mount();
    }
}

impl Drop for LoopFs {
    fn drop(&mut self) {
        if !self.mounted {
            return;
        }
        for _ in 0..100 {
            match nix::mount::umount2(&self.point, MntFlags::empty()) {
                Err(nix::errno::Errno::EBUSY) => sleep(Duration::from_millis(50)),
                _ => return,
            }
        }
        if let Err(e) = nix::mount::umount2(&self.point, MntFlags::MNT_DETACH) {
            eprintln!("warning: umount -l {}: {e}", self.point.display());
        }
    }
}

/// Runs a host tool, failing the test loudly if it is missing or fails.
fn run_tool(cmd: &mut Command, what: &str) {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("run {what}: {e} (is it installed?)"));
    assert!(
        out.status.success(),
        "{what} failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}

// ---------------------------------------------------------------------------------------------
// Running cowherd, and what a run must leave
// ---------------------------------------------------------------------------------------------

/// `cowherd --root ROOT ARGS…` as a plain process (to be started in the background), its
/// stdout and stderr going to files of the scratch directory (a run may print many lines);
/// returns the command and the stderr file.
fn cowherd_child(root: &Path, args: &[&str], s: &Scratch) -> (Command, PathBuf) {
    let err = s.join("child.stderr");
    let mut cmd = Command::new(cowherd_bin());
    cmd.arg("--root")
        .arg(root)
        .args(args)
        .env_remove("COWHERD_ROOT")
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(File::create(s.join("child.stdout")).unwrap())
        .stderr(File::create(&err).unwrap());
    (cmd, err)
}

/// How a run ended: its exit code and stderr.
struct Ended {
    code: Option<i32>,
    stderr: String,
}

/// Runs `cowherd --root ROOT ARGS…` to its end.
fn run(root: &Path, args: &[&str]) -> Ended {
    let out = cowherd(root).args(args).output().unwrap();
    Ended {
        code: out.status.code(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// Runs `cowherd --root ROOT ARGS…`, asserting exit 0.
fn run_ok(root: &Path, args: &[&str]) {
    let ended = run(root, args);
    assert_eq!(
        ended.code,
        Some(0),
        "cowherd {args:?} failed:\n{}",
        ended.stderr
    );
}

/// The run failed as README's exit codes say: 1 (fatal: nothing or only part was done) or 3
/// (finished, but some files failed, each reported); it did not panic.
fn assert_failed(ended: &Ended, what: &str) {
    assert!(
        matches!(ended.code, Some(1 | 3)),
        "{what}: expected exit code 1 or 3, got {:?}; stderr:\n{}",
        ended.code,
        ended.stderr
    );
    assert!(
        !ended.stderr.contains("panicked"),
        "{what}: cowherd panicked:\n{}",
        ended.stderr
    );
}

/// An `error:` or `warning:` line of the run's stderr names the root (or a path under it)
/// together with one of `causes`, so the admin knows which filesystem to look at and why.
/// Checked last in each test, so that a bad message does not hide what the other checks say.
fn assert_names_root_and_cause(ended: &Ended, root: &Path, causes: &[&str], what: &str) {
    let root = root.to_str().unwrap();
    let line = ended.stderr.lines().find(|l| {
        (l.starts_with("error:") || l.starts_with("warning:"))
            && l.contains(root)
            && causes.iter().any(|c| l.contains(c))
    });
    match line {
        Some(line) => eprintln!("{what}: exit {:?}: {line}", ended.code),
        None => panic!(
            "{what}: no error line names the root {root} and says {causes:?}; stderr:\n{}",
            ended.stderr
        ),
    }
}

/// What a complete run must not leave in `root`: temporary names (`.cowherd~…`) anywhere,
/// files in `store/tmp`, staging directories in `guests/` (`.NAME.creating`, …) or
/// `templates/NAME/`, a guest's `tmp/`, journal rows in the index.
fn leftovers(root: &Path) -> Vec<String> {
    let mut found = Vec::new();
    for e in walkdir::WalkDir::new(root).follow_links(false) {
        let e = e.unwrap();
        if e.file_name()
            .as_bytes()
            .windows(9)
            .any(|w| w == b".cowherd~")
        {
            found.push(e.path().display().to_string());
        }
    }
    let names = |dir: &Path| -> Vec<PathBuf> {
        fs::read_dir(dir)
            .map(|d| d.map(|e| e.unwrap().path()).collect())
            .unwrap_or_default()
    };
    found.extend(
        names(&root.join("store/tmp"))
            .iter()
            .map(|p| p.display().to_string()),
    );
    for p in names(&root.join("guests")) {
        if p.file_name().unwrap().as_bytes().starts_with(b".") || p.join("tmp").exists() {
            found.push(p.display().to_string());
        }
    }
    for template in names(&root.join("templates")) {
        for p in names(&template) {
            if p.file_name().unwrap().as_bytes().starts_with(b".") {
                found.push(p.display().to_string());
            }
        }
    }
    let db = rusqlite::Connection::open_with_flags(
        root.join("index.db"),
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
    )
    .unwrap();
    let rows: i64 = db
        .query_row("SELECT COUNT(*) FROM journal", [], |r| r.get(0))
        .unwrap();
    if rows > 0 {
        found.push(format!("{rows} journal rows in index.db"));
    }
    found
}

fn assert_no_leftovers(root: &Path) {
    let found = leftovers(root);
    assert!(found.is_empty(), "left behind: {found:#?}");
}

/// Guest `name`'s base tree, asserting its upper layer is empty: then base is what the guest
/// sees.
fn base_view(root: &Path, name: &str) -> Manifest {
    let upper = upper(root, name);
    assert_eq!(
        fs::read_dir(&upper).unwrap().count(),
        0,
        "{upper:?} is empty"
    );
    manifest(&base(root, name))
}

/// Every regular file of `dir` with at least one byte (a shareable one) is a link of a store
/// object.
fn assert_all_linked(root: &Path, dir: &Path) {
    let objects = store_inodes(root);
    let loose: Vec<PathBuf> = files_under(dir)
        .into_iter()
        .filter(|p| fs::metadata(p).unwrap().len() > 0 && !objects.contains_key(&ino(p)))
        .collect();
    assert!(loose.is_empty(), "not store links: {loose:#?}");
}

// ---------------------------------------------------------------------------------------------
// A full disk
// ---------------------------------------------------------------------------------------------

/// What an error says when the filesystem is full (ENOSPC).
const FULL: &str = "No space left on device";

/// Files of the guests of the unify case that the store must copy: each is also linked from
/// outside the guest, so no guest inode can become the object.
const BIG_FILES: usize = 12;

#[test]
fn unify_on_a_full_disk_changes_no_guest_and_completes_once_space_is_freed() {
    assert_root();
    own_mount_namespace();
    let s = Scratch::new("full-unify");
    let disk = LoopFs::new(&s, 64, 4096);
    let top = disk.path();
    let root = init_root(top);
    // Two guests with the same twelve 1 MiB files and ten small ones. Each big file has a
    // second link in `outside/`, which keeps unify from adopting it: the store must copy it.
    for g in ["a", "b"] {
        let src = top.join("src").join(g);
        let mut t = TreeBuilder::new(&src);
        for i in 0..BIG_FILES {
            t.file(
                format!("usr/lib/big/f{i:02}"),
                &content(&format!("big-{i}"), 1 << 20),
            );
        }
        for i in 0..10 {
            t.file(
                format!("usr/share/doc/d{i:02}"),
                &content(&format!("doc-{i}"), 3000),
            );
        }
        t.finish();
        fs::create_dir_all(top.join("outside")).unwrap();
        for i in 0..BIG_FILES {
            fs::hard_link(
                src.join(format!("usr/lib/big/f{i:02}")),
                top.join(format!("outside/{g}-{i:02}")),
            )
            .unwrap();
        }
        adopt(&root, &src, g);
    }
    let before = [base_view(&root, "a"), base_view(&root, "b")];
    let outside = manifest(&top.join("outside"));

    // Room for the scan and a few copies, not for twelve.
    disk.fill_leaving(4 << 20);
    let ended = run(&root, &["unify", "--all"]);
    assert_failed(&ended, "unify on a full disk");
    for (g, was) in ["a", "b"].iter().zip(&before) {
        assert_same_content_and_metadata(was, &manifest(&base(&root, g)));
    }
    assert_same_content_and_metadata(&outside, &manifest(&top.join("outside")));

    disk.free_ballast();
    run_ok(&root, &["unify", "--all"]);
    for (g, was) in ["a", "b"].iter().zip(&before) {
        assert_same_content_and_metadata(was, &manifest(&base(&root, g)));
        assert_all_linked(&root, &base(&root, g));
    }
    for i in 0..BIG_FILES {
        let rel = format!("usr/lib/big/f{i:02}");
        assert_eq!(
            ino(&base(&root, "a").join(&rel)),
            ino(&base(&root, "b").join(&rel))
        );
    }
    assert_same_content_and_metadata(&outside, &manifest(&top.join("outside")));
    assert_no_leftovers(&root);
    assert_names_root_and_cause(&ended, &root, &[FULL], "unify on a full disk");
}

/// The merged view of the unmounted guest `name` as the kernel shows it: a read-only overlay
/// of its upper layer over its base (both as lower layers: nothing is written), mounted in the
/// scratch directory for as long as [`manifest`] reads it.
fn merged_view(s: &Scratch, root: &Path, name: &str) -> Manifest {
    let guest = root.join("guests").join(name);
    let point = s.join(format!("view-{name}"));
    fs::create_dir_all(&point).unwrap();
    let data = format!(
        "lowerdir={}:{}",
        guest.join("upper").display(),
        guest.join("base").display()
    );
    let mut view = MountedGuests::default();
    view.watch(&point);
    nix::mount::mount(
        Some("overlay"),
        &point,
        Some("overlay"),
        MsFlags::MS_RDONLY,
        Some(data.as_str()),
    )
    .unwrap_or_else(|e| panic!("mount the merged view of {name} ({data}): {e}"));
    let seen = manifest(&point);
    nix::mount::umount2(&point, MntFlags::empty())
        .unwrap_or_else(|e| panic!("umount {}: {e}", point.display()));
    seen
}

/// A small guest tree: a few files in `/usr`, one in `/etc`.
fn small_tree(dir: &Path) {
    let mut t = TreeBuilder::new(dir);
    t.file_with(
        "usr/bin/tool",
        &content("tool", 9000),
        0o755,
        0,
        0,
        DEFAULT_MTIME,
    )
    .file("usr/share/doc/readme", &content("readme", 2000))
    .file("usr/share/doc/notes", &content("notes", 2500))
    .file("etc/hostname", b"small\n");
    t.finish();
}

/// Guest `name` of `root`, mounted with `cowherd mount`, gets `change` done through its overlay
/// — what it does while it runs — and is unmounted again.
fn run_guest(root: &Path, name: &str, change: impl FnOnce(&Path)) {
    let point = rootfs(root, name);
    let mut mounts = MountedGuests::default();
    mounts.watch(&point);
    run_ok(root, &["mount", name]);
    change(&point);
    umount_ok(root, &[name]);
}

/// What a guest does while it runs, through its overlay: `dirs` new directories of `files`
/// small files each, a changed file and a deleted one.
fn guest_writes(point: &Path, dirs: usize, files: usize) {
    for d in 0..dirs {
        let dir = point.join(format!("opt/app/d{d:03}"));
        fs::create_dir_all(&dir).unwrap();
        for f in 0..files {
            fs::write(dir.join(format!("f{f:02}")), format!("file {f} of {d}\n")).unwrap();
        }
    }
    fs::write(point.join("usr/bin/tool"), b"#!/bin/sh\necho upgraded\n").unwrap();
    fs::remove_file(point.join("usr/share/doc/notes")).unwrap();
}

#[test]
fn fold_on_a_full_disk_keeps_the_upper_layer_and_completes_once_space_is_freed() {
    assert_root();
    own_mount_namespace();
    let s = Scratch::new("full-fold");
    let disk = LoopFs::new(&s, 64, 8192);
    let root = init_root(disk.path());
    adopt_built(&root, disk.path(), "g", small_tree);
    // 300 new directories: fold makes each in base (a 4 KiB block each) and moves their files
    // by link and rename, without a copy.
    run_guest(&root, "g", |point| guest_writes(point, 300, 1));
    let before = merged_view(&s, &root, "g");

    // Room for fold to start and make some of the directories, not all.
    disk.fill_leaving(256 << 10);
    let ended = run(&root, &["fold", "g"]);
    assert_failed(&ended, "fold on a full disk");
    assert_same_content_and_metadata(&before, &merged_view(&s, &root, "g"));

    disk.free_ballast();
    run_ok(&root, &["fold", "g"]);
    assert_same_content_and_metadata(&before, &merged_view(&s, &root, "g"));
    assert_eq!(
        fs::read_dir(upper(&root, "g")).unwrap().count(),
        0,
        "the upper layer is folded"
    );
    assert_same_content_and_metadata(&before, &manifest(&base(&root, "g")));
    assert_no_leftovers(&root);
    assert_names_root_and_cause(&ended, &root, &[FULL], "fold on a full disk");
}

/// Writes `$ROOT/templates.d/tiny.toml`: a template from `archive`.
fn define_tiny(root: &Path, archive: &Path) {
    let dir = root.join("templates.d");
    fs::create_dir_all(&dir).unwrap();
    fs::write(
        dir.join("tiny.toml"),
        format!("method = \"tarball\"\nsource = \"{}\"\n", archive.display()),
    )
    .unwrap();
}

/// A tarball (outside the loop filesystem) of a small root tree: identity files in `/etc`,
/// shareable files in `/usr`, and a private `/var/lib/blob` of `blob` bytes that every guest
/// built from it gets a copy of.
fn tarball(s: &Scratch, blob: usize) -> PathBuf {
    let tree = s.join("rootfs");
    let mut t = TreeBuilder::new(&tree);
    t.file("etc/hostname", b"template\n")
        .file("etc/hosts", b"127.0.0.1 localhost\n")
        .file("etc/machine-id", b"")
        .file("var/lib/blob", &content("blob", blob));
    for i in 0..20 {
        t.file(
            format!("usr/share/pkg/file{i:02}"),
            &content(&format!("shared-{i}"), 3000 + i),
        );
    }
    t.finish();
    let out = s.join("rootfs.tar");
    run_tool(
        Command::new("tar")
            .args(["--create", "--numeric-owner", "--xattrs", "--file"])
            .arg(&out)
            .arg("--directory")
            .arg(&tree)
            .arg("."),
        "tar",
    );
    out
}

/// Regular files of a manifest outside `/etc` (what a guest's identity leaves alone), with
/// what a guest sees of each.
fn files_outside_etc(m: &Manifest) -> Vec<(Vec<u8>, Entry)> {
    m.iter()
        .filter(|(k, e)| e.kind == Kind::File && !k.starts_with(b"etc/"))
        .map(|(k, e)| {
            let mut e = e.clone();
            e.hardlinks.clear();
            (k.clone(), e)
        })
        .collect()
}

#[test]
fn build_on_a_full_disk_leaves_no_guest_and_completes_once_space_is_freed() {
    assert_root();
    own_mount_namespace();
    let s = Scratch::new("full-build");
    let disk = LoopFs::new(&s, 64, 4096);
    let root = init_root(disk.path());
    define_tiny(&root, &tarball(&s, 6 << 20));
    run_ok(&root, &["template", "build", "tiny"]);
    run_ok(&root, &["build", "g1", "--template", "tiny"]);
    let tree = manifest(&root.join("templates/tiny/1/tree"));
    let g1 = base_view(&root, "g1");

    // The clone copies the 6 MiB private file: room for the start of it only.
    disk.fill_leaving(3 << 20);
    let ended = run(&root, &["build", "g2", "--template", "tiny"]);
    assert_failed(&ended, "build on a full disk");
    assert!(!root.join("guests/g2").exists(), "no half-built guest g2");
    assert_same_content_and_metadata(&g1, &base_view(&root, "g1"));
    assert_same_content_and_metadata(&tree, &manifest(&root.join("templates/tiny/1/tree")));

    disk.free_ballast();
    run_ok(&root, &["build", "g2", "--template", "tiny"]);
    assert_eq!(
        files_outside_etc(&manifest(&base(&root, "g2"))),
        files_outside_etc(&tree),
        "g2 has the template's files"
    );
    assert_same_content_and_metadata(&g1, &base_view(&root, "g1"));
    assert_no_leftovers(&root);
    assert_names_root_and_cause(&ended, &root, &[FULL], "build on a full disk");
}

#[test]
fn import_on_a_full_disk_leaves_no_guest_and_completes_once_space_is_freed() {
    assert_root();
    own_mount_namespace();
    let s = Scratch::new("full-import");
    let disk = LoopFs::new(&s, 64, 4096);
    let root = init_root(disk.path());
    adopt_built(&root, disk.path(), "old", small_tree);
    let old = base_view(&root, "old");
    // The machine (outside the loop filesystem): eight 1 MiB files to copy.
    let machine = s.join("machine");
    let mut t = TreeBuilder::new(&machine);
    t.file("etc/hostname", b"machine\n");
    for i in 0..8 {
        t.file(
            format!("srv/data/f{i}"),
            &content(&format!("data-{i}"), 1 << 20),
        );
    }
    t.finish();
    let from = machine.to_str().unwrap();

    // rsync runs out of space in the middle of the copy.
    disk.fill_leaving(3 << 20);
    let ended = run(&root, &["import", "m", "--from", from]);
    assert_failed(&ended, "import on a full disk");
    assert!(!root.join("guests/m").exists(), "no half-imported guest m");
    assert_same_content_and_metadata(&old, &base_view(&root, "old"));

    disk.free_ballast();
    run_ok(&root, &["import", "m", "--from", from]);
    let source = manifest(&machine.join("srv/data"));
    assert_same_content_and_metadata(&source, &manifest(&base(&root, "m").join("srv/data")));
    assert_same_content_and_metadata(&old, &base_view(&root, "old"));
    assert_no_leftovers(&root);
    assert_names_root_and_cause(&ended, &root, &[FULL], "import on a full disk");
}

// ---------------------------------------------------------------------------------------------
// A filesystem turned read-only
// ---------------------------------------------------------------------------------------------

/// What an error says when the filesystem is read-only: the kernel's EROFS, or cowherd's word
/// for it (SQLite reports a write refused with EROFS as a "disk I/O error").
const READ_ONLY: [&str; 2] = ["Read-only file system", "is read-only"];

/// The state letter of process `pid` (`R`, `S`, `D`, `T` stopped, `Z` ended), `None` once it
/// is reaped.
fn proc_state(pid: Pid) -> Option<char> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // "pid (comm) S …": the comm may hold spaces and parentheses, the state follows the last ')'.
    stat.rsplit_once(") ")?.1.chars().next()
}

/// Every path of `before` is in `after` with the same content and metadata, directory mtimes
/// aside; `after` has no other path but temporary names of a replacement (`.cowherd~…`).
fn assert_same_files_but_temporary_names(before: &Manifest, after: &Manifest) {
    let opts = CompareOpts {
        dir_mtimes: false,
        allow_extra: true,
    };
    let (mut problems, extra) = compare_manifests(before, after, opts);
    for rel in extra {
        let name = rel.rsplit(|&b| b == b'/').next().unwrap();
        if !name.starts_with(b".cowherd~") {
            problems.push(format!("{}: new path after", show(&rel)));
        }
    }
    assert!(
        problems.is_empty(),
        "guest tree changed:\n  {}",
        problems.join("\n  ")
    );
}

/// Starts `cowherd --root ROOT ARGS…`, waits (polling every millisecond) until `begun` says it
/// is in the middle of its work, stops it (SIGSTOP), turns the filesystem read-only, and lets
/// it go on (SIGCONT) to its end. Stopping it makes the moment exact: the filesystem turns
/// read-only between two of its system calls, never after it ended.
fn read_only_mid_run(
    disk: &LoopFs,
    s: &Scratch,
    root: &Path,
    args: &[&str],
    mut begun: impl FnMut() -> bool,
) -> Ended {
    let (mut cmd, err) = cowherd_child(root, args, s);
    let mut child = KillOnDrop::spawn(&mut cmd);
    let pid = Pid::from_raw(child.id() as i32);
    let deadline = Instant::now() + Duration::from_secs(60);
    while !begun() {
        if let Some(status) = child.0.try_wait().unwrap() {
            panic!(
                "cowherd {args:?} ended ({status}) before the work to interrupt began:\n{}",
                fs::read_to_string(&err).unwrap()
            );
        }
        assert!(Instant::now() < deadline, "cowherd {args:?} never began");
        sleep(Duration::from_millis(1));
    }
    kill(pid, Signal::SIGSTOP).unwrap();
    wait_for("cowherd to stop", || {
        matches!(proc_state(pid), Some('T' | 'Z'))
    });
    assert_eq!(
        proc_state(pid),
        Some('T'),
        "cowherd {args:?} ended before it could be stopped in the middle of its work"
    );
    disk.turn_read_only();
    kill(pid, Signal::SIGCONT).unwrap();
    let status = child.0.wait().unwrap();
    Ended {
        code: status.code(),
        stderr: fs::read_to_string(&err).unwrap(),
    }
}

#[test]
fn unify_on_a_filesystem_turned_read_only_changes_no_guest_and_completes_once_writable() {
    assert_root();
    own_mount_namespace();
    let s = Scratch::new("ro-unify");
    let mut disk = LoopFs::new(&s, 128, 16384);
    let root = init_root(disk.path());
    // Two guests of 2,000 equal small files in 40 directories: one guest's inodes become the
    // store objects, the other guest's paths are replaced by links to them.
    for g in ["a", "b"] {
        adopt_built(&root, disk.path(), g, |dir| {
            let mut t = TreeBuilder::new(dir);
            for d in 0..40 {
                for i in 0..50 {
                    t.file(
                        format!("usr/share/set{d:02}/f{i:02}"),
                        &content(&format!("f-{d}-{i}"), 500 + (d * 50 + i) % 3000),
                    );
                }
            }
        });
    }
    let before = [base_view(&root, "a"), base_view(&root, "b")];
    let pair = |d: usize, i: usize| {
        let rel = format!("usr/share/set{d:02}/f{i:02}");
        [base(&root, "a").join(&rel), base(&root, "b").join(&rel)]
    };
    // Begun: the replacing, once a first path of a guest is a link of the other's inode.
    let ended = read_only_mid_run(&disk, &s, &root, &["unify", "--all"], || {
        (0..40).any(|d| {
            let [a, b] = pair(d, 0);
            ino(&a) == ino(&b)
        })
    });
    assert_failed(&ended, "unify on a filesystem turned read-only");
    // What the guests see, as the kernel holds it now and as the disk holds it, is what a
    // killed run leaves: the same files, beside them maybe temporary names of the objects that
    // were to replace them, and directory mtimes not yet put back — the next run does both.
    for (g, was) in ["a", "b"].iter().zip(&before) {
        assert_same_files_but_temporary_names(was, &manifest(&base(&root, g)));
    }
    disk.repair();
    for (g, was) in ["a", "b"].iter().zip(&before) {
        assert_same_files_but_temporary_names(was, &manifest(&base(&root, g)));
    }

    run_ok(&root, &["unify", "--all"]);
    for (g, was) in ["a", "b"].iter().zip(&before) {
        assert_same_content_and_metadata(was, &manifest(&base(&root, g)));
        assert_all_linked(&root, &base(&root, g));
    }
    for d in 0..40 {
        for i in 0..50 {
            let [a, b] = pair(d, i);
            assert_eq!(ino(&a), ino(&b), "{} is shared", a.display());
        }
    }
    assert_no_leftovers(&root);
    assert_names_root_and_cause(
        &ended,
        &root,
        &READ_ONLY,
        "unify on a filesystem turned read-only",
    );
}

#[test]
fn fold_on_a_filesystem_turned_read_only_keeps_the_merged_view_and_completes_once_writable() {
    assert_root();
    own_mount_namespace();
    let s = Scratch::new("ro-fold");
    let mut disk = LoopFs::new(&s, 128, 16384);
    let root = init_root(disk.path());
    adopt_built(&root, disk.path(), "g", small_tree);
    run_guest(&root, "g", |point| guest_writes(point, 60, 50));
    let before = merged_view(&s, &root, "g");
    let moved_to = base(&root, "g").join("opt/app");
    // Begun: base has a few of the 60 new directories.
    let ended = read_only_mid_run(&disk, &s, &root, &["fold", "g"], || {
        fs::read_dir(&moved_to).is_ok_and(|d| d.count() >= 5)
    });
    assert_failed(&ended, "fold on a filesystem turned read-only");
    assert_same_content_and_metadata(&before, &merged_view(&s, &root, "g"));
    disk.repair();
    assert_same_content_and_metadata(&before, &merged_view(&s, &root, "g"));

    run_ok(&root, &["fold", "g"]);
    assert_same_content_and_metadata(&before, &merged_view(&s, &root, "g"));
    assert_eq!(
        fs::read_dir(upper(&root, "g")).unwrap().count(),
        0,
        "the upper layer is folded"
    );
    assert_same_content_and_metadata(&before, &manifest(&base(&root, "g")));
    assert_no_leftovers(&root);
    assert_names_root_and_cause(
        &ended,
        &root,
        &READ_ONLY,
        "fold on a filesystem turned read-only",
    );
}
