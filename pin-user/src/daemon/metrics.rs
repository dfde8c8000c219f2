//! Prometheus metrics and the read-only HTTP endpoint (`/metrics`, `/healthz`).
//!
//! Names and labels are a contract with dashboards/ and users. Label sets are
//! bounded by CPUs, VMs and fixed enums: no thread ids or command names.
use std::{collections::HashMap, net::SocketAddr, sync::Arc, time::Duration};

use prometheus::{
    CounterVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry, TextEncoder,
};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::TcpListener,
};

/// Classes of time on a guarded CPU as exported (`class` label).
pub const CLASSES: [&str; 5] = ["vcpu", "kernel", "allowed", "intruder", "idle"];

#[derive(Clone)]
pub struct Metrics {
    pub registry: Registry,
    pub build_info: IntGaugeVec,
    pub mode: IntGaugeVec,
    pub cpu_guarded: IntGaugeVec,
    pub cpu_run_seconds: CounterVec,
    pub intruder_run_seconds: CounterVec,
    pub intrusions: IntCounterVec,
    pub violations: IntCounterVec,
    pub vms: IntGauge,
    pub vcpu_info: IntGaugeVec,
    pub vcpu_pinned: IntGaugeVec,
    pub repins: IntCounterVec,
    pub evictions: IntCounterVec,
    pub enforcement_errors: IntCounterVec,
    pub events_lost: IntCounter,
    pub thread_map_full: IntCounter,
    pub bpf_run_seconds: CounterVec,
    pub bpf_runs: IntCounterVec,
    pub tasks_vanished: IntCounter,
    pub discovery_errors: IntCounter,
    pub discovery_scans: IntCounter,
    pub config_reloads: IntCounterVec,
    pub scrapes: IntCounter,
    pub irq_seconds: CounterVec,
    pub irqs: IntCounterVec,
    pub softirq_seconds: CounterVec,
    pub softirqs: IntCounterVec,
    pub nmis: IntCounterVec,
    pub vcpu_wait_seconds_total: CounterVec,
    /// Pre-rendered text of metrics the registry cannot express (histograms
    /// whose buckets the kernel aggregates), appended to every scrape.
    pub extra_text: Arc<std::sync::Mutex<String>>,
}

fn opts(name: &str, help: &str) -> Opts {
    Opts::new(name, help)
}

impl Metrics {
    pub fn new() -> Self {
        let registry = Registry::new();
        macro_rules! reg {
            ($m:expr) => {{
                let m = $m.expect("metric definition is valid");
                registry
                    .register(Box::new(m.clone()))
                    .expect("metric names are unique");
                m
            }};
        }
        let m = Self {
            build_info: reg!(IntGaugeVec::new(
                opts("pinguard_build_info", "pinguard version (always 1)"),
                &["version"]
            )),
            mode: reg!(IntGaugeVec::new(
                opts(
                    "pinguard_mode",
                    "Enforcement mode in effect (1 for the active mode)"
                ),
                &["mode"]
            )),
            cpu_guarded: reg!(IntGaugeVec::new(
                opts("pinguard_cpu_guarded", "1 for each CPU pinguard guards"),
                &["cpu"]
            )),
            cpu_run_seconds: reg!(CounterVec::new(
                opts(
                    "pinguard_cpu_run_seconds_total",
                    "Time on each guarded CPU by class: vcpu (its owner), kernel (per-CPU kernel threads), allowed (allowlisted), intruder, idle"
                ),
                &["cpu", "class"]
            )),
            intruder_run_seconds: reg!(CounterVec::new(
                opts(
                    "pinguard_intruder_run_seconds_total",
                    "Time intruders ran on a guarded CPU, by source (user threads or unbound kernel threads)"
                ),
                &["cpu", "source"]
            )),
            intrusions: reg!(IntCounterVec::new(
                opts(
                    "pinguard_intrusions_total",
                    "Run slices of intruders on a guarded CPU"
                ),
                &["cpu", "source"]
            )),
            violations: reg!(IntCounterVec::new(
                opts(
                    "pinguard_violations_total",
                    "Isolation violations by kind: intruder, migration_in, vcpu_drift, affinity_changed, shared_cpu"
                ),
                &["cpu", "kind"]
            )),
            vms: reg!(IntGauge::with_opts(opts(
                "pinguard_vms",
                "Guests (QEMU/KVM processes) currently known"
            ))),
            vcpu_info: reg!(IntGaugeVec::new(
                opts(
                    "pinguard_vcpu_info",
                    "vCPU placement: the guarded CPU each vCPU is assigned (always 1)"
                ),
                &["vm", "vcpu", "cpu"]
            )),
            vcpu_pinned: reg!(IntGaugeVec::new(
                opts(
                    "pinguard_vcpu_pinned",
                    "1 when the vCPU's affinity equals its assigned CPU, else 0"
                ),
                &["vm", "vcpu"]
            )),
            repins: reg!(IntCounterVec::new(
                opts(
                    "pinguard_repins_total",
                    "vCPU threads pinned back to their CPU"
                ),
                &["vm"]
            )),
            evictions: reg!(IntCounterVec::new(
                opts(
                    "pinguard_evictions_total",
                    "Intruder threads moved off a guarded CPU"
                ),
                &["cpu"]
            )),
            enforcement_errors: reg!(IntCounterVec::new(
                opts(
                    "pinguard_enforcement_errors_total",
                    "Failed enforcement actions (repin, evict, pin) by errno"
                ),
                &["action", "errno"]
            )),
            events_lost: reg!(IntCounter::with_opts(opts(
                "pinguard_events_lost_total",
                "Events the kernel could not deliver (ring buffer full)"
            ))),
            thread_map_full: reg!(IntCounter::with_opts(opts(
                "pinguard_thread_map_full_total",
                "Intruder slices not tracked per thread because the map was full (still counted per CPU)"
            ))),
            bpf_run_seconds: reg!(CounterVec::new(
                opts(
                    "pinguard_bpf_program_run_seconds_total",
                    "CPU time spent in pinguard's eBPF programs (kernel bpf_stats)"
                ),
                &["program"]
            )),
            bpf_runs: reg!(IntCounterVec::new(
                opts(
                    "pinguard_bpf_program_runs_total",
                    "Runs of pinguard's eBPF programs (kernel bpf_stats)"
                ),
                &["program"]
            )),
            tasks_vanished: reg!(IntCounter::with_opts(opts(
                "pinguard_tasks_vanished_total",
                "Threads or processes that exited while pinguard was acting on them (ESRCH)"
            ))),
            discovery_scans: reg!(IntCounter::with_opts(opts(
                "pinguard_discovery_scans_total",
                "Full scans of /proc for guests (start-up, reload, periodic, after a QEMU exec)"
            ))),
            discovery_errors: reg!(IntCounter::with_opts(opts(
                "pinguard_discovery_errors_total",
                "Errors while discovering guests (e.g. an unreadable QMP socket)"
            ))),
            config_reloads: reg!(IntCounterVec::new(
                opts(
                    "pinguard_config_reloads_total",
                    "Configuration reloads (SIGHUP) by result"
                ),
                &["result"]
            )),
            scrapes: reg!(IntCounter::with_opts(opts(
                "pinguard_scrapes_total",
                "Requests served on /metrics"
            ))),
            irq_seconds: reg!(CounterVec::new(
                opts(
                    "pinguard_irq_seconds_total",
                    "Time in hardware IRQ handlers on guarded CPUs (only IRQs seen there)"
                ),
                &["cpu", "irq", "name"]
            )),
            irqs: reg!(IntCounterVec::new(
                opts(
                    "pinguard_irqs_total",
                    "Hardware IRQs handled on guarded CPUs"
                ),
                &["cpu", "irq", "name"]
            )),
            softirq_seconds: reg!(CounterVec::new(
                opts(
                    "pinguard_softirq_seconds_total",
                    "Time in softirqs on guarded CPUs, by vector"
                ),
                &["cpu", "vector"]
            )),
            softirqs: reg!(IntCounterVec::new(
                opts(
                    "pinguard_softirqs_total",
                    "Softirqs run on guarded CPUs, by vector"
                ),
                &["cpu", "vector"]
            )),
            nmis: reg!(IntCounterVec::new(
                opts("pinguard_nmis_total", "NMIs on guarded CPUs"),
                &["cpu"]
            )),
            vcpu_wait_seconds_total: reg!(CounterVec::new(
                opts(
                    "pinguard_vcpu_wait_seconds_total",
                    "Time vCPU threads were runnable but not running (host-side CPU ready / steal)"
                ),
                &["vm", "vcpu"]
            )),
            extra_text: Arc::new(std::sync::Mutex::new(String::new())),
            registry,
        };
        m.build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION")])
            .set(1);
        m
    }

    pub fn render(&self) -> String {
        self.scrapes.inc();
        let mut text = TextEncoder::new()
            .encode_to_string(&self.registry.gather())
            .unwrap_or_else(|e| format!("# encoding error: {e}\n"));
        text.push_str(&self.extra_text.lock().unwrap_or_else(|e| e.into_inner()));
        text
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// Concurrent HTTP connections served at most.
const MAX_CONNECTIONS: usize = 64;

/// Renders kernel log2 wait histograms as one Prometheus histogram family.
/// Bucket `i` of the kernel holds waits in [2^i, 2^(i+1)) ns; buckets below
/// 1 µs are folded into the first bound.
pub fn render_wait_histogram(series: &[(String, String, pin_common::WaitHist)]) -> String {
    use std::fmt::Write as _;
    const NAME: &str = "pinguard_vcpu_wait_seconds";
    const FIRST: usize = 9;
    let mut out = String::new();
    if series.is_empty() {
        return out;
    }
    let _ = writeln!(
        out,
        "# HELP {NAME} How long vCPU threads waited from wake-up (or preemption) to running"
    );
    let _ = writeln!(out, "# TYPE {NAME} histogram");
    for (vm, vcpu, h) in series {
        let labels = format!(
            "vm=\"{}\",vcpu=\"{vcpu}\"",
            vm.replace('\\', "\\\\").replace('"', "\\\"")
        );
        let mut cumulative = 0u64;
        for (i, n) in h.buckets.iter().enumerate() {
            cumulative += n;
            if i >= FIRST && i + 1 < pin_common::WAIT_BUCKETS {
                let le = (1u64 << (i + 1)) as f64 / 1e9;
                let _ = writeln!(out, "{NAME}_bucket{{{labels},le=\"{le}\"}} {cumulative}");
            }
        }
        let _ = writeln!(out, "{NAME}_bucket{{{labels},le=\"+Inf\"}} {}", h.count);
        let _ = writeln!(out, "{NAME}_sum{{{labels}}} {}", h.total_ns as f64 / 1e9);
        let _ = writeln!(out, "{NAME}_count{{{labels}}} {}", h.count);
    }
    out
}

/// Turns cumulative totals (as the kernel keeps them) into counter increments.
#[derive(Default)]
pub struct Deltas {
    last: HashMap<String, u64>,
}

impl Deltas {
    /// Returns how much `key` grew since the last call (0 the first time a
    /// smaller value is seen, e.g. after the maps were recreated).
    pub fn delta(&mut self, key: String, total: u64) -> u64 {
        let prev = self.last.insert(key, total).unwrap_or(0);
        total.saturating_sub(prev)
    }
}

/// Renders the JSON documents served besides /metrics: given a path
/// (`/violations`, `/intruders`), the body, or None for 404.
pub type JsonRoutes = Arc<dyn Fn(&str) -> Option<String> + Send + Sync>;

/// Serves `/metrics`, `/healthz` and the JSON routes until the task is
/// dropped. Nothing here changes state, so any client may scrape.
pub async fn serve(
    listener: TcpListener,
    metrics: Arc<Metrics>,
    healthy: Arc<std::sync::atomic::AtomicBool>,
    json: JsonRoutes,
) {
    // Bounded: a flood of clients must not eat the daemon's file descriptors
    // (discovery and enforcement need them).
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        let mut stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                // EMFILE and friends: back off instead of spinning on the event thread.
                log::warn!("metrics endpoint: accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            // Too many open connections: refuse this one outright.
            drop(stream);
            continue;
        };
        let metrics = metrics.clone();
        let healthy = healthy.clone();
        let json = json.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let mut buf = vec![0u8; 8192];
            let mut len = 0;
            // A request head must arrive promptly; slow or huge requests are dropped.
            let read = tokio::time::timeout(Duration::from_secs(5), async {
                while len < buf.len() {
                    let n = stream.read(&mut buf[len..]).await?;
                    if n == 0 {
                        break;
                    }
                    len += n;
                    if buf[..len].windows(4).any(|w| w == b"\r\n\r\n") {
                        break;
                    }
                }
                Ok::<_, std::io::Error>(())
            })
            .await;
            if !matches!(read, Ok(Ok(()))) {
                return;
            }
            let head = String::from_utf8_lossy(&buf[..len]);
            let mut parts = head.split_whitespace();
            let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
            let path = path.split('?').next().unwrap_or("");
            let (status, ctype, body) = match (method, path) {
                ("GET" | "HEAD", "/metrics") => ("200 OK", "text/plain; version=0.0.4; charset=utf-8", metrics.render()),
                ("GET" | "HEAD", "/healthz") => {
                    if healthy.load(std::sync::atomic::Ordering::Relaxed) {
                        ("200 OK", "text/plain", "ok\n".to_string())
                    } else {
                        ("503 Service Unavailable", "text/plain", "eBPF observer not attached\n".to_string())
                    }
                }
                ("GET" | "HEAD", "/") => ("200 OK", "text/html", "<html><body><a href=\"/metrics\">/metrics</a> <a href=\"/healthz\">/healthz</a> <a href=\"/violations\">/violations</a> <a href=\"/intruders\">/intruders</a></body></html>\n".to_string()),
                ("GET" | "HEAD", p) => match json(p) {
                    Some(body) => ("200 OK", "application/json", body),
                    None => ("404 Not Found", "text/plain", "not found\n".to_string()),
                },
                _ => ("405 Method Not Allowed", "text/plain", "only GET\n".to_string()),
            };
            let body = if method == "HEAD" {
                String::new()
            } else {
                body
            };
            let resp = format!(
                "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            // A client that does not read its answer is dropped after a while.
            let _ = tokio::time::timeout(Duration::from_secs(10), async {
                let _ = stream.write_all(resp.as_bytes()).await;
                let _ = stream.shutdown().await;
            })
            .await;
        });
    }
}

pub fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let std_listener = std::net::TcpListener::bind(addr)?;
    std_listener.set_nonblocking(true)?;
    TcpListener::from_std(std_listener)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_contract_names() {
        let m = Metrics::new();
        m.cpu_run_seconds
            .with_label_values(&["1", "vcpu"])
            .inc_by(0.5);
        m.events_lost.inc_by(0);
        let text = m.render();
        for name in [
            "pinguard_build_info",
            "pinguard_cpu_run_seconds_total",
            "pinguard_events_lost_total",
            "pinguard_vms",
        ] {
            assert!(text.contains(name), "{name} missing from:\n{text}");
        }
        assert!(
            text.contains("pinguard_cpu_run_seconds_total{class=\"vcpu\",cpu=\"1\"} 0.5"),
            "{text}"
        );
    }

    #[test]
    fn wait_histogram_is_cumulative_prometheus_text() {
        let mut h = pin_common::WaitHist::default();
        h.buckets[3] = 2; // < 1 µs: folded into the first bound
        h.buckets[12] = 5; // [4.096 µs, 8.192 µs)
        h.buckets[20] = 1; // [~1 ms, ~2 ms)
        h.count = 8;
        h.total_ns = 2_000_000;
        let text = render_wait_histogram(&[("web".into(), "0".into(), h)]);
        assert!(
            text.contains("# TYPE pinguard_vcpu_wait_seconds histogram"),
            "{text}"
        );
        assert!(
            text.contains(
                "pinguard_vcpu_wait_seconds_bucket{vm=\"web\",vcpu=\"0\",le=\"0.000001024\"} 2"
            ),
            "{text}"
        );
        assert!(text.contains("le=\"0.000008192\"} 7"), "{text}");
        assert!(text.contains("le=\"+Inf\"} 8"), "{text}");
        assert!(
            text.contains("pinguard_vcpu_wait_seconds_sum{vm=\"web\",vcpu=\"0\"} 0.002"),
            "{text}"
        );
        assert!(
            text.contains("pinguard_vcpu_wait_seconds_count{vm=\"web\",vcpu=\"0\"} 8"),
            "{text}"
        );
        assert!(render_wait_histogram(&[]).is_empty());
    }

    #[test]
    fn deltas() {
        let mut d = Deltas::default();
        assert_eq!(d.delta("a".into(), 10), 10);
        assert_eq!(d.delta("a".into(), 15), 5);
        assert_eq!(d.delta("a".into(), 3), 0);
        assert_eq!(d.delta("a".into(), 4), 1);
    }
}
