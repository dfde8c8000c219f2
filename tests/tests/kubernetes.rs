//! The Kubernetes manifests (deploy/kubernetes): valid against the
//! Kubernetes API schemas (kubernetes-validate, strict: unknown fields are
//! errors), generated files in step with their sources, the DaemonSet's
//! capabilities those of the systemd unit, and every cross-reference
//! (mounts, ports, labels the PodMonitor selects and the rules match) resolved.
//! The custom resources are checked against the Prometheus operator's
//! schemas (npm). No cluster runs here: docs/KUBERNETES.md says what that leaves untested.
use std::{
    collections::BTreeSet,
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use serde_norway::Value;
use testkit::{process::succeeds, require, which};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn dir() -> PathBuf {
    root().join("deploy/kubernetes")
}

fn yaml(path: &Path) -> Value {
    let text = fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_norway::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The files kustomization.yaml lists, in order.
fn resources() -> Vec<PathBuf> {
    let k = yaml(&dir().join("kustomization.yaml"));
    k["resources"]
        .as_sequence()
        .expect("kustomization.yaml lists resources")
        .iter()
        .map(|r| dir().join(r.as_str().expect("a resource is a file name")))
        .collect()
}

fn resource(kind: &str) -> Value {
    resources()
        .iter()
        .map(|p| yaml(p))
        .find(|v| v["kind"].as_str() == Some(kind))
        .unwrap_or_else(|| panic!("no {kind} in deploy/kubernetes/kustomization.yaml's resources"))
}

fn strings(v: &Value) -> Vec<String> {
    v.as_sequence()
        .map(|s| {
            s.iter()
                .map(|x| {
                    x.as_str()
                        .unwrap_or_else(|| panic!("{x:?} is not a string"))
                        .to_string()
                })
                .collect()
        })
        .unwrap_or_default()
}

fn kube_validate() -> PathBuf {
    std::env::var_os("PINGUARD_KUBE_VALIDATE")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join("target/tools/venv/bin/kubernetes-validate"))
}

fn missing_validator() -> Option<String> {
    let bin = kube_validate();
    (!bin.is_file()).then(|| format!("{} is missing: run `cargo xtask setup`", bin.display()))
}

/// The oldest and the newest Kubernetes release whose schemas are checked.
const KUBERNETES_VERSIONS: &[&str] = &["1.29.0", "1.34.0"];

fn validate(files: &[PathBuf]) -> (bool, String) {
    let mut cmd = Command::new(kube_validate());
    cmd.arg("--strict");
    for v in KUBERNETES_VERSIONS {
        cmd.args(["-k", v]);
    }
    succeeds(cmd.args(files))
}

#[test]
fn core_resources_match_the_api_schemas() {
    require!(missing_validator());
    let files = resources();
    let (ok, report) = validate(&files);
    assert!(
        ok,
        "kubernetes-validate --strict rejected deploy/kubernetes:\n{report}"
    );
    for kind in ["namespace", "serviceaccount", "configmap", "daemonset"] {
        for v in KUBERNETES_VERSIONS {
            let mm = &v[..v.rfind('.').unwrap()];
            let want = format!("passed for resource {kind}/pinguard against version {mm}");
            assert!(report.contains(&want), "no {want:?} in:\n{report}");
        }
    }
    // The CRDs have no schema in the package: custom_resources_match_the_operators_schemas.
    for kind in ["PodMonitor", "PrometheusRule"] {
        assert!(
            report.contains(kind),
            "kubernetes-validate did not see the {kind}:\n{report}"
        );
    }
}

/// The validator is strict: a misspelt field fails (so a pass above means something).
#[test]
fn the_validator_rejects_unknown_fields() {
    require!(missing_validator());
    let text = fs::read_to_string(dir().join("daemonset.yaml"))
        .unwrap()
        .replace("hostPID: true", "hostPid: true");
    let tmp = tempfile::tempdir().unwrap();
    let bad = tmp.path().join("daemonset.yaml");
    fs::write(&bad, text).unwrap();
    let (ok, report) = validate(&[bad]);
    assert!(!ok, "a DaemonSet with `hostPid` passed:\n{report}");
    assert!(
        report.contains("hostPid"),
        "the error should name hostPid:\n{report}"
    );
}

fn node_tools() -> PathBuf {
    std::env::var_os("PINGUARD_NODE_TOOLS")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join("target/tools/node"))
}

fn missing_crd_validator() -> Option<String> {
    let modules = node_tools().join("node_modules/@kubernetes-models/prometheus-operator");
    if which("node").is_err() {
        return Some("node is not installed (apt-get install nodejs)".into());
    }
    (!modules.is_dir())
        .then(|| format!("{} is missing: run `cargo xtask setup`", modules.display()))
}

/// tests/kubernetes/validate-crds.mjs, run from the tools directory so that
/// its imports resolve to the packages installed there.
fn validate_crds(files: &[PathBuf]) -> (bool, String) {
    let script = node_tools().join("validate-crds.mjs");
    fs::copy(root().join("tests/kubernetes/validate-crds.mjs"), &script).unwrap();
    succeeds(Command::new("node").arg(&script).args(files))
}

#[test]
fn custom_resources_match_the_operators_schemas() {
    require!(missing_crd_validator());
    let (ok, report) = validate_crds(&resources());
    assert!(
        ok,
        "the Prometheus operator's schemas rejected deploy/kubernetes:\n{report}"
    );
    for name in ["podmonitor/pinguard", "prometheusrule/pinguard"] {
        assert!(
            report.contains(&format!(" {name}")),
            "{name} was not validated:\n{report}"
        );
    }
    // And they do reject: a PodMonitor without its selector.
    let text = fs::read_to_string(dir().join("podmonitor.yaml"))
        .unwrap()
        .replace("  selector:", "  selectr:");
    let tmp = tempfile::tempdir().unwrap();
    let bad = tmp.path().join("podmonitor.yaml");
    fs::write(&bad, text).unwrap();
    let (ok, report) = validate_crds(&[bad]);
    assert!(
        !ok && report.contains("selector"),
        "a PodMonitor without a selector passed:\n{report}"
    );
}

#[test]
fn generated_files_match_their_sources() {
    let regenerate = "run `cargo xtask manifests` and commit deploy/kubernetes";
    let config = fs::read_to_string(root().join("packaging/pinguard.toml")).unwrap();
    let cm = resource("ConfigMap");
    assert_eq!(
        cm["data"]["pinguard.toml"].as_str(),
        Some(config.as_str()),
        "configmap.yaml differs from packaging/pinguard.toml: {regenerate}"
    );
    let rules = yaml(&root().join("dashboards/prometheus/pinguard.rules.yml"));
    let pr = resource("PrometheusRule");
    assert_eq!(
        pr["spec"], rules,
        "prometheusrule.yaml's spec differs from dashboards/prometheus/pinguard.rules.yml: {regenerate}"
    );
    assert!(
        pr["spec"]["groups"]
            .as_sequence()
            .is_some_and(|g| !g.is_empty()),
        "the PrometheusRule has no groups"
    );
}

/// `CapabilityBoundingSet=CAP_BPF CAP_PERFMON ...` of the systemd unit, without `CAP_`.
fn unit_capabilities() -> BTreeSet<String> {
    let unit = fs::read_to_string(root().join("packaging/pinguard.service")).unwrap();
    let line = unit
        .lines()
        .find_map(|l| l.strip_prefix("CapabilityBoundingSet="))
        .expect("packaging/pinguard.service sets CapabilityBoundingSet");
    line.split_whitespace()
        .map(|c| c.strip_prefix("CAP_").unwrap_or(c).to_string())
        .collect()
}

#[test]
fn daemonset_has_the_units_privileges_and_no_more() {
    let ds = resource("DaemonSet");
    let pod = &ds["spec"]["template"]["spec"];
    assert_eq!(
        pod["hostPID"].as_bool(),
        Some(true),
        "pinguard must see the host's threads"
    );
    assert_eq!(
        pod["hostNetwork"],
        Value::Null,
        "no host network: metrics go through the pod IP"
    );
    let containers = pod["containers"].as_sequence().expect("containers");
    assert_eq!(containers.len(), 1);
    let c = &containers[0];
    let sc = &c["securityContext"];
    assert_eq!(sc["privileged"].as_bool(), Some(false));
    assert_eq!(sc["allowPrivilegeEscalation"].as_bool(), Some(false));
    assert_eq!(sc["readOnlyRootFilesystem"].as_bool(), Some(true));
    assert_eq!(strings(&sc["capabilities"]["drop"]), ["ALL"]);
    let added: BTreeSet<String> = strings(&sc["capabilities"]["add"]).into_iter().collect();
    assert_eq!(
        added,
        unit_capabilities(),
        "the DaemonSet must add exactly the systemd unit's capabilities"
    );

    // Every mount has its volume; the host paths pinguard needs are there.
    let volumes = pod["volumes"].as_sequence().expect("volumes");
    let volume = |name: &str| {
        volumes
            .iter()
            .find(|v| v["name"].as_str() == Some(name))
            .unwrap_or_else(|| panic!("no volume {name:?}"))
    };
    let mut host_mounts = BTreeSet::new();
    for m in c["volumeMounts"].as_sequence().expect("volumeMounts") {
        let v = volume(m["name"].as_str().unwrap());
        if let Some(path) = v["hostPath"]["path"].as_str() {
            host_mounts.insert((
                path.to_string(),
                m["mountPath"].as_str().unwrap().to_string(),
            ));
        }
    }
    for (host, container) in [
        ("/sys/kernel/tracing", "/sys/kernel/tracing"),
        ("/run/libvirt", "/run/libvirt"),
        ("/var/run/pinguard", "/run/pinguard"),
        // The pins must outlive the pod (crash-safe restarts).
        ("/sys/fs/bpf", "/sys/fs/bpf"),
    ] {
        assert!(
            host_mounts.contains(&(host.to_string(), container.to_string())),
            "host {host} should be mounted at {container}: {host_mounts:?}"
        );
    }

    // The config file the daemon is told to read is the ConfigMap's key.
    let args = strings(&c["args"]);
    let config = args
        .iter()
        .skip_while(|a| *a != "--config")
        .nth(1)
        .expect("--config FILE");
    let (mount_dir, key) = config.rsplit_once('/').unwrap();
    let cm_mount = c["volumeMounts"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|m| m["mountPath"].as_str() == Some(mount_dir))
        .unwrap_or_else(|| panic!("nothing mounted at {mount_dir}"));
    let cm_name = volume(cm_mount["name"].as_str().unwrap())["configMap"]["name"].clone();
    let cm = resource("ConfigMap");
    assert_eq!(
        cm_name, cm["metadata"]["name"],
        "the config volume is the ConfigMap"
    );
    assert!(
        cm["data"][key].is_string(),
        "the ConfigMap has no key {key:?}"
    );

    // --listen serves the named container port the probes and PodMonitor use.
    let listen = args
        .iter()
        .skip_while(|a| *a != "--listen")
        .nth(1)
        .expect("--listen ADDR");
    let port: u64 = listen.rsplit_once(':').unwrap().1.parse().unwrap();
    let ports = c["ports"].as_sequence().expect("ports");
    assert!(
        ports
            .iter()
            .any(|p| p["name"].as_str() == Some("metrics")
                && p["containerPort"].as_u64() == Some(port)),
        "no container port named metrics = {port}: {ports:?}"
    );
    assert_eq!(
        c["livenessProbe"]["httpGet"]["path"].as_str(),
        Some("/healthz")
    );
}

#[test]
fn podmonitor_scrapes_the_pods_as_job_pinguard() {
    let ds = resource("DaemonSet");
    let labels = &ds["spec"]["template"]["metadata"]["labels"];
    let pm = resource("PodMonitor");
    assert_eq!(pm["metadata"]["namespace"], ds["metadata"]["namespace"]);
    let selector = pm["spec"]["selector"]["matchLabels"]
        .as_mapping()
        .expect("PodMonitor selects by matchLabels");
    for (k, v) in selector {
        assert_eq!(&labels[k], v, "the pods lack the PodMonitor's label {k:?}");
    }
    // The alert rules match job="pinguard".
    let job_label = pm["spec"]["jobLabel"].as_str().expect("jobLabel");
    assert_eq!(labels[job_label].as_str(), Some("pinguard"));
    let rules =
        fs::read_to_string(root().join("dashboards/prometheus/pinguard.rules.yml")).unwrap();
    assert!(rules.contains("job=\"pinguard\""));
    let endpoints = pm["spec"]["podMetricsEndpoints"].as_sequence().unwrap();
    assert_eq!(endpoints[0]["port"].as_str(), Some("metrics"));
    assert_eq!(endpoints[0]["path"].as_str(), Some("/metrics"));
    let instance = endpoints[0]["relabelings"]
        .as_sequence()
        .unwrap()
        .iter()
        .any(|r| r["targetLabel"].as_str() == Some("instance"));
    assert!(
        instance,
        "instance should be the node's name, not the pod IP"
    );
}

/// Where kubectl is installed, the base renders with its kustomize too.
#[test]
fn kustomize_renders_the_base() {
    let Ok(kubectl) = which("kubectl") else {
        eprintln!("kubectl is not installed: rendering with kustomize not checked");
        return;
    };
    let out = Command::new(kubectl)
        .args(["kustomize"])
        .arg(dir())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "kubectl kustomize failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let kinds: BTreeSet<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("kind: "))
        .collect();
    let want: BTreeSet<&str> = [
        "Namespace",
        "ServiceAccount",
        "ConfigMap",
        "DaemonSet",
        "PodMonitor",
        "PrometheusRule",
    ]
    .into();
    assert_eq!(kinds, want);
    assert!(text.contains("image: ghcr.io/pinguard/pinguard:"), "{text}");
}
