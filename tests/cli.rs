//! `ftvmm run` argument errors: one clear line and a non-zero status, never a panic.

use std::time::Duration;

use integration_tests::{run_ftvmm, workspace_root, RunOutput};

const DEADLINE: Duration = Duration::from_secs(60);

fn assert_clean_error(out: &RunOutput, expect_code: i32, needle: &str) {
    assert_eq!(out.code(), Some(expect_code), "{out:?}");
    assert!(
        out.stderr.contains(needle),
        "stderr lacks {needle:?}: {out:?}"
    );
    assert!(!out.stderr.contains("panicked"), "ftvmm panicked: {out:?}");
    assert!(
        !out.stderr.contains("RUST_BACKTRACE"),
        "ftvmm panicked: {out:?}"
    );
}

fn temp_file(name: &str, bytes: &[u8]) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("ftvmm-cli-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join(name);
    std::fs::write(&p, bytes).unwrap();
    p
}

#[test]
fn missing_kernel_file() {
    let out = run_ftvmm(&["run", "--kernel", "/nonexistent/vmlinux"], DEADLINE);
    assert_clean_error(&out, 1, "cannot open kernel image /nonexistent/vmlinux");
}

#[test]
fn no_kernel_argument() {
    let out = run_ftvmm(&["run"], DEADLINE);
    assert_clean_error(&out, 2, "--kernel");
}

#[test]
fn empty_image() {
    let p = temp_file("empty", b"");
    let out = run_ftvmm(&["run", "--kernel", p.to_str().unwrap()], DEADLINE);
    assert_clean_error(&out, 1, "is empty");
}

#[test]
fn garbage_image() {
    let p = temp_file("garbage", &[0xa5; 8192]);
    let out = run_ftvmm(&["run", "--kernel", p.to_str().unwrap()], DEADLINE);
    assert_clean_error(&out, 1, "neither an ELF");
}

#[test]
fn truncated_elf_image() {
    let mut bytes = b"\x7fELF\x02\x01\x01".to_vec();
    bytes.resize(100, 0);
    let p = temp_file("truncated.elf", &bytes);
    let out = run_ftvmm(&["run", "--kernel", p.to_str().unwrap()], DEADLINE);
    assert_clean_error(&out, 1, "cannot load kernel image");
}

#[test]
fn zero_vcpus() {
    let k = workspace_root().join("Cargo.toml");
    let out = run_ftvmm(
        &["run", "--kernel", k.to_str().unwrap(), "--vcpus", "0"],
        DEADLINE,
    );
    assert_clean_error(&out, 2, "--vcpus");
}

#[test]
fn absurd_memory() {
    let k = workspace_root().join("Cargo.toml");
    let out = run_ftvmm(
        &[
            "run",
            "--kernel",
            k.to_str().unwrap(),
            "--memory",
            "16000000",
        ],
        DEADLINE,
    );
    assert_clean_error(&out, 1, "exceeds this host");
    let out = run_ftvmm(
        &["run", "--kernel", k.to_str().unwrap(), "--memory", "4"],
        DEADLINE,
    );
    assert_clean_error(&out, 1, "too small");
}

#[test]
fn unknown_cpu_feature() {
    let k = workspace_root().join("Cargo.toml");
    let out = run_ftvmm(
        &[
            "run",
            "--kernel",
            k.to_str().unwrap(),
            "--cpu-features=-warp",
        ],
        DEADLINE,
    );
    assert_clean_error(&out, 2, "unknown CPU feature \"warp\"");
}

#[test]
fn bad_serial_destination() {
    let k = workspace_root().join("Cargo.toml");
    let out = run_ftvmm(
        &["run", "--kernel", k.to_str().unwrap(), "--serial", "tty"],
        DEADLINE,
    );
    assert_clean_error(&out, 2, "invalid --serial value");
}

#[test]
fn help_documents_every_option() {
    let out = run_ftvmm(&["run", "--help"], DEADLINE);
    assert_eq!(out.code(), Some(0));
    for opt in [
        "--kernel",
        "--initrd",
        "--cmdline",
        "--vcpus",
        "--memory",
        "--serial",
        "--cpu-features",
        "Exit status",
    ] {
        assert!(out.stdout.contains(opt), "help lacks {opt}");
    }
}

#[test]
fn completions_are_printed_for_each_shell() {
    for shell in ["bash", "zsh", "fish"] {
        let out = run_ftvmm(&["completions", shell], Duration::from_secs(30));
        assert_eq!(out.code(), Some(0), "{shell}: {}", out.stderr);
        for word in ["serve", "standby", "migrate"] {
            assert!(out.stdout.contains(word), "{shell} completions lack {word}");
        }
    }
    let out = run_ftvmm(&["completions", "tcsh"], Duration::from_secs(30));
    assert_eq!(out.code(), Some(2), "{out:?}");
}

#[test]
fn hyperv_enlightenments_are_offered_or_refused_clearly() {
    let guest = integration_tests::testguest();
    let guest = guest.to_str().unwrap();
    let plain = run_ftvmm(
        &[
            "run",
            "--kernel",
            guest,
            "--cmdline",
            "mode=info",
            "--serial",
            "stdout",
        ],
        DEADLINE,
    );
    assert_eq!(plain.code(), Some(0), "{plain:?}");
    assert!(
        plain
            .stdout
            .contains("hypervisor leaf=0x40000000 signature=\"KVMKVMKVM\""),
        "{}",
        plain.stdout
    );
    let bad = run_ftvmm(&["run", "--hyperv", "yes", "--kernel", guest], DEADLINE);
    assert_eq!(bad.code(), Some(2), "{bad:?}");
    let on = run_ftvmm(
        &[
            "run",
            "--hyperv",
            "on",
            "--kernel",
            guest,
            "--cmdline",
            "mode=info",
        ],
        DEADLINE,
    );
    if on.code() == Some(1) {
        // Hosts whose KVM is built without Hyper-V emulation (CONFIG_KVM_HYPERV=n) say so; the
        // nested tier (tests/nested/hyperv.sh) runs Linux on the enlightenments.
        assert_clean_error(&on, 1, "does not offer Hyper-V enlightenments");
        return;
    }
    assert_eq!(on.code(), Some(0), "{on:?}");
    for line in [
        "hypervisor leaf=0x40000000 signature=\"Microsoft Hv\"",
        "hypervisor leaf=0x40000100 signature=\"KVMKVMKVM\"",
        "testguest: hyperv privileges=",
    ] {
        assert!(on.stdout.contains(line), "{line} not in {}", on.stdout);
    }
}
