//! Real guest sets: Debian trees built by `mmdebstrap` for a few roles and suites — through
//! the builder's templates (`cowherd_builder`), the one way cowherd bootstraps a tree — cached
//! as tarballs, then copied and diverged per guest exactly like the synthetic guests
//! ([`crate::guest`]).
//!
//! A template's tree is read into the same in-memory [`Tree`] model as the synthetic base;
//! its regular files keep their bytes on disk ([`Body::Host`]) and are copied when a guest is
//! written. Guest `i` uses template `i % templates.len()`.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs;
use std::io::{self, Write as _};
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;

use cowherd_builder::TemplateSet;
use cowherd_unify::{HostRoot, NoProgress};

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
    /// The time the templates' timestamps are clamped to (as `SOURCE_DATE_EPOCH` made
    /// `mmdebstrap --format=tar` do) and the per-guest divergence starts from.
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

/// The cowherd root, below the cache, that the builder makes the templates' trees in.
const BUILD_ROOT: &str = "root";

/// Every file of a bench template is `private`: unifying the built tree links nothing, so the
/// tree keeps exactly the bootstrapper's hard links (identical files of different packages
/// stay separate inodes, as in a guest installed the ordinary way) and nothing is hashed.
const BENCH_POLICY: &str = "private /**";

/// The builder template that makes `template`'s tree: `bench-<suite>-<role>`.
fn builder_name(template: &Template) -> String {
    format!("bench-{}", template.name())
}

/// The definition of [`builder_name`]`(template)` in the schema of `templates/README.md`:
/// `mmdebstrap --variant=minbase` of the suite with the role's packages (`--include`), the
/// bootstrapper's default mirror, and every file private ([`BENCH_POLICY`]).
fn builder_definition(template: &Template) -> String {
    // A JSON string is a TOML basic string (the same escapes).
    let quote = |s: &str| serde_json::to_string(s).expect("a string serializes");
    let packages: Vec<String> = template.role.packages().iter().map(|p| quote(p)).collect();
    format!(
        "# Written by cowherd-bench: the tree of its real guest set's template {name}.\n\
         description = {description}\n\
         method = \"mmdebstrap\"\n\
         suite = {suite}\n\
         variant = \"minbase\"\n\
         packages = [{packages}]\n\
         \n\
         [policy]\n\
         rules = [{policy}]\n",
        name = template.name(),
        description = quote(&format!(
            "cowherd bench: {} {}",
            template.suite,
            template.role.name()
        )),
        suite = quote(&template.suite),
        packages = packages.join(", "),
        policy = quote(BENCH_POLICY),
    )
}

/// Writes `text` to `path` unless it holds it already, through a hidden temporary file (which
/// [`TemplateSet::load`] ignores) renamed into place.
fn write_if_changed(path: &Path, text: &str) -> Result<(), GenError> {
    if fs::read_to_string(path).is_ok_and(|old| old == text) {
        return Ok(());
    }
    let file = path.file_name().unwrap_or_default().to_string_lossy();
    let part = path.with_file_name(format!(".{file}.part"));
    let err = |source| GenError::WriteFile {
        path: path.to_path_buf(),
        source,
    };
    fs::write(&part, text).map_err(err)?;
    fs::rename(&part, path).map_err(err)
}

/// The cached tarball of `template`, built through the builder's templates if it is not
/// there yet.
///
/// The tree is made by [`cowherd_builder::build_template`] in a cowherd root of the cache's
/// own, `<cache>/root`, from the template `bench-<suite>-<role>` that this function writes to
/// `<cache>/root/templates.d/` ([`builder_definition`]: `mmdebstrap --variant=minbase
/// [--include=PKGS] SUITE`, every file private so nothing is linked). The builder cleans the
/// tree for reuse (apt lists and caches, files under `/var/log`, `/tmp` and `/var/tmp`, ssh
/// host keys, random seeds; `/etc/machine-id` empty). GNU tar then packs it into
/// `<cache>/<name>.tar.part` with owners, modes, extended attributes and ACLs, every mtime
/// clamped to `source_date_epoch`, and the result is renamed into place only when it
/// succeeded; the built version is then removed from the root (the tarball is the cache).
/// The bootstrapper's and tar's messages go to `<cache>/<name>.log`.
///
/// The bootstrapper runs with `SOURCE_DATE_EPOCH` set to `source_date_epoch`, and its
/// messages go to the log ([`cowherd_builder::BuildOptions`]).
///
/// # Errors
///
/// [`GenError::Builder`] if the root cannot be set up, the definition is refused, the build
/// fails (the bootstrapper missing or failing) or the built version cannot be removed;
/// [`GenError::Command`] if `tar` cannot be run or fails; [`GenError::CreateDir`] or
/// [`GenError::WriteFile`] for the cache directory, the definition, the log or the tarball.
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
    let log_path = cache.join(format!("{}.log", template.name()));
    let log = fs::File::create(&log_path).map_err(|source| GenError::WriteFile {
        path: log_path.clone(),
        source,
    })?;
    let log_err = |source| GenError::WriteFile {
        path: log_path.clone(),
        source,
    };
    let name = builder_name(template);
    let root_path = cache.join(BUILD_ROOT);
    let builder_err = |source: cowherd_builder::Error| GenError::Builder {
        root: root_path.clone(),
        template: name.clone(),
        log: log_path.clone(),
        source: Box::new(source),
    };
    let root = HostRoot::init(&root_path).map_err(|e| builder_err(e.into()))?;
    let defs = root.path().join("templates.d");
    fs::create_dir_all(&defs).map_err(|source| GenError::CreateDir {
        path: defs.clone(),
        source,
    })?;
    write_if_changed(
        &defs.join(format!("{name}.toml")),
        &builder_definition(template),
    )?;
    let set = TemplateSet::load(&defs).map_err(|e| builder_err(e.into()))?;
    // A version left by an earlier run that failed to pack it is reused, unless the role's
    // packages have changed since.
    let stale = cowherd_builder::latest(&root, &name)
        .map_err(builder_err)?
        .is_some_and(|b| b.record.packages != set.get(&name).map_or(&[][..], |t| &t.packages));
    let opts = cowherd_builder::BuildOptions {
        new_version: stale,
        log: Some(log_path.clone()),
        source_date_epoch: Some(source_date_epoch),
    };
    let built = cowherd_builder::build_template(&root, &set, &name, &opts, &NoProgress)
        .map_err(builder_err)?;
    let r = &built.record;
    writeln!(
        &log,
        "built {} ({}): {} files, {} bytes; packing it, mtimes clamped to {source_date_epoch}",
        built.label(),
        r.made_by,
        r.files,
        r.bytes
    )
    .map_err(log_err)?;
    if r.source_date_epoch != Some(source_date_epoch) {
        writeln!(
            &log,
            "note: the bootstrapper ran with SOURCE_DATE_EPOCH {}, not {source_date_epoch}: \
             the dates written into files (e.g. /etc/shadow's last password change) are the \
             build's; export SOURCE_DATE_EPOCH={source_date_epoch} to have them",
            r.source_date_epoch
                .map_or_else(|| "unset".to_owned(), |e| e.to_string())
        )
        .map_err(log_err)?;
    }
    let part = cache.join(format!("{}.tar.part", template.name()));
    let mut cmd = Command::new("tar");
    cmd.arg("--create")
        .arg("--file")
        .arg(&part)
        .arg("--directory")
        .arg(root.path().join(built.tree_rel()))
        .args([
            "--sort=name",
            "--format=pax",
            "--pax-option=delete=atime,delete=ctime",
            "--numeric-owner",
            "--one-file-system",
            "--xattrs",
            "--xattrs-include=*",
            "--acls",
            "--clamp-mtime",
        ])
        .arg(format!("--mtime=@{source_date_epoch}"))
        .arg(".")
        .stdin(Stdio::null())
        .stdout(log.try_clone().map_err(log_err)?)
        .stderr(log.try_clone().map_err(log_err)?);
    run(cmd, &format!("tar --create {}", part.display()), &log_path)?;
    fs::rename(&part, &tar).map_err(|source| GenError::WriteFile {
        path: tar.clone(),
        source,
    })?;
    cowherd_builder::remove_template(&root, &name, Some(built.record.version))
        .map_err(builder_err)?;
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

    use cowherd_builder::{Base, Bootstrapper, TemplateOrigin, parse_template};
    use cowherd_unify::{Access, Marker, Policy};

    #[test]
    fn bench_templates_are_builder_templates_that_link_nothing() {
        let dir = tempfile::tempdir().unwrap();
        for suite in ["bookworm", "trixie"] {
            for role in Role::ALL {
                let t = Template {
                    suite: suite.to_owned(),
                    role,
                };
                let name = builder_name(&t);
                assert_eq!(name, format!("bench-{suite}-{}", role.name()));
                let text = builder_definition(&t);
                let def = parse_template(&name, &text, TemplateOrigin::Builtin).unwrap();
                assert_eq!(
                    def.base,
                    Base::Bootstrap {
                        method: Bootstrapper::Mmdebstrap,
                        suite: suite.to_owned(),
                        variant: "minbase".to_owned(),
                        arch: None,
                        mirror: None,
                    }
                );
                assert_eq!(def.packages, role.packages());
                assert!(def.steps.is_empty());
                let policy = def.policy.expect("a [policy] table");
                let rules = policy.parse_rules().unwrap();
                let policy = Policy::compile(&rules, &[], Default::default()).unwrap();
                for path in ["/usr/bin/perl", "/etc/passwd", "/var/lib/dpkg/status"] {
                    assert_eq!(
                        policy.marker_for(path.as_bytes()),
                        Marker::Private,
                        "{path}"
                    );
                }
                write_if_changed(&dir.path().join(format!("{name}.toml")), &text).unwrap();
                write_if_changed(&dir.path().join(format!("{name}.toml")), &text).unwrap();
            }
        }
        // As an admin's files in `$ROOT/templates.d`, beside the built-in templates.
        let set = TemplateSet::load(dir.path()).unwrap();
        assert_eq!(
            set.get("bench-trixie-db").unwrap().packages,
            Role::Db.packages()
        );
        assert!(set.get("debian-bookworm-minbase").is_ok());
        assert_eq!(
            fs::read_dir(dir.path()).unwrap().count(),
            8,
            "no temporary file left"
        );
        // A suite the schema refuses names the file.
        let bad = Template {
            suite: "-bookworm".to_owned(),
            role: Role::Minbase,
        };
        let path = dir.path().join(format!("{}.toml", builder_name(&bad)));
        write_if_changed(&path, &builder_definition(&bad)).unwrap();
        let err = TemplateSet::load(dir.path()).unwrap_err().to_string();
        assert!(
            err.contains("bench--bookworm-minbase.toml") && err.contains("suite"),
            "{err}"
        );
    }

    /// `bookworm-minbase` end to end through the builder, as the harness makes it: needs root,
    /// mmdebstrap and Debian's mirror (about 20 s). Run it with
    /// `cargo test -p cowherd-benchdata -- --ignored real_template`.
    #[test]
    fn a_real_template_tarball_is_built_through_the_builder() {
        let dir = tempfile::tempdir().unwrap();
        let cache = dir.path().join("cache");
        let t = Template {
            suite: "bookworm".to_owned(),
            role: Role::Minbase,
        };
        let epoch = 1_700_000_000;
        let tar = template_tarball(&t, &cache, epoch).unwrap();
        assert_eq!(tar, cache.join("bookworm-minbase.tar"));
        assert!(!cache.join("bookworm-minbase.tar.part").exists());
        let log = fs::read_to_string(cache.join("bookworm-minbase.log")).unwrap();
        assert!(log.contains("built bench-bookworm-minbase@1"), "{log}");
        // The built version is gone from the root: the tarball is the cache.
        let root = HostRoot::open(&cache.join(BUILD_ROOT), Access::Read).unwrap();
        assert!(
            cowherd_builder::versions(&root, "bench-bookworm-minbase")
                .unwrap()
                .is_empty()
        );
        drop(root);
        // A second call reuses the tarball.
        let mtime = |p: &Path| fs::metadata(p).unwrap().modified().unwrap();
        let first = mtime(&tar);
        assert_eq!(template_tarball(&t, &cache, epoch).unwrap(), tar);
        assert_eq!(mtime(&tar), first);

        let tree = dir.path().join("tree");
        unpack(&tar, &tree).unwrap();
        let mut inodes = BTreeMap::new();
        for entry in walkdir::WalkDir::new(&tree) {
            let m = entry.unwrap().metadata().unwrap();
            assert!(m.mtime() <= epoch, "mtimes are clamped");
            if m.is_file() {
                *inodes.entry(m.ino()).or_insert(0) += 1;
            }
        }
        // Only dpkg's own hard links (perl's), not files the store would have merged.
        let linked = inodes.values().filter(|&&n| n > 1).count();
        assert!((1..10).contains(&linked), "{linked} hard-link groups");
        // Cleaned for reuse.
        let id = fs::read(tree.join("etc/machine-id")).unwrap_or_default();
        assert!(id.is_empty(), "machine-id {id:?}");
        let files_below = |rel: &str| {
            walkdir::WalkDir::new(tree.join(rel))
                .into_iter()
                .filter(|e| e.as_ref().unwrap().file_type().is_file())
                .count()
        };
        assert_eq!(files_below("var/lib/apt/lists"), 0);
        assert_eq!(files_below("var/log"), 0);
        assert!(tree.join("usr/bin/apt-get").is_file());
        // And the generator reads it as before.
        let base = load_template(&tree, &t.name(), 1, epoch).unwrap();
        assert!(base.tree.regular_files() > 5_000);
        assert!(!base.etc_pool.is_empty());
        assert_eq!(base.upgrades.len(), 2);
    }

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
