#![no_main]
//! Kubernetes objects as the API server hands them to the agent: a tenant
//! writes its pods, Services, EndpointSlices and the mesh's documents, and
//! a compromised node its Node and its pods' status. The first byte picks
//! the kind, the rest is the object's JSON. Translating must never panic,
//! and a mesh document the agent accepts must compile in a cluster.
use k8s_openapi::api::core::v1::{Namespace, Node, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::DynamicObject;
use libfuzzer_sys::fuzz_target;
use mesh_agent::k8s::translate;
use mesh_policy::MeshSettings;

fuzz_target!(|data: &[u8]| {
    let Some((&kind, json)) = data.split_first() else {
        return;
    };
    match kind % 6 {
        0 => {
            if let Ok(pod) = serde_json::from_slice::<Pod>(json) {
                let _ = translate::pod_info(&pod);
            }
        }
        1 => {
            if let Ok(node) = serde_json::from_slice::<Node>(json) {
                let _ = translate::node_info(&node, true);
                let _ = translate::node_info(&node, false);
            }
        }
        2 => {
            if let Ok(ns) = serde_json::from_slice::<Namespace>(json) {
                let _ = translate::namespace_info(&ns);
            }
        }
        3 => {
            if let Ok(svc) = serde_json::from_slice::<Service>(json) {
                let _ = translate::service(&svc);
            }
        }
        4 => {
            if let Ok(slice) = serde_json::from_slice::<EndpointSlice>(json) {
                let _ = translate::endpoint_slice(&slice);
            }
        }
        _ => {
            if let Ok(object) = serde_json::from_slice::<DynamicObject>(json) {
                let settings = MeshSettings {
                    node: "node-a".into(),
                    policy_budget: Some(1 << 16),
                    ..MeshSettings::default()
                };
                if let Some(entry) = translate::document_entry(&object, &settings)
                    && let Ok(mut docs) = entry.parsed
                {
                    // Accepted alone: it compiles in a cluster too.
                    docs.endpoint_slices = Some(Vec::new());
                    mesh_policy::compile(&docs, &settings).expect("an accepted document compiles");
                }
            }
        }
    }
});
