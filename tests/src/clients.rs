//! Clients of the test guest's services, run from inside a test's network namespace.

use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

/// Joins the calling thread (only) to the network namespace `netns` and connects to `addr`, with
/// `reply_timeout` on reads.
fn connect_from(netns: &str, addr: &str, reply_timeout: Duration) -> Result<TcpStream, String> {
    let path = format!("/var/run/netns/{netns}");
    let ns = std::fs::File::open(&path).map_err(|e| e.to_string())?;
    // SAFETY: joins this thread (only) to the namespace; no memory is shared with the kernel.
    let ret = unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&ns), libc::CLONE_NEWNET) };
    if ret != 0 {
        return Err(format!("setns: {}", std::io::Error::last_os_error()));
    }
    let target = addr.parse().map_err(|e| format!("{addr}: {e}"))?;
    let s =
        TcpStream::connect_timeout(&target, Duration::from_secs(20)).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(reply_timeout))
        .map_err(|e| e.to_string())?;
    Ok(s)
}

/// Keeps one connection to the key-value service at `addr` and, until `stop`, sends in one go
/// `GET last`, `INCR counter` and `SET last <the expected new value>`, from a thread inside the
/// network namespace `netns`. Every increment must be exactly one more than the last and `last`
/// must hold the previous acknowledged value: a gap means an acknowledged write was lost. Each
/// value is also stored in `acknowledged`. Returns the last value.
pub fn incrementer(
    netns: &str,
    addr: String,
    stop: Arc<AtomicBool>,
    acknowledged: Arc<AtomicU64>,
    reply_timeout: Duration,
) -> JoinHandle<Result<u64, String>> {
    let netns = netns.to_string();
    std::thread::spawn(move || {
        let mut r = BufReader::new(connect_from(&netns, &addr, reply_timeout)?);
        let mut last = 0u64;
        while !stop.load(Ordering::SeqCst) {
            let next = last + 1;
            r.get_mut()
                .write_all(format!("GET last\nINCR counter\nSET last {next}\n").as_bytes())
                .map_err(|e| format!("after {last}: send: {e}"))?;
            let mut reply = || {
                let mut line = String::new();
                r.read_line(&mut line)
                    .map_err(|e| format!("after {last}: receive: {e}"))?;
                Ok::<_, String>(line.trim().to_string())
            };
            let (got, incr, set) = (reply()?, reply()?, reply()?);
            let want = if last == 0 {
                "NIL".to_string()
            } else {
                format!("VALUE {last}")
            };
            if got != want {
                return Err(format!(
                    "GET last answered {got:?} where {want:?} was acknowledged: a SET was lost"
                ));
            }
            let v: u64 = incr
                .parse()
                .map_err(|_| format!("after {last}: bad reply {incr:?}"))?;
            if v != next {
                return Err(format!(
                    "counter went from {last} to {v}: an acknowledged increment was lost"
                ));
            }
            if set != "OK" {
                return Err(format!("after {last}: SET answered {set:?}"));
            }
            last = v;
            acknowledged.store(v, Ordering::SeqCst);
        }
        Ok(last)
    })
}

/// From a thread inside the network namespace `netns`, keeps one connection to the key-value
/// service at `addr` and sends `INCR counter`, one request at a time, for `duration`, waiting a
/// pseudo-random time below `think` after each reply (zero: back to back); returns the time each
/// reply took.
pub fn round_trips(
    netns: &str,
    addr: String,
    duration: Duration,
    think: Duration,
) -> JoinHandle<Result<Vec<Duration>, String>> {
    let netns = netns.to_string();
    std::thread::spawn(move || {
        let s = connect_from(&netns, &addr, Duration::from_secs(10))?;
        s.set_nodelay(true).map_err(|e| e.to_string())?;
        let mut r = BufReader::new(s);
        let mut times = Vec::new();
        let start = std::time::Instant::now();
        let mut line = String::new();
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        while start.elapsed() < duration {
            let t0 = std::time::Instant::now();
            r.get_mut()
                .write_all(b"INCR counter\n")
                .map_err(|e| format!("send: {e}"))?;
            line.clear();
            r.read_line(&mut line)
                .map_err(|e| format!("receive: {e}"))?;
            if line.trim().parse::<u64>().is_err() {
                return Err(format!("INCR answered {:?}", line.trim()));
            }
            times.push(t0.elapsed());
            if !think.is_zero() {
                // xorshift: spread the requests over the epoch without a crate for it.
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                std::thread::sleep(think.mul_f64((seed % 1000) as f64 / 1000.0));
            }
        }
        Ok(times)
    })
}
