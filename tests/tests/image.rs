//! The agent's container image, as a cluster would receive it: `cargo xtask
//! image` builds it with buildah and exports an OCI archive, which this test
//! unpacks (index → manifest → config and layer) to check the image config,
//! that the root filesystem holds the agent alone, and that the agent runs
//! there — chrooted into that root filesystem, so with nothing from the host.
//!
//! The agent is built in the dev profile (without debug info) here: a static
//! release build of everything again would cost minutes more, and linking
//! statically is what is under test, not the optimiser.
use std::{
    path::{Path, PathBuf},
    process::Command,
};

use serde_json::Value;

const VERSION: &str = env!("CARGO_PKG_VERSION");

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

fn buildah_installed() -> bool {
    Command::new("buildah")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Variables cargo sets for this test (with `CARGO_PKG_*`) that a shell
/// running `cargo xtask` has not: ring's build script watches some, so cargo
/// would rebuild ring and all above it for xtask here, and again after.
const SET_FOR_THIS_TEST: &[&str] = &[
    "CARGO_MANIFEST_DIR",
    "CARGO_MANIFEST_PATH",
    "CARGO_CRATE_NAME",
    "CARGO_PRIMARY_PACKAGE",
    "CARGO_TARGET_TMPDIR",
    "OUT_DIR",
];

/// `cargo xtask image --profile dev`; returns the archive it printed.
fn build_image() -> PathBuf {
    let mut cmd = Command::new(env!("CARGO"));
    cmd.current_dir(workspace_root())
        .args(["xtask", "image", "--profile", "dev"]);
    for (name, _) in std::env::vars_os() {
        let name = name.to_string_lossy();
        if name.starts_with("CARGO_PKG_") || SET_FOR_THIS_TEST.contains(&name.as_ref()) {
            cmd.env_remove(name.as_ref());
        }
    }
    let out = cmd.output().expect("running cargo xtask image");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "cargo xtask image failed with {}:\n{stderr}",
        out.status
    );
    let archive = PathBuf::from(String::from_utf8(out.stdout).unwrap().trim());
    assert!(archive.is_file(), "no archive at {archive:?}:\n{stderr}");
    archive
}

/// A blob of the OCI layout in `dir` by its descriptor.
fn blob(dir: &Path, descriptor: &Value) -> PathBuf {
    let digest = descriptor["digest"].as_str().unwrap();
    let (algorithm, hex) = digest.split_once(':').unwrap();
    dir.join("blobs").join(algorithm).join(hex)
}

fn json(path: &Path) -> Value {
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
}

fn tar(args: &[&str], archive: &Path, dir: Option<&Path>) -> String {
    let mut cmd = Command::new("tar");
    cmd.args(args).arg("-f").arg(archive);
    if let Some(dir) = dir {
        cmd.arg("-C").arg(dir);
    }
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// The program interpreter (PT_INTERP) of a 64-bit little-endian ELF file,
/// if it has one: a static executable has none.
fn elf_interpreter(elf: &[u8]) -> Option<String> {
    const PT_INTERP: u32 = 3;
    assert!(elf.starts_with(b"\x7fELF\x02\x01"), "not a 64-bit LE ELF");
    let u16_at = |at: usize| u16::from_le_bytes(elf[at..at + 2].try_into().unwrap());
    let u32_at = |at: usize| u32::from_le_bytes(elf[at..at + 4].try_into().unwrap());
    let u64_at = |at: usize| u64::from_le_bytes(elf[at..at + 8].try_into().unwrap()) as usize;
    let (phoff, phentsize, phnum) = (u64_at(0x20), u16_at(0x36), u16_at(0x38));
    (0..usize::from(phnum))
        .map(|i| phoff + i * usize::from(phentsize))
        .find(|&header| u32_at(header) == PT_INTERP)
        .map(|header| {
            let (offset, size) = (u64_at(header + 8), u64_at(header + 32));
            String::from_utf8_lossy(&elf[offset..offset + size]).into_owned()
        })
}

/// Runs `/mesh-agent args` chrooted into `rootfs`.
fn run_in(rootfs: &Path, args: &[&str]) -> String {
    let out = Command::new("chroot")
        .arg(rootfs)
        .arg("/mesh-agent")
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "/mesh-agent {args:?} in the image failed with {}: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn image_is_the_static_agent_alone_from_scratch() {
    // Never a skip: the image is part of what the project ships.
    assert!(
        buildah_installed(),
        "buildah is not installed: the image test needs it \
         (`cargo xtask setup` installs it; Debian package buildah)"
    );
    assert!(
        nix::unistd::Uid::effective().is_root(),
        "the image test needs root (buildah's storage, and chroot to run the agent \
         in the image's root filesystem)"
    );
    let started = std::time::Instant::now();
    let archive = build_image();
    eprintln!("cargo xtask image --profile dev: {:?}", started.elapsed());

    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("image-test");
    let _ = std::fs::remove_dir_all(&dir);
    let (layout, rootfs) = (dir.join("layout"), dir.join("rootfs"));
    std::fs::create_dir_all(&layout).unwrap();
    std::fs::create_dir_all(&rootfs).unwrap();
    tar(&["-x"], &archive, Some(&layout));

    // index.json → the one manifest, named as deploy/'s manifests ask for it.
    let index = json(&layout.join("index.json"));
    let manifests = index["manifests"].as_array().unwrap();
    assert_eq!(manifests.len(), 1, "{index}");
    assert_eq!(
        manifests[0]["annotations"]["org.opencontainers.image.ref.name"],
        format!("docker.io/library/mesh-agent:{VERSION}")
    );
    let manifest = json(&blob(&layout, &manifests[0]));

    // The config: entrypoint, platform and labels.
    let config = json(&blob(&layout, &manifest["config"]));
    assert_eq!(
        config["config"]["Entrypoint"],
        serde_json::json!(["/mesh-agent"])
    );
    assert!(config["config"]["Cmd"].is_null(), "{config}");
    assert_eq!(config["os"], "linux");
    let labels = &config["config"]["Labels"];
    assert_eq!(labels["org.opencontainers.image.version"], VERSION);
    assert_eq!(
        labels["org.opencontainers.image.source"],
        "https://example.invalid/mesh"
    );
    let revision = labels["org.opencontainers.image.revision"]
        .as_str()
        .unwrap();
    assert!(
        revision.len() >= 40 && revision[..40].chars().all(|c| c.is_ascii_hexdigit()),
        "revision label {revision:?}"
    );

    // One layer (FROM scratch, one COPY) holding the agent and no other file.
    let layers = manifest["layers"].as_array().unwrap();
    assert_eq!(layers.len(), 1, "{manifest}");
    let layer = blob(&layout, &layers[0]);
    let listing = tar(&["-t"], &layer, None);
    let files: Vec<&str> = listing
        .lines()
        .map(|entry| entry.trim_start_matches("./"))
        .filter(|entry| !entry.is_empty() && !entry.ends_with('/'))
        .collect();
    assert_eq!(files, ["mesh-agent"], "the layer holds:\n{listing}");
    tar(&["-x"], &layer, Some(&rootfs));

    let agent = std::fs::read(rootfs.join("mesh-agent")).unwrap();
    assert_eq!(
        elf_interpreter(&agent),
        None,
        "the agent in the image is dynamically linked: it cannot run FROM scratch"
    );
    assert_eq!(
        run_in(&rootfs, &["--version"]).trim(),
        format!("mesh-agent {VERSION}")
    );
    assert!(run_in(&rootfs, &["crds"]).contains("kind: CustomResourceDefinition"));

    // The archive is the image buildah keeps locally under the same tag.
    let local = Command::new("buildah")
        .args(["--storage-driver", "vfs", "images", "--quiet", "--no-trunc"])
        .arg(format!("mesh-agent:{VERSION}"))
        .output()
        .unwrap();
    let local = String::from_utf8(local.stdout).unwrap();
    assert_eq!(
        local.trim().trim_start_matches("sha256:"),
        manifest["config"]["digest"]
            .as_str()
            .unwrap()
            .trim_start_matches("sha256:"),
        "the local image mesh-agent:{VERSION} is not the archive's"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn elf_interpreter_of_a_dynamic_executable() {
    // The test binary itself is linked dynamically by the host toolchain.
    let me = std::fs::read(std::env::current_exe().unwrap()).unwrap();
    assert!(elf_interpreter(&me).unwrap().contains("ld-linux"));
}
