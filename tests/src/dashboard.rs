//! The Grafana dashboard in deploy/grafana/ against an agent's `/metrics`:
//! every query must name metrics, and labels of them, the agent really
//! exports, or its panel shows "No data" forever.
use std::collections::{BTreeMap, BTreeSet};

use anyhow::Context as _;
use promql_parser::{
    label::Labels,
    parser::{self, Expr, LabelModifier},
};
use serde_json::Value;

/// The dashboard as committed.
pub fn load() -> anyhow::Result<Value> {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../deploy/grafana/mesh-dashboard.json");
    let text = std::fs::read_to_string(&path).with_context(|| format!("{}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("{} is not JSON", path.display()))
}

/// Every PromQL query of `dashboard`: (where, query) for the panels'
/// targets and the query variables.
pub fn queries(dashboard: &Value) -> Vec<(String, String)> {
    let mut found = Vec::new();
    let panels = dashboard["panels"].as_array().into_iter().flatten();
    for panel in panels {
        for target in panel["targets"].as_array().into_iter().flatten() {
            if let Some(expr) = target["expr"].as_str() {
                let title = panel["title"].as_str().unwrap_or("?");
                let id = target["refId"].as_str().unwrap_or("?");
                found.push((format!("panel {title:?} query {id}"), expr.to_string()));
            }
        }
    }
    let variables = dashboard["templating"]["list"]
        .as_array()
        .into_iter()
        .flatten();
    for variable in variables.filter(|v| v["type"] == "query") {
        let query = variable["query"]["query"]
            .as_str()
            .or(variable["query"].as_str());
        if let Some(query) = query {
            found.push((format!("variable {}", variable["name"]), query.to_string()));
        }
    }
    found
}

/// Grafana's macros and variables, as Prometheus would receive them, and
/// `label_values(metric, label)` as the selector and label it reads.
fn as_promql(query: &str) -> (String, Vec<String>) {
    if let Some(args) = query
        .strip_prefix("label_values(")
        .and_then(|r| r.strip_suffix(')'))
    {
        let (metric, label) = args.rsplit_once(',').unwrap_or((args, ""));
        return (metric.trim().into(), vec![label.trim().into()]);
    }
    let promql = query
        .replace("$__rate_interval", "5m")
        .replace("$__range", "1h")
        .replace("$__interval", "1m")
        .replace("$instance", ".*");
    (promql, Vec::new())
}

/// Metric name → the label names of its series in a `/metrics` text.
pub fn exported(metrics: &str) -> BTreeMap<String, BTreeSet<String>> {
    let mut series: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for line in metrics
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
    {
        let (name, labels) = match line.split_once('{') {
            Some((name, rest)) => (name, rest.split_once('}').map_or("", |(l, _)| l)),
            None => (line.split_whitespace().next().unwrap_or(""), ""),
        };
        let names = series.entry(name.to_string()).or_default();
        // Label values are quoted, and may hold commas and `=`.
        let mut rest = labels;
        while let Some((label, after)) = rest.split_once("=\"") {
            names.insert(label.trim_start_matches(',').to_string());
            let mut end = 0;
            let bytes = after.as_bytes();
            while end < bytes.len()
                && !(bytes[end] == b'"' && (end == 0 || bytes[end - 1] != b'\\'))
            {
                end += 1;
            }
            rest = after.get(end + 1..).unwrap_or("");
        }
    }
    series
}

/// What a query reads: metric names, and the labels it names anywhere
/// (matchers, `by`/`without`, label functions' sources), less the labels
/// it makes itself.
#[derive(Debug, Default)]
pub struct References {
    pub metrics: BTreeSet<String>,
    pub labels: BTreeSet<String>,
    made: BTreeSet<String>,
}

fn walk(expr: &Expr, refs: &mut References) {
    match expr {
        Expr::Aggregate(a) => {
            if let Some(LabelModifier::Include(l) | LabelModifier::Exclude(l)) = &a.modifier {
                add_labels(l, refs);
            }
            walk(&a.expr, refs);
            if let Some(param) = &a.param {
                walk(param, refs);
            }
        }
        Expr::Unary(u) => walk(&u.expr, refs),
        Expr::Binary(b) => {
            walk(&b.lhs, refs);
            walk(&b.rhs, refs);
        }
        Expr::Paren(p) => walk(&p.expr, refs),
        Expr::Subquery(s) => walk(&s.expr, refs),
        Expr::VectorSelector(v) => {
            if let Some(name) = &v.name {
                refs.metrics.insert(name.clone());
            }
            for m in &v.matchers.matchers {
                if m.name != "__name__" {
                    refs.labels.insert(m.name.clone());
                }
            }
        }
        Expr::MatrixSelector(m) => walk(&Expr::VectorSelector(m.vs.clone()), refs),
        Expr::Call(call) => {
            let strings: Vec<&str> = call
                .args
                .args
                .iter()
                .filter_map(|a| match a.as_ref() {
                    Expr::StringLiteral(s) => Some(s.val.as_str()),
                    _ => None,
                })
                .collect();
            match call.func.name {
                // label_replace(v, dst, replacement, src, regex)
                "label_replace" if strings.len() == 4 => {
                    refs.made.insert(strings[0].into());
                    refs.labels.insert(strings[2].into());
                }
                // label_join(v, dst, separator, src…)
                "label_join" if strings.len() >= 3 => {
                    refs.made.insert(strings[0].into());
                    refs.labels
                        .extend(strings[2..].iter().map(|s| s.to_string()));
                }
                _ => {}
            }
            for arg in &call.args.args {
                walk(arg, refs);
            }
        }
        _ => {}
    }
}

fn add_labels(labels: &Labels, refs: &mut References) {
    refs.labels.extend(labels.labels.iter().cloned());
}

/// Labels Prometheus adds when it scrapes, and the histogram's bucket
/// bound.
const SCRAPE_LABELS: [&str; 2] = ["instance", "job"];

/// What `query` reads, or why it does not parse.
pub fn references(query: &str) -> anyhow::Result<References> {
    let (promql, extra_labels) = as_promql(query);
    let expr = parser::parse(&promql).map_err(|e| anyhow::anyhow!("{e}: {promql}"))?;
    let mut refs = References::default();
    walk(&expr, &mut refs);
    refs.labels.extend(extra_labels);
    Ok(refs)
}

/// The queries `which` selects (by the metrics they read) that name a
/// metric or label the scrapes do not have: one line each. Also fails
/// when `which` selects no query at all.
pub fn unknown_references(
    dashboard: &Value,
    scrapes: &[&str],
    which: impl Fn(&References) -> bool,
) -> anyhow::Result<Vec<String>> {
    let mut series: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for scrape in scrapes {
        for (name, labels) in exported(scrape) {
            series.entry(name).or_default().extend(labels);
        }
    }
    let mut problems = Vec::new();
    let mut checked = 0;
    for (place, query) in queries(dashboard) {
        let refs = references(&query).with_context(|| place.clone())?;
        if !which(&refs) {
            continue;
        }
        checked += 1;
        anyhow::ensure!(!refs.metrics.is_empty(), "{place} reads no metric: {query}");
        let mut known_labels = BTreeSet::new();
        for metric in &refs.metrics {
            match series.get(metric) {
                Some(labels) => known_labels.extend(labels.iter().cloned()),
                None => problems.push(format!("{place}: no metric {metric} is exported")),
            }
        }
        for label in &refs.labels {
            if !known_labels.contains(label)
                && !refs.made.contains(label)
                && !SCRAPE_LABELS.contains(&label.as_str())
            {
                problems.push(format!(
                    "{place}: label {label} is on none of {:?}",
                    refs.metrics
                ));
            }
        }
    }
    anyhow::ensure!(checked > 0, "no query of the dashboard was selected");
    Ok(problems)
}

#[cfg(test)]
mod tests {
    use super::*;

    const METRICS: &str = "# TYPE mesh_flow_verdicts counter\n\
        mesh_flow_verdicts_total{hook=\"connect\",src_identity=\"a,b=\\\"c\",dst_identity=\"d\",verdict=\"deny\"} 1\n\
        mesh_reconcile_duration_seconds_bucket{le=\"0.1\",mode=\"standalone\"} 1\n\
        mesh_ready 1\n# EOF\n";

    fn check(query: &str) -> Vec<String> {
        let dashboard = serde_json::json!({
            "panels": [{"title": "p", "targets": [{"refId": "A", "expr": query}]}]
        });
        unknown_references(&dashboard, &[METRICS], |_| true).unwrap()
    }

    #[test]
    fn names_and_labels_are_read_from_the_exposition() {
        let e = exported(METRICS);
        let labels: Vec<_> = e["mesh_flow_verdicts_total"].iter().cloned().collect();
        assert_eq!(labels, ["dst_identity", "hook", "src_identity", "verdict"]);
        assert!(e["mesh_ready"].is_empty());
    }

    #[test]
    fn a_query_on_a_missing_metric_or_label_is_reported() {
        let ok = "sum by (src_identity, verdict) (rate(mesh_flow_verdicts_total{instance=~\"$instance\", verdict=\"deny\"}[$__rate_interval]))";
        assert_eq!(check(ok), Vec::<String>::new());
        let quantile = "histogram_quantile(0.99, sum by (le, mode) (rate(mesh_reconcile_duration_seconds_bucket[5m])))";
        assert_eq!(check(quantile), Vec::<String>::new());
        let joined = "label_join(sum by (src_identity, dst_identity) (mesh_flow_verdicts_total), \"id\", \"-\", \"src_identity\", \"dst_identity\")";
        assert_eq!(check(joined), Vec::<String>::new());
        assert_eq!(check("mesh_flow_verdict_total").len(), 1);
        let bad = check("sum by (pod) (mesh_flow_verdicts_total{verdict=\"deny\"})");
        assert_eq!(bad.len(), 1, "{bad:?}");
        assert!(bad[0].contains("label pod"), "{bad:?}");
        let bad = check("label_replace(mesh_ready, \"x\", \"$1\", \"node\", \"(.*)\")");
        assert!(bad[0].contains("label node"), "{bad:?}");
    }

    #[test]
    fn the_dashboard_imports_as_is_and_every_query_parses() {
        let dashboard = load().unwrap();
        let variables = dashboard["templating"]["list"].as_array().unwrap();
        assert!(
            variables.iter().any(|v| v["type"] == "datasource"
                && v["name"] == "datasource"
                && v["query"] == "prometheus"),
            "no datasource variable"
        );
        // Every panel and query takes its data source from the variable.
        for panel in dashboard["panels"].as_array().unwrap() {
            if panel["type"] == "row" {
                continue;
            }
            assert_eq!(panel["datasource"]["uid"], "${datasource}", "{panel}");
            for target in panel["targets"].as_array().unwrap() {
                assert_eq!(target["datasource"]["uid"], "${datasource}", "{target}");
            }
        }
        let all = queries(&dashboard);
        assert!(all.len() >= 15, "{all:?}");
        for (place, query) in &all {
            references(query).unwrap_or_else(|e| panic!("{place}: {e:#}"));
        }
        let titles: Vec<&str> = dashboard["panels"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|p| p["title"].as_str())
            .collect();
        for wanted in [
            "Verdicts by identity pair",
            "Denials over time",
            "Who talks to whom",
            "Tunnels open",
            "Handshakes",
            "Certificate expiry",
            "Map fill",
            "Reconcile latency (p50, p99)",
            "Kubernetes API watch",
        ] {
            assert!(titles.contains(&wanted), "no panel {wanted:?}: {titles:?}");
        }
        let graph = dashboard["panels"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["type"] == "nodeGraph")
            .expect("a node graph panel");
        assert_eq!(
            graph["targets"].as_array().unwrap().len(),
            2,
            "edges and nodes"
        );
    }
}
