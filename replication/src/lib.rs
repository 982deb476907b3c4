//! Moving a running guest between hosts: the checkpoint wire protocol (`wire`) and live migration
//! (`migration`), and protection by a hot standby (`protection`: the epoch loop, the standby and
//! failover), on the same transport.

pub mod migration;
pub mod protection;
pub mod wire;
