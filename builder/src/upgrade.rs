//! Fleet upgrades: the distribution upgrade of many stopped guests in one run, each package
//! index and package file downloaded once for all of them, each guest snapshotted first and
//! taken back to its snapshot if its upgrade fails, the upgraded files shared again after.

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::mpsc;
use std::time::Instant;

use cowherd_unify::{HostRoot, MountState, Phase, Progress, UnifyOptions};
use serde::Serialize;

use crate::error::Error;
use crate::exec::{Exec, ExecOutput};
use crate::fetch::DownloadCache;

/// How [`upgrade`] runs.
#[derive(Clone, Debug)]
pub struct UpgradeOptions {
    /// Guests upgraded at once.
    pub jobs: usize,
    /// Refresh the package indexes (into the shared cache only) and list the pending
    /// upgrades per guest; no package is downloaded, no guest changes.
    pub dry_run: bool,
    /// Where each guest's log goes (`DIR/GUEST.log`, the apt output); made 0700.
    pub log_dir: PathBuf,
}

/// One package a guest upgrades (or would).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub struct PackageUpgrade {
    /// The package.
    pub name: String,
    /// The version installed before (empty for a package new to the guest).
    pub from: String,
    /// The version after.
    pub to: String,
}

/// How one guest's upgrade ended.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Outcome {
    /// Upgraded, folded and unified.
    Upgraded,
    /// Nothing was pending: the guest is as it was.
    UpToDate,
    /// `--dry-run`: the upgrades it would get are listed.
    WouldUpgrade,
    /// Mounted (or otherwise in use), or not of the Debian family: left alone.
    Skipped,
    /// The upgrade failed; the guest is its snapshot again (`rolled_back`), or as it was
    /// (nothing had changed yet).
    Failed,
}

/// One guest's line of the report.
#[derive(Clone, Debug, Serialize)]
pub struct GuestUpgrade {
    /// The guest.
    pub guest: String,
    /// How it ended.
    pub outcome: Outcome,
    /// Why it was skipped or failed, and what to do.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// The packages upgraded (or, dry, pending).
    pub packages: Vec<PackageUpgrade>,
    /// Bytes fetched from the package sources on its behalf (the first guest to ask for a
    /// file pays for it; the others get it from the run's cache).
    pub downloaded_bytes: u64,
    /// Bytes it received from the run's cache.
    pub served_bytes: u64,
    /// Its physical bytes after the upgrade less before (private bytes and its share of the
    /// store objects it links), after re-sharing; snapshots not counted.
    pub disk_added_bytes: i64,
    /// The snapshot made before the upgrade (kept when the guest changed).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub snapshot: Option<String>,
    /// Whether a failed upgrade was undone (the guest is its snapshot again).
    pub rolled_back: bool,
    /// The apt output.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub log: Option<PathBuf>,
    /// Seconds for this guest (snapshot, apt, fold and unify).
    pub seconds: f64,
}

/// What `cowherd upgrade` did.
#[derive(Clone, Debug, Serialize)]
pub struct UpgradeReport {
    /// Nothing was changed (`--dry-run`).
    pub dry_run: bool,
    /// Per guest, in the order asked.
    pub guests: Vec<GuestUpgrade>,
    /// Bytes fetched from the package sources in all (each file once).
    pub downloaded_bytes: u64,
    /// Requests that went to the package sources.
    pub upstream_requests: u64,
    /// Bytes served from the run's cache to the guests (what they would have downloaded).
    pub served_bytes: u64,
    /// The root's physical bytes after less before (snapshots counted apart).
    pub disk_added_bytes: i64,
    /// Bytes only the guests' snapshots hold after the run.
    pub snapshot_bytes: u64,
    /// Seconds in all.
    pub seconds: f64,
}

impl UpgradeReport {
    /// Whether every guest asked for was upgraded, up to date, or listed (dry).
    pub fn all_ok(&self) -> bool {
        self.guests
            .iter()
            .all(|g| !matches!(g.outcome, Outcome::Failed | Outcome::Skipped))
    }
}

/// The script run inside each guest, by its own `sh`, with its own apt and keyrings: the
/// package lists refreshed through the run's cache (`COWHERD_PROXY`), the pending upgrades
/// listed between markers, then (unless `COWHERD_DRY_RUN`) a full non-interactive upgrade that
/// keeps the guest's changed configuration files, with a `policy-rc.d` that forbids every
/// service start (a guest's own one is put back after). What it downloaded is removed after:
/// the package lists and files live in the run's cache, never in the guest.
const UPGRADE_SCRIPT: &str = r#"
export DEBIAN_FRONTEND=noninteractive APT_LISTCHANGES_FRONTEND=none LC_ALL=C
# The proxy's address and token go to apt in a file only root reads, never on a command line.
conf=/tmp/.cowherd-apt.conf.$$
(umask 077 && printf 'Acquire::http::Proxy "%s";\nAcquire::Retries "3";\n' "$COWHERD_PROXY" > "$conf") || exit 90
unset COWHERD_PROXY
export APT_CONFIG="$conf"
set --
prc=/usr/sbin/policy-rc.d
saved=
clean() {
    rm -f "$conf"
    rm -rf /var/lib/apt/lists/*_* /var/lib/apt/lists/partial/* /var/cache/apt/*.bin \
        /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*
    rm -f "$prc"
    if [ -n "$saved" ]; then mv "$prc.cowherd-saved" "$prc"; fi
}
if [ -e "$prc" ] || [ -L "$prc" ]; then mv "$prc" "$prc.cowherd-saved" && saved=1 || exit 90; fi
trap clean EXIT
printf '#!/bin/sh\n# cowherd upgrade: no service starts while packages are upgraded\nexit 101\n' > "$prc" || exit 90
chmod 755 "$prc" || exit 90
echo "@@cowherd: update"
apt-get "$@" update > /tmp/.cowherd-update.$$ 2>&1
rc=$?
cat /tmp/.cowherd-update.$$
if [ $rc -ne 0 ] || grep -q '^[WE]: .*\(Failed to fetch\|Some index files failed\)' /tmp/.cowherd-update.$$; then
    rm -f /tmp/.cowherd-update.$$
    echo "@@cowherd: the package lists could not be refreshed"
    exit 91
fi
rm -f /tmp/.cowherd-update.$$
echo "@@cowherd: pending"
apt-get "$@" -s dist-upgrade | sed -n 's/^Inst /@@cowherd-inst /p'
echo "@@cowherd: pending-end"
if [ -n "${COWHERD_DRY_RUN:-}" ]; then exit 0; fi
echo "@@cowherd: upgrade"
apt-get "$@" -y -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold dist-upgrade
"#;

/// The most package lines read from one guest's output (a hostile guest's apt could print
/// any number).
const MAX_PACKAGES: usize = 100_000;

/// Parses the pending upgrades between the script's markers: `Inst NAME [OLD] (NEW …)`.
pub fn parse_pending(log: &str) -> Vec<PackageUpgrade> {
    let mut found = Vec::new();
    for line in log.lines() {
        let Some(rest) = line.strip_prefix("@@cowherd-inst ") else {
            continue;
        };
        let rest = rest.trim_start();
        let mut words = rest.split_whitespace();
        let Some(name) = words.next() else { continue };
        let (from, to) = match rest[name.len()..].trim_start() {
            r if r.starts_with('[') => {
                let old = r[1..].split(']').next().unwrap_or("");
                let new = r
                    .split_once('(')
                    .map_or("", |(_, n)| n.split_whitespace().next().unwrap_or(""));
                (old.to_string(), new.to_string())
            }
            r => {
                let new = r
                    .strip_prefix('(')
                    .map_or("", |n| n.split_whitespace().next().unwrap_or(""));
                (String::new(), new.to_string())
            }
        };
        found.push(PackageUpgrade {
            name: name.to_string(),
            from,
            to,
        });
        if found.len() >= MAX_PACKAGES {
            break;
        }
    }
    found.sort();
    found.dedup();
    found
}

/// What a worker hands back: the guest, its apt run, and its log.
struct Ran {
    guest: String,
    result: Result<ExecOutput, Error>,
    log: PathBuf,
    seconds: f64,
}

/// A guest ready for its apt run.
struct Job {
    guest: String,
    hostname: String,
    layers: cowherd_unify::OverlayLayers,
    proxy: String,
    dry_run: bool,
    log: PathBuf,
}

/// Upgrades the distribution of stopped guests `names` (see the module's summary).
///
/// # Algorithm
/// 1. The run's download cache starts: a proxy on 127.0.0.1 that fetches each URL from the
///    package sources once and serves it to every guest (`fetch.rs`), under
///    `$ROOT/cache/upgrade-PID` (removed at the end; a killed run's by the next writer).
/// 2. Per guest, on this thread: skipped if mounted or in use (with the command that upgrades
///    it once stopped) or without `/usr/bin/apt-get`; else unified (the figures before), then
///    a snapshot (its fold first), and an attempt recorded: until it is kept, a killed run's
///    next writer discards the guest's upper layer, which is all the run changed.
/// 3. Up to `jobs` guests at once, on worker threads: [`UPGRADE_SCRIPT`] in the guest's overlay
///    mounted in a private mount namespace (or, dry, over a throwaway upper), output to its log.
/// 4. As each ends, on this thread: failed → the attempt abandoned (the guest is its snapshot),
///    the snapshot removed; nothing upgraded → the same (the guest is exactly as before);
///    upgraded → the attempt kept (folded into base).
/// 5. One unify of every stopped guest together, so that the files the guests upgraded alike
///    (or that a template or an earlier run holds) are one store object again.
///
/// # Errors
/// Starting the cache or the log directory, index errors; one guest's failure is in its line
/// of the report, not an error.
pub fn upgrade(
    root: &HostRoot,
    names: &[String],
    opts: &UpgradeOptions,
    progress: &dyn Progress,
) -> Result<UpgradeReport, Error> {
    let started = Instant::now();
    make_private_dir(&opts.log_dir)?;
    let cache_dir = root
        .path()
        .join("cache")
        .join(format!("upgrade-{}", std::process::id()));
    make_private_dir(&cache_dir)?;
    let cache = DownloadCache::start(&cache_dir.join("http"))?;
    let before_total = cowherd_unify::stats(root, 0)?.total.physical_bytes;
    let mut lines: BTreeMap<String, GuestUpgrade> = BTreeMap::new();
    let mut jobs = Vec::new();
    for name in names {
        let begun = Instant::now();
        match prepare(root, name, opts, &cache, &cache_dir) {
            Ok(Prepared::Ready(job, snapshot, before)) => {
                let mut line = blank(name);
                line.snapshot = snapshot;
                line.disk_added_bytes = -(before as i64);
                line.seconds = begun.elapsed().as_secs_f64();
                line.log = Some(job.log.clone());
                lines.insert(name.clone(), line);
                jobs.push(*job);
            }
            Ok(Prepared::Skip(message)) => {
                let mut line = blank(name);
                line.outcome = Outcome::Skipped;
                line.message = Some(message);
                lines.insert(name.clone(), line);
            }
            Err(e) => {
                let mut line = blank(name);
                line.outcome = Outcome::Failed;
                line.message = Some(e.to_string());
                lines.insert(name.clone(), line);
            }
        }
    }
    progress.start(Phase::Upgrade, Some(jobs.len() as u64));
    let (tx, rx) = mpsc::channel::<Ran>();
    let queue = std::sync::Mutex::new(jobs.into_iter());
    let workers = opts.jobs.max(1);
    std::thread::scope(|scope| {
        for _ in 0..workers {
            let tx = tx.clone();
            let queue = &queue;
            scope.spawn(move || {
                loop {
                    let next = queue.lock().map(|mut q| q.next());
                    let Ok(Some(job)) = next else { break };
                    let t = Instant::now();
                    let result = run_job(&job);
                    let ran = Ran {
                        guest: job.guest,
                        result,
                        log: job.log,
                        seconds: t.elapsed().as_secs_f64(),
                    };
                    if tx.send(ran).is_err() {
                        break;
                    }
                }
            });
        }
        drop(tx);
        for ran in rx {
            let line = lines.get_mut(&ran.guest).expect("a line per guest");
            settle(root, opts, line, ran);
            progress.advance(1);
        }
    });
    progress.finish();
    if !opts.dry_run && lines.values().any(|l| l.outcome == Outcome::Upgraded) {
        reshare(root, &mut lines)?;
    }
    let stats = cache.stats();
    for line in lines.values_mut() {
        if let Some(client) = stats.clients.get(&line.guest) {
            line.downloaded_bytes = client.upstream_bytes;
            line.served_bytes = client.bytes_served;
        }
    }
    drop(cache);
    let _ = cowherd_unify::remove_below_root(root, &cache_rel(std::process::id()));
    let after = cowherd_unify::stats(root, 0)?;
    let snapshot_bytes = after.total.snapshot_bytes;
    let guests: Vec<GuestUpgrade> = names.iter().filter_map(|n| lines.remove(n)).collect();
    Ok(UpgradeReport {
        dry_run: opts.dry_run,
        downloaded_bytes: stats.upstream_bytes,
        upstream_requests: stats.upstream_requests,
        served_bytes: stats.clients.values().map(|c| c.bytes_served).sum(),
        disk_added_bytes: after.total.physical_bytes as i64 - before_total as i64,
        snapshot_bytes,
        guests,
        seconds: started.elapsed().as_secs_f64(),
    })
}

fn cache_rel(pid: u32) -> PathBuf {
    Path::new("cache").join(format!("upgrade-{pid}"))
}

fn make_private_dir(dir: &Path) -> Result<(), Error> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .and_then(|()| std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)))
        .map_err(|error| Error::Io {
            path: dir.to_path_buf(),
            error,
        })
}

fn blank(guest: &str) -> GuestUpgrade {
    GuestUpgrade {
        guest: guest.to_string(),
        outcome: Outcome::UpToDate,
        message: None,
        packages: Vec::new(),
        downloaded_bytes: 0,
        served_bytes: 0,
        disk_added_bytes: 0,
        snapshot: None,
        rolled_back: false,
        log: None,
        seconds: 0.0,
    }
}

enum Prepared {
    /// The job, the snapshot made (none when dry), the guest's physical bytes before.
    Ready(Box<Job>, Option<String>, u64),
    Skip(String),
}

/// Step 2 of [`upgrade`] for one guest.
fn prepare(
    root: &HostRoot,
    name: &str,
    opts: &UpgradeOptions,
    cache: &DownloadCache,
    cache_dir: &Path,
) -> Result<Prepared, Error> {
    let record = cowherd_unify::guest_record(root, name)?;
    if cowherd_unify::mount_state(root, name)? != MountState::Unmounted
        || cowherd_unify::ensure_offline(root, name).is_err()
    {
        return Ok(Prepared::Skip(format!(
            "mounted or in use: stop it, then `cowherd umount {name} && cowherd upgrade {name}`"
        )));
    }
    let base = root.guests_dir().join(name).join("base");
    let upper = root.guests_dir().join(name).join("upper");
    let has_apt = |dir: &Path| {
        std::fs::symlink_metadata(dir.join("usr/bin/apt-get")).is_ok_and(|m| m.is_file())
    };
    if !has_apt(&base) && !has_apt(&upper) {
        return Ok(Prepared::Skip(
            "no /usr/bin/apt-get: not a guest of the Debian family".into(),
        ));
    }
    let (snapshot, before) = if opts.dry_run {
        (None, 0)
    } else {
        let names = [name.to_string()];
        cowherd_unify::unify(
            root,
            &names,
            &UnifyOptions::default(),
            &cowherd_unify::NoProgress,
        )?;
        let before = guest_physical(root, name)?;
        let stem = format!("{}-pre-upgrade", utc_now());
        let made = cowherd_unify::snapshot(
            root,
            name,
            Some(&free_snapshot_name(root, name, &stem)?),
            "upgrade",
        )?;
        cowherd_unify::begin_attempt(root, name, &made.record.name, "upgrade")?;
        (Some(made.record.name), before)
    };
    let scratch = opts.dry_run.then(|| cache_dir.join("dry").join(name));
    let layers = cowherd_unify::private_overlay(root, name, scratch.as_deref())?;
    Ok(Prepared::Ready(
        Box::new(Job {
            guest: name.to_string(),
            hostname: record.hostname().to_string(),
            layers,
            proxy: cache.proxy_url(name),
            dry_run: opts.dry_run,
            log: opts.log_dir.join(format!("{name}.log")),
        }),
        snapshot,
        before,
    ))
}

/// A free name for a snapshot of `guest` from `stem` (`stem`, `stem-2`…).
fn free_snapshot_name(root: &HostRoot, guest: &str, stem: &str) -> Result<String, Error> {
    let taken: Vec<String> = cowherd_unify::snapshot_records(root, guest)?
        .into_iter()
        .map(|r| r.name)
        .collect();
    Ok(std::iter::once(stem.to_string())
        .chain((2..).map(|n| format!("{stem}-{n}")))
        .find(|n| !taken.contains(n))
        .expect("some suffix is free"))
}

/// The guest's physical bytes per the index (`stats`).
fn guest_physical(root: &HostRoot, name: &str) -> Result<u64, Error> {
    Ok(cowherd_unify::stats(root, 0)?
        .guests
        .into_iter()
        .find(|g| g.name == name)
        .map_or(0, |g| g.physical_bytes))
}

/// Step 3 of [`upgrade`], on a worker thread: the script in the guest, output to its log.
fn run_job(job: &Job) -> Result<ExecOutput, Error> {
    let io = |error| Error::Io {
        path: job.log.clone(),
        error,
    };
    let out = File::create(&job.log).map_err(io)?;
    let err = out.try_clone().map_err(io)?;
    let mut exec = Exec::new(
        job.layers.target().to_path_buf(),
        job.hostname.clone(),
        ["sh", "-c", UPGRADE_SCRIPT, "cowherd-upgrade"],
    )
    .overlay(job.layers.clone())
    .env("COWHERD_PROXY", job.proxy.clone());
    if job.dry_run {
        exec = exec.env("COWHERD_DRY_RUN", "1");
    }
    exec.stdin(Stdio::null())
        .stdout(Stdio::from(out))
        .stderr(Stdio::from(err))
        .run()
}

/// Step 4 of [`upgrade`], on the calling thread.
fn settle(root: &HostRoot, opts: &UpgradeOptions, line: &mut GuestUpgrade, ran: Ran) {
    let name = ran.guest.clone();
    line.seconds += ran.seconds;
    let log = std::fs::read(&ran.log).unwrap_or_default();
    let log = String::from_utf8_lossy(&log);
    line.packages = parse_pending(&log);
    let failure = match &ran.result {
        Ok(out) if out.code == 0 => None,
        Ok(out) => Some(format!(
            "the upgrade inside the guest exited with {}: {}",
            out.code,
            last_words(&log)
        )),
        Err(e) => Some(e.to_string()),
    };
    let started = Instant::now();
    if opts.dry_run {
        line.outcome = match failure {
            Some(f) => {
                line.message = Some(format!("{f} (see {})", ran.log.display()));
                Outcome::Failed
            }
            None if line.packages.is_empty() => Outcome::UpToDate,
            None => Outcome::WouldUpgrade,
        };
        return;
    }
    let go_back = |line: &mut GuestUpgrade| -> Result<(), Error> {
        cowherd_unify::abandon_attempt(root, &name)?;
        if let Some(snap) = line.snapshot.take() {
            cowherd_unify::remove_snapshot(root, &name, &snap)?;
        }
        Ok(())
    };
    if let Some(failure) = failure {
        line.outcome = Outcome::Failed;
        line.rolled_back = true;
        let undone = go_back(line)
            .err()
            .map(|e| format!("; going back failed: {e}"));
        line.message = Some(format!(
            "{failure}; the guest is as it was before (see {}){}",
            ran.log.display(),
            undone.unwrap_or_default()
        ));
        line.disk_added_bytes = 0;
        line.packages.clear();
        line.seconds += started.elapsed().as_secs_f64();
        return;
    }
    if line.packages.is_empty() {
        line.outcome = Outcome::UpToDate;
        if let Err(e) = go_back(line) {
            line.outcome = Outcome::Failed;
            line.message = Some(format!("nothing to upgrade, but: {e}"));
        }
        line.disk_added_bytes = 0;
        line.seconds += started.elapsed().as_secs_f64();
        return;
    }
    match cowherd_unify::keep_attempt(root, &name) {
        // Shared again, and its disk counted, by the unify of the whole fleet at the end.
        Ok(_) => line.outcome = Outcome::Upgraded,
        Err(e) => {
            line.outcome = Outcome::Failed;
            line.message = Some(format!(
                "upgraded, but not folded into base: {e} (`cowherd fold {name}` finishes it)"
            ));
            line.disk_added_bytes = 0;
        }
    }
    line.seconds += started.elapsed().as_secs_f64();
}

/// Step 5 of [`upgrade`]: one unify of every stopped guest (the upgraded ones and those they
/// may now share with), so that a file the guests upgraded alike is one store object —
/// across runs too — then each upgraded guest's disk figure.
fn reshare(root: &HostRoot, lines: &mut BTreeMap<String, GuestUpgrade>) -> Result<(), Error> {
    let mut offline = Vec::new();
    for name in cowherd_unify::guest_names(root)? {
        if cowherd_unify::mount_state(root, &name)? == MountState::Unmounted
            && cowherd_unify::ensure_offline(root, &name).is_ok()
        {
            offline.push(name);
        }
    }
    let unified = cowherd_unify::unify(
        root,
        &offline,
        &UnifyOptions::default(),
        &cowherd_unify::NoProgress,
    )?;
    let stats = cowherd_unify::stats(root, 0)?;
    for line in lines.values_mut() {
        if line.outcome != Outcome::Upgraded {
            continue;
        }
        if let Some(f) = unified.failures.iter().find(|f| f.guest == line.guest) {
            line.message = Some(format!("upgraded, but not all shared again: {f}"));
        }
        if let Some(g) = stats.guests.iter().find(|g| g.name == line.guest) {
            line.disk_added_bytes += g.physical_bytes as i64;
        }
    }
    Ok(())
}

/// What `cowherd template upgrade` did.
#[derive(Clone, Debug, Serialize)]
pub struct TemplateUpgrade {
    /// The version upgraded (`name@version`).
    pub from: String,
    /// The new version, if anything was upgraded.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub built: Option<crate::cache::Built>,
    /// The packages upgraded.
    pub packages: Vec<PackageUpgrade>,
    /// Bytes fetched from the package sources.
    pub downloaded_bytes: u64,
    /// The apt output.
    pub log: PathBuf,
    /// Seconds in all.
    pub seconds: f64,
}

/// Makes the next version of built template `name` by upgrading a copy of its newest version
/// (no new bootstrap), unified with the store: a guest upgraded by [`upgrade`] and a guest
/// built from the new version hold the same upgraded files, so they share the same objects.
///
/// # Algorithm
/// As a template build (`cache::build_template`), in `templates/NAME/.building/tree`: a copy
/// of the newest version's tree (copies: apt changes files in place), [`UPGRADE_SCRIPT`] run
/// inside it in its own namespaces through a download cache of its own, then cleaned for
/// reuse, unified into the store and renamed to the next version. Nothing pending: the copy is
/// removed and no version made. A killed run leaves only the staging directory, which the
/// next writer removes.
///
/// # Errors
/// [`Error::NotBuilt`], a failing upgrade ([`Error::Step`], its log named), I/O and index
/// errors.
pub fn upgrade_template(
    root: &HostRoot,
    set: &crate::template::TemplateSet,
    name: &str,
    log_dir: &Path,
    progress: &dyn Progress,
) -> Result<TemplateUpgrade, Error> {
    use crate::cache::{Built, BuiltRecord};
    let started = Instant::now();
    set.get(name)?;
    let old = crate::cache::latest(root, name)?.ok_or_else(|| Error::NotBuilt {
        template: name.to_string(),
    })?;
    make_private_dir(log_dir)?;
    let log = log_dir.join(format!("template-{name}.log"));
    let staging = Path::new("templates")
        .join(name)
        .join(cowherd_unify::TEMPLATE_STAGING);
    cowherd_unify::remove_below_root(root, &staging).or_else(|e| match e.errno() {
        Some(libc::ENOENT) => Ok(()),
        _ => Err(e),
    })?;
    let tree_rel = staging.join("tree");
    let tree = cowherd_unify::Tree::create(root, &tree_rel)?;
    cowherd_unify::clone_tree(
        root,
        &old.tree_rel(),
        &tree,
        cowherd_unify::CloneMode::CopyAll,
    )?;
    let cache_dir = root.path().join(cache_rel(std::process::id()));
    make_private_dir(&cache_dir)?;
    let cache = DownloadCache::start(&cache_dir.join("http"))?;
    let io = |error| Error::Io {
        path: log.clone(),
        error,
    };
    let out = File::create(&log).map_err(io)?;
    let err = out.try_clone().map_err(io)?;
    let ran = Exec::new(
        tree.path(),
        "template",
        ["sh", "-c", UPGRADE_SCRIPT, "cowherd-upgrade"],
    )
    .env("COWHERD_PROXY", cache.proxy_url("template"))
    .stdin(Stdio::null())
    .stdout(Stdio::from(out))
    .stderr(Stdio::from(err))
    .run();
    let downloaded_bytes = cache.stats().upstream_bytes;
    drop(cache);
    let _ = cowherd_unify::remove_below_root(root, &cache_rel(std::process::id()));
    let text = String::from_utf8_lossy(&std::fs::read(&log).unwrap_or_default()).into_owned();
    let packages = parse_pending(&text);
    let failed = match ran {
        Ok(out) if out.code == 0 => None,
        Ok(out) => Some(format!("exit {}: {}", out.code, last_words(&text))),
        Err(e) => Some(e.to_string()),
    };
    if let Some(message) = failed {
        let _ = cowherd_unify::remove_below_root(root, &staging);
        return Err(Error::Step {
            template: name.to_string(),
            step: format!("the upgrade of {} (log: {})", old.label(), log.display()),
            message,
        });
    }
    if packages.is_empty() {
        cowherd_unify::remove_below_root(root, &staging)?;
        return Ok(TemplateUpgrade {
            from: old.label(),
            built: None,
            packages,
            downloaded_bytes,
            log,
            seconds: started.elapsed().as_secs_f64(),
        });
    }
    crate::cache::clean_for_reuse(root, &tree)?;
    let version = crate::cache::versions(root, name)?
        .last()
        .map_or(1, |b| b.record.version + 1);
    let (files, bytes) = crate::cache::tree_size(tree.path());
    let built = Built {
        record: BuiltRecord {
            name: name.to_string(),
            version,
            built_unix: crate::cache::now_unix(),
            made_by: format!("upgrade of {}", old.label()),
            packages: old.record.packages.clone(),
            steps: old.record.steps.clone(),
            from: old.record.from.clone(),
            source_date_epoch: old.record.source_date_epoch,
            files,
            bytes,
        },
    };
    let index_name = built.index_name();
    if let Err(e) = crate::cache::unify_staged(root, set, name, &index_name, &tree_rel, progress) {
        let _ = cowherd_unify::forget_tree(root, &index_name);
        return Err(e);
    }
    let record_path = root.path().join(&staging).join("template.toml");
    let text = toml::to_string(&built.record).expect("a build record serializes");
    std::fs::write(&record_path, text).map_err(|error| Error::Io {
        path: record_path.clone(),
        error,
    })?;
    cowherd_unify::rename_below_root(root, &staging, &crate::cache::version_rel(name, version))?;
    Ok(TemplateUpgrade {
        from: old.label(),
        built: Some(built),
        packages,
        downloaded_bytes,
        log,
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// The last meaningful line of a log, for a one-line message.
fn last_words(log: &str) -> String {
    log.lines()
        .rev()
        .map(str::trim)
        .find(|l| !l.is_empty() && !l.starts_with("@@cowherd: update"))
        .unwrap_or("")
        .chars()
        .take(300)
        .collect()
}

/// Now in UTC as `YYYYMMDDTHHMMSSZ`.
fn utc_now() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    cowherd_unify::utc_stamp(secs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pending_upgrades_are_read_between_the_markers() {
        let log = "noise\n@@cowherd: pending\n\
            @@cowherd-inst libc6 [2.36-9+deb12u7] (2.36-9+deb12u14 Debian:12.12/stable [amd64])\n\
            @@cowherd-inst tzdata [2025b-0+deb12u1] (2026f-0+deb12u1 Debian-Security:12/stable-security [all])\n\
            @@cowherd-inst newpkg (1.0-1 Debian:12/stable [amd64])\n\
            Inst fake [1] (2 x)\n@@cowherd: pending-end\n";
        let got = parse_pending(log);
        assert_eq!(
            got,
            vec![
                PackageUpgrade {
                    name: "libc6".into(),
                    from: "2.36-9+deb12u7".into(),
                    to: "2.36-9+deb12u14".into()
                },
                PackageUpgrade {
                    name: "newpkg".into(),
                    from: String::new(),
                    to: "1.0-1".into()
                },
                PackageUpgrade {
                    name: "tzdata".into(),
                    from: "2025b-0+deb12u1".into(),
                    to: "2026f-0+deb12u1".into()
                },
            ]
        );
    }

    #[test]
    fn hostile_package_lines_never_panic() {
        for line in [
            "@@cowherd-inst ",
            "@@cowherd-inst x [",
            "@@cowherd-inst x (",
            "@@cowherd-inst x [a] (",
            "@@cowherd-inst é [ü] (ß",
        ] {
            let _ = parse_pending(line);
        }
    }
}
