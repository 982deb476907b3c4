//! Options shared by the commands that bring an existing guest to this host (`restore`, `receive`,
//! `standby`): this host's backends for the guest's devices, its API socket and its links.

use std::path::PathBuf;

use clap::Args;
use vmm::arch::cpuid::CpuFeatures;
use vmm::{BlockConfig, NetConfig, RestoreOptions, SerialOutput};

use super::link::LinkArgs;

/// This host's serial output, disks and TAPs for a guest that already has its devices.
#[derive(Args, Debug)]
pub struct BackendArgs {
    /// Where the guest's COM1 output goes: stdout, null, or file:PATH.
    #[arg(long, value_name = "DEST", default_value = "stdout")]
    serial: SerialOutput,

    /// This host's image for each of the guest's disks (path=IMG[,readonly]), one per disk, in
    /// order. Required for every disk of a guest received over the network (a peer never names
    /// host paths); `restore` without it uses the paths in the snapshot.
    #[arg(long = "disk", value_name = "path=IMG[,readonly]")]
    disks: Vec<BlockConfig>,

    /// This host's TAP for each of the guest's NICs (tap=NAME), one per NIC, in order. The guest
    /// keeps its MAC address. Required for every NIC of a guest received over the network;
    /// `restore` without it uses the TAP names in the snapshot.
    #[arg(long = "net", value_name = "tap=NAME")]
    nets: Vec<NetConfig>,

    /// CPU features this host keeps guests off (`-name,...`, names as `ftvmm run
    /// --cpu-features`): a guest that sees one of them, or one this host's KVM does not offer, is
    /// refused before anything is built — a standby proves at pairing that it can run the guest.
    #[arg(
        long = "cpu-features",
        value_name = "-NAME,...",
        allow_hyphen_values = true,
        default_value = ""
    )]
    withheld_cpu: CpuFeatures,

    /// This host's UEFI firmware image (e.g. /usr/share/ovmf/OVMF.fd) for a firmware-booted
    /// guest: it must be the image the guest started from (checked by CRC32C). Required for a
    /// firmware-booted guest received over the network (a peer never names host paths);
    /// `restore` without it uses the path in the snapshot.
    #[arg(long, value_name = "PATH")]
    firmware: Option<PathBuf>,

    #[command(flatten)]
    pub api: super::api_socket::ApiSocketArgs,

    #[command(flatten)]
    pub link: LinkArgs,
}

impl BackendArgs {
    /// The backends as restore options.
    pub fn restore_options(&self) -> RestoreOptions {
        RestoreOptions {
            serial: Some(self.serial.clone()),
            disks: (!self.disks.is_empty()).then(|| self.disks.clone()),
            nets: (!self.nets.is_empty()).then(|| self.nets.clone()),
            withheld_cpu: self.withheld_cpu.clone(),
            firmware: self.firmware.clone(),
        }
    }
}
