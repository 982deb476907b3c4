//! A minimal etcd v3 client over etcd's JSON gateway (`/v3/kv/...`, served by every etcd ≥ 3.3 on
//! its client URL): read a key, create it if absent, and replace or delete it only if it is unchanged
//! since a given revision. That compare-and-swap is all the witness needs.

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

/// One etcd endpoint (`http://HOST:PORT`).
pub struct Etcd {
    base: String,
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
struct TxnReply {
    #[serde(default)]
    succeeded: bool,
    header: Header,
}

#[derive(Deserialize)]
struct Header {
    revision: String,
}

impl Etcd {
    /// A client for the etcd at `url` (`http://HOST:PORT`).
    pub fn new(url: &str) -> Result<Self, EtcdError> {
        let base = url.trim_end_matches('/').to_string();
        if !base.starts_with("http://") {
            return Err(EtcdError::Request {
                url: base,
                reason: "the witness URL must be http://HOST:PORT".into(),
            });
        }
        let agent = ureq::AgentBuilder::new().timeout(REQUEST_TIMEOUT).build();
        Ok(Self { base, agent })
    }

    fn call<T: for<'de> Deserialize<'de>>(
        &self,
        path: &str,
        body: serde_json::Value,
    ) -> Result<T, EtcdError> {
        let url = format!("{}{path}", self.base);
        let reply = self
            .agent
            .post(&url)
            .send_json(body)
            .map_err(|e| EtcdError::Request {
                url: self.base.clone(),
                reason: e.to_string(),
            })?;
        reply.into_json().map_err(|e| EtcdError::Reply {
            url: self.base.clone(),
            reason: e.to_string(),
        })
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
