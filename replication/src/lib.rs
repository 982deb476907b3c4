//! Moving a running guest between hosts: the checkpoint wire protocol (`wire`) and live migration
//! (`migration`). Replication (the epoch loop, failover) is built on the same transport.

pub mod migration;
pub mod wire;
