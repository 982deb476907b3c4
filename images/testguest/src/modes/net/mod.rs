//! `mode=net ip=ADDR/PREFIX [gw=ADDR]`: a smoltcp interface on the first virtio-net device that
//! answers ARP and ping, echoes TCP port 7 and serves the key-value protocol (`testguest::kv`)
//! on TCP port 4000. With a virtio-blk disk attached, every change is appended to a log on the
//! first disk (`testguest::kvlog`) and flushed before its reply is sent, and the log is replayed
//! at start. Polls forever (until the VMM is killed).
//!
//! `storm=MIB [storm_chunk=KIB]` writes the second disk meanwhile (`super::disk_storm`).
//!
//! Markers: `testguest: kv restored keys=N` (after the replay; N = 0 without a disk), then
//! `testguest: net up ip=ADDR/PREFIX mac=MAC ...`; `testguest: net FAIL <why>` on a setup
//! error; `testguest: net WARN ...` when the driver meets errors (counts changed).

mod device;
mod server;

use super::Mode;
use crate::arch::{cpu, time};
use crate::cmdline::Cmdline;
use crate::println;
use crate::virtio::blk::Disk;
use crate::virtio::probe;
use alloc::boxed::Box;
use alloc::format;
use alloc::string::{String, ToString};
use alloc::vec;
use core::net::Ipv4Addr;
use device::NetDevice;
use server::Server;
use smoltcp::iface::{Config, Interface, SocketSet};
use smoltcp::time::Instant;
use smoltcp::wire::{EthernetAddress, HardwareAddress, IpCidr, Ipv4Cidr};
use testguest::kv::Store;
use testguest::kvlog::{Appended, Log, snapshot_payload};

pub const MODE: Mode = Mode {
    name: "net",
    about: "ip=A.B.C.D/N [gw=A.B.C.D]: ping, TCP echo :7, key-value :4000 (logged to virtio-blk); storm=MIB [storm_chunk=KIB] writes a second disk",
    run,
};

struct NetConfig {
    ip: Ipv4Cidr,
    gw: Option<Ipv4Addr>,
}

fn parse_config(cmdline: &Cmdline<'_>) -> Result<NetConfig, String> {
    let ip = cmdline.get("ip").ok_or("missing ip=ADDR/PREFIX")?;
    let (addr, prefix) = ip
        .split_once('/')
        .ok_or_else(|| format!("ip={ip}: want ADDR/PREFIX"))?;
    let addr: Ipv4Addr = addr.parse().map_err(|_| format!("ip={ip}: bad address"))?;
    let prefix: u8 = prefix
        .parse()
        .ok()
        .filter(|&p| (1..=32).contains(&p))
        .ok_or_else(|| format!("ip={ip}: prefix must be 1..32"))?;
    let gw = match cmdline.get("gw") {
        None => None,
        Some(g) => Some(
            g.parse::<Ipv4Addr>()
                .map_err(|_| format!("gw={g}: bad address"))?,
        ),
    };
    Ok(NetConfig {
        ip: Ipv4Cidr::new(addr, prefix),
        gw,
    })
}

/// Where changes go before they are acknowledged.
enum Persistence {
    /// No disk: the store lives in memory only.
    Memory,
    /// The log on the first virtio-blk disk.
    Disk { disk: Box<Disk>, log: Log },
}

impl Persistence {
    fn commit(&mut self, payload: &[u8], store: &Store) -> Result<(), String> {
        let Persistence::Disk { disk, log } = self else {
            return Ok(());
        };
        match log.append(&mut **disk, payload, || snapshot_payload(store)) {
            Ok(Appended::Batch { .. }) => Ok(()),
            Ok(Appended::Compacted {
                generation,
                sectors,
            }) => {
                println!(
                    "testguest: kv log compacted generation={} region={} sectors={} keys={}",
                    generation,
                    log.region(),
                    sectors,
                    store.len()
                );
                Ok(())
            }
            Err(e) => {
                let why = e.to_string();
                println!("testguest: kv log error {}", why);
                Err(why)
            }
        }
    }
}

/// Opens (replaying) or formats the log on the first virtio-blk disk, if there is one.
fn open_store() -> Result<(Store, Persistence), String> {
    let mut store = Store::new();
    if probe::find(probe::DEVICE_BLOCK).is_none() {
        println!("testguest: kv log none (no virtio-blk disk: the store is in memory only)");
        return Ok((store, Persistence::Memory));
    }
    let mut disk = Disk::open_first()?;
    // A generation that differs from run to run, so a reformatted disk never takes up the
    // batches of an earlier log; small enough never to overflow.
    let fresh = (cpu::rdtsc() >> 16) | 1;
    let opened = Log::open(&mut disk, fresh, |op| store.apply(op))
        .map_err(|e| format!("kv log on slot {}: {e}", disk.slot.index))?;
    let log = opened.log;
    println!(
        "testguest: kv log slot={} formatted={} generation={} region={} batches={} ops={} next_sector={} readonly={}",
        disk.slot.index,
        u8::from(opened.formatted),
        log.generation(),
        log.region(),
        opened.batches,
        opened.ops,
        log.next_sector(),
        u8::from(disk.readonly())
    );
    Ok((
        store,
        Persistence::Disk {
            disk: Box::new(disk),
            log,
        },
    ))
}

fn mac_string(mac: &[u8; 6]) -> String {
    let mut s = String::new();
    for (i, b) in mac.iter().enumerate() {
        if i > 0 {
            s.push(':');
        }
        s.push_str(&format!("{b:02x}"));
    }
    s
}

fn run(cmdline: &Cmdline<'_>) {
    if let Err(e) = serve(cmdline) {
        println!("testguest: net FAIL {}", e);
    }
}

fn serve(cmdline: &Cmdline<'_>) -> Result<(), String> {
    let cfg = parse_config(cmdline)?;
    let (mut store, mut persistence) = open_store()?;
    println!("testguest: kv restored keys={}", store.len());

    let mut dev = NetDevice::open_first()?;
    let mac = dev.mac();
    let hw = EthernetAddress(mac);
    if !hw.is_unicast() {
        return Err(format!("MAC {} is not unicast", mac_string(&mac)));
    }
    let (hz, _) = time::tsc_hz();
    let t0 = cpu::rdtsc();
    let now = || {
        let ticks = u128::from(cpu::rdtsc().wrapping_sub(t0));
        Instant::from_micros((ticks * 1_000_000 / u128::from(hz)) as i64)
    };
    let mut config = Config::new(HardwareAddress::Ethernet(hw));
    config.random_seed = cpu::rdtsc();
    let mut iface = Interface::new(config, &mut dev, now());
    iface.update_ip_addrs(|addrs| {
        let _ = addrs.push(IpCidr::Ipv4(cfg.ip));
    });
    if let Some(gw) = cfg.gw {
        iface
            .routes_mut()
            .add_default_ipv4_route(gw)
            .map_err(|e| format!("gw={gw}: {e:?}"))?;
    }
    let mut sockets = SocketSet::new(vec![]);
    let mut server = Server::new(&mut sockets);
    println!(
        "testguest: net up ip={} mac={} slot={} echo={} kv={}",
        cfg.ip,
        mac_string(&mac),
        dev.slot.index,
        server::ECHO_PORT,
        server::KV_PORT
    );
    let mut dirtier = super::dirtier::Dirtier::from_cmdline(cmdline, hz)?;
    if let Some(d) = &dirtier {
        println!("testguest: dirtying pages_per_s={} buffer_mb={}", d.rate(), d.buffer_mb());
    }
    let mut storm = super::disk_storm::DiskStorm::from_cmdline(cmdline)?;
    let mut commit = |payload: &[u8], store: &Store| persistence.commit(payload, store);
    let mut reported_errors = 0;
    loop {
        if let Some(d) = dirtier.as_mut() {
            d.tick();
        }
        if let Some(s) = storm.as_mut() {
            s.tick();
        }
        iface.poll(now(), &mut dev, &mut sockets);
        server.echo(&mut sockets);
        server.kv_round(&mut sockets, &mut store, &mut commit);
        // Send what the round queued without waiting for the next frame to arrive.
        iface.poll(now(), &mut dev, &mut sockets);
        // Driver-level errors (a device returning unknown tokens or bad lengths) are rare and
        // worth a line each time their count changes.
        let st = dev.stats();
        if st.rx_errors + st.tx_errors != reported_errors {
            reported_errors = st.rx_errors + st.tx_errors;
            println!(
                "testguest: net WARN rx={} tx={} rx_errors={} tx_errors={}",
                st.rx, st.tx, st.rx_errors, st.tx_errors
            );
        }
        cpu::pause();
    }
}
