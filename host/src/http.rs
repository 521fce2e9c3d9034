//! The opt-in HTTP server of a run: Prometheus `/metrics`, the recent progress records as
//! JSON on `/progress`, and the dashboard page on `/`, all served from the binary.
//!
//! It is a small HTTP/1.1 server: one thread accepts, each connection gets a thread (at
//! most 16 at a time; more are answered 503), its request is read (at most 16 KiB of head,
//! 5 s to send it), answered and the connection closed. That is all a Prometheus scraper
//! and a dashboard polling once a second need, without a web framework in the binary.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use crate::metrics::Metrics;
use crate::progress::ProgressHistory;

/// The dashboard: one page, its script and styles inline (no CDN).
const DASHBOARD: &str = include_str!("dashboard.html");

/// Longest request head accepted.
const MAX_HEAD: usize = 16 * 1024;

/// How long a client may take to send its request or read the answer.
const IO_TIMEOUT: Duration = Duration::from_secs(5);

/// Connections handled at once.
const MAX_CONNECTIONS: usize = 16;

/// What the server shows.
#[derive(Debug, Clone)]
pub struct Observed {
    /// Shown as the dashboard's title and in `/progress`.
    pub pipeline: String,
    /// The run's progress records.
    pub history: Arc<ProgressHistory>,
    /// The run's metrics.
    pub metrics: Arc<Metrics>,
}

impl Observed {
    /// Fresh metrics and a history of the last [`KEEP`] batches for `pipeline`.
    pub fn new(pipeline: &str) -> Self {
        Self { pipeline: pipeline.to_string(), history: Arc::new(ProgressHistory::new(KEEP)), metrics: Arc::default() }
    }

    /// The history and the metrics, as a run's observers.
    pub fn observers(&self) -> Vec<Arc<dyn crate::progress::Observer>> {
        vec![self.history.clone(), self.metrics.clone()]
    }
}

/// Progress records kept for `/progress` and the dashboard's charts.
pub const KEEP: usize = 300;

/// A running server; stopped when dropped.
pub struct Server {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Server {
    /// Listen on `addr` (`host:port`; port 0 picks a free one) and serve `observed`.
    pub fn start(addr: &str, observed: Observed) -> anyhow::Result<Self> {
        let addrs: Vec<SocketAddr> =
            addr.to_socket_addrs().map_err(|e| anyhow::anyhow!("the HTTP address {addr:?} is not a host:port to listen on ({e}); e.g. 127.0.0.1:4040"))?.collect();
        let listener = TcpListener::bind(&addrs[..]).map_err(|e| anyhow::anyhow!("cannot listen on {addr} for the HTTP server: {e}"))?;
        let addr = listener.local_addr()?;
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let stop = stop.clone();
            std::thread::Builder::new().name("sluice-http".into()).spawn(move || serve(listener, &observed, &stop))?
        };
        Ok(Self { addr, stop, thread: Some(thread) })
    }

    /// The address listened on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The dashboard's URL (a loopback address when listening on all interfaces).
    pub fn url(&self) -> String {
        format!("http://{}/", reachable(self.addr))
    }
}

/// `addr` with an unspecified IP (0.0.0.0, ::) replaced by loopback.
fn reachable(addr: SocketAddr) -> SocketAddr {
    let mut addr = addr;
    if addr.ip().is_unspecified() {
        addr.set_ip(if addr.is_ipv4() { [127, 0, 0, 1].into() } else { std::net::Ipv6Addr::LOCALHOST.into() });
    }
    addr
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the accept call.
        let _ = TcpStream::connect_timeout(&reachable(self.addr), Duration::from_secs(1));
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn serve(listener: TcpListener, observed: &Observed, stop: &AtomicBool) {
    let busy = Arc::new(AtomicUsize::new(0));
    for conn in listener.incoming() {
        if stop.load(Ordering::SeqCst) {
            return;
        }
        match conn {
            Ok(mut stream) => {
                if busy.fetch_add(1, Ordering::SeqCst) >= MAX_CONNECTIONS {
                    busy.fetch_sub(1, Ordering::SeqCst);
                    let _ = stream.set_write_timeout(Some(IO_TIMEOUT));
                    let _ = write(&mut stream, &Response::text("503 Service Unavailable", "too many connections; try again\n"), true);
                    continue;
                }
                let (observed, held) = (observed.clone(), busy.clone());
                let spawned = std::thread::Builder::new().name("sluice-http-conn".into()).spawn(move || {
                    if let Err(e) = handle(stream, &observed) {
                        tracing::debug!("HTTP request not answered: {e}");
                    }
                    held.fetch_sub(1, Ordering::SeqCst);
                });
                if let Err(e) = spawned {
                    tracing::warn!("HTTP server: cannot start a thread for a connection: {e}");
                    busy.fetch_sub(1, Ordering::SeqCst);
                }
            }
            Err(e) => {
                tracing::warn!("HTTP server: accepting a connection failed: {e}");
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

/// A response: status line, content type, body.
struct Response {
    status: &'static str,
    content_type: &'static str,
    body: Vec<u8>,
}

impl Response {
    fn text(status: &'static str, body: impl Into<String>) -> Self {
        Self { status, content_type: "text/plain; charset=utf-8", body: body.into().into_bytes() }
    }
}

fn handle(mut stream: TcpStream, observed: &Observed) -> std::io::Result<()> {
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    stream.set_write_timeout(Some(IO_TIMEOUT))?;
    let head = match read_head(&mut stream)? {
        Some(head) => head,
        None => return write(&mut stream, &Response::text("431 Request Header Fields Too Large", "request head over 16 KiB\n"), true),
    };
    let line = head.lines().next().unwrap_or_default();
    let mut parts = line.split(' ');
    let (method, target) = (parts.next().unwrap_or_default(), parts.next().unwrap_or_default());
    let path = target.split('?').next().unwrap_or_default();
    let response = match (method, path) {
        ("GET" | "HEAD", "/" | "/index.html") => Response { status: "200 OK", content_type: "text/html; charset=utf-8", body: DASHBOARD.as_bytes().to_vec() },
        ("GET" | "HEAD", "/metrics") => Response { status: "200 OK", content_type: crate::metrics::CONTENT_TYPE, body: observed.metrics.render().into_bytes() },
        ("GET" | "HEAD", "/progress") => {
            let body = serde_json::json!({"pipeline": observed.pipeline, "progress": observed.history.recent(), "tasks": observed.history.owned_tasks()});
            Response { status: "200 OK", content_type: "application/json", body: body.to_string().into_bytes() }
        }
        ("GET" | "HEAD", _) => Response::text("404 Not Found", "not found; try / (dashboard), /metrics or /progress\n"),
        _ => Response::text("405 Method Not Allowed", "only GET and HEAD\n"),
    };
    write(&mut stream, &response, method != "HEAD")
}

/// The request head (up to the blank line), or `None` when it is too long.
fn read_head(stream: &mut TcpStream) -> std::io::Result<Option<String>> {
    let mut head = Vec::with_capacity(1024);
    let mut buf = [0u8; 2048];
    loop {
        let n = stream.read(&mut buf)?;
        if n == 0 {
            break;
        }
        head.extend_from_slice(&buf[..n]);
        if head.windows(4).any(|w| w == b"\r\n\r\n") || head.windows(2).any(|w| w == b"\n\n") {
            break;
        }
        if head.len() > MAX_HEAD {
            return Ok(None);
        }
    }
    Ok(Some(String::from_utf8_lossy(&head).into_owned()))
}

fn write(stream: &mut TcpStream, response: &Response, body: bool) -> std::io::Result<()> {
    let head = format!(
        "HTTP/1.1 {}\r\nContent-Type: {}\r\nContent-Length: {}\r\nCache-Control: no-store\r\nConnection: close\r\n\r\n",
        response.status,
        response.content_type,
        response.body.len()
    );
    stream.write_all(head.as_bytes())?;
    if body {
        stream.write_all(&response.body)?;
    }
    stream.flush()?;
    // Closing with unread input (a request body, an overlong head) would reset the
    // connection before the client read the answer: say we are done, then drain a little.
    stream.shutdown(std::net::Shutdown::Write)?;
    stream.set_read_timeout(Some(Duration::from_millis(200)))?;
    let mut rest = [0u8; 4096];
    for _ in 0..16 {
        match stream.read(&mut rest) {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn get(addr: SocketAddr, request: &str) -> String {
        let mut s = TcpStream::connect(addr).unwrap();
        s.write_all(request.as_bytes()).unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        out
    }

    fn server() -> Server {
        Server::start("127.0.0.1:0", Observed::new("p")).unwrap()
    }

    #[test]
    fn serves_the_dashboard_metrics_and_progress_and_refuses_the_rest() {
        let server = server();
        let page = get(server.addr(), "GET / HTTP/1.1\r\nHost: x\r\n\r\n");
        assert!(page.starts_with("HTTP/1.1 200 OK\r\n") && page.contains("text/html") && page.contains("<canvas"), "{page}");
        let metrics = get(server.addr(), "GET /metrics HTTP/1.1\r\n\r\n");
        assert!(metrics.contains("version=0.0.4") && metrics.contains("sluice_batches_total 0"), "{metrics}");
        let progress = get(server.addr(), "GET /progress?x=1 HTTP/1.1\r\n\r\n");
        assert!(progress.ends_with(r#"{"pipeline":"p","progress":[],"tasks":null}"#), "{progress}");
        assert!(get(server.addr(), "GET /nope HTTP/1.1\r\n\r\n").starts_with("HTTP/1.1 404 "));
        assert!(get(server.addr(), "POST /metrics HTTP/1.1\r\n\r\n").starts_with("HTTP/1.1 405 "));
        let head = get(server.addr(), "HEAD /metrics HTTP/1.1\r\n\r\n");
        assert!(head.ends_with("\r\n\r\n"), "HEAD has no body: {head}");
        let long = format!("GET / HTTP/1.1\r\nX: {}\r\n\r\n", "a".repeat(20_000));
        assert!(get(server.addr(), &long).starts_with("HTTP/1.1 431 "));
    }

    #[test]
    fn progress_lists_a_group_process_s_tasks_with_their_last_batch() {
        use crate::progress::{BatchProgress, Observer};
        let observed = Observed::new("p");
        let server = Server::start("127.0.0.1:0", observed.clone()).unwrap();
        let history = observed.history.as_ref();
        history.tasks(&["t/0".into(), "t/1".into()]);
        let batch = |task: &str, batch_id| {
            let p = BatchProgress { batch_id, task: Some(task.into()), records: 10, ..BatchProgress::default() };
            history.batch(&p, &p.to_json());
        };
        batch("t/1", 4);
        batch("t/1", 5);
        batch("t/9", 1);
        let body = |r: String| serde_json::from_str::<serde_json::Value>(r.split_once("\r\n\r\n").unwrap().1).unwrap();
        let tasks = body(get(server.addr(), "GET /progress HTTP/1.1\r\n\r\n"))["tasks"].clone();
        assert_eq!(tasks[0], serde_json::json!({"task": "t/0", "last": null}), "no batch yet");
        assert_eq!((tasks[1]["task"].as_str(), tasks[1]["last"]["batch_id"].as_u64()), (Some("t/1"), Some(5)), "its last batch");
        assert_eq!(tasks.as_array().unwrap().len(), 2, "only tasks it owns: {tasks}");
        // t/0 moves away, t/2 comes: t/1 keeps its last batch.
        history.tasks(&["t/1".into(), "t/2".into()]);
        let tasks = body(get(server.addr(), "GET /progress HTTP/1.1\r\n\r\n"))["tasks"].clone();
        let shown: Vec<(&str, Option<u64>)> = tasks.as_array().unwrap().iter().map(|t| (t["task"].as_str().unwrap(), t["last"]["batch_id"].as_u64())).collect();
        assert_eq!(shown, vec![("t/1", Some(5)), ("t/2", None)]);
    }

    #[test]
    fn a_client_that_never_sends_does_not_hold_up_the_next_one_and_drop_stops_the_server() {
        let server = server();
        let _silent = TcpStream::connect(server.addr()).unwrap();
        let started = std::time::Instant::now();
        assert!(get(server.addr(), "GET /metrics HTTP/1.1\r\n\r\n").starts_with("HTTP/1.1 200 "));
        assert!(started.elapsed() < Duration::from_secs(2), "answered while another client is silent");
        let addr = server.addr();
        drop(server);
        assert!(TcpStream::connect(addr).is_err(), "the port is closed after drop");
    }

    #[test]
    fn a_bad_or_taken_address_says_what_is_wrong() {
        let e = Server::start("localhost", Observed::new("p")).err().unwrap().to_string();
        assert!(e.contains("not a host:port") && e.contains("127.0.0.1:4040"), "{e}");
        let first = server();
        let taken = first.addr().to_string();
        let e = Server::start(&taken, Observed::new("p")).err().unwrap().to_string();
        assert!(e.contains(&format!("cannot listen on {taken} for the HTTP server")), "{e}");
    }
}
