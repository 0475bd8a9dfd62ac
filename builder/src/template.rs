//! Template definitions: how a template's tree is made (bootstrapped with mmdebstrap or
//! debootstrap, unpacked from a root filesystem archive, taken from a guest, or built on another
//! template), what is installed and run on top, and the marker policy of the guests made from
//! it. One TOML file per template, named after it; the schema is in `templates/README.md`.
//!
//! The definitions shipped in `templates/` are compiled in; an admin's own, in
//! `$ROOT/templates.d/*.toml`, replace them by name ([`TemplateSet::load`]). Every error names
//! the file, the line and column, and the key.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::{fs, io};

use cowherd_unify::{PolicyError, PolicyFile, validate_guest_name};
use serde::Deserialize;
use toml::de::{DeTable, DeValue};

/// The shipped definitions, by name (`templates/NAME.toml`).
const BUILTIN: &[(&str, &str)] = &[
    (
        "debian-bookworm-minbase",
        include_str!("../../templates/debian-bookworm-minbase.toml"),
    ),
    (
        "debian-bookworm-web",
        include_str!("../../templates/debian-bookworm-web.toml"),
    ),
    (
        "debian-bookworm-db",
        include_str!("../../templates/debian-bookworm-db.toml"),
    ),
    (
        "debian-trixie-minbase",
        include_str!("../../templates/debian-trixie-minbase.toml"),
    ),
    (
        "debian-trixie-web",
        include_str!("../../templates/debian-trixie-web.toml"),
    ),
    (
        "debian-trixie-db",
        include_str!("../../templates/debian-trixie-db.toml"),
    ),
];

/// The keys of a template file.
const KEYS: &[&str] = &[
    "description",
    "method",
    "suite",
    "variant",
    "arch",
    "mirror",
    "source",
    "guest",
    "from",
    "packages",
    "steps",
    "policy",
];

/// The keys of a template's `[policy]` table (those of [`PolicyFile`]).
const POLICY_KEYS: &[&str] = &["rules", "dpkg_conffiles"];

/// The values of `method`.
const METHODS: &[&str] = &["mmdebstrap", "debootstrap", "tarball", "guest"];

/// The keys that choose the base; a template built `from` another takes its base from there.
const BASE_KEYS: &[&str] = &[
    "method", "suite", "variant", "arch", "mirror", "source", "guest",
];

/// What a template or guest name may be (the rule of [`validate_guest_name`]).
const NAME_RULE: &str = "1-64 characters of a-z A-Z 0-9 . _ - not starting with . or -";

/// The `variant` of a bootstrapped template that does not name one.
const DEFAULT_VARIANT: &str = "minbase";

/// One template: where its tree comes from and what is added on top.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Template {
    /// The template's name: its file's stem.
    pub name: String,
    /// What the template is for, in a line.
    pub description: Option<String>,
    /// Where the tree comes from.
    pub base: Base,
    /// Packages installed on top of the base (after a parent's, for [`Base::From`]).
    pub packages: Vec<String>,
    /// Shell commands run inside the tree, in order, after the packages are installed (after
    /// a parent's, for [`Base::From`]).
    pub steps: Vec<String>,
    /// Marker policy for the template's files and the guests built from it, as written
    /// (`None` without a `[policy]` table); every rule parses.
    pub policy: Option<PolicyFile>,
    /// Where the definition comes from.
    pub origin: TemplateOrigin,
}

/// Where a template's tree comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Base {
    /// A Debian-family system bootstrapped from a package mirror.
    Bootstrap {
        /// The program that bootstraps it.
        method: Bootstrapper,
        /// The distribution release, e.g. `bookworm`.
        suite: String,
        /// The package selection, e.g. `minbase` (the default).
        variant: String,
        /// The architecture; `None` for the host's.
        arch: Option<String>,
        /// The mirror; `None` for the bootstrapper's own default.
        mirror: Option<String>,
    },
    /// A root filesystem archive, of any distribution.
    Tarball {
        /// The archive's absolute path.
        source: PathBuf,
    },
    /// An existing guest's tree.
    Guest {
        /// The guest's name.
        guest: String,
    },
    /// Another template's tree ([`TemplateSet::chain`] resolves it).
    From {
        /// The parent template's name.
        template: String,
    },
}

/// The program that bootstraps a [`Base::Bootstrap`] tree.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Bootstrapper {
    /// `mmdebstrap` (the default; a build falls back to debootstrap when it is not installed).
    Mmdebstrap,
    /// `debootstrap`.
    Debootstrap,
}

impl Bootstrapper {
    /// The program's name, as written in `method`.
    pub fn program(self) -> &'static str {
        match self {
            Bootstrapper::Mmdebstrap => "mmdebstrap",
            Bootstrapper::Debootstrap => "debootstrap",
        }
    }
}

/// Where a template's definition comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TemplateOrigin {
    /// Shipped in `templates/` and compiled into the binary.
    Builtin,
    /// A file, e.g. `$ROOT/templates.d/NAME.toml`.
    File(PathBuf),
}

impl TemplateOrigin {
    /// The path errors name: the file, or `<built-in>/NAME.toml`.
    fn file(&self, name: &str) -> PathBuf {
        match self {
            TemplateOrigin::Builtin => PathBuf::from(format!("<built-in>/{name}.toml")),
            TemplateOrigin::File(path) => path.clone(),
        }
    }
}

/// A place in a template file, shown as `FILE:LINE:COLUMN`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Location {
    /// The file (`<built-in>/NAME.toml` for a shipped definition).
    pub file: PathBuf,
    /// The 1-based line.
    pub line: usize,
    /// The 1-based column, in characters.
    pub column: usize,
}

impl Location {
    /// The location of byte offset `at` of `text`, the contents of `file`.
    fn new(file: &Path, text: &str, at: usize) -> Location {
        let before = &text.as_bytes()[..at.min(text.len())];
        let line_start = before
            .iter()
            .rposition(|&b| b == b'\n')
            .map_or(0, |i| i + 1);
        Location {
            file: file.to_owned(),
            line: before.iter().filter(|&&b| b == b'\n').count() + 1,
            column: String::from_utf8_lossy(&before[line_start..])
                .chars()
                .count()
                + 1,
        }
    }
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{}", self.file.display(), self.line, self.column)
    }
}

/// What can be wrong with template definitions. Every message is one line that names the file
/// (with line and column where there is one) and says what to do.
#[derive(Debug, thiserror::Error)]
pub enum TemplateError {
    /// A template file or the `templates.d` directory cannot be read.
    #[error("cannot read {}: {error}", .path.display())]
    Read {
        /// The file or directory.
        path: PathBuf,
        /// The I/O error (shown in the message, so not chained as a source).
        error: io::Error,
    },
    /// A template file's stem is not a valid template name.
    #[error("{}: invalid template name {name:?}: rename the file to {NAME_RULE}", .path.display())]
    BadName {
        /// The file.
        path: PathBuf,
        /// The name it would give.
        name: String,
    },
    /// A definition that is not valid TOML, has an unknown key, or a bad or missing value.
    #[error("{at}: {message}")]
    Invalid {
        /// Where.
        at: Location,
        /// What is wrong, naming the key, and what is expected.
        message: String,
    },
    /// No template has this name.
    #[error("no template named {name:?} (see `cowherd template list`)")]
    Unknown {
        /// The name asked for.
        name: String,
    },
    /// A template builds `from` a template that does not exist.
    #[error(
        "{at}: key \"from\": no template named {:?} (chain: {}); fix the name or add {0}.toml \
         to $ROOT/templates.d",
        .chain.last().map_or("", String::as_str),
        .chain.join(" -> ")
    )]
    UnknownParent {
        /// The `from` key naming the missing template.
        at: Location,
        /// The templates from the one asked for up to the missing one, which is last.
        chain: Vec<String>,
    },
    /// Templates build `from` each other in a cycle.
    #[error(
        "{at}: key \"from\": templates build on each other in a cycle: {}; remove one `from`",
        .chain.join(" -> ")
    )]
    Cycle {
        /// The `from` key that closes the cycle.
        at: Location,
        /// The templates from the one asked for round the cycle: the last is named earlier.
        chain: Vec<String>,
    },
}

/// A parsed definition and where its `from` key is (the start of the file when it has none).
#[derive(Clone, Debug)]
struct Entry {
    template: Template,
    from_at: Location,
}

/// The templates a host knows: the built-in ones, replaced by name by `$ROOT/templates.d`'s.
/// Every template's [`chain`](TemplateSet::chain) resolves.
#[derive(Clone, Debug)]
pub struct TemplateSet {
    templates: BTreeMap<String, Entry>,
}

impl TemplateSet {
    /// The built-in templates, shipped in `templates/`.
    ///
    /// # Errors
    /// None in practice (the shipped definitions are tested): a [`TemplateError::Invalid`],
    /// [`TemplateError::UnknownParent`] or [`TemplateError::Cycle`] for a broken built-in.
    pub fn builtin() -> Result<TemplateSet, TemplateError> {
        let mut set = TemplateSet {
            templates: BTreeMap::new(),
        };
        for (name, text) in BUILTIN {
            set.insert(parse(name, text, TemplateOrigin::Builtin)?);
        }
        set.check()?;
        Ok(set)
    }

    /// The built-in templates and those of `dir` (`$ROOT/templates.d`): every `NAME.toml` file
    /// there defines template `NAME`, replacing a built-in one of that name. Hidden files and
    /// files not ending in `.toml` are ignored; a missing `dir` holds no templates.
    ///
    /// # Errors
    /// [`TemplateError::Read`] if `dir` or one of its files cannot be read;
    /// [`TemplateError::BadName`] for a file whose stem is not a valid name;
    /// [`TemplateError::Invalid`] for a bad definition; [`TemplateError::UnknownParent`] or
    /// [`TemplateError::Cycle`] if a template's chain does not resolve.
    pub fn load(dir: &Path) -> Result<TemplateSet, TemplateError> {
        let mut set = TemplateSet::builtin()?;
        let read_error = |error| TemplateError::Read {
            path: dir.to_owned(),
            error,
        };
        let entries = match fs::read_dir(dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(set),
            Err(e) => return Err(read_error(e)),
        };
        let mut paths = Vec::new();
        for entry in entries {
            let path = entry.map_err(read_error)?.path();
            let hidden = path
                .file_name()
                .is_some_and(|name| name.as_encoded_bytes().starts_with(b"."));
            if path.extension().is_some_and(|ext| ext == "toml") && !hidden {
                paths.push(path);
            }
        }
        paths.sort();
        for path in paths {
            set.insert(read_file(&path)?);
        }
        set.check()?;
        Ok(set)
    }

    /// The template named `name`.
    ///
    /// # Errors
    /// [`TemplateError::Unknown`].
    pub fn get(&self, name: &str) -> Result<&Template, TemplateError> {
        self.entry(name).map(|entry| &entry.template)
    }

    /// Every template, by name.
    pub fn all(&self) -> impl Iterator<Item = &Template> {
        self.templates.values().map(|entry| &entry.template)
    }

    /// The template named `name` and the templates it builds on, root first: the first one's
    /// base is not [`Base::From`], each next one builds `from` the one before, and the last is
    /// `name`'s.
    ///
    /// # Errors
    /// [`TemplateError::Unknown`] for an unknown `name`; [`TemplateError::UnknownParent`] or
    /// [`TemplateError::Cycle`] (naming the chain) if the chain does not resolve, which
    /// cannot happen in a set made by [`load`](TemplateSet::load).
    pub fn chain(&self, name: &str) -> Result<Vec<&Template>, TemplateError> {
        let mut entry = self.entry(name)?;
        let mut chain = vec![&entry.template];
        while let Base::From { template: parent } = &entry.template.base {
            let names = || {
                chain
                    .iter()
                    .map(|t| t.name.clone())
                    .chain([parent.clone()])
                    .collect()
            };
            let at = entry.from_at.clone();
            if chain.iter().any(|t| &t.name == parent) {
                return Err(TemplateError::Cycle { at, chain: names() });
            }
            entry = self
                .templates
                .get(parent)
                .ok_or_else(|| TemplateError::UnknownParent { at, chain: names() })?;
            chain.push(&entry.template);
        }
        chain.reverse();
        Ok(chain)
    }

    /// Checks the template file at `path` (for `cowherd template check FILE`): it must parse,
    /// and its chain must resolve in this set with the file in place of its namesake.
    ///
    /// # Errors
    /// As [`load`](TemplateSet::load), for this file.
    pub fn check_file(&self, path: &Path) -> Result<Template, TemplateError> {
        let entry = read_file(path)?;
        let template = entry.template.clone();
        let mut set = self.clone();
        set.insert(entry);
        set.chain(&template.name)?;
        Ok(template)
    }

    fn entry(&self, name: &str) -> Result<&Entry, TemplateError> {
        self.templates
            .get(name)
            .ok_or_else(|| TemplateError::Unknown {
                name: name.to_owned(),
            })
    }

    fn insert(&mut self, entry: Entry) {
        self.templates.insert(entry.template.name.clone(), entry);
    }

    /// Resolves every template's chain.
    fn check(&self) -> Result<(), TemplateError> {
        self.templates
            .keys()
            .try_for_each(|name| self.chain(name).map(drop))
    }
}

/// Parses the definition `text` of template `name` (the file's stem). A `from` parent is not
/// looked up: [`TemplateSet::chain`] does that.
///
/// # Errors
/// [`TemplateError::BadName`] for an invalid `name`; [`TemplateError::Invalid`] for text that
/// is not TOML, an unknown key, a value of the wrong type, a bad value, a missing required key,
/// or a key not allowed with the others.
pub fn parse_template(
    name: &str,
    text: &str,
    origin: TemplateOrigin,
) -> Result<Template, TemplateError> {
    parse(name, text, origin).map(|entry| entry.template)
}

/// Reads and parses the template file at `path`, named after its stem.
fn read_file(path: &Path) -> Result<Entry, TemplateError> {
    let bad_name = || TemplateError::BadName {
        path: path.to_owned(),
        name: path
            .file_stem()
            .unwrap_or_default()
            .to_string_lossy()
            .into_owned(),
    };
    let name = path
        .file_stem()
        .and_then(|s| s.to_str())
        .ok_or_else(bad_name)?;
    let text = fs::read_to_string(path).map_err(|error| TemplateError::Read {
        path: path.to_owned(),
        error,
    })?;
    parse(name, &text, TemplateOrigin::File(path.to_owned()))
}

/// Whether `name` is a valid template name: the rule of guest names.
pub(crate) fn valid_name(name: &str) -> bool {
    validate_guest_name(name).is_ok()
}

/// The serde form of a template file; [`parse`] checks the values.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTemplate {
    description: Option<String>,
    method: Option<String>,
    suite: Option<String>,
    variant: Option<String>,
    arch: Option<String>,
    mirror: Option<String>,
    source: Option<String>,
    guest: Option<String>,
    from: Option<String>,
    #[serde(default)]
    packages: Vec<String>,
    #[serde(default)]
    steps: Vec<String>,
    policy: Option<PolicyFile>,
}

fn parse(name: &str, text: &str, origin: TemplateOrigin) -> Result<Entry, TemplateError> {
    let file = origin.file(name);
    if !valid_name(name) {
        return Err(TemplateError::BadName {
            path: file,
            name: name.to_owned(),
        });
    }
    let (table, errors) = DeTable::parse_recoverable(text);
    let doc = Doc {
        file: &file,
        text,
        table: table.into_inner(),
    };
    if let Some(error) = errors.first() {
        return Err(doc.toml_error(error, true));
    }
    let raw: RawTemplate = toml::from_str(text).map_err(|e| doc.toml_error(&e, false))?;
    let base = doc.base(&raw)?;
    for (i, package) in raw.packages.iter().enumerate() {
        if !is_package_spec(package) {
            return Err(doc.item_error(
                "packages",
                i,
                format!(
                    "{package:?} is not a package: write one Debian package name per string \
                     (a-z 0-9 + . -, starting with a letter or digit), optionally with \
                     :ARCH, =VERSION or /RELEASE"
                ),
            ));
        }
    }
    if let Some(i) = raw.steps.iter().position(|s| s.trim().is_empty()) {
        return Err(doc.item_error(
            "steps",
            i,
            "empty step: write a shell command or remove it".to_owned(),
        ));
    }
    if let Some(policy) = &raw.policy
        && let Err(e) = policy.parse_rules()
    {
        let i = match &e {
            PolicyError::InvalidRule { text, .. } => policy.rules.iter().position(|r| r == text),
            _ => None,
        };
        return Err(doc.item_error("policy.rules", i.unwrap_or(0), e.to_string()));
    }
    Ok(Entry {
        from_at: doc.at(doc.key_offset("from").unwrap_or(0)),
        template: Template {
            name: name.to_owned(),
            description: raw.description,
            base,
            packages: raw.packages,
            steps: raw.steps,
            policy: raw.policy,
            origin,
        },
    })
}

/// A template file being parsed: its text and its parsed table, to name places and keys.
struct Doc<'a> {
    file: &'a Path,
    text: &'a str,
    table: DeTable<'a>,
}

impl Doc<'_> {
    fn at(&self, offset: usize) -> Location {
        Location::new(self.file, self.text, offset)
    }

    fn error(&self, offset: usize, message: String) -> TemplateError {
        TemplateError::Invalid {
            at: self.at(offset),
            message,
        }
    }

    /// The offset of top-level `key`, if the file has it.
    fn key_offset(&self, key: &str) -> Option<usize> {
        self.table
            .iter()
            .find(|(k, _)| k.get_ref() == key)
            .map(|(k, _)| k.span().start)
    }

    /// An error about top-level `key` (at the start of the file if it is missing).
    fn key_error(&self, key: &str, message: String) -> TemplateError {
        let offset = self.key_offset(key).unwrap_or(0);
        self.error(offset, format!("key {key:?}: {message}"))
    }

    /// An error about item `index` of the array at the dotted `key` (at the key if not found).
    fn item_error(&self, key: &str, index: usize, message: String) -> TemplateError {
        let mut table = &self.table;
        let mut found = None;
        for part in key.split('.') {
            found = table.iter().find(|(k, _)| k.get_ref() == part);
            match found.map(|(_, v)| v.get_ref()) {
                Some(DeValue::Table(inner)) => table = inner,
                _ => break,
            }
        }
        let offset = found.map_or(0, |(k, v)| match v.get_ref() {
            DeValue::Array(items) => items.get(index).map_or(k.span().start, |i| i.span().start),
            _ => k.span().start,
        });
        self.error(offset, format!("key {key:?}: {message}"))
    }

    /// A TOML syntax error (`syntax`) or serde error, with the key at its place named; a key
    /// that the schema lacks fails serde as an unknown key.
    fn toml_error(&self, error: &toml::de::Error, syntax: bool) -> TemplateError {
        let message = error
            .message()
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(" ")
            // TOML's words for serde's.
            .replace("expected a sequence", "expected an array")
            .replace("expected struct PolicyFile", "expected a table");
        let offset = error.span().map_or(0, |span| span.start);
        let mut path = key_at(&self.table, offset);
        if path.is_empty() {
            // A key the table does not hold, such as a duplicate one: its text.
            let token = error.span().and_then(|span| self.text.get(span));
            path.extend(token.filter(|t| {
                !t.is_empty()
                    && t.bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b"_-".contains(&b))
            }));
        }
        let message = match unknown_key(&path) {
            Some((key, expected)) if !syntax => format!(
                "unknown key {key:?} (expected one of: {})",
                expected.join(", ")
            ),
            _ if path.concat().is_empty() => message,
            _ => format!("key {:?}: {message}", path.join(".")),
        };
        self.error(offset, message)
    }

    /// The first (in the file) of `keys` that the file has, and its offset.
    fn first_of(&self, keys: &[&'static str]) -> Option<&'static str> {
        keys.iter()
            .filter_map(|&key| Some((self.key_offset(key)?, key)))
            .min()
            .map(|(_, key)| key)
    }

    /// Checks the keys that choose the base, and makes it.
    fn base(&self, raw: &RawTemplate) -> Result<Base, TemplateError> {
        if let Some(parent) = &raw.from {
            if !valid_name(parent) {
                let message = format!("invalid template name {parent:?}: use {NAME_RULE}");
                return Err(self.key_error("from", message));
            }
            if let Some(key) = self.first_of(BASE_KEYS) {
                let message = format!(
                    "not allowed with `from`: the base comes from template {parent:?}; \
                     remove {key:?} or `from`"
                );
                return Err(self.key_error(key, message));
            }
            return Ok(Base::From {
                template: parent.clone(),
            });
        }
        let method = raw.method.as_deref().unwrap_or("mmdebstrap");
        let not_with = |keys: &[&'static str]| match self.first_of(keys) {
            Some(key) => {
                let message = format!("not allowed with method {method:?}; remove it");
                Err(self.key_error(key, message))
            }
            None => Ok(()),
        };
        let missing = |key: &str, what: &str| {
            let offset = self.key_offset("method").unwrap_or(0);
            let message = format!("missing key {key:?}: method {method:?} needs {what}");
            self.error(offset, message)
        };
        match method {
            "mmdebstrap" | "debootstrap" => {
                not_with(&["source", "guest"])?;
                let suite = raw.suite.clone().ok_or_else(|| {
                    missing(
                        "suite",
                        "the release to bootstrap, e.g. suite = \"bookworm\" (or build on \
                         another template: from = \"NAME\")",
                    )
                })?;
                self.word("suite", &suite, false)?;
                let variant = raw.variant.as_deref().unwrap_or(DEFAULT_VARIANT);
                self.word("variant", variant, true)?;
                if let Some(arch) = &raw.arch {
                    self.word("arch", arch, false)?;
                }
                if let Some(mirror) = &raw.mirror
                    && !is_mirror(mirror)
                {
                    let message = "give one mirror URL (e.g. file:///srv/mirror) or absolute \
                                   path, without spaces, or remove the key for the \
                                   bootstrapper's default";
                    return Err(self.key_error("mirror", message.to_owned()));
                }
                let method = if method == "debootstrap" {
                    Bootstrapper::Debootstrap
                } else {
                    Bootstrapper::Mmdebstrap
                };
                Ok(Base::Bootstrap {
                    method,
                    suite,
                    variant: variant.to_owned(),
                    arch: raw.arch.clone(),
                    mirror: raw.mirror.clone(),
                })
            }
            "tarball" => {
                not_with(&["suite", "variant", "arch", "mirror", "guest"])?;
                let source = raw.source.as_deref().ok_or_else(|| {
                    let example = "e.g. source = \"/srv/images/rootfs.tar.xz\"";
                    missing("source", &format!("the root filesystem archive, {example}"))
                })?;
                if !source.starts_with('/') {
                    let message = format!(
                        "{source:?} is not an absolute path: give the archive's absolute path"
                    );
                    return Err(self.key_error("source", message));
                }
                Ok(Base::Tarball {
                    source: source.into(),
                })
            }
            "guest" => {
                not_with(&["suite", "variant", "arch", "mirror", "source"])?;
                let guest = raw.guest.clone().ok_or_else(|| {
                    missing("guest", "the guest to derive from, e.g. guest = \"web01\"")
                })?;
                if validate_guest_name(&guest).is_err() {
                    let message = format!("invalid guest name {guest:?}: use {NAME_RULE}");
                    return Err(self.key_error("guest", message));
                }
                Ok(Base::Guest { guest })
            }
            other => {
                let message = format!(
                    "unknown method {other:?} (expected one of: {})",
                    METHODS.join(", ")
                );
                Err(self.key_error("method", message))
            }
        }
    }

    /// Checks that `value` of `key` is one word of `[A-Za-z0-9._+-]`, not starting with `-`
    /// unless `dash` (it would be taken for an option).
    fn word(&self, key: &str, value: &str, dash: bool) -> Result<(), TemplateError> {
        let ok = !value.is_empty()
            && (dash || !value.starts_with('-'))
            && value
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._+-".contains(&b));
        if ok {
            return Ok(());
        }
        let rule = if dash { "" } else { ", not starting with -" };
        let message = format!("invalid value {value:?}: use one word of a-z A-Z 0-9 . _ + -{rule}");
        Err(self.key_error(key, message))
    }
}

/// A package as apt takes it: a Debian package name (`[a-z0-9][a-z0-9+.-]+`), optionally
/// followed by `:ARCH`, then optionally by `=VERSION` or `/RELEASE`. Nothing else, so that no
/// entry can be read as an option or a shell word.
fn is_package_spec(spec: &str) -> bool {
    let (rest, pin) = match spec.find(['=', '/']) {
        Some(at) => (&spec[..at], Some(&spec[at..])),
        None => (spec, None),
    };
    let (name, arch) = match rest.split_once(':') {
        Some((name, arch)) => (name, Some(arch)),
        None => (rest, None),
    };
    let name_ok = name.len() >= 2
        && name.starts_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"+.-".contains(&b));
    let arch_ok = arch.is_none_or(|a| {
        !a.is_empty()
            && a.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    });
    let pin_ok = pin.is_none_or(|p| {
        let value = &p[1..];
        let extra: &[u8] = if p.starts_with('=') {
            b".+~:-"
        } else {
            b".+~-"
        };
        value.starts_with(|c: char| c.is_ascii_alphanumeric())
            && value
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || extra.contains(&b))
    });
    name_ok && arch_ok && pin_ok
}

/// A mirror as the bootstrappers take it: `scheme://…` or an absolute path, one word.
fn is_mirror(mirror: &str) -> bool {
    let scheme_ok = mirror.split_once("://").is_some_and(|(scheme, _)| {
        scheme.starts_with(|c: char| c.is_ascii_alphabetic())
            && scheme
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"+.-".contains(&b))
    });
    (scheme_ok || mirror.starts_with('/'))
        && !mirror.contains(|c: char| c.is_whitespace() || c.is_control())
}

/// The dotted path of the key whose name or value holds byte `offset`, innermost table first;
/// empty if none does.
fn key_at<'a>(table: &'a DeTable<'_>, offset: usize) -> Vec<&'a str> {
    let holds = |span: std::ops::Range<usize>| {
        span.start <= offset && offset < span.end.max(span.start + 1)
    };
    for (key, value) in table.iter() {
        if holds(key.span()) {
            return vec![key.get_ref()];
        }
        if let DeValue::Table(inner) = value.get_ref() {
            let mut path = key_at(inner, offset);
            if !path.is_empty() {
                path.insert(0, key.get_ref());
                return path;
            }
        }
        if holds(value.span()) {
            return vec![key.get_ref()];
        }
    }
    Vec::new()
}

/// The first key of `path` that its table does not allow, as a dotted path, and the keys it
/// allows.
fn unknown_key(path: &[&str]) -> Option<(String, &'static [&'static str])> {
    let mut allowed = KEYS;
    for (i, key) in path.iter().enumerate() {
        if !allowed.contains(key) {
            return Some((path[..=i].join("."), allowed));
        }
        allowed = match *key {
            "policy" => POLICY_KEYS,
            _ => return None,
        };
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const FILE: &str = "templates.d/web.toml";

    fn parse_web(text: &str) -> Result<Template, TemplateError> {
        parse_template("web", text, TemplateOrigin::File(FILE.into()))
    }

    /// Asserts that `text` is refused with a message at `FILE:place` that names `key`.
    #[track_caller]
    fn assert_refused(text: &str, place: &str, key: &str) -> String {
        let message = parse_web(text).unwrap_err().to_string();
        assert!(
            message.starts_with(&format!("{FILE}:{place}: ")),
            "{message:?} is not at {place}"
        );
        assert!(
            message.contains(&format!("key \"{key}\"")),
            "{message:?} names no {key}"
        );
        assert!(!message.contains('\n'), "{message:?} is not one line");
        message
    }

    fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let path = dir.join(name);
        fs::write(&path, text).unwrap();
        path
    }

    #[test]
    fn template_builtins_parse_and_their_chains_resolve() {
        let set = TemplateSet::builtin().unwrap();
        assert_eq!(set.all().count(), BUILTIN.len());
        for (name, text) in BUILTIN {
            assert!(!text.contains("://"), "{name} names a mirror");
            let chain = set.chain(name).unwrap();
            assert!(matches!(chain[0].base, Base::Bootstrap { .. }), "{name}");
            assert_eq!(chain.last().unwrap().name, *name);
            assert!(chain.iter().all(|t| t.origin == TemplateOrigin::Builtin));
        }
        let minbase = set.get("debian-trixie-minbase").unwrap();
        assert_eq!(
            minbase.base,
            Base::Bootstrap {
                method: Bootstrapper::Mmdebstrap,
                suite: "trixie".into(),
                variant: "minbase".into(),
                arch: None,
                mirror: None,
            }
        );
        let web = set.chain("debian-bookworm-web").unwrap();
        assert_eq!(
            web.iter().map(|t| t.name.as_str()).collect::<Vec<_>>(),
            ["debian-bookworm-minbase", "debian-bookworm-web"]
        );
        assert_eq!(web[1].packages, ["nginx", "openssh-server"]);
        assert_eq!(
            set.get("debian-trixie-db").unwrap().packages,
            ["postgresql"]
        );
        assert!(matches!(
            set.get("nope"),
            Err(TemplateError::Unknown { name }) if name == "nope"
        ));
    }

    #[test]
    fn template_dir_overrides_builtins_by_name_and_adds_its_own() {
        let dir = tempfile::tempdir().unwrap();
        let minbase = write(
            dir.path(),
            "debian-bookworm-minbase.toml",
            "method = \"debootstrap\"\nsuite = \"bookworm\"\nmirror = \"file:///srv/mirror\"\n",
        );
        let mine = write(
            dir.path(),
            "mine.toml",
            "from = \"debian-bookworm-web\"\nsteps = [\"echo hi > /etc/motd\"]\n",
        );
        write(dir.path(), ".hidden.toml", "not = toml = at all");
        write(dir.path(), "notes.txt", "not = toml = at all");
        let set = TemplateSet::load(dir.path()).unwrap();
        assert_eq!(set.all().count(), BUILTIN.len() + 1);
        let chain = set.chain("mine").unwrap();
        assert_eq!(
            chain.iter().map(|t| &t.origin).collect::<Vec<_>>(),
            [
                &TemplateOrigin::File(minbase),
                &TemplateOrigin::Builtin,
                &TemplateOrigin::File(mine)
            ]
        );
        assert!(matches!(
            &chain[0].base,
            Base::Bootstrap { method: Bootstrapper::Debootstrap, mirror: Some(m), .. }
                if m == "file:///srv/mirror"
        ));
        assert_eq!(chain[2].steps, ["echo hi > /etc/motd"]);

        let missing = TemplateSet::load(&dir.path().join("missing")).unwrap();
        assert_eq!(missing.all().count(), BUILTIN.len());
    }

    #[test]
    fn template_every_value_is_read() {
        let text = r#"
            description = "d"
            method = "debootstrap"
            suite = "bookworm"
            variant = "buildd"
            arch = "arm64"
            mirror = "http://127.0.0.1:9/debian"
            packages = ["aa", "b2=1.0"]
            steps = ["x", "y"]
            [policy]
            rules = ["private /srv/**"]
            dpkg_conffiles = false
        "#;
        let template = parse_web(text).unwrap();
        assert_eq!(
            template,
            Template {
                name: "web".into(),
                description: Some("d".into()),
                base: Base::Bootstrap {
                    method: Bootstrapper::Debootstrap,
                    suite: "bookworm".into(),
                    variant: "buildd".into(),
                    arch: Some("arm64".into()),
                    mirror: Some("http://127.0.0.1:9/debian".into()),
                },
                packages: vec!["aa".into(), "b2=1.0".into()],
                steps: vec!["x".into(), "y".into()],
                policy: Some(PolicyFile {
                    rules: vec!["private /srv/**".into()],
                    dpkg_conffiles: Some(false),
                }),
                origin: TemplateOrigin::File(FILE.into()),
            }
        );
        let tarball = parse_web("method = 'tarball'\nsource = '/srv/rootfs.tar.xz'").unwrap();
        assert_eq!(
            tarball.base,
            Base::Tarball {
                source: "/srv/rootfs.tar.xz".into()
            }
        );
        let guest = parse_web("method = 'guest'\nguest = 'web01'").unwrap();
        assert_eq!(
            guest.base,
            Base::Guest {
                guest: "web01".into()
            }
        );
    }

    #[test]
    fn template_unknown_keys_and_wrong_types_name_file_line_and_key() {
        let message = assert_refused(
            "description = \"x\"\nsuite = \"bookworm\"\n\npacakges = []\n",
            "4:1",
            "pacakges",
        );
        assert!(
            message.contains("unknown key \"pacakges\" (expected one of: description, method,"),
            "{message}"
        );
        let message = assert_refused("suite = 'x'\npackages = \"nginx\"\n", "2:12", "packages");
        assert!(message.contains("expected an array"), "{message}");
        assert_refused("suite = 'x'\npackages = ['a',\n  3]\n", "3:3", "packages");
        assert_refused("suite = 'x'\n[policy]\nbogus = 1\n", "3:1", "policy.bogus");
        assert_refused(
            "suite = 'x'\npolicy = { rulez = [] }\n",
            "2:12",
            "policy.rulez",
        );
        assert_refused(
            "suite = 'x'\n[policy]\ndpkg_conffiles = 'yes'\n",
            "3:18",
            "policy.dpkg_conffiles",
        );
        assert_refused("suite = 'x'\n[extra]\nkey = 1\n", "2:2", "extra");
        assert_refused("suite = 'x'\nsuite = 'y'\n", "2:1", "suite");
        assert_refused("suite = bookworm\n", "1:9", "suite");
        // Every key is one the parser knows (a wrong type, not an unknown key).
        for key in KEYS {
            let place = format!("2:{}", key.len() + 4);
            let message = assert_refused(&format!("\n{key} = 1\n"), &place, key);
            assert!(!message.contains("unknown key"), "{message}");
        }
    }

    #[test]
    fn template_bad_and_missing_values_name_file_line_and_key() {
        assert_refused("packages = []\n", "1:1", "suite");
        let message = assert_refused("\nmethod = \"debootstrap\"\n", "2:1", "suite");
        assert!(message.contains("missing key \"suite\""), "{message}");
        assert_refused("method = 'tarball'\n", "1:1", "source");
        assert_refused("method = 'guest'\n", "1:1", "guest");
        assert_refused("suite = ''\n", "1:1", "suite");
        assert_refused("suite = '-x'\n", "1:1", "suite");
        assert_refused("suite = 'a'\nvariant = 'min base'\n", "2:1", "variant");
        assert_refused("suite = 'a'\narch = ''\n", "2:1", "arch");
        assert_refused("suite = 'a'\nmirror = ' '\n", "2:1", "mirror");
        assert_refused("suite = 'a'\nsource = '/x.tar'\n", "2:1", "source");
        assert_refused("method = 'tarball'\nsource = 'x.tar'\n", "2:1", "source");
        assert_refused(
            "method = 'tarball'\nsource = '/x'\nsuite = 'a'\n",
            "3:1",
            "suite",
        );
        assert_refused("method = 'guest'\nguest = '.web'\n", "2:1", "guest");
        let message = assert_refused("\n\nmethod = 'rpmstrap'\n", "3:1", "method");
        assert!(
            message.contains("(expected one of: mmdebstrap, debootstrap"),
            "{message}"
        );
        assert_refused(
            "suite = 'a'\npackages = ['ok', 'two words']\n",
            "2:19",
            "packages",
        );
        assert_refused("suite = 'a'\npackages = ['--force']\n", "2:13", "packages");
        // Regression (review): nothing a package entry holds reaches a shell or an option.
        for bad in [
            "x",
            "nginx;id",
            "$(id)",
            "Nginx",
            "a b",
            "nginx=",
            "nginx=-1",
            "nginx/",
            "nginx:",
            "nginx:amd64=1:2/x",
            "nginx`id`",
            "nginx>2",
        ] {
            let text = format!("suite = 'a'\npackages = [{}]\n", toml_string(bad));
            assert_refused(&text, "2:13", "packages");
        }
        for good in [
            "nginx",
            "libc6:amd64",
            "g++",
            "python3.11",
            "nginx=1.22.1-9+deb12u1",
            "openssl=1:3.0~rc1",
            "nginx/bookworm-backports",
            "libc6:i386/bookworm",
        ] {
            let text = format!("suite = 'a'\npackages = [{}]\n", toml_string(good));
            parse_web(&text).unwrap_or_else(|e| panic!("{good}: {e}"));
        }
        for bad in ["-oDir=/x", "mirror", "", "http://a b", "ftp:/x", "://x"] {
            let text = format!("suite = 'a'\nmirror = {}\n", toml_string(bad));
            assert_refused(&text, "2:1", "mirror");
        }
        for good in [
            "http://127.0.0.1:9/debian",
            "file:///srv/mirror",
            "/srv/mirror",
        ] {
            let text = format!("suite = 'a'\nmirror = {}\n", toml_string(good));
            parse_web(&text).unwrap_or_else(|e| panic!("{good}: {e}"));
        }
        assert_refused("suite = 'a'\nsteps = ['ok',\n  ' ']\n", "3:3", "steps");
    }

    #[test]
    fn template_from_excludes_the_base_keys() {
        let message = assert_refused(
            "from = \"debian-bookworm-minbase\"\npackages = ['xz-utils']\nsuite = \"bookworm\"\n",
            "3:1",
            "suite",
        );
        assert!(message.contains("not allowed with `from`"), "{message}");
        assert_refused("method = 'mmdebstrap'\nfrom = 'a'\n", "1:1", "method");
        assert_refused(
            "mirror = 'file:///srv/mirror'\nfrom = 'a'\n",
            "1:1",
            "mirror",
        );
        assert_refused("\nfrom = 'not a name'\n", "2:1", "from");
        let template = parse_web("from = 'a'\npackages = ['xz-utils']\n").unwrap();
        assert_eq!(
            template.base,
            Base::From {
                template: "a".into()
            }
        );
    }

    #[test]
    fn template_bad_policy_rule_names_its_line() {
        let text = "suite = 'a'\n[policy]\nrules = [\n  \"private /etc/**\",\n  \"immutable usr/**\",\n]\n";
        let message = assert_refused(text, "5:3", "policy.rules");
        assert!(
            message.contains("invalid rule \"immutable usr/**\""),
            "{message}"
        );
        assert!(message.contains("guest-absolute"), "{message}");
        assert_refused(
            "suite = 'a'\npolicy.rules = ['shared /x']\n",
            "2:17",
            "policy.rules",
        );
    }

    #[test]
    fn template_bad_name_is_refused() {
        for name in ["", "-web", ".web", "we b", "a/b", &"x".repeat(65)] {
            let error =
                parse_template(name, "suite = 'a'", TemplateOrigin::File(FILE.into())).unwrap_err();
            assert!(matches!(&error, TemplateError::BadName { .. }), "{error}");
            assert!(
                error
                    .to_string()
                    .starts_with(&format!("{FILE}: invalid template name"))
            );
        }
        let dir = tempfile::tempdir().unwrap();
        let path = write(dir.path(), "-web.toml", "suite = 'a'\n");
        let message = TemplateSet::load(dir.path()).unwrap_err().to_string();
        assert!(
            message.starts_with(&format!("{}: ", path.display())),
            "{message}"
        );
    }

    #[test]
    fn template_unknown_parents_and_cycles_name_the_chain() {
        let dir = tempfile::tempdir().unwrap();
        let a = write(dir.path(), "a.toml", "description = 'a'\nfrom = 'b'\n");
        let b = write(dir.path(), "b.toml", "\n\nfrom = 'a'\n");
        let message = TemplateSet::load(dir.path()).unwrap_err().to_string();
        assert_eq!(
            message,
            format!(
                "{}:3:1: key \"from\": templates build on each other in a cycle: a -> b -> a; \
                 remove one `from`",
                b.display()
            )
        );

        write(dir.path(), "b.toml", "from = 'c'\n");
        write(dir.path(), "c.toml", "packages = []\nfrom = 'nope'\n");
        let message = TemplateSet::load(dir.path()).unwrap_err().to_string();
        let c = dir.path().join("c.toml");
        assert!(
            message.starts_with(&format!(
                "{}:2:1: key \"from\": no template named \"nope\" (chain: a -> b -> c -> nope)",
                c.display()
            )),
            "{message}"
        );

        write(dir.path(), "a.toml", "from = 'a'\n");
        fs::remove_file(&b).unwrap();
        fs::remove_file(&c).unwrap();
        let message = TemplateSet::load(dir.path()).unwrap_err().to_string();
        assert!(
            message.starts_with(&format!("{}:1:1: key \"from\"", a.display())),
            "{message}"
        );
        assert!(message.contains("cycle: a -> a"), "{message}");
    }

    #[test]
    fn template_check_file_checks_one_file_against_the_set() {
        let set = TemplateSet::builtin().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let good = write(
            dir.path(),
            "cache.toml",
            "# a cache\nfrom = \"debian-trixie-minbase\"\npackages = [\"varnish\"]\n",
        );
        let template = set.check_file(&good).unwrap();
        assert_eq!(template.name, "cache");
        assert_eq!(template.origin, TemplateOrigin::File(good));
        assert!(set.get("cache").is_err(), "the set is unchanged");

        let bad = write(
            dir.path(),
            "bad.toml",
            "suite = 'a'\n\npackages = 'varnish'\n",
        );
        let message = set.check_file(&bad).unwrap_err().to_string();
        assert!(
            message.starts_with(&format!("{}:3:12: key \"packages\"", bad.display())),
            "{message}"
        );
        let orphan = write(dir.path(), "orphan.toml", "from = 'debian-sid-minbase'\n");
        let message = set.check_file(&orphan).unwrap_err().to_string();
        assert!(
            message.contains("no template named \"debian-sid-minbase\""),
            "{message}"
        );
        // A file that replaces a built-in the others build on.
        let minbase = write(
            dir.path(),
            "debian-bookworm-minbase.toml",
            "from = 'debian-bookworm-web'\n",
        );
        let message = set.check_file(&minbase).unwrap_err().to_string();
        assert!(message.contains("cycle"), "{message}");
        let error = set.check_file(&dir.path().join("none.toml")).unwrap_err();
        assert!(matches!(error, TemplateError::Read { .. }), "{error}");
    }

    #[test]
    fn template_readme_examples_parse() {
        let readme = include_str!("../../templates/README.md");
        let set = TemplateSet::builtin().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let blocks: Vec<&str> = readme
            .split("```toml\n")
            .skip(1)
            .map(|block| block.split("```").next().unwrap())
            .collect();
        assert_eq!(blocks.len(), 2);
        for (i, block) in blocks.iter().enumerate() {
            let path = write(dir.path(), &format!("example{i}.toml"), block);
            set.check_file(&path).unwrap();
        }
    }

    fn toml_string(s: &str) -> String {
        toml::Value::String(s.to_owned()).to_string()
    }

    fn toml_list(items: &[String]) -> String {
        toml::Value::Array(items.iter().cloned().map(toml::Value::String).collect()).to_string()
    }

    const NAME: &str = "[a-zA-Z0-9_][a-zA-Z0-9._-]{0,20}";
    const WORD: &str = "[a-z0-9][a-z0-9.+-]{0,10}";
    const TEXT: &str = "[a-zA-Z0-9 \"'\\\\\n\t#=$;|{}\\[\\]é]{0,30}";
    const STEP: &str = "[a-z][a-zA-Z0-9 \"'\\\\\n\t#=$;|{}\\[\\]é]{0,30}";

    /// A base and the lines that write it.
    fn base() -> impl Strategy<Value = (Base, Vec<String>)> {
        let mirror = prop::sample::select(vec!["http://127.0.0.1:9/debian", "file:///srv/mirror"]);
        prop_oneof![
            (
                prop::option::of(any::<bool>()),
                WORD,
                prop::option::of(WORD),
                prop::option::of("[a-z0-9]{1,8}"),
                prop::option::of(mirror),
            )
                .prop_map(|(method, suite, variant, arch, mirror)| {
                    let mut lines = vec![format!("suite = {}", toml_string(&suite))];
                    let mut add = |key, value: &Option<String>| {
                        if let Some(value) = value {
                            lines.push(format!("{key} = {}", toml_string(value)));
                        }
                    };
                    add("variant", &variant);
                    add("arch", &arch);
                    add("mirror", &mirror.map(String::from));
                    let method = match method {
                        None => Bootstrapper::Mmdebstrap,
                        Some(debootstrap) => {
                            let method = if debootstrap {
                                Bootstrapper::Debootstrap
                            } else {
                                Bootstrapper::Mmdebstrap
                            };
                            lines.push(format!("method = '{}'", method.program()));
                            method
                        }
                    };
                    let base = Base::Bootstrap {
                        method,
                        suite,
                        variant: variant.unwrap_or_else(|| DEFAULT_VARIANT.into()),
                        arch,
                        mirror: mirror.map(String::from),
                    };
                    (base, lines)
                }),
            "/[a-z]{1,8}/[a-z.]{1,12}".prop_map(|source| {
                let lines = vec![
                    "method = \"tarball\"".to_owned(),
                    format!("source = {}", toml_string(&source)),
                ];
                (
                    Base::Tarball {
                        source: source.into(),
                    },
                    lines,
                )
            }),
            NAME.prop_map(|guest| {
                let lines = vec![
                    "method = 'guest'".to_owned(),
                    format!("guest = {}", toml_string(&guest)),
                ];
                (Base::Guest { guest }, lines)
            }),
            NAME.prop_map(|template| {
                let lines = vec![format!("from = {}", toml_string(&template))];
                (Base::From { template }, lines)
            }),
        ]
    }

    fn policy() -> impl Strategy<Value = Option<PolicyFile>> {
        let rule = prop::sample::select(vec![
            "private /etc/**",
            "cow /usr/**",
            "immutable /usr/lib/modules/**",
            "private /srv/{a,b}/*.db",
        ]);
        prop::option::of(
            (
                prop::collection::vec(rule, 0..4),
                prop::option::of(any::<bool>()),
            )
                .prop_map(|(rules, dpkg_conffiles)| PolicyFile {
                    rules: rules.into_iter().map(String::from).collect(),
                    dpkg_conffiles,
                }),
        )
    }

    /// A template and its text, keys in random order.
    fn template_text() -> impl Strategy<Value = (Template, String)> {
        (
            NAME,
            prop::option::of(TEXT),
            base(),
            prop::collection::vec(
                "[a-z0-9][a-z0-9+.-]{1,12}(:[a-z0-9-]{1,6})?(=[0-9][a-z0-9.+~:-]{0,8}|/[a-z][a-z0-9-]{0,8})?",
                0..4,
            ),
            prop::collection::vec(STEP, 0..4),
            policy(),
            any::<(bool, bool)>(),
        )
            .prop_flat_map(
                |(
                    name,
                    description,
                    (base, mut lines),
                    packages,
                    steps,
                    policy,
                    (write_empty, inline),
                )| {
                    if let Some(description) = &description {
                        lines.push(format!("description = {}", toml_string(description)));
                    }
                    for (key, list) in [("packages", &packages), ("steps", &steps)] {
                        if !list.is_empty() || write_empty {
                            lines.push(format!("{key} = {}", toml_list(list)));
                        }
                    }
                    let mut table = String::new();
                    if let Some(policy) = &policy {
                        let mut fields = vec![format!("rules = {}", toml_list(&policy.rules))];
                        if let Some(conffiles) = policy.dpkg_conffiles {
                            fields.push(format!("dpkg_conffiles = {conffiles}"));
                        }
                        if inline {
                            lines.push(format!("policy = {{ {} }}", fields.join(", ")));
                        } else {
                            table = format!("[policy]\n{}\n", fields.join("\n"));
                        }
                    }
                    let template = Template {
                        name,
                        description,
                        base,
                        packages,
                        steps,
                        policy,
                        origin: TemplateOrigin::File(FILE.into()),
                    };
                    (Just(template), Just(lines).prop_shuffle(), Just(table))
                },
            )
            .prop_map(|(template, lines, table)| {
                (
                    template,
                    format!("# generated\n{}\n{table}", lines.join("\n")),
                )
            })
    }

    proptest! {
        #[test]
        fn template_written_out_parses_back((template, text) in template_text()) {
            let parsed = parse_template(&template.name, &text, template.origin.clone());
            prop_assert_eq!(parsed.unwrap(), template, "{}", text);
        }

        #[test]
        fn template_garbage_never_panics(text in "\\PC{0,200}") {
            let _ = parse_web(&text);
        }

        #[test]
        fn template_tomlish_garbage_never_panics(
            text in "[a-z_.=\\[\\]{}\"', \n#0-9-]{0,200}",
        ) {
            let _ = parse_web(&text);
        }

        #[test]
        fn template_damaged_builtins_never_panic(
            builtin in prop::sample::select(BUILTIN.to_vec()),
            at in any::<prop::sample::Index>(),
            junk in "\\PC{0,12}",
        ) {
            let text = builtin.1;
            let mut at = at.index(text.len() + 1);
            while !text.is_char_boundary(at) {
                at -= 1;
            }
            let damaged = format!("{}{junk}{}", &text[..at], &text[at..]);
            let _ = parse_web(&damaged);
        }
    }
}
