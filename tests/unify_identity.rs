//! `unify` keeps every guest byte and attribute, shares exactly what the contract says, saves
//! what it says it saves, and does not redo work.

mod common;

use std::collections::{BTreeMap, HashSet};
use std::fs::{self, OpenOptions};
use std::path::{Path, PathBuf};

use common::*;

const GUESTS: [&str; 3] = ["g1", "g2", "g3"];

fn rich_root(s: &Scratch) -> PathBuf {
    let root = init_root(s.path());
    for (i, name) in GUESTS.iter().enumerate() {
        adopt_built(&root, s.path(), name, |d| rich_guest(d, i as u32 + 1));
    }
    root
}

#[test]
fn unify_keeps_every_guest_byte_and_attribute() {
    assert_root();
    let s = Scratch::new("identity");
    let root = rich_root(&s);
    let before: BTreeMap<&str, Manifest> = GUESTS
        .iter()
        .map(|g| (*g, manifest(&base(&root, g))))
        .collect();

    cowherd(&root).args(["unify", "--all"]).assert().success();

    for g in GUESTS {
        let after = manifest(&base(&root, g));
        assert_same_files(&before[g], &after);
        assert_groups_kept(&before[g], &after);
    }

    let store = store_inodes(&root);
    let i = |g: &str, rel: &[u8]| ino(&at(&base(&root, g), rel));

    // Cow files identical in every guest: one store inode.
    for rel in rich::SHARED {
        let inodes: HashSet<_> = GUESTS.iter().map(|g| i(g, rel)).collect();
        assert_eq!(
            inodes.len(),
            1,
            "{} is not one shared inode across guests",
            show(rel)
        );
        let o = store
            .get(&i("g1", rel))
            .unwrap_or_else(|| panic!("{} is not linked to a store object", show(rel)));
        assert_eq!(o.marker, 'c', "{} must be a cow object: {o:?}", show(rel));
    }

    // Private and empty files: never shared across guests.
    for rel in rich::PRIVATE_SAME.iter().chain(rich::EMPTY) {
        let inodes: HashSet<_> = GUESTS.iter().map(|g| i(g, rel)).collect();
        assert_eq!(inodes.len(), 3, "{} is shared across guests", show(rel));
        assert!(
            !store.contains_key(&i("g1", rel)),
            "{} is a store link",
            show(rel)
        );
    }
    // Empty files are not linked with each other inside a guest either.
    for g in GUESTS {
        let inodes: HashSet<_> = rich::EMPTY.iter().map(|rel| i(g, rel)).collect();
        assert_eq!(inodes.len(), rich::EMPTY.len(), "{g}: empty files linked");
    }
    // Same path, different bytes.
    for rel in rich::PER_VARIANT {
        let inodes: HashSet<_> = GUESTS.iter().map(|g| i(g, rel)).collect();
        assert_eq!(
            inodes.len(),
            3,
            "{} linked despite different bytes",
            show(rel)
        );
    }
    // One attribute apart: never the same inode, in any pair of guests.
    let mut owner_of = BTreeMap::new();
    for g in GUESTS {
        for rel in rich::ALMOST_EQUAL {
            if let Some(prev) = owner_of.insert(i(g, rel), *rel)
                && prev != *rel
            {
                panic!(
                    "{} and {} share an inode although they differ in one attribute",
                    show(prev),
                    show(rel)
                );
            }
        }
    }
    // The sparse file is still a 1 MiB hole + data (content checked by the manifest).
    // Directory mtimes are part of what a guest sees too.
    for g in GUESTS {
        assert_same_content_and_metadata(&before[g], &manifest(&base(&root, g)));
    }

    cowherd(&root).arg("verify").assert().success();
}

/// Four identical copies of a tree holding 2 MiB of /usr files (8 × 256 KiB) and a few small
/// private files.
fn copy_tree(dir: &Path) {
    let mut t = TreeBuilder::new(dir);
    for k in 0..8 {
        t.file(
            format!("usr/lib/blobs/blob-{k}"),
            &content(&format!("blob-{k}"), 256 * 1024),
        );
    }
    t.file("etc/hostname", b"copy\n")
        .file("etc/passwd", b"root:x:0:0::/root:/bin/sh\n")
        .file("var/lib/state", &content("state", 3000));
    t.finish();
}

#[test]
fn unify_saves_what_dry_run_promised_and_dry_run_changes_nothing() {
    assert_root();
    let s = Scratch::new("savings");
    let root = init_root(s.path());
    let names = ["c1", "c2", "c3", "c4"];
    for n in names {
        adopt_built(&root, s.path(), n, copy_tree);
    }
    let bases: Vec<PathBuf> = names.iter().map(|n| base(&root, n)).collect();
    let store = root.join("store");
    let mut all: Vec<&Path> = bases.iter().map(PathBuf::as_path).collect();
    all.push(&store);

    let one_copy = allocated_bytes(&[&bases[0]]);
    let cow_one_copy = allocated_file_bytes(&[&bases[0].join("usr")]);
    let before_total = allocated_bytes(&all);
    let before: Vec<(Manifest, InodeMap)> =
        bases.iter().map(|b| (manifest(b), inode_map(b))).collect();

    let dry = run_json(cowherd(&root).args(["unify", "--all", "--dry-run", "--json"]));
    let promised = saved_bytes(&dry);

    for (b, (m, inodes)) in bases.iter().zip(&before) {
        assert_same_content_and_metadata(m, &manifest(b));
        assert_eq!(
            &inode_map(b),
            inodes,
            "dry-run changed inodes under {}",
            b.display()
        );
    }
    assert!(
        files_under(&root.join("store/objects")).is_empty(),
        "dry-run created store objects"
    );

    cowherd(&root).args(["unify", "--all"]).assert().success();
    let after_total = allocated_bytes(&all);
    let reduction = before_total.saturating_sub(after_total);
    eprintln!(
        "one copy {one_copy} B (usr {cow_one_copy} B), before {before_total} B, after \
         {after_total} B, reduction {reduction} B, dry-run promised {promised} B"
    );

    // About one copy: the shared /usr file bytes once, the rest (private files, directories)
    // 4 times, + the store's directories.
    let private_rest = one_copy - cow_one_copy;
    let slack = 64 * 1024;
    assert!(
        after_total <= one_copy + 3 * private_rest + slack,
        "after unify {after_total} B is not about one copy ({one_copy} B + 3 × {private_rest} B \
         private + {slack} B)"
    );
    let diff = promised.abs_diff(reduction);
    assert!(
        diff * 100 <= reduction,
        "dry-run promised {promised} B, unify saved {reduction} B (> 1% apart)"
    );
    for (b, (m, _)) in bases.iter().zip(&before) {
        assert_same_files(m, &manifest(b));
    }
}

/// Two guests with 20 shared /usr files and one unique file each.
fn incremental_guest(dir: &Path, variant: u32) {
    let mut t = TreeBuilder::new(dir);
    for k in 0..20 {
        t.file(
            format!("usr/share/inc/f{k}"),
            &content(&format!("inc-{k}"), 4096 + k * 100),
        );
    }
    t.file(
        "usr/local/unique.bin",
        &content(&format!("inc-unique-{variant}"), 8192),
    );
    t.finish();
}

#[test]
fn a_second_unify_hashes_nothing_and_a_changed_file_is_rehashed_alone() {
    assert_root();
    let s = Scratch::new("incremental");
    let root = init_root(s.path());
    adopt_built(&root, s.path(), "g1", |d| incremental_guest(d, 1));
    adopt_built(&root, s.path(), "g2", |d| incremental_guest(d, 2));

    let first = run_json(cowherd(&root).args(["unify", "--all", "--json"]));
    assert!(hashed_files(&first) >= 21, "first run hashed: {first}");
    assert!(linked_files(&first) >= 20, "first run linked: {first}");

    let second = run_json(cowherd(&root).args(["unify", "--all", "--json"]));
    assert_eq!(hashed_files(&second), 0, "second run: {second}");
    assert_eq!(linked_files(&second), 0, "second run: {second}");

    // New bytes, same size, in g1's unique (unlinked) file; its mtime put back so that g2's
    // unique.bin (same size, same metadata) stays a candidate and the content must be hashed.
    let p = base(&root, "g1").join("usr/local/unique.bin");
    let new = content("inc-unique-changed", 8192);
    overwrite_keep_mtime(&p, &new);

    let third = run_json(cowherd(&root).args(["unify", "--all", "--json"]));
    let hashed = hashed_files(&third);
    assert!(
        (1..=2).contains(&hashed),
        "third run must hash just the changed file, hashed {hashed}: {third}"
    );
    assert_eq!(linked_files(&third), 0, "third run: {third}");
    assert_eq!(fs::read(&p).unwrap(), new);
}

#[test]
fn files_deleted_or_replaced_by_a_directory_leave_the_index() {
    assert_root();
    let s = Scratch::new("removed");
    let root = init_root(s.path());
    adopt_built(&root, s.path(), "g1", |d| incremental_guest(d, 1));
    adopt_built(&root, s.path(), "g2", |d| incremental_guest(d, 2));
    run_json(cowherd(&root).args(["unify", "--all", "--json"]));

    let b = base(&root, "g1");
    fs::remove_file(b.join("usr/share/inc/f1")).unwrap();
    fs::remove_file(b.join("usr/share/inc/f2")).unwrap();
    fs::create_dir(b.join("usr/share/inc/f2")).unwrap();
    let again = run_json(cowherd(&root).args(["unify", "--all", "--json"]));
    assert_eq!(
        find_number(&again, &|k| k == "files_removed"),
        Some(2),
        "{again}"
    );
    assert_eq!(hashed_files(&again), 0, "{again}");

    // The index no longer knows those paths: verify has nothing stale to say.
    let v = run_json(cowherd(&root).args(["verify", "--json"]));
    assert_eq!(v["stale"].as_array().map(Vec::len), Some(0), "{v}");
    let stats = run_json(cowherd(&root).args(["stats", "--json"]));
    let g1 = &stats_per_guest(&stats)["g1"];
    assert_eq!(g1["files"].as_u64(), Some(19), "{g1}");
}

/// Regression for the per-directory scan: rows of directories the walk no longer enters (a
/// deleted tree, a directory swapped for a symlink to the host) are dropped, the symlink is not
/// followed, and a file moved into a new directory is found there.
#[test]
fn a_deleted_tree_or_a_directory_swapped_for_a_symlink_leaves_the_index() {
    assert_root();
    let s = Scratch::new("removed-tree");
    let root = init_root(s.path());
    let guest = |d: &Path, v: u32| {
        incremental_guest(d, v);
        let mut t = TreeBuilder::new(d);
        for k in 0..5 {
            t.file(
                format!("opt/app/lib/deep/m{k}"),
                &content(&format!("deep-{k}"), 5000),
            );
            t.file(
                format!("srv/data/d{k}"),
                &content(&format!("data-{k}"), 5000),
            );
        }
        t.finish();
    };
    adopt_built(&root, s.path(), "g1", |d| guest(d, 1));
    adopt_built(&root, s.path(), "g2", |d| guest(d, 2));
    run_json(cowherd(&root).args(["unify", "--all", "--json"]));

    let b = base(&root, "g1");
    fs::remove_dir_all(b.join("opt")).unwrap();
    fs::remove_dir_all(b.join("srv/data")).unwrap();
    std::os::unix::fs::symlink("/etc", b.join("srv/data")).unwrap();
    fs::create_dir(b.join("usr/share/moved")).unwrap();
    fs::rename(b.join("usr/share/inc/f3"), b.join("usr/share/moved/f3")).unwrap();
    let again = run_json(cowherd(&root).args(["unify", "--all", "--json"]));
    assert_eq!(
        find_number(&again, &|k| k == "files_removed"),
        Some(11),
        "5 below opt, 5 below srv/data, and f3's old path: {again}"
    );
    assert_eq!(
        find_number(&again, &|k| k == "files_new"),
        Some(1),
        "only f3's new path; nothing below the symlink: {again}"
    );

    let v = run_json(cowherd(&root).args(["verify", "--json"]));
    assert_eq!(v["stale"].as_array().map(Vec::len), Some(0), "{v}");
    let stats = run_json(cowherd(&root).args(["stats", "--json"]));
    assert_eq!(stats_per_guest(&stats)["g1"]["files"].as_u64(), Some(21));
    let third = run_json(cowherd(&root).args(["unify", "--all", "--json"]));
    assert_eq!(
        find_number(&third, &|k| k == "files_removed"),
        Some(0),
        "{third}"
    );
    assert_eq!(
        find_number(&third, &|k| k == "files_new"),
        Some(0),
        "{third}"
    );
}

/// One file whose mtime depends on the variant, and one that is fully identical.
fn mtime_guest(dir: &Path, variant: u32) {
    let mut t = TreeBuilder::new(dir);
    t.file_with(
        "usr/share/t.txt",
        &content("mtime-only", 6000),
        0o644,
        0,
        0,
        (1_650_000_000 + i64::from(variant), 0),
    )
    .file("usr/share/same.txt", &content("mtime-same", 6000));
    t.finish();
}

#[test]
fn ignore_mtime_links_files_differing_only_in_mtime() {
    assert_root();
    let s = Scratch::new("ignore-mtime");
    let root = init_root(s.path());
    adopt_built(&root, s.path(), "g1", |d| mtime_guest(d, 1));
    adopt_built(&root, s.path(), "g2", |d| mtime_guest(d, 2));
    let (b1, b2) = (base(&root, "g1"), base(&root, "g2"));
    let before = (manifest(&b1), manifest(&b2));

    cowherd(&root).args(["unify", "--all"]).assert().success();
    assert_eq!(
        ino(&b1.join("usr/share/same.txt")),
        ino(&b2.join("usr/share/same.txt"))
    );
    assert_ne!(
        ino(&b1.join("usr/share/t.txt")),
        ino(&b2.join("usr/share/t.txt")),
        "files differing in mtime linked without --ignore-mtime"
    );
    assert_same_files(&before.0, &manifest(&b1));
    assert_same_files(&before.1, &manifest(&b2));

    cowherd(&root)
        .args(["unify", "--all", "--ignore-mtime"])
        .assert()
        .success();
    let t1 = b1.join("usr/share/t.txt");
    assert_eq!(
        ino(&t1),
        ino(&b2.join("usr/share/t.txt")),
        "--ignore-mtime did not link files differing only in mtime"
    );
    let kept = mtime_of(&t1);
    assert!(
        kept == (1_650_000_001, 0) || kept == (1_650_000_002, 0),
        "the shared inode must keep one of the guests' mtimes, has {kept:?}"
    );
    // Everything but that mtime is unchanged.
    for (b, m) in [(&b1, &before.0), (&b2, &before.1)] {
        let mut after = manifest(b);
        after.get_mut(&b"usr/share/t.txt"[..]).unwrap().mtime = m[&b"usr/share/t.txt"[..]].mtime;
        assert_same_files(m, &after);
    }
}

/// Equal /usr/bin and /usr/lib files in every guest.
fn imm_guest(dir: &Path) {
    let mut t = TreeBuilder::new(dir);
    for k in 0..4 {
        t.file_with(
            format!("usr/bin/prog-{k}"),
            &content(&format!("imm-prog-{k}"), 7000 + k * 10),
            0o755,
            0,
            0,
            DEFAULT_MTIME,
        );
    }
    t.file("usr/lib/libz.so", &content("imm-lib", 9000));
    t.finish();
}

#[test]
fn immutable_marker_sets_the_inode_flag_and_keeps_objects_apart() {
    assert_root();
    let s = Scratch::new("immutable");
    let root = init_root(s.path());
    let names = ["imm1", "imm2", "cow1", "cow2"];
    for n in names {
        adopt_built(&root, s.path(), n, imm_guest);
    }
    for n in ["imm1", "imm2"] {
        let toml = root.join("guests").join(n).join("guest.toml");
        let mut text = fs::read_to_string(&toml).unwrap();
        assert!(
            !text.contains("[policy]"),
            "guest.toml already has a [policy] table:\n{text}"
        );
        text.push_str("\n[policy]\nrules = [\"immutable /usr/bin/**\"]\n");
        fs::write(&toml, text).unwrap();
    }
    let before: BTreeMap<&str, Manifest> = names
        .iter()
        .map(|n| (*n, manifest(&base(&root, n))))
        .collect();

    cowherd(&root).args(["unify", "--all"]).assert().success();
    for n in names {
        assert_same_files(&before[n], &manifest(&base(&root, n)));
    }

    let store = store_inodes(&root);
    let p = |g: &str, rel: &str| base(&root, g).join(rel);
    for k in 0..4 {
        let rel = format!("usr/bin/prog-{k}");
        let (i1, i2) = (p("imm1", &rel), p("imm2", &rel));
        let (c1, c2) = (p("cow1", &rel), p("cow2", &rel));
        assert_eq!(ino(&i1), ino(&i2), "{rel}: immutable guests not linked");
        assert_eq!(ino(&c1), ino(&c2), "{rel}: cow guests not linked");
        assert_ne!(
            ino(&i1),
            ino(&c1),
            "{rel}: the immutable and the cow object must be different inodes"
        );
        assert_eq!(store.get(&ino(&i1)).map(|o| o.marker), Some('i'), "{rel}");
        assert_eq!(store.get(&ino(&c1)).map(|o| o.marker), Some('c'), "{rel}");
        assert!(is_immutable(&i1), "{rel}: flags {}", inode_flags(&i1));
        assert!(!is_immutable(&c1), "{rel}: cow object is immutable");

        let err = OpenOptions::new().write(true).open(&i1).unwrap_err();
        assert_eq!(
            err.raw_os_error(),
            Some(libc::EPERM),
            "write to {rel}: {err}"
        );
        let err = fs::rename(&i1, p("imm1", "usr/bin/renamed")).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EPERM), "rename {rel}: {err}");
        let err = fs::remove_file(&i1).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EPERM), "unlink {rel}: {err}");
    }
    // /usr/lib stays cow everywhere: one inode, not immutable.
    let lib: HashSet<_> = names
        .iter()
        .map(|n| ino(&p(n, "usr/lib/libz.so")))
        .collect();
    assert_eq!(
        lib.len(),
        1,
        "usr/lib/libz.so not shared by all four guests"
    );
    assert!(!is_immutable(&p("imm1", "usr/lib/libz.so")));

    cowherd(&root).arg("verify").assert().success();
}

/// The tools this suite relies on see what they must: the rich guest has every feature it
/// claims, and the manifest comparison notices every kind of change a guest could see.
#[test]
fn fixture_and_manifest_notice_every_kind_of_change() {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};

    assert_root();
    let s = Scratch::new("self-test");
    let g = s.join("g");
    rich_guest(&g, 1);
    let m = manifest(&g);
    let e = |rel: &[u8]| {
        m.get(rel)
            .unwrap_or_else(|| panic!("rich guest lacks {}", show(rel)))
    };

    assert_eq!(e(b"usr/bin/su").mode & 0o7777, 0o4755);
    assert_eq!(
        e(b"usr/bin/ping").xattrs.get(&b"security.capability"[..]),
        Some(&cap_net_raw_ep())
    );
    assert!(
        e(b"usr/lib/libacl.so")
            .xattrs
            .contains_key(&b"system.posix_acl_access"[..])
    );
    assert!(
        e(b"usr/lib/trusted.dat")
            .xattrs
            .contains_key(&b"trusted.cowherd-test"[..])
    );
    assert_eq!(e(b"usr/share/ro").mode & 0o7777, 0o555);
    assert_eq!(e(b"usr/share/fifo").kind, Kind::Fifo);
    assert_eq!(e(b"usr/share/devices/null").kind, Kind::CharDev);
    assert_eq!(e(b"usr/share/devices/loop0").kind, Kind::BlockDev);
    assert_eq!(
        e(b"usr/lib/hl/a").hardlinks,
        [b"usr/lib/hl/b".to_vec(), b"usr/lib/hl/c".to_vec()].into()
    );
    assert_eq!(
        e(b"usr/lib/passwd-link").target.as_deref(),
        Some(&b"/etc/passwd"[..])
    );
    assert!(e(b"usr/lib/big.bin").size > 1 << 20);
    let sparse = fs::metadata(g.join("usr/lib/sparse.img")).unwrap();
    assert!(
        sparse.blocks() * 512 < 64 * 1024,
        "sparse.img is not sparse"
    );
    for rel in rich::ALMOST_EQUAL {
        assert_eq!(e(rel).blake3, e(b"usr/share/same/base.txt").blake3);
    }

    let unchanged = manifest(&g);
    assert_same_content_and_metadata(&m, &unchanged);
    assert_groups_kept(&m, &unchanged);

    // One change at a time; each must be reported.
    type Change = Box<dyn Fn(&Path)>;
    let changes: Vec<(&str, Change)> = vec![
        (
            "content, same size and mtime",
            Box::new(|g| overwrite_keep_mtime(&g.join("usr/bin/tool-a"), &[7u8; 20 * 1024])),
        ),
        (
            "mode",
            Box::new(|g| {
                fs::set_permissions(g.join("usr/bin/tool-b"), fs::Permissions::from_mode(0o700))
                    .unwrap()
            }),
        ),
        (
            "owner",
            Box::new(|g| set_owner_mode(&g.join("usr/bin/dash"), 1, 0, 0o755)),
        ),
        (
            "mtime nsec",
            Box::new(|g| set_mtime(&g.join("usr/lib/big.bin"), (DEFAULT_MTIME.0, 1))),
        ),
        (
            "xattr value",
            Box::new(|g| {
                xattr::set(g.join("usr/share/same/xattr.txt"), "user.cowherd.tag", b"9").unwrap()
            }),
        ),
        (
            "capability removed",
            Box::new(|g| xattr::remove(g.join("usr/bin/ping"), "security.capability").unwrap()),
        ),
        (
            "symlink target",
            Box::new(|g| {
                fs::remove_file(g.join("usr/lib/up")).unwrap();
                std::os::unix::fs::symlink("../..", g.join("usr/lib/up")).unwrap();
                set_mtime(&g.join("usr/lib/up"), DEFAULT_MTIME);
            }),
        ),
        (
            "directory mtime",
            Box::new(|g| set_mtime(&g.join("usr/share/doc"), (1, 0))),
        ),
        (
            "new file",
            Box::new(|g| fs::write(g.join("usr/share/doc/new"), b"x").unwrap()),
        ),
    ];
    for (what, change) in &changes {
        let before = manifest(&g);
        change(&g);
        let (problems, _) = compare_manifests(
            &before,
            &manifest(&g),
            CompareOpts {
                dir_mtimes: true,
                allow_extra: false,
            },
        );
        assert!(!problems.is_empty(), "a change of {what} went unnoticed");
    }

    // A split hardlink group is noticed by assert_groups_kept.
    let before = manifest(&g);
    let b = g.join("usr/lib/hl/b");
    let bytes = fs::read(&b).unwrap();
    fs::remove_file(&b).unwrap();
    TreeBuilder::new(&g).file("usr/lib/hl/b", &bytes);
    let after = manifest(&g);
    assert_same_files(&before, &after);
    let split = std::panic::catch_unwind(|| assert_groups_kept(&before, &after));
    assert!(split.is_err(), "a split hardlink group went unnoticed");
}

/// One wide directory (2,600 files) and, sorting into the middle of it, a subdirectory of
/// 1,100 files: linking crosses several batches of 1,024 paths, and the wide directory is
/// touched by a batch, skipped by the next, touched again.
fn wide_guest(dir: &Path) {
    let mut t = TreeBuilder::new(dir);
    for k in 0..2600 {
        t.file(
            format!("usr/lib/wide/f{k:04}"),
            &content(&format!("wide-{k}"), 100),
        );
    }
    // "f1000x/…" sorts between "f1000" and "f1001".
    for k in 0..1100 {
        t.file(
            format!("usr/lib/wide/f1000x/g{k:04}"),
            &content(&format!("sub-{k}"), 100),
        );
    }
    t.finish();
}

#[test]
fn directories_linked_across_several_batches_keep_their_mtimes() {
    assert_root();
    let s = Scratch::new("wide-dirs");
    let root = init_root(s.path());
    for g in ["g1", "g2"] {
        adopt_built(&root, s.path(), g, wide_guest);
    }
    let before: Vec<Manifest> = ["g1", "g2"]
        .iter()
        .map(|g| manifest(&base(&root, g)))
        .collect();

    cowherd(&root).args(["unify", "--all"]).assert().success();

    for (g, before) in ["g1", "g2"].iter().zip(&before) {
        assert_same_content_and_metadata(before, &manifest(&base(&root, g)));
    }
    for rel in [
        "usr/lib/wide/f0000",
        "usr/lib/wide/f2599",
        "usr/lib/wide/f1000x/g0500",
    ] {
        assert_eq!(
            ino(&base(&root, "g1").join(rel)),
            ino(&base(&root, "g2").join(rel)),
            "{rel} is not shared"
        );
    }
}
