//! Standard output that ends the process quietly when the reader goes away (`cowherd list | head`).

use std::io::{StdoutLock, Write};

/// Writes to stdout; on a closed pipe exits with 141 (128 + SIGPIPE), as a shell tool killed by
/// SIGPIPE would.
fn write(f: impl FnOnce(&mut StdoutLock<'_>) -> std::io::Result<()>) {
    if let Err(e) = f(&mut std::io::stdout().lock()) {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            std::process::exit(141);
        }
        eprintln!("error: writing to stdout: {e}");
        std::process::exit(1);
    }
}

/// Writes one line to stdout.
pub fn line(args: std::fmt::Arguments<'_>) {
    write(|out| out.write_fmt(args).and_then(|()| out.write_all(b"\n")));
}

/// Writes `text` (already line-terminated) to stdout.
pub fn text(text: &str) {
    write(|out| out.write_all(text.as_bytes()));
}

/// `println!` that survives a closed pipe.
#[macro_export]
macro_rules! outln {
    () => { $crate::out::line(format_args!("")) };
    ($($arg:tt)*) => { $crate::out::line(format_args!($($arg)*)) };
}
