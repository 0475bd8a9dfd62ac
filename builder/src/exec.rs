//! Running a command inside a guest's root directory: `pivot_root` into it in new mount, PID,
//! UTS and IPC namespaces, the host's root detached, no descriptor but standard input, output
//! and error, a bounded capability set, the host's kernel settings under `/proc` read-only, no
//! controlling terminal; without `unsafe` and without `fork`. The root directory is a mounted
//! guest's overlay, or an unmounted guest's overlay mounted in the command's own mount
//! namespace only ([`guest_exec`], [`Exec::overlay`]).

use std::ffi::OsString;
use std::fs::File;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::Duration;
use std::{env, fs, io, thread};

use cowherd_unify::{
    HostRoot, MountState, OverlayLayers, close_on_exec_above_stderr, guest_record, mount_state,
    private_overlay,
};
use nix::errno::Errno;
use nix::fcntl::{OFlag, open};
use nix::mount::{MntFlags, MsFlags, mount, umount2};
use nix::sched::{CloneFlags, setns, unshare};
use nix::sys::stat::Mode;
use nix::sys::statfs::{PROC_SUPER_MAGIC, fstatfs};
use nix::sys::statvfs::{FsFlags, statvfs};
use nix::unistd::{Pid, chdir, fchdir, gettid, pipe2, pivot_root, sethostname, write};

use crate::error::Error;

/// The `PATH` a command runs with; the host's util-linux programs are looked for there too.
const PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// The caller's variables a command inherits when they are set.
const PASSED_VARS: [&str; 3] = ["TERM", "LANG", "LC_ALL"];

/// The longest hostname the kernel accepts (`__NEW_UTS_LEN`).
const MAX_HOSTNAME: usize = 64;

/// The capabilities a command keeps (its bounding, permitted and effective sets), in
/// `setpriv`'s names: systemd-nspawn's default set without the four that, with neither
/// nspawn's seccomp filter nor its device policy beside them, reach the host's disk or kernel
/// directly: `CAP_SYS_ADMIN` (mount a devtmpfs, then the host's disk from it), `CAP_MKNOD` (a
/// node for the host's disk), `CAP_DAC_READ_SEARCH` (`open_by_handle_at` on a host filesystem
/// mounted inside the guest) and `CAP_SYS_BOOT` (`kexec_load`).
const KEPT_CAPABILITIES: [&str; 22] = [
    "audit_control",
    "audit_write",
    "chown",
    "dac_override",
    "fowner",
    "fsetid",
    "ipc_owner",
    "kill",
    "lease",
    "linux_immutable",
    "net_bind_service",
    "net_broadcast",
    "net_raw",
    "setfcap",
    "setgid",
    "setpcap",
    "setuid",
    "sys_chroot",
    "sys_nice",
    "sys_ptrace",
    "sys_resource",
    "sys_tty_config",
];

/// The entries of the command's `/proc` that act on the host's kernel, not on the guest: they
/// are mounted read-only (those the kernel has), as Docker does. `sys` holds
/// `kernel.core_pattern` and `kernel.modprobe`, programs the kernel runs as root on the host;
/// `sysrq-trigger` reboots or crashes the host; `irq`, `bus` and `fs` set up host devices and
/// filesystems.
const READ_ONLY_PROC: [&str; 5] = ["sys", "sysrq-trigger", "irq", "bus", "fs"];

/// The gate of the chain (step 3 of [`Exec::run`]), run by the host's `sh` with the gate's
/// path as `$0` and the rest of the chain as `$@`: it waits for the line `go`, then `exec`s
/// the rest. Anything else (end of file: cowherd died or gave up) ends the chain before the
/// command. Reading builtins and `exec` only: no `fork`, and the redirection's descriptor is
/// closed again before `exec`. It takes away what a shell adds to the environment (`PWD`,
/// `OLDPWD`, `SHLVL`).
const GATE_SCRIPT: &str = "unset PWD OLDPWD SHLVL; \
IFS= read -r word < \"$0\" && [ \"$word\" = go ] && exec \"$@\"; exit 125";

/// The longest pause between two looks at whether the chain reached its gate.
const GATE_POLL_MAX: Duration = Duration::from_millis(5);

/// A command to run inside a guest's root directory (see [`Exec::run`]).
#[derive(Debug)]
pub struct Exec {
    rootfs: PathBuf,
    hostname: String,
    argv: Vec<OsString>,
    capture: bool,
    /// Variables set besides the fixed ones.
    env: Vec<(String, OsString)>,
    /// An overlay to mount on `rootfs` inside the command's mount namespace only.
    overlay: Option<OverlayLayers>,
    /// Standard input, output and error given instead of the caller's.
    stdio: Stdios,
}

/// The standard streams an [`Exec`] was given; `None` inherits the caller's (or, for output
/// and error, a pipe read into [`ExecOutput`] with [`Exec::capture`]).
#[derive(Debug, Default)]
struct Stdios {
    stdin: Option<Stdio>,
    stdout: Option<Stdio>,
    stderr: Option<Stdio>,
}

/// How a command ended, and what it printed if its output was captured.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExecOutput {
    /// The command's exit code, or 128 + N if signal N killed it.
    pub code: i32,
    /// Its standard output (empty unless captured).
    pub stdout: Vec<u8>,
    /// Its standard error (empty unless captured).
    pub stderr: Vec<u8>,
}

impl Exec {
    /// A command `argv` (program first, looked up in the guest's `PATH`) to run with `rootfs`
    /// as its root directory and `hostname` as its hostname. Standard input, output and error
    /// are inherited unless [`capture`](Self::capture) or [`stdin`](Self::stdin),
    /// [`stdout`](Self::stdout), [`stderr`](Self::stderr) say otherwise.
    pub fn new<A: Into<OsString>>(
        rootfs: impl Into<PathBuf>,
        hostname: impl Into<String>,
        argv: impl IntoIterator<Item = A>,
    ) -> Self {
        Self {
            rootfs: rootfs.into(),
            hostname: hostname.into(),
            argv: argv.into_iter().map(Into::into).collect(),
            capture: false,
            env: Vec::new(),
            overlay: None,
            stdio: Stdios::default(),
        }
    }

    /// A command `argv` whose root directory and hostname are not known yet: for
    /// [`guest_exec`] and [`exec_in_guest`], which take them from the guest. Run as it is, it
    /// fails ([`Error::NotADirectory`] for the empty root path).
    pub fn command<A: Into<OsString>>(argv: impl IntoIterator<Item = A>) -> Self {
        Self::new(PathBuf::new(), String::new(), argv)
    }

    /// Sets the variable `name` to `value` in the command's environment (a template build's
    /// `SOURCE_DATE_EPOCH`, say).
    #[must_use]
    pub fn env(mut self, name: impl Into<String>, value: impl Into<OsString>) -> Self {
        self.env.push((name.into(), value.into()));
        self
    }

    /// Whether to capture standard output and error into [`ExecOutput`] instead of
    /// inheriting them (a stream given with [`stdout`](Self::stdout) or
    /// [`stderr`](Self::stderr) goes there instead).
    #[must_use]
    pub fn capture(mut self, capture: bool) -> Self {
        self.capture = capture;
        self
    }

    /// The command's standard input instead of the caller's (`Stdio::null()`, say).
    #[must_use]
    pub fn stdin(mut self, stdin: impl Into<Stdio>) -> Self {
        self.stdio.stdin = Some(stdin.into());
        self
    }

    /// The command's standard output instead of the caller's: a file, or the writing end of
    /// a pipe (`std::io::pipe`) whose reader sees its lines as they come. `run` closes its
    /// own copy once the command started, so the reader sees the end of the file when the
    /// command and everything it left running in its PID namespace ended. `Stdio::piped()`
    /// captures it into [`ExecOutput::stdout`].
    #[must_use]
    pub fn stdout(mut self, stdout: impl Into<Stdio>) -> Self {
        self.stdio.stdout = Some(stdout.into());
        self
    }

    /// The command's standard error instead of the caller's (as [`stdout`](Self::stdout)).
    #[must_use]
    pub fn stderr(mut self, stderr: impl Into<Stdio>) -> Self {
        self.stdio.stderr = Some(stderr.into());
        self
    }

    /// Mounts `layers` (made by [`cowherd_unify::private_overlay`]) on their target inside
    /// the command's own mount namespace, and makes that target the command's root
    /// directory: the overlay exists only in the command's namespaces, never on the host, and
    /// the kernel drops it when they end — when the command ends, or when the caller dies
    /// (the command is killed with it). See step 2 of [`run`](Self::run).
    #[must_use]
    pub fn overlay(mut self, layers: OverlayLayers) -> Self {
        self.rootfs = layers.target().to_owned();
        self.overlay = Some(layers);
        self
    }

    /// Runs the command and waits for it.
    ///
    /// The command's root directory is the root of its own mount namespace, which holds the
    /// guest's mounts and its own `/proc` and nothing of the host's: no host path can be walked
    /// to (`..`, `chroot`, `/proc/1/root`). In that `/proc`, the entries that act on the host's
    /// kernel (`sys`, `sysrq-trigger`, `irq`, `bus`, `fs`) are read-only mounts, made before the
    /// command starts; without `CAP_SYS_ADMIN` it cannot remount or unmount them. It runs in
    /// `/`, as PID 1 of a new PID namespace, with the hostname set in a new UTS namespace, in a
    /// new IPC namespace, in a new session without a controlling terminal (so `TIOCSTI` cannot
    /// push input into the caller's terminal; standard input, output and error are still the
    /// caller's unless given or captured), with no descriptor but 0, 1 and 2, and with systemd-nspawn's default
    /// capabilities less `CAP_SYS_ADMIN`, `CAP_MKNOD`, `CAP_DAC_READ_SEARCH` and `CAP_SYS_BOOT`
    /// (bounding, permitted and effective sets; the inheritable set empty). Its environment
    /// holds only `PATH`, `HOME=/root`, `TERM`, `LANG`, `LC_ALL` when the caller has them, and
    /// what [`env`](Self::env) set, less `PWD`, `OLDPWD` and `SHLVL`. It is killed if the
    /// caller dies first.
    ///
    /// It is still root on the host's kernel (no user namespace), in the host's network, with
    /// no seccomp filter: a confinement of its file-system view, not a security boundary.
    ///
    /// With [`overlay`](Self::overlay), the guest's overlay is mounted inside the command's
    /// mount namespace only: nothing is mounted on the host at any instant, and the mount ends
    /// with the namespaces (the command ending, or the caller dying, which kills the command).
    ///
    /// Every descriptor of the calling process above 2 is marked close-on-exec on the way
    /// (those it inherited from its own caller included).
    ///
    /// # Errors
    /// [`Error::EmptyCommand`], [`Error::BadHostname`]; [`Error::NotADirectory`] or
    /// [`Error::NoProc`] for an unusable root directory (with an overlay: its mount point, and
    /// the merged tree's `proc`); [`Error::MissingProgram`] without util-linux or a shell;
    /// [`Error::Namespace`] if the namespaces cannot be set up (not root), if the overlay
    /// cannot be mounted, if the chain ends before it reaches the command, or if the host's
    /// kernel settings under `/proc` cannot be made read-only (the command is then never
    /// started);
    /// [`Error::Io`] if the command cannot be started or waited for. The command failing is
    /// not an error: its code is in [`ExecOutput::code`].
    ///
    /// # Algorithm
    /// 1. Every descriptor above 2 is marked close-on-exec (`close_range`).
    /// 2. A first dedicated thread unshares the mount, UTS and IPC namespaces (which affects
    ///    that thread only), makes its whole mount tree private so nothing propagates back to
    ///    the host, and, with [`overlay`](Self::overlay), mounts the overlay on the root
    ///    directory there (so it exists in this namespace and in the copies step 3 makes of
    ///    it, nowhere else; a merged tree without `proc/` is refused here). It sets the
    ///    hostname, bind-mounts the root directory onto itself (so that it is a mount point),
    ///    and `pivot_root(".", ".")`s into it and detaches the old root
    ///    (`umount2(".", MNT_DETACH)`): its namespace now holds the guest's mounts only. It
    ///    waits there until the command ends. A namespace lives as long as a thread or
    ///    process is in it: when this thread and the chain are gone, the kernel unmounts the
    ///    overlay.
    /// 3. A second dedicated thread unshares the PID namespace and starts, as that namespace's
    ///    first process (so the command ends up as its PID 1, and its wait status is exact: no
    ///    `fork` in between, util-linux issue 2614), the chain of the host's programs (all
    ///    util-linux but the gate), each `exec`ing the next:
    ///    `setpriv --pdeathsig KILL` (killed if that thread dies);
    ///    `setsid`, a new session without a controlling terminal (the chain's first process
    ///    leads no process group, so `setsid` does not fork);
    ///    `nsenter --mount --uts --ipc` into the first thread's namespaces, with `--root=/`
    ///    keeping the host's root directory (opened before entering, so the next programs are
    ///    still the host's) and `--wd` the guest's root;
    ///    `unshare --mount-proc=./proc` (a private copy of that mount namespace, with the new
    ///    PID namespace's proc mounted on the guest's `/proc`);
    ///    the gate, `sh -c` `GATE_SCRIPT`, which blocks reading a pipe of cowherd's (opened
    ///    by its `/proc/PID/fd/N` path) until step 4 lets it through;
    ///    `setpriv --inh-caps -all --bounding-set` the kept capabilities (after the steps that
    ///    need `CAP_SYS_ADMIN`);
    ///    `unshare --root=. --wd=/`, the chroot into the guest's root, which is its namespace's
    ///    root: from here on nothing refers to the host's root;
    ///    then ARGV.
    /// 4. The second thread polls until the chain is the gate's shell in a mount namespace of
    ///    its own (so proc is mounted: `unshare` `exec`s only after mounting it). It then enters
    ///    that mount namespace itself (`unshare(CLONE_FS)`, `setns`), checks that `/proc` is the
    ///    new PID namespace's proc, bind-mounts each of `READ_ONLY_PROC` onto itself and
    ///    remounts the bind read-only (`MS_BIND | MS_REMOUNT | MS_RDONLY | MS_NOSUID |
    ///    MS_NODEV | MS_NOEXEC`, as systemd-nspawn and Docker do), checks that each is
    ///    read-only, and only then writes `go` into the gate's pipe. If the chain ends before
    ///    the gate, or any of this fails, the chain is killed at the gate: the command never
    ///    runs with a writable `/proc/sys`, and `run` fails.
    ///
    ///    Why this gate: the proc must be mounted by a process of the new PID namespace, and
    ///    the only one is the chain; the read-only mounts must come after it and before the
    ///    command, so the chain has to wait. util-linux `flock --no-fork` would wait, but it
    ///    passes the lock's descriptor on to the command (`--close` cannot be combined with
    ///    it), and only 0, 1 and 2 may reach the command. The shell's `cwd` (the guest's
    ///    root, in another mount namespace) is unreachable from its root (the host's), so the
    ///    chain's environment holds `PWD` = `/proc/PID/task/TID/root` of the first thread (the
    ///    path `--wd` took), which names the same directory from the host's root whether the
    ///    guest's overlay is mounted on the host or only in the command's namespace: the shell
    ///    takes it instead of warning that `getcwd` failed.
    /// 5. The second thread waits for the command; then the first thread ends, and its
    ///    namespaces with it.
    pub fn run(mut self) -> Result<ExecOutput, Error> {
        if self.argv.is_empty() {
            return Err(Error::EmptyCommand);
        }
        if self.rootfs.as_os_str().is_empty() {
            return Err(Error::NotADirectory {
                path: self.rootfs.clone(),
            });
        }
        if !(1..=MAX_HOSTNAME).contains(&self.hostname.len()) {
            return Err(Error::BadHostname {
                hostname: self.hostname.clone(),
            });
        }
        // With an overlay, `proc/` is looked for once it is mounted (step 2).
        let root = guest_root(&self.rootfs, self.overlay.is_none())?;
        let stdio = std::mem::take(&mut self.stdio);
        let this = &self;
        let launcher = Launcher::find()?;
        close_on_exec_above_stderr().map_err(|errno| Error::Namespace {
            path: root.clone(),
            step: "mark inherited descriptors close-on-exec",
            error: errno.into(),
        })?;
        let (ready_tx, ready_rx) = mpsc::channel();
        let (release_tx, release_rx) = mpsc::channel::<()>();
        let spawn_error = |error| Error::Io {
            path: root.clone(),
            error,
        };
        thread::scope(|scope| {
            let (root, hostname, overlay) = (&root, &this.hostname, this.overlay.as_ref());
            let guest = thread::Builder::new()
                .name("cowherd-guest-ns".into())
                .spawn_scoped(scope, move || {
                    let entered = enter_guest(root, hostname, overlay);
                    let wait = entered.is_ok();
                    if ready_tx.send(entered).is_ok() && wait {
                        // Until the command ended (or the caller gave up): its namespaces
                        // are entered by path through this thread.
                        let _ = release_rx.recv();
                    }
                })
                .map_err(spawn_error)?;
            let Ok(entered) = ready_rx.recv() else {
                // The thread ended without answering: it panicked.
                if let Err(panic) = guest.join() {
                    std::panic::resume_unwind(panic);
                }
                return Err(Error::Namespace {
                    path: root.clone(),
                    step: "prepare the namespaces",
                    error: std::io::Error::other("the namespace thread ended early"),
                });
            };
            let launcher = &launcher;
            let launched = entered
                .and_then(|task| {
                    thread::Builder::new()
                        .name("cowherd-exec".into())
                        .spawn_scoped(scope, move || this.launch(root, launcher, task, stdio))
                        .map_err(spawn_error)
                })
                .map(thread::ScopedJoinHandle::join);
            drop(release_tx);
            if let Err(panic) = guest.join() {
                std::panic::resume_unwind(panic);
            }
            launched?.unwrap_or_else(|panic| std::panic::resume_unwind(panic))
        })
    }

    /// Steps 3 to 5 of [`run`](Self::run), on a thread of its own whose PID namespace for
    /// children and, at the gate, mount namespace change: starts the command in the
    /// namespaces of `task` (the thread of step 2), makes the host's kernel settings under
    /// its `/proc` read-only, lets it through the gate and waits for it.
    fn launch(
        &self,
        root: &Path,
        launcher: &Launcher,
        task: Pid,
        stdio: Stdios,
    ) -> Result<ExecOutput, Error> {
        let failed = |step| {
            move |errno: Errno| Error::Namespace {
                path: root.to_owned(),
                step,
                error: errno.into(),
            }
        };
        unshare(CloneFlags::CLONE_NEWPID).map_err(failed("create the PID namespace"))?;
        let (gate_read, gate_write) =
            pipe2(OFlag::O_CLOEXEC).map_err(failed("make the pipe of the command's gate"))?;
        let me = std::process::id();
        let gate = PathBuf::from(format!("/proc/{me}/fd/{}", gate_read.as_raw_fd()));
        let task = PathBuf::from(format!("/proc/{me}/task/{task}"));
        let io_error = |error| Error::Io {
            path: launcher.setpriv.clone(),
            error,
        };
        // The command (and with it the caller's copies of its standard streams) is dropped at
        // the end of this statement: a pipe's reader sees the end when the chain is gone.
        let mut child = launcher
            .command(&task, &gate, self, stdio)
            .spawn()
            .map_err(io_error)?;
        if let Err(error) = open_gate(root, launcher, &task, &mut child, &gate_write) {
            // Still held at the gate (or gone): the command never started.
            let _ = child.kill();
            let _ = child.wait();
            return Err(error);
        }
        let output = child.wait_with_output().map_err(io_error);
        // Open until here: the gate's shell opens the pipe by its path after `go` was
        // written, maybe.
        drop((gate_read, gate_write));
        let output = output?;
        Ok(ExecOutput {
            code: exit_code(output.status),
            stdout: output.stdout,
            stderr: output.stderr,
        })
    }
}

/// Makes `command` (an [`Exec::command`], with its environment and streams) a command for
/// guest `name` of `root`, with the guest's hostname: on its overlay if it is mounted here as
/// cowherd mounts it; if it is not mounted, on its own overlay (base, upper, work) mounted
/// privately for the command ([`cowherd_unify::private_overlay`] prepares it, after checking
/// that no mount namespace of the host uses the guest; [`Exec::overlay`] mounts it), which
/// needs `root` opened with [`cowherd_unify::Access::Write`] and held until the command ended.
/// What the command writes lands in the guest's upper layer either way.
///
/// # Errors
/// [`Error::Unify`]: [`cowherd_unify::Error::NoSuchGuest`] and record errors,
/// [`cowherd_unify::Error::ForeignMount`] for a mount cowherd does not trust,
/// [`cowherd_unify::Error::NeedsLock`] for an unmounted guest of a root opened for reading,
/// [`cowherd_unify::Error::InUse`] or [`cowherd_unify::Error::Mounted`] for an unmounted
/// guest in use in another mount namespace, and the errors of preparing its layers.
pub fn guest_exec(root: &HostRoot, name: &str, command: Exec) -> Result<Exec, Error> {
    let record = guest_record(root, name)?;
    let command = Exec {
        hostname: record.hostname().to_owned(),
        overlay: None,
        ..command
    };
    match mount_state(root, name)? {
        MountState::Mounted { path } => Ok(Exec {
            rootfs: path,
            ..command
        }),
        MountState::Unmounted => Ok(command.overlay(private_overlay(root, name, None)?)),
        MountState::Foreign { path, why } => Err(cowherd_unify::Error::ForeignMount {
            name: name.into(),
            path,
            why,
        }
        .into()),
    }
}

/// Runs `command` (an [`Exec::command`]) in guest `name` of `root` and waits for it: on the
/// guest's mount if it is mounted, else on its overlay mounted privately for the command
/// ([`guest_exec`], then [`Exec::run`]). Nothing is left mounted on the host either way.
///
/// # Errors
/// Those of [`guest_exec`] and [`Exec::run`].
pub fn exec_in_guest(root: &HostRoot, name: &str, command: Exec) -> Result<ExecOutput, Error> {
    guest_exec(root, name, command)?.run()
}

/// Step 4 of [`Exec::run`], on the thread that started `chain`: waits until the chain is at
/// its gate, makes the host's kernel settings under its `/proc` read-only, and writes `go`
/// into the gate's pipe. `task` is the first thread's `/proc` directory.
///
/// # Errors
/// [`Error::Namespace`] if the chain ended before its gate (the launcher failed: its error
/// is on standard error, or in the message when captured) or the mounts failed; the chain is
/// then still at the gate, and the caller kills it.
fn open_gate(
    root: &Path,
    launcher: &Launcher,
    task: &Path,
    chain: &mut Child,
    gate: &OwnedFd,
) -> Result<(), Error> {
    let failed = |step: &'static str| {
        move |error: io::Error| Error::Namespace {
            path: root.to_owned(),
            step,
            error,
        }
    };
    let pid = chain.id();
    let shell = file_id(&launcher.sh).map_err(failed("find the shell of the command's gate"))?;
    let outside = [Path::new("/proc/thread-self/ns/mnt"), &task.join("ns/mnt")]
        .map(file_id)
        .into_iter()
        .collect::<io::Result<Vec<_>>>()
        .map_err(failed("identify the mount namespaces"))?;
    let exe = PathBuf::from(format!("/proc/{pid}/exe"));
    let mnt_ns = PathBuf::from(format!("/proc/{pid}/ns/mnt"));
    let mut pause = Duration::from_micros(50);
    loop {
        if let Some(status) = chain
            .try_wait()
            .map_err(failed("wait for the command's gate"))?
        {
            return Err(ended_before_gate(root, chain, status));
        }
        let at_gate = file_id(&exe).is_ok_and(|id| id == shell)
            && file_id(&mnt_ns).is_ok_and(|id| !outside.contains(&id));
        if at_gate {
            break;
        }
        thread::sleep(pause);
        pause = (pause * 2).min(GATE_POLL_MAX);
    }
    read_only_proc(root, pid)?;
    write(gate, b"go\n")
        .map(drop)
        .map_err(|errno| failed("open the command's gate")(errno.into()))
}

/// The error for a chain that ended (`status`) before its gate, with the last line of its
/// standard error when it was captured.
fn ended_before_gate(root: &Path, chain: &mut Child, status: ExitStatus) -> Error {
    let mut stderr = Vec::new();
    if let Some(mut pipe) = chain.stderr.take() {
        let _ = io::Read::read_to_end(&mut pipe, &mut stderr);
    }
    let stderr = String::from_utf8_lossy(&stderr);
    let said = stderr
        .lines()
        .rev()
        .find(|line| !line.trim().is_empty())
        .map(|line| format!(": {}", line.trim()))
        .unwrap_or_default();
    Error::Namespace {
        path: root.to_owned(),
        step: "start the command",
        error: io::Error::other(format!(
            "the launcher ended with code {} before the command started{said}",
            exit_code(status)
        )),
    }
}

/// Step 4 of [`Exec::run`]: the calling thread enters the mount namespace of the chain `pid`
/// (at its gate, with its PID namespace's proc mounted) and makes each of [`READ_ONLY_PROC`]
/// there a read-only mount. The thread's root and working directory change for good.
///
/// # Errors
/// [`Error::Namespace`] naming the step that failed, or `/proc` not being the chain's proc.
fn read_only_proc(root: &Path, pid: u32) -> Result<(), Error> {
    let failed = |step: &'static str| {
        move |error: io::Error| Error::Namespace {
            path: root.to_owned(),
            step,
            error,
        }
    };
    let errno = |step| move |errno: Errno| failed(step)(errno.into());
    let mnt_ns = File::open(format!("/proc/{pid}/ns/mnt"))
        .map_err(failed("open the command's mount namespace"))?;
    let pid_ns = file_id(Path::new(&format!("/proc/{pid}/ns/pid")))
        .map_err(failed("identify the command's PID namespace"))?;
    // `setns` into a mount namespace needs a thread whose root and working directory are its
    // own.
    unshare(CloneFlags::CLONE_FS).map_err(errno("unshare the file-system attributes"))?;
    setns(&mnt_ns, CloneFlags::CLONE_NEWNS)
        .map_err(errno("enter the command's mount namespace"))?;
    let proc = open(
        "/proc",
        OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(errno("open the command's /proc"))?;
    let is_proc = fstatfs(&proc)
        .map_err(errno("open the command's /proc"))?
        .filesystem_type()
        == PROC_SUPER_MAGIC;
    fchdir(&proc).map_err(errno("enter the command's /proc"))?;
    // Its PID 1 is the chain: it is the new PID namespace's proc.
    if !is_proc || file_id(Path::new("1/ns/pid")).ok() != Some(pid_ns) {
        return Err(failed("find the command's /proc")(io::Error::other(
            "/proc is not the proc of the command's PID namespace",
        )));
    }
    let read_only = MsFlags::MS_BIND
        | MsFlags::MS_REMOUNT
        | MsFlags::MS_RDONLY
        | MsFlags::MS_NOSUID
        | MsFlags::MS_NODEV
        | MsFlags::MS_NOEXEC;
    let step = "make the host's kernel settings under /proc read-only";
    for name in READ_ONLY_PROC {
        match fs::symlink_metadata(name) {
            Ok(_) => {}
            Err(error) if error.kind() == io::ErrorKind::NotFound => continue,
            Err(error) => return Err(failed(step)(error)),
        }
        let at = |error: Errno| {
            failed(step)(io::Error::new(
                io::Error::from(error).kind(),
                format!("/proc/{name}: {error}"),
            ))
        };
        mount(
            Some(name),
            name,
            None::<&str>,
            MsFlags::MS_BIND,
            None::<&str>,
        )
        .map_err(at)?;
        mount(None::<&str>, name, None::<&str>, read_only, None::<&str>).map_err(at)?;
        if !statvfs(name)
            .map_err(at)?
            .flags()
            .contains(FsFlags::ST_RDONLY)
        {
            return Err(at(Errno::EROFS));
        }
    }
    Ok(())
}

/// The device and inode numbers of `path` (symbolic links followed).
fn file_id(path: &Path) -> io::Result<(u64, u64)> {
    fs::metadata(path).map(|meta| (meta.dev(), meta.ino()))
}

/// Step 2 of [`Exec::run`], on the calling thread, whose namespaces and root directory change
/// for good: new mount, UTS and IPC namespaces whose only mounts are those of `root` (the
/// host's root detached; `overlay` mounted on it first, in these namespaces only), `root` as
/// the thread's root and working directory, `hostname` set. Returns the thread's id, which
/// names its namespaces under `/proc`.
fn enter_guest(root: &Path, hostname: &str, overlay: Option<&OverlayLayers>) -> Result<Pid, Error> {
    let failed = |step| {
        move |errno: Errno| Error::Namespace {
            path: root.to_owned(),
            step,
            error: errno.into(),
        }
    };
    unshare(CloneFlags::CLONE_NEWNS | CloneFlags::CLONE_NEWUTS | CloneFlags::CLONE_NEWIPC)
        .map_err(failed("create namespaces"))?;
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None::<&str>,
    )
    .map_err(failed("make the mount tree private"))?;
    if let Some(layers) = overlay {
        mount(
            Some("cowherd"),
            layers.target(),
            Some("overlay"),
            MsFlags::empty(),
            Some(layers.mount_data().as_os_str()),
        )
        .map_err(failed("mount the guest's overlay"))?;
        let proc = root.join("proc");
        if !fs::symlink_metadata(&proc).is_ok_and(|meta| meta.is_dir()) {
            return Err(Error::NoProc { path: proc });
        }
    }
    sethostname(hostname).map_err(failed("set the hostname"))?;
    mount(
        Some(root),
        root,
        None::<&str>,
        MsFlags::MS_BIND | MsFlags::MS_REC,
        None::<&str>,
    )
    .map_err(failed("bind-mount the root directory onto itself"))?;
    chdir(root).map_err(failed("enter the root directory"))?;
    // The old root ends up stacked on the new one, both at `.`: detaching `.` takes it away.
    pivot_root(".", ".").map_err(failed("pivot_root into the root directory"))?;
    umount2(".", MntFlags::MNT_DETACH).map_err(failed("detach the host's root directory"))?;
    chdir("/").map_err(failed("enter the new root directory"))?;
    Ok(gettid())
}

/// The host's programs that start a command, as canonical paths (but the shell).
struct Launcher {
    /// Ties the command's life to the thread that starts it; bounds its capabilities.
    setpriv: PathBuf,
    /// Starts a new session, without a controlling terminal.
    setsid: PathBuf,
    /// Enters the namespaces prepared for the command.
    nsenter: PathBuf,
    /// Mounts proc; enters the root directory.
    unshare: PathBuf,
    /// Runs the gate ([`GATE_SCRIPT`]); named `sh` (not canonical) so that a `bash` there runs
    /// in its POSIX mode, without startup files.
    sh: PathBuf,
}

impl Launcher {
    fn find() -> Result<Self, Error> {
        Ok(Self {
            setpriv: find_program("setpriv")?,
            setsid: find_program("setsid")?,
            nsenter: find_program("nsenter")?,
            unshare: find_program("unshare")?,
            sh: env::split_paths(PATH)
                .map(|dir| dir.join("sh"))
                .find(|path| path.is_file())
                .ok_or(Error::MissingProgram {
                    program: "sh",
                    package: "dash",
                })?,
        })
    }

    /// The chain of step 3 of [`Exec::run`] for the namespaces of the thread `task`
    /// (`/proc/PID/task/TID`), with `gate` the path of the gate's pipe, and `exec`'s command,
    /// environment and standard streams.
    fn command(&self, task: &Path, gate: &Path, exec: &Exec, stdio: Stdios) -> Command {
        let with = |option: &str, path: PathBuf| {
            let mut arg = OsString::from(option);
            arg.push(path);
            arg
        };
        let bounding_set = KEPT_CAPABILITIES
            .iter()
            .fold(String::from("-all"), |set, cap| set + ",+" + cap);
        let mut command = Command::new(&self.setpriv);
        command
            .args(["--pdeathsig", "KILL", "--"])
            .arg(&self.setsid)
            .arg("--")
            .arg(&self.nsenter)
            .arg(with("--mount=", task.join("ns/mnt")))
            .arg(with("--uts=", task.join("ns/uts")))
            .arg(with("--ipc=", task.join("ns/ipc")))
            .arg("--root=/")
            .arg(with("--wd=", task.join("root")))
            .arg("--")
            .arg(&self.unshare)
            .args(["--propagation=unchanged", "--mount-proc=./proc", "--"])
            .arg(&self.sh)
            .args(["-c", GATE_SCRIPT])
            .arg(gate)
            .arg(&self.setpriv)
            .args(["--inh-caps=-all", "--bounding-set"])
            .arg(bounding_set)
            .arg("--")
            .arg(&self.unshare)
            .args(["--root=.", "--wd=/", "--"])
            .args(&exec.argv)
            .env_clear()
            .env("PATH", PATH)
            .env("HOME", "/root")
            .envs(
                PASSED_VARS
                    .iter()
                    .filter_map(|&name| Some((name, env::var_os(name)?))),
            )
            .envs(exec.env.iter().map(|(name, value)| (name, value)))
            // For the gate's shell, which takes it away again.
            .env("PWD", task.join("root"));
        if exec.capture {
            command.stdout(Stdio::piped()).stderr(Stdio::piped());
        }
        if let Some(stdin) = stdio.stdin {
            command.stdin(stdin);
        }
        if let Some(stdout) = stdio.stdout {
            command.stdout(stdout);
        }
        if let Some(stderr) = stdio.stderr {
            command.stderr(stderr);
        }
        command
    }
}

/// The canonical path of the guest's root directory, checked to be a directory holding (if
/// `with_proc`) a `proc` directory.
fn guest_root(rootfs: &Path, with_proc: bool) -> Result<PathBuf, Error> {
    let root = fs::canonicalize(rootfs)
        .ok()
        .filter(|root| root.is_dir())
        .ok_or_else(|| Error::NotADirectory {
            path: rootfs.to_owned(),
        })?;
    if !with_proc {
        return Ok(root);
    }
    let proc = root.join("proc");
    if !fs::symlink_metadata(&proc).is_ok_and(|meta| meta.is_dir()) {
        return Err(Error::NoProc { path: proc });
    }
    Ok(root)
}

/// The canonical path of the host's `program`, from the directories of [`PATH`].
fn find_program(program: &'static str) -> Result<PathBuf, Error> {
    env::split_paths(PATH)
        .filter_map(|dir| fs::canonicalize(dir.join(program)).ok())
        .find(|path| path.is_file())
        .ok_or(Error::MissingProgram {
            program,
            package: "util-linux",
        })
}

/// The shell's convention: the exit code, or 128 + N for a death by signal N.
fn exit_code(status: ExitStatus) -> i32 {
    // Without WUNTRACED, a waited-for process either exited or was killed by a signal.
    status
        .code()
        .unwrap_or_else(|| 128 + status.signal().unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;
    use cowherd_unify::{MountEntry, read_mountinfo};
    use nix::sys::signal::{Signal, kill};
    use nix::sys::stat::Mode;
    use nix::unistd::{Pid, geteuid, gethostname, mkfifo};
    use std::io::Write;
    use std::time::{Duration, Instant};
    use tempfile::TempDir;

    /// The programs copied into a test guest, with their shared libraries.
    const PROGRAMS: [&str; 4] = ["/bin/sh", "/bin/cat", "/bin/ls", "/bin/hostname"];

    const HOSTNAME: &str = "guest-1";

    /// The variable that tells [`blocked_caller`] which tree to run in.
    const CALLER_TREE: &str = "COWHERD_EXEC_TEST_TREE";

    /// A minimal guest tree: [`PROGRAMS`], their libraries, an empty `proc/` and a fifo
    /// `gate` (see [`gated`]).
    fn guest_tree() -> TempDir {
        assert!(
            geteuid().is_root(),
            "these tests create namespaces and mounts: run them as root"
        );
        let tree = tempfile::tempdir().expect("temporary directory");
        for program in PROGRAMS {
            copy_in(tree.path(), Path::new(program));
            for library in libraries(program) {
                copy_in(tree.path(), &library);
            }
        }
        fs::create_dir(tree.path().join("proc")).expect("mkdir proc");
        mkfifo(&tree.path().join("gate"), Mode::S_IRUSR | Mode::S_IWUSR).expect("mkfifo");
        tree
    }

    /// The absolute paths `ldd` lists for `program` (libraries and the dynamic loader).
    fn libraries(program: &str) -> Vec<PathBuf> {
        let out = Command::new("ldd").arg(program).output().expect("ldd runs");
        assert!(out.status.success(), "ldd {program}: {out:?}");
        String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .filter(|word| word.starts_with('/'))
            .map(PathBuf::from)
            .collect()
    }

    /// Copies the host's `file` to the same path inside `tree`.
    fn copy_in(tree: &Path, file: &Path) {
        let dest = tree.join(file.strip_prefix("/").expect("absolute path"));
        fs::create_dir_all(dest.parent().expect("a parent")).expect("mkdir -p");
        fs::copy(file, &dest).unwrap_or_else(|e| panic!("copy {}: {e}", file.display()));
    }

    fn run_script(tree: &Path, script: &str) -> ExecOutput {
        let out = Exec::new(tree, HOSTNAME, ["sh", "-c", script])
            .capture(true)
            .run()
            .expect("exec runs");
        assert!(
            out.stderr.is_empty(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        out
    }

    fn stdout(out: &ExecOutput) -> &str {
        std::str::from_utf8(&out.stdout).expect("UTF-8 output")
    }

    /// A script that blocks reading the tree's fifo `/gate`; the comment makes its command
    /// line unique to the tree.
    fn gated(tree: &Path) -> String {
        format!("read line < /gate # {}", tree.display())
    }

    /// The host pid of the process running `sh -c script`, polled for until it appears or
    /// `ended` says it never will.
    fn find_command(script: &str, mut ended: impl FnMut() -> bool) -> Option<Pid> {
        let cmdline = [b"sh\0-c\0", script.as_bytes(), b"\0"].concat();
        let deadline = Instant::now() + Duration::from_secs(10);
        while !ended() {
            let found = fs::read_dir("/proc")
                .expect("read /proc")
                .flatten()
                .find(|entry| {
                    fs::read(entry.path().join("cmdline")).is_ok_and(|line| line == cmdline)
                });
            if let Some(entry) = found {
                let pid = entry
                    .file_name()
                    .to_str()
                    .and_then(|name| name.parse().ok());
                return Some(Pid::from_raw(pid.expect("a pid directory")));
            }
            assert!(Instant::now() < deadline, "the command did not start");
            thread::sleep(Duration::from_millis(10));
        }
        None
    }

    /// A command running in a guest, blocked on its `/gate` until released.
    struct Blocked {
        gate: PathBuf,
        /// The command, PID 1 of its namespace.
        pid: Pid,
        thread: thread::JoinHandle<Result<ExecOutput, Error>>,
    }

    impl Blocked {
        fn start(tree: &Path) -> Self {
            let script = gated(tree);
            let exec = Exec::new(tree, HOSTNAME, ["sh", "-c", &script]).capture(true);
            let thread = thread::spawn(move || exec.run());
            match find_command(&script, || thread.is_finished()) {
                Some(pid) => Self {
                    gate: tree.join("gate"),
                    pid,
                    thread,
                },
                None => panic!("the command ended early: {:?}", thread.join()),
            }
        }

        /// Opens the gate and waits for the command.
        fn release(self) -> ExecOutput {
            fs::OpenOptions::new()
                .write(true)
                .open(&self.gate)
                .and_then(|mut gate| gate.write_all(b"\n"))
                .expect("write the gate");
            self.finish()
        }

        fn finish(self) -> ExecOutput {
            self.thread.join().expect("no panic").expect("exec runs")
        }
    }

    /// Every mount of `pid`'s mount namespace: its root directory is the namespace's root,
    /// so its mountinfo, read from the host, hides none.
    fn namespace_mounts(pid: Pid) -> Vec<MountEntry> {
        read_mountinfo(Path::new(&format!("/proc/{pid}/mountinfo"))).expect("read its mountinfo")
    }

    fn host_mounts() -> Vec<MountEntry> {
        read_mountinfo(Path::new("/proc/self/mountinfo")).expect("read mountinfo")
    }

    /// Unmounts a test mount from the host even if the test fails.
    struct Mounted<'a>(&'a Path);

    impl Drop for Mounted<'_> {
        fn drop(&mut self) {
            let _ = umount2(self.0, MntFlags::MNT_DETACH);
        }
    }

    #[test]
    fn exec_sees_the_guest_hostname_and_files_not_the_hosts() {
        let tree = guest_tree();
        fs::create_dir(tree.path().join("etc")).unwrap();
        fs::write(tree.path().join("etc/guest-marker"), "in the guest\n").unwrap();
        let host_only = tempfile::NamedTempFile::new().unwrap();
        let host_name = gethostname().unwrap();
        let script = format!(
            "cat /etc/guest-marker; hostname; pwd; [ -e {} ] && echo visible || echo hidden",
            host_only.path().display()
        );
        let out = run_script(tree.path(), &script);
        assert_eq!(stdout(&out), "in the guest\nguest-1\n/\nhidden\n");
        assert_eq!(out.code, 0);
        assert_eq!(gethostname().unwrap(), host_name);
    }

    #[test]
    fn exec_runs_as_pid_1_with_its_own_proc() {
        let tree = guest_tree();
        let out = run_script(tree.path(), "echo $$; ls /proc");
        let mut lines = stdout(&out).lines();
        assert_eq!(lines.next(), Some("1"));
        let pids = lines.filter(|name| name.parse::<u32>().is_ok()).count();
        assert!((1..=2).contains(&pids), "{}", stdout(&out));
    }

    #[test]
    fn exec_gets_a_clean_environment() {
        let tree = guest_tree();
        let out = run_script(tree.path(), "echo $PATH; echo $HOME; echo ${CARGO:-unset}");
        assert_eq!(stdout(&out), format!("{PATH}\n/root\nunset\n"));
    }

    #[test]
    fn exec_passes_the_exit_code_through() {
        let tree = guest_tree();
        assert_eq!(run_script(tree.path(), "exit 7").code, 7);
        let missing = Exec::new(tree.path(), HOSTNAME, ["no-such-program"]).capture(true);
        assert_eq!(missing.run().unwrap().code, 127);
        // PID 1 ignores signals sent from inside its namespace: kill a child of it.
        let killed = Exec::new(tree.path(), HOSTNAME, ["sh", "-c", "sh -c 'kill -9 $$'"]);
        assert_eq!(killed.capture(true).run().unwrap().code, 137);
    }

    #[test]
    fn exec_reports_a_command_killed_by_a_signal_as_128_plus_the_signal() {
        let tree = guest_tree();
        let blocked = Blocked::start(tree.path());
        kill(blocked.pid, Signal::SIGKILL).expect("kill the command");
        let out = blocked.finish();
        assert_eq!(out.code, 137, "{}", String::from_utf8_lossy(&out.stderr));
    }

    #[test]
    fn exit_codes_follow_the_shells_convention() {
        assert_eq!(exit_code(ExitStatus::from_raw(7 << 8)), 7);
        assert_eq!(exit_code(ExitStatus::from_raw(Signal::SIGTERM as i32)), 143);
    }

    /// Not a test of its own: the caller that [`exec_kills_the_command_when_its_caller_dies`]
    /// starts (with [`CALLER_TREE`] set) and kills. Run plainly, it has nothing to do.
    #[test]
    fn blocked_caller() {
        let Some(tree) = env::var_os(CALLER_TREE).map(PathBuf::from) else {
            return;
        };
        let out = Exec::new(&tree, HOSTNAME, ["sh", "-c", &gated(&tree)]).run();
        panic!("the command ended while its caller lived: {out:?}");
    }

    #[test]
    fn exec_kills_the_command_when_its_caller_dies() {
        let tree = guest_tree();
        let mut caller = Command::new(env::current_exe().unwrap())
            .args(["--exact", "exec::tests::blocked_caller"])
            .env(CALLER_TREE, tree.path())
            .stdout(Stdio::null())
            .spawn()
            .expect("start the caller");
        let ended = || caller.try_wait().expect("poll the caller").is_some();
        let pid = find_command(&gated(tree.path()), ended).expect("the caller runs it");
        caller.kill().expect("kill the caller");
        caller.wait().expect("reap the caller");
        // Gone, or a zombie the host's init has yet to reap.
        let alive = || {
            fs::read_to_string(format!("/proc/{pid}/stat"))
                .is_ok_and(|stat| !stat.rsplit(')').next().unwrap_or("").starts_with(" Z"))
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while alive() && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(10));
        }
        let survived = alive();
        if survived {
            // It would hold the test harness's stderr open forever.
            let _ = kill(pid, Signal::SIGKILL);
        }
        assert!(!survived, "the command outlived its caller");
    }

    #[test]
    fn exec_leaves_no_mount_on_the_host() {
        let tree = guest_tree();
        let root = fs::canonicalize(tree.path()).unwrap();
        let under_tree = || -> Vec<MountEntry> {
            let mounts = host_mounts().into_iter();
            mounts
                .filter(|m| m.mount_point.starts_with(&root))
                .collect()
        };
        let blocked = Blocked::start(tree.path());
        let during = under_tree();
        assert_eq!(blocked.release().code, 0);
        assert_eq!(during, vec![]);
        assert_eq!(under_tree(), vec![]);
    }

    #[test]
    fn exec_leaves_only_the_guests_mounts_and_its_proc_in_its_namespace() {
        let tree = guest_tree();
        let outside = tempfile::tempdir().unwrap();
        let tmpfs = Some("tmpfs");
        mount(tmpfs, outside.path(), tmpfs, MsFlags::empty(), None::<&str>).expect("mount");
        let _mounted = Mounted(outside.path());
        assert!(
            host_mounts()
                .iter()
                .any(|m| m.mount_point == outside.path())
        );

        let blocked = Blocked::start(tree.path());
        let inside = namespace_mounts(blocked.pid);
        assert_eq!(blocked.release().code, 0);

        let points: Vec<(&Path, &str)> = inside
            .iter()
            .map(|m| (m.mount_point.as_path(), m.fstype.as_str()))
            .collect();
        // The tree's bind mount as the root (no host `/` below it), the command's proc, and
        // the read-only parts of that proc.
        let read_only = read_only_proc_points();
        assert_eq!(points.len(), 2 + read_only.len(), "{points:?}");
        assert_eq!(points[0].0, Path::new("/"), "{points:?}");
        assert_eq!(points[1], (Path::new("/proc"), "proc"), "{points:?}");
        for (point, expected) in points[2..].iter().zip(&read_only) {
            assert_eq!(*point, (expected.as_path(), "proc"), "{points:?}");
        }
    }

    /// The mount points of [`READ_ONLY_PROC`] inside exec, for the entries the host's kernel
    /// has.
    fn read_only_proc_points() -> Vec<PathBuf> {
        READ_ONLY_PROC
            .iter()
            .map(|name| Path::new("/proc").join(name))
            .filter(|path| fs::symlink_metadata(path).is_ok())
            .collect()
    }

    /// The mount points of `pid`'s namespace whose per-mount options make them read-only.
    fn read_only_mounts(pid: Pid) -> Vec<PathBuf> {
        let mountinfo = fs::read_to_string(format!("/proc/{pid}/mountinfo")).expect("mountinfo");
        mountinfo
            .lines()
            .filter_map(|line| {
                let fields: Vec<&str> = line.split(' ').collect();
                let read_only = fields.get(5)?.split(',').any(|option| option == "ro");
                read_only.then(|| PathBuf::from(fields[4]))
            })
            .collect()
    }

    #[test]
    fn exec_mounts_the_hosts_kernel_settings_read_only_before_the_command_starts() {
        let tree = guest_tree();
        let blocked = Blocked::start(tree.path());
        let read_only = read_only_mounts(blocked.pid);
        let out = blocked.release();
        assert_eq!(out.code, 0);
        assert!(
            read_only.contains(&PathBuf::from("/proc/sys")),
            "{read_only:?}"
        );
        assert_eq!(read_only, read_only_proc_points());
        // From inside, as the command's first act, again and again (no race with the mounts):
        // a sysctl cannot be opened for writing, whatever its mode says.
        for _ in 0..10 {
            let out = run_script(
                tree.path(),
                "(true > /proc/sys/kernel/core_pattern) 2>&1 && echo writable || echo refused",
            );
            assert!(
                stdout(&out).ends_with("Read-only file system\nrefused\n"),
                "{}",
                stdout(&out)
            );
        }
    }

    #[test]
    fn exec_runs_the_command_without_a_controlling_terminal_in_a_session_of_its_own() {
        let tree = guest_tree();
        // /proc/self/stat: pid (comm) state ppid pgrp session tty_nr …
        let out = run_script(tree.path(), "cat /proc/self/stat");
        let stat = stdout(&out);
        let fields: Vec<&str> = stat
            .rsplit(')')
            .next()
            .unwrap()
            .split_whitespace()
            .collect();
        // `cat` is a child of the command (PID 1), which leads its process group and its
        // session; no controlling terminal (tty_nr 0).
        assert_eq!(&fields[1..5], ["1", "1", "1", "0"], "{stat}");
    }

    #[test]
    fn an_empty_command_is_refused() {
        let err = Exec::new("/", HOSTNAME, Vec::<OsString>::new())
            .run()
            .unwrap_err();
        assert!(matches!(err, Error::EmptyCommand), "{err}");
    }

    #[test]
    fn a_missing_root_directory_is_named() {
        let tree = tempfile::tempdir().unwrap();
        let missing = tree.path().join("missing");
        let err = Exec::new(&missing, HOSTNAME, ["true"]).run().unwrap_err();
        assert!(
            matches!(&err, Error::NotADirectory { path } if *path == missing),
            "{err}"
        );
        assert!(err.to_string().contains(&*missing.to_string_lossy()));
    }

    #[test]
    fn a_tree_without_proc_is_refused_with_the_fix() {
        let tree = tempfile::tempdir().unwrap();
        let err = Exec::new(tree.path(), HOSTNAME, ["true"])
            .run()
            .unwrap_err();
        let proc = fs::canonicalize(tree.path()).unwrap().join("proc");
        assert!(
            matches!(&err, Error::NoProc { path } if *path == proc),
            "{err}"
        );
        assert!(err.to_string().contains("mkdir"), "{err}");
        assert!(!proc.exists());
    }

    #[test]
    fn a_hostname_the_kernel_refuses_is_refused_first() {
        let long = "h".repeat(MAX_HOSTNAME + 1);
        let err = Exec::new("/", long, ["true"]).run().unwrap_err();
        assert!(matches!(err, Error::BadHostname { .. }), "{err}");
    }
}
