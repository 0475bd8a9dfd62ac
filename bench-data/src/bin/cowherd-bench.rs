//! `cowherd-bench`: runs cowherd and its peers (hardlink, rdfind, jdupes, fclones) on fresh
//! copies of one generated guest set and writes a Markdown and JSON table of time, peak RSS,
//! bytes on disk, paths linked, wrong links and whether the guests still look the same.
//!
//! ```sh
//! bench-data/run --guests 10 --files-per-guest 10000 --markdown /tmp/bench.md
//! bench-data/run --scale 10,20,40          # cowherd alone at several sizes
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
use clap::{Parser, Subcommand, ValueEnum};
use cowherd_benchdata::harness::du::{DiskCounter, disk_usage};
use cowherd_benchdata::harness::manifest::{self, Manifest};
use cowherd_benchdata::harness::report::{
    self, Machine, ReadBound, Report, Run, ScalePoint, SetInfo, ToolResult,
};
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
             one generated guest set",
    args_conflicts_with_subcommands = true
)]
struct Cli {
    #[command(subcommand)]
    cmd: Option<Sub>,
    #[command(flatten)]
    bench: Args,
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
    /// Number of guests.
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
    /// Tools to run, in order.
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
    /// Keep the master set and the tools' copies.
    #[arg(long)]
    keep: bool,
    /// Run cowherd only, at these guest counts (e.g. 10,20,40), and report time and RSS.
    #[arg(long, value_delimiter = ',')]
    scale: Vec<usize>,
    /// The cowherd binary [default: next to this one, else on PATH].
    #[arg(long)]
    cowherd: Option<PathBuf>,
    /// Debian suites of the real templates.
    #[arg(long, value_delimiter = ',', default_value = "bookworm,trixie")]
    suites: Vec<String>,
    /// Roles of the real templates (minbase, web, db, dev).
    #[arg(long, value_delimiter = ',', default_value = "minbase,web,db,dev")]
    roles: Vec<Role>,
    /// Skip the read-every-candidate-byte bound.
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
    let cli = Cli::parse();
    let result = match cli.cmd {
        Some(Sub::ReadAll { dirs }) => read_all(&dirs),
        None => bench(&cli.bench),
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

fn check_programs(args: &Args, tools: &[Tool]) -> Result<Programs> {
    let time = PathBuf::from("/usr/bin/time");
    if !time.is_file() {
        return Err(missing("/usr/bin/time (GNU time)"));
    }
    for needed in ["cp", "bash", "findmnt"] {
        find_program(needed).ok_or_else(|| missing(needed))?;
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
            match &args.cowherd {
                Some(p) if p.is_file() => Some(p.clone()),
                Some(p) => bail!(
                    "missing tool `cowherd` at {} (build it: cargo build --release -p cowherd)",
                    p.display()
                ),
                None => std::env::current_exe()
                    .ok()
                    .and_then(|e| e.parent().map(|d| d.join("cowherd")))
                    .filter(|p| p.is_file())
                    .or_else(|| find_program("cowherd")),
            }
        } else {
            find_program(prog)
        };
        let path = path.ok_or_else(|| {
            if prog == "cowherd" {
                anyhow::anyhow!(
                    "missing tool `cowherd`: build it with `cargo build --release -p cowherd` \
                     (bench-data/run does) or pass --cowherd PATH"
                )
            } else {
                missing(prog)
            }
        })?;
        let path =
            fs::canonicalize(&path).with_context(|| format!("resolving {}", path.display()))?;
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
            let cowherd = &programs.tools["cowherd"];
            let root = work.join("root");
            run_checked(Command::new(cowherd).arg("--root").arg(&root).arg("init"))?;
            if tool == Tool::Cowherd {
                fs::write(root.join("policy.toml"), ALL_ELIGIBLE_POLICY)?;
            }
            let mut guests = Vec::new();
            for (name, _) in master {
                run_checked(
                    Command::new(cowherd)
                        .arg("--root")
                        .arg(&root)
                        .arg("-q")
                        .arg("adopt")
                        .arg(set.join(name))
                        .arg("--name")
                        .arg(name),
                )?;
                guests.push((name.clone(), root.join("guests").join(name).join("base")));
            }
            fs::remove_dir(&set)?;
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

/// Copies, runs `tool` twice, measures.
fn bench_tool(
    programs: &Programs,
    tool: Tool,
    master: &Master,
    master_manifest: &Manifest,
    work: &Path,
) -> Result<ToolResult> {
    say(format!("{}: copying the master set", tool.name()));
    let copy = prepare(programs, tool, &master.guests, work)?;
    let (argv, display) = command(programs, tool, &copy);
    let logs = work.join("logs");
    fs::create_dir_all(&logs)?;
    let mut result = ToolResult::new(tool.name(), display);
    for pass in 1..=2 {
        say(format!("{}: run {pass}", tool.name()));
        let out = logs.join(format!("run{pass}.out"));
        let err = logs.join(format!("run{pass}.err"));
        let run = timed(programs, &argv, work, &out, &err)?;
        if run.exit_code != 0 && result.error.is_none() {
            let mut tail = String::new();
            if let Ok(mut f) = fs::File::open(&err) {
                let _ = f.read_to_string(&mut tail);
            }
            let last = tail.lines().last().unwrap_or("").to_owned();
            result.error = Some(format!("run {pass} exited {}: {last}", run.exit_code));
        }
        say(format!(
            "{}: run {pass}: {} , peak RSS {}",
            tool.name(),
            report::secs(run.wall_secs),
            report::mb(run.peak_rss_bytes())
        ));
        let usage = disk_usage(&copy.du_roots)?;
        if pass == 1 {
            result.first = Some(run);
            result.bytes_after_first = usage.bytes;
            if copy.root.is_some() {
                result.reported_linked = json_u64(&out, "linked_files");
            }
        } else {
            result.second = Some(run);
            result.bytes_after = usage.bytes;
        }
    }
    say(format!("{}: checking the guests", tool.name()));
    let after = Manifest::build(&copy.guests)?;
    result.diff = manifest::compare(master_manifest, &after);
    result.sharing = manifest::sharing(master_manifest, &after);
    result.index_bytes = copy.root.as_deref().map(index_bytes);
    result.store_dir_bytes = match &copy.root {
        Some(root) => Some(dir_bytes(&root.join("store"))?),
        None => None,
    };
    Ok(result)
}

/// cowherd (every path eligible) alone on the first `n` guests, for each `n`.
fn bench_scale(
    programs: &Programs,
    master: &Master,
    sizes: &[usize],
    work: &Path,
) -> Result<Vec<ScalePoint>> {
    let mut points = Vec::new();
    for &n in sizes {
        let guests = &master.guests[..n.min(master.guests.len())];
        say(format!("scale {n}: copying"));
        let copy = prepare(programs, Tool::Cowherd, guests, work)?;
        let (argv, _) = command(programs, Tool::Cowherd, &copy);
        let logs = work.join("logs");
        fs::create_dir_all(&logs)?;
        let mut runs = Vec::new();
        let mut files = 0;
        for pass in 1..=2 {
            let out = logs.join(format!("run{pass}.out"));
            let run = timed(
                programs,
                &argv,
                work,
                &out,
                &logs.join(format!("run{pass}.err")),
            )?;
            if run.exit_code != 0 {
                bail!("cowherd failed at {n} guests (see {})", logs.display());
            }
            if pass == 1 {
                files = json_u64(&out, "files_scanned").unwrap_or(0);
            }
            say(format!(
                "scale {n}: run {pass}: {}, peak RSS {}",
                report::secs(run.wall_secs),
                report::mb(run.peak_rss_bytes())
            ));
            runs.push(run);
        }
        points.push(ScalePoint {
            guests: guests.len(),
            files,
            first: runs[0],
            second: runs[1],
        });
        remove(work)?;
    }
    Ok(points)
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

fn bench(args: &Args) -> Result<()> {
    if !nix::unistd::geteuid().is_root() {
        bail!("cowherd-bench must run as root (it sets owners and drops the page cache)");
    }
    let tools: Vec<Tool> = if args.scale.is_empty() {
        args.tools.clone()
    } else {
        vec![Tool::Cowherd]
    };
    let programs = check_programs(args, &tools)?;
    if args.guests == 0 || args.scale.contains(&0) {
        bail!("--guests and --scale sizes must be at least 1");
    }
    fs::create_dir_all(&args.out).with_context(|| format!("creating {}", args.out.display()))?;
    let _lock = lock_out(&args.out)?;
    let guests = args.scale.iter().copied().max().unwrap_or(args.guests);
    let master = master_set(args, guests)?;
    let work = args.out.join("work");
    let result = run_bench(args, &programs, &tools, &master, &work);
    if !args.keep {
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

fn run_bench(
    args: &Args,
    programs: &Programs,
    tools: &[Tool],
    master: &Master,
    work: &Path,
) -> Result<Report> {
    say("recording the master manifest");
    let master_manifest = Manifest::build(&master.guests)?;
    let (file_inodes, logical_bytes) = master_manifest.file_inodes();
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
            file_names: master_manifest.file_names(),
            file_inodes,
            logical_bytes,
            bytes_on_disk: du.usage().bytes,
            generate_secs: master.generate_secs,
        },
        machine: machine(&args.out),
        caches_dropped: true,
        read_bound: None,
        tools: Vec::new(),
        scale: Vec::new(),
        ratios: Vec::new(),
        targets: Vec::new(),
    };
    if !args.scale.is_empty() {
        report.scale = bench_scale(programs, master, &args.scale, work)?;
        report.caches_dropped = report.scale.iter().all(|p| p.first.cold && p.second.cold);
        report.evaluate();
        report.targets.retain(|t| t.target.contains("RSS"));
        return Ok(report);
    }
    if !args.no_read_bound {
        say("timing the read bound");
        let bound = read_bound(programs, master, &work.join("read-bound"))?;
        say(format!(
            "read bound: {} for {}",
            report::secs(bound.run.wall_secs),
            report::bytes(bound.bytes)
        ));
        report.read_bound = Some(bound);
        remove(&work.join("read-bound"))?;
    }
    for &tool in tools {
        let dir = work.join(tool.name());
        let result = bench_tool(programs, tool, master, &master_manifest, &dir);
        match result {
            Ok(r) => report.tools.push(r),
            Err(e) => {
                say(format!("{}: {e:#}", tool.name()));
                report.tools.push(ToolResult {
                    error: Some(format!("{e:#}")),
                    ..ToolResult::new(tool.name(), String::new())
                });
            }
        }
        if !args.keep {
            remove(&dir)?;
        }
    }
    report.caches_dropped = report
        .tools
        .iter()
        .flat_map(|t| [t.first, t.second])
        .flatten()
        .chain(report.read_bound.map(|b| b.run))
        .all(|r| r.cold);
    report.evaluate();
    Ok(report)
}
