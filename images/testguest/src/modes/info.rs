//! `mode=info`: print what the guest sees of the boot ABI (e820 map, ACPI tables, MADT, CPUID
//! vendor, virtio-mmio devices, TSC frequency) for debugging the VMM, then `testguest: info ok`.

use super::Mode;
use crate::acpi_tables;
use crate::arch::{cpu, time};
use crate::cmdline::Cmdline;
use crate::println;

pub const MODE: Mode = Mode {
    name: "info",
    about: "print the boot ABI as the guest sees it",
    run,
};

fn run(cmdline: &Cmdline<'_>) {
    let (max_leaf, b, c, d) = cpu::cpuid(0, 0);
    let mut vendor = [0u8; 12];
    vendor[0..4].copy_from_slice(&b.to_le_bytes());
    vendor[4..8].copy_from_slice(&d.to_le_bytes());
    vendor[8..12].copy_from_slice(&c.to_le_bytes());
    println!(
        "testguest: cpuid vendor=\"{}\" max_leaf={:#x} apic_id={}",
        core::str::from_utf8(&vendor).unwrap_or("?"),
        max_leaf,
        cpu::apic_id()
    );
    println!(
        "testguest: boot_params={:#x} pml4={:#x}",
        crate::bootparams::addr(),
        crate::arch::paging::pml4_addr()
    );
    for (k, v) in cmdline.params() {
        println!("testguest: param {}={}", k, v.unwrap_or("<none>"));
    }
    let nop = cpu::service_call(crate::arch::idt::SVC_NOP);
    println!("testguest: service nop returned {:#x}", nop);
    for e in crate::bootparams::e820() {
        println!(
            "testguest: e820 addr={:#x} size={:#x} type={}",
            e.addr, e.size, e.kind
        );
    }
    match acpi_tables::load() {
        Ok((tables, rsdp)) => {
            println!(
                "testguest: acpi rsdp={:#x} revision={}",
                rsdp,
                tables.revision()
            );
            for sig in acpi_tables::signatures(&tables) {
                println!("testguest: acpi table {}", sig);
            }
            match acpi_tables::read_madt(&tables) {
                Ok(madt) => {
                    println!(
                        "testguest: madt lapic_addr={:#x} pcat_compat={}",
                        madt.lapic_addr, madt.pcat_compat
                    );
                    for l in &madt.lapics {
                        println!(
                            "testguest: madt lapic acpi_id={} apic_id={} enabled={} online_capable={} x2apic={}",
                            l.acpi_id, l.apic_id, l.enabled, l.online_capable, l.x2apic
                        );
                    }
                    for io in &madt.ioapics {
                        println!(
                            "testguest: madt ioapic id={} addr={:#x} gsi_base={}",
                            io.id, io.addr, io.gsi_base
                        );
                    }
                }
                Err(e) => println!("testguest: madt error {:?}", e),
            }
        }
        Err(e) => println!("testguest: acpi error {:?}", e),
    }
    for slot in crate::virtio::probe::scan() {
        println!(
            "testguest: virtio slot={} addr={:#x} device_id={} version={}",
            slot.index, slot.addr, slot.device_id, slot.version
        );
    }
    // Hypervisor leaves: KVM's, and Hyper-V's when ftvmm offers them (`--hyperv`).
    for base in [0x4000_0000u32, 0x4000_0100] {
        let (max, b, c, d) = cpu::cpuid(base, 0);
        let mut sig = [0u8; 12];
        sig[0..4].copy_from_slice(&b.to_le_bytes());
        sig[4..8].copy_from_slice(&c.to_le_bytes());
        sig[8..12].copy_from_slice(&d.to_le_bytes());
        let sig = core::str::from_utf8(&sig).unwrap_or("?").trim_end_matches('\0');
        if sig.is_empty() || max < base {
            continue;
        }
        println!(
            "testguest: hypervisor leaf={:#x} signature=\"{}\" max={:#x}",
            base, sig, max
        );
        if sig == "Microsoft Hv" {
            let (privileges, flags, _, features) = cpu::cpuid(base + 3, 0);
            let (recommendations, _, _, _) = cpu::cpuid(base + 4, 0);
            println!(
                "testguest: hyperv privileges={:#x} flags={:#x} features={:#x} recommendations={:#x}",
                privileges, flags, features, recommendations
            );
        }
    }
    let (hz, src) = time::tsc_hz();
    println!("testguest: tsc_hz={} source={}", hz, src.name());
    println!("testguest: heap used={}", crate::heap::ALLOCATOR.used());
    println!("testguest: info ok");
}
