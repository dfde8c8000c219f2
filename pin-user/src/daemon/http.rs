//! The daemon's read-only HTTP endpoint (axum): `/metrics`, `/healthz`,
//! `/violations`, `/intruders`. It runs on its own thread and runtime, so
//! scrapes never wait for the event loop and a stalled loop shows on
//! `/healthz`. Nothing here changes state: any local client may scrape.
use std::{
    future::Future as _,
    io,
    net::SocketAddr,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::{Duration, Instant},
};

use axum::{
    Router,
    extract::State,
    http::{StatusCode, Uri, header},
    response::{Html, IntoResponse, Response},
    routing::get,
};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::{TcpListener, TcpStream},
    sync::{OwnedSemaphorePermit, Semaphore},
    time::Sleep,
};

use crate::{
    bpf::class::ThreadClass,
    daemon::{effects::SharedProbe, health::Health, metrics::Metrics, violation::Recent},
};

/// Concurrent connections served at most: a flood of clients must not eat
/// the daemon's file descriptors (discovery and enforcement need them; the
/// usual soft limit is 1 024).
const MAX_CONNECTIONS: usize = 256;

/// A connection with no progress for this long is closed: idle or slow
/// clients must not hold the slots and lock scrapers out. A keep-alive
/// scraper (Prometheus, every 15 s or more) just reconnects.
const IDLE_TIMEOUT: Duration = Duration::from_secs(5);

/// How many intruders `/intruders` lists unless `?limit=` says otherwise.
pub const TOP_INTRUDERS: usize = 100;

/// What `/intruders?cpu=N&sort=run|recent&limit=K` asks for. By total run
/// time alone, a busy host's long-running intruders keep a short, recent
/// one off the list (all of them are in the kernel's map): `cpu` and
/// `sort=recent` find it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IntrudersQuery {
    pub cpu: Option<u32>,
    /// By when the thread last intruded (the kernel's last event for it,
    /// at most one per `event_interval`), newest first; else by run time.
    pub recent: bool,
    pub limit: usize,
}

impl IntrudersQuery {
    /// Parses a query string; an unknown key or a bad value is an error
    /// that names it.
    pub fn parse(query: Option<&str>) -> Result<Self, String> {
        let mut q = Self {
            cpu: None,
            recent: false,
            limit: TOP_INTRUDERS,
        };
        for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            match key {
                "cpu" => {
                    q.cpu = Some(value.parse().map_err(|_| {
                        format!("cpu: expected a CPU number, got {value:?}")
                    })?)
                }
                "sort" => {
                    q.recent = match value {
                        "run" => false,
                        "recent" => true,
                        _ => return Err(format!("sort: expected run or recent, got {value:?}")),
                    }
                }
                "limit" => {
                    q.limit = value
                        .parse()
                        .ok()
                        .filter(|n| (1..=pin_common::MAX_THREADS as usize).contains(n))
                        .ok_or_else(|| {
                            format!(
                                "limit: expected 1 to {}, got {value:?}",
                                pin_common::MAX_THREADS
                            )
                        })?
                }
                _ => return Err(format!("unknown parameter {key:?}: expected cpu, sort or limit")),
            }
        }
        Ok(q)
    }

    /// The records it asks for, from (record, last event time) pairs.
    pub fn select(&self, mut all: Vec<(IntruderRecord, u64)>) -> Vec<IntruderRecord> {
        all.retain(|(r, _)| self.cpu.is_none_or(|c| r.cpu == c));
        if self.recent {
            all.sort_by_key(|(r, last)| (std::cmp::Reverse(*last), std::cmp::Reverse(r.run_ns)));
        } else {
            all.sort_by_key(|(r, _)| std::cmp::Reverse(r.run_ns));
        }
        all.truncate(self.limit);
        all.into_iter().map(|(r, _)| r).collect()
    }
}

/// What the routes read.
#[derive(Clone)]
pub struct Endpoint {
    pub metrics: Arc<Metrics>,
    pub recent: Recent,
    pub probe: SharedProbe,
    pub health: Health,
}

/// One thread's intrusion on one guarded CPU since pinguard started (or since
/// the thread first intruded), from the kernel's per-thread accounting.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct IntruderRecord {
    pub cpu: u32,
    pub tid: u32,
    pub tgid: u32,
    pub comm: String,
    pub class: ThreadClass,
    pub run_ns: u64,
    pub slices: u64,
    pub max_slice_ns: u64,
}

pub fn router(ep: Endpoint) -> Router {
    // `get` answers HEAD too, with the headers of GET and no body.
    Router::new()
        .route("/", get(index))
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/violations", get(violations))
        .route("/intruders", get(intruders))
        .with_state(ep)
}

async fn index() -> Html<&'static str> {
    Html(
        "<html><body><a href=\"/metrics\">/metrics</a> <a href=\"/healthz\">/healthz</a> \
         <a href=\"/violations\">/violations</a> <a href=\"/intruders\">/intruders</a></body></html>\n",
    )
}

async fn metrics(State(ep): State<Endpoint>) -> Response {
    (
        [(header::CONTENT_TYPE, prometheus::TEXT_FORMAT)],
        ep.metrics.render(),
    )
        .into_response()
}

async fn healthz(State(ep): State<Endpoint>) -> Response {
    let (attached, expected) = {
        let p = ep.probe.lock();
        (p.program_stats().len(), p.attached().len())
    };
    match ep.health.check(attached, expected, Instant::now()) {
        Ok(()) => (StatusCode::OK, "ok\n").into_response(),
        Err(why) => (StatusCode::SERVICE_UNAVAILABLE, format!("{why}\n")).into_response(),
    }
}

fn json(body: &impl serde::Serialize) -> Response {
    match serde_json::to_string(body) {
        Ok(s) => ([(header::CONTENT_TYPE, "application/json")], s + "\n").into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")).into_response(),
    }
}

async fn violations(State(ep): State<Endpoint>) -> Response {
    json(&ep.recent.to_vec())
}

/// The top intruders, read from the kernel's per-thread map now.
async fn intruders(State(ep): State<Endpoint>, uri: Uri) -> Response {
    let query = match IntrudersQuery::parse(uri.query()) {
        Ok(q) => q,
        Err(e) => return (StatusCode::BAD_REQUEST, format!("{e}\n")).into_response(),
    };
    let threads = match ep.probe.lock().threads() {
        Ok(t) => t,
        Err(e) => return (StatusCode::SERVICE_UNAVAILABLE, format!("{e}\n")).into_response(),
    };
    let all = threads
        .into_iter()
        .filter_map(|(k, t)| {
            let record = IntruderRecord {
                cpu: k.cpu,
                tid: k.tid,
                tgid: t.tgid,
                comm: crate::bpf::probe::comm_str(&t.comm),
                class: ThreadClass::from_raw(t.class)?,
                run_ns: t.run_ns,
                slices: t.slices,
                max_slice_ns: t.max_slice_ns,
            };
            Some((record, t.last_event_ns))
        })
        .collect();
    json(&query.select(all))
}

/// Binds now (so a taken port fails the start with a clear error), serves
/// on a thread of its own until the process exits.
pub fn spawn(addr: SocketAddr, ep: Endpoint) -> io::Result<()> {
    let std_listener = std::net::TcpListener::bind(addr)?;
    std_listener.set_nonblocking(true)?;
    std::thread::Builder::new()
        .name("pinguard-http".into())
        .spawn(move || {
            let rt = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    log::error!("metrics endpoint: cannot start its runtime: {e}");
                    return;
                }
            };
            rt.block_on(async move {
                let listener = match TcpListener::from_std(std_listener) {
                    Ok(l) => l,
                    Err(e) => {
                        log::error!("metrics endpoint: {e}");
                        return;
                    }
                };
                let bounded = Bounded {
                    inner: listener,
                    slots: Arc::new(Semaphore::new(MAX_CONNECTIONS)),
                };
                if let Err(e) = axum::serve(bounded, router(ep)).await {
                    log::error!("metrics endpoint stopped: {e}");
                }
            });
        })?;
    Ok(())
}

/// A listener that serves at most `MAX_CONNECTIONS` at once (others wait in
/// the kernel's backlog) and closes connections idle for `IDLE_TIMEOUT`.
struct Bounded {
    inner: TcpListener,
    slots: Arc<Semaphore>,
}

impl axum::serve::Listener for Bounded {
    type Io = Conn;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Conn, SocketAddr) {
        loop {
            let Ok(permit) = self.slots.clone().acquire_owned().await else {
                // The semaphore is never closed; wait as if it were full.
                std::future::pending::<()>().await;
                continue;
            };
            match self.inner.accept().await {
                Ok((stream, addr)) => {
                    let conn = Conn {
                        stream,
                        idle: Box::pin(tokio::time::sleep(IDLE_TIMEOUT)),
                        _permit: permit,
                    };
                    return (conn, addr);
                }
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    log::warn!("metrics endpoint: accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.inner.local_addr()
    }
}

struct Conn {
    stream: TcpStream,
    idle: Pin<Box<Sleep>>,
    _permit: OwnedSemaphorePermit,
}

impl Conn {
    /// Progress: the idle clock starts again.
    fn progressed(&mut self) {
        let deadline = tokio::time::Instant::now() + IDLE_TIMEOUT;
        self.idle.as_mut().reset(deadline);
    }

    /// Pending I/O: an error once the connection has been idle too long.
    fn idle_expired(&mut self, cx: &mut Context<'_>) -> Poll<io::Error> {
        match self.idle.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(io::Error::new(
                io::ErrorKind::TimedOut,
                "idle HTTP connection closed",
            )),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl AsyncRead for Conn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        match Pin::new(&mut this.stream).poll_read(cx, buf) {
            Poll::Ready(r) => {
                this.progressed();
                Poll::Ready(r)
            }
            Poll::Pending => this.idle_expired(cx).map(Err),
        }
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        match Pin::new(&mut this.stream).poll_write(cx, buf) {
            Poll::Ready(r) => {
                this.progressed();
                Poll::Ready(r)
            }
            Poll::Pending => this.idle_expired(cx).map(Err),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(cpu: u32, tid: u32, run_ns: u64) -> IntruderRecord {
        IntruderRecord {
            cpu,
            tid,
            tgid: tid,
            comm: format!("t{tid}"),
            class: ThreadClass::IntruderUser,
            run_ns,
            slices: 1,
            max_slice_ns: run_ns,
        }
    }

    #[test]
    fn a_short_recent_intruder_is_found_by_cpu_and_recency() {
        // A long-running one seen long ago, a short one just now, another CPU.
        let all = || vec![(rec(1, 10, 9_000_000), 100), (rec(1, 11, 20_000), 900), (rec(2, 12, 5_000_000), 950)];
        let by_run = IntrudersQuery::parse(Some("limit=1")).unwrap().select(all());
        assert_eq!(by_run.iter().map(|r| r.tid).collect::<Vec<_>>(), [10]);
        let recent = IntrudersQuery::parse(Some("cpu=1&sort=recent&limit=1")).unwrap().select(all());
        assert_eq!(recent.iter().map(|r| r.tid).collect::<Vec<_>>(), [11]);
        let default = IntrudersQuery::parse(None).unwrap().select(all());
        assert_eq!(default.iter().map(|r| r.tid).collect::<Vec<_>>(), [10, 12, 11]);
    }

    #[test]
    fn bad_parameters_name_themselves() {
        for (q, needle) in [
            ("cpu=x", "cpu: expected a CPU number"),
            ("sort=new", "sort: expected run or recent"),
            ("limit=0", "limit: expected 1 to"),
            ("tid=3", "unknown parameter \"tid\""),
        ] {
            let e = IntrudersQuery::parse(Some(q)).unwrap_err();
            assert!(e.contains(needle), "{q}: {e}");
        }
    }
}
