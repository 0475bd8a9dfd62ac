//! Building guests: template definitions (`template`), their builds kept in the template cache
//! (`cache`), guests cloned from a built template with their own identity (`build`,
//! `identity`), commands run inside a guest's tree (`exec`), and physical machines imported by
//! rsync (`import`).
#![warn(missing_docs)]

mod build;
mod cache;
mod error;
mod exec;
mod identity;
mod import;
mod programs;
mod template;

pub use build::{GuestBuild, build_guest, numbered_names};
pub use cache::{
    BuildOptions, Built, BuiltRecord, build_template, guests_using, latest, remove_template,
    template_policy, versions,
};
pub use error::Error;
pub use exec::{Exec, ExecOutput, exec_in_guest, guest_exec};
pub use identity::{give_identity, validate_hostname};
pub use import::{
    EXCLUDED, Fixups, GUEST_INTERFACES, GuestChanges, ImportError, ImportOptions, ImportReport,
    MASKED_UNITS, NEUTRAL_FSTAB, ORIG_SUFFIX, Source, apply_fixups, import,
};
pub use template::{
    Base, Bootstrapper, Location, Template, TemplateError, TemplateOrigin, TemplateSet,
    parse_template,
};
