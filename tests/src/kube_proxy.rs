//! kube-proxy's iptables mode, as it writes its rules: a `KUBE-SERVICES`
//! chain jumped to from PREROUTING and OUTPUT of the nat table, one
//! `KUBE-SVC-*` chain per Service port choosing an endpoint with
//! `statistic --mode random` matches, and one `KUBE-SEP-*` chain per
//! endpoint doing the DNAT. The tests put these in a node's network
//! namespace to check what the mesh does next to (or before) kube-proxy;
//! the Services benchmark measures them.
use std::{fmt::Write as _, net::SocketAddr};

use sha2::{Digest, Sha256};

use crate::netns::Netns;

/// One Service port as kube-proxy sees it.
#[derive(Debug, Clone)]
pub struct ServicePort {
    /// `namespace/name:port-name`, kube-proxy's name for it.
    pub name: String,
    pub address: SocketAddr,
    /// `tcp` or `udp`.
    pub protocol: &'static str,
    pub endpoints: Vec<SocketAddr>,
}

/// kube-proxy names chains by a hash of what they serve.
fn chain(prefix: &str, what: &str) -> String {
    let digest = Sha256::digest(what.as_bytes());
    let hex: String = digest[..8].iter().map(|b| format!("{b:02X}")).collect();
    format!("{prefix}{hex}")
}

/// The `iptables-restore` input kube-proxy would write for `services`, for
/// one address family (IPv4 when `v6` is false); ports of the other family
/// are left out.
pub fn restore_input(services: &[ServicePort], v6: bool) -> String {
    let services: Vec<_> = services
        .iter()
        .filter(|s| s.address.is_ipv6() == v6)
        .collect();
    let host_prefix = if v6 { 128 } else { 32 };
    let mut chains = vec!["KUBE-SERVICES".to_string()];
    let mut rules = vec![
        "-A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES"
            .to_string(),
        "-A OUTPUT -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES"
            .to_string(),
    ];
    for s in &services {
        let svc = chain("KUBE-SVC-", &format!("{}/{}", s.name, s.protocol));
        chains.push(svc.clone());
        rules.push(format!(
            "-A KUBE-SERVICES -d {}/{host_prefix} -p {p} -m comment --comment \"{} cluster IP\" -m {p} --dport {} -j {svc}",
            s.address.ip(),
            s.name,
            s.address.port(),
            p = s.protocol,
        ));
        let n = s.endpoints.len();
        for (i, endpoint) in s.endpoints.iter().enumerate() {
            let sep = chain(
                "KUBE-SEP-",
                &format!("{}/{}/{endpoint}", s.name, s.protocol),
            );
            chains.push(sep.clone());
            let mut rule = format!("-A {svc} -m comment --comment \"{} -> {endpoint}\"", s.name);
            // Endpoint i of n is taken with probability 1/(n-i) among the
            // rest, so each gets 1/n; the last one takes what is left.
            if i + 1 < n {
                let _ = write!(
                    rule,
                    " -m statistic --mode random --probability {:.11}",
                    1.0 / (n - i) as f64
                );
            }
            let _ = write!(rule, " -j {sep}");
            rules.push(rule);
            rules.push(format!(
                "-A {sep} -p {p} -m comment --comment \"{}\" -m {p} -j DNAT --to-destination {endpoint}",
                s.name,
                p = s.protocol,
            ));
        }
        if n == 0 {
            // No endpoint: kube-proxy rejects in the filter table; here the
            // nat table simply has no rule for it.
            rules.pop();
            chains.pop();
        }
    }
    let mut out = String::from("*nat\n");
    for c in &chains {
        let _ = writeln!(out, ":{c} - [0:0]");
    }
    for r in &rules {
        let _ = writeln!(out, "{r}");
    }
    out.push_str("COMMIT\n");
    out
}

/// Installs kube-proxy's rules for `services` in `ns` (both families),
/// added to what the nat table holds.
pub fn install(ns: &Netns, services: &[ServicePort]) -> anyhow::Result<()> {
    for (v6, tool) in [(false, "iptables-restore"), (true, "ip6tables-restore")] {
        if !services.iter().any(|s| s.address.is_ipv6() == v6) {
            continue;
        }
        let file = std::env::temp_dir().join(format!(
            "kube-proxy-{}-{}-{}.rules",
            ns.name(),
            std::process::id(),
            if v6 { 6 } else { 4 }
        ));
        std::fs::write(&file, restore_input(services, v6))?;
        let result = ns.exec(tool, &["--noflush", &file.display().to_string()]);
        let _ = std::fs::remove_file(&file);
        result?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_have_kube_proxys_shape() {
        let services = [ServicePort {
            name: "shop/db:http".into(),
            address: "10.96.0.10:80".parse().unwrap(),
            protocol: "tcp",
            endpoints: vec![
                "198.18.0.13:8080".parse().unwrap(),
                "198.18.1.11:8080".parse().unwrap(),
                "198.18.1.12:8080".parse().unwrap(),
            ],
        }];
        let text = restore_input(&services, false);
        assert!(text.starts_with("*nat\n:KUBE-SERVICES - [0:0]\n"));
        assert!(text.ends_with("COMMIT\n"));
        assert_eq!(text.matches("-j DNAT --to-destination").count(), 3);
        assert!(text.contains("--probability 0.33333333333 -j KUBE-SEP-"));
        assert!(text.contains("--probability 0.50000000000 -j KUBE-SEP-"));
        assert!(text.contains("-d 10.96.0.10/32 -p tcp"));
        assert_eq!(restore_input(&services, true).matches("DNAT").count(), 0);
    }
}
