//! The system layer: fd-relative file-system calls that never follow a symlink or cross a
//! mount (`fsx`), the one module of `unsafe` ioctls and calls (`sys`: inode flags, `mincore`,
//! `close_range`, malloc arenas) and the mount tables of every namespace (`mountinfo`).
//!
//! It owns no cowherd concept and uses nothing of the crate but its error type.

pub(crate) mod fsx;
pub(crate) mod mountinfo;
pub(crate) mod sys;
