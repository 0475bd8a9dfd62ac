//! What operations report: the `unify` summary, per-file failures, and path display.

use serde::Serialize;

use crate::guest::OpenGuest;

/// Shows a path's bytes as text: valid UTF-8 as is, other bytes and control characters
/// escaped (`\xff`, `\n`), backslashes doubled — unambiguous, one line.
pub fn display_path(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len());
    for chunk in bytes.utf8_chunks() {
        for c in chunk.valid().chars() {
            match c {
                '\\' => out.push_str("\\\\"),
                '\n' => out.push_str("\\n"),
                '\t' => out.push_str("\\t"),
                c if c.is_control() => out.push_str(&format!("\\x{:02x}", c as u32)),
                c => out.push(c),
            }
        }
        for b in chunk.invalid() {
            out.push_str(&format!("\\x{b:02x}"));
        }
    }
    out
}

/// A file (or guest) that could not be processed; the run went on without it.
#[derive(Clone, Debug, Serialize)]
pub struct Failure {
    /// The guest, if any.
    pub guest: String,
    /// The guest-absolute path (escaped as by [`display_path`]), empty for a whole guest.
    pub path: String,
    /// What went wrong.
    pub error: String,
}

/// A guest-relative path shown guest-absolute (`usr/bin/ls` → `/usr/bin/ls`), escaped as by
/// [`display_path`].
pub(crate) fn guest_abs(rel: &[u8]) -> String {
    let mut abs = b"/".to_vec();
    abs.extend_from_slice(rel);
    display_path(&abs)
}

impl Failure {
    pub(crate) fn new(guest: &OpenGuest, rel: &[u8], error: String) -> Failure {
        Failure::at(&guest.name, rel, error)
    }

    /// A failure on the guest-relative path `rel` of guest `guest`.
    pub(crate) fn at(guest: &str, rel: &[u8], error: impl std::fmt::Display) -> Failure {
        Failure {
            guest: guest.to_string(),
            path: guest_abs(rel),
            error: error.to_string(),
        }
    }

    pub(crate) fn guest(name: &str, error: String) -> Failure {
        Failure {
            guest: name.to_string(),
            path: String::new(),
            error,
        }
    }
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match (self.guest.is_empty(), self.path.is_empty()) {
            (true, _) => write!(f, "{}", self.error),
            (false, true) => write!(f, "guest {}: {}", self.guest, self.error),
            (false, false) => write!(f, "guest {} {}: {}", self.guest, self.path, self.error),
        }
    }
}

/// A path that was (or, in a dry run, would be) linked to a store object.
#[derive(Clone, Debug, Serialize)]
pub struct LinkedPath {
    /// The guest.
    pub guest: String,
    /// The guest-absolute path, escaped as by [`display_path`].
    pub path: String,
    /// The store object's name.
    pub object: String,
    /// The file's size.
    pub size: u64,
}

impl LinkedPath {
    pub(crate) fn new(guest: &OpenGuest, rel: &[u8], object: &str, size: u64) -> LinkedPath {
        LinkedPath {
            guest: guest.name.clone(),
            path: guest_abs(rel),
            object: object.to_string(),
            size,
        }
    }
}

/// A file left alone because its inode carries flags someone set (`chattr +i`, `+a`, `+A`, …):
/// sharing its inode would give them to the other paths or take them from this one.
#[derive(Clone, Debug, Serialize)]
pub struct FlaggedPath {
    /// The guest.
    pub guest: String,
    /// The guest-absolute path, escaped as by [`display_path`].
    pub path: String,
    /// Its flags as `lsattr` letters (`i`, `a`, `dA`, …); a bit without a letter as `0x…`.
    pub flags: String,
}

/// Inode flags (`FS_IOC_GETFLAGS`) as the letters `lsattr` shows, in its order.
pub(crate) fn flag_letters(flags: u32) -> String {
    const LETTERS: [(u32, char); 22] = [
        (0x0000_0001, 's'),
        (0x0000_0002, 'u'),
        (0x0000_0008, 'S'),
        (0x0001_0000, 'D'),
        (0x0000_0010, 'i'),
        (0x0000_0020, 'a'),
        (0x0000_0040, 'd'),
        (0x0000_0080, 'A'),
        (0x0000_0004, 'c'),
        (0x0000_0800, 'E'),
        (0x0000_4000, 'j'),
        (0x0000_1000, 'I'),
        (0x0000_8000, 't'),
        (0x0002_0000, 'T'),
        (0x0008_0000, 'e'),
        (0x0080_0000, 'C'),
        (0x0200_0000, 'x'),
        (0x4000_0000, 'F'),
        (0x1000_0000, 'N'),
        (0x2000_0000, 'P'),
        (0x0010_0000, 'V'),
        (0x0000_0400, 'm'),
    ];
    let mut out = String::new();
    let mut rest = flags;
    for (bit, letter) in LETTERS {
        if flags & bit != 0 {
            out.push(letter);
            rest &= !bit;
        }
    }
    if rest != 0 {
        if !out.is_empty() {
            out.push(' ');
        }
        out.push_str(&format!("{rest:#x}"));
    }
    out
}

/// The summary of a `unify` run.
#[derive(Clone, Debug, Default, Serialize)]
pub struct UnifyReport {
    /// Nothing was changed.
    pub dry_run: bool,
    /// The guests unified.
    pub guests: Vec<String>,
    /// Regular files seen.
    pub files_scanned: u64,
    /// Files not in the index before.
    pub files_new: u64,
    /// Files whose inode, size, mtime or ctime changed since the last run.
    pub files_changed: u64,
    /// Files gone since the last run.
    pub files_removed: u64,
    /// Inodes whose first and last 4 KiB were read.
    pub partial_hashed_files: u64,
    /// Inodes read in full.
    pub hashed_files: u64,
    /// Bytes read in full.
    pub hashed_bytes: u64,
    /// Store objects made (or that would be made).
    pub objects_created: u64,
    /// Paths replaced by (or that would be replaced by) store links.
    pub linked_files: u64,
    /// Bytes freed (allocated blocks of inodes no longer referenced).
    pub saved_bytes: u64,
    /// Files left alone because they changed between hashing and linking.
    pub skipped_changed: u64,
    /// Files left alone because their inode carries flags someone set (`chattr`): listed by
    /// the run that first reads such a file (new, or changed since), not by later runs, which
    /// do not read it again until it changes.
    pub skipped_flagged: Vec<FlaggedPath>,
    /// Guests left alone because they are mounted (with all guests selected).
    pub skipped_mounted: Vec<String>,
    /// Files or guests that failed; the run went on without them.
    pub failures: Vec<Failure>,
    /// Wall-clock seconds per phase (scan, hash, plan, link).
    pub seconds: std::collections::BTreeMap<&'static str, f64>,
    /// Every linked path, when asked for.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub linked: Vec<LinkedPath>,
}

#[cfg(test)]
mod tests {
    use super::{display_path, flag_letters};

    #[test]
    fn flag_letters_are_lsattrs() {
        assert_eq!(flag_letters(0x10), "i");
        assert_eq!(flag_letters(0x20), "a");
        assert_eq!(flag_letters(0x40 | 0x80), "dA");
        assert_eq!(flag_letters(0x10 | 0x8_0000), "ie");
        assert_eq!(flag_letters(0x8000_0000 | 0x10), "i 0x80000000");
        assert_eq!(flag_letters(0), "");
    }

    #[test]
    fn display_path_escapes_what_is_not_plain_text() {
        assert_eq!(display_path(b"/usr/bin/ls"), "/usr/bin/ls");
        assert_eq!(display_path(b"/a\nb"), "/a\\nb");
        assert_eq!(display_path(b"/caf\xe9"), "/caf\\xe9");
        assert_eq!(display_path("/über".as_bytes()), "/über");
        assert_eq!(display_path(b"/a\\b"), "/a\\\\b");
    }
}
