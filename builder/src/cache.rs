//! The template cache: a template's tree built once — by mmdebstrap (or debootstrap), from a
//! tarball, from another guest, or from the tree of the template it builds on — with its
//! packages and steps run inside it, cleaned for reuse, unified into the store, and kept as
//! `$ROOT/templates/NAME/VERSION/` (see the layout in `cowherd_unify`'s root module).

use std::path::{Path, PathBuf};
use std::process::Command;

use cowherd_unify::{
    CloneMode, HostRoot, OriginKind, PolicyFile, Progress, TEMPLATE_REMOVING, TEMPLATE_STAGING,
    Tree, TreeSpec, UnifyOptions,
};
use serde::{Deserialize, Serialize};

use crate::error::Error;
use crate::exec::Exec;
use crate::programs::{Leash, find_program};
use crate::template::{Base, Bootstrapper, Template, TemplateSet};

/// What `templates/NAME/VERSION/template.toml` records.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BuiltRecord {
    /// The template.
    pub name: String,
    /// Its version (1, 2, …).
    pub version: u32,
    /// When it was built (seconds since the epoch).
    pub built_unix: i64,
    /// How its tree was made: `mmdebstrap bookworm minbase`, `from debian-bookworm-minbase@1`, …
    pub made_by: String,
    /// Packages installed on top of the base.
    #[serde(default)]
    pub packages: Vec<String>,
    /// The steps run in the tree.
    #[serde(default)]
    pub steps: Vec<String>,
    /// The built template it was made from (`name@version`), if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<String>,
    /// `SOURCE_DATE_EPOCH` during the build, if set (the bootstrapper honours it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_date_epoch: Option<i64>,
    /// Regular files of the tree.
    pub files: u64,
    /// Allocated bytes of its files, each inode once.
    pub bytes: u64,
}

/// A built template in the cache.
#[derive(Clone, Debug, Serialize)]
pub struct Built {
    /// Its record.
    pub record: BuiltRecord,
}

impl Built {
    /// `name@version`, as guest records name it.
    pub fn label(&self) -> String {
        format!("{}@{}", self.record.name, self.record.version)
    }

    /// Its tree, relative to the root.
    pub fn tree_rel(&self) -> PathBuf {
        version_rel(&self.record.name, self.record.version).join("tree")
    }

    /// Its name in the index.
    pub fn index_name(&self) -> String {
        format!("@template/{}/{}", self.record.name, self.record.version)
    }
}

pub(crate) fn version_rel(name: &str, version: u32) -> PathBuf {
    Path::new("templates").join(name).join(version.to_string())
}

fn io(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> Error {
    let path = path.into();
    move |error| Error::Io { path, error }
}

/// The built versions of template `name`, oldest first.
///
/// # Errors
/// Reading the cache directory or a record.
pub fn versions(root: &HostRoot, name: &str) -> Result<Vec<Built>, Error> {
    // A name that is no template's (`..`, `a/b`) has no versions, and is never a path.
    if !crate::template::valid_name(name) {
        return Ok(Vec::new());
    }
    let dir = root.path().join("templates").join(name);
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return Ok(Vec::new());
    };
    let mut found = Vec::new();
    for entry in entries {
        let entry = entry.map_err(io(&dir))?;
        let Some(version) = entry
            .file_name()
            .to_str()
            .and_then(|v| v.parse::<u32>().ok())
        else {
            continue;
        };
        let path = entry.path().join("template.toml");
        let text = std::fs::read_to_string(&path).map_err(io(&path))?;
        let record: BuiltRecord = toml::from_str(&text).map_err(|e| Error::BadCache {
            path: path.clone(),
            message: e.to_string(),
        })?;
        if record.version == version {
            found.push(Built { record });
        }
    }
    found.sort_by_key(|b| b.record.version);
    Ok(found)
}

/// The newest built version of template `name`.
///
/// # Errors
/// As [`versions`].
pub fn latest(root: &HostRoot, name: &str) -> Result<Option<Built>, Error> {
    Ok(versions(root, name)?.pop())
}

/// The guests whose record says they were built from `built`.
///
/// # Errors
/// Reading the guests and their records.
pub fn guests_using(root: &HostRoot, built: &Built) -> Result<Vec<String>, Error> {
    let label = built.label();
    let mut users = Vec::new();
    for name in cowherd_unify::guest_names(root)? {
        let record = cowherd_unify::guest_record(root, &name)?;
        if record.origin.kind == OriginKind::Template
            && record.origin.template.as_deref() == Some(label.as_str())
        {
            users.push(name);
        }
    }
    Ok(users)
}

/// The marker policy of template `name`: its own `[policy]` rules first, then those of the
/// templates it builds on, nearest first; the nearest `dpkg_conffiles` setting wins.
///
/// # Errors
/// Template errors.
pub fn template_policy(set: &TemplateSet, name: &str) -> Result<Option<PolicyFile>, Error> {
    let mut policy: Option<PolicyFile> = None;
    for template in set.chain(name)?.into_iter().rev() {
        let Some(own) = &template.policy else {
            continue;
        };
        let merged = policy.get_or_insert_with(PolicyFile::default);
        merged.rules.extend(own.rules.iter().cloned());
        merged.dpkg_conffiles = merged.dpkg_conffiles.or(own.dpkg_conffiles);
    }
    Ok(policy)
}

/// How [`build_template`] runs.
#[derive(Clone, Debug, Default)]
pub struct BuildOptions {
    /// Build a new version even if one is cached (a rebuild).
    pub new_version: bool,
    /// Where the bootstrapper's and tar's messages go (appended); the caller's standard
    /// output and error if `None`.
    pub log: Option<PathBuf>,
    /// `SOURCE_DATE_EPOCH` for the bootstrapper (it clamps the tree's timestamps); else the
    /// environment's, if set.
    pub source_date_epoch: Option<i64>,
}

impl BuildOptions {
    /// The epoch the build uses: the option's, else the environment's.
    fn epoch(&self) -> Option<i64> {
        self.source_date_epoch.or_else(|| {
            std::env::var("SOURCE_DATE_EPOCH")
                .ok()
                .and_then(|v| v.parse().ok())
        })
    }

    /// Points a tool's output at the log, and gives it the epoch.
    fn prepare(&self, cmd: &mut Command) -> Result<(), Error> {
        if let Some(epoch) = self.epoch() {
            cmd.env("SOURCE_DATE_EPOCH", epoch.to_string());
        }
        if let Some(log) = &self.log {
            let file = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(log)
                .map_err(io(log))?;
            cmd.stdout(file.try_clone().map_err(io(log))?).stderr(file);
        }
        Ok(())
    }
}

/// Builds template `name`: the newest cached version is returned as it is unless
/// `opts.new_version` (a rebuild); a template built on another (`from`) builds that one first
/// if it is not cached.
///
/// # Algorithm
/// In `templates/NAME/.building/tree`: the base (the bootstrapper with the packages; a
/// tarball unpacked; a guest's merged view exported; or a copy of the parent's newest tree),
/// then — inside the tree, in its own namespaces (`exec`) — `apt-get install` of the packages
/// a non-bootstrapped base needs and each step. Then the tree is cleaned for reuse (apt lists
/// and caches, logs, `/etc/machine-id` emptied, ssh host keys and random seeds removed),
/// unified into the store under the template's policy (so its shareable files are store
/// objects that guests built from it link to) and only then renamed to
/// `templates/NAME/VERSION`. A killed build leaves only the staging directory, which the next
/// writer removes with the index rows of its unification.
///
/// # Errors
/// Template errors (unknown name, cycle), [`Error::MissingProgram`] without a bootstrapper,
/// a failing bootstrapper, package installation or step (naming it), I/O errors.
pub fn build_template(
    root: &HostRoot,
    set: &TemplateSet,
    name: &str,
    opts: &BuildOptions,
    progress: &dyn Progress,
) -> Result<Built, Error> {
    let template = set.get(name)?;
    if !opts.new_version
        && let Some(built) = latest(root, name)?
    {
        return Ok(built);
    }
    let parent = match &template.base {
        Base::From { template: parent } => {
            let cached = BuildOptions {
                new_version: false,
                ..opts.clone()
            };
            Some(build_template(root, set, parent, &cached, progress)?)
        }
        _ => None,
    };
    let staging = Path::new("templates").join(name).join(TEMPLATE_STAGING);
    cowherd_unify::remove_below_root(root, &staging).or_else(|e| match e.errno() {
        Some(libc::ENOENT) => Ok(()),
        _ => Err(e),
    })?;
    let tree_rel = staging.join("tree");
    let made_by = make_base(root, template, parent.as_ref(), &tree_rel, opts)?;
    let tree = Tree::open(root, &tree_rel)?;
    let installs = match template.base {
        Base::Bootstrap { .. } => false,
        _ => !template.packages.is_empty(),
    };
    if installs {
        // The names are arguments of the script, never parsed by the shell.
        run_step(tree.path(), name, INSTALL_SCRIPT, &template.packages, opts)?;
    }
    for step in &template.steps {
        run_step(tree.path(), name, step, &[], opts)?;
    }
    clean_for_reuse(root, &tree)?;
    let version = versions(root, name)?
        .last()
        .map_or(1, |b| b.record.version + 1);
    let (files, bytes) = tree_size(tree.path());
    let built = Built {
        record: BuiltRecord {
            name: name.to_string(),
            version,
            built_unix: now_unix(),
            made_by,
            packages: template.packages.clone(),
            steps: template.steps.clone(),
            from: parent.as_ref().map(Built::label),
            source_date_epoch: opts.epoch(),
            files,
            bytes,
        },
    };
    // Unified while still staged, under the version's index name (the index holds paths
    // relative to the tree, so they hold after the rename): only a fully unified tree is
    // ever a version.
    let index_name = built.index_name();
    let unified = unify_staged(root, set, name, &index_name, &tree_rel, progress);
    if let Err(e) = unified {
        let _ = cowherd_unify::forget_tree(root, &index_name);
        return Err(e);
    }
    let text = toml::to_string(&built.record).expect("a build record serializes");
    let record_path = root.path().join(&staging).join("template.toml");
    std::fs::write(&record_path, text).map_err(io(&record_path))?;
    cowherd_unify::rename_below_root(root, &staging, &version_rel(name, version))?;
    Ok(built)
}

/// Unifies the staged tree of a template build into the store under the template's policy:
/// every shareable file becomes an object, for the guests built from it to share.
pub(crate) fn unify_staged(
    root: &HostRoot,
    set: &TemplateSet,
    name: &str,
    index_name: &str,
    tree_rel: &Path,
    progress: &dyn Progress,
) -> Result<(), Error> {
    let policy = template_policy(set, name)?;
    let spec = TreeSpec {
        index_name,
        rel: tree_rel,
        policy: policy.as_ref(),
    };
    let opts = UnifyOptions {
        every_file: true,
        ..UnifyOptions::default()
    };
    let report = cowherd_unify::unify_tree(root, &spec, &opts, progress)?;
    match report.failures.first() {
        Some(f) => Err(Error::Step {
            template: name.to_string(),
            step: "unify the tree into the store".into(),
            message: f.to_string(),
        }),
        None => Ok(()),
    }
}

/// Makes the base tree at `tree_rel` (which must not exist); returns how.
fn make_base(
    root: &HostRoot,
    template: &Template,
    parent: Option<&Built>,
    tree_rel: &Path,
    opts: &BuildOptions,
) -> Result<String, Error> {
    let tree_path = root.path().join(tree_rel);
    match &template.base {
        Base::Bootstrap {
            method,
            suite,
            variant,
            arch,
            mirror,
        } => {
            let staging = tree_rel.parent().unwrap_or(tree_rel);
            Tree::create(root, staging)?;
            let (tool, path) = bootstrapper(*method)?;
            let mut cmd = leash()?.command(&path);
            cmd.arg(format!("--variant={variant}"));
            if let Some(arch) = arch {
                cmd.arg(format!("--arch={arch}"));
            }
            if !template.packages.is_empty() {
                cmd.arg(format!("--include={}", template.packages.join(",")));
            }
            // Every word was checked not to start with `-` (template.rs); mmdebstrap is told
            // so as well (debootstrap knows no `--`).
            if tool == "mmdebstrap" {
                cmd.arg("--");
            }
            cmd.arg(suite).arg(&tree_path).args(mirror);
            opts.prepare(&mut cmd)?;
            run(&mut cmd, &template.name, tool)?;
            Ok(format!("{tool} {suite} {variant}"))
        }
        Base::Tarball { source } => {
            let tree = Tree::create(root, tree_rel)?;
            let tar = find_program("tar").ok_or(Error::MissingProgram {
                program: "tar",
                package: "tar",
            })?;
            let mut cmd = leash()?.command(&tar);
            cmd.args([
                "--extract",
                "--numeric-owner",
                "--same-owner",
                "--preserve-permissions",
            ])
            .args(["--xattrs", "--xattrs-include=*", "--acls", "--file"])
            .arg(source)
            .arg("--directory")
            .arg(tree.path());
            run(&mut cmd, &template.name, "tar")?;
            Ok(format!("tarball {}", source.display()))
        }
        Base::Guest { guest } => {
            Tree::create(root, tree_rel.parent().unwrap_or(tree_rel))?;
            cowherd_unify::export(root, guest, &tree_path, false)?;
            Ok(format!("guest {guest}"))
        }
        Base::From { .. } => {
            let parent = parent.expect("a template built on another has its parent built");
            let tree = Tree::create(root, tree_rel)?;
            // A copy, not links: its packages and steps may change files in place.
            cowherd_unify::clone_tree(root, &parent.tree_rel(), &tree, CloneMode::CopyAll)?;
            Ok(format!("from {}", parent.label()))
        }
    }
}

/// The bootstrapper to run, and where it is: mmdebstrap, or debootstrap when asked for or when
/// mmdebstrap is not installed.
fn bootstrapper(method: Bootstrapper) -> Result<(&'static str, PathBuf), Error> {
    let mmdebstrap = match method {
        Bootstrapper::Mmdebstrap => find_program("mmdebstrap"),
        Bootstrapper::Debootstrap => None,
    };
    if let Some(path) = mmdebstrap {
        return Ok(("mmdebstrap", path));
    }
    if let Some(path) = find_program("debootstrap") {
        return Ok(("debootstrap", path));
    }
    Err(match method {
        Bootstrapper::Mmdebstrap => Error::MissingProgram {
            program: "mmdebstrap",
            package: "mmdebstrap (or debootstrap)",
        },
        Bootstrapper::Debootstrap => Error::MissingProgram {
            program: "debootstrap",
            package: "debootstrap",
        },
    })
}

/// The [`Leash`] a build tool runs on: killed with the build, its mounts in a namespace of
/// its own.
fn leash() -> Result<Leash, Error> {
    Leash::find().map_err(|program| Error::MissingProgram {
        program,
        package: "util-linux",
    })
}

/// Runs a build tool; a failure is an error naming the template and the tool.
fn run(cmd: &mut Command, template: &str, tool: &'static str) -> Result<(), Error> {
    let status = cmd.status().map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => Error::MissingProgram {
            program: tool,
            package: tool,
        },
        _ => Error::Io {
            path: PathBuf::from(tool),
            error: e,
        },
    })?;
    if status.success() {
        Ok(())
    } else {
        Err(Error::Step {
            template: template.to_string(),
            step: tool.to_string(),
            message: format!("{status} (see its messages above)"),
        })
    }
}

/// The step that installs the packages given as its arguments with apt, its output kept quiet.
const INSTALL_SCRIPT: &str = "apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get \
     install -y -qq --no-install-recommends -- \"$@\" >/dev/null && apt-get clean";

/// Runs one step of template `template` inside its tree, in its own namespaces: `sh -c step`
/// with `args` as `$1…` (and the build's `SOURCE_DATE_EPOCH`, if any).
fn run_step(
    tree: &Path,
    template: &str,
    step: &str,
    args: &[String],
    opts: &BuildOptions,
) -> Result<(), Error> {
    let argv = ["sh", "-c", step, "sh"]
        .into_iter()
        .map(String::from)
        .chain(args.iter().cloned());
    let mut exec = Exec::new(tree, "template", argv).capture(true);
    if let Some(epoch) = opts.epoch() {
        exec = exec.env("SOURCE_DATE_EPOCH", epoch.to_string());
    }
    let out = exec.run()?;
    if out.code == 0 {
        Ok(())
    } else {
        let stderr = String::from_utf8_lossy(&out.stderr);
        Err(Error::Step {
            template: template.to_string(),
            step: step.to_string(),
            message: format!(
                "exit {}: {}",
                out.code,
                stderr
                    .lines()
                    .rev()
                    .find(|l| !l.trim().is_empty())
                    .unwrap_or("")
            ),
        })
    }
}

/// Cleans a built tree for reuse by many guests: nothing one guest's identity or one build's
/// downloads leave behind.
pub(crate) fn clean_for_reuse(root: &HostRoot, tree: &Tree) -> Result<(), Error> {
    for dir in [
        "var/lib/apt/lists",
        "var/cache/apt",
        "var/log",
        "tmp",
        "var/tmp",
    ] {
        tree.remove_files_below(dir)?;
    }
    if tree.exists("etc/machine-id") {
        tree.write_file("etc/machine-id", b"", 0o444)?;
    }
    if tree.is_file("var/lib/dbus/machine-id") {
        tree.remove(root, "var/lib/dbus/machine-id")?;
    }
    // A symlinked /etc/ssh is an error, not skipped: its host keys would go to every guest.
    for key in tree.names("etc/ssh")? {
        if key.starts_with("ssh_host_") {
            tree.remove(root, &format!("etc/ssh/{key}"))?;
        }
    }
    for seed in ["var/lib/systemd/random-seed", "var/lib/urandom/random-seed"] {
        tree.remove(root, seed)?;
    }
    Ok(())
}

/// Regular files and allocated bytes below `dir`, each inode once.
pub(crate) fn tree_size(dir: &Path) -> (u64, u64) {
    use std::os::unix::fs::MetadataExt;
    let mut seen = std::collections::HashSet::new();
    let (mut files, mut bytes) = (0, 0);
    for entry in walkdir::WalkDir::new(dir)
        .follow_links(false)
        .into_iter()
        .flatten()
    {
        let Ok(m) = entry.metadata() else { continue };
        if m.is_file() {
            files += 1;
            if seen.insert(m.ino()) {
                bytes += m.blocks() * 512;
            }
        }
    }
    (files, bytes)
}

pub(crate) fn now_unix() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// Removes a built version (or every version) of template `name`, refusing while a guest was
/// built from it; returns what was removed.
///
/// # Errors
/// [`Error::TemplateInUse`] naming the guests, I/O and index errors.
pub fn remove_template(
    root: &HostRoot,
    name: &str,
    version: Option<u32>,
) -> Result<Vec<Built>, Error> {
    let doomed: Vec<Built> = versions(root, name)?
        .into_iter()
        .filter(|b| version.is_none_or(|v| v == b.record.version))
        .collect();
    if doomed.is_empty() {
        return Err(Error::NotBuilt {
            template: match version {
                Some(v) => format!("{name}@{v}"),
                None => name.to_string(),
            },
        });
    }
    for built in &doomed {
        let users = guests_using(root, built)?;
        if !users.is_empty() {
            return Err(Error::TemplateInUse {
                template: built.label(),
                guests: users.join(", "),
            });
        }
    }
    for built in &doomed {
        // Out of the versions first (one rename), then its rows and its files: a removal
        // killed halfway never leaves a half-removed version; the next writer finishes it.
        let version = built.record.version;
        let doomed_rel = Path::new("templates")
            .join(name)
            .join(format!("{TEMPLATE_REMOVING}{version}"));
        cowherd_unify::rename_below_root(root, &version_rel(name, version), &doomed_rel)?;
        cowherd_unify::forget_tree(root, &built.index_name())?;
        cowherd_unify::remove_below_root(root, &doomed_rel)?;
    }
    Ok(doomed)
}
