//! `cowherd-bench`: runs cowherd and its peers (hardlink, rdfind, jdupes, fclones) on fresh
//! copies of one generated guest set, in interleaved rounds, and writes a Markdown and JSON
//! table of time (median and range over the rounds, and the median of each peer's pairwise
//! ratio to the cowherd run next to it), peak RSS, index size, bytes on disk, paths linked,
//! wrong links and whether the guests still look the same, with the read bound measured before
//! the first round and after the last.
//!
//! ```sh
//! bench-data/run --guests 10 --files-per-guest 10000 --rounds 3 --markdown /tmp/bench.md
//! bench-data/run --guests 40 --scale 40,100,250,500   # cowherd alone; clones beyond 40 guests
//! bench-data/run build --count 100          # guests from a template: cowherd build vs mmdebstrap, cp -a, cp -al
//! ```

use std::collections::BTreeMap;
use std::ffi::{OsStr, OsString};
use std::fs;
use std::io::Read as _;
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::time::Instant;

use anyhow::{Context as _, Result, bail};
use clap::parser::ValueSource;
use clap::{CommandFactory as _, FromArgMatches as _, Parser, Subcommand, ValueEnum};
use cowherd_benchdata::harness::build::{
    self, BuildReport, Sample, TemplateBase, TemplateInfo, Way,
};
use cowherd_benchdata::harness::du::{DiskCounter, Usage, disk_usage};
use cowherd_benchdata::harness::manifest::{self, Manifest};
use cowherd_benchdata::harness::report::{
    self, ChangedGuest, Checks, Machine, ReadBound, Report, Run, ScalePoint, SetInfo, ToolResult,
    ToolRun,
};
use cowherd_benchdata::harness::{scale, schedule};
use cowherd_benchdata::{RealSpec, Role, SynthSpec, Template, generate_real, generate_synthetic};
use rayon::prelude::*;

/// The default seed: that of `SynthSpec::bench`.
const DEFAULT_SEED: u64 = 0xBE7C_4DA7_A5EE_D001;

/// Every path eligible: like-for-like with hardlink.
const ALL_ELIGIBLE_POLICY: &str = "# cowherd-bench: every path eligible (like hardlink)\n\
rules = []\n\
dpkg_conffiles = false\n";

#[derive(Parser)]
#[command(
    name = "cowherd-bench",
    about = "Benchmark cowherd against hardlink, rdfind, jdupes and fclones on fresh copies of \
             one generated guest set, in interleaved rounds",
    long_about = "Benchmark cowherd against hardlink, rdfind, jdupes and fclones on fresh copies of \
one generated guest set.\n\n\
The main table runs the tools in interleaved rounds (--rounds): in each round every tool runs \
twice (1st run, then a 2nd over the unchanged guests) on its own fresh `cp -a` copy of the \
master set, with the page cache dropped before every run. The peers run two at a time around a \
cowherd run (peer, cowherd, peer; a peer left over alternates sides from round to round) and \
the peer order rotates by one each round, so no tool systematically runs after the heavy I/O \
of another. Each tool gets its median (and range) of 1st run, 2nd run and peak RSS; each peer \
the median of its pairwise ratios to the cowherd run adjacent to it. The read bound (every \
candidate byte read once) is timed before the first round and after the last. The checks \
(guests identical after, wrong links, directory mtimes) are made on each tool's first copy of \
round 1.\n\n\
--scale N,M,… runs cowherd alone at each guest count in a fresh root: the first --guests \
guests are real copies of the master set, further guests hardlink clones of them (`cp -al`) \
with private, changed copies of their identity files and a few logs, configs and user files. \
Each point times, cold: the 1st run, a `find ROOT/guests/*/base -type f` walk, the 2nd run \
over the unchanged guests, the walk again, and `cowherd unify G` after ~200 files of one guest were \
rewritten; and reports peak RSS and the index's size per file."
)]
struct Cli {
    #[command(subcommand)]
    cmd: Option<Sub>,
    #[command(flatten)]
    bench: Args,
    /// The cowherd binary [default: next to this one, else on PATH].
    #[arg(long, global = true)]
    cowherd: Option<PathBuf>,
}

#[derive(Subcommand)]
enum Sub {
    /// Read every regular file of at least one byte once (each inode once), in parallel;
    /// print files and bytes. The lower bound the harness times.
    #[command(hide = true)]
    ReadAll {
        /// Directories to read.
        dirs: Vec<PathBuf>,
    },
    /// The build table: build a distro template in a fresh cowherd root, then time guests made
    /// from it by `cowherd build` (one, then N in one run) beside the peers' ways on the same
    /// cached tree (`mmdebstrap` per guest, `cp -a`, `cp -al`), with the bytes each adds and
    /// the targets of issue 10 marked. Needs root and mmdebstrap (and the network).
    Build(BuildArgs),
}

#[derive(clap::Args)]
struct BuildArgs {
    /// The template to build and make guests from.
    #[arg(long, default_value = "debian-bookworm-minbase")]
    template: String,
    /// N: guests of the N-guest step (`cowherd build --count N`, and `cp -al` N times).
    #[arg(long, default_value_t = 100)]
    count: usize,
    /// Guests made one at a time with `mmdebstrap` and `cp -a` (slow: each is a full tree),
    /// interleaved with as many one-guest `cowherd build` and `cp -al` (at least one round).
    #[arg(long, default_value_t = 3)]
    peer_count: usize,
    /// Leave out `mmdebstrap` per guest (no network needed after the template build).
    #[arg(long)]
    no_mmdebstrap: bool,
    /// A fresh work directory on the filesystem under test (must not exist, be empty, or be
    /// a previous run's) [default: bench-data/out/build].
    #[arg(long)]
    work: Option<PathBuf>,
    /// Write the report as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Write the table as Markdown to this file (it is also printed).
    #[arg(long)]
    markdown: Option<PathBuf>,
    /// Keep the work directory (the root, its guests and the peers' copies).
    #[arg(long)]
    keep: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Source {
    /// The offline synthetic generator.
    Synthetic,
    /// mmdebstrap-built Debian templates, diverged per guest.
    Real,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Tool {
    /// cowherd with every path eligible (rules = [], dpkg_conffiles = false).
    Cowherd,
    /// cowherd with its default policy.
    CowherdDefault,
    /// util-linux hardlink -X (equal mode, owner, mtime and xattrs).
    Hardlink,
    /// rdfind -makehardlinks true.
    Rdfind,
    /// jdupes -r -L.
    Jdupes,
    /// fclones group --hidden --no-ignore | fclones link.
    Fclones,
}

impl Tool {
    fn name(self) -> &'static str {
        match self {
            Tool::Cowherd => "cowherd",
            Tool::CowherdDefault => "cowherd-default",
            Tool::Hardlink => "hardlink",
            Tool::Rdfind => "rdfind",
            Tool::Jdupes => "jdupes",
            Tool::Fclones => "fclones",
        }
    }

    /// The executable it needs.
    fn program(self) -> &'static str {
        match self {
            Tool::Cowherd | Tool::CowherdDefault => "cowherd",
            other => other.name(),
        }
    }
}

#[derive(clap::Args)]
struct Args {
    /// Where the guest set comes from.
    #[arg(long, value_enum, default_value_t = Source::Synthetic)]
    source: Source,
    /// Number of guests of the master set (with --scale: the real copies; larger counts are
    /// made of clones of them).
    #[arg(long, default_value_t = 10)]
    guests: usize,
    /// Base files per synthetic guest [default: 10000].
    #[arg(long)]
    files_per_guest: Option<usize>,
    /// Seed of the generator (decimal or 0x hex).
    #[arg(long, value_parser = parse_seed, default_value_t = DEFAULT_SEED)]
    seed: u64,
    /// Output directory: master set, copies, template cache.
    #[arg(long, default_value = "/var/tmp/cowherd-bench")]
    out: PathBuf,
    /// Tools to run. cowherd (else cowherd-default) is the reference every other tool is
    /// paired with; the others run in this order in round 1, rotated by one place each round.
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "cowherd,cowherd-default,hardlink,rdfind,jdupes,fclones"
    )]
    tools: Vec<Tool>,
    /// Write the report as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Write the report as Markdown to this file (it is also printed).
    #[arg(long)]
    markdown: Option<PathBuf>,
    /// Interleaved rounds of the main table: each gives every tool a fresh copy and runs it
    /// twice [default: 3 with --source real, 1 with synthetic].
    #[arg(long)]
    rounds: Option<usize>,
    /// Keep the master set (the next run with the same set and --out reuses it) and the runs'
    /// logs (OUT/work/logs).
    #[arg(long)]
    keep: bool,
    /// Also keep the tools' copies of the last round (with --scale: the last point's root);
    /// implies --keep. A real 40-guest set takes ~2.4 GiB a copy after a tool ran.
    #[arg(long)]
    keep_copies: bool,
    /// Run cowherd only, at these guest counts (e.g. 40,100,250,500), each in a fresh root:
    /// real copies up to --guests, hardlink clones with per-guest divergence beyond. Reports
    /// 1st run, 2nd run, cold find, `unify G` of one changed guest, peak RSS and index size.
    #[arg(long, value_delimiter = ',')]
    scale: Vec<usize>,
    /// Debian suites of the real templates.
    #[arg(long, value_delimiter = ',', default_value = "bookworm,trixie")]
    suites: Vec<String>,
    /// Roles of the real templates (minbase, web, db, dev).
    #[arg(long, value_delimiter = ',', default_value = "minbase,web,db,dev")]
    roles: Vec<Role>,
    /// Skip the read-every-candidate-byte bound (timed before the first round and after the
    /// last).
    #[arg(long)]
    no_read_bound: bool,
}

fn parse_seed(s: &str) -> Result<u64, String> {
    let r = match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        Some(hex) => u64::from_str_radix(&hex.replace('_', ""), 16),
        None => s.replace('_', "").parse(),
    };
    r.map_err(|e| format!("bad seed {s:?}: {e}"))
}

fn main() -> ExitCode {
    let matches = Cli::command().get_matches();
    let cli = Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    if let Some((sub, _)) = matches.subcommand() {
        // The benchmark's own options do not apply to a subcommand (--cowherd does).
        let command = Cli::command();
        let options: Vec<&str> = command
            .get_arguments()
            .map(|a| a.get_id().as_str())
            .collect();
        let stray: Vec<String> = matches
            .ids()
            .filter(|id| id.as_str() != "cowherd" && options.contains(&id.as_str()))
            .filter(|id| matches.value_source(id.as_str()) == Some(ValueSource::CommandLine))
            .map(|id| format!("--{}", id.as_str().replace('_', "-")))
            .collect();
        if !stray.is_empty() {
            Cli::command()
                .error(
                    clap::error::ErrorKind::ArgumentConflict,
                    format!(
                        "{} cannot be used with the subcommand '{sub}' (give its options after it)",
                        stray.join(", ")
                    ),
                )
                .exit();
        }
    }
    let result = match cli.cmd {
        Some(Sub::ReadAll { dirs }) => read_all(&dirs),
        Some(Sub::Build(args)) => build_table(&args, cli.cowherd.as_deref()),
        None => bench(&cli.bench, cli.cowherd.as_deref()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn say(msg: impl AsRef<str>) {
    static START: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    let t = START.get_or_init(Instant::now).elapsed().as_secs_f64();
    eprintln!("cowherd-bench [{t:7.1}s] {}", msg.as_ref());
}

// ---------------------------------------------------------------------------------------------
// Tools

/// Absolute paths of the programs the run needs.
struct Programs {
    time: PathBuf,
    tools: BTreeMap<&'static str, PathBuf>,
}

/// `name` on PATH (or in ~/.cargo/bin, where `cargo install` puts fclones).
fn find_program(name: &str) -> Option<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect())
        .unwrap_or_default();
    if let Some(home) = std::env::var_os("HOME") {
        dirs.push(Path::new(&home).join(".cargo/bin"));
    }
    dirs.push(PathBuf::from("/usr/local/bin"));
    dirs.into_iter()
        .map(|d| d.join(name))
        .find(|p| fs::metadata(p).is_ok_and(|m| m.is_file() && m.mode() & 0o111 != 0))
}

fn missing(name: &str) -> anyhow::Error {
    anyhow::anyhow!("missing tool `{name}`: install the benchmark tools with bench-data/setup")
}

/// The cowherd binary: `given`, else next to this one, else on PATH.
fn find_cowherd(given: Option<&Path>) -> Result<PathBuf> {
    let path = match given {
        Some(p) if p.is_file() => Some(p.to_path_buf()),
        Some(p) => bail!(
            "missing tool `cowherd` at {} (build it: cargo build --release -p cowherd)",
            p.display()
        ),
        None => std::env::current_exe()
            .ok()
            .and_then(|e| e.parent().map(|d| d.join("cowherd")))
            .filter(|p| p.is_file())
            .or_else(|| find_program("cowherd")),
    };
    let path = path.ok_or_else(|| {
        anyhow::anyhow!(
            "missing tool `cowherd`: build it with `cargo build --release -p cowherd` \
             (bench-data/run does) or pass --cowherd PATH"
        )
    })?;
    fs::canonicalize(&path).with_context(|| format!("resolving {}", path.display()))
}

fn check_programs(args: &Args, cowherd: Option<&Path>, tools: &[Tool]) -> Result<Programs> {
    let time = PathBuf::from("/usr/bin/time");
    if !time.is_file() {
        return Err(missing("/usr/bin/time (GNU time)"));
    }
    for needed in ["cp", "bash", "findmnt"] {
        find_program(needed).ok_or_else(|| missing(needed))?;
    }
    if !args.scale.is_empty() {
        for needed in ["find", "wc"] {
            find_program(needed).ok_or_else(|| missing(needed))?;
        }
    }
    if args.source == Source::Real {
        for needed in ["mmdebstrap", "tar"] {
            find_program(needed).ok_or_else(|| missing(needed))?;
        }
    }
    let mut out = BTreeMap::new();
    for tool in tools {
        let prog = tool.program();
        if out.contains_key(prog) {
            continue;
        }
        let path = if prog == "cowherd" {
            find_cowherd(cowherd)?
        } else {
            let path = find_program(prog).ok_or_else(|| missing(prog))?;
            fs::canonicalize(&path).with_context(|| format!("resolving {}", path.display()))?
        };
        out.insert(prog, path);
    }
    Ok(Programs { time, tools: out })
}

/// `sync; echo 3 > /proc/sys/vm/drop_caches`; whether it worked.
fn drop_caches() -> bool {
    nix::unistd::sync();
    fs::write("/proc/sys/vm/drop_caches", "3").is_ok()
}

/// Runs `argv` under GNU time after dropping the page cache; stdout goes to `out`, stderr
/// to `err`.
fn timed(
    programs: &Programs,
    argv: &[OsString],
    cwd: &Path,
    out: &Path,
    err: &Path,
) -> Result<Run> {
    let cold = drop_caches();
    let tf = err.with_extension("time");
    let start = Instant::now();
    let status = Command::new(&programs.time)
        .arg("-f")
        .arg("%e %M %U %S")
        .arg("-o")
        .arg(&tf)
        .args(argv)
        .current_dir(cwd)
        .stdin(Stdio::null())
        .stdout(fs::File::create(out)?)
        .stderr(fs::File::create(err)?)
        .status()
        .with_context(|| format!("running {}", programs.time.display()))?;
    let wall = start.elapsed().as_secs_f64();
    let text = fs::read_to_string(&tf).with_context(|| format!("reading {}", tf.display()))?;
    let line = text.lines().last().unwrap_or_default();
    let f: Vec<&str> = line.split_whitespace().collect();
    if f.len() != 4 {
        bail!("unexpected GNU time output {text:?}");
    }
    Ok(Run {
        wall_secs: wall,
        peak_rss_kib: f[1].parse()?,
        user_secs: f[2].parse()?,
        sys_secs: f[3].parse()?,
        exit_code: status.code().unwrap_or(-1),
        cold,
    })
}

fn run_checked(cmd: &mut Command) -> Result<()> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// `cp -a src dst` (hard links inside the copy, owners, modes, times, xattrs kept).
fn copy_tree(src: &Path, dst: &Path) -> Result<()> {
    run_checked(Command::new("cp").arg("-a").arg(src).arg(dst))
}

/// Removes `path` if it exists.
fn remove(path: &Path) -> Result<()> {
    match fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => {
            fs::remove_dir_all(path).with_context(|| format!("removing {}", path.display()))
        }
        Ok(_) => fs::remove_file(path).with_context(|| format!("removing {}", path.display())),
        Err(_) => Ok(()),
    }
}

// ---------------------------------------------------------------------------------------------
// The guest set

/// The master guest set: generated once per (source, seed, size) and reused while it is
/// complete.
struct Master {
    dir: PathBuf,
    /// Marks `dir` as complete.
    done: PathBuf,
    guests: Vec<(String, PathBuf)>,
    description: String,
    generate_secs: f64,
}

fn master_set(args: &Args, guests: usize) -> Result<Master> {
    let fpg = args.files_per_guest.unwrap_or(10_000);
    let (id, description) = match args.source {
        Source::Synthetic => (
            format!("synthetic-{:x}-{guests}x{fpg}", args.seed),
            format!("synthetic, {guests} guests × ~{fpg} base files (SynthSpec::bench)"),
        ),
        Source::Real => {
            if args.files_per_guest.is_some() {
                bail!("--files-per-guest applies to --source synthetic only");
            }
            let names: Vec<String> = templates(args).iter().map(Template::name).collect();
            (
                format!("real-{:x}-{guests}-{}", args.seed, names.join("+")),
                format!(
                    "real, {guests} guests from mmdebstrap templates {} (round robin), diverged",
                    names.join(", ")
                ),
            )
        }
    };
    let root = args.out.join("master");
    let dir = root.join(&id);
    let done = root.join(format!("{id}.complete"));
    let mut generate_secs = 0.0;
    if done.is_file() && dir.is_dir() {
        say(format!("reusing master set {}", dir.display()));
    } else {
        remove(&dir)?;
        remove(&done)?;
        fs::create_dir_all(&root)?;
        say(format!("generating master set {}", dir.display()));
        let start = Instant::now();
        let report = match args.source {
            Source::Synthetic => {
                let spec = SynthSpec {
                    seed: args.seed,
                    files_per_guest: fpg,
                    ..SynthSpec::bench(guests)
                };
                generate_synthetic(&spec, &dir)?
            }
            Source::Real => {
                let spec = RealSpec {
                    seed: args.seed,
                    templates: templates(args),
                    ..RealSpec::bench(guests, args.out.join("templates"))
                };
                generate_real(&spec, &dir)?
            }
        };
        generate_secs = start.elapsed().as_secs_f64();
        say(format!(
            "generated {} guests, {} files, {} in {}",
            report.guests.len(),
            report::thousands(report.files),
            report::bytes(report.bytes),
            report::secs(generate_secs)
        ));
        fs::write(&done, b"")?;
    }
    let mut list = Vec::new();
    for entry in fs::read_dir(&dir)? {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        list.push((name, entry.path()));
    }
    list.sort();
    Ok(Master {
        dir,
        done,
        guests: list,
        description,
        generate_secs,
    })
}

fn templates(args: &Args) -> Vec<Template> {
    args.suites
        .iter()
        .flat_map(|suite| {
            args.roles.iter().map(move |&role| Template {
                suite: suite.clone(),
                role,
            })
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Running the tools

/// A tool's working copy: where its guests are and what to count as its disk usage.
struct Copy {
    /// `(name, dir)` of every guest.
    guests: Vec<(String, PathBuf)>,
    /// Counted for bytes on disk: the guest dirs, plus cowherd's store.
    du_roots: Vec<PathBuf>,
    /// cowherd's root.
    root: Option<PathBuf>,
}

/// Copies the first `n` guests of `master` for `tool` under `work`; cowherd's copy is
/// adopted into a fresh root (init, policy, adopt: renames, not timed).
fn prepare(
    programs: &Programs,
    tool: Tool,
    master: &[(String, PathBuf)],
    work: &Path,
) -> Result<Copy> {
    remove(work)?;
    fs::create_dir_all(work)?;
    let set = work.join("set");
    fs::create_dir_all(&set)?;
    for (name, dir) in master {
        copy_tree(dir, &set.join(name))?;
    }
    match tool {
        Tool::Cowherd | Tool::CowherdDefault => {
            let root = work.join("root");
            let names: Vec<&String> = master.iter().map(|(name, _)| name).collect();
            adopt_all(
                &programs.tools["cowherd"],
                &root,
                &set,
                &names,
                tool == Tool::Cowherd,
            )?;
            let guests: Vec<(String, PathBuf)> = names
                .iter()
                .map(|&name| (name.clone(), root.join("guests").join(name).join("base")))
                .collect();
            let mut du_roots: Vec<PathBuf> = guests.iter().map(|(_, d)| d.clone()).collect();
            du_roots.push(root.join("store"));
            Ok(Copy {
                guests,
                du_roots,
                root: Some(root),
            })
        }
        _ => {
            let guests: Vec<(String, PathBuf)> = master
                .iter()
                .map(|(name, _)| (name.clone(), set.join(name)))
                .collect();
            Ok(Copy {
                du_roots: guests.iter().map(|(_, d)| d.clone()).collect(),
                guests,
                root: None,
            })
        }
    }
}

fn shell_quote(s: &OsStr) -> String {
    let s = s.to_string_lossy();
    if !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "/._-,=+:@".contains(c))
    {
        s.into_owned()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

/// The command line of `tool` on `copy`, and how to show it.
fn command(programs: &Programs, tool: Tool, copy: &Copy) -> (Vec<OsString>, String) {
    let prog = programs.tools[tool.program()].clone().into_os_string();
    let dirs: Vec<OsString> = copy
        .guests
        .iter()
        .map(|(_, d)| d.clone().into_os_string())
        .collect();
    let shown_dirs = format!("<{} guest dirs>", dirs.len());
    let os = |s: &str| OsString::from(s);
    let (flags, display): (Vec<OsString>, String) = match tool {
        Tool::Cowherd | Tool::CowherdDefault => {
            let root = copy
                .root
                .clone()
                .expect("cowherd has a root")
                .into_os_string();
            let argv = vec![
                prog,
                os("--root"),
                root,
                os("-q"),
                os("unify"),
                os("--all"),
                os("--json"),
            ];
            return (argv, "cowherd --root R -q unify --all --json".to_owned());
        }
        Tool::Hardlink => (vec![os("-X")], format!("hardlink -X {shown_dirs}")),
        Tool::Rdfind => (
            ["-makehardlinks", "true", "-makeresultsfile", "false"]
                .map(os)
                .to_vec(),
            format!("rdfind -makehardlinks true -makeresultsfile false {shown_dirs}"),
        ),
        Tool::Jdupes => (
            vec![os("-r"), os("-L")],
            format!("jdupes -r -L {shown_dirs}"),
        ),
        Tool::Fclones => {
            let quoted: Vec<String> = dirs.iter().map(|d| shell_quote(d)).collect();
            let p = shell_quote(&prog);
            let script = format!(
                "{p} group --hidden --no-ignore --one-fs {} | {p} link",
                quoted.join(" ")
            );
            return (
                vec![os("bash"), os("-o"), os("pipefail"), os("-c"), os(&script)],
                format!("fclones group --hidden --no-ignore --one-fs {shown_dirs} | fclones link"),
            );
        }
    };
    let mut argv = vec![prog];
    argv.extend(flags);
    argv.extend(dirs);
    (argv, display)
}

/// Allocated bytes of cowherd's index files.
fn index_bytes(root: &Path) -> u64 {
    ["index.db", "index.db-wal", "index.db-shm"]
        .iter()
        .filter_map(|f| fs::metadata(root.join(f)).ok())
        .map(|m| m.blocks() * 512)
        .sum()
}

/// Allocated bytes of the directories (not files) below `root`.
fn dir_bytes(root: &Path) -> Result<u64> {
    let mut total = 0;
    for entry in walkdir::WalkDir::new(root).follow_links(false) {
        let entry = entry?;
        if entry.file_type().is_dir() {
            total += entry.metadata()?.blocks() * 512;
        }
    }
    Ok(total)
}

/// A field of cowherd's `unify --json` output.
fn json_u64(path: &Path, field: &str) -> Option<u64> {
    let text = fs::read_to_string(path).ok()?;
    let v: serde_json::Value = serde_json::from_str(&text).ok()?;
    v.get(field)?.as_u64()
}

/// Size of cowherd's index: `index.db` plus `index.db-wal` if present (`st_size`).
fn index_size(root: &Path) -> u64 {
    ["index.db", "index.db-wal"]
        .iter()
        .filter_map(|f| fs::metadata(root.join(f)).ok())
        .map(|m| m.len())
        .sum()
}

/// Runs `tool` twice on a fresh copy of the master set in `work` and fills `run`; with
/// `check`, also measures bytes on disk after each run and compares the guests with the
/// master's manifest. Returns the command as shown and the checks.
fn bench_copy(
    programs: &Programs,
    tool: Tool,
    master: &Master,
    check: Option<&Manifest>,
    work: &Path,
    logs: &Path,
    run: &mut ToolRun,
) -> Result<(String, Option<Checks>)> {
    say(format!(
        "#{} round {}: {}: copying the master set",
        run.seq,
        run.round,
        tool.name()
    ));
    let copy = prepare(programs, tool, &master.guests, work)?;
    let (argv, display) = command(programs, tool, &copy);
    let mut bytes_after = [0u64; 2];
    for pass in 1..=2 {
        let out = logs.join(format!("{:03}-{}-run{pass}.out", run.seq, tool.name()));
        let err = logs.join(format!("{:03}-{}-run{pass}.err", run.seq, tool.name()));
        let r = timed(programs, &argv, work, &out, &err)?;
        if r.exit_code != 0 && run.error.is_none() {
            let text = fs::read_to_string(&err).unwrap_or_default();
            let last = text.lines().last().unwrap_or("").to_owned();
            run.error = Some(format!("run {pass} exited {}: {last}", r.exit_code));
        }
        say(format!(
            "#{} round {}: {}: run {pass}: {}, peak RSS {}",
            run.seq,
            run.round,
            tool.name(),
            report::secs(r.wall_secs),
            report::mb(r.peak_rss_bytes())
        ));
        if check.is_some() {
            bytes_after[pass - 1] = disk_usage(&copy.du_roots)?.bytes;
        }
        if pass == 1 {
            run.first = Some(r);
            if copy.root.is_some() {
                run.reported_linked = json_u64(&out, "linked_files");
            }
        } else {
            run.second = Some(r);
            if let Some(root) = &copy.root {
                run.files_indexed = json_u64(&out, "files_scanned");
                run.index_bytes = Some(index_size(root));
            }
        }
    }
    let Some(master_manifest) = check else {
        return Ok((display, None));
    };
    say(format!(
        "#{}: {}: checking the guests",
        run.seq,
        tool.name()
    ));
    let after = Manifest::build(&copy.guests)?;
    let checks = Checks {
        seq: run.seq,
        bytes_after_first: bytes_after[0],
        bytes_after: bytes_after[1],
        diff: manifest::compare(master_manifest, &after),
        sharing: manifest::sharing(master_manifest, &after),
        store_dir_bytes: match &copy.root {
            Some(root) => Some(dir_bytes(&root.join("store"))?),
            None => None,
        },
    };
    Ok((display, Some(checks)))
}

/// The tool every peer is paired with: cowherd (every path eligible), else cowherd with its
/// default policy.
fn reference_tool(tools: &[Tool]) -> Option<usize> {
    tools
        .iter()
        .position(|&t| t == Tool::Cowherd)
        .or_else(|| tools.iter().position(|&t| t == Tool::CowherdDefault))
}

/// The main table: `rounds` interleaved rounds ([`schedule::schedule`]), the read bound
/// before the first and after the last.
#[allow(clippy::too_many_arguments)]
fn bench_rounds(
    args: &Args,
    programs: &Programs,
    tools: &[Tool],
    rounds: usize,
    master: &Master,
    master_manifest: &Manifest,
    work: &Path,
    report: &mut Report,
) -> Result<()> {
    let reference = reference_tool(tools);
    let plan = schedule::schedule(tools.len(), reference, rounds);
    let names: Vec<&str> = tools.iter().map(|t| t.name()).collect();
    report.rounds = rounds;
    report.reference = reference.map(|r| names[r].to_owned());
    report.order = plan.iter().map(|r| schedule::describe(r, &names)).collect();
    for (i, o) in report.order.iter().enumerate() {
        say(format!("round {}: {o}", i + 1));
    }
    let logs = work.join("logs");
    fs::create_dir_all(&logs)?;
    if !args.no_read_bound {
        report.read_bound_before = Some(timed_read_bound(programs, master, work, "before")?);
    }
    let mut results: Vec<ToolResult> = tools
        .iter()
        .map(|t| ToolResult::new(t.name(), String::new()))
        .collect();
    let mut seq = 0;
    for (r, round) in plan.iter().enumerate() {
        for (i, slot) in round.iter().enumerate() {
            let tool = tools[slot.tool];
            let mut run = ToolRun::new(seq + i + 1, r + 1, slot.pair.map(|p| seq + p + 1));
            let result = &mut results[slot.tool];
            let check = (r == 0 && result.checks.is_none()).then_some(master_manifest);
            let dir = work.join(tool.name());
            match bench_copy(programs, tool, master, check, &dir, &logs, &mut run) {
                Ok((display, checks)) => {
                    result.command = display;
                    if checks.is_some() {
                        result.checks = checks;
                    }
                }
                Err(e) => {
                    say(format!("#{}: {}: {e:#}", run.seq, tool.name()));
                    if run.error.is_none() {
                        run.error = Some(format!("{e:#}"));
                    }
                }
            }
            if result.error.is_none() {
                result.error.clone_from(&run.error);
            }
            result.runs.push(run);
            if !(args.keep_copies && r + 1 == rounds) {
                remove(&dir)?;
            }
        }
        seq += round.len();
    }
    if !args.no_read_bound {
        report.read_bound_after = Some(timed_read_bound(programs, master, work, "after")?);
    }
    report.tools = results;
    Ok(())
}

fn timed_read_bound(
    programs: &Programs,
    master: &Master,
    work: &Path,
    when: &str,
) -> Result<ReadBound> {
    say(format!("timing the read bound ({when} the rounds)"));
    let dir = work.join(format!("read-bound-{when}"));
    let bound = read_bound(programs, master, &dir)?;
    say(format!(
        "read bound {when}: {} for {}",
        report::secs(bound.run.wall_secs),
        report::bytes(bound.bytes)
    ));
    remove(&dir)?;
    Ok(bound)
}

/// cowherd (every path eligible) alone at each guest count of `sizes`, each in a fresh root
/// ([`scale_point`]).
fn bench_scale(
    args: &Args,
    programs: &Programs,
    master: &Master,
    sizes: &[usize],
    work: &Path,
) -> Result<Vec<ScalePoint>> {
    let mut points = Vec::new();
    let dir = work.join("scale");
    for (i, &n) in sizes.iter().enumerate() {
        let logs = work.join("logs").join(format!("scale-{n}"));
        remove(&logs)?;
        fs::create_dir_all(&logs)?;
        let point = scale_point(args, programs, master, n, &dir, &logs)?;
        points.push(point);
        if !(args.keep_copies && i + 1 == sizes.len()) {
            say(format!("scale {n}: removing the set"));
            remove(&dir)?;
        }
    }
    Ok(points)
}

/// The scale set of `n` guests in a fresh root below `work`: real copies of the master's
/// guests, then clones of them ([`scale`]), adopted by a fresh cowherd root with every path
/// eligible. Returns the root, the guests' names and the number of files made private in
/// clones.
fn make_scale_set(
    args: &Args,
    programs: &Programs,
    master: &Master,
    n: usize,
    work: &Path,
) -> Result<(PathBuf, Vec<String>, usize)> {
    remove(work)?;
    let set = work.join("set");
    fs::create_dir_all(&set)?;
    let masters: Vec<String> = master.guests.iter().map(|(name, _)| name.clone()).collect();
    let m = masters.len();
    let real = n.min(m);
    say(format!("scale {n}: copying {real} real guests"));
    for (name, dir) in &master.guests[..real] {
        copy_tree(dir, &set.join(name))?;
    }
    let names: Vec<String> = (0..n).map(|i| scale::guest_name(i, n, &masters)).collect();
    let mut diverged = 0;
    if n > real {
        say(format!("scale {n}: cloning {} guests (cp -al)", n - real));
        let mut lists: BTreeMap<usize, Vec<String>> = BTreeMap::new();
        for (s, source) in masters.iter().enumerate().take(n - real) {
            let files = scale::regular_files(&set.join(source))?;
            lists.insert(s, files.into_iter().map(|(p, _)| p).collect());
        }
        let counts: Vec<usize> = (real..n)
            .into_par_iter()
            .map(|i| -> Result<usize> {
                let source = set.join(&masters[i % m]);
                let dir = set.join(&names[i]);
                run_checked(Command::new("cp").arg("-al").arg(&source).arg(&dir))?;
                let changes = scale::clone_divergence(args.seed, &names[i], &lists[&(i % m)]);
                for (rel, change) in &changes {
                    scale::diverge_file(args.seed, &names[i], &dir, rel, *change)
                        .with_context(|| format!("diverging {}/{rel}", dir.display()))?;
                }
                Ok(changes.len())
            })
            .collect::<Result<_>>()?;
        diverged = counts.iter().sum();
    }
    say(format!("scale {n}: adopting {n} guests into a fresh root"));
    let root = work.join("root");
    let refs: Vec<&String> = names.iter().collect();
    adopt_all(&programs.tools["cowherd"], &root, &set, &refs, true)?;
    Ok((root, names, diverged))
}

/// A fresh cowherd root at `root` (every path eligible with `all_eligible`) that adopts the
/// guests `set/NAME`; `set` is left empty and removed.
fn adopt_all(
    cowherd: &Path,
    root: &Path,
    set: &Path,
    names: &[&String],
    all_eligible: bool,
) -> Result<()> {
    run_checked(Command::new(cowherd).arg("--root").arg(root).arg("init"))?;
    if all_eligible {
        fs::write(root.join("policy.toml"), ALL_ELIGIBLE_POLICY)?;
    }
    for name in names {
        run_checked(
            Command::new(cowherd)
                .arg("--root")
                .arg(root)
                .arg("-q")
                .arg("adopt")
                .arg(set.join(name))
                .arg("--name")
                .arg(name),
        )?;
    }
    fs::remove_dir(set)?;
    Ok(())
}

/// One scale point: the set, then, each cold, cowherd's first run, a `find` walk of the guests'
/// trees, the second run, the walk again, and `cowherd unify G` after an upgrade-sized change
/// of the last guest.
fn scale_point(
    args: &Args,
    programs: &Programs,
    master: &Master,
    n: usize,
    work: &Path,
    logs: &Path,
) -> Result<ScalePoint> {
    let start = Instant::now();
    let (root, names, diverged) = make_scale_set(args, programs, master, n, work)?;
    let build_secs = start.elapsed().as_secs_f64();
    let real = n.min(master.guests.len());
    say(format!(
        "scale {n}: {real} real guests and {} clones ({} files made private) in {}",
        n - real,
        report::thousands(diverged as u64),
        report::secs(build_secs)
    ));
    let cowherd = programs.tools["cowherd"].clone().into_os_string();
    let base = |extra: &[&str]| -> Vec<OsString> {
        let mut v: Vec<OsString> = vec![
            cowherd.clone(),
            "--root".into(),
            root.clone().into_os_string(),
            "-q".into(),
            "unify".into(),
        ];
        v.extend(extra.iter().map(OsString::from));
        v.push("--json".into());
        v
    };
    let step = |name: &str, argv: &[OsString]| -> Result<(Run, PathBuf)> {
        let out = logs.join(format!("{name}.out"));
        let err = logs.join(format!("{name}.err"));
        let r = timed(programs, argv, work, &out, &err)?;
        say(format!(
            "scale {n}: {name}: {}, peak RSS {}",
            report::secs(r.wall_secs),
            report::mb(r.peak_rss_bytes())
        ));
        if r.exit_code != 0 {
            let text = fs::read_to_string(&err).unwrap_or_default();
            bail!(
                "{name} at {n} guests exited {} (log {}): {}",
                r.exit_code,
                err.display(),
                text.lines().last().unwrap_or("")
            );
        }
        Ok((r, out))
    };
    // The guests' trees, as cowherd walks them (not their guest.toml or empty overlay dirs).
    let find_argv: Vec<OsString> = vec![
        "bash".into(),
        "-c".into(),
        r#"find "$1"/*/base -type f | wc -l"#.into(),
        "bash".into(),
        root.join("guests").into_os_string(),
    ];
    let (first, out) = step("unify-1", &base(&["--all"]))?;
    let first_hashed_bytes = json_u64(&out, "hashed_bytes");
    let first_linked = json_u64(&out, "linked_files");
    let (find_before, out) = step("find-1", &find_argv)?;
    let files: u64 = fs::read_to_string(&out)?.trim().parse().unwrap_or(0);
    let (second, out) = step("unify-2", &base(&["--all"]))?;
    let files_indexed = json_u64(&out, "files_scanned");
    let index_bytes = index_size(&root);
    let (find_after, _) = step("find-2", &find_argv)?;

    // An upgrade of the last guest: ~200 of its files rewritten, then `unify G`.
    let guest = names.last().expect("n ≥ 1").clone();
    let dir = root.join("guests").join(&guest).join("base");
    let candidates: Vec<String> = scale::regular_files(&dir)?
        .into_iter()
        .filter(|(_, size)| *size > 0)
        .map(|(p, _)| p)
        .collect();
    let picked = scale::pick_upgrade(args.seed, &guest, &candidates, scale::UPGRADE_FILES);
    let mut changed_bytes = 0;
    for rel in &picked {
        changed_bytes += scale::rewrite_patched(args.seed, &guest, &dir, rel)
            .with_context(|| format!("rewriting {}/{rel}", dir.display()))?;
    }
    say(format!(
        "scale {n}: rewrote {} files ({}) of {guest}",
        picked.len(),
        report::bytes(changed_bytes)
    ));
    let (run, out) = step("unify-G", &base(&[guest.as_str()]))?;
    let hashed_files = json_u64(&out, "hashed_files");
    Ok(ScalePoint {
        guests: n,
        real_guests: real,
        clones: n - real,
        files,
        build_secs,
        first,
        first_hashed_bytes,
        first_linked,
        second,
        find_before: Some(find_before),
        find_after: Some(find_after),
        changed: Some(ChangedGuest {
            guest,
            files: picked.len() as u64,
            bytes: changed_bytes,
            hashed_files,
            run,
        }),
        index_bytes: Some(index_bytes),
        files_indexed,
    })
}

/// How the scale sets were made, for the report.
fn scale_note(master: &Master, sizes: &[usize]) -> String {
    let m = master.guests.len();
    if sizes.iter().all(|&n| n <= m) {
        return "Every guest is a real copy of a master guest (`cp -a`).".to_owned();
    }
    format!(
        "Up to {m} guests the set is real copies of the master set's guests (`cp -a`). Beyond, \
         guest i is a clone of real copy i mod {m}: `cp -al` of it (every file a hardlink of \
         the real copy's inode), in which the identity files (hostname, hosts, machine ids, ssh \
         host keys, random seed) and up to {} logs, {} configs and {} user files, chosen by the \
         seed, get private, changed content (written beside and renamed over). cowherd's 1st \
         run there scans every guest and hashes each inode once — the {m} real copies' bytes \
         plus the clones' private files: a clone's other paths are more links of inodes already \
         read — and then replaces every path not on the inode it adopts as the object, nearly \
         all of the clones' paths. So at N > {m} guests the 1st run measures scan, plan and \
         link over N guests but the hashing of {m}: N independent guests would read about \
         N/{m} times the bytes. The 2nd run, the find walks and `unify G` are what N guests \
         cost.",
        scale::CLONE_LOGS,
        scale::CLONE_CONFIGS,
        scale::CLONE_USER
    )
}

// ---------------------------------------------------------------------------------------------
// The read bound

/// Regular files of at least one byte below `dirs`, one path per inode, in walk order.
fn candidates(dirs: &[PathBuf]) -> Result<Vec<(PathBuf, u64)>> {
    let mut seen = std::collections::HashSet::new();
    let mut out = Vec::new();
    for dir in dirs {
        for entry in walkdir::WalkDir::new(dir).follow_links(false) {
            let entry = entry?;
            if !entry.file_type().is_file() {
                continue;
            }
            let m = entry.metadata()?;
            if m.len() > 0 && seen.insert((m.dev(), m.ino())) {
                out.push((entry.into_path(), m.len()));
            }
        }
    }
    Ok(out)
}

fn read_all(dirs: &[PathBuf]) -> Result<()> {
    let files = candidates(dirs)?;
    let bytes: u64 = files
        .par_iter()
        .map_init(
            || vec![0u8; 1 << 20],
            |buf, (path, _)| -> Result<u64> {
                let mut f = fs::File::open(path)?;
                let mut n = 0u64;
                loop {
                    let r = f.read(buf)?;
                    if r == 0 {
                        break;
                    }
                    n += r as u64;
                }
                Ok(n)
            },
        )
        .sum::<Result<u64>>()?;
    println!("{{\"files\": {}, \"bytes\": {bytes}}}", files.len());
    Ok(())
}

fn read_bound(programs: &Programs, master: &Master, work: &Path) -> Result<ReadBound> {
    fs::create_dir_all(work)?;
    let mut argv = vec![std::env::current_exe()?.into_os_string(), "read-all".into()];
    argv.extend(
        master
            .guests
            .iter()
            .map(|(_, d)| d.clone().into_os_string()),
    );
    let out = work.join("read-all.out");
    let run = timed(programs, &argv, work, &out, &work.join("read-all.err"))?;
    if run.exit_code != 0 {
        bail!("read-all failed (see {})", work.display());
    }
    Ok(ReadBound {
        run,
        files: json_u64(&out, "files").unwrap_or(0),
        bytes: json_u64(&out, "bytes").unwrap_or(0),
    })
}

// ---------------------------------------------------------------------------------------------

fn machine(out: &Path) -> Machine {
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let memory_bytes = fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            let line = m.lines().find(|l| l.starts_with("MemTotal:"))?.to_owned();
            line.split_whitespace().nth(1)?.parse::<u64>().ok()
        })
        .map_or(0, |kib| kib * 1024);
    let kernel = fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_owned())
        .unwrap_or_default();
    let filesystem = Command::new("findmnt")
        .args(["-n", "-o", "FSTYPE", "--target"])
        .arg(out)
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default();
    Machine {
        cpus,
        memory_bytes,
        kernel,
        filesystem,
    }
}

/// Takes `<out>/lock`, so that a second harness on the same output directory stops at once
/// instead of writing into the same master set and copies.
fn lock_out(out: &Path) -> Result<nix::fcntl::Flock<fs::File>> {
    let path = out.join("lock");
    let file = fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .with_context(|| format!("opening {}", path.display()))?;
    nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock).map_err(|_| {
        anyhow::anyhow!(
            "{}: another cowherd-bench is using this output directory; wait for it or pass another --out",
            path.display()
        )
    })
}

fn bench(args: &Args, cowherd: Option<&Path>) -> Result<()> {
    if !nix::unistd::geteuid().is_root() {
        bail!("cowherd-bench must run as root (it sets owners and drops the page cache)");
    }
    if !args.scale.is_empty() && args.rounds.is_some() {
        bail!("--rounds applies to the main table, not to --scale (one pass per guest count)");
    }
    let mut tools: Vec<Tool> = Vec::new();
    for &t in if args.scale.is_empty() {
        &args.tools[..]
    } else {
        &[Tool::Cowherd][..]
    } {
        if !tools.contains(&t) {
            tools.push(t);
        }
    }
    let rounds = args.rounds.unwrap_or(match args.source {
        Source::Real => 3,
        Source::Synthetic => 1,
    });
    if rounds == 0 {
        bail!("--rounds must be at least 1");
    }
    let programs = check_programs(args, cowherd, &tools)?;
    if args.guests == 0 || args.scale.contains(&0) {
        bail!("--guests and --scale sizes must be at least 1");
    }
    fs::create_dir_all(&args.out).with_context(|| format!("creating {}", args.out.display()))?;
    let _lock = lock_out(&args.out)?;
    let master = master_set(args, args.guests)?;
    let work = args.out.join("work");
    let result = run_bench(args, &programs, &tools, rounds, &master, &work);
    if !(args.keep || args.keep_copies) {
        say("removing the master set and the copies (--keep keeps them)");
        remove(&work)?;
        remove(&master.dir)?;
        remove(&master.done)?;
    }
    let report = result?;
    let md = report::markdown(&report);
    println!("{md}");
    if let Some(path) = &args.markdown {
        fs::write(path, &md).with_context(|| format!("writing {}", path.display()))?;
    }
    if let Some(path) = &args.json {
        fs::write(path, serde_json::to_string_pretty(&report)? + "\n")
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

/// Regular-file names, distinct inodes and their bytes below the guests (no hashing).
fn file_counts(guests: &[(String, PathBuf)]) -> Result<(u64, u64, u64)> {
    let mut names = 0;
    let mut inodes = std::collections::HashMap::new();
    for (_, dir) in guests {
        for entry in walkdir::WalkDir::new(dir).follow_links(false) {
            let entry = entry?;
            if entry.file_type().is_file() {
                let m = entry.metadata()?;
                names += 1;
                inodes.insert((m.dev(), m.ino()), m.len());
            }
        }
    }
    Ok((names, inodes.len() as u64, inodes.values().sum()))
}

fn run_bench(
    args: &Args,
    programs: &Programs,
    tools: &[Tool],
    rounds: usize,
    master: &Master,
    work: &Path,
) -> Result<Report> {
    // The main table compares every tool's guests with the master's manifest (every file
    // hashed); the scale table needs only the master's counts.
    let master_manifest = if args.scale.is_empty() {
        say("recording the master manifest");
        Manifest::build(&master.guests)?
    } else {
        Manifest::default()
    };
    let (file_names, file_inodes, logical_bytes) = if args.scale.is_empty() {
        let (inodes, bytes) = master_manifest.file_inodes();
        (master_manifest.file_names(), inodes, bytes)
    } else {
        file_counts(&master.guests)?
    };
    let mut du = DiskCounter::new();
    du.add_tree(&master.dir)?;
    let mut report = Report {
        set: SetInfo {
            source: match args.source {
                Source::Synthetic => "synthetic".into(),
                Source::Real => "real".into(),
            },
            description: master.description.clone(),
            seed: args.seed,
            guests: master.guests.len(),
            file_names,
            file_inodes,
            logical_bytes,
            bytes_on_disk: du.usage().bytes,
            generate_secs: master.generate_secs,
        },
        machine: machine(&args.out),
        caches_dropped: true,
        rounds: 0,
        reference: None,
        order: Vec::new(),
        read_bound_before: None,
        read_bound_after: None,
        tools: Vec::new(),
        scale: Vec::new(),
        scale_note: None,
        ratios: Vec::new(),
        targets: Vec::new(),
    };
    if !args.scale.is_empty() {
        report.scale = bench_scale(args, programs, master, &args.scale, work)?;
        report.scale_note = Some(scale_note(master, &args.scale));
        report.caches_dropped = report.scale.iter().all(|p| {
            [Some(p.first), Some(p.second), p.find_before, p.find_after]
                .into_iter()
                .chain(std::iter::once(p.changed.as_ref().map(|c| c.run)))
                .flatten()
                .all(|r| r.cold)
        });
        report.evaluate();
        return Ok(report);
    }
    bench_rounds(
        args,
        programs,
        tools,
        rounds,
        master,
        &master_manifest,
        work,
        &mut report,
    )?;
    report.caches_dropped = report
        .tools
        .iter()
        .flat_map(|t| t.runs.iter().flat_map(|r| [r.first, r.second]))
        .flatten()
        .chain(report.read_bound_before.map(|b| b.run))
        .chain(report.read_bound_after.map(|b| b.run))
        .all(|r| r.cold);
    report.evaluate();
    Ok(report)
}

// ---------------------------------------------------------------------------------------------
// The build table: guests from a template, cowherd's way beside the peers'

/// The build benchmark's programs, paths and log counter.
struct BuildCtx {
    programs: Programs,
    cowherd: PathBuf,
    mmdebstrap: Option<PathBuf>,
    root: PathBuf,
    peers: PathBuf,
    logs: PathBuf,
    steps: std::cell::Cell<usize>,
}

impl BuildCtx {
    /// Runs a peer's one-guest step `step` of round `r` and records its sample in `way`, with
    /// the bytes and inodes `added` measures; a failed step becomes the way's error.
    fn peer_one(
        &self,
        way: &mut Way,
        label: &str,
        step: &str,
        r: usize,
        argv: &[OsString],
        added: impl FnOnce() -> Result<(u64, u64)>,
    ) -> Result<()> {
        match self.step(step, argv) {
            Ok((run, sync_secs, _)) => {
                let (bytes_added, inodes_added) = added()?;
                let s = Sample {
                    run,
                    sync_secs,
                    bytes_added,
                    inodes_added,
                    index_bytes_added: None,
                    guests: 1,
                };
                say(format!(
                    "round {r}: {label}: {}, {} added",
                    report::secs(s.secs()),
                    report::bytes(bytes_added)
                ));
                way.one.push(s);
            }
            Err(e) => {
                say(format!("{label}: {e:#}"));
                way.error = Some(format!("{e:#}"));
            }
        }
        Ok(())
    }

    /// `cowherd --root R -q ARGS…`.
    fn cowherd(&self, args: &[&OsStr]) -> Vec<OsString> {
        let mut argv: Vec<OsString> = vec![
            self.cowherd.clone().into_os_string(),
            "--root".into(),
            self.root.clone().into_os_string(),
            "-q".into(),
        ];
        argv.extend(args.iter().map(|a| a.to_os_string()));
        argv
    }

    /// Runs `argv` timed (page cache dropped first), then `sync` timed; its stdout. A
    /// failure is an error carrying the end of its stderr.
    fn step(&self, name: &str, argv: &[OsString]) -> Result<(Run, f64, String)> {
        let n = self.steps.get() + 1;
        self.steps.set(n);
        let out = self.logs.join(format!("{n:03}-{name}.out"));
        let err = self.logs.join(format!("{n:03}-{name}.err"));
        let run = timed(&self.programs, argv, &self.logs, &out, &err)?;
        let start = Instant::now();
        nix::unistd::sync();
        let sync_secs = start.elapsed().as_secs_f64();
        if run.exit_code != 0 {
            let text = fs::read_to_string(&err).unwrap_or_default();
            let tail: Vec<&str> = text.lines().rev().take(3).collect();
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            bail!(
                "{name} exited {} (log {}): {}",
                run.exit_code,
                err.display(),
                tail.join(" / ")
            );
        }
        Ok((run, sync_secs, fs::read_to_string(&out).unwrap_or_default()))
    }

    /// `cowherd template show NAME --json`.
    fn show(&self, name: &str) -> Result<serde_json::Value> {
        let argv = self.cowherd(&[
            OsStr::new("template"),
            OsStr::new("show"),
            OsStr::new(name),
            OsStr::new("--json"),
        ]);
        let out = Command::new(&argv[0])
            .args(&argv[1..])
            .stdin(Stdio::null())
            .output()
            .context("running cowherd template show")?;
        if !out.status.success() {
            bail!(
                "cowherd template show {name}: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        serde_json::from_slice(&out.stdout).context("parsing cowherd template show --json")
    }
}

/// `a − b` of two usages, never below zero.
fn usage_added(after: Usage, before: Usage) -> (u64, u64) {
    (
        after.bytes.saturating_sub(before.bytes),
        after.inodes.saturating_sub(before.inodes),
    )
}

/// The work directory: refuses one that holds something other than a previous run's.
fn fresh_work(work: &Path) -> Result<()> {
    const MARK: &str = ".cowherd-bench-build";
    if work.exists() {
        let empty = fs::read_dir(work)?.next().is_none();
        if !empty && !work.join(MARK).exists() {
            bail!(
                "{} exists and is no previous `cowherd-bench build` work directory: give \
                 --work a new or empty directory",
                work.display()
            );
        }
        remove_hard(work)?;
    }
    fs::create_dir_all(work).with_context(|| format!("creating {}", work.display()))?;
    fs::write(work.join(MARK), b"")?;
    Ok(())
}

/// Removes `path`; if that fails (an immutable store object), clears the immutable flags
/// below it and tries again.
fn remove_hard(path: &Path) -> Result<()> {
    if remove(path).is_ok() {
        return Ok(());
    }
    let _ = Command::new("chattr")
        .args(["-R", "-f", "-i"])
        .arg(path)
        .stdin(Stdio::null())
        .status();
    remove(path)
}

fn build_table(args: &BuildArgs, cowherd: Option<&Path>) -> Result<()> {
    if !nix::unistd::geteuid().is_root() {
        bail!(
            "cowherd-bench build must run as root (cowherd and mmdebstrap need it, and it drops the page cache)"
        );
    }
    if args.count == 0 {
        bail!("--count must be at least 1");
    }
    let time = PathBuf::from("/usr/bin/time");
    if !time.is_file() {
        return Err(missing("/usr/bin/time (GNU time)"));
    }
    for needed in ["cp", "bash", "seq", "findmnt"] {
        find_program(needed).ok_or_else(|| missing(needed))?;
    }
    let mmdebstrap = if args.no_mmdebstrap || args.peer_count == 0 {
        None
    } else {
        Some(find_program("mmdebstrap").ok_or_else(|| missing("mmdebstrap"))?)
    };
    let cowherd = find_cowherd(cowherd)?;
    let work = match &args.work {
        Some(w) => std::path::absolute(w)?,
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("out/build"),
    };
    let parent = work.parent().unwrap_or(Path::new("/"));
    fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
    let lock_path = parent.join(format!(
        "{}.lock",
        work.file_name().unwrap_or_default().to_string_lossy()
    ));
    let lock_file = fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .with_context(|| format!("opening {}", lock_path.display()))?;
    let _lock = nix::fcntl::Flock::lock(lock_file, nix::fcntl::FlockArg::LockExclusiveNonblock)
        .map_err(|_| {
            anyhow::anyhow!(
                "{}: another cowherd-bench build uses {}; wait for it or pass another --work",
                lock_path.display(),
                work.display()
            )
        })?;
    fresh_work(&work)?;
    let ctx = BuildCtx {
        programs: Programs {
            time,
            tools: BTreeMap::new(),
        },
        cowherd,
        mmdebstrap,
        root: work.join("root"),
        peers: work.join("peers"),
        logs: work.join("logs"),
        steps: std::cell::Cell::new(0),
    };
    fs::create_dir_all(&ctx.peers)?;
    fs::create_dir_all(&ctx.logs)?;
    say(format!("build table in {}", work.display()));
    let start = Instant::now();
    let result = run_build_table(args, &ctx, &work);
    if args.keep {
        say(format!("kept {}", work.display()));
    } else {
        say("removing the work directory (--keep keeps it)");
        remove_hard(&work)?;
    }
    let _ = fs::remove_file(&lock_path);
    let mut report = result?;
    report.total_secs = start.elapsed().as_secs_f64();
    let md = build::markdown(&report);
    println!("{md}");
    if let Some(path) = &args.markdown {
        fs::write(path, &md).with_context(|| format!("writing {}", path.display()))?;
    }
    if let Some(path) = &args.json {
        fs::write(path, serde_json::to_string_pretty(&report)? + "\n")
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

/// The template's suite, variant and packages for mmdebstrap, following `from` templates.
fn template_info(ctx: &BuildCtx, name: &str) -> Result<(TemplateInfo, Option<String>)> {
    let mut info = TemplateInfo {
        name: name.to_owned(),
        ..TemplateInfo::default()
    };
    let mut current = name.to_owned();
    let mut packages: Vec<String> = Vec::new();
    for _ in 0..16 {
        let show = ctx.show(&current)?;
        if let Some(p) = show.get("packages").and_then(|p| p.as_array()) {
            packages.extend(p.iter().filter_map(|x| x.as_str().map(str::to_owned)));
        }
        let base = show.get("base").and_then(|b| b.as_str()).unwrap_or("");
        match build::parse_base(base) {
            TemplateBase::Bootstrap { suite, variant, .. } => {
                info.suite = suite;
                info.variant = variant;
                packages.sort();
                packages.dedup();
                info.packages = packages;
                return Ok((info, None));
            }
            TemplateBase::From(from) => current = from,
            TemplateBase::Other(line) => {
                return Ok((
                    info,
                    Some(format!(
                        "template {current} is made from `{line}`, not by a bootstrapper: no \
                         mmdebstrap to compare with"
                    )),
                ));
            }
        }
    }
    Ok((
        info,
        Some(format!("template {name}: `from` chain too long")),
    ))
}

fn run_build_table(args: &BuildArgs, ctx: &BuildCtx, work: &Path) -> Result<BuildReport> {
    let os = |s: &str| OsString::from(s);
    let t = args.template.as_str();
    run_checked(
        Command::new(&ctx.cowherd)
            .arg("--root")
            .arg(&ctx.root)
            .arg("-q")
            .arg("init"),
    )?;
    let (mut info, no_mmdebstrap) = template_info(ctx, t)?;

    // 1. The template, into a fresh root.
    say(format!(
        "cowherd template build {t} (mmdebstrap, then unify into the store)"
    ));
    let before = disk_usage(&[&ctx.root])?;
    let (run, sync_secs, out) = ctx.step(
        "template-build",
        &ctx.cowherd(&[
            OsStr::new("template"),
            OsStr::new("build"),
            OsStr::new(t),
            OsStr::new("--json"),
        ]),
    )?;
    let built: serde_json::Value =
        serde_json::from_str(&out).context("parsing cowherd template build --json")?;
    let record = built
        .get("record")
        .context("no `record` in template build --json")?;
    let field = |k: &str| {
        record
            .get(k)
            .and_then(serde_json::Value::as_u64)
            .unwrap_or(0)
    };
    info.version = u32::try_from(field("version"))?;
    info.files = field("files");
    info.record_bytes = field("bytes");
    info.made_by = record
        .get("made_by")
        .and_then(|m| m.as_str())
        .unwrap_or("")
        .to_owned();
    let tree = ctx
        .root
        .join("templates")
        .join(t)
        .join(info.version.to_string())
        .join("tree");
    if !tree.is_dir() {
        bail!("the template's tree {} is missing", tree.display());
    }
    let tree_usage = disk_usage(&[&tree])?;
    info.tree_bytes = tree_usage.bytes;
    info.tree_inodes = tree_usage.inodes;
    let mut root_usage = disk_usage(&[&ctx.root])?;
    let mut index_size = index_bytes(&ctx.root);
    let (added, inodes) = usage_added(root_usage, before);
    info.build = Some(Sample {
        run,
        sync_secs,
        bytes_added: added,
        inodes_added: inodes,
        index_bytes_added: Some(index_bytes(&ctx.root)),
        guests: 0,
    });
    say(format!(
        "template {}@{}: {} files, {} on disk, built in {}",
        t,
        info.version,
        report::thousands(info.files),
        report::bytes(info.tree_bytes),
        report::secs(run.wall_secs + sync_secs)
    ));

    // 2. One guest at a time, interleaved.
    let shown_tree = format!("R/templates/{t}/{}/tree", info.version);
    let mut cow = Way::new(
        build::COWHERD,
        format!("cowherd --root R -q build oneK --template {t} --json"),
    );
    let mut cpa = Way::new(build::CP_A, format!("cp -a {shown_tree} peers/cp-a/gK"));
    let mut cpal = Way::new(
        build::CP_AL,
        format!("cp -al {shown_tree} peers/cp-al/oneK"),
    );
    let include = if info.packages.is_empty() {
        String::new()
    } else {
        format!("--include={}", info.packages.join(","))
    };
    let mut mmd = Way::new(
        build::MMDEBSTRAP,
        format!(
            "mmdebstrap --variant={} {}{} peers/mmdebstrap/gK",
            info.variant,
            if include.is_empty() {
                String::new()
            } else {
                format!("{include} ")
            },
            info.suite
        ),
    );
    if args.peer_count > 0 && ctx.mmdebstrap.is_some() {
        mmd.skipped = no_mmdebstrap;
    } else {
        mmd.skipped = Some("--no-mmdebstrap or --peer-count 0".into());
    }
    if args.peer_count == 0 {
        cpa.skipped = Some("--peer-count 0".into());
    }
    let rounds = args.peer_count.max(1);
    for dir in ["cp-a", "cp-al", "mmdebstrap"] {
        fs::create_dir_all(ctx.peers.join(dir))?;
    }
    for r in 1..=rounds {
        // cowherd
        if cow.error.is_none() {
            let name = format!("one{r}");
            let argv = ctx.cowherd(&[
                OsStr::new("build"),
                OsStr::new(&name),
                OsStr::new("--template"),
                OsStr::new(t),
                OsStr::new("--json"),
            ]);
            match ctx.step(&format!("cowherd-{name}"), &argv) {
                Ok((run, sync_secs, out)) => {
                    let after = disk_usage(&[&ctx.root])?;
                    let (bytes_added, inodes_added) = usage_added(after, root_usage);
                    root_usage = after;
                    let index_after = index_bytes(&ctx.root);
                    let index_bytes_added = index_after.saturating_sub(index_size);
                    index_size = index_after;
                    if let Ok(v) = serde_json::from_str::<serde_json::Value>(&out)
                        && let Some(g) = v.get(0)
                    {
                        cow.reported.push((
                            g.get("seconds").and_then(|x| x.as_f64()).unwrap_or(0.0),
                            g.get("copied_bytes").and_then(|x| x.as_u64()).unwrap_or(0),
                        ));
                    }
                    let s = Sample {
                        run,
                        sync_secs,
                        bytes_added,
                        inodes_added,
                        index_bytes_added: Some(index_bytes_added),
                        guests: 1,
                    };
                    say(format!(
                        "round {r}: cowherd build: {}, {} added (index {})",
                        report::secs(s.secs()),
                        report::bytes(bytes_added),
                        report::bytes(index_bytes_added)
                    ));
                    cow.one.push(s);
                }
                Err(e) => {
                    say(format!("cowherd build: {e:#}"));
                    cow.error = Some(format!("{e:#}"));
                }
            }
        }
        // cp -a
        if r <= args.peer_count && cpa.error.is_none() {
            let dir = ctx.peers.join("cp-a").join(format!("g{r}"));
            let argv = vec![os("cp"), os("-a"), tree.clone().into(), dir.clone().into()];
            ctx.peer_one(&mut cpa, "cp -a", &format!("cp-a-g{r}"), r, &argv, || {
                let u = disk_usage(&[&dir])?;
                Ok((u.bytes, u.inodes))
            })?;
        }
        // cp -al
        if cpal.error.is_none() {
            let dir = ctx.peers.join("cp-al").join(format!("one{r}"));
            let argv = vec![os("cp"), os("-al"), tree.clone().into(), dir.clone().into()];
            ctx.peer_one(
                &mut cpal,
                "cp -al",
                &format!("cp-al-one{r}"),
                r,
                &argv,
                || Ok(usage_added(disk_usage(&[&tree, &dir])?, tree_usage)),
            )?;
        }
        // mmdebstrap
        if let Some(prog) = &ctx.mmdebstrap
            && r <= args.peer_count
            && mmd.error.is_none()
            && mmd.skipped.is_none()
        {
            let dir = ctx.peers.join("mmdebstrap").join(format!("g{r}"));
            let mut argv = vec![
                prog.clone().into_os_string(),
                os(&format!("--variant={}", info.variant)),
            ];
            if !include.is_empty() {
                argv.push(os(&include));
            }
            argv.push(os(&info.suite));
            argv.push(dir.clone().into());
            say(format!("round {r}: mmdebstrap (from the network)"));
            ctx.peer_one(
                &mut mmd,
                "mmdebstrap",
                &format!("mmdebstrap-g{r}"),
                r,
                &argv,
                || {
                    let u = disk_usage(&[&dir])?;
                    Ok((u.bytes, u.inodes))
                },
            )?;
        }
    }

    // 3. N guests: cowherd in one run, then cp -al N times.
    let n = args.count;
    cow.many_command = Some(format!(
        "cowherd --root R -q build --count {n} --prefix g --template {t} --json"
    ));
    say(format!("cowherd build --count {n}"));
    let argv = ctx.cowherd(&[
        OsStr::new("build"),
        OsStr::new("--count"),
        OsStr::new(&n.to_string()),
        OsStr::new("--prefix"),
        OsStr::new("g"),
        OsStr::new("--template"),
        OsStr::new(t),
        OsStr::new("--json"),
    ]);
    match ctx.step(&format!("cowherd-count-{n}"), &argv) {
        Ok((run, sync_secs, _)) => {
            let after = disk_usage(&[&ctx.root])?;
            let (bytes_added, inodes_added) = usage_added(after, root_usage);
            let s = Sample {
                run,
                sync_secs,
                bytes_added,
                inodes_added,
                index_bytes_added: Some(index_bytes(&ctx.root).saturating_sub(index_size)),
                guests: n,
            };
            say(format!(
                "cowherd build --count {n}: {}, {} added",
                report::secs(s.secs()),
                report::bytes(bytes_added)
            ));
            cow.many = Some(s);
        }
        Err(e) => {
            say(format!("cowherd build --count {n}: {e:#}"));
            if cow.error.is_none() {
                cow.error = Some(format!("{e:#}"));
            }
        }
    }
    let many_dir = ctx.peers.join("cp-al-n");
    fs::create_dir_all(&many_dir)?;
    cpal.many_command = Some(format!(
        "bash -c 'for i in $(seq -w 1 {n}); do cp -al {shown_tree} peers/cp-al-n/g$i || exit 1; done'"
    ));
    say(format!("cp -al × {n}"));
    let argv = vec![
        os("bash"),
        os("-c"),
        os(r#"for i in $(seq -w 1 "$1"); do cp -al "$2" "$3/g$i" || exit 1; done"#),
        os("bash"),
        os(&n.to_string()),
        tree.clone().into(),
        many_dir.clone().into(),
    ];
    match ctx.step(&format!("cp-al-count-{n}"), &argv) {
        Ok((run, sync_secs, _)) => {
            let u = disk_usage(&[&tree, &many_dir])?;
            let (bytes_added, inodes_added) = usage_added(u, tree_usage);
            let s = Sample {
                run,
                sync_secs,
                bytes_added,
                inodes_added,
                index_bytes_added: None,
                guests: n,
            };
            say(format!(
                "cp -al × {n}: {}, {} added",
                report::secs(s.secs()),
                report::bytes(bytes_added)
            ));
            cpal.many = Some(s);
        }
        Err(e) => {
            say(format!("cp -al × {n}: {e:#}"));
            if cpal.error.is_none() {
                cpal.error = Some(format!("{e:#}"));
            }
        }
    }

    let ways = vec![cow, cpal, cpa, mmd];
    let caches_dropped = ways
        .iter()
        .flat_map(|w| w.one.iter().chain(w.many.iter()))
        .chain(info.build.iter())
        .all(|s| s.run.cold);
    let mut report = BuildReport {
        template: info,
        count: n,
        peer_count: args.peer_count,
        rounds,
        machine: machine(work),
        caches_dropped,
        ways,
        targets: Vec::new(),
        total_secs: 0.0,
    };
    report.evaluate();
    Ok(report)
}
