//! `cowherd demo`: synthetic near-identical guests in a temporary root, unified, with savings
//! measured both from the index and from `st_blocks` on disk.

use std::collections::HashSet;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use cowherd_benchdata::{SynthSpec, generate_synthetic};
use cowherd_unify::{HostRoot, UnifyOptions};

use crate::bars::Bars;
use crate::fmt;

/// Allocated bytes under `dirs`, each inode once (like `du`).
fn allocated(dirs: &[PathBuf]) -> u64 {
    let mut seen = HashSet::new();
    let mut total = 0;
    for dir in dirs {
        for entry in walkdir::WalkDir::new(dir)
            .follow_links(false)
            .into_iter()
            .flatten()
        {
            if let Ok(m) = entry.metadata()
                && seen.insert((m.dev(), m.ino()))
            {
                total += m.blocks() * 512;
            }
        }
    }
    total
}

pub fn run(keep: Option<PathBuf>, guests: usize, json: bool, bars: &Bars) -> Result<u8> {
    let _tmp;
    let top: PathBuf = match keep {
        Some(dir) => {
            if dir.exists() && !dir.is_dir() {
                bail!(
                    "{} is not a directory; --keep wants a new or empty directory",
                    dir.display()
                );
            }
            let entries =
                || std::fs::read_dir(&dir).with_context(|| format!("reading {}", dir.display()));
            if dir.exists() && entries()?.next().is_some() {
                bail!(
                    "{} is not empty; --keep wants a new or empty directory",
                    dir.display()
                );
            }
            std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
            dir
        }
        None => {
            _tmp = tempfile::Builder::new().prefix("cowherd-demo.").tempdir()?;
            _tmp.path().to_path_buf()
        }
    };
    let src = top.join("incoming");
    let root_dir = top.join("root");
    let spec = SynthSpec {
        guests,
        ..SynthSpec::demo()
    };
    let generated = generate_synthetic(&spec, &src).context("generating demo guests")?;
    let root = HostRoot::init(&root_dir)?;
    let mut names = Vec::new();
    for path in &generated.guests {
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .context("guest name")?
            .to_string();
        cowherd_unify::adopt(&root, path, &name, false)?;
        names.push(name);
    }
    let guest_dirs: Vec<PathBuf> = names
        .iter()
        .map(|n| root.guests_dir().join(n).join("base"))
        .collect();
    let mut measured = guest_dirs.clone();
    measured.push(root.objects_dir());
    let before = allocated(&measured);
    let report = cowherd_unify::unify(&root, &[], &UnifyOptions::default(), bars)?;
    let after = allocated(&measured);
    let stats = cowherd_unify::stats(&root, 5)?;
    if json {
        outln!(
            "{}",
            serde_json::json!({ "unify": report, "stats": stats, "du_before": before, "du_after": after })
        );
    } else {
        outln!(
            "generated {} guests, {} files, {} in {}",
            generated.guests.len(),
            generated.files,
            fmt::bytes(generated.bytes),
            src.display()
        );
        outln!(
            "unify: hashed {} files ({}), linked {} files into {} objects",
            report.hashed_files,
            fmt::bytes(report.hashed_bytes),
            report.linked_files,
            report.objects_created
        );
        outln!();
        crate::print_stats(&stats);
        outln!();
        outln!(
            "on disk (st_blocks, each inode once): {} before, {} after: {} saved ({:.1}%)",
            fmt::bytes(before),
            fmt::bytes(after),
            fmt::bytes(before.saturating_sub(after)),
            100.0 * before.saturating_sub(after) as f64 / before.max(1) as f64
        );
        if Path::new(&top).exists() && _tmp_kept(&root_dir) {
            outln!(
                "root kept at {}: try `cowherd --root {} stats`",
                root_dir.display(),
                root_dir.display()
            );
        }
    }
    for failure in &report.failures {
        eprintln!("warning: {failure}");
    }
    overlay_tour(&root, &names, &stats, json)?;
    Ok(if report.failures.is_empty() {
        0
    } else {
        crate::EXIT_PARTIAL
    })
}

/// Unmounts the demo's guests however the tour ends.
struct Unmount<'a>(&'a HostRoot, &'a [String]);

impl Drop for Unmount<'_> {
    fn drop(&mut self) {
        for name in self.1 {
            let _ = cowherd_unify::umount(self.0, name);
        }
    }
}

/// The second half of the demo: two guests on their overlays, a write to a shared file in one
/// (copied up: the other guest and the store object keep their bytes), the page cache they
/// share, then the write folded into base.
fn overlay_tour(
    root: &HostRoot,
    names: &[String],
    stats: &cowherd_unify::Stats,
    json: bool,
) -> Result<()> {
    let (Some(top), [a, b, ..]) = (stats.top.first(), names) else {
        return Ok(());
    };
    let path = top
        .example
        .split_once(':')
        .map_or("", |(_, p)| p)
        .trim_start_matches('/');
    let pair = [a.clone(), b.clone()];
    let _unmount = Unmount(root, &pair);
    let mut rootfs = Vec::new();
    for name in &pair {
        cowherd_unify::mount(root, name)?;
        rootfs.push(cowherd_unify::mounted_rootfs(root, name)?);
    }
    let object = root.objects_dir().join(&top.object[..2]).join(&top.object);
    let read = |p: &Path| std::fs::read(p).with_context(|| format!("reading {}", p.display()));
    let (before_b, before_object) = (read(&rootfs[1].join(path))?, read(&object)?);
    let mut file = std::fs::OpenOptions::new()
        .append(true)
        .open(rootfs[0].join(path))
        .with_context(|| format!("opening {path} in {a}"))?;
    std::io::Write::write_all(&mut file, b"# changed by the demo\n")?;
    drop(file);
    let unchanged = read(&rootfs[1].join(path))? == before_b && read(&object)? == before_object;
    if !unchanged {
        bail!("a write through {a}'s overlay reached {b} or the store: this is a bug");
    }
    let memory = cowherd_unify::memory_stats(root, 0)?;
    for name in &pair {
        cowherd_unify::umount(root, name)?;
    }
    let folded = cowherd_unify::fold(root, a, &cowherd_unify::FoldOptions::default())?;
    if !json {
        outln!();
        outln!(
            "overlays: mounted {a} and {b}; appended to /{path} through {a}: it was copied up into \
             {a}'s upper layer, and {b}'s /{path} and the store object kept their bytes"
        );
        outln!(
            "page cache now: {} of shared objects cached once for both guests, {} saved",
            fmt::bytes(memory.resident_bytes),
            fmt::bytes(memory.page_cache_saved_bytes)
        );
        outln!(
            "fold {a}: {} moved down into base{}",
            folded.moved,
            if folded.upper_emptied {
                "; upper layer empty again"
            } else {
                ""
            }
        );
    }
    Ok(())
}

fn _tmp_kept(root: &Path) -> bool {
    !root.starts_with(std::env::temp_dir()) || !root.to_string_lossy().contains("cowherd-demo.")
}
