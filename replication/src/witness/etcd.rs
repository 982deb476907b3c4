//! A minimal etcd v3 client over etcd's JSON gateway (`/v3/kv/...`, `/v3/lease/...`, served by every
//! etcd ≥ 3.3 on its client URL). The witness needs only its compare-and-swap: read a key, create it
//! if absent, and replace or delete it only if it is unchanged since a given revision. The host
//! daemon's cluster store (api/src/daemon/cluster.rs) uses its plain puts, prefix reads and leases.

use std::net::{SocketAddr, ToSocketAddrs};
use std::time::Duration;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use serde::Deserialize;
use serde_json::json;

/// How long one request to etcd may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);

#[derive(Debug, thiserror::Error)]
pub enum EtcdError {
    #[error("etcd at {url}: {reason}")]
    Request { url: String, reason: String },
    #[error("etcd at {url} answered what is not an etcd reply: {reason}")]
    Reply { url: String, reason: String },
}

/// An etcd cluster by its client endpoints (`http://HOST:PORT`, one or more). Requests go to one
/// endpoint at a time; when it cannot be reached the next one is used from then on. A request that
/// certainly never reached a member (the connection failed) is tried on the next member at once;
/// one that may have (a timeout after sending, a reset) is not repeated: its error goes back to the
/// caller, which reads the key back to learn what happened (`super::Witness`).
pub struct Etcd {
    /// What errors name: the endpoints, comma-separated.
    base: String,
    endpoints: Vec<Endpoint>,
    /// The endpoint in use.
    current: std::sync::atomic::AtomicUsize,
}

/// One member's client URL and an agent that dials only its address, resolved once.
struct Endpoint {
    url: String,
    agent: ureq::Agent,
}

#[derive(Deserialize)]
struct RangeReply {
    #[serde(default)]
    kvs: Vec<KeyValue>,
}

#[derive(Deserialize)]
struct KeyValue {
    #[serde(default)]
    value: String,
    mod_revision: String,
}

#[derive(Deserialize)]
struct PrefixReply {
    #[serde(default)]
    kvs: Vec<PrefixKeyValue>,
}

#[derive(Deserialize)]
struct PrefixKeyValue {
    key: String,
    #[serde(default)]
    value: String,
}

#[derive(Deserialize)]
struct LeaseGrantReply {
    #[serde(rename = "ID")]
    id: String,
}

#[derive(Deserialize)]
struct KeepAliveReply {
    result: Option<KeepAliveResult>,
}

#[derive(Deserialize)]
struct KeepAliveResult {
    #[serde(rename = "TTL", default)]
    ttl: Option<String>,
}

#[derive(Deserialize)]
struct TxnReply {
    #[serde(default)]
    succeeded: bool,
    header: Header,
}

#[derive(Deserialize)]
struct Header {
    revision: String,
}

impl Endpoint {
    fn new(url: &str) -> Result<Self, EtcdError> {
        let Some(netloc) = url
            .strip_prefix("http://")
            .map(|rest| rest.split('/').next().unwrap_or_default().to_string())
        else {
            return Err(EtcdError::Request {
                url: url.to_string(),
                reason: "a witness URL must be http://HOST:PORT (several: separated by commas)"
                    .into(),
            });
        };
        let addrs: Vec<SocketAddr> = netloc
            .to_socket_addrs()
            .map(|a| a.collect())
            .unwrap_or_default();
        if addrs.is_empty() {
            return Err(EtcdError::Request {
                url: url.to_string(),
                reason: format!("cannot resolve {netloc:?} (HOST:PORT)"),
            });
        }
        let agent = ureq::AgentBuilder::new()
            .timeout(REQUEST_TIMEOUT)
            .resolver(move |asked: &str| {
                if asked == netloc {
                    Ok(addrs.clone())
                } else {
                    Err(std::io::Error::new(
                        std::io::ErrorKind::NotFound,
                        format!("{asked} is not this witness's endpoint"),
                    ))
                }
            })
            .build();
        Ok(Self {
            url: url.to_string(),
            agent,
        })
    }
}

impl Etcd {
    /// A client for the etcd cluster at `urls`: `http://HOST:PORT`, or several separated by commas
    /// (its members). Each HOST is resolved here, once: the replication threads that ask the witness
    /// later may not open the files resolution reads (`vmm/src/seccomp.rs`).
    pub fn new(urls: &str) -> Result<Self, EtcdError> {
        let base = urls.trim().trim_end_matches('/').to_string();
        let endpoints = base
            .split(',')
            .map(|url| Endpoint::new(url.trim().trim_end_matches('/')))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self {
            base,
            endpoints,
            current: std::sync::atomic::AtomicUsize::new(0),
        })
    }

    fn call<T: for<'de> Deserialize<'de>>(
        &self,
        path: &str,
        body: serde_json::Value,
    ) -> Result<T, EtcdError> {
        use std::sync::atomic::Ordering;
        let first = self.current.load(Ordering::SeqCst) % self.endpoints.len();
        let mut last_error = None;
        for step in 0..self.endpoints.len() {
            let at = (first + step) % self.endpoints.len();
            let endpoint = &self.endpoints[at];
            match endpoint
                .agent
                .post(&format!("{}{path}", endpoint.url))
                .send_json(body.clone())
            {
                Ok(reply) => {
                    self.current.store(at, Ordering::SeqCst);
                    return reply.into_json().map_err(|e| EtcdError::Reply {
                        url: endpoint.url.clone(),
                        reason: e.to_string(),
                    });
                }
                Err(e) => {
                    // The next request starts at the next member.
                    self.current
                        .store((at + 1) % self.endpoints.len(), Ordering::SeqCst);
                    let never_sent = matches!(
                        &e,
                        ureq::Error::Transport(t) if matches!(
                            t.kind(),
                            ureq::ErrorKind::ConnectionFailed | ureq::ErrorKind::Dns
                        )
                    );
                    let error = EtcdError::Request {
                        url: endpoint.url.clone(),
                        reason: e.to_string(),
                    };
                    if !never_sent {
                        return Err(error);
                    }
                    tracing::debug!("{error}; trying the next member");
                    last_error = Some(error);
                }
            }
        }
        Err(last_error.expect("at least one endpoint"))
    }

    fn revision(&self, text: &str) -> Result<u64, EtcdError> {
        text.parse().map_err(|_| EtcdError::Reply {
            url: self.base.clone(),
            reason: format!("revision {text:?}"),
        })
    }

    /// The value of `key` and the revision it was last changed at, if it exists.
    pub fn get(&self, key: &str) -> Result<Option<(Vec<u8>, u64)>, EtcdError> {
        let reply: RangeReply = self.call("/v3/kv/range", json!({ "key": B64.encode(key) }))?;
        let Some(kv) = reply.kvs.into_iter().next() else {
            return Ok(None);
        };
        let value = B64.decode(kv.value).map_err(|e| EtcdError::Reply {
            url: self.base.clone(),
            reason: format!("value: {e}"),
        })?;
        Ok(Some((value, self.revision(&kv.mod_revision)?)))
    }

    /// Creates `key` = `value` if it does not exist; returns the new revision, or `None` if the key
    /// existed.
    pub fn create(&self, key: &str, value: &[u8]) -> Result<Option<u64>, EtcdError> {
        let key = B64.encode(key);
        self.txn(
            json!({ "target": "CREATE", "key": key, "createRevision": "0" }),
            json!({ "requestPut": { "key": key, "value": B64.encode(value) } }),
        )
    }

    /// Sets `key` = `value` if it was last changed at `revision`; returns the new revision, or
    /// `None` if it changed since (or is gone).
    pub fn replace(
        &self,
        key: &str,
        revision: u64,
        value: &[u8],
    ) -> Result<Option<u64>, EtcdError> {
        let key = B64.encode(key);
        self.txn(
            json!({ "target": "MOD", "key": key, "modRevision": revision.to_string() }),
            json!({ "requestPut": { "key": key, "value": B64.encode(value) } }),
        )
    }

    /// Sets `key` = `value` if it holds exactly `expected` (its value, not its revision: revisions
    /// start again when an etcd is restored from a backup); returns the new revision, or `None` if
    /// it holds anything else (or is gone).
    pub fn replace_value(
        &self,
        key: &str,
        expected: &[u8],
        value: &[u8],
    ) -> Result<Option<u64>, EtcdError> {
        let key = B64.encode(key);
        self.txn(
            json!({ "target": "VALUE", "key": key, "value": B64.encode(expected) }),
            json!({ "requestPut": { "key": key, "value": B64.encode(value) } }),
        )
    }

    /// Deletes `key` if it holds exactly `expected`; `false` if it holds anything else or is gone.
    pub fn delete_value(&self, key: &str, expected: &[u8]) -> Result<bool, EtcdError> {
        let key = B64.encode(key);
        Ok(self
            .txn(
                json!({ "target": "VALUE", "key": key, "value": B64.encode(expected) }),
                json!({ "requestDeleteRange": { "key": key } }),
            )?
            .is_some())
    }

    /// Deletes `key` if it was last changed at `revision`; `false` if it changed since.
    pub fn delete(&self, key: &str, revision: u64) -> Result<bool, EtcdError> {
        let key = B64.encode(key);
        Ok(self
            .txn(
                json!({ "target": "MOD", "key": key, "modRevision": revision.to_string() }),
                json!({ "requestDeleteRange": { "key": key } }),
            )?
            .is_some())
    }

    /// Sets `key` = `value`, bound to `lease` if given (it goes when the lease expires).
    pub fn put(&self, key: &str, value: &[u8], lease: Option<i64>) -> Result<(), EtcdError> {
        let mut body = json!({ "key": B64.encode(key), "value": B64.encode(value) });
        if let Some(lease) = lease {
            body["lease"] = lease.to_string().into();
        }
        self.call::<serde_json::Value>("/v3/kv/put", body).map(drop)
    }

    /// Deletes `key`, whatever its revision.
    pub fn remove(&self, key: &str) -> Result<(), EtcdError> {
        self.call::<serde_json::Value>("/v3/kv/deleterange", json!({ "key": B64.encode(key) }))
            .map(drop)
    }

    /// Every key starting with `prefix`, with its value, in key order.
    pub fn prefix(&self, prefix: &str) -> Result<Vec<(String, Vec<u8>)>, EtcdError> {
        let mut end = prefix.as_bytes().to_vec();
        // The range end is the prefix with its last byte incremented (no prefix ends in 0xff here).
        if let Some(last) = end.last_mut() {
            *last += 1;
        }
        let reply: PrefixReply = self.call(
            "/v3/kv/range",
            json!({ "key": B64.encode(prefix), "range_end": B64.encode(end) }),
        )?;
        let decode = |text: String, what: &str| {
            B64.decode(text).map_err(|e| EtcdError::Reply {
                url: self.base.clone(),
                reason: format!("{what}: {e}"),
            })
        };
        reply
            .kvs
            .into_iter()
            .map(|kv| {
                let key = String::from_utf8_lossy(&decode(kv.key, "key")?).into_owned();
                Ok((key, decode(kv.value, "value")?))
            })
            .collect()
    }

    /// A new lease of `ttl`; its id.
    pub fn grant_lease(&self, ttl: Duration) -> Result<i64, EtcdError> {
        let reply: LeaseGrantReply = self.call(
            "/v3/lease/grant",
            json!({ "TTL": ttl.as_secs().max(1).to_string() }),
        )?;
        reply.id.parse().map_err(|_| EtcdError::Reply {
            url: self.base.clone(),
            reason: format!("lease id {:?}", reply.id),
        })
    }

    /// Renews `lease`; `false` if it has expired (its keys are gone).
    pub fn keep_alive(&self, lease: i64) -> Result<bool, EtcdError> {
        let reply: KeepAliveReply =
            self.call("/v3/lease/keepalive", json!({ "ID": lease.to_string() }))?;
        Ok(reply
            .result
            .and_then(|r| r.ttl)
            .and_then(|ttl| ttl.parse::<i64>().ok())
            .is_some_and(|ttl| ttl > 0))
    }

    /// Ends `lease` now, removing its keys.
    pub fn revoke_lease(&self, lease: i64) -> Result<(), EtcdError> {
        self.call::<serde_json::Value>("/v3/lease/revoke", json!({ "ID": lease.to_string() }))
            .map(drop)
    }

    fn txn(
        &self,
        compare: serde_json::Value,
        then: serde_json::Value,
    ) -> Result<Option<u64>, EtcdError> {
        let reply: TxnReply = self.call(
            "/v3/kv/txn",
            json!({ "compare": [compare], "success": [then] }),
        )?;
        if reply.succeeded {
            Ok(Some(self.revision(&reply.header.revision)?))
        } else {
            Ok(None)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn several_members_are_taken_and_each_must_be_an_http_url() {
        let etcd = Etcd::new("http://127.0.0.1:2379, http://127.0.0.1:2389/,http://127.0.0.1:2399")
            .unwrap();
        let urls: Vec<&str> = etcd.endpoints.iter().map(|e| e.url.as_str()).collect();
        assert_eq!(
            urls,
            [
                "http://127.0.0.1:2379",
                "http://127.0.0.1:2389",
                "http://127.0.0.1:2399"
            ]
        );
        let refused = Etcd::new("http://127.0.0.1:2379,https://127.0.0.1:2389")
            .err()
            .expect("an https member is refused");
        assert!(
            refused.to_string().contains("https://127.0.0.1:2389"),
            "{refused}"
        );
    }

    /// A member that refuses connections is skipped: the request goes to the next, which is then
    /// used first.
    #[test]
    fn a_member_that_cannot_be_reached_is_skipped() {
        let down = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let down_addr = down.local_addr().unwrap();
        drop(down);
        let up = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let up_addr = up.local_addr().unwrap();
        let server = std::thread::spawn(move || {
            use std::io::{Read, Write};
            let (mut s, _) = up.accept().unwrap();
            let mut request = [0u8; 4096];
            let _ = s.read(&mut request);
            let body = r#"{"header":{"revision":"7"},"kvs":[]}"#;
            write!(
                s,
                "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            )
            .unwrap();
        });
        let etcd = Etcd::new(&format!("http://{down_addr},http://{up_addr}")).unwrap();
        assert_eq!(etcd.get("k").unwrap(), None);
        assert_eq!(etcd.current.load(std::sync::atomic::Ordering::SeqCst), 1);
        server.join().unwrap();
    }

    #[test]
    fn the_endpoint_is_resolved_once_when_the_client_is_made() {
        assert!(Etcd::new("http://localhost:2379").is_ok());
        assert!(Etcd::new("http://127.0.0.1:2379/").is_ok());
        let err = Etcd::new("http://:2379")
            .err()
            .expect("an unresolvable endpoint is refused")
            .to_string();
        assert!(err.contains("cannot resolve"), "{err}");
        assert!(Etcd::new("https://127.0.0.1:2379").is_err());
    }
}
