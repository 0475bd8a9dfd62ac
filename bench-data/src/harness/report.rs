//! The benchmark's results: every tool run of the interleaved rounds, their medians, the
//! pairwise ratios peer ÷ cowherd, the scale points, the targets of issue 11 and their
//! evaluation, and the Markdown tables (the JSON is these structs).

use std::fmt::Write as _;

use serde::Serialize;

use super::build::median;
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

    /// Whether it exited 0.
    #[must_use]
    pub fn ok(&self) -> bool {
        self.exit_code == 0
    }
}

/// The median, smallest and largest of some measurements.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Spread {
    /// The median (the mean of the middle two for an even count).
    pub median: f64,
    /// The smallest value.
    pub min: f64,
    /// The largest value.
    pub max: f64,
    /// How many values.
    pub n: usize,
}

impl Spread {
    /// The spread of `values`, `None` if there are none.
    #[must_use]
    pub fn of(values: Vec<f64>) -> Option<Spread> {
        let min = values.iter().copied().min_by(f64::total_cmp)?;
        let max = values.iter().copied().max_by(f64::total_cmp)?;
        let n = values.len();
        Some(Spread {
            median: median(values)?,
            min,
            max,
            n,
        })
    }
}

/// One run of a tool on its own fresh copy: the 1st run, then the 2nd over the unchanged
/// guests.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ToolRun {
    /// Its place in the whole benchmark (1-based): runs are numbered in the order they ran.
    pub seq: usize,
    /// The round (1-based).
    pub round: usize,
    /// The first run (cowherd: empty index).
    pub first: Option<Run>,
    /// The second run on the same copy (cowherd: full index, nothing changed).
    pub second: Option<Run>,
    /// For a peer: `seq` of the cowherd run it is compared with (the one adjacent to it).
    pub paired_with: Option<usize>,
    /// What cowherd reported as linked in its first run.
    pub reported_linked: Option<u64>,
    /// cowherd: the files it indexed (`files_scanned` of its second run).
    pub files_indexed: Option<u64>,
    /// cowherd: size of `index.db` plus `index.db-wal` after the second run.
    pub index_bytes: Option<u64>,
    /// Why this run's results are incomplete, if they are.
    pub error: Option<String>,
}

impl ToolRun {
    /// A run with nothing measured yet.
    #[must_use]
    pub fn new(seq: usize, round: usize, paired_with: Option<usize>) -> ToolRun {
        ToolRun {
            seq,
            round,
            first: None,
            second: None,
            paired_with,
            reported_linked: None,
            files_indexed: None,
            index_bytes: None,
            error: None,
        }
    }

    /// Peak RSS of its successful runs, in bytes.
    #[must_use]
    pub fn peak_rss_bytes(&self) -> Option<u64> {
        [self.first, self.second]
            .iter()
            .flatten()
            .filter(|r| r.ok())
            .map(Run::peak_rss_bytes)
            .max()
    }

    /// Index bytes per indexed file.
    #[must_use]
    pub fn index_per_file(&self) -> Option<f64> {
        per_file(self.index_bytes, self.files_indexed)
    }
}

fn per_file(bytes: Option<u64>, files: Option<u64>) -> Option<f64> {
    match (bytes, files) {
        (Some(b), Some(f)) if f > 0 => Some(b as f64 / f as f64),
        _ => None,
    }
}

/// What a tool did to the guests, checked on one of its copies (the first round's).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Checks {
    /// `seq` of the run checked.
    pub seq: usize,
    /// Bytes on disk after the first run (guests plus cowherd's store).
    pub bytes_after_first: u64,
    /// Bytes on disk after the second run.
    pub bytes_after: u64,
    /// Paths linked and wrongly linked, after the second run.
    pub sharing: Sharing,
    /// How the guests differ from the master after the second run.
    pub diff: Diff,
    /// Bytes of the directories of cowherd's store (`store/objects/ab/`, …), which are in
    /// `bytes_after`.
    pub store_dir_bytes: Option<u64>,
}

/// Everything one tool did over the rounds.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ToolResult {
    /// `cowherd`, `cowherd-default`, `hardlink`, `rdfind`, `jdupes`, `fclones`.
    pub tool: String,
    /// The command line run (twice per copy), with the guest directories abbreviated.
    pub command: String,
    /// Its runs, in order (cowherd may run several times a round, next to each peer).
    pub runs: Vec<ToolRun>,
    /// The checks of its first-round copy.
    pub checks: Option<Checks>,
    /// The first error any of its runs met.
    pub error: Option<String>,
}

impl ToolResult {
    /// A result with nothing measured yet.
    #[must_use]
    pub fn new(tool: &str, command: String) -> ToolResult {
        ToolResult {
            tool: tool.to_owned(),
            command,
            runs: Vec::new(),
            checks: None,
            error: None,
        }
    }

    /// Wall times of the successful first runs.
    #[must_use]
    pub fn first(&self) -> Option<Spread> {
        Spread::of(self.runs.iter().filter_map(|r| wall(r.first)).collect())
    }

    /// Wall times of the successful second runs.
    #[must_use]
    pub fn second(&self) -> Option<Spread> {
        Spread::of(self.runs.iter().filter_map(|r| wall(r.second)).collect())
    }

    /// Peak RSS (bytes) of each copy's runs.
    #[must_use]
    pub fn rss(&self) -> Option<Spread> {
        Spread::of(
            self.runs
                .iter()
                .filter_map(|r| r.peak_rss_bytes().map(|b| b as f64))
                .collect(),
        )
    }

    /// The largest peak RSS of any run, in bytes.
    #[must_use]
    pub fn max_rss(&self) -> Option<u64> {
        self.runs.iter().filter_map(ToolRun::peak_rss_bytes).max()
    }

    /// Index bytes per indexed file (median over the copies).
    #[must_use]
    pub fn index_per_file(&self) -> Option<Spread> {
        Spread::of(
            self.runs
                .iter()
                .filter_map(ToolRun::index_per_file)
                .collect(),
        )
    }

    /// The run numbered `seq`.
    #[must_use]
    pub fn run(&self, seq: usize) -> Option<&ToolRun> {
        self.runs.iter().find(|r| r.seq == seq)
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

/// `cowherd unify G` of one guest after ~200 of its files were rewritten.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ChangedGuest {
    /// The guest.
    pub guest: String,
    /// Files rewritten (new content, written beside and renamed over).
    pub files: u64,
    /// Their bytes.
    pub bytes: u64,
    /// Files `unify G` read in full (`hashed_files`).
    pub hashed_files: Option<u64>,
    /// The timed `cowherd unify G` (cold cache).
    pub run: Run,
}

/// cowherd (`--scale`) at one guest count.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ScalePoint {
    /// Guests.
    pub guests: usize,
    /// Of them, real copies of the master set's guests.
    pub real_guests: usize,
    /// Of them, hardlink clones of the real copies with private, changed copies of a few
    /// files each.
    pub clones: usize,
    /// Regular files below the guests (what the cold `find` counted).
    pub files: u64,
    /// Seconds to make the set (copies, clones, divergence, adoption; not timed otherwise).
    pub build_secs: f64,
    /// First run: empty index.
    pub first: Run,
    /// What the first run hashed and linked (`hashed_bytes`, `linked_files`).
    pub first_hashed_bytes: Option<u64>,
    /// Paths the first run replaced by store links.
    pub first_linked: Option<u64>,
    /// Second run over the unchanged guests (cold cache).
    pub second: Run,
    /// Cold `find ROOT/guests/*/base -type f | wc -l`, before the second run.
    pub find_before: Option<Run>,
    /// The same, after the second run.
    pub find_after: Option<Run>,
    /// `cowherd unify G` after an upgrade-sized change of one guest.
    pub changed: Option<ChangedGuest>,
    /// Size of `index.db` plus `index.db-wal` after the second run.
    pub index_bytes: Option<u64>,
    /// The files cowherd indexed (`files_scanned` of the second run).
    pub files_indexed: Option<u64>,
}

impl ScalePoint {
    /// The largest peak RSS of the full runs (first and second), in bytes.
    #[must_use]
    pub fn peak_rss_bytes(&self) -> u64 {
        self.first
            .peak_rss_bytes()
            .max(self.second.peak_rss_bytes())
    }

    /// The faster successful cold `find` walk.
    #[must_use]
    pub fn find_secs(&self) -> Option<f64> {
        [self.find_before, self.find_after]
            .iter()
            .flatten()
            .filter(|r| r.ok())
            .map(|r| r.wall_secs)
            .min_by(f64::total_cmp)
    }

    /// Index bytes per indexed file.
    #[must_use]
    pub fn index_per_file(&self) -> Option<f64> {
        per_file(self.index_bytes, self.files_indexed)
    }

    /// Second run ÷ the faster find (below 1: the re-run is faster).
    #[must_use]
    pub fn second_vs_find(&self) -> Option<f64> {
        div(wall(Some(self.second)), self.find_secs())
    }
}

/// One peer run against the cowherd run adjacent to it: peer ÷ cowherd.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Pair {
    /// The peer's run.
    pub seq: usize,
    /// cowherd's run.
    pub cowherd_seq: usize,
    /// The round.
    pub round: usize,
    /// First runs: peer ÷ cowherd (above 1: cowherd is faster).
    pub first: Option<f64>,
    /// Second runs: peer ÷ cowherd.
    pub second: Option<f64>,
}

/// One peer against cowherd: the spread of its pairwise ratios (peer ÷ cowherd: above 1,
/// cowherd is faster, smaller).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Ratio {
    /// The peer.
    pub peer: String,
    /// Each pair.
    pub pairs: Vec<Pair>,
    /// First runs, peer ÷ cowherd.
    pub first_time: Option<Spread>,
    /// Second runs, peer ÷ cowherd.
    pub second_time: Option<Spread>,
    /// Peak RSS, peer ÷ cowherd (medians).
    pub rss: Option<f64>,
    /// Bytes on disk after, peer ÷ cowherd (checked copies).
    pub bytes_after: Option<f64>,
}

/// Whether one target is met.
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
    /// Rounds of the main table.
    pub rounds: usize,
    /// The tool every peer is paired with (`cowherd`, else `cowherd-default`).
    pub reference: Option<String>,
    /// The order of each round, as text.
    pub order: Vec<String>,
    /// The read-every-candidate-byte bound, before the first round.
    pub read_bound_before: Option<ReadBound>,
    /// The same, after the last round.
    pub read_bound_after: Option<ReadBound>,
    /// One entry per tool, in the order given.
    pub tools: Vec<ToolResult>,
    /// cowherd alone at several sizes (`--scale`).
    pub scale: Vec<ScalePoint>,
    /// How the scale sets beyond the master's guests were made.
    pub scale_note: Option<String>,
    /// Each peer against cowherd.
    pub ratios: Vec<Ratio>,
    /// The targets.
    pub targets: Vec<TargetResult>,
}

/// Target: cowherd's first run at least this many times faster than hardlink's.
pub const HARDLINK_FIRST: f64 = 2.0;
/// Target: cowherd's first run within this factor of the read bound.
pub const READ_BOUND_FACTOR: f64 = 1.25;
/// Target: cowherd's second run at least this many times faster than hardlink's.
pub const HARDLINK_SECOND: f64 = 3.0;
/// Target: peak RSS at [`RSS_GUESTS`] guests, bytes.
pub const RSS_LIMIT: u64 = 84 * 1000 * 1000;
/// The guest count the RSS limit is stated for.
pub const RSS_GUESTS: usize = 40;
/// Target: peak RSS within this share of the smallest scale point's.
pub const RSS_FLAT: f64 = 0.10;
/// Target: index bytes per file.
pub const INDEX_PER_FILE: f64 = 120.0;
/// The guest count the fleet targets are stated for.
pub const FLEET_GUESTS: usize = 500;
/// Target: `cowherd unify G` of one changed guest, seconds.
pub const CHANGED_GUEST_SECS: f64 = 1.0;

impl Report {
    /// The cowherd row the targets are judged on and the peers are paired with.
    #[must_use]
    pub fn cowherd(&self) -> Option<&ToolResult> {
        match &self.reference {
            Some(r) => self.tool(r),
            None => self
                .tool("cowherd")
                .or_else(|| self.tool("cowherd-default")),
        }
    }

    /// The row of `tool`.
    #[must_use]
    pub fn tool(&self, tool: &str) -> Option<&ToolResult> {
        self.tools.iter().find(|t| t.tool == tool)
    }

    /// Bytes saved by `tool` on its checked copy: the master's bytes on disk minus its bytes
    /// after.
    #[must_use]
    pub fn saved(&self, tool: &ToolResult) -> Option<i64> {
        tool.checks
            .as_ref()
            .map(|c| self.set.bytes_on_disk as i64 - c.bytes_after as i64)
    }

    /// The ratio of `peer`, if computed.
    #[must_use]
    pub fn ratio(&self, peer: &str) -> Option<&Ratio> {
        self.ratios.iter().find(|r| r.peer == peer)
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
    run.filter(Run::ok).map(|r| r.wall_secs)
}

/// Each run of `peer` against the cowherd run it is paired with: peer ÷ cowherd.
#[must_use]
pub fn pairs(cowherd: &ToolResult, peer: &ToolResult) -> Vec<Pair> {
    peer.runs
        .iter()
        .filter_map(|p| {
            let c = cowherd.run(p.paired_with?)?;
            Some(Pair {
                seq: p.seq,
                cowherd_seq: c.seq,
                round: p.round,
                first: div(wall(p.first), wall(c.first)),
                second: div(wall(p.second), wall(c.second)),
            })
        })
        .collect()
}

/// Every peer against cowherd.
#[must_use]
pub fn ratios(report: &Report) -> Vec<Ratio> {
    let Some(c) = report.cowherd() else {
        return Vec::new();
    };
    report
        .tools
        .iter()
        .filter(|t| t.tool != c.tool)
        .map(|p| {
            let pairs = pairs(c, p);
            Ratio {
                peer: p.tool.clone(),
                first_time: Spread::of(pairs.iter().filter_map(|q| q.first).collect()),
                second_time: Spread::of(pairs.iter().filter_map(|q| q.second).collect()),
                rss: div(p.rss().map(|s| s.median), c.rss().map(|s| s.median)),
                bytes_after: div(
                    p.checks.as_ref().map(|k| k.bytes_after as f64),
                    c.checks.as_ref().map(|k| k.bytes_after as f64),
                ),
                pairs,
            }
        })
        .collect()
}

/// Whether every value is within `share` of `reference` (e.g. 0.10: ±10%), and the largest
/// deviation.
#[must_use]
pub fn flat(reference: f64, values: &[f64], share: f64) -> (bool, f64) {
    let dev = values
        .iter()
        .map(|v| (v / reference - 1.0).abs())
        .fold(0.0, f64::max);
    (reference > 0.0 && dev <= share + 1e-12, dev)
}

/// The targets of issue 11 that `report` measures: the main table's when it has tools, the
/// scale table's when it has scale points (peak RSS and index size apply to both).
#[must_use]
pub fn targets(report: &Report) -> Vec<TargetResult> {
    let main = !report.tools.is_empty();
    let scale = !report.scale.is_empty();
    let mut out = Vec::new();
    let cow = report.cowherd();
    let name = cow.map_or("cowherd", |c| c.tool.as_str());
    let not_run = |target: &str, why: &str| TargetResult {
        target: target.to_owned(),
        met: None,
        detail: why.to_owned(),
    };
    let ratios = ratios(report);
    let hardlink = ratios.iter().find(|r| r.peer == "hardlink");

    if main {
        let t = format!(
            "first unify ≥ {HARDLINK_FIRST}x faster than util-linux hardlink (median of the pairwise ratios)"
        );
        out.push(match hardlink.and_then(|r| r.first_time) {
            Some(s) => TargetResult {
                met: Some(s.median >= HARDLINK_FIRST),
                detail: format!(
                    "hardlink ÷ {name}, 1st run: median {:.2} over {} pair(s) (range {:.2}–{:.2}); \
                     medians {} vs {}",
                    s.median,
                    s.n,
                    s.min,
                    s.max,
                    spread_secs(report.tool("hardlink").and_then(ToolResult::first)),
                    spread_secs(cow.and_then(ToolResult::first)),
                ),
                target: t,
            },
            None => not_run(&t, "needs cowherd and hardlink in the same run"),
        });

        let t = format!(
            "first unify within {READ_BOUND_FACTOR}x of reading every candidate byte once (cold)"
        );
        let bounds: Vec<f64> = [report.read_bound_before, report.read_bound_after]
            .iter()
            .flatten()
            .filter(|b| b.run.ok() && b.run.wall_secs > 0.0)
            .map(|b| b.run.wall_secs)
            .collect();
        out.push(match (cow.and_then(ToolResult::first), bounds.is_empty()) {
            (Some(c), false) => {
                let bound = bounds.iter().sum::<f64>() / bounds.len() as f64;
                let each: Vec<String> = bounds
                    .iter()
                    .map(|b| format!("{} ({:.2})", secs(*b), c.median / b))
                    .collect();
                TargetResult {
                    target: t,
                    met: Some(c.median <= READ_BOUND_FACTOR * bound),
                    detail: format!(
                        "{name} median {} ÷ read bound {} (mean of before and after the rounds: {}) \
                         = {:.2}",
                        secs(c.median),
                        secs(bound),
                        each.join(" and "),
                        c.median / bound
                    ),
                }
            }
            _ => not_run(&t, "needs cowherd and the read bound"),
        });

        let t = format!(
            "re-run (2nd run over unchanged guests) ≥ {HARDLINK_SECOND}x faster than hardlink's re-run (median of the pairwise ratios)"
        );
        out.push(match hardlink.and_then(|r| r.second_time) {
            Some(s) => TargetResult {
                met: Some(s.median >= HARDLINK_SECOND),
                detail: format!(
                    "hardlink ÷ {name}, 2nd run: median {:.2} over {} pair(s) (range {:.2}–{:.2}); \
                     medians {} vs {}",
                    s.median,
                    s.n,
                    s.min,
                    s.max,
                    spread_secs(report.tool("hardlink").and_then(ToolResult::second)),
                    spread_secs(cow.and_then(ToolResult::second)),
                ),
                target: t,
            },
            None => not_run(&t, "needs cowherd and hardlink in the same run"),
        });
    }

    // Peak RSS at 40 guests: the measurements at exactly 40 guests if any, else the largest.
    let t = format!("peak RSS ≤ {} at {RSS_GUESTS} guests", mb(RSS_LIMIT));
    let mut rss: Vec<(usize, u64)> = Vec::new();
    if let Some(peak) = cow.and_then(ToolResult::max_rss) {
        rss.push((report.set.guests, peak));
    }
    rss.extend(report.scale.iter().map(|p| (p.guests, p.peak_rss_bytes())));
    let at = rss
        .iter()
        .filter(|(g, _)| *g == RSS_GUESTS)
        .map(|x| x.1)
        .max();
    let pick = match at {
        Some(peak) => Some((RSS_GUESTS, peak, String::new())),
        None => rss.iter().max_by_key(|(_, r)| *r).map(|&(g, peak)| {
            (
                g,
                peak,
                format!(" (no measurement at {RSS_GUESTS} guests; target stated for {RSS_GUESTS})"),
            )
        }),
    };
    out.push(match pick {
        Some((g, peak, note)) => TargetResult {
            target: t,
            met: Some(peak <= RSS_LIMIT),
            detail: format!(
                "largest peak RSS of {name} at {g} guests: {}{note}",
                mb(peak)
            ),
        },
        None => not_run(&t, "needs a cowherd run"),
    });

    if scale {
        let t = format!(
            "peak RSS flat (±{:.0}%) from {RSS_GUESTS} to {FLEET_GUESTS} guests",
            RSS_FLAT * 100.0
        );
        let mut pts: Vec<&ScalePoint> = report.scale.iter().collect();
        pts.sort_by_key(|p| p.guests);
        out.push(match (pts.first(), pts.len()) {
            (Some(lo), n) if n >= 2 => {
                let values: Vec<f64> = pts.iter().map(|p| p.peak_rss_bytes() as f64).collect();
                let (ok, dev) = flat(lo.peak_rss_bytes() as f64, &values, RSS_FLAT);
                let listed: Vec<String> = pts
                    .iter()
                    .map(|p| format!("{}: {}", p.guests, mb(p.peak_rss_bytes())))
                    .collect();
                TargetResult {
                    target: t,
                    met: Some(ok),
                    detail: format!(
                        "{}; largest deviation from {} guests {:.1}%",
                        listed.join(", "),
                        lo.guests,
                        dev * 100.0
                    ),
                }
            }
            _ => not_run(&t, "needs --scale with at least two guest counts"),
        });
    }

    let t = format!("index ≤ {INDEX_PER_FILE:.0} bytes per file on disk");
    let mut idx: Vec<(String, f64)> = Vec::new();
    if let Some(s) = cow.and_then(ToolResult::index_per_file) {
        idx.push((format!("{} guests", report.set.guests), s.max));
    }
    for p in &report.scale {
        if let Some(v) = p.index_per_file() {
            idx.push((format!("{} guests (scale)", p.guests), v));
        }
    }
    out.push(match idx.iter().map(|x| x.1).max_by(f64::total_cmp) {
        Some(worst) => TargetResult {
            target: t,
            met: Some(worst <= INDEX_PER_FILE),
            detail: format!(
                "index.db + index.db-wal ÷ files indexed: {}",
                idx.iter()
                    .map(|(at, v)| format!("{v:.0} B at {at}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        },
        None => not_run(&t, "needs a cowherd run"),
    });

    if scale {
        let largest = report.scale.iter().max_by_key(|p| p.guests);
        let stated = |g: usize| {
            if g == FLEET_GUESTS {
                String::new()
            } else {
                format!(" (largest point {g} guests; target stated for {FLEET_GUESTS})")
            }
        };
        let t = format!(
            "re-run over {FLEET_GUESTS} unchanged guests faster than a cold find over them"
        );
        out.push(
            match largest.and_then(|p| Some((p, p.find_secs()?, wall(Some(p.second))?))) {
                Some((p, find, second)) => TargetResult {
                    target: t,
                    met: Some(second < find),
                    detail: format!(
                        "{} guests, {} files: re-run {} vs find {} = {:.2}{}",
                        p.guests,
                        thousands(p.files),
                        secs(second),
                        secs(find),
                        second / find,
                        stated(p.guests)
                    ),
                },
                None => not_run(&t, "needs a successful re-run and find at a scale point"),
            },
        );
        let t = format!(
            "`unify G` of one changed guest < {CHANGED_GUEST_SECS:.0} s at {FLEET_GUESTS} guests"
        );
        out.push(
            match largest.and_then(|p| Some((p, p.changed.as_ref().filter(|c| c.run.ok())?))) {
                Some((p, c)) => TargetResult {
                    target: t,
                    met: Some(c.run.wall_secs < CHANGED_GUEST_SECS),
                    detail: format!(
                        "{} guests: {} after {} files ({}) of {} were rewritten{}",
                        p.guests,
                        secs(c.run.wall_secs),
                        thousands(c.files),
                        bytes(c.bytes),
                        c.guest,
                        stated(p.guests)
                    ),
                },
                None => not_run(&t, "needs a successful `unify G` at a scale point"),
            },
        );
    }

    if main {
        let t = "bytes saved ≥ those of hardlink with the same metadata rules";
        let saved = |t: Option<&ToolResult>| {
            t.filter(|t| t.first().is_some() && t.second().is_some())
                .and_then(|t| report.saved(t))
        };
        out.push(match (saved(cow), saved(report.tool("hardlink"))) {
            (Some(cs), Some(hs)) => TargetResult {
                target: t.to_owned(),
                met: Some(cs >= hs),
                detail: format!(
                    "{name} saved {} ({} B), hardlink saved {} ({} B); difference {} B{}",
                    bytes(cs.max(0) as u64),
                    thousands(cs.max(0) as u64),
                    bytes(hs.max(0) as u64),
                    thousands(hs.max(0) as u64),
                    signed(cs - hs),
                    cow.and_then(|c| c.checks.as_ref())
                        .and_then(|k| k.store_dir_bytes)
                        .map_or(String::new(), |d| format!(
                            ", while the directories of cowherd's store take {} B",
                            thousands(d)
                        ))
                ),
            },
            _ => not_run(t, "needs cowherd and hardlink"),
        });
    }
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

/// `+12` or `−12` (a real minus sign).
fn percent(p: f64) -> String {
    let s = format!("{p:+.0}");
    s.replace('-', "−")
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

/// `12.30 s (11.90–13.10 s)`; one value alone; `–` for none.
fn spread_secs(s: Option<Spread>) -> String {
    match s {
        None => "–".to_owned(),
        Some(s) if s.n == 1 => secs(s.median),
        Some(s) => format!("{} ({}–{})", secs(s.median), secs(s.min), secs(s.max)),
    }
}

/// Like [`spread_secs`], in decimal megabytes.
fn spread_mb(s: Option<Spread>) -> String {
    match s {
        None => "–".to_owned(),
        Some(s) if s.n == 1 => mb(s.median as u64),
        Some(s) => format!(
            "{} ({}–{})",
            mb(s.median as u64),
            mb(s.min as u64),
            mb(s.max as u64)
        ),
    }
}

/// `1.79 (1.70–1.85)`.
fn spread_ratio(s: Option<Spread>) -> String {
    match s {
        None => "–".to_owned(),
        Some(s) if s.n == 1 => format!("{:.2}", s.median),
        Some(s) => format!("{:.2} ({:.2}–{:.2})", s.median, s.min, s.max),
    }
}

fn ratio_cell(r: Option<f64>) -> String {
    r.map_or("–".to_owned(), |r| format!("{r:.2}"))
}

fn run_cell(run: Option<Run>) -> String {
    match run {
        None => "–".into(),
        Some(r) if !r.ok() => format!("failed ({})", r.exit_code),
        Some(r) => secs(r.wall_secs),
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

/// `met`/`NOT MET` after a number, for the scale table's cells.
fn marked(value: String, met: Option<bool>) -> String {
    match met {
        Some(true) => format!("{value} — met"),
        Some(false) => format!("{value} — **NOT MET**"),
        None => value,
    }
}

/// The report as Markdown: the set, the tables, the targets.
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
        "Machine: {} CPUs, {} RAM, Linux {}, {}. Page cache dropped before every timed run: {}.",
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
    if !r.tools.is_empty() {
        main_tables(&mut s, r);
    }
    if !r.scale.is_empty() {
        scale_table(&mut s, r);
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

/// The read bound's line.
fn bound_line(label: &str, b: &ReadBound) -> String {
    format!(
        "{label} **{}** ({} files, {}{})",
        secs(b.run.wall_secs),
        thousands(b.files),
        bytes(b.bytes),
        if b.run.cold { ", cold" } else { ", warm" }
    )
}

/// The main table: times over the rounds, the checks, every run in order.
fn main_tables(s: &mut String, r: &Report) {
    let cow = r.cowherd();
    let cname = cow.map_or("cowherd", |c| c.tool.as_str());
    let _ = writeln!(*s);
    let _ = writeln!(
        *s,
        "{} interleaved round(s): each tool runs on its own fresh `cp -a` copy of the master set, \
         twice (1st run; 2nd run over the unchanged guests). In each round the peers run two at a \
         time around a {cname} run (peer, {cname}, peer; a peer left over alternates sides from \
         round to round) and each is compared with that adjacent {cname} run; the peer order \
         rotates by one each round.",
        r.rounds
    );
    let _ = writeln!(*s);
    for (i, o) in r.order.iter().enumerate() {
        let _ = writeln!(*s, "- round {}: {o}", i + 1);
    }
    match (r.read_bound_before, r.read_bound_after) {
        (Some(a), Some(b)) => {
            let _ = writeln!(*s);
            let _ = writeln!(
                *s,
                "Read bound (every regular file ≥ 1 byte read once, each inode once): {}; {} \
                 ({}% time: the disk's read speed changed over the run by that much).",
                bound_line("before round 1", &a),
                bound_line(&format!("after round {}", r.rounds), &b),
                percent((b.run.wall_secs / a.run.wall_secs - 1.0) * 100.0)
            );
        }
        (Some(a), None) | (None, Some(a)) => {
            let _ = writeln!(*s);
            let _ = writeln!(*s, "Read bound: {}.", bound_line("", &a));
        }
        (None, None) => {}
    }

    let _ = writeln!(*s);
    let _ = writeln!(
        *s,
        "| tool | copies | 1st run: median (min–max) | 2nd run: median (min–max) | peak RSS: median (min–max) | tool ÷ {cname}, 1st run | tool ÷ {cname}, 2nd run | index bytes/file |"
    );
    let _ = writeln!(*s, "|---|--:|--:|--:|--:|--:|--:|--:|");
    for t in &r.tools {
        let q = r.ratio(&t.tool);
        let _ = writeln!(
            *s,
            "| {} | {} | {} | {} | {} | {} | {} | {} |",
            tool_label(&t.tool),
            t.runs.len(),
            spread_secs(t.first()),
            spread_secs(t.second()),
            spread_mb(t.rss()),
            q.map_or("–".to_owned(), |q| spread_ratio(q.first_time)),
            q.map_or("–".to_owned(), |q| spread_ratio(q.second_time)),
            t.index_per_file()
                .map_or("–".to_owned(), |v| format!("{:.0}", v.median)),
        );
    }
    for (label, b) in [
        ("before round 1".to_owned(), r.read_bound_before),
        (format!("after round {}", r.rounds), r.read_bound_after),
    ] {
        if let Some(b) = b {
            let _ = writeln!(
                *s,
                "| read every candidate byte once, {label} | 1 | {} | | {} | {} | | |",
                secs(b.run.wall_secs),
                mb(b.run.peak_rss_bytes()),
                cow.and_then(ToolResult::first)
                    .filter(|_| b.run.wall_secs > 0.0)
                    .map_or("–".to_owned(), |c| format!(
                        "{:.2} ({cname}'s median is {:.2}x the bound)",
                        b.run.wall_secs / c.median,
                        c.median / b.run.wall_secs
                    )),
            );
        }
    }
    let _ = writeln!(*s);
    let _ = writeln!(
        *s,
        "¹ cowherd with every path eligible (`policy.toml`: `rules = []`, `dpkg_conffiles = \
         false`), like for like with hardlink; 1st run = empty index, 2nd = full index. ² cowherd \
         with its default policy (`/etc`, `/var`, `/home`, … and dpkg conffiles private). \
         \"copies\": fresh copies the tool ran on (one per round; {cname} one per pair of peers). \
         \"peak RSS\": the larger of a copy's two runs (GNU time `%M`). \"tool ÷ {cname}\": median \
         (and range) over the rounds of the peer's time divided by that of the {cname} run \
         adjacent to it (above 1: {cname} is faster). \"index bytes/file\": `index.db` plus \
         `index.db-wal` after the 2nd run, divided by the files cowherd indexed."
    );

    let _ = writeln!(*s);
    let checked: Vec<&ToolResult> = r.tools.iter().filter(|t| t.checks.is_some()).collect();
    if !checked.is_empty() {
        let _ = writeln!(
            *s,
            "What each tool did to the guests (checked on its first copy of round 1, after its 2nd run):"
        );
        let _ = writeln!(*s);
        let _ = writeln!(
            *s,
            "| tool | on disk after | saved | paths linked | wrong links | guests after | metadata changed | dir mtimes / sizes changed |"
        );
        let _ = writeln!(*s, "|---|--:|--:|--:|--:|---|--:|--:|");
        for t in checked {
            let Some(k) = &t.checks else { continue };
            let saved = r.saved(t).unwrap_or(0);
            let _ = writeln!(
                *s,
                "| {} | {} | {} | {} | {} | {} | {} | {} / {} |",
                tool_label(&t.tool),
                bytes(k.bytes_after),
                if saved < 0 {
                    format!("−{}", bytes(saved.unsigned_abs()))
                } else {
                    bytes(saved as u64)
                },
                thousands(k.sharing.linked_paths),
                if k.sharing.wrong_links > 0 {
                    format!("**{}**", thousands(k.sharing.wrong_links))
                } else {
                    "0".to_owned()
                },
                check_cell(&k.diff),
                thousands(k.diff.meta_changed),
                thousands(k.diff.dir_mtime_changed),
                thousands(k.diff.dir_size_changed),
            );
        }
        let _ = writeln!(*s);
        let _ = writeln!(
            *s,
            "\"on disk after\": `st_blocks` of every inode once, over the guests plus cowherd's \
             store (cowherd's index is not counted: {}). \"saved\": master on disk minus on disk \
             after. \"paths linked\": paths now on an inode shared with paths that were on \
             another inode in the master. \"wrong links\": paths sharing an inode with a path \
             whose owner, mode, mtime or xattrs differed in the master. \"guests after\": every \
             path, type, content (BLAKE3) and symlink target compared with the master; \
             \"metadata changed\": paths whose mode, owner, mtime or xattrs a guest now sees \
             differently.",
            cow.and_then(|c| c.runs.iter().find_map(|x| x.index_bytes))
                .map_or("–".to_owned(), |b| format!("{} after the runs", bytes(b))),
        );
        let _ = writeln!(*s);
    }

    // Every run, in order: a disk that changed speed shows here.
    let mut runs: Vec<(&ToolResult, &ToolRun)> = r
        .tools
        .iter()
        .flat_map(|t| t.runs.iter().map(move |x| (t, x)))
        .collect();
    runs.sort_by_key(|(_, x)| x.seq);
    let _ = writeln!(*s, "Every run, in the order run:");
    let _ = writeln!(*s);
    let _ = writeln!(
        *s,
        "| # | round | tool | 1st run | 2nd run | peak RSS | paired with | tool ÷ {cname}, 1st / 2nd run |"
    );
    let _ = writeln!(*s, "|--:|--:|---|--:|--:|--:|--:|--:|");
    if let Some(b) = r.read_bound_before {
        let _ = writeln!(
            *s,
            "| 0 | – | read bound | {} | | {} | | |",
            secs(b.run.wall_secs),
            mb(b.run.peak_rss_bytes())
        );
    }
    for (t, x) in &runs {
        let pair = match x.paired_with {
            Some(seq) => {
                let q = r
                    .ratio(&t.tool)
                    .and_then(|q| q.pairs.iter().find(|p| p.seq == x.seq));
                (
                    format!("#{seq}"),
                    format!(
                        "{} / {}",
                        ratio_cell(q.and_then(|q| q.first)),
                        ratio_cell(q.and_then(|q| q.second))
                    ),
                )
            }
            None => (String::new(), String::new()),
        };
        let _ = writeln!(
            *s,
            "| {} | {} | {} | {} | {} | {} | {} | {} |",
            x.seq,
            x.round,
            t.tool,
            run_cell(x.first),
            run_cell(x.second),
            x.peak_rss_bytes().map_or("–".to_owned(), mb),
            pair.0,
            pair.1
        );
    }
    if let Some(b) = r.read_bound_after {
        let _ = writeln!(
            *s,
            "| {} | – | read bound | {} | | {} | | |",
            runs.last().map_or(1, |(_, x)| x.seq + 1),
            secs(b.run.wall_secs),
            mb(b.run.peak_rss_bytes())
        );
    }
    let _ = writeln!(*s);
    let _ = writeln!(*s, "Commands:");
    let _ = writeln!(*s);
    for t in &r.tools {
        let _ = writeln!(*s, "- {}: `{}`", t.tool, t.command);
        if let Some(e) = &t.error {
            let _ = writeln!(*s, "  - error: {e}");
        }
        if let Some(k) = &t.checks
            && !k.diff.examples.is_empty()
        {
            let _ = writeln!(*s, "  - e.g. {}", k.diff.examples.join("; "));
        }
    }
}

/// The scale table, its targets marked per row.
fn scale_table(s: &mut String, r: &Report) {
    let _ = writeln!(*s);
    let _ = writeln!(
        *s,
        "cowherd alone at several guest counts (every path eligible; a fresh root each):"
    );
    if let Some(note) = &r.scale_note {
        let _ = writeln!(*s);
        let _ = writeln!(*s, "{note}");
    }
    let _ = writeln!(*s);
    let _ = writeln!(
        *s,
        "| guests (real + clones) | files | 1st run | 2nd run, unchanged | cold find (before / after) | 2nd run ÷ find | `unify G`, 1 guest changed | peak RSS | index | index bytes/file |"
    );
    let _ = writeln!(*s, "|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|");
    let mut pts: Vec<&ScalePoint> = r.scale.iter().collect();
    pts.sort_by_key(|p| p.guests);
    let base_rss = pts.first().map(|p| p.peak_rss_bytes() as f64);
    for p in &pts {
        let rss = p.peak_rss_bytes();
        let mut rss_cell = mb(rss);
        if let Some(b) = base_rss.filter(|_| pts.len() > 1)
            && p.guests != pts[0].guests
        {
            let dev = rss as f64 / b - 1.0;
            rss_cell = marked(
                format!("{rss_cell} ({}%)", percent(dev * 100.0)),
                Some(dev.abs() <= RSS_FLAT + 1e-12),
            );
        }
        if p.guests == RSS_GUESTS {
            rss_cell = marked(rss_cell, Some(rss <= RSS_LIMIT));
        }
        let find = format!("{} / {}", run_cell(p.find_before), run_cell(p.find_after));
        let vs_find = p.second_vs_find().map_or("–".to_owned(), |v| {
            marked(format!("{v:.2}"), Some(v < 1.0))
        });
        let changed = p.changed.as_ref().map_or("–".to_owned(), |c| {
            let cell = format!(
                "{} ({} files of {}{})",
                run_cell(Some(c.run)),
                thousands(c.files),
                c.guest,
                c.hashed_files
                    .map_or(String::new(), |h| format!(", {} read", thousands(h)))
            );
            marked(
                cell,
                c.run.ok().then_some(c.run.wall_secs < CHANGED_GUEST_SECS),
            )
        });
        let per_file = p.index_per_file().map_or("–".to_owned(), |v| {
            marked(format!("{v:.0}"), Some(v <= INDEX_PER_FILE))
        });
        let _ = writeln!(
            *s,
            "| {} ({} + {}) | {} | {} | {} | {find} | {vs_find} | {changed} | {rss_cell} | {} | {per_file} |",
            p.guests,
            p.real_guests,
            p.clones,
            thousands(p.files),
            run_cell(Some(p.first)),
            run_cell(Some(p.second)),
            p.index_bytes.map_or("–".to_owned(), bytes),
        );
    }
    let _ = writeln!(*s);
    let _ = writeln!(
        *s,
        "Every timed step starts with the page cache dropped. \"2nd run ÷ find\": the re-run \
         over the unchanged guests divided by the faster of the two cold `find \
         ROOT/guests/*/base -type f | wc -l` walks, one before and one after it (target: below 1, \
         stated for {FLEET_GUESTS} guests). \"`unify G`\": `cowherd unify G` of the last guest \
         after {UPGRADE} of its files below `usr/`, chosen by the seed, were rewritten as an \
         upgrade would (new bytes written beside each and renamed over it; size, owner, mode and \
         mtime kept, so a file that was a store link falls in its old version's size group and \
         cowherd reads it in full: \"read\"); target < {CHANGED_GUEST_SECS:.0} s at \
         {FLEET_GUESTS} guests. \"peak RSS\": the larger \
         of the 1st and 2nd runs; change from the smallest point (target ±{:.0}%) and ≤ {} at \
         {RSS_GUESTS} guests. \"index\": `index.db` plus `index.db-wal` after the 2nd run; per \
         file indexed (target ≤ {INDEX_PER_FILE:.0}).",
        RSS_FLAT * 100.0,
        mb(RSS_LIMIT),
        UPGRADE = super::scale::UPGRADE_FILES,
    );
    let detail: Vec<String> = pts
        .iter()
        .filter_map(|p| {
            let hashed = p.first_hashed_bytes?;
            Some(format!(
                "{} guests: made in {}, 1st run hashed {} and linked {} paths",
                p.guests,
                secs(p.build_secs),
                bytes(hashed),
                thousands(p.first_linked.unwrap_or(0))
            ))
        })
        .collect();
    if !detail.is_empty() {
        let _ = writeln!(*s);
        let _ = writeln!(*s, "{}.", detail.join("; "));
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
