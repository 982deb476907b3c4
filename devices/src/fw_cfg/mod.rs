//! QEMU's firmware configuration device (fw_cfg), the channel through which OVMF learns the
//! machine — memory map (`etc/e820`), vCPUs, boot order, ACPI tables (`etc/table-loader`) — and
//! receives a kernel, initrd and command line for direct boot. `items.rs` holds what it serves,
//! `device.rs` the I/O ports and DMA.

pub mod device;
pub mod items;

pub use device::{FwCfg, FwCfgState};
pub use items::{key, FwCfgItems, ItemError};
