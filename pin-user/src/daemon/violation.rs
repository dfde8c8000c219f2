//! Isolation violations the daemon reports: their kinds (one enum, whose
//! strings are the `kind` label and the JSON of `/violations`), the record
//! and the bounded list of recent ones.
use std::{
    collections::VecDeque,
    fmt,
    sync::{Arc, Mutex},
};

/// How many violations the recent list keeps.
pub const RECENT_VIOLATIONS: usize = 256;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ViolationKind {
    /// A thread that is not the CPU's owner, a per-CPU kernel thread or
    /// allowlisted ran on a guarded CPU.
    Intruder,
    /// A thread was migrated onto a guarded CPU.
    MigrationIn,
    /// A vCPU is not (or no longer) on its assigned CPU.
    VcpuDrift,
    /// Someone changed a vCPU thread's affinity.
    AffinityChanged,
    /// The plan makes vCPUs share a guarded CPU.
    SharedCpu,
}

impl ViolationKind {
    pub const ALL: [Self; 5] = [
        Self::Intruder,
        Self::MigrationIn,
        Self::VcpuDrift,
        Self::AffinityChanged,
        Self::SharedCpu,
    ];

    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Intruder => "intruder",
            Self::MigrationIn => "migration_in",
            Self::VcpuDrift => "vcpu_drift",
            Self::AffinityChanged => "affinity_changed",
            Self::SharedCpu => "shared_cpu",
        }
    }
}

impl fmt::Display for ViolationKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One violation, as logged and listed on `/violations`.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Violation {
    /// Seconds since the Unix epoch.
    pub time: f64,
    pub kind: ViolationKind,
    pub cpu: u32,
    /// 0 when no thread is concerned (`shared_cpu`).
    pub tid: u32,
    pub tgid: u32,
    pub comm: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub vm: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub vcpu: Option<u32>,
    pub detail: String,
}

impl Violation {
    pub fn new(
        kind: ViolationKind,
        cpu: u32,
        tid: u32,
        tgid: u32,
        comm: &str,
        detail: String,
    ) -> Self {
        Self {
            time: now_epoch(),
            kind,
            cpu,
            tid,
            tgid,
            comm: comm.to_string(),
            vm: None,
            vcpu: None,
            detail,
        }
    }

    /// Names the guest and vCPU concerned.
    pub fn of_vcpu(mut self, vm: &str, vcpu: u32) -> Self {
        self.vm = Some(vm.to_string());
        self.vcpu = Some(vcpu);
        self
    }
}

impl fmt::Display for Violation {
    /// The log line: what, where, who (escaped: a thread names itself), why.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "violation {} on CPU {}: ", self.kind, self.cpu)?;
        if self.tid != 0 {
            write!(f, "tid {} pid {} {:?}", self.tid, self.tgid, self.comm)?;
        }
        if let (Some(vm), Some(i)) = (&self.vm, self.vcpu) {
            write!(f, " (vm {vm:?} vcpu {i})")?;
        }
        if self.tid != 0 || self.vm.is_some() {
            f.write_str(": ")?;
        }
        f.write_str(&self.detail)
    }
}

fn now_epoch() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// The most recent violations, shared with the HTTP server.
#[derive(Debug, Clone, Default)]
pub struct Recent(Arc<Mutex<VecDeque<Violation>>>);

impl Recent {
    pub fn push(&self, v: Violation) {
        let mut list = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if list.len() == RECENT_VIOLATIONS {
            list.pop_front();
        }
        list.push_back(v);
    }

    pub fn to_vec(&self) -> Vec<Violation> {
        let list = self.0.lock().unwrap_or_else(|e| e.into_inner());
        list.iter().cloned().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_print_as_their_label() {
        for k in ViolationKind::ALL {
            assert_eq!(serde_json::to_value(k).unwrap(), k.as_str());
        }
    }

    #[test]
    fn recent_list_is_bounded() {
        let r = Recent::default();
        for tid in 0..(RECENT_VIOLATIONS as u32 + 10) {
            r.push(Violation::new(
                ViolationKind::Intruder,
                1,
                tid,
                tid,
                "x",
                String::new(),
            ));
        }
        let v = r.to_vec();
        assert_eq!(v.len(), RECENT_VIOLATIONS);
        assert_eq!(v[0].tid, 10, "oldest dropped first");
    }

    #[test]
    fn log_line_names_the_vcpu_and_escapes_the_thread_name() {
        let v = Violation::new(
            ViolationKind::VcpuDrift,
            1,
            7,
            5,
            "evil\nname",
            "affinity is 0-1, assigned 1".into(),
        )
        .of_vcpu("web", 0);
        assert_eq!(
            v.to_string(),
            "violation vcpu_drift on CPU 1: tid 7 pid 5 \"evil\\nname\" (vm \"web\" vcpu 0): affinity is 0-1, assigned 1"
        );
        let shared = Violation::new(ViolationKind::SharedCpu, 1, 0, 0, "", "vCPUs share".into());
        assert_eq!(
            shared.to_string(),
            "violation shared_cpu on CPU 1: vCPUs share"
        );
    }
}
