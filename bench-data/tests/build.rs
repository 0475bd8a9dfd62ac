//! The pure parts of the build table (`cowherd-bench build`): medians, the template's base
//! line, the targets of issue 10 item 3, and the Markdown table.

use cowherd_benchdata::harness::build::{
    self, BuildReport, COWHERD, CP_A, CP_AL, MMDEBSTRAP, Sample, TemplateBase, TemplateInfo, Way,
};
use cowherd_benchdata::harness::report::{Machine, Run};

fn run(wall: f64) -> Run {
    Run {
        wall_secs: wall,
        user_secs: wall / 2.0,
        sys_secs: 0.0,
        peak_rss_kib: 10_000,
        exit_code: 0,
        cold: true,
    }
}

fn sample(wall: f64, bytes: u64, guests: usize) -> Sample {
    Sample {
        run: run(wall),
        sync_secs: 0.1,
        bytes_added: bytes,
        inodes_added: 100,
        index_bytes_added: None,
        guests,
    }
}

const MIB: u64 = 1 << 20;

fn way(name: &str, one: &[(f64, u64)], many: Option<Sample>) -> Way {
    Way {
        one: one.iter().map(|&(t, b)| sample(t, b, 1)).collect(),
        many,
        ..Way::new(name, format!("{name} TREE DIR"))
    }
}

/// cowherd: 0.5–0.9 s and 4 MiB a guest, 100 guests in 45.9 s; cp -al, cp -a (no N run),
/// mmdebstrap (no N run); a 200 MiB template.
fn report() -> BuildReport {
    let mut r = BuildReport {
        template: TemplateInfo {
            name: "debian-bookworm-minbase".into(),
            version: 1,
            made_by: "mmdebstrap bookworm minbase".into(),
            suite: "bookworm".into(),
            variant: "minbase".into(),
            packages: Vec::new(),
            files: 7_000,
            record_bytes: 180 * MIB,
            tree_bytes: 200 * MIB,
            tree_inodes: 9_000,
            build: Some(sample(90.0, 400 * MIB, 0)),
        },
        count: 100,
        peer_count: 3,
        rounds: 3,
        machine: Machine {
            cpus: 2,
            ..Machine::default()
        },
        caches_dropped: true,
        ways: vec![
            way(
                COWHERD,
                &[(0.9, 4 * MIB), (0.5, 5 * MIB), (0.7, 3 * MIB)],
                Some(sample(45.8, 400 * MIB, 100)),
            ),
            way(
                CP_AL,
                &[(1.0, 3 * MIB), (1.2, 3 * MIB), (1.1, 3 * MIB)],
                Some(sample(80.0, 300 * MIB, 100)),
            ),
            way(
                CP_A,
                &[(6.0, 200 * MIB), (5.0, 200 * MIB), (7.0, 200 * MIB)],
                None,
            ),
            way(MMDEBSTRAP, &[(50.0, 210 * MIB)], None),
        ],
        targets: Vec::new(),
        total_secs: 400.0,
    };
    r.evaluate();
    r
}

#[test]
fn medians_of_odd_and_even_counts() {
    assert_eq!(build::median(vec![]), None);
    assert_eq!(build::median(vec![3.0, 1.0, 2.0]), Some(2.0));
    assert_eq!(build::median(vec![4.0, 1.0, 2.0, 3.0]), Some(2.5));
    let r = report();
    let cow = r.way(COWHERD).unwrap();
    // The median time includes the sync after the step.
    assert!((cow.one_secs().unwrap() - 0.8).abs() < 1e-9);
    assert_eq!(cow.one_bytes(), Some(4 * MIB));
}

#[test]
fn base_lines_give_suite_and_variant() {
    assert_eq!(
        build::parse_base("mmdebstrap bookworm minbase"),
        TemplateBase::Bootstrap {
            program: "mmdebstrap".into(),
            suite: "bookworm".into(),
            variant: "minbase".into(),
        }
    );
    assert_eq!(
        build::parse_base("from debian-bookworm-minbase"),
        TemplateBase::From("debian-bookworm-minbase".into())
    );
    assert!(matches!(
        build::parse_base("tarball /srv/alpine.tar"),
        TemplateBase::Other(_)
    ));
}

#[test]
fn targets_are_judged_on_cowherds_row() {
    let r = report();
    let met: Vec<Option<bool>> = r.targets.iter().map(|t| t.met).collect();
    assert_eq!(met, [Some(true), Some(true), Some(true)]);
    // 2% of the template, and the N run's per-guest share is in the detail.
    assert!(
        r.targets[1].detail.contains("2.00%"),
        "{}",
        r.targets[1].detail
    );
    assert!(r.targets[1].detail.contains("100-guest run"));

    // Slow, big and 100 guests too slow: each target fails on its own number.
    let mut slow = report();
    slow.ways[0] = way(
        COWHERD,
        &[(2.5, 20 * MIB)],
        Some(sample(59.95, 2000 * MIB, 100)),
    );
    slow.evaluate();
    let met: Vec<Option<bool>> = slow.targets.iter().map(|t| t.met).collect();
    assert_eq!(met, [Some(false), Some(false), Some(false)]);

    // Another N is not judged against the 100-guest target; a failed cowherd is not measured.
    let mut other = report();
    other.ways[0].many = Some(sample(10.0, 40 * MIB, 10));
    other.ways[0].one[1].run.exit_code = 1;
    other.evaluate();
    assert_eq!(other.targets[2].met, None);
    assert!(other.targets[2].detail.contains("--count 100"));
    other.ways[0].one.clear();
    other.evaluate();
    assert_eq!(other.targets[0].met, None);
    assert_eq!(other.targets[1].met, None);
}

#[test]
fn markdown_table_has_a_row_per_way_marks_and_estimates() {
    let r = report();
    let md = build::markdown(&r);
    assert!(md.contains(
        "| way | 1 guest: time | 1 guest: bytes added | % of template | 100 guests: time | 100 \
         guests: bytes added |"
    ));
    assert!(md.contains("Cold page cache"), "{md}");
    let row = |label: &str| {
        md.lines()
            .find(|l| l.starts_with(&format!("| {label}")))
            .unwrap_or_else(|| panic!("no row {label} in\n{md}"))
            .to_owned()
    };
    let cow = row("cowherd build");
    assert!(cow.contains("**800 ms** — **met**"), "{cow}");
    assert!(cow.contains("**2.00%** — **met**"), "{cow}");
    assert!(
        cow.contains("**45.90 s (459 ms / guest)** — **met**"),
        "{cow}"
    );
    assert!(cow.contains("400.0 MiB (4.0 MiB / guest)"), "{cow}");
    let cpal = row("cp -al");
    assert!(cpal.contains("1.20 s"), "{cpal}");
    assert!(!cpal.contains("met"), "{cpal}");
    // cp -a was not run 100 times: an estimate, marked as such.
    let cpa = row("cp -a ³");
    assert!(
        cpa.contains("*not run; ≈ 610.0 s (10.2 min) est.*"),
        "{cpa}"
    );
    assert!(cpa.contains("100.00%"), "{cpa}");
    assert!(row("mmdebstrap").contains("50.10 s"));
    assert!(md.contains("no private files"));
    assert!(md.contains("- **met** 100 guests from one template in under a minute"));

    // Warm runs and failures say so.
    let mut warm = report();
    warm.caches_dropped = false;
    warm.ways[3].one.clear();
    warm.ways[3].error = Some("mmdebstrap exited 1".into());
    let md = build::markdown(&warm);
    assert!(md.contains("Warm page cache"));
    assert!(
        md.contains("| mmdebstrap ⁴ | failed | failed | – | – | – |"),
        "{md}"
    );
    assert!(md.contains("  - error: mmdebstrap exited 1"));
    warm.ways[3].error = None;
    warm.ways[3].skipped = Some("--no-mmdebstrap".into());
    let md = build::markdown(&warm);
    assert!(
        md.contains("| mmdebstrap ⁴ | not run | not run | – | – | – |"),
        "{md}"
    );
    assert!(md.contains("  - not run: --no-mmdebstrap"));
}

#[test]
fn cowherds_index_growth_is_shown_apart() {
    let mut r = report();
    for s in &mut r.ways[0].one {
        s.index_bytes_added = Some(MIB);
    }
    r.ways[0].reported.push((0.3, 2 * MIB));
    r.evaluate();
    let d = &r.targets[1].detail;
    assert!(d.contains("of it cowherd's index 1.0 MiB"), "{d}");
    assert!(d.contains("private copies 3.0 MiB = 1.50%"), "{d}");
    assert!(d.contains("reports 2.0 MiB of copies"), "{d}");
    let md = build::markdown(&r);
    assert!(md.contains("| 4.0 MiB (index 1.0 MiB) |"), "{md}");
}
