//! `cowherd exec` against a hostile command: a static program run inside a mounted guest tries
//! the ways out of a chroot (a chroot into a subdirectory then `..` up, `/proc/1/root`, a
//! descriptor its caller passed in, mounting, device nodes) and reports what it reached; the
//! host's canary files must come out unchanged.

mod common;

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;

/// The escape program. Arguments: a host file to read, a host file to write, and the number of
/// a descriptor on the host directory holding both, opened by the caller of `cowherd`. It
/// prints one `key: value` line per attempt (errno names, or what it read: size and FNV-1a
/// hash, never the bytes) and exits 0 whatever it reached.
const ESCAPE_C: &str = r#"
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
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
        char point[256], type[64];
        char *dash = strstr(line, " - ");
        if (sscanf(line, "%*s %*s %*s %*s %255s", point) == 1 && dash
            && sscanf(dash + 3, "%63s", type) == 1)
            printf("mountinfo: %s %s\n", point, type);
    }
    if (mounts) fclose(mounts);

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

    /// Runs the escape program with `cowherd exec`, from a shell that opened descriptor
    /// [`PASSED_FD`] on the canaries' directory (not close-on-exec) and then became `cowherd`.
    fn run(&self) -> Report {
        let before = [fingerprint(&self.secret), fingerprint(&self.target)];
        let out = Command::new("sh")
            .arg("-c")
            .arg(format!("exec {PASSED_FD}<\"$0\" && exec \"$@\""))
            .arg(&self.host)
            .arg(cowherd_bin())
            .arg("--root")
            .arg(&self.root)
            .args(["exec", "g", "--", "/escape"])
            .arg(&self.secret)
            .arg(&self.target)
            .arg(PASSED_FD)
            .env_remove("COWHERD_ROOT")
            .output()
            .unwrap();
        let raw = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "{raw}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let after = [fingerprint(&self.secret), fingerprint(&self.target)];
        assert_eq!(
            before, after,
            "a host canary changed (content, inode, mode, owner or mtime):\n{raw}"
        );
        let mut lines: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for line in raw.lines() {
            let (key, value) = line.split_once(": ").unwrap_or((line, ""));
            lines
                .entry(key.to_owned())
                .or_default()
                .push(value.to_owned());
        }
        Report { lines, raw }
    }
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
    assert_eq!(
        mounts,
        &["/ overlay".to_owned(), "/proc proc".to_owned()],
        "{}",
        report.raw
    );
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
        "SECURITY.md",
    ] {
        assert!(help.contains(words), "exec --help lacks {words:?}:\n{help}");
    }
}
