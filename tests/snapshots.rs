//! Snapshots of a stopped guest and rollbacks to them, through the real binary on real overlay
//! mounts: a rollback gives back exactly what the guest saw at its snapshot (and another
//! rollback undoes it); a snapshot is made of links and costs its directories; nothing
//! `fold`, `unify`, `split` or `verify --repair` does changes one; `gc` keeps the objects only
//! snapshots link, `stats` counts snapshots apart and `destroy` removes them; every refusal is
//! one line naming the fix; a hostile tree is never followed; a dry run changes nothing.
//! Everything runs as root, each test that mounts in a mount namespace of its own.

mod common;

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use serde_json::Value;

use common::*;

// ---------------------------------------------------------------------------------------------
// Guests, mounts and the commands
// ---------------------------------------------------------------------------------------------

/// `cowherd mount NAME`, asserting success; the mount point is watched by `mounts`, so that it
/// is unmounted even if the test panics. Returns the rootfs.
fn mount_guest(root: &Path, name: &str, mounts: &mut MountedGuests) -> PathBuf {
    let point = rootfs(root, name);
    mounts.watch(&point);
    cowherd(root).args(["mount", name]).assert().success();
    point
}

/// `cowherd umount NAME`, asserting success.
fn umount_guest(root: &Path, name: &str) {
    umount_ok(root, &[name]);
}

/// `$ROOT/guests/NAME`.
fn guest_dir(root: &Path, name: &str) -> PathBuf {
    root.join("guests").join(name)
}

/// `$ROOT/guests/GUEST/snapshots/SNAP/tree`.
fn snapshot_tree(root: &Path, guest: &str, snap: &str) -> PathBuf {
    guest_dir(root, guest)
        .join("snapshots")
        .join(snap)
        .join("tree")
}

/// `cowherd snapshot GUEST --name NAME --json`, asserting success: the guest's report.
fn snapshot(root: &Path, guest: &str, name: &str) -> Value {
    let v = run_json(cowherd(root).args(["snapshot", guest, "--name", name, "--json"]));
    match v {
        Value::Array(mut reports) if reports.len() == 1 => reports.remove(0),
        other => panic!("snapshot --json of one guest is not a one-report array:\n{other:#}"),
    }
}

/// `cowherd rollback GUEST [NAME] --json`, asserting success.
fn rollback(root: &Path, guest: &str, name: Option<&str>) -> Value {
    let mut cmd = cowherd(root);
    cmd.args(["rollback", guest]).args(name).arg("--json");
    run_json(&mut cmd)
}

/// `cowherd snapshot list GUEST --json`, asserting success.
fn snapshot_list(root: &Path, guest: &str) -> Vec<Value> {
    match run_json(cowherd(root).args(["snapshot", "list", guest, "--json"])) {
        Value::Array(rows) => rows,
        other => panic!("snapshot list --json is not an array:\n{other:#}"),
    }
}

/// The row of snapshot `name` in `snapshot list GUEST --json`.
fn listed_snapshot(root: &Path, guest: &str, name: &str) -> Value {
    let rows = snapshot_list(root, guest);
    rows.iter()
        .find(|r| r["name"] == name)
        .cloned()
        .unwrap_or_else(|| panic!("no snapshot {name} of {guest} listed:\n{rows:#?}"))
}

fn write(p: &Path, bytes: &[u8]) {
    fs::write(p, bytes).unwrap_or_else(|e| panic!("write {}: {e}", p.display()));
}

fn chmod(p: &Path, mode: u32) {
    fs::set_permissions(p, fs::Permissions::from_mode(mode))
        .unwrap_or_else(|e| panic!("chmod {}: {e}", p.display()));
}

fn append(p: &Path, bytes: &[u8]) {
    OpenOptions::new()
        .append(true)
        .open(p)
        .and_then(|mut f| f.write_all(bytes))
        .unwrap_or_else(|e| panic!("append to {}: {e}", p.display()));
}

/// Adds `rule` first to the root's policy.
fn policy_rule_first(root: &Path, rule: &str) {
    let p = root.join("policy.toml");
    let policy = fs::read_to_string(&p).unwrap();
    fs::write(
        &p,
        policy.replacen("rules = [", &format!("rules = [\n  \"{rule}\","), 1),
    )
    .unwrap();
}

/// What the tests flag from inside a guest: `chattr +i` on a file, `chattr +a` on a file and
/// on a directory.
const FLAGGED: [(&str, &str); 3] = [
    ("+i", "etc/pinned.conf"),
    ("+a", "var/log/app.log"),
    ("+a", "var/log/journal"),
];

/// Pairs of equal files only guest `a` has: each pair one store object once unified, a cow one
/// and one in `/usr/bin` (immutable where the policy says so).
const ONLY_A: [(&str, &str); 2] = [
    ("opt/own/one", "opt/own/two"),
    ("usr/bin/own-a", "usr/bin/own-b"),
];

/// A [`rich_guest`] (symlinks in and out, a hardlink group, setuid, a capability, an ACL, a
/// trusted xattr, a sparse file, a fifo, devices, odd names, a read-only directory) with the
/// files [`FLAGGED`] names; variant 0 with the pairs of [`ONLY_A`].
fn flaggable_rich_guest(dir: &Path, variant: u32) {
    rich_guest(dir, variant);
    let mut t = TreeBuilder::new(dir);
    t.file("etc/pinned.conf", b"do not touch\n")
        .file("var/log/app.log", b"line 1\n")
        .file("var/log/journal/0001", b"entry 1\n");
    if variant == 0 {
        // Twice in guest 0 only: store objects no other guest links.
        for (one, two) in ONLY_A {
            for rel in [one, two] {
                t.file_with(rel, &content(one, 7000), 0o755, 0, 0, DEFAULT_MTIME);
            }
        }
    }
    t.finish();
    drop(t);
    for d in [
        "var/log/journal",
        "var/log",
        "var",
        "etc",
        "usr/bin",
        "opt/own",
        "opt",
    ] {
        if dir.join(d).exists() {
            set_mtime(&dir.join(d), DEFAULT_MTIME);
        }
    }
}

/// A root with guests `a` and `b` ([`flaggable_rich_guest`] variants 0 and 1), `rule` first in
/// its policy if any, unified.
fn rich_pair(s: &Scratch, rule: Option<&str>) -> PathBuf {
    let root = init_root(s.path());
    if let Some(rule) = rule {
        policy_rule_first(&root, rule);
    }
    adopt_built(&root, s.path(), "a", |d| flaggable_rich_guest(d, 0));
    adopt_built(&root, s.path(), "b", |d| flaggable_rich_guest(d, 1));
    cowherd(&root).args(["unify", "--all"]).assert().success();
    root
}

/// Sets the [`FLAGGED`] flags through the mounted guest at `point`.
fn flag_from_inside(point: &Path) {
    for (flag, rel) in FLAGGED {
        chattr(flag, &point.join(rel));
    }
}

/// The `lsattr` flags of the [`FLAGGED`] paths below `dir`.
fn flagged_flags(dir: &Path) -> Vec<String> {
    FLAGGED
        .iter()
        .map(|(_, rel)| inode_flags(&dir.join(rel)))
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Comparing trees
// ---------------------------------------------------------------------------------------------

/// The hardlink groups of a manifest: per path of a regular file, the other paths sharing its
/// inode.
fn groups(m: &Manifest) -> BTreeMap<Vec<u8>, BTreeSet<Vec<u8>>> {
    m.iter()
        .filter(|(_, e)| e.kind == Kind::File)
        .map(|(p, e)| (p.clone(), e.hardlinks.clone()))
        .collect()
}

/// Asserts that `after` shows exactly what `before` showed: content, type, mode, owner, mtime
/// (of directories too), size, rdev, symlink target, every xattr; and that paths that were
/// one inode still are (`unify` may make more of them one inode: equal files).
fn assert_same_view(before: &Manifest, after: &Manifest, what: &str) {
    assert_view(before, after, what, false);
}

/// [`assert_same_view`], and the hardlink groups exactly as they were (a tree no `unify` ran
/// on since).
fn assert_same_tree(before: &Manifest, after: &Manifest, what: &str) {
    assert_view(before, after, what, true);
}

fn assert_view(before: &Manifest, after: &Manifest, what: &str, exact_groups: bool) {
    let opts = CompareOpts {
        dir_mtimes: true,
        allow_extra: false,
    };
    let (mut problems, _) = compare_manifests(before, after, opts);
    let (gb, ga) = (groups(before), groups(after));
    for (p, b) in &gb {
        if let Some(a) = ga.get(p)
            && (if exact_groups {
                a != b
            } else {
                !a.is_superset(b)
            })
        {
            problems.push(format!(
                "{}: one inode with {:?}, now with {:?}",
                show(p),
                b.iter().map(|q| show(q)).collect::<Vec<_>>(),
                a.iter().map(|q| show(q)).collect::<Vec<_>>()
            ));
        }
    }
    let shown: Vec<&str> = problems.iter().take(30).map(String::as_str).collect();
    assert!(
        problems.is_empty(),
        "{what}: {} difference(s):\n  {}",
        problems.len(),
        shown.join("\n  ")
    );
}

/// Everything that could change in a snapshot (or base) tree but link counts: its manifest (link groups included), the
/// inode of every path, and the inode flags of its files and directories.
struct Frozen {
    manifest: Manifest,
    inodes: BTreeMap<Vec<u8>, (u64, u64)>,
    flags: BTreeMap<Vec<u8>, String>,
}

fn freeze(tree: &Path) -> Frozen {
    let manifest = manifest(tree);
    let inodes = inode_map(tree)
        .into_iter()
        .map(|(p, (dev, ino, _))| (p, (dev, ino)))
        .collect();
    let flags = manifest
        .iter()
        .filter(|(_, e)| matches!(e.kind, Kind::File | Kind::Dir))
        .map(|(p, _)| (p.clone(), inode_flags(&at(tree, p))))
        .collect();
    Frozen {
        manifest,
        inodes,
        flags,
    }
}

/// Asserts that the tree at `tree` is still exactly `before` (see [`Frozen`]).
fn assert_frozen(before: &Frozen, tree: &Path, what: &str) {
    let now = freeze(tree);
    assert_same_tree(&before.manifest, &now.manifest, what);
    let moved: Vec<String> = before
        .inodes
        .iter()
        .filter(|(p, i)| now.inodes.get(*p) != Some(i))
        .map(|(p, i)| format!("{}: inode {i:?} -> {:?}", show(p), now.inodes.get(p)))
        .collect();
    assert!(
        moved.is_empty(),
        "{what}: inodes changed:\n  {}",
        moved.join("\n  ")
    );
    let reflagged: Vec<String> = before
        .flags
        .iter()
        .filter(|(p, f)| now.flags.get(*p) != Some(f))
        .map(|(p, f)| format!("{}: flags {f} -> {:?}", show(p), now.flags.get(p)))
        .collect();
    assert!(
        reflagged.is_empty(),
        "{what}: inode flags changed:\n  {}",
        reflagged.join("\n  ")
    );
}

/// A directory's manifest with the inode and link count of every path: nothing in it may
/// change.
fn dir_state(dir: &Path) -> (Manifest, InodeMap) {
    (manifest(dir), inode_map(dir))
}

fn assert_dir_state(before: &(Manifest, InodeMap), dir: &Path, what: &str) {
    let now = dir_state(dir);
    assert_same_tree(&before.0, &now.0, what);
    let changed: Vec<String> = before
        .1
        .iter()
        .filter(|(p, i)| now.1.get(*p) != Some(i))
        .map(|(p, i)| format!("{}: {i:?} -> {:?}", show(p), now.1.get(p)))
        .collect();
    assert!(
        changed.is_empty(),
        "{what}: inodes or link counts changed:\n  {}",
        changed.join("\n  ")
    );
}

/// Allocated bytes of a store object (by its inode).
fn blocks_of(p: &Path) -> u64 {
    fs::symlink_metadata(p).unwrap().blocks() * 512
}

// ---------------------------------------------------------------------------------------------
// 1. A rollback gives back exactly the snapshot, and is undone by another
// ---------------------------------------------------------------------------------------------

/// One change of each kind, through the mounted guest at `point`.
fn guest_changes(point: &Path) {
    let p = |rel: &str| point.join(rel);
    // An edit in place (a store object: copied up), a new file, one at `/`.
    let f = OpenOptions::new()
        .write(true)
        .open(p("usr/lib/trusted.dat"))
        .unwrap();
    f.write_all_at(b"patched", 100).unwrap();
    drop(f);
    write(&p("usr/share/added.txt"), b"a new file\n");
    write(&p("top-level.txt"), b"at the guest's /\n");
    // A deletion, a chmod, a chown, a new xattr, an mtime, a rename.
    fs::remove_file(p("usr/share/same/mode.txt")).unwrap();
    chmod(&p("usr/lib/big.bin"), 0o600);
    std::os::unix::fs::lchown(p("usr/share/same/base.txt"), Some(1000), Some(1000)).unwrap();
    xattr::set(p("usr/lib/libacl.so"), "user.added", b"x").unwrap();
    set_mtime(&p("usr/lib/big.bin"), (1_700_000_000, 5));
    fs::rename(p("usr/share/doc/dup-1"), p("usr/share/doc/dup-renamed")).unwrap();
    // A new symlink, a symlink replaced by a file.
    std::os::unix::fs::symlink("big.bin", p("usr/lib/big-link")).unwrap();
    fs::remove_file(p("usr/lib/dangling")).unwrap();
    write(&p("usr/lib/dangling"), b"not a symlink any more\n");
    // rm -rf of a lower directory, and mkdir of it again (opaque in upper).
    fs::remove_dir_all(p("usr/share/names")).unwrap();
    fs::create_dir(p("usr/share/names")).unwrap();
    write(&p("usr/share/names/only.txt"), b"the only name now\n");
    // One path of the hardlink group edited (overlayfs copies up that path alone).
    append(&p("usr/lib/hl/b"), b"appended through b\n");
    // The flagged files: appended to (+a), a new entry in the +a directory.
    append(&p("var/log/app.log"), b"line 2\n");
    write(&p("var/log/journal/0002"), b"entry 2\n");
    // A new directory of another owner.
    fs::create_dir(p("srv")).unwrap();
    std::os::unix::fs::lchown(p("srv"), Some(33), Some(33)).unwrap();
    chmod(&p("srv"), 0o750);
    write(&p("srv/index.html"), b"<html/>\n");
}

#[test]
fn rollback_restores_the_snapshot_exactly_and_another_rollback_undoes_it() {
    assert_root();
    own_mount_namespace();
    let s = Scratch::new("snap-rollback");
    let _unflag = ClearFlagsOnDrop(s.path().to_path_buf());
    let root = rich_pair(&s, None);
    let b_before = freeze(&base(&root, "b"));
    let mut mounts = MountedGuests::default();
    let point = mount_guest(&root, "a", &mut mounts);
    flag_from_inside(&point);
    let want = manifest(&point);
    let want_flags = flagged_flags(&point);
    for ((flag, rel), f) in FLAGGED.iter().zip(&want_flags) {
        assert!(f.contains(&flag[1..]), "{rel}: {f} after chattr {flag}");
    }
    umount_guest(&root, "a");

    let made = snapshot(&root, "a", "before");
    assert_eq!(made["name"], "before", "{made:#}");
    assert_eq!(made["made_by"], "snapshot", "{made:#}");
    assert_eq!(
        made["copied"], 2,
        "the +i and +a files are copies: {made:#}"
    );
    let point = mount_guest(&root, "a", &mut mounts);
    assert_same_view(&want, &manifest(&point), "a after its snapshot");
    guest_changes(&point);
    let changed = manifest(&point);
    let changed_flags = flagged_flags(&point);
    umount_guest(&root, "a");

    let back = rollback(&root, "a", None);
    assert_eq!(back["restored"], "before", "the newest snapshot: {back:#}");
    assert_eq!(back["dry_run"], false, "{back:#}");
    let kept = back["kept_as"].as_str().unwrap().to_string();
    assert!(kept.ends_with("-before-rollback"), "{back:#}");
    let upper = guest_dir(&root, "a").join("upper");
    assert_eq!(
        fs::read_dir(&upper).unwrap().count(),
        0,
        "upper after a rollback"
    );
    let point = mount_guest(&root, "a", &mut mounts);
    assert_same_view(&want, &manifest(&point), "a after its rollback");
    assert_eq!(
        flagged_flags(&point),
        want_flags,
        "inode flags of {:?} after the rollback",
        FLAGGED.map(|(_, rel)| rel)
    );
    umount_guest(&root, "a");

    let undo = rollback(&root, "a", Some(&kept));
    assert_eq!(undo["restored"], kept.as_str(), "{undo:#}");
    let point = mount_guest(&root, "a", &mut mounts);
    assert_same_view(&changed, &manifest(&point), "a after undoing the rollback");
    assert_eq!(
        flagged_flags(&point),
        changed_flags,
        "inode flags of {:?} after undoing the rollback",
        FLAGGED.map(|(_, rel)| rel)
    );
    umount_guest(&root, "a");

    let rows = snapshot_list(&root, "a");
    let names: Vec<&str> = rows.iter().map(|r| r["name"].as_str().unwrap()).collect();
    assert!(
        names.contains(&"before") && names.contains(&kept.as_str()) && names.len() == 3,
        "before, the tree the rollback replaced, the tree its undo replaced: {names:?}"
    );
    let by = |n: &str| rows.iter().find(|r| r["name"] == n).unwrap()["made_by"].clone();
    assert_eq!(by(&kept), "rollback to before");
    assert_frozen(&b_before, &base(&root, "b"), "b, never touched");
}

// ---------------------------------------------------------------------------------------------
// 2. A snapshot is made of links
// ---------------------------------------------------------------------------------------------

#[test]
fn a_snapshot_is_links_of_base_and_costs_its_directories_and_what_base_dropped_since() {
    assert_root();
    own_mount_namespace();
    let s = Scratch::new("snap-links");
    let _unflag = ClearFlagsOnDrop(s.path().to_path_buf());
    let root = rich_pair(&s, None);
    let mut mounts = MountedGuests::default();
    let point = mount_guest(&root, "a", &mut mounts);
    flag_from_inside(&point);
    umount_guest(&root, "a");

    let made = snapshot(&root, "a", "s");
    let base_a = base(&root, "a");
    let tree = snapshot_tree(&root, "a", "s");
    let store = store_inodes(&root);
    let base_files: HashSet<(u64, u64)> = files_under(&base_a).iter().map(|p| ino(p)).collect();
    let flagged_files: Vec<&str> = FLAGGED
        .iter()
        .map(|(_, rel)| *rel)
        .filter(|rel| tree.join(rel).is_file())
        .collect();
    assert_eq!(flagged_files.len(), 2);

    let files = files_under(&tree);
    assert_eq!(made["files"], files.len(), "{made:#}");
    assert_eq!(made["linked"], files.len() - 2, "{made:#}");
    assert_eq!(made["copied"], 2, "{made:#}");
    let mut copies_bytes = 0;
    let mut store_links = 0;
    for f in &files {
        let rel = f.strip_prefix(&tree).unwrap();
        let in_base = base_a.join(rel);
        if flagged_files.iter().any(|x| Path::new(x) == rel) {
            assert_ne!(ino(f), ino(&in_base), "{}: a copy", rel.display());
            assert_eq!(fs::read(f).unwrap(), fs::read(&in_base).unwrap());
            copies_bytes += blocks_of(f);
            continue;
        }
        assert_eq!(
            ino(f),
            ino(&in_base),
            "{}: the snapshot's file is base's inode",
            rel.display()
        );
        store_links += usize::from(store.contains_key(&ino(f)));
    }
    assert!(
        store_links > 20,
        "most of a's files are store links after unify: {store_links}"
    );
    assert_eq!(made["copied_bytes"], copies_bytes, "{made:#}");

    // What the snapshot costs: the inodes it alone has.
    let mut seen = HashSet::new();
    let (mut dirs, mut dir_bytes, mut other_bytes) = (0, 0, 0);
    for e in walkdir::WalkDir::new(&tree).follow_links(false) {
        let e = e.unwrap();
        let m = fs::symlink_metadata(e.path()).unwrap();
        let id = (m.dev(), m.ino());
        if base_files.contains(&id) || store.contains_key(&id) || !seen.insert(id) {
            continue;
        }
        if m.is_dir() {
            dirs += 1;
            dir_bytes += m.blocks() * 512;
        } else {
            other_bytes += m.blocks() * 512;
        }
    }
    assert_eq!(
        other_bytes, copies_bytes,
        "besides its {dirs} directories ({dir_bytes} bytes) a snapshot holds only the copies of \
         the flagged files"
    );
    let listed = listed_snapshot(&root, "a", "s");
    assert_eq!(listed["files"], files.len(), "{listed:#}");
    assert_eq!(
        listed["alone_bytes"], copies_bytes,
        "what only the snapshot holds: the flagged copies: {listed:#}"
    );

    // The guest replaces a private file and the two paths of an object only it links; folded
    // (and unified), base lets go of the old inodes: only the snapshot holds them now (the
    // store's own name aside: `gc` removes the object once the snapshot is gone).
    let services = tree.join("etc/services");
    let (one, two) = ONLY_A[0];
    let object = store[&ino(&tree.join(one))].path.clone();
    let point = mount_guest(&root, "a", &mut mounts);
    for rel in ["etc/services", one, two] {
        write(&point.join(rel), b"rewritten\n");
    }
    umount_guest(&root, "a");
    cowherd(&root).args(["fold", "a"]).assert().success();
    let private_alone = copies_bytes + blocks_of(&services);
    let listed = listed_snapshot(&root, "a", "s");
    assert!(
        listed["alone_bytes"].as_u64().unwrap() >= private_alone,
        "after the fold only the snapshot links the old etc/services: {listed:#}"
    );
    assert_eq!(
        listed["alone_bytes"],
        private_alone + blocks_of(&object),
        "after the fold only the snapshot links the old etc/services and (besides the store's \
         own name) the object of {one} and {two}: {listed:#}"
    );
    cowherd(&root).args(["unify", "a"]).assert().success();
    assert!(object.exists(), "gc has not run: the object is there");
    let listed = listed_snapshot(&root, "a", "s");
    assert_eq!(
        listed["alone_bytes"],
        private_alone + blocks_of(&object),
        "after fold and unify: {listed:#}"
    );
}

// ---------------------------------------------------------------------------------------------
// 3. Nothing changes a snapshot
// ---------------------------------------------------------------------------------------------

#[test]
fn fold_unify_split_verify_repair_and_rollback_never_change_a_snapshot() {
    assert_root();
    own_mount_namespace();
    let s = Scratch::new("snap-frozen");
    let _unflag = ClearFlagsOnDrop(s.path().to_path_buf());
    let root = rich_pair(&s, Some("immutable /usr/bin/**"));
    let mut mounts = MountedGuests::default();
    let point = mount_guest(&root, "a", &mut mounts);
    flag_from_inside(&point);
    umount_guest(&root, "a");
    snapshot(&root, "a", "s");
    let tree = snapshot_tree(&root, "a", "s");
    let frozen = freeze(&tree);

    let point = mount_guest(&root, "a", &mut mounts);
    guest_changes(&point);
    write(&point.join("usr/share/doc/dup-2"), b"other bytes\n");
    fs::remove_file(point.join("usr/lib/sparse.img")).unwrap();
    append(&point.join("usr/lib/hl/a"), b"and through a\n");
    umount_guest(&root, "a");
    cowherd(&root).args(["fold", "a"]).assert().success();
    assert_frozen(&frozen, &tree, "the snapshot after a fold");

    cowherd(&root).args(["unify", "--all"]).assert().success();
    assert_frozen(&frozen, &tree, "the snapshot after unify --all");

    // An immutable object the snapshot links, and a shared cow file, split off.
    let store = store_inodes(&root);
    let tool = store[&ino(&tree.join("usr/bin/tool-b"))].clone();
    assert_eq!(tool.marker, 'i', "{}", tool.path.display());
    cowherd(&root)
        .args(["split", "a", "/usr/bin/tool-b", "/usr/share/ro"])
        .assert()
        .success();
    assert_ne!(ino(&base(&root, "a").join("usr/bin/tool-b")), tool.dev_ino);
    assert_frozen(&frozen, &tree, "the snapshot after split");

    // verify --repair puts back the immutable flag an object the snapshot links lost.
    chattr("-i", &tool.path);
    let out = cowherd(&root)
        .args(["verify", "--repair"])
        .output()
        .unwrap();
    assert!(
        matches!(out.status.code(), Some(0 | 3)),
        "verify --repair: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        is_immutable(&tool.path),
        "verify --repair set the flag again"
    );
    assert_frozen(&frozen, &tree, "the snapshot after verify --repair");

    // Another snapshot, a rollback to this one and its undo leave it as it was too.
    snapshot(&root, "a", "t");
    let back = rollback(&root, "a", Some("s"));
    assert_frozen(&frozen, &tree, "the snapshot after a rollback to it");
    rollback(&root, "a", back["kept_as"].as_str());
    assert_frozen(&frozen, &tree, "the snapshot after undoing the rollback");
    cowherd(&root).args(["gc"]).assert().success();
    assert_frozen(&frozen, &tree, "the snapshot after gc");
}

// ---------------------------------------------------------------------------------------------
// 4. gc, stats, destroy
// ---------------------------------------------------------------------------------------------

/// `stats --json` without what a snapshot may change: the snapshot counts, and the index's
/// size.
fn stats_without_snapshots(root: &Path) -> Value {
    let mut v = run_json(cowherd(root).args(["stats", "--json"]));
    for g in v["guests"].as_array_mut().unwrap() {
        let g = g.as_object_mut().unwrap();
        g.remove("snapshots");
        g.remove("snapshot_bytes");
    }
    let total = v["total"].as_object_mut().unwrap();
    for key in ["snapshots", "snapshot_bytes", "index_bytes"] {
        total.remove(key);
    }
    v
}

/// (snapshots, snapshot_bytes) of guest `name` and of the total in `stats --json`.
fn snapshot_stats(root: &Path, name: &str) -> ((u64, u64), (u64, u64)) {
    let v = run_json(cowherd(root).args(["stats", "--json"]));
    let pair = |o: &Value| {
        (
            o["snapshots"]
                .as_u64()
                .unwrap_or_else(|| panic!("no snapshots in {o:#}")),
            o["snapshot_bytes"]
                .as_u64()
                .unwrap_or_else(|| panic!("no snapshot_bytes in {o:#}")),
        )
    };
    (pair(&stats_per_guest(&v)[name]), pair(&stats_total(&v)))
}

/// Store objects marked immutable (`.i<n>`) that do not carry `FS_IMMUTABLE_FL`.
fn unflagged_immutable_objects(root: &Path) -> Vec<PathBuf> {
    store_objects(root)
        .into_iter()
        .filter(|o| o.marker == 'i' && !is_immutable(&o.path))
        .map(|o| o.path)
        .collect()
}

#[test]
fn gc_keeps_what_only_snapshots_link_and_stats_and_destroy_count_them_apart() {
    assert_root();
    own_mount_namespace();
    let s = Scratch::new("snap-gc");
    let _unflag = ClearFlagsOnDrop(s.path().to_path_buf());
    let root = rich_pair(&s, Some("immutable /usr/bin/**"));
    let before = stats_without_snapshots(&root);
    snapshot(&root, "a", "keep");
    assert_eq!(
        stats_without_snapshots(&root),
        before,
        "a snapshot changes no figure of stats but the snapshot counts"
    );
    assert_eq!(snapshot_stats(&root, "a"), ((1, 0), (1, 0)));
    assert_eq!(snapshot_stats(&root, "b").0, (0, 0));

    // Objects only a links: a cow one and an immutable one.
    let store = store_inodes(&root);
    let objects: Vec<StoreObject> = ONLY_A
        .iter()
        .map(|(one, _)| store[&ino(&base(&root, "a").join(one))].clone())
        .collect();
    assert_eq!((objects[0].marker, objects[1].marker), ('c', 'i'));
    let names: Vec<String> = objects
        .iter()
        .map(|o| o.path.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    let bytes: u64 = objects.iter().map(|o| blocks_of(&o.path)).sum();
    let mut mounts = MountedGuests::default();
    let point = mount_guest(&root, "a", &mut mounts);
    // The cow pair deleted by the guest; the immutable one (which no guest can delete) split
    // off into private copies.
    let (one, two) = ONLY_A[0];
    fs::remove_file(point.join(one)).unwrap();
    fs::remove_file(point.join(two)).unwrap();
    umount_guest(&root, "a");
    cowherd(&root).args(["fold", "a"]).assert().success();
    let (one, two) = ONLY_A[1];
    cowherd(&root)
        .args(["split", "a", &format!("/{one}"), &format!("/{two}")])
        .assert()
        .success();
    cowherd(&root).args(["unify", "--all"]).assert().success();
    let gc = run_json(cowherd(&root).args(["gc", "--json"]));
    for (o, name) in objects.iter().zip(&names) {
        assert!(
            o.path.exists(),
            "gc removed {name}, which the snapshot links: {gc:#}"
        );
        assert_eq!(
            nlink(&o.path),
            3,
            "{name}: the store's name and the snapshot's two paths"
        );
    }
    assert!(is_immutable(&objects[1].path));
    assert_eq!(
        snapshot_stats(&root, "a"),
        ((1, bytes), (1, bytes)),
        "the objects only a's snapshot links are what it alone holds ({names:?})"
    );
    let listed = listed_snapshot(&root, "a", "keep");
    assert_eq!(listed["alone_bytes"], bytes, "{listed:#}");

    let removed = run_json(cowherd(&root).args(["snapshot", "remove", "a", "keep", "--json"]));
    assert_eq!(removed["name"], "keep", "{removed:#}");
    assert!(!guest_dir(&root, "a").join("snapshots/keep").exists());
    assert_eq!(snapshot_stats(&root, "a"), ((0, 0), (0, 0)));
    let gc = run_json(cowherd(&root).args(["gc", "--json"]));
    let gone: Vec<&str> = gc["removed"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n.as_str().unwrap())
        .collect();
    for (o, name) in objects.iter().zip(&names) {
        assert!(
            gone.contains(&name.as_str()),
            "gc removes {name} now: {gc:#}"
        );
        assert!(!o.path.exists(), "{}", o.path.display());
    }
    assert_eq!(unflagged_immutable_objects(&root), Vec::<PathBuf>::new());

    // destroy takes the guest's snapshots with it, flagged copies and all; the immutable
    // objects they linked keep their flag.
    let a_view = freeze(&base(&root, "a"));
    let point = mount_guest(&root, "b", &mut mounts);
    flag_from_inside(&point);
    umount_guest(&root, "b");
    snapshot(&root, "b", "one");
    let point = mount_guest(&root, "b", &mut mounts);
    fs::remove_file(point.join("usr/bin/variant-tool")).unwrap();
    umount_guest(&root, "b");
    snapshot(&root, "b", "two");
    assert_eq!(snapshot_stats(&root, "b").0.0, 2);
    cowherd(&root).args(["destroy", "b"]).assert().success();
    assert!(
        !guest_dir(&root, "b").exists(),
        "b and its snapshots are gone"
    );
    assert_eq!(
        unflagged_immutable_objects(&root),
        Vec::<PathBuf>::new(),
        "immutable objects after destroy"
    );
    let (_, total) = snapshot_stats_total(&root);
    assert_eq!(total, (0, 0), "no snapshots left");
    cowherd(&root).args(["gc"]).assert().success();
    assert_eq!(
        unflagged_immutable_objects(&root),
        Vec::<PathBuf>::new(),
        "immutable objects after gc"
    );
    assert_frozen(&a_view, &base(&root, "a"), "a, never touched");
}

/// The guests and the total (snapshots, snapshot_bytes) of `stats --json`.
fn snapshot_stats_total(root: &Path) -> (Vec<String>, (u64, u64)) {
    let v = run_json(cowherd(root).args(["stats", "--json"]));
    let total = stats_total(&v);
    (
        stats_per_guest(&v).into_keys().collect(),
        (
            total["snapshots"].as_u64().unwrap(),
            total["snapshot_bytes"].as_u64().unwrap(),
        ),
    )
}

// ---------------------------------------------------------------------------------------------
// 5. Refusals
// ---------------------------------------------------------------------------------------------

fn small_guest(dir: &Path, variant: u32) {
    let mut t = TreeBuilder::new(dir);
    t.file("usr/bin/tool", &content("tool", 9000))
        .file("usr/lib/lib.so", &content("lib", 5000))
        .symlink("usr/bin/sh", "tool")
        .file("etc/hostname", format!("small-{variant}\n").as_bytes());
    t.finish();
}

/// Runs cowherd with `args`, asserting a one-line error with exit code `code` that contains
/// every one of `needles` (`{root}` stands for the root).
fn refused(root: &Path, args: &[&str], code: i32, needles: &[&str]) {
    let out = cowherd(root).args(args).output().unwrap();
    let line = assert_one_line_error(&out, code);
    for needle in needles {
        let needle = needle.replace("{root}", &root.display().to_string());
        assert!(
            line.contains(&needle),
            "{args:?}: {needle:?} not in {line:?}"
        );
    }
}

#[test]
fn refusals_are_one_line_naming_the_fix_and_change_nothing() {
    assert_root();
    own_mount_namespace();
    let s = Scratch::new("snap-refusals");
    let root = init_root(s.path());
    adopt_built(&root, s.path(), "a", |d| small_guest(d, 0));
    adopt_built(&root, s.path(), "b", |d| small_guest(d, 1));
    cowherd(&root).args(["unify", "--all"]).assert().success();
    snapshot(&root, "a", "first");
    let watched = [
        base(&root, "a"),
        guest_dir(&root, "a").join("snapshots"),
        guest_dir(&root, "b"),
    ];
    let states: Vec<_> = watched.iter().map(|d| dir_state(d)).collect();
    let unchanged = |what: &str| {
        for (d, state) in watched.iter().zip(&states) {
            assert_dir_state(state, d, &format!("{} {what}", d.display()));
        }
    };
    let mut mounts = MountedGuests::default();
    let point = mount_guest(&root, "a", &mut mounts);
    let mounted = format!("guest a is mounted at {}", point.display());
    for args in [
        &["snapshot", "a"][..],
        &["snapshot", "a", "--name", "second"],
        &["rollback", "a"],
        &["rollback", "a", "first"],
        &["rollback", "a", "-n"],
    ] {
        refused(&root, args, 1, &[&mounted, "`cowherd umount a`"]);
    }
    unchanged("after the refusals while a was mounted");
    umount_guest(&root, "a");

    let long = "x".repeat(65);
    let bad_name = "invalid snapshot name";
    let rule = "use 1-64 characters of a-z A-Z 0-9 . _ - not starting with . or -";
    let cases: Vec<(Vec<&str>, Vec<String>)> = vec![
        (
            vec!["rollback", "b"],
            vec![
                "guest b has no snapshot to roll back to".into(),
                format!(
                    "{root}/guests/b/snapshots holds none",
                    root = root.display()
                ),
                "`cowherd snapshot b`".into(),
            ],
        ),
        (
            vec!["rollback", "a", "nope"],
            vec![
                "guest a has no snapshot named \"nope\"".into(),
                "`cowherd snapshot list a`".into(),
            ],
        ),
        (
            vec!["snapshot", "remove", "a", "nope"],
            vec![
                "guest a has no snapshot named \"nope\"".into(),
                "`cowherd snapshot list a`".into(),
            ],
        ),
        (
            vec!["snapshot", "a", "--name", "first"],
            vec![
                "guest a has a snapshot named \"first\" already".into(),
                "choose another --name".into(),
                "`cowherd snapshot remove a first`".into(),
            ],
        ),
        (
            vec!["snapshot", "nope"],
            vec!["no guest named \"nope\"".into(), "`cowherd list`".into()],
        ),
        (
            vec!["rollback", "nope"],
            vec!["no guest named \"nope\"".into(), "`cowherd list`".into()],
        ),
        (
            vec!["snapshot", "list", "nope"],
            vec!["no guest named \"nope\"".into(), "`cowherd list`".into()],
        ),
        (
            vec!["snapshot", "remove", "nope", "first"],
            vec!["no guest named \"nope\"".into(), "`cowherd list`".into()],
        ),
    ];
    let mut cases = cases;
    for name in ["../x", ".x", "-x", "a/b", "", &long] {
        let mut each = vec![vec!["snapshot", "a", "--name", name]];
        // (`-x` as a positional argument is an option to the parser: a usage error.)
        if !name.starts_with('-') {
            each.push(vec!["rollback", "a", name]);
            each.push(vec!["snapshot", "remove", "a", name]);
        }
        for args in each {
            cases.push((args, vec![format!("{bad_name} {name:?}"), rule.into()]));
        }
    }
    for (args, needles) in &cases {
        let needles: Vec<&str> = needles.iter().map(String::as_str).collect();
        refused(&root, args, 1, &needles);
    }
    // Usage errors: exit 2.
    for args in [
        &["snapshot"][..],
        &["rollback"],
        &["snapshot", "remove", "a"],
    ] {
        refused(&root, args, 2, &["see `cowherd"]);
    }
    unchanged("after every refusal");
    for g in ["a", "b"] {
        let leftovers: Vec<String> = fs::read_dir(guest_dir(&root, g))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with('.') || n == "tmp" || n == "attempt.toml")
            .collect();
        assert!(leftovers.is_empty(), "{g}: {leftovers:?}");
    }
    let names: Vec<String> = snapshot_list(&root, "a")
        .iter()
        .map(|r| r["name"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(names, ["first"]);

    // --all with one guest mounted: the other is snapshotted, the mounted one named, exit 3.
    let point = mount_guest(&root, "a", &mut mounts);
    let out = cowherd(&root)
        .args(["snapshot", "--all", "--name", "all"])
        .output()
        .unwrap();
    let line = assert_one_line_error(&out, 3);
    assert!(
        line.contains(&format!("guest a is mounted at {}", point.display())),
        "{line}"
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("snapshot b/all"));
    umount_guest(&root, "a");
    assert!(snapshot_tree(&root, "b", "all").is_dir());
    assert!(!guest_dir(&root, "a").join("snapshots/all").exists());
}

// ---------------------------------------------------------------------------------------------
// 6. A hostile tree
// ---------------------------------------------------------------------------------------------

/// Paths at the host's `/` that a snapshot or rollback following a guest's `snapshots -> /`
/// would make.
const HOST_TRAPS: [&str; 7] = [
    "/tree",
    "/snapshot.toml",
    "/pending",
    "/.rollback",
    "/x",
    "/.x.making",
    "/snapshots",
];

/// A guest whose base holds symlinks to `/`, to `/etc` and to the host directory `canary`
/// where cowherd's own layout has entries, and directories shaped like a snapshot.
fn hostile_guest(dir: &Path, canary: &Path) {
    let c = canary.as_os_str().as_bytes();
    let sub = |rel: &str| [c, b"/", rel.as_bytes()].concat();
    let mut t = TreeBuilder::new(dir);
    t.file("usr/bin/tool", &content("tool", 9000))
        .file("etc/passwd", b"root:x:0:0::/root:/bin/sh\n")
        .symlink("snapshots", "/")
        .symlink("tree", c)
        .symlink(".rollback", c)
        .symlink("snapshot.toml", sub("victim.toml"))
        .symlink("pending", sub("pending"))
        .symlink("base", c)
        .symlink("upper", c)
        .symlink("work", c)
        .symlink("usr/etc-host", "/etc")
        .symlink("usr/canary", c)
        .symlink("usr/lib/up", "../../../../../../../../../..")
        .file(
            "guests/g/snapshots/x/snapshot.toml",
            b"name = \"x\"\ncreated_unix = 0\nmade_by = \"a forger\"\n",
        )
        .file("guests/g/snapshots/x/tree/etc/passwd", b"forged\n")
        .symlink("guests/g/snapshots/x/tree/usr", c)
        .file("guests/g/snapshots/.x.making/tree/f", b"half made\n")
        .symlink("guests/g/snapshots/.rollback", c);
    t.finish();
}

/// The state of a host directory: the manifest of everything below it (with mtimes) and the
/// inode and link count of every path.
fn host_state(dir: &Path) -> (Manifest, InodeMap) {
    dir_state(dir)
}

#[test]
fn snapshot_and_rollback_never_follow_a_hostile_trees_symlinks() {
    assert_root();
    own_mount_namespace();
    let s = Scratch::new("snap-hostile");
    let canary = s.join("host-canary");
    let mut t = TreeBuilder::new(&canary);
    t.file_with("victim.toml", b"host secret\n", 0o600, 0, 0, DEFAULT_MTIME)
        .file("pending", b"host pending\n")
        .file("dir/file", &content("host-file", 3000));
    t.finish();
    drop(t);
    set_mtime(&canary.join("dir"), DEFAULT_MTIME);
    set_mtime(&canary, DEFAULT_MTIME);
    for trap in HOST_TRAPS {
        assert!(
            fs::symlink_metadata(trap).is_err(),
            "{trap} exists before the test"
        );
    }
    let etc_passwd = (
        fs::read("/etc/passwd").unwrap(),
        mtime_of(Path::new("/etc/passwd")),
    );

    let root = init_root(s.path());
    adopt_built(&root, s.path(), "g", |d| hostile_guest(d, &canary));
    cowherd(&root).args(["unify", "g"]).assert().success();
    // Through the running guest: a directory replaced by a symlink to the host, one more
    // symlink to `/` named like a snapshot.
    let mut mounts = MountedGuests::default();
    let point = mount_guest(&root, "g", &mut mounts);
    fs::remove_dir_all(point.join("guests/g/snapshots/x/tree/etc")).unwrap();
    std::os::unix::fs::symlink(&canary, point.join("guests/g/snapshots/x/tree/etc")).unwrap();
    std::os::unix::fs::symlink("/", point.join("x")).unwrap();
    let want = manifest(&point);
    umount_guest(&root, "g");
    let canary_before = host_state(&canary);
    let scratch_before = host_state(&s.join("src"));

    snapshot(&root, "g", "x");
    assert_same_view(
        &want,
        &manifest(&snapshot_tree(&root, "g", "x")),
        "the snapshot",
    );
    let point = mount_guest(&root, "g", &mut mounts);
    write(&point.join("usr/bin/tool"), b"changed\n");
    fs::remove_file(point.join("snapshots")).unwrap();
    fs::create_dir(point.join("snapshots")).unwrap();
    let changed = manifest(&point);
    umount_guest(&root, "g");

    let back = rollback(&root, "g", Some("x"));
    let point = mount_guest(&root, "g", &mut mounts);
    assert_same_view(&want, &manifest(&point), "g after its rollback");
    umount_guest(&root, "g");
    let kept = back["kept_as"].as_str().unwrap();
    assert_same_view(
        &changed,
        &manifest(&snapshot_tree(&root, "g", kept)),
        "the kept tree",
    );
    let undo = rollback(&root, "g", Some(kept));
    let point = mount_guest(&root, "g", &mut mounts);
    assert_same_view(&changed, &manifest(&point), "g after undoing its rollback");
    umount_guest(&root, "g");
    for name in [kept, undo["kept_as"].as_str().unwrap()] {
        cowherd(&root)
            .args(["snapshot", "remove", "g", name])
            .assert()
            .success();
    }
    cowherd(&root).args(["gc"]).assert().success();

    assert_dir_state(&canary_before, &canary, "the host canary directory");
    assert_dir_state(
        &scratch_before,
        &s.join("src"),
        "the scratch directory outside the root",
    );
    for trap in HOST_TRAPS {
        assert!(
            fs::symlink_metadata(trap).is_err(),
            "{trap} was made on the host"
        );
    }
    assert_eq!(
        (
            fs::read("/etc/passwd").unwrap(),
            mtime_of(Path::new("/etc/passwd"))
        ),
        etc_passwd,
        "/etc/passwd"
    );
    for name in ["tree", "snapshot.toml", "pending", ".rollback"] {
        assert!(
            fs::symlink_metadata(Path::new("/etc").join(name)).is_err(),
            "/etc/{name} was made"
        );
    }
    let outside: Vec<String> = fs::read_dir(s.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| !["root", "src", "host-canary", "view-g"].contains(&n.as_str()))
        .collect();
    assert!(outside.is_empty(), "written next to the root: {outside:?}");
}

// ---------------------------------------------------------------------------------------------
// 7. A dry run
// ---------------------------------------------------------------------------------------------

#[test]
fn rollback_dry_run_says_what_it_would_do_and_changes_nothing() {
    assert_root();
    own_mount_namespace();
    let s = Scratch::new("snap-dry");
    let root = init_root(s.path());
    adopt_built(&root, s.path(), "a", |d| small_guest(d, 0));
    cowherd(&root).args(["unify", "a"]).assert().success();
    snapshot(&root, "a", "old");
    let mut mounts = MountedGuests::default();
    let point = mount_guest(&root, "a", &mut mounts);
    write(&point.join("usr/bin/tool"), b"changed\n");
    fs::remove_file(point.join("usr/lib/lib.so")).unwrap();
    umount_guest(&root, "a");
    snapshot(&root, "a", "new");
    let point = mount_guest(&root, "a", &mut mounts);
    write(&point.join("etc/hostname"), b"changed\n");
    umount_guest(&root, "a");
    let guest = guest_dir(&root, "a");
    let state = dir_state(&guest);

    for (name, restored, files) in [(None, "new", 2), (Some("old"), "old", 3)] {
        let mut cmd = cowherd(&root);
        cmd.args(["rollback", "a", "-n", "--json"]).args(name);
        let v = run_json(&mut cmd);
        assert_eq!(v["dry_run"], true, "{v:#}");
        assert_eq!(v["restored"], restored, "{v:#}");
        assert_eq!(v["files"], files, "{v:#}");
        assert!(
            v["kept_as"].as_str().unwrap().ends_with("-before-rollback"),
            "{v:#}"
        );
        assert_dir_state(&state, &guest, "a after rollback -n");
    }
    let out = cowherd(&root)
        .args(["rollback", "a", "old", "--dry-run"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("would roll a back to snapshot old (3 files)"),
        "{text}"
    );
    assert_dir_state(&state, &guest, "a after rollback --dry-run");
    assert_eq!(snapshot_list(&root, "a").len(), 2);
}

/// Snapshots made within one second (as on a fast host, or by a script) are still told apart:
/// the newest is the one made last, whatever the names.
#[test]
fn rollback_goes_to_the_snapshot_made_last_even_within_one_second() {
    assert_root();
    let s = Scratch::new("snap-newest");
    let root = init_root(s.path());
    adopt_built(&root, s.path(), "a", |d| small_guest(d, 0));
    snapshot(&root, "a", "zz-first");
    snapshot(&root, "a", "aa-second");
    // Whether or not a second boundary fell between them: their records say the same time.
    let dir = guest_dir(&root, "a").join("snapshots");
    let record = |name: &str| dir.join(name).join("snapshot.toml");
    let time = |name: &str| {
        fs::read_to_string(record(name))
            .unwrap()
            .lines()
            .find(|l| l.starts_with("created_unix"))
            .unwrap()
            .to_string()
    };
    let second = fs::read_to_string(record("aa-second")).unwrap();
    write(
        &record("aa-second"),
        second
            .replace(&time("aa-second"), &time("zz-first"))
            .as_bytes(),
    );
    assert_eq!(time("aa-second"), time("zz-first"));

    let names: Vec<String> = snapshot_list(&root, "a")
        .iter()
        .map(|r| r["name"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(names, ["zz-first", "aa-second"], "oldest first");
    let v = run_json(cowherd(&root).args(["rollback", "a", "-n", "--json"]));
    assert_eq!(v["restored"], "aa-second", "the newest snapshot: {v:#}");
}
