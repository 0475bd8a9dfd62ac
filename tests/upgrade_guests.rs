//! `cowherd upgrade` on small guests whose package manager is a stub (tests/common's
//! `STUB_APT`): the run's snapshots, outcomes and sharing; a failing guest back to exactly its
//! tree; mounted and foreign guests skipped; a hostile guest's package manager reaching
//! nothing of the host; bad input. (The real archive and apt: upgrade.rs; kills: kill_loops.rs.)

mod common;

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use serde_json::Value;

use common::*;

/// A root with stub guests `names` (each with a file of its own), unified.
fn stub_root(s: &Scratch, names: &[&str]) -> std::path::PathBuf {
    let root = init_root(s.path());
    for g in names {
        adopt_built(&root, s.path(), g, |d| {
            stub_apt_tree(d);
            TreeBuilder::new(d)
                .file("etc/hostname", format!("{g}\n").as_bytes())
                .finish();
        });
    }
    cowherd(&root)
        .args(["unify", "--all", "--quiet"])
        .assert()
        .success();
    root
}

/// Replaces guest `g`'s `apt-get` in base with `script`.
fn set_apt(root: &Path, g: &str, script: &str) {
    let apt = base(root, g).join("usr/bin/apt-get");
    fs::remove_file(&apt).unwrap();
    fs::write(&apt, script).unwrap();
    fs::set_permissions(&apt, fs::Permissions::from_mode(0o755)).unwrap();
}

fn upgrade(root: &Path, s: &Scratch, args: &[&str]) -> (Value, i32) {
    let logs = s.join("logs");
    let out = cowherd(root)
        .args(["upgrade", "--json", "--quiet", "--logs"])
        .arg(&logs)
        .args(args)
        .output()
        .unwrap();
    (json_of(&out), out.status.code().unwrap_or(-1))
}

#[test]
fn stub_guests_are_snapshotted_upgraded_and_share_the_upgraded_files() {
    assert_root();
    own_mount_namespace();
    let s = Scratch::new("upgrade-stub");
    let names = ["s1", "s2", "s3"];
    let root = stub_root(&s, &names);
    let before: Vec<Manifest> = names.iter().map(|g| merged_manifest(&root, g)).collect();

    let (dry, code) = upgrade(&root, &s, &["--all", "--dry-run"]);
    assert_eq!(code, 0, "{dry:#}");
    for (g, m) in names.iter().zip(&before) {
        let line = report_line(&dry, g);
        assert_eq!(line["outcome"], "would-upgrade", "{line:#}");
        assert_eq!(line["packages"][0]["name"], "stub");
        assert_eq!(line["packages"][0]["from"], "1");
        assert_eq!(line["packages"][0]["to"], "2");
        let (d, _) = compare_manifests(m, &merged_manifest(&root, g), EXACT);
        assert!(d.is_empty(), "the dry run changed {g}: {d:?}");
        assert!(fs::read_dir(upper(&root, g)).unwrap().next().is_none());
    }

    let (report, code) = upgrade(&root, &s, &["--all", "--jobs", "2"]);
    assert_eq!(code, 0, "{report:#}");
    let store = store_inodes(&root);
    for g in names {
        let line = report_line(&report, g);
        assert_eq!(line["outcome"], "upgraded", "{line:#}");
        let snap = line["snapshot"].as_str().unwrap();
        let listed = run_json(cowherd(&root).args(["snapshot", "list", g, "--json"]));
        assert_eq!(listed[0]["name"], snap);
        assert_eq!(listed[0]["made_by"], "upgrade");
        // The snapshot is the tree before; the guest the tree after, all in base.
        let old = fs::read(
            root.join("guests")
                .join(g)
                .join("snapshots")
                .join(snap)
                .join("tree/var/lib/stub/version"),
        )
        .unwrap();
        assert_eq!(old, b"1\n");
        assert_eq!(
            fs::read(base(&root, g).join("var/lib/stub/version")).unwrap(),
            b"2\n"
        );
        assert!(
            fs::read_dir(upper(&root, g)).unwrap().next().is_none(),
            "{g}'s upper"
        );
        // What the package manager downloaded never stays in the guest, nor its policy-rc.d.
        assert!(!base(&root, g).join("usr/sbin/policy-rc.d").exists());
    }
    // The upgraded files, the same in every guest, are one store object.
    for i in 0..STUB_FILES {
        let rel = format!("usr/lib/stub/f{i}");
        let inodes: std::collections::BTreeSet<_> = names
            .iter()
            .map(|g| ino(&base(&root, g).join(&rel)))
            .collect();
        assert_eq!(inodes.len(), 1, "/{rel}");
        assert!(
            store.contains_key(inodes.first().unwrap()),
            "/{rel} is no store object"
        );
    }
    let stats = run_json(cowherd(&root).args(["stats", "--json"]));
    assert_eq!(stats["total"]["snapshots"], 3);
}

#[test]
fn a_failed_upgrade_leaves_the_guest_exactly_as_before_and_the_others_go_on() {
    assert_root();
    own_mount_namespace();
    let s = Scratch::new("upgrade-fail");
    let root = stub_root(&s, &["good", "bad"]);
    // Half an upgrade, then a failure: as dpkg stopping on a broken package.
    set_apt(
        &root,
        "bad",
        "#!/bin/sh\nfor a in \"$@\"; do case \"$a\" in update) exit 0;; -s) echo 'Inst stub [1] (2 stub [all])'; exit 0;; esac; done\n\
         echo half > /usr/lib/stub/f0\necho 'E: Sub-process /usr/bin/dpkg returned an error code (1)' >&2\nexit 100\n",
    );
    // Folded (nothing to fold), so that its upper's top shows what a mount shows: the view
    // measured below is the guest's as cowherd mounts it.
    for verb in ["fold", "unify"] {
        cowherd(&root)
            .args([verb, "bad", "--quiet"])
            .assert()
            .success();
    }
    let before = merged_manifest(&root, "bad");
    let (report, code) = upgrade(&root, &s, &["--all"]);
    assert_eq!(code, 3, "{report:#}");
    assert_eq!(report_line(&report, "good")["outcome"], "upgraded");
    let bad = report_line(&report, "bad");
    assert_eq!(bad["outcome"], "failed", "{bad:#}");
    assert_eq!(bad["rolled_back"], true);
    let message = bad["message"].as_str().unwrap();
    assert!(message.contains("dpkg returned an error"), "{message}");
    let (d, _) = compare_manifests(&before, &merged_manifest(&root, "bad"), EXACT);
    assert!(d.is_empty(), "the failed upgrade changed bad: {d:?}");
    let snaps = run_json(cowherd(&root).args(["snapshot", "list", "bad", "--json"]));
    assert_eq!(
        snaps,
        serde_json::json!([]),
        "bad keeps no snapshot of an unchanged tree"
    );
    // The human report says so too.
    set_apt(&root, "bad", STUB_APT);
    let out = cowherd(&root)
        .args(["upgrade", "bad", "--quiet"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("upgraded 1 of 1 guests"));
}

#[test]
fn mounted_and_foreign_guests_are_skipped_with_the_command_that_upgrades_them() {
    assert_root();
    own_mount_namespace();
    let s = Scratch::new("upgrade-skip");
    let root = stub_root(&s, &["run", "idle"]);
    // A guest without a package manager of the Debian family.
    let other = s.join("other");
    TreeBuilder::new(&other)
        .file("etc/os-release", b"ID=other\n")
        .finish();
    adopt(&root, &other, "other");
    let mut guard = MountedGuests::default();
    guard.watch(root.join("guests/run/rootfs"));
    cowherd(&root)
        .args(["mount", "run", "--quiet"])
        .assert()
        .success();
    let (report, code) = upgrade(&root, &s, &["--all"]);
    cowherd(&root)
        .args(["umount", "run", "--quiet"])
        .assert()
        .success();
    assert_eq!(code, 3, "{report:#}");
    let run = report_line(&report, "run");
    assert_eq!(run["outcome"], "skipped");
    assert!(
        run["message"]
            .as_str()
            .unwrap()
            .contains("cowherd umount run && cowherd upgrade run"),
        "{run:#}"
    );
    let other = report_line(&report, "other");
    assert_eq!(other["outcome"], "skipped");
    assert!(other["message"].as_str().unwrap().contains("apt-get"));
    assert_eq!(report_line(&report, "idle")["outcome"], "upgraded");
    assert_eq!(
        fs::read(base(&root, "run").join("var/lib/stub/version")).unwrap(),
        b"1\n"
    );
}

/// A package manager that tries the ways out of its guest during an upgrade: host paths by
/// name and through `..`, `/proc/1/root`, the host's kernel settings, its output flooded with
/// package lines; then it upgrades as the stub does.
const HOSTILE_APT: &str = r#"#!/bin/sh
for a in "$@"; do case "$a" in update) exit 0;; -s) sim=1;; esac; done
if [ -n "$sim" ]; then
  i=0; while [ $i -lt 3000 ]; do echo "Inst p$i [1] (2 x [all])"; i=$((i + 1)); done
  exit 0
fi
for p in "$CANARY" "../../../../../..$CANARY" "/proc/1/root$CANARY" "/proc/self/root$CANARY"; do
  echo owned > "$p" 2>/dev/null
  rm -f "$p" 2>/dev/null
done
echo '|/tmp/owned %p' > /proc/sys/kernel/core_pattern 2>/dev/null
cat /etc/shadow > /usr/lib/stub/stolen 2>/dev/null
ln -s / /usr/lib/stub/host
echo 2 > /var/lib/stub/version
exit 0
"#;

#[test]
fn a_hostile_package_manager_reaches_nothing_of_the_host() {
    assert_root();
    own_mount_namespace();
    let s = Scratch::new("upgrade-hostile");
    let root = stub_root(&s, &["evil", "fine"]);
    let canary_dir = s.join("canary");
    fs::create_dir_all(&canary_dir).unwrap();
    let canary = canary_dir.join("file");
    fs::write(&canary, b"host data\n").unwrap();
    let canary_before = manifest(&canary_dir);
    let core_pattern = fs::read("/proc/sys/kernel/core_pattern").unwrap();
    let script = HOSTILE_APT.replace("$CANARY", &canary.display().to_string());
    set_apt(&root, "evil", &script);
    cowherd(&root)
        .args(["unify", "evil", "--quiet"])
        .assert()
        .success();
    let (report, code) = upgrade(&root, &s, &["--all"]);
    assert_eq!(code, 0, "{report:#}");
    let (d, _) = compare_manifests(&canary_before, &manifest(&canary_dir), EXACT);
    assert!(d.is_empty(), "the host's canary changed: {d:?}");
    assert_eq!(
        fs::read("/proc/sys/kernel/core_pattern").unwrap(),
        core_pattern
    );
    // The guest read its own /etc/shadow at most (it has none), never the host's.
    let stolen = base(&root, "evil").join("usr/lib/stub/stolen");
    assert!(fs::read(&stolen).map_or(true, |b| b.is_empty()));
    // Its flood of package lines is read, bounded, and the guest is upgraded.
    let evil = report_line(&report, "evil");
    assert_eq!(evil["outcome"], "upgraded");
    assert_eq!(evil["packages"].as_array().unwrap().len(), 3000);
    assert_eq!(report_line(&report, "fine")["outcome"], "upgraded");
    // Its symlink to / is a symlink in its own tree, never followed by the fold or unify.
    let link = base(&root, "evil").join("usr/lib/stub/host");
    assert!(
        fs::symlink_metadata(&link).is_ok_and(|m| m.file_type().is_symlink()),
        "{}: {:?}",
        link.display(),
        fs::read_dir(link.parent().unwrap()).map(|d| d.count())
    );
}

#[test]
fn bad_upgrade_input_is_a_one_line_error() {
    assert_root();
    let s = Scratch::new("upgrade-bad");
    let root = init_root(s.path());
    let out = cowherd(&root).args(["upgrade", "--all"]).output().unwrap();
    assert!(assert_one_line_error(&out, 1).contains("no guests"));
    let out = cowherd(&root).args(["upgrade", "nosuch"]).output().unwrap();
    assert!(assert_one_line_error(&out, 1).contains("no guest named"));
    let out = cowherd(&root)
        .args(["upgrade", "--all", "--jobs", "0"])
        .output()
        .unwrap();
    assert_one_line_error(&out, 2);
    let out = cowherd(&root).args(["upgrade"]).output().unwrap();
    assert_one_line_error(&out, 2);
    adopt_built(&root, s.path(), "g", stub_apt_tree);
    let file = s.join("a-file");
    fs::write(&file, b"").unwrap();
    let out = cowherd(&root)
        .args(["upgrade", "g", "--logs"])
        .arg(&file)
        .output()
        .unwrap();
    assert!(assert_one_line_error(&out, 1).contains("a-file"));
    let out = cowherd(&root)
        .args(["template", "upgrade", "nosuch"])
        .output()
        .unwrap();
    assert_one_line_error(&out, 1);
    let out = cowherd(&root)
        .args(["template", "upgrade", "debian-bookworm-minbase@1"])
        .output()
        .unwrap();
    assert_one_line_error(&out, 1);
    let out = cowherd(&root)
        .args(["template", "upgrade", "debian-bookworm-minbase"])
        .output()
        .unwrap();
    assert!(assert_one_line_error(&out, 1).contains("template build"));
    // Nothing was left behind by the refusals.
    assert!(fs::read_dir(root.join("guests/g/snapshots")).map_or(true, |mut d| d.next().is_none()));
}
