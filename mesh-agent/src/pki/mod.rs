//! The mesh's certificates: the CA, workload SVIDs and the rustls
//! configurations that verify SPIFFE identities.
pub mod cli;
