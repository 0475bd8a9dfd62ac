//! `cowherd exec` against a hostile command: a static program run inside a mounted guest tries
//! the ways out of a chroot (a chroot into a subdirectory then `..` up, `/proc/1/root`, a
//! descriptor its caller passed in, mounting, device nodes), the host's kernel settings under
//! `/proc` and the caller's terminal (`TIOCSTI`), and reports what it reached; the host's
//! canary files and its `kernel.core_pattern` must come out unchanged.

mod common;

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::fs;
use std::io::Read;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::thread;

use common::*;

/// The escape program. Arguments: a host file to read, a host file to write, and the number of
/// a descriptor on the host directory holding both, opened by the caller of `cowherd`. It
/// prints one `key: value` line per attempt (errno names, or what it read: size and FNV-1a
/// hash, never the bytes) and exits 0 whatever it reached. What it writes to the host's kernel
/// settings is harmless even where it gets through: `kernel.core_pattern`'s own value back, and
/// nothing (a zero-length write) to `/proc/sysrq-trigger`.
const ESCAPE_C: &str = r#"
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <unistd.h>

static const char *name(int e) {
    static char buf[32];
    switch (e) {
    case 0: return "ok";
    case ENOENT: return "ENOENT";
    case EPERM: return "EPERM";
    case EBADF: return "EBADF";
    case EACCES: return "EACCES";
    case ENOTDIR: return "ENOTDIR";
    case EROFS: return "EROFS";
    case EINVAL: return "EINVAL";
    case ENOTTY: return "ENOTTY";
    case EIO: return "EIO";
    }
    snprintf(buf, sizeof buf, "errno%d", e);
    return buf;
}

/* Reads a file: its size and FNV-1a hash, or the errno of opening it. */
static void read_file(const char *key, int dir, const char *path) {
    int fd = openat(dir, path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) { printf("%s: %s\n", key, name(errno)); return; }
    unsigned long long hash = 0xcbf29ce484222325ULL, size = 0;
    char buf[4096];
    ssize_t got;
    while ((got = read(fd, buf, sizeof buf)) > 0) {
        for (ssize_t i = 0; i < got; i++) { hash ^= (unsigned char)buf[i]; hash *= 0x100000001b3ULL; }
        size += (unsigned long long)got;
    }
    close(fd);
    printf("%s: read %llu %016llx\n", key, size, hash);
}

static void write_file(const char *key, int dir, const char *path) {
    int fd = openat(dir, path, O_WRONLY | O_APPEND | O_CLOEXEC);
    if (fd < 0) { printf("%s: %s\n", key, name(errno)); return; }
    ssize_t put = write(fd, "escaped\n", 8);
    close(fd);
    printf("%s: wrote %zd\n", key, put);
}

/* The host's kernel settings under /proc, and whether the command can make them writable. */
static void kernel_settings(void) {
    char value[4096];
    ssize_t len = -1;
    int fd = open("/proc/sys/kernel/core_pattern", O_RDONLY | O_CLOEXEC);
    if (fd >= 0) { len = read(fd, value, sizeof value); close(fd); }
    if (len <= 0) { printf("core-pattern-read: %s\n", name(errno)); return; }
    fd = open("/proc/sys/kernel/core_pattern", O_WRONLY | O_CLOEXEC);
    if (fd < 0) {
        printf("core-pattern-write: %s\n", name(errno));
    } else {
        /* Its own value back: the write would reach the host's kernel, and change nothing. */
        ssize_t put = write(fd, value, (size_t)len);
        printf("core-pattern-write: wrote %zd\n", put);
        close(fd);
    }
    fd = open("/proc/sysrq-trigger", O_WRONLY | O_CLOEXEC);
    if (fd < 0) {
        printf("sysrq-trigger-write: %s\n", name(errno));
    } else {
        ssize_t put = write(fd, "", 0); /* no key: triggers nothing */
        printf("sysrq-trigger-write: wrote %zd\n", put);
        close(fd);
    }
    /* `mount -o remount,rw /proc/sys`, and taking the read-only mount away. */
    if (mount(NULL, "/proc/sys", NULL, MS_REMOUNT | MS_BIND, NULL) == 0) printf("remount-proc-sys: ok\n");
    else printf("remount-proc-sys: %s\n", name(errno));
    if (umount2("/proc/sys", MNT_DETACH) == 0) printf("umount-proc-sys: ok\n");
    else printf("umount-proc-sys: %s\n", name(errno));
}

/* The caller's terminal: is stdin one, is it the controlling terminal, can input be pushed. */
static void terminal(void) {
    printf("stdin-tty: %s\n", isatty(0) ? "yes" : "no");
    int tty_nr = -1;
    FILE *stat = fopen("/proc/self/stat", "re");
    char line[1024];
    if (stat && fgets(line, sizeof line, stat)) {
        char *end = strrchr(line, ')');
        if (end) sscanf(end + 1, " %*c %*d %*d %*d %d", &tty_nr);
    }
    if (stat) fclose(stat);
    printf("ctty: %s\n", tty_nr == 0 ? "none" : tty_nr > 0 ? "yes" : "unknown");
    char c = '\n';
    if (ioctl(0, TIOCSTI, &c) == 0) printf("tiocsti: ok\n");
    else printf("tiocsti: %s\n", name(errno));
    /* Taking the terminal as its own controlling terminal, to push input then. */
    if (ioctl(0, TIOCSCTTY, 1) == 0) printf("tiocsctty: ok\n");
    else printf("tiocsctty: %s\n", name(errno));
}

int main(int argc, char **argv) {
    if (argc != 4) { fprintf(stderr, "usage: escape SECRET TARGET FD\n"); return 2; }
    const char *secret = argv[1], *target = argv[2];
    int passed = atoi(argv[3]);
    setvbuf(stdout, NULL, _IONBF, 0);

    /* The descriptors it was started with. */
    DIR *fds = opendir("/proc/self/fd");
    if (!fds) { printf("fds: %s\n", name(errno)); } else {
        printf("fds:");
        struct dirent *e;
        while ((e = readdir(fds)))
            if (e->d_name[0] != '.' && atoi(e->d_name) != dirfd(fds)) printf(" %s", e->d_name);
        printf("\n");
        closedir(fds);
    }

    /* Its capability sets. */
    FILE *status = fopen("/proc/self/status", "re");
    char line[512];
    while (status && fgets(line, sizeof line, status)) {
        if (!strncmp(line, "CapBnd:", 7)) printf("capbnd: %s", line + 8);
        if (!strncmp(line, "CapEff:", 7)) printf("capeff: %s", line + 8);
        if (!strncmp(line, "CapInh:", 7)) printf("capinh: %s", line + 8);
    }
    if (status) fclose(status);

    /* The mounts its namespace shows it. */
    FILE *mounts = fopen("/proc/self/mountinfo", "re");
    while (mounts && fgets(line, sizeof line, mounts)) {
        char point[256], options[256], type[64];
        char *dash = strstr(line, " - ");
        if (sscanf(line, "%*s %*s %*s %*s %255s %255s", point, options) == 2 && dash
            && sscanf(dash + 3, "%63s", type) == 1) {
            printf("mountinfo: %s %s\n", point, type);
            if (!strcmp(options, "ro") || !strncmp(options, "ro,", 3))
                printf("mount-ro: %s\n", point);
        }
    }
    if (mounts) fclose(mounts);

    kernel_settings();
    terminal();

    /* The caller's descriptor on the host directory. */
    struct stat st;
    if (fstat(passed, &st) != 0) {
        printf("passed-fd: %s\n", name(errno));
    } else {
        printf("passed-fd: open\n");
        const char *base = strrchr(secret, '/');
        read_file("passed-fd-secret", passed, base ? base + 1 : secret);
    }

    /* PID 1's root directory. */
    char path[4096];
    snprintf(path, sizeof path, "/proc/1/root%s", secret);
    read_file("proc1root-secret", AT_FDCWD, path);

    /* A new mount and a block device node (loop0; never opened). */
    if (mount("none", "/sub", "tmpfs", 0, NULL) == 0) {
        printf("mount-tmpfs: ok\n");
        umount("/sub");
    } else {
        printf("mount-tmpfs: %s\n", name(errno));
    }
    if (mknod("/escape-disk", S_IFBLK | 0600, makedev(7, 0)) == 0) {
        printf("mknod-block: ok\n");
        unlink("/escape-disk");
    } else {
        printf("mknod-block: %s\n", name(errno));
    }

    /* The chroot breakout: chroot below the working directory, walk up, chroot there. */
    if (chroot("/sub") != 0) printf("chroot-sub: %s\n", name(errno));
    for (int i = 0; i < 256; i++) (void)chdir("..");
    if (chroot(".") != 0) printf("chroot-up: %s\n", name(errno));
    read_file("breakout-secret", AT_FDCWD, secret);
    write_file("breakout-target", AT_FDCWD, target);
    read_file("breakout-shadow", AT_FDCWD, "/etc/shadow");
    return 0;
}
"#;

/// The entries of `/proc` that exec mounts read-only (those the host's kernel has): they act
/// on the host's kernel, not on the guest.
const READ_ONLY_PROC: [&str; 5] = ["sys", "sysrq-trigger", "irq", "bus", "fs"];

/// The descriptor number the test's shell opens on the host directory before it starts
/// `cowherd exec`.
const PASSED_FD: &str = "7";

/// What `/etc/shadow` holds inside the guest.
const GUEST_SHADOW: &[u8] = b"root:guest-shadow:19000:0:99999:7:::\n";

/// The capabilities the command keeps: systemd-nspawn's default set without `CAP_SYS_ADMIN`,
/// `CAP_MKNOD`, `CAP_DAC_READ_SEARCH` and `CAP_SYS_BOOT` (numbers from `linux/capability.h`).
const KEPT_CAPS: [u32; 22] = [
    0,  // CHOWN
    1,  // DAC_OVERRIDE
    3,  // FOWNER
    4,  // FSETID
    5,  // KILL
    6,  // SETGID
    7,  // SETUID
    8,  // SETPCAP
    9,  // LINUX_IMMUTABLE
    10, // NET_BIND_SERVICE
    11, // NET_BROADCAST
    13, // NET_RAW
    15, // IPC_OWNER
    18, // SYS_CHROOT
    19, // SYS_PTRACE
    23, // SYS_NICE
    24, // SYS_RESOURCE
    26, // SYS_TTY_CONFIG
    28, // LEASE
    29, // AUDIT_WRITE
    30, // AUDIT_CONTROL
    31, // SETFCAP
];

/// Compiles [`ESCAPE_C`] statically into `dir/escape`, failing loudly without a C compiler or
/// a static C library.
fn build_escape(dir: &Path) -> PathBuf {
    let source = dir.join("escape.c");
    let binary = dir.join("escape");
    fs::write(&source, ESCAPE_C).unwrap();
    let out = Command::new("cc")
        .args(["-static", "-O1", "-o"])
        .arg(&binary)
        .arg(&source)
        .output()
        .unwrap_or_else(|e| panic!("cannot run cc ({e}): install gcc and libc6-dev"));
    assert!(
        out.status.success(),
        "cannot build the static escape program (install gcc and libc6-dev, which has libc.a): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    binary
}

/// FNV-1a 64 of `bytes` with its size, as the escape program prints what it read.
fn read_report(bytes: &[u8]) -> String {
    let hash = bytes.iter().fold(0xcbf2_9ce4_8422_2325_u64, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    });
    format!("read {} {hash:016x}", bytes.len())
}

/// The test process's capability bounding set.
fn own_bounding_set() -> u64 {
    let status = fs::read_to_string("/proc/self/status").unwrap();
    let hex = status
        .lines()
        .find_map(|line| line.strip_prefix("CapBnd:"))
        .expect("CapBnd in /proc/self/status");
    u64::from_str_radix(hex.trim(), 16).unwrap()
}

/// Content, inode, mode, owner and mtime of a host file.
fn fingerprint(path: &Path) -> (String, u64, u32, u32, u32, i64, i64) {
    let m = fs::metadata(path).unwrap();
    (
        String::from_utf8_lossy(&fs::read(path).unwrap()).into_owned(),
        m.ino(),
        m.mode(),
        m.uid(),
        m.gid(),
        m.mtime(),
        m.mtime_nsec(),
    )
}

/// What the escape program reported, each key with its values in order.
struct Report {
    lines: BTreeMap<String, Vec<String>>,
    raw: String,
}

impl Report {
    fn one(&self, key: &str) -> &str {
        match self.lines.get(key).map(Vec::as_slice) {
            Some([value]) => value,
            other => panic!("{key}: {other:?} in\n{}", self.raw),
        }
    }
}

/// A mounted guest holding the escape program, and the host canaries beside it.
struct Hostile {
    /// Unmounted before the scratch directory goes.
    _mounted: MountedGuests,
    _s: Scratch,
    root: PathBuf,
    /// The directory holding the canaries, outside the guest.
    host: PathBuf,
    secret: PathBuf,
    target: PathBuf,
}

impl Hostile {
    fn new(tag: &str) -> Self {
        assert_root();
        let s = Scratch::new(tag);
        let root = init_root(s.path());
        let escape = build_escape(s.path());
        adopt_built(&root, s.path(), "g", |d| {
            fs::create_dir_all(d.join("proc")).unwrap();
            fs::create_dir_all(d.join("sub")).unwrap();
            fs::create_dir_all(d.join("etc")).unwrap();
            fs::write(d.join("etc/shadow"), GUEST_SHADOW).unwrap();
            fs::copy(&escape, d.join("escape")).unwrap();
        });
        let mut mounted = MountedGuests::default();
        mounted.watch(rootfs(&root, "g"));
        cowherd(&root).args(["mount", "g"]).assert().success();

        let host = s.join("host");
        fs::create_dir(&host).unwrap();
        let secret = host.join("secret");
        let target = host.join("target");
        fs::write(&secret, format!("host-only {}\n", s.path().display())).unwrap();
        fs::write(&target, b"untouched\n").unwrap();
        for file in [&secret, &target] {
            fs::set_permissions(file, fs::Permissions::from_mode(0o600)).unwrap();
        }
        Self {
            _mounted: mounted,
            _s: s,
            root,
            host,
            secret,
            target,
        }
    }

    /// The command line that runs the escape program with `cowherd exec`, from a shell that
    /// opens descriptor [`PASSED_FD`] on the canaries' directory (not close-on-exec) and then
    /// becomes `cowherd`.
    fn argv(&self) -> Vec<OsString> {
        let mut argv: Vec<OsString> = vec![
            "sh".into(),
            "-c".into(),
            format!("exec {PASSED_FD}<\"$0\" && exec \"$@\"").into(),
            self.host.clone().into(),
            cowherd_bin().into(),
            "--root".into(),
            self.root.clone().into(),
        ];
        argv.extend(["exec", "g", "--", "/escape"].map(OsString::from));
        argv.extend([&self.secret, &self.target].map(|p| p.as_os_str().to_owned()));
        argv.push(PASSED_FD.into());
        argv
    }

    /// Runs the escape program (see [`argv`](Self::argv)) with its output on pipes.
    fn run(&self) -> Report {
        let argv = self.argv();
        self.checked(|| {
            let out = Command::new(&argv[0])
                .args(&argv[1..])
                .env_remove("COWHERD_ROOT")
                .output()
                .unwrap();
            let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
            (out.status, out.stdout, stderr)
        })
    }

    /// Runs the escape program (see [`argv`](Self::argv)) on a new pseudo-terminal that is
    /// `cowherd`'s controlling terminal and its standard input, output and error, as when run
    /// from an interactive shell.
    fn run_on_terminal(&self) -> Report {
        let argv = self.argv();
        self.checked(|| {
            let pty = nix::pty::openpty(None, None).expect("openpty");
            let mut master = fs::File::from(pty.master);
            let reader = thread::spawn(move || {
                let mut out = Vec::new();
                let mut buf = [0_u8; 4096];
                loop {
                    match master.read(&mut buf) {
                        Ok(0) => break,
                        Ok(n) => out.extend_from_slice(&buf[..n]),
                        // Every descriptor on the terminal's other side is closed.
                        Err(e) if e.raw_os_error() == Some(libc::EIO) => break,
                        Err(e) => panic!("read the terminal: {e}"),
                    }
                }
                out
            });
            let slave = pty.slave;
            let stdio = || Stdio::from(slave.try_clone().expect("dup the terminal"));
            // A new session whose controlling terminal is the pty (`setsid --ctty`).
            let status = Command::new("setsid")
                .args(["--wait", "--ctty"])
                .args(&argv)
                .stdin(stdio())
                .stdout(stdio())
                .stderr(stdio())
                .env_remove("COWHERD_ROOT")
                .status()
                .expect("run setsid (util-linux)");
            drop(slave);
            let out = reader.join().expect("the terminal's reader");
            // The terminal writes each newline as CR LF.
            let out: Vec<u8> = out.into_iter().filter(|&b| b != b'\r').collect();
            (status, out, String::new())
        })
    }

    /// Runs `run` (which returns the exit status, output and error output of `cowherd`),
    /// checks that it succeeded and left the host canaries as they were, and parses the
    /// escape program's report.
    fn checked(&self, run: impl FnOnce() -> (std::process::ExitStatus, Vec<u8>, String)) -> Report {
        let before = [fingerprint(&self.secret), fingerprint(&self.target)];
        let (status, stdout, stderr) = run();
        let raw = String::from_utf8_lossy(&stdout).into_owned();
        assert!(status.success(), "{status}\n{raw}\n{stderr}");
        // Nothing from cowherd or its launcher (a shell's warning, say) on standard error.
        assert_eq!(stderr, "", "{raw}");
        let after = [fingerprint(&self.secret), fingerprint(&self.target)];
        assert_eq!(
            before, after,
            "a host canary changed (content, inode, mode, owner or mtime):\n{raw}"
        );
        let mut lines: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for line in raw.lines().filter(|line| !line.is_empty()) {
            let (key, value) = line.split_once(": ").unwrap_or((line, ""));
            lines
                .entry(key.to_owned())
                .or_default()
                .push(value.to_owned());
        }
        Report { lines, raw }
    }
}

/// The entries of [`READ_ONLY_PROC`] that this host's `/proc` has, as mount points inside
/// exec.
fn read_only_proc() -> Vec<String> {
    READ_ONLY_PROC
        .iter()
        .filter(|name| fs::symlink_metadata(Path::new("/proc").join(name)).is_ok())
        .map(|name| format!("/proc/{name}"))
        .collect()
}

#[test]
fn a_chroot_breakout_inside_exec_reaches_no_host_file() {
    let h = Hostile::new("exec-breakout");
    let report = h.run();
    let host_shadow = fs::read("/etc/shadow").expect("read the host's /etc/shadow");
    let guest_shadow = read_report(GUEST_SHADOW);
    assert_ne!(read_report(&host_shadow), guest_shadow);

    // chroot into /sub and `..` up from outside it lands on the guest's root again.
    assert_eq!(report.lines.get("chroot-sub"), None, "{}", report.raw);
    assert_eq!(report.one("breakout-secret"), "ENOENT", "{}", report.raw);
    assert_eq!(report.one("breakout-target"), "ENOENT", "{}", report.raw);
    assert_eq!(
        report.one("breakout-shadow"),
        guest_shadow,
        "{}",
        report.raw
    );
    // Nor does PID 1's root directory, or the namespace's mounts, lead to the host.
    assert_eq!(report.one("proc1root-secret"), "ENOENT", "{}", report.raw);
    let mounts = &report.lines["mountinfo"];
    let expected: Vec<String> = ["/ overlay".to_owned(), "/proc proc".to_owned()]
        .into_iter()
        .chain(read_only_proc().iter().map(|point| format!("{point} proc")))
        .collect();
    assert_eq!(mounts, &expected, "{}", report.raw);
}

#[test]
fn exec_cannot_change_the_hosts_kernel_settings_under_proc() {
    let h = Hostile::new("exec-proc-sys");
    let core_pattern = || fs::read("/proc/sys/kernel/core_pattern").expect("read core_pattern");
    let before = core_pattern();
    let report = h.run();
    assert_eq!(core_pattern(), before, "{}", report.raw);

    // kernel.core_pattern (whose `|/path` the kernel runs as root on the host) and the SysRq
    // trigger (reboot, crash) cannot be opened for writing…
    assert_eq!(report.one("core-pattern-write"), "EROFS", "{}", report.raw);
    let sysrq = if Path::new("/proc/sysrq-trigger").exists() {
        "EROFS"
    } else {
        "ENOENT" // a kernel without CONFIG_MAGIC_SYSRQ
    };
    assert_eq!(report.one("sysrq-trigger-write"), sysrq, "{}", report.raw);
    // …because /proc/sys, /proc/sysrq-trigger and their kin are read-only mounts…
    assert!(
        read_only_proc().contains(&"/proc/sys".to_owned()),
        "this host has no /proc/sys"
    );
    let read_only = report.lines.get("mount-ro").cloned().unwrap_or_default();
    assert_eq!(read_only, read_only_proc(), "{}", report.raw);
    // …and without CAP_SYS_ADMIN the command can neither remount them writable nor take
    // them away.
    assert_eq!(report.one("remount-proc-sys"), "EPERM", "{}", report.raw);
    assert_eq!(report.one("umount-proc-sys"), "EPERM", "{}", report.raw);
}

#[test]
fn exec_on_a_terminal_cannot_push_input_into_it() {
    let h = Hostile::new("exec-tiocsti");
    let report = h.run_on_terminal();
    // The terminal is still its standard input (and output), but not its controlling
    // terminal: TIOCSTI, which would type commands into the caller's shell, is refused.
    assert_eq!(report.one("stdin-tty"), "yes", "{}", report.raw);
    assert_eq!(report.one("ctty"), "none", "{}", report.raw);
    assert_eq!(report.one("tiocsti"), "EPERM", "{}", report.raw);
    // Nor can it take the terminal from the caller's session (that needs CAP_SYS_ADMIN).
    assert_eq!(report.one("tiocsctty"), "EPERM", "{}", report.raw);
}

#[test]
fn exec_passes_no_descriptor_but_stdio_and_bounds_the_capabilities() {
    let h = Hostile::new("exec-bounds");
    let report = h.run();
    assert_eq!(report.one("fds"), "0 1 2", "{}", report.raw);
    assert_eq!(report.one("passed-fd"), "EBADF", "{}", report.raw);

    // Less what this host's own bounding set lacks already.
    let mask = KEPT_CAPS.iter().fold(0_u64, |m, &cap| m | 1 << cap) & own_bounding_set();
    let expected = format!("{mask:016x}");
    assert_eq!(report.one("capbnd"), expected, "{}", report.raw);
    assert_eq!(report.one("capeff"), expected, "{}", report.raw);
    assert_eq!(report.one("capinh"), "0000000000000000", "{}", report.raw);
    // Without CAP_SYS_ADMIN and CAP_MKNOD: no devtmpfs or host disk to mount, no disk node.
    assert_eq!(report.one("mount-tmpfs"), "EPERM", "{}", report.raw);
    assert_eq!(report.one("mknod-block"), "EPERM", "{}", report.raw);
}

#[test]
fn exec_help_says_what_exec_is_not() {
    let out = cowherd_no_root().args(["exec", "--help"]).output().unwrap();
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    for words in [
        "pivot_root",
        "user namespace",
        "CAP_SYS_ADMIN",
        "/proc/sys",
        "TIOCSTI",
        "SECURITY.md",
    ] {
        assert!(help.contains(words), "exec --help lacks {words:?}:\n{help}");
    }
}
