//! A new guest's own identity, so that guests cloned from one template differ where they must:
//! hostname, `/etc/hosts`, a fresh `/etc/machine-id`, fresh ssh host keys when sshd is there, a
//! fresh random seed.

use std::path::Path;
use std::process::Command;

use cowherd_unify::NewGuest;

use crate::error::Error;

/// The ssh host key types a Debian `openssh-server` makes (`ssh-keygen -A`).
const SSH_KEY_TYPES: [&str; 3] = ["rsa", "ecdsa", "ed25519"];

/// Checks a hostname: 1–63 of `[A-Za-z0-9-]` per dot-separated label, not starting or ending
/// with `-`, 253 characters at most.
///
/// # Errors
/// [`Error::BadHostname`].
pub fn validate_hostname(hostname: &str) -> Result<(), Error> {
    let label_ok = |l: &str| {
        (1..=63).contains(&l.len())
            && !l.starts_with('-')
            && !l.ends_with('-')
            && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
    };
    if hostname.len() <= 253 && hostname.split('.').all(label_ok) {
        Ok(())
    } else {
        Err(Error::BadHostname {
            hostname: hostname.to_string(),
        })
    }
}

/// Lowercase hex of `bytes`.
fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Writes the identity of a guest being created: `/etc/hostname`, `/etc/hosts`, a random
/// `/etc/machine-id`, new ssh host keys if the guest has sshd (made by the host's
/// `ssh-keygen` in the staging area, then written into the tree), and a random
/// `/var/lib/systemd/random-seed` if systemd keeps one. Returns what it wrote.
///
/// # Errors
/// [`Error::BadHostname`]; [`Error::MissingProgram`] without `ssh-keygen` for a guest with
/// sshd; the library's errors writing into the tree.
pub fn give_identity(guest: &mut NewGuest, hostname: &str) -> Result<Vec<String>, Error> {
    validate_hostname(hostname)?;
    let mut wrote = Vec::new();
    guest
        .base()
        .write_file("etc/hostname", format!("{hostname}\n").as_bytes(), 0o644)?;
    let short = hostname.split('.').next().unwrap_or(hostname);
    let hosts = format!(
        "127.0.0.1\tlocalhost\n127.0.1.1\t{hostname} {short}\n\n\
         ::1\t\tlocalhost ip6-localhost ip6-loopback\nff02::1\t\tip6-allnodes\n\
         ff02::2\t\tip6-allrouters\n"
    );
    guest
        .base()
        .write_file("etc/hosts", hosts.as_bytes(), 0o644)?;
    wrote.extend(["/etc/hostname".to_string(), "/etc/hosts".to_string()]);
    let machine_id = hex(&rand::random::<[u8; 16]>());
    guest.base().write_file(
        "etc/machine-id",
        format!("{machine_id}\n").as_bytes(),
        0o444,
    )?;
    wrote.push("/etc/machine-id".into());
    if guest.base().exists("var/lib/systemd") {
        guest.base().write_file(
            "var/lib/systemd/random-seed",
            &rand::random::<[u8; 512]>(),
            0o600,
        )?;
        wrote.push("/var/lib/systemd/random-seed".into());
    }
    if guest.base().exists("usr/sbin/sshd") && guest.base().exists("etc/ssh") {
        let dir = guest.scratch_path()?;
        for kind in SSH_KEY_TYPES {
            let name = format!("ssh_host_{kind}_key");
            let key = dir.join(&name);
            ssh_keygen(kind, hostname, &key)?;
            for (suffix, mode) in [("", 0o600), (".pub", 0o644)] {
                let from = key.with_file_name(format!("{name}{suffix}"));
                let bytes = std::fs::read(&from).map_err(|error| Error::Io {
                    path: from.clone(),
                    error,
                })?;
                guest
                    .base()
                    .write_file(&format!("etc/ssh/{name}{suffix}"), &bytes, mode)?;
            }
            wrote.push(format!("/etc/ssh/{name}"));
        }
    }
    guest.record_mut().hostname = Some(hostname.to_string());
    Ok(wrote)
}

/// `ssh-keygen -q -t KIND -N '' -C root@HOST -f KEY`.
fn ssh_keygen(kind: &str, hostname: &str, key: &Path) -> Result<(), Error> {
    let out = Command::new("ssh-keygen")
        .args([
            "-q",
            "-t",
            kind,
            "-N",
            "",
            "-C",
            &format!("root@{hostname}"),
            "-f",
        ])
        .arg(key)
        .output()
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => Error::MissingProgram {
                program: "ssh-keygen",
                package: "openssh-client",
            },
            _ => Error::Io {
                path: key.to_path_buf(),
                error: e,
            },
        })?;
    if out.status.success() {
        Ok(())
    } else {
        Err(Error::Io {
            path: key.to_path_buf(),
            error: std::io::Error::other(format!(
                "ssh-keygen failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            )),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hostnames_follow_rfc_1123() {
        for good in ["web01", "db-2.example.test", "a"] {
            assert!(validate_hostname(good).is_ok(), "{good}");
        }
        for bad in ["", "-web", "web-", "a..b", "under_score", &"x".repeat(64)] {
            assert!(validate_hostname(bad).is_err(), "{bad}");
        }
    }
}
