//! Building guests: template definitions (`template`), their builds kept in the template cache
//! (`cache`), guests cloned from a built template with their own identity (`build`,
//! `identity`), commands run inside a guest's tree (`exec`), and physical machines imported by
//! rsync (`import`); the caching proxy of a fleet upgrade (`fetch`).
#![warn(missing_docs)]

mod build;
mod cache;
mod error;
mod exec;
mod fetch;
mod identity;
mod import;
mod programs;
mod template;
mod upgrade;

pub use build::{GuestBuild, build_guest, numbered_names};
pub use cache::{
    BuildOptions, Built, BuiltRecord, build_template, guests_using, latest, remove_template,
    template_policy, versions,
};
pub use error::Error;
pub use exec::{Exec, ExecOutput, exec_in_guest, guest_exec};
pub use fetch::{
    CacheOptions, CacheStats, ClientStats, DEFAULT_MAX_BYTES, DownloadCache, MAX_URL_LEN,
};
pub use identity::{give_identity, validate_hostname};
pub use import::{
    EXCLUDED, Fixups, GUEST_INTERFACES, GuestChanges, ImportError, ImportOptions, ImportReport,
    MASKED_UNITS, NEUTRAL_FSTAB, ORIG_SUFFIX, Source, apply_fixups, import,
};
pub use template::{
    Base, Bootstrapper, Location, Template, TemplateError, TemplateOrigin, TemplateSet,
    parse_template,
};
pub use upgrade::{
    GuestUpgrade, Outcome, PackageUpgrade, TemplateUpgrade, UpgradeOptions, UpgradeReport,
    parse_pending, upgrade, upgrade_template,
};
