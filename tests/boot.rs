//! Booting the ring-3 test guest: the hello marker and exit status, SMP bring-up, and the crash
//! report of a guest that triple-faults.

use std::time::Duration;

use integration_tests::run_testguest;

const DEADLINE: Duration = Duration::from_secs(120);

#[test]
fn hello_prints_its_marker_and_powers_off() {
    let out = run_testguest("mode=hello", 1, DEADLINE);
    assert!(out.stdout.contains("testguest: hello"), "{out:?}");
    assert_eq!(out.code(), Some(0), "{out:?}");
}

#[test]
fn hello_sees_its_command_line() {
    let out = run_testguest("mode=hello tag=xyzzy", 1, DEADLINE);
    assert!(
        out.stdout.contains("cmdline=\"mode=hello tag=xyzzy\""),
        "{out:?}"
    );
    assert_eq!(out.code(), Some(0), "{out:?}");
}

fn check_smp(vcpus: u8) {
    let out = run_testguest("mode=smp", vcpus, DEADLINE);
    assert_eq!(out.code(), Some(0), "{out:?}");
    for id in 0..vcpus {
        let line = format!("vcpu apic_id={id} online");
        assert_eq!(
            out.stdout.lines().filter(|l| l.trim() == line).count(),
            1,
            "expected exactly one {line:?}: {out:?}"
        );
    }
    assert!(
        out.stdout
            .contains(&format!("testguest: smp ok cpus={vcpus}")),
        "{out:?}"
    );
}

#[test]
fn smp_one_vcpu() {
    check_smp(1);
}

#[test]
fn smp_two_vcpus() {
    check_smp(2);
}

#[test]
fn smp_eight_vcpus() {
    check_smp(8);
}

#[test]
fn triple_fault_is_reported_not_hung() {
    let out = run_testguest("mode=triple", 1, DEADLINE);
    assert_eq!(out.code(), Some(4), "{out:?}");
    assert!(out.stdout.contains("testguest: triple-faulting"), "{out:?}");
    assert!(
        out.stderr.contains("guest crashed on vCPU 0: triple fault"),
        "{out:?}"
    );
    assert!(out.stderr.contains("rip="), "{out:?}");
    assert!(out.stderr.contains("code at rip:"), "{out:?}");
}

#[test]
fn unknown_mode_is_reported_by_the_guest() {
    let out = run_testguest("mode=nosuchmode", 1, DEADLINE);
    assert!(
        out.stdout
            .contains("testguest: FAIL unknown mode=nosuchmode"),
        "{out:?}"
    );
}

fn run_bootproto(image: &str) -> integration_tests::RunOutput {
    let path = integration_tests::workspace_root()
        .join("images/out/bootproto")
        .join(image);
    assert!(
        path.exists(),
        "{} missing: run scripts/build-images",
        path.display()
    );
    integration_tests::run_ftvmm(
        &[
            "run",
            "--kernel",
            path.to_str().unwrap(),
            "--cmdline",
            "proto check 42",
            "--memory",
            "64",
        ],
        DEADLINE,
    )
}

#[test]
fn pvh_entry_gets_start_info_and_command_line() {
    let out = run_bootproto("pvh.elf");
    assert!(
        out.stdout.contains("pvh: ok cmdline=proto check 42"),
        "{out:?}"
    );
    assert_eq!(out.code(), Some(0), "{out:?}");
}

#[test]
fn bzimage_entry_gets_boot_params_and_command_line() {
    let out = run_bootproto("bzImage");
    assert!(
        out.stdout.contains("bzimage: ok cmdline=proto check 42"),
        "{out:?}"
    );
    assert_eq!(out.code(), Some(0), "{out:?}");
}

#[test]
fn cpu_template_adds_its_kernel_command_line() {
    let path = integration_tests::workspace_root().join("images/out/bootproto/bzImage");
    let out = integration_tests::run_ftvmm(
        &[
            "run",
            "--kernel",
            path.to_str().unwrap(),
            "--cmdline",
            "console=ttyS0",
            "--cpu-template",
            "emulated-ring0",
        ],
        DEADLINE,
    );
    assert!(
        out.stdout
            .contains("bzimage: ok cmdline=console=ttyS0 noxsave clearcpuid=popcnt,smap,pdpe1gb,ssse3,avx,avx2,avx512f"),
        "{out:?}"
    );
    assert_eq!(out.code(), Some(0), "{out:?}");
}

#[test]
fn ring0_instructions_some_hosts_cannot_emulate_complete_correctly() {
    let mut cmd = std::process::Command::new(integration_tests::ftvmm_bin());
    cmd.env("FTVMM_LOG", "info").args([
        "run",
        "--kernel",
        integration_tests::testguest().to_str().unwrap(),
        "--cmdline",
        "mode=emulate",
        "--memory",
        "64",
    ]);
    let mut vm = integration_tests::RunningVm::spawn(cmd);
    assert_eq!(
        vm.wait_exit(DEADLINE),
        Some(0),
        "{}\n{}",
        vm.output(),
        vm.stderr()
    );
    assert!(
        vm.output().contains("testguest: emulate ok popcnt=29"),
        "{}",
        vm.output()
    );
    // Where KVM could not emulate them (guest ring 0 emulated in software), ftvmm's fallback did,
    // and says so; on native KVM the instructions simply ran.
    let err = vm.stderr();
    if err.contains("emulation fallback completed") {
        for insn in ["Int3", "Popcnt", "Fwait", "Ldmxcsr", "Stmxcsr"] {
            assert!(err.contains(insn), "fallback did not report {insn}: {err}");
        }
    }
}
