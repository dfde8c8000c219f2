//! The cpuset cgroup that confines a thread, and who manages it.
//!
//! A cgroup cpuset bounds every `sched_setaffinity` of the threads inside
//! it: the kernel refuses (EINVAL) a mask with no CPU of the cpuset, and
//! narrows one with some. libvirt, systemd (`AllowedCPUs=`), kubelet's CPU
//! manager and container runtimes all write cpusets, and each puts back
//! what another tool changed in its cgroups. So when the kernel refuses a
//! placement, the useful answer names the cgroup, its CPUs and its manager,
//! with that manager's way to change it.
//!
//! cgroup v1 (`N:cpuset:/path` in `/proc/TID/cgroup`, the `cpuset`
//! hierarchy's mount) and v2 (`0::/path`, the unified mount, when the
//! cpuset controller is enabled there) are both read; mount points come
//! from `/proc/self/mountinfo`.
use std::{
    fmt, fs,
    path::{Path, PathBuf},
};

use crate::host::cpulist::CpuSet;

/// Who writes a cgroup's cpuset, from the conventions of its path.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case", tag = "kind", content = "name")]
pub enum CgroupOwner {
    /// libvirt's `machine` partition (`/machine/qemu-N-NAME.libvirt-qemu/...`
    /// without systemd, `/machine.slice/machine-qemu\x2d...scope/libvirt/...` with it).
    Libvirt,
    /// kubelet (`kubepods`): its CPU manager writes the containers' cpusets.
    Kubelet,
    /// A container runtime outside Kubernetes (docker, podman, containerd, CRI-O).
    Container(String),
    /// A systemd unit (`.service`, `.scope`, `.slice`): `AllowedCPUs=`.
    Systemd(String),
    /// Nobody pinguard knows of.
    Unknown,
}

impl CgroupOwner {
    /// Recognises the manager from a cgroup path as `/proc/TID/cgroup` shows it.
    pub fn of_path(path: &str) -> Self {
        let segments: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
        let any = |f: &dyn Fn(&str) -> bool| segments.iter().any(|s| f(s));
        if any(&|s| s.ends_with(".libvirt-qemu") || s.starts_with("machine-qemu") || s == "libvirt")
        {
            return Self::Libvirt;
        }
        if any(&|s| s.starts_with("kubepods")) {
            return Self::Kubelet;
        }
        for (prefix, runtime) in [
            ("docker", "docker"),
            ("libpod", "podman"),
            ("cri-containerd", "containerd"),
            ("crio", "cri-o"),
        ] {
            if any(&|s| s == prefix || s.starts_with(&format!("{prefix}-"))) {
                return Self::Container(runtime.to_string());
            }
        }
        match segments.last() {
            Some(unit)
                if unit.ends_with(".service")
                    || unit.ends_with(".scope")
                    || unit.ends_with(".slice") =>
            {
                Self::Systemd(unit.to_string())
            }
            _ => Self::Unknown,
        }
    }
}

impl fmt::Display for CgroupOwner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Libvirt => f.write_str("libvirt"),
            Self::Kubelet => f.write_str("kubelet"),
            Self::Container(rt) => write!(f, "{rt}"),
            Self::Systemd(unit) => write!(f, "systemd ({unit})"),
            Self::Unknown => f.write_str("no known manager"),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum Version {
    V1,
    V2,
}

/// The cpuset cgroup a thread is in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cpuset {
    pub version: Version,
    /// As in `/proc/TID/cgroup` (relative to the hierarchy's root).
    pub path: String,
    /// The cgroup's directory.
    pub dir: PathBuf,
    /// The CPUs it lets its threads use (`effective_cpus` / `cpuset.cpus.effective`).
    pub cpus: CpuSet,
    pub owner: CgroupOwner,
}

impl Cpuset {
    /// How to let this cgroup's threads onto `cpus`, in the manager's terms.
    pub fn fix(&self, cpus: &CpuSet) -> String {
        let wanted = self.cpus.union(cpus);
        match &self.owner {
            CgroupOwner::Libvirt => "libvirt owns this cpuset: place the thread through libvirt \
                 (virsh vcpupin / emulatorpin / iothreadpin), as pinguard does for the domains \
                 it finds in /run/libvirt/qemu; a write to the cgroup would be undone by libvirt"
                .to_string(),
            CgroupOwner::Kubelet => format!(
                "kubelet's CPU manager owns this cpuset: give the pod dedicated CPUs that \
                 include {cpus} (static CPU manager policy, Guaranteed QoS, integer CPU \
                 requests; KubeVirt: dedicatedCpuPlacement)"
            ),
            CgroupOwner::Container(rt) => format!(
                "the {rt} container's cpuset excludes {cpus}: restart the container with \
                 --cpuset-cpus={wanted}"
            ),
            CgroupOwner::Systemd(unit) => {
                format!(
                    "systemd owns this cpuset: systemctl set-property {unit} AllowedCPUs={wanted}"
                )
            }
            // The same file name in both versions.
            CgroupOwner::Unknown => format!(
                "widen it: echo {wanted} > {}",
                self.dir.join("cpuset.cpus").display()
            ),
        }
    }
}

/// Where the cpuset hierarchies are mounted, and the /proc to read threads from.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Cgroups {
    proc: PathBuf,
    /// The v1 hierarchy with the cpuset controller.
    v1: Option<PathBuf>,
    /// The unified (v2) hierarchy.
    v2: Option<PathBuf>,
}

impl Cgroups {
    /// The host's mounts.
    pub fn read() -> Self {
        let mountinfo = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        Self::from_mountinfo("/proc".into(), &mountinfo)
    }

    /// From the text of a `mountinfo` file; `proc` is where threads are read.
    pub fn from_mountinfo(proc: PathBuf, mountinfo: &str) -> Self {
        let mut c = Self {
            proc,
            v1: None,
            v2: None,
        };
        for line in mountinfo.lines() {
            let Some((left, right)) = line.split_once(" - ") else {
                continue;
            };
            let Some(mount_point) = left.split_whitespace().nth(4) else {
                continue;
            };
            let mut r = right.split_whitespace();
            let (fstype, options) = (r.next().unwrap_or(""), r.nth(1).unwrap_or(""));
            match fstype {
                "cgroup" if options.split(',').any(|o| o == "cpuset") && c.v1.is_none() => {
                    c.v1 = Some(PathBuf::from(unescape(mount_point)));
                }
                "cgroup2" if c.v2.is_none() => c.v2 = Some(PathBuf::from(unescape(mount_point))),
                _ => {}
            }
        }
        c
    }

    /// The cpuset cgroup thread `tid` is in, if a cpuset controller confines it.
    pub fn cpuset_of(&self, tid: u32) -> Option<Cpuset> {
        let text = fs::read_to_string(self.proc.join(tid.to_string()).join("cgroup")).ok()?;
        let mut v2_path = None;
        for line in text.lines() {
            let mut f = line.splitn(3, ':');
            let (id, controllers, path) = (f.next()?, f.next()?, f.next()?);
            if id == "0" && controllers.is_empty() {
                v2_path = Some(path);
            } else if controllers.split(',').any(|c| c == "cpuset")
                && let Some(root) = &self.v1
            {
                return read(Version::V1, root, path, "cpuset.effective_cpus");
            }
        }
        let root = self.v2.as_ref()?;
        read(Version::V2, root, v2_path?, "cpuset.cpus.effective")
    }
}

impl Cgroups {
    /// The highest ancestor of `cg` (itself included) whose cpuset still
    /// excludes some of `cpus`: where the conflict really is. A guest's own
    /// cgroup can be changed for that guest; when its parent (libvirt's
    /// `machine` partition, systemd's `machine.slice`, a kubepods slice)
    /// excludes the CPU too, that is what the operator has to change.
    pub fn highest_excluding(&self, cg: Cpuset, cpus: &CpuSet) -> Cpuset {
        let (root, file) = match cg.version {
            Version::V1 => (self.v1.as_deref(), "cpuset.effective_cpus"),
            Version::V2 => (self.v2.as_deref(), "cpuset.cpus.effective"),
        };
        let Some(root) = root else {
            return cg;
        };
        let mut best = cg;
        loop {
            let Some((parent, _)) = best.path.trim_end_matches('/').rsplit_once('/') else {
                return best;
            };
            if parent.is_empty() {
                // The root cpuset holds every CPU the kernel lets tasks use.
                return best;
            }
            match read(best.version, root, parent, file) {
                Some(p) if !cpus.is_subset(&p.cpus) => best = p,
                _ => return best,
            }
        }
    }
}

fn read(version: Version, root: &Path, path: &str, file: &str) -> Option<Cpuset> {
    let dir = root.join(path.trim_start_matches('/'));
    let cpus = CpuSet::parse(fs::read_to_string(dir.join(file)).ok()?.trim()).ok()?;
    Some(Cpuset {
        version,
        path: path.to_string(),
        dir,
        cpus,
        owner: CgroupOwner::of_path(path),
    })
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo`.
fn unescape(s: &str) -> String {
    let mut out = String::new();
    let b = s.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && let Ok(v) = u8::from_str_radix(&s[i + 1..i + 4], 8)
        {
            out.push(v as char);
            i += 4;
        } else {
            out.push(b[i] as char);
            i += 1;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn managers_are_told_apart_by_their_real_layouts() {
        let cases = [
            // libvirt without systemd (this lab), v1.
            (
                "/machine/qemu-2-lv1.libvirt-qemu/vcpu0",
                CgroupOwner::Libvirt,
            ),
            (
                "/machine/qemu-2-lv1.libvirt-qemu/emulator",
                CgroupOwner::Libvirt,
            ),
            // libvirt with systemd, v1 and v2 (threaded vcpuN sub-cgroups).
            (
                "/machine.slice/machine-qemu\\x2d1\\x2dweb.scope/libvirt/vcpu1",
                CgroupOwner::Libvirt,
            ),
            (
                "/machine.slice/machine-qemu\\x2d1\\x2dweb.scope/libvirt/emulator",
                CgroupOwner::Libvirt,
            ),
            // kubelet, systemd driver and cgroupfs driver (KubeVirt's virt-launcher).
            (
                "/kubepods.slice/kubepods-pod1234.slice/cri-containerd-abcd.scope",
                CgroupOwner::Kubelet,
            ),
            ("/kubepods/pod1234/abcd", CgroupOwner::Kubelet),
            (
                "/system.slice/docker-0123abcd.scope",
                CgroupOwner::Container("docker".into()),
            ),
            (
                "/machine.slice/libpod-0123.scope/container",
                CgroupOwner::Container("podman".into()),
            ),
            (
                "/system.slice/qemu-web.service",
                CgroupOwner::Systemd("qemu-web.service".into()),
            ),
            ("/", CgroupOwner::Unknown),
            ("/lab/g1", CgroupOwner::Unknown),
        ];
        for (path, want) in cases {
            assert_eq!(CgroupOwner::of_path(path), want, "{path}");
        }
    }

    #[test]
    fn mounts_and_a_threads_cpuset_are_read_for_both_versions() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        let v1 = root.join("cpuset");
        let v2 = root.join("unified");
        let cg = v1.join("machine/qemu-2-lv1.libvirt-qemu/vcpu0");
        fs::create_dir_all(&cg).unwrap();
        fs::write(cg.join("cpuset.effective_cpus"), "0\n").unwrap();
        let lab = v2.join("lab/g1");
        fs::create_dir_all(&lab).unwrap();
        fs::write(lab.join("cpuset.cpus.effective"), "0-1\n").unwrap();
        let mountinfo = format!(
            "30 25 0:26 / {} rw,nosuid - cgroup cgroup rw,cpuset\n\
             31 25 0:27 / {} rw,nosuid - cgroup2 cgroup2 rw\n\
             32 25 0:28 / /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory\n",
            v1.display(),
            v2.display()
        );
        let proc = root.join("proc");
        for (tid, text) in [
            (
                10,
                "4:memory:/x\n3:cpuset:/machine/qemu-2-lv1.libvirt-qemu/vcpu0\n0::/\n",
            ),
            (11, "0::/lab/g1\n"),
            (12, "0::/nowhere\n"),
        ] {
            fs::create_dir_all(proc.join(tid.to_string())).unwrap();
            fs::write(proc.join(tid.to_string()).join("cgroup"), text).unwrap();
        }
        let c = Cgroups::from_mountinfo(proc, &mountinfo);
        let s = c.cpuset_of(10).unwrap();
        assert_eq!(s.version, Version::V1);
        assert_eq!(s.cpus, CpuSet::single(0));
        assert_eq!(s.owner, CgroupOwner::Libvirt);
        assert_eq!(s.dir, cg);
        assert!(s.fix(&CpuSet::single(1)).contains("virsh vcpupin"));
        let s = c.cpuset_of(11).unwrap();
        assert_eq!((s.version, s.path.as_str()), (Version::V2, "/lab/g1"));
        assert_eq!(
            s.fix(&CpuSet::single(2)),
            format!("widen it: echo 0-2 > {}", lab.join("cpuset.cpus").display())
        );
        assert_eq!(c.cpuset_of(12), None, "no cpuset controller there");
        assert_eq!(c.cpuset_of(13), None, "no such thread");
    }

    #[test]
    fn a_conflict_above_the_guest_names_the_highest_cgroup_that_excludes_the_cpu() {
        let dir = tempfile::tempdir().unwrap();
        let v1 = dir.path().join("cpuset");
        for (path, cpus) in [
            ("machine", "0"),
            ("machine/qemu-2-lv1.libvirt-qemu", "0"),
            ("machine/qemu-2-lv1.libvirt-qemu/vcpu0", "0"),
            ("lab", "0-1"),
            ("lab/g1", "0"),
        ] {
            fs::create_dir_all(v1.join(path)).unwrap();
            fs::write(v1.join(path).join("cpuset.effective_cpus"), cpus).unwrap();
        }
        let c = Cgroups {
            proc: dir.path().join("proc"),
            v1: Some(v1.clone()),
            v2: None,
        };
        let leaf = read(
            Version::V1,
            &v1,
            "/machine/qemu-2-lv1.libvirt-qemu/vcpu0",
            "cpuset.effective_cpus",
        )
        .unwrap();
        let top = c.highest_excluding(leaf, &CpuSet::single(1));
        assert_eq!(top.path, "/machine");
        // The guest's own cgroup is the conflict when its parent allows the CPU.
        let own = read(Version::V1, &v1, "/lab/g1", "cpuset.effective_cpus").unwrap();
        assert_eq!(c.highest_excluding(own, &CpuSet::single(1)).path, "/lab/g1");
    }

    #[test]
    fn mount_points_are_unescaped() {
        assert_eq!(unescape("/a\\040b"), "/a b");
        assert_eq!(unescape("/plain"), "/plain");
    }
}
