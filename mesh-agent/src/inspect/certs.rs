//! `inspect certs`: the node's certificates as the certificate manager last
//! recorded them (`<state-dir>/certs.json`), so it works while the agent is
//! down.

use std::{path::Path, time::SystemTime};

use mesh_pki::rotation::{CertState, read_state};

use crate::{
    inspect::{Output, json},
    table,
};

pub fn certs(state_dir: &Path, output: Output) -> anyhow::Result<String> {
    Ok(render(&read_state(state_dir)?, output, SystemTime::now()))
}

pub fn render(state: &CertState, output: Output, now: SystemTime) -> String {
    if output == Output::Json {
        return json(state);
    }
    let mut rows: Vec<Vec<String>> = state
        .certificates
        .iter()
        .map(|c| {
            let renews = match &c.retry_at {
                Some(retry) => format!("failing, retry in {}", until(retry, now)),
                None => until(&c.renew_at, now),
            };
            vec![
                c.spiffe_id.clone(),
                c.serial.clone(),
                c.not_after.clone(),
                renews,
            ]
        })
        .collect();
    rows.extend(state.pending.iter().map(|p| {
        vec![
            p.spiffe_id.clone(),
            "-".into(),
            "-".into(),
            match &p.retry_at {
                Some(retry) => format!("pending, retry in {}", until(retry, now)),
                None => "pending".into(),
            },
        ]
    }));
    let mut out = table::render(
        &["IDENTITY", "SERIAL", "NOT AFTER", "RENEWS IN"],
        &rows,
        "No certificates.",
    );
    let roots: Vec<Vec<String>> = state
        .trust_bundle
        .iter()
        .map(|r| vec![r.subject.clone(), r.not_after.clone()])
        .collect();
    out.push('\n');
    out.push_str(&table::render(
        &["TRUSTED ROOT", "NOT AFTER"],
        &roots,
        "No trusted roots.",
    ));
    let failing: Vec<String> = state
        .certificates
        .iter()
        .map(|c| (&c.spiffe_id, &c.last_error))
        .chain(state.pending.iter().map(|p| (&p.spiffe_id, &p.last_error)))
        .filter_map(|(id, e)| e.as_ref().map(|e| format!("  {id}: {e}\n")))
        .collect();
    if !failing.is_empty() {
        out.push_str("\nLast failures:\n");
        out.extend(failing);
    }
    out
}

/// Time from `now` to an RFC 3339 instant, in whole seconds; `now` when
/// past.
fn until(at: &str, now: SystemTime) -> String {
    match humantime::parse_rfc3339(at) {
        Ok(at) => match at.duration_since(now) {
            Ok(left) => humantime::format_duration(std::time::Duration::from_secs(left.as_secs()))
                .to_string(),
            Err(_) => "now".into(),
        },
        Err(_) => at.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use mesh_pki::{
        cert::rfc3339,
        rotation::{CertificateState, PendingState, RootState},
    };

    #[test]
    fn renders_a_table_and_json() {
        let now = humantime::parse_rfc3339("2026-11-21T10:00:00Z").unwrap();
        let at = |secs: u64| rfc3339(now + Duration::from_secs(secs));
        let state = CertState {
            updated: at(0),
            certificates: vec![CertificateState {
                spiffe_id: "spiffe://cluster.local/ns/shop/sa/cart".into(),
                identity: "123".into(),
                serial: "4a01".into(),
                not_before: at(0),
                not_after: at(86_400),
                renew_at: at(43_230),
                last_error: None,
                retry_at: None,
            }],
            pending: vec![PendingState {
                spiffe_id: "spiffe://cluster.local/ns/shop/sa/frontend".into(),
                identity: "456".into(),
                last_error: Some("CA unavailable: connection refused".into()),
                retry_at: Some(at(4)),
            }],
            trust_bundle: vec![RootState {
                subject: "O=mesh, CN=mesh root CA cluster.local".into(),
                not_after: "2036-11-21T10:00:00Z".into(),
            }],
        };
        assert_eq!(
            render(&state, Output::Table, now),
            "\
IDENTITY                                    SERIAL  NOT AFTER             RENEWS IN
spiffe://cluster.local/ns/shop/sa/cart      4a01    2026-11-22T10:00:00Z  12h 30s
spiffe://cluster.local/ns/shop/sa/frontend  -       -                     pending, retry in 4s

TRUSTED ROOT                           NOT AFTER
O=mesh, CN=mesh root CA cluster.local  2036-11-21T10:00:00Z

Last failures:
  spiffe://cluster.local/ns/shop/sa/frontend: CA unavailable: connection refused
"
        );
        let back: CertState = serde_json::from_str(&render(&state, Output::Json, now)).unwrap();
        assert_eq!(back, state);
    }

    #[test]
    fn says_when_there_is_no_state() {
        let e = certs(Path::new("/nonexistent-mesh-state"), Output::Table)
            .unwrap_err()
            .to_string();
        assert!(e.contains("certs.json: no certificate state"), "{e}");
    }
}
