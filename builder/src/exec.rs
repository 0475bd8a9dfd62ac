//! Running a command inside a guest's root directory: `pivot_root` into it in new mount, PID,
//! UTS and IPC namespaces, the host's root detached, no descriptor but standard input, output
//! and error, a bounded capability set; without `unsafe` and without `fork`.

use std::ffi::OsString;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::{env, fs, thread};

use cowherd_unify::close_on_exec_above_stderr;
use nix::errno::Errno;
use nix::mount::{MntFlags, MsFlags, mount, umount2};
use nix::sched::{CloneFlags, unshare};
use nix::unistd::{Pid, chdir, gettid, pivot_root, sethostname};

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

/// A command to run inside a guest's root directory (see [`Exec::run`]).
#[derive(Clone, Debug)]
pub struct Exec {
    rootfs: PathBuf,
    hostname: String,
    argv: Vec<OsString>,
    capture: bool,
    /// Variables set besides the fixed ones.
    env: Vec<(String, OsString)>,
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
    /// are inherited unless [`capture`](Self::capture) is set.
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
        }
    }

    /// Sets the variable `name` to `value` in the command's environment (a template build's
    /// `SOURCE_DATE_EPOCH`, say).
    #[must_use]
    pub fn env(mut self, name: impl Into<String>, value: impl Into<OsString>) -> Self {
        self.env.push((name.into(), value.into()));
        self
    }

    /// Whether to capture standard output and error into [`ExecOutput`] instead of
    /// inheriting them.
    #[must_use]
    pub fn capture(mut self, capture: bool) -> Self {
        self.capture = capture;
        self
    }

    /// Runs the command and waits for it.
    ///
    /// The command's root directory is the root of its own mount namespace, which holds the
    /// guest's mounts and its own `/proc` and nothing of the host's: no host path can be walked
    /// to (`..`, `chroot`, `/proc/1/root`). It runs in `/`, as PID 1 of a new PID namespace, with
    /// the hostname set in a new UTS namespace, in a new IPC namespace, with no descriptor but
    /// 0, 1 and 2, and with systemd-nspawn's default capabilities less `CAP_SYS_ADMIN`,
    /// `CAP_MKNOD`, `CAP_DAC_READ_SEARCH` and `CAP_SYS_BOOT` (bounding, permitted and effective
    /// sets; the inheritable set empty). Its environment holds only `PATH`, `HOME=/root`,
    /// `TERM`, `LANG`, `LC_ALL` when the caller has them, and what [`env`](Self::env) set. It
    /// is killed if the caller dies first.
    ///
    /// It is still root on the host's kernel (no user namespace), in the host's network, with
    /// no seccomp filter: a confinement of its file-system view, not a security boundary.
    ///
    /// Every descriptor of the calling process above 2 is marked close-on-exec on the way
    /// (those it inherited from its own caller included).
    ///
    /// # Errors
    /// [`Error::EmptyCommand`], [`Error::BadHostname`]; [`Error::NotADirectory`] or
    /// [`Error::NoProc`] for an unusable root directory; [`Error::MissingProgram`] without
    /// util-linux; [`Error::Namespace`] if the namespaces cannot be set up (not root);
    /// [`Error::Io`] if the command cannot be started or waited for. The command failing is not an error: its code is in [`ExecOutput::code`].
    ///
    /// # Algorithm
    /// 1. Every descriptor above 2 is marked close-on-exec (`close_range`).
    /// 2. A first dedicated thread unshares the mount, UTS and IPC namespaces (which affects
    ///    that thread only), makes its whole mount tree private so nothing propagates back to
    ///    the host, sets the hostname, bind-mounts the root directory onto itself (so that it
    ///    is a mount point), and `pivot_root(".", ".")`s into it and detaches the old root
    ///    (`umount2(".", MNT_DETACH)`): its namespace now holds the guest's mounts only. It
    ///    waits there until the command ends.
    /// 3. A second dedicated thread unshares the PID namespace and starts, as that namespace's
    ///    first process (so the command ends up as its PID 1, and its wait status is exact: no
    ///    `fork` in between, util-linux issue 2614), the chain of the host's util-linux
    ///    programs, each `exec`ing the next:
    ///    `setpriv --pdeathsig KILL` (killed if that thread dies);
    ///    `nsenter --mount --uts --ipc` into the first thread's namespaces, with `--root=/`
    ///    keeping the host's root directory (opened before entering, so the next programs are
    ///    still the host's) and `--wd` the guest's root;
    ///    `unshare --mount-proc=./proc` (a private copy of that mount namespace, with the new
    ///    PID namespace's proc mounted on the guest's `/proc`);
    ///    `setpriv --inh-caps -all --bounding-set` the kept capabilities (after the steps that
    ///    need `CAP_SYS_ADMIN`);
    ///    `unshare --root=. --wd=/`, the chroot into the guest's root, which is its namespace's
    ///    root: from here on nothing refers to the host's root;
    ///    then ARGV.
    /// 4. The second thread waits for the command; then the first thread ends, and its
    ///    namespaces with it.
    pub fn run(&self) -> Result<ExecOutput, Error> {
        if self.argv.is_empty() {
            return Err(Error::EmptyCommand);
        }
        if !(1..=MAX_HOSTNAME).contains(&self.hostname.len()) {
            return Err(Error::BadHostname {
                hostname: self.hostname.clone(),
            });
        }
        let root = guest_root(&self.rootfs)?;
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
            let (root, hostname) = (&root, &self.hostname);
            let guest = thread::Builder::new()
                .name("cowherd-guest-ns".into())
                .spawn_scoped(scope, move || {
                    let entered = enter_guest(root, hostname);
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
                        .spawn_scoped(scope, move || self.launch(root, launcher, task))
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

    /// Step 3 of [`run`](Self::run), on a thread of its own whose PID namespace for children
    /// changes: starts the command in the namespaces of `task` (the thread of step 2) and
    /// waits for it.
    fn launch(&self, root: &Path, launcher: &Launcher, task: Pid) -> Result<ExecOutput, Error> {
        unshare(CloneFlags::CLONE_NEWPID).map_err(|errno| Error::Namespace {
            path: root.to_owned(),
            step: "create the PID namespace",
            error: errno.into(),
        })?;
        let task = PathBuf::from(format!("/proc/{}/task/{task}", std::process::id()));
        let output = launcher
            .command(&task, &self.argv, self.capture)
            .envs(self.env.iter().map(|(name, value)| (name, value)))
            .spawn()
            .and_then(std::process::Child::wait_with_output)
            .map_err(|error| Error::Io {
                path: launcher.setpriv.clone(),
                error,
            })?;
        Ok(ExecOutput {
            code: exit_code(output.status),
            stdout: output.stdout,
            stderr: output.stderr,
        })
    }
}

/// Step 2 of [`Exec::run`], on the calling thread, whose namespaces and root directory change
/// for good: new mount, UTS and IPC namespaces whose only mounts are those of `root` (the
/// host's root detached), `root` as the thread's root and working directory, `hostname` set.
/// Returns the thread's id, which names its namespaces under `/proc`.
fn enter_guest(root: &Path, hostname: &str) -> Result<Pid, Error> {
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

/// The host's programs that start a command, as canonical paths.
struct Launcher {
    /// Ties the command's life to the thread that starts it; bounds its capabilities.
    setpriv: PathBuf,
    /// Enters the namespaces prepared for the command.
    nsenter: PathBuf,
    /// Mounts proc; enters the root directory.
    unshare: PathBuf,
}

impl Launcher {
    fn find() -> Result<Self, Error> {
        Ok(Self {
            setpriv: find_program("setpriv")?,
            nsenter: find_program("nsenter")?,
            unshare: find_program("unshare")?,
        })
    }

    /// The chain of step 3 of [`Exec::run`] for the namespaces of the thread `task`
    /// (`/proc/PID/task/TID`), with the command's environment.
    fn command(&self, task: &Path, argv: &[OsString], capture: bool) -> Command {
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
            .arg(&self.nsenter)
            .arg(with("--mount=", task.join("ns/mnt")))
            .arg(with("--uts=", task.join("ns/uts")))
            .arg(with("--ipc=", task.join("ns/ipc")))
            .arg("--root=/")
            .arg(with("--wd=", task.join("root")))
            .arg("--")
            .arg(&self.unshare)
            .args(["--propagation=unchanged", "--mount-proc=./proc", "--"])
            .arg(&self.setpriv)
            .args(["--inh-caps=-all", "--bounding-set"])
            .arg(bounding_set)
            .arg("--")
            .arg(&self.unshare)
            .args(["--root=.", "--wd=/", "--"])
            .args(argv)
            .env_clear()
            .env("PATH", PATH)
            .env("HOME", "/root")
            .envs(
                PASSED_VARS
                    .iter()
                    .filter_map(|&name| Some((name, env::var_os(name)?))),
            );
        if capture {
            command.stdout(Stdio::piped()).stderr(Stdio::piped());
        }
        command
    }
}

/// The canonical path of the guest's root directory, checked to be a directory holding a
/// `proc` directory.
fn guest_root(rootfs: &Path) -> Result<PathBuf, Error> {
    let root = fs::canonicalize(rootfs)
        .ok()
        .filter(|root| root.is_dir())
        .ok_or_else(|| Error::NotADirectory {
            path: rootfs.to_owned(),
        })?;
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
        // The tree's bind mount as the root (no host `/` below it), and the command's proc.
        assert_eq!(points.len(), 2, "{points:?}");
        assert_eq!(points[0].0, Path::new("/"), "{points:?}");
        assert_eq!(points[1], (Path::new("/proc"), "proc"), "{points:?}");
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
