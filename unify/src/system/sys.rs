//! The one module with `unsafe`: the inode-flag ioctls (`FS_IOC_GETFLAGS` / `FS_IOC_SETFLAGS`),
//! the page-cache residency of a file (`mmap` + `mincore`), the bound on malloc arenas and
//! marking inherited descriptors close-on-exec (`close_range`).
#![allow(unsafe_code)]

use std::os::fd::{AsFd, AsRawFd};

/// `FS_IMMUTABLE_FL` from `linux/fs.h`: the inode cannot be modified, renamed, linked or unlinked.
pub(crate) const FS_IMMUTABLE_FL: libc::c_long = 0x0000_0010;
/// `FS_APPEND_FL`: the inode can only be appended to, not renamed, linked or unlinked.
pub(crate) const FS_APPEND_FL: libc::c_long = 0x0000_0020;

/// The flags a filesystem sets on a file by itself, for its own bookkeeping (ext4's extent map,
/// huge-file block counting, blocks past EOF (older kernels), inline data, xattr inodes,
/// hashed directories, case-folding directories): they say nothing about how the file may be
/// used, and two files that differ only in them are interchangeable. Every other flag
/// `FS_IOC_GETFLAGS` reports was set by someone (`chattr`, fs-verity, an encryption policy, a
/// directory's inherited `+C`/`+c`).
const FS_OWN_FLAGS: libc::c_long = 0x0000_1000 // FS_INDEX_FL
    | 0x0004_0000 // FS_HUGE_FILE_FL
    | 0x0008_0000 // FS_EXTENT_FL
    | 0x0020_0000 // FS_EA_INODE_FL
    | 0x0040_0000 // EXT4_EOFBLOCKS_FL (set by older kernels)
    | 0x1000_0000 // FS_INLINE_DATA_FL
    | 0x4000_0000; // FS_CASEFOLD_FL

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

/// The inode flags of an open file that someone set on it — `chattr` flags such as `+i`, `+a`,
/// `+A`, `+d`, `+S`, `+C`, and fs-verity or encryption — without those the filesystem sets by
/// itself (see `FS_OWN_FLAGS`). 0 on a filesystem without inode flags.
///
/// # Errors
/// The ioctl's errors other than "not supported here".
pub(crate) fn user_flags(fd: impl AsFd) -> nix::Result<u32> {
    use nix::errno::Errno;
    match get_flags(fd) {
        Ok(flags) => Ok((libc::c_long::from(flags) & !FS_OWN_FLAGS) as u32),
        Err(Errno::ENOTTY | Errno::EOPNOTSUPP | Errno::ENOSYS | Errno::EINVAL) => Ok(0),
        Err(e) => Err(e),
    }
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

/// Sets the flags of `mask` (besides those already set).
pub(crate) fn add_flags(fd: impl AsFd, mask: libc::c_long) -> nix::Result<()> {
    let fd = fd.as_fd();
    let flags = get_flags(fd)?;
    let wanted = flags | mask as libc::c_int;
    if wanted != flags {
        set_flags(fd, wanted)?;
    }
    Ok(())
}

/// Clears every flag someone set (see [`user_flags`]) except `FS_IMMUTABLE_FL`, which a store
/// object's kind decides; returns the flags cleared.
pub(crate) fn clear_foreign_flags(fd: impl AsFd) -> nix::Result<u32> {
    let fd = fd.as_fd();
    let flags = get_flags(fd)?;
    let foreign = (libc::c_long::from(flags) & !FS_OWN_FLAGS & !FS_IMMUTABLE_FL) as libc::c_int;
    if foreign != 0 {
        set_flags(fd, flags & !foreign)?;
    }
    Ok(foreign as u32)
}

/// Clears `FS_IMMUTABLE_FL` and `FS_APPEND_FL`, the flags that forbid unlinking; returns
/// whether either was set.
pub(crate) fn clear_unlink_guards(fd: impl AsFd) -> nix::Result<bool> {
    let fd = fd.as_fd();
    let flags = get_flags(fd)?;
    let guards = (FS_IMMUTABLE_FL | FS_APPEND_FL) as libc::c_int;
    if flags & guards == 0 {
        return Ok(false);
    }
    set_flags(fd, flags & !guards)?;
    Ok(true)
}

/// Bytes of the open file `fd` (of `size` bytes) resident in the page cache right now: the
/// file is mapped (read-only, shared; no page is faulted in) and `mincore(2)` reports each
/// page.
pub(crate) fn resident_bytes(fd: impl AsFd, size: u64) -> nix::Result<u64> {
    use nix::sys::mman::{MapFlags, ProtFlags, mmap, munmap};
    let Some(len) = std::num::NonZeroUsize::new(size as usize) else {
        return Ok(0);
    };
    let page = nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE)?.unwrap_or(4096) as usize;
    let pages = len.get().div_ceil(page);
    // SAFETY: a fresh read-only shared mapping of a file we hold open; nothing reads through
    // it, and it is unmapped before returning.
    let addr = unsafe { mmap(None, len, ProtFlags::PROT_READ, MapFlags::MAP_SHARED, fd, 0) }?;
    let mut vec = vec![0u8; pages];
    // SAFETY: `addr` maps `len` bytes; `vec` has one byte per page of them.
    let rc = unsafe { libc::mincore(addr.as_ptr(), len.get(), vec.as_mut_ptr()) };
    let result = nix::errno::Errno::result(rc).map(|_| {
        let resident = vec.iter().filter(|&&v| v & 1 != 0).count() as u64;
        let last_partial = (len.get() % page != 0 && vec[pages - 1] & 1 != 0) as u64;
        resident * page as u64 - last_partial * (page - len.get() % page) as u64
    });
    // SAFETY: `addr` and `len` are the mapping made above.
    unsafe { munmap(addr, len.get()) }?;
    result
}

/// Bounds the C allocator's arenas for this process at `arenas`, unless the environment already
/// chose (`MALLOC_ARENA_MAX`); returns the bound set, if any. Call it first thing in `main`,
/// before any thread starts.
///
/// glibc gives each thread that allocates under contention an arena of its own, up to eight a
/// core, and keeps what the thread freed there. A run's I/O pool has eight threads a core, so
/// without a bound the peak RSS of a run grows with the arenas the pool happens to touch
/// (heaptrack of a 20-guest run: ~29 MB live at the peak, 65 MB resident). The threads
/// allocate little (paths, listing buffers), so a few arenas cost them nothing measurable.
/// Other C libraries: nothing is done.
pub fn bound_malloc_arenas(arenas: u16) -> Option<u16> {
    if std::env::var_os("MALLOC_ARENA_MAX").is_some() {
        return None;
    }
    set_arena_max(arenas)
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn set_arena_max(arenas: u16) -> Option<u16> {
    // SAFETY: `mallopt` takes two ints and changes a tunable of the allocator; glibc applies
    // `M_ARENA_MAX` to arenas made after the call and is thread-safe for it.
    let ok = unsafe { libc::mallopt(libc::M_ARENA_MAX, libc::c_int::from(arenas)) };
    (ok == 1).then_some(arenas)
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn set_arena_max(_arenas: u16) -> Option<u16> {
    None
}

/// Marks every file descriptor of this process above standard error close-on-exec, so that no
/// program it starts afterwards inherits one; what matters are the descriptors the process was
/// itself started with (Rust and SQLite open theirs close-on-exec), which nothing else closes.
///
/// # Errors
/// The errno of `close_range`, or of `fcntl` on a kernel without `CLOSE_RANGE_CLOEXEC`.
///
/// # Algorithm
/// `close_range(3, ~0, CLOSE_RANGE_CLOEXEC)` (Linux 5.11); where the kernel refuses it, `fcntl`
/// `F_SETFD` on each descriptor `/proc/self/fd` lists (one closed meanwhile is skipped).
pub fn close_on_exec_above_stderr() -> nix::Result<()> {
    // SAFETY: close_range takes three integers and only sets a flag on descriptors in the range.
    let done = unsafe {
        libc::syscall(
            libc::SYS_close_range,
            3_u32,
            u32::MAX,
            libc::CLOSE_RANGE_CLOEXEC,
        )
    };
    if done == 0 {
        return Ok(());
    }
    match nix::errno::Errno::last() {
        nix::errno::Errno::ENOSYS | nix::errno::Errno::EINVAL => {}
        errno => return Err(errno),
    }
    let listed: Vec<libc::c_int> = std::fs::read_dir("/proc/self/fd")
        .map_err(|e| nix::errno::Errno::from_raw(e.raw_os_error().unwrap_or(libc::EIO)))?
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse().ok())
        .filter(|&fd| fd > 2)
        .collect();
    for fd in listed {
        // SAFETY: fcntl on a descriptor number: one closed since the listing (the listing's own
        // among them) fails with EBADF; a number reused meanwhile gets a harmless flag.
        let flags = unsafe { libc::fcntl(fd, libc::F_GETFD) };
        // SAFETY: as above.
        if flags < 0 || unsafe { libc::fcntl(fd, libc::F_SETFD, flags | libc::FD_CLOEXEC) } < 0 {
            match nix::errno::Errno::last() {
                nix::errno::Errno::EBADF => {}
                errno => return Err(errno),
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn close_on_exec_above_stderr_marks_an_inherited_descriptor() {
        use nix::fcntl::{FcntlArg, FdFlag, fcntl};
        let file = std::fs::File::open("/proc/self/status").expect("open a file");
        fcntl(&file, FcntlArg::F_SETFD(FdFlag::empty())).expect("clear FD_CLOEXEC");
        close_on_exec_above_stderr().expect("close_range");
        let flags = fcntl(&file, FcntlArg::F_GETFD).expect("F_GETFD");
        assert!(FdFlag::from_bits_truncate(flags).contains(FdFlag::FD_CLOEXEC));
    }

    #[test]
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    fn bound_malloc_arenas_sets_the_bound_unless_the_environment_chose_one() {
        let set = bound_malloc_arenas(2);
        if std::env::var_os("MALLOC_ARENA_MAX").is_some() {
            assert_eq!(set, None, "MALLOC_ARENA_MAX in the environment must win");
        } else {
            assert_eq!(set, Some(2), "glibc refused M_ARENA_MAX");
        }
    }
}
