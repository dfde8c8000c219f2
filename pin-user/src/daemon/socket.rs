//! The daemon's end of the control socket (see [`crate::control`]): accepts
//! root clients, reads one request per line and hands each to the event
//! loop, which owns the state and answers; a closed connection is reported
//! too, so what it registered ends with it.
use std::{
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
};

use tokio::{
    io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader},
    net::{UnixListener, UnixStream},
    sync::{mpsc, oneshot},
};

use crate::control::{MAX_LINE, Reply, Request};

/// At most this many clients at once (they are root programs, but a stuck
/// one must not hold the daemon's memory).
const MAX_CONNECTIONS: usize = 64;

/// What the event loop gets from the socket.
#[derive(Debug)]
pub enum Message {
    Request {
        conn: u64,
        peer: u32,
        request: Request,
        reply: oneshot::Sender<Reply>,
    },
    Closed {
        conn: u64,
    },
}

/// The bound socket; the file is removed on drop.
pub struct Socket {
    path: PathBuf,
}

impl Drop for Socket {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Binds `path` (a leftover file is replaced: the caller holds the run
/// lock, so no other daemon listens there) and serves it on the current
/// runtime, sending what clients ask to `tx`.
pub fn spawn(path: &Path, tx: mpsc::Sender<Message>) -> std::io::Result<Socket> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let _ = std::fs::remove_file(path);
    let listener = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    let next = Arc::new(AtomicU64::new(1));
    let open = Arc::new(AtomicUsize::new(0));
    tokio::spawn(async move {
        loop {
            let stream = match listener.accept().await {
                Ok((s, _)) => s,
                Err(e) => {
                    log::warn!("control socket: accept: {e}");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            };
            if open.load(Ordering::Relaxed) >= MAX_CONNECTIONS {
                log::warn!("control socket: {MAX_CONNECTIONS} clients already; refusing one");
                continue;
            }
            open.fetch_add(1, Ordering::Relaxed);
            let conn = next.fetch_add(1, Ordering::Relaxed);
            let (tx, open) = (tx.clone(), open.clone());
            tokio::spawn(async move {
                serve(stream, conn, &tx).await;
                let _ = tx.send(Message::Closed { conn }).await;
                open.fetch_sub(1, Ordering::Relaxed);
            });
        }
    });
    Ok(Socket {
        path: path.to_owned(),
    })
}

async fn serve(stream: UnixStream, conn: u64, tx: &mpsc::Sender<Message>) {
    let peer = match stream.peer_cred() {
        Ok(c) if c.uid() == 0 => c.pid().and_then(|p| u32::try_from(p).ok()),
        Ok(c) => {
            log::warn!("control socket: refusing uid {} (root only)", c.uid());
            return;
        }
        Err(e) => {
            log::warn!("control socket: no peer credentials: {e}");
            return;
        }
    };
    let Some(peer) = peer else {
        return;
    };
    let (read, mut write) = stream.into_split();
    let mut lines = BufReader::new(read.take(u64::MAX)).lines();
    loop {
        // A line longer than MAX_LINE ends the connection.
        lines.get_mut().get_mut().set_limit(MAX_LINE as u64 + 1);
        let line = match lines.next_line().await {
            Ok(Some(l)) if l.len() <= MAX_LINE => l,
            _ => return,
        };
        let reply = match serde_json::from_str::<Request>(&line) {
            Ok(request) => {
                let (reply, answer) = oneshot::channel();
                let msg = Message::Request {
                    conn,
                    peer,
                    request,
                    reply,
                };
                if tx.send(msg).await.is_err() {
                    return;
                }
                match answer.await {
                    Ok(r) => r,
                    Err(_) => return,
                }
            }
            Err(e) => Reply {
                ok: false,
                error: Some(format!("not a request: {e}")),
                daemon: None,
            },
        };
        let mut out = serde_json::to_string(&reply).unwrap_or_default();
        out.push('\n');
        if write.write_all(out.as_bytes()).await.is_err() {
            return;
        }
    }
}
