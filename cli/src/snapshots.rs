//! `snapshot`, `snapshot list`, `snapshot remove` and `rollback`.

use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use cowherd_unify::{HostRoot, SnapshotReport, UnifyOptions};

use crate::bars::Bars;
use crate::{Select, fmt, print_json};

/// `cowherd snapshot`.
#[derive(Args)]
#[command(
    args_conflicts_with_subcommands = true,
    subcommand_negates_reqs = true,
    after_help = "Examples:\n  cowherd snapshot web01 --name before-php8\n  cowherd snapshot --all\n  \
cowherd snapshot list web01\n  cowherd rollback web01 before-php8\n\n\
A snapshot is made of hardlinks of the guest's inodes, which nothing ever changes in place: it \
costs the guest's directories, and later the files the guest replaced since. `gc` keeps the \
store objects snapshots link; `stats` counts snapshots apart; `destroy` removes them with the \
guest."
)]
pub struct SnapshotArgs {
    #[command(subcommand)]
    command: Option<SnapshotCommand>,
    #[command(flatten)]
    select: Select,
    /// The snapshot's name (1-64 of a-z A-Z 0-9 . _ -); default: the time in UTC
    /// (20261204T203345Z).
    #[arg(long, allow_hyphen_values = true)]
    name: Option<String>,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Subcommand)]
enum SnapshotCommand {
    /// List snapshots: name, time, what made it, and the bytes only it holds (what removing
    /// it frees).
    List {
        /// One guest (default: every guest).
        guest: Option<String>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Remove one snapshot of a guest.
    Remove {
        /// The guest.
        guest: String,
        /// The snapshot.
        name: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

impl SnapshotArgs {
    /// Whether the command changes the root (so opens it for writing).
    pub fn writes(&self) -> bool {
        !matches!(self.command, Some(SnapshotCommand::List { .. }))
    }
}

/// `cowherd rollback`.
#[derive(Args)]
#[command(
    after_help = "Example: cowherd rollback web01            # to its newest snapshot\n\n\
The guest's current tree is kept as a new snapshot (NAME-before-rollback), so a rollback is \
undone by rolling back to that one."
)]
pub struct RollbackArgs {
    /// The guest (stopped: unmounted).
    guest: String,
    /// The snapshot to go back to (default: the newest).
    name: Option<String>,
    /// Say which snapshot would be restored; change nothing.
    #[arg(short = 'n', long)]
    dry_run: bool,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

/// Runs `cowherd snapshot …`.
pub fn snapshot(root: &HostRoot, args: SnapshotArgs) -> Result<u8> {
    match args.command {
        Some(SnapshotCommand::List { guest, json }) => list(root, guest.as_deref(), json),
        Some(SnapshotCommand::Remove { guest, name, json }) => {
            let removed = cowherd_unify::remove_snapshot(root, &guest, &name)
                .with_context(|| format!("removing snapshot {name} of {guest}"))?;
            if json {
                print_json(&removed)?;
            } else {
                outln!(
                    "removed snapshot {guest}/{name} (freed {})",
                    fmt::bytes(removed.alone_bytes)
                );
            }
            Ok(0)
        }
        None => {
            let names = args.select.names(root)?;
            let (done, code) = crate::lifecycle::each_guest(&names, |guest| {
                cowherd_unify::snapshot(root, guest, args.name.as_deref(), "snapshot")
                    .with_context(|| format!("snapshot of {guest}"))
            })?;
            let reports: Vec<SnapshotReport> = done.into_iter().map(|(_, r)| r).collect();
            if args.json {
                print_json(&reports)?;
            } else {
                for r in &reports {
                    print_made(r);
                }
            }
            Ok(code)
        }
    }
}

/// One line for a snapshot made.
pub fn print_made(r: &SnapshotReport) {
    let copies = if r.copied > 0 {
        format!(", {} copied ({})", r.copied, fmt::bytes(r.copied_bytes))
    } else {
        String::new()
    };
    let folded = if r.folded > 0 {
        format!("; folded {} entries first", r.folded)
    } else {
        String::new()
    };
    outln!(
        "snapshot {}/{}: {} files as links{copies}{folded}, {:.2} s",
        r.guest,
        r.record.name,
        r.linked,
        r.seconds
    );
}

fn list(root: &HostRoot, guest: Option<&str>, json: bool) -> Result<u8> {
    let guests = match guest {
        Some(g) => vec![g.to_string()],
        None => cowherd_unify::guest_names(root)?,
    };
    let mut all = Vec::new();
    for g in &guests {
        all.extend(
            cowherd_unify::snapshots(root, g)
                .with_context(|| format!("listing the snapshots of {g}"))?,
        );
    }
    if json {
        print_json(&all)?;
        return Ok(0);
    }
    if all.is_empty() {
        outln!("no snapshots");
        return Ok(0);
    }
    let rows: Vec<Vec<String>> = all
        .iter()
        .map(|s| {
            vec![
                s.guest.clone(),
                s.record.name.clone(),
                fmt::ago(s.record.created_unix),
                s.record.made_by.clone(),
                s.files.to_string(),
                fmt::bytes(s.alone_bytes),
            ]
        })
        .collect();
    fmt::table(&["GUEST", "NAME", "MADE", "BY", "FILES", "ALONE"], &rows);
    Ok(0)
}

/// Runs `cowherd rollback …`, then unifies the guest so that its index (and `list`, `stats`)
/// describe the restored tree.
pub fn rollback(root: &HostRoot, args: RollbackArgs, bars: &Bars) -> Result<u8> {
    let guest = &args.guest;
    let report = cowherd_unify::rollback(root, guest, args.name.as_deref(), args.dry_run)
        .with_context(|| format!("rolling {guest} back"))?;
    if !args.dry_run {
        let names = [guest.clone()];
        match cowherd_unify::unify(root, &names, &UnifyOptions::default(), bars) {
            Ok(unified) => {
                for failure in &unified.failures {
                    eprintln!("warning: {failure}");
                }
            }
            Err(e) => eprintln!("warning: not unified after the rollback: {e}"),
        }
    }
    if args.json {
        print_json(&report)?;
    } else if report.dry_run {
        outln!(
            "would roll {guest} back to snapshot {} ({} files), keeping its current tree as \
             snapshot {}",
            report.restored,
            report.files,
            report.kept_as
        );
    } else {
        outln!(
            "rolled {guest} back to snapshot {} ({} files) in {:.2} s; its tree before is \
             snapshot {} (`cowherd rollback {guest} {}` undoes this)",
            report.restored,
            report.files,
            report.seconds,
            report.kept_as,
            report.kept_as
        );
    }
    Ok(0)
}
