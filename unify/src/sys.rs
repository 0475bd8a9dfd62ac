//! The one module with `unsafe`: the inode-flag ioctls (`FS_IOC_GETFLAGS` / `FS_IOC_SETFLAGS`).
#![allow(unsafe_code)]

use std::os::fd::{AsFd, AsRawFd};

/// `FS_IMMUTABLE_FL` from `linux/fs.h`: the inode cannot be modified, renamed, linked or unlinked.
pub(crate) const FS_IMMUTABLE_FL: libc::c_long = 0x0000_0010;

// The kernel defines these ioctls with `long` in the type but reads and writes an `int`.
nix::ioctl_read!(fs_ioc_getflags, b'f', 1, libc::c_long);
nix::ioctl_write_ptr!(fs_ioc_setflags, b'f', 2, libc::c_long);

/// Reads the inode flags of an open file.
pub(crate) fn get_flags(fd: impl AsFd) -> nix::Result<libc::c_int> {
    let mut flags: libc::c_long = 0;
    // SAFETY: the fd is open for the call's duration; the kernel writes one int into `flags`,
    // which is larger than an int and zero-initialised.
    unsafe { fs_ioc_getflags(fd.as_fd().as_raw_fd(), &mut flags) }?;
    Ok(flags as libc::c_int)
}

/// Writes the inode flags of an open file.
fn set_flags(fd: impl AsFd, flags: libc::c_int) -> nix::Result<()> {
    let value = flags as libc::c_long;
    // SAFETY: the fd is open for the call's duration; the kernel reads one int from `value`.
    unsafe { fs_ioc_setflags(fd.as_fd().as_raw_fd(), &value) }?;
    Ok(())
}

/// Whether the file carries `FS_IMMUTABLE_FL`.
pub(crate) fn is_immutable(fd: impl AsFd) -> nix::Result<bool> {
    Ok(get_flags(fd)? as libc::c_long & FS_IMMUTABLE_FL != 0)
}

/// Sets or clears `FS_IMMUTABLE_FL`; returns whether it was set before.
pub(crate) fn set_immutable(fd: impl AsFd, on: bool) -> nix::Result<bool> {
    let fd = fd.as_fd();
    let flags = get_flags(fd)?;
    let was = flags as libc::c_long & FS_IMMUTABLE_FL != 0;
    if was != on {
        let flag = FS_IMMUTABLE_FL as libc::c_int;
        set_flags(fd, if on { flags | flag } else { flags & !flag })?;
    }
    Ok(was)
}
