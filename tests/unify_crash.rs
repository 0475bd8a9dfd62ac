//! SIGKILL at random instants of `unify` never changes what a guest sees, and the next run
//! cleans up and finishes the job.

use std::collections::BTreeSet;
use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::thread::sleep;
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use rand::{Rng, RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::common::*;

/// Guests of a distribution's size in files (a minbase has about 7,000), small in bytes so
/// that comparing every guest after every kill stays cheap: the first run reads more than one
/// window of the pipeline (16,384 inodes), and so does every run after it (see
/// `UNSHARE_PER_RUN`).
const GUESTS: usize = 10;
const POOL: usize = 5_000;
const UNIQUE: usize = 200;
/// At least this many kills must land while `unify` is running.
const MID_RUN_KILLS: usize = 50;
const MAX_ATTEMPTS: usize = 120;
const MAX_WINDOW: Duration = Duration::from_secs(6);

/// File contents shared by the fleet: `POOL` files of 512 B–8 KiB.
struct Pool {
    files: Vec<Vec<u8>>,
    seed: u64,
}

impl Pool {
    fn new(seed: u64) -> Self {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let files = (0..POOL)
            .map(|_| {
                let mut v = vec![0u8; rng.random_range(512..=8 * 1024)];
                rng.fill_bytes(&mut v);
                v
            })
            .collect();
        Pool { files, seed }
    }
}

/// Guest `g`: ~90% of the pool (which 10% is missing depends on g), `UNIQUE` files of its own,
/// two hardlink groups and a few private /etc files.
fn fleet_guest(dir: &Path, g: usize, pool: &Pool) {
    let mut t = TreeBuilder::new(dir);
    for (i, bytes) in pool.files.iter().enumerate() {
        if (i * 7 + g * 13).is_multiple_of(10) {
            continue;
        }
        t.file(format!("usr/lib/pkg{:03}/f{i:04}.so", i / 32), bytes);
    }
    let mut rng = ChaCha8Rng::seed_from_u64(pool.seed ^ (0x5eed_0000 + g as u64));
    for u in 0..UNIQUE {
        let mut v = vec![0u8; rng.random_range(512..=8 * 1024)];
        rng.fill_bytes(&mut v);
        t.file(format!("usr/local/unique/u{u:03}.bin"), &v);
    }
    t.file("usr/share/hl/one", &pool.files[1])
        .hardlink("usr/share/hl/one", "usr/share/hl/two")
        .file(
            "usr/share/hl/own",
            &content(&format!("fleet-hl-{g}"), 10_000),
        )
        .hardlink("usr/share/hl/own", "usr/share/hl/own-too")
        .file("etc/hostname", format!("fleet-{g}\n").as_bytes())
        .file("etc/services", &pool.files[2])
        .file("var/lib/dpkg/status", &pool.files[3]);
    t.finish();
}

fn build_fleet(dir: &Path, pool: &Pool) -> PathBuf {
    fs::create_dir_all(dir).unwrap();
    let root = init_root(dir);
    for g in 0..GUESTS {
        let name = format!("guest{g:02}");
        adopt_built(&root, dir, &name, |d| fleet_guest(d, g, pool));
    }
    root
}

/// Files rewritten as fresh inodes (same content and metadata) before each run after the
/// first: more than one window of the pipeline, so that kills land between windows too.
const UNSHARE_PER_RUN: usize = 20_000;

fn guest_names() -> Vec<String> {
    (0..GUESTS).map(|g| format!("guest{g:02}")).collect()
}

#[test]
fn sigkill_at_random_points_never_changes_a_guest_file() {
    assert_root();
    let seed = seed("COWHERD_CRASH_SEED");
    let s = Scratch::new("crash");
    let pool = Pool::new(seed);

    // How long does an uninterrupted run take? Measured on a copy of the fleet.
    let t0 = Instant::now();
    let copy_root = build_fleet(&s.join("copy"), &pool);
    eprintln!("fleet built in {:?}", t0.elapsed());
    let t = Instant::now();
    cowherd(&copy_root)
        .args(["unify", "--all"])
        .assert()
        .success();
    let full_run = t.elapsed();
    fs::remove_dir_all(s.join("copy")).unwrap();
    eprintln!("uninterrupted unify --all: {full_run:?}");

    let root = build_fleet(&s.join("main"), &pool);
    let names = guest_names();
    let originals: Vec<Manifest> = names.iter().map(|n| manifest(&base(&root, n))).collect();
    let opts = CompareOpts {
        // A kill between a rename and putting the directory's mtime back may leave it changed.
        dir_mtimes: false,
        // Temporary names of a killed run may remain until the next run.
        allow_extra: true,
    };

    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut window = full_run.min(MAX_WINDOW).max(Duration::from_millis(20));
    let mut mid_run = 0;
    let mut attempts = 0;
    let mut leftovers_seen = BTreeSet::new();
    let full_window = window;
    let pool_paths: Vec<(String, Vec<u8>)> = names
        .iter()
        .zip(&originals)
        .flat_map(|(n, m)| {
            m.iter()
                .filter(|(rel, e)| {
                    rel.starts_with(b"usr/lib/pkg")
                        && e.kind == Kind::File
                        && e.hardlinks.is_empty()
                })
                .map(|(rel, _)| (n.clone(), rel.clone()))
        })
        .collect();
    let mut unshared = 0;
    while mid_run < MID_RUN_KILLS && attempts < MAX_ATTEMPTS {
        attempts += 1;
        if attempts > 1 {
            // Give the next run work again (hashing and linking), as a package upgrade
            // rewriting identical files would: fresh inodes, same content and metadata.
            for _ in 0..UNSHARE_PER_RUN {
                let (name, rel) = &pool_paths[rng.random_range(0..pool_paths.len())];
                rewrite_as_new_inode(&at(&base(&root, name), rel));
                unshared += 1;
            }
        }
        let log = s.join(format!("unify-{attempts}.stderr"));
        let started = Instant::now();
        let mut child = std::process::Command::new(cowherd_bin())
            .env_remove("COWHERD_ROOT")
            .arg("--root")
            .arg(&root)
            .args(["unify", "--all"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(File::create(&log).unwrap())
            .spawn()
            .expect("spawn cowherd");
        let delay = Duration::from_micros(rng.random_range(0..=window.as_micros() as u64));
        // Sleep in small steps so that a run finishing early is noticed (and timed).
        let mut finished = None;
        while started.elapsed() < delay {
            if let Some(st) = child.try_wait().unwrap() {
                finished = Some((st, started.elapsed()));
                break;
            }
            sleep(Duration::from_millis(2).min(delay.saturating_sub(started.elapsed())));
        }
        if finished.is_none() {
            // ESRCH only if it exited in the meantime.
            let _ = kill(Pid::from_raw(child.id() as i32), Signal::SIGKILL);
        }
        let status = child.wait().unwrap();
        match finished {
            Some((st, took)) => {
                assert!(
                    st.success(),
                    "unify exited on its own with {st}: {}",
                    fs::read_to_string(&log).unwrap_or_default()
                );
                // Aim the next kills inside a run of about this length.
                window = took.max(Duration::from_millis(20));
            }
            None => {
                if status.code().is_some() {
                    assert!(
                        status.success(),
                        "unify exited on its own with {status}: {}",
                        fs::read_to_string(&log).unwrap_or_default()
                    );
                } else {
                    mid_run += 1;
                    // Explore later instants too.
                    window = (window + window / 8).min(full_window);
                }
            }
        }

        for (name, original) in names.iter().zip(&originals) {
            let now = manifest(&base(&root, name));
            let (problems, extra) = compare_manifests(original, &now, opts);
            assert!(
                problems.is_empty(),
                "after a kill at {delay:?} (attempt {attempts}, seed {seed}), guest {name} \
                 changed:\n  {}",
                problems.join("\n  ")
            );
            assert_groups_kept(original, &now);
            for rel in extra {
                let e = &now[&rel];
                assert_eq!(
                    e.kind,
                    Kind::File,
                    "{name}: unexpected new non-file {} after a kill",
                    show(&rel)
                );
                leftovers_seen.insert(format!("{name}/{}", show(&rel)));
            }
        }
    }
    eprintln!(
        "{attempts} runs, {mid_run} killed while running (final window {window:?}), \
         {unshared} files given fresh inodes between runs, {} leftover temporary names seen \
         in guests",
        leftovers_seen.len()
    );
    assert!(
        mid_run >= MID_RUN_KILLS,
        "only {mid_run} of {attempts} kills landed while unify was running"
    );

    // A run to completion cleans up and finishes the job.
    cowherd(&root).args(["unify", "--all"]).assert().success();
    let store = store_inodes(&root);
    for (name, original) in names.iter().zip(&originals) {
        let b = base(&root, name);
        let now = manifest(&b);
        // Directory mtimes too: the next run puts back those a killed run left changed.
        let (problems, _) = compare_manifests(
            original,
            &now,
            CompareOpts {
                dir_mtimes: true,
                allow_extra: false,
            },
        );
        assert!(
            problems.is_empty(),
            "after the final run, guest {name} differs (seed {seed}):\n  {}",
            problems.join("\n  ")
        );
        assert_groups_kept(original, &now);
        // And it really finished: every pool file is a store link.
        for (rel, e) in original {
            if rel.starts_with(b"usr/lib/pkg") && e.kind == Kind::File {
                assert!(
                    store.contains_key(&ino(&at(&b, rel))),
                    "{name}/{} is not linked after the final run",
                    show(rel)
                );
            }
        }
    }
    let tmp_left: Vec<_> = fs::read_dir(root.join("store/tmp"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert!(tmp_left.is_empty(), "store/tmp not empty: {tmp_left:?}");
    cowherd(&root).arg("verify").assert().success();
}
