//! The node agent of the in-kernel service mesh, as a library: the binary
//! (`main.rs`) is its command line, and fuzz targets and tests link here.
//!
//! ```text
//! agent ──► control ──► mesh_datapath (maps) ◄── flows ──► endpoints
//!   │          ▲                                    ▲
//!   │          └── k8s (watchers) / config dir      │
//!   └──► mtls ──► tunnel, mesh_pki ─────────────────┘ (metrics, health)
//! ```
//!
//! What the kernel runs is `mesh-ebpf`; the policy compiler is
//! `mesh_policy`; every `unsafe` is in `mesh_datapath`.
#![forbid(unsafe_code)]

pub mod agent;
pub mod config;
pub mod control;
pub mod endpoints;
pub mod flows;
pub mod health;
pub mod k8s;
pub mod mtls;
pub mod signal;
pub mod telemetry;
pub mod tunnel;
