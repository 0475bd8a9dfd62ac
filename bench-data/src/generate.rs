//! The entry point: builds the base tree once and writes every guest, in parallel.

use std::fs;
use std::path::{Path, PathBuf};

use rayon::prelude::*;

use crate::base;
use crate::error::GenError;
use crate::guest::{Diverge, guest_tree};
use crate::spec::{GenReport, SynthSpec};
use crate::tree::Tree;
use crate::write::{Written, write_tree};

/// The name of guest `index` (0-based) among `count`: `g01`, `g02`, …, zero padded to fit.
pub(crate) fn guest_name(index: usize, count: usize) -> String {
    let width = count.to_string().len().max(2);
    format!("g{:0width$}", index + 1)
}

/// Generates the guest set described by `spec` under `out`.
///
/// `out` is created if missing; each guest is written to `out/<name>` (`g01`, `g02`, …) as a
/// complete, independent tree — guests never share inodes, though paths inside one guest may
/// (hard-link groups). The result depends only on `spec`: the same spec yields byte-identical
/// trees, including modes, owners, timestamps and extended attributes, on every run. Owners
/// are set with `lchown` and some files get `security.capability`, so the caller must be root
/// (or hold `CAP_CHOWN` and `CAP_SETFCAP`). Nothing is fsynced.
///
/// # Errors
///
/// [`GenError::Exists`] if a guest directory already exists (nothing is overwritten), and the
/// other [`GenError`] variants when creating `out`, a file, a directory or a link, or setting
/// an owner, mode, extended attribute or timestamp fails. On error, the guests written so far
/// are left in place.
pub fn generate_synthetic(spec: &SynthSpec, out: &Path) -> Result<GenReport, GenError> {
    let base = base::build(spec);
    let diverge = Diverge::from(spec);
    write_guests(out, spec.guests, spec.seed, |i, name| {
        guest_tree(&base, &diverge, i, name)
    })
}

/// Writes `count` guests under `out`, guest `i` being the tree `make(i, name)`, in parallel;
/// contents come from `seed`. Refuses to overwrite an existing guest directory.
pub(crate) fn write_guests(
    out: &Path,
    count: usize,
    seed: u64,
    make: impl Fn(usize, &str) -> Tree + Sync,
) -> Result<GenReport, GenError> {
    fs::create_dir_all(out).map_err(|source| GenError::CreateDir {
        path: out.to_path_buf(),
        source,
    })?;
    let guests: Vec<PathBuf> = (0..count).map(|i| out.join(guest_name(i, count))).collect();
    if let Some(path) = guests.iter().find(|p| p.symlink_metadata().is_ok()) {
        return Err(GenError::Exists { path: path.clone() });
    }
    let written = guests
        .par_iter()
        .enumerate()
        .map(|(i, root)| {
            let tree = make(i, &guest_name(i, count));
            write_tree(&tree, root, seed)
        })
        .collect::<Result<Vec<Written>, GenError>>()?;
    Ok(GenReport {
        files: written.iter().map(|w| w.files).sum(),
        bytes: written.iter().map(|w| w.bytes).sum(),
        guests,
    })
}

#[cfg(test)]
mod tests {
    use super::guest_name;

    #[test]
    fn names_are_zero_padded_to_fit() {
        assert_eq!(guest_name(0, 12), "g01");
        assert_eq!(guest_name(11, 12), "g12");
        assert_eq!(guest_name(0, 5), "g01");
        assert_eq!(guest_name(99, 100), "g100");
        assert_eq!(guest_name(6, 100), "g007");
    }
}
