//! Fleet upgrades with the real package manager and the real archive: guests built from a
//! template bootstrapped without the distribution's update and security suites, upgraded with
//! them by `cowherd upgrade`; each package fetched once; the upgraded files shared again; a
//! guest with a broken dpkg state rolled back to exactly its tree before; a template upgraded
//! to a new version whose guests share the upgraded guests' objects.
//!
//! The package sources come from this host's own apt configuration, read at run time (the
//! URI that serves the host's release, and the one that serves its security suite): nothing
//! here names a package registry. A host without them, or without network, fails the test
//! loudly.

use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::common::*;

/// One `deb` source of the host: its URI and suites.
#[derive(Debug)]
struct HostSource {
    uri: String,
    suites: Vec<String>,
}

/// The host's `deb` sources, from `/etc/apt/sources.list`, `sources.list.d/*.list` (one-line
/// format) and `sources.list.d/*.sources` (deb822).
fn host_sources() -> Vec<HostSource> {
    let mut found = Vec::new();
    let mut one_line = vec![PathBuf::from("/etc/apt/sources.list")];
    let mut deb822 = Vec::new();
    if let Ok(dir) = fs::read_dir("/etc/apt/sources.list.d") {
        for e in dir.flatten() {
            let p = e.path();
            match p.extension().and_then(|x| x.to_str()) {
                Some("list") => one_line.push(p),
                Some("sources") => deb822.push(p),
                _ => {}
            }
        }
    }
    for p in one_line {
        let Ok(text) = fs::read_to_string(&p) else {
            continue;
        };
        for line in text.lines() {
            let line = line.split('#').next().unwrap_or("").trim();
            let mut words = line.split_whitespace().peekable();
            if words.next() != Some("deb") {
                continue;
            }
            if words.peek().is_some_and(|w| w.starts_with('[')) {
                for w in words.by_ref() {
                    if w.ends_with(']') {
                        break;
                    }
                }
            }
            if let (Some(uri), Some(suite)) = (words.next(), words.next()) {
                found.push(HostSource {
                    uri: uri.to_string(),
                    suites: vec![suite.to_string()],
                });
            }
        }
    }
    for p in deb822 {
        let Ok(text) = fs::read_to_string(&p) else {
            continue;
        };
        for stanza in text.split("\n\n") {
            let field = |name: &str| {
                stanza
                    .lines()
                    .find_map(|l| l.strip_prefix(name).and_then(|r| r.strip_prefix(':')))
                    .map(|v| v.trim().to_string())
            };
            let enabled = field("Enabled").is_none_or(|v| v != "no");
            let types = field("Types").unwrap_or_default();
            if !enabled || !types.split_whitespace().any(|t| t == "deb") {
                continue;
            }
            if let (Some(uris), Some(suites)) = (field("URIs"), field("Suites")) {
                for uri in uris.split_whitespace() {
                    found.push(HostSource {
                        uri: uri.to_string(),
                        suites: suites.split_whitespace().map(String::from).collect(),
                    });
                }
            }
        }
    }
    found
}

/// The host's release codename (`VERSION_CODENAME` of /etc/os-release).
fn codename() -> String {
    let text = fs::read_to_string("/etc/os-release").expect("/etc/os-release");
    text.lines()
        .find_map(|l| l.strip_prefix("VERSION_CODENAME="))
        .map(|v| v.trim_matches('"').to_string())
        .filter(|v| !v.is_empty())
        .expect("VERSION_CODENAME in /etc/os-release")
}

/// The http URI of the host's sources that serves `suite`.
fn uri_for(sources: &[HostSource], suite: &str) -> String {
    sources
        .iter()
        .find(|s| s.uri.starts_with("http://") && s.suites.iter().any(|x| x == suite))
        .map(|s| s.uri.trim_end_matches('/').to_string())
        .unwrap_or_else(|| {
            panic!(
                "this host's apt configuration has no http:// source for {suite:?} \
                 (found {sources:?}): the fleet-upgrade test needs one, and network"
            )
        })
}

/// Defines template `upg` in the root: the host's release from the host's own archive URI,
/// main only (so the updates and security suites bring upgrades), with a step that gives its
/// guests those two suites.
fn define_template(root: &Path) {
    let sources = host_sources();
    let release = codename();
    let main = uri_for(&sources, &release);
    let security = uri_for(&sources, &format!("{release}-security"));
    let list =
        format!("deb {main} {release}-updates main\\ndeb {security} {release}-security main\\n");
    let text = format!(
        "description = \"the host's release without its updates, for the upgrade test\"\n\
         method = \"mmdebstrap\"\nsuite = \"{release}\"\nmirror = \"{main}\"\n\
         steps = [\"printf '{list}' > /etc/apt/sources.list.d/cowherd-test-updates.list\"]\n\n\
         [policy]\nrules = [\"cow /var/lib/dpkg/info/**\", \"cow /var/cache/debconf/*.dat\"]\n"
    );
    fs::create_dir_all(root.join("templates.d")).unwrap();
    fs::write(root.join("templates.d/upg.toml"), text).unwrap();
}

fn packages_of(line: &Value) -> BTreeSet<String> {
    line["packages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            format!(
                "{} {}",
                p["name"].as_str().unwrap(),
                p["to"].as_str().unwrap()
            )
        })
        .collect()
}

/// Regular files of package `pkg` installed in guest `g` (from dpkg's list), below /usr.
fn package_files(root: &Path, g: &str, pkg: &str) -> Vec<String> {
    let info = base(root, g).join("var/lib/dpkg/info");
    let list = fs::read_to_string(info.join(format!("{pkg}.list")))
        .or_else(|_| {
            let arch = fs::read_dir(&info)
                .unwrap()
                .flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .find(|n| n.starts_with(&format!("{pkg}:")) && n.ends_with(".list"))
                .unwrap_or_default();
            fs::read_to_string(info.join(arch))
        })
        .unwrap_or_default();
    list.lines()
        .filter(|p| p.starts_with("/usr/"))
        .filter(|p| {
            fs::symlink_metadata(base(root, g).join(&p[1..]))
                .is_ok_and(|m| m.is_file() && m.len() > 0)
        })
        .map(String::from)
        .collect()
}

#[test]
fn a_fleet_upgrade_fetches_each_package_once_shares_the_result_and_rolls_back_a_broken_guest() {
    assert_root();
    own_mount_namespace();
    let s = Scratch::new("upgrade-real");
    let root = init_root(s.path());
    define_template(&root);
    run_json(cowherd(&root).args(["template", "build", "upg", "--json"]));
    let guests = ["u01", "u02", "u03"];
    run_json(cowherd(&root).args([
        "build",
        "--count",
        "3",
        "--prefix",
        "u",
        "--template",
        "upg",
        "--json",
    ]));
    // A fourth guest whose dpkg was interrupted: apt refuses to upgrade it.
    run_json(cowherd(&root).args(["build", "broken", "--template", "upg", "--json"]));
    cowherd(&root)
        .args([
            "exec",
            "broken",
            "--",
            "sh",
            "-c",
            "touch /var/lib/dpkg/updates/0001",
        ])
        .assert()
        .success();
    let broken_before = merged_manifest(&root, "broken");
    let views_before: Vec<Manifest> = guests.iter().map(|g| merged_manifest(&root, g)).collect();

    // A dry run lists the same pending upgrades everywhere and changes nothing.
    let dry = cowherd(&root)
        .args(["upgrade", "--all", "--dry-run", "--json", "--quiet"])
        .output()
        .unwrap();
    let dry_report = json_of(&dry);
    let pending = packages_of(report_line(&dry_report, "u01"));
    assert!(
        !pending.is_empty(),
        "the archive holds no pending upgrade for this template's packages: {dry_report:#}"
    );
    eprintln!("pending upgrades: {} packages: {pending:?}", pending.len());
    for g in guests {
        assert_eq!(packages_of(report_line(&dry_report, g)), pending, "{g}");
        assert_eq!(report_line(&dry_report, g)["outcome"], "would-upgrade");
    }
    for (g, before) in guests.iter().zip(&views_before) {
        let (d, _) = compare_manifests(before, &merged_manifest(&root, g), EXACT);
        assert!(d.is_empty(), "the dry run changed {g}: {d:?}");
    }

    let out = cowherd(&root)
        .args(["upgrade", "--all", "--jobs", "2", "--json", "--quiet"])
        .output()
        .unwrap();
    let report = json_of(&out);
    assert_eq!(out.status.code(), Some(3), "one guest fails: {report:#}");
    for g in guests {
        let line = report_line(&report, g);
        assert_eq!(line["outcome"], "upgraded", "{g}: {line:#}");
        assert_eq!(packages_of(line), pending, "{g}");
    }
    // Each package list and package file fetched once: all that was downloaded is what one
    // guest received (a tenth more for the broken guest's own refresh at most).
    let downloaded = report["downloaded_bytes"].as_u64().unwrap();
    let one = report_line(&report, "u01")["served_bytes"]
        .as_u64()
        .unwrap();
    assert!(one > 0, "{report:#}");
    assert!(
        downloaded as f64 <= one as f64 * 1.1,
        "downloaded {downloaded} bytes for a fleet that each received {one}: {report:#}"
    );
    // The broken guest is exactly its tree before.
    let broken = report_line(&report, "broken");
    assert_eq!(broken["outcome"], "failed", "{broken:#}");
    assert_eq!(broken["rolled_back"], true);
    let (d, _) = compare_manifests(&broken_before, &merged_manifest(&root, "broken"), EXACT);
    assert!(d.is_empty(), "the failed upgrade changed broken: {d:?}");
    // The upgraded files are one store object in every guest.
    let store = store_inodes(&root);
    let mut checked = 0;
    for p in &pending {
        let pkg = p.split(' ').next().unwrap();
        for f in package_files(&root, "u01", pkg).into_iter().take(5) {
            let inodes: BTreeSet<(u64, u64)> = guests
                .iter()
                .map(|g| ino(&base(&root, g).join(&f[1..])))
                .collect();
            assert_eq!(inodes.len(), 1, "{f} is not one inode in every guest");
            assert!(
                store.contains_key(inodes.first().unwrap()),
                "{f} is not a store object"
            );
            checked += 1;
        }
    }
    assert!(checked > 0, "no upgraded file to check among {pending:?}");
    // Each upgraded guest kept its pre-upgrade snapshot.
    for g in guests {
        let snaps = run_json(cowherd(&root).args(["snapshot", "list", g, "--json"]));
        assert_eq!(snaps.as_array().unwrap().len(), 1, "{g}: {snaps:#}");
        assert_eq!(snaps[0]["made_by"], "upgrade");
    }

    // The template follows: its next version shares the upgraded guests' objects.
    let up = run_json(cowherd(&root).args(["template", "upgrade", "upg", "--json"]));
    assert_eq!(up["built"]["record"]["version"], 2, "{up:#}");
    let tpl_pending = packages_of(&up);
    assert_eq!(tpl_pending, pending);
    run_json(cowherd(&root).args(["build", "fresh", "--template", "upg", "--json"]));
    let mut shared = 0;
    for p in &pending {
        let pkg = p.split(' ').next().unwrap();
        for f in package_files(&root, "u01", pkg).into_iter().take(5) {
            assert_eq!(
                ino(&base(&root, "fresh").join(&f[1..])),
                ino(&base(&root, "u01").join(&f[1..])),
                "{f}: a guest of the upgraded template and an upgraded guest hold different inodes"
            );
            shared += 1;
        }
    }
    assert!(shared > 0);
    let listed = cowherd(&root).args(["template", "list"]).output().unwrap();
    let text = String::from_utf8_lossy(&listed.stdout);
    assert!(text.contains("built ") && text.contains(" ago"), "{text}");
}
