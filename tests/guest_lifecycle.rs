//! The offline verbs of a guest's life: `split` (private copies back), `export` (the merged view
//! as a tree or tarball), `destroy` (then `gc`), their refusal of a mounted guest, and
//! `stats --memory` on mounted guests.

mod common;

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;

/// Mounts `names` with `cowherd mount`; the guard unmounts them on drop, also on panic.
fn mount(root: &Path, names: &[&str]) -> MountedGuests {
    let mut guard = MountedGuests::default();
    for n in names {
        guard.watch(rootfs(root, n));
    }
    cowherd(root).arg("mount").args(names).assert().success();
    guard
}

/// Two guests sharing /usr files, one immutable path, and a file only g1 has twice.
fn pair_guest(dir: &Path, variant: u32) {
    let mut t = TreeBuilder::new(dir);
    t.file("usr/bin/tool", &content("tool", 30_000))
        .file("usr/lib/libx.so", &content("libx", 70_000))
        .file("usr/share/doc/a", &content("doc-a", 5_000))
        .file("usr/share/doc/b", &content("doc-b", 6_000))
        .file("usr/sbin/daemon", &content("daemon", 20_000))
        .file("etc/hostname", format!("pair-{variant}\n").as_bytes())
        .dir("proc", 0o555);
    if variant == 1 {
        // Twice in g1 only: an object no other guest uses.
        t.file("opt/own/one", &content("own", 9_000))
            .file("opt/own/two", &content("own", 9_000));
    }
    t.finish();
}

/// A root with the pair guests g1 and g2 adopted, `rule` first in its policy.
fn pair_root_with(s: &Scratch, rule: &str) -> PathBuf {
    let root = init_root(s.path());
    let mut policy = fs::read_to_string(root.join("policy.toml")).unwrap();
    policy = policy.replacen("rules = [", &format!("rules = [\n  \"{rule}\","), 1);
    fs::write(root.join("policy.toml"), policy).unwrap();
    adopt_built(&root, s.path(), "g1", |d| pair_guest(d, 1));
    adopt_built(&root, s.path(), "g2", |d| pair_guest(d, 2));
    root
}

/// The pair guests, `/usr/sbin` immutable, unified.
fn pair_root(s: &Scratch) -> PathBuf {
    let root = pair_root_with(s, "immutable /usr/sbin/**");
    cowherd(&root).args(["unify", "--all"]).assert().success();
    root
}

#[test]
fn split_gives_a_private_copy_and_the_next_unify_leaves_it_alone() {
    assert_root();
    let s = Scratch::new("split");
    let root = pair_root(&s);
    let (b1, b2) = (base(&root, "g1"), base(&root, "g2"));
    let tool = |b: &Path| ino(&b.join("usr/bin/tool"));
    assert_eq!(tool(&b1), tool(&b2), "unify shared /usr/bin/tool");
    let daemon_object = store_inodes(&root)[&ino(&b1.join("usr/sbin/daemon"))].clone();
    assert!(is_immutable(&daemon_object.path));
    let before = manifest(&b1);

    let report = run_json(cowherd(&root).args([
        "split",
        "g1",
        "/usr/bin/tool",
        "/usr/sbin",
        "/usr/share/doc",
        "--json",
    ]));
    let split: Vec<&str> = report["split"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert_eq!(
        split,
        [
            "/usr/bin/tool",
            "/usr/sbin/daemon",
            "/usr/share/doc/a",
            "/usr/share/doc/b"
        ]
    );
    // Same bytes and metadata, directory mtimes included; now private inodes.
    assert_same_content_and_metadata(&before, &manifest(&b1));
    for rel in [
        "usr/bin/tool",
        "usr/sbin/daemon",
        "usr/share/doc/a",
        "usr/share/doc/b",
    ] {
        assert_eq!(nlink(&b1.join(rel)), 1, "{rel} is still shared");
        assert!(
            !is_immutable(&b1.join(rel)),
            "{rel}: a private copy is mutable"
        );
        assert!(
            store_inodes(&root).contains_key(&ino(&b2.join(rel))),
            "g2's {rel} must stay shared"
        );
    }
    assert!(
        is_immutable(&daemon_object.path),
        "the object keeps its flag"
    );
    let record = fs::read_to_string(root.join("guests/g1/guest.toml")).unwrap();
    for rule in [
        "private /usr/bin/tool",
        "private /usr/sbin/**",
        "private /usr/share/doc/**",
    ] {
        assert!(record.contains(rule), "{rule} missing in:\n{record}");
    }

    // The next unify does not share them again.
    cowherd(&root).args(["unify", "--all"]).assert().success();
    assert_ne!(tool(&b1), tool(&b2));
    assert_eq!(nlink(&b1.join("usr/bin/tool")), 1);
    assert!(
        root.join("guests/g1/tmp").symlink_metadata().is_err(),
        "tmp/ is left behind"
    );
}

/// `tar -x` as the export's reader would run it.
fn untar(tarball: &Path, into: &Path) {
    fs::create_dir_all(into).unwrap();
    let status = Command::new("tar")
        .args([
            "--extract",
            "--same-owner",
            "--preserve-permissions",
            "--numeric-owner",
            "--xattrs",
            "--xattrs-include=*",
            "--acls",
            "--file",
        ])
        .arg(tarball)
        .arg("--directory")
        .arg(into)
        .status()
        .expect("GNU tar runs");
    assert!(status.success());
}

#[test]
fn export_of_a_unified_changed_guest_holds_its_merged_view() {
    assert_root();
    let s = Scratch::new("export");
    let root = init_root(s.path());
    for (i, name) in ["g1", "g2"].iter().enumerate() {
        adopt_built(&root, s.path(), name, |d| rich_guest(d, i as u32 + 1));
    }
    cowherd(&root).args(["unify", "--all"]).assert().success();
    let merged = {
        let _m = mount(&root, &["g1"]);
        let r = rootfs(&root, "g1");
        fs::write(r.join("usr/new-file"), content("new", 12_345)).unwrap();
        fs::remove_file(r.join("etc/hostname")).unwrap();
        let shared = files_under(&r.join("usr/share")).remove(0);
        fs::write(&shared, b"changed in place").unwrap();
        set_owner_mode(&r.join("usr"), 0, 0, 0o750);
        let merged = manifest(&r);

        // A mounted guest is read through its mount.
        let out = s.join("running");
        cowherd(&root)
            .args(["export", "g1"])
            .arg(&out)
            .assert()
            .success();
        // Closed to other users until opened: then it is the merged view.
        assert_eq!(fs::metadata(&out).unwrap().mode() & 0o7777, 0o700);
        fs::set_permissions(&out, fs::Permissions::from_mode(merged[&b""[..]].mode)).unwrap();
        assert_same_content_and_metadata(&merged, &manifest(&out));
        merged
    };

    // An unmounted one through a read-only view of its two layers, left unmounted after.
    let tarball = s.join("g1.tar");
    cowherd(&root)
        .args(["export", "g1", "--tar"])
        .arg(&tarball)
        .assert()
        .success();
    let unpacked = s.join("unpacked");
    untar(&tarball, &unpacked);
    assert_same_content_and_metadata(&merged, &manifest(&unpacked));
    // Regression (review): paths of g1 linked to one store object are separate files, so the
    // export holds them as such (a hardlink group would couple them on the new host).
    let mut paths_of = std::collections::HashMap::<_, usize>::new();
    for f in files_under(&base(&root, "g1")) {
        *paths_of.entry(ino(&f)).or_default() += 1;
    }
    assert!(paths_of.values().any(|&n| n > 1), "no shared object in g1");
    for f in files_under(&unpacked) {
        assert_eq!(
            fs::symlink_metadata(&f).unwrap().nlink(),
            1,
            "{}",
            f.display()
        );
    }
    let mounts = fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(
        !mounts.contains(root.join("guests/g1").to_str().unwrap()),
        "a view stayed mounted"
    );

    // An existing destination is refused.
    let out = cowherd(&root)
        .args(["export", "g1"])
        .arg(&unpacked)
        .output()
        .unwrap();
    let err = assert_one_line_error(&out, 1);
    assert!(err.contains("exists"), "{err}");
}

#[test]
fn destroy_removes_the_guest_and_gc_reclaims_only_its_objects() {
    assert_root();
    let s = Scratch::new("destroy");
    let root = pair_root(&s);
    let b2 = base(&root, "g2");
    let own = store_inodes(&root)[&ino(&base(&root, "g1").join("opt/own/one"))].clone();
    let daemon = store_inodes(&root)[&ino(&b2.join("usr/sbin/daemon"))].clone();
    let g2_before = manifest(&b2);

    cowherd(&root).args(["destroy", "g1"]).assert().success();
    assert!(!root.join("guests/g1").exists());
    let names = guest_names(&run_json(cowherd(&root).args(["list", "--json"])));
    assert_eq!(names.into_iter().collect::<Vec<_>>(), ["g2"]);
    // g1 linked the immutable object too: its flag is back.
    assert!(is_immutable(&daemon.path));
    assert_same_content_and_metadata(&g2_before, &manifest(&b2));

    let gc = run_json(cowherd(&root).args(["gc", "--json"]));
    let removed: Vec<&str> = gc["removed"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    let own_name = own.path.file_name().unwrap().to_str().unwrap();
    assert_eq!(
        removed,
        [own_name],
        "gc removes exactly the object only g1 used"
    );
    assert!(daemon.path.exists());
}

#[test]
fn a_destroy_killed_halfway_is_finished_by_the_next_writer() {
    assert_root();
    let s = Scratch::new("destroy-crash");
    let root = pair_root(&s);
    // What a destroy killed after its rename leaves: the guest under its doomed name.
    fs::rename(root.join("guests/g1"), root.join("guests/.g1.destroying")).unwrap();
    cowherd(&root).args(["gc", "--dry-run"]).assert().success();
    assert!(!root.join("guests/.g1.destroying").exists());
    let daemon = store_inodes(&root)[&ino(&base(&root, "g2").join("usr/sbin/daemon"))].clone();
    assert!(is_immutable(&daemon.path));
}

#[test]
fn split_fold_destroy_and_unify_refuse_a_mounted_guest() {
    assert_root();
    let s = Scratch::new("refuse");
    let root = pair_root(&s);
    let _m = mount(&root, &["g1"]);
    let before = (manifest(&base(&root, "g1")), inode_map(&base(&root, "g1")));
    for args in [
        &["split", "g1", "/usr/bin/tool"][..],
        &["fold", "g1"],
        &["destroy", "g1"],
        &["unify", "g1"],
    ] {
        let out = cowherd(&root).args(args).output().unwrap();
        let err = assert_one_line_error(&out, 1);
        assert!(
            err.contains("guests/g1/rootfs") && err.contains("cowherd umount g1"),
            "`cowherd {args:?}` must name the mount and the fix: {err}"
        );
    }
    assert_eq!(
        (manifest(&base(&root, "g1")), inode_map(&base(&root, "g1"))),
        before
    );
    assert!(root.join("guests/g1").exists());
}

#[test]
fn stats_memory_counts_the_page_cache_shared_by_mounted_guests() {
    assert_root();
    let s = Scratch::new("memory");
    let root = init_root(s.path());
    const BIG: usize = 4 << 20;
    for name in ["m1", "m2", "m3"] {
        adopt_built(&root, s.path(), name, |d| {
            let mut t = TreeBuilder::new(d);
            t.file("usr/lib/big.so", &content("big", BIG))
                .file("usr/bin/small", &content("small", 8_000))
                .file(format!("etc/{name}"), b"x");
            t.finish();
        });
    }
    cowherd(&root).args(["unify", "--all"]).assert().success();
    let object = store_inodes(&root)[&ino(&base(&root, "m1").join("usr/lib/big.so"))].clone();
    let none = run_json(cowherd(&root).args(["stats", "--memory", "--json"]));
    assert_eq!(none["mounted_guests"], serde_json::json!([]));

    let _m = mount(&root, &["m1", "m2", "m3"]);
    evict_page_cache(&object.path);
    for g in ["m1", "m2", "m3"] {
        fs::read(rootfs(&root, g).join("usr/lib/big.so")).unwrap();
    }
    let stats = run_json(cowherd(&root).args(["stats", "--memory", "--json"]));
    let top = &stats["top"][0];
    assert_eq!(
        top["object"],
        object.path.file_name().unwrap().to_str().unwrap()
    );
    assert_eq!(top["guests"], 3);
    // Read through three overlays, cached once (a page or two may be reclaimed meanwhile).
    let resident = top["resident_bytes"].as_u64().unwrap();
    assert!(
        resident >= BIG as u64 * 15 / 16 && resident <= BIG as u64,
        "{stats}"
    );
    assert_eq!(
        top["saved_bytes"].as_u64().unwrap(),
        2 * resident,
        "{stats}"
    );
    assert!(stats["page_cache_saved_bytes"].as_u64().unwrap() >= 2 * resident);
    assert!(stats["inodes"].as_u64().unwrap() < stats["inodes_unshared"].as_u64().unwrap());

    // A guest that copied the file up reads its own copy: the object loses a reader.
    fs::write(rootfs(&root, "m3").join("usr/lib/big.so"), b"mine").unwrap();
    let stats = run_json(cowherd(&root).args(["stats", "--memory", "--json"]));
    assert_eq!(stats["top"][0]["guests"], 2);
}

#[test]
fn exec_runs_inside_the_mounted_guest_with_its_hostname_and_files() {
    assert_root();
    let s = Scratch::new("exec");
    let root = init_root(s.path());
    adopt_built(&root, s.path(), "web7", |d| {
        minimal_userland(d, &["/bin/sh", "/bin/cat", "/bin/ls", "/bin/hostname"]);
        fs::create_dir_all(d.join("etc")).unwrap();
        fs::write(d.join("etc/marker"), b"inside web7\n").unwrap();
    });
    // Unmounted: its overlay is mounted for the command only (tests/exec_many.rs).
    let out = cowherd(&root)
        .args(["exec", "web7", "--", "sh", "-c", "cat /etc/marker"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert_eq!(out.stdout, b"inside web7\n");
    assert!(mounts_at(&rootfs(&root, "web7")).is_empty());

    let _m = mount(&root, &["web7"]);
    let host_only = s.join("host-only");
    fs::write(&host_only, b"host").unwrap();
    let script = format!(
        "hostname; cat /etc/marker; echo pid $$; echo $(ls /proc); \
         cat {} 2>/dev/null || echo no host file; echo guest-wrote > /etc/written",
        host_only.display()
    );
    let out = cowherd(&root)
        .args(["exec", "web7", "--", "sh", "-c", &script])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines[..3], ["web7", "inside web7", "pid 1"], "{stdout}");
    let pids: Vec<&str> = lines[3]
        .split(' ')
        .filter(|e| e.bytes().all(|b| b.is_ascii_digit()))
        .collect();
    assert!(
        pids.contains(&"1") && pids.len() <= 3,
        "its own /proc shows only its namespace: {pids:?}"
    );
    assert_eq!(lines[4], "no host file", "{stdout}");
    // Its write went through the overlay into the guest's upper layer.
    assert_eq!(
        fs::read(upper(&root, "web7").join("etc/written")).unwrap(),
        b"guest-wrote\n"
    );
    assert!(!base(&root, "web7").join("etc/written").exists());
    assert_ne!(
        nix::unistd::gethostname().unwrap(),
        "web7",
        "the host's hostname changed"
    );
    let code = cowherd(&root)
        .args(["exec", "web7", "--", "sh", "-c", "exit 7"])
        .output()
        .unwrap()
        .status
        .code();
    assert_eq!(code, Some(7), "the command's exit code comes through");
}

/// Regression: with `index.db` lost (the README says that costs a re-hash, never data),
/// `destroy` took a shared immutable object for a file of the guest's own and cleared its flag
/// for good: every other guest could then write it.
#[test]
fn destroy_keeps_the_flag_of_a_shared_immutable_object_when_the_index_was_lost() {
    assert_root();
    let s = Scratch::new("destroy-noindex");
    let root = pair_root(&s);
    let daemon = store_inodes(&root)[&ino(&base(&root, "g2").join("usr/sbin/daemon"))].clone();
    for f in ["index.db", "index.db-wal", "index.db-shm"] {
        let _ = fs::remove_file(root.join(f));
    }
    // Without its index a root refuses to work (it would not know the store's links); the
    // rebuilt index knows them again.
    let out = cowherd(&root).args(["destroy", "g1"]).output().unwrap();
    let err = assert_one_line_error(&out, 1);
    assert!(err.contains("index rebuild"), "{err}");
    assert!(root.join("guests/g1").exists());
    cowherd(&root).args(["index", "rebuild"]).assert().success();
    cowherd(&root).args(["destroy", "g1"]).assert().success();
    assert!(
        is_immutable(&daemon.path),
        "the shared object lost its flag"
    );
    assert_eq!(
        ino(&base(&root, "g2").join("usr/sbin/daemon")),
        daemon.dev_ino
    );
}

/// Builds `depth` nested directories `d/d/…` below `dir` (fd-relative: the path is longer than
/// PATH_MAX) with a file at the bottom.
fn deep_tree(dir: &Path, depth: usize) {
    use nix::fcntl::{OFlag, openat};
    use nix::sys::stat::{Mode, mkdirat};
    use std::os::fd::{AsFd, OwnedFd};
    fs::create_dir_all(dir).unwrap();
    let flags = OFlag::O_RDONLY | OFlag::O_DIRECTORY;
    let mut fd: OwnedFd = nix::fcntl::open(dir, flags, Mode::empty()).unwrap();
    for _ in 0..depth {
        mkdirat(fd.as_fd(), "d", Mode::from_bits_truncate(0o755)).unwrap();
        fd = openat(fd.as_fd(), "d", flags, Mode::empty()).unwrap();
    }
    let f = openat(
        fd.as_fd(),
        "bottom",
        OFlag::O_CREAT | OFlag::O_WRONLY,
        Mode::from_bits_truncate(0o644),
    )
    .unwrap();
    drop(f);
}

/// Regression: removing a guest tree held a descriptor per level, so a guest's 3000-level tree
/// made `destroy` fail with EMFILE, and with it every later writing command (each one tried to
/// finish the destroy first).
#[test]
fn a_guest_tree_thousands_of_levels_deep_is_destroyed_with_few_descriptors() {
    assert_root();
    let s = Scratch::new("destroy-deep");
    let root = init_root(s.path());
    adopt_built(&root, s.path(), "deep", |d| deep_tree(&d.join("srv"), 3000));
    adopt_built(&root, s.path(), "other", |d| deep_tree(&d.join("srv"), 2));
    let status = Command::new("prlimit")
        .arg("--nofile=256")
        .arg(cowherd_bin())
        .arg("--root")
        .arg(&root)
        .args(["destroy", "deep"])
        .status()
        .expect("prlimit (util-linux) runs");
    assert!(status.success());
    assert!(!root.join("guests/deep").exists() && !root.join("guests/.deep.destroying").exists());
    cowherd(&root).args(["unify", "--all"]).assert().success();
}

/// Regression: a guest that copied up a file whose base path became an immutable store link
/// afterwards (the admin unified the stopped guest before folding it) could never be folded.
#[test]
fn fold_replaces_a_base_path_that_is_an_immutable_store_link() {
    assert_root();
    let s = Scratch::new("fold-immutable-object");
    let root = pair_root_with(&s, "immutable /usr/bin/**");
    {
        let _m = mount(&root, &["g1"]);
        fs::write(rootfs(&root, "g1").join("usr/bin/tool"), b"patched by g1").unwrap();
        umount_ok(&root, &["g1"]);
    }
    cowherd(&root).args(["unify", "--all"]).assert().success();
    let object = store_inodes(&root)[&ino(&base(&root, "g1").join("usr/bin/tool"))].clone();
    assert!(is_immutable(&object.path));

    let report = run_json(cowherd(&root).args(["fold", "g1", "--json"]));
    assert_eq!(report[0]["failures"], serde_json::json!([]), "{report:#}");
    assert_eq!(
        fs::read(base(&root, "g1").join("usr/bin/tool")).unwrap(),
        b"patched by g1"
    );
    assert!(
        is_immutable(&object.path),
        "the object g2 still links keeps its flag"
    );
    assert_eq!(ino(&base(&root, "g2").join("usr/bin/tool")), object.dev_ino);
}

#[test]
fn an_exported_tarball_is_readable_by_root_only_and_never_written_through_a_symlink() {
    assert_root();
    let s = Scratch::new("export-perms");
    let root = pair_root(&s);
    let tarball = s.join("g1.tar");
    cowherd(&root)
        .args(["export", "g1", "--tar"])
        .arg(&tarball)
        .assert()
        .success();
    assert_eq!(
        fs::metadata(&tarball).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let victim = s.join("victim");
    fs::write(&victim, b"keep").unwrap();
    let planted = s.join("planted.tar");
    std::os::unix::fs::symlink(&victim, &planted).unwrap();
    let out = cowherd(&root)
        .args(["export", "g1", "--tar"])
        .arg(&planted)
        .output()
        .unwrap();
    assert_one_line_error(&out, 1);
    assert_eq!(fs::read(&victim).unwrap(), b"keep");
}

#[test]
fn split_keeps_a_hardlink_group_of_the_guest_one_inode_with_its_flags() {
    assert_root();
    let s = Scratch::new("split-group");
    let root = init_root(s.path());
    let body = content("grouped", 20_000);
    // g1 holds one inode at two paths (in two directories); g2 the same file once. The
    // group's inode, all of whose links unify links, becomes the store object. It then gets
    // a flag (nodump), as an object adopted from a flagged file by an older cowherd has (a
    // flagged file is no longer shared): split keeps it.
    adopt_built(&root, s.path(), "g1", |d| {
        TreeBuilder::new(d)
            .file("usr/lib/a", &body)
            .hardlink("usr/lib/a", "usr/bin/b")
            .file("etc/hostname", b"g1\n");
    });
    adopt_built(&root, s.path(), "g2", |d| {
        TreeBuilder::new(d).file("usr/lib/a", &body);
    });
    cowherd(&root).args(["unify", "--all"]).assert().success();
    let (b1, b2) = (base(&root, "g1"), base(&root, "g2"));
    let object = store_inodes(&root)[&ino(&b1.join("usr/lib/a"))].clone();
    chattr("+d", &object.path);
    assert_eq!(ino(&b1.join("usr/bin/b")), object.dev_ino);
    assert_eq!(ino(&b2.join("usr/lib/a")), object.dev_ino);
    assert!(
        inode_flags(&object.path).contains('d'),
        "fixture: g1's inode is the object"
    );
    let before = manifest(&b1);

    let report = run_json(cowherd(&root).args(["split", "g1", "/usr/lib/a", "--json"]));
    let mut split: Vec<&str> = report["split"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    split.sort();
    assert_eq!(split, ["/usr/bin/b", "/usr/lib/a"], "{report}");
    assert_eq!(
        report["copied_bytes"], 20_000,
        "one copy for the group: {report}"
    );

    // What g1 sees is unchanged, its link group included; now one private inode.
    let after = manifest(&b1);
    assert_same_content_and_metadata(&before, &after);
    assert_groups_kept(&before, &after);
    let (a, b) = (b1.join("usr/lib/a"), b1.join("usr/bin/b"));
    assert_eq!(ino(&a), ino(&b), "a and b are one inode again");
    assert_ne!(ino(&a), object.dev_ino, "a private inode, not the store's");
    assert_eq!(nlink(&a), 2);
    assert!(
        inode_flags(&a).contains('d'),
        "g1's flag is kept: {}",
        inode_flags(&a)
    );
    // A write through one path reaches the other; the object still serves g2, unchanged.
    fs::OpenOptions::new()
        .append(true)
        .open(&a)
        .and_then(|mut f| std::io::Write::write_all(&mut f, b"more"))
        .unwrap();
    assert_eq!(fs::read(&b).unwrap(), [body.as_slice(), b"more"].concat());
    assert_eq!(ino(&b2.join("usr/lib/a")), object.dev_ino);
    assert_eq!(fs::read(&object.path).unwrap(), body);
    assert_eq!(nlink(&object.path), 2, "the store's name and g2's");
}

#[test]
fn an_exported_tree_is_closed_to_other_users_until_it_is_opened() {
    assert_root();
    let s = Scratch::new("export-closed");
    fs::set_permissions(s.path(), fs::Permissions::from_mode(0o755)).unwrap();
    let root = init_root(s.path());
    adopt_built(&root, s.path(), "g", |d| {
        TreeBuilder::new(d)
            .file_with(
                "usr/bin/su",
                &content("su", 4_000),
                0o4755,
                0,
                0,
                DEFAULT_MTIME,
            )
            .file("etc/hostname", b"g\n");
    });
    let dest = s.join("exported");
    let out = cowherd(&root)
        .args(["export", "g"])
        .arg(&dest)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(said.contains("0700"), "the output names the mode: {said}");
    let open = format!("chmod 755 {}", dest.display());
    assert!(
        said.contains(&open),
        "the output says how to open it: {said}"
    );
    assert_eq!(
        fs::metadata(&dest).unwrap().permissions().mode() & 0o7777,
        0o700
    );
    // The check is real: `nobody` reaches the directory above DEST, nothing in it, and the
    // guest's setuid-root file not at all.
    let nobody = |argv: &[&Path]| {
        as_user_nobody(argv[0])
            .args(&argv[1..])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
            .expect("setpriv (util-linux) runs")
            .success()
    };
    let su = dest.join("usr/bin/su");
    assert_eq!(
        fs::metadata(&su).unwrap().permissions().mode() & 0o7777,
        0o4755
    );
    assert!(nobody(&[Path::new("ls"), s.path()]));
    assert!(!nobody(&[Path::new("ls"), &dest]), "nobody listed DEST");
    assert!(!nobody(&[Path::new("stat"), &su]), "nobody reached {su:?}");
    // Opened as the output says, it is the guest's tree, its top's mode included.
    assert!(
        Command::new("sh")
            .arg("-c")
            .arg(&open)
            .status()
            .unwrap()
            .success()
    );
    assert!(nobody(&[Path::new("ls"), &dest]));
    assert_same_content_and_metadata(&manifest(&base(&root, "g")), &manifest(&dest));
}
