//! The `cowherd` command line: init, adopt, list, stats, gc, help texts, errors and exit codes.

mod common;

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use common::*;

/// A small tree with some duplicable /usr files and a private /etc file.
fn small_guest(dir: &Path, variant: u32) {
    let mut t = TreeBuilder::new(dir);
    t.file("usr/bin/a", &content("small-a", 8192))
        .file("usr/bin/b", &content("small-b", 12_000))
        .file("usr/lib/c", &content("small-c", 20_000))
        .file("etc/hostname", format!("small-{variant}\n").as_bytes())
        .file(
            format!("usr/local/unique-{variant}"),
            &content(&format!("small-unique-{variant}"), 5000),
        )
        .symlink("usr/bin/sh", "a");
    t.finish();
}

fn help_of(cmd: &[&str]) -> String {
    let out = cowherd_no_root()
        .args(cmd)
        .arg("--help")
        .output()
        .expect("run cowherd");
    assert!(
        out.status.success(),
        "`cowherd {} --help` failed: {}",
        cmd.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).to_string()
}

#[test]
fn init_creates_the_layout_and_is_idempotent() {
    assert_root();
    let s = Scratch::new("init");
    let root = init_root(s.path());
    for f in ["index.db", "policy.toml"] {
        assert!(root.join(f).is_file(), "{f} missing after init");
    }
    for d in ["store/objects", "store/tmp", "guests", "templates"] {
        assert!(root.join(d).is_dir(), "{d}/ missing after init");
    }
    let policy = fs::read_to_string(root.join("policy.toml")).unwrap();
    assert!(
        policy.contains("rules"),
        "default policy.toml has rules:\n{policy}"
    );

    // Idempotent, and the policy is the user's to edit: a second init keeps the edit.
    let edited = format!("{policy}\n# edited by the admin\n");
    fs::write(root.join("policy.toml"), &edited).unwrap();
    let store_ino = fs::metadata(root.join("store/objects")).unwrap().ino();
    cowherd(&root).arg("init").assert().success();
    assert_eq!(
        fs::read_to_string(root.join("policy.toml")).unwrap(),
        edited
    );
    assert_eq!(
        fs::metadata(root.join("store/objects")).unwrap().ino(),
        store_ino
    );
    cowherd(&root).args(["list", "--json"]).assert().success();
}

#[test]
fn help_of_every_command_mentions_its_options() {
    let top = help_of(&[]);
    for word in [
        "init", "adopt", "list", "unify", "stats", "verify", "gc", "demo", "mount", "umount",
        "unit", "exec", "fold", "split", "export", "destroy", "--root", "--quiet",
    ] {
        assert!(top.contains(word), "`cowherd --help` lacks {word}:\n{top}");
    }
    let expect: &[(&str, &[&str])] = &[
        ("init", &[]),
        ("adopt", &["--name", "--in-place"]),
        ("list", &["--json"]),
        (
            "unify",
            &[
                "--all",
                "--dry-run",
                "--ignore-mtime",
                "--min-size",
                "--max-links",
                "--json",
                "-v",
            ],
        ),
        ("stats", &["--json", "--top", "--memory"]),
        ("mount", &["--all", "--fold", "--json", "index=off"]),
        ("umount", &["--all", "--json"]),
        ("unit", &["--fold"]),
        ("exec", &["COMMAND", "125"]),
        ("fold", &["--all", "--dry-run", "--json", "--verbose"]),
        ("split", &["--json"]),
        ("export", &["--tar", "--json"]),
        ("destroy", &["--json"]),
        ("verify", &["--json"]),
        ("gc", &["--dry-run", "--json"]),
        ("demo", &["--keep", "--guests"]),
    ];
    for (cmd, options) in expect {
        let help = help_of(&[cmd]);
        for o in *options {
            assert!(
                help.contains(o),
                "`cowherd {cmd} --help` lacks {o}:\n{help}"
            );
        }
    }
}

#[test]
fn unify_help_says_which_mtime_the_shared_inode_keeps_with_ignore_mtime() {
    let help = help_of(&["unify"]);
    let start = help
        .find("--ignore-mtime")
        .unwrap_or_else(|| panic!("no --ignore-mtime in:\n{help}"));
    // The option's paragraph: up to the next line that starts another option.
    let mut para = String::new();
    for (i, line) in help[start..].lines().enumerate() {
        if i > 0 && line.trim_start().starts_with('-') {
            break;
        }
        para.push_str(line);
        para.push(' ');
    }
    let para = para.to_lowercase();
    assert!(
        para.contains("mtime") && para.contains("first"),
        "--ignore-mtime help must say the shared inode keeps the mtime of the first file \
         stored under the key; got: {para}"
    );
}

#[test]
fn adopt_moves_the_tree_by_rename_and_records_it() {
    assert_root();
    let s = Scratch::new("adopt");
    let root = init_root(s.path());
    let src = s.join("src/g1");
    small_guest(&src, 1);
    let before = manifest(&src);
    let src_ino = ino(&src);

    adopt(&root, &src, "g1");

    assert!(
        fs::symlink_metadata(&src).is_err(),
        "source path still exists"
    );
    let b = base(&root, "g1");
    assert_eq!(ino(&b), src_ino, "adopt must rename, not copy");
    assert_same_files(&before, &manifest(&b));
    assert!(root.join("guests/g1/guest.toml").is_file());

    let names = guest_names(&run_json(cowherd(&root).args(["list", "--json"])));
    assert!(names.contains("g1"), "list --json lacks g1: {names:?}");
}

#[test]
fn adopt_refuses_a_symlink_path() {
    assert_root();
    let s = Scratch::new("adopt-symlink");
    let root = init_root(s.path());
    let real = s.join("src/real");
    small_guest(&real, 1);
    let before = manifest(&real);
    let link = s.join("src/link");
    std::os::unix::fs::symlink(&real, &link).unwrap();

    let out = cowherd(&root)
        .arg("adopt")
        .arg(&link)
        .args(["--name", "x"])
        .output()
        .unwrap();
    assert_one_line_error(&out, 1);
    assert!(
        fs::symlink_metadata(&link)
            .unwrap()
            .file_type()
            .is_symlink()
    );
    assert_same_content_and_metadata(&before, &manifest(&real));
    assert!(!root.join("guests/x").exists(), "guests/x was created");
}

#[test]
fn adopt_refuses_a_name_already_used() {
    assert_root();
    let s = Scratch::new("adopt-dup");
    let root = init_root(s.path());
    let first = s.join("src/first");
    small_guest(&first, 1);
    adopt(&root, &first, "g1");
    let b = base(&root, "g1");
    let base_before = (manifest(&b), inode_map(&b));

    let second = s.join("src/second");
    small_guest(&second, 2);
    let second_before = (manifest(&second), inode_map(&second));
    let out = cowherd(&root)
        .arg("adopt")
        .arg(&second)
        .args(["--name", "g1"])
        .output()
        .unwrap();
    assert_one_line_error(&out, 1);
    assert_eq!((manifest(&second), inode_map(&second)), second_before);
    assert_eq!((manifest(&b), inode_map(&b)), base_before);
}

#[test]
fn adopt_refuses_bad_names() {
    assert_root();
    let s = Scratch::new("adopt-badname");
    let root = init_root(s.path());
    let src = s.join("src/g");
    small_guest(&src, 1);
    let before = (manifest(&src), inode_map(&src));
    for name in ["../x", "a/b", "", ".", "..", "/abs"] {
        let out = cowherd(&root)
            .arg("adopt")
            .arg(&src)
            .arg("--name")
            .arg(name)
            .output()
            .unwrap();
        let code = out.status.code();
        assert!(
            code == Some(1) || code == Some(2),
            "adopt --name {name:?} must fail with 1 (or 2 for a usage error), got {:?}; stderr: {}",
            code,
            String::from_utf8_lossy(&out.stderr)
        );
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.trim_start().starts_with("error:"),
            "stderr: {stderr}"
        );
        assert_eq!((manifest(&src), inode_map(&src)), before, "name {name:?}");
    }
    assert!(!root.join("x").exists() && !s.join("x").exists());
    let left: Vec<_> = fs::read_dir(root.join("guests"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert!(left.is_empty(), "guests/ is not empty: {left:?}");
}

#[test]
fn adopt_refuses_a_path_on_another_filesystem() {
    assert_root();
    let s = Scratch::new("adopt-otherfs");
    let root = init_root(s.path());
    let mnt = TmpfsMount::new(&s.join("mnt"));
    let src = mnt.path().join("g");
    small_guest(&src, 1);
    let before = (manifest(&src), inode_map(&src));

    let out = cowherd(&root)
        .arg("adopt")
        .arg(&src)
        .args(["--name", "g"])
        .output()
        .unwrap();
    let line = assert_one_line_error(&out, 1);
    assert!(
        line.contains(&src.display().to_string()) && line.contains("filesystem"),
        "error must name the path and say \"filesystem\": {line}"
    );
    assert_eq!((manifest(&src), inode_map(&src)), before);
    assert!(!root.join("guests/g").exists(), "guests/g was created");
}

#[test]
fn list_and_stats_report_adopted_guests_and_savings() {
    assert_root();
    let s = Scratch::new("stats");
    let root = init_root(s.path());
    for (i, name) in ["alpha", "beta"].iter().enumerate() {
        adopt_built(&root, s.path(), name, |d| small_guest(d, i as u32));
    }
    let names = guest_names(&run_json(cowherd(&root).args(["list", "--json"])));
    assert!(
        names.contains("alpha") && names.contains("beta"),
        "list --json: {names:?}"
    );

    cowherd(&root).args(["unify", "--all"]).assert().success();
    let stats = run_json(cowherd(&root).args(["stats", "--json"]));
    let per_guest = stats_per_guest(&stats);
    let mut sum_logical = 0;
    for name in ["alpha", "beta"] {
        let g = per_guest
            .get(name)
            .unwrap_or_else(|| panic!("stats --json lacks guest {name}: {stats}"));
        let (logical, _physical, _saved) = logical_physical_saved(g);
        assert!(logical > 40_000, "{name}: logical bytes {logical}");
        sum_logical += logical;
    }
    let (logical, physical, saved) = logical_physical_saved(&stats_total(&stats));
    assert_eq!(logical, sum_logical, "total logical = sum of guests");
    assert_eq!(saved, logical - physical, "saved = logical - physical");
    // a, b, c (8192 + 12000 + 20000 bytes) are shared by the two guests.
    assert!(
        saved >= 40_192,
        "saved {saved} < the bytes of one copy of the shared files"
    );
}

#[test]
fn gc_dry_run_lists_orphans_and_gc_removes_them() {
    assert_root();
    let s = Scratch::new("gc");
    let root = init_root(s.path());
    adopt_built(&root, s.path(), "a", |d| small_guest(d, 1));
    adopt_built(&root, s.path(), "b", |d| small_guest(d, 2));
    // c shares a, b, c with the others and has a duplicate pair nobody else has.
    adopt_built(&root, s.path(), "c", |d| {
        small_guest(d, 3);
        TreeBuilder::new(d)
            .file("usr/share/c-only-1", &content("c-only", 30_000))
            .file("usr/share/c-only-2", &content("c-only", 30_000));
    });
    cowherd(&root).args(["unify", "--all"]).assert().success();
    let keep_a = manifest(&base(&root, "a"));

    // Remove guest c's files.
    let cb = base(&root, "c");
    for e in fs::read_dir(&cb).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() && !p.is_symlink() {
            fs::remove_dir_all(&p).unwrap();
        } else {
            fs::remove_file(&p).unwrap();
        }
    }
    let objects: Vec<StoreObject> = store_objects(&root);
    let orphans: Vec<&StoreObject> = objects.iter().filter(|o| o.nlink == 1).collect();
    let live: Vec<&StoreObject> = objects.iter().filter(|o| o.nlink > 1).collect();
    assert!(
        !orphans.is_empty(),
        "expected c's duplicate pair to leave an orphan object: {objects:?}"
    );
    assert!(!live.is_empty(), "a and b still share objects");

    let out = cowherd(&root)
        .args(["gc", "--dry-run", "--json"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    json_of(&out);
    for o in &orphans {
        assert!(
            text.contains(&o.key),
            "gc --dry-run --json does not list orphan {}:\n{text}",
            o.path.display()
        );
    }
    for o in &live {
        assert!(
            !text.contains(&o.key),
            "gc --dry-run lists live object {}",
            o.path.display()
        );
    }
    let after_dry: Vec<_> = store_objects(&root).into_iter().map(|o| o.path).collect();
    let all: Vec<_> = objects.iter().map(|o| o.path.clone()).collect();
    assert_eq!(after_dry, all, "gc --dry-run removed something");

    run_json(cowherd(&root).args(["gc", "--json"]));
    for o in &orphans {
        assert!(!o.path.exists(), "gc left orphan {}", o.path.display());
    }
    for o in &live {
        assert!(o.path.exists(), "gc removed live {}", o.path.display());
    }
    assert_same_files(&keep_a, &manifest(&base(&root, "a")));
}

#[test]
fn unify_of_an_unknown_guest_is_a_one_line_error() {
    assert_root();
    let s = Scratch::new("unknown");
    let root = init_root(s.path());
    let out = cowherd(&root)
        .args(["unify", "no-such-guest"])
        .output()
        .unwrap();
    let line = assert_one_line_error(&out, 1);
    assert!(line.contains("no-such-guest"), "{line}");
}

#[test]
fn a_root_without_init_says_to_run_cowherd_init() {
    let s = Scratch::new("noinit");
    let root = s.join("never-initialised");
    for args in [&["list"][..], &["unify", "--all"], &["stats"], &["gc"]] {
        let out = cowherd(&root).args(args).output().unwrap();
        let line = assert_one_line_error(&out, 1);
        let says_init = line
            .find("cowherd")
            .is_some_and(|i| line[i..].contains(" init"));
        assert!(
            says_init,
            "`cowherd {}` on an uninitialised root must tell to run `cowherd init`: {line}",
            args.join(" ")
        );
        assert!(!root.exists(), "`{}` created the root", args.join(" "));
    }
}

#[test]
fn a_bad_option_is_a_usage_error() {
    let s = Scratch::new("usage");
    let out = cowherd(&s.join("root"))
        .args(["unify", "--no-such-option"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{out:?}");
}

/// Runs `argv` as the unprivileged user `nobody` (util-linux `setpriv`); returns whether it
/// succeeded.
fn as_nobody(argv: &[&str]) -> bool {
    std::process::Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
        .args(argv)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .expect("setpriv (util-linux) runs")
        .success()
}

fn mode_of(p: &Path) -> u32 {
    fs::symlink_metadata(p).unwrap().mode() & 0o7777
}

#[test]
fn the_root_store_and_index_are_reachable_by_root_only() {
    assert_root();
    let s = Scratch::new("perms");
    fs::set_permissions(
        s.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let root = init_root(s.path());
    adopt_built(&root, s.path(), "g", |d| small_guest(d, 1));
    cowherd(&root).args(["unify", "g"]).assert().success();
    assert_eq!(mode_of(&root), 0o700, "the root");
    for dir in ["store", "guests", "templates"] {
        assert_eq!(mode_of(&root.join(dir)), 0o700, "{dir}/");
    }
    for file in ["index.db", "index.db-wal", "lock"] {
        if root.join(file).exists() {
            assert_eq!(mode_of(&root.join(file)), 0o600, "{file}");
        }
    }
    // The check is real: `nobody` reaches the directory above the root, and nothing below it.
    let shown = |p: &Path| p.to_str().unwrap().to_string();
    assert!(as_nobody(&["ls", &shown(s.path())]));
    assert!(!as_nobody(&["ls", &shown(&root)]), "nobody listed the root");
    for p in [
        root.join("index.db"),
        root.join("store/objects"),
        base(&root, "g").join("usr/bin/a"),
    ] {
        assert!(!as_nobody(&["stat", &shown(&p)]), "nobody reached {p:?}");
    }
}

#[test]
fn a_writing_command_tightens_an_old_open_root() {
    assert_root();
    let s = Scratch::new("perms-old");
    let root = init_root(s.path());
    adopt_built(&root, s.path(), "g", |d| small_guest(d, 1));
    // A root made by an older cowherd: everything world-readable.
    for (p, mode) in [
        (root.clone(), 0o755),
        (root.join("store"), 0o755),
        (root.join("guests"), 0o755),
        (root.join("index.db"), 0o644),
    ] {
        fs::set_permissions(&p, std::os::unix::fs::PermissionsExt::from_mode(mode)).unwrap();
    }
    cowherd(&root).arg("list").assert().success();
    assert_eq!(mode_of(&root), 0o755, "a reading command changes nothing");
    cowherd(&root).args(["unify", "g"]).assert().success();
    assert_eq!(mode_of(&root), 0o700);
    assert_eq!(mode_of(&root.join("store")), 0o700);
    assert_eq!(mode_of(&root.join("guests")), 0o700);
    assert_eq!(mode_of(&root.join("index.db")), 0o600);
}

#[test]
fn demo_runs_end_to_end_and_leaves_no_mount_behind() {
    assert_root();
    let s = Scratch::new("demo");
    let dir = s.join("demo");
    let out = cowherd_no_root()
        .args(["demo", "--guests", "3", "--keep"])
        .arg(&dir)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("kept their bytes"), "{stdout}");
    assert!(stdout.contains("upper layer empty again"), "{stdout}");
    let mounts = fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(
        !mounts.contains(dir.to_str().unwrap()),
        "the demo left a mount behind"
    );
}

/// Regression: the example path of a top object came from one guest and its name from another
/// (two independent MIN()s).
#[test]
fn the_example_of_a_top_object_is_a_path_of_that_guest() {
    assert_root();
    let s = Scratch::new("stats-example");
    let root = init_root(s.path());
    for (name, dir) in [("alpha", "usr/zz"), ("beta", "usr/aa")] {
        adopt_built(&root, s.path(), name, |d| {
            let mut t = TreeBuilder::new(d);
            t.file(format!("{dir}/shared"), &content("shared", 50_000));
            t.finish();
        });
    }
    cowherd(&root).args(["unify", "--all"]).assert().success();
    let stats = run_json(cowherd(&root).args(["stats", "--json", "--top", "1"]));
    assert_eq!(
        stats["top"][0]["example"], "alpha:/usr/zz/shared",
        "{stats}"
    );
}
