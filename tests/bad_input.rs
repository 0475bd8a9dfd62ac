//! Bad input, command by command, through the real binary: a missing or mounted guest, a bad
//! root, a bad policy rule, a bad template file, paths that are not directories, relative
//! paths, bad names, bad numbers, unknown template versions. Every case must fail with the exit
//! code the README documents (1 error, 2 usage, 3 partly done, 125 `exec` could not start),
//! print exactly one line on stderr, `error: …`, naming what was given and what to do, and
//! never panic.
//!
//! Each table row is one case: `(arguments, exit code, what the error line must contain)`, in
//! which `{s}` stands for the test's scratch directory and `{root}` for its cowherd root.

mod common;

use std::fs;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;

/// One case: the arguments after `--root`, the exit code, the texts the error line holds.
type Row = (&'static [&'static str], i32, &'static [&'static str]);

/// 65 characters: one more than a name may have.
const LONG: &str = "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
/// 63 characters: a `--prefix` that makes 65-character names.
const LONG_PREFIX: &str = "ppppppppppppppppppppppppppppppppppppppppppppppppppppppppppppppp";

/// A root with guest `g` (`/usr/f`, `/usr/dir/x`, `/etc/e`) and the built tarball template
/// `tiny`; beside it a file `{s}/file`, a tree `{s}/dir`, a symlink `{s}/link` to it, a
/// definition `{s}/tiny.toml` and one with a relative source, `{s}/rel-source.toml`.
struct Fixture {
    s: Scratch,
    root: PathBuf,
}

impl Fixture {
    fn new(tag: &str) -> Fixture {
        assert_root();
        let s = Scratch::new(tag);
        let root = init_root(s.path());
        adopt_built(&root, s.path(), "g", |d| {
            TreeBuilder::new(d)
                .file("usr/f", b"f\n")
                .file("usr/dir/x", b"x\n")
                .file("etc/e", b"e\n");
        });
        fs::write(s.join("file"), b"a file\n").unwrap();
        TreeBuilder::new(s.join("dir")).file("usr/d", b"d\n");
        std::os::unix::fs::symlink(s.join("dir"), s.join("link")).unwrap();
        TreeBuilder::new(s.join("tiny")).file("etc/hostname", b"tiny\n");
        let tar = s.join("tiny.tar");
        let made = Command::new("tar")
            .arg("--create")
            .arg("--file")
            .arg(&tar)
            .arg("--directory")
            .arg(s.join("tiny"))
            .arg(".")
            .status()
            .expect("tar runs");
        assert!(made.success());
        let tiny = format!("method = \"tarball\"\nsource = \"{}\"\n", tar.display());
        fs::write(s.join("tiny.toml"), &tiny).unwrap();
        fs::write(
            s.join("rel-source.toml"),
            "method = \"tarball\"\nsource = \"rel.tar\"\n",
        )
        .unwrap();
        let defined = root.join("templates.d");
        fs::create_dir_all(&defined).unwrap();
        fs::write(defined.join("tiny.toml"), &tiny).unwrap();
        fs::write(
            defined.join("fromnosuch.toml"),
            "method = \"guest\"\nguest = \"nosuch\"\n",
        )
        .unwrap();
        cowherd(&root)
            .args(["template", "build", "tiny"])
            .assert()
            .success();
        Fixture { s, root }
    }

    /// `text` with `{s}` and `{root}` replaced.
    fn expand(&self, text: &str) -> String {
        text.replace("{s}", &self.s.path().display().to_string())
            .replace("{root}", &self.root.display().to_string())
    }

    /// Runs every row with `--root root`; fails listing every row that went wrong.
    fn run_table(&self, root: &Path, rows: &[Row]) {
        let failed: Vec<String> = rows
            .iter()
            .filter_map(|(args, code, says)| self.run_case(root, args, *code, says).err())
            .collect();
        assert!(
            failed.is_empty(),
            "{} of {} cases failed:\n{}",
            failed.len(),
            rows.len(),
            failed.join("\n")
        );
        eprintln!("{} cases", rows.len());
    }

    /// One case; `Err` says what went wrong with it.
    fn run_case(&self, root: &Path, args: &[&str], code: i32, says: &[&str]) -> Result<(), String> {
        let args: Vec<String> = args.iter().map(|a| self.expand(a)).collect();
        let out = cowherd(root).args(&args).output().unwrap();
        let shown = format!("`cowherd --root {} {}`", root.display(), args.join(" "));
        let both = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        if both.contains("panicked") {
            return Err(format!("{shown} panicked:\n{both}"));
        }
        let line = catch_unwind(AssertUnwindSafe(|| assert_one_line_error(&out, code)))
            .map_err(|_| format!("{shown}: not a one-line error with exit {code} (see above)"))?;
        let missing: Vec<String> = says
            .iter()
            .map(|s| self.expand(s))
            .filter(|s| !line.contains(s.as_str()))
            .collect();
        if missing.is_empty() {
            Ok(())
        } else {
            Err(format!("{shown}: {line:?} does not say {missing:?}"))
        }
    }
}

#[test]
fn a_missing_guest_is_named_with_where_to_look() {
    #[rustfmt::skip]
    const ROWS: &[Row] = &[
        (&["unify", "nosuch"], 1, &["\"nosuch\"", "cowherd list"]),
        (&["unify", "g", "nosuch"], 1, &["\"nosuch\"", "cowherd list"]),
        (&["fold", "nosuch"], 1, &["\"nosuch\"", "cowherd list"]),
        (&["fold", "g", "nosuch"], 3, &["\"nosuch\"", "cowherd list"]),
        (&["mount", "nosuch"], 1, &["\"nosuch\"", "cowherd list"]),
        (&["mount", "--fold", "nosuch"], 1, &["\"nosuch\"", "cowherd list"]),
        (&["umount", "nosuch"], 1, &["\"nosuch\"", "cowherd list"]),
        (&["split", "nosuch", "/usr/f"], 1, &["\"nosuch\"", "cowherd list"]),
        (&["export", "nosuch", "{s}/out"], 1, &["\"nosuch\"", "cowherd list"]),
        (&["destroy", "nosuch"], 1, &["\"nosuch\"", "cowherd list"]),
        (&["exec", "nosuch", "--", "true"], 125, &["\"nosuch\"", "cowherd list"]),
        (&["unit", "nosuch"], 1, &["\"nosuch\"", "cowherd list"]),
        (&["import", "nosuch", "--from", "{s}/dir", "--resync"], 1, &["\"nosuch\"", "cowherd list"]),
        (&["template", "build", "fromnosuch"], 1, &["\"nosuch\"", "cowherd list"]),
    ];
    let f = Fixture::new("bad-guest");
    f.run_table(&f.root, ROWS);
}

#[test]
fn a_mounted_guest_is_refused_where_it_must_be_offline() {
    const MOUNTED: &[&str] = &["guest g is mounted", "cowherd umount g"];
    #[rustfmt::skip]
    const ROWS: &[Row] = &[
        (&["fold", "g"], 1, MOUNTED),
        (&["unify", "g"], 1, MOUNTED),
        (&["split", "g", "/usr/f"], 1, MOUNTED),
        (&["destroy", "g"], 1, MOUNTED),
        (&["import", "imp", "--from", "{s}/dir", "--resync"], 1, &["guest imp is mounted", "cowherd umount imp"]),
    ];
    own_mount_namespace();
    let f = Fixture::new("bad-mounted");
    cowherd(&f.root)
        .args(["import", "imp", "--from"])
        .arg(f.s.join("dir"))
        .assert()
        .success();
    let mut mounts = MountedGuests::default();
    for name in ["g", "imp"] {
        mounts.watch(rootfs(&f.root, name));
    }
    cowherd(&f.root)
        .args(["mount", "g", "imp"])
        .assert()
        .success();
    f.run_table(&f.root, ROWS);

    // A process working in the guest: umount names it.
    let busy = KillOnDrop::spawn(
        Command::new("sleep")
            .arg("30")
            .current_dir(rootfs(&f.root, "g")),
    );
    let pid = busy.id().to_string();
    wait_for("sleep to run in the guest", || {
        fs::read_link(format!("/proc/{pid}/cwd")).is_ok_and(|c| c == rootfs(&f.root, "g"))
    });
    let out = cowherd(&f.root).args(["umount", "g"]).output().unwrap();
    let line = assert_one_line_error(&out, 1);
    assert!(
        line.contains("guest g is in use by pid") && line.contains(&pid) && line.contains("stop"),
        "{line}"
    );
    drop(busy);
    umount_ok(&f.root, &["g", "imp"]);
}

#[test]
fn a_bad_root_is_named_with_the_fix() {
    /// Every subcommand, with arguments that would do on a good root.
    #[rustfmt::skip]
    const COMMANDS: &[&[&str]] = &[
        &["init"],
        &["adopt", "{s}/dir", "--name", "x"],
        &["mount", "g"],
        &["umount", "g"],
        &["fold", "g"],
        &["split", "g", "/usr/f"],
        &["export", "g", "{s}/out"],
        &["destroy", "g"],
        &["exec", "g", "--", "true"],
        &["template", "list"],
        &["template", "show", "tiny"],
        &["template", "build", "tiny"],
        &["template", "rebuild", "tiny"],
        &["template", "remove", "tiny"],
        &["template", "check", "{s}/tiny.toml"],
        &["build", "x", "-t", "tiny"],
        &["import", "x", "--from", "{s}/dir"],
        &["unit", "g"],
        &["list"],
        &["unify", "g"],
        &["stats"],
        &["stats", "--memory"],
        &["verify"],
        &["verify", "--repair"],
        &["index", "rebuild"],
        &["gc"],
    ];
    /// A bad root, what the error says, and the commands it does not apply to (`init` makes
    /// a missing root; `index rebuild` is the fix for a lost index).
    type Kind = (
        &'static str,
        &'static [&'static str],
        &'static [&'static str],
    );
    #[rustfmt::skip]
    const KINDS: &[Kind] = &[
        ("{s}/missing", &["{s}/missing is not a cowherd root", "`cowherd --root {s}/missing init`"], &["init"]),
        ("{s}/dir", &["{s}/dir is not a cowherd root", "`cowherd --root {s}/dir init`"], &["init"]),
        ("{s}/file", &["--root {s}/file: not a directory", "give the directory of the cowherd root"], &[]),
        ("{s}/file/sub", &["--root {s}/file/sub: a part of the path is a file", "give the directory"], &[]),
        ("{s}/noindex", &["{s}/noindex has a store but no index.db", "`cowherd --root {s}/noindex index rebuild`"], &["index"]),
    ];
    let f = Fixture::new("bad-root");
    // A root whose index was lost: a store with an object, no index.db.
    let noindex = init_root(&f.s.join("lost"));
    let object = noindex.join("store/objects/ab/ab00.c0");
    fs::create_dir_all(object.parent().unwrap()).unwrap();
    fs::write(&object, b"object\n").unwrap();
    fs::remove_file(noindex.join("index.db")).unwrap();
    fs::rename(&noindex, f.s.join("noindex")).unwrap();

    let mut failed = Vec::new();
    let mut cases = 0;
    for (root, says, skip) in KINDS {
        let root = PathBuf::from(f.expand(root));
        for args in COMMANDS.iter().filter(|a| !skip.contains(&a[0])) {
            let code = if args[0] == "exec" { 125 } else { 1 };
            cases += 1;
            failed.extend(f.run_case(&root, args, code, says).err());
        }
    }
    assert!(
        failed.is_empty(),
        "{} of {cases} cases failed:\n{}",
        failed.len(),
        failed.join("\n")
    );
    assert!(
        !f.s.join("missing").exists(),
        "a command made the missing root"
    );
    eprintln!("{cases} cases");
}

#[test]
fn a_bad_policy_rule_is_named_with_its_file_line_and_fix() {
    /// The file (below the root) given `text`, a command, its exit code, what it says.
    type PolicyRow = (&'static str, Option<&'static str>, Row);
    const EXPECTED: &str = "expected private, cow or immutable";
    #[rustfmt::skip]
    const ROWS: &[PolicyRow] = &[
        ("policy.toml", Some("rules = [\"privat /etc/**\"]\n"), (&["unify", "g"], 1, &["{root}/policy.toml (line 1)", "\"privat\"", EXPECTED])),
        ("policy.toml", Some("rules = [\"privat /etc/**\"]\n"), (&["build", "x", "-t", "tiny"], 1, &["{root}/policy.toml (line 1)", EXPECTED])),
        ("policy.toml", Some("rules = [\"privat /etc/**\"]\n"), (&["import", "x", "--from", "{s}/dir"], 1, &["{root}/policy.toml (line 1)", EXPECTED])),
        ("policy.toml", Some("rules = [\n  \"cow /usr/**\",\n  \"private etc/**\",\n]\n"), (&["unify", "g"], 1, &["{root}/policy.toml (line 3)", "\"etc/**\"", "must start with '/'"])),
        ("policy.toml", Some("rules = [\"cow /usr/[ab\"]\n"), (&["unify", "g"], 1, &["{root}/policy.toml (line 1)", "\"/usr/[ab\"", "missing ']'"])),
        ("policy.toml", Some("rules = [\"/usr/** cow\"]\n"), (&["unify", "g"], 1, &["\"/usr/** cow\"", "the marker comes first"])),
        ("policy.toml", Some("rules = [\"cow /usr/**\"\n"), (&["unify", "g"], 1, &["invalid policy file {root}/policy.toml: line "])),
        ("policy.toml", Some("rule = [\"cow /**\"]\n"), (&["unify", "g"], 1, &["{root}/policy.toml: line 1", "unknown field `rule`"])),
        ("policy.toml", Some("dpkg_conffiles = \"yes\"\n"), (&["unify", "g"], 1, &["{root}/policy.toml: line 1", "dpkg_conffiles"])),
        ("policy.toml", None, (&["unify", "g"], 1, &["{root}/policy.toml", "`cowherd init`"])),
        ("guests/g/guest.toml", Some("[policy]\nrules = [\"immutable\"]\n"), (&["unify", "g"], 1, &["\"immutable\" in {root}/guests/g/guest.toml", "missing glob"])),
        ("guests/g/guest.toml", Some("[policy]\nrules = [\"cow usr/**\"]\n"), (&["unify", "g"], 1, &["\"cow usr/**\" in {root}/guests/g/guest.toml", "must start with '/'"])),
    ];
    let f = Fixture::new("bad-policy");
    let mut failed = Vec::new();
    for (file, text, (args, code, says)) in ROWS {
        let path = f.root.join(file);
        let good = fs::read_to_string(&path).unwrap();
        match text {
            // guest.toml keeps the guest's record: the table goes below it.
            Some(text) if file.ends_with("guest.toml") => {
                fs::write(&path, format!("{good}\n{text}")).unwrap()
            }
            Some(text) => fs::write(&path, text).unwrap(),
            None => fs::remove_file(&path).unwrap(),
        }
        failed.extend(f.run_case(&f.root, args, *code, says).err());
        fs::write(&path, good).unwrap();
    }
    assert!(
        failed.is_empty(),
        "{} of {} cases failed:\n{}",
        failed.len(),
        ROWS.len(),
        failed.join("\n")
    );
    // Nothing was made on the way.
    assert!(!f.root.join("guests/x").exists());
    eprintln!("{} cases", ROWS.len());
}

#[test]
fn a_bad_template_file_is_named_with_its_line_and_key() {
    /// A file in `$ROOT/templates.d`, its text, a command, what the error says.
    type TemplateRow = (&'static str, &'static str, Row);
    const LIST: &[&str] = &["template", "list"];
    #[rustfmt::skip]
    const ROWS: &[TemplateRow] = &[
        ("bad.toml", "from = \"tiny\"\npackages = [\"Nginx\"]\n", (LIST, 1, &["{root}/templates.d/bad.toml:2:", "key \"packages\"", "\"Nginx\" is not a package"])),
        ("bad.toml", "from = \"tiny\"\npackages = [\"Nginx\"]\n", (&["build", "x", "-t", "tiny"], 1, &["{root}/templates.d/bad.toml:2:", "key \"packages\""])),
        ("bad.toml", "from = \"tiny\"\npackages = [\"Nginx\"]\n", (&["template", "show", "tiny"], 1, &["{root}/templates.d/bad.toml:2:", "key \"packages\""])),
        ("bad.toml", "suite = \"bookworm\"\nmirror = \"nowhere\"\n", (LIST, 1, &["{root}/templates.d/bad.toml:2:", "key \"mirror\"", "give one mirror URL"])),
        ("bad.toml", "suite = \"-bookworm\"\n", (LIST, 1, &["{root}/templates.d/bad.toml:1:", "key \"suite\"", "\"-bookworm\""])),
        ("bad.toml", "suite = \"bookworm\"\nsuites = \"x\"\n", (LIST, 1, &["{root}/templates.d/bad.toml:2:", "unknown key \"suites\"", "expected one of"])),
        ("bad.toml", "from = \"nope\"\n", (LIST, 1, &["{root}/templates.d/bad.toml:1:", "no template named \"nope\"", "fix the name"])),
        ("bad.toml", "from = \"bad\"\n", (LIST, 1, &["{root}/templates.d/bad.toml:1:", "cycle", "remove one `from`"])),
        ("bad.toml", "from = \"../tiny\"\n", (LIST, 1, &["{root}/templates.d/bad.toml:1:", "key \"from\"", "invalid template name \"../tiny\""])),
        ("bad.toml", "from = \"tiny\"\n\n[policy]\nrules = [\"privat /x\"]\n", (LIST, 1, &["{root}/templates.d/bad.toml:4:", "key \"policy.rules\"", "\"privat\""])),
        ("bad.toml", "from = \"tiny\"\nsteps = [\"echo\", \" \"]\n", (LIST, 1, &["{root}/templates.d/bad.toml:2:", "key \"steps\"", "empty step"])),
        ("bad.toml", "method = \"guest\"\nguest = \"a/b\"\n", (LIST, 1, &["{root}/templates.d/bad.toml:2:", "key \"guest\"", "invalid guest name \"a/b\""])),
        ("bad.toml", "method = \"chroot\"\n", (LIST, 1, &["{root}/templates.d/bad.toml:1:", "unknown method \"chroot\"", "expected one of"])),
        ("bad.toml", "method = \"tarball\"\n", (LIST, 1, &["{root}/templates.d/bad.toml:1:", "missing key \"source\""])),
        ("bad.toml", "suite = [\n", (LIST, 1, &["{root}/templates.d/bad.toml:"])),
        ("-bad.toml", "from = \"tiny\"\n", (LIST, 1, &["{root}/templates.d/-bad.toml: invalid template name \"-bad\"", "rename the file"])),
        ("bad.toml", "from = \"tiny\"\n\u{0}", (LIST, 1, &["{root}/templates.d/bad.toml:2:"])),
    ];
    let f = Fixture::new("bad-template");
    let dir = f.root.join("templates.d");
    let mut failed = Vec::new();
    for (file, text, (args, code, says)) in ROWS {
        fs::write(dir.join(file), text).unwrap();
        failed.extend(f.run_case(&f.root, args, *code, says).err());
        fs::remove_file(dir.join(file)).unwrap();
    }
    assert!(
        failed.is_empty(),
        "{} of {} cases failed:\n{}",
        failed.len(),
        ROWS.len(),
        failed.join("\n")
    );
    eprintln!("{} cases", ROWS.len());
}

#[test]
fn a_path_that_must_be_a_directory_and_is_not_is_named() {
    #[rustfmt::skip]
    const ROWS: &[Row] = &[
        (&["adopt", "{s}/file", "--name", "x"], 1, &["{s}/file is not a directory"]),
        (&["adopt", "{s}/missing", "--name", "x"], 1, &["{s}/missing", "No such file or directory"]),
        (&["adopt", "{s}/link", "--name", "x"], 1, &["{s}/link is a symlink", "use the real path"]),
        (&["export", "g", "{s}/file"], 1, &["{s}/file", "exists already", "export writes a new"]),
        (&["export", "g", "{s}/file/out"], 1, &["{s}/file/out", "{s}/file is not a directory"]),
        (&["export", "g", "{s}/missing/out"], 1, &["{s}/missing/out", "{s}/missing is not a directory"]),
        (&["import", "x", "--from", "{s}/file"], 1, &["{s}/file", "not a directory", "a tarball's name must end in"]),
        (&["import", "x", "--from", "{s}/missing"], 1, &["{s}/missing", "No such file or directory"]),
        (&["import", "x", "--from", "{s}/dir", "--include-mount", "/usr/d"], 1, &["\"/usr/d\"", "not a mount point's directory"]),
        (&["template", "check", "{s}/dir"], 1, &["{s}/dir: a directory", "NAME.toml"]),
        (&["template", "check", "{s}/missing.toml"], 1, &["{s}/missing.toml", "No such file or directory"]),
        (&["demo", "--keep", "{s}/file"], 1, &["{s}/file is not a directory", "--keep wants"]),
        (&["demo", "--keep", "{s}/dir"], 1, &["{s}/dir is not empty", "--keep wants"]),
        (&["split", "g", "/usr/f/x"], 3, &["/usr/f/x", "usr/f is not a directory"]),
    ];
    let f = Fixture::new("bad-nondir");
    f.run_table(&f.root, ROWS);
}

#[test]
fn a_relative_path_is_refused_where_an_absolute_one_is_needed() {
    #[rustfmt::skip]
    const ROWS: &[Row] = &[
        (&["split", "g", "usr/f"], 1, &["\"usr/f\"", "not a guest-absolute path", "like /usr/bin/ls"]),
        (&["split", "g", ""], 1, &["\"\"", "not a guest-absolute path"]),
        (&["split", "g", "/usr/../etc/e"], 1, &["\"/usr/../etc/e\"", "`..`", "without them"]),
        (&["split", "g", "/usr/./f"], 1, &["\"/usr/./f\"", "without them"]),
        (&["split", "g", "/"], 1, &["\"/\"", "name a file or directory below it"]),
        (&["import", "x", "--from", "host:rel"], 1, &["\"host:rel\"", "absolute path", "host:/"]),
        (&["import", "x", "--from", "user@host:"], 1, &["\"user@host:\"", "absolute path"]),
        (&["import", "x", "--from", "{s}/dir", "--include-mount", "srv"], 1, &["\"srv\"", "absolute path"]),
        (&["template", "check", "{s}/rel-source.toml"], 1, &["{s}/rel-source.toml:2:", "key \"source\"", "\"rel.tar\" is not an absolute path"]),
    ];
    let f = Fixture::new("bad-relative");
    f.run_table(&f.root, ROWS);
}

#[test]
fn a_bad_name_is_named_with_the_rule() {
    const GUEST_RULE: &str = "use 1-64 characters of a-z A-Z 0-9 . _ -";
    #[rustfmt::skip]
    const ROWS: &[Row] = &[
        (&["adopt", "{s}/dir", "--name", "a/b"], 1, &["invalid guest name \"a/b\"", GUEST_RULE]),
        (&["adopt", "{s}/dir", "--name", "../x"], 1, &["invalid guest name \"../x\"", GUEST_RULE]),
        (&["adopt", "{s}/dir", "--name", ".."], 1, &["invalid guest name \"..\"", GUEST_RULE]),
        (&["adopt", "{s}/dir", "--name", "."], 1, &["invalid guest name \".\"", GUEST_RULE]),
        (&["adopt", "{s}/dir", "--name", ""], 1, &["invalid guest name \"\"", GUEST_RULE]),
        (&["adopt", "{s}/dir", "--name", LONG], 1, &["invalid guest name \"aaaa", GUEST_RULE]),
        (&["adopt", "{s}/dir", "--name", "-x"], 1, &["invalid guest name \"-x\"", GUEST_RULE]),
        (&["adopt", "{s}/dir", "--name", "a b"], 1, &["invalid guest name \"a b\"", GUEST_RULE]),
        (&["adopt", "{s}/dir", "--name", "g"], 1, &["a guest named \"g\" exists already"]),
        (&["build", "a/b", "-t", "tiny"], 1, &["invalid guest name \"a/b\"", GUEST_RULE]),
        (&["build", "..", "-t", "tiny"], 1, &["invalid guest name \"..\"", GUEST_RULE]),
        (&["build", "", "-t", "tiny"], 1, &["invalid guest name \"\"", GUEST_RULE]),
        (&["build", LONG, "-t", "tiny"], 1, &["invalid guest name \"aaaa", GUEST_RULE]),
        (&["build", "-x", "-t", "tiny"], 2, &["'-x'", "-- -x", "cowherd build --help"]),
        (&["build", "g", "-t", "tiny"], 1, &["a guest named \"g\" exists already"]),
        (&["build", "--count", "2", "--prefix", "a/", "-t", "tiny"], 1, &["--prefix \"a/\"", "invalid guest name \"a/01\""]),
        (&["build", "--count", "2", "--prefix", LONG_PREFIX, "-t", "tiny"], 1, &["--prefix \"pppp", "invalid guest name"]),
        (&["build", "--count", "2", "--prefix", "-p", "-t", "tiny"], 1, &["--prefix \"-p\"", "invalid guest name \"-p01\""]),
        (&["build", "x", "-t", "tiny", "--hostname", "bad host"], 1, &["invalid hostname \"bad host\"", "dot-separated labels"]),
        (&["build", "x", "-t", "tiny", "--hostname", "-x"], 1, &["invalid hostname \"-x\"", "dot-separated labels"]),
        (&["build", "x", "-t", "../tiny"], 1, &["no template named \"../tiny\"", "cowherd template list"]),
        (&["import", "a/b", "--from", "{s}/dir"], 1, &["invalid guest name \"a/b\"", GUEST_RULE]),
        (&["import", "..", "--from", "{s}/dir"], 1, &["invalid guest name \"..\"", GUEST_RULE]),
        (&["import", "", "--from", "{s}/dir"], 1, &["invalid guest name \"\"", GUEST_RULE]),
        (&["import", "g", "--from", "{s}/dir"], 1, &["a guest named \"g\" exists already"]),
        (&["import", "x", "--from", "-e:/x"], 1, &["bad source \"-e:/x\"", "starts with `-`"]),
        (&["import", "x", "--from", "-l@host:/"], 1, &["bad source \"-l@host:/\"", "starts with `-`"]),
        (&["import", "x", "--from", "rsync://-h/module"], 1, &["bad source \"rsync://-h/module\"", "starts with `-`"]),
        (&["unify", "a/b"], 1, &["invalid guest name \"a/b\"", GUEST_RULE]),
        (&["unify", LONG], 1, &["invalid guest name \"aaaa", GUEST_RULE]),
        (&["fold", "../g"], 1, &["invalid guest name \"../g\"", GUEST_RULE]),
        (&["mount", ".."], 1, &["invalid guest name \"..\"", GUEST_RULE]),
        (&["umount", "a/b"], 1, &["invalid guest name \"a/b\"", GUEST_RULE]),
        (&["destroy", "../g"], 1, &["invalid guest name \"../g\"", GUEST_RULE]),
        (&["destroy", ""], 1, &["invalid guest name \"\"", GUEST_RULE]),
        (&["destroy", "-x"], 2, &["'-x'", "-- -x", "cowherd destroy --help"]),
        (&["unit", "../g"], 1, &["invalid guest name \"../g\"", GUEST_RULE]),
        (&["export", "a/b", "{s}/out"], 1, &["invalid guest name \"a/b\"", GUEST_RULE]),
        (&["split", "../g", "/usr/f"], 1, &["invalid guest name \"../g\"", GUEST_RULE]),
        (&["exec", "../g", "--", "true"], 125, &["invalid guest name \"../g\"", GUEST_RULE]),
        (&["template", "show", "../x"], 1, &["no template named \"../x\"", "cowherd template list"]),
        (&["template", "build", "a/b"], 1, &["no template named \"a/b\"", "cowherd template list"]),
        (&["template", "rebuild", ".."], 1, &["no template named \"..\"", "cowherd template list"]),
        (&["template", "remove", "../templates/tiny"], 1, &["invalid template name \"../templates/tiny\"", "1-64 characters"]),
        (&["template", "remove", ""], 1, &["invalid template name \"\"", "1-64 characters"]),
        (&["template", "check", "{s}/-bad.toml"], 1, &["{s}/-bad.toml: invalid template name \"-bad\"", "rename the file"]),
    ];
    let f = Fixture::new("bad-name");
    fs::write(f.s.join("-bad.toml"), "from = \"tiny\"\n").unwrap();
    f.run_table(&f.root, ROWS);
    assert!(
        f.s.join("dir/usr/d").exists(),
        "a refused adopt moved the tree"
    );
}

/// The `demo` rows give `--keep {s}/file`, which a binary that took the number would refuse
/// at once, instead of generating that many guests.
#[test]
fn a_bad_number_is_named_with_the_range() {
    #[rustfmt::skip]
    const ROWS: &[Row] = &[
        (&["unify", "--min-size", "-5", "g"], 2, &["'-5'", "--min-size", "0 or more", "cowherd unify --help"]),
        (&["unify", "--min-size", "99999999999999999999999", "g"], 2, &["'99999999999999999999999'", "--min-size"]),
        (&["unify", "--min-size", "1k", "g"], 2, &["'1k'", "--min-size", "whole number"]),
        (&["unify", "--max-links", "1", "g"], 2, &["'1'", "--max-links", "2 or more"]),
        (&["unify", "--max-links", "-1", "g"], 2, &["'-1'", "--max-links", "2 or more"]),
        (&["build", "--count", "-1", "--prefix", "p", "-t", "tiny"], 2, &["'-1'", "--count", "from 1 to 9999"]),
        (&["build", "--count", "0", "--prefix", "p", "-t", "tiny"], 2, &["'0'", "--count", "from 1 to 9999"]),
        (&["build", "--count", "10000", "--prefix", "p", "-t", "tiny"], 2, &["'10000'", "from 1 to 9999"]),
        (&["build", "--count", "99999999999999", "--prefix", "p", "-t", "tiny"], 2, &["'99999999999999'", "from 1 to 9999"]),
        (&["stats", "--top", "-1"], 2, &["'-1'", "--top", "0 or more"]),
        (&["stats", "--top", "ten"], 2, &["'ten'", "--top", "whole number"]),
        (&["demo", "--guests", "0", "--keep", "{s}/file"], 2, &["'0'", "--guests", "from 1 to 1000"]),
        (&["demo", "--guests", "-3", "--keep", "{s}/file"], 2, &["'-3'", "--guests", "from 1 to 1000"]),
        (&["demo", "--guests", "1001", "--keep", "{s}/file"], 2, &["'1001'", "from 1 to 1000"]),
        (&["demo", "--guests", "99999999999999", "--keep", "{s}/file"], 2, &["'99999999999999'", "from 1 to 1000"]),
        (&["template", "remove", "tiny@-1"], 1, &["\"-1\" is no version number", "tiny@1"]),
        (&["template", "remove", "tiny@0"], 1, &["\"0\" is no version number", "tiny@1"]),
        (&["template", "remove", "tiny@99999999999"], 1, &["\"99999999999\" is no version number"]),
        (&["template", "remove", "tiny@x"], 1, &["\"x\" is no version number"]),
    ];
    let f = Fixture::new("bad-number");
    f.run_table(&f.root, ROWS);
}

#[test]
fn an_unknown_template_or_version_is_named() {
    #[rustfmt::skip]
    const ROWS: &[Row] = &[
        (&["template", "remove", "tiny@7"], 1, &["template tiny has no version 7", "built versions are 1"]),
        (&["template", "remove", "nosuch@1"], 1, &["template nosuch has no built version", "cowherd template list"]),
        (&["template", "remove", "nosuch"], 1, &["template nosuch has no built version", "cowherd template list"]),
        (&["build", "x", "-t", "tiny@1"], 1, &["--template \"tiny@1\"", "without @VERSION"]),
        (&["build", "x", "-t", "nope"], 1, &["no template named \"nope\"", "cowherd template list"]),
        (&["build", "x", "-t", "fromnosuch"], 1, &["template fromnosuch is not built", "cowherd template build fromnosuch"]),
        (&["template", "show", "tiny@1"], 1, &["\"tiny@1\"", "not NAME@VERSION", "give \"tiny\""]),
        (&["template", "build", "tiny@2"], 1, &["\"tiny@2\"", "not NAME@VERSION"]),
        (&["template", "rebuild", "tiny@1"], 1, &["\"tiny@1\"", "not NAME@VERSION"]),
        (&["template", "show", "nope"], 1, &["no template named \"nope\"", "cowherd template list"]),
        (&["template", "nope"], 2, &["'nope'", "cowherd template --help"]),
    ];
    let f = Fixture::new("bad-version");
    f.run_table(&f.root, ROWS);
}

/// Known defect, in `builder/src/import.rs` (not this test's to fix): an `--include-mount`
/// that the local source does not have fails inside rsync, and the error neither says that
/// the mount point is missing nor what to give.
#[test]
fn an_include_mount_missing_from_a_local_source_is_named() {
    #[rustfmt::skip]
    const ROWS: &[Row] = &[(
        &[
            "import",
            "x",
            "--from",
            "{s}/dir",
            "--include-mount",
            "/srv/none",
        ],
        1,
        &["\"/srv/none\"", "--include-mount"],
    )];
    let f = Fixture::new("bad-include");
    f.run_table(&f.root, ROWS);
}
