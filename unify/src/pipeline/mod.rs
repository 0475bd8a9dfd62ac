//! The unify pipeline, a stage a file, cheapest first: `scan` (the guests' trees against the
//! index) → `candidates` → size groups and partial `hash` → full hash → `plan` (objects) →
//! `replace` (journalled renames), with `release` (closing replaced inodes off the main
//! thread), `unify` driving it, `report` for what it did, and `policy` (the markers that say
//! what may be shared).
//!
//! It uses the system layer, the store and its index, and the guests' layout (`guests::guest`);
//! nothing here changes a guest but `replace`.

pub(crate) mod candidates;
pub(crate) mod hash;
pub(crate) mod plan;
pub(crate) mod policy;
pub(crate) mod release;
pub(crate) mod replace;
pub(crate) mod report;
pub(crate) mod scan;
pub(crate) mod unify;
