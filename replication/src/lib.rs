//! Moving a running guest between hosts: the wire protocol (`wire`), the authenticated links it runs
//! on (`link`), live migration (`migration`), and protection by a hot standby (`protection`: the
//! epoch loop, the standby and failover), all on the same transfer layer.

pub mod link;
pub mod migration;
pub mod protection;
pub mod wire;
pub mod witness;
