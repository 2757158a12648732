//! A logging proxy in front of the container engine's API socket: a unix socket of its own
//! that forwards every byte to the engine's and notes each request line (`POST
//! /v1.41/containers/create ...`) clients send, so a test can tell which engine a program
//! spoke to. Connections are spliced both ways; HTTP keep-alive and upgrades pass unchanged.

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

pub struct EngineProxy {
    pub socket: PathBuf,
    requests: Arc<Mutex<Vec<String>>>,
}

/// The request lines in a chunk of client bytes: lines that start with an HTTP method and end
/// with the protocol.
fn request_lines(bytes: &[u8]) -> Vec<String> {
    String::from_utf8_lossy(bytes)
        .split("\r\n")
        .filter(|l| {
            l.ends_with("HTTP/1.1")
                && ["GET ", "POST ", "PUT ", "DELETE ", "HEAD "]
                    .iter()
                    .any(|m| l.starts_with(m))
        })
        .map(str::to_string)
        .collect()
}

impl EngineProxy {
    /// Listens on `socket`, forwarding to `upstream`.
    pub fn start(socket: &Path, upstream: &Path) -> EngineProxy {
        let listener = UnixListener::bind(socket).unwrap();
        let requests = Arc::new(Mutex::new(Vec::new()));
        let seen = Arc::clone(&requests);
        let upstream = upstream.to_path_buf();
        std::thread::spawn(move || {
            for client in listener.incoming().flatten() {
                let Ok(server) = UnixStream::connect(&upstream) else {
                    continue;
                };
                let (mut c_read, mut s_write) =
                    (client.try_clone().unwrap(), server.try_clone().unwrap());
                let seen = Arc::clone(&seen);
                std::thread::spawn(move || {
                    let mut buf = vec![0u8; 64 << 10];
                    while let Ok(n) = c_read.read(&mut buf) {
                        if n == 0 || s_write.write_all(&buf[..n]).is_err() {
                            break;
                        }
                        seen.lock().unwrap().extend(request_lines(&buf[..n]));
                    }
                    let _ = s_write.shutdown(std::net::Shutdown::Write);
                });
                let (mut s_read, mut c_write) = (server, client);
                std::thread::spawn(move || {
                    let _ = std::io::copy(&mut s_read, &mut c_write);
                    let _ = c_write.shutdown(std::net::Shutdown::Write);
                });
            }
        });
        EngineProxy {
            socket: socket.to_path_buf(),
            requests,
        }
    }

    /// The request lines seen so far.
    pub fn requests(&self) -> Vec<String> {
        self.requests.lock().unwrap().clone()
    }
}
