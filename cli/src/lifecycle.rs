//! The life of a guest: mount, umount, and the offline verbs around them.

use std::path::Path;

use anyhow::Result;
use cowherd_unify::{
    FoldAction, FoldOptions, FoldReport, HostRoot, MountOutcome, MountState, UmountOutcome,
    UnifyOptions,
};
use serde::Serialize;

use crate::bars::Bars;
use crate::fmt;
use crate::{EXIT_PARTIAL, Select};

/// Runs `f` for each guest. One named guest: its error is the command's error (exit 1). Several:
/// each failure is reported on stderr and the others go on; the exit code says so (3).
pub(crate) fn each_guest<T>(
    names: &[String],
    mut f: impl FnMut(&str) -> Result<T>,
) -> Result<(Vec<(String, T)>, u8)> {
    let mut done = Vec::new();
    let mut code = 0;
    for name in names {
        match f(name) {
            Ok(t) => done.push((name.clone(), t)),
            Err(e) if names.len() == 1 => return Err(e),
            Err(e) => {
                eprintln!("error: {e:#}");
                code = EXIT_PARTIAL;
            }
        }
    }
    Ok((done, code))
}

/// One guest's line of `mount --json` / `umount --json`.
#[derive(Serialize)]
struct Done<T: Serialize> {
    guest: String,
    outcome: T,
    #[serde(skip_serializing_if = "Option::is_none")]
    path: Option<std::path::PathBuf>,
}

fn mounted_at(root: &HostRoot, name: &str) -> Option<std::path::PathBuf> {
    match cowherd_unify::mount_state(root, name) {
        Ok(MountState::Mounted { path } | MountState::Foreign { path, .. }) => Some(path),
        _ => None,
    }
}

pub fn mount(root: &HostRoot, select: &Select, fold: bool, json: bool, bars: &Bars) -> Result<u8> {
    let names = select.names(root)?;
    let (done, code) = each_guest(&names, |name| {
        if fold {
            crate::lifecycle::fold_and_unify(root, name, bars)?;
        }
        Ok(cowherd_unify::mount(root, name)?)
    })?;
    let rows: Vec<Done<MountOutcome>> = done
        .into_iter()
        .map(|(guest, outcome)| Done {
            path: mounted_at(root, &guest),
            guest,
            outcome,
        })
        .collect();
    if json {
        crate::print_json(&rows)?;
    } else {
        for r in &rows {
            let shown = r.path.as_deref().unwrap_or(Path::new("?")).display();
            match r.outcome {
                MountOutcome::Mounted => outln!("mounted {} at {shown}", r.guest),
                MountOutcome::AlreadyMounted => {
                    outln!("{} is mounted already at {shown}", r.guest)
                }
            }
        }
    }
    Ok(code)
}

/// `mount --fold`: folds and unifies an unmounted guest; a mounted one is left as it is (its
/// changes are folded at its next restart). Neither step changes what the guest sees, so
/// neither stops it from starting: a failure is a warning, and the guest is mounted.
pub fn fold_and_unify(root: &HostRoot, name: &str, bars: &Bars) -> Result<()> {
    if cowherd_unify::mount_state(root, name)? != MountState::Unmounted {
        eprintln!("note: {name} is mounted; not folded (umount it first)");
        return Ok(());
    }
    match cowherd_unify::fold(root, name, &FoldOptions::default()) {
        Ok(folded) => print_fold(&folded),
        Err(e) => eprintln!("warning: not folded: {e}"),
    }
    let names = [name.to_string()];
    match cowherd_unify::unify(root, &names, &UnifyOptions::default(), bars) {
        Ok(unified) => {
            for failure in &unified.failures {
                eprintln!("warning: {failure}");
            }
            outln!(
                "unified {name}: linked {} files, saved {}",
                unified.linked_files,
                fmt::bytes(unified.saved_bytes)
            );
            crate::flagged_note(&unified.skipped_flagged);
        }
        Err(e) => eprintln!("warning: not unified: {e}"),
    }
    Ok(())
}

/// Prints one guest's fold report (its failures on stderr).
fn print_fold(r: &FoldReport) {
    let would = if r.dry_run { "would " } else { "" };
    for e in &r.entries {
        let verb = match e.action {
            FoldAction::Move => "move",
            FoldAction::Delete => "delete",
            FoldAction::Create => "create",
            FoldAction::Update => "update",
            FoldAction::Replace => "replace",
        };
        outln!("{would}{verb} {}:{} ({})", r.guest, e.path, e.kind);
    }
    for f in &r.failures {
        eprintln!("error: {f}");
    }
    outln!(
        "{}folded {}: {} files moved ({}), {} deleted, {} directories{}",
        if r.dry_run { "would have " } else { "" },
        r.guest,
        r.moved,
        fmt::bytes(r.moved_bytes),
        r.deleted,
        r.directories,
        if r.upper_emptied {
            "; upper emptied"
        } else if r.dry_run {
            ""
        } else {
            "; upper kept (not everything could be folded)"
        }
    );
}

pub fn fold(root: &HostRoot, select: &Select, opts: &FoldOptions, json: bool) -> Result<u8> {
    let (names, skipped) = offline_guests(root, select)?;
    let (done, mut code) = each_guest(&names, |name| Ok(cowherd_unify::fold(root, name, opts)?))?;
    if done.iter().any(|(_, r)| !r.failures.is_empty()) {
        code = EXIT_PARTIAL;
    }
    let reports: Vec<FoldReport> = done.into_iter().map(|(_, r)| r).collect();
    if json {
        crate::print_json(&reports)?;
    } else {
        reports.iter().for_each(print_fold);
        skipped_note(&skipped, "fold");
    }
    // The failures name guest paths: say once which filesystem refused them, and why.
    let failures = reports.iter().flat_map(|r| &r.failures);
    if let Some(hint) = crate::filesystem_hint(root.path(), failures.map(|f| f.error.as_str())) {
        eprintln!("error: upper layers kept (nothing lost): {hint}");
    }
    Ok(code)
}

/// With `all`, every guest that is not mounted, and the mounted ones apart: a host always has
/// running guests, and `--all` leaves them for their next restart.
fn offline_guests(root: &HostRoot, select: &Select) -> Result<(Vec<String>, Vec<String>)> {
    if !select.all {
        return Ok((select.names(root)?, Vec::new()));
    }
    let (mounted, offline): (Vec<_>, Vec<_>) = cowherd_unify::mount_states(root)?
        .into_iter()
        .partition(|(_, s)| *s != MountState::Unmounted);
    Ok((
        offline.into_iter().map(|(n, _)| n).collect(),
        mounted.into_iter().map(|(n, _)| n).collect(),
    ))
}

/// Lists the mounted guests an `--all` run left for their next restart.
pub fn skipped_note(skipped: &[String], verb: &str) {
    if !skipped.is_empty() {
        outln!(
            "skipped {} mounted guests: {} ({verb} them at their next restart: `cowherd mount --fold`)",
            skipped.len(),
            skipped.join(", ")
        );
    }
}

pub fn umount(root: &HostRoot, select: &Select, json: bool) -> Result<u8> {
    let names = select.names(root)?;
    let (done, code) = each_guest(&names, |name| {
        let path = mounted_at(root, name);
        let outcome = cowherd_unify::umount(root, name)?;
        Ok((outcome, path))
    })?;
    let rows: Vec<Done<UmountOutcome>> = done
        .into_iter()
        .map(|(guest, (outcome, path))| Done {
            guest,
            outcome,
            path,
        })
        .collect();
    if json {
        crate::print_json(&rows)?;
    } else {
        for r in &rows {
            match (&r.outcome, &r.path) {
                (UmountOutcome::Unmounted, Some(p)) => {
                    outln!("unmounted {} from {}", r.guest, p.display())
                }
                _ => outln!("{} is not mounted", r.guest),
            }
        }
    }
    Ok(code)
}

/// Refuses a `split` path that is not guest-absolute, is the guest's root, or holds a `.` or
/// `..` component, naming it as given.
fn check_split_path(path: &str) -> Result<()> {
    if !path.starts_with('/') {
        anyhow::bail!(
            "split {path:?}: not a guest-absolute path; write it from the guest's root, like \
             /usr/bin/ls"
        );
    }
    if path.split('/').all(str::is_empty) {
        anyhow::bail!("split {path:?}: the guest's root; name a file or directory below it");
    }
    if path.split('/').any(|c| c == "." || c == "..") {
        anyhow::bail!(
            "split {path:?}: holds a `.` or `..` component (`..` would leave the guest; it is never followed); write the path without them"
        );
    }
    Ok(())
}

pub fn split(root: &HostRoot, guest: &str, paths: &[String], json: bool) -> Result<u8> {
    for path in paths {
        check_split_path(path)?;
    }
    let r = cowherd_unify::split(root, guest, paths)?;
    if json {
        crate::print_json(&r)?;
    } else {
        for p in &r.split {
            outln!("split {guest}:{p}");
        }
        for p in &r.already_private {
            outln!("{guest}:{p} is private already");
        }
        for f in &r.failures {
            eprintln!("error: {f}");
        }
        for rule in &r.rules_added {
            outln!("added `{rule}` to {guest}'s policy (guest.toml)");
        }
        outln!(
            "split {} files of {guest} ({} copied)",
            r.split.len(),
            fmt::bytes(r.copied_bytes)
        );
    }
    Ok(if r.failures.is_empty() {
        0
    } else {
        EXIT_PARTIAL
    })
}

pub fn export(root: &HostRoot, guest: &str, dest: &Path, tar: bool, json: bool) -> Result<u8> {
    cowherd_unify::guest_record(root, guest)?;
    if let Some(parent) = dest.parent().filter(|p| !p.as_os_str().is_empty())
        && dest != Path::new("-")
        && !parent.is_dir()
    {
        anyhow::bail!(
            "{}: {} is not a directory; export writes a new file or directory into an \
             existing one",
            dest.display(),
            parent.display()
        );
    }
    if cowherd_unify::mount_state(root, guest)? != MountState::Unmounted {
        eprintln!(
            "note: {guest} is mounted: exporting what it shows now; files it changes meanwhile may be caught half-written (umount it for a consistent copy)"
        );
    }
    let r = cowherd_unify::export(root, guest, dest, tar)?;
    if json {
        crate::print_json(&r)?;
    } else if tar && dest != Path::new("-") {
        outln!(
            "exported {guest} to {} (tarball, mode 0600)",
            dest.display()
        );
    } else if !tar {
        let mode = match r
            .guest_top_mode
            .as_deref()
            .map(|m| m.trim_start_matches('0'))
        {
            Some("") => "0",
            Some(m) => m,
            None => "755",
        };
        outln!(
            "exported {guest} to {} (directory, mode 0700: it holds the guest's setuid-root files, \
             setuid-root for every host user who can reach them)",
            dest.display()
        );
        outln!(
            "to open it to other users once those are dealt with, give it the guest's mode: \
             `chmod {mode} {}`",
            dest.display()
        );
    }
    Ok(0)
}

pub fn destroy(root: &HostRoot, guest: &str, json: bool) -> Result<u8> {
    let r = cowherd_unify::destroy(root, guest)?;
    if json {
        crate::print_json(&r)?;
    } else {
        outln!("destroyed {guest}; `cowherd gc` removes the store objects only it used");
        if let Some(p) = &r.mount_point_left {
            outln!(
                "its mount point {} is left for its runtime's configuration",
                p.display()
            );
        }
    }
    Ok(0)
}
