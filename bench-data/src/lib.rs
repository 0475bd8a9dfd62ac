//! Deterministic synthetic guest sets for cowherd's demo, tests and benchmarks.
//!
//! [`generate_synthetic`] writes a number of near-identical Debian-like guest trees: a base
//! system shared by every guest (packages with binaries, libraries, Python modules, docs, man
//! pages, translations, dpkg records; setuid binaries, foreign owners, symlinks, hard links,
//! empty files) plus per-guest divergence (identity files, user data, logs, edited configs) and
//! divergence shared by subsets of guests (an application in `/opt/app`, package upgrades,
//! touched mtimes). Contents come from ChaCha streams keyed by the seed and each file's path
//! and version, so the same [`SynthSpec`] always produces byte-identical trees.
//!
//! [`generate_real`] does the same from Debian trees built by `mmdebstrap` (roles `minbase`,
//! `web`, `db`, `dev`; several suites), cached as tarballs and diverged per guest by the same code.
//! Both sources also give some guests extended attributes (`security.capability`, `user.*`)
//! on files whose bytes, owner, mode and mtime are the same as in the other guests.
//!
//! [`harness`] holds the pure parts of the `cowherd-bench` benchmark binary (manifests, disk
//! usage, the report, its targets and tables).
//!
//! ```no_run
//! use cowherd_benchdata::{SynthSpec, generate_synthetic};
//!
//! let report = generate_synthetic(&SynthSpec::demo(), std::path::Path::new("/tmp/guests"))?;
//! println!("{} guests, {} files, {} bytes", report.guests.len(), report.files, report.bytes);
//! # Ok::<(), cowherd_benchdata::GenError>(())
//! ```

#![warn(missing_docs)]

mod base;
mod content;
mod error;
mod generate;
mod guest;
pub mod harness;
mod real;
mod seed;
mod spec;
mod tree;
mod write;

pub use crate::error::GenError;
pub use crate::generate::generate_synthetic;
pub use crate::real::{RealSpec, Role, Template, generate_real, template_tarball};
pub use crate::spec::{GenReport, SynthSpec};
