//! `ftvmm run`: boot a guest and run it until it powers off, resets or crashes.

use std::path::PathBuf;
use std::sync::Arc;

use clap::Args;
use replication::link::LinkSecurity;
use replication::witness::{ClaimState, HeldClaim, Witness};
use vmm::{
    BlockConfig, CpuFeatures, CpuTemplate, Machine, NetConfig, SerialOutput, VmConfig, VmExit,
};

use super::link::LinkArgs;

const AFTER_HELP: &str = "\
Exit status:
  0  the guest powered off
  1  ftvmm could not start or run the VM (the error is printed)
  2  bad command-line usage
  3  the guest reset itself
  4  the guest crashed (triple fault, KVM internal or emulation error); a report with the
     exit reason, registers and the instruction bytes at RIP is printed on stderr
  5  fenced: the guest was protected, and the witness says its standby took over; this copy
     stopped for good without releasing anything more

Examples:
  ftvmm run --kernel images/out/testguest --cmdline mode=hello
  ftvmm run --kernel vmlinux --initrd initramfs.gz --cmdline 'console=ttyS0' --vcpus 2 --memory 512
  ftvmm run --kernel vmlinux --cpu-features=-cx16,-pdpe1gb --serial file:/tmp/console.log
  ftvmm run --kernel images/out/testguest --cmdline mode=blk --disk path=/tmp/disk.img
  ftvmm run --kernel images/out/testguest --cmdline 'mode=net ip=10.0.0.2/24' --net tap=tap0
  ftvmm run --firmware /usr/share/ovmf/OVMF.fd --vcpus 2 --memory 512";

/// Boot a guest kernel and run it until it powers off, resets or crashes.
#[derive(Args, Debug)]
#[command(after_help = AFTER_HELP)]
pub struct RunArgs {
    /// Guest kernel: an ELF (vmlinux, with or without a PVH note, or the ftvmm test guest) or a
    /// bzImage. Needed unless --firmware is given.
    #[arg(long, value_name = "PATH", required_unless_present = "firmware")]
    kernel: Option<PathBuf>,

    /// Boot through UEFI firmware (e.g. Debian's /usr/share/ovmf/OVMF.fd) on the q35 platform:
    /// fw_cfg, a PCI root complex, the ICH9 LPC bridge and its ACPI PM timer. The firmware's
    /// console is COM1 (--serial).
    #[arg(long, value_name = "PATH")]
    firmware: Option<PathBuf>,

    /// Initramfs to load for the kernel.
    #[arg(long, value_name = "PATH")]
    initrd: Option<PathBuf>,

    /// Kernel command line.
    #[arg(
        long,
        value_name = "STR",
        default_value = "console=ttyS0 reboot=k panic=1"
    )]
    cmdline: String,

    /// Number of vCPUs (1 to 254).
    #[arg(long, value_name = "N", default_value_t = 1,
          value_parser = clap::value_parser!(u8).range(1..=254))]
    vcpus: u8,

    /// Guest memory in MiB (at least 16, at most the host's RAM).
    #[arg(long, value_name = "MiB", default_value_t = 256,
          value_parser = clap::value_parser!(u64).range(1..=(1 << 24)))]
    memory: u64,

    /// Where the guest's COM1 output goes: stdout, null, or file:PATH.
    #[arg(long, value_name = "DEST", default_value = "stdout")]
    serial: SerialOutput,

    /// What the guest's COM1 receives: `stdin` (this process's standard input: a terminal, line by
    /// line, or a pipe) or `none`.
    #[arg(long, value_name = "stdin|none", default_value = "none",
          value_parser = ["stdin", "none"])]
    serial_input: String,

    /// CPU feature changes, comma-separated: -name hides a feature from the guest, +name (or name)
    /// requires the host to offer it. Names are Linux /proc/cpuinfo flags, e.g.
    /// -cx16,-pdpe1gb,-avx512f.
    #[arg(
        long,
        value_name = "LIST",
        allow_hyphen_values = true,
        default_value = ""
    )]
    cpu_features: CpuFeatures,

    /// A named CPU template: CPUID masks plus kernel command-line additions for a kind of host.
    /// `emulated-ring0`: hosts whose KVM emulates guest kernel mode (masks cx16, pdpe1gb, xsave, smap,
    /// popcnt, ssse3, avx, avx2, avx512f and the hypercall-based KVM PV features; appends `noxsave
    /// clearcpuid=popcnt,smap,pdpe1gb,ssse3,avx,avx2,avx512f`, merged into a clearcpuid= you give).
    /// Applied before --cpu-features.
    #[arg(long, value_name = "NAME")]
    cpu_template: Option<CpuTemplate>,

    /// A virtio-blk disk backed by a raw image file: path=IMG[,readonly]. Repeat for more disks;
    /// the guest sees them in this order.
    #[arg(long = "disk", value_name = "path=IMG[,readonly]")]
    disks: Vec<BlockConfig>,

    /// A virtio-net interface on a TAP device: tap=NAME[,mac=MAC]. An existing TAP is attached; a
    /// missing one is created and disappears when ftvmm exits. Repeatable.
    #[arg(long = "net", value_name = "tap=NAME[,mac=MAC]")]
    nets: Vec<NetConfig>,

    /// Offer the guest Hyper-V enlightenments, which KVM implements: the hypercall page, VP index,
    /// reference counter and reference TSC page, SynIC and synthetic timers, APIC access MSRs and
    /// relaxed timing (what Windows guests expect). `on`: at CPUID 0x40000000, with KVM's own leaves
    /// moved to 0x40000100 (Linux keeps using KVM's); `only`: without KVM's (Linux runs as a
    /// Hyper-V guest).
    #[arg(long, value_name = "on|only|off", default_value = "off")]
    hyperv: vmm::arch::hyperv::HypervMode,

    /// Track dirty pages (for migration and diff snapshots) with KVM's dirty ring of ENTRIES entries
    /// per vCPU (a power of two, e.g. 4096) instead of KVM's dirty log.
    #[arg(long, value_name = "ENTRIES")]
    dirty_ring: Option<u32>,

    /// Protect the guest with a hot standby (`ftvmm standby --listen HOST:PORT` on another host):
    /// checkpoint it every --epoch-ms and hold its network output until the standby has each
    /// checkpoint; disk writes travel with each checkpoint to the standby's own images (same sizes).
    /// If the standby is lost the guest runs on unprotected. Needs --tls (or --insecure-plain-tcp).
    #[arg(long, value_name = "HOST:PORT")]
    standby: Option<String>,

    /// Time between checkpoints when protected, in milliseconds (5 to 10000); or `auto` (10 to
    /// 200 ms) or `auto:MIN-MAX`: the shortest epoch within the bounds whose checkpoints commit
    /// within half of it (shorter epochs: less delay on the guest's output).
    #[arg(long, value_name = "MS|auto[:MIN-MAX]", default_value = "50")]
    epoch_ms: replication::protection::EpochLength,

    /// When a protected guest's dirty pages are copied at each checkpoint: `on-write` (after the
    /// vCPUs resumed, each page write-protected until copied, so the pause does not grow with the
    /// dirty pages; needs userfaultfd write protection, Linux 5.7, else falls back) or `paused`.
    #[arg(long, value_name = "on-write|paused", default_value = "on-write")]
    checkpoint_copy: replication::protection::CheckpointCopy,

    #[command(flatten)]
    api: super::api_socket::ApiSocketArgs,

    #[command(flatten)]
    link: LinkArgs,

    #[command(flatten)]
    witness: super::witness::WitnessArgs,
}

pub fn run(args: RunArgs) -> Result<u8, Box<dyn std::error::Error>> {
    let (mut cpu_features, mut cmdline) = (CpuFeatures::default(), args.cmdline);
    if let Some(template) = &args.cpu_template {
        cpu_features = template.cpu_features()?;
        cmdline = template.extend_cmdline(&cmdline);
    }
    cpu_features.extend(&args.cpu_features);
    let config = VmConfig {
        kernel: args.kernel,
        firmware: args.firmware,
        initrd: args.initrd,
        cmdline,
        vcpus: args.vcpus,
        memory_mib: args.memory,
        serial: args.serial,
        cpu_features,
        disks: args.disks,
        nets: args.nets,
        dirty_ring: args.dirty_ring,
        hyperv: args.hyperv,
        serial_input: args.serial_input == "stdin",
    };
    let security = match args.standby {
        Some(_) => Some(args.link.required("--standby")?),
        None => args.link.security()?,
    };
    let mut machine = Machine::build(&config)?;
    let witness = args.witness.witness()?;
    // With a witness, this copy claims the guest before it runs it: a second copy is refused.
    let claim = witness.as_ref().map(|w| claim_guest(w)).transpose()?;
    let protection = match (args.standby, &security) {
        (Some(standby), Some(security)) => Some(replication::protection::ProtectionParams {
            standby,
            security: security.clone(),
            epoch: args.epoch_ms,
            witness: witness.clone(),
            claim: claim.clone(),
            checkpoint_copy: args.checkpoint_copy,
        }),
        _ => None,
    };
    let _server = match args.api.socket()? {
        Some(socket) => Some(crate::server::spawn(
            &socket,
            machine.control_handle()?,
            security.clone(),
        )?),
        None => None,
    };
    let held = witness.clone().zip(claim);
    if let Some(server) = &_server {
        server.set_witness(witness, held.as_ref().map(|(_, c)| c.clone()));
    }
    if let Some(params) = protection {
        let control = machine.control_handle()?;
        // Checkpoints start once the vCPUs run; the loop waits for the event loop to serve it.
        let handle = replication::protection::start_protection(&mut machine, params, control)?;
        if let Some(server) = &_server {
            server.set_protection(handle.clone());
        }
        machine.start()?;
        let exit = machine.wait()?;
        finish_protection(&exit, _server.as_ref(), Some(handle.clone()));
        release_claim(&exit, _server.as_ref(), Some(&handle), held);
        return Ok(report_exit(&exit, _server.as_ref()));
    }
    run_machine_after(machine, None, security, _server, held, |_| {})
}

/// The guest and the claim this copy holds for it at the witness.
pub(super) type HeldGuest = (Arc<Witness>, HeldClaim);

/// Claims the guest at `witness` for this copy (`unprotected`); refused, naming the claim, when
/// another copy holds it.
pub(super) fn claim_guest(witness: &Arc<Witness>) -> Result<HeldClaim, Box<dyn std::error::Error>> {
    let claim = witness.create(
        replication::protection::heartbeat::new_session(),
        ClaimState::Unprotected,
    )?;
    eprintln!(
        "ftvmm: claimed the guest at the witness ({}, generation {})",
        witness.key(),
        claim.claim.generation
    );
    Ok(claim)
}

/// The guest ended here for good (it powered off, reset or crashed, the VM was stopped or
/// migrated away): the claim this copy holds at the witness goes, so that the guest can be booted
/// or protected again. The current claim is the protection's when one ran (none if its epoch loop
/// already removed it), else the one this copy booted or took over with.
fn release_claim(
    exit: &VmExit,
    server: Option<&crate::server::ApiServer>,
    own: Option<&replication::protection::ProtectionHandle>,
    held: Option<HeldGuest>,
) {
    let setting = server.map(crate::server::ApiServer::witness_setting);
    let witness = setting
        .as_ref()
        .and_then(|s| s.witness.clone())
        .or_else(|| held.as_ref().map(|(w, _)| w.clone()));
    let Some(witness) = witness else { return };
    let protection = server
        .and_then(crate::server::ApiServer::protection)
        .or_else(|| own.cloned());
    let claim = match protection {
        Some(p) => p.claim(),
        None => setting
            .and_then(|s| s.claim)
            .or_else(|| held.map(|(_, c)| c)),
    };
    let Some(claim) = claim else { return };
    match witness.remove(&claim) {
        Ok(true) => tracing::info!(key = witness.key(), ?exit, "the guest's claim is removed"),
        Ok(false) => tracing::warn!(
            key = witness.key(),
            "the guest's claim changed under this copy; left as it is"
        ),
        Err(e) => eprintln!(
            "ftvmm: warning: could not remove the guest's claim ({e}): it stays until removed \
             (`ftvmm vm release-claim` through the daemon)"
        ),
    }
}

/// Starts `machine`, serves its API when asked, and waits for the guest to stop; returns the
/// process exit status.
pub(super) fn run_machine(
    machine: Machine,
    api_socket: Option<&crate::server::ApiSocket>,
    link: Option<LinkSecurity>,
    server: Option<crate::server::ApiServer>,
    held: Option<HeldGuest>,
) -> Result<u8, Box<dyn std::error::Error>> {
    run_machine_after(machine, api_socket, link, server, held, |_| {})
}

/// As [`run_machine`], calling `started` once the vCPUs run. `link`: how the API's migrations
/// are protected; `held`: the claim this copy holds at the witness (given back at a clean end).
pub(super) fn run_machine_after(
    mut machine: Machine,
    api_socket: Option<&crate::server::ApiSocket>,
    link: Option<LinkSecurity>,
    server: Option<crate::server::ApiServer>,
    held: Option<HeldGuest>,
    started: impl FnOnce(&Machine),
) -> Result<u8, Box<dyn std::error::Error>> {
    let _server = match (server, api_socket) {
        (Some(s), _) => Some(s),
        (None, Some(socket)) => {
            let server = crate::server::spawn(socket, machine.control_handle()?, link)?;
            if let Some((witness, claim)) = &held {
                server.set_witness(Some(witness.clone()), Some(claim.clone()));
            }
            Some(server)
        }
        (None, None) => None,
    };
    machine.start()?;
    started(&machine);
    let exit = machine.wait()?;
    finish_protection(&exit, _server.as_ref(), None);
    release_claim(&exit, _server.as_ref(), None, held);
    Ok(report_exit(&exit, _server.as_ref()))
}

/// The guest ended: the standby of whatever protection is current (`own`, or one started later
/// through the API) must hear it, or it would resume the guest.
fn finish_protection(
    exit: &VmExit,
    server: Option<&crate::server::ApiServer>,
    own: Option<replication::protection::ProtectionHandle>,
) {
    if let Some(handle) = server
        .and_then(crate::server::ApiServer::protection)
        .or(own)
    {
        handle.finish(
            replication::protection::ending_of(exit),
            std::time::Duration::from_secs(5),
        );
    }
}

/// Tells the user how the VM ended and returns the exit status.
fn report_exit(exit: &VmExit, server: Option<&crate::server::ApiServer>) -> u8 {
    match exit {
        VmExit::PowerOff => tracing::info!("guest powered off"),
        VmExit::Stopped => eprintln!("ftvmm: stopped by a signal; the guest has ended"),
        VmExit::Reset => eprintln!("ftvmm: the guest reset itself"),
        VmExit::Crash(report) => eprintln!("ftvmm: {report}"),
        VmExit::MigratedAway { to } => {
            eprintln!("ftvmm: the VM migrated to {to}; this copy has stopped");
            if let Some(server) = server {
                server.linger_until_migration_reported(std::time::Duration::from_secs(10));
            }
        }
    }
    exit.exit_code() as u8
}
