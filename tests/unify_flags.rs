//! Inode flags a guest sets (`chattr`) and `unify`: a file carrying any of them is not eligible
//! for sharing — left alone with its flags and its inode, reported once as skipped, never as a
//! failure — while its identical copies in other guests are still shared. Real `chattr` and
//! `lsattr` on the repository's ext4, real overlay mounts for the guest's own `chattr +i`.

mod common;

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use serde_json::Value;

use common::*;

/// The letters `lsattr` shows for the flags a guest sets, without the filesystem's own (`e`
/// extents and the like): `"i"`, `"dA"`, `""`.
fn guest_flags(p: &Path) -> String {
    inode_flags(p)
        .chars()
        .filter(|c| "suSDiadAcjtTCxPm".contains(*c))
        .collect()
}

/// Inode number of `p`.
fn inode(p: &Path) -> u64 {
    fs::symlink_metadata(p).unwrap().ino()
}

/// `cowherd unify ARGS… --json`: exit code, report, stderr.
fn unify_json(root: &Path, args: &[&str]) -> (Option<i32>, Value, String) {
    let out = cowherd(root)
        .arg("unify")
        .args(args)
        .arg("--json")
        .output()
        .unwrap();
    (
        out.status.code(),
        json_of(&out),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The (guest, path) pairs of a report's `skipped_flagged`.
fn skipped_flagged(report: &Value) -> Vec<(String, String)> {
    let mut v: Vec<(String, String)> = report["skipped_flagged"]
        .as_array()
        .unwrap_or_else(|| panic!("no skipped_flagged list in {report:#}"))
        .iter()
        .map(|e| {
            (
                e["guest"].as_str().unwrap().to_string(),
                e["path"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    v.sort();
    v
}

/// A small guest whose files are byte- and metadata-identical across guests.
fn guest_tree(dir: &Path) {
    let mut t = TreeBuilder::new(dir);
    t.file("usr/lib/locked.so", &content("locked", 5000))
        .file("usr/lib/journal.log", &content("journal", 4000))
        .file("usr/share/noatime.dat", &content("noatime", 3000))
        .file("usr/share/plain.dat", &content("noatime", 3000))
        .file("usr/share/doc/readme", &content("readme", 2000))
        .file("etc/hostname", b"guest\n");
    t.finish();
}

/// Regression (defect 7): a guest's `chattr +i` / `+a` file identical to files of other guests
/// made every `unify --all` exit 3 with EPERM.
#[test]
fn a_guests_immutable_and_append_only_files_are_skipped_not_failed() {
    assert_root();
    let s = Scratch::new("flags-ia");
    let _unflag = ClearFlagsOnDrop(s.path().to_path_buf());
    let root = init_root(s.path());
    for name in ["a", "b", "c"] {
        adopt_built(&root, s.path(), name, guest_tree);
    }
    let a = base(&root, "a");
    chattr("+i", &a.join("usr/lib/locked.so"));
    chattr("+a", &a.join("usr/lib/journal.log"));
    let before = [
        inode(&a.join("usr/lib/locked.so")),
        inode(&a.join("usr/lib/journal.log")),
    ];

    let (code, report, stderr) = unify_json(&root, &["--all"]);
    assert_eq!(code, Some(0), "unify --all: {stderr}\n{report:#}");
    assert_eq!(report["failures"], serde_json::json!([]), "{report:#}");
    assert_eq!(
        skipped_flagged(&report),
        vec![
            ("a".to_string(), "/usr/lib/journal.log".to_string()),
            ("a".to_string(), "/usr/lib/locked.so".to_string()),
        ],
        "{report:#}"
    );
    assert_eq!(guest_flags(&a.join("usr/lib/locked.so")), "i");
    assert_eq!(guest_flags(&a.join("usr/lib/journal.log")), "a");
    let after = [
        inode(&a.join("usr/lib/locked.so")),
        inode(&a.join("usr/lib/journal.log")),
    ];
    assert_eq!(after, before, "the flagged files keep their inodes");
    let objects = store_inodes(&root);
    for rel in [
        "usr/lib/locked.so",
        "usr/lib/journal.log",
        "usr/share/doc/readme",
    ] {
        let (b, c) = (base(&root, "b").join(rel), base(&root, "c").join(rel));
        assert_eq!(ino(&b), ino(&c), "b's and c's {rel} are shared");
        assert!(objects.contains_key(&ino(&b)), "{rel} is a store link");
        assert_eq!(guest_flags(&b), "", "b's {rel} carries no flag");
    }
    assert!(objects.contains_key(&ino(&a.join("usr/share/doc/readme"))));

    // Nothing changed: the next run neither fails nor lists the files again.
    let (code, report, stderr) = unify_json(&root, &["--all"]);
    assert_eq!(code, Some(0), "second unify --all: {stderr}\n{report:#}");
    assert_eq!(report["failures"], serde_json::json!([]), "{report:#}");
    assert_eq!(skipped_flagged(&report), vec![], "{report:#}");
    assert_eq!(guest_flags(&a.join("usr/lib/locked.so")), "i");
    assert_eq!(guest_flags(&a.join("usr/lib/journal.log")), "a");

    // Once the guest lifts the flag, the file is shared like any other.
    chattr("-i", &a.join("usr/lib/locked.so"));
    let (code, report, stderr) = unify_json(&root, &["--all"]);
    assert_eq!(code, Some(0), "unify after chattr -i: {stderr}\n{report:#}");
    assert_eq!(
        ino(&a.join("usr/lib/locked.so")),
        ino(&base(&root, "b").join("usr/lib/locked.so")),
        "{report:#}"
    );
}

/// Regression (defect 8): of two identical files, one with `chattr +A +d`, unify made one
/// inode of them and the flags were gone (or given to the other path).
#[test]
fn files_whose_inode_flags_differ_never_share_an_inode() {
    assert_root();
    let s = Scratch::new("flags-ad");
    let root = init_root(s.path());
    for name in ["a", "b"] {
        adopt_built(&root, s.path(), name, guest_tree);
    }
    let a = base(&root, "a");
    let flagged = a.join("usr/share/noatime.dat");
    chattr("+A", &flagged);
    chattr("+d", &flagged);
    let flags_before = inode_flags(&flagged);
    let ino_before = inode(&flagged);

    let (code, report, stderr) = unify_json(&root, &["--all"]);
    assert_eq!(code, Some(0), "unify --all: {stderr}\n{report:#}");
    assert_eq!(
        inode_flags(&flagged),
        flags_before,
        "lsattr of the flagged file"
    );
    assert_eq!(guest_flags(&flagged), "dA");
    assert_eq!(
        inode(&flagged),
        ino_before,
        "the flagged file keeps its inode"
    );
    // Its identical, unflagged copies — in its own guest and in the other — share one inode,
    // which carries no flag.
    let plain = [
        a.join("usr/share/plain.dat"),
        base(&root, "b").join("usr/share/noatime.dat"),
        base(&root, "b").join("usr/share/plain.dat"),
    ];
    for p in &plain {
        assert_ne!(
            ino(p),
            ino(&flagged),
            "{} shares the flagged inode",
            p.display()
        );
        assert_eq!(ino(p), ino(&plain[0]), "{} is shared", p.display());
        assert_eq!(guest_flags(p), "", "{}", p.display());
    }
    assert!(store_inodes(&root).contains_key(&ino(&plain[0])));
    assert_eq!(
        skipped_flagged(&report),
        vec![("a".to_string(), "/usr/share/noatime.dat".to_string())],
        "{report:#}"
    );

    let (code, report, stderr) = unify_json(&root, &["--all"]);
    assert_eq!(code, Some(0), "second unify --all: {stderr}\n{report:#}");
    assert_eq!(skipped_flagged(&report), vec![], "{report:#}");
    assert_ne!(ino(&plain[0]), ino(&flagged));
    assert_eq!(guest_flags(&flagged), "dA");
}

/// Adds the marker rule `rule` to guest `name`'s policy.
fn add_policy_rule(root: &Path, name: &str, rule: &str) {
    let toml = root.join("guests").join(name).join("guest.toml");
    let mut text = fs::read_to_string(&toml).unwrap();
    assert!(!text.contains("[policy]"), "{text}");
    text.push_str(&format!("\n[policy]\nrules = [\"{rule}\"]\n"));
    fs::write(&toml, text).unwrap();
}

/// The immutable flag cowherd itself puts on `immutable` store objects is not a guest's flag:
/// paths linked to such an object stay linked run after run, and a new guest's copy joins it.
#[test]
fn cowherds_own_immutable_flag_on_store_objects_is_not_a_guests_flag() {
    assert_root();
    let s = Scratch::new("flags-marker");
    let root = init_root(s.path());
    let rule = "immutable /usr/lib/locked.so";
    for name in ["a", "b"] {
        adopt_built(&root, s.path(), name, guest_tree);
        add_policy_rule(&root, name, rule);
    }
    let (code, report, stderr) = unify_json(&root, &["--all"]);
    assert_eq!(code, Some(0), "unify --all: {stderr}\n{report:#}");
    let p = |g: &str| base(&root, g).join("usr/lib/locked.so");
    assert_eq!(ino(&p("a")), ino(&p("b")));
    assert_eq!(store_inodes(&root)[&ino(&p("a"))].marker, 'i');
    assert_eq!(guest_flags(&p("a")), "i", "cowherd's own flag");

    adopt_built(&root, s.path(), "c", guest_tree);
    add_policy_rule(&root, "c", rule);
    for run in 1..=2 {
        let (code, report, stderr) = unify_json(&root, &["--all"]);
        assert_eq!(code, Some(0), "run {run}: {stderr}\n{report:#}");
        assert_eq!(report["failures"], serde_json::json!([]), "{report:#}");
        assert_eq!(skipped_flagged(&report), vec![], "run {run}: {report:#}");
        assert_eq!(ino(&p("c")), ino(&p("a")), "run {run}: c joined the object");
        assert_eq!(ino(&p("b")), ino(&p("a")), "run {run}");
        assert_eq!(guest_flags(&p("a")), "i", "run {run}");
    }
}

/// The hash cowherd keeps of a file's xattrs (`key::xattr_hash`): names and values, sorted.
fn xattr_hash(p: &Path) -> Vec<u8> {
    let mut xattrs: Vec<(Vec<u8>, Vec<u8>)> = xattr::list(p)
        .unwrap()
        .map(|n| {
            let value = xattr::get(p, &n).unwrap().unwrap_or_default();
            (n.as_encoded_bytes().to_vec(), value)
        })
        .collect();
    xattrs.sort();
    let mut h = blake3::Hasher::new();
    h.update(b"cowherd-xattrs-v1");
    for (name, value) in xattrs {
        h.update(&(name.len() as u64).to_le_bytes());
        h.update(&name);
        h.update(&(value.len() as u64).to_le_bytes());
        h.update(&value);
    }
    h.finalize().as_bytes().to_vec()
}

/// A host hit by defect 7 has an index (schema 3) in which the guest's flagged file was hashed
/// (and then failed to link): its row holds hashes but no flags. The upgraded cowherd reads that
/// file again rather than trust those hashes, and the nightly unify stops failing.
#[test]
fn a_flagged_file_hashed_by_an_index_without_flags_is_read_again_and_skipped() {
    assert_root();
    let s = Scratch::new("flags-upgrade");
    let root = init_root(s.path());
    for name in ["a", "b", "c"] {
        adopt_built(&root, s.path(), name, guest_tree);
    }
    let locked = base(&root, "a").join("usr/lib/locked.so");
    chattr("+i", &locked);
    let (code, report, stderr) = unify_json(&root, &["--all"]);
    assert_eq!(code, Some(0), "unify --all: {stderr}\n{report:#}");

    // The index as schema 3 left it: no flags column, the file's hashes kept.
    {
        let db = rusqlite::Connection::open(root.join("index.db")).unwrap();
        let chash = blake3::hash(&fs::read(&locked).unwrap())
            .as_bytes()
            .to_vec();
        let changed = db
            .execute(
                "UPDATE files SET chash = ?1, xhash = ?2
                 WHERE name = CAST('locked.so' AS BLOB) AND dir IN (SELECT d.id FROM dirs d
                   JOIN guests g ON g.id = d.guest_id WHERE g.name = 'a')",
                rusqlite::params![chash, xattr_hash(&locked)],
            )
            .unwrap();
        assert_eq!(changed, 1, "a's row of usr/lib/locked.so");
        db.execute_batch("ALTER TABLE files DROP COLUMN flags; PRAGMA user_version = 3;")
            .unwrap();
    }
    let (code, report, stderr) = unify_json(&root, &["--all"]);
    assert_eq!(
        code,
        Some(0),
        "unify --all after the upgrade: {stderr}\n{report:#}"
    );
    assert_eq!(report["failures"], serde_json::json!([]), "{report:#}");
    assert_eq!(
        skipped_flagged(&report),
        vec![("a".to_string(), "/usr/lib/locked.so".to_string())],
        "read again once: {report:#}"
    );
    assert_eq!(guest_flags(&locked), "i");
    let (code, report, stderr) = unify_json(&root, &["--all"]);
    assert_eq!(code, Some(0), "next unify --all: {stderr}\n{report:#}");
    assert_eq!(skipped_flagged(&report), vec![], "{report:#}");
}

/// Regression (defect 7, the real path): a guest runs `chattr +i` / `+a` inside its overlay
/// (overlayfs keeps them as `trusted.overlay.protattr` on the upper inode); `fold` moves the
/// file into base with its flags; from then on every `unify --all` exited 3 with EPERM and every
/// `mount --fold` of the guest warned.
#[test]
fn a_flag_set_inside_the_guest_and_folded_does_not_break_unify_or_mount_fold() {
    assert_root();
    own_mount_namespace();
    let s = Scratch::new("flags-fold");
    let _unflag = ClearFlagsOnDrop(s.path().to_path_buf());
    let root = init_root(s.path());
    for name in ["a", "b", "c"] {
        adopt_built(&root, s.path(), name, guest_tree);
    }
    cowherd(&root).args(["unify", "--all"]).assert().success();
    let mut mounts = MountedGuests::default();
    let point = rootfs(&root, "a");
    mounts.watch(&point);
    cowherd(&root).args(["mount", "a"]).assert().success();
    chattr("+i", &point.join("usr/lib/locked.so"));
    chattr("+a", &point.join("usr/lib/journal.log"));
    umount_ok(&root, &["a"]);
    assert_eq!(
        xattr::get(
            upper(&root, "a").join("usr/lib/locked.so"),
            "trusted.overlay.protattr"
        )
        .unwrap(),
        Some(b"i".to_vec()),
        "where overlayfs keeps a guest's chattr +i"
    );
    cowherd(&root).args(["fold", "a"]).assert().success();
    let a = base(&root, "a");
    assert_eq!(guest_flags(&a.join("usr/lib/locked.so")), "i", "after fold");
    assert_eq!(
        guest_flags(&a.join("usr/lib/journal.log")),
        "a",
        "after fold"
    );
    let folded = [
        inode(&a.join("usr/lib/locked.so")),
        inode(&a.join("usr/lib/journal.log")),
    ];

    for run in 1..=2 {
        let (code, report, stderr) = unify_json(&root, &["--all"]);
        assert_eq!(code, Some(0), "unify --all run {run}: {stderr}\n{report:#}");
        assert_eq!(report["failures"], serde_json::json!([]), "{report:#}");
        let want = if run == 1 {
            vec![
                ("a".to_string(), "/usr/lib/journal.log".to_string()),
                ("a".to_string(), "/usr/lib/locked.so".to_string()),
            ]
        } else {
            vec![]
        };
        assert_eq!(skipped_flagged(&report), want, "run {run}: {report:#}");
        assert_eq!(guest_flags(&a.join("usr/lib/locked.so")), "i");
        assert_eq!(guest_flags(&a.join("usr/lib/journal.log")), "a");
        let now = [
            inode(&a.join("usr/lib/locked.so")),
            inode(&a.join("usr/lib/journal.log")),
        ];
        assert_eq!(
            now, folded,
            "run {run}: the flagged files keep their inodes"
        );
    }

    // Every start of the guest folds and unifies it: no warning, and the guest sees its flags.
    for start in 1..=2 {
        let out = cowherd(&root)
            .args(["mount", "--fold", "a"])
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success(),
            "mount --fold, start {start}: {stderr}"
        );
        assert!(
            !stderr.contains("warning"),
            "mount --fold, start {start}, warned:\n{stderr}"
        );
        assert_eq!(guest_flags(&point.join("usr/lib/locked.so")), "i");
        assert_eq!(guest_flags(&point.join("usr/lib/journal.log")), "a");
        umount_ok(&root, &["a"]);
    }
}

#[test]
fn verify_reports_and_repair_clears_a_guests_flags_on_a_store_object() {
    assert_root();
    let scratch = Scratch::new("flags-verify");
    let _clear = ClearFlagsOnDrop(scratch.path().to_path_buf());
    let root = init_root(scratch.path());
    for g in ["g1", "g2"] {
        adopt_built(&root, scratch.path(), g, guest_tree);
    }
    cowherd(&root).args(["unify", "--all"]).assert().success();
    // A store as an older cowherd left it: an object adopted from a guest's `chattr +A +d` file.
    let object = store_objects(&root)
        .into_iter()
        .next()
        .expect("an object")
        .path;
    chattr("+Ad", &object);
    let out = cowherd(&root).args(["verify"]).output().unwrap();
    assert_eq!(out.status.code(), Some(3), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("inode flags") && text.contains("--repair"),
        "{text}"
    );
    cowherd(&root)
        .args(["verify", "--repair"])
        .assert()
        .success();
    assert_eq!(guest_flags(&object), "", "flags left on the object");
    cowherd(&root).arg("verify").assert().success();
}
