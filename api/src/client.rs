//! A minimal HTTP/1.1 client for the control API's Unix socket (one request per connection); its
//! request and response handling ([`exchange`]) also serves the daemon's TLS peer client.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Errors talking to a VM's API socket.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error(
        "cannot connect to the API socket {path}: {source} (is the VM running with --api-socket?)"
    )]
    Connect {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("API socket {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("API socket {path}: malformed HTTP response: {reason}")]
    Response { path: PathBuf, reason: String },
}

/// An API response: status and JSON body.
pub struct ApiResponse {
    pub status: u16,
    pub body: serde_json::Value,
}

/// The message of an API's `{"error": ...}` answer, or the whole answer when it has none.
pub fn error_message(body: &serde_json::Value) -> String {
    body["error"]
        .as_str()
        .map_or_else(|| body.to_string(), str::to_string)
}

/// Sends one request and reads the whole response.
pub fn request(
    socket: &Path,
    method: &str,
    path: &str,
    body: Option<&serde_json::Value>,
    timeout: Duration,
) -> Result<ApiResponse, ClientError> {
    let io = |source| ClientError::Io {
        path: socket.to_path_buf(),
        source,
    };
    let mut stream = connect(socket)?;
    stream.set_read_timeout(Some(timeout)).map_err(io)?;
    let deadline = std::time::Instant::now() + timeout;
    exchange(&mut stream, method, path, body, &[], deadline).map_err(|e| match e {
        ExchangeError::Io(source) => io(source),
        ExchangeError::Response(reason) => ClientError::Response {
            path: socket.to_path_buf(),
            reason,
        },
    })
}

/// What went wrong in one HTTP exchange.
#[derive(Debug)]
pub enum ExchangeError {
    Io(std::io::Error),
    Response(String),
}

/// Largest response read: a server (a peer daemon, a VM's API) cannot make the client hold more.
pub const MAX_RESPONSE_BYTES: usize = 16 << 20;

/// Writes one HTTP/1.1 request (`Connection: close`, JSON body, any `headers`) to `stream` and reads
/// the whole response, at most [`MAX_RESPONSE_BYTES`] and until `deadline` (each read's own timeout
/// is the stream's): the request and response plumbing that the Unix-socket client and the daemon's
/// TLS peer client share.
pub fn exchange(
    stream: &mut (impl Read + Write),
    method: &str,
    path: &str,
    body: Option<&serde_json::Value>,
    headers: &[(&str, &str)],
    deadline: std::time::Instant,
) -> Result<ApiResponse, ExchangeError> {
    let payload = body.map(|b| b.to_string()).unwrap_or_default();
    let mut head = format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n",
        payload.len()
    );
    for (name, value) in headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str("\r\n");
    stream
        .write_all(head.as_bytes())
        .and_then(|()| stream.write_all(payload.as_bytes()))
        .and_then(|()| stream.flush())
        .map_err(ExchangeError::Io)?;
    let raw = read_response(stream, deadline)?;
    parse_response(&raw).map_err(ExchangeError::Response)
}

/// Reads until the server closes, refusing more than [`MAX_RESPONSE_BYTES`] or reading past
/// `deadline`.
fn read_response(
    stream: &mut impl Read,
    deadline: std::time::Instant,
) -> Result<Vec<u8>, ExchangeError> {
    let mut raw = Vec::new();
    let mut chunk = [0u8; 16 << 10];
    loop {
        if std::time::Instant::now() > deadline {
            return Err(ExchangeError::Io(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("the response took too long ({} bytes so far)", raw.len()),
            )));
        }
        match stream.read(&mut chunk) {
            Ok(0) => return Ok(raw),
            Ok(n) if raw.len() + n > MAX_RESPONSE_BYTES => {
                return Err(ExchangeError::Response(format!(
                    "the response is over {MAX_RESPONSE_BYTES} bytes"
                )))
            }
            Ok(n) => raw.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            // A TLS peer may close without close_notify once its response is complete.
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof && !raw.is_empty() => {
                return Ok(raw)
            }
            Err(e) => return Err(ExchangeError::Io(e)),
        }
    }
}

/// A new connection to the API socket.
fn connect(socket: &Path) -> Result<UnixStream, ClientError> {
    UnixStream::connect(socket).map_err(|source| ClientError::Connect {
        path: socket.to_path_buf(),
        source,
    })
}

/// Opens a long-lived `GET path` (an event stream) and returns its body to read as it comes. The
/// request is HTTP/1.0, so the body arrives as is (no chunked framing) until the server closes it.
pub fn stream(socket: &Path, path: &str) -> Result<std::io::BufReader<UnixStream>, ClientError> {
    use std::io::BufRead;
    let io = |source| ClientError::Io {
        path: socket.to_path_buf(),
        source,
    };
    let mut stream = connect(socket)?;
    stream
        .write_all(format!("GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").as_bytes())
        .map_err(io)?;
    let mut reader = std::io::BufReader::new(stream);
    let mut status_line = String::new();
    reader.read_line(&mut status_line).map_err(io)?;
    if status_line.split_whitespace().nth(1) != Some("200") {
        return Err(ClientError::Response {
            path: socket.to_path_buf(),
            reason: format!("{path}: {}", status_line.trim()),
        });
    }
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).map_err(io)? == 0 || line.trim().is_empty() {
            return Ok(reader);
        }
    }
}

fn parse_response(raw: &[u8]) -> Result<ApiResponse, String> {
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut resp = httparse::Response::new(&mut headers);
    let header_len = match resp.parse(raw).map_err(|e| e.to_string())? {
        httparse::Status::Complete(n) => n,
        httparse::Status::Partial => return Err("incomplete response".into()),
    };
    let status = resp.code.ok_or("no status code")?;
    let chunked = resp.headers.iter().any(|h| {
        h.name.eq_ignore_ascii_case("transfer-encoding")
            && String::from_utf8_lossy(h.value).contains("chunked")
    });
    let mut body = raw[header_len..].to_vec();
    if chunked {
        body = dechunk(&body)?;
    }
    let body = if body.is_empty() {
        serde_json::Value::Null
    } else {
        serde_json::from_slice(&body).map_err(|e| format!("body is not JSON: {e}"))?
    };
    Ok(ApiResponse { status, body })
}

fn dechunk(mut data: &[u8]) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    loop {
        let line_end = data
            .windows(2)
            .position(|w| w == b"\r\n")
            .ok_or("bad chunk header")?;
        let size_text = std::str::from_utf8(&data[..line_end]).map_err(|e| e.to_string())?;
        let size = usize::from_str_radix(size_text.split(';').next().unwrap_or("").trim(), 16)
            .map_err(|e| format!("bad chunk size {size_text:?}: {e}"))?;
        data = &data[line_end + 2..];
        if size == 0 {
            return Ok(out);
        }
        if data.len() < size + 2 {
            return Err("truncated chunk".into());
        }
        out.extend_from_slice(&data[..size]);
        data = &data[size + 2..];
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A server's side that sends `total` bytes in pieces of `piece`, sleeping `pause` before each.
    struct Endless {
        sent: usize,
        total: usize,
        piece: usize,
        pause: Duration,
    }

    impl Read for Endless {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            std::thread::sleep(self.pause);
            let n = self.piece.min(buf.len()).min(self.total - self.sent);
            buf[..n].fill(b'x');
            self.sent += n;
            Ok(n)
        }
    }

    #[test]
    fn a_response_is_read_within_its_size_and_its_deadline() {
        let far = std::time::Instant::now() + Duration::from_secs(60);
        let mut big = Endless {
            sent: 0,
            total: usize::MAX,
            piece: 1 << 16,
            pause: Duration::ZERO,
        };
        assert!(matches!(
            read_response(&mut big, far),
            Err(ExchangeError::Response(m)) if m.contains("over")
        ));
        assert!(big.sent <= MAX_RESPONSE_BYTES + (1 << 16));

        let mut dribble = Endless {
            sent: 0,
            total: usize::MAX,
            piece: 1,
            pause: Duration::from_millis(20),
        };
        let soon = std::time::Instant::now() + Duration::from_millis(200);
        assert!(matches!(
            read_response(&mut dribble, soon),
            Err(ExchangeError::Io(e)) if e.kind() == std::io::ErrorKind::TimedOut
        ));

        let mut whole = Endless {
            sent: 0,
            total: 10,
            piece: 3,
            pause: Duration::ZERO,
        };
        assert_eq!(read_response(&mut whole, far).unwrap(), vec![b'x'; 10]);
    }

    #[test]
    fn parses_plain_and_chunked_responses() {
        let r =
            parse_response(b"HTTP/1.1 409 Conflict\r\ncontent-length: 13\r\n\r\n{\"error\":\"x\"}")
                .unwrap();
        assert_eq!(r.status, 409);
        assert_eq!(r.body["error"], "x");
        let r = parse_response(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n4\r\n{\"a\"\r\n3\r\n:1}\r\n0\r\n\r\n").unwrap();
        assert_eq!(r.body["a"], 1);
        assert!(parse_response(b"garbage").is_err());
        assert!(parse_response(b"HTTP/1.1 200 OK\r\n\r\nnot json").is_err());
    }
}
