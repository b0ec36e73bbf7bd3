//! What the running kernel offers the mesh, probed once at start: the
//! agent refuses to start without what it cannot do without (naming the
//! feature and the kernel that has it), falls back where there is another
//! way (one log line, and a row of `mesh-agent status`), and says which.
//! docs/kernels.md has the table of kernels and what the tests showed.
//!
//! Probes ask the kernel itself (load a two-instruction program, create a
//! map, query a hook) rather than trusting its version number, so that
//! backports are recognised; the version floor is there because only the
//! kernels from it on are tested.
use aya::{
    maps::MapType,
    programs::ProgramType,
    sys::{BpfHelper, is_helper_supported, is_map_supported, is_program_supported},
};
use serde::{Deserialize, Serialize};

/// The oldest kernel the mesh supports: the oldest long-term kernel that
/// has every feature it needs (`bpf_set_retval` came in 5.18), and the
/// oldest the kernel tests run on (docs/kernels.md).
pub const MINIMUM_KERNEL: (u32, u32) = (6, 1);

/// Whether the mesh can do without a feature.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Need {
    /// The agent refuses to start without it.
    Required,
    /// Without it the mesh does something else, said in `without`.
    Optional,
}

/// One probed feature.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Feature {
    /// Short name, as in `status` and `/metrics`.
    pub name: String,
    pub present: bool,
    pub need: Need,
    /// The first Linux version that has it.
    pub since: String,
    /// What the mesh does with it, and without it.
    pub with: String,
    pub without: String,
}

/// What the kernel offers: its release and each feature.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KernelFeatures {
    pub release: String,
    /// The boot these were found in (`/proc/sys/kernel/random/boot_id`):
    /// the kernel cannot change without a reboot, so a restarted agent
    /// reuses the self-test's results of the same boot.
    #[serde(default)]
    pub boot_id: String,
    pub features: Vec<Feature>,
    /// What the start-up self-test found in the redirect path
    /// (`self_test`); `None` until it has run.
    #[serde(default)]
    pub short_circuit_defects: Option<Vec<crate::self_test::Defect>>,
}

impl KernelFeatures {
    /// Probes the running kernel (needs CAP_BPF, as loading does).
    pub fn probe() -> Self {
        let release = nix::sys::utsname::uname()
            .map(|u| u.release().to_string_lossy().into_owned())
            .unwrap_or_default();
        fn yes<E>(probe: Result<bool, E>) -> bool {
            probe.unwrap_or(false)
        }
        let lsm_active = crate::splice_guard::bpf_lsm_active();
        let feature = |name: &str, present, need, since: &str, with: &str, without: &str| Feature {
            name: name.into(),
            present,
            need,
            since: since.into(),
            with: with.into(),
            without: without.into(),
        };
        let features = vec![
            feature(
                "sockmap",
                yes(is_map_supported(MapType::SockHash))
                    && yes(is_program_supported(ProgramType::SkMsg))
                    && yes(is_program_supported(ProgramType::SockOps)),
                Need::Required,
                "4.18",
                "sockops sees every socket; sk_msg short-circuits same-node payload",
                "",
            ),
            feature(
                "cgroup_sock_addr",
                yes(is_program_supported(ProgramType::CgroupSockAddr)),
                Need::Required,
                "4.17",
                "connect-time policy (EPERM before any packet)",
                "",
            ),
            feature(
                "set_retval",
                yes(is_helper_supported(
                    ProgramType::CgroupSockAddr,
                    BpfHelper::BPF_FUNC_set_retval,
                )),
                Need::Required,
                "5.18",
                "a connect to an unknown Service address fails with ECONNREFUSED",
                "",
            ),
            feature(
                "ring_buffer",
                yes(is_map_supported(MapType::RingBuf)),
                Need::Required,
                "5.8",
                "flow events to the agent",
                "",
            ),
            feature(
                "tcx",
                crate::sys::tcx_supported().unwrap_or(false),
                Need::Optional,
                "6.6",
                "tc programs as pinned TCX links, first in the chain",
                "tc programs as clsact filters at priority 1, replaced in place on restart",
            ),
            feature(
                "btf",
                std::path::Path::new("/sys/kernel/btf/vmlinux").exists(),
                Need::Optional,
                "5.4",
                "the programs attached by kernel type: the splice guard, and the read \
                 counter of the short-circuit's back-pressure",
                "no splice guard, and no bound on what a short-circuited receiver leaves unread",
            ),
            feature(
                "bpf_lsm",
                lsm_active
                    && yes(is_program_supported(ProgramType::Lsm(
                        aya::programs::LsmAttachType::Mac,
                    ))),
                Need::Optional,
                "5.7 (and `bpf` in the lsm= boot parameter)",
                "the splice guard: splice(2) from a short-circuited socket fails with \
                 EINVAL, and callers read instead (docs/short-circuit.md)",
                "workloads that read with splice(2) must not opt in to the short-circuit",
            ),
            feature(
                "ktls",
                ktls_available(&release),
                Need::Optional,
                "4.13 (CONFIG_TLS)",
                "bulk tunnels (`--bulk-ports`): TLS records encrypted by the kernel, bytes \
                 moved by splice(2)",
                "bulk tunnels encrypt their records in user space (rustls)",
            ),
        ];
        Self {
            release,
            boot_id: std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
                .map(|id| id.trim().to_owned())
                .unwrap_or_default(),
            features,
            short_circuit_defects: None,
        }
    }

    /// The self-test's results an earlier agent found in this same boot, if
    /// `state_dir` has them: a restart need not spend the CPU again (a
    /// second or two under load, while tunnels resume).
    pub fn defects_of_this_boot(
        &self,
        state_dir: &std::path::Path,
    ) -> Option<Vec<crate::self_test::Defect>> {
        let earlier = Self::read(state_dir).ok()?;
        let same_boot = !self.boot_id.is_empty()
            && earlier.boot_id == self.boot_id
            && earlier.release == self.release;
        same_boot.then_some(earlier.short_circuit_defects).flatten()
    }

    /// `(major, minor)` of the release, if it reads as one.
    pub fn version(&self) -> Option<(u32, u32)> {
        parse_version(&self.release)
    }

    pub fn has(&self, name: &str) -> bool {
        self.features.iter().any(|f| f.name == name && f.present)
    }

    /// Why the mesh cannot run here, if it cannot: a kernel below
    /// [`MINIMUM_KERNEL`], or a required feature missing (compiled out,
    /// say).
    pub fn refusal(&self) -> Option<String> {
        if let Some(version) = self.version()
            && version < MINIMUM_KERNEL
        {
            return Some(format!(
                "Linux {}.{} or later is required; this kernel is {} (supported kernels: \
                 docs/kernels.md)",
                MINIMUM_KERNEL.0, MINIMUM_KERNEL.1, self.release
            ));
        }
        let missing: Vec<String> = self
            .features
            .iter()
            .filter(|f| f.need == Need::Required && !f.present)
            .map(|f| format!("{} (Linux {}+: {})", f.name, f.since, f.with))
            .collect();
        (!missing.is_empty()).then(|| {
            format!(
                "this kernel ({}) lacks what the mesh needs: {}",
                self.release,
                missing.join("; ")
            )
        })
    }
}

/// What the mesh has attached against the redirect path's defects.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DefectAnswers {
    /// The splice guard is attached (`splice_guard`).
    pub splice_guard: bool,
    /// Reads are counted (`inbox`), and this is the bound on a receiver's
    /// unread redirected bytes.
    pub backlog_bound: Option<u32>,
}

impl DefectAnswers {
    /// What is attached under the pin directory `pins`.
    pub fn attached(pins: &std::path::Path) -> Self {
        let backlog_bound = crate::inbox::attached(pins)
            .then(|| {
                crate::maps::PinnedMaps::open(pins)
                    .ok()?
                    .redirect_backlog_bytes()
                    .ok()
            })
            .flatten()
            .filter(|bound| *bound != 0);
        Self {
            splice_guard: crate::splice_guard::attached(pins),
            backlog_bound,
        }
    }
}

impl KernelFeatures {
    /// Where the agent leaves what it found, for `status` and `/metrics`.
    pub fn path(state_dir: &std::path::Path) -> std::path::PathBuf {
        state_dir.join("kernel.json")
    }

    pub fn write(&self, state_dir: &std::path::Path) -> std::io::Result<()> {
        let tmp = state_dir.join(".kernel.json.tmp");
        std::fs::write(&tmp, serde_json::to_vec_pretty(self)?)?;
        std::fs::rename(tmp, Self::path(state_dir))
    }

    pub fn read(state_dir: &std::path::Path) -> std::io::Result<Self> {
        Ok(serde_json::from_slice(&std::fs::read(Self::path(
            state_dir,
        ))?)?)
    }

    /// One line: what the self-test found, or that it has not run, and
    /// what the mesh does about it where it can.
    pub fn defects_summary(&self, answers: &DefectAnswers) -> String {
        let Some(defects) = &self.short_circuit_defects else {
            return "self-test not run yet".into();
        };
        let present: Vec<&str> = defects
            .iter()
            .filter(|d| d.present == Some(true))
            .map(|d| d.name.as_str())
            .collect();
        let unknown: Vec<&str> = defects
            .iter()
            .filter(|d| d.present.is_none())
            .map(|d| d.name.as_str())
            .collect();
        let mut line = if present.is_empty() {
            "the redirect path has none of the known defects".to_string()
        } else {
            format!(
                "the redirect path has {}: opt in only workloads with event-loop I/O",
                present.join(", ")
            )
        };
        if answers.splice_guard && present.contains(&"splice_misses_redirected_bytes") {
            line.push_str(
                "; splice(2) from short-circuited sockets fails with EINVAL (splice guard)",
            );
        }
        if let Some(bound) = answers.backlog_bound
            && present.contains(&"no_receiver_backpressure")
        {
            line.push_str(&format!(
                "; past {} KiB unread a connection takes the stack (back-pressure)",
                bound / 1024
            ));
        }
        if !unknown.is_empty() {
            line.push_str(&format!(" (could not tell: {})", unknown.join(", ")));
        }
        line
    }

    /// One line: the release, and each optional feature missing with what
    /// the mesh does instead.
    pub fn summary(&self) -> String {
        let fallbacks: Vec<String> = self
            .features
            .iter()
            .filter(|f| f.need == Need::Optional && !f.present)
            .map(|f| format!("no {} (Linux {}+): {}", f.name, f.since, f.without))
            .collect();
        if fallbacks.is_empty() {
            format!("Linux {}: every feature the mesh uses", self.release)
        } else {
            format!("Linux {}: {}", self.release, fallbacks.join("; "))
        }
    }
}

/// `6.1.0-50-amd64` → (6, 1).
pub fn parse_version(release: &str) -> Option<(u32, u32)> {
    let mut parts = release.split(['.', '-', '+']);
    let major = parts.next()?.parse().ok()?;
    let minor = parts.next()?.parse().ok()?;
    Some((major, minor))
}

/// Whether the kernel has TLS as a TCP upper-layer protocol: loaded
/// already, or a module the kernel can load on first use (a stat, not a
/// read of modules.dep: cheap even over a VM's 9p root).
fn ktls_available(release: &str) -> bool {
    let loaded = std::fs::read_to_string("/proc/sys/net/ipv4/tcp_available_ulp")
        .is_ok_and(|ulps| ulps.split_whitespace().any(|u| u == "tls"));
    let module = ["", ".xz", ".zst", ".gz"].iter().any(|compressed| {
        std::path::Path::new(&format!(
            "/lib/modules/{release}/kernel/net/tls/tls.ko{compressed}"
        ))
        .exists()
    });
    loaded || module
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kernel(release: &str, missing: &[&str]) -> KernelFeatures {
        let mut k = KernelFeatures::probe();
        k.release = release.into();
        for f in &mut k.features {
            f.present = !missing.contains(&f.name.as_str());
        }
        k
    }

    #[test]
    fn versions_read_from_every_distribution_style() {
        assert_eq!(parse_version("6.1.0-50-amd64"), Some((6, 1)));
        assert_eq!(parse_version("6.18.3+deb13-amd64"), Some((6, 18)));
        assert_eq!(parse_version("5.14.0-427.el9.x86_64"), Some((5, 14)));
        assert_eq!(parse_version("6.8.0-45-generic"), Some((6, 8)));
        assert_eq!(parse_version("nonsense"), None);
    }

    #[test]
    fn below_the_floor_or_without_a_required_feature_the_agent_refuses() {
        assert_eq!(kernel("6.1.0-50-amd64", &[]).refusal(), None);
        // Optional features missing: no refusal.
        assert_eq!(kernel("6.1.0", &["tcx", "bpf_lsm", "ktls"]).refusal(), None);
        let old = kernel("5.15.0-91-generic", &[]).refusal().unwrap();
        assert!(
            old.contains("Linux 6.1 or later") && old.contains("5.15.0-91"),
            "{old}"
        );
        let gutted = kernel("6.12.0", &["ring_buffer"]).refusal().unwrap();
        assert!(gutted.contains("ring_buffer (Linux 5.8+"), "{gutted}");
    }

    #[test]
    fn this_kernel_has_what_the_mesh_requires() {
        // The tests run as root on a supported kernel.
        let here = KernelFeatures::probe();
        if std::env::var_os("CI").is_some() || nix::unistd::Uid::effective().is_root() {
            assert_eq!(here.refusal(), None, "{here:?}");
        }
        assert_eq!(
            here.has("tcx"),
            crate::sys::tcx_supported().unwrap_or(false)
        );
    }

    #[test]
    fn the_self_tests_results_are_reused_within_one_boot_only() {
        let dir = std::env::temp_dir().join(format!("mesh-kernel-json-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let defects = vec![crate::self_test::Defect {
            name: "splice_misses_redirected_bytes".into(),
            present: Some(true),
            detail: "0 of 4096".into(),
        }];
        let mut earlier = kernel("6.1.0-50-amd64", &[]);
        earlier.boot_id = "boot-a".into();
        // Not run yet: nothing to reuse.
        earlier.write(&dir).unwrap();
        assert_eq!(earlier.defects_of_this_boot(&dir), None);
        earlier.short_circuit_defects = Some(defects.clone());
        earlier.write(&dir).unwrap();

        let mut now = kernel("6.1.0-50-amd64", &[]);
        now.boot_id = "boot-a".into();
        assert_eq!(now.defects_of_this_boot(&dir), Some(defects));
        now.boot_id = "boot-b".into();
        assert_eq!(now.defects_of_this_boot(&dir), None, "another boot");
        now.boot_id = String::new();
        assert_eq!(
            now.defects_of_this_boot(&dir),
            None,
            "no boot id to compare"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn the_summary_says_what_the_mesh_does_about_each_defect() {
        let mut k = kernel("6.12.117", &[]);
        let defect = |name: &str| crate::self_test::Defect {
            name: name.into(),
            present: Some(true),
            detail: String::new(),
        };
        k.short_circuit_defects = Some(vec![
            defect("splice_misses_redirected_bytes"),
            defect("no_receiver_backpressure"),
        ]);
        let bare = "the redirect path has splice_misses_redirected_bytes, \
                    no_receiver_backpressure: opt in only workloads with event-loop I/O";
        assert_eq!(k.defects_summary(&DefectAnswers::default()), bare);
        let answered = DefectAnswers {
            splice_guard: true,
            backlog_bound: Some(6 << 20),
        };
        assert_eq!(
            k.defects_summary(&answered),
            format!(
                "{bare}; splice(2) from short-circuited sockets fails with EINVAL (splice \
                 guard); past 6144 KiB unread a connection takes the stack (back-pressure)"
            )
        );
    }
}
