//! `/proc/<pid>/mountinfo`: one mount a line, parsed into [`MountEntry`]; and the mount table
//! of every mount namespace on the host ([`MountTable`]), to tell whether a guest's layers are
//! in use anywhere.
//!
//! A line is `id parent major:minor root mount-point mount-options [optional…] - fstype source
//! super-options`; paths and option values escape space, tab, newline, backslash (and, in
//! super options, `,` and `=`) as `\ooo` octal.

use std::ffi::{OsStr, OsString};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Path, PathBuf};

/// One mount of a mount namespace.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MountEntry {
    /// The mount's id.
    pub id: u32,
    /// Its parent's id.
    pub parent: u32,
    /// `st_dev` of the mounted filesystem as (major, minor).
    pub dev: (u32, u32),
    /// Where the mount point is, as seen from the reading process's root.
    pub mount_point: PathBuf,
    /// Filesystem type (`overlay`, `ext4`, …).
    pub fstype: String,
    /// The source given at mount time.
    pub source: OsString,
    /// Per-superblock options, unescaped, in order: `lowerdir=/a`, `index=on`, `rw`, …
    pub super_options: Vec<(String, Option<OsString>)>,
}

impl MountEntry {
    /// The value of super option `key` (`None` if absent; `Some(None)` for a flag).
    pub fn option(&self, key: &str) -> Option<Option<&OsStr>> {
        self.super_options
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_deref())
    }

    /// The filesystem's device number as `st_dev` encodes it.
    pub fn st_dev(&self) -> u64 {
        libc::makedev(self.dev.0, self.dev.1)
    }
}

/// Decodes the `\ooo` escapes of mountinfo.
pub(crate) fn unescape(field: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(field.len());
    let mut i = 0;
    while i < field.len() {
        let octal = field[i] == b'\\'
            && i + 4 <= field.len()
            && field[i + 1] <= b'3'
            && field[i + 1..i + 4]
                .iter()
                .all(|c| (b'0'..=b'7').contains(c));
        if octal {
            out.push(
                (field[i + 1] - b'0') * 64 + (field[i + 2] - b'0') * 8 + (field[i + 3] - b'0'),
            );
            i += 4;
        } else {
            out.push(field[i]);
            i += 1;
        }
    }
    out
}

fn path(field: &[u8]) -> PathBuf {
    PathBuf::from(OsString::from_vec(unescape(field)))
}

/// Parses one mountinfo line; `None` if it is malformed.
fn parse_line(line: &[u8]) -> Option<MountEntry> {
    let fields: Vec<&[u8]> = line.split(|&b| b == b' ').collect();
    let sep = fields.iter().position(|f| *f == b"-")?;
    if sep < 6 || fields.len() < sep + 4 {
        return None;
    }
    let num = |f: &[u8]| std::str::from_utf8(f).ok()?.parse::<u32>().ok();
    let (major, minor) = {
        let s = std::str::from_utf8(fields[2]).ok()?;
        let (a, b) = s.split_once(':')?;
        (a.parse().ok()?, b.parse().ok()?)
    };
    let super_options = fields[sep + 3]
        .split(|&b| b == b',')
        .filter(|o| !o.is_empty())
        .map(|o| match o.iter().position(|&b| b == b'=') {
            Some(eq) => (
                String::from_utf8_lossy(&unescape(&o[..eq])).into_owned(),
                Some(OsString::from_vec(unescape(&o[eq + 1..]))),
            ),
            None => (String::from_utf8_lossy(&unescape(o)).into_owned(), None),
        })
        .collect();
    Some(MountEntry {
        id: num(fields[0])?,
        parent: num(fields[1])?,
        dev: (major, minor),
        mount_point: path(fields[4]),
        fstype: String::from_utf8_lossy(fields[sep + 1]).into_owned(),
        source: OsString::from_vec(unescape(fields[sep + 2])),
        super_options,
    })
}

/// Parses a whole mountinfo text; malformed lines are skipped.
pub fn parse_mountinfo(text: &[u8]) -> Vec<MountEntry> {
    text.split(|&b| b == b'\n')
        .filter(|l| !l.is_empty())
        .filter_map(parse_line)
        .collect()
}

/// Reads and parses a mountinfo file (`/proc/self/mountinfo`, `/proc/<pid>/mountinfo`).
///
/// # Errors
/// The read error (a process that has exited gives `ENOENT` or `ESRCH`).
pub fn read_mountinfo(file: &Path) -> std::io::Result<Vec<MountEntry>> {
    std::fs::read(file).map(|text| parse_mountinfo(&text))
}

/// A process, as named in messages: pid and command name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Process {
    /// Its pid (in the host's pid namespace).
    pub pid: i32,
    /// Its command name (`/proc/<pid>/comm`).
    pub command: String,
}

impl Process {
    /// Reads the command name of `pid` (empty if it is gone).
    pub(crate) fn of(pid: i32) -> Process {
        let command = std::fs::read_to_string(format!("/proc/{pid}/comm"))
            .map(|c| c.trim_end().to_string())
            .unwrap_or_default();
        Process { pid, command }
    }
}

impl std::fmt::Display for Process {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "pid {} ({})", self.pid, self.command)
    }
}

/// The pids of every process on the host, from `/proc`.
pub(crate) fn all_pids() -> Vec<i32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect()
}

/// The mounts of this process's mount namespace, and of every other mount namespace that a
/// process on the host is in.
#[derive(Debug, Default)]
pub(crate) struct MountTable {
    /// This process's namespace.
    pub own: Vec<MountEntry>,
    /// Every other namespace: a process in it, and its mounts.
    pub others: Vec<(Process, Vec<MountEntry>)>,
}

impl MountTable {
    /// This namespace only.
    ///
    /// # Errors
    /// Reading `/proc/self/mountinfo`.
    pub fn own() -> std::io::Result<MountTable> {
        Ok(MountTable {
            own: read_mountinfo(Path::new("/proc/self/mountinfo"))?,
            others: Vec::new(),
        })
    }

    /// This namespace and every other one (a process that exits meanwhile is skipped).
    ///
    /// # Errors
    /// Reading `/proc/self/mountinfo`.
    pub fn all() -> std::io::Result<MountTable> {
        use std::os::unix::fs::MetadataExt;
        let mut table = MountTable::own()?;
        let ns = |pid: &str| std::fs::metadata(format!("/proc/{pid}/ns/mnt")).map(|m| m.ino());
        let mut seen = std::collections::HashSet::new();
        if let Ok(own) = ns("self") {
            seen.insert(own);
        }
        for pid in all_pids() {
            let Ok(ino) = ns(&pid.to_string()) else {
                continue;
            };
            if !seen.insert(ino) {
                continue;
            }
            if let Ok(mounts) = read_mountinfo(Path::new(&format!("/proc/{pid}/mountinfo"))) {
                table.others.push((Process::of(pid), mounts));
            }
        }
        Ok(table)
    }
}

/// The layers of an overlay mount: every `lowerdir` entry, `upperdir` and `workdir`.
pub(crate) fn overlay_layers(m: &MountEntry) -> Vec<PathBuf> {
    if m.fstype != "overlay" {
        return Vec::new();
    }
    let mut layers = Vec::new();
    for (key, value) in &m.super_options {
        let Some(value) = value else { continue };
        match key.as_str() {
            "lowerdir" | "lowerdir+" | "datadir+" => layers.extend(
                value
                    .as_bytes()
                    .split(|&b| b == b':')
                    .filter(|l| !l.is_empty())
                    .map(|l| PathBuf::from(OsStr::from_bytes(l))),
            ),
            "upperdir" | "workdir" => layers.push(PathBuf::from(value)),
            _ => {}
        }
    }
    layers
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const OVERLAY: &[u8] = b"44 27 0:39 / /var/lib/cowherd/guests/web\\04001/rootfs rw,relatime shared:9 - overlay cowherd rw,lowerdir=/var/lib/cowherd/guests/web\\04001/base,upperdir=/u,workdir=/w,index=on,userxattr\n";

    #[test]
    fn an_overlay_line_gives_its_paths_and_options_unescaped() {
        let m = &parse_mountinfo(OVERLAY)[0];
        assert_eq!((m.id, m.parent, m.dev), (44, 27, (0, 39)));
        assert_eq!(
            m.mount_point,
            Path::new("/var/lib/cowherd/guests/web 01/rootfs")
        );
        assert_eq!(m.fstype, "overlay");
        assert_eq!(
            m.option("lowerdir"),
            Some(Some(OsStr::new("/var/lib/cowherd/guests/web 01/base")))
        );
        assert_eq!(m.option("index"), Some(Some(OsStr::new("on"))));
        assert_eq!(m.option("userxattr"), Some(None));
        assert_eq!(m.option("metacopy"), None);
    }

    #[test]
    fn malformed_lines_are_skipped() {
        let text = b"garbage\n1 2 3\n45 27 8:1 / /mnt rw - ext4 /dev/sda1 rw\n";
        let all = parse_mountinfo(text);
        assert_eq!(all.len(), 1);
        assert_eq!(all[0].st_dev(), libc::makedev(8, 1));
    }

    #[test]
    fn this_process_sees_its_root_mounted() {
        let all = read_mountinfo(Path::new("/proc/self/mountinfo")).unwrap();
        assert!(all.iter().any(|m| m.mount_point == Path::new("/")));
    }

    /// The kernel's escaping (`\ooo` for space, tab, newline, backslash, comma, equals).
    fn escape(raw: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        for &b in raw {
            if b" \t\n\\,=".contains(&b) {
                out.extend_from_slice(format!("\\{b:03o}").as_bytes());
            } else {
                out.push(b);
            }
        }
        out
    }

    proptest! {
        #[test]
        fn unescape_inverts_the_kernels_escaping(raw in proptest::collection::vec(1u8.., 0..64)) {
            prop_assert_eq!(unescape(&escape(&raw)), raw);
        }

        #[test]
        fn any_mount_point_and_lowerdir_round_trip(
            point in proptest::collection::vec(1u8.., 1..40),
            lower in proptest::collection::vec(1u8.., 1..40),
        ) {
            let mut line = b"7 1 0:50 / /".to_vec();
            line.extend(escape(&point));
            line.extend_from_slice(b" rw - overlay none rw,lowerdir=/");
            line.extend(escape(&lower));
            line.extend_from_slice(b",index=off");
            let m = parse_line(&line).expect("parses");
            let mut want = b"/".to_vec();
            want.extend_from_slice(&point);
            prop_assert_eq!(m.mount_point.as_os_str().as_bytes(), &want[..]);
            let mut want = b"/".to_vec();
            want.extend_from_slice(&lower);
            prop_assert_eq!(m.option("lowerdir"), Some(Some(OsStr::from_bytes(&want))));
            prop_assert_eq!(m.option("index"), Some(Some(OsStr::new("off"))));
        }
    }
}
