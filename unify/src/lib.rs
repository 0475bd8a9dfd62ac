//! Content-addressed unification of near-identical guest trees: the index, the store, the
//! linker, the marker policy and the host-root layout behind `cowherd`.
#![warn(missing_docs)]

mod candidates;
mod error;
mod fsx;
mod guest;
mod hash;
mod index;
mod key;
mod maintain;
mod mountinfo;
mod open;
mod plan;
mod policy;
mod progress;
mod recover;
mod release;
mod replace;
mod report;
mod root;
mod scan;
mod store;
mod sys;
mod unify;

pub use error::{Error, Result};
pub use guest::{
    GuestRecord, Origin, OriginKind, adopt, guest_names, guest_record, validate_guest_name,
};
pub use maintain::{
    GcReport, GuestStats, Problem, Stats, TopObject, Totals, VerifyReport, gc, stats, verify,
};
pub use mountinfo::{MountEntry, parse_mountinfo, read_mountinfo};
pub use policy::{
    DEFAULT_POLICY_TOML, Marker, Policy, PolicyError, PolicyFile, Rule, load_policy_file,
    parse_conffiles, read_dpkg_conffiles,
};
pub use progress::{NoProgress, Phase, Progress};
pub use report::{Failure, LinkedPath, UnifyReport, display_path};
pub use root::{Access, DEFAULT_ROOT, HostRoot};
pub use unify::{UnifyOptions, unify};
