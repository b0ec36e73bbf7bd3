//! The splice guard: `splice(2)` from a socket the short-circuit delivers
//! to fails with EINVAL instead of missing bytes.
//!
//! Redirected bytes wait in the receiving socket's psock queue, which
//! `tcp_splice_read` never looks at: a splice reader would see the FIN
//! before them (the self-test's `splice_misses_redirected_bytes`, present
//! in every kernel of the matrix). No LSM hook tells splice from read, as
//! both check `file_permission(MAY_READ)` first; the syscall being served
//! does. EINVAL is what splice answers for a file it cannot handle, and
//! what callers fall back on (Go's `io.Copy`, HAProxy up to 3.2, nginx):
//! they read the socket instead, and get every byte.
//!
//! Everything else is left as it was: other syscalls, other files, and
//! sockets the short-circuit never tracked (`SOCKET_INBOX`, filled by
//! `mesh_sockops` when a socket enters the sockhash).

use aya_ebpf::{
    cty::c_void,
    helpers::{
        bpf_get_current_task_btf, bpf_get_socket_cookie, bpf_sock_from_file, bpf_task_pt_regs,
    },
    macros::lsm,
    programs::LsmContext,
};
use mesh_common::Counter;

use crate::maps::{SOCKET_INBOX, count, lookup};

/// `MAY_READ` of `include/linux/fs.h`.
const MAY_READ: i32 = 4;
/// `-EINVAL`.
const EINVAL: i32 = 22;
/// splice(2) on x86_64 (`arch/x86/entry/syscalls/syscall_64.tbl`); the
/// agent attaches the guard on x86_64 only.
const SYS_SPLICE: u64 = 275;
/// Offset of `orig_ax` (the syscall number) in x86_64's `struct pt_regs`,
/// part of the user ABI (`ORIG_RAX` of `asm/ptrace-abi.h`, 15 × 8).
const PT_REGS_ORIG_AX: usize = 120;
/// Offset of `sk` in `struct socket` (state, type, flags, file, sk), the
/// same since Linux 5.3. The verifier checks this load against the kernel's
/// BTF: an offset that were wrong would not load.
const SOCKET_SK: usize = 24;

#[lsm(hook = "file_permission")]
pub fn mesh_splice_guard(ctx: LsmContext) -> i32 {
    // file_permission(struct file *file, int mask), then the verdict of
    // the LSM programs before this one: a refusal stands.
    let previous: i32 = ctx.arg(2);
    if previous != 0 {
        return previous;
    }
    let mask: i32 = ctx.arg(1);
    // The syscall first: this runs on every read and write of the node.
    if mask & MAY_READ == 0 || !serving_splice() {
        return 0;
    }
    let file: *mut c_void = ctx.arg(0);
    match socket_cookie(file) {
        Some(cookie) if lookup(&SOCKET_INBOX, &cookie).is_some() => {
            count(Counter::SpliceRefused, 1);
            -EINVAL
        }
        _ => 0,
    }
}

/// Whether the current task is in splice(2).
#[inline(always)]
fn serving_splice() -> bool {
    // SAFETY: helpers of BPF LSM programs; the task's registers are a
    // BTF-typed pointer the verifier bounds-checks, read at the constant
    // offset of a u64 field.
    unsafe {
        let regs = bpf_task_pt_regs(bpf_get_current_task_btf()) as *const u8;
        if regs.is_null() {
            return false;
        }
        core::ptr::read_volatile(regs.add(PT_REGS_ORIG_AX) as *const u64) == SYS_SPLICE
    }
}

/// The cookie of the socket behind `file`, if it is one.
#[inline(always)]
fn socket_cookie(file: *mut c_void) -> Option<u64> {
    // SAFETY: `file` is the hook's BTF-typed argument; the helper returns
    // null for a file that is no socket, and `sk` is read at its constant
    // offset (checked by the verifier) and tested for null before use.
    unsafe {
        let socket = bpf_sock_from_file(file.cast()) as *const u8;
        if socket.is_null() {
            return None;
        }
        let sk = core::ptr::read_volatile(socket.add(SOCKET_SK) as *const *mut c_void);
        if sk.is_null() {
            return None;
        }
        Some(bpf_get_socket_cookie(sk))
    }
}
