//! Every unsafe call of the agent, each wrapped in a safe function: the two
//! bpf(2) commands aya 0.14 does not expose (BPF_OBJ_GET of a pinned link,
//! and BPF_LINK_UPDATE, which swaps the program behind a link atomically, so
//! an upgraded agent never leaves a moment with no program attached, and
//! BPF_OBJ_GET_INFO_BY_FD of a TCX link, for the interface it guards, and
//! BPF_PROG_QUERY, to learn whether the kernel has TCX at all), reading
//! plain records out of a ring buffer, `SO_NETNS_COOKIE`, and sending a
//! TLS control record (close_notify) on a kernel TLS socket.
#![allow(unsafe_code)]

use std::{
    io,
    os::fd::{AsRawFd as _, BorrowedFd, FromRawFd as _, OwnedFd},
};

use aya_obj::generated::bpf_cmd;

/// `bpf_attr.link_update`, the only part of the union this command reads.
#[repr(C)]
struct LinkUpdateAttr {
    link_fd: u32,
    new_prog_fd: u32,
    flags: u32,
    old_prog_fd: u32,
}

/// `bpf_attr` for BPF_OBJ_GET.
#[repr(C)]
struct ObjGetAttr {
    pathname: u64,
    bpf_fd: u32,
    file_flags: u32,
}

/// Issues one bpf(2) command with `attr` as its (prefix of) `bpf_attr`.
/// Mutable: some commands write results back into it (BPF_PROG_QUERY its
/// counts and revision, BPF_OBJ_GET_INFO_BY_FD the info's length), so each
/// `T` must reach as far as its command writes.
fn bpf<T>(cmd: bpf_cmd, attr: &mut T) -> std::io::Result<libc::c_long> {
    // SAFETY: `attr` is a fully initialised #[repr(C)] prefix of bpf_attr,
    // exclusively borrowed for the call, and covers every field its command
    // reads or writes (its size is passed too); any pointers or fds it
    // holds are kept alive by the caller.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd as libc::c_long,
            attr as *mut T,
            std::mem::size_of::<T>() as libc::c_uint,
        )
    };
    if ret < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(ret)
}

/// Replaces the program of `link` with `prog`.
pub fn link_update(link: BorrowedFd<'_>, prog: BorrowedFd<'_>) -> std::io::Result<()> {
    let mut attr = LinkUpdateAttr {
        link_fd: link.as_raw_fd() as u32,
        new_prog_fd: prog.as_raw_fd() as u32,
        flags: 0,
        old_prog_fd: 0,
    };
    bpf(bpf_cmd::BPF_LINK_UPDATE, &mut attr).map(drop)
}

/// Opens a pinned bpf object (here: a link) and returns its descriptor.
pub fn obj_get(path: &std::path::Path) -> std::io::Result<OwnedFd> {
    use std::os::unix::ffi::OsStrExt as _;

    let path = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    let mut attr = ObjGetAttr {
        pathname: path.as_ptr() as u64,
        bpf_fd: 0,
        file_flags: 0,
    };
    let fd = bpf(bpf_cmd::BPF_OBJ_GET, &mut attr)?;
    // SAFETY: the kernel just returned this descriptor to us; nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// `bpf_attr` for BPF_OBJ_GET_INFO_BY_FD.
#[repr(C)]
struct InfoByFdAttr {
    bpf_fd: u32,
    info_len: u32,
    info: u64,
}

/// The index of the interface a TCX link is attached to: 0 once that
/// interface is gone (the link stays, pinned, guarding nothing).
pub fn tcx_link_ifindex(link: BorrowedFd<'_>) -> io::Result<u32> {
    use aya_obj::generated::{bpf_link_info, bpf_link_type};
    // SAFETY: bpf_link_info is integers and unions of integers, for which
    // all zeroes is a valid value.
    let mut info: bpf_link_info = unsafe { std::mem::zeroed() };
    let mut attr = InfoByFdAttr {
        bpf_fd: link.as_raw_fd() as u32,
        info_len: size_of::<bpf_link_info>() as u32,
        info: (&raw mut info) as u64,
    };
    bpf(bpf_cmd::BPF_OBJ_GET_INFO_BY_FD, &mut attr)?;
    if info.type_ != bpf_link_type::BPF_LINK_TYPE_TCX as u32 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("not a TCX link (link type {})", info.type_),
        ));
    }
    // SAFETY: the kernel filled the union's `tcx` member for a TCX link.
    Ok(unsafe { info.__bindgen_anon_1.tcx.ifindex })
}

/// `bpf_attr.query`, whole: the kernel writes the counts, and on TCX hooks
/// the `revision` at its end, whatever size it is given (a shorter struct
/// had its caller's stack overwritten, and a release build crashed).
#[repr(C)]
struct ProgQueryAttr {
    target_ifindex: u32,
    attach_type: u32,
    query_flags: u32,
    attach_flags: u32,
    prog_ids: u64,
    prog_cnt: u32,
    _pad: u32,
    prog_attach_flags: u64,
    link_ids: u64,
    link_attach_flags: u64,
    revision: u64,
}

/// Whether the kernel has TCX (Linux 6.6+): it answers a query of the TCX
/// hooks of the loopback interface, which older kernels refuse as an
/// unknown attach type (`EINVAL`). A query attaches nothing, so probing
/// leaves no trace, and it recognises backports where a version check
/// would not.
pub fn tcx_supported() -> io::Result<bool> {
    use aya_obj::generated::bpf_attach_type;
    let mut attr = ProgQueryAttr {
        target_ifindex: 1, // lo: index 1 in every network namespace
        attach_type: bpf_attach_type::BPF_TCX_INGRESS as u32,
        query_flags: 0,
        attach_flags: 0,
        prog_ids: 0,
        prog_cnt: 0,
        _pad: 0,
        prog_attach_flags: 0,
        link_ids: 0,
        link_attach_flags: 0,
        revision: 0,
    };
    match bpf(bpf_cmd::BPF_PROG_QUERY, &mut attr) {
        Ok(_) => Ok(true),
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => Ok(false),
        Err(e) => Err(e),
    }
}

/// What a descriptor of a pinned bpf object holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BpfObject {
    Link,
    Program,
    Other,
}

/// The kind of bpf object behind `fd`, from the name of its anonymous inode
/// (`anon_inode:bpf-link`, `anon_inode:bpf-prog`): the kernel's own label,
/// where the info of BPF_OBJ_GET_INFO_BY_FD has no field that says.
pub fn bpf_object_kind(fd: BorrowedFd<'_>) -> io::Result<BpfObject> {
    let target = std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd()))?;
    Ok(match target.to_str() {
        Some("anon_inode:bpf-link") => BpfObject::Link,
        Some("anon_inode:bpf-prog") => BpfObject::Program,
        _ => BpfObject::Other,
    })
}

/// A `T` from the start of `bytes` (a ring buffer record the kernel wrote),
/// or `None` when the record is too short.
pub fn read_pod<T: aya::Pod>(bytes: &[u8]) -> Option<T> {
    if bytes.len() < size_of::<T>() {
        return None;
    }
    // SAFETY: `T: Pod` is plain data, valid for every bit pattern; the
    // length is checked above and read_unaligned copes with any alignment.
    Some(unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<T>()) })
}

/// `SO_NETNS_COOKIE` (Linux 5.14+); not in every libc crate release.
const SO_NETNS_COOKIE: libc::c_int = 71;

/// The network-namespace cookie of `socket`'s namespace.
pub fn netns_cookie(socket: BorrowedFd<'_>) -> io::Result<u64> {
    u64_option(socket, SO_NETNS_COOKIE)
}

/// The cookie of `socket` itself, as the kernel programs see it
/// (`bpf_get_socket_cookie`).
pub fn socket_cookie(socket: BorrowedFd<'_>) -> io::Result<u64> {
    u64_option(socket, libc::SO_COOKIE)
}

fn u64_option(socket: BorrowedFd<'_>, name: libc::c_int) -> io::Result<u64> {
    let mut value: u64 = 0;
    let mut len = size_of::<u64>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `value`, which
    // lives for the whole call.
    let rc = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            name,
            (&raw mut value).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(value)
}

/// Hands the allocator's free memory back to the kernel (glibc's
/// `malloc_trim`). A compile of the whole cluster allocates tens of
/// megabytes of temporaries; once they are freed, the agent's resident
/// memory, which its container limit counts, falls back instead of staying
/// at the peak.
pub fn return_free_memory() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim only walks the allocator's own free lists.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Raises the soft limit of open files to the hard one; returns it.
pub fn raise_fd_limit() -> nix::Result<u64> {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE)?;
    setrlimit(Resource::RLIMIT_NOFILE, hard, hard)?;
    Ok(hard)
}

/// Registers a descriptor the agent owns with the tokio reactor, for reading.
pub fn async_owned_fd(fd: OwnedFd) -> io::Result<tokio::io::unix::AsyncFd<OwnedFd>> {
    // SAFETY: an OwnedFd keeps its descriptor open and unchanged until it
    // is dropped, which the AsyncFd does last.
    unsafe { tokio::io::unix::AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE) }
        .map_err(|e| e.into_parts().1)
}

/// Registers a ring buffer map with the tokio reactor, for reading.
pub fn async_ring_buf(
    ring: aya::maps::RingBuf<aya::maps::MapData>,
) -> io::Result<tokio::io::unix::AsyncFd<aya::maps::RingBuf<aya::maps::MapData>>> {
    // SAFETY: the RingBuf owns its MapData, whose descriptor stays open and
    // unchanged until the RingBuf is dropped.
    unsafe { tokio::io::unix::AsyncFd::register_with_interest(ring, tokio::io::Interest::READABLE) }
        .map_err(|e| e.into_parts().1)
}

/// Sends `payload` as one record of `record_type` on a kernel TLS socket,
/// which encrypts it with the connection's current key.
pub fn send_tls_record(fd: BorrowedFd<'_>, record_type: u8, payload: &[u8]) -> io::Result<()> {
    // u64s keep the control buffer aligned for `cmsghdr`.
    let mut control = [0u64; 4];
    // SAFETY: CMSG_SPACE and CMSG_LEN are arithmetic on their argument.
    let (space, len) = unsafe { (libc::CMSG_SPACE(1), libc::CMSG_LEN(1)) };
    assert!(space as usize <= std::mem::size_of_val(&control));
    let mut iov = libc::iovec {
        iov_base: payload.as_ptr().cast_mut().cast(),
        iov_len: payload.len(),
    };
    // SAFETY: an all-zero msghdr is valid (no name, no buffers); the
    // fields set below point at `iov` and `control`, which outlive the
    // sendmsg call, and the kernel only reads through them. CMSG_FIRSTHDR
    // of a control buffer of at least CMSG_SPACE(1) bytes is non-null and
    // has room for the header and its one byte of data.
    let sent = unsafe {
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = space as _;
        let cmsg = libc::CMSG_FIRSTHDR(&msg);
        (*cmsg).cmsg_level = libc::SOL_TLS;
        (*cmsg).cmsg_type = libc::TLS_SET_RECORD_TYPE;
        (*cmsg).cmsg_len = len as _;
        *libc::CMSG_DATA(cmsg) = record_type;
        libc::sendmsg(fd.as_raw_fd(), &msg, libc::MSG_DONTWAIT)
    };
    match sent {
        n if n < 0 => Err(io::Error::last_os_error()),
        n if n as usize == payload.len() => Ok(()),
        n => Err(io::Error::other(format!(
            "sent {n} of a {}-byte TLS record",
            payload.len()
        ))),
    }
}
