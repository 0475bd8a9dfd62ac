//! Properties of `cowherd import --from SOURCE`'s parser (`Source::from_str`): any text gets an
//! answer and never a panic, refusals are one line quoting the text; ssh, daemon, local and
//! tarball sources write back (Display) to text that reads as the same source; a host or user
//! starting with `-` (an option to ssh or rsync) is refused; and rsync's rule decides what is
//! remote: a `:` before the first `/`.

use std::path::{Path, PathBuf};

use cowherd_builder::{ImportError, Source};
use proptest::prelude::*;

fn config(cases: u32) -> ProptestConfig {
    ProptestConfig {
        cases,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

/// The endings that make a local path a tarball (README, `cowherd import --help`).
const TARBALL_ENDINGS: &[&str] = &[
    ".tar",
    ".tar.gz",
    ".tgz",
    ".tar.xz",
    ".txz",
    ".tar.zst",
    ".tar.zstd",
    ".tzst",
    ".tar.bz2",
    ".tbz",
    ".tbz2",
    ".tar.lz",
    ".tar.lzma",
    ".tlz",
    ".tar.lzo",
    ".tar.Z",
    ".taz",
];

fn is_tarball_name(path: &str) -> bool {
    TARBALL_ENDINGS
        .iter()
        .any(|e| path.len() > e.len() && path.ends_with(e))
}

/// rsync's rule: a `:` before the first `/` makes an argument remote.
fn looks_remote(spec: &str) -> bool {
    match (spec.find(':'), spec.find('/')) {
        (Some(c), Some(s)) => c < s,
        (Some(_), None) => true,
        _ => false,
    }
}

fn parse(spec: &str) -> Result<Source, ImportError> {
    spec.parse()
}

const HOST: &str = "[a-z0-9_][a-z0-9._-]{0,12}|[0-9]{1,3}(\\.[0-9]{1,3}){3}";
const IPV6: &str = "[0-9a-f]{0,4}:[0-9a-f:]{0,10}[0-9a-f]{1,4}(%[0-9]{1,3})?";
const USER: &str = "[a-z_][a-z0-9_.-]{0,8}";
/// A path component: no control character, no `/`.
const COMPONENT: &str = "[a-zA-Z0-9._ :@,+=~-]{1,10}";

fn abs_path() -> impl Strategy<Value = String> {
    prop::collection::vec(COMPONENT, 0..4).prop_map(|c| format!("/{}", c.join("/")))
}

fn ssh() -> impl Strategy<Value = Source> {
    (prop::option::of(USER), prop_oneof![HOST, IPV6], abs_path()).prop_map(|(user, host, path)| {
        Source::Ssh {
            user,
            host,
            path: PathBuf::from(path),
        }
    })
}

fn daemon() -> impl Strategy<Value = Source> {
    (
        prop_oneof![
            HOST.prop_map(String::from),
            IPV6.prop_map(|h| format!("[{h}]")),
        ],
        prop::option::of(1..=65535u32),
        "[a-zA-Z0-9._-]{1,8}",
        prop::collection::vec("[a-zA-Z0-9._ :@-]{1,8}", 0..3),
    )
        .prop_map(|(host, port, module, path)| {
            let port = port.map(|p| format!(":{p}")).unwrap_or_default();
            let mut url = format!("rsync://{host}{port}/{module}");
            for c in path {
                url.push('/');
                url.push_str(&c);
            }
            Source::Daemon { url }
        })
}

/// A local path as `Source` keeps it: absolute, or relative (a relative one holding a `:`
/// before its first `/` is written `./` first, and kept without it).
fn local_path() -> impl Strategy<Value = String> {
    prop_oneof![
        abs_path(),
        (COMPONENT, prop::collection::vec(COMPONENT, 0..3)).prop_map(|(first, rest)| {
            let mut p = first;
            for c in rest {
                p.push('/');
                p.push_str(&c);
            }
            p
        }),
    ]
    .prop_filter("kept as written", |p| {
        !(p.starts_with("./") && looks_remote(&p[2..])) && p != "." && !p.is_empty()
    })
}

fn local() -> impl Strategy<Value = Source> {
    local_path()
        .prop_filter("not a tarball name", |p| !is_tarball_name(p))
        .prop_map(|p| Source::Local(PathBuf::from(p)))
}

fn tarball() -> impl Strategy<Value = Source> {
    (local_path(), prop::sample::select(TARBALL_ENDINGS.to_vec()))
        .prop_map(|(p, e)| Source::Tarball(PathBuf::from(format!("{p}{e}"))))
}

/// Text that is partly source-like, partly junk.
fn spec() -> impl Strategy<Value = String> {
    prop_oneof![
        "\\PC{0,30}",
        "(rsync://|-|\\./|/)?[a-z0-9@:/.\\[\\]%_ -]{0,24}",
        "[a-z-]{0,4}@?[a-z0-9\\[\\]:.-]{0,10}::?[a-z/:.-]{0,10}",
        "[ -~\t\n\r\u{7f}]{0,16}",
    ]
}

proptest! {
    #![proptest_config(config(1024))]

    /// Any text: an answer, never a panic. A refusal is `BadSource`, one line quoting the text.
    #[test]
    fn any_text_is_answered_in_one_line(spec in spec()) {
        match parse(&spec) {
            Ok(_) => prop_assert!(!spec.is_empty()),
            Err(e) => {
                let shown = e.to_string();
                prop_assert!(matches!(e, ImportError::BadSource { .. }), "{}", shown);
                prop_assert!(shown.starts_with(&format!("bad source {spec:?}: ")), "{}", shown);
                prop_assert!(!shown.contains('\n') && !shown.contains('\r'), "{:?}", shown);
            }
        }
    }

    /// What any text reads as writes back to text that reads the same.
    #[test]
    fn what_is_read_writes_back_to_itself(spec in spec()) {
        if let Ok(source) = parse(&spec) {
            let shown = source.to_string();
            let again = parse(&shown).map_err(|e| e.to_string());
            prop_assert_eq!(again, Ok(source.clone()), "{:?} -> {:?}", spec, shown);
        }
    }

    /// Every form round-trips through Display: ssh (IPv6 in brackets), daemon, local (`./`
    /// before a relative `a:b`), tarball.
    #[test]
    fn every_form_round_trips(source in prop_oneof![ssh(), daemon(), local(), tarball()]) {
        let shown = source.to_string();
        prop_assert_eq!(parse(&shown).map_err(|e| e.to_string()), Ok(source.clone()), "{}", shown);
        if let Source::Ssh { host, .. } = &source {
            prop_assert_eq!(host.contains(':'), shown.contains('['), "{}", shown);
        }
    }

    /// A host or user starting with `-` would be an option to ssh or rsync: refused, in every
    /// remote form.
    #[test]
    fn a_dash_host_or_user_is_refused(
        user in USER,
        host in HOST,
        path in abs_path(),
        dashes in "-{1,2}",
    ) {
        let cases = [
            format!("{dashes}{host}:{path}"),
            format!("{user}@{dashes}{host}:{path}"),
            format!("{dashes}{user}@{host}:{path}"),
            format!("{dashes}{host}::module"),
            format!("rsync://{dashes}{host}/module"),
            format!("rsync://{dashes}{host}:873/module"),
        ];
        for spec in cases {
            let e = parse(&spec);
            prop_assert!(
                matches!(e, Err(ImportError::BadSource { .. })),
                "{:?} read as {:?}",
                spec,
                e
            );
        }
    }

    /// rsync's rule: text starting with `/` or `.`, or without a `:` before its first `/`, is
    /// a local path (a tarball by its ending), kept as written (`./` dropped before a relative
    /// `a:b`); any other text (but `rsync://`) is remote or refused, never local.
    #[test]
    fn a_colon_before_the_first_slash_makes_a_source_remote(spec in spec()) {
        prop_assume!(!spec.is_empty() && !spec.chars().any(char::is_control));
        prop_assume!(!spec.starts_with("rsync://"));
        let read = parse(&spec);
        if spec.starts_with(['/', '.']) || !looks_remote(&spec) {
            let kept = match spec.strip_prefix("./") {
                Some(rest) if !rest.is_empty() && looks_remote(rest) => rest,
                _ => spec.as_str(),
            };
            let want = if is_tarball_name(&spec) {
                Source::Tarball(PathBuf::from(kept))
            } else {
                Source::Local(PathBuf::from(kept))
            };
            prop_assert_eq!(read.map_err(|e| e.to_string()), Ok(want));
        } else {
            prop_assert!(
                matches!(read, Err(_) | Ok(Source::Ssh { .. } | Source::Daemon { .. })),
                "{:?} read as {:?}",
                spec,
                read
            );
        }
    }

    /// An ssh source names the machine's root by an absolute path: `host:relative` is refused,
    /// and an accepted one's path starts with `/`.
    #[test]
    fn an_ssh_path_is_absolute(
        user in prop::option::of(USER),
        host in HOST,
        rel in "[a-zA-Z0-9._~-][a-zA-Z0-9._/-]{0,10}",
    ) {
        let at = user.map(|u| format!("{u}@")).unwrap_or_default();
        let spec = format!("{at}{host}:{rel}");
        let e = parse(&spec).unwrap_err().to_string();
        prop_assert!(e.contains("absolute path"), "{}", e);
        if let Ok(Source::Ssh { path, .. }) = parse(&format!("{at}{host}:/{rel}")) {
            prop_assert!(path.starts_with(Path::new("/")));
        }
    }
}
