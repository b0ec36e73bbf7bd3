//! The splice guard (`mesh_splice_guard`, a BPF LSM program on
//! `file_permission`): splice(2) from a short-circuited socket fails with
//! EINVAL, which callers answer by reading the socket, instead of missing
//! the redirected bytes (docs/short-circuit.md).
//!
//! It needs the BPF LSM to be active (`bpf` in the kernel's `lsm=` list:
//! Debian's and Ubuntu's kernels have it by default), and reads the syscall
//! number at x86_64's offsets, so it is attached there only. Its link is
//! pinned as `lsm_splice_guard`. LSM links cannot swap their program in
//! place, so a restart attaches the new program first and then moves its
//! pin over the old one: splice is never unguarded in between.
use std::path::Path;

use aya::{
    Btf, Ebpf,
    programs::{Lsm, links::FdLink},
};
use tracing::info;

use crate::{DatapathError, pin_over, program_err};

const PROGRAM: &str = "mesh_splice_guard";
const HOOK: &str = "file_permission";
/// The pin of the guard's link in the pin directory.
pub const LINK_PIN: &str = "lsm_splice_guard";

/// Whether this node can run the guard: the BPF LSM is active, on x86_64.
pub fn available() -> bool {
    cfg!(target_arch = "x86_64") && bpf_lsm_active()
}

/// Whether `bpf` is among the kernel's active LSMs. A BPF LSM program
/// attaches without it, but never runs.
pub fn bpf_lsm_active() -> bool {
    std::fs::read_to_string("/sys/kernel/security/lsm")
        .is_ok_and(|list| list.split(',').any(|l| l.trim() == "bpf"))
}

/// Attaches the guard and pins its link at `dir`/[`LINK_PIN`], replacing an
/// earlier agent's.
pub fn attach(ebpf: &mut Ebpf, btf: &Btf, dir: &Path) -> Result<(), DatapathError> {
    let program: &mut Lsm = ebpf
        .program_mut(PROGRAM)
        .expect("the object defines the splice guard")
        .try_into()
        .map_err(program_err(PROGRAM))?;
    program.load(HOOK, btf).map_err(program_err(PROGRAM))?;
    let id = program.attach().map_err(program_err(PROGRAM))?;
    let link = FdLink::from(program.take_link(id).map_err(program_err(PROGRAM))?);
    let replaced = pin_over(link, dir, LINK_PIN)?;
    info!(link = LINK_PIN, replaced, "splice guard attached");
    Ok(())
}

/// Whether the guard is attached under `dir` (for `status`).
pub fn attached(dir: &Path) -> bool {
    dir.join(LINK_PIN).exists()
}
