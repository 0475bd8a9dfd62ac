//! The pure parts of the benchmark harness: du counting, manifest comparison and sharing,
//! the interleaved schedule, medians and pairwise ratios, targets, the scale set's clones and
//! changes, and the Markdown tables.

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::MetadataExt as _;
use std::path::PathBuf;

use cowherd_benchdata::harness::du::{DiskCounter, disk_usage};
use cowherd_benchdata::harness::manifest::{self, Diff, Entry, Kind, Manifest, Meta, Sharing};
use cowherd_benchdata::harness::report::{
    self, ChangedGuest, Checks, Machine, ReadBound, Report, Run, ScalePoint, SetInfo, Spread,
    ToolResult, ToolRun,
};
use cowherd_benchdata::harness::scale::{self, Change};
use cowherd_benchdata::harness::schedule::{self, Slot};

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

// ---- schedule -----------------------------------------------------------------------------

/// The tool names of a round, `C` for the reference (tool 0).
fn order(round: &[Slot]) -> String {
    round
        .iter()
        .map(|s| {
            if s.tool == 0 {
                "C".to_owned()
            } else {
                format!("p{}", s.tool)
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

#[test]
fn one_peer_alternates_sides_of_cowherd() {
    let plan = schedule::schedule(2, Some(0), 3);
    let orders: Vec<String> = plan.iter().map(|r| order(r)).collect();
    assert_eq!(orders, ["C p1", "p1 C", "C p1"]);
    assert_eq!(plan[0][1].pair, Some(0));
    assert_eq!(plan[1][0].pair, Some(1));
    assert_eq!(plan[0][0].pair, None);
}

#[test]
fn peers_run_two_at_a_time_around_cowherd_and_rotate() {
    let plan = schedule::schedule(6, Some(0), 3);
    let orders: Vec<String> = plan.iter().map(|r| order(r)).collect();
    assert_eq!(
        orders,
        [
            "p1 C p2 p3 C p4 C p5",
            "p2 C p3 p4 C p5 p1 C",
            "p3 C p4 p5 C p1 C p2"
        ]
    );
    for round in &plan {
        // Every peer once, paired with a cowherd run right next to it.
        let mut peers: Vec<usize> = round
            .iter()
            .filter(|s| s.tool != 0)
            .map(|s| s.tool)
            .collect();
        peers.sort_unstable();
        assert_eq!(peers, [1, 2, 3, 4, 5]);
        for (i, s) in round.iter().enumerate() {
            match s.pair {
                Some(p) => {
                    assert_ne!(s.tool, 0);
                    assert_eq!(round[p].tool, 0);
                    assert_eq!(i.abs_diff(p), 1, "{round:?}");
                }
                None => assert_eq!(s.tool, 0),
            }
        }
        assert_eq!(round.iter().filter(|s| s.tool == 0).count(), 3);
    }
    // Two peers: one on each side, swapping every round.
    let two: Vec<String> = schedule::schedule(3, Some(0), 2)
        .iter()
        .map(|r| order(r))
        .collect();
    assert_eq!(two, ["p1 C p2", "p2 C p1"]);
}

#[test]
fn without_a_reference_the_tools_rotate_and_alone_it_runs_once_a_round() {
    let plan = schedule::schedule(3, None, 3);
    let tools: Vec<Vec<usize>> = plan
        .iter()
        .map(|r| r.iter().map(|s| s.tool).collect())
        .collect();
    assert_eq!(tools, [vec![0, 1, 2], vec![1, 2, 0], vec![2, 0, 1]]);
    assert!(plan.iter().flatten().all(|s| s.pair.is_none()));
    let alone = schedule::schedule(1, Some(0), 2);
    assert_eq!(
        alone,
        vec![
            vec![Slot {
                tool: 0,
                pair: None
            }];
            2
        ]
    );
    // The reference need not be the first tool.
    let plan = schedule::schedule(2, Some(1), 1);
    assert_eq!(
        plan[0],
        [
            Slot {
                tool: 1,
                pair: None
            },
            Slot {
                tool: 0,
                pair: Some(0)
            }
        ]
    );
    assert_eq!(
        schedule::describe(&plan[0], &["hardlink", "cowherd"]),
        "cowherd, hardlink"
    );
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

fn trun(
    seq: usize,
    round: usize,
    first: f64,
    second: f64,
    rss: u64,
    pair: Option<usize>,
) -> ToolRun {
    ToolRun {
        first: Some(run(first, rss)),
        second: Some(run(second, rss / 2)),
        ..ToolRun::new(seq, round, pair)
    }
}

fn checks(seq: usize, after: u64, wrong: u64) -> Checks {
    Checks {
        seq,
        bytes_after_first: after,
        bytes_after: after,
        sharing: Sharing {
            linked_paths: 1234,
            wrong_links: wrong,
            inodes: 10,
        },
        diff: Diff::default(),
        store_dir_bytes: None,
    }
}

fn tool(name: &str, runs: Vec<ToolRun>, after: u64, wrong: u64) -> ToolResult {
    ToolResult {
        checks: Some(checks(runs[0].seq, after, wrong)),
        runs,
        ..ToolResult::new(name, format!("{name} <dirs>"))
    }
}

/// Three rounds of cowherd, hardlink and jdupes in the order of the schedule:
/// `h C j`, `j C h`, `h C j` (runs 1–9).
fn sample() -> Report {
    let mut cowherd = tool(
        "cowherd",
        vec![
            trun(2, 1, 10.0, 0.5, 80_000, None),
            trun(5, 2, 12.0, 0.6, 80_000, None),
            trun(8, 3, 11.0, 0.4, 79_000, None),
        ],
        400,
        0,
    );
    for r in &mut cowherd.runs {
        r.index_bytes = Some(1_000_000);
        r.files_indexed = Some(10_000);
    }
    Report {
        set: SetInfo {
            source: "synthetic".into(),
            description: "synthetic, 40 guests".into(),
            seed: 7,
            guests: 40,
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
        rounds: 3,
        reference: Some("cowherd".into()),
        order: vec![
            "hardlink, cowherd, jdupes".into(),
            "jdupes, cowherd, hardlink".into(),
            "hardlink, cowherd, jdupes".into(),
        ],
        read_bound_before: Some(ReadBound {
            run: run(8.0, 5000),
            files: 99_000,
            bytes: 5 << 30,
        }),
        read_bound_after: Some(ReadBound {
            run: run(10.0, 5000),
            files: 99_000,
            bytes: 5 << 30,
        }),
        tools: vec![
            cowherd,
            tool(
                "hardlink",
                vec![
                    trun(1, 1, 25.0, 2.0, 5_000, Some(2)),
                    trun(6, 2, 30.0, 1.5, 5_000, Some(5)),
                    trun(7, 3, 20.0, 1.6, 5_000, Some(8)),
                ],
                410,
                0,
            ),
            tool(
                "jdupes",
                vec![
                    trun(3, 1, 30.0, 3.0, 4_000, Some(2)),
                    trun(4, 2, 24.0, 3.0, 4_000, Some(5)),
                    trun(9, 3, 22.0, 3.0, 4_000, Some(8)),
                ],
                390,
                77,
            ),
        ],
        scale: Vec::new(),
        scale_note: None,
        ratios: Vec::new(),
        targets: Vec::new(),
    }
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() < 1e-9
}

#[test]
fn spreads_are_median_min_and_max() {
    assert_eq!(Spread::of(vec![]), None);
    let s = Spread::of(vec![3.0, 1.0, 2.0]).unwrap();
    assert_eq!((s.median, s.min, s.max, s.n), (2.0, 1.0, 3.0, 3));
    let s = Spread::of(vec![4.0, 1.0, 2.0, 3.0]).unwrap();
    assert_eq!((s.median, s.min, s.max, s.n), (2.5, 1.0, 4.0, 4));
    let rep = sample();
    let c = rep.tool("cowherd").unwrap();
    assert_eq!(c.first().unwrap().median, 11.0);
    assert_eq!(c.second().unwrap().median, 0.5);
    // Peak RSS of a copy: the larger of its two runs.
    let rss = c.rss().unwrap();
    assert_eq!(
        (rss.median, rss.min),
        (80_000.0 * 1024.0, 79_000.0 * 1024.0)
    );
    assert_eq!(c.max_rss(), Some(80_000 * 1024));
    assert_eq!(c.index_per_file().unwrap().median, 100.0);
}

#[test]
fn ratios_are_peer_over_the_adjacent_cowherd_run() {
    let r = report::ratios(&sample());
    assert_eq!(r.len(), 2);
    assert_eq!(r[0].peer, "hardlink");
    let pairs: Vec<(usize, usize)> = r[0].pairs.iter().map(|p| (p.seq, p.cowherd_seq)).collect();
    assert_eq!(pairs, [(1, 2), (6, 5), (7, 8)]);
    // 25/10, 30/12, 20/11: median 2.5.
    let first = r[0].first_time.unwrap();
    assert!(close(first.median, 2.5) && close(first.min, 20.0 / 11.0) && first.n == 3);
    // 2/0.5, 1.5/0.6, 1.6/0.4: median 4.
    assert!(close(r[0].second_time.unwrap().median, 4.0));
    // Medians of the per-copy peak RSS; bytes of the checked copies.
    assert!(close(r[0].rss.unwrap(), 5_000.0 / 80_000.0));
    assert!(close(r[1].bytes_after.unwrap(), 390.0 / 400.0));
}

#[test]
fn a_failed_run_yields_no_pair() {
    let mut rep = sample();
    rep.tools[1].runs[0].first.as_mut().unwrap().exit_code = 1;
    // …nor does a failed cowherd run for its peers.
    rep.tools[0].runs[2].second.as_mut().unwrap().exit_code = 1;
    let r = report::ratios(&rep);
    assert_eq!(r[0].first_time.unwrap().n, 2);
    assert_eq!(r[0].second_time.unwrap().n, 2);
    assert_eq!(r[1].first_time.unwrap().n, 3);
    assert_eq!(r[1].second_time.unwrap().n, 2);
    assert_eq!(rep.tools[1].first().unwrap().n, 2);
}

fn verdicts(r: &Report) -> Vec<Option<bool>> {
    report::targets(r).iter().map(|t| t.met).collect()
}

#[test]
fn main_targets_are_judged_on_the_medians_of_the_pairs() {
    let mut rep = sample();
    rep.evaluate();
    let t = &rep.targets;
    let names: Vec<&str> = t.iter().map(|t| t.target.as_str()).collect();
    assert_eq!(t.len(), 6, "{names:?}");
    assert!(names[0].contains("hardlink") && names[0].starts_with("first unify ≥ 2x"));
    // hardlink ÷ cowherd 2.5 ≥ 2: met.
    assert_eq!(t[0].met, Some(true), "{}", t[0].detail);
    // 11 s ÷ mean(8 s, 10 s) = 1.22 ≤ 1.25: met.
    assert_eq!(t[1].met, Some(true), "{}", t[1].detail);
    assert!(t[1].detail.contains("1.22"), "{}", t[1].detail);
    // Re-run: hardlink ÷ cowherd 4 ≥ 3: met.
    assert_eq!(t[2].met, Some(true), "{}", t[2].detail);
    // 80,000 KiB = 81.9 MB ≤ 84 MB at 40 guests: met.
    assert_eq!(t[3].met, Some(true), "{}", t[3].detail);
    // 100 B a file ≤ 120: met.
    assert_eq!(t[4].met, Some(true), "{}", t[4].detail);
    // cowherd saved 600, hardlink 590: met.
    assert_eq!(t[5].met, Some(true), "{}", t[5].detail);

    let mut slow = sample();
    for r in &mut slow.tools[0].runs {
        r.first = Some(run(14.0, 90_000));
        r.second = Some(run(0.6, 1_000));
        r.index_bytes = Some(1_300_000);
    }
    slow.tools[0].checks.as_mut().unwrap().bytes_after = 420;
    assert_eq!(verdicts(&slow), [Some(false); 6]);

    let mut alone = sample();
    alone.tools.truncate(1);
    alone.read_bound_before = None;
    alone.read_bound_after = None;
    assert_eq!(
        verdicts(&alone),
        [None, None, None, Some(true), Some(true), None]
    );
}

#[test]
fn the_rss_target_is_stated_for_40_guests() {
    let mut rep = sample();
    rep.set.guests = 10;
    let t = &report::targets(&rep)[3];
    assert_eq!(t.met, Some(true));
    assert!(t.detail.contains("target stated for 40"), "{}", t.detail);
}

fn point(guests: usize, rss: u64, second: f64, find: f64, changed: f64) -> ScalePoint {
    ScalePoint {
        guests,
        real_guests: guests.min(40),
        clones: guests.saturating_sub(40),
        files: guests as u64 * 10_000,
        build_secs: 60.0,
        first: run(100.0, rss),
        first_hashed_bytes: Some(14 << 30),
        first_linked: Some(guests as u64 * 9_000),
        second: run(second, rss / 2),
        find_before: Some(run(find, 3_000)),
        find_after: Some(run(find + 1.0, 3_000)),
        changed: Some(ChangedGuest {
            guest: "c500-g20".into(),
            files: 200,
            bytes: 5 << 20,
            hashed_files: Some(190),
            run: run(changed, 20_000),
        }),
        index_bytes: Some(guests as u64 * 10_000 * 100),
        files_indexed: Some(guests as u64 * 10_000),
    }
}

fn scale_report(points: Vec<ScalePoint>) -> Report {
    let mut rep = sample();
    rep.tools.clear();
    rep.read_bound_before = None;
    rep.read_bound_after = None;
    rep.scale = points;
    rep.scale_note = Some("Beyond 40 guests, clones.".into());
    rep
}

#[test]
fn scale_targets_are_judged_at_the_largest_point() {
    let good = scale_report(vec![
        point(40, 80_000, 3.0, 4.0, 0.3),
        point(100, 82_000, 7.0, 9.0, 0.35),
        point(500, 84_000, 35.0, 50.0, 0.5),
    ]);
    let t = report::targets(&good);
    let names: Vec<&str> = t.iter().map(|t| t.target.as_str()).collect();
    assert_eq!(names.len(), 5, "{names:?}");
    assert!(names[1].starts_with("peak RSS flat"));
    assert!(names[3].starts_with("re-run over 500"));
    assert!(names[4].starts_with("`unify G`"));
    assert_eq!(verdicts(&good), [Some(true); 5]);
    assert!(
        t[3].detail.contains("re-run 35.00 s vs find 50.00 s"),
        "{}",
        t[3].detail
    );
    assert!(!t[3].detail.contains("stated for"), "{}", t[3].detail);

    // RSS grows 25%, the re-run is slower than find, unify G takes 1.5 s at 500 guests.
    let bad = scale_report(vec![
        point(40, 80_000, 3.0, 4.0, 0.3),
        point(500, 100_000, 60.0, 50.0, 1.5),
    ]);
    assert_eq!(
        verdicts(&bad),
        [
            Some(true),
            Some(false),
            Some(true),
            Some(false),
            Some(false)
        ]
    );
    // A single point: flatness not measured; targets stated for 500 say so.
    let one = scale_report(vec![point(8, 80_000, 3.0, 4.0, 0.3)]);
    let t = report::targets(&one);
    assert_eq!(t[1].met, None);
    assert!(
        t[3].detail.contains("target stated for 500"),
        "{}",
        t[3].detail
    );
}

#[test]
fn flatness_is_relative_to_the_reference() {
    assert!(report::flat(100.0, &[100.0, 110.0, 91.0], 0.10).0);
    let (ok, dev) = report::flat(100.0, &[100.0, 111.0], 0.10);
    assert!(!ok && close(dev, 0.11));
    assert!(!report::flat(0.0, &[0.0], 0.10).0);
}

#[test]
fn markdown_has_the_medians_the_pairs_and_every_run_in_order() {
    let mut rep = sample();
    rep.evaluate();
    let md = report::markdown(&rep);
    let rows: Vec<&str> = md.lines().filter(|l| l.starts_with("| ")).collect();
    let cow = rows
        .iter()
        .find(|l| l.starts_with("| cowherd ¹ |"))
        .unwrap();
    assert!(
        cow.starts_with("| cowherd ¹ | 3 | 11.00 s (10.00 s–12.00 s) | 500 ms (400 ms–600 ms) |"),
        "{cow}"
    );
    assert!(cow.ends_with("| – | – | 100 |"), "{cow}");
    let hl = rows
        .iter()
        .find(|l| l.starts_with("| hardlink | 3 |"))
        .unwrap();
    assert!(
        hl.contains("| 2.50 (1.82–2.50) | 4.00 (2.50–4.00) | – |"),
        "{hl}"
    );
    assert!(md.contains("| read every candidate byte once, before round 1 | 1 | 8.00 s |"));
    assert!(md.contains("| read every candidate byte once, after round 3 | 1 | 10.00 s |"));
    assert!(
        md.contains("(+25% time: the disk's read speed changed"),
        "{md}"
    );
    assert!(md.contains("- round 2: jdupes, cowherd, hardlink"));
    // The checks table: jdupes' wrong links in bold.
    let jd = rows
        .iter()
        .find(|l| l.starts_with("| jdupes | ") && l.contains("identical"))
        .unwrap();
    assert!(jd.contains("| **77** |"), "{jd}");
    // Every run in order, the read bounds first and last.
    let seq: Vec<&str> = rows
        .iter()
        .filter(|l| {
            l.contains(" | read bound |")
                || l.contains(" | cowherd |")
                || l.contains(" | hardlink |")
                || l.contains(" | jdupes |")
        })
        .copied()
        .collect();
    assert!(
        seq[0].starts_with("| 0 | – | read bound | 8.00 s"),
        "{seq:?}"
    );
    assert!(
        seq[1].starts_with("| 1 | 1 | hardlink | 25.00 s | 2.00 s |"),
        "{seq:?}"
    );
    assert!(seq[1].ends_with("| #2 | 2.50 / 4.00 |"), "{seq:?}");
    assert!(seq[9].starts_with("| 9 | 3 | jdupes |"), "{seq:?}");
    assert!(
        seq[10].starts_with("| 10 | – | read bound | 10.00 s"),
        "{seq:?}"
    );
    assert!(md.contains("- **met** first unify ≥ 2x faster than util-linux hardlink"));
    // Every row of a table has its header's number of cells.
    let mut header = 0;
    for line in md.lines() {
        if !line.starts_with('|') {
            header = 0;
            continue;
        }
        let cells = line.matches('|').count();
        if header == 0 {
            header = cells;
        }
        assert_eq!(cells, header, "{line}");
    }
}

#[test]
fn a_scale_report_marks_its_targets_per_row() {
    let mut rep = scale_report(vec![
        point(40, 80_000, 3.0, 4.0, 0.3),
        point(500, 100_000, 60.0, 50.0, 1.5),
    ]);
    rep.evaluate();
    let md = report::markdown(&rep);
    assert!(!md.contains("| tool |"));
    assert!(md.contains("Beyond 40 guests, clones."));
    let rows: Vec<&str> = md.lines().filter(|l| l.starts_with("| ")).collect();
    let r40 = rows
        .iter()
        .find(|l| l.starts_with("| 40 (40 + 0) |"))
        .unwrap();
    assert!(r40.contains("| 0.75 — met |"), "{r40}");
    assert!(r40.contains("| 81.9 MB — met |"), "{r40}");
    assert!(r40.ends_with("| 100 — met |"), "{r40}");
    let r500 = rows
        .iter()
        .find(|l| l.starts_with("| 500 (40 + 460) |"))
        .unwrap();
    assert!(r500.contains("| 5,000,000 |"), "{r500}");
    assert!(r500.contains("| 1.20 — **NOT MET** |"), "{r500}");
    assert!(
        r500.contains("1.50 s (200 files of c500-g20, 190 read) — **NOT MET**"),
        "{r500}"
    );
    assert!(r500.contains("102.4 MB (+25%) — **NOT MET**"), "{r500}");
    assert!(md.contains("- **NOT MET** peak RSS flat (±10%) from 40 to 500 guests"));
    let header = rows[0].matches('|').count();
    for row in &rows {
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

// ---- scale set ----------------------------------------------------------------------------

fn guest_files() -> Vec<String> {
    let mut files: Vec<String> = [
        "etc/hostname",
        "etc/hosts",
        "etc/machine-id",
        "etc/ssh/ssh_host_rsa_key",
        "etc/ssh/ssh_host_rsa_key.pub",
        "root/.bash_history",
        "home/user/.bashrc",
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .collect();
    for i in 0..100 {
        files.push(format!("etc/conf{i:03}.conf"));
        files.push(format!("var/log/log{i:03}.log"));
        files.push(format!("usr/lib/file{i:03}.so"));
        files.push(format!("home/user/doc{i:03}.txt"));
    }
    files.sort();
    files
}

#[test]
fn clone_divergence_is_seeded_and_bounded() {
    let files = guest_files();
    let a = scale::clone_divergence(7, "c041-g01", &files);
    assert_eq!(a, scale::clone_divergence(7, "c041-g01", &files));
    assert_ne!(a, scale::clone_divergence(7, "c042-g02", &files));
    assert_ne!(a, scale::clone_divergence(8, "c041-g01", &files));
    let count = |c: Change| a.iter().filter(|(_, x)| *x == c).count();
    assert_eq!(count(Change::Identity), 5);
    assert_eq!(count(Change::Log), scale::CLONE_LOGS);
    assert_eq!(count(Change::Config), scale::CLONE_CONFIGS);
    assert_eq!(count(Change::User), scale::CLONE_USER);
    for (path, change) in &a {
        let ok = match change {
            Change::Identity => path.starts_with("etc/"),
            Change::Log => path.starts_with("var/log/"),
            Change::Config => path.starts_with("etc/conf"),
            Change::User => path.starts_with("home/") || path.starts_with("root/"),
        };
        assert!(ok, "{path} {change:?}");
        assert!(!path.starts_with("usr/"));
    }
    // Sorted, no path twice.
    let mut sorted = a.clone();
    sorted.sort();
    sorted.dedup_by(|x, y| x.0 == y.0);
    assert_eq!(sorted, a);
    // A small guest gives what it has.
    let few = vec!["etc/hostname".to_owned(), "var/log/syslog".to_owned()];
    assert_eq!(
        scale::clone_divergence(7, "c041-g01", &few),
        [
            ("etc/hostname".to_owned(), Change::Identity),
            ("var/log/syslog".to_owned(), Change::Log)
        ]
    );
}

#[test]
fn diverged_content_is_the_clones_own() {
    let host = scale::diverged_content(
        7,
        "c041-g01",
        "etc/hostname",
        Change::Identity,
        b"web-g01\n",
    );
    assert_eq!(host, b"c041-g01\n");
    let id = scale::diverged_content(7, "c041-g01", "etc/machine-id", Change::Identity, b"");
    assert_eq!(id.len(), 33);
    assert_eq!(
        id,
        scale::diverged_content(
            7,
            "c041-g01",
            "var/lib/dbus/machine-id",
            Change::Identity,
            b"x"
        )
    );
    assert_ne!(
        id,
        scale::diverged_content(7, "c042-g01", "etc/machine-id", Change::Identity, b"")
    );
    for change in [Change::Identity, Change::Log, Change::Config, Change::User] {
        for original in [&b""[..], b"\n", b"abc def\n", &[0u8, 1, 2, 255][..]] {
            let new = scale::diverged_content(7, "c041-g01", "some/file", change, original);
            assert_ne!(new, original, "{change:?} {original:?}");
            assert_eq!(
                new,
                scale::diverged_content(7, "c041-g01", "some/file", change, original)
            );
        }
    }
    let log = scale::diverged_content(7, "c041-g01", "var/log/syslog", Change::Log, b"old\n");
    assert!(log.starts_with(b"old\n") && log.len() > 10);
    let off = scale::diverged_mtime_offset(7, "c041-g01", "etc/hosts");
    assert!(off.as_secs() >= 3_600 && off.as_secs() < 60 * 86_400 + 3_600);
}

#[test]
fn an_upgrade_picks_usr_files_by_seed() {
    let files = guest_files();
    let a = scale::pick_upgrade(7, "g40", &files, 20);
    assert_eq!(a.len(), 20);
    assert!(a.iter().all(|p| p.starts_with("usr/")));
    assert_eq!(a, scale::pick_upgrade(7, "g40", &files, 20));
    assert_ne!(a, scale::pick_upgrade(7, "g39", &files, 20));
    assert!(a.windows(2).all(|w| w[0] < w[1]));
    // More than there are: all of them.
    assert_eq!(scale::pick_upgrade(7, "g40", &files, 1000).len(), 100);
    // No usr/: any file.
    let etc = vec!["etc/a".to_owned(), "etc/b".to_owned()];
    assert_eq!(scale::pick_upgrade(7, "g40", &etc, 5), etc);
    for len in [1u64, 5, 16, 17, 1 << 20] {
        let (offset, mask) = scale::upgrade_patch(7, "g40", "usr/x", len);
        assert!(offset + mask.len() as u64 <= len, "{len}");
        assert_eq!(mask.len() as u64, len.min(16));
        assert!(mask.iter().all(|&b| b != 0));
    }
}

#[test]
fn clone_names_keep_real_guests_and_name_the_source() {
    let masters: Vec<String> = ["g01", "g02", "g03"]
        .iter()
        .map(|s| (*s).to_owned())
        .collect();
    let names: Vec<String> = (0..7).map(|i| scale::guest_name(i, 7, &masters)).collect();
    assert_eq!(
        names,
        [
            "g01", "g02", "g03", "c004-g01", "c005-g02", "c006-g03", "c007-g01"
        ]
    );
    assert_eq!(scale::guest_name(499, 500, &masters), "c500-g02");
}

#[test]
fn files_are_replaced_by_new_inodes_keeping_their_metadata() {
    use std::os::unix::fs::PermissionsExt as _;
    let dir = tempfile::tempdir().unwrap();
    let g = dir.path().join("g");
    fs::create_dir_all(g.join("usr/lib")).unwrap();
    fs::create_dir_all(g.join("etc")).unwrap();
    let lib = g.join("usr/lib/libx.so");
    fs::write(&lib, vec![7u8; 10_000]).unwrap();
    fs::set_permissions(&lib, fs::Permissions::from_mode(0o755)).unwrap();
    xattr::set(&lib, "user.k", b"v").unwrap();
    let other = dir.path().join("other-name");
    fs::hard_link(&lib, &other).unwrap();
    fs::write(g.join("etc/hostname"), b"web-g01\n").unwrap();
    let before = fs::symlink_metadata(&lib).unwrap();

    // An upgrade: same size, mode, xattrs and mtime, new bytes, new inode.
    let size = scale::rewrite_patched(7, "g", &g, "usr/lib/libx.so").unwrap();
    assert_eq!(size, 10_000);
    let after = fs::symlink_metadata(&lib).unwrap();
    assert_ne!(after.ino(), before.ino());
    assert_eq!(after.len(), 10_000);
    assert_eq!(after.mode(), before.mode());
    assert_eq!(
        (after.mtime(), after.mtime_nsec()),
        (before.mtime(), before.mtime_nsec())
    );
    assert_eq!(
        xattr::get(&lib, "user.k").unwrap().as_deref(),
        Some(&b"v"[..])
    );
    let bytes = fs::read(&lib).unwrap();
    assert_ne!(bytes, vec![7u8; 10_000]);
    assert_eq!(bytes.iter().filter(|&&b| b != 7).count(), 16);
    // The other name of the old inode is untouched.
    assert_eq!(fs::read(&other).unwrap(), vec![7u8; 10_000]);
    assert_eq!(fs::symlink_metadata(&other).unwrap().ino(), before.ino());

    // A clone's identity file: its own content, a later mtime.
    let host = g.join("etc/hostname");
    let old = fs::symlink_metadata(&host).unwrap();
    scale::diverge_file(7, "c041-g01", &g, "etc/hostname", Change::Identity).unwrap();
    assert_eq!(fs::read(&host).unwrap(), b"c041-g01\n");
    let new = fs::symlink_metadata(&host).unwrap();
    assert!(new.mtime() >= old.mtime() + 3_600);
    // No temporary name is left behind.
    let names: Vec<String> = fs::read_dir(g.join("etc"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names, ["hostname"]);
    let files: Vec<String> = scale::regular_files(&g)
        .unwrap()
        .into_iter()
        .map(|(p, _)| p)
        .collect();
    assert_eq!(files, ["etc/hostname", "usr/lib/libx.so"]);
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
