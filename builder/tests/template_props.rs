//! Properties of the template parser (`parse_template`, schema in `templates/README.md`):
//! whatever the text, an answer and never a panic, and every refusal is one line at
//! `FILE:LINE:COLUMN`; a generated valid definition parses to what was generated; one bad value
//! (a package, a mirror, a suite, an arch, a `from`/`guest` name, a relative `source`, an
//! unknown key, a bad policy rule, a bad file name) is refused naming its key and its line.

use std::path::PathBuf;

use cowherd_builder::{
    Base, Bootstrapper, Template, TemplateError, TemplateOrigin, parse_template,
};
use cowherd_unify::PolicyFile;
use proptest::prelude::*;

const FILE: &str = "/srv/cowherd/templates.d/t.toml";

fn origin() -> TemplateOrigin {
    TemplateOrigin::File(FILE.into())
}

fn config(cases: u32) -> ProptestConfig {
    ProptestConfig {
        cases,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

/// A TOML basic string holding `s`.
fn quoted(s: &str) -> String {
    toml::Value::String(s.to_owned()).to_string()
}

fn list(items: &[String]) -> String {
    format!(
        "[{}]",
        items
            .iter()
            .map(|i| quoted(i))
            .collect::<Vec<_>>()
            .join(", ")
    )
}

const NAME: &str = "[a-zA-Z0-9_][a-zA-Z0-9._-]{0,30}";
const WORD: &str = "[a-z0-9][a-z0-9.+_-]{0,10}";
const PACKAGE: &str =
    "[a-z0-9][a-z0-9+.-]{1,12}(:[a-z0-9-]{1,6})?(=[0-9][a-z0-9.+~:-]{0,8}|/[a-z][a-z0-9-]{0,8})?";
const MIRROR: &str = "(https?|file|ftp)://[a-z0-9.:/_-]{1,20}|/[a-z0-9/._-]{1,20}";

/// A valid definition: the template it must parse to, and its lines as `(key, line)`.
#[derive(Clone, Debug)]
struct Valid {
    template: Template,
    lines: Vec<(&'static str, String)>,
    policy: Option<String>,
}

impl Valid {
    fn text(&self) -> String {
        let mut text = String::from("# generated\n");
        for (_, line) in &self.lines {
            text.push_str(line);
            text.push('\n');
        }
        if let Some(table) = &self.policy {
            text.push_str(table);
        }
        text
    }

    /// Sets `key`'s line (appended if the definition has none).
    fn set(&mut self, key: &'static str, line: String) {
        match self.lines.iter_mut().find(|(k, _)| *k == key) {
            Some(slot) => slot.1 = line,
            None => self.lines.push((key, line)),
        }
    }

    /// The 1-based line of `key` in [`Valid::text`].
    fn line_of(&self, key: &str) -> usize {
        2 + self
            .lines
            .iter()
            .position(|(k, _)| *k == key)
            .unwrap_or_else(|| panic!("no line for {key}"))
    }
}

fn bootstrap() -> impl Strategy<Value = (Base, Vec<(&'static str, String)>)> {
    (
        prop::option::of(any::<bool>()),
        WORD,
        prop::option::of(WORD),
        prop::option::of("[a-z0-9]{1,8}"),
        prop::option::of(MIRROR),
    )
        .prop_map(|(method, suite, variant, arch, mirror)| {
            let mut lines = vec![("suite", format!("suite = {}", quoted(&suite)))];
            let chosen = match method {
                Some(true) => Bootstrapper::Debootstrap,
                _ => Bootstrapper::Mmdebstrap,
            };
            if method.is_some() {
                lines.push(("method", format!("method = {}", quoted(chosen.program()))));
            }
            for (key, value) in [("variant", &variant), ("arch", &arch), ("mirror", &mirror)] {
                if let Some(value) = value {
                    lines.push((key, format!("{key} = {}", quoted(value))));
                }
            }
            let base = Base::Bootstrap {
                method: chosen,
                suite,
                variant: variant.unwrap_or_else(|| "minbase".into()),
                arch,
                mirror,
            };
            (base, lines)
        })
}

fn base() -> impl Strategy<Value = (Base, Vec<(&'static str, String)>)> {
    prop_oneof![
        3 => bootstrap(),
        1 => "/[a-z0-9._-]{1,10}(/[a-z0-9._-]{1,10}){0,2}".prop_map(|source| {
            let lines = vec![
                ("method", "method = \"tarball\"".to_owned()),
                ("source", format!("source = {}", quoted(&source))),
            ];
            (Base::Tarball { source: PathBuf::from(source) }, lines)
        }),
        1 => NAME.prop_map(|guest| {
            let lines = vec![
                ("method", "method = 'guest'".to_owned()),
                ("guest", format!("guest = {}", quoted(&guest))),
            ];
            (Base::Guest { guest }, lines)
        }),
        1 => NAME.prop_map(|template| {
            let lines = vec![("from", format!("from = {}", quoted(&template)))];
            (Base::From { template }, lines)
        }),
    ]
}

fn valid() -> impl Strategy<Value = Valid> {
    (
        NAME,
        prop::option::of("[ -~é]{0,30}"),
        base(),
        prop::collection::vec(PACKAGE, 0..4),
        prop::collection::vec("[a-z][ -~]{0,30}", 0..3),
        prop::option::of((
            prop::collection::vec(
                prop::sample::select(vec!["private /etc/**", "cow /usr/**", "immutable /opt/*"]),
                0..3,
            ),
            prop::option::of(any::<bool>()),
        )),
    )
        .prop_map(
            |(name, description, (base, mut lines), packages, steps, policy)| {
                if let Some(d) = &description {
                    lines.push(("description", format!("description = {}", quoted(d))));
                }
                if !packages.is_empty() {
                    lines.push(("packages", format!("packages = {}", list(&packages))));
                }
                if !steps.is_empty() {
                    lines.push(("steps", format!("steps = {}", list(&steps))));
                }
                let policy = policy.map(|(rules, dpkg_conffiles)| PolicyFile {
                    rules: rules.into_iter().map(String::from).collect(),
                    dpkg_conffiles,
                });
                let table = policy.as_ref().map(|p| {
                    let mut t = format!("[policy]\nrules = {}\n", list(&p.rules));
                    if let Some(c) = p.dpkg_conffiles {
                        t.push_str(&format!("dpkg_conffiles = {c}\n"));
                    }
                    t
                });
                Valid {
                    template: Template {
                        name,
                        description,
                        base,
                        packages,
                        steps,
                        policy,
                        origin: origin(),
                    },
                    lines,
                    policy: table,
                }
            },
        )
}

/// Texts that are not one Debian package spec.
fn bad_package() -> impl Strategy<Value = String> {
    prop_oneof![
        Just(String::new()),
        "[a-z0-9]",
        "-[a-z0-9-]{1,8}",
        "[a-z]{1,5} [a-z]{1,5}",
        "[A-Z][a-z0-9]{1,6}",
        "[a-z]{2,5}[;|&$`'\"()<>*][a-z]{0,4}",
        "[a-z]{2,5}[=:]",
        "[a-z]{2,5}/\\.\\./[a-z]{1,4}",
        "--[a-z]{2,8}(=[a-z]{1,4})?",
    ]
}

/// Texts that are neither `scheme://…` nor an absolute path, or hold a blank.
fn bad_mirror() -> impl Strategy<Value = String> {
    prop_oneof![
        Just(String::new()),
        "[a-z][a-z0-9.]{0,10}",
        "-[a-z-]{1,10}",
        "https?:/[a-z.]{1,8}",
        "://[a-z.]{1,8}",
        "[0-9][a-z]{0,3}://[a-z.]{1,8}",
        "(https?://|/)[a-z]{1,5} [a-z]{1,5}",
        "(https?://|/)[a-z]{1,5}\t",
    ]
}

/// Texts that are not one word of `[A-Za-z0-9._+-]` not starting with `-`.
fn bad_word() -> impl Strategy<Value = String> {
    prop_oneof![
        Just(String::new()),
        "-[a-z0-9]{0,6}",
        "[a-z]{1,4}[ /;:=$,@][a-z]{0,4}",
        "[a-z]{0,3}é[a-z]{0,3}",
    ]
}

/// Texts that are not a template or guest name (`1-64 of a-z A-Z 0-9 . _ -`, not starting with
/// `.` or `-`).
fn bad_name() -> impl Strategy<Value = String> {
    prop_oneof![
        Just(String::new()),
        Just(".".to_owned()),
        Just("..".to_owned()),
        "[.-][a-z0-9]{0,8}",
        "[a-z]{1,4}/[a-z.]{0,4}",
        "\\.\\./[a-z]{1,6}",
        "[a-z]{1,4}[ :@*?\\\\][a-z]{0,4}",
        "[a-z]{65,70}",
    ]
}

/// One bad value, and the key the refusal must name.
#[derive(Clone, Debug)]
enum Fault {
    Package(String),
    Mirror(String),
    Suite(String),
    Arch(String),
    From(String),
    Guest(String),
    Source(String),
    UnknownKey(String),
    Rule(String),
}

fn fault() -> impl Strategy<Value = Fault> {
    prop_oneof![
        bad_package().prop_map(Fault::Package),
        bad_mirror().prop_map(Fault::Mirror),
        bad_word().prop_map(Fault::Suite),
        bad_word().prop_map(Fault::Arch),
        bad_name().prop_map(Fault::From),
        bad_name().prop_map(Fault::Guest),
        "[a-z.~][a-z0-9/._-]{0,12}".prop_map(Fault::Source),
        "(mirrors|packge|suites|Method|[a-z]{3,8}_x)".prop_map(Fault::UnknownKey),
        prop_oneof![
            "(privat|shared|Cow) /[a-z]{1,5}/\\*\\*",
            "(private|cow) [a-z]{1,5}/\\*",
            "(private|cow) /[a-z]{1,5}/\\[[a-z]{1,3}",
            Just("immutable".to_owned()),
        ]
        .prop_map(Fault::Rule),
    ]
}

/// `valid` with `fault` put in: the text and the key (dotted) that the error must name, and
/// the line it must be at.
fn with_fault(valid: &Valid, fault: &Fault) -> (String, &'static str, usize) {
    let mut v = valid.clone();
    let bootstrap = |v: &mut Valid| {
        v.lines
            .retain(|(k, _)| !["method", "source", "guest", "from"].contains(k));
        if !v.lines.iter().any(|(k, _)| *k == "suite") {
            v.set("suite", "suite = \"bookworm\"".into());
        }
    };
    let key = match fault {
        Fault::Package(p) => {
            let mut packages = v.template.packages.clone();
            let at = packages.len() / 2;
            packages.insert(at, p.clone());
            v.set("packages", format!("packages = {}", list(&packages)));
            "packages"
        }
        Fault::Mirror(m) => {
            bootstrap(&mut v);
            v.set("mirror", format!("mirror = {}", quoted(m)));
            "mirror"
        }
        Fault::Suite(s) => {
            bootstrap(&mut v);
            v.set("suite", format!("suite = {}", quoted(s)));
            "suite"
        }
        Fault::Arch(a) => {
            bootstrap(&mut v);
            v.set("arch", format!("arch = {}", quoted(a)));
            "arch"
        }
        Fault::From(n) => {
            v.lines.retain(|(k, _)| {
                ![
                    "method", "suite", "variant", "arch", "mirror", "source", "guest",
                ]
                .contains(k)
            });
            v.set("from", format!("from = {}", quoted(n)));
            "from"
        }
        Fault::Guest(n) => {
            v.lines.retain(|(k, _)| {
                !["suite", "variant", "arch", "mirror", "source", "from"].contains(k)
            });
            v.set("method", "method = \"guest\"".into());
            v.set("guest", format!("guest = {}", quoted(n)));
            "guest"
        }
        Fault::Source(s) => {
            v.lines.retain(|(k, _)| {
                !["suite", "variant", "arch", "mirror", "guest", "from"].contains(k)
            });
            v.set("method", "method = \"tarball\"".into());
            v.set("source", format!("source = {}", quoted(s)));
            "source"
        }
        Fault::UnknownKey(k) => {
            let line = format!("{k} = \"x\"");
            let at = v.lines.len() / 2;
            v.lines.insert(at, ("unknown", line));
            "unknown"
        }
        Fault::Rule(r) => {
            v.policy = None;
            v.set(
                "policy",
                format!("policy = {{ rules = [\"cow /srv/**\", {}] }}", quoted(r)),
            );
            "policy"
        }
    };
    let line = v.line_of(key);
    let named: &'static str = match fault {
        Fault::UnknownKey(_) => "",
        Fault::Rule(_) => "policy.rules",
        _ => key,
    };
    (v.text(), named, line)
}

proptest! {
    #![proptest_config(config(512))]

    /// A generated definition, keys in any order, parses to exactly what was generated.
    #[test]
    fn a_generated_definition_parses_to_what_was_generated(
        valid in valid(),
        order in any::<prop::sample::Index>(),
    ) {
        let mut valid = valid;
        let n = valid.lines.len();
        if n > 1 {
            valid.lines.rotate_left(order.index(n));
        }
        let text = valid.text();
        let parsed = parse_template(&valid.template.name, &text, origin());
        prop_assert_eq!(parsed.map_err(|e| e.to_string()), Ok(valid.template.clone()), "{}", text);
    }

    /// One bad value in a valid definition: refused in one line, at the file and the line of
    /// its key, naming the key.
    #[test]
    fn one_bad_value_is_refused_naming_its_key_and_line(valid in valid(), fault in fault()) {
        let (text, key, line) = with_fault(&valid, &fault);
        let err = parse_template(&valid.template.name, &text, origin())
            .map(|t| format!("accepted: {t:?}"))
            .unwrap_err();
        let shown = err.to_string();
        prop_assert!(!shown.contains('\n'), "{}", shown);
        let TemplateError::Invalid { at, message } = &err else {
            return Err(TestCaseError::fail(format!("not an Invalid error: {shown}\n{text}")));
        };
        prop_assert_eq!(at.file.to_str(), Some(FILE));
        prop_assert_eq!(at.line, line, "{}\n{}", shown, text);
        prop_assert!(shown.starts_with(&format!("{FILE}:{line}:")), "{}", shown);
        if let Fault::UnknownKey(k) = &fault {
            let want = format!("unknown key {k:?} (expected one of:");
            prop_assert!(message.starts_with(&want), "{}", shown);
        } else {
            let want = format!("key {key:?}: ");
            prop_assert!(message.starts_with(&want), "{} (for {:?})\n{}", shown, fault, text);
        }
        if let Fault::Package(p) = &fault {
            prop_assert!(message.contains(&format!("{p:?} is not a package")), "{}", shown);
        }
    }

    /// A file whose name is not a template name is refused, naming the file.
    #[test]
    fn a_bad_file_name_is_refused_naming_the_file(valid in valid(), name in bad_name()) {
        let err = parse_template(&name, &valid.text(), origin()).unwrap_err();
        let shown = err.to_string();
        prop_assert!(matches!(&err, TemplateError::BadName { name: n, .. } if *n == name), "{}", shown);
        prop_assert!(shown.starts_with(&format!("{FILE}: invalid template name {name:?}")), "{}", shown);
        prop_assert!(shown.contains("rename the file"), "{}", shown);
    }

    /// Any text: an answer, never a panic; a refusal is one line starting with the file.
    #[test]
    fn any_text_is_answered_in_one_line(text in "\\PC{0,120}") {
        check_answer(&text)?;
    }

    /// Lines that look like the schema, with values of every TOML type and junk between:
    /// an answer, never a panic.
    #[test]
    fn tomlish_lines_are_answered_in_one_line(
        lines in prop::collection::vec(tomlish_line(), 0..10),
    ) {
        check_answer(&lines.join("\n"))?;
    }
}

fn check_answer(text: &str) -> Result<(), TestCaseError> {
    match parse_template("t", text, origin()) {
        Ok(t) => prop_assert_eq!(t.name, "t"),
        Err(e) => {
            let shown = e.to_string();
            prop_assert!(!shown.contains('\n'), "{:?}", shown);
            prop_assert!(shown.starts_with(&format!("{FILE}:")), "{:?}", shown);
        }
    }
    Ok(())
}

fn tomlish_line() -> impl Strategy<Value = String> {
    let key = prop_oneof![
        prop::sample::select(vec![
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
            "policy.rules",
            "policy.dpkg_conffiles",
            "rules",
            "dpkg_conffiles",
        ])
        .prop_map(String::from),
        "[a-z_.\"'-]{1,10}",
    ];
    let value = prop_oneof![
        "\"[ -~é]{0,12}\"",
        "'[ -!#-~]{0,12}'",
        "-?[0-9]{1,20}",
        Just("true".to_owned()),
        Just("1979-05-27T07:32:00Z".to_owned()),
        "\\[(\"[a-z /*-]{0,8}\", ?){0,3}\\]",
        "\\{ ?(rules|x|dpkg_conffiles) = (\\[\\]|true|\"[a-z]{0,3}\") ?\\}",
        "[\\[\\]{}\"'=,.#a-z0-9 ]{0,12}",
    ];
    prop_oneof![
        4 => (key, value).prop_map(|(k, v)| format!("{k} = {v}")),
        1 => "\\[{1,2}[a-z.]{0,8}\\]{0,2}",
        1 => "[ -~é\t]{0,20}",
    ]
}
