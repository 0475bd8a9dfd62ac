//! The pure parts of the benchmark harness: du counting, manifest comparison and sharing,
//! ratios and targets, and the Markdown table.

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::MetadataExt as _;
use std::path::PathBuf;

use cowherd_benchdata::harness::du::{DiskCounter, disk_usage};
use cowherd_benchdata::harness::manifest::{self, Diff, Entry, Kind, Manifest, Meta, Sharing};
use cowherd_benchdata::harness::report::{
    self, Machine, ReadBound, Report, Run, ScalePoint, SetInfo, ToolResult,
};

// ---- du -----------------------------------------------------------------------------------

#[test]
fn du_counts_each_inode_once() {
    let mut c = DiskCounter::new();
    c.add(1, 10, 8);
    c.add(1, 10, 8); // a second name of the same inode
    c.add(2, 10, 8); // same ino on another device: another inode
    c.add(1, 11, 0);
    let u = c.usage();
    assert_eq!(u.names, 4);
    assert_eq!(u.inodes, 3);
    assert_eq!(u.bytes, 2 * 8 * 512);
}

#[test]
fn du_of_trees_counts_hard_links_once_across_roots() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (dir.path().join("a"), dir.path().join("b"));
    fs::create_dir_all(&a).unwrap();
    fs::create_dir_all(&b).unwrap();
    fs::write(a.join("f"), vec![7u8; 100_000]).unwrap();
    fs::hard_link(a.join("f"), b.join("f")).unwrap();
    fs::hard_link(a.join("f"), a.join("g")).unwrap();
    let blocks = |p: PathBuf| fs::symlink_metadata(p).unwrap().blocks() * 512;
    let expected = blocks(a.clone()) + blocks(b.clone()) + blocks(a.join("f"));
    let u = disk_usage(&[&a, &b]).unwrap();
    assert_eq!(u.bytes, expected);
    assert_eq!(u.inodes, 3);
    assert_eq!(u.names, 5);
    // A missing root counts nothing.
    assert_eq!(disk_usage(&[dir.path().join("none")]).unwrap().names, 0);
}

// ---- manifest -----------------------------------------------------------------------------

fn file(ino: u64, hash: u8, uid: u32, mtime: i64) -> Entry {
    Entry {
        kind: Kind::File,
        meta: Meta {
            mode: 0o644,
            uid,
            gid: 0,
            mtime: (mtime, 0),
            xattrs: Vec::new(),
        },
        size: 10,
        hash: Some([hash; 32]),
        target: None,
        inode: (1, ino),
    }
}

fn dir_entry(ino: u64, mtime: i64) -> Entry {
    Entry {
        kind: Kind::Dir,
        meta: Meta {
            mode: 0o755,
            mtime: (mtime, 0),
            ..Meta::default()
        },
        size: 4096,
        hash: None,
        target: None,
        inode: (1, ino),
    }
}

fn manifest(entries: &[(&str, Entry)]) -> Manifest {
    Manifest {
        entries: entries
            .iter()
            .map(|(p, e)| ((*p).to_owned(), e.clone()))
            .collect::<BTreeMap<_, _>>(),
    }
}

#[test]
fn identical_sets_compare_equal() {
    let m = manifest(&[("g1", dir_entry(1, 5)), ("g1/a", file(2, 1, 0, 5))]);
    // Inode numbers differ in a copy; that is not a difference.
    let mut copy = m.clone();
    for e in copy.entries.values_mut() {
        e.inode.1 += 1000;
    }
    let d = manifest::compare(&m, &copy);
    assert_eq!(d, Diff::default());
    assert!(d.identical() && d.content_identical());
}

#[test]
fn compare_tells_content_metadata_and_directory_mtimes_apart() {
    let master = manifest(&[
        ("g1", dir_entry(1, 5)),
        ("g1/a", file(2, 1, 0, 5)),
        ("g1/b", file(3, 2, 0, 5)),
        ("g1/c", file(4, 3, 0, 5)),
        ("g1/gone", file(5, 3, 0, 5)),
    ]);
    let mut xattr = file(4, 3, 0, 5);
    xattr.meta.xattrs = vec![(b"user.x".to_vec(), b"1".to_vec())];
    let after = manifest(&[
        ("g1", dir_entry(1, 99)),      // directory mtime changed
        ("g1/a", file(2, 9, 0, 5)),    // bytes changed
        ("g1/b", file(3, 2, 1000, 5)), // owner changed
        ("g1/c", xattr),               // xattrs changed
        ("g1/tmp~", file(6, 1, 0, 5)), // left-over name
    ]);
    let d = manifest::compare(&master, &after);
    assert_eq!(
        (
            d.missing,
            d.extra,
            d.kind_changed,
            d.content_changed,
            d.meta_changed,
            d.dir_mtime_changed
        ),
        (1, 1, 0, 1, 2, 1)
    );
    assert!(!d.content_identical());
    assert!(d.examples.iter().any(|e| e == "g1/b: owner changed"));
    assert!(d.examples.iter().any(|e| e == "g1/c: xattrs changed"));
    assert!(d.examples.iter().any(|e| e == "g1/gone: missing"));
    // Content differences come first, whatever the path order.
    assert_eq!(
        d.examples,
        [
            "g1/a: content changed",
            "g1/gone: missing",
            "g1/tmp~: not in the master",
            "g1/b: owner changed",
            "g1/c: xattrs changed"
        ]
    );
}

#[test]
fn a_directory_mode_change_is_not_just_an_mtime_change() {
    let master = manifest(&[("g1", dir_entry(1, 5))]);
    let mut d = dir_entry(1, 6);
    d.meta.mode = 0o700;
    let diff = manifest::compare(&master, &manifest(&[("g1", d)]));
    assert_eq!((diff.meta_changed, diff.dir_mtime_changed), (1, 0));
}

#[test]
fn sharing_counts_linked_and_wrongly_linked_paths() {
    // Master: g1/a and g1/a2 are one inode; g2/a equal bytes and metadata; g3/a equal bytes,
    // other owner; g1/x and g2/x unrelated.
    let master = manifest(&[
        ("g1/a", file(1, 1, 0, 5)),
        ("g1/a2", file(1, 1, 0, 5)),
        ("g2/a", file(2, 1, 0, 5)),
        ("g3/a", file(3, 1, 1000, 5)),
        ("g1/x", file(4, 2, 0, 5)),
        ("g2/x", file(5, 3, 0, 5)),
    ]);
    // A careful tool: g2/a joins g1's inode.
    let careful = manifest(&[
        ("g1/a", file(100, 1, 0, 5)),
        ("g1/a2", file(100, 1, 0, 5)),
        ("g2/a", file(100, 1, 0, 5)),
        ("g3/a", file(103, 1, 1000, 5)),
        ("g1/x", file(104, 2, 0, 5)),
        ("g2/x", file(105, 3, 0, 5)),
    ]);
    assert_eq!(
        manifest::sharing(&master, &careful),
        Sharing {
            linked_paths: 1,
            wrong_links: 0,
            inodes: 4
        }
    );
    // A careless tool: everything with equal bytes on one inode, g3/a included.
    let careless = manifest(&[
        ("g1/a", file(100, 1, 0, 5)),
        ("g1/a2", file(100, 1, 0, 5)),
        ("g2/a", file(100, 1, 0, 5)),
        ("g3/a", file(100, 1, 0, 5)),
        ("g1/x", file(104, 2, 0, 5)),
        ("g2/x", file(105, 3, 0, 5)),
    ]);
    let s = manifest::sharing(&master, &careless);
    assert_eq!((s.linked_paths, s.wrong_links, s.inodes), (2, 4, 3));
    // Its guests no longer look the same: g3/a shows root as owner.
    let d = manifest::compare(&master, &careless);
    assert!(d.content_identical() && !d.identical());
    assert_eq!(d.meta_changed, 1);
}

#[test]
fn manifests_of_real_trees_see_links_xattrs_and_content() {
    let dir = tempfile::tempdir().unwrap();
    let g = dir.path().join("g1");
    fs::create_dir_all(g.join("d")).unwrap();
    fs::write(g.join("d/f"), b"hello").unwrap();
    fs::hard_link(g.join("d/f"), g.join("d/h")).unwrap();
    std::os::unix::fs::symlink("d/f", g.join("s")).unwrap();
    xattr::set(g.join("d/f"), "user.k", b"v").unwrap();
    let m = Manifest::build(&[("g1".to_owned(), g.clone())]).unwrap();
    let keys: Vec<&str> = m.entries.keys().map(String::as_str).collect();
    assert_eq!(keys, ["g1", "g1/d", "g1/d/f", "g1/d/h", "g1/s"]);
    let f = &m.entries["g1/d/f"];
    assert_eq!(f.hash, Some(*blake3::hash(b"hello").as_bytes()));
    assert_eq!(f.inode, m.entries["g1/d/h"].inode);
    assert_eq!(f.meta.xattrs, vec![(b"user.k".to_vec(), b"v".to_vec())]);
    assert_eq!(m.entries["g1/s"].target.as_deref(), Some(&b"d/f"[..]));
    assert_eq!(m.file_names(), 2);
    assert_eq!(m.file_inodes(), (1, 5));
    // Changing a byte is seen.
    fs::write(g.join("d/f"), b"hellO").unwrap();
    let after = Manifest::build(&[("g1".to_owned(), g)]).unwrap();
    let d = manifest::compare(&m, &after);
    assert_eq!(d.content_changed, 2);
}

// ---- report -------------------------------------------------------------------------------

fn run(wall: f64, rss_kib: u64) -> Run {
    Run {
        wall_secs: wall,
        user_secs: wall,
        sys_secs: 0.0,
        peak_rss_kib: rss_kib,
        exit_code: 0,
        cold: true,
    }
}

fn tool(name: &str, first: f64, second: f64, rss: u64, after: u64, wrong: u64) -> ToolResult {
    ToolResult {
        tool: name.to_owned(),
        command: format!("{name} <dirs>"),
        first: Some(run(first, rss)),
        second: Some(run(second, rss / 2)),
        bytes_after_first: after,
        bytes_after: after,
        sharing: Sharing {
            linked_paths: 1234,
            wrong_links: wrong,
            inodes: 10,
        },
        diff: Diff::default(),
        reported_linked: None,
        index_bytes: None,
        store_dir_bytes: None,
        error: None,
    }
}

fn sample() -> Report {
    Report {
        set: SetInfo {
            source: "synthetic".into(),
            description: "synthetic, 10 guests".into(),
            seed: 7,
            guests: 10,
            file_names: 100_000,
            file_inodes: 99_000,
            logical_bytes: 5 << 30,
            bytes_on_disk: 1000,
            generate_secs: 12.0,
        },
        machine: Machine {
            cpus: 2,
            ..Machine::default()
        },
        caches_dropped: true,
        read_bound: Some(ReadBound {
            run: run(8.0, 5000),
            files: 99_000,
            bytes: 5 << 30,
        }),
        tools: vec![
            tool("cowherd", 10.0, 0.4, 100_000, 400, 0),
            tool("hardlink", 30.0, 5.0, 5_000, 410, 0),
            tool("jdupes", 25.0, 4.0, 4_000, 390, 77),
        ],
        scale: Vec::new(),
        ratios: Vec::new(),
        targets: Vec::new(),
    }
}

#[test]
fn ratios_are_cowherd_over_peer() {
    let r = report::ratios(&sample());
    assert_eq!(r.len(), 2);
    assert_eq!(r[0].peer, "hardlink");
    assert!((r[0].first_time.unwrap() - 10.0 / 30.0).abs() < 1e-9);
    assert!((r[0].second_time.unwrap() - 0.4 / 5.0).abs() < 1e-9);
    assert!((r[0].first_rss.unwrap() - 20.0).abs() < 1e-9);
    assert!((r[1].bytes_after.unwrap() - 400.0 / 390.0).abs() < 1e-9);
}

#[test]
fn a_failed_run_yields_no_ratio() {
    let mut rep = sample();
    rep.tools[1].first.as_mut().unwrap().exit_code = 1;
    let r = report::ratios(&rep);
    assert_eq!(r[0].first_time, None);
    assert!(r[1].first_time.is_some());
}

fn verdicts(r: &Report) -> Vec<Option<bool>> {
    report::targets(r).iter().map(|t| t.met).collect()
}

#[test]
fn targets_are_judged_on_the_numbers() {
    let rep = sample();
    let t = report::targets(&rep);
    assert_eq!(t.len(), 6);
    // 25 s / 10 s = 2.5x faster than jdupes (the fastest peer): met.
    assert_eq!(t[0].met, Some(true), "{}", t[0].detail);
    assert!(t[0].detail.contains("jdupes"), "{}", t[0].detail);
    // 10 s vs 8 s read bound = 1.25x: met.
    assert_eq!(t[1].met, Some(true));
    // 10 s / 0.4 s = 25x: met.
    assert_eq!(t[2].met, Some(true));
    // 100,000 KiB = 102.4 MB: met.
    assert_eq!(t[3].met, Some(true));
    // No scale points: not measured.
    assert_eq!(t[4].met, None);
    // cowherd saved 600, hardlink 590: met.
    assert_eq!(t[5].met, Some(true));

    let mut slow = sample();
    slow.tools[0].first = Some(run(13.0, 400_000));
    slow.tools[0].bytes_after = 420;
    assert_eq!(
        verdicts(&slow),
        [
            Some(false),
            Some(false),
            Some(true),
            Some(false),
            None,
            Some(false)
        ]
    );

    let mut alone = sample();
    alone.tools.truncate(1);
    alone.read_bound = None;
    assert_eq!(
        verdicts(&alone),
        [None, None, Some(true), Some(true), None, None]
    );
}

#[test]
fn rss_growth_exponent_comes_from_the_scale_points() {
    let p = |guests, files, rss| ScalePoint {
        guests,
        files,
        first: run(1.0, rss),
        second: run(0.1, rss / 2),
    };
    let sub = [
        p(10, 100_000, 50_000),
        p(20, 200_000, 70_000),
        p(40, 400_000, 98_000),
    ];
    let k = report::rss_exponent(&sub).unwrap();
    assert!((k - (98.0f64 / 50.0).ln() / 4f64.ln()).abs() < 1e-9);
    let mut rep = sample();
    rep.scale = sub.to_vec();
    assert_eq!(report::targets(&rep)[4].met, Some(true));
    rep.scale = vec![p(10, 100_000, 50_000), p(40, 400_000, 250_000)];
    assert_eq!(report::targets(&rep)[4].met, Some(false));
    assert_eq!(report::rss_exponent(&[p(10, 100_000, 50_000)]), None);
}

#[test]
fn markdown_table_has_a_row_per_tool_and_the_targets() {
    let mut rep = sample();
    rep.evaluate();
    let md = report::markdown(&rep);
    let rows: Vec<&str> = md.lines().filter(|l| l.starts_with("| ")).collect();
    // Header, cowherd, hardlink, jdupes, read bound; ratios header and two peers.
    assert!(
        rows.iter()
            .any(|l| l.starts_with("| cowherd ¹ | 10.00 s | 102.4 MB | 400 ms |"))
    );
    let jdupes = rows.iter().find(|l| l.starts_with("| jdupes |")).unwrap();
    assert!(jdupes.contains("| **77** |"), "{jdupes}");
    assert!(jdupes.ends_with("| 0.40 | 0.10 |"), "{jdupes}");
    assert!(
        rows.iter()
            .any(|l| l.starts_with("| read every candidate byte | 8.00 s"))
    );
    assert!(md.contains("- **met** first unify ≥ 2x faster than the fastest peer"));
    assert!(md.contains("- not measured peak RSS grows sub-linearly"));
    assert!(md.contains("`rules = []`"));
    // Every table row has the header's number of cells.
    let header = rows[0].matches('|').count();
    for row in rows.iter().take(5) {
        assert_eq!(row.matches('|').count(), header, "{row}");
    }
}

#[test]
fn numbers_are_formatted_for_people() {
    assert_eq!(report::thousands(0), "0");
    assert_eq!(report::thousands(999), "999");
    assert_eq!(report::thousands(1_234_567), "1,234,567");
    assert_eq!(report::bytes(512), "512 B");
    assert_eq!(report::bytes(1536), "1.5 KiB");
    assert_eq!(report::bytes(5 << 30), "5.00 GiB");
    assert_eq!(report::secs(0.25), "250 ms");
    assert_eq!(report::secs(12.345), "12.35 s");
    assert_eq!(report::secs(123.4), "123.4 s");
    assert_eq!(report::mb(300_000_000), "300.0 MB");
}

#[test]
fn a_scale_only_report_has_no_tool_table() {
    let mut rep = sample();
    rep.tools.clear();
    rep.read_bound = None;
    rep.scale = vec![ScalePoint {
        guests: 10,
        files: 100_000,
        first: run(10.0, 50_000),
        second: run(0.5, 20_000),
    }];
    rep.evaluate();
    let md = report::markdown(&rep);
    assert!(!md.contains("| tool |"));
    assert!(md.contains("| 10 | 100,000 | 10.00 s | 51.2 MB | 500 ms | 20.5 MB |"));
}

#[test]
fn a_grown_directory_is_a_directory_change_not_content() {
    let master = manifest(&[("g1", dir_entry(1, 5))]);
    let mut grown = dir_entry(1, 5);
    grown.size += 4096;
    let diff = manifest::compare(&master, &manifest(&[("g1", grown)]));
    assert_eq!((diff.content_changed, diff.dir_size_changed), (0, 1));
    assert!(diff.content_identical());
}
