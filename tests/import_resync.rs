//! What a resync does with the guest's own changes, and what an import never lets into a
//! guest: a host file reached through a symlink in base, the cowherd root, overlayfs's own
//! metadata. Through the real binary, with real overlays, real rsync and real folds.

mod common;

use std::fs;
use std::os::unix::fs::{MetadataExt, symlink};
use std::path::{Path, PathBuf};

use common::*;

/// A small machine: a few files of a distribution, an /etc, a log.
fn small_machine(dir: &Path) {
    let mut t = TreeBuilder::new(dir);
    t.file("etc/hostname", b"oldweb\n")
        .file("etc/motd", b"welcome\n")
        .file("etc/app.conf", b"threads = 4\n")
        .file("usr/bin/tool", &content("tool", 9_000))
        .file("usr/share/doc/readme", &content("readme", 3_000))
        .file("var/log/syslog", &content("syslog", 5_000))
        .dir("srv", 0o755)
        .finish();
}

struct Fx {
    scratch: Scratch,
    root: PathBuf,
    machine: PathBuf,
}

impl Fx {
    /// A root and a machine imported as `g`.
    fn new(tag: &str) -> Fx {
        assert_root();
        let scratch = Scratch::new(tag);
        let root = init_root(scratch.path());
        let machine = scratch.join("machine");
        small_machine(&machine);
        let fx = Fx {
            scratch,
            root,
            machine,
        };
        fx.import(&[]).success();
        fx
    }

    fn import(&self, extra: &[&str]) -> assert_cmd::assert::Assert {
        cowherd(&self.root)
            .arg("import")
            .arg("g")
            .arg("--from")
            .arg(&self.machine)
            .args(extra)
            .assert()
    }

    fn resync(&self, extra: &[&str]) -> std::process::Output {
        cowherd(&self.root)
            .args(["import", "g", "--resync", "--from"])
            .arg(&self.machine)
            .args(extra)
            .output()
            .unwrap()
    }

    fn base(&self) -> PathBuf {
        base(&self.root, "g")
    }

    /// Mounts the guest, runs `change` on its merged view, unmounts it.
    fn inside(&self, change: impl FnOnce(&Path)) {
        cowherd(&self.root).args(["mount", "g"]).assert().success();
        change(&rootfs(&self.root, "g"));
        cowherd(&self.root).args(["umount", "g"]).assert().success();
    }

    fn fold(&self) {
        cowherd(&self.root).args(["fold", "g"]).assert().success();
    }

    /// The guest changes a file and makes a new one (inside its overlay).
    fn guest_changes(&self) {
        self.inside(|rootfs| {
            fs::write(rootfs.join("etc/app.conf"), b"threads = 64\n").unwrap();
            fs::write(rootfs.join("etc/guest-new.conf"), b"mine\n").unwrap();
            fs::remove_file(rootfs.join("usr/share/doc/readme")).unwrap();
        });
    }
}

fn stdout(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn a_resync_after_fold_refuses_and_lists_what_the_guest_changed() {
    let fx = Fx::new("resync-fold-refused");
    fx.guest_changes();
    fx.fold();
    let before = manifest(&fx.base());
    // The machine goes on too.
    fs::write(fx.machine.join("etc/motd"), b"welcome, later\n").unwrap();

    let out = fx.resync(&[]);
    let line = assert_one_line_error(&out, 1);
    assert!(
        line.contains("guest g changed 3 paths since its last import")
            && line.contains("--keep-guest-changes")
            && line.contains("--discard-guest-changes"),
        "{line}"
    );
    let listed = stdout(&out);
    for path in [
        "modified base /etc/app.conf",
        "added base /etc/guest-new.conf",
        "removed base /usr/share/doc/readme",
    ] {
        assert!(listed.contains(path), "{path} not listed:\n{listed}");
    }
    // Nothing changed: the guest keeps its versions, and the machine's is not taken.
    assert_same_content_and_metadata(&before, &manifest(&fx.base()));
    assert_eq!(fs::read(fx.base().join("etc/motd")).unwrap(), b"welcome\n");
    assert!(!fx.root.join("guests/g/linkdest").exists());
    assert!(!fx.root.join("guests/g/resync").exists());
}

#[test]
fn a_resync_with_changes_still_in_upper_refuses_and_lists_them() {
    let fx = Fx::new("resync-upper-refused");
    fx.guest_changes();
    let out = fx.resync(&[]);
    assert_one_line_error(&out, 1);
    let listed = stdout(&out);
    for path in [
        "modified upper /etc/app.conf",
        "added upper /etc/guest-new.conf",
        "removed upper /usr/share/doc/readme",
    ] {
        assert!(listed.contains(path), "{path} not listed:\n{listed}");
    }
    // --json lists them as data.
    let out = cowherd(&fx.root)
        .args(["import", "g", "--resync", "--json", "--from"])
        .arg(&fx.machine)
        .output()
        .unwrap();
    let v = json_of(&out);
    assert_eq!(v["guest_changes"].as_array().unwrap().len(), 3, "{v}");
}

#[test]
fn keep_guest_changes_keeps_the_guests_versions_and_lists_the_machines_newer_ones() {
    let fx = Fx::new("resync-keep");
    fx.guest_changes();
    fx.fold();
    // The machine changes the same file as the guest, and another one.
    fs::write(fx.machine.join("etc/app.conf"), b"threads = 8\n").unwrap();
    fs::write(fx.machine.join("etc/motd"), b"welcome, later\n").unwrap();

    let out = cowherd(&fx.root)
        .args(["import", "g", "--resync", "--keep-guest-changes", "--from"])
        .arg(&fx.machine)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let text = stdout(&out);
    assert!(
        text.contains("the machine's newer version not taken: /etc/app.conf"),
        "{text}"
    );
    assert!(!text.contains("not taken: /etc/guest-new.conf"), "{text}");
    let base = fx.base();
    assert_eq!(
        fs::read(base.join("etc/app.conf")).unwrap(),
        b"threads = 64\n"
    );
    assert_eq!(
        fs::read(base.join("etc/guest-new.conf")).unwrap(),
        b"mine\n"
    );
    assert!(!base.join("usr/share/doc/readme").exists());
    // What only the machine changed is taken.
    assert_eq!(
        fs::read(base.join("etc/motd")).unwrap(),
        b"welcome, later\n"
    );
    // The kept changes are still the guest's: the next resync lists them again.
    let out = fx.resync(&[]);
    assert_one_line_error(&out, 1);
    assert!(stdout(&out).contains("modified base /etc/app.conf"));
    assert!(!stdout(&out).contains("/etc/motd"), "{}", stdout(&out));
}

#[test]
fn discard_guest_changes_takes_the_machines_tree_and_keeps_the_guests_versions_aside() {
    let fx = Fx::new("resync-discard");
    fx.guest_changes();
    fx.fold();
    // One more change, left in upper.
    fx.inside(|rootfs| fs::write(rootfs.join("etc/motd"), b"guest motd\n").unwrap());
    fs::write(
        fx.machine.join("var/log/syslog"),
        content("syslog, later", 5_000),
    )
    .unwrap();

    let out = fx.resync(&["--discard-guest-changes"]);
    assert!(out.status.success(), "{out:?}");
    let base = fx.base();
    assert_eq!(
        fs::read(base.join("etc/app.conf")).unwrap(),
        b"threads = 4\n"
    );
    assert!(!base.join("etc/guest-new.conf").exists());
    assert!(base.join("usr/share/doc/readme").exists());
    assert_eq!(
        fs::read(base.join("var/log/syslog")).unwrap(),
        content("syslog, later", 5_000)
    );
    // The upper layer no longer hides the machine's motd.
    assert!(fs::read_dir(upper(&fx.root, "g")).unwrap().next().is_none());
    // Every discarded version is kept, in the place the output names.
    let discarded: Vec<PathBuf> = fs::read_dir(fx.root.join("guests/g/discarded"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(discarded.len(), 1);
    let kept = &discarded[0];
    assert!(
        String::from_utf8_lossy(&out.stderr).contains(&kept.display().to_string()),
        "{out:?}"
    );
    assert_eq!(
        fs::read(kept.join("base/etc/app.conf")).unwrap(),
        b"threads = 64\n"
    );
    assert_eq!(
        fs::read(kept.join("base/etc/guest-new.conf")).unwrap(),
        b"mine\n"
    );
    assert_eq!(
        fs::read(kept.join("upper/etc/motd")).unwrap(),
        b"guest motd\n"
    );
    let changes = fs::read_to_string(kept.join("changes")).unwrap();
    assert!(
        changes.contains("removed base /usr/share/doc/readme"),
        "{changes}"
    );
    // The guest mounts and shows the machine's tree.
    fx.inside(|rootfs| {
        assert_eq!(fs::read(rootfs.join("etc/motd")).unwrap(), b"welcome\n");
    });
    // And nothing is left to discard.
    assert!(fx.resync(&[]).status.success());
}

#[test]
fn a_guest_without_an_import_manifest_is_resynced_only_by_discarding_keeping_everything() {
    let fx = Fx::new("resync-no-manifest");
    fs::remove_file(fx.root.join("guests/g/import.manifest")).unwrap();
    let out = fx.resync(&[]);
    let line = assert_one_line_error(&out, 1);
    assert!(
        line.contains("no manifest") && line.contains("--discard-guest-changes"),
        "{line}"
    );
    let out = fx.resync(&["--keep-guest-changes"]);
    assert_one_line_error(&out, 1);
    let out = fx.resync(&["--discard-guest-changes"]);
    assert!(out.status.success(), "{out:?}");
    let kept = fs::read_dir(fx.root.join("guests/g/discarded"))
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    assert_eq!(
        fs::read(kept.join("base/etc/app.conf")).unwrap(),
        b"threads = 4\n"
    );
    assert!(fx.root.join("guests/g/import.manifest").exists());
    assert!(fx.resync(&[]).status.success());
}

/// Host files a resync must never reach.
struct HostCanary {
    dir: PathBuf,
    file: PathBuf,
    before: (u64, u64, u32, Vec<u8>),
}

impl HostCanary {
    fn new(scratch: &Path) -> HostCanary {
        let dir = scratch.join("host-secrets");
        fs::create_dir_all(&dir).unwrap();
        let file = dir.join("shadow");
        fs::write(&file, b"root:$6$secret:19000:0:99999:7:::\n").unwrap();
        set_owner_mode(&file, 0, 0, 0o600);
        set_mtime(&file, DEFAULT_MTIME);
        let before = Self::state(&file);
        HostCanary { dir, file, before }
    }

    fn state(file: &Path) -> (u64, u64, u32, Vec<u8>) {
        let m = fs::symlink_metadata(file).unwrap();
        (m.ino(), m.nlink(), m.mode(), fs::read(file).unwrap())
    }

    fn assert_unchanged(&self) {
        assert_eq!(Self::state(&self.file), self.before, "host canary changed");
    }
}

#[test]
fn a_resync_never_links_a_host_file_through_a_symlink_in_base() {
    let fx = Fx::new("resync-symlink");
    let canary = HostCanary::new(fx.scratch.path());
    // The machine had a symlink at /data aimed at the host's directory (absolute) …
    symlink(&canary.dir, fx.machine.join("data")).unwrap();
    fx.import(&["--resync"]).success();
    assert!(
        fs::symlink_metadata(fx.base().join("data"))
            .unwrap()
            .file_type()
            .is_symlink()
    );
    // … and now has a real /data holding a file of the host file's size, mode and mtime.
    fs::remove_file(fx.machine.join("data")).unwrap();
    let mut t = TreeBuilder::new(&fx.machine);
    let fake = vec![b'x'; fs::metadata(&canary.file).unwrap().len() as usize];
    t.file("data/shadow", &fake)
        .owner_mode("data/shadow", 0, 0, 0o600)
        .finish();

    fx.import(&["--resync"]).success();
    let got = fx.base().join("data/shadow");
    assert_eq!(
        fs::read(&got).unwrap(),
        fake,
        "the machine's bytes, not the host's"
    );
    assert_ne!(
        fs::metadata(&got).unwrap().ino(),
        canary.before.0,
        "the host file was linked into the guest"
    );
    canary.assert_unchanged();
}

#[test]
fn a_resync_never_links_a_host_file_through_a_relative_symlink_a_guest_folded() {
    let fx = Fx::new("resync-guest-symlink");
    let canary = HostCanary::new(fx.scratch.path());
    // The guest plants a relative symlink aimed out of its tree, and it is folded into base.
    let guest_dir = fx.root.join("guests/g");
    let up = pathdiff(&canary.dir, &guest_dir.join("base/srv"));
    fx.inside(|rootfs| symlink(&up, rootfs.join("srv/secrets")).unwrap());
    fx.fold();
    // The machine has a file there of the host file's size, mode and mtime.
    let fake = vec![b'y'; fs::metadata(&canary.file).unwrap().len() as usize];
    let mut t = TreeBuilder::new(&fx.machine);
    t.file("srv/secrets/shadow", &fake)
        .owner_mode("srv/secrets/shadow", 0, 0, 0o600)
        .finish();
    let out = fx.resync(&["--discard-guest-changes"]);
    assert!(out.status.success(), "{out:?}");
    let got = fx.base().join("srv/secrets/shadow");
    assert_eq!(fs::read(&got).unwrap(), fake);
    assert_ne!(fs::metadata(&got).unwrap().ino(), canary.before.0);
    canary.assert_unchanged();
}

/// `target` relative to `from` (both absolute), as `../../x`.
fn pathdiff(target: &Path, from: &Path) -> PathBuf {
    let t: Vec<_> = target.components().collect();
    let f: Vec<_> = from.components().collect();
    let common = t.iter().zip(&f).take_while(|(a, b)| a == b).count();
    let mut out = PathBuf::new();
    for _ in common..f.len() {
        out.push("..");
    }
    for c in &t[common..] {
        out.push(c);
    }
    out
}

#[test]
fn an_import_from_above_the_root_leaves_the_root_out_and_says_so() {
    assert_root();
    let scratch = Scratch::new("import-root-inside");
    let machine = scratch.join("machine");
    small_machine(&machine);
    // The cowherd root lives inside the machine's tree (as /var/lib/cowherd does in `/`).
    let root = machine.join("var/lib/cowherd");
    cowherd(&root).arg("init").assert().success();
    let other = scratch.join("other");
    small_machine(&other);
    fs::write(other.join("etc/motd"), b"the other guest\n").unwrap();
    adopt(&root, &other, "other");

    let out = cowherd(&root)
        .args(["import", "g", "--from"])
        .arg(&machine)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("left out /var/lib/cowherd") && stderr.contains("cowherd root"),
        "{stderr}"
    );
    let g = base(&root, "g");
    assert!(g.join("etc/motd").exists());
    assert!(
        !g.join("var/lib/cowherd").exists(),
        "the root was copied into the guest"
    );
    // A source inside the root is refused.
    let out = cowherd(&root)
        .args(["import", "h", "--from"])
        .arg(base(&root, "other"))
        .output()
        .unwrap();
    let line = assert_one_line_error(&out, 1);
    assert!(line.contains("inside the cowherd root"), "{line}");
    assert!(!root.join("guests/h").exists());
}

/// A machine tree with what container image layers hold: a whiteout and an opaque directory.
fn layered_machine(dir: &Path) {
    small_machine(dir);
    nix::sys::stat::mknod(
        &dir.join("etc/deleted-by-a-layer"),
        nix::sys::stat::SFlag::S_IFCHR,
        nix::sys::stat::Mode::from_bits_truncate(0o600),
        0,
    )
    .unwrap();
    fs::create_dir_all(dir.join("opt/app")).unwrap();
    xattr::set(dir.join("opt/app"), "trusted.overlay.opaque", b"y").unwrap();
}

#[test]
fn an_import_or_adopt_of_a_tree_with_overlay_metadata_is_refused_naming_the_paths() {
    assert_root();
    let scratch = Scratch::new("import-overlay-meta");
    let root = init_root(scratch.path());
    let machine = scratch.join("machine");
    layered_machine(&machine);
    let out = cowherd(&root)
        .args(["import", "g", "--from"])
        .arg(&machine)
        .output()
        .unwrap();
    let line = assert_one_line_error(&out, 1);
    assert!(
        line.contains("/etc/deleted-by-a-layer") && line.contains("/opt/app"),
        "{line}"
    );
    assert!(!root.join("guests/g").exists());
    assert!(fs::read_dir(root.join("guests")).unwrap().next().is_none());

    let out = cowherd(&root)
        .arg("adopt")
        .arg(&machine)
        .args(["--name", "g"])
        .output()
        .unwrap();
    let line = assert_one_line_error(&out, 1);
    assert!(line.contains("/etc/deleted-by-a-layer"), "{line}");
    assert!(
        machine.join("etc/motd").exists(),
        "the tree stays where it was"
    );
    assert!(!root.join("guests/g").exists());
}

#[test]
fn import_counts_entries_and_files_consistently_and_shares_with_every_guest() {
    let fx = Fx::new("import-counts");
    // A second machine identical to the first: its files are the first guest's, which are
    // not store objects yet (nothing else shared them).
    let out = cowherd(&fx.root)
        .args(["import", "g2", "--json", "--from"])
        .arg(&fx.machine)
        .output()
        .unwrap();
    let v = json_of(&out);
    assert!(out.status.success(), "{out:?}");
    let regular = files_under(&base(&fx.root, "g2")).len() as u64;
    assert_eq!(v["already_stored"]["files"].as_u64(), Some(regular), "{v}");
    for rel in ["usr/bin/tool", "usr/share/doc/readme"] {
        assert_eq!(
            ino(&base(&fx.root, "g").join(rel)),
            ino(&base(&fx.root, "g2").join(rel)),
            "{rel} is not shared with the earlier guest"
        );
    }
    let out = cowherd(&fx.root)
        .args(["import", "g3", "--from"])
        .arg(&fx.machine)
        .output()
        .unwrap();
    let text = stdout(&out);
    assert!(
        text.contains(&format!("({regular} regular files"))
            && text.contains(&format!("of these {regular} files")),
        "{text}"
    );
}

// ---------------------------------------------------------------------------------------------
// SIGKILL at random instants of a resync that keeps or discards the guest's changes
// ---------------------------------------------------------------------------------------------

/// Kills that must land while the resync runs, for each choice.
const KILLS: usize = 30;

/// Adds files enough that a resync takes a while, brought into the guest by a plain resync.
fn grow(fx: &Fx) {
    let mut t = TreeBuilder::new(&fx.machine);
    for i in 0..600 {
        t.file(
            format!("usr/lib/pkg{}/f{i}.so", i / 50),
            &content(&format!("lib{i}"), 2_000),
        );
    }
    t.finish();
    fx.import(&["--resync"]).success();
}

/// What the guest changed, written as a fold leaves it (base) and as it runs (upper).
fn change_guest_offline(fx: &Fx) {
    let base = fx.base();
    fs::write(base.join("etc/app.conf.new"), b"threads = 64\n").unwrap();
    fs::rename(base.join("etc/app.conf.new"), base.join("etc/app.conf")).unwrap();
    fs::write(base.join("etc/guest-new.conf"), b"mine\n").unwrap();
    fs::remove_file(base.join("usr/share/doc/readme")).unwrap();
}

/// Runs `cowherd import g --resync EXTRA…`, SIGKILLed after a random delay below `window`;
/// whether the kill landed while it ran.
fn killed_resync(
    fx: &Fx,
    extra: &[&str],
    rng: &mut impl rand::Rng,
    window: std::time::Duration,
) -> bool {
    use nix::sys::signal::{Signal, kill};
    let mut child = std::process::Command::new(cowherd_bin())
        .arg("--root")
        .arg(&fx.root)
        .args(["import", "g", "--resync", "--from"])
        .arg(&fx.machine)
        .args(extra)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(window.mul_f64(rng.random_range(0.0..1.0)));
    let landed = child.try_wait().unwrap().is_none();
    let _ = kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        Signal::SIGKILL,
    );
    child.wait().unwrap();
    landed
}

/// How long one resync with `extra` takes.
fn timed_resync(fx: &Fx, extra: &[&str]) -> std::time::Duration {
    let start = std::time::Instant::now();
    let out = fx.resync(extra);
    assert!(out.status.success(), "{out:?}");
    start.elapsed()
}

fn seeded_rng() -> (rand_chacha::ChaCha8Rng, u64) {
    use rand::SeedableRng;
    let seed = std::env::var("COWHERD_KILL_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random);
    eprintln!("kill loop seed {seed} (COWHERD_KILL_SEED={seed} replays it)");
    (rand_chacha::ChaCha8Rng::seed_from_u64(seed), seed)
}

/// The base's manifest is one of `states` (directory mtimes not compared).
fn assert_one_of(what: &str, tree: &Manifest, states: &[&Manifest]) {
    let opts = CompareOpts {
        dir_mtimes: false,
        allow_extra: false,
    };
    let results: Vec<Vec<String>> = states
        .iter()
        .map(|s| compare_manifests(s, tree, opts).0)
        .collect();
    assert!(
        results.iter().any(Vec::is_empty),
        "{what}: neither the old nor the new tree: {results:?}"
    );
}

#[test]
fn sigkill_during_a_resync_keeping_guest_changes_leaves_the_guest_whole() {
    let fx = Fx::new("resync-kill-keep");
    grow(&fx);
    change_guest_offline(&fx);
    fs::write(fx.machine.join("etc/app.conf"), b"threads = 8\n").unwrap();
    let window = timed_resync(&fx, &["--keep-guest-changes"]).mul_f64(1.3);
    let kept = manifest(&fx.base());
    assert_eq!(
        fs::read(fx.base().join("etc/app.conf")).unwrap(),
        b"threads = 64\n"
    );
    let (mut rng, seed) = seeded_rng();
    let (mut landed, mut tries) = (0, 0);
    while landed < KILLS {
        tries += 1;
        assert!(
            tries < KILLS * 4,
            "seed {seed}: only {landed} kills landed in {tries} tries"
        );
        if killed_resync(&fx, &["--keep-guest-changes"], &mut rng, window) {
            landed += 1;
        }
        assert_one_of(
            &format!("seed {seed}, kill {tries}"),
            &manifest(&fx.base()),
            &[&kept],
        );
        let out = fx.resync(&["--keep-guest-changes"]);
        assert!(
            out.status.success(),
            "seed {seed}: rerun after kill {tries}: {out:?}"
        );
        assert_one_of(
            &format!("seed {seed}, rerun {tries}"),
            &manifest(&fx.base()),
            &[&kept],
        );
        // The manifest survived: exactly the guest's three changes are still its own.
        let out = fx.resync(&[]);
        assert_eq!(out.status.code(), Some(1), "seed {seed}: {out:?}");
        assert_eq!(
            stdout(&out).lines().count(),
            3,
            "seed {seed}: {}",
            stdout(&out)
        );
    }
    for leftover in ["resync", "linkdest", "import.manifest.new"] {
        assert!(
            !fx.root.join("guests/g").join(leftover).exists(),
            "{leftover} left"
        );
    }
}

#[test]
fn sigkill_during_a_resync_discarding_guest_changes_loses_no_version() {
    let fx = Fx::new("resync-kill-discard");
    grow(&fx);
    // The machine's tree, as a guest of its own: what the discarding resync must arrive at.
    cowherd(&fx.root)
        .args(["import", "ref", "--from"])
        .arg(&fx.machine)
        .assert()
        .success();
    let machine_tree = manifest(&base(&fx.root, "ref"));
    let up = upper(&fx.root, "g");
    let discarded = fx.root.join("guests/g/discarded");
    let (mut rng, seed) = seeded_rng();
    change_guest_offline(&fx);
    let window = timed_resync(&fx, &["--discard-guest-changes"]).mul_f64(1.3);
    let (mut landed, mut tries) = (0, 0);
    while landed < KILLS {
        tries += 1;
        assert!(
            tries < KILLS * 4,
            "seed {seed}: only {landed} kills landed in {tries} tries"
        );
        change_guest_offline(&fx);
        fs::create_dir_all(up.join("etc")).unwrap();
        fs::write(up.join("etc/motd"), b"guest motd\n").unwrap();
        let guest_tree = manifest(&fx.base());
        if killed_resync(&fx, &["--discard-guest-changes"], &mut rng, window) {
            landed += 1;
        }
        let what = format!("seed {seed}, kill {tries}");
        assert_one_of(&what, &manifest(&fx.base()), &[&guest_tree, &machine_tree]);
        let out = fx.resync(&["--discard-guest-changes"]);
        assert!(out.status.success(), "{what}: rerun: {out:?}");
        assert_one_of(&what, &manifest(&fx.base()), &[&machine_tree]);
        assert!(
            fs::read_dir(&up).unwrap().next().is_none(),
            "{what}: upper not emptied"
        );
        // Every version the guest had is kept in some discarded/ directory.
        let kept: Vec<PathBuf> = fs::read_dir(&discarded)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        let has = |rel: &str, bytes: &[u8]| {
            kept.iter()
                .any(|d| fs::read(d.join(rel)).ok().as_deref() == Some(bytes))
        };
        assert!(
            has("base/etc/app.conf", b"threads = 64\n"),
            "{what}: {kept:?}"
        );
        assert!(
            has("base/etc/guest-new.conf", b"mine\n"),
            "{what}: {kept:?}"
        );
        assert!(has("upper/etc/motd", b"guest motd\n"), "{what}: {kept:?}");
        fs::remove_dir_all(&discarded).unwrap();
    }
}
