//! `GET /metrics`: the daemon's figures in Prometheus' text format — per host, the VMs by state and
//! the memory; per VM, its size and, when it is protected, the last checkpoint's pause, commit,
//! dirty pages and the output it holds (read from the VM's own API).

use std::fmt::Write;

use super::store::{Lifecycle, VmRecord};
use super::vm_config::host_meminfo_bytes;

/// One VM's protection figures, from its `GET /api/v1/vm/protection`.
pub struct ProtectionFigures {
    pub status: serde_json::Value,
}

/// The metrics page for `vms`, with each running VM's protection figures if it has any.
pub fn render(vms: &[(VmRecord, Option<ProtectionFigures>)]) -> String {
    let mut out = String::new();
    let count = |l: Lifecycle| vms.iter().filter(|(r, _)| r.lifecycle == l).count();
    family(
        &mut out,
        "ftvmm_host_vms",
        "gauge",
        "VMs on this host by lifecycle.",
    );
    for (label, l) in [
        ("created", Lifecycle::Created),
        ("booting", Lifecycle::Booting),
        ("running", Lifecycle::Running),
        ("exited", Lifecycle::Exited),
    ] {
        let _ = writeln!(out, "ftvmm_host_vms{{lifecycle=\"{label}\"}} {}", count(l));
    }
    let total = host_meminfo_bytes("MemTotal:");
    let available = host_meminfo_bytes("MemAvailable:");
    family(
        &mut out,
        "ftvmm_host_memory_bytes",
        "gauge",
        "This host's RAM.",
    );
    let _ = writeln!(out, "ftvmm_host_memory_bytes {total}");
    family(
        &mut out,
        "ftvmm_host_memory_available_bytes",
        "gauge",
        "RAM available for new VMs (MemAvailable).",
    );
    let _ = writeln!(out, "ftvmm_host_memory_available_bytes {available}");

    family(
        &mut out,
        "ftvmm_vm_running",
        "gauge",
        "1 while the VM's process runs.",
    );
    for (r, _) in vms {
        let running = u8::from(r.lifecycle == Lifecycle::Running);
        let _ = writeln!(out, "ftvmm_vm_running{} {running}", labels(r));
    }
    family(
        &mut out,
        "ftvmm_vm_info",
        "gauge",
        "Always 1; the VM's role and lifecycle as labels.",
    );
    for (r, _) in vms {
        let mut labels = labels(r);
        labels.pop();
        let role = format!("{:?}", r.role).to_lowercase();
        let lifecycle = format!("{:?}", r.lifecycle).to_lowercase();
        let _ = writeln!(
            out,
            "ftvmm_vm_info{labels},role=\"{role}\",lifecycle=\"{lifecycle}\"}} 1"
        );
    }
    family(
        &mut out,
        "ftvmm_vm_failovers_total",
        "counter",
        "Times this host's copy of the VM took over as its standby.",
    );
    for (r, _) in vms {
        let _ = writeln!(out, "ftvmm_vm_failovers_total{} {}", labels(r), r.failovers);
    }
    family(&mut out, "ftvmm_vm_memory_bytes", "gauge", "Guest memory.");
    for (r, _) in vms {
        let _ = writeln!(
            out,
            "ftvmm_vm_memory_bytes{} {}",
            labels(r),
            r.config.memory_mib << 20
        );
    }
    let figures: [(&str, &str, &str); 6] = [
        (
            "ftvmm_vm_protected",
            "",
            "1 while a standby protects the VM.",
        ),
        (
            "ftvmm_vm_epoch_pause_ms",
            "last_pause_ms",
            "The last checkpoint's pause.",
        ),
        (
            "ftvmm_vm_commit_ms",
            "last_commit_ms",
            "The last checkpoint's commit latency.",
        ),
        (
            "ftvmm_vm_dirty_pages",
            "last_pages",
            "Pages in the last checkpoint.",
        ),
        (
            "ftvmm_vm_held_output_bytes",
            "held_bytes",
            "Network output held until its commit.",
        ),
        (
            "ftvmm_vm_committed_epoch",
            "committed_epoch",
            "The last checkpoint the standby committed.",
        ),
    ];
    for (name, field, help) in figures {
        family(&mut out, name, "gauge", help);
        for (r, p) in vms {
            let Some(p) = p else { continue };
            let value = if field.is_empty() {
                f64::from(u8::from(p.status["state"] == "protected"))
            } else {
                p.status[field].as_f64().unwrap_or(0.0)
            };
            let _ = writeln!(out, "{name}{} {value}", labels(r));
        }
    }
    out
}

fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

fn labels(r: &VmRecord) -> String {
    let name = r.config.name.as_deref().unwrap_or("");
    // Names and ids are [A-Za-z0-9._-] (`vm_config.rs`): nothing to escape.
    format!("{{vm=\"{}\",name=\"{name}\"}}", r.id)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_vm_and_its_protection_figures_are_shown() {
        let record = |id: &str, lifecycle| VmRecord {
            id: id.into(),
            config: serde_json::from_str(r#"{"kernel": "/k", "name": "web", "memory_mib": 64}"#)
                .unwrap(),
            lifecycle,
            created_at: 0,
            process: None,
            exit: None,
            role: Default::default(),
            peer: None,
            failovers: 0,
        };
        let page = render(&[
            (
                record("vm-1", Lifecycle::Running),
                Some(ProtectionFigures {
                    status: serde_json::json!({"state": "protected", "last_pause_ms": 0.5,
                        "last_commit_ms": 3.0, "last_pages": 120, "held_bytes": 0,
                        "committed_epoch": 9}),
                }),
            ),
            (record("vm-2", Lifecycle::Exited), None),
        ]);
        for line in [
            "ftvmm_host_vms{lifecycle=\"running\"} 1",
            "ftvmm_host_vms{lifecycle=\"exited\"} 1",
            "ftvmm_vm_running{vm=\"vm-1\",name=\"web\"} 1",
            "ftvmm_vm_running{vm=\"vm-2\",name=\"web\"} 0",
            "ftvmm_vm_memory_bytes{vm=\"vm-2\",name=\"web\"} 67108864",
            "ftvmm_vm_protected{vm=\"vm-1\",name=\"web\"} 1",
            "ftvmm_vm_epoch_pause_ms{vm=\"vm-1\",name=\"web\"} 0.5",
            "ftvmm_vm_dirty_pages{vm=\"vm-1\",name=\"web\"} 120",
        ] {
            assert!(
                page.lines().any(|l| l == line),
                "missing {line:?} in\n{page}"
            );
        }
        assert!(!page.contains("ftvmm_vm_protected{vm=\"vm-2\""));
    }
}
