//! `cargo xtask …`: the project's tasks. Everything a fresh machine needs is
//! installed by `setup`, which `test`, `demo` and `bench` run first.
mod demo;
mod ebpf;
mod fuzz;
mod image;
mod kernels;
mod modules;
mod previous;
mod setup;

use std::process::Command;

use anyhow::{Context as _, ensure};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cargo xtask")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install the eBPF toolchain and tools the build and tests need.
    Setup,
    /// Build the kernel programs (mesh-ebpf) for bpfel-unknown-none.
    BuildEbpf,
    /// Set up, build everything, and run every test (unit and kernel) on
    /// this machine's kernel, then the kernel tests on 6.1 and 6.12 in VMs.
    Test {
        /// `host`: this machine's kernel only; `6.1` or `6.12`: that kernel
        /// only, in a VM; `vms`: both VMs (side by side); `all`: the host,
        /// then the VMs.
        #[arg(long, default_value = "all")]
        kernel: String,
        /// Extra arguments for `cargo test` on the host (e.g. a test name
        /// filter).
        #[arg(trailing_var_arg = true)]
        args: Vec<String>,
    },
    /// Two pods on one machine, the agent, traffic, and what the kernel did.
    Demo,
    /// Build the agent of the previous map layout, which the upgrade tests
    /// start from (`test` does it when needed).
    PreviousAgent,
    /// The agent's container image (FROM scratch, one static binary), built
    /// offline with buildah, and an OCI archive of it in target/image/.
    Image {
        /// Cargo profile of the agent: `release` for an image to ship,
        /// `dev` for a quicker check.
        #[arg(long, default_value = "release")]
        profile: String,
    },
    /// Write the CRDs of the mesh's documents (generated from mesh-agent's
    /// types) to deploy/crds.yaml; a test fails when they drift apart.
    GenCrds,
    /// Fuzz the parsers of untrusted input (libFuzzer): each target (all
    /// when none is named) for `--seconds`, from its committed corpus.
    Fuzz {
        /// policy_documents, identities, certificates, kubernetes_objects,
        /// hbone_connect, packets, admin_requests.
        targets: Vec<String>,
        #[arg(long, default_value_t = 60)]
        seconds: u64,
    },
    /// Write the man pages of `mesh-agent` and its commands (clap_mangen)
    /// into target/man.
    Man,
    /// Benchmarks, run against a baseline in the same run.
    Bench {
        /// Which benchmark: same-node, policy, cross-node, control-plane or
        /// services.
        which: String,
        /// Extra arguments for the benchmark (e.g. `--rounds 5`; see
        /// `target/release/mesh-bench <which> --help`).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().task {
        Task::Setup => setup::run(),
        Task::BuildEbpf => ebpf::build(),
        Task::Test { kernel, args } => test(&kernel, &args),
        Task::Demo => demo::run(),
        Task::PreviousAgent => previous::build().map(|bin| eprintln!("xtask: {}", bin.display())),
        Task::Bench { which, args } => bench(&which, &args),
        Task::Fuzz { targets, seconds } => fuzz::fuzz(fuzz::Build::Campaign, &targets, seconds),
        Task::GenCrds => gen_crds(),
        Task::Man => man_pages(),
        // The archive's path alone on stdout, for scripts.
        Task::Image { profile } => {
            image::build(&profile).map(|archive| println!("{}", archive.display()))
        }
    }
}

/// The man pages, from the agent's own command definitions: it writes them
/// (a hidden `man-pages` command), so they never drift from `--help`.
fn man_pages() -> anyhow::Result<()> {
    ebpf::build()?;
    run(cargo().args(["build", "--package", "mesh-agent", "--bin", "mesh-agent"]))?;
    let root = workspace_root();
    let out = root.join("target/man");
    run(Command::new(root.join("target/debug/mesh-agent"))
        .arg("man-pages")
        .arg("--out-dir")
        .arg(&out))?;
    eprintln!("xtask: man pages in {}", out.display());
    Ok(())
}

/// Runs a command with inherited output, failing on a non-zero exit.
pub fn run(cmd: &mut Command) -> anyhow::Result<()> {
    eprintln!("xtask: running {cmd:?}");
    let status = cmd.status().with_context(|| format!("starting {cmd:?}"))?;
    ensure!(status.success(), "{cmd:?} failed with {status}");
    Ok(())
}

/// Cargo, without the variables `cargo run` gave xtask itself.
pub fn cargo() -> Command {
    cargo_tool(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
}

/// `program` (cargo or one of its subcommands), without the variables
/// `cargo run` gave xtask itself: some build scripts (ring's) watch them,
/// and seeing xtask's values instead of their own would rebuild them, and
/// everything above them, on every task.
pub fn cargo_tool(program: impl AsRef<std::ffi::OsStr>) -> Command {
    let mut cmd = Command::new(program);
    for (name, _) in std::env::vars_os() {
        let name = name.to_string_lossy();
        if name.starts_with("CARGO_PKG_")
            || matches!(
                &*name,
                "CARGO_MANIFEST_DIR"
                    | "CARGO_MANIFEST_PATH"
                    | "CARGO_CRATE_NAME"
                    | "CARGO_BIN_NAME"
                    | "CARGO_PRIMARY_PACKAGE"
            )
        {
            cmd.env_remove(&*name);
        }
    }
    cmd
}

/// Everything the tests and the demo run: the agent and the pod tools.
fn build_binaries(release: bool) -> anyhow::Result<()> {
    setup::ensure_installed()?;
    ebpf::build()?;
    let mut cmd = cargo();
    cmd.args([
        "build",
        "--package",
        "mesh-agent",
        "--package",
        "mesh-tests",
        "--bins",
    ]);
    if release {
        cmd.arg("--release");
    }
    run(&mut cmd)
}

fn test(kernel: &str, args: &[String]) -> anyhow::Result<()> {
    let (host, in_vms) = kernels::select(kernel)?;
    let mut steps = Steps::default();
    let result = (|| {
        steps.time("build", || build_binaries(false))?;
        if host {
            test_on_host(&mut steps, args)?;
        }
        if !in_vms.is_empty() {
            let binaries = steps.time("build the VMs' tests", kernels::test_binaries)?;
            steps.time("kernels in VMs", || test_in_vms(&in_vms, &binaries))?;
        }
        anyhow::Ok(())
    })();
    steps.report();
    result
}

/// The kernel tests in a VM of each kernel. The VMs run side by side, one
/// vCPU each: a VM of two vCPUs under TCG keeps only about one of this
/// machine's two cores busy (its tests run one at a time), so the pair
/// takes 10 min where one after the other took 13.
fn test_in_vms(
    in_vms: &[&kernels::Kernel],
    binaries: &[(String, std::path::PathBuf)],
) -> anyhow::Result<()> {
    let results: Vec<_> = std::thread::scope(|scope| {
        let runs: Vec<_> = in_vms
            .iter()
            .map(|kernel| scope.spawn(|| kernels::run(kernel, binaries)))
            .collect();
        runs.into_iter()
            .map(|run| run.join().expect("a VM's thread panicked"))
            .collect()
    });
    let mut failures = Vec::new();
    for (kernel, result) in in_vms.iter().zip(results) {
        match result {
            Ok((passed, _)) => println!(
                "xtask test: kernel {}: {passed} passed, 0 failed",
                kernel.name
            ),
            Err(error) => failures.push(format!("kernel {}: {error:#}", kernel.name)),
        }
    }
    ensure!(failures.is_empty(), "{}", failures.join("\n"));
    Ok(())
}

/// Every test, unit and kernel, on this machine's kernel; the style checks
/// and a short run of each fuzz target.
fn test_on_host(steps: &mut Steps, args: &[String]) -> anyhow::Result<()> {
    // The upgrade tests start from the agent of the previous map layout.
    let previous_agent = steps.time("build the previous agent", previous::build)?;
    steps.time("style and lints", check_style)?;
    steps.time("tests on this kernel", || {
        run_tests_on_host(args, &previous_agent)
    })?;
    // A short run of every fuzz target: its corpus still passes, and a few
    // seconds of new inputs find no crash.
    steps.time("fuzz", || {
        fuzz::fuzz(fuzz::Build::Smoke, &[], FUZZ_SECONDS_IN_TEST)
    })?;
    println!(
        "xtask test: {} fuzz targets ran {FUZZ_SECONDS_IN_TEST} s each without a crash",
        fuzz::TARGETS.len()
    );
    Ok(())
}

fn run_tests_on_host(args: &[String], previous_agent: &std::path::Path) -> anyhow::Result<()> {
    let mut cmd = cargo();
    cmd.args(["test", "--workspace"])
        .args(args)
        .env("MESH_PREVIOUS_AGENT_BIN", previous_agent);
    eprintln!("xtask: running {cmd:?}");
    let mut child = cmd.stdout(std::process::Stdio::piped()).spawn()?;
    let stdout = child.stdout.take().context("cargo test stdout")?;
    let (mut passed, mut failed) = (0u64, 0u64);
    for line in std::io::BufRead::lines(std::io::BufReader::new(stdout)) {
        let line = line?;
        println!("{line}");
        if let Some((p, f)) = parse_test_result(&line) {
            passed += p;
            failed += f;
        }
    }
    let status = child.wait()?;
    // One closing line for the whole run: cargo's last line is the doc-tests
    // of the last crate, which would otherwise read as "0 passed".
    println!("xtask test: {passed} passed, {failed} failed");
    ensure!(status.success(), "cargo test failed with {status}");
    ensure!(passed > 0, "no test ran");
    Ok(())
}

/// The wall-clock time of each step of `test`, printed at its end: a CI run
/// has a time budget (docs/development.md), and this says where it went.
#[derive(Default)]
struct Steps(Vec<(&'static str, std::time::Duration)>);

impl Steps {
    fn time<T>(
        &mut self,
        name: &'static str,
        step: impl FnOnce() -> anyhow::Result<T>,
    ) -> anyhow::Result<T> {
        let started = std::time::Instant::now();
        let result = step();
        self.0.push((name, started.elapsed()));
        result
    }

    fn report(&self) {
        let total: std::time::Duration = self.0.iter().map(|(_, took)| *took).sum();
        let steps: Vec<String> = self
            .0
            .iter()
            .map(|(name, took)| format!("{name} {}", minutes(*took)))
            .collect();
        println!("xtask test: took {} ({})", minutes(total), steps.join(", "));
    }
}

/// `754 s` → `12m34s`.
fn minutes(took: std::time::Duration) -> String {
    let secs = took.as_secs();
    format!("{}m{:02}s", secs / 60, secs % 60)
}

/// How long `test` runs each fuzz target.
const FUZZ_SECONDS_IN_TEST: u64 = 15;

/// No circle among each crate's modules; formatting and lints of every
/// crate, the kernel crate included (it has a workspace of its own, built by
/// another rustc), warnings denied.
fn check_style() -> anyhow::Result<()> {
    modules::check(&workspace_root())?;
    run(cargo().args(["fmt", "--all", "--check"]))?;
    for own_workspace in ["mesh-ebpf", "fuzz"] {
        let manifest = workspace_root().join(own_workspace).join("Cargo.toml");
        run(cargo()
            .args(["fmt", "--check", "--manifest-path"])
            .arg(&manifest))?;
    }
    run(cargo().args([
        "clippy",
        "--workspace",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]))?;
    ebpf::clippy()
}

fn gen_crds() -> anyhow::Result<()> {
    let output = cargo()
        .args(["run", "--quiet", "--package", "mesh-agent", "--", "crds"])
        .stderr(std::process::Stdio::inherit())
        .output()
        .context("running mesh-agent crds")?;
    ensure!(
        output.status.success(),
        "mesh-agent crds failed with {}",
        output.status
    );
    let path = workspace_root().join("deploy/crds.yaml");
    std::fs::write(&path, &output.stdout).with_context(|| format!("writing {}", path.display()))?;
    eprintln!("xtask: wrote {}", path.display());
    Ok(())
}

/// `test result: ok. 9 passed; 0 failed; …` → (9, 0).
pub fn parse_test_result(line: &str) -> Option<(u64, u64)> {
    let rest = line.strip_prefix("test result: ")?;
    let count = |word: &str| {
        rest.split(';').find_map(|part| {
            part.trim()
                .strip_suffix(word)?
                .trim()
                .rsplit(' ')
                .next()?
                .parse()
                .ok()
        })
    };
    Some((count("passed")?, count("failed")?))
}

/// The benchmarks `bench` knows (subcommands of `mesh-bench`).
const BENCHMARKS: &[&str] = &[
    "same-node",
    "policy",
    "cross-node",
    "control-plane",
    "services",
    "soak",
];

fn bench(which: &str, args: &[String]) -> anyhow::Result<()> {
    ensure!(
        BENCHMARKS.contains(&which),
        "unknown benchmark `{which}` (known: {})",
        BENCHMARKS.join(", ")
    );
    build_binaries(true)?;
    let root = workspace_root();
    run(Command::new(root.join("target/release/mesh-bench"))
        .arg(which)
        .arg("--out")
        .arg(root.join("target/bench"))
        .args(args))
}

pub fn workspace_root() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_path_buf()
}

#[cfg(test)]
mod tests {
    #[test]
    fn step_times_read_in_minutes() {
        let took = |secs| super::minutes(std::time::Duration::from_secs(secs));
        assert_eq!(took(754), "12m34s");
        assert_eq!(took(59), "0m59s");
        assert_eq!(took(3600), "60m00s");
    }

    #[test]
    fn parses_cargo_test_summaries() {
        let line = "test result: ok. 11 passed; 2 failed; 0 ignored; 0 measured; 0 filtered out; finished in 16.53s";
        assert_eq!(super::parse_test_result(line), Some((11, 2)));
        assert_eq!(super::parse_test_result("running 3 tests"), None);
    }
}
