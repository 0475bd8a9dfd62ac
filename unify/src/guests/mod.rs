//! A guest and its life: its record and layout (`guest`), making one (`create`: staging,
//! clones of trees), its overlay (`overlay`), `fold`, `split`/`export`/`destroy`
//! (`lifecycle`), snapshots, rollback and attempts (`snapshot`), what an import wrote
//! (`manifest`), and the page cache it shares (`memory`).
//!
//! It uses the system layer and the store (links to objects, their immutable flags); `fold`,
//! `split` and snapshots hand what they change to the pipeline's next `unify`.

pub(crate) mod create;
pub(crate) mod fold;
pub(crate) mod guest;
pub(crate) mod lifecycle;
pub(crate) mod manifest;
pub(crate) mod memory;
pub(crate) mod overlay;
pub(crate) mod snapshot;
