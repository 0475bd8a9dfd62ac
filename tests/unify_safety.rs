//! `unify` never loses or corrupts data: files changed behind its back, guests on another
//! filesystem, symlinked guest directories, symlinks to the host, size limits, store/tmp.

mod common;

use std::collections::{BTreeMap, HashSet};
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use common::*;

fn dup_guest(dir: &Path) {
    let mut t = TreeBuilder::new(dir);
    t.file_with(
        "usr/bin/x",
        &content("safety-x", 64 * 1024),
        0o755,
        0,
        0,
        DEFAULT_MTIME,
    )
    .file("usr/lib/y", &content("safety-y", 20_000))
    .file("etc/hostname", b"dup\n");
    t.finish();
}

fn exit_code(out: &std::process::Output) -> Option<i32> {
    out.status.code()
}

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).to_string()
}

#[test]
fn a_file_modified_between_hashing_and_linking_is_not_replaced() {
    assert_root();
    let s = Scratch::new("modified");
    let root = init_root(s.path());
    for g in ["g1", "g2", "g3"] {
        adopt_built(&root, s.path(), g, dup_guest);
    }
    // Hash everything and fill the index.
    cowherd(&root)
        .args(["unify", "--all", "--dry-run"])
        .assert()
        .success();

    // Same size, new bytes, mtime put back: only ctime tells.
    let x1 = base(&root, "g1").join("usr/bin/x");
    let new = content("safety-x-changed", 64 * 1024);
    let mtime = mtime_of(&x1);
    overwrite_keep_mtime(&x1, &new);
    assert_eq!(mtime_of(&x1), mtime);

    let out = cowherd(&root).args(["unify", "--all"]).output().unwrap();
    assert!(
        matches!(exit_code(&out), Some(0) | Some(3)),
        "unify: {:?} {}",
        out.status,
        stderr(&out)
    );
    assert_eq!(
        fs::read(&x1).unwrap(),
        new,
        "the changed file lost its new bytes"
    );
    let x2 = base(&root, "g2").join("usr/bin/x");
    let x3 = base(&root, "g3").join("usr/bin/x");
    assert_eq!(
        ino(&x2),
        ino(&x3),
        "the unchanged copies must still be linked"
    );
    assert_eq!(fs::read(&x2).unwrap(), content("safety-x", 64 * 1024));
    assert_ne!(
        ino(&x1),
        ino(&x2),
        "the changed file was linked to the old object"
    );
    assert!(
        !store_inodes(&root).contains_key(&ino(&x1)),
        "the changed file is a store object"
    );
}

#[test]
fn a_guest_base_on_another_filesystem_is_refused() {
    assert_root();
    let s = Scratch::new("base-otherfs");
    let root = init_root(s.path());
    adopt_built(&root, s.path(), "g1", dup_guest);
    adopt_built(&root, s.path(), "g2", dup_guest);
    let b = base(&root, "g2");
    let mnt = TmpfsMount::new(&b);
    dup_guest(mnt.path());
    let before = (manifest(&b), inode_map(&b));

    let out = cowherd(&root).args(["unify", "g2"]).output().unwrap();
    assert_ne!(
        exit_code(&out),
        Some(0),
        "unify of a guest on tmpfs succeeded"
    );
    let err = stderr(&out);
    assert!(
        err.lines()
            .any(|l| l.contains("guests/g2/base") && l.contains("filesystem")),
        "the error must name the path and say \"filesystem\":\n{err}"
    );
    assert_eq!(
        (manifest(&b), inode_map(&b)),
        before,
        "the tmpfs tree changed"
    );
}

#[test]
fn a_symlinked_guest_directory_is_not_followed() {
    assert_root();
    let s = Scratch::new("symlinked-guest");
    let root = init_root(s.path());
    adopt_built(&root, s.path(), "g1", dup_guest);
    adopt_built(&root, s.path(), "g2", dup_guest);
    adopt_built(&root, s.path(), "g3", dup_guest);

    // g2's base replaced by a symlink to a tree outside the root.
    let outside = s.join("outside");
    dup_guest(&outside);
    let b2 = base(&root, "g2");
    fs::remove_dir_all(&b2).unwrap();
    std::os::unix::fs::symlink(&outside, &b2).unwrap();
    // g3's whole guest directory moved outside and replaced by a symlink.
    let outside_guest = s.join("outside-guest");
    let g3 = root.join("guests/g3");
    fs::rename(&g3, &outside_guest).unwrap();
    std::os::unix::fs::symlink(&outside_guest, &g3).unwrap();

    let watched: [PathBuf; 2] = [outside.clone(), outside_guest.clone()];
    let snapshot =
        |dirs: &[PathBuf]| -> Vec<_> { dirs.iter().map(|d| (manifest(d), inode_map(d))).collect() };
    let before = snapshot(&watched);

    let cases: [(&[&str], &[&str]); 3] = [
        (&["unify", "--all"], &["guests/g2", "guests/g3"]),
        (&["unify", "g2"], &["guests/g2"]),
        (&["unify", "g3"], &["guests/g3"]),
    ];
    for (args, named) in cases {
        let out = cowherd(&root).args(args).output().unwrap();
        assert_ne!(
            exit_code(&out),
            Some(0),
            "`{}` with a symlinked guest must report an error",
            args.join(" ")
        );
        let err = stderr(&out);
        for n in named {
            assert!(
                err.contains(n),
                "`{}`: stderr does not name {n}:\n{err}",
                args.join(" ")
            );
        }
        assert_eq!(
            snapshot(&watched),
            before,
            "`{}` modified a tree outside the root",
            args.join(" ")
        );
    }
}

#[test]
fn symlinks_to_the_host_are_never_followed() {
    assert_root();
    let s = Scratch::new("host-symlinks");
    let root = init_root(s.path());

    // A host-like tree outside the root, with files equal to the guests' files.
    let hostlike = s.join("hostlike");
    dup_guest(&hostlike);

    // Copies of two real host binaries with their metadata, so that following a link to the
    // real /usr/bin would find perfect duplicates.
    let host_bin = Path::new("/usr/bin");
    let host_files = ["true", "false"];
    let copy_host = |dir: &Path| {
        let mut t = TreeBuilder::new(dir);
        for f in host_files {
            let src = host_bin.join(f);
            let m = fs::metadata(&src).unwrap();
            let rel = format!("usr/bin/{f}");
            t.file_with(
                &rel,
                &fs::read(&src).unwrap(),
                m.mode() & 0o7777,
                m.uid(),
                m.gid(),
                (m.mtime(), m.mtime_nsec()),
            );
            for name in xattr::list(&src).unwrap() {
                if let Some(v) = xattr::get(&src, &name).unwrap() {
                    t.xattr(&rel, name.as_encoded_bytes(), &v);
                }
            }
        }
        t.symlink("usr/lib/evil-bin", "/usr/bin")
            .symlink("usr/lib/evil-lib", "/usr/lib")
            .symlink("usr/bin/evil-true", "/usr/bin/true")
            .symlink("usr/lib/outside", hostlike.as_os_str().as_encoded_bytes())
            .symlink(
                "usr/lib/outside-file",
                hostlike.join("usr/bin/x").as_os_str().as_encoded_bytes(),
            );
        drop(t);
        dup_guest(dir);
    };
    adopt_built(&root, s.path(), "g1", copy_host);
    adopt_built(&root, s.path(), "g2", copy_host);

    let host_bin_inodes = |names: &[&str]| -> BTreeMap<String, (u64, u64, u64)> {
        names
            .iter()
            .map(|n| {
                let m = fs::symlink_metadata(host_bin.join(n)).unwrap();
                (n.to_string(), (m.dev(), m.ino(), m.nlink()))
            })
            .collect()
    };
    let host_before = host_bin_inodes(&host_files);
    let hostlike_before = (manifest(&hostlike), inode_map(&hostlike));

    cowherd(&root).args(["unify", "--all"]).assert().success();

    assert_eq!(
        host_bin_inodes(&host_files),
        host_before,
        "host files touched"
    );
    assert_eq!(
        (manifest(&hostlike), inode_map(&hostlike)),
        hostlike_before,
        "a tree reached through a guest symlink was modified"
    );
    // The guests' own copies are fine to share.
    assert_eq!(
        ino(&base(&root, "g1").join("usr/bin/true")),
        ino(&base(&root, "g2").join("usr/bin/true"))
    );
    assert!(
        fs::symlink_metadata(base(&root, "g1").join("usr/lib/evil-bin"))
            .unwrap()
            .file_type()
            .is_symlink()
    );
}

fn sizes_guest(dir: &Path) {
    let mut t = TreeBuilder::new(dir);
    t.file("usr/share/empty-1", b"")
        .file("usr/share/empty-2", b"")
        .file("usr/share/s100", &content("s100", 100))
        .file("usr/share/s4095", &content("s4095", 4095))
        .file("usr/share/s4096", &content("s4096", 4096))
        .file("usr/share/s8192", &content("s8192", 8192));
    t.finish();
}

#[test]
fn empty_files_are_never_linked_and_min_size_is_honoured() {
    assert_root();
    let s = Scratch::new("sizes");
    let root = init_root(s.path());
    adopt_built(&root, s.path(), "g1", sizes_guest);
    adopt_built(&root, s.path(), "g2", sizes_guest);
    let linked = |rel: &str| ino(&base(&root, "g1").join(rel)) == ino(&base(&root, "g2").join(rel));
    let before = (manifest(&base(&root, "g1")), manifest(&base(&root, "g2")));

    cowherd(&root)
        .args(["unify", "--all", "--min-size", "4096"])
        .assert()
        .success();
    for rel in ["usr/share/empty-1", "usr/share/s100", "usr/share/s4095"] {
        assert!(!linked(rel), "{rel} linked despite --min-size 4096");
    }
    for rel in ["usr/share/s4096", "usr/share/s8192"] {
        assert!(linked(rel), "{rel} (>= 4096 bytes) not linked");
    }

    cowherd(&root).args(["unify", "--all"]).assert().success();
    for rel in ["usr/share/s100", "usr/share/s4095"] {
        assert!(linked(rel), "{rel} not linked with the default --min-size");
    }
    let b1 = base(&root, "g1");
    let empties: HashSet<_> = [
        ino(&b1.join("usr/share/empty-1")),
        ino(&b1.join("usr/share/empty-2")),
        ino(&base(&root, "g2").join("usr/share/empty-1")),
        ino(&base(&root, "g2").join("usr/share/empty-2")),
    ]
    .into_iter()
    .collect();
    assert_eq!(empties.len(), 4, "empty files were linked");
    assert_same_files(&before.0, &manifest(&b1));
    assert_same_files(&before.1, &manifest(&base(&root, "g2")));
}

#[test]
fn every_run_empties_store_tmp() {
    assert_root();
    let s = Scratch::new("store-tmp");
    let root = init_root(s.path());
    adopt_built(&root, s.path(), "g1", dup_guest);
    adopt_built(&root, s.path(), "g2", dup_guest);
    // What a run killed while copying an object in would leave behind.
    fs::write(root.join("store/tmp/leftover"), content("leftover", 5000)).unwrap();

    cowherd(&root).args(["unify", "--all"]).assert().success();
    let left: Vec<_> = fs::read_dir(root.join("store/tmp"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert!(left.is_empty(), "store/tmp not emptied: {left:?}");
}

#[test]
fn max_links_splits_an_object_into_numbered_copies() {
    assert_root();
    let s = Scratch::new("max-links");
    let root = init_root(s.path());
    let names = ["g1", "g2", "g3", "g4", "g5"];
    for n in names {
        adopt_built(&root, s.path(), n, dup_guest);
    }
    let before: Vec<Manifest> = names.iter().map(|n| manifest(&base(&root, n))).collect();
    cowherd(&root)
        .args(["unify", "--all", "--max-links", "3"])
        .assert()
        .success();

    let store = store_inodes(&root);
    let x_objects: HashSet<_> = names
        .iter()
        .map(|n| {
            let o = store
                .get(&ino(&base(&root, n).join("usr/bin/x")))
                .unwrap_or_else(|| panic!("{n}/usr/bin/x is not a store link"));
            // Regression: links planned earlier in the same run count against the cap.
            assert!(
                o.nlink <= 3,
                "{o:?} has more links than --max-links 3 allows"
            );
            (o.key.clone(), o.suffix.clone())
        })
        .collect();
    let keys: HashSet<_> = x_objects.iter().map(|(k, _)| k).collect();
    assert_eq!(keys.len(), 1, "one key for one content: {x_objects:?}");
    assert!(
        x_objects.len() >= 2,
        "5 links with --max-links 3 need several numbered objects: {x_objects:?}"
    );
    for (n, m) in names.iter().zip(&before) {
        assert_same_files(m, &manifest(&base(&root, n)));
    }
}

/// Many small duplicate files: a run is mostly link + re-check + rename.
fn many_small(dir: &Path) {
    let mut t = TreeBuilder::new(dir);
    for k in 0..1500 {
        t.file(
            format!("usr/share/many/d{:02}/f{k:04}", k / 100),
            &content(&format!("many-{k}"), 200),
        );
    }
    t.finish();
}

/// Paths under `dir` that are not in `known` (a cheap listing, no hashing).
fn unknown_names(dir: &Path, known: &Manifest) -> Vec<Vec<u8>> {
    walkdir::WalkDir::new(dir)
        .follow_links(false)
        .into_iter()
        .map(|e| e.unwrap())
        .map(|e| {
            e.path()
                .strip_prefix(dir)
                .unwrap()
                .as_os_str()
                .as_encoded_bytes()
                .to_vec()
        })
        .filter(|rel| !known.contains_key(rel))
        .collect()
}

/// Kill `unify` at an instant where it has a temporary name in a guest: stop it (SIGSTOP) at
/// random instants, look, and SIGKILL it while stopped once a guest holds a name that is not one
/// of the guest's own; otherwise let it continue (SIGCONT). The leftovers are genuine.
#[test]
fn temporary_names_left_by_a_killed_run_are_removed_by_the_next_run() {
    use nix::sys::signal::{Signal, kill};
    use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
    use rand::{Rng, SeedableRng};
    use std::time::Duration;

    assert_root();
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64;
    eprintln!("seed {seed}");
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let s = Scratch::new("leftovers");
    let root = init_root(s.path());
    let names = ["g1", "g2"];
    for n in names {
        adopt_built(&root, s.path(), n, many_small);
    }
    let originals: Vec<Manifest> = names.iter().map(|n| manifest(&base(&root, n))).collect();
    let files: Vec<(usize, Vec<u8>)> = originals
        .iter()
        .enumerate()
        .flat_map(|(g, m)| {
            m.iter()
                .filter(|(_, e)| e.kind == Kind::File)
                .map(move |(rel, _)| (g, rel.clone()))
        })
        .collect();

    let mut leftovers: Vec<(usize, Vec<u8>)> = Vec::new();
    let mut before_kill: Vec<Manifest> = Vec::new();
    let mut runs = 0;
    let mut stops = 0;
    while leftovers.is_empty() && runs < 10 {
        runs += 1;
        if runs > 1 {
            // Fresh inodes with the same content and metadata: linking work again.
            for _ in 0..1000 {
                let (g, rel) = &files[rng.random_range(0..files.len())];
                rewrite_as_new_inode(&at(&base(&root, names[*g]), rel));
            }
        }
        before_kill = names.iter().map(|n| manifest(&base(&root, n))).collect();
        // Reaped below with waitpid (WUNTRACED is needed to see it stop).
        #[allow(clippy::zombie_processes)]
        let child = std::process::Command::new(cowherd_bin())
            .env_remove("COWHERD_ROOT")
            .arg("--root")
            .arg(&root)
            .args(["unify", "--all", "-q"])
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let pid = nix::unistd::Pid::from_raw(child.id() as i32);
        loop {
            std::thread::sleep(Duration::from_micros(rng.random_range(0..=5000)));
            kill(pid, Signal::SIGSTOP).unwrap();
            match waitpid(pid, Some(WaitPidFlag::WUNTRACED)).unwrap() {
                WaitStatus::Stopped(..) => stops += 1,
                WaitStatus::Exited(_, code) => {
                    assert_eq!(code, 0, "unify failed");
                    break;
                }
                other => panic!("unify: {other:?}"),
            }
            for (g, n) in names.iter().enumerate() {
                let extra = unknown_names(&base(&root, n), &before_kill[g]);
                leftovers.extend(extra.into_iter().map(|rel| (g, rel)));
            }
            if !leftovers.is_empty() {
                kill(pid, Signal::SIGKILL).unwrap();
                let st = waitpid(pid, None).unwrap();
                assert!(matches!(st, WaitStatus::Signaled(..)), "{st:?}");
                break;
            }
            kill(pid, Signal::SIGCONT).unwrap();
        }
    }
    assert!(
        !leftovers.is_empty(),
        "{runs} runs stopped {stops} times never had a temporary name in a guest: recovery \
         untested"
    );
    eprintln!(
        "{runs} runs, {stops} stops; killed with leftovers {:?}",
        leftovers
            .iter()
            .map(|(g, rel)| format!("{}/{}", names[*g], show(rel)))
            .collect::<Vec<_>>()
    );
    for (g, n) in names.iter().enumerate() {
        let (problems, _) = compare_manifests(
            &before_kill[g],
            &manifest(&base(&root, n)),
            CompareOpts {
                dir_mtimes: false,
                allow_extra: true,
            },
        );
        assert!(problems.is_empty(), "{n}: {}", problems.join("\n"));
    }

    cowherd(&root).args(["unify", "--all"]).assert().success();
    for (g, rel) in &leftovers {
        let p = at(&base(&root, names[*g]), rel);
        assert!(
            fs::symlink_metadata(&p).is_err(),
            "leftover {} not removed by the next run",
            p.display()
        );
    }
    // Everything as before the killed run, directory mtimes included.
    for (g, n) in names.iter().enumerate() {
        assert_same_content_and_metadata(&before_kill[g], &manifest(&base(&root, n)));
        assert_groups_kept(&originals[g], &manifest(&base(&root, n)));
    }
}

#[test]
fn a_mounted_guest_is_refused() {
    assert_root();
    let s = Scratch::new("mounted");
    let root = init_root(s.path());
    adopt_built(&root, s.path(), "g1", dup_guest);
    adopt_built(&root, s.path(), "g2", dup_guest);
    // Anything mounted inside a guest's directory (its overlay at rootfs/, say) means it is in use.
    let _mnt = TmpfsMount::new(&root.join("guests/g2/rootfs"));
    let before = inode_map(&base(&root, "g2"));

    let out = cowherd(&root).args(["unify", "g2"]).output().unwrap();
    let err = assert_one_line_error(&out, 1);
    assert!(
        err.contains("guests/g2/rootfs") && err.contains("unmount"),
        "the error must name the mount and say to unmount it: {err}"
    );
    assert_eq!(
        inode_map(&base(&root, "g2")),
        before,
        "a mounted guest was changed"
    );

    // With --all the mounted guest is listed and skipped, and the others are unified: a host
    // always has running guests, so that is no failure.
    let out = cowherd(&root)
        .args(["unify", "--all", "--json"])
        .output()
        .unwrap();
    assert_eq!(exit_code(&out), Some(0), "{}", stderr(&out));
    let report = json_of(&out);
    assert_eq!(report["skipped_mounted"], serde_json::json!(["g2"]));
    assert_eq!(report["guests"], serde_json::json!(["g1"]));
    assert_eq!(
        inode_map(&base(&root, "g2")),
        before,
        "a mounted guest was changed"
    );
}

#[test]
fn a_store_on_another_filesystem_is_refused_by_every_command() {
    assert_root();
    let s = Scratch::new("store-otherfs");
    let root = init_root(s.path());
    adopt_built(&root, s.path(), "g1", dup_guest);
    let _mnt = TmpfsMount::new(&root.join("store/objects"));
    for args in [
        &["unify", "--all"][..],
        &["list"],
        &["stats"],
        &["verify"],
        &["gc"],
    ] {
        let out = cowherd(&root).args(args).output().unwrap();
        let err = assert_one_line_error(&out, 1);
        assert!(
            err.contains("store/objects") && err.contains("filesystem"),
            "`cowherd {args:?}` must refuse a store on another filesystem: {err}"
        );
    }
}

#[test]
fn verify_reports_an_object_edited_in_place_and_stale_entries_and_repair_fixes_them() {
    assert_root();
    let s = Scratch::new("verify");
    let root = init_root(s.path());
    adopt_built(&root, s.path(), "g1", dup_guest);
    adopt_built(&root, s.path(), "g2", dup_guest);
    fs::write(
        root.join("policy.toml"),
        "rules = [\"immutable /usr/lib/**\"]\n",
    )
    .unwrap();
    cowherd(&root).args(["unify", "--all"]).assert().success();
    cowherd(&root).arg("verify").assert().success();

    // Edit one store object in place (same size, new bytes): every guest linking it changes.
    let objects = store_objects(&root);
    let victim = objects
        .iter()
        .filter(|o| o.nlink > 2 && o.marker == 'c')
        .max_by_key(|o| fs::metadata(&o.path).unwrap().len())
        .expect("a shared object");
    let len = fs::metadata(&victim.path).unwrap().len() as usize;
    overwrite_keep_mtime(&victim.path, &content("tampered", len));
    // A guest file replaced since the last unify (as an editor does) is a stale entry.
    rewrite_as_new_inode(&base(&root, "g1").join("etc/hostname"));

    let out = cowherd(&root).args(["verify", "--json"]).output().unwrap();
    assert_eq!(
        exit_code(&out),
        Some(3),
        "a corrupt object must fail verify"
    );
    let v = json_of(&out);
    let text = v.to_string();
    assert!(
        text.contains(&victim.key),
        "verify must name the corrupt object: {text}"
    );
    assert!(
        text.contains("/etc/hostname"),
        "verify must list the stale entry: {text}"
    );
    // Regression (issue 11): every problem verify reports names a command that repairs it,
    // and that command does.
    for p in v["corrupt"]
        .as_array()
        .unwrap()
        .iter()
        .chain(v["stale"].as_array().unwrap())
    {
        assert!(
            p["problem"].as_str().unwrap().contains("verify --repair"),
            "{p}"
        );
    }
    // More faults: an immutable object without its flag, a stray file in the store.
    let immutable = store_objects(&root)
        .into_iter()
        .find(|o| o.marker == 'i')
        .expect("an immutable object (the policy marks /usr/lib immutable)");
    clear_immutable(&immutable.path);
    fs::write(root.join("store/objects/stray"), b"not mine").unwrap();
    let guests_before = manifest(&root.join("guests"));

    let repaired = run_json(cowherd(&root).args(["verify", "--repair", "--json"]));
    let text = repaired.to_string();
    assert_eq!(repaired["corrupt"], serde_json::json!([]), "{text}");
    assert_eq!(repaired["repaired"].as_array().unwrap().len(), 4, "{text}");
    assert!(is_immutable(&immutable.path), "the flag is set again");
    assert_eq!(
        fs::read(root.join("store/lost+found/stray")).unwrap(),
        b"not mine"
    );
    // The tampered object is filed under the key of what it holds; the guests still see it.
    assert!(!victim.path.exists());
    let refiled = store_inodes(&root)[&victim.dev_ino].clone();
    assert_ne!(refiled.key, victim.key);
    assert_same_content_and_metadata(&guests_before, &manifest(&root.join("guests")));
    // Nothing is left to repair, and the index is fresh again.
    let again = run_json(cowherd(&root).args(["verify", "--json"]));
    assert_eq!(again["corrupt"], serde_json::json!([]), "{again}");
    assert_eq!(again["stale"], serde_json::json!([]), "{again}");
}

/// `stats --json` without what a rebuilt index cannot know: its own size, and when each guest
/// was last unified.
fn comparable_stats(root: &Path) -> serde_json::Value {
    let mut v = run_json(cowherd(root).args(["stats", "--json"]));
    v["total"]
        .as_object_mut()
        .unwrap()
        .remove("index_bytes")
        .expect("stats reports the index size");
    for g in v["guests"].as_array_mut().unwrap() {
        g.as_object_mut().unwrap().remove("last_unify");
    }
    v
}

/// Regression (issue 11): after `index.db` was lost, `init` + `unify` found the guests again
/// but not their links to the store: `stats` showed 0 objects. Now every command says to
/// rebuild it, and the rebuilt index gives the same `stats` and `verify` as before.
#[test]
fn a_lost_or_damaged_index_is_rebuilt_with_the_same_stats_and_verify() {
    assert_root();
    let s = Scratch::new("rebuild");
    let root = init_root(s.path());
    for g in ["g1", "g2", "g3"] {
        adopt_built(&root, s.path(), g, dup_guest);
    }
    fs::write(
        root.join("policy.toml"),
        "rules = [\"immutable /usr/lib/**\"]\n",
    )
    .unwrap();
    cowherd(&root).args(["unify", "--all"]).assert().success();
    let before = comparable_stats(&root);
    assert!(
        before["total"]["objects"].as_u64().unwrap() >= 2,
        "{before}"
    );
    let verified = run_json(cowherd(&root).args(["verify", "--json"]));
    let guests = manifest(&root.join("guests"));

    for f in ["index.db", "index.db-wal", "index.db-shm"] {
        let _ = fs::remove_file(root.join(f));
    }
    for args in [&["stats"][..], &["unify", "--all"], &["init"], &["verify"]] {
        let out = cowherd(&root).args(args).output().unwrap();
        let err = assert_one_line_error(&out, 1);
        assert!(err.contains("index rebuild"), "`cowherd {args:?}`: {err}");
    }
    let out = cowherd(&root).args(["index", "rebuild"]).output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert_eq!(comparable_stats(&root), before);
    assert_eq!(
        run_json(cowherd(&root).args(["verify", "--json"])),
        verified
    );
    assert_same_content_and_metadata(&guests, &manifest(&root.join("guests")));
    let again = run_json(cowherd(&root).args(["unify", "--all", "--json"]));
    assert_eq!(linked_files(&again), 0, "{again}");
    assert_eq!(hashed_files(&again), 0, "{again}");

    // A damaged index is kept aside, and rebuilt the same way.
    fs::write(root.join("index.db"), b"this is not a database").unwrap();
    let rebuilt = run_json(cowherd(&root).args(["index", "rebuild", "--json"]));
    let kept = rebuilt["rebuild"]["damaged_kept_as"].as_str().unwrap();
    assert_eq!(fs::read(kept).unwrap(), b"this is not a database");
    assert_eq!(comparable_stats(&root), before);
}
