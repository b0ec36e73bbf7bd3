//! The bound on what a receiver may have waiting in the redirect path
//! (`Inbox` in mesh-common): `mesh_inbox_read`, an fexit program on the
//! kernel's copy of redirected bytes to a reader, counts reads; sk_msg
//! compares them with what it redirected, and past
//! `Setting::RedirectBacklogBytes` sends the connection back to the stack,
//! whose flow control pushes back on the sender (docs/short-circuit.md).
//!
//! Its link is pinned as `fexit_inbox_read`; like the splice guard's, it is
//! replaced by moving the new link's pin over the old one.
use std::path::Path;

use aya::{
    Btf, Ebpf,
    programs::{FExit, links::FdLink},
};
use tracing::info;

use crate::{DatapathError, pin_over, program_err};

const PROGRAM: &str = "mesh_inbox_read";
/// The pin of the program's link in the pin directory.
pub const LINK_PIN: &str = "fexit_inbox_read";
/// Where the kernel copies redirected bytes to a reader: the inner
/// function where a kernel split it out (6.16 and on, which call it
/// directly from tcp_bpf), else the exported one.
const TRACED: [&str; 2] = ["__sk_msg_recvmsg", "sk_msg_recvmsg"];

/// Attaches the read counter to the first of [`TRACED`] this kernel has.
pub fn attach(ebpf: &mut Ebpf, btf: &Btf, dir: &Path) -> Result<(), DatapathError> {
    let program: &mut FExit = ebpf
        .program_mut(PROGRAM)
        .expect("the object defines the inbox read counter")
        .try_into()
        .map_err(program_err(PROGRAM))?;
    let traced = TRACED
        .into_iter()
        .find(|f| {
            btf.id_by_type_name_kind(f, aya_obj::btf::BtfKind::Func)
                .is_ok()
        })
        .unwrap_or(TRACED[1]);
    program.load(traced, btf).map_err(program_err(PROGRAM))?;
    let id = program.attach().map_err(program_err(PROGRAM))?;
    let link = FdLink::from(program.take_link(id).map_err(program_err(PROGRAM))?);
    let replaced = pin_over(link, dir, LINK_PIN)?;
    info!(
        link = LINK_PIN,
        traced, replaced, "redirected reads counted"
    );
    Ok(())
}

/// The node's bound on a receiver's unread redirected bytes: the most TCP
/// would hold for a receiver that does not read (the third value of
/// `net.ipv4.tcp_rmem`), 6 MiB (the kernel's default) if unreadable.
pub fn node_bound() -> u32 {
    std::fs::read_to_string("/proc/sys/net/ipv4/tcp_rmem")
        .ok()
        .and_then(|text| rmem_max(&text))
        .unwrap_or(6 << 20)
}

fn rmem_max(tcp_rmem: &str) -> Option<u32> {
    tcp_rmem.split_whitespace().nth(2)?.parse().ok()
}

/// Whether the read counter is attached under `dir` (for `status`).
pub fn attached(dir: &Path) -> bool {
    dir.join(LINK_PIN).exists()
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_bound_is_tcp_rmem_s_maximum() {
        assert_eq!(super::rmem_max("4096\t131072\t6291456\n"), Some(6_291_456));
        assert_eq!(super::rmem_max("4096 131072"), None);
        assert_eq!(super::rmem_max(""), None);
    }
}
