//! Importing machines as guests (physical-to-guest), through the library
//! (`cowherd_builder::import`): from a real rsync daemon and a real sshd on 127.0.0.1, from a
//! local directory and a tarball; the exclusions, the fixups, byte and metadata identity of
//! everything else, the resync pass, the errors, and a SIGKILL in the middle of a copy.
//!
//! The daemons are started by the tests (on free ports, with throwaway keys) and killed when
//! their guards drop, also on panic. rsync, sshd and ssh must be installed: a test fails, never
//! skips, without them (CI installs `rsync openssh-server openssh-client`).

mod common;

use std::fs;
use std::net::{TcpListener, TcpStream};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use cowherd_builder::{
    GUEST_INTERFACES, ImportError, ImportOptions, ImportReport, NEUTRAL_FSTAB, Source, import,
};
use cowherd_unify::{Access, HostRoot, NoProgress, OriginKind, UnifyOptions};

/// The machine's fstab: its own disks, which a guest must not mount.
const FSTAB: &str = "UUID=5f1e0c7e-1111-4c3a-9d55-0123456789ab / ext4 errors=remount-ro 0 1\n\
    UUID=8a2b7c9d-2222-4e1f-8a66-0123456789ab /srv xfs defaults 0 2\n\
    /swapfile none swap sw 0 0\n";

const INTERFACES: &str = "source /etc/network/interfaces.d/*\n\n\
    auto lo\niface lo inet loopback\n\n\
    auto eth0\niface eth0 inet static\n    address 192.0.2.10/24\n    gateway 192.0.2.1\n\n\
    allow-hotplug enp3s0\niface enp3s0 inet static\n    address 198.51.100.7/24\n";

const NET_RULES: &str =
    "SUBSYSTEM==\"net\", ACTION==\"add\", ATTR{address}==\"52:54:00:12:34:56\", NAME=\"eth0\"\n";

/// Units of the machine's hardware that the import masks.
const MASKED: [&str; 9] = [
    "hwclock.service",
    "smartd.service",
    "getty@tty1.service",
    "getty@tty2.service",
    "getty@tty3.service",
    "getty@tty4.service",
    "getty@tty5.service",
    "getty@tty6.service",
    "serial-getty@ttyS0.service",
];

/// Directories whose contents never arrive.
const EMPTIED: [&str; 8] = [
    "proc",
    "sys",
    "dev",
    "run",
    "tmp",
    "mnt",
    "media",
    "lost+found",
];

/// The machine's hostname.
const HOSTNAME: &str = "web01";

/// A distribution's files, the same on every machine (and in a guest built from it).
fn distribution(t: &mut TreeBuilder) {
    t.dir("", 0o755);
    t.file_with(
        "usr/bin/ping",
        &content("ping", 64 * 1024),
        0o755,
        0,
        0,
        DEFAULT_MTIME,
    )
    .cap_net_raw("usr/bin/ping")
    .file_with(
        "usr/bin/su",
        &content("su", 48 * 1024),
        0o4755,
        0,
        0,
        DEFAULT_MTIME,
    )
    .file("usr/lib/libacl.so", &content("libacl", 40 * 1024))
    .acl("usr/lib/libacl.so")
    .mtime("usr/lib/libacl.so", DEFAULT_MTIME.0, DEFAULT_MTIME.1)
    .file("usr/lib/hl/a", &content("hardlinked", 24 * 1024))
    .hardlink("usr/lib/hl/a", "usr/lib/hl/b")
    .hardlink("usr/lib/hl/a", "usr/lib/hl/c")
    .sparse(
        "usr/lib/sparse.img",
        8 << 20,
        (8 << 20) - 4096,
        &content("sparse", 4096),
    )
    .file("usr/share/big.bin", &content("big", 4 << 20))
    .file("usr/share/doc/readme", &content("readme", 9000))
    .symlink("usr/lib/os-release", "../../etc/os-release")
    .fifo("usr/share/fifo")
    .file("etc/os-release", b"ID=debian\nVERSION_ID=12\n")
    .file("lib/systemd/system/hwclock.service", b"[Unit]\n")
    .file("lib/systemd/system/smartd.service", b"[Unit]\n")
    .file("lib/systemd/system/getty@.service", b"[Unit]\n")
    .file("lib/systemd/system/serial-getty@.service", b"[Unit]\n")
    .file("lib/systemd/system/ssh.service", b"[Unit]\n");
}

/// A "physical machine": a distribution plus the machine's own configuration and identity,
/// pseudo and volatile files that must not arrive, and a swap file. `srv/` is left empty for
/// a separately mounted filesystem ([`mount_srv`]).
fn machine(dir: &Path) {
    let mut t = TreeBuilder::new(dir);
    distribution(&mut t);
    for d in EMPTIED.iter().chain(&["srv", "home/user"]) {
        t.dir(d, 0o755);
    }
    t.dir("tmp", 0o1777).dir("lost+found", 0o700);
    t.file("etc/fstab", FSTAB.as_bytes())
        .file(
            "etc/udev/rules.d/70-persistent-net.rules",
            NET_RULES.as_bytes(),
        )
        .file("etc/udev/rules.d/99-local.rules", b"# the admin's own\n")
        .file("etc/network/interfaces", INTERFACES.as_bytes())
        .file("etc/hostname", format!("{HOSTNAME}\n").as_bytes())
        .file("etc/machine-id", b"0123456789abcdef0123456789abcdef\n")
        .file_with(
            "etc/ssh/ssh_host_ed25519_key",
            &content("host-key", 411),
            0o600,
            0,
            0,
            DEFAULT_MTIME,
        )
        .file(
            "etc/ssh/ssh_host_ed25519_key.pub",
            &content("host-key.pub", 97),
        )
        .file_with(
            "etc/shadow",
            b"root:*:19000:0:99999:7:::\n",
            0o640,
            0,
            42,
            DEFAULT_MTIME,
        )
        .file_with(
            "home/user/notes.txt",
            b"the user's own\n",
            0o600,
            1000,
            1000,
            DEFAULT_MTIME,
        )
        .file("var/log/syslog", &content("syslog", 20_000))
        .file("proc/cpuinfo", b"processor : 0\n")
        .file("proc/1/status", b"Name: init\n")
        .file("sys/kernel/hostname", b"web01\n")
        .file("run/sshd.pid", b"812\n")
        .file("tmp/scratch", b"volatile\n")
        .file("mnt/usb/photo.jpg", b"not the machine's\n")
        .file("lost+found/#1234", b"fsck's\n")
        .device("dev/null", Dev::Char, 1, 3)
        .device("dev/sda", Dev::Block, 8, 0)
        .file_with(
            "swapfile",
            &content("swap", 1 << 20),
            0o600,
            0,
            0,
            DEFAULT_MTIME,
        )
        .symlink("var/run", "/run");
    t.finish();
}

/// The separately mounted `/srv` of the machine: a tmpfs on `tree/srv` with a site in it.
fn mount_srv(tree: &Path) -> TmpfsMount {
    let mount = TmpfsMount::new(&tree.join("srv"));
    let mut t = TreeBuilder::new(tree);
    t.file("srv/www/index.html", b"<h1>web01</h1>\n");
    mount
}

/// The scratch directory, an initialised root in it, and the machine's tree with its `/srv`
/// (fields drop in this order: `/srv` is unmounted before the scratch directory goes).
struct Fixture {
    _srv: TmpfsMount,
    root: HostRoot,
    tree: PathBuf,
    scratch: Scratch,
}

impl Fixture {
    fn new(tag: &str) -> Fixture {
        assert_root();
        let scratch = Scratch::new(tag);
        let root = HostRoot::init(&scratch.join("root")).expect("init the root");
        let tree = scratch.join("machine");
        machine(&tree);
        Fixture {
            _srv: mount_srv(&tree),
            root,
            tree,
            scratch,
        }
    }

    fn base(&self, name: &str) -> PathBuf {
        self.root.guests_dir().join(name).join("base")
    }
}

/// A port nobody listens on right now.
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind a free port")
        .port()
}

/// Waits until something accepts connections on 127.0.0.1:`port`, or `daemon` (whose stderr
/// goes to `log`) dies.
fn wait_listening(what: &str, port: u16, daemon: &mut KillOnDrop, log: &Path) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        if let Some(status) = daemon.0.try_wait().expect("poll the daemon") {
            let stderr = fs::read_to_string(log).unwrap_or_default();
            panic!("{what} exited ({status}) before listening on port {port}:\n{stderr}");
        }
        assert!(
            Instant::now() < deadline,
            "{what} does not listen on {port}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The absolute path of an installed program; fails the test (naming the package) without it.
fn program(name: &str, package: &str) -> PathBuf {
    ["/usr/sbin", "/usr/bin", "/sbin", "/bin"]
        .iter()
        .map(|dir| Path::new(dir).join(name))
        .find(|p| p.is_file())
        .unwrap_or_else(|| {
            panic!("`{name}` is not installed: install {package} (CI installs rsync openssh-server openssh-client)")
        })
}

/// An rsync daemon on 127.0.0.1 serving `tree` as module `machine`, read-only, as root (so it
/// reads every file, owner, xattr and ACL); killed on drop.
struct RsyncDaemon {
    port: u16,
    _child: KillOnDrop,
}

impl RsyncDaemon {
    fn start(scratch: &Path, tree: &Path, extra: &[&str]) -> RsyncDaemon {
        let rsync = program("rsync", "rsync");
        let port = free_port();
        let conf = scratch.join(format!("rsyncd-{port}.conf"));
        fs::write(
            &conf,
            format!(
                "use chroot = yes\nmunge symlinks = no\nnumeric ids = yes\n\
                 log file = {log}\n\n[machine]\n  path = {tree}\n  uid = root\n  gid = root\n\
                 read only = yes\n  fake super = no\n  hosts allow = 127.0.0.1\n",
                log = scratch.join(format!("rsyncd-{port}.log")).display(),
                tree = tree.display(),
            ),
        )
        .unwrap();
        let log = scratch.join(format!("rsyncd-{port}.stderr"));
        let mut child = KillOnDrop::spawn(
            Command::new(rsync)
                .args(["--daemon", "--no-detach", "--address=127.0.0.1"])
                .arg(format!("--port={port}"))
                .arg(format!("--config={}", conf.display()))
                .args(extra)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(fs::File::create(&log).unwrap()),
        );
        wait_listening("rsync --daemon", port, &mut child, &log);
        RsyncDaemon {
            port,
            _child: child,
        }
    }

    fn source(&self) -> Source {
        format!("rsync://127.0.0.1:{}/machine/", self.port)
            .parse()
            .unwrap()
    }
}

/// An sshd on 127.0.0.1 with a throwaway host key that lets root in with a throwaway client
/// key; killed on drop.
struct Sshd {
    port: u16,
    key: PathBuf,
    _child: KillOnDrop,
}

impl Sshd {
    fn start(scratch: &Path) -> Sshd {
        let sshd = program("sshd", "openssh-server");
        let keygen = program("ssh-keygen", "openssh-client");
        program("ssh", "openssh-client");
        let dir = scratch.join("sshd");
        fs::create_dir_all(&dir).unwrap();
        for key in ["host_key", "client_key"] {
            let out = Command::new(&keygen)
                .args(["-q", "-t", "ed25519", "-N", "", "-C", "cowherd-test", "-f"])
                .arg(dir.join(key))
                .output()
                .unwrap();
            assert!(out.status.success(), "ssh-keygen: {out:?}");
        }
        fs::copy(dir.join("client_key.pub"), dir.join("authorized_keys")).unwrap();
        // sshd refuses to start without its privilege separation directory.
        fs::create_dir_all("/run/sshd").unwrap();
        let port = free_port();
        let config = dir.join("sshd_config");
        fs::write(
            &config,
            format!(
                "Port {port}\nListenAddress 127.0.0.1\nHostKey {dir}/host_key\n\
                 PermitRootLogin prohibit-password\nAuthorizedKeysFile {dir}/authorized_keys\n\
                 StrictModes no\nUsePAM no\nPidFile none\nPasswordAuthentication no\n\
                 KbdInteractiveAuthentication no\n",
                dir = dir.display()
            ),
        )
        .unwrap();
        let log = dir.join("sshd.log");
        let mut child = KillOnDrop::spawn(
            Command::new(sshd)
                .args(["-D", "-e", "-f"])
                .arg(&config)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(fs::File::create(&log).unwrap()),
        );
        wait_listening("sshd", port, &mut child, &log);
        Sshd {
            port,
            key: dir.join("client_key"),
            _child: child,
        }
    }

    fn rsh(&self) -> String {
        format!(
            "ssh -F /dev/null -p {} -i {} -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null -o BatchMode=yes -o LogLevel=ERROR",
            self.port,
            self.key.display()
        )
    }
}

/// Imports, panicking with the error's message.
fn import_ok(root: &HostRoot, name: &str, source: &Source, opts: &ImportOptions) -> ImportReport {
    import(root, name, source, opts).unwrap_or_else(|e| panic!("import {name} from {source}: {e}"))
}

/// Whether `rel` is excluded from an import: the contents of [`EMPTIED`], the swap file, and
/// (unless `srv_included`) the contents of the separately mounted `/srv`.
fn excluded(rel: &[u8], srv_included: bool) -> bool {
    let under = |dir: &str| {
        rel.strip_prefix(dir.as_bytes())
            .is_some_and(|rest| rest.first() == Some(&b'/'))
    };
    EMPTIED.iter().any(|dir| under(dir)) || rel == b"swapfile" || (!srv_included && under("srv"))
}

/// The paths the fixups replace (compared with their `.cowherd-orig` instead) or make.
const REPLACED: [&str; 3] = [
    "etc/fstab",
    "etc/network/interfaces",
    "etc/udev/rules.d/70-persistent-net.rules",
];

/// Directories whose entries the fixups change (their mtimes are not compared).
const FIXED_DIRS: [&str; 3] = ["etc", "etc/network", "etc/udev/rules.d"];

/// Asserts that the guest's base is the machine (`source`, a manifest taken before) with
/// exactly the exclusions and the fixups: every other path identical in content, type, mode,
/// owner, mtime (directories' too), size, device number, symlink target and xattrs (ACLs and
/// capabilities included); hardlink groups kept; the sparse file still sparse.
fn assert_imported(source: &Manifest, tree: &Path, base: &Path, srv_included: bool) {
    let got = manifest(base);
    let mut want: Manifest = source
        .iter()
        .filter(|(rel, _)| !excluded(rel, srv_included))
        .filter(|(rel, _)| !REPLACED.iter().any(|r| r.as_bytes() == rel.as_slice()))
        .map(|(rel, entry)| (rel.clone(), entry.clone()))
        .collect();
    let have: Manifest = got
        .iter()
        .filter(|(rel, _)| {
            let rel = rel.as_slice();
            !rel.ends_with(b".cowherd-orig")
                && !rel.starts_with(b"etc/systemd")
                && !REPLACED.iter().any(|r| r.as_bytes() == rel)
        })
        .map(|(rel, entry)| (rel.clone(), entry.clone()))
        .collect();
    for dir in FIXED_DIRS {
        if let (Some(w), Some(h)) = (want.get_mut(dir.as_bytes()), have.get(dir.as_bytes())) {
            w.mtime = h.mtime;
        }
    }
    assert_same_content_and_metadata(&want, &have);
    assert_groups_kept(&want, &got);

    // The originals the fixups replaced are kept, with their own metadata.
    for rel in REPLACED {
        let orig = format!("{rel}.cowherd-orig");
        let (was, kept) = (&source[rel.as_bytes()], &got[orig.as_bytes()]);
        let (mut was, kept) = (was.clone(), kept.clone());
        was.hardlinks = kept.hardlinks.clone();
        assert_eq!(was, kept, "{orig} is not the machine's {rel}");
    }
    assert_eq!(
        fs::read_to_string(base.join("etc/fstab")).unwrap(),
        NEUTRAL_FSTAB
    );
    assert_eq!(
        fs::read_to_string(base.join("etc/network/interfaces")).unwrap(),
        GUEST_INTERFACES
    );
    assert!(!at(base, "etc/udev/rules.d/70-persistent-net.rules").exists());
    for unit in MASKED {
        let link = base.join("etc/systemd/system").join(unit);
        assert_eq!(
            fs::read_link(&link).unwrap_or_else(|e| panic!("{}: {e}", link.display())),
            Path::new("/dev/null"),
            "{unit} is not masked"
        );
    }
    for unit in [
        "hwclock-save.service",
        "smartmontools.service",
        "ssh.service",
    ] {
        assert!(
            fs::symlink_metadata(base.join("etc/systemd/system").join(unit)).is_err(),
            "{unit} is masked although not installed (or not hardware)"
        );
    }

    // Identity kept.
    for rel in [
        "etc/hostname",
        "etc/machine-id",
        "etc/ssh/ssh_host_ed25519_key",
        "etc/ssh/ssh_host_ed25519_key.pub",
    ] {
        assert_eq!(
            fs::read(base.join(rel)).unwrap(),
            fs::read(tree.join(rel)).unwrap(),
            "{rel}"
        );
    }

    // The emptied directories are there, empty; the swap file and (unless asked) /srv's files
    // are not.
    for dir in EMPTIED {
        let entries: Vec<_> = fs::read_dir(base.join(dir))
            .unwrap_or_else(|e| panic!("{dir}: {e}"))
            .collect();
        assert!(entries.is_empty(), "/{dir} is not empty: {entries:?}");
    }
    assert!(fs::symlink_metadata(base.join("swapfile")).is_err());
    assert_eq!(
        base.join("srv/www/index.html").exists(),
        srv_included,
        "/srv's file (included: {srv_included})"
    );

    let blocks = |dir: &Path| {
        fs::metadata(dir.join("usr/lib/sparse.img"))
            .unwrap()
            .blocks()
    };
    assert!(
        blocks(base) <= blocks(tree) + 128,
        "the sparse file lost its holes: {} blocks, was {}",
        blocks(base),
        blocks(tree)
    );
}

/// The report's fixups name each change.
fn assert_fixups_reported(report: &ImportReport) {
    let all = report.fixups.join("\n");
    for what in [
        "/etc/fstab",
        "/etc/network/interfaces",
        "70-persistent-net.rules",
        "eth0 (inet static)",
        "enp3s0 (inet static)",
    ] {
        assert!(all.contains(what), "no fixup mentions {what}:\n{all}");
    }
    for unit in MASKED {
        assert!(all.contains(&format!("masked {unit}")), "{unit}:\n{all}");
    }
    assert_eq!(report.hostname.as_deref(), Some(HOSTNAME));
}

/// What every rsync pass left out is reported.
fn assert_exclusions_reported(report: &ImportReport) {
    for pattern in [
        "/proc/*",
        "/sys/*",
        "/dev/*",
        "/run/*",
        "/tmp/*",
        "/swapfile",
    ] {
        assert!(
            report.excluded.iter().any(|e| e == pattern),
            "{pattern}: {:?}",
            report.excluded
        );
    }
}

/// The guest's record: imported, from the source, with the machine's hostname.
fn assert_record(root: &HostRoot, name: &str, source: &str) {
    let record = cowherd_unify::guest_record(root, name).expect("the guest exists");
    assert_eq!(record.origin.kind, OriginKind::Import);
    assert_eq!(record.origin.path.as_deref(), Some(source));
    assert_eq!(record.hostname.as_deref(), Some(HOSTNAME));
}

/// Entries of the root's guests directory other than the guests (staging leftovers).
fn leftovers(root: &HostRoot) -> Vec<String> {
    fs::read_dir(root.guests_dir())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|name| name.starts_with('.'))
        .collect()
}

#[test]
fn import_from_a_local_rsync_daemon_keeps_everything_but_the_excluded() {
    let fx = Fixture::new("import-daemon");
    let source_manifest = manifest(&fx.tree);
    let daemon = RsyncDaemon::start(fx.scratch.path(), &fx.tree, &[]);
    let source = daemon.source();
    let report = import_ok(&fx.root, "web01", &source, &ImportOptions::default());

    assert_imported(&source_manifest, &fx.tree, &fx.base("web01"), false);
    assert_fixups_reported(&report);
    assert_exclusions_reported(&report);
    let url = format!("rsync://127.0.0.1:{}/machine", daemon.port);
    assert_eq!(report.source, url);
    assert_record(&fx.root, "web01", &url);
    assert!(report.files > 40, "{report:?}");
    let (machine_bytes, _) = file_bytes(&fx.tree);
    assert!(
        report.transferred_bytes >= (4 << 20) && report.transferred_bytes <= machine_bytes,
        "{report:?}"
    );
    assert!(
        report.warnings.iter().any(|w| w.contains("daemon")),
        "the daemon's mounts are unknown: {:?}",
        report.warnings
    );
    assert_eq!(leftovers(&fx.root), Vec::<String>::new());
}

/// (Bytes of regular files, count) below `dir`, not crossing into other filesystems.
fn file_bytes(dir: &Path) -> (u64, u64) {
    let dev = fs::metadata(dir).unwrap().dev();
    walkdir::WalkDir::new(dir)
        .same_file_system(true)
        .into_iter()
        .map(|e| e.unwrap())
        .filter(|e| e.file_type().is_file())
        .map(|e| e.metadata().unwrap())
        .filter(|m| m.dev() == dev)
        .fold((0, 0), |(bytes, n), m| (bytes + m.len(), n + 1))
}

#[test]
fn import_over_ssh_to_localhost() {
    let fx = Fixture::new("import-ssh");
    let source_manifest = manifest(&fx.tree);
    let sshd = Sshd::start(fx.scratch.path());
    let spec = format!("root@127.0.0.1:{}/", fx.tree.display());
    let source: Source = spec.parse().unwrap();
    let opts = ImportOptions {
        rsh: Some(sshd.rsh()),
        ..ImportOptions::default()
    };

    let report = import_ok(&fx.root, "plain", &source, &opts);
    assert_imported(&source_manifest, &fx.tree, &fx.base("plain"), false);
    assert_fixups_reported(&report);
    assert_exclusions_reported(&report);
    assert_record(&fx.root, "plain", &spec);
    assert_eq!(report.excluded_mounts, ["/srv"], "{report:?}");
    assert_eq!(report.included_mounts, Vec::<String>::new());

    let opts = ImportOptions {
        include_mounts: vec!["/srv".into()],
        ..opts
    };
    let report = import_ok(&fx.root, "with-srv", &source, &opts);
    assert_imported(&source_manifest, &fx.tree, &fx.base("with-srv"), true);
    assert_eq!(report.included_mounts, ["/srv"], "{report:?}");
    assert_eq!(report.excluded_mounts, Vec::<String>::new(), "{report:?}");
    assert_eq!(
        fs::read(fx.base("with-srv").join("srv/www/index.html")).unwrap(),
        b"<h1>web01</h1>\n"
    );
}

#[test]
fn import_from_a_local_directory_and_from_a_tarball() {
    let fx = Fixture::new("import-local");
    let source_manifest = manifest(&fx.tree);
    let source = Source::Local(fx.tree.clone());
    let report = import_ok(&fx.root, "local", &source, &ImportOptions::default());
    assert_imported(&source_manifest, &fx.tree, &fx.base("local"), false);
    assert_fixups_reported(&report);
    assert_exclusions_reported(&report);
    assert_eq!(report.excluded_mounts, ["/srv"], "{report:?}");
    assert_record(&fx.root, "local", &fx.tree.display().to_string());

    // A root filesystem tarball (of the machine's own filesystem, without its volatile
    // contents, as one is made), compressed with zstd.
    let tarball = fx.scratch.join("web01.tar.zst");
    let mut tar = Command::new(program("tar", "tar"));
    tar.args([
        "--create",
        "--zstd",
        "--format=posix",
        "--xattrs",
        "--xattrs-include=*",
    ])
    .arg("--acls")
    .args(["--numeric-owner", "--sparse", "--one-file-system", "--file"])
    .arg(&tarball)
    .arg("--directory")
    .arg(&fx.tree);
    for dir in EMPTIED {
        tar.arg(format!("--exclude=./{dir}/*"));
    }
    let out = tar.args(["--exclude=./swapfile", "."]).output().unwrap();
    assert!(
        out.status.success(),
        "tar: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let source: Source = tarball.display().to_string().parse().unwrap();
    assert!(matches!(source, Source::Tarball(_)), "{source:?}");
    let report = import_ok(&fx.root, "from-tar", &source, &ImportOptions::default());
    assert_imported(&source_manifest, &fx.tree, &fx.base("from-tar"), false);
    assert_fixups_reported(&report);
    assert_eq!(
        report.transferred_bytes,
        fs::metadata(&tarball).unwrap().len()
    );
    assert_record(&fx.root, "from-tar", &tarball.display().to_string());
}

#[test]
fn resync_transfers_only_what_changed() {
    let fx = Fixture::new("import-resync");
    let daemon = RsyncDaemon::start(fx.scratch.path(), &fx.tree, &[]);
    let source = daemon.source();
    let first = import_ok(&fx.root, "web01", &source, &ImportOptions::default());

    // The machine goes on: two files change, one goes.
    let new_fstab =
        format!("{FSTAB}UUID=3c3c3c3c-3333-4d4d-8e8e-0123456789ab /data ext4 defaults 0 2\n");
    fs::write(fx.tree.join("etc/fstab"), &new_fstab).unwrap();
    fs::write(
        fx.tree.join("var/log/syslog"),
        content("syslog, later", 20_500),
    )
    .unwrap();
    fs::remove_file(fx.tree.join("usr/share/doc/readme")).unwrap();
    let source_manifest = manifest(&fx.tree);

    let opts = ImportOptions {
        resync: true,
        ..ImportOptions::default()
    };
    let report = import_ok(&fx.root, "web01", &source, &opts);
    assert!(report.resync);
    // The files the fixups replaced are sent again each time (a few hundred bytes).
    let replaced = (FSTAB.len() + INTERFACES.len() + NET_RULES.len()) as u64;
    let changed = (new_fstab.len() + 20_500) as u64 + replaced;
    assert!(
        report.transferred_bytes <= changed + 4096,
        "resync transferred {} bytes of file data for {changed} changed bytes: {report:?}",
        report.transferred_bytes
    );
    assert!(
        report.transferred_bytes * 50 < first.transferred_bytes,
        "first import {} bytes, resync {}",
        first.transferred_bytes,
        report.transferred_bytes
    );
    assert!(
        report.transferred_files <= 2 + REPLACED.len() as u64,
        "{report:?}"
    );

    let base = fx.base("web01");
    assert_imported(&source_manifest, &fx.tree, &base, false);
    assert!(!base.join("usr/share/doc/readme").exists());
    assert_eq!(
        fs::read(base.join("var/log/syslog")).unwrap(),
        content("syslog, later", 20_500)
    );
    // The fixups are there again, and the kept original is the machine's latest.
    assert_eq!(
        fs::read_to_string(base.join("etc/fstab.cowherd-orig")).unwrap(),
        new_fstab
    );
    assert_eq!(
        fs::read_to_string(base.join("etc/fstab")).unwrap(),
        NEUTRAL_FSTAB
    );
    assert_fixups_reported(&report);
    assert!(
        !fx.root.guests_dir().join("web01/resync").exists(),
        "the old base is removed"
    );
    assert_eq!(leftovers(&fx.root), Vec::<String>::new());

    // Nothing changed since: only the files the fixups replaced are transferred.
    let again = import_ok(&fx.root, "web01", &source, &opts);
    assert!(
        again.transferred_bytes <= new_fstab.len() as u64 + replaced,
        "{again:?}"
    );
    assert_eq!(again.transferred_files, REPLACED.len() as u64, "{again:?}");
    assert_imported(&source_manifest, &fx.tree, &base, false);
}

#[test]
fn resync_never_changes_a_store_object_another_guest_shares() {
    let fx = Fixture::new("import-shared");
    // A guest of the same distribution, sharing its files with the machine's through the store.
    let twin = fx.scratch.join("twin");
    distribution(&mut TreeBuilder::new(&twin));
    cowherd_unify::adopt(&fx.root, &twin, "twin", false).expect("adopt");
    let source = Source::Local(fx.tree.clone());
    import_ok(&fx.root, "web01", &source, &ImportOptions::default());
    let names = ["twin".to_string(), "web01".to_string()];
    let unified = cowherd_unify::unify(&fx.root, &names, &UnifyOptions::default(), &NoProgress)
        .expect("unify");
    assert!(unified.failures.is_empty(), "{:?}", unified.failures);
    let ping = |guest: &str| fx.root.guests_dir().join(guest).join("base/usr/bin/ping");
    assert_eq!(ino(&ping("twin")), ino(&ping("web01")), "ping is shared");
    let twin_before = manifest(&fx.root.guests_dir().join("twin/base"));

    // On the machine, only ping's mode and su's capability change: rsync would chmod and
    // setxattr the base's inode in place, which is the store object.
    fs::set_permissions(
        fx.tree.join("usr/bin/ping"),
        fs::Permissions::from_mode(0o700),
    )
    .unwrap();
    xattr::set(fx.tree.join("usr/bin/su"), "user.changed", b"1").unwrap();
    let opts = ImportOptions {
        resync: true,
        ..ImportOptions::default()
    };
    let report = import_ok(&fx.root, "web01", &source, &opts);
    let replaced = (FSTAB.len() + INTERFACES.len() + NET_RULES.len()) as u64;
    assert!(report.transferred_bytes <= replaced, "{report:?}");

    assert_eq!(fs::metadata(ping("web01")).unwrap().mode() & 0o7777, 0o700);
    let su = fx.base("web01").join("usr/bin/su");
    assert_eq!(
        xattr::get(&su, "user.changed").unwrap().as_deref(),
        Some(&b"1"[..])
    );
    assert_same_content_and_metadata(
        &twin_before,
        &manifest(&fx.root.guests_dir().join("twin/base")),
    );
    for object in store_objects(fx.scratch.join("root").as_path()) {
        let meta = fs::metadata(&object.path).unwrap();
        assert_ne!(
            meta.mode() & 0o7777,
            0o700,
            "{} changed",
            object.path.display()
        );
        assert!(xattr::get(&object.path, "user.changed").unwrap().is_none());
    }
    // Unchanged files are still the store's objects (new links, nothing copied).
    let readme = |guest: &str| {
        fx.root
            .guests_dir()
            .join(guest)
            .join("base/usr/share/doc/readme")
    };
    assert_eq!(ino(&readme("twin")), ino(&readme("web01")));
}

/// Adopts a guest holding only [`distribution`]'s files.
fn adopt_distribution(fx: &Fixture, name: &str) {
    let dir = fx.scratch.join(name);
    distribution(&mut TreeBuilder::new(&dir));
    cowherd_unify::adopt(&fx.root, &dir, name, false).expect("adopt");
}

#[test]
fn resync_of_a_guest_linked_to_immutable_objects_keeps_them_immutable() {
    let fx = Fixture::new("import-immutable");
    fs::write(
        fx.root.policy_path(),
        "rules = [\"immutable /usr/**\", \"private /etc/**\", \"cow /**\"]\n",
    )
    .unwrap();
    let source = Source::Local(fx.tree.clone());
    import_ok(&fx.root, "web01", &source, &ImportOptions::default());
    adopt_distribution(&fx, "distro");
    let unified = cowherd_unify::unify(
        &fx.root,
        &["web01".into(), "distro".into()],
        &UnifyOptions::default(),
        &NoProgress,
    )
    .expect("unify");
    assert!(unified.failures.is_empty(), "{:?}", unified.failures);
    assert!(is_immutable(&fx.base("web01").join("usr/share/big.bin")));

    fs::write(fx.tree.join("var/log/syslog"), b"later\n").unwrap();
    let opts = ImportOptions {
        resync: true,
        ..ImportOptions::default()
    };
    let report = import_ok(&fx.root, "web01", &source, &opts);
    assert_eq!(
        fs::read(fx.base("web01").join("var/log/syslog")).unwrap(),
        b"later\n"
    );
    // An immutable object cannot take the new link rsync's --link-dest makes: the file is
    // copied (locally: nothing is transferred), and the next unify links it to its object
    // again (the sparse file's holes come back with it).
    let unified = cowherd_unify::unify(
        &fx.root,
        &["web01".into()],
        &UnifyOptions::default(),
        &NoProgress,
    )
    .expect("unify");
    assert!(unified.failures.is_empty(), "{:?}", unified.failures);
    assert_eq!(unified.objects_created, 0, "{unified:?}");
    assert!(is_immutable(&fx.base("web01").join("usr/share/big.bin")));
    assert_imported(&manifest(&fx.tree), &fx.tree, &fx.base("web01"), false);
    assert!(
        report
            .warnings
            .iter()
            .all(|w| !w.contains("could not be removed")),
        "the old base is removed with the store's own removal: {:?}",
        report.warnings
    );
    assert!(!fx.root.guests_dir().join("web01/resync").exists());
    // The immutable objects are immutable still.
    for object in store_objects(fx.scratch.join("root").as_path()) {
        if object.marker == 'i' {
            assert!(is_immutable(&object.path), "{}", object.path.display());
        }
    }
}

#[test]
fn an_imported_machine_shares_its_distribution_files_with_a_guest_of_that_distribution() {
    let fx = Fixture::new("import-savings");
    // Two guests of the distribution, unified: its files are store objects.
    adopt_distribution(&fx, "distro1");
    adopt_distribution(&fx, "distro2");
    cowherd_unify::unify(
        &fx.root,
        &["distro1".into(), "distro2".into()],
        &UnifyOptions::default(),
        &NoProgress,
    )
    .expect("unify the distribution's guests");
    import_ok(
        &fx.root,
        "web01",
        &Source::Local(fx.tree.clone()),
        &ImportOptions::default(),
    );
    let report = cowherd_unify::unify(
        &fx.root,
        &["web01".into()],
        &UnifyOptions::default(),
        &NoProgress,
    )
    .expect("unify web01");
    assert!(report.failures.is_empty(), "{:?}", report.failures);
    assert_eq!(
        report.objects_created, 0,
        "every /usr file was in the store already: {report:?}"
    );
    let distro_bytes = 64 * 1024 + 48 * 1024 + 40 * 1024 + 24 * 1024 + 4096 + (4 << 20) + 9000;
    assert!(
        report.saved_bytes >= distro_bytes as u64,
        "saved {} bytes, the distribution's files take {distro_bytes}: {report:?}",
        report.saved_bytes
    );
}

#[test]
fn an_unreachable_source_is_a_one_line_error_naming_it() {
    let fx = Fixture::new("import-unreachable");
    let port = free_port();
    let spec = format!("rsync://127.0.0.1:{port}/x/");
    let err = import(
        &fx.root,
        "web01",
        &spec.parse().unwrap(),
        &ImportOptions::default(),
    )
    .expect_err("nothing listens there");
    let message = err.to_string();
    assert!(matches!(err, ImportError::Copy { .. }), "{err:?}");
    assert_eq!(message.lines().count(), 1, "{message}");
    assert!(
        message.contains(&format!("rsync://127.0.0.1:{port}/x")),
        "{message}"
    );
    assert!(message.contains("Connection refused"), "{message}");
    assert!(cowherd_unify::guest_record(&fx.root, "web01").is_err());
    assert_eq!(leftovers(&fx.root), Vec::<String>::new());

    let sshd_less = "root@127.0.0.1:/";
    let opts = ImportOptions {
        rsh: Some(format!("ssh -F /dev/null -p {port} -o BatchMode=yes")),
        ..ImportOptions::default()
    };
    let err = import(&fx.root, "web01", &sshd_less.parse().unwrap(), &opts).unwrap_err();
    let message = err.to_string();
    assert_eq!(message.lines().count(), 1, "{message}");
    assert!(message.contains("root@127.0.0.1:/"), "{message}");
    assert!(message.contains("Connection refused"), "{message}");
}

#[test]
fn an_existing_guest_name_is_refused_before_anything_is_copied() {
    let fx = Fixture::new("import-exists");
    let other = fx.scratch.join("other");
    fs::create_dir_all(other.join("etc")).unwrap();
    fs::write(other.join("etc/fstab"), "mine\n").unwrap();
    cowherd_unify::adopt(&fx.root, &other, "web01", false).expect("adopt");
    let before = manifest(&fx.base("web01"));

    let err = import(
        &fx.root,
        "web01",
        &Source::Local(fx.tree.clone()),
        &ImportOptions::default(),
    )
    .expect_err("the name is taken");
    assert!(
        matches!(
            err,
            ImportError::Unify(cowherd_unify::Error::GuestExists { .. })
        ),
        "{err:?}"
    );
    assert!(err.to_string().contains("web01"), "{err}");
    assert_eq!(
        leftovers(&fx.root),
        Vec::<String>::new(),
        "a staging directory was made"
    );
    assert_same_content_and_metadata(&before, &manifest(&fx.base("web01")));

    // A bad name too, and a resync of a guest that was adopted, not imported.
    let err = import(
        &fx.root,
        "../x",
        &Source::Local(fx.tree.clone()),
        &ImportOptions::default(),
    )
    .unwrap_err();
    assert!(
        matches!(
            err,
            ImportError::Unify(cowherd_unify::Error::BadGuestName { .. })
        ),
        "{err:?}"
    );
    let resync = ImportOptions {
        resync: true,
        ..ImportOptions::default()
    };
    let err = import(&fx.root, "web01", &Source::Local(fx.tree.clone()), &resync).unwrap_err();
    assert!(matches!(err, ImportError::NotImported { .. }), "{err:?}");
    assert_same_content_and_metadata(&before, &manifest(&fx.base("web01")));
}

#[test]
fn a_missing_local_source_is_refused_naming_it() {
    let fx = Fixture::new("import-missing");
    let missing = fx.scratch.join("no-such-machine");
    let err = import(
        &fx.root,
        "web01",
        &Source::Local(missing.clone()),
        &ImportOptions::default(),
    )
    .unwrap_err();
    assert!(matches!(err, ImportError::SourceMissing { .. }), "{err:?}");
    assert!(
        err.to_string().contains(&missing.display().to_string()),
        "{err}"
    );
    assert_eq!(err.to_string().lines().count(), 1);
    let tarball = fx.scratch.join("no-such.tar.gz");
    let err = import(
        &fx.root,
        "web01",
        &Source::Tarball(tarball.clone()),
        &ImportOptions::default(),
    )
    .unwrap_err();
    assert!(
        err.to_string().contains(&tarball.display().to_string()),
        "{err}"
    );
    assert!(cowherd_unify::guest_record(&fx.root, "web01").is_err());
    assert_eq!(leftovers(&fx.root), Vec::<String>::new());
}

#[test]
fn a_mounted_guest_is_not_resynced() {
    let fx = Fixture::new("import-mounted");
    let source = Source::Local(fx.tree.clone());
    import_ok(&fx.root, "web01", &source, &ImportOptions::default());
    let mut mounted = MountedGuests::default();
    mounted.watch(fx.root.guests_dir().join("web01/rootfs"));
    cowherd_unify::mount(&fx.root, "web01").expect("mount");
    let before = manifest(&fx.base("web01"));
    fs::write(fx.tree.join("var/log/syslog"), b"later\n").unwrap();
    let opts = ImportOptions {
        resync: true,
        ..ImportOptions::default()
    };
    let err = import(&fx.root, "web01", &source, &opts).expect_err("it is mounted");
    assert!(matches!(err, ImportError::Mounted { .. }), "{err:?}");
    assert!(err.to_string().contains("cowherd umount web01"), "{err}");
    assert_same_content_and_metadata(&before, &manifest(&fx.base("web01")));

    // Unmounted here, but a process of another mount namespace still holds a copy of the
    // overlay: its layers must not change under it either.
    let child = other_mount_namespace();
    let pid = child.id();
    let rootfs = fx.root.guests_dir().join("web01/rootfs");
    nix::mount::umount2(&rootfs, nix::mount::MntFlags::MNT_DETACH).expect("umount here");
    let err = import(&fx.root, "web01", &source, &opts).expect_err("held elsewhere");
    assert!(
        matches!(err, ImportError::Unify(cowherd_unify::Error::InUse { .. })),
        "{err:?}"
    );
    assert!(err.to_string().contains(&pid.to_string()), "{err}");
    assert_same_content_and_metadata(&before, &manifest(&fx.base("web01")));
    drop(child);

    import_ok(&fx.root, "web01", &source, &opts);
    assert_eq!(
        fs::read(fx.base("web01").join("var/log/syslog")).unwrap(),
        b"later\n"
    );
}

/// The variables that make [`killed_importer`] import: the root, and the source.
const KILLED_ROOT: &str = "COWHERD_IMPORT_TEST_ROOT";
const KILLED_SOURCE: &str = "COWHERD_IMPORT_TEST_SOURCE";

/// Not a test of its own: the importer that [`a_sigkill_during_an_import_leaves_no_guest`]
/// starts (with [`KILLED_ROOT`] set) and kills mid-copy. Run plainly, it has nothing to do.
#[test]
fn killed_importer() {
    let (Some(root), Some(source)) = (
        std::env::var_os(KILLED_ROOT),
        std::env::var(KILLED_SOURCE).ok(),
    ) else {
        return;
    };
    let root = HostRoot::open(Path::new(&root), Access::Write).expect("open the root");
    let result = import(
        &root,
        "victim",
        &source.parse().unwrap(),
        &ImportOptions::default(),
    );
    panic!("the import ended before it was killed: {result:?}");
}

/// Processes whose command line mentions `needle`.
fn processes_mentioning(needle: &str) -> Vec<String> {
    fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| fs::read(e.path().join("cmdline")).ok())
        .map(|line| String::from_utf8_lossy(&line).replace('\0', " "))
        .filter(|line| line.contains(needle))
        .collect()
}

/// A file being written by rsync (a temporary `.NAME.XXXXXX`) below `dir`, past 256 KiB.
fn copying_a_big_file(dir: &Path) -> bool {
    walkdir::WalkDir::new(dir)
        .into_iter()
        .filter_map(Result::ok)
        .any(|e| {
            e.file_name().to_string_lossy().starts_with('.')
                && e.file_type().is_file()
                && e.metadata().is_ok_and(|m| m.len() > 256 * 1024)
        })
}

#[test]
fn a_sigkill_during_an_import_leaves_no_guest() {
    assert_root();
    let scratch = Scratch::new("import-killed");
    let root_path = HostRoot::init(&scratch.join("root"))
        .expect("init the root")
        .path()
        .to_path_buf();
    let tree = scratch.join("machine");
    machine(&tree);
    let _srv = mount_srv(&tree);
    // A slow daemon (512 KiB/s): the 8 MiB sparse file and the 4 MiB one take 24 s.
    let slow = RsyncDaemon::start(scratch.path(), &tree, &["--bwlimit=512"]);

    let mut child = KillOnDrop::spawn(
        Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "killed_importer", "--nocapture"])
            .env(KILLED_ROOT, &root_path)
            .env(KILLED_SOURCE, slow.source().to_string())
            .stdout(Stdio::null())
            .stderr(Stdio::null()),
    );
    let staging = root_path.join("guests/.victim.creating/base");
    let deadline = Instant::now() + Duration::from_secs(30);
    while !copying_a_big_file(&staging) {
        assert!(
            child.0.try_wait().unwrap().is_none(),
            "the importer ended before it was killed"
        );
        assert!(Instant::now() < deadline, "the copy did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    child.0.kill().unwrap();
    child.0.wait().unwrap();

    // Its rsync dies with it (and stops writing into the staging directory).
    wait_for("the importer's rsync to die", || {
        processes_mentioning(".victim.creating").is_empty()
    });
    let root = HostRoot::open(&root_path, Access::Read).unwrap();
    assert!(matches!(
        cowherd_unify::guest_record(&root, "victim"),
        Err(cowherd_unify::Error::NoSuchGuest { .. })
    ));
    assert!(
        !cowherd_unify::guest_names(&root)
            .unwrap()
            .contains(&"victim".to_string())
    );
    assert_eq!(
        leftovers(&root),
        [".victim.creating"],
        "the killed import's staging directory"
    );
    drop(root);

    // The next writer removes the leftover; the next import of the name succeeds.
    let root = HostRoot::open(&root_path, Access::Write).unwrap();
    assert_eq!(leftovers(&root), Vec::<String>::new());
    let fast = RsyncDaemon::start(scratch.path(), &tree, &[]);
    let source_manifest = manifest(&tree);
    import_ok(&root, "victim", &fast.source(), &ImportOptions::default());
    assert_imported(
        &source_manifest,
        &tree,
        &root.guests_dir().join("victim/base"),
        false,
    );
}

/// The command line: `cowherd import` unifies the new guest and says how much of it the store
/// held already; `--resync` moves only what changed.
#[test]
fn cowherd_import_reports_what_the_store_held_already() {
    assert_root();
    let s = Scratch::new("import-cli");
    let root = init_root(s.path());
    for name in ["distro1", "distro2"] {
        adopt_built(&root, s.path(), name, |d| {
            let mut t = TreeBuilder::new(d);
            distribution(&mut t);
            t.finish();
        });
    }
    cowherd(&root).args(["unify", "--all"]).assert().success();
    let tree = s.join("machine");
    machine(&tree);
    let _srv = mount_srv(&tree);
    let first = run_json(
        cowherd(&root)
            .args(["import", "web01", "--from"])
            .arg(&tree)
            .arg("--json"),
    );
    assert!(!first["fixups"].as_array().unwrap().is_empty(), "{first:#}");
    let stored = first["already_stored"]["stored_bytes"].as_u64().unwrap();
    assert!(
        stored >= 4 << 20,
        "the distribution's files were in the store: {first:#}"
    );
    assert_eq!(first["unify"]["objects_created"], 0, "{first:#}");
    let list = guest_names(&run_json(cowherd(&root).args(["list", "--json"])));
    assert!(list.contains("web01"));

    fs::write(tree.join("etc/motd"), b"changed on the source\n").unwrap();
    let again = run_json(
        cowherd(&root)
            .args(["import", "web01", "--resync", "--from"])
            .arg(&tree)
            .arg("--json"),
    );
    assert!(
        again["transferred_bytes"].as_u64().unwrap() < 64 * 1024,
        "a resync sends what changed: {again:#}"
    );
    assert_eq!(
        fs::read(base(&root, "web01").join("etc/motd")).unwrap(),
        b"changed on the source\n"
    );
}
