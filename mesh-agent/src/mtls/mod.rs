//! Mutual TLS between nodes: the agent's side of the tunnels the kernel
//! steers connections into (docs/mtls.md).
//!
//! ```text
//! workload ──connect(B)──► kernel steers to 127.0.0.1:15001 in the workload's netns
//!   └─► outbound listener ─► HBONE (HTTP/2 CONNECT B, mTLS as the workload's SPIFFE ID)
//!         ─► peer agent :15008 ─► checks policy for (certificate identity → B, port)
//!            ─► connects to B ─► splices both ways
//! ```
pub mod listeners;
pub mod view;
