//! The equality key: content hash, partial hash, xattr hash, and the object key derived from them.

use std::fs::File;
use std::io::Read;
use std::os::unix::fs::FileExt;

/// Bytes read from each end of a file for the partial hash.
pub(crate) const PARTIAL_BLOCK: u64 = 4096;
/// Files above this size go through the partial-hash stage before a full hash.
pub(crate) const PARTIAL_MIN_SIZE: u64 = 64 * 1024;

/// A 32-byte BLAKE3 digest.
pub(crate) type Hash32 = [u8; 32];

/// Hash of the first and last [`PARTIAL_BLOCK`] bytes of a file of `size` bytes.
pub(crate) fn partial_hash(file: &File, size: u64) -> std::io::Result<Hash32> {
    let mut hasher = blake3::Hasher::new();
    let mut buf = vec![0u8; PARTIAL_BLOCK as usize];
    let head = size.min(PARTIAL_BLOCK) as usize;
    file.read_exact_at(&mut buf[..head], 0)?;
    hasher.update(&buf[..head]);
    if size > PARTIAL_BLOCK {
        let tail_start = size - PARTIAL_BLOCK;
        file.read_exact_at(&mut buf, tail_start)?;
        hasher.update(&buf);
    }
    Ok(*hasher.finalize().as_bytes())
}

/// The content hash of a whole file, and its partial hash when it is large enough to have one.
///
/// # Errors
/// Read errors, and `UnexpectedEof`/`InvalidData` if the file's length is not `size`.
pub(crate) fn content_hash(file: &File, size: u64) -> std::io::Result<(Hash32, Option<Hash32>)> {
    let mut hasher = blake3::Hasher::new();
    let mut buf = vec![0u8; 256 * 1024];
    let mut reader = file;
    let mut total = 0u64;
    loop {
        let n = reader.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        total += n as u64;
    }
    if total != size {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("file length changed while reading ({size} → {total} bytes)"),
        ));
    }
    let partial = if size > PARTIAL_MIN_SIZE {
        Some(partial_hash(file, size)?)
    } else {
        None
    };
    Ok((*hasher.finalize().as_bytes(), partial))
}

/// Hash of a file's extended attributes (names and values, sorted by name).
pub(crate) fn xattr_hash(xattrs: &[(Vec<u8>, Vec<u8>)]) -> Hash32 {
    let mut hasher = blake3::Hasher::new();
    hasher.update(b"cowherd-xattrs-v1");
    for (name, value) in xattrs {
        hasher.update(&(name.len() as u64).to_le_bytes());
        hasher.update(name);
        hasher.update(&(value.len() as u64).to_le_bytes());
        hasher.update(value);
    }
    *hasher.finalize().as_bytes()
}

/// Everything that makes two files interchangeable.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct KeyParts {
    pub chash: Hash32,
    pub xhash: Hash32,
    pub size: u64,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    /// `None` with `--ignore-mtime`.
    pub mtime_ns: Option<i64>,
}

impl KeyParts {
    /// The object key, as 64 lowercase hex digits.
    pub fn key(&self) -> String {
        let mut hasher = blake3::Hasher::new();
        hasher.update(b"cowherd-key-v1");
        hasher.update(&self.chash);
        hasher.update(&self.xhash);
        hasher.update(&self.size.to_le_bytes());
        hasher.update(&self.mode.to_le_bytes());
        hasher.update(&self.uid.to_le_bytes());
        hasher.update(&self.gid.to_le_bytes());
        match self.mtime_ns {
            Some(mt) => {
                hasher.update(b"m");
                hasher.update(&mt.to_le_bytes());
            }
            None => {
                hasher.update(b"-");
            }
        }
        hasher.finalize().to_hex().to_string()
    }
}

/// Converts a stored BLOB into a digest.
pub(crate) fn hash_from_blob(blob: &[u8]) -> Option<Hash32> {
    blob.try_into().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parts() -> KeyParts {
        KeyParts {
            chash: [1; 32],
            xhash: xattr_hash(&[]),
            size: 10,
            mode: 0o100644,
            uid: 0,
            gid: 0,
            mtime_ns: Some(5),
        }
    }

    #[test]
    fn key_changes_with_every_part() {
        let base = parts().key();
        let variants = [
            KeyParts {
                chash: [2; 32],
                ..parts()
            },
            KeyParts {
                xhash: xattr_hash(&[(b"user.a".to_vec(), b"1".to_vec())]),
                ..parts()
            },
            KeyParts {
                size: 11,
                ..parts()
            },
            KeyParts {
                mode: 0o104755,
                ..parts()
            },
            KeyParts { uid: 1, ..parts() },
            KeyParts { gid: 1, ..parts() },
            KeyParts {
                mtime_ns: Some(6),
                ..parts()
            },
            KeyParts {
                mtime_ns: None,
                ..parts()
            },
        ];
        for v in variants {
            assert_ne!(v.key(), base, "{v:?}");
        }
        assert_eq!(parts().key().len(), 64);
    }

    #[test]
    fn xattr_hash_is_not_fooled_by_moving_bytes_between_name_and_value() {
        let a = xattr_hash(&[(b"user.ab".to_vec(), b"c".to_vec())]);
        let b = xattr_hash(&[(b"user.a".to_vec(), b"bc".to_vec())]);
        assert_ne!(a, b);
    }

    #[test]
    fn content_hash_matches_blake3_and_partial_hash_agrees() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let data: Vec<u8> = (0..200_000u32).map(|i| (i * 7) as u8).collect();
        std::fs::write(&path, &data).unwrap();
        let f = File::open(&path).unwrap();
        let (full, partial) = content_hash(&f, data.len() as u64).unwrap();
        assert_eq!(&full, blake3::hash(&data).as_bytes());
        assert_eq!(partial, Some(partial_hash(&f, data.len() as u64).unwrap()));
        assert!(
            content_hash(&f, 5).is_err(),
            "a length mismatch is an error"
        );
    }
}
