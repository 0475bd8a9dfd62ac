//! Running a command inside a guest's root directory, in its own mount, PID, UTS and IPC
//! namespaces, without `unsafe` and without `fork`.

use std::cmp::Reverse;
use std::ffi::OsString;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::{env, fs, thread};

use cowherd_unify::read_mountinfo;
use nix::errno::Errno;
use nix::mount::{MntFlags, MsFlags, mount, umount2};
use nix::sched::{CloneFlags, unshare};
use nix::unistd::sethostname;

use crate::error::Error;

/// The `PATH` a command runs with; the host's util-linux programs are looked for there too.
const PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// The caller's variables a command inherits when they are set.
const PASSED_VARS: [&str; 3] = ["TERM", "LANG", "LC_ALL"];

/// The longest hostname the kernel accepts (`__NEW_UTS_LEN`).
const MAX_HOSTNAME: usize = 64;

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
    /// The command runs chrooted into the root directory, in `/`, as PID 1 of a new PID
    /// namespace with that namespace's proc mounted on `/proc`, with the hostname set in a new
    /// UTS namespace, and in a new IPC namespace. Its environment holds only `PATH`,
    /// `HOME=/root`, `TERM`, `LANG`, `LC_ALL` when the caller has them, and what
    /// [`env`](Self::env) set. It is killed if
    /// the caller dies first.
    ///
    /// # Errors
    /// [`Error::EmptyCommand`], [`Error::BadHostname`]; [`Error::NotADirectory`] or
    /// [`Error::NoProc`] for an unusable root directory; [`Error::MissingProgram`] without
    /// util-linux; [`Error::Namespace`] if the namespaces cannot be set up (not root);
    /// [`Error::Io`] if the command cannot be started or waited for. The command failing is
    /// not an error: its code is in [`ExecOutput::code`].
    ///
    /// # Algorithm
    /// 1. A dedicated thread unshares the mount, PID, UTS and IPC namespaces (which affects
    ///    that thread and the processes it starts only), makes its whole mount tree private so
    ///    nothing propagates back to the host, and sets the hostname.
    /// 2. It detaches, deepest first, every mount of its namespace that is neither on the path
    ///    to the root directory, nor inside it, nor on the path to the util-linux programs
    ///    (which run before the chroot): otherwise the command's namespace would hold a copy of
    ///    every host mount, other guests' overlays included, and keep them busy.
    /// 3. It starts `setpriv --pdeathsig KILL -- unshare --mount-proc --root ROOT --wd / --
    ///    ARGV…`: the first process of the new PID namespace, so ARGV ends up as its PID 1,
    ///    killed if the thread dies; `unshare` mounts proc in a further private mount namespace
    ///    after the chroot.
    /// 4. The thread waits for it. The command being its direct child, its wait status is
    ///    exact (with `unshare --fork` in between, util-linux 2.38 turns a SIGKILL into
    ///    exit 1: util-linux issue 2614).
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
        thread::scope(|scope| {
            thread::Builder::new()
                .name("cowherd-exec".into())
                .spawn_scoped(scope, || self.run_isolated(&root, &launcher))
                .map_err(|error| Error::Io {
                    path: root.clone(),
                    error,
                })?
                .join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
        })
    }

    /// Steps 1 to 4 of [`run`](Self::run), on a thread of its own whose namespaces change.
    fn run_isolated(&self, root: &Path, launcher: &Launcher) -> Result<ExecOutput, Error> {
        let failed = |step| {
            move |errno: Errno| Error::Namespace {
                path: root.to_owned(),
                step,
                error: errno.into(),
            }
        };
        let namespaces = CloneFlags::CLONE_NEWNS | CloneFlags::CLONE_NEWPID;
        unshare(namespaces | CloneFlags::CLONE_NEWUTS | CloneFlags::CLONE_NEWIPC)
            .map_err(failed("create namespaces"))?;
        mount(
            None::<&str>,
            "/",
            None::<&str>,
            MsFlags::MS_REC | MsFlags::MS_PRIVATE,
            None::<&str>,
        )
        .map_err(failed("make the mount tree private"))?;
        sethostname(&self.hostname).map_err(failed("set the hostname"))?;
        detach_mounts_except(|point| {
            root.starts_with(point) || point.starts_with(root) || launcher.runs_through(point)
        })?;
        let io_error = |error| Error::Io {
            path: launcher.setpriv.clone(),
            error,
        };
        let output = launcher
            .command(root, &self.argv, self.capture)
            .envs(self.env.iter().map(|(name, value)| (name, value)))
            .spawn()
            .and_then(std::process::Child::wait_with_output)
            .map_err(io_error)?;
        Ok(ExecOutput {
            code: exit_code(output.status),
            stdout: output.stdout,
            stderr: output.stderr,
        })
    }
}

/// The host's util-linux programs that start a command, as canonical paths.
struct Launcher {
    /// Ties the command's life to the thread that starts it.
    setpriv: PathBuf,
    /// Mounts proc and enters the root directory.
    unshare: PathBuf,
}

impl Launcher {
    fn find() -> Result<Self, Error> {
        Ok(Self {
            setpriv: find_program("setpriv")?,
            unshare: find_program("unshare")?,
        })
    }

    /// Whether the mount at `point` is on the way to one of the programs.
    fn runs_through(&self, point: &Path) -> bool {
        self.setpriv.starts_with(point) || self.unshare.starts_with(point)
    }

    /// `setpriv --pdeathsig KILL -- unshare --mount-proc --root ROOT --wd / -- ARGV…`, with
    /// the command's environment.
    fn command(&self, root: &Path, argv: &[OsString], capture: bool) -> Command {
        let mut command = Command::new(&self.setpriv);
        command
            .args(["--pdeathsig", "KILL", "--"])
            .arg(&self.unshare)
            .args(["--mount-proc", "--root"])
            .arg(root)
            .args(["--wd", "/", "--"])
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

/// Detaches, deepest first, every mount of the calling thread's namespace whose mount point
/// is not `needed`.
fn detach_mounts_except(needed: impl Fn(&Path) -> bool) -> Result<(), Error> {
    // The thread's own namespace: /proc/self shows the main thread's.
    let mountinfo = Path::new("/proc/thread-self/mountinfo");
    let mut points: Vec<PathBuf> = read_mountinfo(mountinfo)
        .map_err(|error| Error::Io {
            path: mountinfo.to_owned(),
            error,
        })?
        .into_iter()
        .map(|mount| mount.mount_point)
        .filter(|point| !needed(point))
        .collect();
    points.sort_by_key(|point| Reverse(point.components().count()));
    for point in points {
        match umount2(&point, MntFlags::MNT_DETACH) {
            // EINVAL: hidden under a later mount on an ancestor, detached with that one.
            // ENOENT: its mount point was deleted.
            Ok(()) | Err(Errno::EINVAL | Errno::ENOENT) => {}
            Err(errno) => {
                return Err(Error::Namespace {
                    path: point,
                    step: "detach this mount from the command's namespace",
                    error: errno.into(),
                });
            }
        }
    }
    Ok(())
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
    use cowherd_unify::{MountEntry, parse_mountinfo};
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

    /// The mounts of `pid`'s mount namespace seen from the namespace's root, not from the
    /// command's chroot (which hides every mount outside it), read through the namespace's
    /// own proc at `<root>/proc`.
    fn namespace_mounts(pid: Pid, root: &Path) -> Vec<MountEntry> {
        let out = Command::new("nsenter")
            .args([
                "--target",
                &pid.to_string(),
                "--mount",
                "--pid",
                "--",
                "cat",
            ])
            .arg(root.join("proc/self/mountinfo"))
            .output()
            .expect("nsenter runs");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        parse_mountinfo(&out.stdout)
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
    fn exec_detaches_unrelated_mounts_from_its_namespace() {
        let tree = guest_tree();
        let root = fs::canonicalize(tree.path()).unwrap();
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
        let inside = namespace_mounts(blocked.pid, &root);
        assert_eq!(blocked.release().code, 0);

        let points: Vec<&Path> = inside.iter().map(|m| m.mount_point.as_path()).collect();
        assert!(points.contains(&Path::new("/")), "{points:?}");
        assert!(points.contains(&root.join("proc").as_path()), "{points:?}");
        assert!(!points.contains(&Path::new("/proc")), "{points:?}");
        assert!(!points.contains(&outside.path()), "{points:?}");
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
