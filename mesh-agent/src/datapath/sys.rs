//! The one bpf(2) command aya 0.14 does not expose for cgroup links:
//! BPF_LINK_UPDATE, which swaps the program behind a link atomically, so an
//! upgraded agent never leaves a moment with no program attached.
#![allow(unsafe_code)]

use std::os::fd::{AsRawFd as _, BorrowedFd};

use aya_obj::generated::bpf_cmd;

/// `bpf_attr.link_update`, the only part of the union this command reads.
#[repr(C)]
struct LinkUpdateAttr {
    link_fd: u32,
    new_prog_fd: u32,
    flags: u32,
    old_prog_fd: u32,
}

/// Replaces the program of `link` with `prog`.
pub fn link_update(link: BorrowedFd<'_>, prog: BorrowedFd<'_>) -> std::io::Result<()> {
    let attr = LinkUpdateAttr {
        link_fd: link.as_raw_fd() as u32,
        new_prog_fd: prog.as_raw_fd() as u32,
        flags: 0,
        old_prog_fd: 0,
    };
    // SAFETY: `attr` is a fully initialised bpf_attr prefix that outlives the
    // call, and its size is passed so the kernel reads no further; the fds are
    // borrowed, so they stay open for the duration of the call.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            bpf_cmd::BPF_LINK_UPDATE as libc::c_long,
            &attr as *const LinkUpdateAttr,
            std::mem::size_of::<LinkUpdateAttr>() as libc::c_uint,
        )
    };
    if ret < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// `bpf_attr` for BPF_OBJ_GET.
#[repr(C)]
struct ObjGetAttr {
    pathname: u64,
    bpf_fd: u32,
    file_flags: u32,
}

/// Opens a pinned bpf object (here: a link) and returns its descriptor.
pub fn obj_get(path: &std::path::Path) -> std::io::Result<std::os::fd::OwnedFd> {
    use std::os::{fd::FromRawFd as _, unix::ffi::OsStrExt as _};

    let path = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    let attr = ObjGetAttr {
        pathname: path.as_ptr() as u64,
        bpf_fd: 0,
        file_flags: 0,
    };
    // SAFETY: `attr` points at a NUL-terminated path that outlives the call,
    // and its size is passed so the kernel reads no further.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            bpf_cmd::BPF_OBJ_GET as libc::c_long,
            &attr as *const ObjGetAttr,
            std::mem::size_of::<ObjGetAttr>() as libc::c_uint,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: the kernel just returned this descriptor to us; nothing else owns it.
    Ok(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd as i32) })
}
