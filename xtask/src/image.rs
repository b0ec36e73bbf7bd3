//! `cargo xtask image`: the agent's container image, built offline.
//!
//! The image is `FROM scratch` with one statically linked `mesh-agent`
//! (deploy/image/Containerfile says why), so there is no base image to pull
//! and no Docker engine to ask: Debian's buildah builds it into the local
//! containers-storage as `mesh-agent:<version>` and exports an OCI archive to
//! `target/image/` for `ctr images import`, `kind load image-archive`,
//! skopeo or crane (docs/image.md).
//!
//! The binary is static through glibc's own static libraries
//! (`+crt-static`): rustup here has no musl target, and none can be added
//! offline. `--target` keeps that flag off build scripts and proc-macros,
//! which must stay dynamic to be loaded by cargo and rustc.
use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{Context as _, bail, ensure};

use crate::{cargo, ebpf, run, setup, workspace_root};

/// The image's repository, as deploy/'s manifests name it.
pub const NAME: &str = "mesh-agent";
/// The workspace's version: the image's tag and the agent's `--version`.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
const SOURCE: &str = env!("CARGO_PKG_REPOSITORY");
/// vfs needs neither overlay mounts nor fuse, so buildah works as root in a
/// container too (slower and larger on disk than overlay, which does not
/// matter for one layer of one file).
pub const STORAGE_DRIVER: &str = "vfs";
const CONTAINERFILE: &str = "deploy/image/Containerfile";

/// The name the archive gives the image: what a kubelet looks for when a pod
/// says `image: mesh-agent:<version>` (containerd imports a full reference
/// as it is, and expands short names this way).
pub fn archive_reference() -> String {
    format!("docker.io/library/{NAME}:{VERSION}")
}

/// Builds the image with the agent of cargo profile `profile` (`release` to
/// ship, `dev` for a quicker check) and exports it; returns the archive.
pub fn build(profile: &str) -> anyhow::Result<PathBuf> {
    setup::ensure_installed()?;
    ebpf::build()?;
    let agent = static_agent(profile)?;
    check_agent(&agent)?;

    let out = workspace_root().join("target/image");
    let context = out.join("context");
    // The context holds the binary alone: nothing else can reach the image.
    let _ = std::fs::remove_dir_all(&context);
    std::fs::create_dir_all(&context).with_context(|| format!("creating {}", context.display()))?;
    // Without debug info: the build's own binary (same build ID) keeps it
    // for symbolizing, and every node pulls less.
    run(Command::new("objcopy")
        .arg("--strip-debug")
        .arg(&agent)
        .arg(context.join("mesh-agent")))?;

    let tag = format!("{NAME}:{VERSION}");
    let replaced = image_id(&tag);
    let mut bud = buildah();
    bud.args(["bud", "--file"])
        .arg(workspace_root().join(CONTAINERFILE))
        .args(["--tag", &tag])
        .args(["--build-arg", &format!("VERSION={VERSION}")])
        .args(["--build-arg", &format!("REVISION={}", revision())])
        .args(["--build-arg", &format!("SOURCE={SOURCE}")]);
    // Dated by the commit rather than the clock: the same binary gives the
    // same image, so reloading it into a cluster changes nothing.
    if let Some(time) = git(&["log", "-1", "--format=%ct"]) {
        bud.args(["--timestamp", &time]);
    }
    run(bud.arg(&context).stdout(std::io::stderr()))?;
    // A rebuild leaves the previous image untagged: remove it (only it) so
    // the storage does not grow by one binary per build.
    if let Some(old) = replaced.filter(|old| image_id(&tag).as_ref() != Some(old)) {
        let _ = buildah()
            .args(["rmi", &old])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }

    let archive = out.join(format!("{NAME}-{VERSION}.tar"));
    let _ = std::fs::remove_file(&archive);
    run(buildah()
        .arg("push")
        .arg("--quiet")
        .arg(&tag)
        .arg(format!(
            "oci-archive:{}:{}",
            archive.display(),
            archive_reference()
        ))
        .stdout(std::io::stderr()))?;
    let size = std::fs::metadata(&archive)?.len();
    eprintln!(
        "xtask image: {tag} in containers-storage ({STORAGE_DRIVER}), agent of profile `{profile}`\n\
         xtask image: OCI archive ({:.1} MiB), named {}:\n  {}\n\
         Load it with `ctr -n k8s.io images import` or `kind load image-archive`, \
         push it with skopeo or crane: docs/image.md",
        size as f64 / (1 << 20) as f64,
        archive_reference(),
        archive.display()
    );
    Ok(archive)
}

pub fn buildah() -> Command {
    let mut cmd = Command::new("buildah");
    cmd.args(["--storage-driver", STORAGE_DRIVER]);
    cmd
}

/// The ID of the local image `tag`, if there is one.
fn image_id(tag: &str) -> Option<String> {
    let out = buildah()
        .args(["images", "--quiet", "--no-trunc", tag])
        .stderr(Stdio::null())
        .output()
        .ok()?;
    let id = String::from_utf8(out.stdout).ok()?.trim().to_string();
    (out.status.success() && !id.is_empty()).then_some(id)
}

/// Builds the agent statically linked and returns its path.
fn static_agent(profile: &str) -> anyhow::Result<PathBuf> {
    ensure!(
        cfg!(target_os = "linux"),
        "the image is built on Linux (the agent is Linux-only)"
    );
    let target = format!("{}-unknown-linux-gnu", std::env::consts::ARCH);
    // The dev profile is for checks (the image test): without debug info
    // it builds with about half the CPU. Release keeps the workspace's line
    // tables in target/ for symbolizing; the image gets no debug info anyway.
    let rustflags = match profile {
        "dev" => "-C target-feature=+crt-static -C debuginfo=0",
        _ => "-C target-feature=+crt-static",
    };
    let mut cmd = cargo();
    cmd.args(["build", "--package", "mesh-agent", "--bin", "mesh-agent"])
        .args(["--profile", profile, "--target", &target])
        // Artifacts as JSON on stdout (to find the binary whatever the
        // target directory), messages as usual on stderr.
        .arg("--message-format=json-render-diagnostics")
        .env("RUSTFLAGS", rustflags)
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .stdout(Stdio::piped());
    eprintln!("xtask: running {cmd:?}");
    let out = cmd
        .spawn()
        .and_then(|child| child.wait_with_output())
        .context("running cargo build")?;
    ensure!(out.status.success(), "{cmd:?} failed with {}", out.status);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let agent = stdout
        .lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .filter(|msg| msg["reason"] == "compiler-artifact" && msg["target"]["name"] == "mesh-agent")
        .find_map(|msg| msg["executable"].as_str().map(PathBuf::from))
        .context("cargo build reported no mesh-agent executable")?;
    eprintln!("xtask: static agent at {}", agent.display());
    Ok(agent)
}

/// The agent must run in scratch: no ELF interpreter, and it says its
/// version.
fn check_agent(agent: &Path) -> anyhow::Result<()> {
    let elf = std::fs::read(agent).with_context(|| format!("reading {}", agent.display()))?;
    if let Some(interpreter) = elf_interpreter(&elf)? {
        bail!(
            "{} is dynamically linked (interpreter {interpreter}): it cannot run FROM scratch",
            agent.display()
        );
    }
    let out = Command::new(agent)
        .arg("--version")
        .output()
        .with_context(|| format!("running {} --version", agent.display()))?;
    let version = String::from_utf8_lossy(&out.stdout);
    ensure!(
        out.status.success() && version.trim() == format!("{NAME} {VERSION}"),
        "{} --version said {:?} ({}), not `{NAME} {VERSION}`",
        agent.display(),
        version.trim(),
        out.status
    );
    Ok(())
}

/// The program interpreter (PT_INTERP) of a 64-bit little-endian ELF file:
/// `None` for a static executable.
fn elf_interpreter(elf: &[u8]) -> anyhow::Result<Option<String>> {
    const PT_INTERP: u32 = 3;
    let u16_at = |at: usize| {
        elf.get(at..at + 2)
            .map(|b| u16::from_le_bytes([b[0], b[1]]))
    };
    let u32_at = |at: usize| {
        elf.get(at..at + 4)
            .map(|b| u32::from_le_bytes(b.try_into().unwrap()))
    };
    let u64_at = |at: usize| {
        elf.get(at..at + 8)
            .map(|b| u64::from_le_bytes(b.try_into().unwrap()))
    };
    ensure!(
        elf.starts_with(b"\x7fELF\x02\x01"),
        "not a 64-bit little-endian ELF file"
    );
    let (Some(phoff), Some(phentsize), Some(phnum)) = (u64_at(0x20), u16_at(0x36), u16_at(0x38))
    else {
        bail!("truncated ELF header");
    };
    for i in 0..usize::from(phnum) {
        let header = phoff as usize + i * usize::from(phentsize);
        let p_type = u32_at(header).context("truncated program header")?;
        if p_type != PT_INTERP {
            continue;
        }
        let (Some(offset), Some(size)) = (u64_at(header + 8), u64_at(header + 32)) else {
            bail!("truncated program header");
        };
        let path = elf
            .get(offset as usize..(offset + size) as usize)
            .context("PT_INTERP outside the file")?;
        let path = path.strip_suffix(b"\0").unwrap_or(path);
        return Ok(Some(String::from_utf8_lossy(path).into_owned()));
    }
    Ok(None)
}

/// The commit the image is built from, `-dirty` when tracked files differ.
fn revision() -> String {
    match (
        git(&["rev-parse", "HEAD"]),
        git(&["status", "--porcelain", "--untracked-files=no"]),
    ) {
        (Some(commit), Some(changes)) if changes.is_empty() => commit,
        (Some(commit), _) => format!("{commit}-dirty"),
        (None, _) => "unknown".into(),
    }
}

/// What git says in the workspace, trimmed; `None` without git or a clone.
fn git(args: &[&str]) -> Option<String> {
    Command::new("git")
        .current_dir(workspace_root())
        .args(args)
        .stderr(Stdio::null())
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
}

#[cfg(test)]
mod tests {
    use super::elf_interpreter;

    #[test]
    fn finds_the_interpreter_of_a_dynamic_executable() {
        // This test binary is linked dynamically by the host toolchain.
        let me = std::fs::read(std::env::current_exe().unwrap()).unwrap();
        let interpreter = elf_interpreter(&me).unwrap().expect("a PT_INTERP");
        assert!(interpreter.contains("ld-linux"), "{interpreter}");
    }

    #[test]
    fn refuses_what_is_not_elf() {
        assert!(elf_interpreter(b"#!/bin/sh\n").is_err());
        assert!(elf_interpreter(b"\x7fELF\x02\x01\x01").is_err());
    }
}
