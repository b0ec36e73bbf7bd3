//! Kubernetes mode: workloads from Pods, policy from the mesh's custom
//! resources, all read through the API server's list/watch.
pub mod crds;
