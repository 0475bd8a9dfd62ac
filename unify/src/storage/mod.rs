//! The store and its index: content keys (`key`), the SQLite index (`index`), the store of
//! shared inodes (`store`), and what reads or rebuilds them as a whole — `stats` and `gc`
//! (`maintain`), `verify`, and `index rebuild` (`reindex`).
//!
//! `key`, `index` and `store` use the system layer, the root and the marker of an object
//! (`pipeline::policy`); the whole-store reports also read the guests (their snapshots, their
//! trees), and `reindex` rescans them with the pipeline's scan.

pub(crate) mod index;
pub(crate) mod key;
pub(crate) mod maintain;
pub(crate) mod reindex;
pub(crate) mod store;
pub(crate) mod verify;
