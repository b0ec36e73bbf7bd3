//! `cargo xtask fuzz`: the fuzz targets of `fuzz/` (libFuzzer, through the
//! `libfuzzer-sys` crate), built with the fuzzer's coverage instrumentation
//! on this stable toolchain: the same flags `cargo fuzz build -s none`
//! passes, none of them unstable, so neither cargo-fuzz nor a nightly
//! compiler is needed. Each target starts from its committed corpus
//! (`fuzz/corpus/<target>`, read only); what it finds new goes to
//! `target/fuzz/corpus/<target>`, crashes to `target/fuzz/artifacts/`.
use std::path::PathBuf;

use anyhow::{Context as _, ensure};

use crate::{cargo, run, workspace_root};

/// The targets, as `fuzz/Cargo.toml` names its binaries.
pub const TARGETS: &[&str] = &[
    "policy_documents",
    "identities",
    "certificates",
    "kubernetes_objects",
    "hbone_connect",
    "packets",
    "admin_requests",
];

const RUSTFLAGS: &[&str] = &[
    "-Cpasses=sancov-module",
    "-Cllvm-args=-sanitizer-coverage-level=4",
    "-Cllvm-args=-sanitizer-coverage-inline-8bit-counters",
    "-Cllvm-args=-sanitizer-coverage-pc-table",
    "-Cllvm-args=-sanitizer-coverage-trace-compares",
    "--cfg=fuzzing",
    "-Cdebug-assertions",
    "-Coverflow-checks",
];

fn target_triple() -> String {
    format!("{}-unknown-linux-gnu", std::env::consts::ARCH)
}

/// How the targets are built.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Build {
    /// `cargo xtask fuzz`: the release profile, the most inputs a second.
    Campaign,
    /// The few seconds per target of `cargo xtask test`: at opt-level 1
    /// the build takes 6 min instead of 8 on two cores, and runs about
    /// 0.6x as many inputs a second, which a check of seconds can spare.
    Smoke,
}

impl Build {
    fn target_dir(self) -> PathBuf {
        workspace_root().join(match self {
            Self::Campaign => "target/fuzz",
            Self::Smoke => "target/fuzz-smoke",
        })
    }

    fn bin(self, target: &str) -> PathBuf {
        self.target_dir()
            .join(target_triple())
            .join("release")
            .join(target)
    }
}

/// Builds every target, instrumented.
pub fn build(how: Build) -> anyhow::Result<()> {
    let root = workspace_root();
    let mut cmd = cargo();
    // `--target` keeps the flags off build scripts and proc-macros.
    cmd.args(["build", "--release", "--bins", "--manifest-path"])
        .arg(root.join("fuzz/Cargo.toml"))
        .arg("--target-dir")
        .arg(how.target_dir())
        .args(["--target", &target_triple()])
        .env("RUSTFLAGS", RUSTFLAGS.join(" "));
    if how == Build::Smoke {
        cmd.args(["--config", "profile.release.opt-level=1"]);
    }
    run(&mut cmd)
}

/// Runs `target` for `seconds`; fails on a crash, with the input that
/// made it.
fn run_target(how: Build, target: &str, seconds: u64) -> anyhow::Result<()> {
    ensure!(
        TARGETS.contains(&target),
        "no fuzz target {target:?}; the targets: {}",
        TARGETS.join(", ")
    );
    let root = workspace_root();
    let bin = how.bin(target);
    let found: PathBuf = root.join("target/fuzz/corpus").join(target);
    let artifacts = root.join("target/fuzz/artifacts").join(target);
    for dir in [&found, &artifacts] {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let committed = root.join("fuzz/corpus").join(target);
    run(std::process::Command::new(&bin)
        .arg(format!("-max_total_time={seconds}"))
        .arg("-rss_limit_mb=2048")
        .arg("-timeout=10")
        .arg(format!("-artifact_prefix={}/", artifacts.display()))
        .arg(&found)
        .arg(&committed))
    .with_context(|| {
        format!(
            "fuzz target {target} failed; the input is in {}",
            artifacts.display()
        )
    })
}

/// `cargo xtask fuzz [TARGET…] --seconds N`: every target when none is named.
pub fn fuzz(how: Build, targets: &[String], seconds: u64) -> anyhow::Result<()> {
    build(how)?;
    let all: Vec<String> = TARGETS.iter().map(|t| t.to_string()).collect();
    let chosen = if targets.is_empty() { &all } else { targets };
    for target in chosen {
        run_target(how, target, seconds)?;
    }
    Ok(())
}
