//! Host daemon API benchmark (run by `scripts/bench-api`): request latency of list and info, and of
//! create+delete pairs, with 1 and with 8 concurrent clients on the daemon's Unix socket; the
//! daemon holds 50 VM records and one running test guest (whose info asks its own API too).
//! Prints figures; asserts only that every request succeeded.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use integration_tests::daemon::{request, Daemon};
use integration_tests::{stats, testguest};

const RECORDS: usize = 50;
const REQUESTS_PER_CLIENT: usize = 400;
const CHURN_PER_CLIENT: usize = 40;

/// Runs `per_client` calls of `call` on each of `clients` threads; the latency of each and the
/// requests per second over the whole run.
fn load(
    clients: usize,
    per_client: usize,
    call: Arc<dyn Fn(usize, usize) + Send + Sync>,
) -> (Vec<Duration>, f64) {
    let t0 = Instant::now();
    let threads: Vec<_> = (0..clients)
        .map(|c| {
            let call = call.clone();
            std::thread::spawn(move || {
                (0..per_client)
                    .map(|i| {
                        let t = Instant::now();
                        call(c, i);
                        t.elapsed()
                    })
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    let samples: Vec<Duration> = threads
        .into_iter()
        .flat_map(|t| t.join().expect("client thread"))
        .collect();
    let rate = samples.len() as f64 / t0.elapsed().as_secs_f64();
    (samples, rate)
}

fn report(what: &str, clients: usize, (samples, rate): (Vec<Duration>, f64)) {
    let s = stats(&samples);
    let us = |d: Duration| d.as_secs_f64() * 1e6;
    println!(
        "{what:<28} {clients:>2} clients  median {:>8.0} us  p99 {:>8.0} us  max {:>8.0} us  {:>7.0} req/s",
        us(s.median),
        us(s.p99),
        us(s.max),
        rate
    );
}

fn expect(socket: &Path, method: &str, path: &str, body: &str, status: u16) -> String {
    let (got, text) = request(socket, method, path, body);
    assert_eq!(got, status, "{method} {path}: {text}");
    text
}

fn main() {
    let dir = std::env::temp_dir().join(format!("ftvmm-bench-api-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let daemon = Daemon::start(&dir);
    let socket = daemon.socket.clone();
    let kernel = testguest();
    let config = |name: &str| {
        format!(
            r#"{{"name":"{name}","kernel":"{}","cmdline":"mode=spin","memory_mib":64}}"#,
            kernel.display()
        )
    };
    for i in 0..RECORDS {
        expect(
            &socket,
            "POST",
            "/api/v1/vms",
            &config(&format!("rec{i}")),
            201,
        );
    }
    expect(&socket, "PUT", "/api/v1/vms/rec0/boot", "", 200);
    println!("host daemon API, Unix socket, {RECORDS} VM records, one running test guest");
    for clients in [1, 8] {
        let s = socket.clone();
        report(
            "GET /api/v1/vms (list)",
            clients,
            load(
                clients,
                REQUESTS_PER_CLIENT,
                Arc::new(move |_, _| {
                    expect(&s, "GET", "/api/v1/vms", "", 200);
                }),
            ),
        );
        let s = socket.clone();
        report(
            "GET /api/v1/vms/{id} stopped",
            clients,
            load(
                clients,
                REQUESTS_PER_CLIENT,
                Arc::new(move |_, i| {
                    expect(
                        &s,
                        "GET",
                        &format!("/api/v1/vms/rec{}", 1 + i % 49),
                        "",
                        200,
                    );
                }),
            ),
        );
        let s = socket.clone();
        report(
            "GET /api/v1/vms/{id} running",
            clients,
            load(
                clients,
                REQUESTS_PER_CLIENT,
                Arc::new(move |_, _| {
                    expect(&s, "GET", "/api/v1/vms/rec0", "", 200);
                }),
            ),
        );
        let s = socket.clone();
        let kernel = kernel.clone();
        report(
            "POST + DELETE (pair)",
            clients,
            load(
                clients,
                CHURN_PER_CLIENT,
                Arc::new(move |c, i| {
                    let body = format!(
                        r#"{{"name":"churn-{c}-{i}","kernel":"{}","memory_mib":64}}"#,
                        kernel.display()
                    );
                    let created = expect(&s, "POST", "/api/v1/vms", &body, 201);
                    let id: serde_json::Value = serde_json::from_str(&created).unwrap();
                    let id = id["id"].as_str().unwrap();
                    expect(&s, "DELETE", &format!("/api/v1/vms/{id}"), "", 204);
                }),
            ),
        );
    }
    expect(&socket, "PUT", "/api/v1/vms/rec0/stop", "", 204);
    drop(daemon);
    let _ = std::fs::remove_dir_all(&dir);
}
