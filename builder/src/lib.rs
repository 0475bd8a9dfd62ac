//! Building guests: from templates (mmdebstrap, tarballs, other guests) and from physical
//! machines by rsync. Its first pieces arrive with the template and import issues; the
//! crate exists now so the workspace has its final shape.
#![warn(missing_docs)]
