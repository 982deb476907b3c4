//! The TCP services of `mode=net`: echo on port 7 and the key-value service (`testguest::kv`)
//! on port 4000, each on `SOCKETS_PER_PORT` listening sockets (a socket listens again when its
//! connection ends). Each round reads what every key-value connection sent, executes the
//! complete lines, has the caller make the round's changes durable in one go, and only then
//! releases the round's replies.

use alloc::vec;
use alloc::vec::Vec;
use smoltcp::iface::{SocketHandle, SocketSet};
use smoltcp::socket::tcp::{self, State};
use testguest::kv::{self, LineSplitter, Store};
use testguest::kvlog::encode_op;

pub const ECHO_PORT: u16 = 7;
pub const KV_PORT: u16 = 4000;
pub const SOCKETS_PER_PORT: usize = 16;
const RX_BUFFER: usize = 64 * 1024;
const TX_BUFFER: usize = 64 * 1024;
/// Stop reading from a client while this much of its output waits (it is not reading).
const MAX_PENDING_OUTPUT: usize = 256 * 1024;
const CHUNK: usize = 4096;

struct KvConn {
    handle: SocketHandle,
    lines: LineSplitter,
    /// Released replies not yet in the socket's send buffer.
    out: Vec<u8>,
}

/// A reply held until the round's changes are durable.
struct Staged {
    conn: usize,
    reply: Vec<u8>,
    changed: bool,
}

pub struct Server {
    echo: Vec<SocketHandle>,
    kv: Vec<KvConn>,
}

fn new_socket(sockets: &mut SocketSet<'_>) -> SocketHandle {
    let rx = tcp::SocketBuffer::new(vec![0u8; RX_BUFFER]);
    let tx = tcp::SocketBuffer::new(vec![0u8; TX_BUFFER]);
    let mut s = tcp::Socket::new(rx, tx);
    s.set_nagle_enabled(false);
    sockets.add(s)
}

/// Listens again if the socket's connection is over; returns whether it did.
fn relisten(s: &mut tcp::Socket<'_>, port: u16) -> bool {
    if s.is_open() {
        return false;
    }
    // A socket that is not open (closed, or time-wait) can always listen.
    let _ = s.listen(port);
    true
}

/// Closes our side once the peer has closed its side and everything was read and queued.
fn close_if_done(s: &mut tcp::Socket<'_>, nothing_left: bool) {
    if s.state() == State::CloseWait && s.recv_queue() == 0 && nothing_left {
        s.close();
    }
}

impl Server {
    pub fn new(sockets: &mut SocketSet<'_>) -> Server {
        let echo = (0..SOCKETS_PER_PORT).map(|_| new_socket(sockets)).collect();
        let kv = (0..SOCKETS_PER_PORT)
            .map(|_| KvConn {
                handle: new_socket(sockets),
                lines: LineSplitter::new(kv::MAX_LINE),
                out: Vec::new(),
            })
            .collect();
        let mut server = Server { echo, kv };
        server.housekeeping(sockets);
        server
    }

    /// Echo: sends back whatever arrived, as far as the send buffer has room.
    pub fn echo(&mut self, sockets: &mut SocketSet<'_>) {
        let mut tmp = [0u8; CHUNK];
        for &h in &self.echo {
            let s = sockets.get_mut::<tcp::Socket>(h);
            while s.can_recv() {
                let room = s.send_capacity() - s.send_queue();
                if room == 0 {
                    break;
                }
                let n = s.recv_slice(&mut tmp[..room.min(CHUNK)]).unwrap_or(0);
                if n == 0 {
                    break;
                }
                // Fits: there was room for n bytes.
                let _ = s.send_slice(&tmp[..n]);
            }
            close_if_done(s, true);
            relisten(s, ECHO_PORT);
        }
    }

    /// One key-value round. `commit` gets the encoded changes of every command executed this
    /// round (none if nothing changed) and must make them durable; if it fails, the round's
    /// changes are taken back and every reply from the first changing command on (any of
    /// them may have seen a change that is now gone) becomes `ERR <reason>`.
    pub fn kv_round(
        &mut self,
        sockets: &mut SocketSet<'_>,
        store: &mut Store,
        commit: &mut impl FnMut(&[u8], &Store) -> Result<(), alloc::string::String>,
    ) {
        let mut staged: Vec<Staged> = Vec::new();
        let mut payload: Vec<u8> = Vec::new();
        let mut undo = kv::Undo::default();
        let mut tmp = [0u8; CHUNK];
        for (i, conn) in self.kv.iter_mut().enumerate() {
            let s = sockets.get_mut::<tcp::Socket>(conn.handle);
            while s.can_recv() && conn.out.len() < MAX_PENDING_OUTPUT {
                let n = s.recv_slice(&mut tmp).unwrap_or(0);
                if n == 0 {
                    break;
                }
                conn.lines.feed(&tmp[..n], &mut |line| {
                    let (reply, changed) = match line.and_then(kv::parse) {
                        Ok(cmd) => {
                            let o = store.execute_undoable(
                                cmd,
                                &mut |op| {
                                    // Keys and lines are far below the format's limits.
                                    let _ = encode_op(&mut payload, op);
                                },
                                &mut undo,
                            );
                            (o.reply, o.changed)
                        }
                        Err(e) => (kv::error_reply(e), false),
                    };
                    staged.push(Staged {
                        conn: i,
                        reply,
                        changed,
                    });
                });
            }
        }
        let result = if payload.is_empty() {
            Ok(())
        } else {
            commit(&payload, store)
        };
        if result.is_err() {
            store.rollback(undo);
        }
        let mut tainted = false;
        for st in staged {
            tainted |= st.changed;
            let out = &mut self.kv[st.conn].out;
            match &result {
                Err(why) if tainted => {
                    out.extend_from_slice(b"ERR ");
                    out.extend_from_slice(why.as_bytes());
                    out.push(b'\n');
                }
                _ => out.extend_from_slice(&st.reply),
            }
        }
        for conn in &mut self.kv {
            let s = sockets.get_mut::<tcp::Socket>(conn.handle);
            if !conn.out.is_empty() && s.can_send() {
                let n = s.send_slice(&conn.out).unwrap_or(0);
                conn.out.drain(..n);
            }
        }
        self.housekeeping(sockets);
    }

    /// Closes finished connections and listens again on free sockets.
    fn housekeeping(&mut self, sockets: &mut SocketSet<'_>) {
        for conn in &mut self.kv {
            let s = sockets.get_mut::<tcp::Socket>(conn.handle);
            // An unfinished last line (no newline before the peer closed) is dropped.
            close_if_done(s, conn.out.is_empty());
            if relisten(s, KV_PORT) {
                conn.lines = LineSplitter::new(kv::MAX_LINE);
                conn.out.clear();
            }
        }
        for &h in &self.echo {
            relisten(sockets.get_mut::<tcp::Socket>(h), ECHO_PORT);
        }
    }
}
