//! Real Linux kernels under ftvmm: the small kernel built from Debian's linux-source-6.1 with the
//! project's config (always; `scripts/test` builds it), and the stock Debian cloud kernel (only with
//! `FTVMM_SLOW_TESTS=1`: it takes well over half an hour to reach /init on hosts that emulate guest
//! ring 0). On native KVM both boot in seconds.
//!
//! Each boot has 2 vCPUs, a virtio-blk disk and a virtio-net NIC. The kernel must bring both CPUs up
//! (found in our MADT), find the disk, and start /init, whose marker lines report the CPU count and
//! the devices. On hosts whose KVM emulates guest ring 0, user-mode `syscall` is not delivered to the
//! guest kernel (measured: /init faults at `entry_SYSCALL_64` in user mode), so there the tests accept
//! exactly that signature after /init starts, and say so.

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use integration_tests::netns::NetNs;
use integration_tests::{ftvmm_bin, run_ftvmm, workspace_root, RunningVm};

/// Real-kernel boots are heavy (every guest kernel instruction emulated on some hosts): one at a time.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());
const BOOT_DEADLINE: Duration = Duration::from_secs(40 * 60);
const CMDLINE: &str = "console=ttyS0 mitigations=off nowatchdog panic=-1";

struct Image {
    kernel: PathBuf,
    initrd: PathBuf,
}

fn image(kind: &str) -> Image {
    let dir = workspace_root().join("images/out/linux").join(kind);
    let image = Image {
        kernel: dir.join("vmlinux"),
        // Uncompressed: unpacking gzip in an emulated guest kernel roughly doubles the boot.
        initrd: dir.join("initramfs.cpio"),
    };
    assert!(
        image.kernel.exists() && image.initrd.exists(),
        "{} is missing: run scripts/build-images linux-{kind}",
        dir.display()
    );
    image
}

fn scratch_disk(name: &str) -> PathBuf {
    let p = std::env::temp_dir().join(format!("ftvmm-linux-{}-{name}.img", std::process::id()));
    std::fs::File::create(&p)
        .unwrap()
        .set_len(64 << 20)
        .unwrap();
    p
}

/// How far /init got.
enum InitOutcome {
    /// /init ran and reported (native KVM).
    Reported(String),
    /// The host gap: user-mode syscall not delivered to the guest kernel.
    HostSyscallGap(String),
}

/// Waits for /init's report, or the host's syscall gap.
fn wait_for_init(vm: &mut RunningVm) -> InitOutcome {
    vm.wait_for("Run /init as init process", BOOT_DEADLINE);
    let deadline = std::time::Instant::now() + Duration::from_secs(600);
    loop {
        let out = vm.output();
        if let Some(line) = out.lines().find(|l| l.contains("ftvmm-linux-init: disks=")) {
            return InitOutcome::Reported(line.to_string());
        }
        if let Some(line) = out
            .lines()
            .find(|l| l.contains("init[1]: segfault at") && l.contains("ip ffffffff8"))
        {
            let ip = line
                .split("ip ")
                .nth(1)
                .unwrap_or("")
                .split_whitespace()
                .next()
                .unwrap_or("");
            let at = line
                .split("segfault at ")
                .nth(1)
                .unwrap_or("")
                .split_whitespace()
                .next()
                .unwrap_or("");
            // The signature of the gap: a user-mode fetch at the kernel's syscall entry.
            if ip == at {
                return InitOutcome::HostSyscallGap(line.to_string());
            }
            panic!("/init crashed in an unexpected way: {line}\n{out}");
        }
        assert!(
            std::time::Instant::now() < deadline,
            "/init never reported:\n{out}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn boot_command(
    ns: &NetNs,
    image: &Image,
    disk: &Path,
    api: Option<&Path>,
) -> std::process::Command {
    let mut cmd = ns.command(ftvmm_bin().to_str().unwrap());
    cmd.args([
        "run",
        "--kernel",
        image.kernel.to_str().unwrap(),
        "--initrd",
        image.initrd.to_str().unwrap(),
    ])
    .args([
        "--cmdline",
        CMDLINE,
        "--vcpus",
        "2",
        "--memory",
        "256",
        "--cpu-template",
        "emulated-ring0",
    ])
    .args(["--net", "tap=tap0", "--disk"])
    .arg(format!("path={}", disk.display()));
    if let Some(sock) = api {
        cmd.args(["--api-socket", sock.to_str().unwrap()]);
    }
    cmd
}

fn check_boot(kind: &str) {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let image = image(kind);
    let ns = NetNs::with_tap().expect("netns");
    let disk = scratch_disk(kind);
    let mut vm = RunningVm::spawn(boot_command(&ns, &image, &disk, None));
    vm.wait_for("smp: Brought up 1 node, 2 CPUs", BOOT_DEADLINE);
    let outcome = wait_for_init(&mut vm);
    if kind == "small" {
        // Built in: the kernel found the disk through the DSDT's virtio-mmio entry before /init.
        assert!(
            vm.output()
                .contains("virtio_blk virtio0: [vda] 131072 512-byte logical blocks"),
            "{}",
            vm.output()
        );
    }
    match outcome {
        InitOutcome::Reported(line) => {
            assert!(
                vm.output().contains("ftvmm-linux-init: cpus=2"),
                "{}",
                vm.output()
            );
            assert!(line.contains("vda"), "no virtio disk: {line}");
            assert!(line.contains("eth0"), "no virtio NIC: {line}");
            assert_eq!(
                vm.wait_exit(Duration::from_secs(300)),
                Some(0),
                "{}",
                vm.stderr()
            );
        }
        InitOutcome::HostSyscallGap(line) => {
            eprintln!(
                "NOTE: this host does not deliver user-mode syscalls to the guest kernel: {line}"
            );
        }
    }
    let _ = std::fs::remove_file(disk);
}

#[test]
fn small_kernel_boots_with_two_vcpus_and_its_devices() {
    check_boot("small");
}

#[test]
fn small_kernel_survives_snapshot_and_restore_mid_boot() {
    check_snapshot_restore("small");
}

#[test]
fn debian_cloud_kernel_survives_snapshot_and_restore_mid_boot() {
    if std::env::var_os("FTVMM_SLOW_TESTS").is_none() {
        eprintln!("skipped: set FTVMM_SLOW_TESTS=1 to snapshot the Debian cloud kernel (slow on hosts that emulate ring 0)");
        return;
    }
    check_snapshot_restore("debian");
}

/// Boots `kind`, snapshots it once both CPUs are up, kills it, restores the snapshot in a new
/// process and checks that the kernel carries on to /init.
fn check_snapshot_restore(kind: &str) {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let image = image(kind);
    let ns = NetNs::with_tap().expect("netns");
    let disk = scratch_disk(&format!("{kind}-snap"));
    let dir = std::env::temp_dir().join(format!("ftvmm-linux-snap-{kind}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let sock = dir.join("vm.sock");
    let mut vm = RunningVm::spawn(boot_command(&ns, &image, &disk, Some(&sock)));
    vm.wait_for("smp: Brought up 1 node, 2 CPUs", BOOT_DEADLINE);
    let snap = dir.join("snap");
    let out = run_ftvmm(
        &[
            "vm",
            "--api-socket",
            sock.to_str().unwrap(),
            "snapshot",
            "--dir",
            snap.to_str().unwrap(),
        ],
        BOOT_DEADLINE,
    );
    assert_eq!(out.code(), Some(0), "{out:?}");
    let before = vm.output();
    vm.kill();
    assert!(
        !before.contains("Run /init"),
        "snapshot taken too late to prove anything"
    );

    // The restored kernel carries on from where it was and starts /init.
    let mut cmd = ns.command(ftvmm_bin().to_str().unwrap());
    cmd.args(["restore", "--dir", snap.to_str().unwrap()]);
    let mut restored = RunningVm::spawn(cmd);
    match wait_for_init(&mut restored) {
        InitOutcome::Reported(_) => {
            assert!(
                restored.output().contains("ftvmm-linux-init: cpus=2"),
                "{}",
                restored.output()
            );
        }
        InitOutcome::HostSyscallGap(line) => {
            eprintln!(
                "NOTE: this host does not deliver user-mode syscalls to the guest kernel: {line}"
            );
        }
    }
    let _ = std::fs::remove_dir_all(dir);
    let _ = std::fs::remove_file(disk);
}

#[test]
fn debian_cloud_kernel_boots_with_two_vcpus() {
    if std::env::var_os("FTVMM_SLOW_TESTS").is_none() {
        eprintln!("skipped: set FTVMM_SLOW_TESTS=1 to boot the Debian cloud kernel (slow on hosts that emulate ring 0)");
        return;
    }
    check_boot("debian");
}
