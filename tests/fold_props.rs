//! Fold reads whiteouts and opaque directories as overlayfs does: generated upper layers
//! (files, directories, symlinks, special files, whiteouts — some sharing one inode — opaque
//! directories, bookkeeping xattrs) over generated bases, and a small model of the merged view
//! (overlayfs with `index=off,metacopy=off,redirect_dir=off`). Each case checks the model
//! against the kernel (a read-only overlay of upper over base), then runs the real `cowherd
//! fold` and checks that base became exactly the model and that the merged view did not change.
//! Runs as root, in a mount namespace of its own.

mod common;

use std::cell::Cell;
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::fs;
use std::path::Path;

use proptest::prelude::*;
use proptest::test_runner::{Config, RngSeed, TestCaseError, TestRunner};
use serde_json::Value;

use common::*;

/// Cases run (each is an adopt, two read-only overlay mounts and a real fold); more with
/// `COWHERD_FOLD_PROPS_CASES`.
const CASES: u32 = 24;

/// The names of each directory level: paths up to three deep over these.
const NAMES: [&str; 3] = ["a", "b", "c"];
const DEPTH: usize = 3;

const OPAQUE: &[u8] = b"trusted.overlay.opaque";
const IMPURE: &[u8] = b"trusted.overlay.impure";

/// Every path of the universe, parents before children.
fn universe() -> Vec<String> {
    let mut all = Vec::new();
    let mut level = vec![String::new()];
    for _ in 0..DEPTH {
        let mut next = Vec::new();
        for parent in &level {
            for n in NAMES {
                next.push(if parent.is_empty() {
                    n.to_string()
                } else {
                    format!("{parent}/{n}")
                });
            }
        }
        all.extend(next.iter().cloned());
        level = next;
    }
    all
}

/// What one path of a layer is.
#[derive(Clone, Debug)]
enum Node {
    File {
        tag: u8,
        mode: u32,
        uid: u32,
        mtime: i64,
        xattr: Option<u8>,
    },
    Dir {
        mode: u32,
        mtime: i64,
        xattr: Option<u8>,
        /// `trusted.overlay.opaque=y` (upper only).
        opaque: bool,
        /// `trusted.overlay.impure=y`, bookkeeping that never belongs in base (upper only).
        impure: bool,
    },
    Symlink(&'static str),
    Fifo,
    /// A character device that is not a whiteout (1/3).
    Device,
    /// A 0/0 character device (upper only).
    Whiteout,
}

fn file() -> impl Strategy<Value = Node> {
    (
        0..4u8,
        prop::sample::select(vec![0o644, 0o600, 0o755, 0o4755]),
        prop::sample::select(vec![0, 1000]),
        0..3i64,
        prop::option::of(0..2u8),
    )
        .prop_map(|(tag, mode, uid, mtime, xattr)| Node::File {
            tag,
            mode,
            uid,
            mtime,
            xattr,
        })
}

fn dir(upper: bool) -> impl Strategy<Value = Node> {
    (
        prop::sample::select(vec![0o755, 0o700, 0o555]),
        0..3i64,
        prop::option::of(0..2u8),
        prop::bool::weighted(if upper { 0.35 } else { 0.0 }),
        prop::bool::weighted(if upper { 0.3 } else { 0.0 }),
    )
        .prop_map(|(mode, mtime, xattr, opaque, impure)| Node::Dir {
            mode,
            mtime,
            xattr,
            opaque,
            impure,
        })
}

fn symlink() -> impl Strategy<Value = Node> {
    prop::sample::select(vec!["a", "../b", "/etc/passwd", "nowhere"]).prop_map(Node::Symlink)
}

fn base_node() -> impl Strategy<Value = Option<Node>> {
    prop_oneof![
        3 => Just(None),
        3 => file().prop_map(Some),
        3 => dir(false).prop_map(Some),
        1 => symlink().prop_map(Some),
        1 => Just(Some(Node::Fifo)),
    ]
}

fn upper_node() -> impl Strategy<Value = Option<Node>> {
    prop_oneof![
        4 => Just(None),
        3 => Just(Some(Node::Whiteout)),
        3 => dir(true).prop_map(Some),
        2 => file().prop_map(Some),
        1 => symlink().prop_map(Some),
        1 => prop::sample::select(vec![Node::Fifo, Node::Device]).prop_map(Some),
    ]
}

/// One generated guest: its base, its upper layer, the upper root's metadata.
#[derive(Clone)]
struct Case {
    base: Vec<Option<Node>>,
    upper: Vec<Option<Node>>,
    root_mode: u32,
    root_mtime: i64,
    /// The whiteouts are links of one inode (as overlayfs may make them), not one each.
    shared_whiteouts: bool,
}

/// The paths of a layer that exist: those whose parent is a directory of the same layer.
/// For an upper layer (`base_dirs`: the directories of its base), a whiteout exists only in a
/// merged directory (the root, or a non-opaque upper directory over a merged base one): only
/// there can overlayfs make one, where there was something below to hide.
fn realized(nodes: &[Option<Node>], base_dirs: Option<&BTreeSet<String>>) -> Vec<(String, Node)> {
    let mut dirs: BTreeSet<String> = BTreeSet::from([String::new()]);
    let mut merged = dirs.clone();
    let mut out = Vec::new();
    for (path, node) in universe().into_iter().zip(nodes) {
        let parent = path.rsplit_once('/').map_or("", |(p, _)| p);
        let Some(node) = node.clone().filter(|_| dirs.contains(parent)) else {
            continue;
        };
        match (&node, base_dirs) {
            (Node::Whiteout, _) if !merged.contains(parent) => continue,
            (Node::Dir { opaque, .. }, Some(base_dirs)) => {
                if merged.contains(parent) && !opaque && base_dirs.contains(&path) {
                    merged.insert(path.clone());
                }
                dirs.insert(path.clone());
            }
            (Node::Dir { .. }, None) => {
                dirs.insert(path.clone());
            }
            _ => {}
        }
        out.push((path, node));
    }
    out
}

impl Case {
    fn base_entries(&self) -> Vec<(String, Node)> {
        realized(&self.base, None)
    }

    fn upper_entries(&self) -> Vec<(String, Node)> {
        let base_dirs: BTreeSet<String> = self
            .base_entries()
            .into_iter()
            .filter(|(_, n)| matches!(n, Node::Dir { .. }))
            .map(|(p, _)| p)
            .collect();
        realized(&self.upper, Some(&base_dirs))
    }
}

impl fmt::Debug for Case {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "upper root mode {:o} mtime {}, shared whiteouts {}",
            self.root_mode, self.root_mtime, self.shared_whiteouts
        )?;
        for (layer, entries) in [
            ("base ", self.base_entries()),
            ("upper", self.upper_entries()),
        ] {
            for (path, node) in entries {
                writeln!(f, "  {layer} {path}: {node:?}")?;
            }
        }
        Ok(())
    }
}

fn case() -> impl Strategy<Value = Case> {
    let n = universe().len();
    (
        prop::collection::vec(base_node(), n),
        prop::collection::vec(upper_node(), n),
        prop::sample::select(vec![0o755, 0o750]),
        0..3i64,
        any::<bool>(),
    )
        .prop_map(
            |(base, upper, root_mode, root_mtime, shared_whiteouts)| Case {
                base,
                upper,
                root_mode,
                root_mtime,
                shared_whiteouts,
            },
        )
}

fn mtime(step: i64) -> (i64, i64) {
    (1_600_000_000 + step * 1000, 500 + step)
}

/// Writes `entries` below `dir` (which exists); directories get their mtime after their entries.
/// Returns whether it wrote anything.
fn write_layer(dir: &Path, entries: &[(String, Node)], shared_whiteouts: bool) -> bool {
    let mut t = TreeBuilder::new(dir);
    let mut first_whiteout: Option<String> = None;
    let mut dir_mtimes = Vec::new();
    for (path, node) in entries {
        match node {
            Node::File {
                tag,
                mode,
                uid,
                mtime: m,
                xattr,
            } => {
                let bytes = content(&format!("fold-props-{tag}"), 100 + *tag as usize * 300);
                t.file_with(path, &bytes, *mode, *uid, *uid, mtime(*m));
                if let Some(x) = xattr {
                    t.xattr(path, "user.fold-props", &[b'0' + x]);
                    set_mtime(&t.path(path), mtime(*m));
                }
            }
            Node::Dir {
                mode,
                mtime: m,
                xattr,
                opaque,
                impure,
            } => {
                t.dir(path, *mode);
                if let Some(x) = xattr {
                    t.xattr(path, "user.fold-props", &[b'0' + x]);
                }
                if *opaque {
                    t.xattr(path, OPAQUE, b"y");
                }
                if *impure {
                    t.xattr(path, IMPURE, b"y");
                }
                dir_mtimes.push((path.clone(), mtime(*m)));
            }
            Node::Symlink(target) => {
                t.symlink(path, target);
            }
            Node::Fifo => {
                t.fifo(path);
            }
            Node::Device => {
                t.device(path, Dev::Char, 1, 3);
            }
            Node::Whiteout => match (&first_whiteout, shared_whiteouts) {
                (Some(first), true) => {
                    t.hardlink(first, path);
                }
                _ => {
                    t.device(path, Dev::Char, 0, 0);
                    first_whiteout.get_or_insert(path.clone());
                }
            },
        }
    }
    for (path, m) in dir_mtimes.iter().rev() {
        set_mtime(&t.path(path), *m);
    }
    !entries.is_empty()
}

// ---------------------------------------------------------------------------------------------
// The model
// ---------------------------------------------------------------------------------------------

fn parent_of(rel: &[u8]) -> &[u8] {
    rel.iter()
        .rposition(|&b| b == b'/')
        .map_or(&rel[..0], |i| &rel[..i])
}

/// Child paths by parent path.
fn children(m: &Manifest) -> BTreeMap<Vec<u8>, Vec<Vec<u8>>> {
    let mut out: BTreeMap<Vec<u8>, Vec<Vec<u8>>> = BTreeMap::new();
    for rel in m.keys().filter(|k| !k.is_empty()) {
        out.entry(parent_of(rel).to_vec())
            .or_default()
            .push(rel.clone());
    }
    out
}

fn is_whiteout(e: &Entry) -> bool {
    e.kind == Kind::CharDev && e.rdev == Some(0)
}

fn is_opaque(e: &Entry) -> bool {
    e.xattrs.get(OPAQUE).map(Vec::as_slice) == Some(b"y")
}

/// What the guest sees of an upper entry: overlayfs hides its own `trusted.overlay.*`.
fn shown(e: &Entry) -> Entry {
    let mut e = e.clone();
    e.xattrs.retain(|k, _| !k.starts_with(b"trusted.overlay."));
    e
}

/// The merged view of `upper` over `base` (overlayfs, one upper and one lower layer):
/// * the root is upper's;
/// * an upper non-directory hides whatever base has at its path;
/// * a whiteout (0/0 character device) hides base's entry and is not shown;
/// * an upper directory over a base directory merges with it, unless it is opaque; over a
///   base non-directory it shows only its own entries;
/// * a directory shows the upper one's owner, mode, mtime and xattrs.
fn model(base: &Manifest, upper: &Manifest) -> Manifest {
    struct Layers<'a> {
        base: &'a Manifest,
        upper: &'a Manifest,
        base_children: BTreeMap<Vec<u8>, Vec<Vec<u8>>>,
        upper_children: BTreeMap<Vec<u8>, Vec<Vec<u8>>>,
        out: Manifest,
    }
    fn visit(l: &mut Layers<'_>, rel: &[u8], in_upper: bool, in_base: bool) {
        let mut names: BTreeSet<Vec<u8>> = BTreeSet::new();
        if in_upper {
            names.extend(l.upper_children.get(rel).into_iter().flatten().cloned());
        }
        if in_base {
            names.extend(l.base_children.get(rel).into_iter().flatten().cloned());
        }
        for child in names {
            let u = l.upper.get(&child).filter(|_| in_upper).cloned();
            let b = l.base.get(&child).filter(|_| in_base).cloned();
            match (u, b) {
                (Some(u), _) if is_whiteout(&u) => {}
                (Some(u), b) if u.kind == Kind::Dir => {
                    let merge = !is_opaque(&u) && b.is_some_and(|b| b.kind == Kind::Dir);
                    l.out.insert(child.clone(), shown(&u));
                    visit(l, &child, true, merge);
                }
                (Some(u), _) => {
                    l.out.insert(child, shown(&u));
                }
                (None, Some(b)) => {
                    l.out.insert(child.clone(), b.clone());
                    if b.kind == Kind::Dir {
                        visit(l, &child, false, true);
                    }
                }
                (None, None) => unreachable!("a listed child is in a layer"),
            }
        }
    }
    let mut l = Layers {
        base,
        upper,
        base_children: children(base),
        upper_children: children(upper),
        out: Manifest::new(),
    };
    l.out.insert(Vec::new(), shown(&upper[&Vec::new()]));
    visit(&mut l, b"", true, true);
    l.out
}

// ---------------------------------------------------------------------------------------------
// The kernel's view, and cowherd's fold
// ---------------------------------------------------------------------------------------------

/// The differences between `want` and `got`, directory mtimes included; empty if none.
fn differences(want: &Manifest, got: &Manifest) -> Vec<String> {
    let opts = CompareOpts {
        dir_mtimes: true,
        allow_extra: false,
    };
    compare_manifests(want, got, opts).0
}

fn check(what: &str, want: &Manifest, got: &Manifest) -> Result<(), TestCaseError> {
    let problems = differences(want, got);
    if problems.is_empty() {
        return Ok(());
    }
    Err(TestCaseError::fail(format!(
        "{what}: {} difference(s):\n  {}",
        problems.len(),
        problems.join("\n  ")
    )))
}

/// One case: adopt the base, write the upper layer, check the model against the kernel, fold,
/// check base and the merged view against the model.
fn run_case(s: &Scratch, root: &Path, n: usize, case: &Case) -> Result<(), TestCaseError> {
    let name = format!("p{n}");
    let src = s.join("src").join(&name);
    fs::create_dir_all(&src).unwrap();
    write_layer(&src, &case.base_entries(), false);
    adopt(root, &src, &name);
    let upper = upper(root, &name);
    if !write_layer(&upper, &case.upper_entries(), case.shared_whiteouts) {
        // An empty upper layer is a pristine one (never mounted), which fold gives base's
        // root metadata: the generator always changes something.
        TreeBuilder::new(&upper).file("new", b"new\n");
    }
    set_owner_mode(&upper, 0, 0, case.root_mode);
    set_mtime(&upper, mtime(case.root_mtime));

    let want = model(&manifest(&base(root, &name)), &manifest(&upper));
    check(
        "the model against the kernel's merged view",
        &want,
        &merged_manifest(root, &name),
    )?;

    let out = cowherd(root)
        .args(["fold", &name, "--json"])
        .output()
        .unwrap();
    let report: Value = json_of(&out);
    prop_assert!(
        out.status.success(),
        "fold failed: {}\n{report:#}",
        String::from_utf8_lossy(&out.stderr)
    );
    prop_assert_eq!(
        &report[0]["failures"],
        &serde_json::json!([]),
        "{:#}",
        report
    );
    prop_assert_eq!(
        &report[0]["upper_emptied"],
        &Value::Bool(true),
        "{:#}",
        report
    );
    check("base after fold", &want, &manifest(&base(root, &name)))?;
    check(
        "the merged view after fold",
        &want,
        &merged_manifest(root, &name),
    )?;
    Ok(())
}

#[test]
fn fold_makes_base_the_merged_view_that_the_kernel_shows() {
    assert_root();
    own_mount_namespace();
    let s = Scratch::new("fold-props");
    let root = init_root(s.path());
    let cases = std::env::var("COWHERD_FOLD_PROPS_CASES")
        .ok()
        .and_then(|c| c.parse().ok())
        .unwrap_or(CASES);
    let config = Config {
        cases,
        max_shrink_iters: 256,
        failure_persistence: None,
        rng_seed: RngSeed::Fixed(seed("COWHERD_FOLD_PROPS_SEED")),
        ..Config::default()
    };
    let counter = Cell::new(0);
    let result = TestRunner::new(config).run(&case(), |case| {
        counter.set(counter.get() + 1);
        run_case(&s, &root, counter.get(), &case)
    });
    eprintln!("{} cases run (shrinking included)", counter.get());
    if let Err(e) = result {
        panic!("{e}");
    }
}

/// Regression (found by the property above): a directory made inside an opaque one (`rm -rf
/// /a; mkdir -p /a/c`) hides what base had at that path too, yet fold merged base's `a/c`
/// into it, so a file the guest deleted came back after the fold.
#[test]
fn a_directory_made_inside_an_opaque_one_keeps_base_hidden_after_fold() {
    assert_root();
    own_mount_namespace();
    let s = Scratch::new("fold-opaque-nested");
    let root = init_root(s.path());
    adopt_built(&root, s.path(), "g", |d| {
        TreeBuilder::new(d)
            .file("a/c/deleted", b"deleted by the guest\n")
            .file("a/kept-out", b"also deleted\n")
            .file("usr/x", b"x\n");
    });
    let mut mounts = MountedGuests::default();
    let point = rootfs(&root, "g");
    mounts.watch(&point);
    cowherd(&root).args(["mount", "g"]).assert().success();
    fs::remove_dir_all(point.join("a")).unwrap();
    fs::create_dir_all(point.join("a/c")).unwrap();
    fs::write(point.join("a/c/new"), b"new\n").unwrap();
    let want = manifest(&point);
    umount_ok(&root, &["g"]);
    assert_eq!(
        xattr::get(upper(&root, "g").join("a"), "trusted.overlay.opaque").unwrap(),
        Some(b"y".to_vec()),
        "rm -rf a; mkdir a makes an opaque directory"
    );
    assert_eq!(
        xattr::get(upper(&root, "g").join("a/c"), "trusted.overlay.opaque").unwrap(),
        None,
        "a directory made inside it is not opaque itself"
    );
    let folded = run_json(cowherd(&root).args(["fold", "g", "--json"]));
    assert_eq!(folded[0]["failures"], serde_json::json!([]), "{folded:#}");
    let problems = differences(&want, &manifest(&base(&root, "g")));
    assert!(
        problems.is_empty(),
        "base after fold:\n  {}",
        problems.join("\n  ")
    );
    cowherd(&root).args(["mount", "g"]).assert().success();
    let problems = differences(&want, &manifest(&point));
    assert!(
        problems.is_empty(),
        "the guest after fold:\n  {}",
        problems.join("\n  ")
    );
    umount_ok(&root, &["g"]);
}
