//! `pinguard top` in a real pseudo-terminal: the screen shows the guarded
//! CPU and a busy intruder on it, `q` quits with exit 0 and the terminal is
//! restored (alternate screen left, cursor shown). From the kernel's maps
//! (a probe of its own) and from a running daemon's endpoints.
//! CPU 1 is guarded; CPU 0 is housekeeping.
use std::{
    fs::File,
    io::{Read as _, Write as _},
    process::{Child, Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
        mpsc::{self, RecvTimeoutError},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use nix::pty::{Winsize, openpty};
use testkit::{
    daemon::Daemon,
    env::{missing_bpf, missing_kvm, pinguard_bin},
    guest::{Guest, GuestOptions},
    process::run,
    require,
    threads::{Worker, spin},
};

/// Bound on the first screen with the intruder (probe load, plan, two refreshes).
const SCREEN_TIMEOUT: Duration = Duration::from_secs(30);
const EXIT_TIMEOUT: Duration = Duration::from_secs(10);
const ROWS: u16 = 40;
const COLS: u16 = 150;

/// Leaving the alternate screen, showing the cursor: what a clean exit writes last.
const LEAVE_ALT: &[u8] = b"\x1b[?1049l";
const ENTER_ALT: &[u8] = b"\x1b[?1049h";
const SHOW_CURSOR: &[u8] = b"\x1b[?25h";

/// `pinguard ARGS` on a pseudo-terminal; killed on drop if still running.
struct Tty {
    child: Child,
    writer: File,
    output: mpsc::Receiver<Vec<u8>>,
    /// Everything it wrote so far.
    raw: Vec<u8>,
    screen: vt100::Parser,
}

impl Tty {
    fn spawn(args: &[&str]) -> Self {
        let size = Winsize {
            ws_row: ROWS,
            ws_col: COLS,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        let pty = openpty(Some(&size), None).expect("openpty");
        let side = |fd: &std::os::fd::OwnedFd| Stdio::from(fd.try_clone().expect("dup pty"));
        let child = Command::new(pinguard_bin())
            .args(args)
            .stdin(side(&pty.slave))
            .stdout(side(&pty.slave))
            .stderr(side(&pty.slave))
            .spawn()
            .expect("starting pinguard top");
        // Only the child holds the terminal side now: reads end (EIO) when it exits.
        drop(pty.slave);
        let writer = File::from(pty.master.try_clone().expect("dup pty master"));
        let mut reader = File::from(pty.master);
        let (tx, output) = mpsc::channel();
        std::thread::spawn(move || {
            let mut buf = [0u8; 8192];
            while let Ok(n) = reader.read(&mut buf) {
                if n == 0 || tx.send(buf[..n].to_vec()).is_err() {
                    break;
                }
            }
        });
        Self {
            child,
            writer,
            output,
            raw: Vec::new(),
            screen: vt100::Parser::new(ROWS, COLS, 0),
        }
    }

    fn contents(&self) -> String {
        self.screen.screen().contents()
    }

    fn take(&mut self, chunk: Vec<u8>) {
        self.screen.process(&chunk);
        self.raw.extend_from_slice(&chunk);
    }

    /// Waits until the screen satisfies `want` (its lines); panics with the
    /// screen after `timeout`.
    fn wait_screen(&mut self, what: &str, want: impl Fn(&[&str]) -> bool) -> String {
        let deadline = Instant::now() + SCREEN_TIMEOUT;
        loop {
            let text = self.contents();
            if want(&text.lines().collect::<Vec<_>>()) {
                return text;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            match self.output.recv_timeout(left) {
                Ok(chunk) => self.take(chunk),
                Err(RecvTimeoutError::Timeout) => {
                    panic!("timed out after {SCREEN_TIMEOUT:?} waiting for {what}; screen:\n{text}")
                }
                Err(RecvTimeoutError::Disconnected) => {
                    let status = self.child.try_wait();
                    panic!(
                        "pinguard top exited ({status:?}) before showing {what}; screen:\n{text}"
                    )
                }
            }
        }
    }

    fn press(&mut self, key: &[u8]) {
        self.writer.write_all(key).expect("writing to the terminal");
    }

    /// Waits for the exit and for everything it wrote; its exit code.
    fn finish(&mut self) -> Option<i32> {
        let deadline = Instant::now() + EXIT_TIMEOUT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.output.recv_timeout(left) {
                Ok(chunk) => self.take(chunk),
                Err(RecvTimeoutError::Disconnected) => break,
                Err(RecvTimeoutError::Timeout) => panic!(
                    "pinguard top did not exit within {EXIT_TIMEOUT:?}; screen:\n{}",
                    self.contents()
                ),
            }
        }
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait().expect("waiting for pinguard top") {
                return status.code();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("pinguard top closed its terminal but did not exit within {EXIT_TIMEOUT:?}");
    }
}

impl Drop for Tty {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// A thread named pg-top-intruder busy on CPU 1 until dropped.
struct Intruder {
    tid: u32,
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<()>>,
}

impl Intruder {
    fn start() -> Self {
        let worker = Worker::spawn_on("pg-top-intruder", &[1]);
        let tid = worker.tid();
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        // Bursts with short sleeps: it keeps running in every interval
        // without taking the whole CPU from the kernel's own threads.
        let handle = std::thread::spawn(move || {
            worker.run(move || {
                while !flag.load(Ordering::Relaxed) {
                    spin(Duration::from_millis(5));
                    std::thread::sleep(Duration::from_millis(1));
                }
            })
        });
        Self {
            tid,
            stop,
            handle: Some(handle),
        }
    }
}

impl Drop for Intruder {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

/// The guarded CPUs table has a row for CPU 1 (the line under its header).
fn shows_cpu1(lines: &[&str]) -> bool {
    lines
        .iter()
        .position(|l| l.contains("OWNER") && l.contains("INTRUD%"))
        .and_then(|i| lines.get(i + 1))
        .is_some_and(|row| row.trim_start_matches(['│', ' ']).starts_with("1 "))
}

fn shows_intruder(lines: &[&str], tid: u32) -> bool {
    lines.iter().any(|l| {
        l.contains("pg-top-intruder") && l.contains(&tid.to_string()) && l.contains("intruder_user")
    })
}

/// Quits with `key`: exit 0, and the terminal back as it was.
fn quit_cleanly(tty: &mut Tty, key: &[u8]) {
    tty.press(key);
    let code = tty.finish();
    assert_eq!(code, Some(0), "exit code; screen:\n{}", tty.contents());
    let raw = &tty.raw;
    let last = |needle: &[u8]| raw.windows(needle.len()).rposition(|w| w == needle);
    let (entered, left) = (last(ENTER_ALT), last(LEAVE_ALT));
    assert!(
        entered.is_some() && left > entered,
        "the alternate screen was not left after it was entered (enter at {entered:?}, leave at {left:?})"
    );
    let tail = &raw[left.unwrap()..];
    assert!(
        tail.ends_with(SHOW_CURSOR),
        "the output does not end by showing the cursor; its last bytes: {:?}",
        String::from_utf8_lossy(&raw[raw.len().saturating_sub(64)..])
    );
    let screen = tty.screen.screen();
    assert!(!screen.alternate_screen(), "still on the alternate screen");
    assert!(!screen.hide_cursor(), "the cursor is still hidden");
}

#[test]
fn local_view_shows_the_guarded_cpu_and_a_busy_intruder_and_q_restores_the_terminal() {
    require!(missing_bpf());
    let intruder = Intruder::start();
    let mut tty = Tty::spawn(&["top", "--guard", "1"]);
    tty.wait_screen("CPU 1's row and pg-top-intruder", |l| {
        shows_cpu1(l) && shows_intruder(l, intruder.tid)
    });
    // `s` cycles the intruder list's sort.
    tty.press(b"s");
    tty.wait_screen("the list sorted by total", |l| {
        l.iter().any(|l| l.contains("sorted by total"))
    });
    quit_cleanly(&mut tty, b"q");
}

#[test]
fn local_view_names_the_guest_vcpu_that_owns_the_cpu() {
    require!(missing_kvm());
    // Paused: its vCPU thread exists and is planned onto CPU 1, running nothing.
    let g = Guest::start(GuestOptions::new("top-g1"));
    let mut tty = Tty::spawn(&["top", "--guard", "1"]);
    tty.wait_screen("CPU 1 owned by top-g1/vcpu0", |l| {
        shows_cpu1(l) && l.iter().any(|l| l.contains("top-g1/vcpu0"))
    });
    quit_cleanly(&mut tty, b"q");
    drop(g);
}

#[test]
fn daemon_view_shows_intruders_and_violations_from_its_endpoints() {
    require!(missing_bpf());
    // Named before the daemon first sees it: its violation names it so.
    let intruder = Intruder::start();
    let daemon = Daemon::start("mode = \"observe\"\n", &[]);
    let url = format!("http://{}", daemon.addr);
    // --guard picks among the daemon's CPUs; one it does not guard is refused.
    let mut refused = Tty::spawn(&["top", "--url", &url, "--guard", "0"]);
    assert_eq!(refused.finish(), Some(2), "screen:\n{}", refused.contents());
    let text = refused.contents();
    assert!(
        text.contains("does not guard CPU(s) 0 (it guards 1)"),
        "the refusal says which CPUs the daemon guards:\n{text}"
    );
    let mut tty = Tty::spawn(&["top", "--url", &url, "--guard", "1"]);
    let violation = format!("CPU 1 pg-top-intruder ({})", intruder.tid);
    let text = tty.wait_screen("CPU 1, the intruder and its violation", |l| {
        shows_cpu1(l)
            && shows_intruder(l, intruder.tid)
            && l.iter()
                .any(|l| l.contains("intruder") && l.contains(&violation))
    });
    assert!(
        text.contains(&format!("daemon at {url}")),
        "the title names the daemon:\n{text}"
    );
    // Ctrl-C (a key in raw mode) quits as cleanly as q.
    quit_cleanly(&mut tty, b"\x03");
}

#[test]
fn bad_input_is_refused_before_the_screen_changes() {
    let r = run(
        &["top", "--url", "https://127.0.0.1:9477"],
        Duration::from_secs(10),
    );
    assert_eq!(r.code(), Some(2), "stderr: {}", r.stderr);
    assert!(r.stderr.contains("plain HTTP"), "stderr: {}", r.stderr);
    // Not on a terminal (stdout is a pipe here): refused, with what to use instead.
    let r = run(
        &["top", "--url", "http://127.0.0.1:1"],
        Duration::from_secs(10),
    );
    assert_eq!(r.code(), Some(2), "stderr: {}", r.stderr);
    assert!(
        r.stderr.contains("stdout is not one"),
        "stderr: {}",
        r.stderr
    );
    // On a terminal, a daemon that is not there: an error on the normal
    // screen, which was never switched.
    let port = testkit::http::free_port();
    let mut tty = Tty::spawn(&["top", "--url", &format!("http://127.0.0.1:{port}")]);
    assert_eq!(tty.finish(), Some(2), "screen:\n{}", tty.contents());
    let text = tty.contents();
    assert!(
        text.contains(&format!("GET http://127.0.0.1:{port}/metrics"))
            && text.contains("is `pinguard run` listening there?"),
        "the error names the URL and what to check:\n{text}"
    );
    let entered = tty.raw.windows(ENTER_ALT.len()).any(|w| w == ENTER_ALT);
    assert!(!entered, "the alternate screen was entered for an error");
}
