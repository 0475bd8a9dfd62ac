//! `cowherd`: the command-line shell over the unify and builder libraries.

mod bars;
#[macro_use]
mod out;
mod demo;
mod exec_many;
mod fmt;
mod lifecycle;
mod snapshots;
mod templates;
mod upgrade;

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use clap::{Args, CommandFactory, Parser, Subcommand};
use cowherd_unify::{Access, HostRoot, MountState, UnifyOptions, UnifyReport};

use crate::bars::Bars;

/// Exit code: finished, but some files failed or verify found a problem.
pub(crate) const EXIT_PARTIAL: u8 = 3;
/// Exit code of `exec` when the command could not be started (as `docker run` and `chroot`
/// use 125/126/127 for their own failures).
const EXIT_EXEC_FAILED: u8 = 125;

#[derive(Parser)]
#[command(
    name = "cowherd",
    version,
    about = "Deduplicate near-identical Linux guests into a shared content-addressed store",
    long_about = "Deduplicate near-identical Linux guests (containers, chroots, VServer/OpenVZ-style \
guests) by hardlinking files that are identical in content, owner, mode, mtime and xattrs to one \
shared inode in a content-addressed store.",
    after_help = "Exit codes: 0 done; 1 error; 2 usage error; 3 finished but some files failed \
(each reported) or verify found a problem."
)]
struct Cli {
    /// The host root holding the store, index and guests.
    #[arg(long, global = true, env = "COWHERD_ROOT", default_value = cowherd_unify::DEFAULT_ROOT)]
    root: PathBuf,
    /// No progress bars.
    #[arg(short, long, global = true)]
    quiet: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Create the root's layout and a default policy.toml (safe to run again).
    Init,
    /// Move an existing directory tree in as a guest (a rename: never a copy).
    Adopt {
        /// The tree to adopt; must be a real directory on the root's filesystem.
        path: PathBuf,
        /// The guest's name: 1-64 of a-z A-Z 0-9 . _ -
        #[arg(long, allow_hyphen_values = true)]
        name: String,
        /// Leave an empty directory at PATH and mount the guest's overlay there, so a runtime
        /// that expects the guest at PATH (an LXC rootfs, /var/lib/machines/NAME, a VServer
        /// directory) keeps its configuration.
        #[arg(long)]
        in_place: bool,
        /// Print the new guest's record as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Mount guests' overlays: lower layer base/, upper layer upper/, at rootfs/ (or the
    /// adopt --in-place path).
    #[command(
        long_about = "Mount each guest's overlay (lowerdir=base, upperdir=upper, \
workdir=work, always index=off,metacopy=off,redirect_dir=off) at guests/NAME/rootfs, or at the \
path recorded by `adopt --in-place`. Idempotent: a guest mounted as cowherd mounts it is left \
alone; a mount made with other options or layers is reported and not trusted."
    )]
    Mount {
        #[command(flatten)]
        select: Select,
        /// Before mounting an unmounted guest, fold its upper layer into base and unify it, so
        /// that what it changed is shared again (use it at every restart).
        #[arg(long)]
        fold: bool,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Unmount guests' overlays; refuses while a process uses one, naming it.
    Umount {
        #[command(flatten)]
        select: Select,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Move what stopped guests changed (their upper layer) down into base, so that the next
    /// unify can share it again.
    #[command(
        long_about = "Fold each unmounted guest's upper layer into its base: files, \
symlinks and special files move down (hardlink and rename: never a copy), whiteouts delete what \
they hide, opaque directories replace the base directory, and directories take the upper one's \
owner, mode, mtime and xattrs (never overlayfs's own trusted.overlay.* ones). What the guest \
sees does not change at any instant, even if fold is killed; the next run finishes. Afterwards \
upper/ and work/ are empty. Then `cowherd unify GUEST` shares what can be shared."
    )]
    Fold {
        #[command(flatten)]
        select: Select,
        /// List what would move; change nothing.
        #[arg(short = 'n', long)]
        dry_run: bool,
        /// Print JSON.
        #[arg(long)]
        json: bool,
        /// List every entry folded.
        #[arg(short, long)]
        verbose: bool,
    },
    /// Give an unmounted guest private copies of shared files (the way back from sharing, and
    /// how to edit a file in base safely); the paths are marked private in its guest.toml.
    Split {
        /// The guest.
        guest: String,
        /// Guest-absolute paths (`/usr/bin/ls`); a directory means every shared file below it.
        #[arg(required = true)]
        paths: Vec<String>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Write what a guest sees (base and upper merged) as a standalone tree or tarball, with
    /// every byte, owner, mode, mtime and xattr, to move it to another host.
    Export {
        /// The guest.
        guest: String,
        /// A new directory (its top 0700: it holds the guest's setuid-root files), or with
        /// --tar a new file (0600; `-` for standard output).
        dest: PathBuf,
        /// Write a POSIX tarball (GNU tar, with xattrs, ACLs and nanosecond mtimes).
        #[arg(long)]
        tar: bool,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Remove an unmounted guest; `cowherd gc` then reclaims the objects only it used.
    Destroy {
        /// The guest.
        guest: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Run a command inside a guest, or in several guests at once: pivot_root into its rootfs
    /// in new mount, PID, UTS and IPC namespaces, its own /proc and hostname. One guest: exits
    /// with the command's exit code (128+N if signal N killed it), or 125 if cowherd could not
    /// start it. Several guests (or --all, --logs, --json): a summary; exits 0 if every command
    /// exited 0, else 3.
    ///
    /// A guest that is not mounted is mounted for the command only: its overlay (base, upper,
    /// work, as `cowherd mount` mounts it) is mounted inside the command's own mount namespace,
    /// never on the host, and the kernel drops it when the command ends or cowherd dies. What
    /// the command writes lands in the guest's upper layer either way. cowherd then holds the
    /// root's lock until the commands ended, so no mount, fold or unify of the guest races it.
    ///
    /// Several guests: the command runs in each with standard input /dev/null, --jobs at a time;
    /// each line it prints comes out prefixed with the guest's name (`web01 | …`) as it comes,
    /// its standard output on cowherd's standard output and its standard error on cowherd's
    /// standard error (or with --logs in DIR/GUEST.log). Then a summary on standard error: each
    /// guest's exit code and seconds, or `error: …` where cowherd could not run the command
    /// (--json: as JSON on standard output). An unknown guest or an unusable --logs is an error
    /// before anything runs (exit 1).
    ///
    /// The guest's rootfs is the root of the command's own mount namespace and the host's root
    /// is detached from it: no `..`, chroot or /proc/1/root leads to a host path. The command
    /// gets descriptors 0, 1 and 2 only, and systemd-nspawn's default capabilities less
    /// CAP_SYS_ADMIN, CAP_MKNOD, CAP_DAC_READ_SEARCH and CAP_SYS_BOOT (so no mounting, no new
    /// device nodes, no open_by_handle_at, no kexec). /proc/sys, /proc/sysrq-trigger,
    /// /proc/irq, /proc/bus and /proc/fs are read-only (the host's kernel settings). It runs in
    /// a new session without a controlling terminal, so it cannot push input into the
    /// caller's terminal (TIOCSTI); with one guest its standard input, output and error are
    /// still the caller's, but Ctrl-C and Ctrl-Z reach cowherd, not the command (Ctrl-C kills both;
    /// a shell inside has no job control).
    #[command(after_help = "Examples:
  cowherd exec web01 -- apt-get update
  cowherd exec --all --jobs 4 -- sh -c 'apt-get update && apt-get -y upgrade'
  cowherd exec web01 web02 --logs /var/log/cowherd-upgrade -- apt-get -y upgrade

Still not a security boundary: there is no user namespace, so uid 0 inside is uid 0 on the \
host's kernel. It can open any device node the guest tree holds; it is in the host's network, \
can write to the caller's terminal, and has no seccomp filter. Run only what you would run as \
root on the host. See SECURITY.md.")]
    Exec(exec_many::ExecArgs),
    /// Keep a stopped guest's tree (folded first) as a read-only snapshot made of links;
    /// list and remove snapshots.
    Snapshot(snapshots::SnapshotArgs),
    /// Make a stopped guest's tree exactly a snapshot's again (default: the newest), keeping
    /// the tree it replaces as a new snapshot.
    Rollback(snapshots::RollbackArgs),
    /// Upgrade stopped guests' distribution in one run: a snapshot of each first, each
    /// package list and package file downloaded once for all of them, a guest whose upgrade
    /// fails rolled back, the upgraded files shared again (fold, unify).
    Upgrade(upgrade::UpgradeArgs),
    /// Distro templates: list, show, build into the cache, rebuild, remove, check a file.
    Template {
        #[command(subcommand)]
        command: templates::TemplateCommand,
    },
    /// Make guests from a built template in about a second each: shareable files are new links
    /// to the template's store objects, private files copies; then each gets its own
    /// hostname, machine-id, ssh host keys and random seed.
    Build(templates::BuildArgs),
    /// Import a physical machine (or a tree, or a tarball) as a guest with rsync, with the
    /// fixups a guest needs, then unify it and say how much of it the store held already.
    #[command(
        long_about = "Copy SOURCE into a new guest with rsync -aHAXS --numeric-ids \
--one-file-system, leaving out /proc /sys /dev /run /tmp /mnt /media /lost+found (kept empty), \
swap files and every other mounted filesystem of the source (unless named with \
--include-mount). Then the fixups a guest needs: a neutral /etc/fstab, no udev persistent-net \
rules, no hardware services (hwclock, smartd, gettys on real ttys), guest-style ifupdown \
network configuration; each original kept as NAME.cowherd-orig; the identity (hostname, \
machine-id, ssh host keys) kept. --resync transfers only what changed since (the final pass \
after stopping the source's services) and applies the fixups again."
    )]
    Import(templates::ImportArgs),
    /// Print a systemd unit that mounts a guest before its runtime starts.
    Unit {
        /// The guest.
        guest: String,
        /// The unit runs `mount --fold`: the guest's changes are folded and shared again at
        /// every start.
        #[arg(long)]
        fold: bool,
    },
    /// List guests.
    List {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Link identical files of guests to shared store objects.
    #[command(
        long_about = "Index the guests and replace every eligible file by a hardlink to the store \
object with the same key: BLAKE3 of content, size, mode, uid, gid, mtime and all xattrs. A path is \
replaced by link-to-temporary, re-check, rename: it never disappears, and a file changed since it \
was hashed is left alone. Guests must not be mounted. Which paths may be shared is set by the marker policy \
($ROOT/policy.toml, and [policy] in a guest's guest.toml): private paths are never linked, cow paths \
are shared, immutable paths are shared and get the inode's immutable flag."
    )]
    Unify(UnifyArgs),
    /// Show logical, physical and saved bytes per guest and in total.
    Stats {
        /// Print JSON.
        #[arg(long)]
        json: bool,
        /// Show instead the page cache and inode cache that sharing saves right now, for the
        /// mounted guests.
        #[arg(long)]
        memory: bool,
        /// How many of the most-saving objects to list.
        #[arg(long, default_value_t = 10, value_name = "N", allow_negative_numbers = true,
              value_parser = number_in(0, u64::MAX))]
        top: u64,
    },
    /// Re-hash every store object; report corrupt objects and stale index entries, and with
    /// --repair fix what can be fixed.
    Verify {
        /// Fix what can be fixed: immutable flags set or cleared as the object's name says, an
        /// object changed in place filed under the key of what it holds now, entries of the
        /// store that are not objects moved to store/lost+found, stale index entries rescanned.
        /// No guest file is changed.
        #[arg(long)]
        repair: bool,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// The index ($ROOT/index.db): rebuild it when it was lost or damaged.
    Index {
        #[command(subcommand)]
        command: IndexCommand,
    },
    /// Remove store objects no guest links to any more.
    Gc {
        /// List what would be removed; remove nothing.
        #[arg(short = 'n', long)]
        dry_run: bool,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Build near-identical synthetic guests in a temporary root, unify them, show the savings,
    /// then mount two, write through one, and fold it.
    Demo {
        /// Build the demo root in DIR (must not exist or be empty) and keep it.
        #[arg(long, value_name = "DIR")]
        keep: Option<PathBuf>,
        /// How many guests to generate (1 to 1000).
        #[arg(long, default_value_t = 12, value_name = "N", allow_negative_numbers = true,
              value_parser = number_in(1, 1000))]
        guests: u64,
        /// Print the unify report and stats as JSON.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum IndexCommand {
    /// Make the index again from the store and the guests: every store object re-hashed and
    /// found again by its name, every guest and cached template rescanned (their links to the
    /// store recognised). A damaged index.db is kept aside as index.db.damaged-TIME. No guest
    /// file changes.
    Rebuild {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

/// Which guests a command acts on.
#[derive(Args)]
pub(crate) struct Select {
    /// The guests.
    #[arg(required_unless_present = "all", conflicts_with = "all")]
    guests: Vec<String>,
    /// Every guest (`unify` and `fold`: every unmounted one; the mounted ones are listed).
    #[arg(long)]
    all: bool,
}

impl Select {
    /// The guests named, or with `--all` every guest of the root.
    pub(crate) fn names(&self, root: &HostRoot) -> Result<Vec<String>> {
        Ok(if self.all {
            cowherd_unify::guest_names(root)?
        } else {
            self.guests.clone()
        })
    }
}

#[derive(Args)]
struct UnifyArgs {
    #[command(flatten)]
    select: Select,
    /// Hash and report exactly what would be linked and saved; change nothing.
    #[arg(short = 'n', long)]
    dry_run: bool,
    /// Leave mtime out of the key: files differing only in mtime are shared, and the shared
    /// inode keeps the mtime of the first file stored under that key.
    #[arg(long)]
    ignore_mtime: bool,
    /// Smallest file to link, in bytes (empty files are never linked).
    #[arg(long, default_value_t = 1, value_name = "BYTES", allow_negative_numbers = true,
          value_parser = number_in(0, u64::MAX))]
    min_size: u64,
    /// Most links a store object may have (its st_nlink, counting the store's own name; the
    /// filesystem's limit applies too); past it a second object with the same key is started.
    #[arg(long, value_name = "N", allow_negative_numbers = true,
          value_parser = number_in(2, u64::MAX))]
    max_links: Option<u64>,
    /// Print the summary as JSON.
    #[arg(long)]
    json: bool,
    /// List every path linked (or, with --dry-run, that would be).
    #[arg(short, long)]
    verbose: bool,
}

/// A clap value parser for a whole number from `min` to `max`, whose error says so (`-1`
/// reaches it too, with `allow_negative_numbers`).
pub(crate) fn number_in(
    min: u64,
    max: u64,
) -> impl Fn(&str) -> std::result::Result<u64, String> + Clone + Send + Sync + 'static {
    move |text| {
        text.parse::<u64>()
            .ok()
            .filter(|n| (min..=max).contains(n))
            .ok_or_else(|| match max {
                u64::MAX => format!("give a whole number, {min} or more"),
                _ => format!("give a whole number from {min} to {max}"),
            })
    }
}

/// The command line's subcommands, as far as they are given (`cowherd template build`), for
/// the `--help` a usage error points to.
/// Raises the soft limit of open descriptors to the hard one (best effort).
fn raise_fd_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    if let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE)
        && soft < hard
    {
        let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
    }
}

fn command_path() -> String {
    let cli = Cli::command();
    let mut path = vec!["cowherd".to_string()];
    let mut at = &cli;
    // Arguments need not be UTF-8 (a guest's path): they are read as they are.
    let mut args = std::env::args_os()
        .skip(1)
        .map(|a| a.to_string_lossy().into_owned());
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--" => break,
            "--root" => {
                args.next();
            }
            a if a.starts_with('-') => {}
            a => {
                if let Some(sub) = at.find_subcommand(a) {
                    path.push(a.to_string());
                    at = sub;
                }
            }
        }
    }
    path.join(" ")
}

/// Clap's error message on one line: the error, the lists and tips clap puts under it, the
/// usage, and the `--help` to read.
fn one_line_usage_error(rendered: &str, command: &str) -> String {
    let mut message = String::new();
    let mut usage = None;
    let mut list: Vec<&str> = Vec::new();
    let mut notes: Vec<&str> = Vec::new();
    for line in rendered.lines().map(str::trim).filter(|l| !l.is_empty()) {
        if line.starts_with("For more information") {
            continue;
        }
        if let Some(u) = line.strip_prefix("Usage: ") {
            usage = Some(u);
        } else if message.is_empty() {
            message = line.strip_prefix("error: ").unwrap_or(line).to_string();
        } else if line.starts_with("tip:") || line.starts_with('[') {
            notes.push(line.trim_start_matches('[').trim_end_matches(']'));
        } else {
            list.push(line);
        }
    }
    if !list.is_empty() {
        message = format!("{}: {}", message.trim_end_matches(':'), list.join(", "));
    }
    for note in notes {
        message.push_str("; ");
        message.push_str(note);
    }
    if let Some(usage) = usage {
        message.push_str(&format!("; usage: {usage}"));
    }
    format!("error: {message}; see `{command} --help`")
}

fn main() -> ExitCode {
    // Two arenas: the run's I/O threads allocate little, and unbounded arenas let peak RSS
    // grow with the threads that touched them (see `bound_malloc_arenas`).
    cowherd_unify::bound_malloc_arenas(2);
    // A walk of a hostile tree holds a descriptor a level: take what the hard limit allows.
    raise_fd_limit();
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            use clap::error::ErrorKind;
            if matches!(
                e.kind(),
                ErrorKind::DisplayHelp
                    | ErrorKind::DisplayVersion
                    | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
            ) {
                e.exit();
            }
            eprintln!(
                "{}",
                one_line_usage_error(&e.render().to_string(), &command_path())
            );
            return ExitCode::from(2);
        }
    };
    // `demo` works in a root of its own, `export` writes outside the root: a full or
    // read-only filesystem there is not the root's.
    let root = (!matches!(cli.command, Command::Demo { .. } | Command::Export { .. }))
        .then(|| cli.root.clone());
    match run(cli) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            let message = format!("{e:#}");
            match root.and_then(|root| filesystem_hint(&root, [message.as_str()])) {
                Some(hint) => eprintln!("error: {message}: {hint}"),
                None => eprintln!("error: {message}"),
            }
            ExitCode::from(1)
        }
    }
}

/// What the kernel and SQLite say of a write to a full filesystem (ENOSPC, SQLITE_FULL).
const FULL: [&str; 2] = ["No space left on device", "database or disk is full"];
/// What they say of a write to a read-only filesystem (EROFS, SQLITE_READONLY).
const READ_ONLY: [&str; 2] = ["Read-only file system", "readonly database"];
/// What they say of a write that failed for a reason they do not name: SQLite reports a
/// write refused with EROFS as a "disk I/O error".
const IO_ERROR: [&str; 2] = ["disk I/O error", "Input/output error"];

/// If the error `messages` show the filesystem of `root` full or read-only: one sentence
/// naming the root, what is wrong with its filesystem and what to do, for the error line. A
/// run that failed so left every guest as it was or as a killed run leaves it; the next run
/// finishes the work.
pub(crate) fn filesystem_hint<'a>(
    root: &Path,
    messages: impl IntoIterator<Item = &'a str>,
) -> Option<String> {
    let mut io_error = false;
    for message in messages {
        if let Some(cause) = FULL.iter().find(|m| message.contains(*m)) {
            return Some(format!(
                "the filesystem of {} is full ({cause}): free space on it, then run the command \
                 again",
                root.display()
            ));
        }
        if let Some(cause) = READ_ONLY.iter().find(|m| message.contains(*m)) {
            return Some(read_only_hint(root, &format!("read-only ({cause})")));
        }
        io_error |= IO_ERROR.iter().any(|m| message.contains(m));
    }
    (io_error && read_only_now(root)).then(|| read_only_hint(root, "read-only now"))
}

/// The hint for a root whose filesystem `is` read-only.
fn read_only_hint(root: &Path, is: &str) -> String {
    format!(
        "the filesystem of {} is {is}: make it writable again (after a filesystem error: \
         umount, fsck, mount), then run the command again",
        root.display()
    )
}

/// Whether the filesystem holding `root` is read-only now: mounted `ro`, or turned read-only
/// by the kernel after an error — which ext4 shows as `emergency_ro` among the superblock's
/// options in mountinfo, not in `statvfs`.
fn read_only_now(root: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    let (Ok(meta), Ok(mounts)) = (
        std::fs::metadata(root),
        cowherd_unify::read_mountinfo(Path::new("/proc/self/mountinfo")),
    ) else {
        return false;
    };
    mounts
        .iter()
        .filter(|m| m.st_dev() == meta.dev())
        .any(|m| m.option("ro").is_some() || m.option("emergency_ro").is_some())
}

fn open(root: &Path, access: Access) -> Result<HostRoot> {
    Ok(HostRoot::open(root, access)?)
}

pub(crate) fn print_json(value: &impl serde::Serialize) -> Result<()> {
    outln!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}

/// Refuses a `--root` that is a file, or below one, before anything takes it for a root to
/// make or open.
fn check_root_path(root: &Path) -> Result<()> {
    match std::fs::metadata(root) {
        Ok(m) if !m.is_dir() => bail!(
            "--root {}: not a directory; give the directory of the cowherd root (default {})",
            root.display(),
            cowherd_unify::DEFAULT_ROOT
        ),
        Err(e) if e.kind() == std::io::ErrorKind::NotADirectory => bail!(
            "--root {}: a part of the path is a file, not a directory; give the directory of \
             the cowherd root (default {})",
            root.display(),
            cowherd_unify::DEFAULT_ROOT
        ),
        _ => Ok(()),
    }
}

fn run(cli: Cli) -> Result<u8> {
    if !matches!(cli.command, Command::Demo { .. })
        && let Err(e) = check_root_path(&cli.root)
    {
        if matches!(&cli.command, Command::Exec(args) if args.single()) {
            eprintln!("error: {e:#}");
            return Ok(EXIT_EXEC_FAILED);
        }
        return Err(e);
    }
    let bars = Bars::new(cli.quiet);
    match cli.command {
        Command::Init => {
            let root = HostRoot::init(&cli.root)
                .with_context(|| format!("initialising {}", cli.root.display()))?;
            outln!("initialised {}", root.path().display());
            Ok(0)
        }
        Command::Adopt {
            path,
            name,
            in_place,
            json,
        } => {
            let root = open(&cli.root, Access::Write)?;
            let record = cowherd_unify::adopt(&root, &path, &name, in_place)
                .with_context(|| format!("adopting {} as {name:?}", path.display()))?;
            if json {
                print_json(&record)?;
            } else {
                outln!("adopted {} as guest {name}", path.display());
            }
            Ok(0)
        }
        Command::List { json } => list(&cli.root, json),
        Command::Mount { select, fold, json } => {
            lifecycle::mount(&open(&cli.root, Access::Write)?, &select, fold, json, &bars)
        }
        Command::Umount { select, json } => {
            lifecycle::umount(&open(&cli.root, Access::Write)?, &select, json)
        }
        Command::Fold {
            select,
            dry_run,
            json,
            verbose,
        } => {
            let root = open(&cli.root, Access::Write)?;
            let opts = cowherd_unify::FoldOptions {
                dry_run,
                list_entries: verbose,
            };
            lifecycle::fold(&root, &select, &opts, json)
        }
        Command::Split { guest, paths, json } => {
            lifecycle::split(&open(&cli.root, Access::Write)?, &guest, &paths, json)
        }
        Command::Export {
            guest,
            dest,
            tar,
            json,
        } => lifecycle::export(&open(&cli.root, Access::Write)?, &guest, &dest, tar, json),
        Command::Destroy { guest, json } => {
            lifecycle::destroy(&open(&cli.root, Access::Write)?, &guest, json)
        }
        Command::Exec(args) => exec_many::run(&cli.root, args),
        Command::Snapshot(args) => {
            let access = if args.writes() {
                Access::Write
            } else {
                Access::Read
            };
            snapshots::snapshot(&open(&cli.root, access)?, args)
        }
        Command::Rollback(args) => {
            snapshots::rollback(&open(&cli.root, Access::Write)?, args, &bars)
        }
        Command::Upgrade(args) => upgrade::upgrade(&open(&cli.root, Access::Write)?, args, &bars),
        Command::Template { command } => {
            let access = if command.writes() {
                Access::Write
            } else {
                Access::Read
            };
            templates::run(&open(&cli.root, access)?, command, &bars)
        }
        Command::Build(args) => templates::build(&open(&cli.root, Access::Write)?, args, &bars),
        Command::Import(args) => templates::import(&open(&cli.root, Access::Write)?, args, &bars),
        Command::Unit { guest, fold } => {
            let root = open(&cli.root, Access::Read)?;
            let exe = std::env::current_exe().context("finding the cowherd binary")?;
            out::text(&cowherd_unify::systemd_unit(&root, &guest, &exe, fold)?);
            Ok(0)
        }
        Command::Unify(args) => unify(&cli.root, args, &bars),
        Command::Stats {
            json,
            top,
            memory: true,
        } => {
            let root = open(&cli.root, Access::Read)?;
            let stats = cowherd_unify::memory_stats(&root, usize::try_from(top)?)?;
            if json {
                print_json(&stats)?
            } else {
                print_memory(&stats)
            }
            Ok(0)
        }
        Command::Stats { json, top, .. } => {
            let root = open(&cli.root, Access::Read)?;
            let stats = cowherd_unify::stats(&root, usize::try_from(top)?)?;
            if json {
                print_json(&stats)?
            } else {
                print_stats(&stats)
            }
            Ok(0)
        }
        Command::Verify { repair, json } => {
            let access = if repair { Access::Write } else { Access::Read };
            let root = open(&cli.root, access)?;
            let opts = cowherd_unify::VerifyOptions { repair };
            let report = cowherd_unify::verify(&root, &opts, &bars)?;
            if json {
                print_json(&report)?;
            } else {
                for p in &report.repaired {
                    outln!("repaired {}: {}", p.what, p.problem);
                }
                for p in &report.corrupt {
                    outln!("CORRUPT {}: {}", p.what, p.problem);
                }
                for p in &report.stale {
                    outln!("stale   {}: {}", p.what, p.problem);
                }
                outln!(
                    "checked {} objects ({}): {} corrupt; {} stale index entries; {} repaired",
                    report.objects_checked,
                    fmt::bytes(report.bytes_checked),
                    report.corrupt.len(),
                    report.stale.len(),
                    report.repaired.len(),
                );
            }
            Ok(if report.corrupt.is_empty() {
                0
            } else {
                EXIT_PARTIAL
            })
        }
        Command::Index {
            command: IndexCommand::Rebuild { json },
        } => {
            let (root, mut report) = cowherd_unify::rebuild_index(&cli.root, &bars)
                .with_context(|| format!("rebuilding the index of {}", cli.root.display()))?;
            let trees = templates::rescan_templates(&root, &bars, &mut report)?;
            if json {
                print_json(&serde_json::json!({ "rebuild": report, "template_trees": trees }))?;
            } else {
                if let Some(kept) = &report.damaged_kept_as {
                    outln!("the damaged index was kept as {kept}");
                }
                for p in &report.skipped {
                    outln!("skipped {}: {}", p.what, p.problem);
                }
                for f in &report.failures {
                    outln!("FAILED {f}");
                }
                outln!(
                    "index rebuilt: {} objects ({}) found again, {} immutable flags set again; \
                     {trees} template trees and {} guests rescanned: {} guest files, {} of them \
                     links of store objects",
                    report.objects,
                    fmt::bytes(report.object_bytes),
                    report.flags_restored,
                    report.guests.len(),
                    report.files,
                    report.linked_files,
                );
            }
            Ok(if report.skipped.is_empty() && report.failures.is_empty() {
                0
            } else {
                EXIT_PARTIAL
            })
        }
        Command::Gc { dry_run, json } => {
            let root = open(&cli.root, Access::Write)?;
            let report = cowherd_unify::gc(&root, dry_run)?;
            if json {
                print_json(&report)?;
            } else {
                for name in &report.removed {
                    outln!(
                        "{} {name}",
                        if dry_run { "would remove" } else { "removed" }
                    );
                }
                outln!(
                    "{} {} unreferenced objects ({}); {} objects in use",
                    if dry_run { "would remove" } else { "removed" },
                    report.removed.len(),
                    fmt::bytes(report.removed_bytes),
                    report.kept
                );
            }
            Ok(0)
        }
        Command::Demo { keep, guests, json } => {
            demo::run(keep, usize::try_from(guests)?, json, &bars)
        }
    }
}

fn list(root: &Path, json: bool) -> Result<u8> {
    let root = open(root, Access::Read)?;
    let stats = cowherd_unify::stats(&root, 0)?;
    let mut mounts: std::collections::HashMap<String, MountState> =
        cowherd_unify::mount_states(&root)?.into_iter().collect();
    #[derive(serde::Serialize)]
    struct Row {
        name: String,
        mount: MountState,
        origin: cowherd_unify::Origin,
        created_unix: i64,
        files: u64,
        linked_files: u64,
        logical_bytes: u64,
        last_unify: Option<i64>,
    }
    let mut rows = Vec::new();
    for g in stats.guests {
        let record = cowherd_unify::guest_record(&root, &g.name)?;
        rows.push(Row {
            mount: mounts.remove(&g.name).unwrap_or(MountState::Unmounted),
            name: g.name,
            origin: record.origin,
            created_unix: record.created_unix,
            files: g.files,
            linked_files: g.linked_files,
            logical_bytes: g.logical_bytes,
            last_unify: g.last_unify,
        });
    }
    if json {
        print_json(&rows)?;
    } else {
        let cells: Vec<Vec<String>> = rows
            .iter()
            .map(|r| {
                vec![
                    r.name.clone(),
                    match &r.mount {
                        MountState::Unmounted => "unmounted".into(),
                        MountState::Mounted { path } => format!("mounted {}", path.display()),
                        MountState::Foreign { path, why } => {
                            format!("FOREIGN {} ({why})", path.display())
                        }
                    },
                    format!("{:?}", r.origin.kind).to_lowercase(),
                    r.files.to_string(),
                    r.linked_files.to_string(),
                    fmt::bytes(r.logical_bytes),
                    r.last_unify.map_or("never".into(), fmt::ago),
                ]
            })
            .collect();
        fmt::table(
            &[
                "GUEST", "MOUNT", "ORIGIN", "FILES", "LINKED", "LOGICAL", "UNIFIED",
            ],
            &cells,
        );
    }
    Ok(0)
}

fn unify(root: &Path, args: UnifyArgs, bars: &Bars) -> Result<u8> {
    let root = open(root, Access::Write)?;
    let opts = UnifyOptions {
        dry_run: args.dry_run,
        ignore_mtime: args.ignore_mtime,
        min_size: args.min_size,
        max_links: args.max_links,
        list_paths: args.verbose,
        every_file: false,
    };
    let report = cowherd_unify::unify(&root, &args.select.guests, &opts, bars)?;
    for failure in &report.failures {
        eprintln!("warning: {failure}");
    }
    let errors = report.failures.iter().map(|f| f.error.as_str());
    if let Some(hint) = filesystem_hint(root.path(), errors) {
        eprintln!(
            "warning: {} files not unified: {hint}",
            report.failures.len()
        );
    }
    if args.json {
        print_json(&report)?;
    } else {
        print_unify(&report, args.verbose);
    }
    if report.guests.is_empty() && report.failures.is_empty() && report.skipped_mounted.is_empty() {
        bail!(
            "no guests in {} (adopt one with `cowherd adopt PATH --name NAME`)",
            root.path().display()
        );
    }
    Ok(if report.failures.is_empty() {
        0
    } else {
        EXIT_PARTIAL
    })
}

fn print_unify(r: &UnifyReport, verbose: bool) {
    if verbose {
        for p in &r.linked {
            outln!(
                "{} {}:{} -> {}",
                if r.dry_run { "would link" } else { "linked" },
                p.guest,
                p.path,
                p.object
            );
        }
    }
    let would = if r.dry_run { "would " } else { "" };
    outln!(
        "{} guests: {} files scanned ({} new, {} changed, {} removed)",
        r.guests.len(),
        r.files_scanned,
        r.files_new,
        r.files_changed,
        r.files_removed
    );
    outln!(
        "hashed {} files ({}), {} by partial hash only",
        r.hashed_files,
        fmt::bytes(r.hashed_bytes),
        r.partial_hashed_files
    );
    outln!(
        "{would}link {} files, {would}create {} objects; {would}save {}",
        r.linked_files,
        r.objects_created,
        fmt::bytes(r.saved_bytes)
    );
    if r.skipped_changed > 0 {
        outln!(
            "{} files changed while running and were left alone",
            r.skipped_changed
        );
    }
    flagged_note(&r.skipped_flagged);
    lifecycle::skipped_note(&r.skipped_mounted, "unify");
    if !r.failures.is_empty() {
        outln!("{} failures (see warnings above)", r.failures.len());
    }
}

/// Files shown by name in the human report of the flagged files a run left alone.
const FLAGGED_SHOWN: usize = 10;

/// The files a run found carrying inode flags and left alone (not failures): each is reported
/// by the run that first reads it, so the list is the new ones.
pub(crate) fn flagged_note(flagged: &[cowherd_unify::FlaggedPath]) {
    if flagged.is_empty() {
        return;
    }
    outln!(
        "left alone {} files whose inode carries flags (chattr); such files are not shared:",
        flagged.len()
    );
    for f in flagged.iter().take(FLAGGED_SHOWN) {
        outln!("  {}:{} ({})", f.guest, f.path, f.flags);
    }
    if flagged.len() > FLAGGED_SHOWN {
        outln!(
            "  … and {} more (--json lists them all)",
            flagged.len() - FLAGGED_SHOWN
        );
    }
}

fn print_memory(m: &cowherd_unify::MemoryStats) {
    if m.mounted_guests.is_empty() {
        outln!("no guest is mounted: nothing is read through the store now");
        return;
    }
    outln!(
        "{} mounted guests read {} shared objects; {} of them is in the page cache",
        m.mounted_guests.len(),
        m.objects,
        fmt::bytes(m.resident_bytes)
    );
    outln!(
        "page cache saved now: {} (what separate copies, cached as much, would take more)",
        fmt::bytes(m.page_cache_saved_bytes)
    );
    let per_inode = m
        .inode_object_bytes
        .map(|b| {
            format!(
                ", {} of inode cache at {b} B an inode",
                fmt::bytes(m.inode_cache_saved_bytes.unwrap_or(0))
            )
        })
        .unwrap_or_default();
    outln!(
        "inodes behind their {} files: {} shared instead of {} ({} fewer{per_inode})",
        m.files,
        m.inodes,
        m.inodes_unshared,
        m.inodes_unshared.saturating_sub(m.inodes),
    );
    print_objects(
        ["GUESTS", "CACHED", "SAVED"],
        m.top.iter().map(|o| {
            let cells = [
                o.guests.to_string(),
                fmt::bytes(o.resident_bytes),
                fmt::bytes(o.saved_bytes),
            ];
            (o.object.as_str(), cells, o.example.as_str())
        }),
    );
}

/// Prints a table of store objects (name shortened), three columns of numbers and an example
/// path, after a blank line; nothing when there are none.
fn print_objects<'a>(
    header: [&str; 3],
    objects: impl Iterator<Item = (&'a str, [String; 3], &'a str)>,
) {
    let rows: Vec<Vec<String>> = objects
        .map(|(object, cells, example)| {
            let mut row = vec![object[..16.min(object.len())].to_string()];
            row.extend(cells);
            row.push(example.to_string());
            row
        })
        .collect();
    if !rows.is_empty() {
        outln!();
        let [a, b, c] = header;
        fmt::table(&["OBJECT", a, b, c, "EXAMPLE"], &rows);
    }
}

fn print_stats(s: &cowherd_unify::Stats) {
    let rows: Vec<Vec<String>> = s
        .guests
        .iter()
        .map(|g| {
            vec![
                g.name.clone(),
                g.files.to_string(),
                g.linked_files.to_string(),
                fmt::bytes(g.logical_bytes),
                fmt::bytes(g.private_bytes),
                fmt::bytes(g.shared_bytes),
            ]
        })
        .collect();
    fmt::table(
        &["GUEST", "FILES", "LINKED", "LOGICAL", "PRIVATE", "SHARED"],
        &rows,
    );
    let t = &s.total;
    outln!();
    outln!(
        "total: {} guests, {} files, {} objects; logical {}, physical {}, saved {} (ratio {:.2}x); \
         index {} ({} B per file)",
        t.guests,
        t.files,
        t.objects,
        fmt::bytes(t.logical_bytes),
        fmt::bytes(t.physical_bytes),
        fmt::bytes(t.saved_bytes),
        t.ratio,
        fmt::bytes(t.index_bytes),
        t.index_bytes / t.files.max(1),
    );
    if t.snapshots > 0 {
        outln!(
            "snapshots: {}, holding {} that no guest links (not counted above)",
            t.snapshots,
            fmt::bytes(t.snapshot_bytes)
        );
    }
    print_objects(
        ["LINKS", "SIZE", "SAVED"],
        s.top.iter().map(|o| {
            let cells = [
                o.links.to_string(),
                fmt::bytes(o.size),
                fmt::bytes(o.saved_bytes),
            ];
            (o.object.as_str(), cells, o.example.as_str())
        }),
    );
}
