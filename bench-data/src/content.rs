//! File bodies: how the bytes of a regular file are produced from its seeded stream.

use std::fs::File;
use std::io::{self, Read as _, Write};
use std::path::Path;
use std::sync::Arc;

use crate::seed::Rand;
use crate::tree::Content;

/// Header flavour of a binary (random) body; only the first bytes differ.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum BinKind {
    /// Random bytes only.
    Raw,
    /// An ELF64 x86-64 shared object header, then random bytes.
    Elf,
    /// A gzip member header, then random bytes (`.gz` docs and man pages).
    Gzip,
    /// A `TZif2` zoneinfo header.
    Tzif,
    /// A GNU gettext `.mo` header.
    Mo,
}

impl BinKind {
    fn header(self) -> &'static [u8] {
        match self {
            Self::Raw => b"",
            Self::Elf => &[
                0x7f, b'E', b'L', b'F', 2, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 3, 0, 0x3e, 0, 1, 0, 0,
                0,
            ],
            Self::Gzip => &[0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 2, 3],
            Self::Tzif => b"TZif2\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0",
            Self::Mo => &[0xde, 0x12, 0x04, 0x95, 0, 0, 0, 0],
        }
    }
}

/// Line style of a text body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum TextStyle {
    /// Paragraphs of English-like prose (READMEs, copyright files, notes).
    Prose,
    /// `key = value` lines with comments and sections.
    Config,
    /// Python source.
    Python,
    /// POSIX shell scripts (maintainer scripts, shell histories).
    Shell,
    /// Syslog-style lines.
    Log,
}

/// How the bytes of a regular file are made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Body {
    /// Zero bytes.
    Empty,
    /// `size` bytes: a header of `kind`, then stream bytes.
    Binary { kind: BinKind, size: u64 },
    /// `size` bytes of text in `style`, drawn from the stream.
    Text { style: TextStyle, size: u64 },
    /// Exactly these bytes.
    Literal(Arc<[u8]>),
    /// The `size` bytes of a file on the host (a template tree's file). With `patch`, 8 bytes
    /// in the middle are XORed with the content's stream: a rebuilt file of the same size.
    Host {
        path: Arc<Path>,
        size: u64,
        patch: bool,
    },
}

impl Body {
    /// A literal body.
    pub(crate) fn literal(bytes: impl Into<Vec<u8>>) -> Self {
        Self::Literal(Arc::from(bytes.into()))
    }

    /// `size` bytes of text in `style`.
    pub(crate) fn text(style: TextStyle, size: u64) -> Self {
        Self::Text { style, size }
    }

    /// `size` bytes of binary data with a `kind` header.
    pub(crate) fn binary(kind: BinKind, size: u64) -> Self {
        Self::Binary { kind, size }
    }

    /// The size in bytes the body renders to.
    pub(crate) fn size(&self) -> u64 {
        match self {
            Self::Empty => 0,
            Self::Binary { size, .. } | Self::Text { size, .. } | Self::Host { size, .. } => *size,
            Self::Literal(bytes) => bytes.len() as u64,
        }
    }
}

#[rustfmt::skip]
const WORDS: &[&str] = &[
    "the", "of", "and", "to", "in", "is", "for", "that", "with", "on", "as", "by", "this", "be",
    "are", "from", "or", "it", "at", "an", "not", "which", "all", "can", "if", "will", "may",
    "file", "system", "package", "version", "config", "server", "client", "user", "group",
    "default", "option", "value", "path", "data", "module", "library", "program", "license",
    "software", "free", "copy", "source", "binary", "terms", "warranty", "without", "under",
    "public", "general", "distribution", "release", "update", "security", "network", "service",
    "daemon", "socket", "buffer", "cache", "index", "table", "record", "entry", "key", "hash",
    "memory", "thread", "process", "signal", "timeout", "limit", "format", "output", "input",
    "stream", "error", "warning", "debug", "trace", "level", "log", "message", "handler",
    "request", "response", "session", "token", "header", "payload", "checksum", "archive",
    "mirror", "upstream", "debian", "maintainer", "changelog", "build", "install", "remove",
    "upgrade", "purge", "depends", "provides", "conflicts", "replaces", "locale", "timezone",
    "kernel", "device", "mount", "volume", "partition", "block", "inode", "link", "owner", "mode",
    "permission", "access", "read", "write", "execute", "directory", "tree", "node", "parser",
    "encoder", "decoder", "compress", "extract", "verify", "sign", "trust", "policy", "rule",
    "match", "pattern", "filter", "queue", "worker", "pool", "scheduler", "timer", "clock",
    "random", "seed", "state", "machine", "host", "guest", "container", "image",
];

#[rustfmt::skip]
const NAMES: &[&str] = &[
    "sshd", "cron", "systemd", "kernel", "dbus-daemon", "apt", "dpkg", "sudo", "login", "nginx",
    "postfix", "rsyslogd", "dhclient", "chronyd", "app",
];

#[rustfmt::skip]
const MONTHS: &[&str] = &[
    "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
];

/// Reusable buffers for [`write_content`].
#[derive(Debug)]
pub(crate) struct Scratch {
    chunk: Vec<u8>,
    text: Vec<u8>,
}

impl Scratch {
    /// Size of the chunks binary bodies are generated and written in.
    const CHUNK: usize = 64 * 1024;

    pub(crate) fn new() -> Self {
        Self {
            chunk: vec![0; Self::CHUNK],
            text: Vec::new(),
        }
    }
}

/// Writes the bytes of `content` (under spec seed `seed`) to `out`; returns how many.
pub(crate) fn write_content<W: Write>(
    content: &Content,
    seed: u64,
    scratch: &mut Scratch,
    out: &mut W,
) -> io::Result<u64> {
    match &content.body {
        Body::Empty => Ok(0),
        Body::Literal(bytes) => {
            out.write_all(bytes)?;
            Ok(bytes.len() as u64)
        }
        Body::Binary { kind, size } => {
            let mut rng = Rand::new(seed, &content.key, content.variant);
            let header = kind.header();
            let h = header
                .len()
                .min(usize::try_from(*size).unwrap_or(usize::MAX));
            out.write_all(&header[..h])?;
            let mut left = size - h as u64;
            while left > 0 {
                let n = usize::try_from(left).map_or(Scratch::CHUNK, |l| l.min(Scratch::CHUNK));
                let chunk = &mut scratch.chunk[..n];
                rng.fill(chunk);
                out.write_all(chunk)?;
                left -= n as u64;
            }
            Ok(*size)
        }
        Body::Text { style, size } => {
            let size = usize::try_from(*size).expect("text size fits in memory");
            let mut rng = Rand::new(seed, &content.key, content.variant);
            let buf = &mut scratch.text;
            buf.clear();
            text(&mut rng, *style, size, buf);
            buf.truncate(size);
            out.write_all(buf)?;
            Ok(size as u64)
        }
        Body::Host { path, size, patch } => {
            let mut file = File::open(path)?;
            let patch_at = if *patch { *size / 2 } else { u64::MAX };
            let mut mask = [0u8; 8];
            if *patch {
                Rand::new(seed, &content.key, content.variant).fill(&mut mask);
            }
            let mut done = 0u64;
            loop {
                let n = file.read(&mut scratch.chunk)?;
                if n == 0 {
                    break;
                }
                let chunk = &mut scratch.chunk[..n];
                // The part of [patch_at, patch_at + 8) that lies in this chunk.
                let end = done + n as u64;
                for at in patch_at.max(done)..(patch_at.saturating_add(8)).min(end) {
                    chunk[(at - done) as usize] ^= mask[(at - patch_at) as usize];
                }
                out.write_all(chunk)?;
                done += n as u64;
            }
            if done != *size {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!(
                        "{}: {done} bytes, expected {size} (template changed?)",
                        path.display()
                    ),
                ));
            }
            Ok(done)
        }
    }
}

/// The bytes of `content`, in memory.
#[cfg(test)]
pub(crate) fn render(content: &Content, seed: u64) -> Vec<u8> {
    let mut out = Vec::new();
    write_content(content, seed, &mut Scratch::new(), &mut out).expect("writing to a Vec");
    out
}

fn word(rng: &mut Rand) -> &'static str {
    rng.pick_str(WORDS)
}

/// Appends a sentence of `lo..=hi` words, capitalised and ending in a period.
fn sentence(rng: &mut Rand, lo: u64, hi: u64, buf: &mut Vec<u8>) {
    let n = rng.range(lo, hi);
    for i in 0..n {
        let w = word(rng).as_bytes();
        if i == 0 {
            buf.push(w[0].to_ascii_uppercase());
            buf.extend_from_slice(&w[1..]);
        } else {
            buf.push(b' ');
            buf.extend_from_slice(w);
        }
    }
    buf.push(b'.');
}

/// Appends `snake_case` identifier made of one to three words.
fn ident(rng: &mut Rand, buf: &mut Vec<u8>) {
    let n = rng.range(1, 3);
    for i in 0..n {
        if i > 0 {
            buf.push(b'_');
        }
        buf.extend_from_slice(word(rng).as_bytes());
    }
}

/// Appends text in `style` until `buf` holds at least `size` bytes.
fn text(rng: &mut Rand, style: TextStyle, size: usize, buf: &mut Vec<u8>) {
    match style {
        TextStyle::Prose => {
            while buf.len() < size {
                let lines = rng.range(2, 8);
                for _ in 0..lines {
                    let start = buf.len();
                    while buf.len() - start < 64 {
                        sentence(rng, 4, 12, buf);
                        buf.push(b' ');
                    }
                    buf.pop();
                    buf.push(b'\n');
                }
                buf.push(b'\n');
            }
        }
        TextStyle::Config => {
            while buf.len() < size {
                match rng.below(10) {
                    0 => {
                        buf.extend_from_slice(b"\n[");
                        ident(rng, buf);
                        buf.extend_from_slice(b"]\n");
                    }
                    1..=3 => {
                        buf.extend_from_slice(b"# ");
                        sentence(rng, 3, 10, buf);
                        buf.push(b'\n');
                    }
                    _ => {
                        ident(rng, buf);
                        buf.extend_from_slice(b" = ");
                        match rng.below(3) {
                            0 => write!(buf, "{}", rng.below(65536)).expect("vec write"),
                            1 => write!(buf, "/usr/lib/{}", word(rng)).expect("vec write"),
                            _ => buf.extend_from_slice(word(rng).as_bytes()),
                        }
                        buf.push(b'\n');
                    }
                }
            }
        }
        TextStyle::Python => {
            buf.extend_from_slice(b"\"\"\"");
            sentence(rng, 4, 10, buf);
            buf.extend_from_slice(b"\"\"\"\n\nimport os\nimport sys\n");
            while buf.len() < size {
                if rng.chance(0.2) {
                    buf.extend_from_slice(b"\n\nclass ");
                    ident(rng, buf);
                    buf.extend_from_slice(b"(object):\n    \"\"\"");
                    sentence(rng, 3, 9, buf);
                    buf.extend_from_slice(b"\"\"\"\n");
                }
                buf.extend_from_slice(b"\n\ndef ");
                ident(rng, buf);
                buf.extend_from_slice(b"(self, value, default=None):\n    # ");
                sentence(rng, 3, 9, buf);
                for _ in 0..rng.range(1, 6) {
                    buf.extend_from_slice(b"\n    ");
                    ident(rng, buf);
                    buf.extend_from_slice(b" = os.path.join(value, \"");
                    buf.extend_from_slice(word(rng).as_bytes());
                    buf.extend_from_slice(b"\")");
                }
                buf.extend_from_slice(b"\n    return default\n");
            }
        }
        TextStyle::Shell => {
            buf.extend_from_slice(b"#!/bin/sh\nset -e\n");
            while buf.len() < size {
                let w = word(rng);
                write!(
                    buf,
                    "\nif [ -x /usr/bin/{w} ]; then\n    {w} --{}",
                    word(rng)
                )
                .expect("vec write");
                write!(buf, " /var/lib/{} || true\nfi\n", word(rng)).expect("vec write");
            }
        }
        TextStyle::Log => {
            let mut t = rng.below(365 * 86_400);
            while buf.len() < size {
                t += rng.below(600);
                let day = t / 86_400;
                let (month, mday) = (MONTHS[(day / 31 % 12) as usize], day % 31 + 1);
                let (h, m, s) = (t / 3600 % 24, t / 60 % 60, t % 60);
                write!(
                    buf,
                    "{month} {mday:>2} {h:02}:{m:02}:{s:02} host {}[{}]: ",
                    rng.pick(NAMES),
                    rng.range(100, 65_000)
                )
                .expect("vec write");
                sentence(rng, 3, 14, buf);
                buf.push(b'\n');
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn content(body: Body) -> Content {
        Content {
            key: Arc::from("/k"),
            variant: 0,
            body,
        }
    }

    #[test]
    fn bodies_render_to_their_exact_size() {
        let styles = [
            TextStyle::Prose,
            TextStyle::Config,
            TextStyle::Python,
            TextStyle::Shell,
            TextStyle::Log,
        ];
        for size in [0, 1, 7, 100, 5000, 200_000] {
            for style in styles {
                let buf = render(&content(Body::Text { style, size }), 3);
                assert_eq!(buf.len() as u64, size);
                assert!(buf.is_ascii());
            }
            for kind in [
                BinKind::Raw,
                BinKind::Elf,
                BinKind::Gzip,
                BinKind::Tzif,
                BinKind::Mo,
            ] {
                let buf = render(&content(Body::Binary { kind, size }), 3);
                assert_eq!(buf.len() as u64, size);
                let h = kind.header();
                assert_eq!(&buf[..h.len().min(buf.len())], &h[..h.len().min(buf.len())]);
            }
        }
    }

    #[test]
    fn host_bodies_copy_or_patch_a_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let bytes: Vec<u8> = (0..131_064u32).map(|i| (i % 251) as u8).collect();
        std::fs::write(&path, &bytes).unwrap();
        let body = |patch| Body::Host {
            path: Arc::from(path.as_path()),
            size: bytes.len() as u64,
            patch,
        };
        assert_eq!(render(&content(body(false)), 1), bytes);
        let patched = render(&content(body(true)), 1);
        assert_eq!(patched.len(), bytes.len());
        let differ: Vec<usize> = (0..bytes.len())
            .filter(|&i| patched[i] != bytes[i])
            .collect();
        assert!(!differ.is_empty() && differ.iter().all(|&i| (65_532..65_540).contains(&i)));
        assert_eq!(patched, render(&content(body(true)), 1));
        let short = Body::Host {
            path: Arc::from(path.as_path()),
            size: 5,
            patch: false,
        };
        let mut out = Vec::new();
        assert!(write_content(&content(short), 1, &mut Scratch::new(), &mut out).is_err());
    }

    #[test]
    fn same_key_and_variant_give_same_bytes() {
        let body = Body::Binary {
            kind: BinKind::Elf,
            size: 100_000,
        };
        let a = render(&content(body.clone()), 9);
        assert_eq!(a, render(&content(body.clone()), 9));
        assert_ne!(a, render(&content(body.clone()), 10));
        let other = Content {
            variant: 1,
            ..content(body)
        };
        assert_ne!(a, render(&other, 9));
    }
}
