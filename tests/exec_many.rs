//! `cowherd exec` of unmounted guests and of several guests at once, through the real binary
//! and real overlay mounts: an unmounted guest runs on its overlay mounted in the command's
//! own mount namespace only (never on the host, gone when the command ends or cowherd is
//! killed); several guests run a few at a time with prefixed output or log files and a
//! summary; the throwaway view (`private_overlay` with a scratch directory) changes nothing of
//! the guest.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{self, File};
use std::io::{Read, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::thread::sleep;
use std::time::{Duration, Instant};

use nix::fcntl::{Flock, FlockArg};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use common::*;

/// The programs of a test guest.
const PROGRAMS: &[&str] = &[
    "/bin/sh",
    "/bin/cat",
    "/bin/hostname",
    "/bin/sleep",
    "/bin/rm",
    "/bin/mkdir",
];

/// A root with one small guest per `(name, code)`: [`PROGRAMS`], `/code` holding `code`, and
/// `/etc/marker`.
fn root_with(tag: &str, guests: &[(&str, i32)]) -> (Scratch, PathBuf) {
    assert_root();
    let s = Scratch::new(tag);
    let root = init_root(s.path());
    for &(name, code) in guests {
        adopt_built(&root, s.path(), name, |d| {
            minimal_userland(d, PROGRAMS);
            fs::write(d.join("code"), format!("{code}\n")).unwrap();
            fs::create_dir_all(d.join("etc")).unwrap();
            fs::write(d.join("etc/marker"), format!("base of {name}\n")).unwrap();
            fs::write(d.join("etc/gone"), b"removed by the guest\n").unwrap();
        });
    }
    (s, root)
}

fn guest_dir(root: &Path, name: &str) -> PathBuf {
    root.join("guests").join(name)
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Every overlay mount, in any mount namespace of the host (the mount table of every thread
/// of every process), that uses a directory below `dir`, as `PID/TID: mountinfo line`.
fn overlays_using(dir: &Path) -> Vec<String> {
    let numbered = |dir: PathBuf| -> Vec<PathBuf> {
        fs::read_dir(dir)
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| {
                e.file_name()
                    .to_str()
                    .is_some_and(|n| n.parse::<u32>().is_ok())
            })
            .map(|e| e.path())
            .collect()
    };
    let wanted = format!("{}/", dir.display());
    let mut found = Vec::new();
    for process in numbered(PathBuf::from("/proc")) {
        for task in numbered(process.join("task")) {
            let Ok(table) = fs::read_to_string(task.join("mountinfo")) else {
                continue;
            };
            for line in table.lines() {
                let overlay = line
                    .split(" - ")
                    .nth(1)
                    .is_some_and(|t| t.starts_with("overlay "));
                if overlay && line.contains(&wanted) {
                    found.push(format!("{}: {line}", task.display()));
                }
            }
        }
    }
    found
}

/// The processes (but zombies) whose command line holds `marker`, as `PID: command line`.
fn processes_with(marker: &str) -> Vec<String> {
    fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter(|e| {
            e.file_name()
                .to_str()
                .is_some_and(|n| n.parse::<u32>().is_ok())
        })
        .filter_map(|e| {
            let cmdline = fs::read(e.path().join("cmdline")).ok()?;
            let shown = text(&cmdline).replace('\0', " ");
            shown
                .contains(marker)
                .then(|| format!("{}: {shown}", e.file_name().to_string_lossy()))
        })
        .collect()
}

/// The mounts at `point` in this thread's mount namespace.
fn mounts_here(point: &Path) -> Vec<cowherd_unify::MountEntry> {
    cowherd_unify::read_mountinfo(Path::new("/proc/thread-self/mountinfo"))
        .unwrap()
        .into_iter()
        .filter(|m| m.mount_point == point)
        .collect()
}

/// Holds the root's lock (as a writing cowherd does) until dropped.
fn hold_lock(root: &Path) -> Flock<File> {
    let file = File::open(root.join("lock")).unwrap();
    Flock::lock(file, FlockArg::LockExclusiveNonblock).expect("take the root's lock")
}

#[test]
fn an_unmounted_guest_runs_on_a_private_overlay_that_no_mount_namespace_keeps() {
    let (_s, root) = root_with("exec-private", &[("web01", 0)]);
    let dir = guest_dir(&root, "web01");
    let out = cowherd(&root)
        .args(["exec", "web01", "--", "sh", "-c", "echo hi > /f; hostname"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "web01\n");
    assert_eq!(text(&out.stderr), "", "nothing but the command's output");
    assert_eq!(fs::read(dir.join("upper/f")).unwrap(), b"hi\n");
    assert!(!dir.join("base/f").exists());
    assert_eq!(overlays_using(&dir), Vec::<String>::new());
    assert_eq!(listed_mount(&root, "web01")["state"], "unmounted");

    // While it runs: mounted in the command's namespaces only, and the root's lock is held.
    let mut child = KillOnDrop::spawn(
        Command::new(cowherd_bin())
            .arg("--root")
            .arg(&root)
            .args(["exec", "web01", "--", "sh", "-c"])
            .arg(": > /started; read line; echo got $line; cat /f")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped()),
    );
    wait_for("the command to start", || {
        dir.join("upper/started").exists()
    });
    assert_eq!(
        mounts_here(&dir.join("rootfs")),
        vec![],
        "mounted on the host"
    );
    let held = overlays_using(&dir);
    assert!(
        !held.is_empty(),
        "the overlay is in the command's namespace"
    );
    let out = cowherd(&root).args(["mount", "web01"]).output().unwrap();
    let line = assert_one_line_error(&out, 1);
    assert!(line.contains("another cowherd process"), "{line}");
    let mut stdin = child.0.stdin.take().unwrap();
    stdin.write_all(b"go\n").unwrap();
    drop(stdin);
    let mut stdout = String::new();
    child
        .0
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut stdout)
        .unwrap();
    assert_eq!(child.0.wait().unwrap().code(), Some(0));
    assert_eq!(stdout, "got go\nhi\n");
    assert_eq!(overlays_using(&dir), Vec::<String>::new());
}

#[test]
fn a_mounted_guest_runs_on_its_mount_without_the_lock_and_stays_mounted() {
    own_mount_namespace();
    let (_s, root) = root_with("exec-mounted", &[("m1", 0), ("off", 0)]);
    let point = rootfs(&root, "m1");
    let mut mounts = MountedGuests::default();
    mounts.watch(&point);
    cowherd(&root).args(["mount", "m1"]).assert().success();
    let before = mounts_here(&point);
    assert_eq!(before.len(), 1);

    // Another writer holds the lock: a mounted guest needs none, an unmounted one does.
    let lock = hold_lock(&root);
    let out = cowherd(&root)
        .args(["exec", "m1", "--", "sh", "-c", "echo m > /m; hostname"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "m1\n");
    let out = cowherd(&root)
        .args(["exec", "off", "--", "true"])
        .output()
        .unwrap();
    let line = assert_one_line_error(&out, 125);
    assert!(line.contains("another cowherd process"), "{line}");
    drop(lock);

    assert_eq!(fs::read(upper(&root, "m1").join("m")).unwrap(), b"m\n");
    assert_eq!(
        fs::read(point.join("m")).unwrap(),
        b"m\n",
        "seen on the mount"
    );
    let after = mounts_here(&point);
    assert_eq!(after.len(), 1, "still mounted, once");
    assert_eq!(after[0].id, before[0].id, "the same mount");
    umount_ok(&root, &["m1"]);
}

/// `exec --all -- SCRIPT` in `root` with `extra` options.
fn exec_all(root: &Path, extra: &[&str], script: &str) -> std::process::Output {
    cowherd(root)
        .arg("exec")
        .args(extra)
        .args(["--all", "--", "sh", "-c", script])
        .output()
        .unwrap()
}

/// The summary rows on stderr: guest → exit code (or `-`).
fn summary_codes(stderr: &str) -> BTreeMap<String, String> {
    stderr
        .lines()
        .skip_while(|l| !l.starts_with("GUEST "))
        .skip(1)
        .filter(|l| !l.contains(" guests: "))
        .map(|l| {
            let mut cells = l.split_whitespace();
            let guest = cells.next().unwrap().to_string();
            (guest, cells.next().unwrap().to_string())
        })
        .collect()
}

const GUESTS: &[(&str, i32)] = &[("a1", 0), ("b22", 3), ("c3", 7)];

#[test]
fn exec_all_prefixes_each_line_summarises_each_code_and_fails_with_3() {
    let (_s, root) = root_with("exec-all", GUESTS);
    let script = "echo out-$(cat /code); echo err-$(cat /code) >&2; exit $(cat /code)";
    let out = exec_all(&root, &[], script);
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert_eq!(out.status.code(), Some(3), "{stdout}{stderr}");
    // Each line prefixed with its guest's name, padded to the longest name.
    let lines: BTreeSet<&str> = stdout.lines().collect();
    assert_eq!(
        lines,
        BTreeSet::from(["a1  | out-0", "b22 | out-3", "c3  | out-7"]),
        "{stdout}"
    );
    for line in ["a1  | err-0", "b22 | err-3", "c3  | err-7"] {
        assert!(stderr.lines().any(|l| l == line), "{line}:\n{stderr}");
    }
    let codes = summary_codes(&stderr);
    let want = [("a1", "0"), ("b22", "3"), ("c3", "7")];
    assert_eq!(
        codes,
        want.map(|(g, c)| (g.to_string(), c.to_string())).into(),
        "{stderr}"
    );
    assert!(stderr.contains("3 guests: 1 exited 0, 2 failed, 0 could not run it"));

    // --json: the summary alone on stdout.
    let out = exec_all(&root, &["--json"], script);
    assert_eq!(out.status.code(), Some(3));
    let json = json_of(&out);
    let got: BTreeMap<String, i64> = json["guests"]
        .as_array()
        .unwrap()
        .iter()
        .map(|g| {
            (
                g["guest"].as_str().unwrap().into(),
                g["code"].as_i64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        got,
        GUESTS.iter().map(|&(g, c)| (g.into(), c.into())).collect()
    );
    assert_eq!(json["succeeded"], 1);
    assert_eq!(json["failed"], 2);
    assert_eq!(json["not_run"], 0);
    assert!(json["guests"][0]["seconds"].as_f64().unwrap() > 0.0);
    assert!(
        text(&out.stderr).contains("b22 | out-3"),
        "output goes to stderr"
    );

    // All zero: exit 0.
    let out = exec_all(&root, &[], "echo ok");
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout).lines().count(), 3);
    assert_eq!(overlays_using(&root.join("guests")), Vec::<String>::new());
}

/// When each guest's command started and ended (the mtimes of the files it wrote into its
/// upper layer), in start order.
fn intervals(root: &Path) -> Vec<(i128, i128)> {
    let ns = |p: PathBuf| {
        let m = fs::metadata(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
        i128::from(m.mtime()) * 1_000_000_000 + i128::from(m.mtime_nsec())
    };
    let mut got: Vec<(i128, i128)> = GUESTS
        .iter()
        .map(|(g, _)| {
            (
                ns(upper(root, g).join("start")),
                ns(upper(root, g).join("end")),
            )
        })
        .collect();
    got.sort();
    got
}

#[test]
fn jobs_bounds_how_many_guests_run_at_once() {
    let (_s, root) = root_with("exec-jobs", GUESTS);
    let script = ": > /start; sleep 0.3; : > /end";
    let out = exec_all(&root, &["--jobs", "1"], script);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let one = intervals(&root);
    for pair in one.windows(2) {
        assert!(pair[1].0 >= pair[0].1, "--jobs 1 overlapped: {one:?}");
    }
    let out = exec_all(&root, &["--jobs", "3"], script);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let three = intervals(&root);
    let last_start = three.iter().map(|i| i.0).max().unwrap();
    let first_end = three.iter().map(|i| i.1).min().unwrap();
    assert!(
        last_start < first_end,
        "--jobs 3 did not run all at once: {three:?}"
    );
}

#[test]
fn logs_writes_one_file_per_guest_and_prints_only_the_summary() {
    let (s, root) = root_with("exec-logs", GUESTS);
    let logs = s.join("logs/run1");
    let out = cowherd(&root)
        .args(["exec", "--all", "--logs"])
        .arg(&logs)
        .args(["--", "sh", "-c"])
        .arg("echo out-$(cat /code); echo err-$(cat /code) >&2; exit $(cat /code)")
        .output()
        .unwrap();
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{stderr}");
    assert_eq!(text(&out.stdout), "");
    assert!(
        !stderr.contains("out-") && !stderr.contains("err-"),
        "{stderr}"
    );
    assert_eq!(summary_codes(&stderr).len(), 3, "{stderr}");
    assert_eq!(
        fs::metadata(&logs).unwrap().permissions().mode() & 0o777,
        0o700
    );
    let mut names: Vec<String> = fs::read_dir(&logs)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names, ["a1.log", "b22.log", "c3.log"]);
    for (guest, code) in GUESTS {
        let log = text(&fs::read(logs.join(format!("{guest}.log"))).unwrap());
        assert_eq!(log, format!("out-{code}\nerr-{code}\n"), "{guest}");
    }
}

#[test]
fn a_throwaway_view_changes_nothing_of_the_guest_while_the_command_writes() {
    use cowherd_unify::{Access, HostRoot};
    let (s, root) = root_with("exec-throwaway", &[("t", 0)]);
    let dir = guest_dir(&root, "t");
    // The guest changed things before: a file of its own, a base file changed and removed.
    let script = "echo own > /own; echo upper > /etc/marker; rm /etc/gone";
    cowherd(&root)
        .args(["exec", "t", "--", "sh", "-c", script])
        .assert()
        .success();
    let before = (manifest(&dir.join("base")), manifest(&dir.join("upper")));

    let read_only = HostRoot::open(&root, Access::Read).unwrap();
    let err = cowherd_unify::private_overlay(&read_only, "t", Some(&s.join("view0")));
    assert!(
        matches!(err, Err(cowherd_unify::Error::NeedsLock { .. })),
        "{err:?}"
    );
    drop(read_only);

    let host_root = HostRoot::open(&root, Access::Write).unwrap();
    let view = s.join("view");
    let layers = cowherd_unify::private_overlay(&host_root, "t", Some(&view)).unwrap();
    assert_eq!(layers.lower(), [dir.join("upper"), dir.join("base")]);
    assert_eq!(layers.upper(), view.join("upper"));
    assert_eq!(layers.target(), dir.join("rootfs"));
    let data = layers.mount_data().into_string().unwrap();
    assert!(
        data.ends_with(",index=off,metacopy=off,redirect_dir=off"),
        "{data}"
    );
    let script = "cat /etc/marker; [ -e /etc/gone ] && echo gone-seen || echo gone-hidden; \
                  cat /own; echo new > /new; echo throwaway > /etc/marker; rm /own; \
                  cat /etc/marker; hostname";
    let out = cowherd_builder::Exec::new(layers.target(), "t", ["sh", "-c", script])
        .overlay(layers)
        .capture(true)
        .run()
        .unwrap();
    assert_eq!(out.code, 0, "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "upper\ngone-hidden\nown\nthrowaway\nt\n");
    drop(host_root);

    // The writes went to the view's upper layer, nothing to the guest's layers.
    assert_eq!(fs::read(view.join("upper/new")).unwrap(), b"new\n");
    assert_eq!(
        fs::read(view.join("upper/etc/marker")).unwrap(),
        b"throwaway\n"
    );
    let after = (manifest(&dir.join("base")), manifest(&dir.join("upper")));
    assert_same_content_and_metadata(&before.0, &after.0);
    assert_same_content_and_metadata(&before.1, &after.1);
    assert!(before == after, "the guest's layers changed");
    assert_eq!(
        fs::metadata(view.join("work"))
            .unwrap()
            .permissions()
            .mode()
            & 0o777,
        0o700
    );
    assert_eq!(overlays_using(&dir), Vec::<String>::new());
    // The guest still sees what it saw.
    let out = cowherd(&root)
        .args(["exec", "t", "--", "sh", "-c", "cat /etc/marker /own"])
        .output()
        .unwrap();
    assert_eq!(text(&out.stdout), "upper\nown\n");
}

#[test]
fn sigkill_of_exec_all_leaves_no_mount_and_no_process_behind() {
    const KILLS: usize = 30;
    let seed = seed("COWHERD_EXEC_KILL_SEED");
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let (s, root) = root_with("exec-kill", &[("k1", 0), ("k2", 0), ("k3", 0)]);
    let guests = root.join("guests");
    let marker = format!("cowherd-exec-kill-{}", std::process::id());
    let script = format!(
        "for i in 1 2 3 4 5 6 7 8; do echo $i > /f$i; mkdir -p /d$i; done; sleep 0.05; \
         echo done # {marker}"
    );
    let run = |jobs: &str| {
        let out = cowherd(&root)
            .args(["exec", "--all", "--jobs", jobs, "--", "sh", "-c", &script])
            .output()
            .unwrap();
        assert_eq!(
            out.status.code(),
            Some(0),
            "seed {seed}: {}",
            text(&out.stderr)
        );
    };
    let started = Instant::now();
    run("2");
    let window = started.elapsed().mul_f64(1.2);
    let (mut landed, mut attempts, mut while_mounted) = (0, 0, 0);
    while landed < KILLS {
        attempts += 1;
        assert!(
            attempts < 4 * KILLS,
            "seed {seed}: runs end before the kills land"
        );
        let jobs = rng.random_range(1..=3).to_string();
        let delay = Duration::from_micros(rng.random_range(0..=window.as_micros() as u64));
        let log = File::create(s.join("killed.log")).unwrap();
        let mut child = KillOnDrop::spawn(
            Command::new(cowherd_bin())
                .arg("--root")
                .arg(&root)
                .args(["exec", "--all", "--jobs", &jobs, "--", "sh", "-c", &script])
                .stdin(Stdio::null())
                .stdout(log.try_clone().unwrap())
                .stderr(log),
        );
        sleep(delay);
        // Whether the kill lands while a private overlay is mounted (looked at just before).
        let mounted = !overlays_using(&guests).is_empty();
        if child.0.try_wait().unwrap().is_none() {
            kill(Pid::from_raw(child.id() as i32), Signal::SIGKILL).unwrap();
        }
        let status = child.0.wait().unwrap();
        if status.code().is_none() {
            landed += 1;
            while_mounted += usize::from(mounted);
        } else {
            assert_eq!(
                status.code(),
                Some(0),
                "seed {seed}: a run that was not killed"
            );
        }
        // The kernel drops the namespaces as their last process dies.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let (mounts, processes) = (overlays_using(&guests), processes_with(&marker));
            if mounts.is_empty() && processes.is_empty() {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "seed {seed}, kill {landed} after {delay:?}: left behind:\n{}\n{}",
                mounts.join("\n"),
                processes.join("\n")
            );
            sleep(Duration::from_millis(10));
        }
        // The next run finishes.
        run(&jobs);
    }
    eprintln!(
        "{landed} kills landed in {attempts} runs, {while_mounted} of them while an overlay \
         was mounted (seed {seed})"
    );
    assert!(
        while_mounted >= KILLS / 4,
        "seed {seed}: only {while_mounted} kills landed while an overlay was mounted"
    );
    for g in ["k1", "k2", "k3"] {
        assert_eq!(fs::read(upper(&root, g).join("f8")).unwrap(), b"8\n");
        assert_eq!(listed_mount(&root, g)["state"], "unmounted");
    }
}

#[test]
fn bad_exec_input_is_one_line_error() {
    let (s, root) = root_with("exec-bad", &[("a", 0), ("b", 0)]);
    let file = s.join("a-file");
    fs::write(&file, b"not a directory\n").unwrap();
    let file = file.to_str().unwrap();
    let writes = ["sh", "-c", "echo ran > /ran"];
    #[rustfmt::skip]
    let cases: &[(&[&str], i32, &[&str])] = &[
        (&["--jobs", "0", "--all"], 2, &["--jobs", "0"]),
        (&["--jobs", "-1", "a", "b"], 2, &["--jobs"]),
        (&["a", "nosuch"], 1, &["\"nosuch\"", "cowherd list"]),
        (&["nosuch"], 125, &["\"nosuch\"", "cowherd list"]),
        (&["--all", "a"], 2, &["--all"]),
        (&["--all", "--logs", file], 1, &["--logs", "not a directory"]),
        (&["a", "--logs", file], 1, &["--logs", "not a directory"]),
    ];
    for (args, code, says) in cases {
        let out = cowherd(&root)
            .arg("exec")
            .args(*args)
            .arg("--")
            .args(writes)
            .output()
            .unwrap();
        let line = assert_one_line_error(&out, *code);
        for word in *says {
            assert!(line.contains(word), "exec {args:?}: {line}");
        }
    }
    for args in [&["a"][..], &["a", "--"], &["--all"], &[]] {
        let out = cowherd(&root).arg("exec").args(args).output().unwrap();
        let line = assert_one_line_error(&out, 2);
        assert!(line.contains("exec --help"), "exec {args:?}: {line}");
    }
    for g in ["a", "b"] {
        assert!(!upper(&root, g).join("ran").exists(), "{g} ran a command");
    }
    // A root without guests.
    let empty = init_root(&s.join("empty"));
    let out = cowherd(&empty)
        .args(["exec", "--all", "--", "true"])
        .output()
        .unwrap();
    let line = assert_one_line_error(&out, 1);
    assert!(line.contains("no guests"), "{line}");
}
