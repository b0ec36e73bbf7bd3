//! Where the binaries the tests run are: the agent, the pod tool and the
//! probes built next to the test binary, and the previous-layout agent.
use std::path::Path;

/// Path of a binary built next to the running one (the test binaries live
/// in `target/<profile>/deps`, the tools in `target/<profile>`).
pub fn sibling_binary(name: &str, env_override: &str) -> std::path::PathBuf {
    if let Some(path) = std::env::var_os(env_override) {
        return path.into();
    }
    let exe = std::env::current_exe().expect("current exe");
    let mut dir = exe.parent().expect("exe dir").to_path_buf();
    if dir.ends_with("deps") {
        dir.pop();
    }
    let path = dir.join(name);
    assert!(
        path.is_file(),
        "{} is not built; run the tests with `cargo xtask test` (or set {env_override})",
        path.display()
    );
    path
}

pub fn pod_tool() -> std::path::PathBuf {
    sibling_binary("mesh-pod", "MESH_POD_BIN")
}

pub fn agent_bin() -> std::path::PathBuf {
    sibling_binary("mesh-agent", "MESH_AGENT_BIN")
}

/// The agent of the previous map layout (`cargo xtask previous-agent`),
/// which the upgrade tests start from.
pub fn previous_agent_bin() -> anyhow::Result<std::path::PathBuf> {
    let bin = match std::env::var_os("MESH_PREVIOUS_AGENT_BIN") {
        Some(path) => path.into(),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/previous-agent/mesh-agent"),
    };
    anyhow::ensure!(
        bin.is_file(),
        "the upgrade tests need the agent of the previous map layout at {}: \
         `cargo xtask test` builds it, or `cargo xtask previous-agent`",
        bin.display()
    );
    Ok(bin)
}
