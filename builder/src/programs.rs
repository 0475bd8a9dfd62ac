//! The host programs the builder runs (bootstrappers, tar, rsync, ssh), found in `$PATH` or the
//! standard directories, and the leash that makes one die with its caller.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Where programs are looked for besides `$PATH` (root's usual path, which `$PATH` may lack
/// under sudo or cron).
pub(crate) const STANDARD_PATH: &str =
    "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// The executable `program` in `$PATH` or [`STANDARD_PATH`].
pub(crate) fn find_program(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(std::env::split_paths(STANDARD_PATH))
        .map(|dir| dir.join(program))
        .find(|candidate| {
            std::fs::metadata(candidate)
                .is_ok_and(|meta| meta.is_file() && meta.permissions().mode() & 0o111 != 0)
        })
}

/// util-linux's `setpriv` and `unshare`, which tie a program's life, and that of every process
/// it starts, to the thread that starts it.
pub(crate) struct Leash {
    setpriv: PathBuf,
    unshare: PathBuf,
}

impl Leash {
    /// Finds both programs.
    ///
    /// # Errors
    /// The name of the one that is missing (both are in the util-linux package).
    pub(crate) fn find() -> Result<Leash, &'static str> {
        Ok(Leash {
            setpriv: find_program("setpriv").ok_or("setpriv")?,
            unshare: find_program("unshare").ok_or("unshare")?,
        })
    }

    /// `setpriv --pdeathsig KILL -- unshare --pid --kill-child -- PROGRAM`, in the C locale:
    /// the program runs as PID 1 of a new PID namespace, killed when `unshare` dies, which is
    /// killed when the calling thread dies. So the program and every process it forks (rsync's
    /// receiver, ssh, a bootstrapper's dpkg) die with the caller, even by SIGKILL, and stop
    /// writing into a staging directory.
    ///
    /// No new mount namespace: it would hold a copy of every mounted guest's overlay for as
    /// long as the program runs, and keep those guests from being unmounted. What a killed
    /// bootstrapper leaves mounted in its tree the next writer detaches (see
    /// `cowherd_unify`'s recovery of template builds).
    pub(crate) fn command(&self, program: &Path) -> Command {
        let mut cmd = Command::new(&self.setpriv);
        cmd.args(["--pdeathsig", "KILL", "--"])
            .arg(&self.unshare)
            .args(["--pid", "--kill-child", "--"])
            .arg(program)
            .env("LC_ALL", "C");
        cmd
    }
}
