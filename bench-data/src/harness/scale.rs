//! The scale set (`--scale`): more guests than real copies fit on the disk.
//!
//! Guest `i` of a scale point with `n` guests is a real copy of master guest `i` while
//! `i < m` (the master set's `m` guests); beyond that it is a *clone* of real copy `i % m`: a
//! `cp -al` of it (every file a hardlink of the real copy's inode), in which a seeded handful
//! of files is then given private, changed content — written beside and renamed over, so the
//! source's inode is never touched:
//!
//! * identity: `etc/hostname`, `etc/hosts`, the machine ids, ssh host keys, the random seed;
//! * a few logs (`var/log/`), edited configs (`etc/`) and user files (`home/`, `root/`).
//!
//! Which files, and what they become, depends only on the seed, the clone's name and the
//! source's file list ([`clone_divergence`], [`diverged_content`]).
//!
//! The same module picks and rewrites the ~200 files of an upgrade-sized change of one guest
//! ([`pick_upgrade`], [`upgrade_patch`], [`rewrite_patched`]).

use std::fs::{self, File, FileTimes};
use std::io::{self, Read as _, Write as _};
use std::os::unix::fs::{FileExt as _, MetadataExt as _, PermissionsExt as _};
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use xattr::FileExt as _;

use crate::seed::Rand;

/// Files of a guest that make it a host of its own; a clone changes each one it has.
pub const IDENTITY_FILES: &[&str] = &[
    "etc/hostname",
    "etc/hosts",
    "etc/machine-id",
    "var/lib/dbus/machine-id",
    "var/lib/systemd/random-seed",
];

/// Prefix of the ssh host keys (identity too).
pub const SSH_HOST_KEYS: &str = "etc/ssh/ssh_host_";

/// Logs a clone changes (at most).
pub const CLONE_LOGS: usize = 12;
/// Configs below `etc/` a clone edits (at most).
pub const CLONE_CONFIGS: usize = 16;
/// User files below `home/` and `root/` a clone changes (at most).
pub const CLONE_USER: usize = 8;

/// Files an upgrade-sized change rewrites.
pub const UPGRADE_FILES: usize = 200;

/// Why a clone's file diverges.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
pub enum Change {
    /// An identity file: hostname, machine id, host keys, random seed.
    Identity,
    /// A log that grew.
    Log,
    /// A configuration file with a local edit.
    Config,
    /// A user's file.
    User,
}

/// The name of guest `index` (0-based) of a scale point, `real` of whose guests are real
/// copies named after the master's (`masters`): a real copy keeps its master's name, a clone is
/// `c<index+1>-<source>`, zero padded to the width of `count`.
#[must_use]
pub fn guest_name(index: usize, count: usize, masters: &[String]) -> String {
    let real = masters.len();
    if index < real {
        return masters[index].clone();
    }
    let width = count.to_string().len().max(3);
    format!("c{:0width$}-{}", index + 1, masters[index % real])
}

/// `k` distinct indices below `n`, in increasing order, chosen by `rng` (all of them when
/// `k >= n`).
fn sample(rng: &mut Rand, n: usize, k: usize) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..n).collect();
    let k = k.min(n);
    for i in 0..k {
        let j = i + rng.below((n - i) as u64) as usize;
        idx.swap(i, j);
    }
    let mut out = idx[..k].to_vec();
    out.sort_unstable();
    out
}

/// Whether `path` is an identity file.
fn is_identity(path: &str) -> bool {
    IDENTITY_FILES.contains(&path) || path.starts_with(SSH_HOST_KEYS)
}

/// The files clone `clone` of a guest whose regular files are `files` (paths relative to the
/// guest's root, sorted) makes private, and why: every identity file it has, then up to
/// [`CLONE_LOGS`] logs, [`CLONE_CONFIGS`] configs and [`CLONE_USER`] user files chosen by
/// `seed` and the clone's name. Sorted by path.
#[must_use]
pub fn clone_divergence(seed: u64, clone: &str, files: &[String]) -> Vec<(String, Change)> {
    let mut rng = Rand::new(seed, &format!("scale-clone/{clone}"), 0);
    let mut out: Vec<(String, Change)> = files
        .iter()
        .filter(|f| is_identity(f))
        .map(|f| (f.clone(), Change::Identity))
        .collect();
    let pools: [(Change, usize, &[&str]); 3] = [
        (Change::Log, CLONE_LOGS, &["var/log/"]),
        (Change::Config, CLONE_CONFIGS, &["etc/"]),
        (Change::User, CLONE_USER, &["home/", "root/"]),
    ];
    for (change, k, below) in pools {
        let pool: Vec<&String> = files
            .iter()
            .filter(|f| !is_identity(f) && below.iter().any(|d| f.starts_with(d)))
            .collect();
        for i in sample(&mut rng, pool.len(), k) {
            out.push((pool[i].clone(), change));
        }
    }
    out.sort();
    out
}

/// Every ASCII letter and digit of `bytes` replaced by one drawn from `rng`.
fn scramble(rng: &mut Rand, bytes: &[u8]) -> Vec<u8> {
    const ALNUM: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
    bytes
        .iter()
        .map(|&b| {
            if b.is_ascii_alphanumeric() {
                ALNUM[rng.below(ALNUM.len() as u64) as usize]
            } else {
                b
            }
        })
        .collect()
}

/// The new content of `path` in clone `clone`, from its `original` bytes: the clone's hostname,
/// a machine id of its own, scrambled keys and user files, appended log lines, an appended
/// config line. Always differs from `original`.
#[must_use]
pub fn diverged_content(
    seed: u64,
    clone: &str,
    path: &str,
    change: Change,
    original: &[u8],
) -> Vec<u8> {
    let mut rng = Rand::new(seed, &format!("scale-clone/{clone}/{path}"), 0);
    let mut out = match (change, path) {
        (Change::Identity, "etc/hostname") => format!("{clone}\n").into_bytes(),
        (Change::Identity, "etc/machine-id" | "var/lib/dbus/machine-id") => {
            // One id per clone, the same in both files.
            let mut id = Rand::new(seed, &format!("scale-clone/{clone}/machine-id"), 0);
            format!("{:016x}{:016x}\n", id.next_u64(), id.next_u64()).into_bytes()
        }
        (Change::Identity, "etc/hosts") => {
            let mut v = original.to_vec();
            v.extend_from_slice(format!("127.0.1.1\t{clone}\n").as_bytes());
            v
        }
        (Change::Identity | Change::User, _) => scramble(&mut rng, original),
        (Change::Log, _) => {
            let mut v = original.to_vec();
            for i in 0..1 + rng.below(40) {
                let line = format!(
                    "Nov {:2} {:02}:{:02}:{:02} {clone} systemd[1]: run {i}: session {} ok\n",
                    1 + rng.below(28),
                    rng.below(24),
                    rng.below(60),
                    rng.below(60),
                    rng.next_u64() % 100_000
                );
                v.extend_from_slice(line.as_bytes());
            }
            v
        }
        (Change::Config, _) => {
            let mut v = original.to_vec();
            if !v.is_empty() && !v.ends_with(b"\n") {
                v.push(b'\n');
            }
            v.extend_from_slice(
                format!("# {clone}: local setting {}\n", rng.next_u64() % 10_000).as_bytes(),
            );
            v
        }
    };
    if out == original {
        out.push(b'\n');
    }
    out
}

/// How far after the original a diverged file's mtime is: 1 hour to 60 days, with
/// nanoseconds, from `seed`, the clone and the path.
#[must_use]
pub fn diverged_mtime_offset(seed: u64, clone: &str, path: &str) -> Duration {
    let mut rng = Rand::new(seed, &format!("scale-clone/{clone}/{path}/mtime"), 0);
    Duration::new(
        3_600 + rng.below(60 * 86_400),
        rng.below(1_000_000_000) as u32,
    )
}

/// The `n` files of `files` (paths relative to a guest's root, sorted) that an upgrade of
/// guest `guest` rewrites: those below `usr/` (every file if none is), chosen by `seed` and the
/// guest's name. Sorted.
#[must_use]
pub fn pick_upgrade(seed: u64, guest: &str, files: &[String], n: usize) -> Vec<String> {
    let mut pool: Vec<&String> = files.iter().filter(|f| f.starts_with("usr/")).collect();
    if pool.is_empty() {
        pool = files.iter().collect();
    }
    let mut rng = Rand::new(seed, &format!("scale-upgrade/{guest}"), 0);
    sample(&mut rng, pool.len(), n)
        .into_iter()
        .map(|i| pool[i].clone())
        .collect()
}

/// Where the upgrade changes a file of `len` bytes (at least 1) and the bytes it XORs in
/// there: up to 16 bytes, each nonzero, so every byte of the window changes.
#[must_use]
pub fn upgrade_patch(seed: u64, guest: &str, path: &str, len: u64) -> (u64, Vec<u8>) {
    let mut rng = Rand::new(seed, &format!("scale-upgrade/{guest}/{path}"), 0);
    let width = len.clamp(1, 16);
    let offset = rng.below(len.max(1) - width + 1);
    let mut mask = vec![0u8; width as usize];
    rng.fill(&mut mask);
    for b in &mut mask {
        *b |= 1;
    }
    (offset, mask)
}

/// Regular files below `dir` (never following symlinks), as `(path relative to dir, size)`,
/// sorted; names that are not UTF-8 are left out.
///
/// # Errors
///
/// Walking or `lstat` failures.
pub fn regular_files(dir: &Path) -> io::Result<Vec<(String, u64)>> {
    let mut out = Vec::new();
    for entry in walkdir::WalkDir::new(dir).follow_links(false) {
        let entry = entry?;
        if !entry.file_type().is_file() {
            continue;
        }
        let rel = entry.path().strip_prefix(dir).expect("below the dir");
        if let Some(rel) = rel.to_str() {
            out.push((rel.to_owned(), entry.metadata()?.len()));
        }
    }
    out.sort();
    Ok(out)
}

fn time(secs: i64, nanos: i64) -> SystemTime {
    let d = Duration::new(secs.unsigned_abs(), nanos.clamp(0, 999_999_999) as u32);
    if secs >= 0 {
        UNIX_EPOCH + d
    } else {
        UNIX_EPOCH - d
    }
}

/// Replaces `path` by a new inode: `fill` writes its bytes into a temporary file beside it,
/// which gets the original's owner, mode, extended attributes and access time, and the
/// original's mtime plus `mtime_after`; then it is renamed over `path` (as a package manager
/// does: the old inode, and every other name of it, is left alone). Returns the new size.
///
/// # Errors
///
/// I/O failures; the temporary file is removed.
pub fn replace_file(
    path: &Path,
    mtime_after: Duration,
    fill: impl FnOnce(&mut File) -> io::Result<()>,
) -> io::Result<u64> {
    let meta = fs::symlink_metadata(path)?;
    let name = path
        .file_name()
        .ok_or_else(|| io::Error::other("no file name"))?;
    let tmp = path.with_file_name(format!(".cowherd-bench~{}", name.to_string_lossy()));
    let result = (|| {
        let mut file = fs::OpenOptions::new()
            .write(true)
            .read(true)
            .create_new(true)
            .open(&tmp)?;
        fill(&mut file)?;
        std::os::unix::fs::fchown(&file, Some(meta.uid()), Some(meta.gid()))?;
        file.set_permissions(fs::Permissions::from_mode(meta.mode() & 0o7777))?;
        for attr in xattr::list(path)? {
            if let Some(value) = xattr::get(path, &attr)? {
                file.set_xattr(&attr, &value)?;
            }
        }
        let mtime = time(meta.mtime(), meta.mtime_nsec()) + mtime_after;
        file.set_times(
            FileTimes::new()
                .set_accessed(time(meta.atime(), meta.atime_nsec()))
                .set_modified(mtime),
        )?;
        let len = file.metadata()?.len();
        drop(file);
        fs::rename(&tmp, path)?;
        Ok(len)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// Gives `path` of clone `clone` its diverged content ([`diverged_content`]) as a new inode.
///
/// # Errors
///
/// I/O failures.
pub fn diverge_file(
    seed: u64,
    clone: &str,
    guest_dir: &Path,
    rel: &str,
    change: Change,
) -> io::Result<u64> {
    let path = guest_dir.join(rel);
    let mut original = Vec::new();
    File::open(&path)?.read_to_end(&mut original)?;
    let bytes = diverged_content(seed, clone, rel, change, &original);
    replace_file(&path, diverged_mtime_offset(seed, clone, rel), |f| {
        f.write_all(&bytes)
    })
}

/// Rewrites `path` of guest `guest` as an upgrade would: a new inode with the same size,
/// owner, mode, xattrs and mtime and the bytes of [`upgrade_patch`] XORed in (the rest copied
/// from the original). Returns its size.
///
/// # Errors
///
/// I/O failures.
pub fn rewrite_patched(seed: u64, guest: &str, guest_dir: &Path, rel: &str) -> io::Result<u64> {
    let path = guest_dir.join(rel);
    let len = fs::symlink_metadata(&path)?.len();
    let (offset, mask) = upgrade_patch(seed, guest, rel, len);
    replace_file(&path, Duration::ZERO, |f| {
        let mut src = File::open(&path)?;
        io::copy(&mut src, f)?;
        let mut window = vec![0u8; mask.len()];
        let got = src.read_at(&mut window, offset)?;
        window.truncate(got);
        for (b, m) in window.iter_mut().zip(&mask) {
            *b ^= m;
        }
        f.write_all_at(&window, offset)
    })
}
