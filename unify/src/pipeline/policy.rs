//! Marker policy: which [`Marker`] each regular file of a guest gets (see "Marker policy" in the
//! README).
//!
//! A policy is a list of `"<marker> <glob>"` [`Rule`]s, from `$ROOT/policy.toml` and from the
//! `[policy]` table of a guest's `guest.toml` (both have the serde form [`PolicyFile`]), plus the
//! set of the guest's dpkg conffiles ([`read_dpkg_conffiles`]). [`Policy::compile`] turns them
//! into one matcher and [`Policy::marker_for`] answers for one guest-absolute path.
//!
//! Glob syntax (globset, with `literal_separator` and `backslash_escape`): `*` and `?` stay within
//! one path component, `**` as a whole component crosses components, `{a,b}` are alternatives,
//! `[a-z]` classes, and `\` escapes the next character. Every glob must be guest-absolute (start
//! with `/`). `/etc/**` matches every path *below* `/etc` (`/etc/x`, `/etc/x/y`) but not `/etc`
//! itself; that never matters for markers, which are chosen for regular files only.

use std::cell::RefCell;
use std::collections::HashSet;
use std::ffi::{CStr, CString, OsString};
use std::fmt;
use std::fs::File;
use std::io::{self, Read};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStringExt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use globset::{Candidate, Glob, GlobBuilder, GlobSet, GlobSetBuilder};
use nix::dir::{Dir, Type};
use nix::errno::Errno;
use nix::fcntl::{OFlag, OpenHow, ResolveFlag, openat2};
use serde::{Deserialize, Serialize};

/// What the unifier does with one regular file of a guest.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Marker {
    /// Never shared: the file stays the guest's own inode.
    Private,
    /// Shared inode in `base`; a guest's write copies up into its own upper layer.
    Cow,
    /// Shared inode carrying `FS_IMMUTABLE_FL`: no guest can change, rename or delete the path.
    Immutable,
}

impl Marker {
    /// Every marker, in [`Marker::code`] order.
    pub const ALL: [Marker; 3] = [Marker::Private, Marker::Cow, Marker::Immutable];

    /// The marker's name as written in rules: `private`, `cow` or `immutable`.
    pub fn as_str(self) -> &'static str {
        match self {
            Marker::Private => "private",
            Marker::Cow => "cow",
            Marker::Immutable => "immutable",
        }
    }

    /// The marker's stable integer code for the index database: 0 private, 1 cow, 2 immutable.
    pub fn code(self) -> i64 {
        match self {
            Marker::Private => 0,
            Marker::Cow => 1,
            Marker::Immutable => 2,
        }
    }

    /// The marker whose [`Marker::code`] is `code`, or `None` for an unknown code.
    pub fn from_code(code: i64) -> Option<Marker> {
        match code {
            0 => Some(Marker::Private),
            1 => Some(Marker::Cow),
            2 => Some(Marker::Immutable),
            _ => None,
        }
    }
}

impl fmt::Display for Marker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Marker {
    type Err = PolicyError;

    /// Parses `private`, `cow` or `immutable` (lowercase, exactly).
    fn from_str(s: &str) -> Result<Marker, PolicyError> {
        Marker::ALL
            .into_iter()
            .find(|m| m.as_str() == s)
            .ok_or_else(|| PolicyError::UnknownMarker { text: s.to_owned() })
    }
}

/// Errors of the marker policy. Every message is one self-contained line (it includes the
/// underlying I/O or TOML error), so these errors have no `source()` chain.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    /// A marker name other than `private`, `cow` or `immutable`.
    #[error("unknown marker {text:?} (expected private, cow or immutable)")]
    UnknownMarker {
        /// The text that is not a marker.
        text: String,
    },

    /// A rule that is not `"<marker> <glob>"` with a valid guest-absolute glob.
    #[error("invalid rule {text:?}{}: {reason}", rule_context(.path, .line))]
    InvalidRule {
        /// The rule as written.
        text: String,
        /// What is wrong with it and what was expected.
        reason: String,
        /// The file the rule comes from, when known (see [`PolicyError::in_file`]).
        path: Option<PathBuf>,
        /// The 1-based line of the rule in `path`, when known.
        line: Option<usize>,
    },

    /// A policy file that cannot be read.
    #[error("cannot read policy file {}: {error}{}", .path.display(), read_hint(.error))]
    ReadPolicy {
        /// The policy file.
        path: PathBuf,
        /// The I/O error (`ErrorKind::NotFound` for a missing file).
        error: io::Error,
    },

    /// A policy file that is not valid TOML or has the wrong shape.
    #[error("invalid policy file {}: {message}", .path.display())]
    ParsePolicy {
        /// The policy file.
        path: PathBuf,
        /// Where (line and column) and what is wrong.
        message: String,
    },

    /// A real I/O error while reading a guest's dpkg conffiles lists.
    #[error("cannot read the guest's dpkg conffiles list {}: {error}", .path.display())]
    ReadConffiles {
        /// The guest-absolute path (`/var/lib/dpkg/info/<pkg>.conffiles` or the directory).
        path: PathBuf,
        /// The I/O error.
        error: io::Error,
    },
}

impl PolicyError {
    /// Attaches the file a rule came from to an [`PolicyError::InvalidRule`] that has none yet
    /// (e.g. after [`PolicyFile::parse_rules`] on the `[policy]` table of a `guest.toml`); any
    /// other error is returned unchanged.
    #[must_use]
    pub fn in_file(self, file: &Path) -> PolicyError {
        match self {
            PolicyError::InvalidRule {
                text,
                reason,
                path: None,
                line,
            } => PolicyError::InvalidRule {
                text,
                reason,
                path: Some(file.to_owned()),
                line,
            },
            other => other,
        }
    }
}

fn rule_context(path: &Option<PathBuf>, line: &Option<usize>) -> String {
    match (path, line) {
        (Some(path), Some(line)) => format!(" in {} (line {line})", path.display()),
        (Some(path), None) => format!(" in {}", path.display()),
        (None, Some(line)) => format!(" (line {line})"),
        (None, None) => String::new(),
    }
}

fn read_hint(error: &io::Error) -> &'static str {
    if error.kind() == io::ErrorKind::NotFound {
        " (run `cowherd init` to write the default policy)"
    } else {
        ""
    }
}

/// One policy rule: files whose guest-absolute path matches `glob` get `marker`.
///
/// Written `"<marker> <glob>"`, e.g. `"private /etc/**"`. The glob is guest-absolute (starts
/// with `/`) and matched against raw path bytes: `*` and `?` stay within one path component,
/// `**` as a whole component crosses components, `{a,b}` are alternatives, `[a-z]` classes, and
/// `\` escapes the next character. `/etc/**` matches every path *below* `/etc` (`/etc/x`,
/// `/etc/x/y`) but not `/etc` itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    /// The marker of matching files.
    pub marker: Marker,
    /// The glob, guest-absolute (starts with `/`).
    pub glob: String,
}

const RULE_FORM: &str = "a rule is \"<marker> <glob>\", e.g. \"private /etc/**\"";

impl FromStr for Rule {
    type Err = PolicyError;

    /// Parses `"<marker> <glob>"`: spaces and tabs around the rule are ignored, and any run of
    /// them separates the marker from the glob. The glob is the rest of the text (it may contain
    /// inner spaces; write a trailing space as `\ `), must start with `/` and must compile.
    fn from_str(s: &str) -> Result<Rule, PolicyError> {
        let invalid = |reason: String| PolicyError::InvalidRule {
            text: s.to_owned(),
            reason,
            path: None,
            line: None,
        };
        let blank = [' ', '\t'];
        let text = trim_unescaped_end(s.trim_start_matches(blank));
        if text.is_empty() {
            return Err(invalid(format!("empty rule; {RULE_FORM}")));
        }
        let (word, glob) = match text.find(blank) {
            Some(i) => (&text[..i], text[i..].trim_start_matches(blank)),
            None => (text, ""),
        };
        let marker = match word.parse::<Marker>() {
            Ok(marker) => marker,
            Err(e) if word.starts_with('/') => {
                return Err(invalid(format!("{e}; the marker comes first: {RULE_FORM}")));
            }
            Err(e) => return Err(invalid(e.to_string())),
        };
        if glob.is_empty() {
            return Err(invalid(format!(
                "missing glob after \"{marker}\"; {RULE_FORM}"
            )));
        }
        build_glob(glob).map_err(invalid)?;
        Ok(Rule {
            marker,
            glob: glob.to_owned(),
        })
    }
}

impl fmt::Display for Rule {
    /// Writes `"<marker> <glob>"`, which parses back to the same rule.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.marker, self.glob)
    }
}

/// `text` without its trailing spaces and tabs, except one escaped by a backslash (`\ `, the
/// way a glob ends in a blank): it belongs to the glob.
fn trim_unescaped_end(text: &str) -> &str {
    let trimmed = text.trim_end_matches([' ', '\t']);
    let backslashes = trimmed.bytes().rev().take_while(|&b| b == b'\\').count();
    if backslashes % 2 == 1 && trimmed.len() < text.len() {
        &text[..=trimmed.len()]
    } else {
        trimmed
    }
}

/// Compiles one rule glob, or says what is wrong with it.
fn build_glob(glob: &str) -> Result<Glob, String> {
    if !glob.starts_with('/') {
        return Err(format!(
            "glob {glob:?} is not guest-absolute: it must start with '/' (e.g. \"/etc/**\")"
        ));
    }
    GlobBuilder::new(glob)
        .literal_separator(true)
        .backslash_escape(true)
        .build()
        .map_err(|e| {
            let why = e.kind().to_string();
            let why = why.split_whitespace().collect::<Vec<_>>().join(" ");
            format!("bad glob syntax in {glob:?}: {why}")
        })
}

/// The serde form of `$ROOT/policy.toml` and of the `[policy]` table in a guest's `guest.toml`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyFile {
    /// The rules, `"<marker> <glob>"`, first match wins (see [`Rule`]).
    #[serde(default)]
    pub rules: Vec<String>,
    /// Whether the files listed in the guest's `/var/lib/dpkg/info/*.conffiles` are private.
    /// `None` when not written: a guest's `[policy]` then inherits `$ROOT/policy.toml`'s value,
    /// and when that is unset too, conffiles are private (the safe choice).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dpkg_conffiles: Option<bool>,
}

impl PolicyFile {
    /// Parses [`PolicyFile::rules`], in order.
    ///
    /// # Errors
    ///
    /// [`PolicyError::InvalidRule`] for the first rule that does not parse, without a file;
    /// add it with [`PolicyError::in_file`].
    pub fn parse_rules(&self) -> Result<Vec<Rule>, PolicyError> {
        self.rules.iter().map(|r| r.parse()).collect()
    }
}

/// The default `$ROOT/policy.toml`, written by `cowherd init`.
pub const DEFAULT_POLICY_TOML: &str = r#"# cowherd marker policy: the default rules for every guest. Written by `cowherd init`;
# yours to edit.
#
# Each regular file of a guest gets one marker, chosen by the first rule whose glob matches
# its guest-absolute path (e.g. /usr/bin/ls):
#   private    never shared
#   cow        one shared inode; a guest's write copies up into its own upper layer
#   immutable  one shared inode with FS_IMMUTABLE_FL: no guest can change, rename or delete it
# A path that no rule matches is cow. The rules in the [policy] table of a guest's guest.toml
# are tried before these.
#
# A rule is "<marker> <glob>". Globs are guest-absolute: `*` and `?` stay within one path
# component, `**` crosses components, `{a,b}` alternatives, `[a-z]` classes, `\` escapes.
# "/etc/**" matches every path below /etc.
rules = [
  "private /etc/**",
  "private /var/**",
  "private /home/**",
  "private /root/**",
  "private /tmp/**",
  "private /run/**",
  "private /dev/**",
  "private /proc/**",
  "private /sys/**",
  # "immutable /usr/lib/modules/**",
]

# Treat every file listed in the guest's /var/lib/dpkg/info/*.conffiles as private, whatever
# the rules say: the package manager rewrites conffiles.
dpkg_conffiles = true
"#;

/// [`PolicyFile`] with the span of each rule, to report the line of a bad rule.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SpannedPolicyFile {
    #[serde(default)]
    rules: Vec<toml::Spanned<String>>,
    #[serde(default)]
    dpkg_conffiles: Option<bool>,
}

/// 1-based line and column of byte offset `at` in `text`.
fn line_column(text: &str, at: usize) -> (usize, usize) {
    let before = &text.as_bytes()[..at.min(text.len())];
    let line = before.iter().filter(|&&b| b == b'\n').count() + 1;
    let line_start = before
        .iter()
        .rposition(|&b| b == b'\n')
        .map_or(0, |i| i + 1);
    let column = String::from_utf8_lossy(&before[line_start..])
        .chars()
        .count()
        + 1;
    (line, column)
}

/// Reads and parses a policy file (`$ROOT/policy.toml`), checking every rule.
///
/// # Errors
///
/// - [`PolicyError::ReadPolicy`] if the file cannot be read, including when it does not exist
///   (`error.kind()` is then `NotFound`; the caller decides whether that is fatal);
/// - [`PolicyError::ParsePolicy`] if it is not TOML of the [`PolicyFile`] shape (the message
///   names the line and column);
/// - [`PolicyError::InvalidRule`] (with the path and line) for the first rule that does not
///   parse.
pub fn load_policy_file(path: &Path) -> Result<PolicyFile, PolicyError> {
    let text = std::fs::read_to_string(path).map_err(|error| PolicyError::ReadPolicy {
        path: path.to_owned(),
        error,
    })?;
    let raw: SpannedPolicyFile = toml::from_str(&text).map_err(|e| {
        let message = e.message().split_whitespace().collect::<Vec<_>>().join(" ");
        let message = match e.span() {
            Some(span) => {
                let (line, column) = line_column(&text, span.start);
                // The line itself names the key, which a type error does not.
                match text.lines().nth(line - 1).map(str::trim) {
                    Some(shown) if !shown.is_empty() && shown.chars().count() <= 80 => {
                        format!("line {line}, column {column} (`{shown}`): {message}")
                    }
                    _ => format!("line {line}, column {column}: {message}"),
                }
            }
            None => message,
        };
        PolicyError::ParsePolicy {
            path: path.to_owned(),
            message,
        }
    })?;
    for rule in &raw.rules {
        if let Err(e) = rule.get_ref().parse::<Rule>() {
            let line = line_column(&text, rule.span().start).0;
            return Err(match e.in_file(path) {
                PolicyError::InvalidRule {
                    text,
                    reason,
                    path,
                    line: _,
                } => PolicyError::InvalidRule {
                    text,
                    reason,
                    path,
                    line: Some(line),
                },
                other => other,
            });
        }
    }
    Ok(PolicyFile {
        rules: raw
            .rules
            .into_iter()
            .map(toml::Spanned::into_inner)
            .collect(),
        dpkg_conffiles: raw.dpkg_conffiles,
    })
}

thread_local! {
    /// Reused buffer for [`GlobSet::matches_candidate_into`], so matching does not allocate.
    static MATCHES: RefCell<Vec<usize>> = const { RefCell::new(Vec::new()) };
}

/// The compiled marker policy of one guest.
///
/// [`Policy::marker_for`] decides in this order:
/// 1. a path in the guest's dpkg conffiles set is [`Marker::Private`], whatever the rules say
///    (the package manager rewrites conffiles in place, so they must never be shared);
/// 2. otherwise the first rule whose glob matches decides, the guest's rules tried before the
///    default ones;
/// 3. otherwise [`Marker::Cow`].
#[derive(Clone)]
pub struct Policy {
    /// Guest rules, then default rules; glob `i` of `set` is `rules[i].glob`.
    rules: Vec<Rule>,
    set: GlobSet,
    conffiles: HashSet<Vec<u8>>,
}

impl fmt::Debug for Policy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Policy")
            .field("rules", &self.rules)
            .field("conffiles", &self.conffiles.len())
            .finish_non_exhaustive()
    }
}

impl Policy {
    /// Compiles the guest's rules (tried first), the default rules and the guest's dpkg
    /// conffiles (guest-absolute paths, e.g. from [`read_dpkg_conffiles`]; pass an empty set when
    /// `dpkg_conffiles` is off).
    ///
    /// # Errors
    ///
    /// [`PolicyError::InvalidRule`] for the first rule whose glob is not guest-absolute or does
    /// not compile.
    pub fn compile(
        guest: &[Rule],
        default: &[Rule],
        dpkg_conffiles: HashSet<Vec<u8>>,
    ) -> Result<Policy, PolicyError> {
        let rules: Vec<Rule> = guest.iter().chain(default).cloned().collect();
        let mut builder = GlobSetBuilder::new();
        for rule in &rules {
            let glob = build_glob(&rule.glob).map_err(|reason| PolicyError::InvalidRule {
                text: rule.to_string(),
                reason,
                path: None,
                line: None,
            })?;
            builder.add(glob);
        }
        let set = builder.build().map_err(|e| PolicyError::InvalidRule {
            text: rules
                .iter()
                .map(Rule::to_string)
                .collect::<Vec<_>>()
                .join(", "),
            reason: format!("the rules do not compile together: {}", e.kind()),
            path: None,
            line: None,
        })?;
        Ok(Policy {
            rules,
            set,
            conffiles: dpkg_conffiles,
        })
    }

    /// The marker of the regular file at `guest_abs_path` (raw bytes, e.g. `b"/usr/bin/ls"`; need
    /// not be UTF-8). See [`Policy`] for the order of precedence. Does not allocate (after the
    /// first call on a thread).
    pub fn marker_for(&self, guest_abs_path: &[u8]) -> Marker {
        if self.conffiles.contains(guest_abs_path) {
            return Marker::Private;
        }
        if self.set.is_empty() {
            return Marker::Cow;
        }
        let candidate = Candidate::from_bytes(guest_abs_path);
        let first = MATCHES.with_borrow_mut(|matches| {
            self.set.matches_candidate_into(&candidate, matches);
            matches.iter().copied().min()
        });
        first.map_or(Marker::Cow, |i| self.rules[i].marker)
    }
}

/// Parses one `/var/lib/dpkg/info/<pkg>.conffiles` file: one conffile per line, an absolute
/// path, which newer dpkg may prefix with flags (`remove-on-upgrade /etc/foo`).
///
/// Trailing `\r`, spaces and tabs and leading spaces and tabs are stripped; blank lines and lines
/// that are not an absolute path after the flags (words of letters, digits and `-`) are skipped.
/// Every returned path starts with `/`.
pub fn parse_conffiles(text: &[u8]) -> Vec<Vec<u8>> {
    let is_blank = |b: &u8| matches!(b, b' ' | b'\t');
    let mut paths = Vec::new();
    'lines: for line in text.split(|&b| b == b'\n') {
        let end = line
            .iter()
            .rposition(|b| !matches!(b, b'\r' | b' ' | b'\t'));
        let Some(end) = end else { continue };
        let mut rest = &line[..=end];
        loop {
            let start = rest.iter().position(|b| !is_blank(b)).unwrap_or(rest.len());
            rest = &rest[start..];
            if rest.first() == Some(&b'/') {
                paths.push(rest.to_vec());
                continue 'lines;
            }
            let flag_len = rest.iter().position(is_blank).unwrap_or(rest.len());
            let flag = &rest[..flag_len];
            if flag.is_empty() || flag_len == rest.len() {
                continue 'lines;
            }
            if !flag.iter().all(|b| b.is_ascii_alphanumeric() || *b == b'-') {
                continue 'lines;
            }
            rest = &rest[flag_len..];
        }
    }
    paths
}

/// Where dpkg keeps its per-package lists, relative to a guest's base.
const DPKG_INFO: &str = "var/lib/dpkg/info";
/// The largest `.conffiles` file read (real ones are a few KiB).
const MAX_CONFFILES_LEN: u64 = 16 << 20;

/// `openat2(dir, path)` that stays beneath `dir` and follows no symlink at all.
fn open_beneath<P: ?Sized + nix::NixPath>(
    dir: BorrowedFd<'_>,
    path: &P,
    flags: OFlag,
) -> nix::Result<OwnedFd> {
    let how = OpenHow::new()
        .flags(flags | OFlag::O_CLOEXEC | OFlag::O_NOFOLLOW)
        .resolve(
            ResolveFlag::RESOLVE_BENEATH
                | ResolveFlag::RESOLVE_NO_SYMLINKS
                | ResolveFlag::RESOLVE_NO_MAGICLINKS,
        );
    // EAGAIN: a concurrent rename or mount somewhere on the system; the kernel asks to retry.
    let mut tries = 0;
    loop {
        match openat2(dir, path, how) {
            Err(Errno::EAGAIN) if tries < 64 => tries += 1,
            result => return result,
        }
    }
}

/// Errors that mean "not there, or reached through a symlink or outside the base".
fn absent_or_escaping(e: Errno) -> bool {
    matches!(
        e,
        Errno::ENOENT | Errno::ENOTDIR | Errno::ELOOP | Errno::EXDEV
    )
}

fn conffiles_error(name: Option<&CStr>, error: impl Into<io::Error>) -> PolicyError {
    let mut path = format!("/{DPKG_INFO}").into_bytes();
    if let Some(name) = name {
        path.push(b'/');
        path.extend_from_slice(name.to_bytes());
    }
    PolicyError::ReadConffiles {
        path: PathBuf::from(OsString::from_vec(path)),
        error: error.into(),
    }
}

/// Reads every `*.conffiles` file in `var/lib/dpkg/info` of a guest whose base directory is
/// `base`, and returns the union of the conffiles they list ([`parse_conffiles`]).
///
/// The guest tree is untrusted, so every open is `openat2` relative to `base` with
/// `RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS` and `O_NOFOLLOW`: a
/// `var/lib/dpkg/info` that is missing, not a directory, or reached through any symlink gives
/// an empty set, and a `*.conffiles` entry that is a symlink or not a regular file is skipped
/// (special files are never opened in a blocking way).
///
/// # Errors
///
/// [`PolicyError::ReadConffiles`], naming the guest-absolute path, for a real I/O error
/// (permission, I/O error, out of descriptors, a kernel without `openat2`) or a `.conffiles`
/// file larger than 16 MiB.
pub fn read_dpkg_conffiles(base: BorrowedFd<'_>) -> Result<HashSet<Vec<u8>>, PolicyError> {
    let mut conffiles = HashSet::new();
    let dir_fd = match open_beneath(base, DPKG_INFO, OFlag::O_RDONLY | OFlag::O_DIRECTORY) {
        Ok(fd) => fd,
        Err(e) if absent_or_escaping(e) => return Ok(conffiles),
        Err(e) => return Err(conffiles_error(None, e)),
    };
    let mut dir = Dir::from_fd(dir_fd).map_err(|e| conffiles_error(None, e))?;
    let mut names: Vec<CString> = Vec::new();
    for entry in dir.iter() {
        let entry = entry.map_err(|e| conffiles_error(None, e))?;
        let name = entry.file_name();
        let wanted = name.to_bytes().ends_with(b".conffiles")
            && matches!(entry.file_type(), Some(Type::File) | None);
        if wanted {
            names.push(name.to_owned());
        }
    }
    for name in names {
        let flags = OFlag::O_RDONLY | OFlag::O_NONBLOCK | OFlag::O_NOCTTY;
        let fd = match open_beneath(dir.as_fd(), name.as_c_str(), flags) {
            Ok(fd) => fd,
            // Removed since the listing, a symlink, or a socket.
            Err(e) if absent_or_escaping(e) || e == Errno::ENXIO => continue,
            Err(e) => return Err(conffiles_error(Some(&name), e)),
        };
        let file = File::from(fd);
        let meta = file
            .metadata()
            .map_err(|e| conffiles_error(Some(&name), e))?;
        if !meta.file_type().is_file() {
            continue;
        }
        let mut text = Vec::new();
        file.take(MAX_CONFFILES_LEN + 1)
            .read_to_end(&mut text)
            .map_err(|e| conffiles_error(Some(&name), e))?;
        if text.len() as u64 > MAX_CONFFILES_LEN {
            let error = io::Error::new(
                io::ErrorKind::InvalidData,
                "larger than 16 MiB, not a dpkg conffiles list; remove or fix it",
            );
            return Err(conffiles_error(Some(&name), error));
        }
        conffiles.extend(parse_conffiles(&text));
    }
    Ok(conffiles)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::os::unix::fs::symlink;

    fn rules(texts: &[&str]) -> Vec<Rule> {
        texts.iter().map(|t| t.parse().unwrap()).collect()
    }

    fn default_rules() -> Vec<Rule> {
        let file: PolicyFile = toml::from_str(DEFAULT_POLICY_TOML).unwrap();
        file.parse_rules().unwrap()
    }

    fn default_policy() -> Policy {
        Policy::compile(&[], &default_rules(), HashSet::new()).unwrap()
    }

    fn rule_error(text: &str) -> String {
        text.parse::<Rule>().unwrap_err().to_string()
    }

    #[test]
    fn policy_default_toml_parses_and_enables_dpkg_conffiles() {
        let file: PolicyFile = toml::from_str(DEFAULT_POLICY_TOML).unwrap();
        assert_eq!(file.dpkg_conffiles, Some(true));
        assert_eq!(file.rules.len(), 9);
        assert!(default_rules().iter().all(|r| r.marker == Marker::Private));
    }

    #[test]
    fn policy_default_makes_system_state_private_and_the_rest_cow() {
        let policy = default_policy();
        for path in [
            "/etc/passwd",
            "/var/lib/x",
            "/home/u/.bashrc",
            "/root/.profile",
            "/tmp/x",
        ] {
            assert_eq!(
                policy.marker_for(path.as_bytes()),
                Marker::Private,
                "{path}"
            );
        }
        for path in [
            "/run/x",
            "/dev/null",
            "/proc/1/stat",
            "/sys/kernel/x",
            "/etc/ssl/certs/a",
        ] {
            assert_eq!(
                policy.marker_for(path.as_bytes()),
                Marker::Private,
                "{path}"
            );
        }
        for path in [
            "/usr/bin/ls",
            "/etcfoo",
            "/etc",
            "/lib/x.so",
            "/varnish/x",
            "/opt/a/b",
        ] {
            assert_eq!(policy.marker_for(path.as_bytes()), Marker::Cow, "{path}");
        }
    }

    #[test]
    fn policy_double_star_matches_direct_children_and_deeper_but_not_the_dir_itself() {
        let policy = Policy::compile(&rules(&["private /etc/**"]), &[], HashSet::new()).unwrap();
        assert_eq!(policy.marker_for(b"/etc/x"), Marker::Private);
        assert_eq!(policy.marker_for(b"/etc/x/y"), Marker::Private);
        assert_eq!(policy.marker_for(b"/etc"), Marker::Cow);
    }

    #[test]
    fn policy_first_match_wins_guest_rules_before_default() {
        let guest = rules(&["cow /etc/ssl/**", "immutable /usr/lib/modules/**"]);
        let policy = Policy::compile(&guest, &default_rules(), HashSet::new()).unwrap();
        assert_eq!(policy.marker_for(b"/etc/ssl/certs/x"), Marker::Cow);
        assert_eq!(policy.marker_for(b"/etc/passwd"), Marker::Private);
        assert_eq!(
            policy.marker_for(b"/usr/lib/modules/6.1/vmlinuz"),
            Marker::Immutable
        );
        assert_eq!(policy.marker_for(b"/usr/lib/x"), Marker::Cow);
    }

    #[test]
    fn policy_first_match_wins_within_one_list() {
        let policy = Policy::compile(
            &[],
            &rules(&["immutable /usr/bin/*", "private /usr/**", "cow /**"]),
            HashSet::new(),
        )
        .unwrap();
        assert_eq!(policy.marker_for(b"/usr/bin/ls"), Marker::Immutable);
        assert_eq!(policy.marker_for(b"/usr/share/x"), Marker::Private);
        assert_eq!(policy.marker_for(b"/opt/x"), Marker::Cow);
    }

    #[test]
    fn policy_single_star_stays_in_one_component_and_double_star_crosses() {
        let policy = Policy::compile(
            &rules(&[
                "immutable /usr/bin/*",
                "private /srv/**/*.key",
                "private /a?c",
            ]),
            &[],
            HashSet::new(),
        )
        .unwrap();
        assert_eq!(policy.marker_for(b"/usr/bin/ls"), Marker::Immutable);
        assert_eq!(policy.marker_for(b"/usr/bin/sub/ls"), Marker::Cow);
        assert_eq!(policy.marker_for(b"/srv/a.key"), Marker::Private);
        assert_eq!(policy.marker_for(b"/srv/x/y/a.key"), Marker::Private);
        assert_eq!(policy.marker_for(b"/srv/x/a.pem"), Marker::Cow);
        assert_eq!(policy.marker_for(b"/abc"), Marker::Private);
        assert_eq!(policy.marker_for(b"/a/c"), Marker::Cow);
    }

    #[test]
    fn policy_matches_non_utf8_path_bytes() {
        let policy = Policy::compile(&rules(&["immutable /usr/**"]), &[], HashSet::new()).unwrap();
        assert_eq!(
            policy.marker_for(b"/usr/share/caf\xe9/\xff\xfe"),
            Marker::Immutable
        );
        assert_eq!(policy.marker_for(b"/\xffusr/x"), Marker::Cow);
    }

    #[test]
    fn policy_without_rules_is_all_cow() {
        let policy = Policy::compile(&[], &[], HashSet::new()).unwrap();
        assert_eq!(policy.marker_for(b"/etc/passwd"), Marker::Cow);
    }

    #[test]
    fn policy_conffiles_are_private_even_when_a_cow_rule_matches() {
        let conffiles: HashSet<Vec<u8>> = [
            b"/etc/ssl/openssl.cnf".to_vec(),
            b"/usr/share/x.conf".to_vec(),
        ]
        .into();
        let guest = rules(&["cow /etc/ssl/**", "immutable /usr/**"]);
        let policy = Policy::compile(&guest, &default_rules(), conffiles).unwrap();
        assert_eq!(policy.marker_for(b"/etc/ssl/openssl.cnf"), Marker::Private);
        assert_eq!(policy.marker_for(b"/usr/share/x.conf"), Marker::Private);
        assert_eq!(policy.marker_for(b"/etc/ssl/other.cnf"), Marker::Cow);
        assert_eq!(policy.marker_for(b"/usr/share/y.conf"), Marker::Immutable);
    }

    #[test]
    fn policy_marker_codes_names_and_serde_agree() {
        for m in Marker::ALL {
            assert_eq!(Marker::from_code(m.code()), Some(m));
            assert_eq!(m.as_str().parse::<Marker>().unwrap(), m);
            assert_eq!(m.to_string(), m.as_str());
        }
        assert_eq!(Marker::from_code(3), None);
        assert_eq!(Marker::from_code(-1), None);
        assert_eq!(
            [
                Marker::Private.code(),
                Marker::Cow.code(),
                Marker::Immutable.code()
            ],
            [0, 1, 2]
        );
        #[derive(Deserialize)]
        struct M {
            m: Marker,
        }
        assert_eq!(
            toml::from_str::<M>("m = \"immutable\"").unwrap().m,
            Marker::Immutable
        );
        assert!(toml::from_str::<M>("m = \"Immutable\"").is_err());
    }

    #[test]
    fn policy_rule_parses_with_any_blank_run_and_inner_spaces() {
        let rule: Rule = " \tprivate \t  /home/my file/**\t ".parse().unwrap();
        assert_eq!(
            rule,
            Rule {
                marker: Marker::Private,
                glob: "/home/my file/**".into()
            }
        );
        assert_eq!(rule.to_string(), "private /home/my file/**");
    }

    #[test]
    fn policy_rule_error_unknown_marker() {
        assert_eq!(
            rule_error("privat /etc/**"),
            r#"invalid rule "privat /etc/**": unknown marker "privat" (expected private, cow or immutable)"#
        );
        let swapped = rule_error("/etc/** private");
        assert!(swapped.contains("the marker comes first"), "{swapped}");
        assert_eq!(
            "Cow".parse::<Marker>().unwrap_err().to_string(),
            r#"unknown marker "Cow" (expected private, cow or immutable)"#
        );
    }

    #[test]
    fn policy_rule_error_missing_glob() {
        assert_eq!(
            rule_error("private"),
            r#"invalid rule "private": missing glob after "private"; a rule is "<marker> <glob>", e.g. "private /etc/**""#
        );
        assert!(
            rule_error("  ").contains("empty rule"),
            "{}",
            rule_error("  ")
        );
    }

    #[test]
    fn policy_rule_error_relative_glob() {
        assert_eq!(
            rule_error("private etc/**"),
            r#"invalid rule "private etc/**": glob "etc/**" is not guest-absolute: it must start with '/' (e.g. "/etc/**")"#
        );
        assert!(rule_error("cow **/x").contains("must start with '/'"));
    }

    #[test]
    fn policy_rule_error_bad_glob_syntax() {
        assert_eq!(
            rule_error("private /etc/[ab"),
            r#"invalid rule "private /etc/[ab": bad glob syntax in "/etc/[ab": unclosed character class; missing ']'"#
        );
        assert!(rule_error("cow /usr/{a,b").contains("unclosed alternate group"));
        assert!(rule_error("cow /usr/x\\").contains("dangling"));
        for text in ["cow /etc/[ab", "cow /usr/{a,b"] {
            assert!(!rule_error(text).contains('\n'));
        }
    }

    #[test]
    fn policy_compile_rejects_a_bad_rule_built_by_hand() {
        let bad = Rule {
            marker: Marker::Cow,
            glob: "usr/**".into(),
        };
        let err = Policy::compile(&[bad], &[], HashSet::new())
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with(r#"invalid rule "cow usr/**": glob "usr/**""#),
            "{err}"
        );
    }

    #[test]
    fn policy_load_file_reports_path_line_and_reason() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("policy.toml");

        std::fs::write(&path, DEFAULT_POLICY_TOML).unwrap();
        let file = load_policy_file(&path).unwrap();
        assert_eq!(
            file,
            toml::from_str::<PolicyFile>(DEFAULT_POLICY_TOML).unwrap()
        );

        std::fs::write(
            &path,
            "rules = [\n  \"cow /usr/**\",\n  \"privat /etc/**\",\n]\n",
        )
        .unwrap();
        let err = load_policy_file(&path).unwrap_err().to_string();
        assert_eq!(
            err,
            format!(
                r#"invalid rule "privat /etc/**" in {} (line 3): unknown marker "privat" (expected private, cow or immutable)"#,
                path.display()
            )
        );

        std::fs::write(&path, "rules = []\nrule = [\"cow /**\"]\n").unwrap();
        let err = load_policy_file(&path).unwrap_err().to_string();
        assert!(
            err.starts_with(&format!("invalid policy file {}: line 2", path.display())),
            "{err}"
        );
        assert!(
            err.contains("unknown field `rule`") && !err.contains('\n'),
            "{err}"
        );

        std::fs::write(&path, "rules = [\"cow /**\"\n").unwrap();
        let err = load_policy_file(&path).unwrap_err().to_string();
        assert!(
            err.starts_with(&format!("invalid policy file {}: line ", path.display())),
            "{err}"
        );
        assert!(!err.contains('\n'), "{err}");

        std::fs::write(&path, "dpkg_conffiles = \"yes\"\n").unwrap();
        let err = load_policy_file(&path).unwrap_err().to_string();
        assert!(err.contains("line 1"), "{err}");

        let missing = dir.path().join("nope.toml");
        let err = load_policy_file(&missing).unwrap_err();
        assert!(
            matches!(&err, PolicyError::ReadPolicy { error, .. } if error.kind() == io::ErrorKind::NotFound)
        );
        let msg = err.to_string();
        assert!(
            msg.contains(&missing.display().to_string()) && msg.contains("cowherd init"),
            "{msg}"
        );
    }

    #[test]
    fn policy_error_in_file_adds_the_path_to_rule_errors() {
        let file = PolicyFile {
            rules: vec!["cow".into()],
            dpkg_conffiles: None,
        };
        let err = file
            .parse_rules()
            .unwrap_err()
            .in_file(Path::new("/g/guest.toml"));
        assert!(
            err.to_string()
                .starts_with(r#"invalid rule "cow" in /g/guest.toml: missing glob"#)
        );
    }

    #[test]
    fn policy_file_round_trips_through_toml() {
        let file = PolicyFile {
            rules: vec!["private /etc/**".into()],
            dpkg_conffiles: None,
        };
        let text = toml::to_string(&file).unwrap();
        assert_eq!(toml::from_str::<PolicyFile>(&text).unwrap(), file);
        assert_eq!(
            toml::from_str::<PolicyFile>("").unwrap(),
            PolicyFile::default()
        );
    }

    #[test]
    fn policy_parse_conffiles_handles_flags_blanks_and_junk() {
        let text = b"/etc/a.conf\r\n\n   \nremove-on-upgrade /etc/b.conf  \n\
                     relative/path\nnot/a-flag /etc/c\n/etc/with space\n\t/etc/d\nflag\n";
        let got = parse_conffiles(text);
        let want: Vec<&[u8]> = vec![
            b"/etc/a.conf",
            b"/etc/b.conf",
            b"/etc/with space",
            b"/etc/d",
        ];
        assert_eq!(got, want);
    }

    fn base_with_info() -> (tempfile::TempDir, PathBuf) {
        let base = tempfile::tempdir().unwrap();
        let info = base.path().join(DPKG_INFO);
        std::fs::create_dir_all(&info).unwrap();
        (base, info)
    }

    fn read(base: &Path) -> Result<HashSet<Vec<u8>>, PolicyError> {
        let dir = File::open(base).unwrap();
        read_dpkg_conffiles(dir.as_fd())
    }

    #[test]
    fn policy_read_dpkg_conffiles_reads_every_conffiles_file() {
        let (base, info) = base_with_info();
        std::fs::write(
            info.join("base-files.conffiles"),
            "/etc/issue\n/etc/os-release\n",
        )
        .unwrap();
        std::fs::write(
            info.join("ssh.conffiles"),
            "remove-on-upgrade /etc/ssh/old\n/etc/ssh/x\n",
        )
        .unwrap();
        std::fs::write(info.join("ssh.list"), "/usr/bin/ssh\n").unwrap();
        std::fs::create_dir(info.join("dir.conffiles")).unwrap();
        nix::unistd::mkfifo(&info.join("fifo.conffiles"), nix::sys::stat::Mode::S_IRWXU).unwrap();
        let got = read(base.path()).unwrap();
        let want: HashSet<Vec<u8>> = [
            "/etc/issue",
            "/etc/os-release",
            "/etc/ssh/old",
            "/etc/ssh/x",
        ]
        .iter()
        .map(|p| p.as_bytes().to_vec())
        .collect();
        assert_eq!(got, want);
    }

    #[test]
    fn policy_read_dpkg_conffiles_is_empty_without_the_directory() {
        let base = tempfile::tempdir().unwrap();
        assert!(read(base.path()).unwrap().is_empty());
        std::fs::create_dir_all(base.path().join("var/lib")).unwrap();
        std::fs::write(base.path().join("var/lib/dpkg"), "a file, not a dir").unwrap();
        assert!(read(base.path()).unwrap().is_empty());
    }

    fn outside_with_conffiles() -> tempfile::TempDir {
        let outside = tempfile::tempdir().unwrap();
        std::fs::write(outside.path().join("evil.conffiles"), "/etc/outside\n").unwrap();
        outside
    }

    fn assert_no_outside(result: Result<HashSet<Vec<u8>>, PolicyError>) {
        if let Ok(set) = result {
            assert!(
                !set.contains(&b"/etc/outside"[..]),
                "followed a symlink out of the base"
            );
        }
    }

    #[test]
    fn policy_read_dpkg_conffiles_does_not_follow_a_symlinked_info_dir() {
        let outside = outside_with_conffiles();
        let base = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(base.path().join("var/lib/dpkg")).unwrap();
        symlink(outside.path(), base.path().join(DPKG_INFO)).unwrap();
        assert_no_outside(read(base.path()));
        assert!(read(base.path()).unwrap().is_empty());

        // A relative symlink climbing out of the base, higher up the path.
        let base = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(base.path().join("var/lib")).unwrap();
        let depth = base.path().join("var/lib").components().count() - 1;
        let up = Path::new(&"../".repeat(depth)).join(outside.path().strip_prefix("/").unwrap());
        std::fs::create_dir_all(outside.path().join("info")).unwrap();
        std::fs::write(outside.path().join("info/evil.conffiles"), "/etc/outside\n").unwrap();
        symlink(&up, base.path().join("var/lib/dpkg")).unwrap();
        assert!(
            base.path().join(DPKG_INFO).join("evil.conffiles").exists(),
            "test setup"
        );
        assert_no_outside(read(base.path()));
    }

    #[test]
    fn policy_read_dpkg_conffiles_does_not_follow_a_symlinked_conffiles_file() {
        let outside = outside_with_conffiles();
        let (base, info) = base_with_info();
        std::fs::write(info.join("ok.conffiles"), "/etc/ok\n").unwrap();
        symlink(
            outside.path().join("evil.conffiles"),
            info.join("evil.conffiles"),
        )
        .unwrap();
        std::fs::write(info.join("target"), "/etc/inside-target\n").unwrap();
        symlink("target", info.join("rel.conffiles")).unwrap();
        let got = read(base.path()).unwrap();
        assert_eq!(got, [b"/etc/ok".to_vec()].into());
    }

    fn glob_component() -> impl Strategy<Value = String> {
        prop_oneof![
            "[a-zA-Z0-9._-]{1,10}",
            Just("*".to_owned()),
            Just("**".to_owned()),
            "[a-z]{0,3}[*?][a-z]{0,3}",
            "[a-z]{1,3}[ ][a-z]{1,3}",
            "\\{[a-z]{1,3},[a-z]{1,3}\\}",
            "\\[[a-z]-[z]\\][a-z]{0,2}",
        ]
    }

    fn glob_safe_path() -> impl Strategy<Value = String> {
        prop::collection::vec(glob_component(), 0..6).prop_map(|c| format!("/{}", c.join("/")))
    }

    fn absolute_path() -> impl Strategy<Value = Vec<u8>> {
        (
            prop::collection::vec(prop::collection::vec(any::<u8>(), 1..8), 1..4),
            prop::collection::vec(
                any::<u8>().prop_filter("not blank or newline", |b| {
                    !matches!(b, b'\n' | b'\r' | b' ' | b'\t')
                }),
                0..2,
            ),
        )
            .prop_map(|(components, tail)| {
                let mut path = Vec::new();
                for c in components {
                    path.push(b'/');
                    path.extend(c.into_iter().filter(|b| *b != b'\n'));
                }
                path.extend(tail);
                while matches!(path.last(), Some(b'\r' | b' ' | b'\t')) {
                    path.pop();
                }
                path
            })
    }

    #[derive(Debug, Clone)]
    enum Line {
        Path(Vec<u8>),
        Flagged(String, Vec<u8>),
        Junk(Vec<u8>),
    }

    fn line() -> impl Strategy<Value = Line> {
        prop_oneof![
            absolute_path().prop_map(Line::Path),
            ("[a-z][a-z0-9-]{0,16}", absolute_path()).prop_map(|(f, p)| Line::Flagged(f, p)),
            prop::collection::vec(
                any::<u8>().prop_filter("no newline", |b| *b != b'\n'),
                0..20
            )
            .prop_map(Line::Junk),
        ]
    }

    proptest! {
        #[test]
        fn policy_rule_display_parse_round_trips(
            marker in prop::sample::select(Marker::ALL.to_vec()),
            glob in glob_safe_path(),
            lead in "[ \t]{0,2}",
            sep in "[ \t]{1,4}",
            trail in "[ \t]{0,2}",
        ) {
            let rule = Rule { marker, glob: glob.clone() };
            prop_assert_eq!(rule.to_string().parse::<Rule>().unwrap(), rule.clone());
            let spaced = format!("{lead}{marker}{sep}{glob}{trail}");
            prop_assert_eq!(spaced.parse::<Rule>().unwrap(), rule);
        }

        #[test]
        fn policy_parse_conffiles_never_panics_and_returns_absolute_paths(
            text in prop::collection::vec(any::<u8>(), 0..512),
        ) {
            for path in parse_conffiles(&text) {
                prop_assert!(path.starts_with(b"/"));
                prop_assert!(!path.contains(&b'\n'));
                prop_assert!(!matches!(path.last(), Some(b'\r' | b' ' | b'\t')));
            }
        }

        #[test]
        fn policy_parse_conffiles_keeps_every_absolute_line(
            lines in prop::collection::vec(line(), 0..20),
            crlf in any::<bool>(),
        ) {
            let mut text = Vec::new();
            let mut want = Vec::new();
            for line in &lines {
                match line {
                    Line::Path(p) => {
                        text.extend_from_slice(p);
                        want.push(p.clone());
                    }
                    Line::Flagged(flag, p) => {
                        text.extend_from_slice(flag.as_bytes());
                        text.push(b' ');
                        text.extend_from_slice(p);
                        want.push(p.clone());
                    }
                    Line::Junk(j) => text.extend_from_slice(j),
                }
                text.extend_from_slice(if crlf { b"\r\n" } else { b"\n" });
            }
            let got = parse_conffiles(&text);
            prop_assert!(got.len() <= lines.len());
            for p in want {
                prop_assert!(got.contains(&p), "missing {:?} in {:?}", p, got);
            }
        }
    }
}
