//! The agent of the previous map layout, for the upgrade tests: the last
//! commit whose pins have layout 1, built once into `target/previous-agent/`
//! (its own target directory: its binary must not replace this tree's).
//!
//! Layout 1 is the oldest this agent migrates from, and the only one with a
//! conversion (CONNTRACK's values); layout 2 → 3 only added maps, which an
//! upgrade from 1 adds as well. When a layout again needs a conversion,
//! point `COMMIT` at the last commit of the layout before it.
use std::path::PathBuf;

use anyhow::{Context as _, ensure};

use crate::{cargo, run, workspace_root};

/// The last commit with map layout 1.
pub const COMMIT: &str = "dede3e359a25ef7adc73cbe356d4ab1cefa1e2ba";
/// The layout its pins have.
pub const LAYOUT: u32 = 1;

/// Builds the previous agent unless it is already there; returns its path.
pub fn build() -> anyhow::Result<PathBuf> {
    let out = workspace_root().join("target/previous-agent");
    let bin = out.join("mesh-agent");
    let stamp = out.join("commit");
    if bin.is_file() && std::fs::read_to_string(&stamp).is_ok_and(|s| s.trim() == COMMIT) {
        return Ok(bin);
    }
    let has_commit = std::process::Command::new("git")
        .current_dir(workspace_root())
        .args(["cat-file", "-e", &format!("{COMMIT}^{{commit}}")])
        .status()
        .is_ok_and(|s| s.success());
    ensure!(
        has_commit,
        "the upgrade tests build the agent of map layout {LAYOUT} from commit {COMMIT}, \
         which this clone lacks (a shallow clone?): `git fetch --unshallow` fetches it"
    );
    let src = out.join("src");
    let _ = std::fs::remove_dir_all(&src);
    std::fs::create_dir_all(&src).with_context(|| format!("creating {}", src.display()))?;
    eprintln!("xtask: building the previous agent (layout {LAYOUT}, commit {COMMIT})");
    // `git archive` rather than a worktree: no state left in .git.
    let archive = std::process::Command::new("git")
        .current_dir(workspace_root())
        .args(["archive", "--format=tar", COMMIT])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .context("running git archive")?;
    run(std::process::Command::new("tar")
        .arg("-x")
        .arg("-C")
        .arg(&src)
        .stdin(archive.stdout.context("git archive output")?))?;
    let target = out.join("target");
    let build = |args: &[&str]| {
        let mut cmd = cargo();
        cmd.current_dir(&src)
            .args(args)
            .env("CARGO_TARGET_DIR", &target)
            .env_remove("MESH_EBPF_OBJECT");
        run(&mut cmd)
    };
    build(&["xtask", "build-ebpf"])?;
    build(&["build", "--package", "mesh-agent"])?;
    std::fs::copy(target.join("debug/mesh-agent"), &bin)
        .with_context(|| format!("copying the previous agent to {}", bin.display()))?;
    std::fs::write(&stamp, COMMIT)?;
    Ok(bin)
}
