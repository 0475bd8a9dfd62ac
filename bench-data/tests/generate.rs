//! Behaviour of `generate_synthetic`: determinism, near-identity, and the special cases the
//! generated guests must contain.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::hash::{DefaultHasher, Hash, Hasher};
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};
use std::time::Instant;

use cowherd_benchdata::{GenError, SynthSpec, generate_synthetic};
use walkdir::WalkDir;

/// What one path of a guest looks like; everything the generator promises to reproduce.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Rec {
    kind: Kind,
    mode: u32,
    uid: u32,
    gid: u32,
    mtime: (i64, i64),
    /// Content digest of regular files.
    digest: u64,
    size: u64,
    /// Target of symlinks.
    target: Option<PathBuf>,
    /// (dev, ino) and link count; not compared between runs.
    inode: (u64, u64),
    nlink: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Dir,
    File,
    Symlink,
}

/// Content, size, mode, owner and mtime: what makes two files shareable.
type Key = (u64, u64, u32, u32, u32, (i64, i64));

/// Per path, how many guests have each (content digest, mtime).
type Versions<'a> = HashMap<&'a str, HashMap<(u64, (i64, i64)), usize>>;

impl Rec {
    /// Everything but the inode identity.
    fn comparable(&self) -> Self {
        Self {
            inode: (0, 0),
            ..self.clone()
        }
    }

    fn key(&self) -> Key {
        (
            self.digest,
            self.size,
            self.mode,
            self.uid,
            self.gid,
            self.mtime,
        )
    }
}

fn digest(bytes: &[u8]) -> u64 {
    let mut h = DefaultHasher::new();
    bytes.hash(&mut h);
    h.finish()
}

/// Every path of a guest (guest-absolute, `/` excluded) and its record.
fn walk(root: &Path) -> BTreeMap<String, Rec> {
    let mut out = BTreeMap::new();
    for entry in WalkDir::new(root).follow_links(false).min_depth(1) {
        let entry = entry.expect("walk");
        let meta = entry.path().symlink_metadata().expect("lstat");
        let ft = meta.file_type();
        let kind = if ft.is_dir() {
            Kind::Dir
        } else if ft.is_symlink() {
            Kind::Symlink
        } else {
            assert!(
                ft.is_file(),
                "unexpected file type at {}",
                entry.path().display()
            );
            Kind::File
        };
        let (digest, target) = match kind {
            Kind::File => (
                self::digest(&std::fs::read(entry.path()).expect("read")),
                None,
            ),
            Kind::Symlink => (0, Some(std::fs::read_link(entry.path()).expect("readlink"))),
            Kind::Dir => (0, None),
        };
        let rel = entry.path().strip_prefix(root).expect("under root");
        let rec = Rec {
            kind,
            mode: meta.mode() & 0o7777,
            uid: meta.uid(),
            gid: meta.gid(),
            mtime: (meta.mtime(), meta.mtime_nsec()),
            digest,
            size: if kind == Kind::File { meta.len() } else { 0 },
            target,
            inode: (meta.dev(), meta.ino()),
            nlink: meta.nlink(),
        };
        out.insert(format!("/{}", rel.display()), rec);
    }
    out
}

fn small_spec() -> SynthSpec {
    SynthSpec {
        seed: 42,
        guests: 3,
        files_per_guest: 300,
        max_file_size: 64 * 1024,
    }
}

#[test]
fn same_spec_twice_gives_identical_trees() {
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let spec = small_spec();
    let ra = generate_synthetic(&spec, a.path()).unwrap();
    let rb = generate_synthetic(&spec, b.path()).unwrap();
    assert_eq!((ra.files, ra.bytes), (rb.files, rb.bytes));
    assert_eq!(ra.guests.len(), 3);
    for (ga, gb) in ra.guests.iter().zip(&rb.guests) {
        assert_eq!(ga.file_name(), gb.file_name());
        let (ta, tb) = (walk(ga), walk(gb));
        assert_eq!(ta.keys().collect::<Vec<_>>(), tb.keys().collect::<Vec<_>>());
        for (path, rec) in &ta {
            assert_eq!(
                rec.comparable(),
                tb[path].comparable(),
                "{path} differs between runs"
            );
        }
        let root_a = std::fs::symlink_metadata(ga).unwrap();
        let root_b = std::fs::symlink_metadata(gb).unwrap();
        assert_eq!(
            (root_a.mode(), root_a.mtime()),
            (root_b.mode(), root_b.mtime())
        );
    }
}

#[test]
fn another_seed_gives_other_contents() {
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let spec = SynthSpec {
        guests: 1,
        ..small_spec()
    };
    let ra = generate_synthetic(&spec, a.path()).unwrap();
    let rb = generate_synthetic(&SynthSpec { seed: 43, ..spec }, b.path()).unwrap();
    let (ta, tb) = (walk(&ra.guests[0]), walk(&rb.guests[0]));
    let a = &ta["/usr/bin/bash"];
    assert_ne!(a.digest, tb["/usr/bin/bash"].digest);
}

#[test]
fn guests_are_near_identical_but_identity_files_differ() {
    let out = tempfile::tempdir().unwrap();
    let report = generate_synthetic(&small_spec(), out.path()).unwrap();
    let names: Vec<_> = report
        .guests
        .iter()
        .map(|g| g.file_name().unwrap().to_owned())
        .collect();
    assert_eq!(names, ["g01", "g02", "g03"]);
    let (g1, g2) = (walk(&report.guests[0]), walk(&report.guests[1]));
    let files: Vec<_> = g1.iter().filter(|(_, r)| r.kind == Kind::File).collect();
    let twins = files
        .iter()
        .filter(|(path, rec)| g2.get(*path).is_some_and(|other| other.key() == rec.key()))
        .count();
    let share = twins as f64 / files.len() as f64;
    println!(
        "{twins} of {} regular files of g01 have an identical twin in g02",
        files.len()
    );
    assert!(share > 0.7, "only {:.0}% twins", share * 100.0);

    for path in [
        "/etc/hostname",
        "/etc/hosts",
        "/etc/machine-id",
        "/etc/ssh/ssh_host_ed25519_key",
        "/etc/ssh/ssh_host_rsa_key.pub",
        "/home/user/.bash_history",
        "/root/.bash_history",
        "/var/log/syslog",
    ] {
        assert_ne!(
            g1[path].digest, g2[path].digest,
            "{path} is the same in g01 and g02"
        );
    }
    assert_eq!(g1["/etc/machine-id"].size, 33);
    assert_eq!(g2["/etc/machine-id"].size, 33);
    // A few configs were edited: same path, other bytes.
    let edited = g1
        .iter()
        .filter(|(p, r)| p.starts_with("/etc/") && r.kind == Kind::File)
        .filter(|(p, r)| g2.get(*p).is_some_and(|o| o.digest != r.digest))
        .count();
    assert!(edited >= 8, "only {edited} /etc files differ");
}

#[test]
fn hardlink_groups_stay_inside_one_guest() {
    let out = tempfile::tempdir().unwrap();
    let report = generate_synthetic(&small_spec(), out.path()).unwrap();
    let mut seen: HashMap<(u64, u64), usize> = HashMap::new();
    for (i, guest) in report.guests.iter().enumerate() {
        let tree = walk(guest);
        let mut groups: HashMap<(u64, u64), Vec<&str>> = HashMap::new();
        for (path, rec) in &tree {
            if let Some(owner) = seen.insert(rec.inode, i) {
                assert_eq!(owner, i, "{path} shares an inode with another guest");
            }
            if rec.kind == Kind::File && rec.nlink > 1 {
                groups.entry(rec.inode).or_default().push(path);
            }
        }
        let groups: BTreeSet<Vec<&str>> = groups.into_values().collect();
        assert!(
            groups.contains(&vec!["/usr/bin/perl", "/usr/bin/perl5.36.0"]),
            "{groups:?}"
        );
        assert!(
            groups.contains(&vec!["/etc/motd", "/usr/share/base-files/motd"]),
            "{groups:?}"
        );
        assert!(groups.iter().any(|g| g.len() == 3), "{groups:?}");
        for group in &groups {
            assert_eq!(
                tree[group[0]].nlink as usize,
                group.len(),
                "{group:?} has outside links"
            );
        }
    }
}

#[test]
fn guests_contain_empty_setuid_foreign_owned_and_symlinked_files() {
    let out = tempfile::tempdir().unwrap();
    let spec = SynthSpec {
        guests: 1,
        ..small_spec()
    };
    let report = generate_synthetic(&spec, out.path()).unwrap();
    let root = &report.guests[0];
    let tree = walk(root);
    let files = || tree.iter().filter(|(_, r)| r.kind == Kind::File);

    let empty: Vec<_> = files()
        .filter(|(_, r)| r.size == 0)
        .map(|(p, _)| p.as_str())
        .collect();
    assert!(
        empty.iter().any(|p| p.ends_with("/__init__.py")),
        "{empty:?}"
    );
    assert!(empty.contains(&"/var/lib/dpkg/lock"));

    let setuid: Vec<_> = files()
        .filter(|(_, r)| r.mode & 0o4000 != 0)
        .map(|(p, _)| p.as_str())
        .collect();
    assert!(setuid.contains(&"/usr/bin/passwd") && setuid.contains(&"/usr/bin/sudo"));
    assert_eq!(tree["/usr/bin/passwd"].mode, 0o4755);
    assert_eq!(
        (tree["/usr/bin/chage"].mode, tree["/usr/bin/chage"].gid),
        (0o2755, 42)
    );
    assert_eq!((tree["/etc/shadow"].uid, tree["/etc/shadow"].gid), (0, 42));
    assert!(files().any(|(p, r)| p.starts_with("/usr/") && (r.uid, r.gid) == (1000, 1000)));
    assert!(files().any(|(p, r)| p.starts_with("/home/user/") && (r.uid, r.gid) == (1000, 1000)));
    assert_eq!(tree["/tmp"].mode, 0o1777);
    assert_eq!(tree["/root"].mode, 0o700);
    assert!(files().all(|(_, r)| r.size <= spec.max_file_size));

    let target = |p: &str| tree[p].target.clone().unwrap();
    assert_eq!(target("/usr/bin/python3"), Path::new("python3.11"));
    assert_eq!(
        target("/etc/localtime"),
        Path::new("/usr/share/zoneinfo/UTC")
    );
    assert_eq!(target("/bin"), Path::new("usr/bin"));
    assert_eq!(tree["/usr/share/zoneinfo/UTC"].kind, Kind::File);
    // Dangling inside the guest.
    let resolv = target("/etc/resolv.conf");
    assert!(!root.join("etc").join(&resolv).exists());

    // dpkg conffiles: absolute /etc paths, one per line, that exist in the guest.
    let conffiles: Vec<_> = tree.keys().filter(|p| p.ends_with(".conffiles")).collect();
    assert!(conffiles.len() >= 5, "{conffiles:?}");
    for list in conffiles {
        let text = std::fs::read_to_string(root.join(&list[1..])).unwrap();
        for line in text.lines() {
            assert!(line.starts_with("/etc/"), "{list}: {line}");
            assert!(tree.contains_key(line), "{list} lists missing {line}");
        }
    }

    // Text-like files are text.
    let copyright = std::fs::read(root.join("usr/share/doc/bash/copyright")).unwrap();
    assert!(copyright.is_ascii() && copyright.contains(&b'\n'));
    let elf = std::fs::read(root.join("usr/bin/bash")).unwrap();
    assert_eq!(&elf[..4], b"\x7fELF");
}

#[test]
fn sizes_follow_a_small_file_heavy_long_tail() {
    let out = tempfile::tempdir().unwrap();
    let spec = SynthSpec {
        seed: 7,
        guests: 1,
        files_per_guest: 2_000,
        max_file_size: 1 << 20,
    };
    let report = generate_synthetic(&spec, out.path()).unwrap();
    let tree = walk(&report.guests[0]);
    let mut sizes: Vec<u64> = tree
        .values()
        .filter(|r| r.kind == Kind::File)
        .map(|r| r.size)
        .collect();
    sizes.sort_unstable();
    let n = sizes.len();
    let median = sizes[n / 2];
    let small = sizes.iter().filter(|&&s| s < 1024).count() as f64 / n as f64;
    println!(
        "{n} files, median {median} B, {:.0}% under 1 KiB, max {}",
        small * 100.0,
        sizes[n - 1]
    );
    assert!((2_000..2_400).contains(&n), "{n} files");
    assert!((1_024..=8_192).contains(&median), "median {median}");
    assert!(small > 0.15, "{small}");
    assert_eq!(sizes[n - 1], spec.max_file_size);
}

#[test]
fn existing_guest_directory_is_refused() {
    let out = tempfile::tempdir().unwrap();
    std::fs::create_dir(out.path().join("g02")).unwrap();
    let err = generate_synthetic(&small_spec(), out.path()).unwrap_err();
    assert!(
        matches!(&err, GenError::Exists { path } if path.ends_with("g02")),
        "{err}"
    );
    assert!(
        !out.path().join("g01").exists(),
        "nothing is written after a refusal"
    );
}

#[test]
fn demo_spec_generates_quickly_with_shared_divergence() {
    let out = tempfile::tempdir().unwrap();
    let spec = SynthSpec::demo();
    let start = Instant::now();
    let report = generate_synthetic(&spec, out.path()).unwrap();
    let elapsed = start.elapsed();
    println!(
        "demo: {} guests, {} files, {:.1} MiB in {elapsed:.2?} (this build's profile)",
        report.guests.len(),
        report.files,
        report.bytes as f64 / 1048576.0
    );
    assert_eq!(report.guests.len(), 12);
    assert_eq!(report.guests[11], out.path().join("g12"));

    let trees: Vec<_> = report.guests.iter().map(|g| walk(g)).collect();
    let guests = trees.len();

    // /opt/app: present in about a third of the guests, identical among them.
    let with_app: Vec<_> = trees
        .iter()
        .filter(|t| t.contains_key("/opt/app/bin/appd"))
        .collect();
    assert_eq!(with_app.len(), guests / 3);
    for t in &with_app[1..] {
        let app = |t: &BTreeMap<String, Rec>| -> Vec<_> {
            t.iter()
                .filter(|(p, _)| p.starts_with("/opt/app/"))
                .map(|(p, r)| (p.clone(), r.comparable()))
                .collect()
        };
        assert_eq!(app(t), app(with_app[0]));
    }

    // Per path, how many distinct versions (content or mtime) exist across guests.
    let mut versions: Versions<'_> = HashMap::new();
    for t in &trees {
        for (p, r) in t
            .iter()
            .filter(|(p, r)| r.kind == Kind::File && p.starts_with("/usr/"))
        {
            *versions
                .entry(p)
                .or_default()
                .entry((r.digest, r.mtime))
                .or_default() += 1;
        }
    }
    // Package upgrades: /usr/lib paths with a second content shared by several guests.
    let upgraded: HashSet<&str> = versions
        .iter()
        .filter(|(p, v)| p.starts_with("/usr/lib/") && v.len() >= 2)
        .filter(|(_, v)| {
            let digests: HashSet<u64> = v.keys().map(|k| k.0).collect();
            digests.len() >= 2 && v.values().filter(|&&n| n >= 2).count() >= 2
        })
        .map(|(p, _)| *p)
        .collect();
    assert!(!upgraded.is_empty(), "no upgraded package files");
    // Touched mtimes: same bytes everywhere, but more than one mtime.
    let touched = versions
        .values()
        .filter(|v| v.keys().map(|k| k.0).collect::<HashSet<_>>().len() == 1 && v.len() >= 2)
        .count();
    assert!(touched > 0, "no touched mtimes");
    println!(
        "{} upgraded /usr/lib paths, {touched} touched /usr paths",
        upgraded.len()
    );
}

/// Every `(path, name, value)` extended attribute of the regular files of a guest.
fn xattrs(root: &Path) -> BTreeSet<(String, String, Vec<u8>)> {
    let mut out = BTreeSet::new();
    for entry in WalkDir::new(root).follow_links(false) {
        let entry = entry.unwrap();
        if !entry.file_type().is_file() {
            continue;
        }
        for name in xattr::list(entry.path()).unwrap() {
            let value = xattr::get(entry.path(), &name).unwrap().unwrap();
            let rel = entry.path().strip_prefix(root).unwrap();
            out.insert((
                format!("/{}", rel.display()),
                name.to_string_lossy().into_owned(),
                value,
            ));
        }
    }
    out
}

#[test]
fn some_guests_differ_only_in_extended_attributes() {
    let out = tempfile::tempdir().unwrap();
    let spec = SynthSpec {
        guests: 12,
        ..SynthSpec::demo()
    };
    let report = generate_synthetic(&spec, out.path()).unwrap();
    let per_guest: Vec<_> = report.guests.iter().map(|g| xattrs(g)).collect();
    let with = |name: &str| {
        per_guest
            .iter()
            .filter(|x| x.iter().any(|(_, n, _)| n == name))
            .count()
    };
    // About a fifth carry capabilities, about a seventh labels; never all of them.
    let (caps, labels) = (with("security.capability"), with("user.integrity"));
    assert!((2..=3).contains(&caps), "{caps} guests with capabilities");
    assert!((1..=2).contains(&labels), "{labels} guests with labels");
    // The same paths and values wherever they appear, on /usr files whose bytes, owner, mode
    // and mtime are those of the guests without them.
    let capped: Vec<_> = per_guest
        .iter()
        .filter(|x| x.iter().any(|(_, n, _)| n == "security.capability"))
        .map(|x| {
            x.iter()
                .filter(|(_, n, _)| n == "security.capability")
                .cloned()
                .collect::<BTreeSet<_>>()
        })
        .collect();
    assert!(capped.windows(2).all(|w| w[0] == w[1]));
    let (path, _, _) = capped[0].iter().next().unwrap().clone();
    assert!(path.starts_with("/usr/bin/") || path.starts_with("/usr/sbin/"));
    let plain = report
        .guests
        .iter()
        .zip(&per_guest)
        .find(|(_, x)| x.is_empty())
        .map(|(g, _)| walk(g))
        .unwrap();
    let capped_guest = report
        .guests
        .iter()
        .zip(&per_guest)
        .find(|(_, x)| x.iter().any(|(_, n, _)| n == "security.capability"))
        .map(|(g, _)| walk(g))
        .unwrap();
    assert_eq!(plain[&path].key(), capped_guest[&path].key());
}
