//! Guests from the template cache: a clone of a built template whose shareable files are new
//! links to its store objects and whose private files are copies, then the guest's own
//! identity. A guest appears in about a second and costs little more than its private files.

use cowherd_unify::{CloneMode, HostRoot, NewGuest, Origin, OriginKind};
use serde::Serialize;

use crate::cache::Built;
use crate::error::Error;
use crate::identity::give_identity;

/// What building one guest did.
#[derive(Clone, Debug, Serialize)]
pub struct GuestBuild {
    /// The guest.
    pub guest: String,
    /// The template it was built from (`name@version`).
    pub template: String,
    /// Its hostname.
    pub hostname: String,
    /// Regular files of its tree.
    pub files: u64,
    /// Of those, new links to store objects.
    pub linked: u64,
    /// Of those, copies (private files).
    pub copied: u64,
    /// Allocated bytes of its copies (its directories, inodes and index rows aside: the bench
    /// harness measures the whole).
    pub copied_bytes: u64,
    /// The identity files written.
    pub identity: Vec<String>,
    /// Wall-clock seconds.
    pub seconds: f64,
}

/// The names `--count N --prefix P` makes: `P01` … `PNN` (at least two digits).
pub fn numbered_names(prefix: &str, count: usize) -> Vec<String> {
    let width = count.to_string().len().max(2);
    (1..=count)
        .map(|i| format!("{prefix}{i:0width$}"))
        .collect()
}

/// Builds guest `name` from the built template `template`, with `hostname` (default: the
/// name).
///
/// # Algorithm
/// In `guests/.NAME.creating/`: the template's tree is cloned into `base/` — each file that is
/// a store object gets a new link to it, every other file (the template policy's `private`
/// ones: `/etc`, `/var`, …) a copy — then the guest's identity is written (hostname,
/// `/etc/hosts`, machine-id, ssh host keys, random seed), the record saved with the template's
/// policy, and the directory renamed to `guests/NAME`: a killed build leaves no guest (the next
/// writer removes the staging directory). The caller unifies the new guests (one run for many:
/// their links are recognised as store links, nothing is hashed but what they do not share).
///
/// # Errors
/// [`cowherd_unify::Error::GuestExists`], a bad name or hostname, I/O and index errors.
pub fn build_guest(
    root: &HostRoot,
    template: &Built,
    policy: Option<&cowherd_unify::PolicyFile>,
    name: &str,
    hostname: Option<&str>,
) -> Result<GuestBuild, Error> {
    let started = std::time::Instant::now();
    let origin = Origin {
        kind: OriginKind::Template,
        path: None,
        template: Some(template.label()),
    };
    let hostname = hostname.unwrap_or(name).to_string();
    crate::identity::validate_hostname(&hostname)?;
    let mut guest = NewGuest::begin(root, name, origin)?;
    let cloned = cowherd_unify::clone_tree(
        root,
        &template.tree_rel(),
        guest.base(),
        CloneMode::LinkObjects,
    )?;
    let identity = give_identity(&mut guest, &hostname)?;
    guest.record_mut().policy = policy.cloned();
    guest.finish(root)?;
    Ok(GuestBuild {
        guest: name.to_string(),
        template: template.label(),
        hostname,
        files: cloned.files,
        linked: cloned.linked,
        copied: cloned.copied,
        copied_bytes: cloned.copied_bytes,
        identity,
        seconds: started.elapsed().as_secs_f64(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbered_names_have_at_least_two_digits() {
        assert_eq!(numbered_names("web", 3), ["web01", "web02", "web03"]);
        assert_eq!(numbered_names("g", 100)[99], "g100");
        assert_eq!(numbered_names("g", 100)[0], "g001");
    }
}
