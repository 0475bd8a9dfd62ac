//! `cowherd upgrade` and `cowherd template upgrade`.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;
use cowherd_builder::{Outcome, TemplateSet, UpgradeOptions, UpgradeReport};
use cowherd_unify::HostRoot;

use crate::bars::Bars;
use crate::{EXIT_PARTIAL, Select, fmt, print_json};

/// `cowherd upgrade`.
#[derive(Args)]
#[command(
    after_help = "Examples:\n  cowherd upgrade --all --dry-run\n  cowherd upgrade --all --jobs 4\n  \
cowherd upgrade web01 web02 --json\n\n\
Each guest runs its own apt (its own sources and keys) in its overlay, mounted for the run in a \
private mount namespace; every package list and package file is fetched once for all guests \
through a cache of this run (a proxy on 127.0.0.1, only for http:// sources; https:// ones are \
fetched by each guest). Service starts are refused while packages are upgraded (policy-rc.d); \
the guest's changed configuration files are kept (--force-confold). Logs: one per guest, \
$ROOT/logs/upgrade-TIME/GUEST.log unless --logs. Exit 0 when every guest was upgraded or up to \
date, 3 when one failed (it is its snapshot again) or was skipped."
)]
pub struct UpgradeArgs {
    #[command(flatten)]
    select: Select,
    /// Guests upgraded at once (default: the number of CPUs).
    #[arg(long, short = 'j', value_name = "N", value_parser = crate::number_in(1, 1024))]
    jobs: Option<u64>,
    /// Refresh the package lists (into the run's cache, not the guests) and list each guest's
    /// pending upgrades; download no package, change nothing.
    #[arg(short = 'n', long)]
    dry_run: bool,
    /// The directory for the guests' logs (made 0700).
    #[arg(long, value_name = "DIR")]
    logs: Option<PathBuf>,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
}

fn default_logs(root: &HostRoot, what: &str) -> PathBuf {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    root.path()
        .join("logs")
        .join(format!("{what}-{}", cowherd_unify::utc_stamp(secs)))
}

/// Runs `cowherd upgrade`.
pub fn upgrade(root: &HostRoot, args: UpgradeArgs, bars: &Bars) -> Result<u8> {
    let names = args.select.names(root)?;
    if names.is_empty() {
        anyhow::bail!("no guests in {}: nothing to upgrade", root.path().display());
    }
    for name in &names {
        cowherd_unify::guest_record(root, name)?;
    }
    let jobs = args.jobs.map_or_else(
        || std::thread::available_parallelism().map_or(1, |n| n.get()),
        |n| n as usize,
    );
    let opts = UpgradeOptions {
        jobs,
        dry_run: args.dry_run,
        log_dir: args.logs.unwrap_or_else(|| default_logs(root, "upgrade")),
    };
    let report = cowherd_builder::upgrade(root, &names, &opts, bars).context("upgrading")?;
    if args.json {
        print_json(&report)?;
    } else {
        print_report(&report);
    }
    Ok(if report.all_ok() { 0 } else { EXIT_PARTIAL })
}

fn print_report(r: &UpgradeReport) {
    let rows: Vec<Vec<String>> = r
        .guests
        .iter()
        .map(|g| {
            let outcome = match g.outcome {
                Outcome::Upgraded => "upgraded",
                Outcome::UpToDate => "up to date",
                Outcome::WouldUpgrade => "would upgrade",
                Outcome::Skipped => "skipped",
                Outcome::Failed if g.rolled_back => "FAILED, rolled back",
                Outcome::Failed => "FAILED",
            };
            vec![
                g.guest.clone(),
                outcome.to_string(),
                g.packages.len().to_string(),
                fmt::bytes(g.downloaded_bytes),
                signed_bytes(g.disk_added_bytes),
                format!("{:.1}", g.seconds),
            ]
        })
        .collect();
    fmt::table(
        &[
            "GUEST",
            "OUTCOME",
            "PACKAGES",
            "DOWNLOADED",
            "DISK ADDED",
            "SECONDS",
        ],
        &rows,
    );
    for g in &r.guests {
        if let Some(m) = &g.message {
            eprintln!("{}: {m}", g.guest);
        }
        if r.dry_run && !g.packages.is_empty() {
            let list: Vec<String> = g
                .packages
                .iter()
                .map(|p| format!("{} {} -> {}", p.name, p.from, p.to))
                .collect();
            outln!("{}: {}", g.guest, list.join(", "));
        }
    }
    let upgraded = r
        .guests
        .iter()
        .filter(|g| g.outcome == Outcome::Upgraded)
        .count();
    outln!();
    if r.dry_run {
        outln!(
            "dry run: {} of {} guests have upgrades pending; fetched {} of package lists ({} \
             requests) once for all, {:.1} s",
            r.guests
                .iter()
                .filter(|g| g.outcome == Outcome::WouldUpgrade)
                .count(),
            r.guests.len(),
            fmt::bytes(r.downloaded_bytes),
            r.upstream_requests,
            r.seconds
        );
    } else {
        outln!(
            "upgraded {upgraded} of {} guests; downloaded {} once ({} served to the guests); disk \
             added {} after re-sharing; snapshots hold {}; {:.1} s",
            r.guests.len(),
            fmt::bytes(r.downloaded_bytes),
            fmt::bytes(r.served_bytes),
            signed_bytes(r.disk_added_bytes),
            fmt::bytes(r.snapshot_bytes),
            r.seconds
        );
    }
}

fn signed_bytes(n: i64) -> String {
    if n < 0 {
        format!("-{}", fmt::bytes(n.unsigned_abs()))
    } else {
        fmt::bytes(n as u64)
    }
}

/// Runs `cowherd template upgrade NAME`.
pub fn template(
    root: &HostRoot,
    set: &TemplateSet,
    name: &str,
    json: bool,
    bars: &Bars,
) -> Result<u8> {
    let logs = default_logs(root, "template-upgrade");
    let done = cowherd_builder::upgrade_template(root, set, name, &logs, bars)
        .with_context(|| format!("upgrading template {name}"))?;
    if json {
        print_json(&done)?;
        return Ok(0);
    }
    match &done.built {
        Some(built) => outln!(
            "upgraded {} to {}: {} packages, downloaded {}, {:.1} s (log: {})",
            done.from,
            built.label(),
            done.packages.len(),
            fmt::bytes(done.downloaded_bytes),
            done.seconds,
            done.log.display()
        ),
        None => outln!(
            "{} is up to date: no new version (log: {})",
            done.from,
            done.log.display()
        ),
    }
    Ok(0)
}
