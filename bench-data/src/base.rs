//! The base tree shared by all guests: a Debian-like system built once in memory from the seed.
//!
//! Everything is organised in packages, like a real install: each package owns files with one
//! build timestamp, its docs, man pages and translations, and leaves `.list`, `.md5sums` and
//! `.conffiles` records in `/var/lib/dpkg/info`. A fixed core of real-looking packages (libc,
//! coreutils, bash, perl, python, tzdata, openssh, sudo, …) carries the special cases —
//! setuid binaries, foreign owners, symlinks, hard-link groups, empty files — and synthetic
//! packages are added until the requested file count is reached.

use std::collections::{BTreeSet, HashSet};
use std::fmt::Write as _;

use crate::content::{BinKind, Body, TextStyle};
use crate::seed::Rand;
use crate::spec::SynthSpec;
use crate::tree::{Content, Meta, Node, Tree};

/// The uid/gid of the unprivileged user owning `/home/user`.
pub(crate) const USER: u32 = 1000;
/// Group `shadow`.
const SHADOW: u32 = 42;
/// Group `tty`.
const TTY: u32 = 5;
/// Group `mail`.
const MAIL: u32 = 8;
/// Group `staff`.
const STAFF: u32 = 50;
/// Group `messagebus`.
const MESSAGEBUS: u32 = 106;

const DAY: i64 = 86_400;

/// A new version of one package, installed in some guests.
#[derive(Debug, Clone)]
pub(crate) struct Upgrade {
    /// When the new version was unpacked (mtime of every replaced file).
    pub(crate) secs: i64,
    /// The replaced files and their new contents.
    pub(crate) files: Vec<(String, Content)>,
}

/// The shared base tree and what the per-guest divergence needs to know about it.
#[derive(Debug, Clone)]
pub(crate) struct Base {
    pub(crate) tree: Tree,
    /// Time the image was built; base files are older, per-guest changes newer.
    pub(crate) epoch: i64,
    /// `/etc` regular files a guest administrator may have edited.
    pub(crate) etc_pool: Vec<String>,
    /// `/usr` regular files that are not part of a hard-link group.
    pub(crate) usr_pool: Vec<String>,
    /// One or two package upgrades (same paths, new contents).
    pub(crate) upgrades: Vec<Upgrade>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Tool,
    Lib,
    Python,
    Data,
}

#[derive(Debug)]
struct Pkg {
    name: String,
    version: String,
    secs: i64,
    /// Every non-directory path the package installs (regular files, links).
    paths: Vec<String>,
    /// Its regular files, for `.md5sums`.
    regular: Vec<String>,
    conffiles: Vec<String>,
}

#[rustfmt::skip]
const LANGS: &[&str] = &[
    "de", "fr", "es", "it", "ja", "pt_BR", "ru", "zh_CN", "nl", "pl", "sv", "cs", "da", "fi", "hu",
    "ko", "tr", "uk", "zh_TW", "ca",
];

/// Shared license texts: `/usr/share/doc/*/copyright` of many packages are byte-identical.
const LICENSES: &[(&str, u64)] = &[
    ("GPL-2", 18_092),
    ("GPL-3", 35_149),
    ("LGPL-2.1", 26_530),
    ("MIT", 1_077),
    ("BSD-3-clause", 1_499),
    ("Apache-2.0", 11_357),
    ("Artistic", 6_111),
];

#[rustfmt::skip]
const COREUTILS: &[&str] = &[
    "ls", "cp", "mv", "rm", "cat", "chmod", "chown", "date", "df", "du", "echo", "env", "head",
    "tail", "sort", "uniq", "wc", "mkdir", "rmdir", "ln", "touch", "stat", "id", "whoami", "tr",
    "cut", "paste", "tee", "sleep", "true", "false", "basename", "dirname", "readlink", "realpath",
    "md5sum", "sha256sum", "seq", "printf", "test", "[", "nproc", "uname", "sync", "mktemp",
];

#[rustfmt::skip]
const TOOLS: &[&str] = &[
    "grep", "sed", "gawk", "findutils", "tar", "gzip", "bzip2", "xz-utils", "curl", "wget", "less",
    "procps", "iproute2", "iputils-ping", "rsync", "git", "htop", "lsof", "strace", "tmux", "file",
    "zstd", "jq", "unzip", "zip", "diffutils", "patch", "make", "cron", "logrotate", "rsyslog",
    "nano", "man-db", "openssl", "gnupg", "sqlite3", "bc", "psmisc", "netcat-openbsd", "whiptail",
];

#[rustfmt::skip]
const LIBS: &[&str] = &[
    "libssl3", "libcrypt1", "zlib1g", "libzstd1", "liblzma5", "libbz2-1.0", "libpcre2-8-0",
    "libselinux1", "libsystemd0", "libudev1", "libgcrypt20", "libgnutls30", "libffi8", "libexpat1",
    "libsqlite3-0", "libcurl4", "libxml2", "libyaml-0-2", "libreadline8", "libncursesw6",
    "libtinfo6", "libuuid1", "libblkid1", "libmount1", "libcap2", "libacl1", "libattr1",
    "libkmod2", "libidn2-0", "libunistring2", "libgmp10", "libnettle8", "libp11-kit0",
    "libtasn1-6", "libaudit1", "libpam0g", "libdb5.3", "libgdbm6", "libmpfr6", "libstdc++6",
    "libgcc-s1",
];

#[rustfmt::skip]
const PYTHON: &[&str] = &[
    "python3-requests", "python3-urllib3", "python3-idna", "python3-certifi", "python3-chardet",
    "python3-six", "python3-yaml", "python3-jinja2", "python3-markupsafe", "python3-setuptools",
    "python3-pkg-resources", "python3-debian", "python3-apt", "python3-distro", "python3-dbus",
    "python3-gi", "python3-cryptography", "python3-cffi", "python3-attr", "python3-pyasn1",
    "python3-openssl", "python3-serial", "python3-pygments", "python3-babel",
];

#[rustfmt::skip]
const DATA: &[&str] = &[
    "iso-codes", "shared-mime-info", "media-types", "publicsuffix", "sgml-base", "xml-core",
    "fonts-dejavu-core", "fontconfig-config", "hicolor-icon-theme", "adduser", "debconf", "ucf",
];

#[rustfmt::skip]
const SYLLABLES: &[&str] = &[
    "ax", "bel", "cor", "dun", "eph", "fri", "gal", "hul", "ivo", "jar", "kel", "lum", "mor",
    "nix", "orb", "pel", "qua", "rok", "sil", "tor", "umb", "vex", "wim", "xan", "yor", "zed",
];

#[rustfmt::skip]
const ZONES: &[&str] = &[
    "Europe/Berlin", "Europe/Paris", "Europe/London", "Europe/Vienna", "America/New_York",
    "America/Chicago", "America/Los_Angeles", "Asia/Tokyo", "Asia/Kolkata", "Australia/Sydney",
];

struct Builder<'a> {
    spec: &'a SynthSpec,
    rng: Rand,
    tree: Tree,
    epoch: i64,
    files: usize,
    pkgs: Vec<Pkg>,
    cur: Option<Pkg>,
    names: HashSet<String>,
    etc_pool: Vec<String>,
    linked: HashSet<String>,
    next_name: [usize; 4],
}

/// Builds the base tree of `spec`.
pub(crate) fn build(spec: &SynthSpec) -> Base {
    let mut rng = Rand::new(spec.seed, "base", 0);
    // The image was built some time in 2022–2024, at a whole second.
    let epoch = 1_640_995_200 + rng.below(3 * 365) as i64 * DAY + rng.below(DAY as u64) as i64;
    let dir_meta = Meta::root(0o755, epoch + 7200, 0);
    let mut b = Builder {
        spec,
        rng,
        tree: Tree::new(dir_meta),
        epoch,
        files: 0,
        pkgs: Vec::new(),
        cur: None,
        names: HashSet::new(),
        etc_pool: Vec::new(),
        linked: HashSet::new(),
        next_name: [0; 4],
    };
    b.core();
    while b.files < spec.files_per_guest {
        b.random_package();
    }
    b.dpkg_status();
    let upgrades = b.upgrades();
    let usr_pool = b
        .tree
        .entries
        .iter()
        .filter(|(p, n)| {
            p.starts_with("/usr/") && matches!(n, Node::File(..)) && !b.linked.contains(*p)
        })
        .map(|(p, _)| p.clone())
        .collect();
    Base {
        tree: b.tree,
        epoch,
        etc_pool: b.etc_pool,
        usr_pool,
        upgrades,
    }
}

impl Builder<'_> {
    fn cap(&self) -> u64 {
        self.spec.max_file_size
    }

    /// A count that grows with the requested tree size.
    fn scaled(&self, per: usize, min: usize, max: usize) -> usize {
        (self.spec.files_per_guest / per).clamp(min, max)
    }

    /// A log-normal size capped at the spec's maximum.
    fn sz(&mut self, median: f64, sigma: f64) -> u64 {
        let cap = self.cap();
        self.rng.lognormal(median, sigma, 1, cap)
    }

    fn begin(&mut self, name: &str) {
        debug_assert!(self.cur.is_none());
        self.names.insert(name.to_owned());
        let version = format!(
            "{}.{}.{}-{}",
            self.rng.below(10),
            self.rng.below(30),
            self.rng.below(20),
            self.rng.range(1, 5)
        );
        // Upstream build time, up to three years before the image; dpkg keeps whole seconds.
        let secs = self.epoch - 30 * DAY - self.rng.below(3 * 365 * DAY as u64) as i64;
        self.cur = Some(Pkg {
            name: name.to_owned(),
            version,
            secs,
            paths: Vec::new(),
            regular: Vec::new(),
            conffiles: Vec::new(),
        });
    }

    fn pkg(&mut self) -> &mut Pkg {
        self.cur.as_mut().expect("inside a package")
    }

    fn pkg_meta(&mut self, mode: u32) -> Meta {
        Meta::root(mode, self.pkg().secs, 0)
    }

    /// Adds a regular file (of the current package, if any) with explicit metadata and content
    /// key. A path some earlier package already installed is left alone.
    fn put_file(&mut self, path: &str, meta: Meta, key: &str, body: Body) -> bool {
        if self.tree.entries.contains_key(path) {
            return false;
        }
        self.tree.keyed(path, meta, key, 0, body);
        self.files += 1;
        if let Some(pkg) = self.cur.as_mut() {
            pkg.paths.push(path.to_owned());
            pkg.regular.push(path.to_owned());
        }
        true
    }

    /// A root-owned regular file of the current package with mode `mode`.
    fn f(&mut self, path: &str, mode: u32, body: Body) {
        let meta = self.pkg_meta(mode);
        self.put_file(path, meta, path, body);
    }

    /// A regular file of the current package with explicit metadata.
    fn fm(&mut self, path: &str, meta: Meta, body: Body) {
        self.put_file(path, meta, path, body);
    }

    /// A symlink of the current package.
    fn ln(&mut self, path: &str, target: &str) {
        if self.tree.entries.contains_key(path) {
            return;
        }
        let meta = self.pkg_meta(0o777);
        self.tree.symlink(path, target, meta);
        self.pkg().paths.push(path.to_owned());
    }

    /// Another name for the regular file `to` of the current package.
    fn hl(&mut self, path: &str, to: &str) {
        if self.tree.entries.contains_key(path) {
            return;
        }
        self.tree.hardlink(path, to);
        self.linked.insert(path.to_owned());
        self.linked.insert(to.to_owned());
        self.pkg().paths.push(path.to_owned());
    }

    /// A conffile: an `/etc` file listed in the package's `.conffiles`.
    fn conf(&mut self, path: &str, mode: u32, body: Body) {
        let meta = self.pkg_meta(mode);
        if self.put_file(path, meta, path, body) {
            self.pkg().conffiles.push(path.to_owned());
            self.etc_pool.push(path.to_owned());
        }
    }

    /// An `/etc` file generated at install time (not a conffile).
    fn etc(&mut self, path: &str, meta: Meta, body: Body) {
        if self.put_file(path, meta, path, body) {
            self.etc_pool.push(path.to_owned());
        }
    }

    /// Install-time metadata: shortly after the image epoch, with nanoseconds.
    fn install_meta(&mut self, mode: u32) -> Meta {
        let secs = self.epoch + self.rng.below(3600) as i64;
        Meta::root(mode, secs, self.rng.below(1_000_000_000) as u32)
    }

    /// An ELF executable of a typical size.
    fn exe(&mut self, path: &str, mode: u32) {
        let size = self.sz(48_000.0, 1.1);
        self.f(path, mode, Body::binary(BinKind::Elf, size));
    }

    /// A gzipped man page for `name` in `section`.
    fn man(&mut self, name: &str, section: u32) {
        let size = self.sz(2_400.0, 0.7);
        self.f(
            &format!("/usr/share/man/man{section}/{name}.{section}.gz"),
            0o644,
            Body::binary(BinKind::Gzip, size),
        );
    }

    /// `copyright` and `changelog.Debian.gz` (and sometimes a README) of the current package.
    fn doc(&mut self) {
        let name = self.pkg().name.clone();
        let dir = format!("/usr/share/doc/{name}");
        let meta = self.pkg_meta(0o644);
        if self.rng.chance(0.6) {
            let (license, size) = *self.rng.pick(LICENSES);
            let size = size.min(self.cap());
            let body = Body::text(TextStyle::Prose, size);
            self.put_file(
                &format!("{dir}/copyright"),
                meta,
                &format!("license:{license}"),
                body,
            );
        } else {
            let size = self.sz(2_200.0, 0.9);
            self.f(
                &format!("{dir}/copyright"),
                0o644,
                Body::text(TextStyle::Prose, size),
            );
        }
        let size = self.sz(3_000.0, 1.0);
        self.f(
            &format!("{dir}/changelog.Debian.gz"),
            0o644,
            Body::binary(BinKind::Gzip, size),
        );
        if self.rng.chance(0.3) {
            let size = self.sz(1_800.0, 1.0);
            self.f(
                &format!("{dir}/README.Debian"),
                0o644,
                Body::text(TextStyle::Prose, size),
            );
        }
    }

    /// Translations of `domain` into `n` languages.
    fn locales(&mut self, domain: &str, n: usize) {
        let median = 4_000.0 + self.rng.below(20_000) as f64;
        let start = self.rng.index(LANGS.len());
        for i in 0..n.min(LANGS.len()) {
            let lang = LANGS[(start + i) % LANGS.len()];
            let size = self.sz(median, 0.3);
            let path = format!("/usr/share/locale/{lang}/LC_MESSAGES/{domain}.mo");
            self.f(&path, 0o644, Body::binary(BinKind::Mo, size));
        }
    }

    /// Ends the current package: writes its dpkg records and maintainer scripts.
    fn finish(&mut self) {
        let pkg = self.cur.take().expect("inside a package");
        let info = "/var/lib/dpkg/info";
        let meta = Meta::root(0o644, self.epoch + self.rng.below(3600) as i64, 0);
        let mut list = String::new();
        let mut dirs = BTreeSet::new();
        for path in &pkg.paths {
            let mut end = 0;
            while let Some(i) = path[end + 1..].find('/') {
                end += 1 + i;
                dirs.insert(&path[..end]);
            }
        }
        list.push_str("/.\n");
        for line in dirs
            .iter()
            .copied()
            .chain(pkg.paths.iter().map(String::as_str))
        {
            list.push_str(line);
            list.push('\n');
        }
        let mut md5 = String::new();
        for path in pkg.regular.iter().filter(|p| !pkg.conffiles.contains(p)) {
            md5sum_line(&mut md5, self.spec.seed, path, 0);
        }
        let mut records = vec![
            (format!("{info}/{}.list", pkg.name), Body::literal(list)),
            (format!("{info}/{}.md5sums", pkg.name), Body::literal(md5)),
        ];
        if !pkg.conffiles.is_empty() {
            let mut conffiles = pkg.conffiles.join("\n");
            conffiles.push('\n');
            records.push((
                format!("{info}/{}.conffiles", pkg.name),
                Body::literal(conffiles),
            ));
        }
        for (path, body) in records {
            self.tree.file(&path, meta, body);
            self.files += 1;
        }
        for script in ["postinst", "prerm", "postrm"] {
            if self.rng.chance(0.15) {
                let size = self.sz(1_500.0, 0.8);
                let path = format!("{info}/{}.{script}", pkg.name);
                self.tree
                    .file(&path, meta.mode(0o755), Body::text(TextStyle::Shell, size));
                self.files += 1;
            }
        }
        self.pkgs.push(pkg);
    }

    /// The fixed core of the system.
    fn core(&mut self) {
        let e = self.epoch;
        let dir = |mode| Meta::root(mode, e + 7200, 0);
        for (path, meta) in [
            ("/usr/bin", dir(0o755)),
            ("/usr/sbin", dir(0o755)),
            ("/usr/lib/x86_64-linux-gnu", dir(0o755)),
            ("/usr/lib/python3/dist-packages", dir(0o755)),
            ("/usr/share/man/man1", dir(0o755)),
            ("/usr/share/man/man5", dir(0o755)),
            ("/usr/share/man/man8", dir(0o755)),
            ("/usr/local/bin", dir(0o755)),
            (
                "/usr/local/lib/python3.11/dist-packages",
                dir(0o2775).owned(0, STAFF),
            ),
            ("/etc/ssh", dir(0o755)),
            ("/var/lib/dpkg/info", dir(0o755)),
            ("/var/log", dir(0o755)),
            ("/var/mail", dir(0o2775).owned(0, MAIL)),
            ("/var/tmp", dir(0o1777)),
            ("/home/user", dir(0o750).owned(USER, USER)),
            ("/root", dir(0o700)),
            ("/opt", dir(0o755)),
            ("/tmp", dir(0o1777)),
            ("/srv", dir(0o755)),
            ("/mnt", dir(0o755)),
            ("/media", dir(0o755)),
            ("/dev", dir(0o755)),
            ("/proc", dir(0o555)),
            ("/sys", dir(0o555)),
            ("/run", dir(0o755)),
        ] {
            self.tree.dir(path, meta);
        }
        self.base_files();
        self.libc();
        self.coreutils();
        self.bash();
        self.perl();
        self.python();
        self.tzdata();
        self.passwd();
        self.util_linux();
        self.sudo();
        self.openssh();
        self.dbus();
        self.vim();
        self.dpkg_apt();
        self.certificates();
        self.kernel();
        self.local();
    }

    fn base_files(&mut self) {
        self.begin("base-files");
        let meta = self.pkg_meta(0o777);
        for (link, target) in [
            ("/bin", "usr/bin"),
            ("/sbin", "usr/sbin"),
            ("/lib", "usr/lib"),
            ("/lib64", "usr/lib64"),
        ] {
            self.tree.symlink(link, target, meta);
        }
        let os_release = "PRETTY_NAME=\"Debian GNU/Linux 12 (bookworm)\"\nNAME=\"Debian GNU/Linux\"\n\
            VERSION_ID=\"12\"\nVERSION=\"12 (bookworm)\"\nVERSION_CODENAME=bookworm\nID=debian\n\
            HOME_URL=\"https://www.debian.org/\"\n";
        self.f("/usr/lib/os-release", 0o644, Body::literal(os_release));
        self.ln("/etc/os-release", "../usr/lib/os-release");
        self.conf("/etc/debian_version", 0o644, Body::literal("12.5\n"));
        self.conf(
            "/etc/issue",
            0o644,
            Body::literal("Debian GNU/Linux 12 \\n \\l\n\n"),
        );
        self.conf(
            "/etc/issue.net",
            0o644,
            Body::literal("Debian GNU/Linux 12\n"),
        );
        self.conf("/etc/host.conf", 0o644, Body::literal("multi on\n"));
        let size = self.sz(900.0, 0.3);
        self.conf("/etc/profile", 0o644, Body::text(TextStyle::Shell, size));
        // The same inode under /usr (shared by policy) and /etc (private): a mixed-marker group.
        let size = self.sz(300.0, 0.3);
        self.f(
            "/usr/share/base-files/motd",
            0o644,
            Body::text(TextStyle::Prose, size),
        );
        self.hl("/etc/motd", "/usr/share/base-files/motd");
        for name in ["dot.bashrc", "dot.profile", "profile", "info.dir"] {
            let size = self.sz(700.0, 0.5);
            self.f(
                &format!("/usr/share/base-files/{name}"),
                0o644,
                Body::text(TextStyle::Shell, size),
            );
        }
        self.doc();
        self.finish();
    }

    fn libc(&mut self) {
        self.begin("libc6");
        let lib = "/usr/lib/x86_64-linux-gnu";
        let c = self.cap();
        self.f(
            &format!("{lib}/libc.so.6"),
            0o755,
            Body::binary(BinKind::Elf, 1_922_136.min(c)),
        );
        self.f(
            &format!("{lib}/ld-linux-x86-64.so.2"),
            0o755,
            Body::binary(BinKind::Elf, 210_968.min(c)),
        );
        self.ln(
            "/usr/lib64/ld-linux-x86-64.so.2",
            "/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2",
        );
        for name in [
            "libm.so.6",
            "libresolv.so.2",
            "libpthread.so.0",
            "libdl.so.2",
            "librt.so.1",
            "libutil.so.1",
        ] {
            let size = self.sz(40_000.0, 1.2);
            self.f(
                &format!("{lib}/{name}"),
                0o644,
                Body::binary(BinKind::Elf, size),
            );
        }
        for name in [
            "gconv-modules.cache",
            "gconv/UTF-16.so",
            "gconv/UTF-32.so",
            "gconv/ISO8859-1.so",
        ] {
            let size = self.sz(18_000.0, 0.6);
            self.f(
                &format!("{lib}/{name}"),
                0o644,
                Body::binary(BinKind::Raw, size),
            );
        }
        self.conf(
            "/etc/ld.so.conf",
            0o644,
            Body::literal("include /etc/ld.so.conf.d/*.conf\n\n"),
        );
        self.conf(
            "/etc/ld.so.conf.d/x86_64-linux-gnu.conf",
            0o644,
            Body::literal(
                "# Multiarch support\n/usr/local/lib/x86_64-linux-gnu\n\
                 /lib/x86_64-linux-gnu\n/usr/lib/x86_64-linux-gnu\n",
            ),
        );
        let n = self.scaled(500, 2, 20);
        self.locales("libc", n);
        self.doc();
        self.finish();

        self.begin("locales");
        // The long tail: one file at the size cap.
        self.f(
            "/usr/lib/locale/locale-archive",
            0o644,
            Body::binary(BinKind::Raw, c),
        );
        for part in [
            "LC_CTYPE",
            "LC_COLLATE",
            "LC_TIME",
            "LC_NUMERIC",
            "LC_MESSAGES/SYS_LC_MESSAGES",
        ] {
            let size = self.sz(3_000.0, 1.5);
            self.f(
                &format!("/usr/lib/locale/C.utf8/{part}"),
                0o644,
                Body::binary(BinKind::Raw, size),
            );
        }
        self.conf(
            "/etc/locale.gen",
            0o644,
            Body::text(TextStyle::Config, 9_000.min(c)),
        );
        self.doc();
        self.finish();
    }

    fn coreutils(&mut self) {
        self.begin("coreutils");
        let n = self.scaled(200, 6, COREUTILS.len());
        for name in &COREUTILS[..n] {
            self.exe(&format!("/usr/bin/{name}"), 0o755);
            self.man(name, 1);
        }
        let n = self.scaled(400, 1, 20);
        self.locales("coreutils", n);
        self.doc();
        self.finish();

        self.begin("dash");
        self.exe("/usr/bin/dash", 0o755);
        self.ln("/usr/bin/sh", "dash");
        self.man("dash", 1);
        self.doc();
        self.finish();
    }

    fn bash(&mut self) {
        self.begin("bash");
        let c = self.cap();
        self.f(
            "/usr/bin/bash",
            0o755,
            Body::binary(BinKind::Elf, 1_265_648.min(c)),
        );
        self.ln("/usr/bin/rbash", "bash");
        self.f(
            "/usr/bin/bashbug",
            0o755,
            Body::text(TextStyle::Shell, 7_216.min(c)),
        );
        self.man("bash", 1);
        self.conf(
            "/etc/bash.bashrc",
            0o644,
            Body::text(TextStyle::Shell, 1_994.min(c)),
        );
        // /etc/skel files share their bytes with the user's copies in /home/user.
        for (name, size) in [(".bashrc", 3_526), (".profile", 807), (".bash_logout", 220)] {
            let meta = self.pkg_meta(0o644);
            let body = Body::text(TextStyle::Shell, size.min(c));
            if self.put_file(
                &format!("/etc/skel/{name}"),
                meta,
                &format!("skel:{name}"),
                body,
            ) {
                self.pkg().conffiles.push(format!("/etc/skel/{name}"));
            }
        }
        self.doc();
        self.finish();
    }

    fn perl(&mut self) {
        self.begin("perl-base");
        let c = self.cap();
        self.f(
            "/usr/bin/perl",
            0o755,
            Body::binary(BinKind::Elf, 3_915_888.min(c)),
        );
        self.hl("/usr/bin/perl5.36.0", "/usr/bin/perl");
        let n = self.scaled(120, 3, 100);
        for i in 0..n {
            let size = self.sz(6_000.0, 1.1);
            let dir = *self
                .rng
                .pick(&["", "File/", "IO/", "Text/", "Getopt/", "Scalar/"]);
            let name = format!("{dir}{}{i}.pm", capitalised(self.rng.pick_str(SYLLABLES)));
            self.f(
                &format!("/usr/lib/x86_64-linux-gnu/perl-base/{name}"),
                0o644,
                Body::text(TextStyle::Prose, size),
            );
        }
        self.doc();
        self.finish();
    }

    fn python(&mut self) {
        self.begin("python3.11-minimal");
        let c = self.cap();
        self.f(
            "/usr/bin/python3.11",
            0o755,
            Body::binary(BinKind::Elf, 6_831_736.min(c)),
        );
        self.ln("/usr/bin/python3", "python3.11");
        self.man("python3.11", 1);
        self.doc();
        self.finish();

        self.begin("libpython3.11-stdlib");
        let root = "/usr/lib/python3.11";
        let n = self.scaled(25, 8, 500);
        let mut pkg_dir = String::new();
        for i in 0..n {
            if i % 12 == 0 {
                pkg_dir = format!("{root}/{}{}", self.rng.pick(SYLLABLES), i / 12);
                let init = format!("{pkg_dir}/__init__.py");
                if i % 24 == 0 {
                    self.f(&init, 0o644, Body::Empty);
                } else {
                    let size = self.sz(1_200.0, 1.0);
                    self.f(&init, 0o644, Body::text(TextStyle::Python, size));
                }
            }
            let name = format!("{}_{i}", self.rng.pick(SYLLABLES));
            let path = if self.rng.chance(0.5) {
                format!("{root}/{name}.py")
            } else {
                format!("{pkg_dir}/{name}.py")
            };
            let size = self.sz(9_000.0, 1.2);
            self.f(&path, 0o644, Body::text(TextStyle::Python, size));
        }
        self.f(
            &format!("{root}/lib-dynload/_ssl.cpython-311-x86_64-linux-gnu.so"),
            0o644,
            Body::binary(BinKind::Elf, 180_000.min(c)),
        );
        self.doc();
        self.finish();

        self.begin("python3-debian");
        self.python_module("python3-debian", 8);
        self.doc();
        self.finish();
    }

    fn tzdata(&mut self) {
        self.begin("tzdata");
        let zi = "/usr/share/zoneinfo";
        self.f(
            &format!("{zi}/UTC"),
            0o644,
            Body::binary(BinKind::Tzif, 114),
        );
        self.hl(&format!("{zi}/Etc/UTC"), &format!("{zi}/UTC"));
        self.hl(&format!("{zi}/Zulu"), &format!("{zi}/UTC"));
        let n = self.scaled(300, 3, ZONES.len());
        for zone in &ZONES[..n] {
            let size = self.sz(2_300.0, 0.3);
            self.f(
                &format!("{zi}/{zone}"),
                0o644,
                Body::binary(BinKind::Tzif, size),
            );
        }
        self.f(
            &format!("{zi}/tzdata.zi"),
            0o644,
            Body::text(TextStyle::Config, 107_000.min(self.cap())),
        );
        self.finish();
        // Set by the installer: absolute link into the guest's own zoneinfo.
        let meta = self.install_meta(0o777);
        self.tree
            .symlink("/etc/localtime", "/usr/share/zoneinfo/UTC", meta);
        let meta = self.install_meta(0o644);
        self.etc("/etc/timezone", meta, Body::literal("Etc/UTC\n"));
        // Dangling inside the guest: /run is empty until systemd-resolved runs.
        let meta = self.install_meta(0o777);
        self.tree.symlink(
            "/etc/resolv.conf",
            "../run/systemd/resolve/stub-resolv.conf",
            meta,
        );
    }

    fn passwd(&mut self) {
        self.begin("passwd");
        for name in ["passwd", "chfn", "chsh", "gpasswd", "newgrp"] {
            self.exe(&format!("/usr/bin/{name}"), 0o4755);
            self.man(name, 1);
        }
        for name in ["chage", "expiry"] {
            let size = self.sz(60_000.0, 0.5);
            let meta = self.pkg_meta(0o2755).owned(0, SHADOW);
            self.fm(
                &format!("/usr/bin/{name}"),
                meta,
                Body::binary(BinKind::Elf, size),
            );
        }
        let n = self.scaled(500, 2, 6);
        for name in &[
            "useradd", "userdel", "usermod", "groupadd", "chpasswd", "pwck",
        ][..n]
        {
            self.exe(&format!("/usr/sbin/{name}"), 0o755);
            self.man(name, 8);
        }
        self.conf(
            "/etc/login.defs",
            0o644,
            Body::text(TextStyle::Config, 12_569.min(self.cap())),
        );
        self.doc();
        self.finish();

        // Account databases, written at install time.
        let passwd = "root:x:0:0:root:/root:/bin/bash\n\
            daemon:x:1:1:daemon:/usr/sbin:/usr/sbin/nologin\n\
            messagebus:x:100:106::/nonexistent:/usr/sbin/nologin\n\
            sshd:x:101:65534::/run/sshd:/usr/sbin/nologin\n\
            user:x:1000:1000:User,,,:/home/user:/bin/bash\n";
        let group = "root:x:0:\ntty:x:5:\nmail:x:8:\nshadow:x:42:\nstaff:x:50:\n\
            messagebus:x:106:\nuser:x:1000:\n";
        let shadow = "root:*:19000:0:99999:7:::\ndaemon:*:19000:0:99999:7:::\n\
            messagebus:!:19000::::::\nsshd:!:19000::::::\n\
            user:$y$j9T$abcdefghijklmnopqrstu.$0123456789abcdefghijklmnopqrstuvwxyzABCD:19000:0:99999:7:::\n";
        let gshadow =
            "root:*::\ntty:*::\nmail:*::\nshadow:*::\nstaff:*::\nmessagebus:!::\nuser:!::\n";
        for (path, mode, gid, body) in [
            ("/etc/passwd", 0o644, 0, passwd),
            ("/etc/group", 0o644, 0, group),
            ("/etc/shadow", 0o640, SHADOW, shadow),
            ("/etc/gshadow", 0o640, SHADOW, gshadow),
            ("/etc/subuid", 0o644, 0, "user:100000:65536\n"),
            ("/etc/subgid", 0o644, 0, "user:100000:65536\n"),
        ] {
            let meta = self.install_meta(mode).owned(0, gid);
            self.tree.file(path, meta, Body::literal(body));
            self.files += 1;
        }
        for path in ["/etc/.pwd.lock", "/etc/machine-id"] {
            // Empty until a guest first boots (see the per-guest identity).
            let mode = if path == "/etc/.pwd.lock" {
                0o600
            } else {
                0o444
            };
            let meta = self.install_meta(mode);
            self.tree.file(path, meta, Body::Empty);
            self.files += 1;
        }
    }

    fn util_linux(&mut self) {
        self.begin("mount");
        for name in ["mount", "umount"] {
            self.exe(&format!("/usr/bin/{name}"), 0o4755);
            self.man(name, 8);
        }
        self.doc();
        self.finish();

        self.begin("util-linux");
        self.exe("/usr/bin/su", 0o4755);
        let size = self.sz(30_000.0, 0.5);
        let meta = self.pkg_meta(0o2755).owned(0, TTY);
        self.fm("/usr/bin/wall", meta, Body::binary(BinKind::Elf, size));
        let n = self.scaled(500, 2, 7);
        for name in &[
            "fdisk", "mkswap", "blkid", "losetup", "fsck", "hwclock", "agetty",
        ][..n]
        {
            self.exe(&format!("/usr/sbin/{name}"), 0o755);
            self.man(name, 8);
        }
        let n = self.scaled(300, 1, 20);
        self.locales("util-linux", n);
        self.doc();
        self.finish();
    }

    fn sudo(&mut self) {
        self.begin("sudo");
        self.exe("/usr/bin/sudo", 0o4755);
        self.ln("/usr/bin/sudoedit", "sudo");
        self.man("sudo", 8);
        let size = self.sz(400_000.0, 0.2);
        self.f(
            "/usr/libexec/sudo/sudoers.so",
            0o644,
            Body::binary(BinKind::Elf, size),
        );
        self.conf("/etc/sudoers", 0o440, Body::text(TextStyle::Config, 1_714));
        self.conf(
            "/etc/sudoers.d/README",
            0o440,
            Body::text(TextStyle::Prose, 958),
        );
        self.doc();
        self.finish();
    }

    fn openssh(&mut self) {
        self.begin("openssh-client");
        let n = self.scaled(500, 3, 6);
        for name in &["ssh", "scp", "ssh-keygen", "sftp", "ssh-add", "ssh-agent"][..n] {
            self.exe(&format!("/usr/bin/{name}"), 0o755);
            self.man(name, 1);
        }
        self.exe("/usr/lib/openssh/ssh-keysign", 0o4755);
        self.conf(
            "/etc/ssh/ssh_config",
            0o644,
            Body::text(TextStyle::Config, 1_650),
        );
        self.doc();
        self.finish();

        self.begin("openssh-server");
        self.exe("/usr/sbin/sshd", 0o755);
        self.man("sshd", 8);
        self.f(
            "/usr/lib/systemd/system/ssh.service",
            0o644,
            Body::text(TextStyle::Config, 538),
        );
        self.ln(
            "/etc/systemd/system/multi-user.target.wants/ssh.service",
            "/lib/systemd/system/ssh.service",
        );
        self.f(
            "/usr/share/openssh/sshd_config",
            0o644,
            Body::text(TextStyle::Config, 3_223),
        );
        self.doc();
        self.finish();
        // sshd_config is managed by ucf, not a conffile; the moduli are.
        let meta = self.install_meta(0o644);
        self.etc(
            "/etc/ssh/sshd_config",
            meta,
            Body::text(TextStyle::Config, 3_223),
        );
        let size = 577_834.min(self.cap());
        let meta = self.install_meta(0o644);
        self.tree
            .file("/etc/ssh/moduli", meta, Body::text(TextStyle::Config, size));
        self.files += 1;
    }

    fn dbus(&mut self) {
        self.begin("dbus");
        self.exe("/usr/bin/dbus-daemon", 0o755);
        // setuid root, executable by group messagebus only.
        let size = self.sz(50_000.0, 0.3);
        let meta = self.pkg_meta(0o4754).owned(0, MESSAGEBUS);
        self.fm(
            "/usr/lib/dbus-1.0/dbus-daemon-launch-helper",
            meta,
            Body::binary(BinKind::Elf, size),
        );
        self.conf(
            "/etc/dbus-1/system.conf",
            0o644,
            Body::text(TextStyle::Config, 838),
        );
        self.doc();
        self.finish();
        let meta = self.install_meta(0o777);
        self.tree
            .symlink("/var/lib/dbus/machine-id", "/etc/machine-id", meta);
    }

    fn vim(&mut self) {
        self.begin("vim");
        let size = self.sz(3_500_000.0, 0.1);
        self.f(
            "/usr/bin/vim.basic",
            0o755,
            Body::binary(BinKind::Elf, size),
        );
        let meta = self.install_meta(0o777);
        self.tree
            .symlink("/etc/alternatives/editor", "/usr/bin/vim.basic", meta);
        self.tree
            .symlink("/usr/bin/editor", "/etc/alternatives/editor", meta);
        self.man("vim", 1);
        self.conf(
            "/etc/vim/vimrc",
            0o644,
            Body::text(TextStyle::Config, 2_224),
        );
        let n = self.scaled(60, 3, 200);
        for i in 0..n {
            let dir = *self
                .rng
                .pick(&["syntax", "ftplugin", "indent", "autoload", "colors"]);
            let size = self.sz(3_500.0, 1.1);
            let path = format!(
                "/usr/share/vim/vim90/{dir}/{}{i}.vim",
                self.rng.pick(SYLLABLES)
            );
            self.f(&path, 0o644, Body::text(TextStyle::Config, size));
        }
        self.doc();
        self.finish();
    }

    fn dpkg_apt(&mut self) {
        self.begin("dpkg");
        let n = self.scaled(500, 2, 4);
        for name in &["dpkg", "dpkg-query", "dpkg-deb", "dpkg-divert"][..n] {
            self.exe(&format!("/usr/bin/{name}"), 0o755);
            self.man(name, 1);
        }
        self.conf(
            "/etc/dpkg/dpkg.cfg",
            0o644,
            Body::text(TextStyle::Config, 446),
        );
        let n = self.scaled(400, 1, 20);
        self.locales("dpkg", n);
        self.doc();
        self.finish();
        for path in [
            "/var/lib/dpkg/lock",
            "/var/lib/dpkg/lock-frontend",
            "/var/lib/dpkg/triggers/Lock",
        ] {
            let meta = self.install_meta(0o640);
            self.tree.file(path, meta, Body::Empty);
            self.files += 1;
        }

        self.begin("apt");
        let n = self.scaled(500, 2, 5);
        for name in &["apt", "apt-get", "apt-cache", "apt-config", "apt-mark"][..n] {
            self.exe(&format!("/usr/bin/{name}"), 0o755);
            self.man(name, 8);
        }
        let size = self.sz(2_200_000.0, 0.1);
        self.f(
            "/usr/lib/x86_64-linux-gnu/libapt-pkg.so.6.0.0",
            0o644,
            Body::binary(BinKind::Elf, size),
        );
        self.ln(
            "/usr/lib/x86_64-linux-gnu/libapt-pkg.so.6.0",
            "libapt-pkg.so.6.0.0",
        );
        for name in ["01autoremove", "70debconf", "20listchanges"] {
            let size = self.sz(600.0, 0.5);
            self.conf(
                &format!("/etc/apt/apt.conf.d/{name}"),
                0o644,
                Body::text(TextStyle::Config, size),
            );
        }
        self.doc();
        self.finish();
        let meta = self.install_meta(0o644);
        self.etc(
            "/etc/apt/sources.list.d/debian.sources",
            meta,
            Body::text(TextStyle::Config, 280),
        );
        let c = self.cap();
        // Package lists and caches: large, identical in every guest, but under /var.
        for (name, size) in [
            ("pkgcache.bin", 32_000_000),
            ("srcpkgcache.bin", 31_000_000),
        ] {
            let meta = self.install_meta(0o644);
            self.tree.file(
                &format!("/var/cache/apt/{name}"),
                meta,
                Body::binary(BinKind::Raw, size.min(c)),
            );
            self.files += 1;
        }
        let meta = self.install_meta(0o644);
        let path = "/var/lib/apt/lists/mirror_debian_dists_bookworm_main_binary-amd64_Packages";
        self.tree
            .file(path, meta, Body::text(TextStyle::Config, 45_000_000.min(c)));
        self.files += 1;
    }

    fn certificates(&mut self) {
        self.begin("ca-certificates");
        let n = self.scaled(70, 3, 140);
        let mut bundle = 0;
        for i in 0..n {
            let name = format!(
                "{}_{}_Root_CA_{i}",
                capitalised(self.rng.pick_str(SYLLABLES)),
                capitalised(self.rng.pick_str(SYLLABLES))
            );
            let size = self.rng.range(1_200, 2_200);
            bundle += size;
            let path = format!("/usr/share/ca-certificates/mozilla/{name}.crt");
            self.f(&path, 0o644, Body::text(TextStyle::Config, size));
            self.ln(&format!("/etc/ssl/certs/{name}.pem"), &path);
        }
        self.doc();
        self.finish();
        let meta = self.install_meta(0o644);
        self.etc(
            "/etc/ssl/certs/ca-certificates.crt",
            meta,
            Body::text(TextStyle::Config, bundle.min(self.cap())),
        );
    }

    /// A kernel image with modules (`/usr/lib/modules` is where policies like `immutable` go),
    /// and one huge library for the long tail.
    fn kernel(&mut self) {
        let c = self.cap();
        let version = "6.1.0-18-amd64";
        self.begin(&format!("linux-image-{version}"));
        self.f(
            &format!("/boot/vmlinuz-{version}"),
            0o644,
            Body::binary(BinKind::Raw, 8_167_424.min(c)),
        );
        self.f(
            &format!("/boot/config-{version}"),
            0o644,
            Body::text(TextStyle::Config, 260_301.min(c)),
        );
        let modules = format!("/usr/lib/modules/{version}");
        let n = self.scaled(50, 3, 200);
        for i in 0..n {
            let dir = *self.rng.pick(&[
                "drivers/net",
                "drivers/block",
                "drivers/usb",
                "fs",
                "net",
                "crypto",
            ]);
            let size = self.sz(30_000.0, 1.0);
            let path = format!(
                "{modules}/kernel/{dir}/{}{}_{i}.ko",
                self.rng.pick(SYLLABLES),
                self.rng.pick(SYLLABLES)
            );
            self.f(&path, 0o644, Body::binary(BinKind::Elf, size));
        }
        for name in ["modules.dep", "modules.alias", "modules.symbols"] {
            let size = self.sz(60_000.0, 0.8);
            self.f(
                &format!("{modules}/{name}"),
                0o644,
                Body::text(TextStyle::Config, size),
            );
        }
        self.finish();

        self.begin("libllvm15");
        self.f(
            "/usr/lib/x86_64-linux-gnu/libLLVM-15.so.1",
            0o644,
            Body::binary(BinKind::Elf, 105_000_000.min(c)),
        );
        self.doc();
        self.finish();
    }

    /// Software installed from source by the user: identical in every guest but owned by 1000.
    fn local(&mut self) {
        let meta = Meta::root(0o755, self.epoch - 5 * DAY, 0).owned(USER, USER);
        let size = self.sz(30_000.0, 0.5);
        self.tree.file(
            "/usr/local/bin/helper",
            meta,
            Body::binary(BinKind::Elf, size),
        );
        let size = self.sz(2_000.0, 0.5);
        self.tree.file(
            "/usr/local/src/helper/README",
            meta.mode(0o644),
            Body::text(TextStyle::Prose, size),
        );
        self.tree.dir("/usr/local/src/helper", meta);
        self.files += 2;
    }

    /// A fresh package name of `kind`: real-looking names first, then synthetic ones.
    fn name(&mut self, kind: Kind) -> String {
        let (list, i) = match kind {
            Kind::Tool => (TOOLS, 0),
            Kind::Lib => (LIBS, 1),
            Kind::Python => (PYTHON, 2),
            Kind::Data => (DATA, 3),
        };
        loop {
            let n = self.next_name[i];
            self.next_name[i] += 1;
            let name = if let Some(name) = list.get(n) {
                (*name).to_owned()
            } else {
                let a = self.rng.pick(SYLLABLES);
                let b = self.rng.pick(SYLLABLES);
                match kind {
                    Kind::Tool => format!("{a}{b}"),
                    Kind::Lib => format!("lib{a}{b}{}", self.rng.below(10)),
                    Kind::Python => format!("python3-{a}{b}"),
                    Kind::Data => format!("{a}{b}-data"),
                }
            };
            if !self.names.contains(&name) {
                return name;
            }
        }
    }

    fn random_package(&mut self) {
        let kind = match self.rng.below(100) {
            0..35 => Kind::Tool,
            35..65 => Kind::Lib,
            65..90 => Kind::Python,
            _ => Kind::Data,
        };
        let name = self.name(kind);
        self.begin(&name);
        match kind {
            Kind::Tool => self.tool(&name),
            Kind::Lib => self.lib(&name),
            Kind::Python => self.python_module(&name, 40),
            Kind::Data => self.data(&name),
        }
        self.doc();
        self.finish();
    }

    fn tool(&mut self, name: &str) {
        let base = name.split('-').next().unwrap_or(name).to_owned();
        for i in 0..self.rng.range(1, 4) {
            let bin_name = if i == 0 {
                base.clone()
            } else {
                format!("{base}-{}", self.rng.pick(SYLLABLES))
            };
            let dir = if self.rng.chance(0.1) {
                "/usr/sbin"
            } else {
                "/usr/bin"
            };
            self.exe(&format!("{dir}/{bin_name}"), 0o755);
            self.man(&bin_name, 1);
        }
        if self.rng.chance(0.3) {
            let n = self.rng.range(3, 12) as usize;
            self.locales(&base, n);
        }
        if self.rng.chance(0.35) {
            let size = self.sz(1_500.0, 1.0);
            self.conf(
                &format!("/etc/{base}/{base}.conf"),
                0o644,
                Body::text(TextStyle::Config, size),
            );
            if self.rng.chance(0.5) {
                let size = self.sz(400.0, 0.6);
                self.conf(
                    &format!("/etc/default/{base}"),
                    0o644,
                    Body::text(TextStyle::Shell, size),
                );
            }
        }
    }

    fn lib(&mut self, name: &str) {
        let stem = name.trim_end_matches(|c: char| c.is_ascii_digit() || c == '.' || c == '-');
        let stem = if stem.starts_with("lib") {
            stem.to_owned()
        } else {
            format!("lib{stem}")
        };
        let lib = "/usr/lib/x86_64-linux-gnu";
        let major = self.rng.below(8);
        let real = format!(
            "{stem}.so.{major}.{}.{}",
            self.rng.below(20),
            self.rng.below(10)
        );
        let size = self.sz(120_000.0, 1.3);
        self.f(
            &format!("{lib}/{real}"),
            0o644,
            Body::binary(BinKind::Elf, size),
        );
        self.ln(&format!("{lib}/{stem}.so.{major}"), &real);
        if self.rng.chance(0.2) {
            let plugins = format!("{lib}/{}", stem.trim_start_matches("lib"));
            for _ in 0..self.rng.range(3, 15) {
                let size = self.sz(30_000.0, 1.0);
                let path = format!(
                    "{plugins}/{}{}.so",
                    self.rng.pick(SYLLABLES),
                    self.rng.pick(SYLLABLES)
                );
                self.f(&path, 0o644, Body::binary(BinKind::Elf, size));
            }
        }
    }

    fn python_module(&mut self, name: &str, max_modules: u64) {
        let module = name.trim_start_matches("python3-").replace('-', "_");
        let root = format!("/usr/lib/python3/dist-packages/{module}");
        let mut dirs = vec![root.clone()];
        for _ in 0..self.rng.below(4) {
            dirs.push(format!("{root}/{}", self.rng.pick(SYLLABLES)));
        }
        for (i, dir) in dirs.iter().enumerate() {
            // Most package markers are empty files.
            if i > 0 || self.rng.chance(0.5) {
                self.f(&format!("{dir}/__init__.py"), 0o644, Body::Empty);
            } else {
                let size = self.sz(800.0, 1.0);
                self.f(
                    &format!("{dir}/__init__.py"),
                    0o644,
                    Body::text(TextStyle::Python, size),
                );
            }
        }
        for _ in 0..self.rng.range(3, max_modules) {
            let dir = self.rng.pick(&dirs).clone();
            let size = self.sz(4_000.0, 1.1);
            let path = format!(
                "{dir}/{}_{}.py",
                self.rng.pick(SYLLABLES),
                self.rng.pick(SYLLABLES)
            );
            self.f(&path, 0o644, Body::text(TextStyle::Python, size));
        }
        if self.rng.chance(0.2) {
            self.f(&format!("{root}/py.typed"), 0o644, Body::Empty);
        }
        let info = format!(
            "{root}-{}.{}.dist-info",
            self.rng.below(5),
            self.rng.below(30)
        );
        let size = self.sz(2_000.0, 0.8);
        self.f(
            &format!("{info}/METADATA"),
            0o644,
            Body::text(TextStyle::Prose, size),
        );
        self.f(
            &format!("{info}/top_level.txt"),
            0o644,
            Body::literal(format!("{module}\n")),
        );
        self.f(
            &format!("{info}/INSTALLER"),
            0o644,
            Body::literal("debian\n"),
        );
    }

    fn data(&mut self, name: &str) {
        let root = format!("/usr/share/{}", name.trim_end_matches("-data"));
        let subdirs: Vec<String> = (0..self.rng.range(1, 5))
            .map(|_| format!("{root}/{}", self.rng.pick(SYLLABLES)))
            .collect();
        for i in 0..self.rng.range(10, 80) {
            let dir = self.rng.pick(&subdirs).clone();
            let leaf = self.rng.pick(SYLLABLES);
            if self.rng.chance(0.5) {
                let size = self.sz(1_600.0, 1.2);
                self.f(
                    &format!("{dir}/{leaf}{i}.png"),
                    0o644,
                    Body::binary(BinKind::Raw, size),
                );
            } else {
                let size = self.sz(900.0, 1.2);
                self.f(
                    &format!("{dir}/{leaf}{i}.xml"),
                    0o644,
                    Body::text(TextStyle::Config, size),
                );
            }
        }
    }

    /// `/var/lib/dpkg/status`, listing every package.
    fn dpkg_status(&mut self) {
        let mut status = String::new();
        for pkg in &self.pkgs {
            let _ = write!(
                status,
                "Package: {}\nStatus: install ok installed\nPriority: optional\n\
                 Architecture: amd64\nVersion: {}\n",
                pkg.name, pkg.version
            );
            if !pkg.conffiles.is_empty() {
                status.push_str("Conffiles:\n");
                for path in &pkg.conffiles {
                    let _ = writeln!(status, " {path} {:032x}", path_hash(self.spec.seed, path));
                }
            }
            status.push('\n');
        }
        let meta = Meta::root(0o644, self.epoch + 3600, 0);
        self.tree
            .file("/var/lib/dpkg/status", meta, Body::literal(status));
        self.files += 1;
    }

    /// Chooses two packages that exist in a second version: first one shipping a shared
    /// library, then any other with files under `/usr/lib`.
    fn upgrades(&mut self) -> Vec<Upgrade> {
        let ships = |pkg: &Pkg, tree: &Tree, lib: bool| {
            pkg.regular.iter().any(|p| {
                p.starts_with("/usr/lib/") && generated(tree, p) && (!lib || p.contains(".so"))
            })
        };
        let mut out = Vec::new();
        let mut taken = HashSet::new();
        for variant in 1..=2u64 {
            let candidates: Vec<usize> = (0..self.pkgs.len())
                .filter(|i| !taken.contains(i) && ships(&self.pkgs[*i], &self.tree, variant == 1))
                .collect();
            if candidates.is_empty() {
                continue;
            }
            let i = candidates[self.rng.index(candidates.len())];
            taken.insert(i);
            let pkg = &self.pkgs[i];
            let secs =
                self.epoch + (20 + 15 * variant as i64) * DAY + self.rng.below(DAY as u64) as i64;
            let mut files = Vec::new();
            let mut md5 = String::new();
            let mut first = true;
            for path in pkg.regular.iter().filter(|p| !pkg.conffiles.contains(p)) {
                let Some(Node::File(_, content)) = self.tree.entries.get(path) else {
                    continue;
                };
                let lib = path.starts_with("/usr/lib/") && generated(&self.tree, path);
                let change = if lib {
                    let change = first || path.contains(".so") || self.rng.chance(0.5);
                    first = false;
                    change
                } else {
                    path.ends_with("/changelog.Debian.gz")
                };
                let mut v = 0;
                if change {
                    let mut content = content.clone();
                    content.variant = variant;
                    if let Body::Binary { size, .. } | Body::Text { size, .. } = &mut content.body {
                        *size =
                            (*size + self.rng.below(*size / 8 + 64)).min(self.spec.max_file_size);
                    }
                    files.push((path.clone(), content));
                    v = variant;
                }
                md5sum_line(&mut md5, self.spec.seed, path, v);
            }
            let md5_path = format!("/var/lib/dpkg/info/{}.md5sums", pkg.name);
            files.push((
                md5_path.clone(),
                Content {
                    key: md5_path.into(),
                    variant,
                    body: Body::literal(md5),
                },
            ));
            out.push(Upgrade { secs, files });
        }
        out
    }
}

/// Whether `path` is a regular file whose bytes come from its stream (so a new variant changes
/// them).
fn generated(tree: &Tree, path: &str) -> bool {
    match tree.entries.get(path) {
        Some(Node::File(_, c)) => !matches!(c.body, Body::Literal(_) | Body::Empty),
        _ => false,
    }
}

/// A stable 128-bit pseudo-hash of a path (for fake md5sums).
fn path_hash(seed: u64, path: &str) -> u128 {
    let mut rng = Rand::new(seed, path, u64::MAX);
    (u128::from(rng.next_u64()) << 64) | u128::from(rng.next_u64())
}

/// Appends a `.md5sums` line for `path` at content `variant`.
fn md5sum_line(out: &mut String, seed: u64, path: &str, variant: u64) {
    let mut rng = Rand::new(seed, path, variant ^ 0x6d64_3573_756d_7300);
    let hash = (u128::from(rng.next_u64()) << 64) | u128::from(rng.next_u64());
    let _ = writeln!(out, "{hash:032x}  {}", &path[1..]);
}

fn capitalised(s: &str) -> String {
    let mut out = s.to_owned();
    if let Some(first) = out.get_mut(..1) {
        first.make_ascii_uppercase();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(files_per_guest: usize) -> SynthSpec {
        SynthSpec {
            seed: 1,
            guests: 1,
            files_per_guest,
            max_file_size: 1 << 20,
        }
    }

    #[test]
    fn base_tree_reaches_the_requested_file_count() {
        let core = build(&spec(0)).tree.regular_files();
        println!("fixed core: {core} regular files");
        for n in [400, 3_000] {
            let base = build(&spec(n));
            let files = base.tree.regular_files();
            assert!(files >= n && files < n + 120, "{files} files for {n}");
            assert!(!base.etc_pool.is_empty() && !base.usr_pool.is_empty());
            assert_eq!(base.upgrades.len(), 2);
            assert!(
                base.upgrades
                    .iter()
                    .all(|u| u.files.iter().any(|(p, _)| p.starts_with("/usr/lib/")))
            );
        }
    }

    #[test]
    fn base_tree_is_a_function_of_the_seed() {
        let a = build(&spec(500));
        let b = build(&spec(500));
        assert_eq!(a.tree.entries, b.tree.entries);
        let c = build(&SynthSpec {
            seed: 2,
            ..spec(500)
        });
        assert_ne!(a.tree.entries, c.tree.entries);
    }
}
