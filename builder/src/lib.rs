//! Building guests: running commands inside a guest's tree (`exec`); creation from templates
//! (mmdebstrap, tarballs, other guests) and import from physical machines by rsync come with
//! later issues.
#![warn(missing_docs)]

mod error;
mod exec;

pub use error::Error;
pub use exec::{Exec, ExecOutput};
