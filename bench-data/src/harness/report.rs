//! The benchmark's results: per-tool measurements, the ratios cowherd/peer, the targets of
//! issue 3 and their evaluation, and the Markdown table (the JSON is these structs).

use std::fmt::Write as _;

use serde::Serialize;

use super::manifest::{Diff, Sharing};

/// One timed run of a command.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Run {
    /// Wall-clock seconds.
    pub wall_secs: f64,
    /// User CPU seconds.
    pub user_secs: f64,
    /// System CPU seconds.
    pub sys_secs: f64,
    /// Peak resident set size in KiB (GNU time `%M`; the largest process of a pipeline).
    pub peak_rss_kib: u64,
    /// Exit code (0: success).
    pub exit_code: i32,
    /// Whether the page cache was dropped right before.
    pub cold: bool,
}

impl Run {
    /// Peak RSS in bytes.
    #[must_use]
    pub fn peak_rss_bytes(&self) -> u64 {
        self.peak_rss_kib * 1024
    }
}

/// What one tool did to its fresh copy of the guest set.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ToolResult {
    /// `cowherd`, `cowherd-default`, `hardlink`, `rdfind`, `jdupes`, `fclones`.
    pub tool: String,
    /// The command line run (twice), with the guest directories abbreviated.
    pub command: String,
    /// The first run (cowherd: cold index).
    pub first: Option<Run>,
    /// The second run on the same copy (cowherd: warm index).
    pub second: Option<Run>,
    /// Bytes on disk after the first run (guests plus cowherd's store).
    pub bytes_after_first: u64,
    /// Bytes on disk after the second run.
    pub bytes_after: u64,
    /// Paths linked and wrongly linked, after the second run.
    pub sharing: Sharing,
    /// How the guests differ from the master after the second run.
    pub diff: Diff,
    /// What cowherd itself reported as linked (first run), if it is cowherd.
    pub reported_linked: Option<u64>,
    /// Size of cowherd's index after the runs (not in `bytes_after`).
    pub index_bytes: Option<u64>,
    /// Bytes of the directories of cowherd's store (`store/objects/ab/`, …), which are in
    /// `bytes_after`.
    pub store_dir_bytes: Option<u64>,
    /// Why the tool's results are incomplete, if they are.
    pub error: Option<String>,
}

impl ToolResult {
    /// A result with nothing measured yet.
    pub fn new(tool: &str, command: String) -> ToolResult {
        ToolResult {
            tool: tool.to_owned(),
            command,
            first: None,
            second: None,
            bytes_after_first: 0,
            bytes_after: 0,
            sharing: Sharing::default(),
            diff: Diff::default(),
            reported_linked: None,
            index_bytes: None,
            store_dir_bytes: None,
            error: None,
        }
    }
}

/// The guest set measured.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SetInfo {
    /// `synthetic` or `real`.
    pub source: String,
    /// What it is made of (spec, templates).
    pub description: String,
    /// Seed of the generator.
    pub seed: u64,
    /// Number of guests.
    pub guests: usize,
    /// Regular-file names over all guests.
    pub file_names: u64,
    /// Distinct regular-file inodes.
    pub file_inodes: u64,
    /// Their total size.
    pub logical_bytes: u64,
    /// Bytes on disk of the master set.
    pub bytes_on_disk: u64,
    /// Seconds to generate the master set (0 when reused).
    pub generate_secs: f64,
}

/// The lower bound: reading every regular file of at least one byte once, cold.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct ReadBound {
    /// The timed read.
    pub run: Run,
    /// Files (inodes) read.
    pub files: u64,
    /// Bytes read.
    pub bytes: u64,
}

/// The machine the benchmark ran on.
#[derive(Debug, Clone, PartialEq, Serialize, Default)]
pub struct Machine {
    /// Online CPUs.
    pub cpus: usize,
    /// Total memory in bytes.
    pub memory_bytes: u64,
    /// `uname -r`.
    pub kernel: String,
    /// File system type of the output directory.
    pub filesystem: String,
}

/// cowherd (`--scale`) at one guest count.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct ScalePoint {
    /// Guests.
    pub guests: usize,
    /// Regular files cowherd scanned.
    pub files: u64,
    /// First (cold index) run.
    pub first: Run,
    /// Second (warm index) run.
    pub second: Run,
}

/// Ratios cowherd ÷ peer, measured in the same benchmark run (below 1: cowherd is faster,
/// smaller).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Ratio {
    /// The peer.
    pub peer: String,
    /// Wall time of the first runs.
    pub first_time: Option<f64>,
    /// Wall time of the second runs.
    pub second_time: Option<f64>,
    /// Peak RSS of the first runs.
    pub first_rss: Option<f64>,
    /// Bytes on disk after.
    pub bytes_after: Option<f64>,
}

/// Whether one target of issue 3 is met.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TargetResult {
    /// The target.
    pub target: String,
    /// `Some(true)` met, `Some(false)` not met, `None` not measured.
    pub met: Option<bool>,
    /// The numbers.
    pub detail: String,
}

/// Everything one benchmark run measured.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Report {
    /// The guest set.
    pub set: SetInfo,
    /// The machine.
    pub machine: Machine,
    /// Whether every run could drop the page cache first.
    pub caches_dropped: bool,
    /// The read-every-candidate-byte bound.
    pub read_bound: Option<ReadBound>,
    /// One entry per tool, in the order run.
    pub tools: Vec<ToolResult>,
    /// cowherd alone at several sizes (`--scale`).
    pub scale: Vec<ScalePoint>,
    /// cowherd ÷ each peer.
    pub ratios: Vec<Ratio>,
    /// The targets.
    pub targets: Vec<TargetResult>,
}

/// The peak RSS target, bytes.
pub const RSS_LIMIT: u64 = 300 * 1000 * 1000;

/// Names of the cowherd rows; the others are peers.
fn is_cowherd(tool: &str) -> bool {
    tool.starts_with("cowherd")
}

impl Report {
    /// The cowherd row the targets are judged on: the all-eligible one if it ran, else the
    /// default-policy one.
    #[must_use]
    pub fn cowherd(&self) -> Option<&ToolResult> {
        self.tool("cowherd")
            .or_else(|| self.tool("cowherd-default"))
    }

    /// The row of `tool`.
    #[must_use]
    pub fn tool(&self, tool: &str) -> Option<&ToolResult> {
        self.tools.iter().find(|t| t.tool == tool)
    }

    /// Successful peers' rows.
    fn peers(&self) -> impl Iterator<Item = &ToolResult> {
        self.tools.iter().filter(|t| !is_cowherd(&t.tool))
    }

    /// Bytes saved by `tool`: the master's bytes on disk minus its bytes after.
    #[must_use]
    pub fn saved(&self, tool: &ToolResult) -> i64 {
        self.set.bytes_on_disk as i64 - tool.bytes_after as i64
    }

    /// Fills [`Report::ratios`] and [`Report::targets`] from the measurements.
    pub fn evaluate(&mut self) {
        self.ratios = ratios(self);
        self.targets = targets(self);
    }
}

fn div(a: Option<f64>, b: Option<f64>) -> Option<f64> {
    match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => Some(a / b),
        _ => None,
    }
}

/// A successful run's wall time.
fn wall(run: Option<Run>) -> Option<f64> {
    run.filter(|r| r.exit_code == 0).map(|r| r.wall_secs)
}

/// A successful run's peak RSS in KiB.
fn rss(run: Option<Run>) -> Option<f64> {
    run.filter(|r| r.exit_code == 0)
        .map(|r| r.peak_rss_kib as f64)
}

/// The tool, if both its runs succeeded.
fn done(t: &ToolResult) -> Option<&ToolResult> {
    (wall(t.first).is_some() && wall(t.second).is_some()).then_some(t)
}

/// cowherd ÷ every peer.
#[must_use]
pub fn ratios(report: &Report) -> Vec<Ratio> {
    let Some(c) = report.cowherd() else {
        return Vec::new();
    };
    report
        .peers()
        .map(|p| Ratio {
            peer: p.tool.clone(),
            first_time: div(wall(c.first), wall(p.first)),
            second_time: div(wall(c.second), wall(p.second)),
            first_rss: div(rss(c.first), rss(p.first)),
            bytes_after: div(
                done(c).map(|c| c.bytes_after as f64),
                done(p).map(|p| p.bytes_after as f64),
            ),
        })
        .collect()
}

/// The exponent `k` of `rss ∝ files^k` between the smallest and the largest scale point
/// (below 1: sub-linear growth).
#[must_use]
pub fn rss_exponent(points: &[ScalePoint]) -> Option<f64> {
    let lo = points.iter().min_by_key(|p| p.files)?;
    let hi = points.iter().max_by_key(|p| p.files)?;
    let rss = |p: &ScalePoint| p.first.peak_rss_kib.max(p.second.peak_rss_kib) as f64;
    if hi.files <= lo.files || rss(lo) <= 0.0 {
        return None;
    }
    Some((rss(hi) / rss(lo)).ln() / (hi.files as f64 / lo.files as f64).ln())
}

/// Evaluates the targets of issue 3 on `report`.
#[must_use]
pub fn targets(report: &Report) -> Vec<TargetResult> {
    let mut out = Vec::new();
    let cow = report.cowherd();
    let name = cow.map_or("cowherd", |c| c.tool.as_str());
    let first = cow.and_then(|c| wall(c.first));
    let second = cow.and_then(|c| wall(c.second));
    let not_run = |target: &str, why: &str| TargetResult {
        target: target.to_owned(),
        met: None,
        detail: why.to_owned(),
    };

    let t = "first unify ≥ 2x faster than the fastest peer";
    let fastest = report
        .peers()
        .filter_map(|p| wall(p.first).map(|w| (w, p.tool.as_str())))
        .min_by(|a, b| a.0.total_cmp(&b.0));
    out.push(match (first, fastest) {
        (Some(c), Some((p, peer))) => TargetResult {
            target: t.to_owned(),
            met: Some(p / c >= 2.0),
            detail: format!(
                "{name} {} vs fastest peer {peer} {}: {peer} ÷ {name} = {:.2} (≥ 2 needed)",
                secs(c),
                secs(p),
                p / c
            ),
        },
        _ => not_run(t, "needs cowherd and at least one peer"),
    });

    let t = "first unify within 1.5x of reading every candidate byte once (cold)";
    out.push(match (first, report.read_bound) {
        (Some(c), Some(b)) if b.run.wall_secs > 0.0 => TargetResult {
            target: t.to_owned(),
            met: Some(c <= 1.5 * b.run.wall_secs),
            detail: format!(
                "{name} {} vs read bound {}: {name} ÷ bound = {:.2} (≤ 1.5 needed)",
                secs(c),
                secs(b.run.wall_secs),
                c / b.run.wall_secs
            ),
        },
        _ => not_run(t, "needs cowherd and the read bound"),
    });

    let t = "second unify ≥ 20x faster than the first";
    out.push(match (first, second) {
        (Some(f), Some(s)) if s > 0.0 => TargetResult {
            target: t.to_owned(),
            met: Some(f / s >= 20.0),
            detail: format!(
                "{name} {} then {}: first ÷ second = {:.1} (≥ 20 needed)",
                secs(f),
                secs(s),
                f / s
            ),
        },
        _ => not_run(t, "needs two successful cowherd runs"),
    });

    let t = "peak RSS < 300 MB";
    let mut rss: Vec<(u64, u64)> = Vec::new();
    if let Some(c) = cow {
        let peak = [c.first, c.second]
            .iter()
            .flatten()
            .filter(|r| r.exit_code == 0)
            .map(|r| r.peak_rss_bytes())
            .max();
        if let Some(peak) = peak {
            rss.push((report.set.file_names, peak));
        }
    }
    for p in &report.scale {
        rss.push((
            p.files,
            p.first.peak_rss_bytes().max(p.second.peak_rss_bytes()),
        ));
    }
    out.push(match rss.iter().max_by_key(|(_, r)| *r) {
        Some(&(files, peak)) => TargetResult {
            target: t.to_owned(),
            met: Some(peak < RSS_LIMIT),
            detail: format!(
                "{} at {} files (target stated for 400k files)",
                mb(peak),
                thousands(files)
            ),
        },
        None => not_run(t, "needs a cowherd run"),
    });

    let t = "peak RSS grows sub-linearly with the file count";
    out.push(match rss_exponent(&report.scale) {
        Some(k) => {
            let pts: Vec<String> = report
                .scale
                .iter()
                .map(|p| {
                    format!(
                        "{} files: {}",
                        thousands(p.files),
                        mb(p.first.peak_rss_bytes().max(p.second.peak_rss_bytes()))
                    )
                })
                .collect();
            TargetResult {
                target: t.to_owned(),
                met: Some(k < 1.0),
                detail: format!("{}; RSS ∝ files^{k:.2}", pts.join(", ")),
            }
        }
        None => not_run(t, "needs --scale with at least two sizes"),
    });

    let t = "bytes saved ≥ those of hardlink with the same metadata rules";
    out.push(
        match (cow.and_then(done), report.tool("hardlink").and_then(done)) {
            (Some(c), Some(h)) => {
                let (cs, hs) = (report.saved(c), report.saved(h));
                TargetResult {
                    target: t.to_owned(),
                    met: Some(cs >= hs),
                    detail: format!(
                        "{name} saved {} ({} B), hardlink saved {} ({} B); difference {} B{}",
                        bytes(cs.max(0) as u64),
                        thousands(cs.max(0) as u64),
                        bytes(hs.max(0) as u64),
                        thousands(hs.max(0) as u64),
                        signed(cs - hs),
                        c.store_dir_bytes.map_or(String::new(), |d| format!(
                            ", while the directories of cowherd's store take {} B",
                            thousands(d)
                        ))
                    ),
                }
            }
            _ => not_run(t, "needs cowherd and hardlink"),
        },
    );
    out
}

/// `12.3 s`, `850 ms`.
#[must_use]
pub fn secs(s: f64) -> String {
    if s < 1.0 {
        format!("{:.0} ms", s * 1000.0)
    } else if s < 100.0 {
        format!("{s:.2} s")
    } else {
        format!("{s:.1} s")
    }
}

/// Decimal megabytes: `45.2 MB`.
#[must_use]
pub fn mb(b: u64) -> String {
    format!("{:.1} MB", b as f64 / 1e6)
}

/// Binary units: `512 B`, `1.5 KiB`, `12.3 MiB`, `1.23 GiB`.
#[must_use]
pub fn bytes(b: u64) -> String {
    const K: f64 = 1024.0;
    let f = b as f64;
    if f < K {
        format!("{b} B")
    } else if f < K * K {
        format!("{:.1} KiB", f / K)
    } else if f < K * K * K {
        format!("{:.1} MiB", f / K / K)
    } else {
        format!("{:.2} GiB", f / K / K / K)
    }
}

/// `+1,234` or `−1,234`.
fn signed(n: i64) -> String {
    if n < 0 {
        format!("−{}", thousands(n.unsigned_abs()))
    } else {
        format!("+{}", thousands(n as u64))
    }
}

/// `1,234,567`.
#[must_use]
pub fn thousands(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

fn ratio_cell(r: Option<f64>) -> String {
    r.map_or("–".to_owned(), |r| format!("{r:.2}"))
}

fn run_cells(run: Option<Run>) -> (String, String) {
    match run {
        None => ("–".into(), "–".into()),
        Some(r) if r.exit_code != 0 => {
            (format!("failed ({})", r.exit_code), mb(r.peak_rss_bytes()))
        }
        Some(r) => (secs(r.wall_secs), mb(r.peak_rss_bytes())),
    }
}

fn check_cell(d: &Diff) -> String {
    if !d.content_identical() {
        let mut parts = Vec::new();
        for (n, what) in [
            (d.missing, "missing"),
            (d.extra, "extra"),
            (d.kind_changed, "type changed"),
            (d.content_changed, "content changed"),
        ] {
            if n > 0 {
                parts.push(format!("{} {what}", thousands(n)));
            }
        }
        format!("**{}**", parts.join(", "))
    } else {
        "identical".to_owned()
    }
}

/// The footnote explaining a cowherd row's policy.
fn tool_label(tool: &str) -> String {
    match tool {
        "cowherd" => "cowherd ¹".to_owned(),
        "cowherd-default" => "cowherd ²".to_owned(),
        other => other.to_owned(),
    }
}

/// The report as Markdown: the set, the table, the ratios, the targets.
#[must_use]
pub fn markdown(r: &Report) -> String {
    let mut s = String::new();
    let set = &r.set;
    let _ = writeln!(
        s,
        "### cowherd benchmark: {} guests ({}), {} files",
        set.guests,
        set.source,
        thousands(set.file_names)
    );
    let _ = writeln!(s);
    let _ = writeln!(
        s,
        "Set: {}; seed {:#x}. {} regular-file names, {} inodes, {} logical, {} on disk{}.",
        set.description,
        set.seed,
        thousands(set.file_names),
        thousands(set.file_inodes),
        bytes(set.logical_bytes),
        bytes(set.bytes_on_disk),
        if set.generate_secs > 0.0 {
            format!("; generated in {}", secs(set.generate_secs))
        } else {
            String::new()
        }
    );
    let m = &r.machine;
    let _ = writeln!(
        s,
        "Machine: {} CPUs, {} RAM, Linux {}, {}. Page cache dropped before every run: {}. \
         Each tool ran twice on its own fresh `cp -a` copy of the master set.",
        m.cpus,
        bytes(m.memory_bytes),
        m.kernel,
        m.filesystem,
        if r.caches_dropped {
            "yes"
        } else {
            "**no** (runs are warm)"
        }
    );
    if let Some(b) = r.read_bound {
        let _ = writeln!(
            s,
            "Lower bound: reading every regular file ≥ 1 byte once ({} files, {}){}: **{}**.",
            thousands(b.files),
            bytes(b.bytes),
            if b.run.cold { ", cold cache" } else { "" },
            secs(b.run.wall_secs)
        );
    }
    if !r.tools.is_empty() {
        tools_table(&mut s, r);
    }
    if !r.ratios.is_empty() {
        let _ = writeln!(s);
        let _ = writeln!(
            s,
            "Ratios cowherd ÷ peer (same run; below 1: cowherd faster, smaller):"
        );
        let _ = writeln!(s);
        let _ = writeln!(
            s,
            "| peer | time, 1st run | time, 2nd run | peak RSS, 1st run | bytes on disk after |"
        );
        let _ = writeln!(s, "|---|--:|--:|--:|--:|");
        for q in &r.ratios {
            let _ = writeln!(
                s,
                "| {} | {} | {} | {} | {} |",
                q.peer,
                ratio_cell(q.first_time),
                ratio_cell(q.second_time),
                ratio_cell(q.first_rss),
                ratio_cell(q.bytes_after)
            );
        }
    }
    if !r.scale.is_empty() {
        let _ = writeln!(s);
        let _ = writeln!(s, "cowherd alone at several sizes (every path eligible):");
        let _ = writeln!(s);
        let _ = writeln!(
            s,
            "| guests | files | 1st run | peak RSS | 2nd run | peak RSS |"
        );
        let _ = writeln!(s, "|--:|--:|--:|--:|--:|--:|");
        for p in &r.scale {
            let (f, frss) = run_cells(Some(p.first));
            let (sec, srss) = run_cells(Some(p.second));
            let _ = writeln!(
                s,
                "| {} | {} | {f} | {frss} | {sec} | {srss} |",
                p.guests,
                thousands(p.files)
            );
        }
    }
    if !r.targets.is_empty() {
        let _ = writeln!(s);
        let _ = writeln!(s, "Targets:");
        let _ = writeln!(s);
        for t in &r.targets {
            let _ = writeln!(s, "- {} {}: {}", verdict(t.met), t.target, t.detail);
        }
    }
    s
}

/// The per-tool table, its footnotes and the command lines.
fn tools_table(s: &mut String, r: &Report) {
    let _ = writeln!(*s);
    let _ = writeln!(
        *s,
        "| tool | 1st run | peak RSS | 2nd run | peak RSS | on disk after | saved | paths linked | wrong links | guests after | metadata changed | dir mtimes / sizes changed | cowherd ÷ tool, 1st run | cowherd ÷ tool, 2nd run |"
    );
    let _ = writeln!(
        *s,
        "|---|--:|--:|--:|--:|--:|--:|--:|--:|---|--:|--:|--:|--:|"
    );
    let cow = r.cowherd();
    for t in &r.tools {
        let (f, frss) = run_cells(t.first);
        let (sec, srss) = run_cells(t.second);
        let vs = |peer: Option<Run>, cowherd: Option<Run>| {
            if is_cowherd(&t.tool) {
                "–".to_owned()
            } else {
                ratio_cell(div(wall(cowherd), wall(peer)))
            }
        };
        let saved = r.saved(t);
        let _ = writeln!(
            *s,
            "| {} | {f} | {frss} | {sec} | {srss} | {} | {} | {} | {} | {} | {} | {} / {} | {} | {} |",
            tool_label(&t.tool),
            bytes(t.bytes_after),
            if saved < 0 {
                format!("−{}", bytes(saved.unsigned_abs()))
            } else {
                bytes(saved as u64)
            },
            thousands(t.sharing.linked_paths),
            if t.sharing.wrong_links > 0 {
                format!("**{}**", thousands(t.sharing.wrong_links))
            } else {
                "0".to_owned()
            },
            check_cell(&t.diff),
            thousands(t.diff.meta_changed),
            thousands(t.diff.dir_mtime_changed),
            thousands(t.diff.dir_size_changed),
            vs(t.first, cow.and_then(|c| c.first)),
            vs(t.second, cow.and_then(|c| c.second)),
        );
    }
    if let Some(b) = r.read_bound {
        let _ = writeln!(
            *s,
            "| read every candidate byte | {} | {} | | | | | | | | | | | |",
            secs(b.run.wall_secs),
            mb(b.run.peak_rss_bytes())
        );
    }
    let _ = writeln!(*s);
    let _ = writeln!(
        *s,
        "¹ cowherd with every path eligible (`policy.toml`: `rules = []`, \
         `dpkg_conffiles = false`), like for like with hardlink; 1st run = cold index, \
         2nd = warm index. ² cowherd with its default policy (`/etc`, `/var`, `/home`, … and \
         dpkg conffiles private). \"on disk after\": `st_blocks` of every inode once, over the \
         guests plus cowherd's store (cowherd's index is not counted: {}). \"saved\": master \
         on disk minus on disk after. \"paths linked\": paths now on an inode shared with \
         paths that were on another inode in the master. \"wrong links\": paths sharing an \
         inode with a path whose owner, mode, mtime or xattrs differed in the master. \
         \"guests after\": every path, type, content (BLAKE3) and symlink target compared with \
         the master; \"metadata changed\": paths whose mode, owner, mtime or xattrs a guest now \
         sees differently. \"cowherd ÷ tool\": cowherd's wall time{} divided by the tool's (below 1: cowherd is faster).",
        cow.and_then(|c| c.index_bytes)
            .map_or("–".to_owned(), |b| format!("{} after the runs", bytes(b))),
        cow.map_or(String::new(), |c| format!(" ({})", c.tool))
    );
    let _ = writeln!(*s);
    let _ = writeln!(*s, "Commands:");
    let _ = writeln!(*s);
    for t in &r.tools {
        let _ = writeln!(*s, "- {}: `{}`", t.tool, t.command);
        if let Some(e) = &t.error {
            let _ = writeln!(*s, "  - error: {e}");
        }
        if !t.diff.examples.is_empty() {
            let _ = writeln!(*s, "  - e.g. {}", t.diff.examples.join("; "));
        }
    }
}

/// `met`, `NOT MET`, `not measured`.
#[must_use]
pub fn verdict(met: Option<bool>) -> &'static str {
    match met {
        Some(true) => "**met**",
        Some(false) => "**NOT MET**",
        None => "not measured",
    }
}
