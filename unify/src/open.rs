//! Opening a root for work: the public entry points over `root` (layout, lock, index) and
//! `recover` (what a killed run left), so that neither of those needs the other.

use std::path::Path;

use crate::error::Result;
use crate::recover::recover;
use crate::root::{Access, HostRoot};

impl HostRoot {
    /// Creates the layout at `path` (idempotent) and opens it for writing.
    ///
    /// # Errors
    /// As [`HostRoot::open`], and I/O errors creating the layout.
    pub fn init(path: &Path) -> Result<HostRoot> {
        let path = HostRoot::create_layout(path)?;
        HostRoot::open(&path, Access::Write)
    }

    /// Opens an initialised root. A writer ([`Access::Write`]) holds the root's lock, makes
    /// the root reachable by root only (an older root may be 0755), then repairs what an
    /// interrupted run left behind before it starts.
    ///
    /// # Errors
    /// [`crate::Error::NotARoot`] if `path` has no index, [`crate::Error::CrossFilesystem`] or
    /// [`crate::Error::Symlink`] if the layout is broken, [`crate::Error::Locked`] if another
    /// writer is running, and the errors of recovery.
    pub fn open(path: &Path, access: Access) -> Result<HostRoot> {
        let root = HostRoot::open_layout(path, access)?;
        if access == Access::Write {
            root.restrict_access()?;
            recover(&root)?;
        }
        Ok(root)
    }
}
