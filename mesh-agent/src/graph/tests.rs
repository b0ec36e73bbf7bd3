use super::*;
use mesh_agent::flows::map::EdgeKey;

const FRONTEND: &str = "spiffe://cluster.local/ns/shop/sa/frontend";
const CART: &str = "spiffe://cluster.local/ns/shop/sa/cart";
const LEDGER: &str = "spiffe://cluster.local/ns/bank/sa/ledger";
const ROBOT: &str = "spiffe://cluster.local/ns/lab/sa/robot";

fn edge(src: &str, dst: &str, service: Option<&str>, v: Verdict, p: Path, n: u64) -> Edge {
    Edge {
        key: EdgeKey {
            src: src.into(),
            dst: dst.into(),
            service: service.map(Into::into),
            verdict: v,
            path: p,
        },
        connections: n,
        last_seen: 1_800_000_000,
    }
}

/// The demo's traffic: a Service with a canary, a cross-node call through
/// the tunnel, denials from a workload and from outside the mesh.
fn demo() -> MapReply {
    use Path::*;
    use Verdict::*;
    MapReply {
        edges: vec![
            edge(FRONTEND, CART, Some("shop/cart"), Allowed, SameNode, 9),
            edge(
                FRONTEND,
                "spiffe://cluster.local/ns/shop/sa/cart-v2",
                Some("shop/cart"),
                Allowed,
                SameNode,
                1,
            ),
            edge(FRONTEND, CART, None, Allowed, SameNode, 3),
            edge(CART, LEDGER, None, Allowed, Mtls, 4),
            edge(ROBOT, CART, None, Denied, SameNode, 2),
            edge(ROBOT, LEDGER, None, Denied, Mtls, 1),
            edge("world", CART, None, Denied, Plaintext, 5),
            edge(FRONTEND, LEDGER, None, Audited, Plaintext, 1),
        ],
        evicted: 0,
    }
}

#[test]
fn a_service_is_a_hop_and_hops_that_meet_add_up() {
    let map = ServiceMap::build(&demo(), &Filter::default());
    let ns: Vec<_> = map.namespaces.keys().map(String::as_str).collect();
    assert_eq!(ns, ["", "bank", "lab", "shop"]);
    let shop: Vec<_> = map.namespaces["shop"]
        .iter()
        .map(|n| (n.label.as_str(), n.kind))
        .collect();
    assert_eq!(
        shop,
        [
            ("cart", NodeKind::Service),
            ("cart", NodeKind::Identity),
            ("cart-v2", NodeKind::Identity),
            ("frontend", NodeKind::Identity),
        ]
    );
    assert_eq!(map.namespaces[""][0].kind, NodeKind::Outside);
    let arc = |from: &str, to: &str, v: Verdict| {
        map.arcs
            .iter()
            .find(|a| a.from == from && a.to == to && a.verdict == v)
            .map(|a| a.connections)
    };
    // Both backends' connections went through the Service first.
    assert_eq!(
        arc(FRONTEND, "service:shop/cart", Verdict::Allowed),
        Some(10)
    );
    assert_eq!(arc("service:shop/cart", CART, Verdict::Allowed), Some(9));
    // The direct connections are an arrow of their own.
    assert_eq!(arc(FRONTEND, CART, Verdict::Allowed), Some(3));
    assert_eq!(arc("world", CART, Verdict::Denied), Some(5));
    assert_eq!(map.arcs.len(), 9);
}

#[test]
fn filters_keep_an_edge_by_either_end() {
    let only = |namespace: Option<&str>, identity: Option<&str>| {
        let filter = Filter {
            namespace: namespace.map(Into::into),
            identity: identity.map(Into::into),
        };
        let map = ServiceMap::build(&demo(), &filter);
        map.arcs
            .iter()
            .map(|a| {
                format!(
                    "{}>{}",
                    a.from.rsplit('/').next().unwrap(),
                    a.to.rsplit('/').next().unwrap()
                )
            })
            .collect::<Vec<_>>()
    };
    // In order of the identities' full names: lab < shop, bank < shop.
    assert_eq!(
        only(Some("bank"), None),
        ["robot>ledger", "cart>ledger", "frontend>ledger"]
    );
    assert_eq!(only(Some("lab"), None), ["robot>ledger", "robot>cart"]);
    assert_eq!(only(None, Some("world")), ["world>cart"]);
    assert_eq!(
        only(Some("bank"), Some("spiffe://cluster.local/ns/lab/*")),
        ["robot>ledger"]
    );
    assert!(only(Some("nowhere"), None).is_empty());
}

#[test]
fn dot_has_a_cluster_per_namespace_and_red_denials() {
    let map = ServiceMap::build(&demo(), &Filter::default());
    insta::assert_snapshot!("demo.dot", map.dot());
}

#[test]
fn json_lists_nodes_and_arcs() {
    let map = ServiceMap::build(&demo(), &Filter::default());
    let json: serde_json::Value = serde_json::from_str(&map.render(Format::Json).unwrap()).unwrap();
    assert_eq!(json["arcs"].as_array().unwrap().len(), 9);
    assert_eq!(json["namespaces"]["lab"][0]["label"], "robot");
    let denied = json["arcs"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|a| a["verdict"] == "denied")
        .count();
    assert_eq!(denied, 3);
}

#[test]
fn svg_snapshot() {
    let map = ServiceMap::build(&demo(), &Filter::default());
    insta::assert_snapshot!("demo.svg", map.svg());
}

/// What a renderer makes of an SVG: the pixels, and the texts and stroked
/// paths with where they were drawn.
pub struct Rendering {
    pub pixmap: resvg::tiny_skia::Pixmap,
    pub texts: Vec<(String, resvg::tiny_skia::Rect)>,
    pub strokes: Vec<[u8; 3]>,
}

/// Renders `svg` with the machine's fonts (layout-rs asks for a serif).
pub fn render(svg: &str) -> Rendering {
    let mut options = resvg::usvg::Options::default();
    let fonts = options.fontdb_mut();
    fonts.load_system_fonts();
    assert!(
        !fonts.is_empty(),
        "no fonts on this machine to render text with"
    );
    fonts.set_serif_family("DejaVu Serif");
    fonts.set_sans_serif_family("DejaVu Sans");
    let tree = resvg::usvg::Tree::from_str(svg, &options).expect("the SVG parses");
    let size = tree.size().to_int_size();
    let mut pixmap = resvg::tiny_skia::Pixmap::new(size.width(), size.height()).unwrap();
    pixmap.fill(resvg::tiny_skia::Color::WHITE);
    resvg::render(&tree, Default::default(), &mut pixmap.as_mut());
    let mut rendering = Rendering {
        pixmap,
        texts: Vec::new(),
        strokes: Vec::new(),
    };
    collect(tree.root(), &mut rendering);
    rendering
}

fn collect(group: &resvg::usvg::Group, out: &mut Rendering) {
    for node in group.children() {
        match node {
            resvg::usvg::Node::Group(g) => collect(g, out),
            resvg::usvg::Node::Text(t) => {
                let text: String = t.chunks().iter().map(|c| c.text()).collect();
                out.texts.push((text, t.abs_bounding_box()));
            }
            resvg::usvg::Node::Path(p) => {
                if let Some(resvg::usvg::Paint::Color(c)) = p.stroke().map(|s| s.paint()) {
                    out.strokes.push([c.red, c.green, c.blue]);
                }
            }
            resvg::usvg::Node::Image(_) => {}
        }
    }
}

impl Rendering {
    /// Pixels within `rect` darker than mid-grey: glyphs were drawn there.
    pub fn ink_in(&self, rect: resvg::tiny_skia::Rect) -> usize {
        let (w, h) = (self.pixmap.width() as i32, self.pixmap.height() as i32);
        let mut n = 0;
        for y in (rect.top() as i32).max(0)..(rect.bottom().ceil() as i32).min(h) {
            for x in (rect.left() as i32).max(0)..(rect.right().ceil() as i32).min(w) {
                let p = self.pixmap.pixel(x as u32, y as u32).unwrap();
                if u32::from(p.red()) + u32::from(p.green()) + u32::from(p.blue()) < 3 * 110 {
                    n += 1;
                }
            }
        }
        n
    }

    /// Pixels of about `rgb`.
    pub fn pixels_of(&self, rgb: [u8; 3]) -> usize {
        self.pixmap
            .pixels()
            .iter()
            .filter(|p| {
                let d = |a: u8, b: u8| (i32::from(a) - i32::from(b)).abs();
                d(p.red(), rgb[0]) + d(p.green(), rgb[1]) + d(p.blue(), rgb[2]) < 40
            })
            .count()
    }
}

pub fn rgb(hex: &str) -> [u8; 3] {
    let v = u32::from_str_radix(hex.trim_start_matches('#'), 16).unwrap();
    [(v >> 16) as u8, (v >> 8) as u8, v as u8]
}

#[test]
fn the_rendered_picture_shows_every_identity_and_arrow() {
    let map = ServiceMap::build(&demo(), &Filter::default());
    let rendering = render(&map.svg());
    let png = std::env::temp_dir().join(format!("mesh-graph-{}.png", std::process::id()));
    rendering.pixmap.save_png(&png).unwrap();
    eprintln!("rendered to {}", png.display());
    // Every node's label was drawn: its text exists and has ink.
    for label in ["frontend", "cart", "cart-v2", "ledger", "robot", "world"] {
        let drawn = rendering
            .texts
            .iter()
            .filter(|(t, _)| t.starts_with(label))
            .map(|(_, rect)| rendering.ink_in(*rect))
            .max();
        assert!(drawn.is_some_and(|ink| ink > 20), "{label}: {drawn:?}");
    }
    // One arrow per arc, each in its verdict's and path's colour.
    let arc_colors: Vec<[u8; 3]> = map
        .arcs
        .iter()
        .map(|a| rgb(arc_style(a.verdict, a.path).color))
        .collect();
    let drawn_arcs = rendering
        .strokes
        .iter()
        .filter(|c| arc_colors.contains(c))
        .count();
    assert_eq!(drawn_arcs, map.arcs.len());
    // Denials stand out: red, thicker than any other arrow.
    let red = rendering.pixels_of(rgb(DENIED_COLOR));
    let blue = rendering.pixels_of(rgb(arc_style(Verdict::Allowed, Path::Mtls).color));
    assert!(red > 200, "red pixels: {red}");
    assert!(blue > 50, "blue pixels: {blue}");
    // And the edge labels say what they count.
    for label in ["5 denied, plaintext", "4 allowed, mTLS"] {
        assert!(
            rendering
                .texts
                .iter()
                .any(|(t, r)| t == label && rendering.ink_in(*r) > 20),
            "{label}"
        );
    }
    if std::env::var_os("MESH_KEEP_PICTURES").is_none() {
        std::fs::remove_file(&png).unwrap();
    }
}
