//! Placing virtio devices on the PCI bus of firmware-booted (q35) VMs, the PCI counterpart of
//! `device_manager.rs`: each device becomes a virtio-pci function (`devices/src/virtio/pci.rs`) at
//! `00:02.0`, `00:03.0`, … Its MSI-X vectors get KVM GSIs whose MSI routes follow the table the
//! guest programs ([`MsiRouteTable`]) and irqfds on them; its INTx pin, used while MSI-X is off, is
//! IOAPIC pin [`intx_gsi`] (the DSDT's `_PRT` says the same); its queue notifications get KVM
//! ioeventfds wherever the firmware or the OS puts its BAR ([`NotifyPlacement`], told by the PCI
//! root when a BAR moves). BAR accesses themselves reach the function through the
//! [`devices::pci::PciMmioWindow`] the q35 chipset places over the PCI memory window.

use std::collections::{BTreeMap, HashMap};
use std::ops::Range;
use std::sync::{Arc, Mutex};

use devices::interrupt::LevelInterrupt;
use devices::pci::msix::{MsiMessage, MsiRouting};
use devices::pci::PciDevice;
use devices::pci::{BarObserver, BarReprogrammed, PciAddress, PciRoot, PciRootError};
use devices::virtio::pci::{
    VirtioPciDevice, VirtioPciError, MSIX_VECTORS, NOTIFY_OFFSET, NOTIFY_OFF_MULTIPLIER,
};
use devices::virtio::VirtioDevice;
use event_manager::{EventManager, SubscriberOps};
use kvm_bindings::{
    kvm_irq_routing_entry, KvmIrqRouting, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER,
    KVM_IRQCHIP_PIC_SLAVE, KVM_IRQ_ROUTING_IRQCHIP, KVM_IRQ_ROUTING_MSI,
};
use kvm_ioctls::{IoEventAddress, NoDatamatch};
use vmm_sys_util::eventfd::EventFd;

use crate::arch::layout::intx_gsi;
use crate::device_manager::{Subscriber, VirtioSubscriber};
use crate::lock;
use crate::memory::GuestMemory;
use crate::vm::{Vm, VmError};

/// The IOAPIC's pins: GSIs below this are the default irqchip routes.
const IOAPIC_PINS: u32 = 24;
/// The first PCI device number used for virtio devices (00:00.0 is the host bridge; 00:01.0 is left
/// free, as QEMU leaves it for VGA).
const FIRST_DEVICE: u8 = 2;
/// The last device number (00:1f.0 is the LPC bridge).
const LAST_DEVICE: u8 = 0x1e;

/// Errors placing a virtio-pci device.
#[derive(Debug, thiserror::Error)]
pub enum PciDeviceError {
    #[error("too many virtio-pci devices: at most {}", LAST_DEVICE - FIRST_DEVICE + 1)]
    TooManyDevices,
    #[error("cannot make virtio-pci function {address}: {source}")]
    Function {
        address: PciAddress,
        source: VirtioPciError,
    },
    #[error(transparent)]
    Root(#[from] PciRootError),
    #[error(transparent)]
    Irq(#[from] VmError),
}

/// The VM's GSI routing: the default irqchip routes (the PIC's 16 lines and the IOAPIC's 24 pins)
/// and one MSI route per MSI-X vector handed out. KVM takes the whole table at once.
pub struct MsiRouteTable {
    vm: Arc<Vm>,
    routes: Mutex<MsiRoutes>,
}

struct MsiRoutes {
    messages: BTreeMap<u32, MsiMessage>,
    next_gsi: u32,
}

impl MsiRouteTable {
    /// The table of `vm`, with no MSI routes yet.
    pub fn new(vm: Arc<Vm>) -> Self {
        Self {
            vm,
            routes: Mutex::new(MsiRoutes {
                messages: BTreeMap::new(),
                next_gsi: IOAPIC_PINS,
            }),
        }
    }

    /// Hands out `count` GSIs for MSI routes.
    fn allocate(&self, count: u16) -> Vec<u32> {
        let mut routes = lock(&self.routes);
        let first = routes.next_gsi;
        routes.next_gsi += u32::from(count);
        (first..first + u32::from(count)).collect()
    }

    /// Routes `gsi` to `message` and gives KVM the table.
    fn set(&self, gsi: u32, message: MsiMessage) {
        let mut routes = lock(&self.routes);
        routes.messages.insert(gsi, message);
        if let Err(e) = self.apply(&routes) {
            devices::guest_error!("cannot set the route of GSI {gsi}: {e}");
        }
    }

    fn apply(&self, routes: &MsiRoutes) -> Result<(), String> {
        let mut entries = Vec::new();
        let irqchip = |gsi: u32, chip: u32, pin: u32| {
            let mut entry = kvm_irq_routing_entry {
                gsi,
                type_: KVM_IRQ_ROUTING_IRQCHIP,
                ..Default::default()
            };
            entry.u.irqchip.irqchip = chip;
            entry.u.irqchip.pin = pin;
            entry
        };
        for gsi in 0..IOAPIC_PINS {
            entries.push(irqchip(gsi, KVM_IRQCHIP_IOAPIC, gsi));
            if gsi < 8 {
                entries.push(irqchip(gsi, KVM_IRQCHIP_PIC_MASTER, gsi));
            } else if gsi < 16 {
                entries.push(irqchip(gsi, KVM_IRQCHIP_PIC_SLAVE, gsi - 8));
            }
        }
        for (&gsi, message) in &routes.messages {
            let mut entry = kvm_irq_routing_entry {
                gsi,
                type_: KVM_IRQ_ROUTING_MSI,
                ..Default::default()
            };
            entry.u.msi.address_lo = message.address as u32;
            entry.u.msi.address_hi = (message.address >> 32) as u32;
            entry.u.msi.data = message.data;
            entries.push(entry);
        }
        let table = KvmIrqRouting::from_entries(&entries).map_err(|e| format!("{e:?}"))?;
        self.vm
            .fd()
            .set_gsi_routing(&table)
            .map_err(|e| e.to_string())
    }
}

/// One function's vectors on their GSIs.
struct FunctionVectors {
    table: Arc<MsiRouteTable>,
    gsis: Vec<u32>,
}

impl MsiRouting for FunctionVectors {
    fn set_route(&self, vector: u16, message: MsiMessage) {
        if let Some(&gsi) = self.gsis.get(usize::from(vector)) {
            self.table.set(gsi, message);
        }
    }
}

/// A function's INTx pin as a level on its IOAPIC pin (KVM_IRQ_LINE).
struct IntxLine {
    vm: Arc<Vm>,
    gsi: u32,
}

impl LevelInterrupt for IntxLine {
    fn set_level(&self, asserted: bool) {
        if let Err(e) = self.vm.fd().set_irq_line(self.gsi, asserted) {
            devices::guest_error!("cannot set the level of GSI {}: {e}", self.gsi);
        }
    }
}

/// Keeps each virtio-pci function's queue-notification ioeventfds where its BAR 0 is.
pub struct NotifyPlacement {
    vm: Arc<Vm>,
    /// Where BARs may be placed: an address elsewhere (such as the all-ones of BAR sizing) is not
    /// one the guest will notify at.
    window: Range<u64>,
    functions: Mutex<HashMap<PciAddress, PlacedQueues>>,
}

struct PlacedQueues {
    events: Vec<EventFd>,
    registered_at: Option<u64>,
}

impl NotifyPlacement {
    /// Placement for BARs inside `window`.
    pub fn new(vm: Arc<Vm>, window: Range<u64>) -> Self {
        Self {
            vm,
            window,
            functions: Mutex::new(HashMap::new()),
        }
    }

    fn add(&self, address: PciAddress, events: Vec<EventFd>) {
        lock(&self.functions).insert(
            address,
            PlacedQueues {
                events,
                registered_at: None,
            },
        );
    }
}

impl BarObserver for NotifyPlacement {
    fn bar_moved(&self, address: PciAddress, moved: BarReprogrammed) {
        if moved.index != 0 {
            return;
        }
        let mut functions = lock(&self.functions);
        let Some(placed) = functions.get_mut(&address) else {
            return;
        };
        let notify = |bar: u64, queue: usize| {
            IoEventAddress::Mmio(
                bar + NOTIFY_OFFSET + queue as u64 * u64::from(NOTIFY_OFF_MULTIPLIER),
            )
        };
        if let Some(old) = placed.registered_at.take() {
            for (queue, event) in placed.events.iter().enumerate() {
                if let Err(e) =
                    self.vm
                        .fd()
                        .unregister_ioevent(event, &notify(old, queue), NoDatamatch)
                {
                    devices::guest_warn!("{address}: cannot remove queue {queue}'s ioeventfd: {e}");
                }
            }
        }
        if !self.window.contains(&moved.new) {
            return;
        }
        for (queue, event) in placed.events.iter().enumerate() {
            if let Err(e) =
                self.vm
                    .fd()
                    .register_ioevent(event, &notify(moved.new, queue), NoDatamatch)
            {
                // The transport still sees the write and signals the queue; only slower.
                devices::guest_warn!("{address}: cannot place queue {queue}'s ioeventfd: {e}");
            }
        }
        placed.registered_at = Some(moved.new);
        tracing::debug!(%address, bar = format_args!("{:#x}", moved.new), "virtio-pci BAR placed");
    }
}

/// Collects virtio-pci devices while a q35 VM is built.
pub struct PciDeviceManager {
    vm: Arc<Vm>,
    root: Arc<Mutex<PciRoot>>,
    routes: Arc<MsiRouteTable>,
    notify: Arc<NotifyPlacement>,
    functions: Vec<(PciAddress, Arc<Mutex<VirtioPciDevice>>)>,
}

impl PciDeviceManager {
    /// Places devices on `root` of `vm`, whose firmware puts BARs inside `window`.
    pub fn new(vm: Arc<Vm>, root: Arc<Mutex<PciRoot>>, window: Range<u64>) -> Self {
        let notify = Arc::new(NotifyPlacement::new(vm.clone(), window));
        lock(&root).set_bar_observer(notify.clone());
        Self {
            vm: vm.clone(),
            root,
            routes: Arc::new(MsiRouteTable::new(vm)),
            notify,
            functions: Vec::new(),
        }
    }

    /// Wires `device` in as the next virtio-pci function: its vectors' GSIs and irqfds, its
    /// queue events, the PCI root and the event loop.
    pub fn add_virtio_device(
        &mut self,
        device: Arc<Mutex<dyn VirtioSubscriber>>,
        vm: &Vm,
        memory: &GuestMemory,
        event_manager: &mut EventManager<Subscriber>,
    ) -> Result<PciAddress, PciDeviceError> {
        let number = FIRST_DEVICE + self.functions.len() as u8;
        if number > LAST_DEVICE {
            return Err(PciDeviceError::TooManyDevices);
        }
        let address = PciAddress::new(0, number, 0).expect("device numbers below 32");
        let gsis = self.routes.allocate(MSIX_VECTORS);
        let routing = Arc::new(FunctionVectors {
            table: self.routes.clone(),
            gsis: gsis.clone(),
        });
        let intx = Arc::new(IntxLine {
            vm: self.vm.clone(),
            gsi: intx_gsi(number, 0),
        });
        let dyn_device: Arc<Mutex<dyn VirtioDevice>> = device.clone();
        let function = VirtioPciDevice::new(dyn_device, memory.clone(), routing, intx)
            .map_err(|source| PciDeviceError::Function { address, source })?;
        for (event, &gsi) in function.msix_eventfds().iter().zip(&gsis) {
            vm.register_irqfd(event, gsi)?;
        }
        let events: Vec<EventFd> = function
            .queue_events()
            .iter()
            .filter_map(|e| e.try_clone().ok())
            .collect();
        self.notify.add(address, events);
        let function = Arc::new(Mutex::new(function));
        lock(&self.root).add_device(address, function.clone())?;
        self.functions.push((address, function));
        event_manager.add_subscriber(device);
        tracing::info!(%address, gsis = ?gsis, "virtio-pci device added");
        Ok(address)
    }

    /// The functions placed so far, in address order.
    pub fn functions(&self) -> impl Iterator<Item = &Arc<Mutex<VirtioPciDevice>>> {
        self.functions.iter().map(|(_, f)| f)
    }

    /// The PCI root the functions are on.
    pub fn root(&self) -> &Arc<Mutex<PciRoot>> {
        &self.root
    }

    /// After a restore loaded the functions' configuration spaces: puts the queue notifications'
    /// ioeventfds where each BAR 0 now is (no BAR write told the placement).
    pub fn place_restored_bars(&self) {
        for (address, function) in &self.functions {
            let bar = lock(function).configuration().bar_address(0);
            if let Some(new) = bar.filter(|a| *a != 0) {
                self.notify.bar_moved(
                    *address,
                    BarReprogrammed {
                        index: 0,
                        old: 0,
                        new,
                    },
                );
            }
        }
    }
}
