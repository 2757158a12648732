//! A fault-injecting HTTP proxy in front of the real registry: it forwards requests unchanged
//! but can corrupt blob bodies, answer 429 with Retry-After (and measure how long the client
//! waited before asking again), or drop a connection in the middle of a blob. Loopback only; every connection is closed after one exchange.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Faults to inject into blob GETs (`/v2/.../blobs/sha256:...`).
#[derive(Default)]
pub struct Faults {
    /// Flip one byte in the middle of every blob body.
    pub corrupt: AtomicBool,
    /// Answer this many blob GETs with 429 and `Retry-After: retry_after` seconds.
    pub too_many: AtomicU32,
    pub retry_after: AtomicU32,
    /// For each blob answered 429: how long until the client asked for it again.
    pub retry_gaps: Mutex<Vec<Duration>>,
    throttled: Mutex<HashMap<String, Instant>>,
    /// Blob GETs that asked for a byte range (a resumed download).
    pub ranged_gets: AtomicU32,
    /// Forward blob GETs without their `Range` header, like a server that ignores it.
    pub ignore_range: AtomicBool,
    /// Cut this many blob bodies in half and close the connection.
    pub drop_mid_blob: AtomicU32,
    /// Blob GETs seen.
    pub blob_gets: AtomicU32,
    /// Hold every blob transfer (a blob GET, an upload's PUT) this long before answering, so
    /// concurrent ones overlap.
    pub delay_ms: AtomicU32,
    /// Blob transfers in progress now, and the most seen at once.
    pub active: AtomicU32,
    pub max_active: AtomicU32,
}

/// Counts a blob transfer as active while it lives.
struct Active<'a>(&'a Faults);

impl<'a> Active<'a> {
    fn new(f: &'a Faults) -> Active<'a> {
        let now = f.active.fetch_add(1, Ordering::SeqCst) + 1;
        f.max_active.fetch_max(now, Ordering::SeqCst);
        Active(f)
    }
}

impl Drop for Active<'_> {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::SeqCst);
    }
}

pub struct FaultProxy {
    pub host: String,
    pub faults: Arc<Faults>,
}

impl FaultProxy {
    /// Listens on a free port of 127.0.0.1 and forwards to `upstream` (`host:port`).
    pub fn start(upstream: &str) -> FaultProxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let host = listener.local_addr().unwrap().to_string();
        let faults = Arc::new(Faults::default());
        let (f, up) = (Arc::clone(&faults), upstream.to_string());
        std::thread::spawn(move || {
            for conn in listener.incoming().flatten() {
                let (f, up) = (Arc::clone(&f), up.clone());
                std::thread::spawn(move || {
                    let _ = handle(conn, &up, &f);
                });
            }
        });
        FaultProxy { host, faults }
    }
}

fn read_head(s: &mut TcpStream) -> std::io::Result<Vec<u8>> {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if s.read(&mut byte)? == 0 {
            break;
        }
        head.push(byte[0]);
    }
    Ok(head)
}

fn content_length(head: &[u8]) -> Option<usize> {
    String::from_utf8_lossy(head).lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.trim()
            .eq_ignore_ascii_case("content-length")
            .then(|| v.trim().parse().ok())?
    })
}

/// Replaces any Connection header by `Connection: close`.
fn close_after(head: &[u8]) -> Vec<u8> {
    let text = String::from_utf8_lossy(head);
    let mut out = String::new();
    for line in text.split("\r\n").filter(|l| !l.is_empty()) {
        if !line.to_ascii_lowercase().starts_with("connection:") {
            out.push_str(line);
            out.push_str("\r\n");
        }
    }
    out.push_str("Connection: close\r\n\r\n");
    out.into_bytes()
}

/// The request head without its `Range` header.
fn without_range(head: &[u8]) -> Vec<u8> {
    String::from_utf8_lossy(head)
        .split_inclusive("\r\n")
        .filter(|l| !l.to_ascii_lowercase().starts_with("range:"))
        .collect::<String>()
        .into_bytes()
}

fn handle(mut client: TcpStream, upstream: &str, faults: &Faults) -> std::io::Result<()> {
    let head = read_head(&mut client)?;
    let mut body = vec![0u8; content_length(&head).unwrap_or(0)];
    client.read_exact(&mut body)?;
    let request_line = String::from_utf8_lossy(&head)
        .lines()
        .next()
        .unwrap_or("")
        .to_string();
    let blob_get = request_line.starts_with("GET ") && request_line.contains("/blobs/sha256:");
    let upload = request_line.starts_with("PUT ") && request_line.contains("/blobs/uploads/");
    let _active = (blob_get || upload).then(|| Active::new(faults));
    if upload {
        let delay = faults.delay_ms.load(Ordering::SeqCst);
        std::thread::sleep(Duration::from_millis(delay.into()));
    }
    if blob_get {
        faults.blob_gets.fetch_add(1, Ordering::SeqCst);
        let path = request_line.split(' ').nth(1).unwrap_or("").to_string();
        if let Some(at) = faults.throttled.lock().unwrap().remove(&path) {
            faults.retry_gaps.lock().unwrap().push(at.elapsed());
        }
        if String::from_utf8_lossy(&head)
            .to_ascii_lowercase()
            .contains("\r\nrange: bytes=")
        {
            faults.ranged_gets.fetch_add(1, Ordering::SeqCst);
        }
        let delay = faults.delay_ms.load(Ordering::SeqCst);
        std::thread::sleep(Duration::from_millis(delay.into()));
        let left = faults.too_many.load(Ordering::SeqCst);
        if left > 0 {
            faults.too_many.store(left - 1, Ordering::SeqCst);
            let wait = faults.retry_after.load(Ordering::SeqCst);
            // Noted before the answer goes out: the client may start waiting as soon as the
            // bytes are sent, before this thread runs again.
            faults
                .throttled
                .lock()
                .unwrap()
                .insert(path, Instant::now());
            client.write_all(format!("HTTP/1.1 429 Too Many Requests\r\nRetry-After: {wait}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n").as_bytes())?;
            return Ok(());
        }
    }
    let mut up = TcpStream::connect(upstream)?;
    let mut forwarded = close_after(&head);
    if blob_get && faults.ignore_range.load(Ordering::SeqCst) {
        forwarded = without_range(&forwarded);
    }
    up.write_all(&forwarded)?;
    up.write_all(&body)?;
    let mut response = Vec::new();
    up.read_to_end(&mut response)?;
    let split = response
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map_or(response.len(), |p| p + 4);
    let (resp_head, resp_body) = response.split_at(split);
    let ok = resp_head.starts_with(b"HTTP/1.1 200");
    if blob_get && ok && !resp_body.is_empty() {
        let drops = faults.drop_mid_blob.load(Ordering::SeqCst);
        if drops > 0 {
            faults.drop_mid_blob.store(drops - 1, Ordering::SeqCst);
            client.write_all(resp_head)?;
            client.write_all(&resp_body[..resp_body.len() / 2])?;
            return Ok(());
        }
        if faults.corrupt.load(Ordering::SeqCst) {
            let mut bad = resp_body.to_vec();
            let mid = bad.len() / 2;
            bad[mid] ^= 0x01;
            client.write_all(resp_head)?;
            client.write_all(&bad)?;
            return Ok(());
        }
    }
    client.write_all(&response)
}
