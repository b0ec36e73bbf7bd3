//! The `Accepted` condition of the mesh's documents, written by one agent.
//!
//! Every agent judges every document the same way (same parser, same
//! settings), so any one of them can say what it found; N agents writing
//! would only fight over `lastTransitionTime` and load the API server. The
//! writer is whoever holds the `mesh-agent-status` Lease, as Kubernetes'
//! own controllers elect a leader: the holder renews it; another agent
//! takes it over once it has not been renewed for its duration. Writes use
//! the lease's resourceVersion, so two agents cannot both take it.
use std::collections::HashMap;
use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, ApiResource, DynamicObject, ObjectMeta, Patch, PatchParams, PostParams};
use tokio::sync::watch;
use tracing::{debug, info, warn};

use super::translate::ACCEPTED;
use mesh_policy::Condition;

pub const LEASE_NAME: &str = "mesh-agent-status";
/// The reason of a document that does not parse or validate.
pub const INVALID: &str = "Invalid";
/// The reason of a valid policy that the cluster's policy budget has no
/// room for (the most recently changed ones are left out).
pub const OVER_BUDGET: &str = "PolicyBudgetExceeded";
const LEASE_DURATION: Duration = Duration::from_secs(15);
const RENEW_EVERY: Duration = Duration::from_secs(5);

/// What the status of one document should say.
#[derive(Clone, Debug, PartialEq)]
pub struct Wanted {
    pub resource: ApiResource,
    pub namespace: String,
    pub name: String,
    pub generation: i64,
    /// `Err`: the condition's reason ([`INVALID`] or [`OVER_BUDGET`]) and
    /// message.
    pub verdict: Result<(), (&'static str, String)>,
    /// What its status says now.
    pub current: Option<Condition>,
}

impl Wanted {
    /// The condition to write, or `None` when the status already says it.
    fn condition(&self, now: &str) -> Option<Condition> {
        let (status, reason, message) = match &self.verdict {
            Ok(()) => ("True", "Accepted", String::new()),
            Err((reason, why)) => ("False", *reason, why.clone()),
        };
        let current = self.current.as_ref();
        if let Some(c) = current
            && c.status == status
            && c.reason == reason
            && c.message == message
            && c.observed_generation == self.generation
        {
            return None;
        }
        let last_transition_time = match current {
            Some(c) if c.status == status => c.last_transition_time.clone(),
            _ => now.to_owned(),
        };
        Some(Condition {
            type_: ACCEPTED.into(),
            status: status.into(),
            reason: reason.into(),
            message,
            observed_generation: self.generation,
            last_transition_time,
        })
    }
}

/// Runs until the agent stops: holds (or waits for) the lease, and while it
/// holds it, writes every status that differs from what it should say.
pub async fn write_statuses(
    client: kube::Client,
    lease_namespace: String,
    holder: String,
    mut wanted: watch::Receiver<Vec<Wanted>>,
) {
    let leases: Api<Lease> = Api::namespaced(client.clone(), &lease_namespace);
    let mut leader = false;
    // What this agent wrote, so that it does not write it again before its
    // own write comes back through the watch.
    let mut written: HashMap<(String, String, String), (i64, Condition)> = HashMap::new();
    let mut renew = tokio::time::interval(RENEW_EVERY);
    renew.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = renew.tick() => {
                let now_leader = hold_lease(&leases, &holder).await;
                if now_leader != leader {
                    info!(lease = %format!("{lease_namespace}/{LEASE_NAME}"), leader = now_leader,
                          "{}", if now_leader { "writing the documents' status" } else { "another agent writes the documents' status" });
                    leader = now_leader;
                    written.clear();
                }
            }
            changed = wanted.changed() => if changed.is_err() { return },
        }
        if !leader {
            continue;
        }
        let now = Timestamp::now().to_string();
        let todo: Vec<Wanted> = wanted.borrow_and_update().clone();
        for w in todo {
            let Some(condition) = w.condition(&now) else {
                continue;
            };
            let key = (w.resource.kind.clone(), w.namespace.clone(), w.name.clone());
            if written.get(&key).is_some_and(|(g, c)| {
                *g == w.generation && c.status == condition.status && c.message == condition.message
            }) {
                continue;
            }
            let api: Api<DynamicObject> =
                Api::namespaced_with(client.clone(), &w.namespace, &w.resource);
            let patch = serde_json::json!({ "status": { "conditions": [condition] } });
            match api
                .patch_status(&w.name, &PatchParams::default(), &Patch::Merge(&patch))
                .await
            {
                Ok(_) => {
                    debug!(kind = %w.resource.kind, namespace = %w.namespace, name = %w.name,
                           status = %condition.status, "status written");
                    written.insert(key, (w.generation, condition));
                }
                Err(e) => warn!(kind = %w.resource.kind, namespace = %w.namespace, name = %w.name,
                                error = %e, "could not write status"),
            }
        }
    }
}

/// Takes or renews the lease; whether this agent holds it now.
async fn hold_lease(leases: &Api<Lease>, holder: &str) -> bool {
    let now = MicroTime(Timestamp::now());
    let duration = LEASE_DURATION.as_secs() as i32;
    match leases.get_opt(LEASE_NAME).await {
        Ok(None) => {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(LEASE_NAME.into()),
                    ..ObjectMeta::default()
                },
                spec: Some(LeaseSpec {
                    holder_identity: Some(holder.into()),
                    lease_duration_seconds: Some(duration),
                    acquire_time: Some(now.clone()),
                    renew_time: Some(now),
                    lease_transitions: Some(0),
                    ..LeaseSpec::default()
                }),
            };
            leases.create(&PostParams::default(), &lease).await.is_ok()
        }
        Ok(Some(mut lease)) => {
            let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
            let mine = spec.holder_identity.as_deref() == Some(holder);
            let expired = match (&spec.renew_time, spec.lease_duration_seconds) {
                (Some(renewed), Some(seconds)) => {
                    let age = now.0.duration_since(renewed.0).as_secs_f64();
                    age > f64::from(seconds)
                }
                _ => true,
            };
            if !mine && !expired {
                return false;
            }
            if !mine {
                spec.holder_identity = Some(holder.into());
                spec.acquire_time = Some(now.clone());
                spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
            }
            spec.renew_time = Some(now);
            spec.lease_duration_seconds = Some(duration);
            // The resourceVersion read above makes this a compare-and-swap:
            // of two agents taking an expired lease, one gets 409 Conflict.
            leases
                .replace(LEASE_NAME, &PostParams::default(), &lease)
                .await
                .is_ok()
        }
        Err(_) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wanted(verdict: Result<(), (&'static str, String)>, current: Option<Condition>) -> Wanted {
        Wanted {
            resource: ApiResource::erase::<mesh_policy::MeshPolicyResource>(&()),
            namespace: "shop".into(),
            name: "p".into(),
            generation: 2,
            verdict,
            current,
        }
    }

    #[test]
    fn writes_only_what_changed_and_keeps_transition_times() {
        let now = "2026-11-22T10:00:00Z";
        let c = wanted(Ok(()), None).condition(now).unwrap();
        assert_eq!((c.status.as_str(), c.reason.as_str()), ("True", "Accepted"));
        assert_eq!(c.observed_generation, 2);
        assert_eq!(c.last_transition_time, now);
        // Already says so: nothing to write.
        assert!(wanted(Ok(()), Some(c.clone())).condition(now).is_none());
        // A new generation, still valid: written, transition time kept.
        let mut older = c.clone();
        older.observed_generation = 1;
        older.last_transition_time = "2026-11-01T00:00:00Z".into();
        let again = wanted(Ok(()), Some(older)).condition(now).unwrap();
        assert_eq!(again.last_transition_time, "2026-11-01T00:00:00Z");
        // Invalid: False/Invalid with the reason, new transition time.
        let bad = wanted(Err((INVALID, "spec.rules[0]: bad".into())), Some(c))
            .condition(now)
            .unwrap();
        assert_eq!(bad.status, "False");
        assert_eq!(bad.reason, "Invalid");
        assert_eq!(bad.message, "spec.rules[0]: bad");
        assert_eq!(bad.last_transition_time, now);
    }
}
