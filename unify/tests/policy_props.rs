//! Properties of the marker policy's rule parser and of what its globs match (README "Marker
//! policy"): parsing never panics, an accepted rule has the documented shape and writes back to
//! itself, and generated rules match generated paths as the README promises (`*` and `?` stay in
//! one component, `**` crosses components, `\` escapes, first match wins).

use std::collections::HashSet;

use cowherd_unify::{Marker, Policy, PolicyError, Rule};
use proptest::prelude::*;

/// The characters that mean something in a glob.
const META: &[char] = &['*', '?', '[', ']', '{', '}', '\\'];

fn marker() -> impl Strategy<Value = Marker> {
    prop::sample::select(Marker::ALL.to_vec())
}

/// One path component: printable ASCII and a few non-ASCII letters, glob metacharacters
/// included, never `/`; spaces only inside.
fn component() -> impl Strategy<Value = String> {
    "[a-zA-Z0-9._*?\\[\\]{}\\\\,!^ é-]{1,8}"
        .prop_filter("a real name, no blank at either end", |c| {
            c != "." && c != ".." && !c.starts_with(' ') && !c.ends_with(' ')
        })
}

/// A plain component: no metacharacter, no space, never `.` or `..` (a directory walk never
/// yields those names).
fn plain() -> impl Strategy<Value = String> {
    "[a-zA-Z0-9._-]{1,8}".prop_filter("a real file name", |c| c != "." && c != "..")
}

/// `text` with every glob metacharacter escaped by a backslash.
fn escape(text: &str) -> String {
    let mut out = String::new();
    for c in text.chars() {
        if META.contains(&c) {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

fn path_of(components: &[String]) -> String {
    format!("/{}", components.join("/"))
}

fn policy(rules: &[Rule]) -> Policy {
    Policy::compile(rules, &[], HashSet::new()).expect("generated rules compile")
}

/// The marker `glob` gives `path` (Cow when it does not match), under a rule of `marker`.
fn matches(glob: &str, path: &str) -> bool {
    let rule = Rule {
        marker: Marker::Immutable,
        glob: glob.to_owned(),
    };
    policy(&[rule]).marker_for(path.as_bytes()) == Marker::Immutable
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 512,
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    /// Any text at all: an answer, never a panic; an error is one line quoting the text.
    #[test]
    fn any_rule_text_parses_or_is_refused_in_one_line(text in "\\PC{0,40}|[a-z /*?\\[\\]{},\\\\\t]{0,30}") {
        match text.parse::<Rule>() {
            Ok(rule) => {
                prop_assert!(rule.glob.starts_with('/'), "{:?} -> {:?}", text, rule);
            }
            Err(e) => {
                prop_assert!(matches!(e, PolicyError::InvalidRule { .. }), "{:?}: {:?}", text, e);
                let shown = e.to_string();
                prop_assert!(!shown.contains('\n'), "{:?}", shown);
                prop_assert!(shown.starts_with(&format!("invalid rule {text:?}")), "{:?}", shown);
            }
        }
    }

    /// An accepted rule is `<marker> <glob>` with blanks around: its marker is the first word,
    /// its glob the rest without the blanks that separate it, and it writes back to itself.
    #[test]
    fn an_accepted_rule_has_the_documented_shape_and_round_trips(
        text in "[ \t]{0,2}(private|cow|immutable|Cow|privat|/x)[ \t]{0,3}/?[a-z/*?{},\\[\\] \t\\\\-]{0,20}",
    ) {
        let Ok(rule) = text.parse::<Rule>() else { return Ok(()) };
        let blank = [' ', '\t'];
        let (word, rest) = text
            .trim_start_matches(blank)
            .split_once(blank)
            .expect("a marker and a glob");
        prop_assert_eq!(word, rule.marker.as_str());
        prop_assert!(rest.trim_start_matches(blank).starts_with(&rule.glob), "{:?}", rule);
        prop_assert!(rule.glob.starts_with('/'));
        // Only a blank escaped by a backslash ends a glob.
        if let Some(glob) = rule.glob.strip_suffix(blank) {
            prop_assert!(glob.ends_with('\\'), "{:?}", rule);
        }
        prop_assert_eq!(rule.to_string().parse::<Rule>().unwrap(), rule.clone());
        prop_assert_eq!(rule.to_string(), format!("{} {}", rule.marker, rule.glob));
    }

    /// A rule whose glob does not start with `/` is refused, saying it must.
    #[test]
    fn a_glob_that_is_not_guest_absolute_is_refused(
        marker in marker(),
        glob in "[a-z*?.][a-z/*?.]{0,12}",
    ) {
        let e = format!("{marker} {glob}").parse::<Rule>().unwrap_err().to_string();
        prop_assert!(e.contains("must start with '/'"), "{}", e);
    }

    /// Escaping every metacharacter makes a glob that matches exactly its own path: not a
    /// longer one, not a sibling.
    #[test]
    fn an_escaped_glob_matches_its_literal_path_only(
        components in prop::collection::vec(component(), 1..5),
        marker in marker(),
        extra in plain(),
    ) {
        let path = path_of(&components);
        let glob = format!("/{}", components.iter().map(|c| escape(c)).collect::<Vec<_>>().join("/"));
        let rule: Rule = format!("{marker} {glob}").parse().unwrap();
        prop_assert_eq!(&rule.glob, &glob);
        let policy = policy(&[rule]);
        prop_assert_eq!(policy.marker_for(path.as_bytes()), marker);
        let deeper = format!("{path}/{extra}");
        let longer = format!("{path}{extra}");
        for other in [&deeper, &longer] {
            if marker != Marker::Cow {
                prop_assert_eq!(policy.marker_for(other.as_bytes()), Marker::Cow, "{}", other);
            }
        }
    }

    /// A trailing blank of a glob is written `\ ` (README): it survives the parse and is
    /// matched literally.
    #[test]
    fn an_escaped_trailing_blank_is_kept(
        components in prop::collection::vec(plain(), 1..4),
        marker in marker(),
    ) {
        let path = format!("{} ", path_of(&components));
        let text = format!("{marker} {}\\ ", path_of(&components));
        let rule: Rule = text.parse().map_err(|e| TestCaseError::fail(format!("{text:?}: {e}")))?;
        prop_assert_eq!(rule.to_string().parse::<Rule>().unwrap(), rule.clone());
        prop_assert!(matches(&rule.glob, &path), "{:?} on {:?}", rule, path);
        prop_assert!(!matches(&rule.glob, path.trim_end()), "{:?}", rule);
    }

    /// `*` (and `**` that is not a whole component) matches any one component, never across `/`.
    #[test]
    fn a_star_stays_within_one_component(
        dir in prop::collection::vec(plain(), 0..3),
        prefix in "[a-z]{0,2}",
        name in plain(),
        below in prop::collection::vec(plain(), 1..3),
        stars in prop::sample::select(vec!["*", "**"]),
    ) {
        let mut glob_parts = dir.clone();
        glob_parts.push(format!("{prefix}{stars}"));
        let glob = path_of(&glob_parts);
        // `**` as a whole component is the crossing kind, tested below.
        prop_assume!(!(stars == "**" && prefix.is_empty()));
        let mut hit = dir.clone();
        hit.push(format!("{prefix}{name}"));
        prop_assert!(matches(&glob, &path_of(&hit)), "{} on {}", glob, path_of(&hit));
        let mut miss = hit.clone();
        miss.extend(below);
        prop_assert!(!matches(&glob, &path_of(&miss)), "{} on {}", glob, path_of(&miss));
    }

    /// `?` matches one character of a component, never `/`.
    #[test]
    fn a_question_mark_is_one_character_not_a_slash(
        dir in prop::collection::vec(plain(), 0..3),
        a in plain(),
        c in "[a-zA-Z0-9._-]",
        b in plain(),
    ) {
        let mut parts = dir.clone();
        parts.push(format!("{a}?{b}"));
        let glob = path_of(&parts);
        let mut hit = dir.clone();
        hit.push(format!("{a}{c}{b}"));
        prop_assert!(matches(&glob, &path_of(&hit)));
        let mut split = dir.clone();
        split.push(a.clone());
        split.push(b.clone());
        prop_assert!(!matches(&glob, &path_of(&split)), "{} on {}", glob, path_of(&split));
        let mut none = dir;
        none.push(format!("{a}{b}"));
        prop_assert!(!matches(&glob, &path_of(&none)));
    }

    /// `/DIR/**` matches everything below DIR at any depth, but not DIR itself nor a sibling
    /// whose name starts like DIR; `/DIR/**/NAME` matches NAME at any depth below DIR,
    /// directly below included.
    #[test]
    fn a_double_star_crosses_components(
        dir in prop::collection::vec(plain(), 1..3),
        below in prop::collection::vec(plain(), 1..5),
        name in plain(),
        suffix in plain(),
    ) {
        let top = path_of(&dir);
        let glob = format!("{top}/**");
        let deep = format!("{top}/{}", below.join("/"));
        prop_assert!(matches(&glob, &deep), "{} on {}", glob, deep);
        prop_assert!(!matches(&glob, &top));
        let sibling = format!("{top}{suffix}/{}", below.join("/"));
        prop_assert!(!matches(&glob, &sibling), "{} on {}", glob, sibling);
        let glob = format!("{top}/**/{name}");
        let (at_depth, directly) = (format!("{deep}/{name}"), format!("{top}/{name}"));
        prop_assert!(matches(&glob, &at_depth), "{} on {}", glob, at_depth);
        prop_assert!(matches(&glob, &directly), "{} on {}", glob, directly);
        let longer = format!("{deep}/{name}{suffix}");
        prop_assert!(!matches(&glob, &longer), "{} on {}", glob, longer);
    }

    /// `{a,b}` matches either alternative and nothing else.
    #[test]
    fn alternatives_match_either_one(
        dir in prop::collection::vec(plain(), 0..3),
        a in "[a-z]{1,5}",
        b in "[a-z]{1,5}",
        other in "[a-z]{1,5}",
    ) {
        prop_assume!(other != a && other != b);
        let glob = format!("{}/{{{a},{b}}}", path_of(&dir).trim_end_matches('/'));
        for hit in [&a, &b] {
            let path = format!("{}/{hit}", path_of(&dir).trim_end_matches('/'));
            prop_assert!(matches(&glob, &path), "{} on {}", glob, path);
        }
        let path = format!("{}/{other}", path_of(&dir).trim_end_matches('/'));
        prop_assert!(!matches(&glob, &path), "{} on {}", glob, path);
    }

    /// The first matching rule decides: whatever comes after a rule matching everything
    /// (`/**`) never decides, and a path no rule matches is cow.
    #[test]
    fn the_first_matching_rule_wins(
        markers in prop::collection::vec(marker(), 1..5),
        at in any::<prop::sample::Index>(),
        path in prop::collection::vec(plain(), 1..4),
    ) {
        let i = at.index(markers.len());
        let mut rules: Vec<Rule> = markers
            .iter()
            .map(|m| Rule { marker: *m, glob: "/nomatch-*/**".into() })
            .collect();
        rules[i].glob = "/**".into();
        let path = path_of(&path);
        prop_assert_eq!(policy(&rules).marker_for(path.as_bytes()), markers[i]);
        // The guest's rules are tried before the default ones.
        let (guest, default) = rules.split_at(i + 1);
        let split = Policy::compile(guest, default, HashSet::new()).unwrap();
        prop_assert_eq!(split.marker_for(path.as_bytes()), markers[i]);
        let none = Policy::compile(&rules[..i], &[], HashSet::new()).unwrap();
        prop_assert_eq!(none.marker_for(path.as_bytes()), Marker::Cow);
    }
}
