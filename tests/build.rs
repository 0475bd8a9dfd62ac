//! Templates and guests built from them: a real mmdebstrap template and guests from it; tarball
//! and derived templates; errors; a killed template build or removal. (A killed `build --count`
//! is in kill_loops.rs.)

use std::collections::BTreeSet;
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::Value;

use crate::common::*;

/// The programs a tarball template carries, so that steps and `exec` can run in it.
const USERLAND: [&str; 4] = ["/bin/sh", "/bin/cat", "/bin/ls", "/bin/hostname"];

/// The content of two separate files of the tarball template.
const COPYRIGHT: &[u8] = b"Copyright: the authors\nLicense: GPL-2+\n";

/// Writes `$ROOT/templates.d/NAME.toml`.
fn define(root: &Path, name: &str, text: &str) -> PathBuf {
    let dir = root.join("templates.d");
    fs::create_dir_all(&dir).unwrap();
    let file = dir.join(format!("{name}.toml"));
    fs::write(&file, text).unwrap();
    file
}

/// A small root filesystem as a tarball: a userland, /etc files, and `files` shareable ones.
fn tarball(s: &Scratch, files: usize) -> PathBuf {
    let tree = s.join("rootfs");
    minimal_userland(&tree, &USERLAND);
    let mut t = TreeBuilder::new(&tree);
    t.file("etc/hostname", b"template\n")
        .file("etc/hosts", b"127.0.0.1 localhost\n")
        .file("etc/machine-id", b"")
        .dir("usr/sbin", 0o755)
        .file("usr/sbin/daemon", &content("daemon", 20_000))
        // Two packages' identical files: one store object, two separate files.
        .file("usr/share/doc/pkg-a/copyright", COPYRIGHT)
        .file("usr/share/doc/pkg-b/copyright", COPYRIGHT);
    for i in 0..files {
        t.file(
            format!("usr/share/pkg{:02}/file{i:04}", i / 100),
            &content(&format!("shared-{i}"), 1_000 + i % 7_000),
        );
    }
    t.finish();
    let out = s.join("rootfs.tar");
    let status = Command::new("tar")
        .args([
            "--create",
            "--numeric-owner",
            "--xattrs",
            "--xattrs-include=*",
            "--file",
        ])
        .arg(&out)
        .arg("--directory")
        .arg(&tree)
        .arg(".")
        .status()
        .unwrap();
    assert!(status.success());
    out
}

/// `cowherd template build NAME --json`.
fn build_template(root: &Path, name: &str) -> Value {
    run_json(cowherd(root).args(["template", "build", name, "--json"]))
}

fn machine_id(root: &Path, guest: &str) -> String {
    fs::read_to_string(base(root, guest).join("etc/machine-id")).unwrap()
}

#[test]
fn a_real_template_builds_guests_that_share_its_files_and_run() {
    assert_root();
    let s = Scratch::new("build-real");
    let root = init_root(s.path());
    let built = build_template(&root, "debian-bookworm-minbase");
    assert_eq!(built["record"]["version"], 1);
    let template_bytes = built["record"]["bytes"].as_u64().unwrap();
    let tree = root.join("templates/debian-bookworm-minbase/1/tree");
    // Cleaned for reuse.
    let id = fs::read(tree.join("etc/machine-id")).unwrap_or_default();
    assert!(
        id.is_empty(),
        "the template's machine-id is not empty: {id:?}"
    );
    assert!(files_under(&tree.join("var/lib/apt/lists")).is_empty());
    // Shareable files already are store objects.
    let store = store_inodes(&root);
    assert!(store.contains_key(&ino(&tree.join("usr/bin/apt-get"))));

    let guests = ["g01", "g02", "g03"];
    let root_before = allocated_bytes(&[&root]);
    let report = run_json(cowherd(&root).args([
        "build",
        "--count",
        "3",
        "--prefix",
        "g",
        "--template",
        "debian-bookworm-minbase",
        "--json",
    ]));
    let reports = report.as_array().unwrap();
    assert_eq!(reports.len(), 3);
    // What a guest costs on disk: everything the root grew by, divided among the three.
    let grown = allocated_bytes(&[&root]) - root_before;
    assert!(
        grown / 3 * 20 < template_bytes,
        "a guest added {} bytes, not under 5% of the template's {template_bytes}",
        grown / 3
    );
    // Their own identity; the rest shared.
    let ids: BTreeSet<String> = guests.iter().map(|g| machine_id(&root, g)).collect();
    assert_eq!(ids.len(), 3, "{ids:?}");
    for g in guests {
        let id = machine_id(&root, g);
        assert_eq!(id.trim().len(), 32, "{g}: {id:?}");
        assert_eq!(
            fs::read_to_string(base(&root, g).join("etc/hostname")).unwrap(),
            format!("{g}\n")
        );
        assert!(
            fs::read_to_string(base(&root, g).join("etc/hosts"))
                .unwrap()
                .contains(g)
        );
        assert_eq!(
            ino(&base(&root, g).join("usr/bin/apt-get")),
            ino(&tree.join("usr/bin/apt-get")),
            "{g}: /usr/bin/apt-get is not the template's store object"
        );
    }
    let mut mounts = MountedGuests::default();
    for g in guests {
        mounts.watch(rootfs(&root, g));
    }
    cowherd(&root).arg("mount").args(guests).assert().success();
    for g in guests {
        let out = cowherd(&root)
            .args(["exec", g, "--", "apt-get", "--version"])
            .output()
            .unwrap();
        assert!(out.status.success(), "{g}: {out:?}");
        assert!(String::from_utf8_lossy(&out.stdout).starts_with("apt "));
    }
}

#[test]
fn tarball_and_derived_templates_build_and_share_with_each_other() {
    assert_root();
    let s = Scratch::new("build-tarball");
    let root = init_root(s.path());
    let archive = tarball(&s, 200);
    define(
        &root,
        "tiny",
        &format!("method = \"tarball\"\nsource = \"{}\"\n", archive.display()),
    );
    define(
        &root,
        "tiny-role",
        "from = \"tiny\"\nsteps = [\"echo role > /etc/role\", \"cat /etc/role > /usr/share/role-marker\", \
         \"echo changed >> /usr/share/doc/pkg-a/copyright\"]\n\
         [policy]\nrules = [\"immutable /usr/sbin/**\"]\n",
    );
    let built = build_template(&root, "tiny-role");
    assert_eq!(
        built["record"]["from"], "tiny@1",
        "the parent is built first"
    );
    let tiny = root.join("templates/tiny/1/tree");
    let role = root.join("templates/tiny-role/1/tree");
    assert_eq!(fs::read(role.join("etc/role")).unwrap(), b"role\n");
    // Regression (review): the parent's two copyright files are one store object, yet a step
    // that changes one in place changes no other file, in the role or in its parent.
    let (a, b) = (
        "usr/share/doc/pkg-a/copyright",
        "usr/share/doc/pkg-b/copyright",
    );
    assert_eq!(ino(&tiny.join(a)), ino(&tiny.join(b)), "one object");
    assert_eq!(
        fs::read(role.join(a)).unwrap(),
        [COPYRIGHT, b"changed\n"].concat()
    );
    assert_eq!(fs::read(role.join(b)).unwrap(), COPYRIGHT);
    assert_eq!(fs::read(tiny.join(a)).unwrap(), COPYRIGHT);
    assert_eq!(fs::read(tiny.join(b)).unwrap(), COPYRIGHT);
    // The role template shares its parent's files through the store.
    let shared = "usr/share/pkg00/file0000";
    assert_eq!(ino(&tiny.join(shared)), ino(&role.join(shared)));
    // Its policy applies to it and to its guests.
    let daemon = store_inodes(&root)[&ino(&role.join("usr/sbin/daemon"))].clone();
    assert_eq!(daemon.marker, 'i', "{daemon:?}");
    cowherd(&root)
        .args([
            "build",
            "r1",
            "--template",
            "tiny-role",
            "--hostname",
            "r1.example.test",
        ])
        .assert()
        .success();
    let record = fs::read_to_string(root.join("guests/r1/guest.toml")).unwrap();
    assert!(
        record.contains("immutable /usr/sbin/**") && record.contains("tiny-role@1"),
        "{record}"
    );
    assert_eq!(
        fs::read_to_string(base(&root, "r1").join("etc/hostname")).unwrap(),
        "r1.example.test\n"
    );
    assert_eq!(
        ino(&base(&root, "r1").join(shared)),
        ino(&tiny.join(shared))
    );

    // A lost index is rebuilt with the template trees: the same stats, the trees indexed.
    let stats = |root: &Path| {
        let mut v = run_json(cowherd(root).args(["stats", "--json"]));
        v["total"].as_object_mut().unwrap().remove("index_bytes");
        for g in v["guests"].as_array_mut().unwrap() {
            g.as_object_mut().unwrap().remove("last_unify");
        }
        v
    };
    let before = stats(&root);
    let trees = indexed_templates(&root);
    for f in ["index.db", "index.db-wal", "index.db-shm"] {
        let _ = fs::remove_file(root.join(f));
    }
    let rebuilt = run_json(cowherd(&root).args(["index", "rebuild", "--json"]));
    assert_eq!(rebuilt["template_trees"], 2, "{rebuilt}");
    assert_eq!(stats(&root), before);
    assert_eq!(indexed_templates(&root), trees);

    // A rebuild is a new version; the guest keeps its own; remove refuses it while used.
    let rebuilt = run_json(cowherd(&root).args(["template", "rebuild", "tiny-role", "--json"]));
    assert_eq!(rebuilt["record"]["version"], 2);
    let out = cowherd(&root)
        .args(["template", "remove", "tiny-role@1"])
        .output()
        .unwrap();
    let err = assert_one_line_error(&out, 1);
    assert!(err.contains("r1"), "{err}");
    cowherd(&root)
        .args(["template", "remove", "tiny-role@2"])
        .assert()
        .success();
    cowherd(&root).args(["destroy", "r1"]).assert().success();
    cowherd(&root)
        .args(["template", "remove", "tiny-role"])
        .assert()
        .success();
    assert!(!root.join("templates/tiny-role/1").exists());
    let list = run_json(cowherd(&root).args(["template", "list", "--json"]));
    let role_row = list
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["name"] == "tiny-role")
        .unwrap();
    assert_eq!(role_row["versions"], serde_json::json!([]));
}

#[test]
fn bad_templates_and_names_are_one_line_errors() {
    assert_root();
    let s = Scratch::new("build-errors");
    let root = init_root(s.path());
    let out = cowherd(&root)
        .args(["build", "x", "--template", "no-such-template"])
        .output()
        .unwrap();
    let err = assert_one_line_error(&out, 1);
    assert!(err.contains("no-such-template"), "{err}");

    let out = cowherd(&root)
        .args(["build", "x", "--template", "debian-bookworm-minbase"])
        .output()
        .unwrap();
    let err = assert_one_line_error(&out, 1);
    assert!(
        err.contains("cowherd template build debian-bookworm-minbase"),
        "{err}"
    );

    let file = define(
        &root,
        "broken",
        "method = \"mmdebstrap\"\nsuite = \"bookworm\"\npacakges = []\n",
    );
    let out = cowherd(&root).args(["template", "list"]).output().unwrap();
    let err = assert_one_line_error(&out, 1);
    assert!(
        err.contains("broken.toml:3") && err.contains("pacakges"),
        "file, line and key: {err}"
    );
    let out = cowherd(&root)
        .args(["template", "check"])
        .arg(&file)
        .output()
        .unwrap();
    let err = assert_one_line_error(&out, 1);
    assert!(err.contains("broken.toml:3"), "{err}");
    // Regression (review): a mirror or a package that a bootstrapper or the shell would read
    // as an option or a command is refused before anything runs.
    for (text, key) in [
        (
            "suite = \"bookworm\"\nmirror = \"--hook-dir=/tmp\"\n",
            "mirror",
        ),
        (
            "suite = \"bookworm\"\npackages = [\"nginx;touch /pwned\"]\n",
            "packages",
        ),
        ("suite = \"bookworm\"\npackages = [\"$(id)\"]\n", "packages"),
    ] {
        fs::write(&file, text).unwrap();
        let out = cowherd(&root)
            .args(["template", "check"])
            .arg(&file)
            .output()
            .unwrap();
        let err = assert_one_line_error(&out, 1);
        assert!(err.contains("broken.toml:2") && err.contains(key), "{err}");
    }
    fs::remove_file(&file).unwrap();

    let archive = tarball(&s, 3);
    define(
        &root,
        "tiny",
        &format!("method = \"tarball\"\nsource = \"{}\"\n", archive.display()),
    );
    let good = root.join("templates.d/tiny.toml");
    cowherd(&root)
        .args(["template", "check"])
        .arg(&good)
        .assert()
        .success();
    build_template(&root, "tiny");
    cowherd(&root)
        .args(["build", "t1", "--template", "tiny"])
        .assert()
        .success();
    let out = cowherd(&root)
        .args(["build", "t1", "--template", "tiny"])
        .output()
        .unwrap();
    let err = assert_one_line_error(&out, 1);
    assert!(err.contains("exists"), "{err}");
    let out = cowherd(&root)
        .args([
            "build",
            "t2",
            "--template",
            "tiny",
            "--hostname",
            "bad_host",
        ])
        .output()
        .unwrap();
    assert_one_line_error(&out, 1);
    assert!(!root.join("guests/t2").exists());
}

/// SIGKILLs `child` at a random instant within `whole` unless it has exited by then; waits
/// for it. Whether the kill landed while it ran.
fn kill_within(mut child: std::process::Child, rng: &mut ChaCha8Rng, whole: Duration) -> bool {
    std::thread::sleep(Duration::from_micros(
        rng.random_range(0..whole.as_micros() as u64),
    ));
    let running = child.try_wait().unwrap().is_none();
    if running {
        kill(Pid::from_raw(child.id() as i32), Signal::SIGKILL).unwrap();
    }
    child.wait().unwrap();
    running
}

/// The seed (from `seed_var`), its generator, and a fresh root (in scratch `label`) with a
/// template `tiny` of a 1,500-file tarball: the setup of the kill loops.
fn tiny_tarball_root(seed_var: &str, label: &str) -> (u64, ChaCha8Rng, Scratch, PathBuf) {
    let seed = seed(seed_var);
    let rng = ChaCha8Rng::seed_from_u64(seed);
    let s = Scratch::new(label);
    let root = init_root(s.path());
    let archive = tarball(&s, 1_500);
    define(
        &root,
        "tiny",
        &format!("method = \"tarball\"\nsource = \"{}\"\n", archive.display()),
    );
    (seed, rng, s, root)
}

/// The template trees the index holds rows of (`@template/NAME/VERSION`).
fn indexed_templates(root: &Path) -> Vec<String> {
    let db = rusqlite::Connection::open(root.join("index.db")).unwrap();
    let mut stmt = db
        .prepare("SELECT name FROM guests WHERE name LIKE '@template/%' ORDER BY name")
        .unwrap();
    stmt.query_map([], |r| r.get(0))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap()
}

/// What `templates/NAME/` holds: its versions (numbers) and whether anything else is left.
fn versions_and_leftovers(root: &Path, name: &str) -> (Vec<u32>, Vec<String>) {
    let mut versions = Vec::new();
    let mut left = Vec::new();
    for e in fs::read_dir(root.join("templates").join(name)).unwrap() {
        let entry = e.unwrap().file_name().to_string_lossy().into_owned();
        match entry.parse() {
            Ok(v) => versions.push(v),
            Err(_) => left.push(entry),
        }
    }
    versions.sort();
    (versions, left)
}

#[test]
fn a_killed_template_build_or_removal_leaves_whole_unified_versions_or_none() {
    assert_root();
    let (seed, mut rng, _scratch, root) =
        tiny_tarball_root("COWHERD_TEMPLATE_KILL_SEED", "template-kill");
    let t = Instant::now();
    build_template(&root, "tiny");
    let first_build = t.elapsed();
    // The shorter of two uninterrupted builds (the other tests load the machine unevenly).
    let t = Instant::now();
    cowherd(&root)
        .args(["template", "rebuild", "tiny"])
        .assert()
        .success();
    let whole = t.elapsed().min(first_build);
    let first = manifest(&root.join("templates/tiny/1/tree"));
    // A version is whole (the tarball's content) and unified (its shareable files are store
    // links).
    let whole_and_unified = |v: u32| {
        let tree = root.join(format!("templates/tiny/{v}/tree"));
        let m = manifest(&tree);
        let same = |m: &Manifest| -> Vec<_> {
            m.iter()
                .filter(|(k, _)| !k.is_empty())
                .map(|(k, e)| (k.clone(), e.blake3, e.mode))
                .collect()
        };
        assert!(
            same(&m) == same(&first),
            "version {v} is not whole (seed {seed})"
        );
        // (Identity files such as /etc/hostname stay private by the default policy.)
        for f in files_under(&tree.join("usr")) {
            assert!(
                fs::symlink_metadata(&f).unwrap().nlink() >= 2,
                "{} of version {v} is not in the store (seed {seed})",
                f.display()
            );
        }
        assert!(
            root.join(format!("templates/tiny/{v}/template.toml"))
                .exists()
        );
    };
    let mut landed = 0;
    for _ in 0..10 {
        let child = Command::new(cowherd_bin())
            .arg("--root")
            .arg(&root)
            .args(["template", "rebuild", "tiny"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        landed += usize::from(kill_within(child, &mut rng, whole));
        // The next writer removes what the killed one left, rows included.
        cowherd(&root).args(["gc", "--dry-run"]).assert().success();
        let (versions, left) = versions_and_leftovers(&root, "tiny");
        assert_eq!(left, Vec::<String>::new(), "leftovers (seed {seed})");
        for &v in &versions {
            whole_and_unified(v);
        }
        let expected: Vec<String> = versions
            .iter()
            .map(|v| format!("@template/tiny/{v}"))
            .collect();
        assert_eq!(indexed_templates(&root), expected, "seed {seed}");
    }
    eprintln!("{landed} kills landed (seed {seed})");
    assert!(landed >= 4, "only {landed} kills landed while building");

    // A removal killed after its first step (the version renamed out of the versions) is
    // finished by the next writer, rows and all.
    let (versions, _) = versions_and_leftovers(&root, "tiny");
    let doomed = *versions.last().unwrap();
    fs::rename(
        root.join(format!("templates/tiny/{doomed}")),
        root.join(format!("templates/tiny/.removing.{doomed}")),
    )
    .unwrap();
    let list = run_json(cowherd(&root).args(["template", "list", "--json"]));
    let row = list
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["name"] == "tiny")
        .unwrap()
        .clone();
    assert!(
        !row["versions"]
            .as_array()
            .unwrap()
            .contains(&serde_json::json!(doomed)),
        "{row}"
    );
    cowherd(&root).args(["gc"]).assert().success();
    let (after, left) = versions_and_leftovers(&root, "tiny");
    assert_eq!(left, Vec::<String>::new());
    assert_eq!(after, versions[..versions.len() - 1]);
    assert!(
        !indexed_templates(&root).contains(&format!("@template/tiny/{doomed}")),
        "rows of a removed version stayed"
    );

    // What a killed bootstrapper left mounted in its tree (its /proc) is detached by the next
    // writer, and the staging directory removed.
    let proc = root.join("templates/tiny/.building/tree/proc");
    let leaked = TmpfsMount::new(&proc);
    fs::write(proc.join("self"), b"x").unwrap();
    cowherd(&root).args(["gc", "--dry-run"]).assert().success();
    assert!(!root.join("templates/tiny/.building").exists());
    assert!(
        !fs::read_to_string("/proc/self/mountinfo")
            .unwrap()
            .contains(proc.to_str().unwrap()),
        "the leaked mount stayed"
    );
    std::mem::forget(leaked);
}
