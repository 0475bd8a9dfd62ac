//! Real guest sets: Debian trees built by `mmdebstrap` for a few roles and suites, cached as
//! tarballs, then copied and diverged per guest exactly like the synthetic guests
//! ([`crate::guest`]).
//!
//! A template's tree is read into the same in-memory [`Tree`] model as the synthetic base;
//! its regular files keep their bytes on disk ([`Body::Host`]) and are copied when a guest is
//! written. Guest `i` uses template `i % templates.len()`.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs;
use std::io;
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;

use crate::base::{Base, Upgrade};
use crate::content::Body;
use crate::error::GenError;
use crate::generate::write_guests;
use crate::guest::{Diverge, guest_tree};
use crate::seed::Rand;
use crate::spec::GenReport;
use crate::tree::{Content, Meta, Node, Tree};

const DAY: i64 = 86_400;

/// What a template is for: which packages `mmdebstrap` installs on top of `minbase`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Role {
    /// The `minbase` variant alone (essential packages and apt).
    Minbase,
    /// A web server: `minbase` plus `nginx`, `php-fpm`, `openssh-server` and `curl`.
    Web,
    /// A database server: `minbase` plus `postgresql` and `openssh-server`.
    Db,
    /// A build host: `minbase` plus a compiler toolchain, git and Python.
    Dev,
}

impl Role {
    /// Every role, in order.
    pub const ALL: [Role; 4] = [Role::Minbase, Role::Web, Role::Db, Role::Dev];

    /// The role's name as used in template names: `minbase`, `web`, `db`, `dev`.
    #[must_use]
    pub fn name(self) -> &'static str {
        match self {
            Role::Minbase => "minbase",
            Role::Web => "web",
            Role::Db => "db",
            Role::Dev => "dev",
        }
    }

    /// The packages installed on top of `minbase`.
    #[must_use]
    pub fn packages(self) -> &'static [&'static str] {
        match self {
            Role::Minbase => &[],
            Role::Web => &["nginx", "php-fpm", "openssh-server", "curl"],
            Role::Db => &["postgresql", "openssh-server"],
            Role::Dev => &["build-essential", "git", "python3", "openssh-server"],
        }
    }
}

impl std::str::FromStr for Role {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Role::ALL
            .into_iter()
            .find(|r| r.name() == s)
            .ok_or_else(|| format!("unknown role {s:?} (minbase, web, db, dev)"))
    }
}

/// One template: a Debian suite and a role.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Template {
    /// The Debian suite (`bookworm`, `trixie`, …).
    pub suite: String,
    /// What is installed.
    pub role: Role,
}

impl Template {
    /// `<suite>-<role>`, the name of the cached tarball (`<suite>-<role>.tar`).
    #[must_use]
    pub fn name(&self) -> String {
        format!("{}-{}", self.suite, self.role.name())
    }
}

/// The parameters of a real guest set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RealSpec {
    /// Seed of every per-guest choice (the template trees themselves come from the mirror).
    pub seed: u64,
    /// Number of guests; guest `i` is made from `templates[i % templates.len()]`.
    pub guests: usize,
    /// The templates, each built once.
    pub templates: Vec<Template>,
    /// Where template tarballs are cached (`<cache>/<suite>-<role>.tar`) and unpacked.
    pub cache: PathBuf,
    /// `SOURCE_DATE_EPOCH` given to `mmdebstrap` (clamps the trees' timestamps) and the
    /// time the per-guest divergence starts from.
    pub source_date_epoch: i64,
}

impl RealSpec {
    /// The benchmark spec: bookworm and trixie, each as minbase, web, db and dev.
    #[must_use]
    pub fn bench(guests: usize, cache: PathBuf) -> Self {
        let templates = ["bookworm", "trixie"]
            .into_iter()
            .flat_map(|suite| {
                Role::ALL.into_iter().map(move |role| Template {
                    suite: suite.to_owned(),
                    role,
                })
            })
            .collect();
        Self {
            seed: 0xBE7C_4DA7_A5EE_D001,
            guests,
            templates,
            cache,
            source_date_epoch: 1_700_000_000,
        }
    }
}

/// The cached tarball of `template`, built with `mmdebstrap` if it is not there yet.
///
/// The build runs `mmdebstrap --variant=minbase [--include=PKGS] --format=tar SUITE` with
/// `SOURCE_DATE_EPOCH` set, into `<cache>/<name>.tar.part` (log in `<cache>/<name>.log`),
/// and renames the result into place only when it succeeded.
///
/// # Errors
///
/// [`GenError::Command`] if `mmdebstrap` cannot be run or fails; [`GenError::CreateDir`] if
/// the cache directory cannot be created.
pub fn template_tarball(
    template: &Template,
    cache: &Path,
    source_date_epoch: i64,
) -> Result<PathBuf, GenError> {
    let tar = cache.join(format!("{}.tar", template.name()));
    if tar.is_file() {
        return Ok(tar);
    }
    fs::create_dir_all(cache).map_err(|source| GenError::CreateDir {
        path: cache.to_path_buf(),
        source,
    })?;
    let part = cache.join(format!("{}.tar.part", template.name()));
    let log_path = cache.join(format!("{}.log", template.name()));
    let log = fs::File::create(&log_path).map_err(|source| GenError::WriteFile {
        path: log_path.clone(),
        source,
    })?;
    let mut cmd = Command::new("mmdebstrap");
    cmd.arg("--variant=minbase").arg("--format=tar");
    if !template.role.packages().is_empty() {
        cmd.arg(format!("--include={}", template.role.packages().join(",")));
    }
    cmd.arg(&template.suite)
        .arg(&part)
        .env("SOURCE_DATE_EPOCH", source_date_epoch.to_string())
        .stdin(Stdio::null())
        .stdout(log.try_clone().map_err(|source| GenError::WriteFile {
            path: log_path.clone(),
            source,
        })?)
        .stderr(log);
    run(cmd, &format!("mmdebstrap {}", template.name()), &log_path)?;
    fs::rename(&part, &tar).map_err(|source| GenError::WriteFile {
        path: tar.clone(),
        source,
    })?;
    Ok(tar)
}

/// Runs `cmd`; a failure names `what` and the log to read.
fn run(mut cmd: Command, what: &str, log: &Path) -> Result<(), GenError> {
    let status = cmd.status().map_err(|e| GenError::Command {
        what: what.to_owned(),
        detail: format!("cannot run: {e}"),
    })?;
    if status.success() {
        Ok(())
    } else {
        Err(GenError::Command {
            what: what.to_owned(),
            detail: format!("{status}; see {}", log.display()),
        })
    }
}

/// Unpacks `tar` into `dir` (which must not exist) with owners, modes and extended
/// attributes, leaving out the device nodes under `/dev`.
fn unpack(tar: &Path, dir: &Path) -> Result<(), GenError> {
    fs::create_dir_all(dir).map_err(|source| GenError::CreateDir {
        path: dir.to_path_buf(),
        source,
    })?;
    let mut cmd = Command::new("tar");
    cmd.arg("--extract")
        .arg("--file")
        .arg(tar)
        .arg("--directory")
        .arg(dir)
        .args([
            "--numeric-owner",
            "--same-permissions",
            "--same-owner",
            "--xattrs",
            "--xattrs-include=*",
            "--exclude=./dev/*",
        ])
        .stdin(Stdio::null());
    run(cmd, &format!("tar --extract {}", tar.display()), tar)
}

/// Generates the real guest set described by `spec` under `out`: builds (or reuses) each
/// template's tarball, unpacks it under the cache, and writes every guest as a copy of its
/// template diverged by the same rules as a synthetic guest (identity, user data, logs,
/// edited configs, `/opt/app`, upgraded packages, touched mtimes, extended attributes).
/// The unpacked trees are removed afterwards; the tarballs stay.
///
/// The same cached tarballs and spec always give byte-identical guests.
///
/// # Errors
///
/// Every [`GenError`]: building or unpacking a template, reading it, writing a guest.
pub fn generate_real(spec: &RealSpec, out: &Path) -> Result<GenReport, GenError> {
    assert!(!spec.templates.is_empty(), "a real spec needs a template");
    let mut loaded = Vec::new();
    let mut trees = Vec::new();
    for template in &spec.templates {
        let tar = template_tarball(template, &spec.cache, spec.source_date_epoch)?;
        let dir = spec.cache.join(format!("{}.tree", template.name()));
        if dir.symlink_metadata().is_ok() {
            remove_tree(&dir)?;
        }
        unpack(&tar, &dir)?;
        trees.push(dir.clone());
        let base = load_template(&dir, &template.name(), spec.seed, spec.source_date_epoch)?;
        let diverge = Diverge {
            seed: spec.seed,
            files_per_guest: base.tree.regular_files(),
            max_file_size: 16 * 1024 * 1024,
        };
        loaded.push((base, diverge));
    }
    let result = write_guests(out, spec.guests, spec.seed, |i, name| {
        let (base, diverge) = &loaded[i % loaded.len()];
        guest_tree(base, diverge, i, name)
    });
    for dir in &trees {
        remove_tree(dir)?;
    }
    result
}

fn remove_tree(dir: &Path) -> Result<(), GenError> {
    fs::remove_dir_all(dir).map_err(|source| GenError::ReadTemplate {
        path: dir.to_path_buf(),
        source,
    })
}

fn read_err(path: &Path) -> impl FnOnce(io::Error) -> GenError + '_ {
    move |source| GenError::ReadTemplate {
        path: path.to_path_buf(),
        source,
    }
}

/// The guest-absolute path of `path` below `root`.
fn guest_path(root: &Path, path: &Path) -> Option<String> {
    let rel = path.strip_prefix(root).ok()?;
    let rel = rel.to_str()?;
    Some(if rel.is_empty() {
        "/".to_owned()
    } else {
        format!("/{rel}")
    })
}

fn meta_of(m: &fs::Metadata) -> Meta {
    Meta::root(m.mode() & 0o7777, m.mtime().max(0), m.mtime_nsec() as u32).owned(m.uid(), m.gid())
}

/// Reads the unpacked template at `root` into a [`Base`]: regular files keep their bytes on
/// disk; hard-link groups, symlinks, owners, modes, times and extended attributes are kept;
/// device nodes, FIFOs and sockets are left out (as are paths that are not UTF-8). The
/// divergence pools come from the tree itself: `/etc` conffiles from dpkg's records, `/usr`
/// files outside hard-link groups, and two package "upgrades" (same paths, a few bytes of
/// every `/usr/lib` file and the changelog patched, newer mtime).
pub(crate) fn load_template(
    root: &Path,
    name: &str,
    seed: u64,
    epoch: i64,
) -> Result<Base, GenError> {
    let mut tree = Tree::new(Meta::root(0o755, epoch, 0));
    // (dev, ino) -> guest paths of the regular file, to rebuild hard-link groups.
    let mut inodes: BTreeMap<(u64, u64), Vec<String>> = BTreeMap::new();
    let mut host: HashMap<String, PathBuf> = HashMap::new();
    for entry in walkdir::WalkDir::new(root)
        .follow_links(false)
        .sort_by_file_name()
    {
        let entry = entry.map_err(|e| {
            let path = e.path().unwrap_or(root).to_path_buf();
            GenError::ReadTemplate {
                path,
                source: e.into(),
            }
        })?;
        let path = entry.path();
        let Some(gpath) = guest_path(root, path) else {
            continue;
        };
        let m = path.symlink_metadata().map_err(read_err(path))?;
        let ft = m.file_type();
        if ft.is_dir() {
            tree.entries.insert(gpath.clone(), Node::Dir(meta_of(&m)));
        } else if ft.is_file() {
            inodes
                .entry((m.dev(), m.ino()))
                .or_default()
                .push(gpath.clone());
            let content = Content {
                key: Arc::from(gpath.as_str()),
                variant: 0,
                body: Body::Host {
                    path: Arc::from(path),
                    size: m.len(),
                    patch: false,
                },
            };
            tree.entries
                .insert(gpath.clone(), Node::File(meta_of(&m), content));
            host.insert(gpath.clone(), path.to_path_buf());
        } else if ft.is_symlink() {
            let target = fs::read_link(path).map_err(read_err(path))?;
            let Some(target) = target.to_str() else {
                continue;
            };
            tree.entries
                .insert(gpath.clone(), Node::Symlink(meta_of(&m), target.to_owned()));
            continue;
        } else {
            continue;
        }
        let names = xattr::list(path).map_err(read_err(path))?;
        for xname in names {
            let Some(n) = xname.to_str() else { continue };
            if let Some(value) = xattr::get(path, &xname).map_err(read_err(path))? {
                tree.set_xattr(&gpath, n, &value);
            }
        }
    }
    // Hard-link groups: the first path (in tree order) keeps the file, the others name it.
    let mut linked = BTreeSet::new();
    for paths in inodes.values().filter(|p| p.len() > 1) {
        let first = paths.iter().min().expect("non-empty").clone();
        for p in paths.iter().filter(|p| **p != first) {
            tree.entries
                .insert(p.clone(), Node::Hardlink(first.clone()));
            tree.xattrs.remove(p);
            linked.insert(p.clone());
        }
        linked.insert(first);
    }
    let plain_file = |tree: &Tree, p: &str| {
        matches!(tree.entries.get(p), Some(Node::File(..))) && !linked.contains(p)
    };
    let info = root.join("var/lib/dpkg/info");
    let mut records: Vec<PathBuf> = match fs::read_dir(&info) {
        Ok(dir) => dir
            .map(|e| e.map(|e| e.path()))
            .collect::<io::Result<_>>()
            .map_err(read_err(&info))?,
        Err(e) if e.kind() == io::ErrorKind::NotFound => Vec::new(),
        Err(e) => return Err(read_err(&info)(e)),
    };
    records.sort();
    let mut etc_pool = BTreeSet::new();
    let mut packages: Vec<(String, Vec<String>)> = Vec::new();
    for record in &records {
        let Some(file) = record.file_name().and_then(|f| f.to_str()) else {
            continue;
        };
        if file.ends_with(".conffiles") {
            let text = fs::read_to_string(record).map_err(read_err(record))?;
            for line in text.lines() {
                if let Some(p) = line.split_whitespace().next()
                    && p.starts_with("/etc/")
                    && plain_file(&tree, p)
                {
                    etc_pool.insert(p.to_owned());
                }
            }
        } else if let Some(pkg) = file.strip_suffix(".list") {
            let text = fs::read_to_string(record).map_err(read_err(record))?;
            let files = text
                .lines()
                .filter(|p| plain_file(&tree, p))
                .map(str::to_owned)
                .collect();
            packages.push((pkg.to_owned(), files));
        }
    }
    let usr_pool = tree
        .entries
        .iter()
        .filter(|(p, n)| {
            p.starts_with("/usr/") && matches!(n, Node::File(..)) && !linked.contains(*p)
        })
        .map(|(p, _)| p.clone())
        .collect();
    let upgrades = upgrades(&tree, &packages, &host, name, seed, epoch);
    Ok(Base {
        tree,
        epoch,
        etc_pool: etc_pool.into_iter().collect(),
        usr_pool,
        upgrades,
    })
}

/// Two package upgrades: first a package shipping a shared library under `/usr/lib`, then
/// another with files there. Every `/usr/lib` file of the package, its changelog and its
/// `.md5sums` get a new version (patched bytes, a later mtime).
fn upgrades(
    tree: &Tree,
    packages: &[(String, Vec<String>)],
    host: &HashMap<String, PathBuf>,
    name: &str,
    seed: u64,
    epoch: i64,
) -> Vec<Upgrade> {
    let mut rng = Rand::new(seed, &format!("upgrades:{name}"), 0);
    let lib = |p: &String| p.starts_with("/usr/lib/");
    let mut out = Vec::new();
    let mut taken = BTreeSet::new();
    for variant in 1..=2u64 {
        let candidates: Vec<&(String, Vec<String>)> = packages
            .iter()
            .filter(|(pkg, files)| {
                !taken.contains(pkg)
                    && files
                        .iter()
                        .any(|p| lib(p) && (variant == 2 || p.contains(".so")))
            })
            .collect();
        if candidates.is_empty() {
            continue;
        }
        let (pkg, files) = candidates[rng.index(candidates.len())];
        taken.insert(pkg.clone());
        let secs = epoch + (20 + 15 * variant as i64) * DAY + rng.below(DAY as u64) as i64;
        let base_name = pkg.split(':').next().unwrap_or(pkg);
        let changelog = format!("/usr/share/doc/{base_name}/changelog.Debian.gz");
        let md5sums = format!("/var/lib/dpkg/info/{pkg}.md5sums");
        let changed = files
            .iter()
            .filter(|p| lib(p) || **p == changelog)
            .chain(std::iter::once(&md5sums));
        let mut new = Vec::new();
        for path in changed {
            let (Some(Node::File(_, content)), Some(at)) = (tree.entries.get(path), host.get(path))
            else {
                continue;
            };
            let size = content.body.size();
            if size == 0 {
                continue;
            }
            new.push((
                path.clone(),
                Content {
                    key: Arc::from(path.as_str()),
                    variant,
                    body: Body::Host {
                        path: Arc::from(at.as_path()),
                        size,
                        patch: true,
                    },
                },
            ));
        }
        out.push(Upgrade { secs, files: new });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    /// A tiny "template": a library package, a tool with a conffile, a hard-link pair, a
    /// symlink, a file with a capability and dpkg's records.
    fn template(root: &Path) {
        let w = |p: &str, bytes: &[u8]| {
            let path = root.join(p);
            fs::create_dir_all(path.parent().unwrap()).unwrap();
            fs::write(path, bytes).unwrap();
        };
        w("usr/lib/x86_64-linux-gnu/libfoo.so.1", &[1u8; 5000]);
        w("usr/share/doc/libfoo1/changelog.Debian.gz", &[2u8; 300]);
        w("usr/bin/tool", &[3u8; 4000]);
        w("etc/tool.conf", b"a = 1\n");
        w("etc/skel/.bashrc", b"# bashrc\n");
        w(
            "var/lib/dpkg/info/libfoo1:amd64.list",
            b"/usr/lib/x86_64-linux-gnu/libfoo.so.1\n/usr/share/doc/libfoo1/changelog.Debian.gz\n",
        );
        w(
            "var/lib/dpkg/info/libfoo1:amd64.md5sums",
            b"00  usr/lib/x86_64-linux-gnu/libfoo.so.1\n",
        );
        w(
            "var/lib/dpkg/info/tool.list",
            b"/usr/bin/tool\n/etc/tool.conf\n",
        );
        w("var/lib/dpkg/info/tool.conffiles", b"/etc/tool.conf\n");
        fs::hard_link(root.join("usr/bin/tool"), root.join("usr/bin/tool2")).unwrap();
        symlink("tool", root.join("usr/bin/t")).unwrap();
        xattr::set(root.join("usr/bin/tool"), "user.mark", b"1").unwrap();
    }

    #[test]
    fn templates_load_with_links_pools_and_upgrades() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("t");
        template(&root);
        let base = load_template(&root, "test-minbase", 5, 1_700_000_000).unwrap();
        let t = &base.tree;
        assert!(
            matches!(t.entries["/usr/bin/tool2"], Node::Hardlink(ref to) if to == "/usr/bin/tool")
        );
        assert!(matches!(t.entries["/usr/bin/t"], Node::Symlink(_, ref to) if to == "tool"));
        assert_eq!(&*t.xattrs["/usr/bin/tool"][0].1, b"1");
        assert_eq!(base.etc_pool, ["/etc/tool.conf"]);
        assert!(
            base.usr_pool
                .contains(&"/usr/lib/x86_64-linux-gnu/libfoo.so.1".to_owned())
        );
        assert!(!base.usr_pool.iter().any(|p| p.starts_with("/usr/bin/tool")));
        assert_eq!(
            base.upgrades.len(),
            1,
            "only one package ships /usr/lib files"
        );
        let up: Vec<&str> = base.upgrades[0]
            .files
            .iter()
            .map(|(p, _)| p.as_str())
            .collect();
        assert_eq!(
            up,
            [
                "/usr/lib/x86_64-linux-gnu/libfoo.so.1",
                "/usr/share/doc/libfoo1/changelog.Debian.gz",
                "/var/lib/dpkg/info/libfoo1:amd64.md5sums"
            ]
        );

        // Guests written from it: the template's bytes, hard links and xattrs, diverged.
        let diverge = Diverge {
            seed: 5,
            files_per_guest: t.regular_files(),
            max_file_size: 1 << 20,
        };
        let out = dir.path().join("out");
        let report =
            write_guests(&out, 4, 5, |i, name| guest_tree(&base, &diverge, i, name)).unwrap();
        assert_eq!(report.guests.len(), 4);
        for g in &report.guests {
            let tool = fs::symlink_metadata(g.join("usr/bin/tool")).unwrap();
            let tool2 = fs::symlink_metadata(g.join("usr/bin/tool2")).unwrap();
            assert_eq!(tool.ino(), tool2.ino());
            assert_eq!(fs::read(g.join("usr/bin/tool")).unwrap(), [3u8; 4000]);
            assert_eq!(
                xattr::get(g.join("usr/bin/tool"), "user.mark")
                    .unwrap()
                    .as_deref(),
                Some(&b"1"[..])
            );
            assert!(g.join("etc/hostname").is_file());
            assert_eq!(
                fs::read(g.join("home/user/.bashrc")).unwrap(),
                b"# bashrc\n"
            );
        }
        let lib = |g: &PathBuf| fs::read(g.join("usr/lib/x86_64-linux-gnu/libfoo.so.1")).unwrap();
        let versions: BTreeSet<Vec<u8>> = report.guests.iter().map(lib).collect();
        assert!(versions.contains(&vec![1u8; 5000]));
        assert!(versions.iter().all(|v| v.len() == 5000));
    }
}
