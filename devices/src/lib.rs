//! Device models for ftvmm.
//!
//! Nothing in this crate knows about KVM: devices see guest accesses as reads and writes at an offset of
//! their bus range ([`bus`]), raise interrupts through [`vm_superio::Trigger`] implementations backed by
//! eventfds ([`interrupt`]), and ask the VMM to stop the machine through [`guest_exit`].

pub mod bus;
pub mod capped_file;
pub mod fw_cfg;
pub mod guest_exit;
pub mod guest_log;
pub mod interrupt;
pub mod legacy;
pub mod output_gate;
pub mod pci;
pub mod persist;
pub mod virtio;

pub use bus::{Bus, BusDevice, BusError};
pub use guest_exit::{GuestExitEvent, GuestExitRequest};
pub use interrupt::EventFdTrigger;
