//! The kernel side of the mesh, seen from user space: loads the programs,
//! reuses or creates their pinned maps, and attaches them so that they keep
//! working when the agent stops, crashes or is replaced. Every `unsafe` of
//! the agent lives in this crate (`sys`, and the `Pod` impls of map records).
//!
//! Pin directory layout (see docs/architecture.md):
//! - the maps, by name (`SOCK_HASH`, `POLICY`, …);
//! - `sockops_cgroup_<id>`, `connect4_cgroup_<id>`, `sock_create_cgroup_<id>`,
//!   …: the cgroup links;
//! - `tc_ingress_<ifname>`, `tc_egress_<ifname>`: the tc attachments of the
//!   node's interfaces (a TCX link, or on kernels without TCX the program of
//!   a clsact filter: see `tc`).
//!
//! Every link is pinned, and a restarted agent swaps the program of each
//! pinned link in place (`BPF_LINK_UPDATE`; a clsact filter's in place by
//! netlink): no hook is ever left empty.
//! Maps pinned by an agent with an older layout are migrated first, and
//! pins of a newer agent are refused (see `migrate`).
//! The sk_msg program is attached to `SOCK_HASH` itself, so it lives as long
//! as that map's pin.

#![deny(unsafe_code)]

pub mod cgroup;
pub mod cidr;
pub mod features;
pub mod inbox;
pub mod maps;
pub mod migrate;
pub mod netlink;
pub mod netns;
pub mod pins;
pub mod self_test;
pub mod splice_guard;
pub mod sys;
pub mod tc;

use std::{
    collections::BTreeMap,
    os::fd::{AsFd as _, BorrowedFd},
    path::{Path, PathBuf},
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{MapData, SockHash},
    programs::{
        CgroupAttachMode, CgroupSock, CgroupSockAddr, SkMsg, SockOps, TcAttachType, links::FdLink,
    },
};
use mesh_common::{MAP_LAYOUT_VERSION, ShortCircuit, SocketKey, map_names};
use tracing::info;

use maps::{MapsError, PinnedMaps};
use pins::PinDir;
pub use tc::{TcAttach, TcLinkState, TcMode, tc_link_pin, tc_link_state};

/// The programs' object, built by `cargo xtask build-ebpf` (see build.rs).
static OBJECT: &[u8] = aya::include_bytes_aligned!(env!("MESH_EBPF_OBJECT"));

const MSG_PROGRAM: &str = "mesh_msg_redirect";
const SOCKOPS_LINK_PREFIX: &str = "sockops_cgroup_";

/// What aya calls a cgroup program: it has a type per kind.
#[derive(Clone, Copy)]
enum CgroupKind {
    SockOps,
    SockAddr,
    Sock,
}

/// Every program linked to the cgroup, in attach order (sockops first: the
/// sockhash's sk_msg program is attached before it), with its hook, which
/// names its pin `<hook>_cgroup_<id>`: the connect-time policy programs,
/// and `sock_create`, which refuses in workloads' network namespaces the
/// sockets of transports the sock_addr programs cannot judge.
const CGROUP_PROGRAMS: [(&str, &str, CgroupKind); 10] = [
    ("mesh_sockops", "sockops", CgroupKind::SockOps),
    ("mesh_connect4", "connect4", CgroupKind::SockAddr),
    ("mesh_connect6", "connect6", CgroupKind::SockAddr),
    ("mesh_sendmsg4", "sendmsg4", CgroupKind::SockAddr),
    ("mesh_sendmsg6", "sendmsg6", CgroupKind::SockAddr),
    ("mesh_recvmsg4", "recvmsg4", CgroupKind::SockAddr),
    ("mesh_recvmsg6", "recvmsg6", CgroupKind::SockAddr),
    ("mesh_getpeername4", "getpeername4", CgroupKind::SockAddr),
    ("mesh_getpeername6", "getpeername6", CgroupKind::SockAddr),
    ("mesh_sock_create", "sock_create", CgroupKind::Sock),
];

/// The hooks of [`CGROUP_PROGRAMS`], whose links `status` looks for.
pub const CGROUP_HOOKS: [&str; CGROUP_PROGRAMS.len()] = {
    let mut hooks = [""; CGROUP_PROGRAMS.len()];
    let mut i = 0;
    while i < hooks.len() {
        hooks[i] = CGROUP_PROGRAMS[i].1;
        i += 1;
    }
    hooks
};

const TC_PROGRAMS: [(&str, &str, TcAttachType); 2] = [
    ("mesh_ingress", "ingress", TcAttachType::Ingress),
    ("mesh_egress", "egress", TcAttachType::Egress),
];

/// The programs on the node's side of each local workload's interface,
/// pinned as `tc_workload_<direction>_<ifindex>`: `to` judges what is
/// delivered to the workload (tc egress there), `from` checks what it sends
/// (tc ingress there).
const WORKLOAD_PROGRAMS: [(&str, &str, TcAttachType); 2] = [
    ("mesh_to_workload", "to", TcAttachType::Egress),
    ("mesh_from_workload", "from", TcAttachType::Ingress),
];
const WORKLOAD_LINK_PREFIX: &str = "tc_workload_";

#[derive(Debug, thiserror::Error)]
pub enum DatapathError {
    #[error(transparent)]
    Maps(#[from] MapsError),
    #[error(transparent)]
    Migrate(#[from] migrate::MigrateError),
    #[error(transparent)]
    Cgroup(#[from] cgroup::CgroupError),
    #[error("loading the kernel programs")]
    Load(#[from] aya::EbpfError),
    #[error("kernel program {name}")]
    Program {
        name: &'static str,
        #[source]
        source: aya::programs::ProgramError,
    },
    #[error("{what}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "{dir} already attaches the mesh to another cgroup ({other}); one pin directory \
         serves one cgroup: use another --bpffs, or remove the old pins first"
    )]
    OtherCgroup { dir: PathBuf, other: String },
    #[error("this kernel lacks {feature} (Linux {since}+); {instead}")]
    Unsupported {
        feature: &'static str,
        since: &'static str,
        instead: &'static str,
    },
}

/// How the short-circuit setting is written on the command line, in logs
/// and by the CLI: `off`, `on` (every socket), `opted-in`.
pub fn short_circuit_word(setting: ShortCircuit) -> &'static str {
    match setting {
        ShortCircuit::Off => "off",
        ShortCircuit::All => "on",
        ShortCircuit::OptedIn => "opted-in",
    }
}

fn short_circuit_name<S: serde::Serializer>(
    setting: &Option<ShortCircuit>,
    serializer: S,
) -> Result<S::Ok, S::Error> {
    match setting {
        Some(s) => serializer.serialize_some(short_circuit_word(*s)),
        None => serializer.serialize_none(),
    }
}

/// The loaded and attached data path. Dropping it leaves everything attached.
/// What the kernel side is told at start-up (a part of the agent's
/// configuration).
#[derive(Debug, Clone, serde::Serialize)]
pub struct DatapathConfig {
    /// cgroup v2 directory the socket programs attach to.
    pub cgroup: PathBuf,
    /// Interfaces where traffic from other nodes arrives.
    pub interfaces: Vec<String>,
    /// How tc programs are attached (TCX or clsact filters).
    pub tc_attach: TcAttach,
    /// `Some` when given on the command line; `None` keeps what is pinned.
    #[serde(serialize_with = "short_circuit_name")]
    pub short_circuit: Option<ShortCircuit>,
    pub revoke_established: bool,
    pub max_sockets: u32,
    pub max_endpoints: u32,
    pub max_policy: u32,
    pub max_conntrack: u32,
    /// Flow events per second per source (0: no limit).
    pub flow_events_per_source: u32,
    /// The cluster's Service ranges: an address in them that is no known
    /// Service is refused (docs/services.md).
    pub service_cidrs: Vec<cidr::Cidr>,
}

pub struct Datapath {
    ebpf: Ebpf,
    dir: PathBuf,
    interfaces: Vec<String>,
    tc_mode: TcMode,
    /// The node's side of each local workload's interface → its identity.
    workloads: BTreeMap<u32, u64>,
}

impl Datapath {
    /// Loads the programs into the kernel, adopting the maps and links
    /// already pinned under `pins` (a restart or upgrade) or creating them.
    pub fn install(config: &DatapathConfig, pins: &PinDir) -> Result<Self, DatapathError> {
        let dir = pins.path();
        let fresh = !dir.join(map_names::SETTINGS).exists();
        // Pins of an agent from before OUTBOUND_FLOWS: its outbound records
        // are in CONNTRACK.
        let adopt_outbound = !fresh && !dir.join(map_names::OUTBOUND_FLOWS).exists();
        // Refuses pins of a newer agent, and moves aside the maps whose
        // layout changed, before anything else touches them.
        let migration = migrate::prepare(dir)?;
        let cgroup = cgroup::open_cgroup2(&config.cgroup)?;
        let cgroup_id = cgroup::cgroup_id(&cgroup).map_err(|source| DatapathError::Io {
            what: format!("reading the id of cgroup {}", config.cgroup.display()),
            source,
        })?;
        let link_pin = dir.join(format!("{SOCKOPS_LINK_PREFIX}{cgroup_id}"));
        if let Some(other) = other_cgroup_link(dir, &link_pin)? {
            return Err(DatapathError::OtherCgroup {
                dir: dir.to_owned(),
                other,
            });
        }

        let tc_mode = TcMode::choose(config.tc_attach)?;
        // Parsed once, for the loader and for the programs attached by BTF
        // (the receive path's, below).
        let btf = aya::Btf::from_sys_fs()
            .inspect_err(|e| {
                tracing::warn!(error = %error_chain(e), "no kernel BTF: no splice guard, no bound on redirected backlogs")
            })
            .ok();
        let mut ebpf = EbpfLoader::new()
            .btf(btf.as_ref())
            .default_map_pin_directory(dir)
            .map_max_entries(map_names::SOCK_HASH, config.max_sockets)
            .map_max_entries(map_names::SOCKETS, config.max_sockets)
            .map_max_entries(map_names::SOCKET_INBOX, config.max_sockets)
            .map_max_entries(map_names::ENDPOINTS, config.max_endpoints)
            .map_max_entries(map_names::POLICY, config.max_policy)
            .map_max_entries(map_names::CONNTRACK, config.max_conntrack)
            .map_max_entries(map_names::OUTBOUND_FLOWS, config.max_conntrack)
            .map_max_entries(map_names::UDP_PEERS, config.max_conntrack)
            .load(OBJECT)?;
        let maps = PinnedMaps::open(dir)?;
        // The new programs find the old entries from their first run.
        migration.copy()?;
        if adopt_outbound {
            maps.adopt_outbound_flows()?;
        }

        // Settings first: the programs read them from their first run. The
        // short-circuit is for the workloads that opt in
        // (docs/short-circuit.md says which kernel defects make it unsafe
        // for some applications).
        match (config.short_circuit, fresh) {
            (Some(to), _) => maps.set_short_circuit(to)?,
            (None, true) => maps.set_short_circuit(ShortCircuit::OptedIn)?,
            (None, false) => {}
        }
        maps.set_revoke_established(config.revoke_established)?;
        maps.set_flow_events_per_source(config.flow_events_per_source)?;
        maps.set_service_ranges(&config.service_cidrs)?;

        // sk_msg before sockops: a socket added to the sockhash runs the
        // sk_msg program attached to the map at that moment, so the program
        // must be there before the first socket is.
        attach_msg_redirect(&mut ebpf)?;
        for (program, hook, kind) in CGROUP_PROGRAMS {
            let pin = dir.join(format!("{hook}_cgroup_{cgroup_id}"));
            attach_cgroup(&mut ebpf, program, kind, &cgroup, &pin)?;
        }
        for interface in &config.interfaces {
            for (program, direction, attach_type) in TC_PROGRAMS {
                let pin = tc_link_pin(dir, direction, interface);
                tc::attach(&mut ebpf, tc_mode, program, interface, attach_type, &pin)?;
            }
        }

        // The receive path's programs, attached by the kernel's BTF. Each
        // is optional: without the guard, splice readers must not opt in;
        // without the inbox reads, the backlog bound is left off. Status
        // and the start-up warnings say so; the rest is unaffected.
        let splice_guard = match &btf {
            Some(btf) if splice_guard::available() => splice_guard::attach(&mut ebpf, btf, dir)
                .inspect_err(|e| {
                    tracing::warn!(error = %error_chain(e), "the splice guard could not be attached");
                })
                .is_ok(),
            _ => false,
        };
        let backlog_bound = if let Some(btf) = &btf
            && inbox::attach(&mut ebpf, btf, dir)
                .inspect_err(|e| {
                    tracing::warn!(error = %error_chain(e), "the redirect path's reads cannot be counted: its backlogs are not bounded");
                })
                .is_ok()
        {
            inbox::node_bound()
        } else {
            0
        };
        // Bounded only where reads are counted: else every backlog would
        // look unread, and every connection would take the stack.
        maps.set_redirect_backlog_bytes(backlog_bound)?;

        migration.finish()?;
        maps.set_layout_version(MAP_LAYOUT_VERSION)?;

        info!(
            bpffs = %dir.display(),
            layout = MAP_LAYOUT_VERSION,
            cgroup = %config.cgroup.display(),
            cgroup_id,
            interfaces = ?config.interfaces,
            tc = tc_mode.name(),
            adopted_pins = !fresh,
            short_circuit = short_circuit_word(maps.short_circuit()?),
            splice_guard,
            redirect_backlog_bytes = backlog_bound,
            "kernel programs attached"
        );
        // Loaded now, so that a new workload's checks are a link away.
        for (name, _, _) in WORKLOAD_PROGRAMS {
            tc::loaded_classifier(&mut ebpf, name)?;
        }
        let mut datapath = Self {
            ebpf,
            dir: dir.to_owned(),
            interfaces: config.interfaces.clone(),
            tc_mode,
            // A restarted agent keeps its predecessor's checks until the
            // first applied configuration says which workloads are here.
            workloads: maps.workload_interfaces()?.into_iter().collect(),
        };
        datapath.guard_workloads()?;
        Ok(datapath)
    }

    /// Attaches the tc programs again to every interface of the
    /// configuration whose link no longer guards it: the interface was
    /// deleted and created again (a CNI's device, a re-plugged uplink), and
    /// the old link, still pinned, guards nothing. Interfaces absent right
    /// now are left for a later call. Returns the interfaces re-attached.
    pub fn guard_interfaces(&mut self) -> Result<Vec<String>, DatapathError> {
        let mut attached = Vec::new();
        for interface in &self.interfaces {
            if nix::net::if_::if_nametoindex(interface.as_str()).is_err() {
                continue;
            }
            for (program, direction, attach_type) in TC_PROGRAMS {
                let pin = tc_link_pin(&self.dir, direction, interface);
                let again = tc::guard(
                    &mut self.ebpf,
                    self.tc_mode,
                    program,
                    interface,
                    attach_type,
                    &pin,
                )?;
                if again && attached.last() != Some(interface) {
                    attached.push(interface.clone());
                }
            }
        }
        Ok(attached)
    }

    /// The start-up self-test of the kernel's redirect path
    /// (`self_test`), ready to run away from the data path.
    pub fn self_test(&mut self) -> Result<self_test::SelfTest, DatapathError> {
        self_test::prepare(&mut self.ebpf)
    }

    /// Puts the checks of [`WORKLOAD_PROGRAMS`] on the node's side of each
    /// local workload's interface (`desired`: interface index → identity),
    /// and takes them off interfaces no longer a workload's.
    pub fn set_workload_interfaces(
        &mut self,
        desired: BTreeMap<u32, u64>,
    ) -> Result<(), DatapathError> {
        self.workloads = desired;
        self.guard_workloads()
    }

    /// What [`Self::set_workload_interfaces`] does, for the table it was last
    /// given (also every second: a link can go with its interface). The
    /// table goes to `WORKLOAD_INTERFACES` first, so `mesh_from_workload`
    /// knows whose interface it runs on from its first packet.
    pub fn guard_workloads(&mut self) -> Result<(), DatapathError> {
        let desired = &self.workloads;
        PinnedMaps::open(&self.dir)?.set_workload_interfaces(desired)?;
        for &ifindex in desired.keys() {
            let Ok(name) = nix::net::if_::if_indextoname(ifindex) else {
                continue; // gone already: the next table drops it
            };
            let name = name.to_string_lossy().into_owned();
            for (program, direction, attach_type) in WORKLOAD_PROGRAMS {
                let pin = self
                    .dir
                    .join(format!("{WORKLOAD_LINK_PREFIX}{direction}_{ifindex}"));
                tc::guard(
                    &mut self.ebpf,
                    self.tc_mode,
                    program,
                    &name,
                    attach_type,
                    &pin,
                )?;
            }
        }
        // Links of interfaces that are no workload's any more: unpinned, so
        // the kernel lets them go (a deleted veth's link guards nothing); a
        // clsact filter, which no pin holds, is deleted from an interface
        // still there.
        let entries = std::fs::read_dir(&self.dir).map_err(|source| DatapathError::Io {
            what: format!("listing {}", self.dir.display()),
            source,
        })?;
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let Some(rest) = name.strip_prefix(WORKLOAD_LINK_PREFIX) else {
                continue;
            };
            let ifindex = rest.rsplit('_').next().and_then(|i| i.parse::<u32>().ok());
            if ifindex.is_none_or(|i| !desired.contains_key(&i)) {
                let attach_type = WORKLOAD_PROGRAMS
                    .iter()
                    .find(|(_, direction, _)| rest.starts_with(&format!("{direction}_")))
                    .map(|(_, _, attach_type)| *attach_type);
                if let (Some(ifindex), Some(attach_type)) = (ifindex, attach_type) {
                    tc::detach_filter(&entry.path(), ifindex, attach_type);
                }
                let _ = std::fs::remove_file(entry.path());
            }
        }
        Ok(())
    }
}

/// `e` and its sources, one line.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut line = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        line.push_str(": ");
        line.push_str(&cause.to_string());
        source = cause.source();
    }
    line
}

pub(crate) fn program_err(
    name: &'static str,
) -> impl FnOnce(aya::programs::ProgramError) -> DatapathError {
    move |source| DatapathError::Program { name, source }
}

fn attach_msg_redirect(ebpf: &mut Ebpf) -> Result<(), DatapathError> {
    let map = ebpf
        .map(map_names::SOCK_HASH)
        .expect("the object defines SOCK_HASH");
    let sock_hash: SockHash<&MapData, SocketKey> =
        SockHash::try_from(map).map_err(|source| MapsError::Map {
            name: map_names::SOCK_HASH,
            dir: PathBuf::new(),
            source,
        })?;
    let map_fd = sock_hash
        .fd()
        .try_clone()
        .map_err(|source| DatapathError::Io {
            what: "duplicating the sockhash descriptor".into(),
            source,
        })?;
    let program: &mut SkMsg = ebpf
        .program_mut(MSG_PROGRAM)
        .expect("the object defines the sk_msg program")
        .try_into()
        .map_err(program_err(MSG_PROGRAM))?;
    program.load().map_err(program_err(MSG_PROGRAM))?;
    // Attaching replaces whatever program a previous agent attached, with no gap.
    let link_id = program.attach(&map_fd).map_err(program_err(MSG_PROGRAM))?;
    let link = program
        .take_link(link_id)
        .map_err(program_err(MSG_PROGRAM))?;
    // The attachment belongs to the pinned map, not to this process: dropping
    // the link would detach the program, so it is deliberately leaked.
    std::mem::forget(link);
    Ok(())
}

fn attach_cgroup(
    ebpf: &mut Ebpf,
    name: &'static str,
    kind: CgroupKind,
    cgroup: &std::fs::File,
    link_pin: &Path,
) -> Result<(), DatapathError> {
    // The same steps for each kind; aya gives their types no common trait.
    macro_rules! link {
        ($program:ty) => {{
            let program: &mut $program = ebpf
                .program_mut(name)
                .expect("the object defines every cgroup program")
                .try_into()
                .map_err(program_err(name))?;
            program.load().map_err(program_err(name))?;
            let prog_fd = dup_program_fd(program.fd().map_err(program_err(name))?.as_fd())?;
            attach_pinned(link_pin, prog_fd.as_fd(), || {
                // With a bpf_link the kernel always lets other programs
                // share the cgroup (it refuses the ALLOW_MULTI flag there),
                // so other tools' programs keep working beside ours.
                let id = program
                    .attach(cgroup, CgroupAttachMode::Single)
                    .map_err(program_err(name))?;
                let link = program.take_link(id).map_err(program_err(name))?;
                FdLink::try_from(link).map_err(not_a_bpf_link)
            })
        }};
    }
    match kind {
        CgroupKind::SockOps => link!(SockOps),
        CgroupKind::SockAddr => link!(CgroupSockAddr),
        CgroupKind::Sock => link!(CgroupSock),
    }
}

pub(crate) fn dup_program_fd(fd: BorrowedFd<'_>) -> Result<std::os::fd::OwnedFd, DatapathError> {
    fd.try_clone_to_owned().map_err(|source| DatapathError::Io {
        what: "duplicating a program descriptor".into(),
        source,
    })
}

pub(crate) fn not_a_bpf_link(e: aya::programs::links::LinkError) -> DatapathError {
    DatapathError::Io {
        what: "the kernel gave an attachment that is not a bpf_link".into(),
        source: std::io::Error::other(e),
    }
}

/// The one way every hook is attached: when a previous agent pinned a link
/// at `link_pin`, swap its program in place (`BPF_LINK_UPDATE`), so the hook
/// is never empty; otherwise `attach` and pin the new link.
pub(crate) fn attach_pinned(
    link_pin: &Path,
    prog_fd: BorrowedFd<'_>,
    attach: impl FnOnce() -> Result<FdLink, DatapathError>,
) -> Result<(), DatapathError> {
    let io_err = |what: &str| {
        let what = format!("{what} {}", link_pin.display());
        move |source| DatapathError::Io { what, source }
    };
    if link_pin.exists() {
        let link = sys::obj_get(link_pin).map_err(io_err("opening pinned link"))?;
        sys::link_update(link.as_fd(), prog_fd)
            .map_err(io_err("updating the program of pinned link"))?;
        info!(link = %link_pin.display(), "adopted pinned link");
    } else {
        let link = attach()?;
        link.pin(link_pin).map_err(|e| DatapathError::Io {
            what: format!("pinning link at {}", link_pin.display()),
            source: std::io::Error::other(e),
        })?;
    }
    Ok(())
}

/// Pins `link` at `dir`/`name` in place of an earlier agent's link there,
/// for the hooks whose links cannot swap their program (BPF LSM, fexit):
/// the new link is attached already, and the old one goes when its pin
/// does, so the hook is never without a program. Returns whether there was
/// one to replace.
pub(crate) fn pin_over(link: FdLink, dir: &Path, name: &str) -> Result<bool, DatapathError> {
    let pin = dir.join(name);
    let replacing = pin.exists();
    // Staged under a name of its own (bpffs refuses dots in names).
    let staged = dir.join(format!("{name}_new"));
    let _ = std::fs::remove_file(&staged);
    link.pin(&staged).map_err(|e| DatapathError::Io {
        what: format!("pinning link at {}", staged.display()),
        source: std::io::Error::other(e),
    })?;
    std::fs::rename(&staged, &pin).map_err(|source| DatapathError::Io {
        what: format!("moving a link's pin to {}", pin.display()),
        source,
    })?;
    Ok(replacing)
}

/// A sockops link pinned in `dir` for a cgroup other than `ours`, if any.
fn other_cgroup_link(dir: &Path, ours: &Path) -> Result<Option<String>, DatapathError> {
    let entries = std::fs::read_dir(dir).map_err(|source| DatapathError::Io {
        what: format!("listing {}", dir.display()),
        source,
    })?;
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with(SOCKOPS_LINK_PREFIX) && entry.path() != ours {
            return Ok(Some(format!(
                "cgroup id {}",
                &name[SOCKOPS_LINK_PREFIX.len()..]
            )));
        }
    }
    Ok(None)
}
