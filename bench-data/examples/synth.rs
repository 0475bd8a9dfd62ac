//! Generates a synthetic guest set and prints what was written.
//!
//! ```sh
//! cargo run --release -p cowherd-benchdata --example synth -- OUT [demo | bench GUESTS]
//! cargo run --release -p cowherd-benchdata --example synth -- OUT custom SEED GUESTS FILES MAX
//! ```

use std::os::unix::fs::MetadataExt as _;
use std::path::PathBuf;
use std::time::Instant;

use cowherd_benchdata::{SynthSpec, generate_synthetic};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let usage = "usage: synth OUT [demo | bench GUESTS | custom SEED GUESTS FILES MAX]";
    let out = PathBuf::from(args.next().ok_or(usage)?);
    let spec = match args.next().as_deref() {
        None | Some("demo") => SynthSpec::demo(),
        Some("bench") => SynthSpec::bench(args.next().map_or(Ok(40), |n| n.parse())?),
        Some("custom") => {
            let mut num = || -> Result<u64, Box<dyn std::error::Error>> {
                Ok(args.next().ok_or(usage)?.parse()?)
            };
            SynthSpec {
                seed: num()?,
                guests: usize::try_from(num()?)?,
                files_per_guest: usize::try_from(num()?)?,
                max_file_size: num()?,
            }
        }
        Some(other) => return Err(format!("unknown spec {other:?}").into()),
    };
    let start = Instant::now();
    let report = generate_synthetic(&spec, &out)?;
    let elapsed = start.elapsed();
    println!(
        "{} guests, {} files, {} bytes ({:.1} MiB) in {:.2?}",
        report.guests.len(),
        report.files,
        report.bytes,
        report.bytes as f64 / 1048576.0,
        elapsed
    );
    // Size distribution of the first guest's regular files.
    let Some(first) = report.guests.first() else {
        return Ok(());
    };
    let mut sizes = Vec::new();
    let mut stack = vec![first.clone()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(dir)? {
            let entry = entry?;
            let meta = entry.path().symlink_metadata()?;
            if meta.is_dir() {
                stack.push(entry.path());
            } else if meta.is_file() && meta.nlink() >= 1 {
                sizes.push(meta.len());
            }
        }
    }
    sizes.sort_unstable();
    let n = sizes.len();
    if n > 0 {
        let pct = |p: usize| sizes[(n - 1) * p / 100];
        let small = sizes.iter().filter(|&&s| s < 1024).count();
        let total: u64 = sizes.iter().sum();
        println!(
            "{}: {n} file names, {:.1} MiB; median {} B, p90 {} B, p99 {} B, max {} B; {:.0}% under 1 KiB",
            first.display(),
            total as f64 / 1048576.0,
            pct(50),
            pct(90),
            pct(99),
            sizes[n - 1],
            100.0 * small as f64 / n as f64
        );
    }
    Ok(())
}
