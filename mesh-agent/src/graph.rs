//! `mesh-agent graph`: the service map of this node, from the agent's
//! counters of who talked to whom (`flows::map`), drawn as SVG, or written
//! as Graphviz DOT or JSON.
//!
//! Nodes are identities (and the Services clients dialled), grouped by
//! namespace; an edge per verdict and path carries the number of
//! connections. Everything below [`fetch`] is a pure function of the
//! agent's reply, so the pictures are tested as snapshots.
use std::{
    collections::{BTreeMap, BTreeSet},
    io::{BufRead as _, BufReader},
    path::Path as FsPath,
    time::Duration,
};

use anyhow::Context as _;
use layout::{
    backends::svg::SVGWriter,
    core::{
        base::Orientation,
        color::Color,
        style::{LineStyleKind, StyleAttr},
    },
    std_shapes::{
        render::get_shape_size,
        shapes::{Arrow, Element, LineEndKind, ShapeKind},
    },
    topo::layout::VisualGraph,
};
use serde::Serialize;

use mesh_agent::flows::{
    self, MapQuery, Request,
    map::{Edge, MapReply, Path, Verdict},
};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    Svg,
    Dot,
    Json,
}

#[derive(Debug, Default, Clone)]
pub struct Filter {
    /// Only edges with an end (or the Service) in this namespace.
    pub namespace: Option<String>,
    /// Only edges from or to this identity (a SPIFFE ID, a prefix of one
    /// ending in `*`, `world`).
    pub identity: Option<String>,
}

/// Asks the agent for its edges (of the last `since`).
pub fn fetch(state_dir: &FsPath, since: Option<Duration>) -> anyhow::Result<MapReply> {
    let request = Request {
        map: Some(MapQuery {
            since_secs: since.map(|d| d.as_secs().max(1)),
        }),
        ..Request::default()
    };
    let conn = flows::ask(state_dir, &request)?;
    let mut line = String::new();
    BufReader::new(conn).read_line(&mut line)?;
    serde_json::from_str(&line).with_context(|| {
        format!(
            "the agent at {} did not answer with a service map (is it older than this command?)",
            flows::socket_path(state_dir).display()
        )
    })
}

/// A node of the picture.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub struct Node {
    /// The identity (SPIFFE ID, `world`, a number) or `service:<name>`.
    pub id: String,
    /// What the picture says: the service account, or the Service's name.
    pub label: String,
    pub kind: NodeKind,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum NodeKind {
    Identity,
    Service,
    /// `world`, or an identity with no known name.
    Outside,
}

/// An arrow of the picture: a hop of one or more counted edges.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Arc {
    pub from: String,
    pub to: String,
    pub verdict: Verdict,
    pub path: Path,
    pub connections: u64,
}

/// The service map: nodes by namespace (`""` for those of none), arrows.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct ServiceMap {
    pub namespaces: BTreeMap<String, Vec<Node>>,
    pub arcs: Vec<Arc>,
    /// Edges the agent dropped to stay within its bound.
    pub evicted: u64,
}

/// An identity's namespace: its workload ID's, else none (`""`).
fn identity_namespace(id: &str) -> &str {
    mesh_pki::spiffe::workload_of(id).map_or("", |(namespace, _)| namespace)
}

/// A Service's namespace, when it is named `namespace/name`.
fn service_namespace(service: &str) -> &str {
    service
        .split_once('/')
        .map_or("", |(namespace, _)| namespace)
}

/// The namespace and label of an identity.
fn identity_node(id: &str) -> (String, Node) {
    match mesh_pki::spiffe::workload_of(id) {
        Some((namespace, service_account)) => (
            namespace.to_string(),
            Node {
                id: id.into(),
                label: service_account.into(),
                kind: NodeKind::Identity,
            },
        ),
        None => (
            String::new(),
            Node {
                id: id.into(),
                label: id.into(),
                kind: NodeKind::Outside,
            },
        ),
    }
}

/// A Service, named `namespace/name` or by its address.
fn service_node(service: &str) -> (String, Node) {
    let (namespace, name) = match service.split_once('/') {
        Some((ns, name)) => (ns.to_string(), name.to_string()),
        None => (String::new(), service.to_string()),
    };
    (
        namespace,
        Node {
            id: format!("service:{service}"),
            label: name,
            kind: NodeKind::Service,
        },
    )
}

impl Filter {
    fn keeps(&self, edge: &Edge) -> bool {
        let k = &edge.key;
        let in_namespace = |ns: &str| {
            [&k.src, &k.dst]
                .iter()
                .any(|id| identity_namespace(id) == ns)
                || k.service
                    .as_deref()
                    .is_some_and(|s| service_namespace(s) == ns)
        };
        self.namespace.as_deref().is_none_or(in_namespace)
            && self.identity.as_deref().is_none_or(|f| {
                flows::identity_matches(f, &k.src) || flows::identity_matches(f, &k.dst)
            })
    }
}

impl ServiceMap {
    /// The picture of `reply`'s edges that `filter` keeps. A connection to
    /// a Service is two hops, client → Service → the backend the kernel
    /// chose; hops that meet are added up.
    pub fn build(reply: &MapReply, filter: &Filter) -> Self {
        let mut nodes: BTreeMap<String, BTreeSet<Node>> = BTreeMap::new();
        let mut arcs: BTreeMap<(String, String, Verdict, Path), u64> = BTreeMap::new();
        let mut add = |(ns, node): (String, Node)| {
            let id = node.id.clone();
            nodes.entry(ns).or_default().insert(node);
            id
        };
        for edge in reply.edges.iter().filter(|e| filter.keeps(e)) {
            let k = &edge.key;
            let src = add(identity_node(&k.src));
            let dst = add(identity_node(&k.dst));
            let hops = match &k.service {
                Some(service) => {
                    let svc = add(service_node(service));
                    vec![(src, svc.clone()), (svc, dst)]
                }
                None => vec![(src, dst)],
            };
            for (from, to) in hops {
                *arcs.entry((from, to, k.verdict, k.path)).or_default() += edge.connections;
            }
        }
        Self {
            namespaces: nodes
                .into_iter()
                .map(|(ns, set)| (ns, set.into_iter().collect()))
                .collect(),
            arcs: arcs
                .into_iter()
                .map(|((from, to, verdict, path), connections)| Arc {
                    from,
                    to,
                    verdict,
                    path,
                    connections,
                })
                .collect(),
            evicted: reply.evicted,
        }
    }

    pub fn render(&self, format: Format) -> anyhow::Result<String> {
        Ok(match format {
            Format::Svg => self.svg(),
            Format::Dot => self.dot(),
            Format::Json => serde_json::to_string_pretty(self)? + "\n",
        })
    }

    /// Graphviz DOT, a cluster per namespace: `dot -Tpng` draws it.
    pub fn dot(&self) -> String {
        let mut out = String::from(
            "digraph mesh {\n  rankdir=LR;\n  node [shape=box, style=\"rounded,filled\", \
             fontname=\"sans-serif\"];\n  edge [fontname=\"sans-serif\", fontsize=10];\n",
        );
        for (i, (namespace, nodes)) in self.namespaces.iter().enumerate() {
            let indent = if namespace.is_empty() {
                "  "
            } else {
                out += &format!(
                    "  subgraph cluster_{i} {{\n    label={};\n    style=dashed;\n",
                    quote(namespace)
                );
                "    "
            };
            for node in nodes {
                let style = node_style(node.kind, i);
                out += &format!(
                    "{indent}{} [label={}, shape={}, fillcolor=\"{}\"];\n",
                    quote(&node.id),
                    quote(&node.label),
                    style.shape,
                    style.fill
                );
            }
            if !namespace.is_empty() {
                out += "  }\n";
            }
        }
        for arc in &self.arcs {
            let style = arc_style(arc.verdict, arc.path);
            out += &format!(
                "  {} -> {} [label={}, color=\"{}\", fontcolor=\"{}\", penwidth={}{}];\n",
                quote(&arc.from),
                quote(&arc.to),
                quote(&arc_label(arc)),
                style.color,
                style.color,
                style.width,
                if style.dashed { ", style=dashed" } else { "" }
            );
        }
        out + "}\n"
    }

    /// SVG, laid out by layout-rs. It has no clusters: a namespace is a
    /// fill colour, and each identity's label names its namespace.
    pub fn svg(&self) -> String {
        if self.arcs.is_empty() {
            return empty_svg();
        }
        let mut graph = VisualGraph::new(Orientation::LeftToRight);
        let mut handles = BTreeMap::new();
        for (i, (namespace, nodes)) in self.namespaces.iter().enumerate() {
            for node in nodes {
                let style = node_style(node.kind, i);
                let label = if namespace.is_empty() {
                    node.label.clone()
                } else {
                    format!("{}\n{namespace}", node.label)
                };
                let shape = ShapeKind::new_box(&label);
                let look = StyleAttr::new(
                    Color::fast("black"),
                    1,
                    Some(Color::fast(style.fill)),
                    if node.kind == NodeKind::Service {
                        15
                    } else {
                        5
                    },
                    13,
                );
                let size = get_shape_size(Orientation::TopToBottom, &shape, 13, false);
                // layout-rs sizes boxes of a left-to-right graph top to bottom.
                let element = Element::create(shape, look, Orientation::TopToBottom, size);
                handles.insert(node.id.clone(), graph.add_node(element));
            }
        }
        for arc in &self.arcs {
            let style = arc_style(arc.verdict, arc.path);
            let look = StyleAttr::new(Color::fast(style.color), style.width, None, 0, 11);
            let arrow = Arrow::new(
                LineEndKind::None,
                LineEndKind::Arrow,
                if style.dashed {
                    LineStyleKind::Dashed
                } else {
                    LineStyleKind::Normal
                },
                &arc_label(arc),
                &look,
                &None,
                &None,
            );
            graph.add_edge(arrow, handles[&arc.from], handles[&arc.to]);
        }
        let mut svg = SVGWriter::new();
        graph.do_it(false, false, false, &mut svg);
        with_styles_sorted(svg.finalize())
    }
}

/// "12 allowed, mTLS".
fn arc_label(arc: &Arc) -> String {
    format!(
        "{} {}, {}",
        arc.connections,
        arc.verdict.name(),
        arc.path.name()
    )
}

struct NodeStyle {
    shape: &'static str,
    fill: &'static str,
}

/// Light fills, one per namespace in turn.
const NAMESPACE_FILLS: [&str; 6] = [
    "#dbe9f6", "#e3f1dc", "#f6e8d5", "#ece0f3", "#f9dfe4", "#e0f2f1",
];

fn node_style(kind: NodeKind, namespace_index: usize) -> NodeStyle {
    match kind {
        NodeKind::Outside => NodeStyle {
            shape: "box",
            fill: "#eeeeee",
        },
        NodeKind::Identity => NodeStyle {
            shape: "box",
            fill: NAMESPACE_FILLS[namespace_index % NAMESPACE_FILLS.len()],
        },
        NodeKind::Service => NodeStyle {
            shape: "ellipse",
            fill: "#fff7c2",
        },
    }
}

pub struct ArcStyle {
    pub color: &'static str,
    pub width: usize,
    pub dashed: bool,
}

/// Denials are thick and red so they stand out; audits dashed orange;
/// allowed traffic coloured by its path, plaintext dashed.
pub fn arc_style(verdict: Verdict, path: Path) -> ArcStyle {
    match (verdict, path) {
        (Verdict::Denied, _) => ArcStyle {
            color: DENIED_COLOR,
            width: 4,
            dashed: false,
        },
        (Verdict::Audited, _) => ArcStyle {
            color: "#ff7f0e",
            width: 2,
            dashed: true,
        },
        (Verdict::Allowed, Path::SameNode) => ArcStyle {
            color: "#2ca02c",
            width: 2,
            dashed: false,
        },
        (Verdict::Allowed, Path::Mtls) => ArcStyle {
            color: "#1f77b4",
            width: 2,
            dashed: false,
        },
        (Verdict::Allowed, Path::Plaintext) => ArcStyle {
            color: "#7f7f7f",
            width: 2,
            dashed: true,
        },
    }
}

pub const DENIED_COLOR: &str = "#d62728";

fn quote(s: &str) -> String {
    format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))
}

/// layout-rs writes its font classes in a hash map's order; sorted, the
/// same map is the same file (stable snapshots, and diffs that mean
/// something).
fn with_styles_sorted(svg: String) -> String {
    let (Some(start), Some(end)) = (svg.find("<style>\n"), svg.find("</style>")) else {
        return svg;
    };
    let start = start + "<style>\n".len();
    if end < start {
        return svg;
    }
    let mut classes: Vec<&str> = svg[start..end].lines().collect();
    classes.sort_unstable();
    let mut sorted = String::with_capacity(svg.len());
    sorted.push_str(&svg[..start]);
    for class in classes {
        sorted.push_str(class);
        sorted.push('\n');
    }
    sorted.push_str(&svg[end..]);
    sorted
}

fn empty_svg() -> String {
    "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"320\" height=\"40\">\
     <text x=\"10\" y=\"25\" font-family=\"sans-serif\" font-size=\"14\">\
     No connections counted yet.</text></svg>\n"
        .into()
}

#[cfg(test)]
mod tests;
