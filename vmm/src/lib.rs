//! The ftvmm virtual machine monitor core: a KVM VM with its vCPUs, guest memory, x86_64 boot and
//! device wiring, and the VM lifecycle (run, pause, resume, shutdown).

pub mod arch;
pub mod control;
pub mod crash;
pub mod device_manager;
pub mod dirty;
pub mod dirty_ring;
pub mod machine;
pub mod memory;
pub mod pci_device_manager;
pub mod seccomp;
pub mod snapshot;
pub mod userfault;
pub mod vcpu;
pub mod vm;

/// Locks `mutex`, taking the data even if a thread panicked holding it (device state stays usable).
pub(crate) fn lock<T: ?Sized>(mutex: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

pub use arch::cpu_template::CpuTemplate;
pub use arch::cpuid::CpuFeatures;
pub use control::{ControlHandle, VmCommand, VmInfo, VmReply};
pub use crash::CrashReport;
pub use devices::legacy::SerialOutput;
pub use devices::virtio::block::BlockConfig;
pub use devices::virtio::net::NetConfig;
pub use machine::{Machine, MachineError, RestoreOptions, VmConfig, VmExit};
