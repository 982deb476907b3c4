//! `nettest`: the host side of the network checks run against real Linux guests in the nested tier
//! (tests/nested/). It runs inside the L1, next to ftvmm, and talks to the guest's busybox `nc`.
//!
//! ```text
//! nettest send ADDR BYTES         connect, send BYTES of pseudo-random data, half-close, wait for EOF
//! nettest recv ADDR BYTES         connect, read exactly BYTES, close
//! nettest echo ADDR SECONDS       one connection to an echo service: a numbered line every 20 ms,
//!                                 each reply checked; ends after SECONDS or at the first error
//! ```
//! `send` and `recv` print `nettest: <verb> bytes=N sha256=HASH mbit_s=R`; `echo` prints
//! `nettest: echo replies=N max_gap_ms=G rtt_us_p50=R rtt_us_p99=R` (the gap: the longest time
//! between two replies, what a client saw of a migration's downtime; the round trips: line sent to
//! its reply). Exit status 0, or 1 with `nettest: error: ...`.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
const IO_TIMEOUT: Duration = Duration::from_secs(60);

fn connect(addr: &str) -> Result<TcpStream, String> {
    let target: SocketAddr = addr.parse().map_err(|e| format!("address {addr}: {e}"))?;
    // The guest may still be starting its listener: retry refused connections for a while.
    let deadline = Instant::now() + CONNECT_TIMEOUT;
    loop {
        match TcpStream::connect_timeout(&target, CONNECT_TIMEOUT) {
            Ok(s) => {
                s.set_read_timeout(Some(IO_TIMEOUT))
                    .map_err(|e| e.to_string())?;
                s.set_write_timeout(Some(IO_TIMEOUT))
                    .map_err(|e| e.to_string())?;
                return Ok(s);
            }
            Err(e) if Instant::now() < deadline => {
                let _ = e;
                std::thread::sleep(Duration::from_millis(200));
            }
            Err(e) => return Err(format!("connect {addr}: {e}")),
        }
    }
}

fn mbit_s(bytes: u64, elapsed: Duration) -> f64 {
    bytes as f64 * 8.0 / elapsed.as_secs_f64().max(1e-9) / 1e6
}

fn send(addr: &str, bytes: u64) -> Result<(), String> {
    let mut s = connect(addr)?;
    let mut hash = Sha256::new();
    // xorshift64: cheap, not compressible, the same on every run.
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut buf = vec![0u8; 64 << 10];
    let start = Instant::now();
    let mut left = bytes;
    while left > 0 {
        let n = left.min(buf.len() as u64) as usize;
        for chunk in buf[..n].chunks_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            chunk.copy_from_slice(&x.to_le_bytes()[..chunk.len()]);
        }
        s.write_all(&buf[..n])
            .map_err(|e| format!("send after {} bytes: {e}", bytes - left))?;
        hash.update(&buf[..n]);
        left -= n as u64;
    }
    s.shutdown(Shutdown::Write).map_err(|e| e.to_string())?;
    // The receiver closes once it has everything: that is when the transfer is done.
    let mut rest = Vec::new();
    s.read_to_end(&mut rest)
        .map_err(|e| format!("waiting for the receiver to close: {e}"))?;
    let elapsed = start.elapsed();
    println!(
        "nettest: send bytes={bytes} sha256={:x} mbit_s={:.1}",
        hash.finalize(),
        mbit_s(bytes, elapsed)
    );
    Ok(())
}

fn recv(addr: &str, bytes: u64) -> Result<(), String> {
    let mut s = connect(addr)?;
    let mut hash = Sha256::new();
    let mut buf = vec![0u8; 64 << 10];
    let start = Instant::now();
    let mut got = 0u64;
    while got < bytes {
        let want = (bytes - got).min(buf.len() as u64) as usize;
        let n = s
            .read(&mut buf[..want])
            .map_err(|e| format!("receive after {got} bytes: {e}"))?;
        if n == 0 {
            return Err(format!("the sender closed after {got} of {bytes} bytes"));
        }
        hash.update(&buf[..n]);
        got += n as u64;
    }
    let elapsed = start.elapsed();
    drop(s);
    println!(
        "nettest: recv bytes={bytes} sha256={:x} mbit_s={:.1}",
        hash.finalize(),
        mbit_s(bytes, elapsed)
    );
    Ok(())
}

fn echo(addr: &str, seconds: u64) -> Result<(), String> {
    let s = connect(addr)?;
    let mut reader = BufReader::new(s.try_clone().map_err(|e| e.to_string())?);
    let mut writer = s;
    let end = Instant::now() + Duration::from_secs(seconds);
    let mut last_reply = Instant::now();
    let mut max_gap = Duration::ZERO;
    let mut rtts = Vec::new();
    let mut n = 0u64;
    while Instant::now() < end {
        let sent = Instant::now();
        writer
            .write_all(format!("{n}\n").as_bytes())
            .map_err(|e| format!("echo: send of line {n}: {e}"))?;
        let mut line = String::new();
        match reader.read_line(&mut line) {
            Ok(0) => return Err(format!("echo: the connection closed after {n} replies")),
            Ok(_) => {}
            Err(e) => return Err(format!("echo: reply to line {n}: {e}")),
        }
        if line.trim_end() != n.to_string() {
            return Err(format!("echo: line {n} came back as {:?}", line.trim_end()));
        }
        let now = Instant::now();
        rtts.push(now - sent);
        max_gap = max_gap.max(now - last_reply);
        last_reply = now;
        n += 1;
        std::thread::sleep(Duration::from_millis(20));
    }
    rtts.sort();
    let percentile = |p: usize| {
        rtts.get((rtts.len() * p / 100).min(rtts.len().saturating_sub(1)))
            .map_or(0, |d| d.as_micros())
    };
    println!(
        "nettest: echo replies={n} max_gap_ms={} rtt_us_p50={} rtt_us_p99={}",
        max_gap.as_millis(),
        percentile(50),
        percentile(99)
    );
    Ok(())
}

fn run(args: &[String]) -> Result<(), String> {
    let number = |s: &str, what: &str| -> Result<u64, String> {
        s.parse()
            .map_err(|_| format!("{what} must be a number, not {s:?}"))
    };
    match args {
        [verb, addr, n] if verb == "send" => send(addr, number(n, "BYTES")?),
        [verb, addr, n] if verb == "recv" => recv(addr, number(n, "BYTES")?),
        [verb, addr, n] if verb == "echo" => echo(addr, number(n, "SECONDS")?),
        _ => Err("usage: nettest send|recv ADDR BYTES | nettest echo ADDR SECONDS".into()),
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if let Err(e) = run(&args) {
        eprintln!("nettest: error: {e}");
        std::process::exit(1);
    }
}
