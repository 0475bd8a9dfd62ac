//! The build table (`cowherd-bench build`): guests made from one distro template by cowherd
//! (`cowherd build`) beside the peers' ways (`mmdebstrap` per guest, `cp -a` and `cp -al` of
//! the cached tree), per guest and for N guests, with the targets of issue 10 item 3.

use std::fmt::Write as _;

use serde::Serialize;

use super::report::{Machine, Run, TargetResult, bytes, secs, thousands, verdict};

/// One guest from a cached template in under this many seconds.
pub const ONE_GUEST_SECS: f64 = 2.0;
/// One guest adds less than this share of the template's bytes.
pub const ONE_GUEST_SHARE: f64 = 0.05;
/// The guest count of the N-guest target.
pub const MANY_GUESTS: usize = 100;
/// `MANY_GUESTS` guests in under this many seconds.
pub const MANY_GUESTS_SECS: f64 = 60.0;

/// The way cowherd builds guests (the targets are judged on it).
pub const COWHERD: &str = "cowherd";
/// `cp -al` of the cached tree.
pub const CP_AL: &str = "cp-al";
/// `cp -a` of the cached tree.
pub const CP_A: &str = "cp-a";
/// `mmdebstrap` per guest.
pub const MMDEBSTRAP: &str = "mmdebstrap";

/// One timed step (one guest, or N guests in one run) and what it added on disk.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Sample {
    /// The command (GNU time: wall, CPU, peak RSS, exit code, whether the cache was dropped).
    pub run: Run,
    /// Seconds of the `sync` right after it (its writes reaching the disk).
    pub sync_secs: f64,
    /// Allocated bytes it added (`st_blocks` of every new inode once).
    pub bytes_added: u64,
    /// Inodes it added.
    pub inodes_added: u64,
    /// Of `bytes_added`, what cowherd's index files (`index.db`, its WAL) grew by (cowherd
    /// only).
    pub index_bytes_added: Option<u64>,
    /// Guests it made.
    pub guests: usize,
}

impl Sample {
    /// The step's time: the command plus the `sync` after it.
    #[must_use]
    pub fn secs(&self) -> f64 {
        self.run.wall_secs + self.sync_secs
    }

    /// Whether the command succeeded.
    #[must_use]
    pub fn ok(&self) -> bool {
        self.run.exit_code == 0
    }
}

/// One way of making guests and what it took.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Way {
    /// [`COWHERD`], [`CP_AL`], [`CP_A`] or [`MMDEBSTRAP`].
    pub way: String,
    /// The command of one guest, as shown.
    pub command: String,
    /// The command of N guests, as shown, if it ran them.
    pub many_command: Option<String>,
    /// One guest at a time, one sample per round.
    pub one: Vec<Sample>,
    /// N guests in one step, if run.
    pub many: Option<Sample>,
    /// What cowherd itself reported per guest (`build --json`: seconds, `copied_bytes`), for
    /// the one-guest steps.
    pub reported: Vec<(f64, u64)>,
    /// Why the way's results are incomplete, if they are.
    pub error: Option<String>,
    /// Why the way was not run at all, if it was not.
    pub skipped: Option<String>,
}

impl Way {
    /// A way with nothing measured yet.
    #[must_use]
    pub fn new(way: &str, command: String) -> Way {
        Way {
            way: way.to_owned(),
            command,
            many_command: None,
            one: Vec::new(),
            many: None,
            reported: Vec::new(),
            error: None,
            skipped: None,
        }
    }

    /// The successful one-guest samples.
    fn ok_one(&self) -> impl Iterator<Item = &Sample> {
        self.one.iter().filter(|s| s.ok())
    }

    /// The median time of one guest (command plus sync).
    #[must_use]
    pub fn one_secs(&self) -> Option<f64> {
        median(self.ok_one().map(Sample::secs).collect())
    }

    /// The median bytes one guest added.
    #[must_use]
    pub fn one_bytes(&self) -> Option<u64> {
        median(self.ok_one().map(|s| s.bytes_added as f64).collect()).map(|b| b.round() as u64)
    }

    /// The median growth of cowherd's index for one guest, if measured.
    #[must_use]
    pub fn one_index_bytes(&self) -> Option<u64> {
        let v: Vec<f64> = self
            .ok_one()
            .filter_map(|s| s.index_bytes_added)
            .map(|b| b as f64)
            .collect();
        median(v).map(|b| b.round() as u64)
    }

    /// The N-guest step, if it succeeded.
    #[must_use]
    pub fn many_ok(&self) -> Option<&Sample> {
        self.many.as_ref().filter(|s| s.ok())
    }
}

/// The template the guests are made from.
#[derive(Debug, Clone, PartialEq, Serialize, Default)]
pub struct TemplateInfo {
    /// Its name.
    pub name: String,
    /// The version built.
    pub version: u32,
    /// How cowherd made it (`mmdebstrap bookworm minbase`).
    pub made_by: String,
    /// The suite mmdebstrap was given for the peers.
    pub suite: String,
    /// The variant mmdebstrap was given for the peers.
    pub variant: String,
    /// Packages on top of the variant (role templates), given to mmdebstrap as `--include`.
    pub packages: Vec<String>,
    /// Regular files (cowherd's record).
    pub files: u64,
    /// Allocated bytes of its files, each inode once (cowherd's record, `record.bytes`).
    pub record_bytes: u64,
    /// Allocated bytes of the whole tree (directories, symlinks and files), each inode once:
    /// what `cp -a` copies, and the base of "% of template".
    pub tree_bytes: u64,
    /// Inodes of the tree.
    pub tree_inodes: u64,
    /// `cowherd template build` in a fresh root.
    pub build: Option<Sample>,
}

/// Everything one `cowherd-bench build` measured.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct BuildReport {
    /// The template.
    pub template: TemplateInfo,
    /// N of the N-guest step.
    pub count: usize,
    /// Guests made one at a time by `cp -a` and `mmdebstrap` (and the rounds of all ways).
    pub peer_count: usize,
    /// Interleaved rounds of one guest per way.
    pub rounds: usize,
    /// The machine.
    pub machine: Machine,
    /// Whether every timed step dropped the page cache first.
    pub caches_dropped: bool,
    /// One row per way, cowherd first.
    pub ways: Vec<Way>,
    /// The targets.
    pub targets: Vec<TargetResult>,
    /// Seconds the whole benchmark took.
    pub total_secs: f64,
}

impl BuildReport {
    /// The row of `way`.
    #[must_use]
    pub fn way(&self, way: &str) -> Option<&Way> {
        self.ways.iter().find(|w| w.way == way)
    }

    /// Fills [`BuildReport::targets`] from the measurements.
    pub fn evaluate(&mut self) {
        self.targets = targets(self);
    }

    /// `bytes` as a share of the template's bytes on disk.
    #[must_use]
    pub fn share(&self, bytes: u64) -> Option<f64> {
        (self.template.tree_bytes > 0).then(|| bytes as f64 / self.template.tree_bytes as f64)
    }
}

/// The median of `v` (the mean of the middle two for an even count).
#[must_use]
pub fn median(mut v: Vec<f64>) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    Some(if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    })
}

/// The bootstrapper, suite and variant of a template's `base` line as `cowherd template show
/// --json` prints it (`mmdebstrap bookworm minbase`), or the template it is built `from`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TemplateBase {
    /// `mmdebstrap SUITE VARIANT` or `debootstrap SUITE VARIANT`.
    Bootstrap {
        /// `mmdebstrap` or `debootstrap`.
        program: String,
        /// The suite.
        suite: String,
        /// The variant.
        variant: String,
    },
    /// `from TEMPLATE`.
    From(String),
    /// Anything else (`tarball …`, `guest …`): no distro bootstrap to compare with.
    Other(String),
}

/// Parses a `base` line of `cowherd template show --json`.
#[must_use]
pub fn parse_base(line: &str) -> TemplateBase {
    let words: Vec<&str> = line.split_whitespace().collect();
    match words.as_slice() {
        [program @ ("mmdebstrap" | "debootstrap"), suite, variant] => TemplateBase::Bootstrap {
            program: (*program).to_owned(),
            suite: (*suite).to_owned(),
            variant: (*variant).to_owned(),
        },
        ["from", template] => TemplateBase::From((*template).to_owned()),
        _ => TemplateBase::Other(line.to_owned()),
    }
}

/// Evaluates the targets of issue 10 item 3 on cowherd's row.
#[must_use]
pub fn targets(r: &BuildReport) -> Vec<TargetResult> {
    let cow = r.way(COWHERD);
    let not_run = |target: &str, why: &str| TargetResult {
        target: target.to_owned(),
        met: None,
        detail: why.to_owned(),
    };
    let mut out = Vec::new();

    let t = "one guest from a cached template in under 2 s";
    out.push(match cow.and_then(Way::one_secs) {
        Some(s) => {
            let samples: Vec<String> = cow
                .into_iter()
                .flat_map(Way::ok_one)
                .map(|x| secs(x.secs()))
                .collect();
            TargetResult {
                target: t.to_owned(),
                met: Some(s < ONE_GUEST_SECS),
                detail: format!(
                    "median {} (with its sync) over {} round(s): {}",
                    secs(s),
                    samples.len(),
                    samples.join(", ")
                ),
            }
        }
        None => not_run(t, "needs a successful `cowherd build` of one guest"),
    });

    let t = "one guest under 5% of the template's bytes";
    out.push(match (cow.and_then(Way::one_bytes), r.share(1)) {
        (Some(b), Some(_)) => {
            let share = r.share(b).unwrap_or(0.0);
            let mut detail = format!(
                "median {} added = {:.2}% of the template's {} on disk",
                bytes(b),
                share * 100.0,
                bytes(r.template.tree_bytes)
            );
            if r.template.record_bytes > 0 {
                let _ = write!(
                    detail,
                    " ({:.2}% of the {} of its files before it was unified)",
                    b as f64 / r.template.record_bytes as f64 * 100.0,
                    bytes(r.template.record_bytes)
                );
            }
            if let Some(i) = cow.and_then(Way::one_index_bytes) {
                let rest = b.saturating_sub(i);
                let _ = write!(
                    detail,
                    "; of it cowherd's index {}, the guest's directories and private copies {} \
                     = {:.2}%",
                    bytes(i),
                    bytes(rest),
                    r.share(rest).unwrap_or(0.0) * 100.0
                );
            }
            if let Some((t, c)) = cow.and_then(|c| c.reported.first()) {
                let _ = write!(
                    detail,
                    "; cowherd itself reports {} of copies for the first guest (built in {})",
                    bytes(*c),
                    secs(*t)
                );
            }
            if let Some(m) = cow.and_then(Way::many_ok).filter(|m| m.guests > 0) {
                let per = m.bytes_added / m.guests as u64;
                let _ = write!(
                    detail,
                    "; in the {}-guest run {} per guest = {:.2}%",
                    m.guests,
                    bytes(per),
                    r.share(per).unwrap_or(0.0) * 100.0
                );
            }
            TargetResult {
                target: t.to_owned(),
                met: Some(share < ONE_GUEST_SHARE),
                detail,
            }
        }
        _ => not_run(t, "needs a successful `cowherd build` of one guest"),
    });

    let t = "100 guests from one template in under a minute";
    out.push(match cow.and_then(Way::many_ok) {
        Some(m) if m.guests == MANY_GUESTS => TargetResult {
            target: t.to_owned(),
            met: Some(m.secs() < MANY_GUESTS_SECS),
            detail: format!(
                "{} for {} guests ({} of it the sync after), {} per guest",
                secs(m.secs()),
                m.guests,
                secs(m.sync_secs),
                secs(m.secs() / m.guests as f64)
            ),
        },
        Some(m) => not_run(
            t,
            &format!(
                "ran {} guests ({}), not {MANY_GUESTS}: run with --count {MANY_GUESTS}",
                m.guests,
                secs(m.secs())
            ),
        ),
        None => not_run(t, "needs a successful `cowherd build --count`"),
    });
    out
}

/// `12.3 s`, or `12.3 s (3.2 min)` from two minutes on.
fn duration(s: f64) -> String {
    if s >= 120.0 {
        format!("{} ({:.1} min)", secs(s), s / 60.0)
    } else {
        secs(s)
    }
}

/// A cell's mark for a target: ` — met` or ` — **NOT MET**`.
fn mark(met: Option<bool>) -> String {
    match met {
        Some(_) => format!(" — {}", verdict(met)),
        None => String::new(),
    }
}

/// The label of a way's row, with its footnote.
fn label(way: &str) -> &str {
    match way {
        COWHERD => "cowherd build ¹",
        CP_AL => "cp -al ²",
        CP_A => "cp -a ³",
        MMDEBSTRAP => "mmdebstrap ⁴",
        other => other,
    }
}

/// The report as Markdown: what was built, the table, its footnotes, the targets.
#[must_use]
pub fn markdown(r: &BuildReport) -> String {
    let mut s = String::new();
    let t = &r.template;
    let n = r.count;
    let _ = writeln!(
        s,
        "### cowherd build table: guests from template {} ({})",
        t.name, t.made_by
    );
    let _ = writeln!(s);
    let _ = writeln!(
        s,
        "Template `{}@{}`: {} files, {} on disk with its directories (each inode once; the base \
         of \"% of template\"; {} in its files before it was unified, cowherd's record){}.",
        t.name,
        t.version,
        thousands(t.files),
        bytes(t.tree_bytes),
        bytes(t.record_bytes),
        t.build.map_or(String::new(), |b| format!(
            "; `cowherd template build` took {} (bootstrap, clean, unify into the store)",
            duration(b.secs())
        ))
    );
    let m = &r.machine;
    let _ = writeln!(
        s,
        "Machine: {} CPUs, {} RAM, Linux {}, {}. {} Every time includes the `sync` right after \
         the step (until its writes are on disk). \"1 guest\": the median of {} interleaved \
         round(s) (cowherd, cp -a, cp -al, mmdebstrap, then again); \"bytes added\": \
         `st_blocks` of every new inode once (cowherd: its whole root before and after, index \
         included; cp -al: the tree and the copies together, minus the tree). Whole run: {}.",
        m.cpus,
        bytes(m.memory_bytes),
        m.kernel,
        m.filesystem,
        if r.caches_dropped {
            "**Cold page cache**: `sync; echo 3 > /proc/sys/vm/drop_caches` before every timed \
             step."
        } else {
            "**Warm page cache** (the page cache could not be dropped)."
        },
        r.rounds,
        duration(r.total_secs)
    );
    let _ = writeln!(s);
    let _ = writeln!(
        s,
        "| way | 1 guest: time | 1 guest: bytes added | % of template | {n} guests: time | {n} \
         guests: bytes added |"
    );
    let _ = writeln!(s, "|---|--:|--:|--:|--:|--:|");
    let target = |name: &str| {
        r.targets
            .iter()
            .find(|x| x.target.starts_with(name))
            .and_then(|x| x.met)
    };
    for w in &r.ways {
        let is_cow = w.way == COWHERD;
        let one_secs = w.one_secs();
        let one_bytes = w.one_bytes();
        let failed = |what: &str| {
            if w.skipped.is_some() {
                "not run".to_owned()
            } else if w.error.is_some() || w.one.iter().any(|x| !x.ok()) {
                format!("failed{what}")
            } else {
                "–".to_owned()
            }
        };
        let time_cell = match one_secs {
            Some(v) if is_cow => format!("**{}**{}", secs(v), mark(target("one guest from"))),
            Some(v) => secs(v),
            None => failed(""),
        };
        let bytes_cell = match (one_bytes, w.one_index_bytes()) {
            (Some(b), Some(i)) => format!("{} (index {})", bytes(b), bytes(i)),
            (Some(b), None) => bytes(b),
            (None, _) => failed(""),
        };
        let share_cell = match one_bytes.and_then(|b| r.share(b)) {
            Some(p) if is_cow => {
                format!("**{:.2}%**{}", p * 100.0, mark(target("one guest under")))
            }
            Some(p) => format!("{:.2}%", p * 100.0),
            None => "–".to_owned(),
        };
        let (many_time, many_bytes) = match (&w.many, w.many_ok()) {
            (_, Some(x)) => (
                format!(
                    "{}{} ({} / guest){}",
                    if is_cow { "**" } else { "" },
                    duration(x.secs()),
                    secs(x.secs() / x.guests.max(1) as f64),
                    if is_cow {
                        format!("**{}", mark(target("100 guests")))
                    } else {
                        String::new()
                    }
                ),
                format!(
                    "{} ({} / guest)",
                    bytes(x.bytes_added),
                    bytes(x.bytes_added / x.guests.max(1) as u64)
                ),
            ),
            (Some(x), None) => (format!("failed ({})", x.run.exit_code), "–".to_owned()),
            (None, None) => match (one_secs, one_bytes) {
                (Some(t1), Some(b1)) => (
                    format!("*not run; ≈ {} est.*", duration(t1 * n as f64)),
                    format!("*≈ {} est.*", bytes(b1 * n as u64)),
                ),
                _ => ("–".to_owned(), "–".to_owned()),
            },
        };
        let _ = writeln!(
            s,
            "| {} | {time_cell} | {bytes_cell} | {share_cell} | {many_time} | {many_bytes} |",
            label(&w.way)
        );
    }
    let _ = writeln!(s);
    let _ = writeln!(
        s,
        "¹ `cowherd build`: shareable files are new links to the template's store objects, \
         private files (`/etc`, `/var`, … and dpkg conffiles) real copies, then the guest's own \
         hostname, machine-id, ssh host keys and random seed; the new guests are unified in the \
         same run. ² `cp -al`: hard links to everything, **including `/etc` and `/var`: no \
         private files** (a write in place to any file changes it in every guest and in the \
         template), and no identity of its own. ³ `cp -a`: a full private copy, no identity of \
         its own. ⁴ `mmdebstrap` per guest, from the network (the default mirror), {} guest(s) \
         only. *est.*: not run {} times (to keep this disk's I/O modest): {} × the 1-guest \
         median.",
        r.peer_count, n, n
    );
    let _ = writeln!(s);
    let _ = writeln!(s, "Commands:");
    let _ = writeln!(s);
    for w in &r.ways {
        let _ = writeln!(s, "- {}: `{}`", w.way, w.command);
        if let Some(c) = &w.many_command {
            let _ = writeln!(s, "  - {n} guests: `{c}`");
        }
        if !w.reported.is_empty() {
            let per: Vec<String> = w
                .reported
                .iter()
                .map(|(t, b)| format!("{} / {}", secs(*t), bytes(*b)))
                .collect();
            let _ = writeln!(
                s,
                "  - as cowherd reported each guest (its own build time / bytes of its copies, \
                 before the unify and sync): {}",
                per.join(", ")
            );
        }
        if let Some(why) = &w.skipped {
            let _ = writeln!(s, "  - not run: {why}");
        }
        if let Some(e) = &w.error {
            let _ = writeln!(s, "  - error: {e}");
        }
    }
    if !r.targets.is_empty() {
        let _ = writeln!(s);
        let _ = writeln!(s, "Targets (issue 10, item 3):");
        let _ = writeln!(s);
        for x in &r.targets {
            let _ = writeln!(s, "- {} {}: {}", verdict(x.met), x.target, x.detail);
        }
    }
    s
}
