//! The tc programs on interfaces: how they are attached, found again after
//! a restart, and given a new program with no moment unguarded. Two ways,
//! one per kernel generation, behind one pin per hook
//! (`tc_<direction>_<interface>`, `tc_workload_<direction>_<ifindex>`):
//!
//! - **TCX** (Linux 6.6+): a bpf_link, pinned. A restart swaps its program
//!   in place (`BPF_LINK_UPDATE`). It coexists with other tools' programs,
//!   and the mesh's goes first in the chain.
//! - **netlink** (older kernels: a clsact qdisc and a cls_bpf filter). The
//!   filter is no bpf_link and cannot be pinned: it belongs to the
//!   interface, and outlives the agent as a link does. The mesh's filter
//!   sits at priority [`FILTER_PRIORITY`] (the first a filter can have) and
//!   handle [`FILTER_HANDLE`]; a restart sends the new program for that
//!   same handle, which cls_bpf swaps in under RCU, so a packet meets the
//!   old program or the new one, never none. The program itself is pinned
//!   at the hook's pin, so the pin directory still records which
//!   interfaces the mesh guards, and a filter that went with its
//!   interface is told apart from one still there (its program's id).
use std::{
    os::fd::AsFd as _,
    path::{Path, PathBuf},
};

use aya::{
    Ebpf,
    programs::{
        LinkOrder, ProgramInfo, SchedClassifier, TcAttachType,
        links::FdLink,
        tc::{NlOptions, SchedClassifierLink, TcAttachOptions, TcHandle},
    },
};
use tracing::{info, warn};

use crate::{
    DatapathError, attach_pinned, dup_program_fd, netlink, not_a_bpf_link, program_err, sys,
};

/// How the operator asked for tc programs to be attached.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TcAttach {
    /// TCX where the kernel has it, netlink otherwise.
    #[default]
    Auto,
    /// TCX, or refuse to start.
    Tcx,
    /// netlink (clsact and cls_bpf), even where TCX exists.
    Netlink,
}

/// How tc programs are attached on this node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum TcMode {
    Tcx,
    Netlink,
}

impl TcMode {
    pub fn name(self) -> &'static str {
        match self {
            TcMode::Tcx => "tcx",
            TcMode::Netlink => "netlink",
        }
    }

    /// What the kernel offers, and what the operator asked for.
    pub fn choose(asked: TcAttach) -> Result<Self, DatapathError> {
        let tcx = sys::tcx_supported().map_err(|source| DatapathError::Io {
            what: "probing for TCX (BPF_PROG_QUERY of lo)".into(),
            source,
        })?;
        match (asked, tcx) {
            (TcAttach::Auto | TcAttach::Tcx, true) => Ok(TcMode::Tcx),
            // The fallback's one log line is the agent's, for every missing
            // feature (`features`); the start line says `tc="netlink"`.
            (TcAttach::Netlink, _) | (TcAttach::Auto, false) => Ok(TcMode::Netlink),
            (TcAttach::Tcx, false) => Err(DatapathError::Unsupported {
                feature: "TCX links for tc programs (--tc-attach tcx)",
                since: "6.6",
                instead: "--tc-attach auto or netlink attaches clsact filters instead",
            }),
        }
    }
}

/// The priority of the mesh's clsact filters: the first there is, so the
/// mesh judges a packet before any other tool's filter can end the chain.
pub const FILTER_PRIORITY: u16 = 1;
/// The handle of the mesh's clsact filters ("me", "sh"): fixed, so a
/// restarted agent finds them again, and unlike the `1` other tools pick.
pub const FILTER_HANDLE: TcHandle = TcHandle::new(0x6d65, 0x7368);

/// Where the tc attachment of `direction` on `interface` is pinned.
pub fn tc_link_pin(dir: &Path, direction: &str, interface: &str) -> PathBuf {
    dir.join(format!("tc_{direction}_{interface}"))
}

/// Whether a pinned tc attachment still guards its interface.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TcLinkState {
    /// Attached to the interface that now has the name.
    Guarding,
    /// Attached to nothing: the interface was deleted (and perhaps created
    /// again under the same name, with a new index).
    Stale,
    /// Nothing pinned, or nothing readable.
    Missing,
}

/// The state of the tc attachment pinned at `pin` for `interface`: a TCX
/// link, or the program of a clsact filter.
pub fn tc_link_state(pin: &Path, interface: &str) -> TcLinkState {
    let Ok(pinned) = sys::obj_get(pin) else {
        return TcLinkState::Missing;
    };
    let Ok(current) = nix::net::if_::if_nametoindex(interface) else {
        return TcLinkState::Stale;
    };
    match sys::bpf_object_kind(pinned.as_fd()) {
        Ok(sys::BpfObject::Link) => match sys::tcx_link_ifindex(pinned.as_fd()) {
            Ok(linked) if linked != 0 && linked == current => TcLinkState::Guarding,
            Ok(_) => TcLinkState::Stale,
            Err(_) => TcLinkState::Missing,
        },
        Ok(sys::BpfObject::Program) => {
            let Ok(program) = ProgramInfo::from_pin(pin) else {
                return TcLinkState::Missing;
            };
            // The program's filter, on either hook (the two directions run
            // different programs, so the id says which).
            let ours = |f: &netlink::TcFilter| {
                f.priority == FILTER_PRIORITY
                    && f.handle == u32::from(FILTER_HANDLE)
                    && f.program_id == program.id()
            };
            let found = [true, false].into_iter().any(|ingress| {
                netlink::tc_filters(current, ingress).is_ok_and(|f| f.iter().any(ours))
            });
            if found {
                TcLinkState::Guarding
            } else {
                TcLinkState::Stale
            }
        }
        _ => TcLinkState::Missing,
    }
}

/// How the attachment pinned at `pin` was made, if one is.
pub fn pinned_mode(pin: &Path) -> Option<TcMode> {
    let pinned = sys::obj_get(pin).ok()?;
    match sys::bpf_object_kind(pinned.as_fd()).ok()? {
        sys::BpfObject::Link => Some(TcMode::Tcx),
        sys::BpfObject::Program => Some(TcMode::Netlink),
        sys::BpfObject::Other => None,
    }
}

/// Deletes the mesh's clsact filter from interface `ifindex`'s hook when
/// what is pinned at `pin` is the program of one (a TCX link goes with its
/// pin instead). An interface already gone took its filters with it.
pub(crate) fn detach_filter(pin: &Path, ifindex: u32, attach_type: TcAttachType) {
    if pinned_mode(pin) != Some(TcMode::Netlink) {
        return;
    }
    let Ok(interface) = nix::net::if_::if_indextoname(ifindex) else {
        return;
    };
    let interface = interface.to_string_lossy();
    let link = SchedClassifierLink::attached(
        &interface,
        attach_type,
        FILTER_PRIORITY,
        FILTER_HANDLE,
        None,
    );
    if let Ok(link) = link
        && let Err(e) = aya::programs::links::Link::detach(link)
    {
        warn!(interface = %interface, error = %e, "could not delete the mesh's tc filter");
    }
}

/// The tc program `name`, loaded into the kernel (once).
pub(crate) fn loaded_classifier<'a>(
    ebpf: &'a mut Ebpf,
    name: &'static str,
) -> Result<&'a mut SchedClassifier, DatapathError> {
    let program: &mut SchedClassifier = ebpf
        .program_mut(name)
        .expect("the object defines the tc programs")
        .try_into()
        .map_err(program_err(name))?;
    if program.fd().is_err() {
        program.load().map_err(program_err(name))?;
    }
    Ok(program)
}

/// Attaches `program` to `interface` unless what is pinned at `pin`
/// already guards it; whether it attached.
pub(crate) fn guard(
    ebpf: &mut Ebpf,
    mode: TcMode,
    program: &'static str,
    interface: &str,
    attach_type: TcAttachType,
    pin: &Path,
) -> Result<bool, DatapathError> {
    if tc_link_state(pin, interface) == TcLinkState::Guarding {
        return Ok(false);
    }
    attach(ebpf, mode, program, interface, attach_type, pin)?;
    Ok(true)
}

/// Puts program `name` on `interface`'s hook, replacing in place what a
/// previous agent attached there.
pub(crate) fn attach(
    ebpf: &mut Ebpf,
    mode: TcMode,
    name: &'static str,
    interface: &str,
    attach_type: TcAttachType,
    pin: &Path,
) -> Result<(), DatapathError> {
    // A filter stays with its interface, pinned or not: whatever was pinned,
    // a mesh filter found there is replaced in place. A pinned TCX link is
    // kept as the way this hook is attached, even under --tc-attach netlink.
    let mode = match pinned_mode(pin) {
        Some(TcMode::Tcx) => TcMode::Tcx,
        _ => mode,
    };
    match mode {
        TcMode::Tcx => attach_tcx(ebpf, name, interface, attach_type, pin),
        TcMode::Netlink => attach_filter(ebpf, name, interface, attach_type, pin),
    }
}

fn attach_tcx(
    ebpf: &mut Ebpf,
    name: &'static str,
    interface: &str,
    attach_type: TcAttachType,
    pin: &Path,
) -> Result<(), DatapathError> {
    let program = loaded_classifier(ebpf, name)?;
    let prog_fd = dup_program_fd(program.fd().map_err(program_err(name))?.as_fd())?;
    if pin.exists() && tc_link_state(pin, interface) != TcLinkState::Guarding {
        // Adopting it would leave the interface unguarded: a new link.
        warn!(
            link = %pin.display(),
            interface,
            "pinned tc link guards nothing (the interface was deleted or re-created): attaching anew"
        );
        remove_pin(pin)?;
    }
    attach_pinned(pin, prog_fd.as_fd(), || {
        // A bpf_link, so it can be pinned and updated in place, and it
        // coexists with other tc programs on the interface. First in the
        // chain: a program before it that returned TC_ACT_OK would end the
        // chain and skip the mesh's verdict. (A program attached later with
        // "first" still goes before: docs/architecture.md.)
        let id = program
            .attach_with_options(
                interface,
                attach_type,
                TcAttachOptions::TcxOrder(LinkOrder::first()),
            )
            .map_err(program_err(name))?;
        let link = program.take_link(id).map_err(program_err(name))?;
        FdLink::try_from(link).map_err(not_a_bpf_link)
    })
}

fn attach_filter(
    ebpf: &mut Ebpf,
    name: &'static str,
    interface: &str,
    attach_type: TcAttachType,
    pin: &Path,
) -> Result<(), DatapathError> {
    let io_err = |what: String| move |source| DatapathError::Io { what, source };
    let ifindex = nix::net::if_::if_nametoindex(interface)
        .map_err(|e| io_err(format!("finding interface {interface}"))(e.into()))?;
    let ingress = attach_type == TcAttachType::Ingress;
    let filters = netlink::tc_filters(ifindex, ingress)
        .map_err(io_err(format!("listing the tc filters of {interface}")))?;
    let existing = filters
        .iter()
        .find(|f| f.priority == FILTER_PRIORITY && f.handle == u32::from(FILTER_HANDLE));
    if let Some(other) = existing.filter(|f| f.name != name) {
        // Never replace another tool's filter.
        return Err(DatapathError::Io {
            what: format!(
                "the tc filter at priority {FILTER_PRIORITY} handle {:#x} of {interface} is \
                 `{}` ({}), not the mesh's",
                u32::from(FILTER_HANDLE),
                other.name,
                other.kind
            ),
            source: std::io::ErrorKind::AlreadyExists.into(),
        });
    }
    if existing.is_none() {
        // The qdisc is shared with other tools, and outlives the mesh's
        // filters: already there is fine.
        match aya::programs::tc::qdisc_add_clsact(interface) {
            Ok(()) => {}
            Err(aya::programs::tc::TcError::AlreadyAttached) => {}
            Err(aya::programs::tc::TcError::NetlinkError(e))
                if e.raw_os_error() == Some(libc::EEXIST) => {}
            Err(e) => {
                return Err(DatapathError::Io {
                    what: format!("adding the clsact qdisc to {interface}"),
                    source: std::io::Error::other(e),
                });
            }
        }
    }
    let program = loaded_classifier(ebpf, name)?;
    let link_id = if existing.is_some() {
        // The same priority and handle, a new program: cls_bpf replaces it
        // in place.
        let old = SchedClassifierLink::attached(
            interface,
            attach_type,
            FILTER_PRIORITY,
            FILTER_HANDLE,
            None,
        )
        .map_err(io_err(format!("finding interface {interface}")))?;
        program.attach_to_link(old).map_err(program_err(name))?
    } else {
        program
            .attach_with_options(
                interface,
                attach_type,
                TcAttachOptions::Netlink(NlOptions {
                    priority: FILTER_PRIORITY,
                    handle: FILTER_HANDLE,
                    classid: None,
                }),
            )
            .map_err(program_err(name))?
    };
    // The filter belongs to the interface, not to this process: dropping
    // the link would delete it.
    std::mem::forget(program.take_link(link_id).map_err(program_err(name))?);
    if existing.is_some() {
        info!(
            interface,
            program = name,
            "replaced the program of the mesh's tc filter"
        );
    }
    // The pin names the program now in the filter.
    if pin.exists() {
        remove_pin(pin)?;
    }
    program.pin(pin).map_err(|e| DatapathError::Io {
        what: format!("pinning program {name} at {}", pin.display()),
        source: std::io::Error::other(e),
    })
}

fn remove_pin(pin: &Path) -> Result<(), DatapathError> {
    std::fs::remove_file(pin).map_err(|source| DatapathError::Io {
        what: format!("removing stale pin {}", pin.display()),
        source,
    })
}
