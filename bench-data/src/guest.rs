//! Per-guest divergence: turns the shared base tree into one guest's tree.
//!
//! Every guest gets its own identity (hostname, machine id, ssh host keys), user data, logs and
//! a few edited configs. Some guests also share extra state with a subset of the others: an
//! in-house application under `/opt/app` (about a third), newer versions of one or two
//! packages (about a quarter), or `/usr` files whose mtime was touched (about a sixth).

use std::fmt::Write as _;

use crate::base::{Base, USER};
use crate::content::{BinKind, Body, TextStyle};
use crate::seed::Rand;
use crate::spec::SynthSpec;
use crate::tree::{Meta, Node, Tree};

/// Group `adm` (readers of logs).
const ADM: u32 = 4;
/// Group `utmp`.
const UTMP: u32 = 43;
/// Owner of the in-house application's data.
const APP: u32 = 999;
/// Content variants at or above this are private to one guest.
const GUEST_VARIANT: u64 = 1_000;

/// Which of the shared divergences a guest has.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Groups {
    /// Runs the in-house application under `/opt/app`.
    pub(crate) app: bool,
    /// Number of package upgrades installed (0, 1 or 2).
    pub(crate) upgrades: usize,
    /// Has `/usr` files with touched mtimes.
    pub(crate) touched: bool,
}

/// The shared divergences of guest `index` (0-based) under `seed`.
pub(crate) fn groups(seed: u64, index: usize) -> Groups {
    let mut rng = Rand::new(seed, "groups", 0);
    let (a, u, t) = (
        rng.below(3) as usize,
        rng.below(4) as usize,
        rng.below(6) as usize,
    );
    // A quarter of the guests run the newer version of the first package; every other one of
    // them also runs the newer version of the second, so each version is shared.
    let upgrades = match ((index + u) % 4, (index + u) / 4 % 2) {
        (0, 0) => 2,
        (0, _) => 1,
        _ => 0,
    };
    Groups {
        app: (index + a).is_multiple_of(3),
        upgrades,
        touched: (index + t).is_multiple_of(6),
    }
}

/// What the divergence depends on besides the base tree: the same for synthetic and real
/// (template-based) guest sets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Diverge {
    /// Seed of every per-guest choice.
    pub(crate) seed: u64,
    /// Regular files in the base tree: scales user data, rotated logs and `/opt/app`.
    pub(crate) files_per_guest: usize,
    /// Largest size of a generated file.
    pub(crate) max_file_size: u64,
}

impl From<&SynthSpec> for Diverge {
    fn from(spec: &SynthSpec) -> Self {
        Self {
            seed: spec.seed,
            files_per_guest: spec.files_per_guest,
            max_file_size: spec.max_file_size,
        }
    }
}

/// Which extended-attribute divergences a guest has. Drawn from a stream of their own, so
/// they change none of the other choices.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct XattrGroups {
    /// `setcap cap_net_raw+ep` was run on a few binaries (same bytes, owner, mode, mtime).
    pub(crate) caps: bool,
    /// An integrity tool labelled some `/usr` files with a `user.*` attribute.
    pub(crate) labels: bool,
}

/// The extended-attribute divergences of guest `index` under `seed`: about a fifth of the
/// guests carry capabilities, about a seventh carry labels.
pub(crate) fn xattr_groups(seed: u64, index: usize) -> XattrGroups {
    let mut rng = Rand::new(seed, "xattr-groups", 0);
    let (c, l) = (rng.below(5) as usize, rng.below(7) as usize);
    XattrGroups {
        caps: (index + c).is_multiple_of(5),
        labels: (index + l).is_multiple_of(7),
    }
}

/// `security.capability` (VFS_CAP_REVISION_2, effective) granting `cap_net_raw`.
pub(crate) const CAP_NET_RAW_EP: [u8; 20] = [
    0x01, 0x00, 0x00, 0x02, 0x00, 0x20, 0x00, 0x00, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
];

struct Guest<'a> {
    spec: &'a Diverge,
    rng: Rand,
    tree: Tree,
    variant: u64,
    /// When this guest was first booted; its own files are newer.
    boot: i64,
}

/// Builds the tree of guest `index` (0-based) named `name` from the shared `base`.
pub(crate) fn guest_tree(base: &Base, spec: &Diverge, index: usize, name: &str) -> Tree {
    let mut rng = Rand::new(spec.seed, "guest", index as u64);
    let boot = base.epoch + 10 * 86_400 + rng.below(200 * 86_400) as i64;
    let mut g = Guest {
        spec,
        rng,
        tree: base.tree.clone(),
        variant: GUEST_VARIANT + index as u64,
        boot,
    };
    let groups = groups(spec.seed, index);
    g.identity(name);
    g.user_data();
    g.logs();
    g.edit_configs(&base.etc_pool);
    if groups.app {
        g.app(base.epoch);
    }
    for upgrade in base.upgrades.iter().take(groups.upgrades) {
        for (path, content) in &upgrade.files {
            if let Some((meta, c)) = g.tree.file_mut(path) {
                *meta = meta.at(upgrade.secs, 0);
                *c = content.clone();
            }
        }
    }
    if groups.touched {
        g.touch(&base.usr_pool);
    }
    let xattrs = xattr_groups(spec.seed, index);
    if xattrs.caps {
        g.caps(&base.usr_pool);
    }
    if xattrs.labels {
        g.labels(&base.usr_pool);
    }
    for dir in ["/etc", "/etc/ssh", "/home/user", "/root", "/var/log"] {
        if let Some(Node::Dir(meta)) = g.tree.entries.get_mut(dir) {
            *meta = meta.at(boot + 86_400, 0);
        }
    }
    g.tree
}

impl Guest<'_> {
    /// A time after boot with nanoseconds, as a running system would leave it.
    fn later(&mut self) -> (i64, u32) {
        let secs = self.boot + self.rng.below(60 * 86_400) as i64;
        (secs, self.rng.below(1_000_000_000) as u32)
    }

    fn meta(&mut self, mode: u32, uid: u32, gid: u32) -> Meta {
        let (secs, nanos) = self.later();
        Meta::root(mode, secs, nanos).owned(uid, gid)
    }

    fn sz(&mut self, median: f64, sigma: f64) -> u64 {
        let cap = self.spec.max_file_size;
        self.rng.lognormal(median, sigma, 1, cap)
    }

    /// A file whose bytes are private to this guest.
    fn own(&mut self, path: &str, meta: Meta, body: Body) {
        self.tree.keyed(path, meta, path, self.variant, body);
    }

    fn identity(&mut self, name: &str) {
        let role = *self
            .rng
            .pick(&["web", "db", "app", "cache", "mail", "build", "ci", "proxy"]);
        let host = format!("{role}-{name}");
        let meta = Meta::root(0o644, self.boot, 0);
        self.tree
            .file("/etc/hostname", meta, Body::literal(format!("{host}\n")));
        let hosts = format!(
            "127.0.0.1\tlocalhost\n127.0.1.1\t{host}.example.internal\t{host}\n\n\
             ::1\tlocalhost ip6-localhost ip6-loopback\nff02::1\tip6-allnodes\nff02::2\tip6-allrouters\n"
        );
        self.tree.file("/etc/hosts", meta, Body::literal(hosts));
        let mut id = String::with_capacity(33);
        for _ in 0..2 {
            let _ = write!(id, "{:016x}", self.rng.next_u64());
        }
        id.push('\n');
        self.tree
            .file("/etc/machine-id", meta.mode(0o444), Body::literal(id));
        for (kind, private, public) in [
            ("rsa", 2_590, 566),
            ("ecdsa", 505, 176),
            ("ed25519", 411, 96),
        ] {
            let path = format!("/etc/ssh/ssh_host_{kind}_key");
            let key = self.ssh_key(kind, private, true);
            self.tree.file(&path, meta.mode(0o600), Body::literal(key));
            let key = self.ssh_key(kind, public, false);
            self.tree
                .file(&format!("{path}.pub"), meta, Body::literal(key));
        }
    }

    /// An OpenSSH-looking key of about `size` bytes.
    fn ssh_key(&mut self, kind: &str, size: usize, private: bool) -> String {
        const B64: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
        let mut b64 = String::with_capacity(size);
        for _ in 0..size {
            b64.push(char::from(*self.rng.pick(B64)));
        }
        if private {
            let mut out = String::from("-----BEGIN OPENSSH PRIVATE KEY-----\n");
            for chunk in b64.as_bytes().chunks(70) {
                out.push_str(std::str::from_utf8(chunk).expect("ascii"));
                out.push('\n');
            }
            out.push_str("-----END OPENSSH PRIVATE KEY-----\n");
            out
        } else {
            format!("ssh-{kind} {b64} root@localhost\n")
        }
    }

    fn user_data(&mut self) {
        let n = (self.spec.files_per_guest / 100).clamp(4, 200);
        // Copies of /etc/skel: the same bytes as the skeleton, but owned by the user.
        for name in [".bashrc", ".profile", ".bash_logout"] {
            if let Some(Node::File(_, skel)) = self.tree.entries.get(&format!("/etc/skel/{name}")) {
                let skel = skel.clone();
                let meta = self.meta(0o644, USER, USER);
                self.tree
                    .put(&format!("/home/user/{name}"), Node::File(meta, skel));
            }
        }
        let size = self.sz(8_000.0, 1.0);
        let meta = self.meta(0o600, USER, USER);
        self.own(
            "/home/user/.bash_history",
            meta,
            Body::text(TextStyle::Shell, size),
        );
        let ssh = Meta::root(0o700, self.boot, 0).owned(USER, USER);
        self.tree.dir("/home/user/.ssh", ssh);
        let meta = self.meta(0o600, USER, USER);
        let key = self.ssh_key("ed25519", 68, false);
        self.own("/home/user/.ssh/authorized_keys", meta, Body::literal(key));
        let project = format!(
            "/home/user/projects/{}",
            self.rng.pick(&["tool", "site", "report", "bot"])
        );
        for i in 0..n {
            let meta = self.meta(0o644, USER, USER);
            let (path, body) = match self.rng.below(4) {
                0 => (
                    format!("/home/user/Documents/note-{i}.txt"),
                    Body::text(TextStyle::Prose, self.sz(3_000.0, 1.2)),
                ),
                1 => (
                    format!("{project}/src/mod_{i}.py"),
                    Body::text(TextStyle::Python, self.sz(4_000.0, 1.0)),
                ),
                2 => (
                    format!("{project}/data/chunk-{i}.bin"),
                    Body::binary(BinKind::Raw, self.sz(40_000.0, 1.5)),
                ),
                _ => (
                    format!("/home/user/Downloads/file-{i}.gz"),
                    Body::binary(BinKind::Gzip, self.sz(20_000.0, 1.8)),
                ),
            };
            self.own(&path, meta, body);
        }
        self.tree.dir("/root/.ssh", Meta::root(0o700, self.boot, 0));
        let meta = self.meta(0o600, 0, 0);
        let key = self.ssh_key("rsa", 372, false);
        self.own("/root/.ssh/authorized_keys", meta, Body::literal(key));
        let size = self.sz(5_000.0, 1.0);
        let meta = self.meta(0o600, 0, 0);
        self.own(
            "/root/.bash_history",
            meta,
            Body::text(TextStyle::Shell, size),
        );
        let size = self.sz(100_000.0, 1.5);
        let meta = self.meta(0o600, 0, 0);
        self.own(
            "/root/backup/etc-backup.tar.gz",
            meta,
            Body::binary(BinKind::Gzip, size),
        );
    }

    fn logs(&mut self) {
        let logs: &[(&str, u32, u32)] = &[
            ("syslog", 0o640, ADM),
            ("auth.log", 0o640, ADM),
            ("kern.log", 0o640, ADM),
            ("dpkg.log", 0o644, 0),
            ("alternatives.log", 0o644, 0),
            ("apt/history.log", 0o644, 0),
            ("apt/term.log", 0o640, ADM),
        ];
        for &(name, mode, gid) in logs {
            let size = self.sz(30_000.0, 1.2);
            let meta = self.meta(mode, 0, gid);
            self.own(
                &format!("/var/log/{name}"),
                meta,
                Body::text(TextStyle::Log, size),
            );
        }
        let rotated = (self.spec.files_per_guest / 500).clamp(1, 10);
        for i in 1..=rotated {
            let size = self.sz(20_000.0, 1.0);
            let meta = self.meta(0o640, 0, ADM);
            self.own(
                &format!("/var/log/syslog.{i}.gz"),
                meta,
                Body::binary(BinKind::Gzip, size),
            );
        }
        for (name, mode) in [("wtmp", 0o664), ("lastlog", 0o664)] {
            let size = 384 * self.rng.range(1, 40);
            let meta = self.meta(mode, 0, UTMP);
            self.own(
                &format!("/var/log/{name}"),
                meta,
                Body::binary(BinKind::Raw, size),
            );
        }
        let meta = self.meta(0o660, 0, UTMP);
        self.tree.file("/var/log/btmp", meta, Body::Empty);
    }

    /// The administrator edited a few configuration files: same paths, other bytes.
    fn edit_configs(&mut self, pool: &[String]) {
        let mut pool: Vec<&String> = pool.iter().collect();
        for _ in 0..3.min(pool.len()) {
            let path = pool.swap_remove(self.rng.index(pool.len())).clone();
            let (secs, nanos) = self.later();
            let variant = self.variant;
            let extra = self.rng.range(10, 400);
            if let Some((meta, content)) = self.tree.file_mut(&path) {
                *meta = meta.at(secs, nanos);
                content.variant = variant;
                content.key = path.as_str().into();
                let size = content.body.size() + extra;
                content.body = Body::text(TextStyle::Config, size);
            }
        }
    }

    /// The in-house application: identical in every guest that runs it.
    fn app(&mut self, epoch: i64) {
        let mut rng = Rand::new(self.spec.seed, "/opt/app", 0);
        let secs = epoch + 5 * 86_400;
        let cap = self.spec.max_file_size;
        let meta = Meta::root(0o644, secs, 0);
        let dir = Meta::root(0o755, secs, 0);
        self.tree.dir("/opt/app", dir);
        let size = rng.lognormal(900_000.0, 0.3, 1, cap);
        self.tree.file(
            "/opt/app/bin/appd",
            meta.mode(0o755),
            Body::binary(BinKind::Elf, size),
        );
        self.tree.file(
            "/opt/app/bin/appctl",
            meta.mode(0o755),
            Body::text(TextStyle::Shell, 2_400),
        );
        self.tree.file(
            "/opt/app/etc/app.conf",
            meta,
            Body::text(TextStyle::Config, 1_800),
        );
        let n = (self.spec.files_per_guest / 40).clamp(10, 400);
        for i in 0..n {
            let (path, body) = match rng.below(3) {
                0 => (
                    format!("/opt/app/lib/mod{i}.so"),
                    Body::binary(BinKind::Elf, rng.lognormal(60_000.0, 1.0, 1, cap)),
                ),
                1 => (
                    format!("/opt/app/static/asset{i}.js"),
                    Body::text(TextStyle::Python, rng.lognormal(6_000.0, 1.2, 1, cap)),
                ),
                _ => (
                    format!("/opt/app/share/tmpl{i}.html"),
                    Body::text(TextStyle::Prose, rng.lognormal(2_000.0, 0.8, 1, cap)),
                ),
            };
            self.tree.file(&path, meta, body);
        }
        self.tree
            .dir("/opt/app/data", dir.mode(0o750).owned(APP, APP));
        for i in 0..3 {
            let size = rng.lognormal(10_000.0, 0.5, 1, cap);
            self.tree.file(
                &format!("/opt/app/data/seed{i}.db"),
                meta.mode(0o640).owned(APP, APP),
                Body::binary(BinKind::Raw, size),
            );
        }
        self.tree
            .symlink("/opt/app/current", "/opt/app", meta.mode(0o777));
    }

    /// Capabilities on up to two `/usr/bin` or `/usr/sbin` binaries, the same in every guest
    /// that has them.
    fn caps(&mut self, pool: &[String]) {
        let bins: Vec<&String> = pool
            .iter()
            .filter(|p| p.starts_with("/usr/bin/") || p.starts_with("/usr/sbin/"))
            .collect();
        let mut rng = Rand::new(self.spec.seed, "caps", 0);
        for _ in 0..2.min(bins.len()) {
            let path = bins[rng.index(bins.len())];
            if self.tree.file_mut(path).is_some() {
                self.tree
                    .set_xattr(path, "security.capability", &CAP_NET_RAW_EP);
            }
        }
    }

    /// A `user.integrity` label on one `/usr` file in fifty, the same in every guest that has
    /// them.
    fn labels(&mut self, pool: &[String]) {
        let mut rng = Rand::new(self.spec.seed, "labels", 0);
        let n = (pool.len() / 50).max(1).min(pool.len());
        for _ in 0..n {
            let path = &pool[rng.index(pool.len())];
            if self.tree.file_mut(path).is_some() {
                self.tree
                    .set_xattr(path, "user.integrity", b"sealed:golden-image-7");
            }
        }
    }

    /// Some `/usr` files got a new mtime (a restore, a `touch`), with the same bytes.
    fn touch(&mut self, pool: &[String]) {
        let n = (pool.len() / 20).max(1).min(pool.len());
        for _ in 0..n {
            let path = &pool[self.rng.index(pool.len())];
            let (secs, nanos) = self.later();
            if let Some((meta, _)) = self.tree.file_mut(path) {
                *meta = meta.at(secs, nanos);
            }
        }
    }
}
