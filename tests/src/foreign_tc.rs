//! Another project's tc program on an interface, as a CNI would attach
//! one: a two-instruction classifier that returns one verdict for every
//! packet (`TC_ACT_OK`: pass, and end the TCX chain; `TC_ACT_SHOT`: drop),
//! attached through its own TCX link after whatever is there. On a kernel
//! without TCX, where tools attach clsact filters instead, it is a
//! `matchall` filter with that verdict at priority 100 (after the mesh's at
//! 1), made by `tc` itself. The tests use it to check that the mesh's tc
//! programs run whatever else is attached, and let the others run after
//! them.
//!
//! Made with bpf(2) directly: loading two instructions needs no object
//! file, and the tests then depend on nothing the mesh itself uses.
use std::os::fd::{FromRawFd as _, OwnedFd};

use anyhow::{Context as _, ensure};

use crate::netns::Netns;

const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_LINK_CREATE: libc::c_long = 28;
const BPF_PROG_TYPE_SCHED_CLS: u32 = 3;
const BPF_TCX_INGRESS: u32 = 46;

/// What the foreign program answers for every packet.
#[derive(Clone, Copy)]
pub enum Verdict {
    /// `TC_ACT_OK`: pass, ending the chain.
    Pass = 0,
    /// `TC_ACT_SHOT`.
    Drop = 2,
}

/// `mov64 r0, verdict; exit`.
fn program(verdict: Verdict) -> [u64; 2] {
    [
        u64::from_le_bytes([0xb7, 0, 0, 0, verdict as u8, 0, 0, 0]),
        u64::from_le_bytes([0x95, 0, 0, 0, 0, 0, 0, 0]),
    ]
}

/// bpf(2) with `attr` (a zeroed `union bpf_attr` filled in by the caller).
fn bpf(cmd: libc::c_long, attr: &mut [u8; 128]) -> std::io::Result<OwnedFd> {
    // SAFETY: `attr` is a valid, writable 128-byte buffer for the call's
    // duration, larger than every command's part of `union bpf_attr`; the
    // pointers inside it (filled in by the callers) point to live data.
    let fd = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr.as_mut_ptr(), attr.len()) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a non-negative result of these commands is a new descriptor
    // owned by no one else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

fn put_u32(attr: &mut [u8; 128], offset: usize, value: u32) {
    attr[offset..offset + 4].copy_from_slice(&value.to_ne_bytes());
}

fn put_u64(attr: &mut [u8; 128], offset: usize, value: u64) {
    attr[offset..offset + 8].copy_from_slice(&value.to_ne_bytes());
}

/// A foreign program on an interface, there until dropped.
pub enum Foreign {
    /// A TCX link, which lasts as long as its descriptor.
    Link(OwnedFd),
    /// A clsact filter, deleted on drop.
    Filter { ns: String, interface: String },
}

impl Drop for Foreign {
    fn drop(&mut self) {
        if let Foreign::Filter { ns, interface } = self {
            let _ = std::process::Command::new("ip")
                .args(["netns", "exec", ns, "tc", "filter", "del", "dev", interface])
                .args(["ingress", "prio", FILTER_PRIORITY])
                .status();
        }
    }
}

const FILTER_PRIORITY: &str = "100";

/// Attaches a program answering `verdict` at the ingress of `interface` in
/// `ns`, after whatever is there: a TCX link, or a clsact filter where the
/// kernel has no TCX.
pub fn attach_ingress(ns: &Netns, interface: &str, verdict: Verdict) -> anyhow::Result<Foreign> {
    match attach_tcx(ns, interface, verdict) {
        Ok(link) => Ok(Foreign::Link(link)),
        // No TCX (before Linux 6.6): an unknown attach type.
        Err(e)
            if e.downcast_ref::<std::io::Error>()
                .and_then(std::io::Error::raw_os_error)
                == Some(libc::EINVAL) =>
        {
            // The qdisc may be there already (the mesh's): fine.
            let _ = ns.exec("tc", &["qdisc", "add", "dev", interface, "clsact"]);
            let action = match verdict {
                Verdict::Pass => "pass",
                Verdict::Drop => "drop",
            };
            ns.exec(
                "tc",
                &[
                    "filter",
                    "add",
                    "dev",
                    interface,
                    "ingress",
                    "prio",
                    FILTER_PRIORITY,
                    "matchall",
                    "action",
                    action,
                ],
            )
            .context("attaching the foreign matchall filter")?;
            Ok(Foreign::Filter {
                ns: ns.name().to_string(),
                interface: interface.to_string(),
            })
        }
        Err(e) => Err(e),
    }
}

fn attach_tcx(ns: &Netns, interface: &str, verdict: Verdict) -> anyhow::Result<OwnedFd> {
    let license = c"GPL";
    let insns = program(verdict);
    let mut load = [0u8; 128];
    put_u32(&mut load, 0, BPF_PROG_TYPE_SCHED_CLS);
    put_u32(&mut load, 4, insns.len() as u32);
    put_u64(&mut load, 8, insns.as_ptr() as u64);
    put_u64(&mut load, 16, license.as_ptr() as u64);
    let prog = bpf(BPF_PROG_LOAD, &mut load).context("loading the foreign classifier")?;
    let name = std::ffi::CString::new(interface)?;
    ns.run_in(|| {
        // SAFETY: `name` is a NUL-terminated string that outlives the call.
        let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) };
        ensure!(ifindex != 0, "no interface {interface} in {}", ns.name());
        let mut link = [0u8; 128];
        put_u32(&mut link, 0, std::os::fd::AsRawFd::as_raw_fd(&prog) as u32);
        put_u32(&mut link, 4, ifindex);
        put_u32(&mut link, 8, BPF_TCX_INGRESS);
        Ok(bpf(BPF_LINK_CREATE, &mut link)?)
    })
}
