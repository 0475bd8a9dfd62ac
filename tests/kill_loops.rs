//! SIGKILL at random instants of every command that writes guest trees or the store, as
//! `unify` has in unify_crash.rs and `fold` in fold.rs: `split`, `destroy`, `gc`,
//! `index rebuild`, `verify --repair`, `import`, `import --resync` and `build --count`.
//!
//! Each loop ([`kill_loop`]) runs its command and kills it at a random instant, until at least
//! [`KILLS`] SIGKILLs landed while it ran (half of them later than a writer with nothing to do
//! takes). After each kill it checks what must hold at every instant, runs the same command
//! again to its end, and then checks everything: every guest's view (content, type, mode, owner,
//! mtime — directories' too —, size, symlink target, xattrs) against what it must be, the store
//! (`cowherd verify` finds nothing corrupt and no stale index entry; the index's objects are the
//! store's) and that nothing a killed run makes is left. No difference is allowed.
//!
//! The guests are never mounted and their upper layers stay empty, so a guest's base is what it
//! sees. Trees are small (hundreds to a few thousand small files): many kills on small trees.
//! Each loop prints its seed; `COWHERD_KILL_SEED_<LOOP>=N` (named in the message) replays one.

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::OsStr;
use std::fs::{self, File};
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::thread::sleep;
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::Value;

use crate::common::*;

// ---------------------------------------------------------------------------------------------
// The kill loop
// ---------------------------------------------------------------------------------------------

/// At least this many SIGKILLs must land while the command runs, in each loop.
const KILLS: usize = 50;
/// Kills are aimed within at most this long after the start.
const MAX_WINDOW: Duration = Duration::from_secs(5);
/// Kills are aimed within at least this long after the start.
const MIN_WINDOW: Duration = Duration::from_millis(20);

/// How a run of [`Round::kill`] ended.
#[derive(Clone, Copy, Debug)]
enum Ended {
    /// SIGKILL landed while it ran, this long after its start.
    Killed(Duration),
    /// It ended on its own, successfully, after this long.
    Finished(Duration),
}

/// Where a loop aims its kills, and what landed.
struct Aim {
    what: String,
    seed_var: String,
    seed: u64,
    root: PathBuf,
    logs: PathBuf,
    /// The command's start and a writer's recovery: a run of `gc --dry-run`.
    idle: Duration,
    /// Kills are aimed uniformly within this long after the start (`None`: the first run is
    /// let finish, to learn how long a run takes).
    window: Option<Duration>,
    /// The longest run that ended on its own.
    longest: Duration,
    landed: usize,
    past_idle: usize,
    finished: usize,
}

/// One attempt of a [`kill_loop`]: prepare, [`Round::kill`] the command once, check.
struct Round<'a> {
    /// The attempt's number, from 1.
    n: usize,
    /// The loop's generator, for the round's own random choices.
    rng: &'a mut ChaCha8Rng,
    aim: &'a mut Aim,
    ended: Option<Ended>,
}

impl Round<'_> {
    /// Runs `cowherd --root ROOT ARGS` (output to a log file) and sends it SIGKILL at a random
    /// instant of the loop's window (half the time one past an idle writer's start), unless it
    /// ended by then. A run that ends on its own must succeed.
    fn kill(&mut self, args: &[impl AsRef<OsStr>]) -> Ended {
        assert!(self.ended.is_none(), "a round kills its command once");
        let aim = &mut *self.aim;
        let log = aim.logs.join(format!("{}-{:03}.log", aim.seed_var, self.n));
        let out = File::create(&log).unwrap();
        // Half the kills anywhere in the window, half past an idle writer's start.
        let delay = aim.window.map(|w| {
            let from = if self.rng.random_bool(0.5) {
                aim.idle.min(w)
            } else {
                Duration::ZERO
            };
            Duration::from_micros(
                self.rng
                    .random_range(from.as_micros() as u64..=w.as_micros() as u64),
            )
        });
        let started = Instant::now();
        let mut child = KillOnDrop::spawn(
            Command::new(cowherd_bin())
                .env_remove("COWHERD_ROOT")
                .env("NO_COLOR", "1")
                .arg("--root")
                .arg(&aim.root)
                .arg("--quiet")
                .args(args)
                .stdin(Stdio::null())
                .stdout(out.try_clone().unwrap())
                .stderr(out),
        );
        if let Some(delay) = delay {
            // Sleep in small steps, so that a run ending early is noticed (and timed).
            let mut exited = false;
            while !exited && started.elapsed() < delay {
                exited = child.0.try_wait().unwrap().is_some();
                sleep(Duration::from_millis(1).min(delay.saturating_sub(started.elapsed())));
            }
            if !exited {
                // Not reaped yet, so the pid is still its: ESRCH only if it ended meanwhile.
                let _ = kill(Pid::from_raw(child.id() as i32), Signal::SIGKILL);
            }
        }
        let status = child.0.wait().unwrap();
        let took = started.elapsed();
        let ended = if status.signal() == Some(libc::SIGKILL) {
            let delay = delay.expect("only this loop kills it");
            aim.landed += 1;
            aim.past_idle += usize::from(delay > aim.idle);
            // Explore later instants too, up to a bit past the longest run seen.
            let cap = (aim.longest + aim.longest / 2).clamp(MIN_WINDOW, MAX_WINDOW);
            aim.window = aim.window.map(|w| (w + w / 8).min(cap));
            Ended::Killed(delay)
        } else {
            assert!(
                status.success(),
                "`cowherd {}` ended on its own with {status} ({}):\n{}",
                show_args(args),
                self.at_ended(None),
                fs::read_to_string(&log).unwrap_or_default()
            );
            aim.finished += 1;
            aim.longest = aim.longest.max(took);
            // Aim the next kills within a run of about this length.
            aim.window = Some(took.clamp(MIN_WINDOW, MAX_WINDOW));
            Ended::Finished(took)
        };
        self.ended = Some(ended);
        ended
    }

    /// Where the round is, for messages: the attempt, when its kill landed, the seed.
    fn at(&self) -> String {
        self.at_ended(self.ended)
    }

    fn at_ended(&self, ended: Option<Ended>) -> String {
        let aim = &*self.aim;
        let when = match ended {
            Some(Ended::Killed(d)) => format!("killed {d:?} after its start"),
            Some(Ended::Finished(d)) => format!("ended on its own after {d:?}"),
            None => "not run yet".into(),
        };
        format!(
            "{}, attempt {}, {when}; {}={} replays it",
            aim.what, self.n, aim.seed_var, aim.seed
        )
    }
}

/// The kill loop: `round` once per attempt until [`KILLS`] SIGKILLs landed while the command
/// ran, half of them later than a writer with nothing to do takes. Each round
/// prepares what its command works on, calls [`Round::kill`] once, and checks. The first round
/// lets the command finish (to learn how long a run takes); the kills are then aimed at a random
/// instant within the last uninterrupted run's length (widened a little after each kill that
/// landed): half of them anywhere, half past the time an idle writer takes to start. The seed is
/// printed; `seed_var` overrides it. Fails after four times as many attempts, saying so: then
/// the command is too fast for its tree.
fn kill_loop(
    what: &str,
    seed_var: &str,
    root: &Path,
    logs: &Path,
    round: impl FnMut(&mut Round<'_>),
) {
    kill_loop_n(what, seed_var, root, logs, KILLS, round);
}

/// [`kill_loop`] with `kills` SIGKILLs to land (half of them past an idle writer's start), for
/// a command whose runs are long.
fn kill_loop_n(
    what: &str,
    seed_var: &str,
    root: &Path,
    logs: &Path,
    kills: usize,
    mut round: impl FnMut(&mut Round<'_>),
) {
    let (kills_past_idle, max_attempts) = (kills / 2, 4 * kills);
    let seed = seed(seed_var);
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    fs::create_dir_all(logs).unwrap();
    let mut aim = Aim {
        what: format!("`cowherd {what}`"),
        seed_var: seed_var.to_string(),
        seed,
        root: root.to_path_buf(),
        logs: logs.to_path_buf(),
        idle: idle_run(root),
        window: None,
        longest: Duration::ZERO,
        landed: 0,
        past_idle: 0,
        finished: 0,
    };
    let started = Instant::now();
    let mut n = 0;
    while aim.landed < kills || aim.past_idle < kills_past_idle {
        n += 1;
        assert!(
            n <= max_attempts,
            "`cowherd {what}`: only {} of {max_attempts} SIGKILLs landed while it ran, {} of \
             them later than a writer with nothing to do takes ({:?}); an uninterrupted run \
             takes {:?}: it is too fast for kills to land — make its tree bigger or aim the \
             kills within a smaller window ({seed_var}={seed})",
            aim.landed,
            aim.past_idle,
            aim.idle,
            aim.longest
        );
        let mut r = Round {
            n,
            rng: &mut rng,
            aim: &mut aim,
            ended: None,
        };
        round(&mut r);
        assert!(r.ended.is_some(), "round {n} of {what} ran no command");
    }
    eprintln!(
        "{what}: {} SIGKILLs landed in {n} attempts, {} later than an idle writer's {:?}; {} runs \
         ended first (the longest {:?}); {:?} in all ({seed_var}={seed})",
        aim.landed,
        aim.past_idle,
        aim.idle,
        aim.finished,
        aim.longest,
        started.elapsed()
    );
}

/// What any writer costs before it changes anything (start, lock, recovery, a look at the
/// store): the shortest of three `gc --dry-run`s.
fn idle_run(root: &Path) -> Duration {
    (0..3)
        .map(|_| {
            let t = Instant::now();
            cowherd(root)
                .args(["gc", "--dry-run", "--quiet"])
                .assert()
                .success();
            t.elapsed()
        })
        .min()
        .unwrap()
}

fn show_args(args: &[impl AsRef<OsStr>]) -> String {
    args.iter()
        .map(|a| a.as_ref().to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join(" ")
}

/// Runs `cowherd ARGS` to its end; asserts that it exits with one of `codes`.
fn run_to_end(root: &Path, args: &[impl AsRef<OsStr>], codes: &[i32], at: &str) -> Output {
    let out = cowherd(root).arg("--quiet").args(args).output().unwrap();
    assert!(
        out.status.code().is_some_and(|c| codes.contains(&c)),
        "the next `cowherd {}` exited with {} (expected one of {codes:?}) after {at}:\n\
         stdout: {}\nstderr: {}",
        show_args(args),
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

// ---------------------------------------------------------------------------------------------
// Checks
// ---------------------------------------------------------------------------------------------

/// The guests of `root`: the entries of `guests/` not starting with a dot.
fn guest_dirs(root: &Path) -> BTreeSet<String> {
    fs::read_dir(root.join("guests"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| !n.starts_with('.'))
        .collect()
}

/// Panics with the differences between `want` and `got`, if any.
fn assert_view(want: &Manifest, got: &Manifest, dir_mtimes: bool, what: &str) {
    let opts = CompareOpts {
        dir_mtimes,
        allow_extra: false,
    };
    let (problems, _) = compare_manifests(want, got, opts);
    let shown: Vec<&str> = problems.iter().take(30).map(String::as_str).collect();
    assert!(
        problems.is_empty(),
        "{what}: {} difference(s):\n  {}",
        problems.len(),
        shown.join("\n  ")
    );
}

/// The guests of `root` are exactly those of `want`, and each shows exactly its manifest
/// (directory mtimes too, unless `dir_mtimes` is false: a kill may leave a directory's mtime
/// for the next writer to put back), with an empty upper layer.
fn assert_guests(root: &Path, want: &BTreeMap<String, Manifest>, dir_mtimes: bool, at: &str) {
    let names: BTreeSet<String> = want.keys().cloned().collect();
    assert_eq!(guest_dirs(root), names, "the guests after {at}");
    for (name, view) in want {
        let upper = upper(root, name);
        let upper_entries = fs::read_dir(&upper).map_or(0, |d| d.count());
        assert_eq!(
            upper_entries,
            0,
            "{} is not empty after {at}",
            upper.display()
        );
        assert_view(
            view,
            &manifest(&base(root, name)),
            dir_mtimes,
            &format!("guest {name} after {at}"),
        );
    }
}

/// Nothing a killed run makes is left: no staging, adopting or destroying directory in
/// `guests/`, no `tmp/` or `resync/` in a guest, `store/tmp` empty.
fn assert_no_leftovers(root: &Path, at: &str) {
    let mut left: Vec<String> = fs::read_dir(root.join("guests"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with('.'))
        .map(|n| format!("guests/{n}"))
        .collect();
    for name in guest_dirs(root) {
        for scratch in ["tmp", "resync"] {
            let p = root.join("guests").join(&name).join(scratch);
            if fs::symlink_metadata(&p).is_ok() {
                left.push(format!("guests/{name}/{scratch}"));
            }
        }
    }
    for e in fs::read_dir(root.join("store/tmp")).unwrap() {
        left.push(format!(
            "store/tmp/{}",
            e.unwrap().file_name().to_string_lossy()
        ));
    }
    assert!(left.is_empty(), "left after {at}: {left:?}");
}

/// The names of the store's objects.
fn object_names(root: &Path) -> BTreeSet<String> {
    store_objects(root)
        .into_iter()
        .map(|o| o.path.file_name().unwrap().to_string_lossy().into_owned())
        .collect()
}

/// The names of the objects the index records.
fn indexed_objects(root: &Path) -> BTreeSet<String> {
    let db = rusqlite::Connection::open_with_flags(
        root.join("index.db"),
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
    )
    .unwrap();
    let mut stmt = db.prepare("SELECT name FROM objects").unwrap();
    stmt.query_map([], |r| r.get(0))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap()
}

/// The guests the index has rows of (not the template trees, `@…`).
fn indexed_guests(root: &Path) -> BTreeSet<String> {
    let db = rusqlite::Connection::open_with_flags(
        root.join("index.db"),
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
    )
    .unwrap();
    let mut stmt = db
        .prepare("SELECT name FROM guests WHERE name NOT LIKE '@%'")
        .unwrap();
    stmt.query_map([], |r| r.get(0))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap()
}

/// The store and the index as a whole: `cowherd verify` re-hashes every object and finds none
/// corrupt (its content and metadata make the key its name holds, its immutable flag is as its
/// name says) and no stale index entry; the index records exactly the store's objects, and no
/// guest that is gone.
fn assert_store_sound(root: &Path, at: &str) {
    let out = cowherd(root)
        .args(["verify", "--json", "--quiet"])
        .output()
        .unwrap();
    let report = json_of(&out);
    assert!(
        report["corrupt"] == serde_json::json!([]) && report["stale"] == serde_json::json!([]),
        "verify after {at}:\n{report:#}"
    );
    assert_eq!(out.status.code(), Some(0), "verify after {at}:\n{report:#}");
    let (store, indexed) = (object_names(root), indexed_objects(root));
    let only_store: Vec<_> = store.difference(&indexed).collect();
    let only_index: Vec<_> = indexed.difference(&store).collect();
    assert!(
        only_store.is_empty() && only_index.is_empty(),
        "after {at}: objects without an index row: {only_store:?}; rows without an object: \
         {only_index:?}"
    );
    let gone: Vec<String> = indexed_guests(root)
        .difference(&guest_dirs(root))
        .cloned()
        .collect();
    assert!(
        gone.is_empty(),
        "index rows of guests gone after {at}: {gone:?}"
    );
}

/// The regular files below the guest-absolute `dir` of the tree at `base` (recursive).
fn files_below(base: &Path, dir: &str) -> Vec<PathBuf> {
    files_under(&base.join(dir.trim_start_matches('/')))
}

/// Waits until no process mentions `needle` on its command line: the rsync (or tar) of a killed
/// import dies with it (`setpriv --pdeathsig`, `unshare --kill-child`), but not in the same
/// instant.
fn wait_for_no_process_mentioning(needle: &str) {
    wait_for(&format!("the processes mentioning {needle} to die"), || {
        fs::read_dir("/proc")
            .unwrap()
            .flatten()
            .filter_map(|e| fs::read(e.path().join("cmdline")).ok())
            .all(|line| !String::from_utf8_lossy(&line).contains(needle))
    });
}

// ---------------------------------------------------------------------------------------------
// Fixtures
// ---------------------------------------------------------------------------------------------

/// Tools in `/usr/sbin` of a [`pkg_tree`]: immutable store objects by the root's policy.
const TOOLS: usize = 20;

/// A guest's tree: `pkgs` × `per_pkg` small files (300 B – 3.3 KiB) in `/usr/lib/pkgNN/`, the
/// same in every tree of the same `tag`; [`TOOLS`] tools in `/usr/sbin`; a hardlink pair, a
/// symlink and a file with an xattr; its own `/etc/hostname`.
fn pkg_tree(dir: &Path, tag: &str, pkgs: usize, per_pkg: usize, host: &str) {
    let mut t = TreeBuilder::new(dir);
    for p in 0..pkgs {
        for f in 0..per_pkg {
            t.file(
                format!("usr/lib/pkg{p:02}/f{f:03}"),
                &content(&format!("{tag}-{p}-{f}"), 300 + (p * 31 + f * 211) % 3000),
            );
        }
    }
    for i in 0..TOOLS {
        t.file_with(
            format!("usr/sbin/tool{i:02}"),
            &content(&format!("{tag}-tool-{i}"), 2000 + i * 97),
            0o755,
            0,
            0,
            DEFAULT_MTIME,
        );
    }
    t.file("usr/share/doc/one", &content(&format!("{tag}-doc"), 5000))
        .hardlink("usr/share/doc/one", "usr/share/doc/two")
        .symlink("usr/share/doc/link", "one")
        .file(
            "usr/share/doc/tagged",
            &content(&format!("{tag}-tagged"), 700),
        )
        .xattr("usr/share/doc/tagged", "user.cowherd.tag", b"kill")
        .file("etc/hostname", format!("{host}\n").as_bytes());
    t.finish();
}

/// A new root whose policy makes `/usr/sbin` immutable.
fn immutable_sbin_root(s: &Scratch) -> PathBuf {
    let root = init_root(s.path());
    let policy = fs::read_to_string(root.join("policy.toml")).unwrap();
    let policy = policy.replacen("rules = [", "rules = [\n  \"immutable /usr/sbin/**\",", 1);
    fs::write(root.join("policy.toml"), policy).unwrap();
    root
}

/// A root ([`immutable_sbin_root`]) with `guests` adopted, each a [`pkg_tree`] of one tag, and
/// unified: their files are links of shared store objects, `/usr/sbin`'s immutable ones.
fn fleet(s: &Scratch, guests: &[&str], pkgs: usize, per_pkg: usize) -> PathBuf {
    let root = immutable_sbin_root(s);
    for g in guests {
        adopt_built(&root, s.path(), g, |d| {
            pkg_tree(d, "fleet", pkgs, per_pkg, g)
        });
    }
    cowherd(&root)
        .args(["unify", "--all", "--quiet"])
        .assert()
        .success();
    root
}

/// The views of `names`, each guest's base.
fn views(root: &Path, names: &[&str]) -> BTreeMap<String, Manifest> {
    names
        .iter()
        .map(|n| (n.to_string(), manifest(&base(root, n))))
        .collect()
}

/// A new tree at `to` that shows what `from` shows, as `cowherd build` makes a guest: its
/// directories made again (mode, owner, mtime), its store links new links of the same objects
/// — but immutable ones, which take no new link — and its other files copied (mode, owner,
/// xattrs, mtime).
fn link_copy(from: &Path, to: &Path) {
    let mut dirs = Vec::new();
    for e in walkdir::WalkDir::new(from).follow_links(false) {
        let e = e.unwrap();
        let rel = e.path().strip_prefix(from).unwrap();
        let dest = to.join(rel);
        let m = fs::symlink_metadata(e.path()).unwrap();
        let ft = m.file_type();
        if ft.is_dir() {
            fs::create_dir_all(&dest).unwrap();
            set_owner_mode(&dest, m.uid(), m.gid(), m.mode() & 0o7777);
            dirs.push((dest, (m.mtime(), m.mtime_nsec())));
        } else if ft.is_symlink() {
            std::os::unix::fs::symlink(fs::read_link(e.path()).unwrap(), &dest).unwrap();
            set_mtime(&dest, (m.mtime(), m.mtime_nsec()));
        } else if m.nlink() == 1 || !linked(fs::hard_link(e.path(), &dest), &dest) {
            fs::copy(e.path(), &dest).unwrap();
            set_owner_mode(&dest, m.uid(), m.gid(), m.mode() & 0o7777);
            for name in xattr::list(e.path()).unwrap() {
                if let Some(v) = xattr::get(e.path(), &name).unwrap() {
                    xattr::set(&dest, &name, &v).unwrap();
                }
            }
            set_mtime(&dest, (m.mtime(), m.mtime_nsec()));
        }
    }
    for (dir, mtime) in dirs.into_iter().rev() {
        set_mtime(&dir, mtime);
    }
}

/// Whether a hard link was made at `dest`: EPERM (an immutable inode) says no, other errors fail.
fn linked(made: std::io::Result<()>, dest: &Path) -> bool {
    match made {
        Ok(()) => true,
        Err(e) if e.raw_os_error() == Some(libc::EPERM) => false,
        Err(e) => panic!("link {}: {e}", dest.display()),
    }
}

// ---------------------------------------------------------------------------------------------
// split
// ---------------------------------------------------------------------------------------------

#[test]
fn a_killed_split_never_changes_a_view_and_the_next_split_finishes_it() {
    assert_root();
    const PKGS: usize = 60;
    const PER_ROUND: usize = 3;
    /// Rounds until every package and tool was split once; then they are shared again.
    const PERIOD: usize = PKGS / PER_ROUND;
    let s = Scratch::new("kill-split");
    let root = fleet(&s, &["a", "b"], PKGS, 20);
    let want = views(&root, &["a", "b"]);
    let record = fs::read(root.join("guests/a/guest.toml")).unwrap();
    kill_loop(
        "split",
        "COWHERD_KILL_SEED_SPLIT",
        &root,
        &s.join("logs"),
        |r| {
            let k = (r.n - 1) % PERIOD;
            if k == 0 && r.n > 1 {
                // Share a's files again: its record without the split's `private` rules, a unify.
                fs::write(root.join("guests/a/guest.toml"), &record).unwrap();
                run_to_end(&root, &["unify", "a"], &[0], &r.at());
            }
            let mut paths: Vec<String> = (0..PER_ROUND)
                .map(|i| format!("/usr/lib/pkg{:02}", k * PER_ROUND + i))
                .collect();
            paths.push(format!("/usr/sbin/tool{:02}", k % TOOLS));
            let files: Vec<PathBuf> = paths
                .iter()
                .flat_map(|p| files_below(&base(&root, "a"), p))
                .collect();
            let store = store_inodes(&root);
            assert!(
                files.iter().all(|f| store.contains_key(&ino(f))),
                "a's files to split are store links"
            );
            let mut args = vec!["split".to_string(), "a".into()];
            args.extend(paths.iter().cloned());
            r.kill(&args);
            // At every instant the same files; a directory's mtime may be the split's until the
            // next writer puts it back.
            assert_guests(&root, &want, false, &r.at());

            run_to_end(&root, &args, &[0], &r.at());
            let at = format!("the split after {}", r.at());
            assert_guests(&root, &want, true, &at);
            let store = store_inodes(&root);
            for f in &files {
                assert!(
                    nlink(f) == 1 && !store.contains_key(&ino(f)),
                    "{} is not a private copy after {at}",
                    f.display()
                );
                let twin = base(&root, "b").join(f.strip_prefix(base(&root, "a")).unwrap());
                assert!(
                    store.contains_key(&ino(&twin)),
                    "{} is no longer shared after {at}",
                    twin.display()
                );
            }
            let text = fs::read_to_string(root.join("guests/a/guest.toml")).unwrap();
            for p in &paths {
                let rule = if p.contains("/pkg") {
                    format!("private {p}/**")
                } else {
                    format!("private {p}")
                };
                assert!(text.contains(&rule), "no rule {rule:?} after {at}:\n{text}");
            }
            assert_no_leftovers(&root, &at);
            assert_store_sound(&root, &at);
        },
    );
}

// ---------------------------------------------------------------------------------------------
// destroy
// ---------------------------------------------------------------------------------------------

#[test]
fn a_killed_destroy_is_finished_by_the_next_writer_and_other_guests_never_change() {
    assert_root();
    let s = Scratch::new("kill-destroy");
    let root = fleet(&s, &["keep1", "keep2"], 40, 50);
    let want = views(&root, &["keep1", "keep2"]);
    kill_loop(
        "destroy",
        "COWHERD_KILL_SEED_DESTROY",
        &root,
        &s.join("logs"),
        |r| {
            // A new guest to destroy: keep1's files linked again (its immutable tools copied, and
            // linked by the unify), as `cowherd build` makes one.
            let name = format!("victim{:03}", r.n);
            let src = s.join("src").join(&name);
            link_copy(&base(&root, "keep1"), &src);
            adopt(&root, &src, &name);
            run_to_end(&root, &["unify", &name], &[0], &r.at());
            let mut with_victim = want.clone();
            with_victim.insert(name.clone(), manifest(&base(&root, &name)));

            r.kill(&["destroy", &name]);
            // The guest is whole, or gone (its directory renamed for removal).
            let whole = guest_dirs(&root).contains(&name);
            assert_guests(
                &root,
                if whole { &with_victim } else { &want },
                true,
                &r.at(),
            );

            let out = run_to_end(&root, &["destroy", &name], &[0, 1], &r.at());
            let at = format!("the destroy after {}", r.at());
            if out.status.code() == Some(1) {
                assert!(!whole, "the destroy of a whole guest failed after {at}");
                let line = assert_one_line_error(&out, 1);
                assert!(line.contains("no guest named"), "{line}");
            }
            assert_guests(&root, &want, true, &at);
            let listed = guest_names(&run_json(cowherd(&root).args(["list", "--json"])));
            assert!(!listed.contains(&name), "{name} is listed after {at}");
            assert_no_leftovers(&root, &at);
            assert_store_sound(&root, &at);
        },
    );
}

// ---------------------------------------------------------------------------------------------
// gc
// ---------------------------------------------------------------------------------------------

#[test]
fn a_killed_gc_removes_only_unused_objects_and_the_next_gc_finishes() {
    assert_root();
    const PAIRS: usize = 120;
    const TOOL_PAIRS: usize = 10;
    let s = Scratch::new("kill-gc");
    let root = fleet(&s, &["keep1", "keep2"], 20, 25);
    let want = views(&root, &["keep1", "keep2"]);
    kill_loop("gc", "COWHERD_KILL_SEED_GC", &root, &s.join("logs"), |r| {
        // Objects only a doomed guest uses: pairs of equal files, its own (tools: immutable).
        let name = format!("junk{:03}", r.n);
        adopt_built(&root, s.path(), &name, |d| {
            let mut t = TreeBuilder::new(d);
            for i in 0..PAIRS {
                let bytes = content(&format!("junk-{}-{i}", r.n), 500 + i * 13);
                t.file(format!("opt/junk/p{i:03}/a"), &bytes)
                    .file(format!("opt/junk/p{i:03}/b"), &bytes);
            }
            for i in 0..TOOL_PAIRS {
                let bytes = content(&format!("junk-tool-{}-{i}", r.n), 900);
                t.file(format!("usr/sbin/j{i:02}"), &bytes)
                    .file(format!("usr/sbin/k{i:02}"), &bytes);
            }
            t.finish();
        });
        run_to_end(&root, &["unify", &name], &[0], &r.at());
        run_to_end(&root, &["destroy", &name], &[0], &r.at());
        let before = store_objects(&root);
        let garbage: BTreeSet<String> = before
            .iter()
            .filter(|o| o.nlink == 1)
            .map(|o| o.path.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        assert_eq!(garbage.len(), PAIRS + TOOL_PAIRS, "{garbage:?}");
        let used: BTreeSet<String> = object_names(&root).difference(&garbage).cloned().collect();

        r.kill(&["gc"]);
        // No object in use is gone, no guest changed.
        assert_guests(&root, &want, true, &r.at());
        let now = object_names(&root);
        let lost: Vec<_> = used.difference(&now).collect();
        assert!(
            lost.is_empty(),
            "objects in use removed by {}: {lost:?}",
            r.at()
        );

        run_to_end(&root, &["gc"], &[0], &r.at());
        let at = format!("the gc after {}", r.at());
        assert_eq!(object_names(&root), used, "the store after {at}");
        assert_guests(&root, &want, true, &at);
        assert_no_leftovers(&root, &at);
        assert_store_sound(&root, &at);
    });
}

// ---------------------------------------------------------------------------------------------
// index rebuild
// ---------------------------------------------------------------------------------------------

/// What `stats --json` says of the guests and the store, without times and the index's size.
fn stats_summary(root: &Path) -> Value {
    let mut v = run_json(cowherd(root).args(["stats", "--json", "--top", "0"]));
    for g in v["guests"].as_array_mut().unwrap() {
        g.as_object_mut().unwrap().remove("last_unify");
    }
    v["total"].as_object_mut().unwrap().remove("index_bytes");
    v
}

#[test]
fn a_killed_index_rebuild_is_finished_by_the_next_rebuild_and_no_guest_changes() {
    assert_root();
    let s = Scratch::new("kill-reindex");
    let root = fleet(&s, &["a", "b", "c"], 30, 30);
    let want = views(&root, &["a", "b", "c"]);
    cowherd(&root)
        .args(["index", "rebuild", "--quiet"])
        .assert()
        .success();
    let stats = stats_summary(&root);
    let objects = object_names(&root);
    kill_loop(
        "index rebuild",
        "COWHERD_KILL_SEED_INDEX_REBUILD",
        &root,
        &s.join("logs"),
        |r| {
            // Every third round the index is lost: the rebuild starts from nothing.
            if r.n % 3 == 0 {
                for f in ["index.db", "index.db-wal", "index.db-shm"] {
                    let _ = fs::remove_file(root.join(f));
                }
            }
            r.kill(&["index", "rebuild"]);
            assert_guests(&root, &want, true, &r.at());
            assert_eq!(object_names(&root), objects, "the store after {}", r.at());

            run_to_end(&root, &["index", "rebuild"], &[0], &r.at());
            let at = format!("the rebuild after {}", r.at());
            assert_guests(&root, &want, true, &at);
            assert_eq!(stats_summary(&root), stats, "stats after {at}");
            let damaged: Vec<_> = fs::read_dir(&root)
                .unwrap()
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with("index.db.damaged"))
                .collect();
            assert!(damaged.is_empty(), "{damaged:?} after {at}");
            assert_no_leftovers(&root, &at);
            assert_store_sound(&root, &at);
        },
    );
}

// ---------------------------------------------------------------------------------------------
// verify --repair
// ---------------------------------------------------------------------------------------------

/// `chattr SIGN i PATH`.
fn chattr_i(sign: char, path: &Path) {
    let status = Command::new("chattr")
        .arg(format!("{sign}i"))
        .arg(path)
        .status()
        .unwrap();
    assert!(status.success(), "chattr {sign}i {}", path.display());
}

#[test]
fn a_killed_verify_repair_never_changes_a_view_and_the_next_one_repairs_all() {
    assert_root();
    const STRAYS: usize = 10;
    /// Copy-on-write objects changed in place per round (their mtime).
    const REKEYS: usize = 12;
    /// Immutable objects whose flag is cleared per round.
    const UNFLAGGED: usize = 3;
    const STALE: usize = 20;
    let s = Scratch::new("kill-repair");
    let root = fleet(&s, &["a", "b"], 20, 20);
    let mut want = views(&root, &["a", "b"]);
    let lost_found = root.join("store/lost+found");
    kill_loop(
        "verify --repair",
        "COWHERD_KILL_SEED_VERIFY_REPAIR",
        &root,
        &s.join("logs"),
        |r| {
            let objects = store_objects(&root);
            // Things to repair. Strays in the store, in a fan directory and at the top.
            let fan = objects[0].path.parent().unwrap().to_path_buf();
            let mut strays: Vec<String> = (0..STRAYS)
                .map(|i| {
                    let name = format!("stray-{}-{i}", r.n);
                    fs::write(fan.join(&name), b"not an object\n").unwrap();
                    format!("{}_{name}", fan.file_name().unwrap().to_string_lossy())
                })
                .collect();
            let top = format!("stray-{}", r.n);
            fs::write(root.join("store/objects").join(&top), b"top\n").unwrap();
            strays.push(top);
            // Immutable objects without their flag; one of them also changed in place.
            let mut tools: Vec<&StoreObject> = objects.iter().filter(|o| o.marker == 'i').collect();
            tools.shuffle(&mut *r.rng);
            let unflagged: Vec<&StoreObject> = tools[..UNFLAGGED].to_vec();
            for o in &unflagged {
                chattr_i('-', &o.path);
            }
            // Objects changed in place (their mtime: the guests see it, and keep seeing it).
            let mut cow: Vec<&StoreObject> = objects.iter().filter(|o| o.marker == 'c').collect();
            cow.shuffle(&mut *r.rng);
            let mut changed: Vec<&StoreObject> = cow[..REKEYS].to_vec();
            changed.push(unflagged[0]);
            let mut mtimes = BTreeMap::new();
            for (i, o) in changed.iter().enumerate() {
                let mtime = (1_650_000_000 + (r.n * 100 + i) as i64, 0);
                set_mtime(&o.path, mtime);
                mtimes.insert(o.dev_ino, mtime);
            }
            for (name, view) in want.iter_mut() {
                let b = base(&root, name);
                for (rel, e) in view.iter_mut() {
                    if e.kind == Kind::File
                        && let Some(&mtime) = mtimes.get(&ino(&at(&b, rel)))
                    {
                        e.mtime = mtime;
                    }
                }
            }
            // Stale index entries: files of a given new inodes (same content and metadata).
            let a = base(&root, "a");
            let mut linked: Vec<PathBuf> = files_below(&a, "usr/lib")
                .into_iter()
                .filter(|f| nlink(f) > 1)
                .collect();
            linked.shuffle(&mut *r.rng);
            for f in linked.iter().take(STALE) {
                rewrite_as_new_inode(f);
            }

            r.kill(&["verify", "--repair"]);
            assert_guests(&root, &want, true, &r.at());

            run_to_end(&root, &["verify", "--repair"], &[0], &r.at());
            let at = format!("the repair after {}", r.at());
            assert_guests(&root, &want, true, &at);
            for stray in &strays {
                assert!(
                    lost_found.join(stray).is_file(),
                    "{stray} is not in store/lost+found after {at}"
                );
            }
            for o in &unflagged[1..] {
                assert!(
                    is_immutable(&o.path),
                    "{} lacks its flag after {at}",
                    o.path.display()
                );
            }
            for o in &changed {
                assert!(
                    !o.path.exists(),
                    "{} keeps its old name after {at}",
                    o.path.display()
                );
            }
            assert_no_leftovers(&root, &at);
            assert_store_sound(&root, &at);
        },
    );
}

// ---------------------------------------------------------------------------------------------
// import, import --resync
// ---------------------------------------------------------------------------------------------

/// The machine's fstab, which the import replaces by a neutral one.
const FSTAB: &str = "UUID=5f1e0c7e-1111-4c3a-9d55-0123456789ab / ext4 errors=remount-ro 0 1\n";

/// A machine to import: a [`pkg_tree`] with an `/etc/fstab` (the one fixup it gets).
fn machine(dir: &Path, pkgs: usize, per_pkg: usize) {
    pkg_tree(dir, "machine", pkgs, per_pkg, "machine");
    TreeBuilder::new(dir).file("etc/fstab", FSTAB.as_bytes());
}

/// What differs between `base` and what an import of a machine whose manifest is `source` makes: every
/// path identical, but `/etc/fstab` neutral and the machine's kept as `fstab.cowherd-orig`
/// (and `/etc`'s mtime, which that changes); returns the differences.
fn imported_differences(source: &Manifest, base: &Path) -> Vec<String> {
    imported_differences_at(source, base, false)
}

/// [`imported_differences`]; with `mid_unify`, what a unify killed halfway leaves for the
/// next writer is no difference: its `.cowherd~` names (links of the objects it was putting
/// in place) and the directory mtimes it had not put back yet.
fn imported_differences_at(source: &Manifest, base: &Path, mid_unify: bool) -> Vec<String> {
    let mut got = manifest(base);
    if mid_unify {
        got.retain(|rel, _| {
            !rel.rsplit(|&b| b == b'/')
                .next()
                .is_some_and(|name| name.starts_with(b".cowherd~"))
        });
    }
    let fstab = b"etc/fstab".to_vec();
    let orig = b"etc/fstab.cowherd-orig".to_vec();
    let mut want = source.clone();
    want.remove(&fstab);
    let mut have = got.clone();
    have.remove(&fstab);
    have.remove(&orig);
    if let (Some(w), Some(h)) = (want.get_mut(&b"etc"[..]), have.get(&b"etc"[..])) {
        w.mtime = h.mtime;
    }
    let opts = CompareOpts {
        dir_mtimes: !mid_unify,
        allow_extra: false,
    };
    let (mut problems, _) = compare_manifests(&want, &have, opts);
    match got.get(&orig) {
        Some(kept) => {
            let mut was = source[&fstab].clone();
            was.hardlinks = kept.hardlinks.clone();
            if &was != kept {
                problems.push("etc/fstab.cowherd-orig is not the machine's fstab".into());
            }
        }
        None => problems.push("no etc/fstab.cowherd-orig".into()),
    }
    if fs::read_to_string(base.join("etc/fstab")).ok().as_deref()
        != Some(cowherd_builder::NEUTRAL_FSTAB)
    {
        problems.push("etc/fstab is not the neutral one".into());
    }
    problems
}

fn assert_imported(source: &Manifest, base: &Path, what: &str) {
    assert_imported_at(source, base, false, what);
}

fn assert_imported_at(source: &Manifest, base: &Path, mid_unify: bool, what: &str) {
    let problems = imported_differences_at(source, base, mid_unify);
    let shown: Vec<&str> = problems.iter().take(30).map(String::as_str).collect();
    assert!(
        problems.is_empty(),
        "{what}: {} difference(s) from the machine:\n  {}",
        problems.len(),
        shown.join("\n  ")
    );
}

#[test]
fn a_killed_import_leaves_no_guest_or_a_whole_one_and_the_next_import_finishes() {
    assert_root();
    let s = Scratch::new("kill-import");
    let root = immutable_sbin_root(&s);
    let tree = s.join("machine");
    machine(&tree, 12, 50);
    let source = manifest(&tree);
    let from = tree.to_str().unwrap().to_string();
    // A guest of the same files: an import links to its objects.
    adopt_built(&root, s.path(), "twin", |d| machine(d, 12, 50));
    cowherd(&root)
        .args(["unify", "twin", "--quiet"])
        .assert()
        .success();
    let want = views(&root, &["twin"]);
    kill_loop(
        "import",
        "COWHERD_KILL_SEED_IMPORT",
        &root,
        &s.join("logs"),
        |r| {
            let name = format!("imp{:03}", r.n);
            let args = ["import", &name, "--from", &from];
            r.kill(&args);
            wait_for_no_process_mentioning(&format!(".{name}.creating"));
            // No guest, or a whole one.
            let whole = guest_dirs(&root).contains(&name);
            if whole {
                // Killed in the unify that follows the copy: its leftovers are the next
                // writer's to clean up (checked strictly after it).
                assert_imported_at(
                    &source,
                    &base(&root, &name),
                    true,
                    &format!("{name} after {}", r.at()),
                );
            }

            // The next import of the name: it makes the guest, or refuses the one there — whose
            // unification the killed import had not finished: a unify does.
            let out = run_to_end(&root, &args, &[0, 1], &r.at());
            if out.status.code() == Some(1) {
                assert!(whole, "the import failed after {}", r.at());
                let line = assert_one_line_error(&out, 1);
                assert!(line.contains("exists already"), "{line}");
                run_to_end(&root, &["unify", &name], &[0], &r.at());
            }
            let at = format!("the import after {}", r.at());
            assert_imported(&source, &base(&root, &name), &at);
            let mut with_new = want.clone();
            with_new.insert(name.clone(), manifest(&base(&root, &name)));
            assert_guests(&root, &with_new, true, &at);
            assert_no_leftovers(&root, &at);
            assert_store_sound(&root, &at);
            run_to_end(&root, &["destroy", &name], &[0], &at);
        },
    );
}

/// Changes the machine at `tree` between two resyncs: files rewritten (new bytes, new mtime),
/// removed and added.
fn change_machine(tree: &Path, round: usize, rng: &mut ChaCha8Rng) {
    let mut files: Vec<PathBuf> = files_under(&tree.join("usr/lib"));
    files.shuffle(rng);
    let mtime = (1_700_000_000 + round as i64, 0);
    for f in files.iter().take(10) {
        fs::write(
            f,
            content(&format!("round-{round}-{}", f.display()), 1000 + round),
        )
        .unwrap();
        set_mtime(f, mtime);
    }
    for f in files.iter().skip(10).take(3) {
        fs::remove_file(f).unwrap();
    }
    for i in 0..3 {
        let f = tree.join(format!("usr/lib/new{round:03}/n{i}"));
        fs::create_dir_all(f.parent().unwrap()).unwrap();
        fs::write(&f, content(&format!("new-{round}-{i}"), 800 + i)).unwrap();
        set_mtime(&f, mtime);
    }
}

#[test]
fn a_killed_resync_leaves_the_old_or_the_new_tree_and_the_next_resync_finishes() {
    assert_root();
    let s = Scratch::new("kill-resync");
    let root = immutable_sbin_root(&s);
    let tree = s.join("machine");
    machine(&tree, 16, 50);
    let from = tree.to_str().unwrap().to_string();
    cowherd(&root)
        .args(["import", "web", "--from", &from, "--quiet"])
        .assert()
        .success();
    let mut old = manifest(&tree);
    assert_imported(&old, &base(&root, "web"), "the first import");
    let args = ["import", "web", "--resync", "--from", &from];
    let resync_dir = root.join("guests/web/resync");
    let needle = resync_dir.to_str().unwrap().to_string();
    kill_loop(
        "import --resync",
        "COWHERD_KILL_SEED_IMPORT_RESYNC",
        &root,
        &s.join("logs"),
        |r| {
            change_machine(&tree, r.n, r.rng);
            let new = manifest(&tree);
            r.kill(&args);
            wait_for_no_process_mentioning(&needle);
            // The old tree or the new one, never a mix.
            let b = base(&root, "web");
            let to_new = imported_differences(&new, &b);
            if !to_new.is_empty() {
                let to_old = imported_differences(&old, &b);
                assert!(
                    to_old.is_empty(),
                    "after {}, web's base is neither the old tree nor the new one:\n  from the \
                     new: {}\n  from the old: {}",
                    r.at(),
                    to_new
                        .iter()
                        .take(20)
                        .cloned()
                        .collect::<Vec<_>>()
                        .join("\n    "),
                    to_old
                        .iter()
                        .take(20)
                        .cloned()
                        .collect::<Vec<_>>()
                        .join("\n    ")
                );
            }

            run_to_end(&root, &args, &[0], &r.at());
            let at = format!("the resync after {}", r.at());
            assert_imported(&new, &b, &at);
            assert_eq!(guest_dirs(&root), BTreeSet::from(["web".to_string()]));
            assert_no_leftovers(&root, &at);
            assert_store_sound(&root, &at);
            old = new;
        },
    );
}

// ---------------------------------------------------------------------------------------------
// build --count
// ---------------------------------------------------------------------------------------------

/// Guests per `build --count`.
const COUNT: usize = 3;

/// The files every built guest has of its own.
const IDENTITY: [&str; 3] = ["etc/hostname", "etc/hosts", "etc/machine-id"];

/// Asserts that guest `name` is whole: its view is the template's, but its identity files
/// (and `/etc`'s mtime, which writing them changes), and its hostname is its name.
fn assert_built(template: &Manifest, root: &Path, name: &str, what: &str) {
    let b = base(root, name);
    let mut got = manifest(&b);
    let mut want = template.clone();
    for f in IDENTITY {
        assert!(
            got.remove(f.as_bytes()).is_some(),
            "{name} has no /{f} ({what})"
        );
        want.remove(f.as_bytes());
    }
    if let (Some(w), Some(g)) = (want.get_mut(&b"etc"[..]), got.get(&b"etc"[..])) {
        w.mtime = g.mtime;
    }
    assert_view(&want, &got, true, &format!("guest {name} ({what})"));
    assert_eq!(
        fs::read_to_string(b.join("etc/hostname")).unwrap(),
        format!("{name}\n"),
        "{what}"
    );
    assert!(
        root.join("guests").join(name).join("guest.toml").is_file(),
        "{what}"
    );
}

#[test]
fn a_killed_build_count_leaves_whole_guests_or_none_and_the_next_build_finishes() {
    assert_root();
    let s = Scratch::new("kill-build");
    let root = init_root(s.path());
    let tree = s.join("rootfs");
    let mut t = TreeBuilder::new(&tree);
    for i in 0..600 {
        t.file(
            format!("usr/share/pkg{:02}/file{i:04}", i / 50),
            &content(&format!("tiny-{i}"), 300 + (i * 211) % 3000),
        );
    }
    t.file("etc/hostname", b"template\n")
        .file("etc/hosts", b"127.0.0.1 localhost\n")
        .file("etc/machine-id", b"")
        .file("etc/services", &content("services", 2000));
    t.finish();
    let archive = s.join("rootfs.tar");
    let status = Command::new("tar")
        .args([
            "--create",
            "--numeric-owner",
            "--xattrs",
            "--xattrs-include=*",
            "--file",
        ])
        .arg(&archive)
        .arg("--directory")
        .arg(&tree)
        .arg(".")
        .status()
        .unwrap();
    assert!(status.success());
    fs::create_dir_all(root.join("templates.d")).unwrap();
    fs::write(
        root.join("templates.d/tiny.toml"),
        format!("method = \"tarball\"\nsource = \"{}\"\n", archive.display()),
    )
    .unwrap();
    cowherd(&root)
        .args(["template", "build", "tiny", "--quiet"])
        .assert()
        .success();
    let template = manifest(&root.join("templates/tiny/1/tree"));
    kill_loop(
        "build --count",
        "COWHERD_KILL_SEED_BUILD",
        &root,
        &s.join("logs"),
        |r| {
            let prefix = format!("b{:03}-", r.n);
            let count = COUNT.to_string();
            let args = [
                "build",
                "--count",
                &count,
                "--prefix",
                &prefix,
                "--template",
                "tiny",
            ];
            let names: Vec<String> = (1..=COUNT).map(|i| format!("{prefix}{i:02}")).collect();
            r.kill(&args);
            let built: Vec<String> = guest_dirs(&root).into_iter().collect();
            for g in &built {
                assert!(names.contains(g), "unexpected guest {g} after {}", r.at());
                assert_built(&template, &root, g, &r.at());
            }

            // The next build makes those still missing (and reports those there: exit 3).
            let out = run_to_end(&root, &args, &[0, 3], &r.at());
            let at = format!("the build after {}", r.at());
            if out.status.code() == Some(3) {
                assert!(!built.is_empty(), "the build failed after {at}");
            }
            assert_eq!(
                guest_dirs(&root),
                names.iter().cloned().collect::<BTreeSet<_>>(),
                "the guests after {at}"
            );
            for g in &names {
                assert_built(&template, &root, g, &at);
            }
            assert_no_leftovers(&root, &at);
            assert_store_sound(&root, &at);
            for g in &names {
                run_to_end(&root, &["destroy", g], &[0], &at);
            }
        },
    );
}

// ---------------------------------------------------------------------------------------------
// The kill windows the loops found, made on purpose
// ---------------------------------------------------------------------------------------------

/// `SQL` run on the root's index (no cowherd running).
fn index_sql(root: &Path, sql: &str, params: impl rusqlite::Params) {
    let db = rusqlite::Connection::open(root.join("index.db")).unwrap();
    db.execute(sql, params).unwrap();
}

#[test]
fn a_destroy_killed_after_its_rename_leaves_no_index_rows_after_the_next_writer() {
    assert_root();
    let s = Scratch::new("kill-destroy-rows");
    let root = fleet(&s, &["a", "b"], 4, 10);
    // What a destroy killed right after its rename leaves: the guest under its doomed name,
    // its rows still in the index.
    fs::rename(root.join("guests/a"), root.join("guests/.a.destroying")).unwrap();
    cowherd(&root)
        .args(["gc", "--dry-run", "--quiet"])
        .assert()
        .success();
    assert!(!root.join("guests/.a.destroying").exists());
    assert_eq!(indexed_guests(&root), BTreeSet::from(["b".to_string()]));
    let stats = stats_summary(&root);
    assert_eq!(
        stats["total"]["files"], stats["guests"][0]["files"],
        "{stats:#}"
    );
    assert_store_sound(
        &root,
        "the next writer after a destroy killed after its rename",
    );
}

#[test]
fn a_verify_repair_killed_between_renaming_an_object_and_its_row_is_finished_by_the_next_writer() {
    assert_root();
    let s = Scratch::new("kill-rekey-row");
    let root = fleet(&s, &["a", "b"], 4, 10);
    let object = store_objects(&root)
        .into_iter()
        .find(|o| o.marker == 'c')
        .unwrap();
    let old = object
        .path
        .file_name()
        .unwrap()
        .to_str()
        .unwrap()
        .to_string();
    set_mtime(&object.path, (1_650_000_000, 0));
    let want = views(&root, &["a", "b"]);
    cowherd(&root)
        .args(["verify", "--repair", "--quiet"])
        .assert()
        .success();
    let new = store_inodes(&root)[&object.dev_ino]
        .path
        .file_name()
        .unwrap()
        .to_str()
        .unwrap()
        .to_string();
    assert_ne!(new, old);
    // What a repair killed between the rename and the row's new name leaves: the object under
    // its new name, its row under the old one, the pair journalled.
    index_sql(
        &root,
        "UPDATE objects SET name = ?1 WHERE name = ?2",
        [&old, &new],
    );
    index_sql(
        &root,
        "INSERT INTO journal(op, path) VALUES ('rekey', ?1)",
        [format!("{old}/{new}").into_bytes()],
    );
    cowherd(&root)
        .args(["gc", "--dry-run", "--quiet"])
        .assert()
        .success();
    assert_store_sound(
        &root,
        "the next writer after a repair killed after a rename",
    );
    assert_guests(&root, &want, true, "the next writer");

    // Killed before the rename: the object keeps its name, the next repair files it.
    let object = store_objects(&root)
        .into_iter()
        .find(|o| o.marker == 'c' && o.dev_ino != object.dev_ino)
        .unwrap();
    let old = object
        .path
        .file_name()
        .unwrap()
        .to_str()
        .unwrap()
        .to_string();
    set_mtime(&object.path, (1_650_000_001, 0));
    let want = views(&root, &["a", "b"]);
    index_sql(
        &root,
        "INSERT INTO journal(op, path) VALUES ('rekey', ?1)",
        [format!("{old}/{old}9").into_bytes()],
    );
    cowherd(&root)
        .args(["verify", "--repair", "--quiet"])
        .assert()
        .success();
    assert!(!object.path.exists());
    assert_store_sound(&root, "a repair after one killed before its rename");
    assert_guests(&root, &want, true, "the repair");
}

#[test]
fn a_split_killed_after_its_rename_is_finished_by_the_next_split() {
    assert_root();
    let s = Scratch::new("kill-split-row");
    let root = fleet(&s, &["a", "b"], 4, 10);
    let want = views(&root, &["a", "b"]);
    let path = base(&root, "a").join("usr/lib/pkg01/f003");
    // What a split killed between its rename and dropping the path's index row leaves: a
    // private copy in place, the row still naming the store object.
    rewrite_as_new_inode(&path);
    let out = run_to_end(
        &root,
        &["split", "a", "/usr/lib/pkg01/f003"],
        &[0],
        "a split killed after its rename",
    );
    assert!(nlink(&path) == 1, "{out:?}");
    assert_guests(&root, &want, true, "the next split");
    assert_store_sound(&root, "the split after one killed after its rename");
}

// ---------------------------------------------------------------------------------------------
// snapshot, rollback
// ---------------------------------------------------------------------------------------------

/// Changes guest `name`'s upper layer directly (it is unmounted), as a guest's writes through
/// its overlay would: a new file, a changed shared file, a deleted one (a whiteout), a new
/// directory. Round `n` picks the paths.
fn change_upper(root: &Path, name: &str, n: usize, pkgs: usize) {
    let upper = upper(root, name);
    let pkg = |k: usize| format!("usr/lib/pkg{:02}", k % pkgs);
    let mut t = TreeBuilder::new(&upper);
    t.file(
        format!("{}/new{n:03}", pkg(n)),
        &content(&format!("new-{n}"), 900 + n * 13),
    )
    .file(
        format!("{}/f001", pkg(n + 1)),
        &content(&format!("changed-{n}"), 1_500),
    )
    .file(format!("srv/round{n:03}/data"), &content("srv", 300 + n));
    t.finish();
    // A whiteout for a file of base: a 0/0 character device.
    let gone = upper.join(pkg(n + 2)).join("f002");
    fs::create_dir_all(gone.parent().unwrap()).unwrap();
    if fs::symlink_metadata(&gone).is_err() {
        nix::sys::stat::mknod(
            &gone,
            nix::sys::stat::SFlag::S_IFCHR,
            nix::sys::stat::Mode::empty(),
            0,
        )
        .unwrap();
    }
}

/// The names of guest `name`'s snapshots (not the dot-entries a killed run leaves).
fn snapshot_names(root: &Path, name: &str) -> BTreeSet<String> {
    match fs::read_dir(root.join("guests").join(name).join("snapshots")) {
        Ok(d) => d
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| !n.starts_with('.'))
            .collect(),
        Err(_) => BTreeSet::new(),
    }
}

/// The tree of snapshot `snap` of guest `name`.
fn snapshot_tree(root: &Path, name: &str, snap: &str) -> PathBuf {
    root.join("guests")
        .join(name)
        .join("snapshots")
        .join(snap)
        .join("tree")
}

/// No dot-entry (a snapshot being made or removed, a rollback in flight) in any guest's
/// `snapshots/`, no `attempt.toml`, and the rest of [`assert_no_leftovers`].
fn assert_no_snapshot_leftovers(root: &Path, at: &str) {
    assert_no_leftovers(root, at);
    for g in guest_dirs(root) {
        let dir = root.join("guests").join(&g);
        let left: Vec<String> = fs::read_dir(dir.join("snapshots"))
            .map(|d| {
                d.map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                    .filter(|n| n.starts_with('.'))
                    .collect()
            })
            .unwrap_or_default();
        assert!(
            left.is_empty(),
            "guests/{g}/snapshots holds {left:?} after {at}"
        );
        for f in ["attempt.toml", ".upper.abandoned"] {
            assert!(
                fs::symlink_metadata(dir.join(f)).is_err(),
                "guests/{g}/{f} is left after {at}"
            );
        }
    }
}

#[test]
fn a_killed_snapshot_leaves_the_view_and_every_snapshot_whole_and_the_next_one_finishes() {
    assert_root();
    own_mount_namespace();
    const PKGS: usize = 30;
    let s = Scratch::new("kill-snapshot");
    let root = fleet(&s, &["a", "b"], PKGS, 20);
    let other = views(&root, &["b"]);
    // The snapshots kept so far, with what each must show.
    let mut kept: BTreeMap<String, Manifest> = BTreeMap::new();
    kill_loop_n(
        "snapshot",
        "COWHERD_KILL_SEED_SNAPSHOT",
        &root,
        &s.join("logs"),
        30,
        |r| {
            change_upper(&root, "a", r.n, PKGS);
            let view = merged_manifest(&root, "a");
            let name = format!("s{:03}", r.n);
            r.kill(&["snapshot", "a", "--name", &name]);
            // The fold before the snapshot never changes the view; the snapshot is whole or
            // not there; the others never change.
            assert_view(&view, &merged_manifest(&root, "a"), false, &r.at());
            let made = snapshot_names(&root, "a");
            if made.contains(&name) {
                assert_view(
                    &view,
                    &manifest(&snapshot_tree(&root, "a", &name)),
                    true,
                    &r.at(),
                );
            }
            for (k, m) in &kept {
                assert_view(m, &manifest(&snapshot_tree(&root, "a", k)), true, &r.at());
            }

            let out = run_to_end(&root, &["snapshot", "a", "--name", &name], &[0, 1], &r.at());
            let at = format!("the snapshot after {}", r.at());
            if out.status.code() == Some(1) {
                assert!(made.contains(&name), "the snapshot failed after {at}");
                assert!(assert_one_line_error(&out, 1).contains("already"));
            }
            assert_view(&view, &merged_manifest(&root, "a"), true, &at);
            assert_view(
                &view,
                &manifest(&snapshot_tree(&root, "a", &name)),
                true,
                &at,
            );
            kept.insert(name.clone(), view);
            // Three at most: the oldest goes.
            if kept.len() > 3 {
                let oldest = kept.keys().next().unwrap().clone();
                run_to_end(&root, &["snapshot", "remove", "a", &oldest], &[0], &at);
                kept.remove(&oldest);
            }
            assert_eq!(
                snapshot_names(&root, "a"),
                kept.keys().cloned().collect::<BTreeSet<_>>(),
                "a's snapshots after {at}"
            );
            for (k, m) in &kept {
                assert_view(m, &manifest(&snapshot_tree(&root, "a", k)), true, &at);
            }
            assert_view(&other["b"], &manifest(&base(&root, "b")), true, &at);
            assert_no_snapshot_leftovers(&root, &at);
            // The fold moved files into base, and each new link changed a ctime: the index
            // is a run behind until a unify rescans a.
            run_to_end(&root, &["unify", "a"], &[0], &at);
            assert_store_sound(&root, &at);
        },
    );
}

#[test]
fn a_killed_rollback_leaves_the_old_or_the_snapshot_tree_and_the_next_one_finishes() {
    assert_root();
    own_mount_namespace();
    const PKGS: usize = 30;
    let s = Scratch::new("kill-rollback");
    let root = fleet(&s, &["a", "b"], PKGS, 20);
    let other = views(&root, &["b"]);
    run_to_end(
        &root,
        &["snapshot", "a", "--name", "golden"],
        &[0],
        "the first snapshot",
    );
    let golden = manifest(&snapshot_tree(&root, "a", "golden"));
    kill_loop_n(
        "rollback",
        "COWHERD_KILL_SEED_ROLLBACK",
        &root,
        &s.join("logs"),
        30,
        |r| {
            change_upper(&root, "a", r.n, PKGS);
            let before = merged_manifest(&root, "a");
            r.kill(&["rollback", "a", "golden"]);
            // The tree before, or the snapshot's: never a mix.
            let seen = merged_manifest(&root, "a");
            let opts = CompareOpts {
                dir_mtimes: false,
                allow_extra: false,
            };
            let (to_before, _) = compare_manifests(&before, &seen, opts);
            let (to_golden, _) = compare_manifests(&golden, &seen, opts);
            assert!(
                to_before.is_empty() || to_golden.is_empty(),
                "a shows neither its tree before nor the snapshot's after {}: {:?} / {:?}",
                r.at(),
                to_before.iter().take(5).collect::<Vec<_>>(),
                to_golden.iter().take(5).collect::<Vec<_>>()
            );
            assert_view(
                &golden,
                &manifest(&snapshot_tree(&root, "a", "golden")),
                true,
                &r.at(),
            );

            run_to_end(&root, &["rollback", "a", "golden"], &[0], &r.at());
            let at = format!("the rollback after {}", r.at());
            assert_view(&golden, &merged_manifest(&root, "a"), true, &at);
            assert_view(
                &golden,
                &manifest(&snapshot_tree(&root, "a", "golden")),
                true,
                &at,
            );
            // The tree before is kept: one of the new snapshots shows it.
            let new: Vec<String> = snapshot_names(&root, "a")
                .into_iter()
                .filter(|n| n != "golden")
                .collect();
            let undo = new.iter().any(|n| {
                let (d, _) =
                    compare_manifests(&before, &manifest(&snapshot_tree(&root, "a", n)), opts);
                d.is_empty()
            });
            assert!(
                undo,
                "no snapshot keeps a's tree before the rollback after {at}: {new:?}"
            );
            for n in &new {
                run_to_end(&root, &["snapshot", "remove", "a", n], &[0], &at);
            }
            assert_view(&other["b"], &manifest(&base(&root, "b")), true, &at);
            assert_no_snapshot_leftovers(&root, &at);
            // The fold moved files into base, and each new link changed a ctime: the index
            // is a run behind until a unify rescans a.
            run_to_end(&root, &["unify", "a"], &[0], &at);
            assert_store_sound(&root, &at);
        },
    );
}

// ---------------------------------------------------------------------------------------------
// upgrade
// ---------------------------------------------------------------------------------------------

/// A guest tree for [`STUB_APT`]: [`stub_apt_tree`] and [`pkg_tree`]'s files.
fn stub_guest(dir: &Path, host: &str) {
    pkg_tree(dir, "stubfleet", 10, 20, host);
    stub_apt_tree(dir);
}

/// Guest `name`'s merged view is whole: the stub's files all of the version its version file
/// says (never a mix), everything else as in `other` (directory mtimes aside: an upgrade
/// changes them). Returns the version.
fn assert_stub_whole(root: &Path, name: &str, other: &Manifest, at: &str) -> u64 {
    let view = merged_manifest(root, name);
    let version_hash = view
        .get(b"var/lib/stub/version".as_slice())
        .and_then(|e| e.blake3)
        .unwrap_or_else(|| panic!("{name} has no stub version after {at}"));
    let v = (1..10_000u64)
        .find(|v| blake3::hash(format!("{v}\n").as_bytes()) == version_hash)
        .unwrap_or_else(|| panic!("{name}'s stub version is not a number after {at}"));
    for i in 0..STUB_FILES {
        let rel = format!("usr/lib/stub/f{i}");
        let got = view.get(rel.as_bytes()).and_then(|e| e.blake3);
        assert!(
            got == Some(blake3::hash(&stub_content(v, i))),
            "{name}:/{rel} is not of version {v} (a mix of versions) after {at}"
        );
    }
    let rest: Manifest = view
        .into_iter()
        .filter(|(k, _)| !k.starts_with(b"usr/lib/stub") && !k.starts_with(b"var/lib/stub"))
        .collect();
    assert_view(other, &rest, false, &format!("{name} after {at}"));
    v
}

#[test]
fn a_killed_upgrade_leaves_each_guest_before_or_after_and_the_next_upgrade_finishes() {
    assert_root();
    own_mount_namespace();
    let s = Scratch::new("kill-upgrade");
    let root = init_root(s.path());
    let guests = ["a", "b"];
    for g in guests {
        adopt_built(&root, s.path(), g, |d| stub_guest(d, g));
    }
    run_to_end(&root, &["unify", "--all"], &[0], "the first unify");
    let others: BTreeMap<&str, Manifest> = guests
        .iter()
        .map(|g| {
            let view: Manifest = merged_manifest(&root, g)
                .into_iter()
                .filter(|(k, _)| !k.starts_with(b"usr/lib/stub") && !k.starts_with(b"var/lib/stub"))
                .collect();
            (*g, view)
        })
        .collect();
    let logs = s.join("upgrade-logs");
    let logs_arg = logs.to_string_lossy().into_owned();
    let args = [
        "upgrade",
        "--all",
        "--jobs",
        "2",
        "--logs",
        logs_arg.as_str(),
    ];
    kill_loop_n(
        "upgrade",
        "COWHERD_KILL_SEED_UPGRADE",
        &root,
        &s.join("logs"),
        30,
        |r| {
            let before: BTreeMap<&str, u64> = guests
                .iter()
                .map(|g| (*g, assert_stub_whole(&root, g, &others[g], &r.at())))
                .collect();
            r.kill(&args);
            // The next writer settles what the kill left (here one with nothing to do).
            run_to_end(&root, &["gc", "--dry-run"], &[0], &r.at());
            let mut settled = BTreeMap::new();
            for g in guests {
                let v = assert_stub_whole(&root, g, &others[g], &r.at());
                assert!(
                    v == before[g] || v == before[g] + 1,
                    "{g} is at version {v} after {} (was {})",
                    r.at(),
                    before[g]
                );
                settled.insert(g, v);
            }
            run_to_end(&root, &args, &[0], &r.at());
            let at = format!("the upgrade after {}", r.at());
            for g in guests {
                let v = assert_stub_whole(&root, g, &others[g], &at);
                assert_eq!(v, settled[g] + 1, "{g}'s version after {at}");
                for n in snapshot_names(&root, g) {
                    run_to_end(&root, &["snapshot", "remove", g, &n], &[0], &at);
                }
            }
            assert_no_snapshot_leftovers(&root, &at);
            let caches: Vec<String> = fs::read_dir(root.join("cache"))
                .map(|d| {
                    d.map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                        .collect()
                })
                .unwrap_or_default();
            assert!(
                caches.is_empty(),
                "download caches left after {at}: {caches:?}"
            );
            // Removing the snapshots changed the ctimes of the files they shared with base.
            run_to_end(&root, &["unify", "--all"], &[0], &at);
            assert_store_sound(&root, &at);
        },
    );
}
