//! What the policy programs judge, shared by `enforce` (which judges it)
//! and `tunnel` (which records where a steered connection was going).
use mesh_common::{policy::Hook, service::SockAddr};

/// What is being judged: one connection or flow, as far as it is known.
pub(crate) struct Attempt {
    pub(crate) src_identity: u64,
    pub(crate) src_ip: [u32; 4],
    pub(crate) src_port: u16,
    pub(crate) dst_ip: [u32; 4],
    pub(crate) dst_port: u16,
    pub(crate) proto: u8,
    pub(crate) hook: Hook,
    /// The Service address dialled, when `dst` is the backend it was
    /// translated to (all zero otherwise).
    pub(crate) service: SockAddr,
}
