//! What cowherd says when something is wrong, and the numbers it shows: each message a single
//! line naming the path and the fix, each checked through the real binary.

mod common;

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use common::*;
use serde_json::Value;

/// Two files every guest shares, and one of its own.
fn small_guest(dir: &Path, variant: u32) {
    TreeBuilder::new(dir)
        .file("usr/bin/a", &content("msg-a", 8_192))
        .file("usr/lib/b", &content("msg-b", 12_000))
        .file("etc/hostname", format!("msg-{variant}\n").as_bytes());
}

/// A root with guests g1 and g2 (small guests) unified.
fn unified_pair(s: &Scratch) -> PathBuf {
    let root = init_root(s.path());
    adopt_built(&root, s.path(), "g1", |d| small_guest(d, 1));
    adopt_built(&root, s.path(), "g2", |d| small_guest(d, 2));
    cowherd(&root).args(["unify", "--all"]).assert().success();
    root
}

/// `list --json`'s row of `guest`.
fn list_row(root: &Path, guest: &str) -> Value {
    let rows = run_json(cowherd(root).args(["list", "--json"]));
    rows.as_array()
        .unwrap()
        .iter()
        .find(|r| r["name"] == guest)
        .unwrap_or_else(|| panic!("no {guest} in {rows}"))
        .clone()
}

#[test]
fn list_by_another_user_says_the_root_is_for_root_only_not_to_run_init() {
    assert_root();
    let s = Scratch::new("msg-eacces");
    fs::set_permissions(s.path(), fs::Permissions::from_mode(0o755)).unwrap();
    let root = init_root(s.path());
    let out = as_user_nobody(cowherd_bin())
        .arg("--root")
        .arg(&root)
        .arg("list")
        .output()
        .expect("setpriv (util-linux) runs");
    let line = assert_one_line_error(&out, 1);
    assert!(line.contains(root.to_str().unwrap()), "{line}");
    assert!(line.contains("ermission denied"), "{line}");
    assert!(line.contains("as root"), "the fix: {line}");
    assert!(!line.contains("init"), "the root exists: {line}");
}

#[test]
fn split_of_a_path_climbing_out_with_dotdot_says_it_leaves_the_guest() {
    assert_root();
    let s = Scratch::new("msg-dotdot");
    let root = unified_pair(&s);
    let out = cowherd(&root)
        .args(["split", "g1", "/../../etc/shadow"])
        .output()
        .unwrap();
    let line = assert_one_line_error(&out, 1);
    assert!(line.contains("/../../etc/shadow"), "{line}");
    assert!(line.contains("leave the guest"), "{line}");
    assert!(!line.contains("filesystem"), "{line}");
}

#[test]
fn split_through_a_symlinked_directory_says_it_is_a_symlink_never_followed() {
    assert_root();
    let s = Scratch::new("msg-symlink");
    let root = init_root(s.path());
    adopt_built(&root, s.path(), "g", |d| {
        TreeBuilder::new(d)
            .file("real/f", &content("real-f", 5_000))
            .symlink("link", "real");
    });
    for path in ["/link/f", "/link"] {
        let out = cowherd(&root).args(["split", "g", path]).output().unwrap();
        let line = assert_one_line_error(&out, 3);
        assert!(line.contains(path), "{line}");
        assert!(
            line.contains("guests/g/base/link"),
            "names the symlink: {line}"
        );
        assert!(line.contains("symlink inside the guest"), "{line}");
        assert!(line.contains("never followed"), "{line}");
        assert!(!line.contains("not a directory"), "{line}");
    }
}

#[test]
fn list_counts_a_split_file_at_once() {
    assert_root();
    let s = Scratch::new("msg-list-split");
    let root = unified_pair(&s);
    let before = list_row(&root, "g1");
    assert_eq!(
        (&before["files"], &before["linked_files"]),
        (&3.into(), &2.into())
    );
    cowherd(&root)
        .args(["split", "g1", "/usr/bin/a"])
        .assert()
        .success();
    let after = list_row(&root, "g1");
    assert_eq!(
        after["files"], 3,
        "the split file is still a file of g1: {after}"
    );
    assert_eq!(after["linked_files"], 1, "{after}");
    assert_eq!(after["logical_bytes"], before["logical_bytes"]);
    // The next unify finds the index right: nothing new, nothing removed.
    let unified = run_json(cowherd(&root).args(["unify", "g1", "--json"]));
    assert_eq!(unified["files_new"], 0, "{unified}");
    assert_eq!(unified["files_removed"], 0, "{unified}");
    assert_eq!(list_row(&root, "g1")["files"], 3);
}

#[test]
fn gc_n_is_a_dry_run_like_unify_n_and_fold_n() {
    assert_root();
    let s = Scratch::new("msg-gc-n");
    let root = unified_pair(&s);
    // A guest with a pair of equal files: an object only it uses, orphaned by its destroy.
    adopt_built(&root, s.path(), "g3", |d| {
        TreeBuilder::new(d)
            .file("opt/one", &content("g3-own", 9_000))
            .file("opt/two", &content("g3-own", 9_000));
    });
    cowherd(&root).args(["unify", "g3"]).assert().success();
    let own = store_inodes(&root)[&ino(&base(&root, "g3").join("opt/one"))].clone();
    cowherd(&root).args(["destroy", "g3"]).assert().success();
    let objects = store_objects(&root).len();

    let out = cowherd(&root).args(["gc", "-n"]).output().unwrap();
    assert!(out.status.success(), "{out:?}");
    let said = String::from_utf8_lossy(&out.stdout);
    let name = own.path.file_name().unwrap().to_str().unwrap();
    assert!(said.contains(&format!("would remove {name}")), "{said}");
    assert!(own.path.exists(), "gc -n removed {name}");
    assert_eq!(store_objects(&root).len(), objects);
}

#[test]
fn a_damaged_index_names_index_rebuild_which_repairs_it() {
    assert_root();
    let s = Scratch::new("msg-damaged");
    let root = unified_pair(&s);
    let db = root.join("index.db");
    assert!(
        !root.join("index.db-wal").exists(),
        "the index was checkpointed"
    );
    let len = fs::metadata(&db).unwrap().len();
    assert!(
        len >= 8 * 4096,
        "fixture: an index of several pages: {len} bytes"
    );
    // 4 KiB of garbage in the middle: the file still opens (its header and schema are
    // intact), its rows do not read.
    let mut damaged = fs::read(&db).unwrap();
    let middle = (len / 2) as usize;
    for (i, b) in damaged[middle..middle + 4096].iter_mut().enumerate() {
        *b = if i % 2 == 0 { 0xde } else { 0xad };
    }
    fs::write(&db, &damaged).unwrap();

    let out = cowherd(&root).arg("list").output().unwrap();
    let line = assert_one_line_error(&out, 1);
    assert!(line.contains(db.to_str().unwrap()), "{line}");
    let fix = format!("cowherd --root {} index rebuild", root.display());
    assert!(line.contains(&fix), "names the fix `{fix}`: {line}");

    // And the fix named works.
    cowherd(&root).args(["index", "rebuild"]).assert().success();
    assert_eq!(list_row(&root, "g1")["linked_files"], 2);
    assert_eq!(list_row(&root, "g2")["files"], 3);
}

#[test]
fn a_filesystem_mounted_inside_a_guest_is_named_with_the_umount_that_removes_it() {
    assert_root();
    let s = Scratch::new("msg-mount-inside");
    let root = unified_pair(&s);
    let inside = base(&root, "g1").join("srv/data");
    let _mnt = TmpfsMount::new(&inside);
    for cmd in [&["fold", "g1"][..], &["unify", "g1"], &["destroy", "g1"]] {
        let out = cowherd(&root).args(cmd).output().unwrap();
        let line = assert_one_line_error(&out, 1);
        assert!(
            line.contains(&format!("mounted at {}", inside.display()))
                && line.contains(&format!("`umount {}`", inside.display()))
                && !line.contains("cowherd umount"),
            "{cmd:?}: {line}"
        );
    }
    assert!(base(&root, "g1").join("usr/bin/a").exists());
}
