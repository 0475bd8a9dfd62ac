//! Guests running on their overlays: a write through one guest's rootfs changes no other guest
//! and no store object, immutable paths cannot be changed, two paths sharing an object stay
//! apart (index=off), the page cache is the store object's, and the mount lifecycle (mount,
//! umount, foreign mounts, busy guests, unify of mounted guests, in-place guests, systemd units).

mod common;

use std::fs::{self, OpenOptions};
use std::io::{self, BufRead, Write};
use std::os::unix::fs::{FileExt, FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};

use common::*;
use serde_json::json;

const GUESTS: [&str; 3] = ["a", "b", "c"];

/// Shared cow files under usr/lib/cow/, one per kind of change a guest makes.
const COW: [&str; 7] = [
    "overwrite",
    "append",
    "truncate",
    "chmod",
    "chown",
    "replaced",
    "deleted",
];

const POLICY: &str = r#"rules = ["private /etc/**", "immutable /usr/sbin/**", "cow /**"]
"#;

fn cow_bytes(name: &str) -> Vec<u8> {
    content(name, 3000)
}

/// One near-identical guest: shared cow files (identical content and metadata in every guest),
/// two equal files `usr/share/pair/{a,b}` that unify makes links of one object, an immutable
/// `usr/sbin/init`, and private /etc files (one differs per guest).
fn guest(t: &mut TreeBuilder, name: &str) {
    t.dir("", 0o755);
    for f in COW {
        t.file(format!("usr/lib/cow/{f}"), &cow_bytes(f));
    }
    t.file_with(
        "usr/bin/tool",
        &content("tool", 8192),
        0o755,
        0,
        0,
        DEFAULT_MTIME,
    )
    .symlink("usr/bin/sh", "tool")
    .file_with(
        "usr/sbin/init",
        &content("init", 8192),
        0o755,
        0,
        0,
        DEFAULT_MTIME,
    )
    .file("usr/share/pair/a", &content("pair", 4096))
    .file("usr/share/pair/b", &content("pair", 4096))
    .file("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\n")
    .file("etc/hostname", format!("{name}\n").as_bytes());
}

/// The tests of this binary run as threads of one process. A process started with `unshare -m`
/// holds a copy of every mount of that moment, other tests' overlays included, and keeps their
/// upper layers busy: the test that starts one runs alone, every other test shares this lock.
static NAMESPACES: RwLock<()> = RwLock::new(());

/// Guests a, b, c (built with [`guest`]) in a fresh root with the test policy; the overlays this
/// herd mounts are unmounted when it drops.
struct Herd {
    mounts: MountedGuests,
    root: PathBuf,
    s: Scratch,
    _shared: Option<RwLockReadGuard<'static, ()>>,
    _alone: Option<RwLockWriteGuard<'static, ()>>,
}

impl Herd {
    /// Built (plus `extra` in each guest) and adopted, not unified.
    fn adopted_with(tag: &str, alone: bool, extra: impl Fn(&mut TreeBuilder)) -> Self {
        let (_shared, _alone) = if alone {
            let lock = NAMESPACES.write();
            (None, Some(lock.unwrap_or_else(PoisonError::into_inner)))
        } else {
            let lock = NAMESPACES.read();
            (Some(lock.unwrap_or_else(PoisonError::into_inner)), None)
        };
        let s = Scratch::new(tag);
        let root = init_root(s.path());
        fs::write(root.join("policy.toml"), POLICY).unwrap();
        for g in GUESTS {
            adopt_built(&root, s.path(), g, |dir| {
                let mut t = TreeBuilder::new(dir);
                guest(&mut t, g);
                extra(&mut t);
            });
        }
        Herd {
            mounts: MountedGuests::default(),
            root,
            s,
            _shared,
            _alone,
        }
    }

    fn adopted(tag: &str) -> Self {
        Self::adopted_with(tag, false, |_| {})
    }

    /// Adopted and unified (`unify --all`).
    fn unified(tag: &str) -> Self {
        let h = Self::adopted(tag);
        h.unify_all();
        h
    }

    /// Unified and mounted (`mount --all`).
    fn mounted(tag: &str) -> Self {
        let mut h = Self::unified(tag);
        h.mount(&["--all"]);
        h
    }

    fn unify_all(&self) {
        cowherd(&self.root)
            .args(["unify", "--all"])
            .assert()
            .success();
    }

    /// `cowherd mount ARGS` (guest names or `--all`), asserting success.
    fn mount(&mut self, args: &[&str]) {
        for g in GUESTS {
            if args.contains(&g) || args.contains(&"--all") {
                self.mounts.watch(self.rootfs(g));
            }
        }
        cowherd(&self.root)
            .arg("mount")
            .args(args)
            .assert()
            .success();
    }

    fn rootfs(&self, g: &str) -> PathBuf {
        rootfs(&self.root, g)
    }

    fn base(&self, g: &str) -> PathBuf {
        base(&self.root, g)
    }

    fn store(&self) -> PathBuf {
        self.root.join("store/objects")
    }

    /// The store object `base(g)/rel` is a link of.
    fn object_of(&self, g: &str, rel: &str) -> StoreObject {
        let p = self.base(g).join(rel);
        store_inodes(&self.root)
            .remove(&ino(&p))
            .unwrap_or_else(|| panic!("{} is not a store object", p.display()))
    }
}

/// The tree at `dir` is as in `before`, everything compared (directory mtimes too).
fn assert_tree_unchanged(dir: &Path, before: &Manifest) {
    let opts = CompareOpts {
        dir_mtimes: true,
        allow_extra: false,
    };
    let (problems, _) = compare_manifests(before, &manifest(dir), opts);
    assert!(
        problems.is_empty(),
        "{} changed:\n  {}",
        dir.display(),
        problems.join("\n  ")
    );
}

fn assert_eperm(what: &str, r: io::Result<()>) {
    match r {
        Ok(()) => panic!("{what} succeeded on an immutable path"),
        Err(e) => assert_eq!(e.raw_os_error(), Some(libc::EPERM), "{what}: {e}"),
    }
}

fn stdout(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stdout).to_string()
}

/// Effective `index` of the overlay at `point`: named in its options, else the module default.
fn effective_index(point: &Path) -> String {
    let mounts = mounts_at(point);
    let top = mounts.last().expect("an overlay is mounted");
    assert_eq!(top.fstype, "overlay", "{top:?}");
    match top.option("index").flatten() {
        Some(v) => v.to_string_lossy().into_owned(),
        None => match fs::read_to_string("/sys/module/overlay/parameters/index") {
            Ok(d) if d.trim() == "Y" => "on".into(),
            Ok(_) => "off".into(),
            Err(e) => panic!("index not in {top:?} and no module default: {e}"),
        },
    }
}

#[test]
fn writing_a_cow_file_in_one_guest_changes_no_other_guest_nor_the_store() {
    assert_root();
    let h = Herd::mounted("cow-write");
    let mut watched = vec![h.base("a"), h.store()];
    for g in ["b", "c"] {
        watched.extend([h.base(g), h.rootfs(g)]);
    }
    let before: Vec<(Manifest, InodeMap)> = watched
        .iter()
        .map(|d| (manifest(d), inode_map(d)))
        .collect();
    for f in COW {
        let rel = format!("usr/lib/cow/{f}");
        let obj = h.object_of("a", &rel);
        for g in ["b", "c"] {
            assert_eq!(
                ino(&h.base(g).join(&rel)),
                obj.dev_ino,
                "{rel} is not shared"
            );
        }
    }
    let a = h.rootfs("a");
    let a_before = manifest(&a);

    let p = |f: &str| a.join("usr/lib/cow").join(f);
    let writable = |f: &str| OpenOptions::new().write(true).open(p(f)).unwrap();
    writable("overwrite").write_all_at(b"GUEST-A", 0).unwrap();
    OpenOptions::new()
        .append(true)
        .open(p("append"))
        .unwrap()
        .write_all(b"+appended")
        .unwrap();
    writable("truncate").set_len(100).unwrap();
    fs::set_permissions(p("chmod"), fs::Permissions::from_mode(0o600)).unwrap();
    std::os::unix::fs::chown(p("chown"), Some(1000), Some(1000)).unwrap();
    let new = p(".replaced.new");
    fs::write(&new, b"a new file").unwrap();
    fs::rename(&new, p("replaced")).unwrap();
    fs::remove_file(p("deleted")).unwrap();

    // Guest A sees each change, and nothing else changed in it.
    let mut overwritten = cow_bytes("overwrite");
    overwritten[..7].copy_from_slice(b"GUEST-A");
    let appended = [cow_bytes("append"), b"+appended".to_vec()].concat();
    let expect: [(&str, Vec<u8>); 5] = [
        ("overwrite", overwritten),
        ("append", appended),
        ("truncate", cow_bytes("truncate")[..100].to_vec()),
        ("chmod", cow_bytes("chmod")),
        ("replaced", b"a new file".to_vec()),
    ];
    for (f, bytes) in &expect {
        assert!(fs::read(p(f)).unwrap() == *bytes, "{f}: wrong content in A");
    }
    assert_eq!(fs::metadata(p("chmod")).unwrap().mode() & 0o7777, 0o600);
    let m = fs::metadata(p("chown")).unwrap();
    assert_eq!((m.uid(), m.gid()), (1000, 1000));
    assert_eq!(
        fs::symlink_metadata(p("deleted")).unwrap_err().kind(),
        io::ErrorKind::NotFound
    );
    let opts = CompareOpts {
        dir_mtimes: false,
        allow_extra: false,
    };
    let (problems, _) = compare_manifests(&a_before, &manifest(&a), opts);
    let changed: Vec<&str> = problems
        .iter()
        .filter_map(|p| p.strip_prefix("usr/lib/cow/")?.split(':').next())
        .collect();
    assert!(
        changed.len() == problems.len() && changed.len() == COW.len(),
        "A's rootfs must differ exactly in the 7 changed paths:\n  {}",
        problems.join("\n  ")
    );

    // No other guest, neither layer, and no store object changed (content, mode, owner, mtime,
    // xattrs, and which paths are links of which object).
    for (d, (m, inodes)) in watched.iter().zip(&before) {
        assert_tree_unchanged(d, m);
        assert!(inode_map(d) == *inodes, "{}: inodes changed", d.display());
    }

    // The changes live in A's upper layer: copies (never the store inode) and a whiteout.
    let up = upper(&h.root, "a").join("usr/lib/cow");
    let objects = store_inodes(&h.root);
    for f in COW.iter().filter(|f| **f != "deleted") {
        let m = fs::symlink_metadata(up.join(f))
            .unwrap_or_else(|e| panic!("{f} was not copied up into upper/: {e}"));
        assert!(m.is_file(), "upper/{f} is not a regular file");
        assert!(
            !objects.contains_key(&(m.dev(), m.ino())),
            "upper/{f} is a store object"
        );
    }
    for (f, bytes) in &expect {
        assert!(
            fs::read(up.join(f)).unwrap() == *bytes,
            "upper/{f}: wrong content"
        );
    }
    let wh = fs::symlink_metadata(up.join("deleted")).unwrap();
    assert!(
        wh.file_type().is_char_device() && wh.rdev() == 0,
        "upper/deleted is not a whiteout"
    );
}

#[test]
fn an_immutable_path_cannot_be_changed_from_inside_the_rootfs() {
    assert_root();
    let h = Herd::mounted("immutable");
    let obj = h.object_of("a", "usr/sbin/init");
    assert_eq!(obj.marker, 'i', "{}", obj.path.display());
    assert!(is_immutable(&obj.path), "flags {}", inode_flags(&obj.path));

    let r = h.rootfs("a");
    let p = r.join("usr/sbin/init");
    let write = || {
        OpenOptions::new()
            .write(true)
            .open(&p)?
            .write_all_at(b"x", 0)
    };
    assert_eperm("write", write());
    let append = || OpenOptions::new().append(true).open(&p)?.write_all(b"x");
    assert_eperm("append", append());
    let trunc = || {
        OpenOptions::new()
            .write(true)
            .truncate(true)
            .open(&p)
            .map(drop)
    };
    assert_eperm("open O_TRUNC", trunc());
    assert_eperm(
        "truncate",
        nix::unistd::truncate(&p, 0).map_err(io::Error::from),
    );
    assert_eperm(
        "chmod",
        fs::set_permissions(&p, fs::Permissions::from_mode(0o777)),
    );
    let new = r.join("usr/sbin/init.new");
    fs::write(&new, b"replacement").unwrap();
    assert_eperm("rename a new file onto it", fs::rename(&new, &p));
    assert_eperm(
        "rename it away",
        fs::rename(&p, r.join("usr/sbin/init.old")),
    );
    assert_eperm("unlink", fs::remove_file(&p));

    assert!(
        fs::read(&p).unwrap() == content("init", 8192),
        "rootfs content changed"
    );
    assert!(
        fs::read(&obj.path).unwrap() == content("init", 8192),
        "object changed"
    );
    assert!(is_immutable(&obj.path), "flags {}", inode_flags(&obj.path));
    assert!(!upper(&h.root, "a").join("usr/sbin/init").exists());

    // The same guest still changes its cow and private paths.
    fs::write(r.join("usr/bin/tool"), b"cow changed").unwrap();
    OpenOptions::new()
        .append(true)
        .open(r.join("etc/hostname"))
        .unwrap()
        .write_all(b"private changed\n")
        .unwrap();
    assert_eq!(fs::read(r.join("usr/bin/tool")).unwrap(), b"cow changed");
    assert_eq!(
        fs::read(r.join("etc/hostname")).unwrap(),
        b"a\nprivate changed\n"
    );
}

#[test]
fn two_paths_of_one_guest_that_share_an_object_do_not_change_together() {
    assert_root();
    let h = Herd::mounted("index-off");
    let obj = h.object_of("a", "usr/share/pair/a");
    assert_eq!(
        ino(&h.base("a").join("usr/share/pair/b")),
        obj.dev_ino,
        "unify did not make pair/a and pair/b one object"
    );
    let r = h.rootfs("a");
    assert_eq!(effective_index(&r), "off", "{:?}", mounts_at(&r));

    let f = OpenOptions::new()
        .write(true)
        .open(r.join("usr/share/pair/a"))
        .unwrap();
    f.write_all_at(b"only a", 0).unwrap();
    drop(f);
    let old = content("pair", 4096);
    assert!(
        fs::read(r.join("usr/share/pair/a"))
            .unwrap()
            .starts_with(b"only a")
    );
    assert!(
        fs::read(r.join("usr/share/pair/b")).unwrap() == old,
        "writing pair/a changed pair/b: the overlay joined the hardlinked lower paths"
    );
    assert!(
        fs::read(&obj.path).unwrap() == old,
        "the store object changed"
    );
}

#[test]
fn page_cache_reads_of_a_shared_file_are_served_by_the_store_object() {
    const BIG: usize = 4 << 20;
    assert_root();
    let mut h = Herd::adopted_with("page-cache", false, |t| {
        t.file("usr/lib/big.so", &content("big", BIG));
    });
    h.unify_all();
    h.mount(&["--all"]);
    let obj = h.object_of("a", "usr/lib/big.so");
    assert_eq!(ino(&h.base("b").join("usr/lib/big.so")), obj.dev_ino);

    for g in ["a", "b"] {
        evict_page_cache(&obj.path);
        let cached = resident_bytes(&obj.path);
        assert!(cached < 64 << 10, "evicting left {cached} bytes cached");
        let read = fs::read(h.rootfs(g).join("usr/lib/big.so")).unwrap();
        assert!(read == content("big", BIG), "{g} read wrong bytes");
        // A few pages may be reclaimed meanwhile by the host's other work; a read not served
        // by the object would leave it at ~0.
        let cached = resident_bytes(&obj.path);
        assert!(
            cached >= (BIG - BIG / 16) as u64,
            "after reading through {g}'s rootfs only {cached} of {BIG} bytes are cached on the object"
        );
    }
    assert!(
        !upper(&h.root, "a").join("usr/lib/big.so").exists(),
        "a read copied up"
    );
}

#[test]
fn mount_is_idempotent_and_list_shows_the_state() {
    assert_root();
    let mut h = Herd::unified("idempotent");
    for g in GUESTS {
        assert_eq!(
            listed_mount(&h.root, g),
            json!({"state": "unmounted"}),
            "{g}"
        );
    }
    h.mount(&["a"]);
    let a = h.rootfs("a");
    assert_eq!(
        listed_mount(&h.root, "a"),
        json!({"state": "mounted", "path": a})
    );
    assert_eq!(listed_mount(&h.root, "b"), json!({"state": "unmounted"}));
    assert_same_files(&manifest(&h.base("a")), &manifest(&a));

    let out = cowherd(&h.root).args(["mount", "a"]).output().unwrap();
    assert!(out.status.success(), "second mount: {out:?}");
    assert!(stdout(&out).contains("mounted already"), "{}", stdout(&out));
    assert_eq!(mounts_at(&a).len(), 1, "mounted twice: {:?}", mounts_at(&a));

    h.mounts.watch(h.rootfs("b"));
    h.mounts.watch(h.rootfs("c"));
    run_json(cowherd(&h.root).args(["mount", "--all", "--json"]));
    for g in GUESTS {
        let r = h.rootfs(g);
        let on = mounts_at(&r);
        assert!(on.len() == 1 && on[0].fstype == "overlay", "{g}: {on:?}");
        assert_eq!(
            listed_mount(&h.root, g),
            json!({"state": "mounted", "path": r})
        );
    }

    for _ in 0..2 {
        umount_ok(&h.root, &["a"]);
        assert!(mounts_at(&a).is_empty(), "{:?}", mounts_at(&a));
        assert_eq!(listed_mount(&h.root, "a"), json!({"state": "unmounted"}));
    }
    cowherd(&h.root)
        .args(["umount", "--all"])
        .assert()
        .success();
    for g in GUESTS {
        assert!(mounts_at(&h.rootfs(g)).is_empty(), "{g} still mounted");
        assert_eq!(listed_mount(&h.root, g), json!({"state": "unmounted"}));
    }
}

#[test]
fn a_mount_made_by_hand_with_index_on_is_reported_and_not_trusted() {
    assert_root();
    let mut h = Herd::unified("foreign");
    h.mount(&["a"]);
    umount_ok(&h.root, &["a"]);
    let a = h.rootfs("a");
    let dir = h.root.join("guests/a");
    let opts = format!(
        "lowerdir={},upperdir={},workdir={},index=on",
        dir.join("base").display(),
        dir.join("upper").display(),
        dir.join("work").display()
    );
    let status = Command::new("mount")
        .args(["-t", "overlay", "overlay", "-o", &opts])
        .arg(&a)
        .status()
        .unwrap();
    assert!(status.success(), "mount by hand: {status}");

    let listed = listed_mount(&h.root, "a");
    assert_eq!(listed["state"], "foreign", "{listed}");
    assert_eq!(listed["path"], json!(a), "{listed}");
    let why = listed["why"].as_str().unwrap_or_default();
    assert!(why.contains("index=on"), "why: {why:?}");

    let out = cowherd(&h.root).args(["mount", "a"]).output().unwrap();
    let err = assert_one_line_error(&out, 1);
    assert!(
        err.contains("not trusted") && err.contains("cowherd umount"),
        "{err}"
    );
    assert_eq!(mounts_at(&a).len(), 1, "{:?}", mounts_at(&a));

    umount_ok(&h.root, &["a"]);
    assert!(mounts_at(&a).is_empty(), "{:?}", mounts_at(&a));
    cowherd(&h.root).args(["mount", "a"]).assert().success();
    assert_eq!(
        listed_mount(&h.root, "a"),
        json!({"state": "mounted", "path": a})
    );
    assert_eq!(effective_index(&a), "off");
}

#[test]
fn umount_refuses_while_a_process_uses_the_guest_and_names_it() {
    assert_root();
    let h = Herd::mounted("busy");
    let r = h.rootfs("a");
    // perl with its root in the guest (its cwd stays outside); says so on stdout once done.
    let chroot = r#"chroot($ARGV[0]) or die "chroot: $!"; $| = 1; print "ready\n"; sleep 30"#;
    for how in ["cwd", "open file", "root"] {
        let mut cmd = Command::new(if how == "root" { "perl" } else { "sleep" });
        cmd.current_dir("/")
            .stdin(Stdio::null())
            .stdout(Stdio::piped());
        match how {
            "cwd" => cmd.arg("30").current_dir(r.join("usr/bin")),
            "open file" => cmd
                .arg("30")
                .stdin(fs::File::open(r.join("usr/bin/tool")).unwrap()),
            _ => cmd.args(["-e", chroot]).arg(&r),
        };
        let comm = cmd.get_program().to_string_lossy().to_string();
        // spawn() returns once the program was exec'd, with its cwd and fds in place; dropping
        // the command closes this process's copy of the file.
        let mut child = KillOnDrop::spawn(&mut cmd);
        drop(cmd);
        if how == "root" {
            let (out, mut said) = (child.0.stdout.take().unwrap(), String::new());
            io::BufReader::new(out).read_line(&mut said).unwrap();
            assert_eq!(said, "ready\n", "perl did not chroot");
        }
        let out = cowherd(&h.root).args(["umount", "a"]).output().unwrap();
        let err = assert_one_line_error(&out, 1);
        assert!(
            err.contains(&child.id().to_string()) && err.contains(&comm),
            "{how}: the error must name pid {} and {comm}: {err}",
            child.id()
        );
        assert_eq!(listed_mount(&h.root, "a")["state"], "mounted", "{how}");
        assert_eq!(mounts_at(&r).len(), 1, "{how}: {:?}", mounts_at(&r));
        drop(child);
    }
    umount_ok(&h.root, &["a"]);
    assert!(mounts_at(&r).is_empty());
}

#[test]
fn umount_refuses_while_another_mount_namespace_holds_the_overlay() {
    assert_root();
    let mut h = Herd::adopted_with("other-ns", true, |_| {});
    h.unify_all();
    h.mount(&["a"]);
    let r = h.rootfs("a");
    let child = other_mount_namespace();
    let pid = child.id();

    let out = cowherd(&h.root).args(["umount", "a"]).output().unwrap();
    let err = assert_one_line_error(&out, 1);
    assert!(
        err.contains(&pid.to_string()) && err.contains("sleep"),
        "the error must name pid {pid} and sleep: {err}"
    );
    assert_eq!(listed_mount(&h.root, "a")["state"], "mounted");
    assert_eq!(mounts_at(&r).len(), 1, "{:?}", mounts_at(&r));

    drop(child);
    umount_ok(&h.root, &["a"]);
    assert!(mounts_at(&r).is_empty());
}

#[test]
fn unify_refuses_a_mounted_guest_and_unify_all_skips_it() {
    assert_root();
    let mut h = Herd::adopted("unify-mounted");
    h.mount(&["a"]);
    let before = inode_map(&h.base("a"));

    let out = cowherd(&h.root).args(["unify", "a"]).output().unwrap();
    let err = assert_one_line_error(&out, 1);
    let point = h.rootfs("a").display().to_string();
    assert!(
        err.contains(&point) && err.contains("cowherd umount a"),
        "the error must name {point} and `cowherd umount a`: {err}"
    );
    assert!(
        inode_map(&h.base("a")) == before,
        "a mounted guest was changed"
    );

    let out = cowherd(&h.root).args(["unify", "--all"]).output().unwrap();
    assert_eq!(out.status.code(), Some(0), "unify --all: {out:?}");
    let text = stdout(&out);
    assert!(
        text.lines()
            .any(|l| l.contains("skipped") && l.contains("mounted guests: a")),
        "stdout must list the skipped mounted guest:\n{text}"
    );
    assert!(
        inode_map(&h.base("a")) == before,
        "a mounted guest was changed"
    );
    let obj = h.object_of("b", "usr/bin/tool");
    assert_eq!(ino(&h.base("c").join("usr/bin/tool")), obj.dev_ino);

    let v = run_json(cowherd(&h.root).args(["unify", "--all", "--json"]));
    assert_eq!(v["skipped_mounted"], json!(["a"]), "{v:#}");
    assert!(
        inode_map(&h.base("a")) == before,
        "a mounted guest was changed"
    );
}

#[test]
fn adopt_in_place_mounts_the_guest_where_its_runtime_expects_it() {
    assert_root();
    let mut h = Herd::unified("in-place");
    let path = h.s.join("runtime/ip/rootfs");
    guest(&mut TreeBuilder::new(&path), "ip");
    let want = manifest(&path);
    h.mounts.watch(&path);

    cowherd(&h.root)
        .arg("adopt")
        .arg(&path)
        .args(["--name", "ip", "--in-place"])
        .assert()
        .success();
    assert!(path.is_dir(), "{} is gone", path.display());
    assert_eq!(fs::read_dir(&path).unwrap().count(), 0, "PATH is not empty");
    assert_same_files(&want, &manifest(&h.base("ip")));
    assert_eq!(listed_mount(&h.root, "ip"), json!({"state": "unmounted"}));
    h.unify_all();

    cowherd(&h.root).args(["mount", "ip"]).assert().success();
    assert_eq!(
        listed_mount(&h.root, "ip"),
        json!({"state": "mounted", "path": path})
    );
    let on = mounts_at(&path);
    assert!(on.len() == 1 && on[0].fstype == "overlay", "{on:?}");
    assert!(mounts_at(&h.rootfs("ip")).is_empty());
    assert_same_files(&want, &manifest(&path));
    fs::write(path.join("etc/hostname"), b"moved\n").unwrap();
    assert_eq!(
        fs::read(upper(&h.root, "ip").join("etc/hostname")).unwrap(),
        b"moved\n"
    );
    assert_eq!(
        fs::read(h.base("ip").join("etc/hostname")).unwrap(),
        b"ip\n"
    );

    umount_ok(&h.root, &["ip"]);
    assert!(mounts_at(&path).is_empty());
    assert_eq!(fs::read_dir(&path).unwrap().count(), 0, "PATH is not empty");
    assert_eq!(listed_mount(&h.root, "ip"), json!({"state": "unmounted"}));
}

#[test]
fn unit_prints_a_systemd_unit_that_mounts_and_unmounts_the_guest() {
    assert_root();
    let mut h = Herd::unified("unit");
    let root = h.root.clone();
    let unit = |args: &[&str]| {
        let out = cowherd(&root).arg("unit").args(args).output().unwrap();
        assert!(out.status.success(), "unit {args:?}: {out:?}");
        stdout(&out)
    };
    let exec = |text: &str, key: &str| -> Vec<String> {
        let lines: Vec<&str> = text.lines().filter_map(|l| l.strip_prefix(key)).collect();
        assert_eq!(lines.len(), 1, "one {key} line:\n{text}");
        lines[0].split_whitespace().map(str::to_string).collect()
    };
    let text = unit(&["a"]);
    for line in [
        "[Unit]",
        "[Service]",
        "Type=oneshot",
        "RemainAfterExit=yes",
        "[Install]",
    ] {
        assert!(text.lines().any(|l| l == line), "no {line:?} in:\n{text}");
    }
    let (start, stop) = (exec(&text, "ExecStart="), exec(&text, "ExecStop="));
    assert!(start.ends_with(&["mount".into(), "a".into()]), "{start:?}");
    assert!(stop.ends_with(&["umount".into(), "a".into()]), "{stop:?}");
    let file = h.s.join("cowherd-a.service");
    fs::write(&file, &text).unwrap();
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&file)
        .output()
        .expect("run systemd-analyze");
    assert!(
        out.status.success(),
        "systemd-analyze verify: {out:?}\n{text}"
    );

    // What systemd would run mounts and unmounts the guest.
    h.mounts.watch(h.rootfs("a"));
    let run = |argv: &[String]| {
        let bin = argv[0].trim_start_matches(['-', '@', '+', '!', ':']);
        let out = Command::new(bin).args(&argv[1..]).output().unwrap();
        assert!(out.status.success(), "{argv:?}: {out:?}");
    };
    run(&start);
    assert_eq!(
        listed_mount(&h.root, "a"),
        json!({"state": "mounted", "path": h.rootfs("a")})
    );
    run(&stop);
    assert_eq!(listed_mount(&h.root, "a"), json!({"state": "unmounted"}));

    let text = unit(&["a", "--fold"]);
    let (start, stop) = (exec(&text, "ExecStart="), exec(&text, "ExecStop="));
    assert!(
        start.ends_with(&["mount".into(), "--fold".into(), "a".into()]),
        "{start:?}"
    );
    assert!(stop.ends_with(&["umount".into(), "a".into()]), "{stop:?}");
}
