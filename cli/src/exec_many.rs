//! `cowherd exec`: a command in one guest (its standard streams the caller's, its exit code
//! cowherd's), or in several guests at once, a few at a time, with each guest's output as
//! prefixed lines or in a log file of its own, then a summary.
//!
//! A guest that is not mounted runs on its own overlay mounted privately for the command
//! (`cowherd_builder::guest_exec`): the root is then opened for writing, and its lock held
//! until every command ended, so no `mount`, `fold` or `unify` of the guest races it.

use std::ffi::OsString;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::mpsc;
use std::thread;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use clap::Args;
use cowherd_builder::{Exec, guest_exec};
use cowherd_unify::{Access, HostRoot, MountState};
use serde::Serialize;

use crate::{EXIT_EXEC_FAILED, EXIT_PARTIAL, Select, fmt, number_in, open, print_json};

/// A line of a command's output longer than this is printed in pieces of this size (each
/// prefixed), so that a command printing without newlines cannot fill cowherd's memory.
const MAX_LINE: usize = 64 * 1024;

/// The most commands `--jobs` runs at a time.
const MAX_JOBS: u64 = 1024;

#[derive(Args)]
pub(crate) struct ExecArgs {
    #[command(flatten)]
    select: Select,
    /// How many guests run the command at a time (several guests or --all; default: the
    /// number of cores).
    #[arg(short, long, value_name = "N", allow_negative_numbers = true,
          value_parser = number_in(1, MAX_JOBS))]
    jobs: Option<u64>,
    /// Write each guest's output (standard output and error) to DIR/GUEST.log (0600; DIR is
    /// made 0700 if missing) instead of printing it; only the summary is printed.
    #[arg(long, value_name = "DIR")]
    logs: Option<PathBuf>,
    /// Print the summary as JSON on standard output (the commands' output, if printed, then
    /// goes to standard error).
    #[arg(long)]
    json: bool,
    /// The command and its arguments, after `--`.
    #[arg(last = true, required = true, value_name = "COMMAND")]
    command: Vec<OsString>,
}

impl ExecArgs {
    /// Whether this is the one-guest form: one guest named, without --logs or --json. Its
    /// standard streams are the caller's and its exit code is cowherd's (125 if cowherd could
    /// not run it).
    pub(crate) fn single(&self) -> bool {
        !self.select.all && self.select.guests.len() == 1 && self.logs.is_none() && !self.json
    }
}

/// `cowherd exec`.
pub(crate) fn run(root: &Path, args: ExecArgs) -> Result<u8> {
    if args.single() {
        let name = &args.select.guests[0];
        return Ok(single(root, name, args.command).unwrap_or_else(|e| {
            eprintln!("error: {e:#}");
            EXIT_EXEC_FAILED
        }));
    }
    many(root, args)
}

/// The one-guest form: runs the command with the caller's standard streams; its exit code.
fn single(root: &Path, name: &str, command: Vec<OsString>) -> Result<u8> {
    let names = [name.to_string()];
    let root = open_for(root, &names)?;
    let out = cowherd_builder::exec_in_guest(&root, name, Exec::command(command))?;
    Ok(out.code.clamp(0, 255) as u8)
}

/// Opens the root for running commands in `names`, each checked to be a guest: for reading
/// if every one is mounted, else for writing (a private overlay is mounted under its lock).
fn open_for(path: &Path, names: &[String]) -> Result<HostRoot> {
    let root = open(path, Access::Read)?;
    let mut private = false;
    for name in names {
        cowherd_unify::guest_record(&root, name)?;
        private |= cowherd_unify::mount_state(&root, name)? == MountState::Unmounted;
    }
    if !private {
        return Ok(root);
    }
    drop(root);
    open(path, Access::Write)
}

/// How the command went in one guest (a row of the summary).
#[derive(Serialize)]
struct Outcome {
    guest: String,
    /// The command's exit code (128 + N for signal N); none if it could not run.
    code: Option<i32>,
    /// From preparing the guest to the end of the command.
    seconds: f64,
    /// Why cowherd could not run the command.
    error: Option<String>,
    /// The guest's log file (`--logs`).
    #[serde(skip_serializing_if = "Option::is_none")]
    log: Option<PathBuf>,
}

/// The summary of `--json`.
#[derive(Serialize)]
struct Summary<'a> {
    guests: &'a [Outcome],
    /// Guests whose command exited 0.
    succeeded: usize,
    /// Guests whose command exited otherwise.
    failed: usize,
    /// Guests where cowherd could not run the command.
    not_run: usize,
}

/// Where the commands' output goes.
enum Sink {
    /// Lines prefixed with the guest's name, on cowherd's standard output (standard error
    /// with `to_stderr`) and standard error.
    Prefixed { width: usize, to_stderr: bool },
    /// `DIR/GUEST.log`.
    Logs(PathBuf),
}

/// The several-guests form.
fn many(path: &Path, args: ExecArgs) -> Result<u8> {
    let mut names = args.select.names(&open(path, Access::Read)?)?;
    if names.is_empty() {
        bail!(
            "no guests in {} (adopt one with `cowherd adopt PATH --name NAME`)",
            path.display()
        );
    }
    let mut seen = std::collections::HashSet::new();
    names.retain(|name| seen.insert(name.clone()));
    let sink = match &args.logs {
        Some(dir) => Sink::Logs(logs_dir(dir)?),
        None => Sink::Prefixed {
            width: names.iter().map(|n| n.chars().count()).max().unwrap_or(0),
            to_stderr: args.json,
        },
    };
    let root = open_for(path, &names)?;
    let jobs = args.jobs.map_or_else(
        || thread::available_parallelism().map_or(1, usize::from),
        |n| usize::try_from(n).unwrap_or(usize::MAX),
    );
    let outcomes = run_all(&root, &names, &args.command, &sink, jobs);
    drop(root);
    let succeeded = outcomes.iter().filter(|o| o.code == Some(0)).count();
    let not_run = outcomes.iter().filter(|o| o.code.is_none()).count();
    let failed = outcomes.len() - succeeded - not_run;
    if args.json {
        print_json(&Summary {
            guests: &outcomes,
            succeeded,
            failed,
            not_run,
        })?;
    } else {
        print_summary(&outcomes, succeeded, failed, not_run);
    }
    Ok(if succeeded == outcomes.len() {
        0
    } else {
        EXIT_PARTIAL
    })
}

/// Makes the directory of `--logs` (0700) if missing; refuses anything but a directory.
fn logs_dir(dir: &Path) -> Result<PathBuf> {
    match std::fs::metadata(dir) {
        Ok(meta) if meta.is_dir() => {}
        Ok(_) => bail!(
            "--logs {}: not a directory; give a directory for the guests' log files",
            dir.display()
        ),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .with_context(|| format!("--logs {}: making the directory", dir.display()))?,
        Err(e) => bail!("--logs {}: {e}", dir.display()),
    }
    Ok(dir.to_path_buf())
}

/// Runs `command` in each guest, `jobs` at a time, in the order given; their outcomes in that
/// order. Each guest is prepared on this thread (the root is not shared between threads) just
/// before its command starts on a thread of its own.
fn run_all(
    root: &HostRoot,
    names: &[String],
    command: &[OsString],
    sink: &Sink,
    jobs: usize,
) -> Vec<Outcome> {
    let mut outcomes: Vec<Option<Outcome>> = names.iter().map(|_| None).collect();
    let (done_tx, done_rx) = mpsc::channel::<(usize, Outcome)>();
    let wait_one = |outcomes: &mut [Option<Outcome>], running: &mut usize| {
        if let Ok((i, outcome)) = done_rx.recv() {
            outcomes[i] = Some(outcome);
        }
        *running -= 1;
    };
    thread::scope(|scope| {
        let mut running = 0;
        for (i, name) in names.iter().enumerate() {
            while running >= jobs {
                wait_one(&mut outcomes, &mut running);
            }
            let start = Instant::now();
            match prepare(root, name, command, sink) {
                Ok(job) => {
                    let done_tx = done_tx.clone();
                    let spawned = thread::Builder::new()
                        .name(format!("exec-{name}"))
                        .spawn_scoped(scope, move || {
                            let outcome = job.run(start);
                            let _ = done_tx.send((i, outcome));
                        });
                    match spawned {
                        Ok(_) => running += 1,
                        Err(e) => {
                            let error = format!("starting a thread: {e}");
                            outcomes[i] = Some(not_run(name, start, error));
                        }
                    }
                }
                Err(e) => outcomes[i] = Some(not_run(name, start, format!("{e:#}"))),
            }
        }
        while running > 0 {
            wait_one(&mut outcomes, &mut running);
        }
    });
    names
        .iter()
        .zip(outcomes)
        .map(|(name, outcome)| {
            outcome.unwrap_or_else(|| not_run(name, Instant::now(), "lost its result".into()))
        })
        .collect()
}

fn not_run(guest: &str, start: Instant, error: String) -> Outcome {
    Outcome {
        guest: guest.to_string(),
        code: None,
        seconds: seconds(start),
        error: Some(error),
        log: None,
    }
}

fn seconds(start: Instant) -> f64 {
    (start.elapsed().as_secs_f64() * 1000.0).round() / 1000.0
}

/// A command ready to run in one guest, with the readers of its output.
struct Job {
    guest: String,
    exec: Exec,
    /// Its standard output and error, to print prefixed (none with `--logs`).
    readers: Option<(std::io::PipeReader, std::io::PipeReader, Prefix)>,
    log: Option<PathBuf>,
}

/// What the lines of one guest are printed with, and where.
#[derive(Clone)]
struct Prefix {
    text: String,
    out_to_stderr: bool,
}

/// Prepares `command` for guest `name`: its streams (pipes, or its log file) and its overlay.
fn prepare(root: &HostRoot, name: &str, command: &[OsString], sink: &Sink) -> Result<Job> {
    let exec = Exec::command(command.iter().cloned()).stdin(Stdio::null());
    let (exec, readers, log) = match sink {
        Sink::Logs(dir) => {
            let path = dir.join(format!("{name}.log"));
            let file = std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .custom_flags(nix::libc::O_NOFOLLOW)
                .open(&path)
                .with_context(|| format!("opening the log {}", path.display()))?;
            let copy = file
                .try_clone()
                .with_context(|| format!("opening the log {}", path.display()))?;
            (exec.stdout(copy).stderr(file), None, Some(path))
        }
        Sink::Prefixed { width, to_stderr } => {
            let (out, out_w) = std::io::pipe().context("making a pipe")?;
            let (err, err_w) = std::io::pipe().context("making a pipe")?;
            let prefix = Prefix {
                text: format!("{name:<width$} | "),
                out_to_stderr: *to_stderr,
            };
            (
                exec.stdout(out_w).stderr(err_w),
                Some((out, err, prefix)),
                None,
            )
        }
    };
    Ok(Job {
        guest: name.to_string(),
        exec: guest_exec(root, name, exec)?,
        readers,
        log,
    })
}

impl Job {
    /// Runs the command, printing its output as it comes; its outcome.
    fn run(self, start: Instant) -> Outcome {
        let Job {
            guest,
            exec,
            readers,
            log,
        } = self;
        let (result, printed) = thread::scope(|scope| {
            let relays = readers.map(|(out, err, prefix)| {
                let err_prefix = prefix.clone();
                [
                    scope.spawn(move || relay(out, |line| print_line(&prefix, false, line))),
                    scope.spawn(move || relay(err, |line| print_line(&err_prefix, true, line))),
                ]
            });
            // Returns once the chain is gone; the relays then read to the end of its output.
            let result = exec.run();
            // Both joined (to the end of both streams), the first error kept.
            let printed = relays.map_or(Ok(()), |relays| {
                let [out, err] = relays.map(|relay| relay.join().unwrap_or(Ok(())));
                out.and(err)
            });
            (result, printed)
        });
        let (code, error) = match (result, printed) {
            (Ok(out), Ok(())) => (Some(out.code), None),
            (Ok(out), Err(e)) => (Some(out.code), Some(format!("reading its output: {e}"))),
            (Err(e), _) => (None, Some(format!("{e:#}"))),
        };
        Outcome {
            guest,
            code,
            seconds: seconds(start),
            error,
            log,
        }
    }
}

/// Reads `from` to its end and calls `emit` with each line, without its newline (a line
/// longer than [`MAX_LINE`] in pieces; a last line without newline too).
fn relay(from: impl Read, mut emit: impl FnMut(&[u8])) -> std::io::Result<()> {
    let mut reader = BufReader::with_capacity(MAX_LINE, from);
    let mut line = Vec::new();
    loop {
        let buf = match reader.fill_buf() {
            Ok(buf) => buf,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        if buf.is_empty() {
            break;
        }
        match buf.iter().position(|&b| b == b'\n') {
            Some(i) => {
                line.extend_from_slice(&buf[..i]);
                reader.consume(i + 1);
                emit(&line);
                line.clear();
            }
            None => {
                let n = buf.len().min(MAX_LINE - line.len());
                line.extend_from_slice(&buf[..n]);
                reader.consume(n);
                if line.len() >= MAX_LINE {
                    emit(&line);
                    line.clear();
                }
            }
        }
    }
    if !line.is_empty() {
        emit(&line);
    }
    Ok(())
}

/// Prints one line of a guest's output, prefixed, in one write under the stream's lock (lines
/// of different guests never mix). A closed standard output ends cowherd as `out.rs` does
/// (141); the commands die with it.
fn print_line(prefix: &Prefix, is_stderr: bool, line: &[u8]) {
    let mut text = Vec::with_capacity(prefix.text.len() + line.len() + 1);
    text.extend_from_slice(prefix.text.as_bytes());
    text.extend_from_slice(line);
    text.push(b'\n');
    if is_stderr || prefix.out_to_stderr {
        let mut err = std::io::stderr().lock();
        let _ = err.write_all(&text);
    } else {
        let mut out = std::io::stdout().lock();
        if let Err(e) = out.write_all(&text).and_then(|()| out.flush()) {
            if e.kind() == std::io::ErrorKind::BrokenPipe {
                std::process::exit(141);
            }
            eprintln!("error: writing to stdout: {e}");
            std::process::exit(1);
        }
    }
}

/// The summary table, on standard error.
fn print_summary(outcomes: &[Outcome], succeeded: usize, failed: usize, not_run: usize) {
    let rows: Vec<Vec<String>> = outcomes
        .iter()
        .map(|o| {
            vec![
                o.guest.clone(),
                o.code.map_or("-".into(), |c| c.to_string()),
                format!("{:.2}", o.seconds),
                o.error
                    .as_ref()
                    .map(|e| format!("error: {e}"))
                    .unwrap_or_default(),
            ]
        })
        .collect();
    let mut err = std::io::stderr().lock();
    for line in fmt::table_lines(&["GUEST", "EXIT", "SECONDS", ""], &rows) {
        let _ = writeln!(err, "{line}");
    }
    let _ = writeln!(
        err,
        "{} guests: {succeeded} exited 0, {failed} failed, {not_run} could not run it",
        outcomes.len()
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(input: &[u8]) -> Vec<Vec<u8>> {
        let mut got = Vec::new();
        relay(input, |line| got.push(line.to_vec())).unwrap();
        got
    }

    #[test]
    fn output_is_cut_into_lines_and_a_last_line_without_newline_is_kept() {
        assert_eq!(lines(b"a\nbb\n\nc"), [&b"a"[..], b"bb", b"", b"c"]);
        assert_eq!(lines(b""), Vec::<Vec<u8>>::new());
    }

    #[test]
    fn a_very_long_line_comes_in_pieces() {
        let long = vec![b'x'; MAX_LINE * 2 + 10];
        let got = lines(&long);
        assert_eq!(
            got.iter().map(Vec::len).collect::<Vec<_>>(),
            [MAX_LINE, MAX_LINE, 10]
        );
    }
}
