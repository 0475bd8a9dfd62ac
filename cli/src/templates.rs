//! `cowherd template …` and `cowherd build`: the template cache and guests made from it.

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::Subcommand;
use cowherd_builder::{Base, Built, GuestChanges, TemplateOrigin, TemplateSet};
use cowherd_unify::{HostRoot, UnifyOptions};
use serde::Serialize;

use crate::bars::Bars;
use crate::{EXIT_PARTIAL, fmt, print_json};

/// The template commands.
#[derive(Subcommand)]
pub enum TemplateCommand {
    /// List the templates (built-in, and $ROOT/templates.d/*.toml, which win by name), their
    /// built versions and the guests built from each.
    List {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Show a template's definition and its built versions.
    Show {
        /// The template.
        name: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Build a template into the cache ($ROOT/templates/NAME/VERSION), cleaned for reuse and
    /// unified into the store; a template built on another builds that one first. Nothing is
    /// done if it is built already.
    Build {
        /// The template.
        name: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Build a new version of a template; guests keep the version they were built from.
    Rebuild {
        /// The template.
        name: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Make the next version of a built template by upgrading a copy of its newest version
    /// with the distribution's package manager (no new bootstrap), unified with the store, so
    /// that guests upgraded by `cowherd upgrade` and guests built from the new version share
    /// the same objects. Nothing pending: no new version.
    Upgrade {
        /// The template.
        name: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Remove a built template (NAME: every version; NAME@VERSION: one); refused while a guest
    /// was built from it.
    Remove {
        /// NAME or NAME@VERSION.
        name: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Check a template file: syntax, keys, values, and its `from` against the known templates.
    Check {
        /// The file (its name without .toml is the template's name).
        file: PathBuf,
    },
}

/// Rescans every cached template version into a rebuilt index (`index rebuild`), under its
/// template's policy (none if its definition is gone); returns how many trees. A tree that
/// cannot be rescanned is a failure in `report`.
pub(crate) fn rescan_templates(
    root: &HostRoot,
    bars: &Bars,
    report: &mut cowherd_unify::RebuildReport,
) -> Result<usize> {
    let set = template_set(root)?;
    let dir = root.path().join("templates");
    let mut names: Vec<String> = std::fs::read_dir(&dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| !n.starts_with('.'))
        .collect();
    names.sort();
    let mut trees = 0;
    for name in names {
        let policy = cowherd_builder::template_policy(&set, &name).unwrap_or(None);
        for built in cowherd_builder::versions(root, &name)? {
            let spec = cowherd_unify::TreeSpec {
                index_name: &built.index_name(),
                rel: &built.tree_rel(),
                policy: policy.as_ref(),
            };
            let opts = cowherd_unify::UnifyOptions {
                every_file: true,
                ..cowherd_unify::UnifyOptions::default()
            };
            let scanned = cowherd_unify::unify_tree(root, &spec, &opts, bars)?;
            report.failures.extend(scanned.failures);
            trees += 1;
        }
    }
    Ok(trees)
}

/// The templates of a root: the built-in ones and `$ROOT/templates.d/*.toml`.
pub(crate) fn template_set(root: &HostRoot) -> Result<TemplateSet> {
    Ok(TemplateSet::load(&root.path().join("templates.d"))?)
}

fn base_line(base: &Base) -> String {
    match base {
        Base::Bootstrap {
            method,
            suite,
            variant,
            ..
        } => format!("{} {suite} {variant}", method.program()),
        Base::Tarball { source } => format!("tarball {}", source.display()),
        Base::Guest { guest } => format!("guest {guest}"),
        Base::From { template } => format!("from {template}"),
    }
}

/// One row of `template list`.
#[derive(Serialize)]
struct Row {
    name: String,
    origin: String,
    base: String,
    packages: Vec<String>,
    versions: Vec<Version>,
}

/// A built version in `template list` and `template show`.
#[derive(Serialize)]
struct Version {
    #[serde(flatten)]
    built: Built,
    guests: Vec<String>,
}

fn built_versions(root: &HostRoot, name: &str) -> Result<Vec<Version>> {
    cowherd_builder::versions(root, name)?
        .into_iter()
        .map(|built| {
            let guests = cowherd_builder::guests_using(root, &built)?;
            Ok(Version { built, guests })
        })
        .collect()
}

impl TemplateCommand {
    /// Whether the command changes the root (and needs its lock).
    pub fn writes(&self) -> bool {
        matches!(
            self,
            TemplateCommand::Build { .. }
                | TemplateCommand::Rebuild { .. }
                | TemplateCommand::Upgrade { .. }
                | TemplateCommand::Remove { .. }
        )
    }
}

/// Refuses `NAME@VERSION` where a command takes a template's name (only `template remove`
/// takes a version).
fn no_version(name: &str, what: &str) -> Result<()> {
    if let Some((template, version)) = name.split_once('@') {
        bail!(
            "{name:?}: {what} takes a template's name, not NAME@VERSION: give {template:?} \
             (version {version} is chosen by `cowherd template remove {template}@VERSION` only)"
        );
    }
    Ok(())
}

pub fn run(root: &HostRoot, command: TemplateCommand, bars: &Bars) -> Result<u8> {
    match command {
        TemplateCommand::List { json } => list(root, json),
        TemplateCommand::Show { name, json } => {
            no_version(&name, "`template show`")?;
            show(root, &name, json)
        }
        TemplateCommand::Build { name, json } => {
            no_version(&name, "`template build`")?;
            build_template(root, &name, false, json, bars)
        }
        TemplateCommand::Rebuild { name, json } => {
            no_version(&name, "`template rebuild`")?;
            build_template(root, &name, true, json, bars)
        }
        TemplateCommand::Upgrade { name, json } => {
            no_version(&name, "`template upgrade`")?;
            crate::upgrade::template(root, &template_set(root)?, &name, json, bars)
        }
        TemplateCommand::Remove { name, json } => {
            let (name, version) = match name.split_once('@') {
                Some((n, v)) => (
                    n.to_string(),
                    Some(v.parse::<u32>().ok().filter(|&v| v > 0).with_context(|| {
                        format!("{v:?} is no version number: write NAME@VERSION, e.g. {n}@1")
                    })?),
                ),
                None => (name, None),
            };
            if cowherd_unify::validate_guest_name(&name).is_err() {
                bail!(
                    "invalid template name {name:?}: a template is named with 1-64 characters \
                     of a-z A-Z 0-9 . _ - not starting with . or - (see `cowherd template list`)"
                );
            }
            let built: Vec<u32> = cowherd_builder::versions(root, &name)?
                .iter()
                .map(|b| b.record.version)
                .collect();
            if built.is_empty() {
                bail!(
                    "template {name} has no built version: nothing to remove (`cowherd \
                     template list` shows what is built)"
                );
            }
            if let Some(v) = version.filter(|v| !built.contains(v)) {
                let built: Vec<String> = built.iter().map(u32::to_string).collect();
                bail!(
                    "template {name} has no version {v}; its built versions are {} \
                     (see `cowherd template show {name}`)",
                    built.join(", ")
                );
            }
            let removed = cowherd_builder::remove_template(root, &name, version)?;
            if json {
                print_json(&removed)?;
            } else {
                for b in &removed {
                    outln!("removed {}", b.label());
                }
                outln!("`cowherd gc` removes the store objects only they used");
            }
            Ok(0)
        }
        TemplateCommand::Check { file } => {
            if file.is_dir() {
                bail!(
                    "{}: a directory; give a template file, NAME.toml",
                    file.display()
                );
            }
            let template = template_set(root)?.check_file(&file)?;
            outln!(
                "{}: template {} is valid ({})",
                file.display(),
                template.name,
                base_line(&template.base)
            );
            Ok(0)
        }
    }
}

fn list(root: &HostRoot, json: bool) -> Result<u8> {
    let set = template_set(root)?;
    let mut rows = Vec::new();
    for t in set.all() {
        rows.push(Row {
            name: t.name.clone(),
            origin: match &t.origin {
                TemplateOrigin::Builtin => "built-in".into(),
                TemplateOrigin::File(p) => p.display().to_string(),
            },
            base: base_line(&t.base),
            packages: t.packages.clone(),
            versions: built_versions(root, &t.name)?,
        });
    }
    if json {
        print_json(&rows)?;
        return Ok(0);
    }
    let cells: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            let built = r
                .versions
                .iter()
                .map(|v| {
                    format!(
                        "{} ({}, {} guests, built {})",
                        v.built.record.version,
                        fmt::bytes(v.built.record.bytes),
                        v.guests.len(),
                        fmt::ago(v.built.record.built_unix)
                    )
                })
                .collect::<Vec<_>>()
                .join(", ");
            vec![
                r.name.clone(),
                r.base.clone(),
                r.origin.clone(),
                if built.is_empty() { "-".into() } else { built },
            ]
        })
        .collect();
    fmt::table(&["TEMPLATE", "BASE", "DEFINED IN", "BUILT"], &cells);
    Ok(0)
}

fn show(root: &HostRoot, name: &str, json: bool) -> Result<u8> {
    let set = template_set(root)?;
    let t = set.get(name)?;
    let versions = built_versions(root, name)?;
    if json {
        #[derive(Serialize)]
        struct Show<'a> {
            name: &'a str,
            description: Option<&'a str>,
            base: String,
            packages: &'a [String],
            steps: &'a [String],
            policy: Option<cowherd_unify::PolicyFile>,
            versions: Vec<Version>,
        }
        print_json(&Show {
            name,
            description: t.description.as_deref(),
            base: base_line(&t.base),
            packages: &t.packages,
            steps: &t.steps,
            policy: cowherd_builder::template_policy(&set, name)?,
            versions,
        })?;
        return Ok(0);
    }
    outln!(
        "template {name}: {}",
        t.description.as_deref().unwrap_or("")
    );
    outln!("  base:     {}", base_line(&t.base));
    outln!("  packages: {}", t.packages.join(" "));
    for step in &t.steps {
        outln!("  step:     {step}");
    }
    if let Some(policy) = cowherd_builder::template_policy(&set, name)? {
        for rule in &policy.rules {
            outln!("  policy:   {rule}");
        }
    }
    for v in &versions {
        let r = &v.built.record;
        outln!(
            "  version {}: {}, {} files, {}; guests: {}",
            r.version,
            r.made_by,
            r.files,
            fmt::bytes(r.bytes),
            if v.guests.is_empty() {
                "none".into()
            } else {
                v.guests.join(", ")
            }
        );
    }
    if versions.is_empty() {
        outln!("  not built (`cowherd template build {name}`)");
    }
    Ok(0)
}

fn build_template(root: &HostRoot, name: &str, new: bool, json: bool, bars: &Bars) -> Result<u8> {
    let set = template_set(root)?;
    let before = cowherd_builder::latest(root, name)?.map(|b| b.record.version);
    let opts = cowherd_builder::BuildOptions {
        new_version: new,
        ..Default::default()
    };
    let built = cowherd_builder::build_template(root, &set, name, &opts, bars)?;
    if json {
        print_json(&built)?;
    } else if Some(built.record.version) == before {
        outln!(
            "{} is built already (`cowherd template rebuild {name}` makes a new version)",
            built.label()
        );
    } else {
        let r = &built.record;
        outln!(
            "built {} ({}): {} files, {}; unified into the store",
            built.label(),
            r.made_by,
            r.files,
            fmt::bytes(r.bytes)
        );
    }
    Ok(0)
}

/// `cowherd build`'s options.
#[derive(clap::Args)]
pub struct BuildArgs {
    /// The new guest's name (or use --count and --prefix).
    #[arg(required_unless_present = "count", conflicts_with_all = ["count", "prefix"])]
    guest: Option<String>,
    /// The template to build from (its newest built version).
    #[arg(long, short, allow_hyphen_values = true)]
    template: String,
    /// The guest's hostname (default: its name).
    #[arg(long, conflicts_with = "count", allow_hyphen_values = true)]
    hostname: Option<String>,
    /// Build N guests, named PREFIX01 … PREFIXNN.
    #[arg(long, value_name = "N", requires = "prefix", allow_negative_numbers = true,
          value_parser = crate::number_in(1, 9999))]
    count: Option<u64>,
    /// The name prefix of --count's guests.
    #[arg(long, requires = "count", allow_hyphen_values = true)]
    prefix: Option<String>,
    /// Mount each new guest.
    #[arg(long)]
    mount: bool,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

/// Reads the root's `policy.toml`, so that a bad rule stops a command before it makes a
/// guest that the unification afterwards would refuse.
fn check_root_policy(root: &HostRoot) -> Result<()> {
    cowherd_unify::load_policy_file(&root.policy_path())?;
    Ok(())
}

pub fn build(root: &HostRoot, args: BuildArgs, bars: &Bars) -> Result<u8> {
    if args.template.contains('@') {
        bail!(
            "--template {:?}: a guest is built from the newest version of a template: give \
             its name without @VERSION",
            args.template
        );
    }
    let names = match (&args.guest, args.count, &args.prefix) {
        (Some(guest), _, _) => vec![guest.clone()],
        (None, Some(count), Some(prefix)) => {
            cowherd_builder::numbered_names(prefix, usize::try_from(count)?)
        }
        _ => bail!("name the guest, or give --count and --prefix"),
    };
    for name in &names {
        cowherd_unify::validate_guest_name(name).with_context(|| match &args.prefix {
            Some(prefix) => format!("--prefix {prefix:?} makes the guest name {name:?}"),
            None => format!("building guest {name:?}"),
        })?;
    }
    let set = template_set(root)?;
    set.get(&args.template)?;
    let Some(built) = cowherd_builder::latest(root, &args.template)? else {
        bail!(cowherd_builder::Error::NotBuilt {
            template: args.template.clone()
        });
    };
    let policy = cowherd_builder::template_policy(&set, &args.template)?;
    check_root_policy(root)?;
    let mut done = Vec::new();
    let mut code = 0;
    for name in &names {
        match cowherd_builder::build_guest(
            root,
            &built,
            policy.as_ref(),
            name,
            args.hostname.as_deref(),
        ) {
            Ok(b) => done.push(b),
            Err(e) if names.len() == 1 => return Err(e.into()),
            Err(e) => {
                eprintln!("error: {e:#}");
                code = EXIT_PARTIAL;
            }
        }
    }
    let new: Vec<String> = done.iter().map(|b| b.guest.clone()).collect();
    if !new.is_empty() {
        let report = cowherd_unify::unify(root, &new, &UnifyOptions::default(), bars)?;
        for failure in &report.failures {
            eprintln!("warning: {failure}");
            code = EXIT_PARTIAL;
        }
    }
    if args.mount {
        for name in &new {
            cowherd_unify::mount(root, name)?;
        }
    }
    if args.json {
        print_json(&done)?;
    } else {
        for b in &done {
            outln!(
                "built {} from {} in {:.2} s: {} files linked to the store, {} copied ({}){}",
                b.guest,
                b.template,
                b.seconds,
                b.linked,
                b.copied,
                fmt::bytes(b.copied_bytes),
                if args.mount { "; mounted" } else { "" }
            );
        }
    }
    Ok(code)
}

/// `cowherd import`'s options.
#[derive(clap::Args)]
pub struct ImportArgs {
    /// The new guest's name (or, with --resync, the imported guest's).
    guest: String,
    /// Where from: `[user@]host:/` (rsync over ssh), `rsync://host/module/`, a local
    /// directory, or a tarball (.tar, .tar.gz, .tar.xz, .tar.zst…).
    #[arg(long, value_name = "SOURCE", allow_hyphen_values = true)]
    from: String,
    /// Also copy this mount point of the source (other mounts are left out); repeatable.
    #[arg(long, value_name = "PATH")]
    include_mount: Vec<PathBuf>,
    /// The remote shell rsync uses, e.g. "ssh -p 2222 -i /root/.ssh/p2v".
    #[arg(long, value_name = "COMMAND")]
    rsh: Option<String>,
    /// A second pass over an imported (unmounted) guest: transfer only what changed since
    /// (the final sync after stopping services on the source), then the fixups again.
    #[arg(long)]
    resync: bool,
    /// With --resync: where the guest changed a path since its last import (folded into
    /// base or still in its upper layer), keep the guest's version; the paths the machine
    /// changed too are listed.
    #[arg(long, requires = "resync", conflicts_with = "discard_guest_changes")]
    keep_guest_changes: bool,
    /// With --resync: take the machine's version of every path, keeping the guest's versions
    /// in guests/NAME/discarded/TIME/ (its `changes` file lists them).
    #[arg(long, requires = "resync")]
    discard_guest_changes: bool,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

/// What `cowherd import --json` prints.
#[derive(Serialize)]
struct Imported {
    #[serde(flatten)]
    import: cowherd_builder::ImportReport,
    unify: cowherd_unify::UnifyReport,
    already_stored: cowherd_unify::AlreadyStored,
}

pub fn import(root: &HostRoot, args: ImportArgs, bars: &Bars) -> Result<u8> {
    let source: cowherd_builder::Source = args.from.parse()?;
    check_root_policy(root)?;
    let opts = cowherd_builder::ImportOptions {
        include_mounts: args.include_mount,
        rsh: args.rsh,
        resync: args.resync,
        guest_changes: if args.keep_guest_changes {
            GuestChanges::Keep
        } else if args.discard_guest_changes {
            GuestChanges::Discard
        } else {
            GuestChanges::Refuse
        },
    };
    let mark = cowherd_unify::store_mark(root)?;
    let import = match cowherd_builder::import(root, &args.guest, &source, &opts) {
        Err(cowherd_builder::ImportError::GuestChanged {
            name,
            count,
            first: _,
            discard_dir,
            changes,
        }) => {
            if args.json {
                print_json(&serde_json::json!({ "guest": name, "guest_changes": changes }))?;
            } else {
                for change in &changes {
                    outln!("changed by the guest: {change}");
                }
            }
            return Err(cowherd_builder::ImportError::GuestChanged {
                name,
                count,
                first: "listed above".to_string(),
                discard_dir,
                changes: Vec::new(),
            }
            .into());
        }
        other => other?,
    };
    // Shared with every guest, not only with the store's objects: an unshared file of another
    // guest that equals one of this machine's becomes one object now.
    let unify = cowherd_unify::unify(root, &[], &UnifyOptions::default(), bars)?;
    let already = cowherd_unify::already_stored(root, &args.guest, mark)?;
    let code = if unify.failures.is_empty() {
        0
    } else {
        EXIT_PARTIAL
    };
    for failure in &unify.failures {
        eprintln!("warning: {failure}");
    }
    for warning in &import.warnings {
        eprintln!("warning: {warning}");
    }
    if args.json {
        print_json(&Imported {
            import,
            unify,
            already_stored: already,
        })?;
        return Ok(code);
    }
    outln!(
        "{} {} from {}: {} entries ({} regular files, {}; {} transferred)",
        if import.resync {
            "resynced"
        } else {
            "imported"
        },
        import.guest,
        import.source,
        import.files,
        already.files,
        fmt::bytes(already.bytes),
        fmt::bytes(import.transferred_bytes)
    );
    for change in &import.guest_changes {
        let verb = if import.discarded_to.is_some() {
            "discarded"
        } else {
            "kept"
        };
        outln!("  guest's change {verb}: {change}");
    }
    for path in &import.not_taken {
        outln!(
            "  the machine's newer version not taken: {}",
            path.display()
        );
    }
    for fixup in &import.fixups {
        outln!("  fixup: {fixup}");
    }
    if !import.excluded_mounts.is_empty() {
        outln!(
            "  left out (other filesystems of the source): {} (--include-mount copies one)",
            import.excluded_mounts.join(", ")
        );
    }
    outln!(
        "already in the store: {} of these {} files, {} of {} ({:.0}%); unify linked {} files, saved {}",
        already.stored_files,
        already.files,
        fmt::bytes(already.stored_bytes),
        fmt::bytes(already.bytes),
        100.0 * already.stored_bytes as f64 / already.bytes.max(1) as f64,
        unify.linked_files,
        fmt::bytes(unify.saved_bytes)
    );
    Ok(code)
}
