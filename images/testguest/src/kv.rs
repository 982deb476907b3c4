//! The key-value protocol of `mode=net` (TCP port 4000): one command per line, one reply line
//! per command.
//!
//! | command | reply |
//! |---|---|
//! | `SET <key> <value>` | `OK` (the value is the rest of the line and may hold spaces) |
//! | `GET <key>` | `VALUE <value>` or `NIL` |
//! | `INCR <key>` | the new value, a decimal i64 (a missing key counts as 0); `ERR not an integer` |
//! | `DEL <key>` | `OK` (also for a missing key) |
//! | anything else | `ERR <what>` |
//!
//! Command names are case-insensitive; keys are 1 to `MAX_KEY` bytes without whitespace; lines
//! end in `\n` (a `\r` before it is dropped) and are at most `MAX_LINE` bytes. Replies end in
//! `\n`. Everything here is pure: the network and the disk log are the caller's business.

use alloc::collections::BTreeMap;
use alloc::vec::Vec;

/// Longest key.
pub const MAX_KEY: usize = 250;
/// Longest command line, without its newline.
pub const MAX_LINE: usize = 64 * 1024;

/// A parsed command, borrowing from its line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Command<'a> {
    Set(&'a [u8], &'a [u8]),
    Get(&'a [u8]),
    Incr(&'a [u8]),
    Del(&'a [u8]),
}

/// Why a line is not a command (the text after `ERR `).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ParseError {
    Empty,
    Unknown,
    Usage(&'static str),
    KeyTooLong,
    LineTooLong,
}

impl ParseError {
    pub fn message(self) -> &'static str {
        match self {
            ParseError::Empty => "empty command",
            ParseError::Unknown => "unknown command (SET, GET, INCR, DEL)",
            ParseError::Usage(u) => u,
            ParseError::KeyTooLong => "key too long",
            ParseError::LineTooLong => "line too long",
        }
    }
}

fn is_space(b: u8) -> bool {
    b == b' ' || b == b'\t'
}

/// Splits off the first word: `(word, rest after the spaces that follow it)`.
fn word(s: &[u8]) -> (&[u8], &[u8]) {
    let start = s.iter().position(|&b| !is_space(b)).unwrap_or(s.len());
    let s = &s[start..];
    let end = s.iter().position(|&b| is_space(b)).unwrap_or(s.len());
    let (w, rest) = s.split_at(end);
    let skip = rest
        .iter()
        .position(|&b| !is_space(b))
        .unwrap_or(rest.len());
    (w, &rest[skip..])
}

fn key(k: &[u8]) -> Result<&[u8], ParseError> {
    if k.len() > MAX_KEY {
        Err(ParseError::KeyTooLong)
    } else {
        Ok(k)
    }
}

/// Parses one line (without its `\n`; a trailing `\r` is ignored).
pub fn parse(line: &[u8]) -> Result<Command<'_>, ParseError> {
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let (name, rest) = word(line);
    if name.is_empty() {
        return Err(ParseError::Empty);
    }
    let one_key = |usage| {
        let (k, extra) = word(rest);
        if k.is_empty() || !extra.is_empty() {
            Err(ParseError::Usage(usage))
        } else {
            key(k)
        }
    };
    if name.eq_ignore_ascii_case(b"SET") {
        let (k, value) = word(rest);
        if k.is_empty() || value.is_empty() {
            return Err(ParseError::Usage("usage: SET key value"));
        }
        Ok(Command::Set(key(k)?, value))
    } else if name.eq_ignore_ascii_case(b"GET") {
        Ok(Command::Get(one_key("usage: GET key")?))
    } else if name.eq_ignore_ascii_case(b"INCR") {
        Ok(Command::Incr(one_key("usage: INCR key")?))
    } else if name.eq_ignore_ascii_case(b"DEL") {
        Ok(Command::Del(one_key("usage: DEL key")?))
    } else {
        Err(ParseError::Unknown)
    }
}

/// A change to the store, as written to the log (INCR is logged as the SET of its result).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op<'a> {
    Set(&'a [u8], &'a [u8]),
    Del(&'a [u8]),
}

/// The key-value state.
#[derive(Default, Debug, Clone, PartialEq, Eq)]
pub struct Store {
    map: BTreeMap<Vec<u8>, Vec<u8>>,
}

/// What executing a command produced.
#[derive(Debug, PartialEq, Eq)]
pub struct Outcome {
    /// The reply line, with its `\n`.
    pub reply: Vec<u8>,
    /// Whether the store changed (the change must be logged before `reply` is sent).
    pub changed: bool,
}

fn line(parts: &[&[u8]]) -> Vec<u8> {
    let mut v = Vec::with_capacity(parts.iter().map(|p| p.len()).sum::<usize>() + 1);
    for p in parts {
        v.extend_from_slice(p);
    }
    v.push(b'\n');
    v
}

/// What a round of commands changed, to take it back (`Store::rollback`) when the changes
/// could not be made durable.
#[derive(Default, Debug)]
pub struct Undo {
    /// (key, value before the command), in execution order.
    entries: Vec<(Vec<u8>, Option<Vec<u8>>)>,
}

impl Undo {
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

impl Command<'_> {
    /// The key a command may change.
    pub fn changes_key(&self) -> Option<&[u8]> {
        match *self {
            Command::Set(k, _) | Command::Incr(k) | Command::Del(k) => Some(k),
            Command::Get(_) => None,
        }
    }
}

/// The reply to a line that did not parse.
pub fn error_reply(e: ParseError) -> Vec<u8> {
    line(&[b"ERR ", e.message().as_bytes()])
}

impl Store {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    pub fn get(&self, k: &[u8]) -> Option<&[u8]> {
        self.map.get(k).map(Vec::as_slice)
    }

    /// Every entry, in key order.
    pub fn iter(&self) -> impl Iterator<Item = (&[u8], &[u8])> {
        self.map.iter().map(|(k, v)| (k.as_slice(), v.as_slice()))
    }

    /// Applies a logged change (replay).
    pub fn apply(&mut self, op: Op<'_>) {
        match op {
            Op::Set(k, v) => {
                self.map.insert(k.to_vec(), v.to_vec());
            }
            Op::Del(k) => {
                self.map.remove(k);
            }
        }
    }

    /// As `execute`, also recording in `undo` how to take the change back.
    pub fn execute_undoable(
        &mut self,
        cmd: Command<'_>,
        log: &mut impl FnMut(Op<'_>),
        undo: &mut Undo,
    ) -> Outcome {
        if let Some(k) = cmd.changes_key() {
            undo.entries.push((k.to_vec(), self.map.get(k).cloned()));
        }
        self.execute(cmd, log)
    }

    /// Takes back every change recorded in `undo` (latest first).
    pub fn rollback(&mut self, undo: Undo) {
        for (k, old) in undo.entries.into_iter().rev() {
            match old {
                Some(v) => self.map.insert(k, v),
                None => self.map.remove(&k),
            };
        }
    }

    /// Executes `cmd`; `log` receives the change, if any, before this returns.
    pub fn execute(&mut self, cmd: Command<'_>, log: &mut impl FnMut(Op<'_>)) -> Outcome {
        match cmd {
            Command::Set(k, v) => {
                self.map.insert(k.to_vec(), v.to_vec());
                log(Op::Set(k, v));
                Outcome {
                    reply: line(&[b"OK"]),
                    changed: true,
                }
            }
            Command::Get(k) => Outcome {
                reply: match self.map.get(k) {
                    Some(v) => line(&[b"VALUE ", v]),
                    None => line(&[b"NIL"]),
                },
                changed: false,
            },
            Command::Incr(k) => {
                let current = match self.map.get(k) {
                    None => Some(0i64),
                    Some(v) => core::str::from_utf8(v).ok().and_then(|s| s.parse().ok()),
                };
                let Some(current) = current else {
                    return Outcome {
                        reply: line(&[b"ERR not an integer"]),
                        changed: false,
                    };
                };
                let Some(new) = current.checked_add(1) else {
                    return Outcome {
                        reply: line(&[b"ERR increment would overflow"]),
                        changed: false,
                    };
                };
                let text = alloc::format!("{new}").into_bytes();
                log(Op::Set(k, &text));
                let reply = line(&[&text]);
                self.map.insert(k.to_vec(), text);
                Outcome {
                    reply,
                    changed: true,
                }
            }
            Command::Del(k) => {
                let changed = self.map.remove(k).is_some();
                if changed {
                    log(Op::Del(k));
                }
                Outcome {
                    reply: line(&[b"OK"]),
                    changed,
                }
            }
        }
    }
}

/// Splits a byte stream into lines of at most `max` bytes. A longer line is reported once as
/// `Err(LineTooLong)` and the rest of it, up to its newline, is dropped.
#[derive(Debug)]
pub struct LineSplitter {
    buf: Vec<u8>,
    max: usize,
    discarding: bool,
}

impl LineSplitter {
    pub fn new(max: usize) -> Self {
        LineSplitter {
            buf: Vec::new(),
            max,
            discarding: false,
        }
    }

    /// Bytes held of an unfinished line.
    pub fn pending(&self) -> usize {
        self.buf.len()
    }

    /// Feeds `data`; `each` gets every complete line (without its `\n`), in order.
    pub fn feed(&mut self, mut data: &[u8], each: &mut impl FnMut(Result<&[u8], ParseError>)) {
        while !data.is_empty() {
            let nl = data.iter().position(|&b| b == b'\n');
            let (chunk, rest, complete) = match nl {
                Some(i) => (&data[..i], &data[i + 1..], true),
                None => (data, &data[data.len()..], false),
            };
            data = rest;
            if self.discarding {
                self.discarding = !complete;
                continue;
            }
            if self.buf.len() + chunk.len() > self.max {
                self.buf.clear();
                self.discarding = !complete;
                each(Err(ParseError::LineTooLong));
                continue;
            }
            if complete {
                if self.buf.is_empty() {
                    each(Ok(chunk));
                } else {
                    self.buf.extend_from_slice(chunk);
                    each(Ok(&self.buf));
                    self.buf.clear();
                }
            } else {
                self.buf.extend_from_slice(chunk);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::string::String;
    use alloc::vec;

    /// Logged changes: (key, Some(value)) for a set, (key, None) for a delete.
    type Logged = Vec<(Vec<u8>, Option<Vec<u8>>)>;

    fn run(store: &mut Store, text: &str) -> (String, Logged) {
        let mut ops = Vec::new();
        let out = match parse(text.as_bytes()) {
            Ok(cmd) => {
                store
                    .execute(cmd, &mut |op| match op {
                        Op::Set(k, v) => ops.push((k.to_vec(), Some(v.to_vec()))),
                        Op::Del(k) => ops.push((k.to_vec(), None)),
                    })
                    .reply
            }
            Err(e) => error_reply(e),
        };
        (String::from_utf8(out).unwrap(), ops)
    }

    #[test]
    fn parses_commands() {
        assert_eq!(parse(b"SET k v"), Ok(Command::Set(b"k", b"v")));
        assert_eq!(
            parse(b"set  key  two words \r"),
            Ok(Command::Set(b"key", b"two words "))
        );
        assert_eq!(parse(b"GET k"), Ok(Command::Get(b"k")));
        assert_eq!(parse(b"\tincr n\r"), Ok(Command::Incr(b"n")));
        assert_eq!(parse(b"Del k"), Ok(Command::Del(b"k")));
    }

    #[test]
    fn rejects_bad_lines() {
        assert_eq!(parse(b""), Err(ParseError::Empty));
        assert_eq!(parse(b"  \r"), Err(ParseError::Empty));
        assert_eq!(parse(b"PUT k v"), Err(ParseError::Unknown));
        assert!(matches!(parse(b"SET k"), Err(ParseError::Usage(_))));
        assert!(matches!(parse(b"SET"), Err(ParseError::Usage(_))));
        assert!(matches!(parse(b"GET"), Err(ParseError::Usage(_))));
        assert!(matches!(parse(b"GET a b"), Err(ParseError::Usage(_))));
        assert!(matches!(parse(b"DEL"), Err(ParseError::Usage(_))));
        let long = vec![b'k'; MAX_KEY + 1];
        let mut l = b"GET ".to_vec();
        l.extend_from_slice(&long);
        assert_eq!(parse(&l), Err(ParseError::KeyTooLong));
    }

    #[test]
    fn executes_and_reports_changes() {
        let mut s = Store::new();
        assert_eq!(run(&mut s, "GET a").0, "NIL\n");
        let (r, ops) = run(&mut s, "SET a hello world");
        assert_eq!(r, "OK\n");
        assert_eq!(ops, vec![(b"a".to_vec(), Some(b"hello world".to_vec()))]);
        assert_eq!(run(&mut s, "GET a").0, "VALUE hello world\n");
        assert_eq!(run(&mut s, "INCR a").0, "ERR not an integer\n");
        let (r, ops) = run(&mut s, "INCR n");
        assert_eq!(r, "1\n");
        assert_eq!(ops, vec![(b"n".to_vec(), Some(b"1".to_vec()))]);
        assert_eq!(run(&mut s, "INCR n").0, "2\n");
        assert_eq!(run(&mut s, "SET m -5").0, "OK\n");
        assert_eq!(run(&mut s, "INCR m").0, "-4\n");
        assert_eq!(run(&mut s, "SET big 9223372036854775807").0, "OK\n");
        assert_eq!(run(&mut s, "INCR big").0, "ERR increment would overflow\n");
        let (r, ops) = run(&mut s, "DEL a");
        assert_eq!(r, "OK\n");
        assert_eq!(ops, vec![(b"a".to_vec(), None)]);
        let (r, ops) = run(&mut s, "DEL a");
        assert_eq!(r, "OK\n");
        assert!(ops.is_empty(), "deleting a missing key changes nothing");
        assert_eq!(run(&mut s, "GET a").0, "NIL\n");
        assert_eq!(
            run(&mut s, "FOO").0,
            "ERR unknown command (SET, GET, INCR, DEL)\n"
        );
        assert_eq!(s.len(), 3);
    }

    #[test]
    fn replaying_logged_changes_rebuilds_the_store() {
        let mut s = Store::new();
        let mut log = Vec::new();
        for cmd in ["SET a 1", "INCR a", "SET b x", "DEL b", "INCR c", "GET a"] {
            let c = parse(cmd.as_bytes()).unwrap();
            s.execute(c, &mut |op| {
                log.push(match op {
                    Op::Set(k, v) => (k.to_vec(), Some(v.to_vec())),
                    Op::Del(k) => (k.to_vec(), None),
                })
            });
        }
        let mut r = Store::new();
        for (k, v) in &log {
            r.apply(match v {
                Some(v) => Op::Set(k, v),
                None => Op::Del(k),
            });
        }
        assert_eq!(r, s);
        assert_eq!(r.get(b"a"), Some(&b"2"[..]));
        assert_eq!(r.get(b"c"), Some(&b"1"[..]));
        assert_eq!(r.get(b"b"), None);
    }

    #[test]
    fn rollback_restores_the_state_before_a_round() {
        let mut s = Store::new();
        for c in ["SET a 1", "SET b 2", "SET n 5"] {
            s.execute(parse(c.as_bytes()).unwrap(), &mut |_| {});
        }
        let before = s.clone();
        let mut undo = Undo::default();
        for c in [
            "SET a 9",
            "DEL b",
            "INCR n",
            "INCR n",
            "SET new x",
            "GET a",
            "DEL gone",
            "SET a 10",
        ] {
            s.execute_undoable(parse(c.as_bytes()).unwrap(), &mut |_| {}, &mut undo);
        }
        assert_ne!(s, before);
        assert!(!undo.is_empty());
        s.rollback(undo);
        assert_eq!(s, before);
    }

    fn split(sp: &mut LineSplitter, data: &[u8]) -> Vec<Result<Vec<u8>, ParseError>> {
        let mut out = Vec::new();
        sp.feed(data, &mut |l| out.push(l.map(<[u8]>::to_vec)));
        out
    }

    #[test]
    fn splits_lines_across_reads() {
        let mut sp = LineSplitter::new(16);
        assert_eq!(split(&mut sp, b"GET a\nSET b"), vec![Ok(b"GET a".to_vec())]);
        assert_eq!(sp.pending(), 5);
        assert_eq!(
            split(&mut sp, b" c\r\n\nGET"),
            vec![Ok(b"SET b c\r".to_vec()), Ok(b"".to_vec())]
        );
        assert_eq!(split(&mut sp, b" b\n"), vec![Ok(b"GET b".to_vec())]);
        assert_eq!(sp.pending(), 0);
    }

    #[test]
    fn drops_overlong_lines_once() {
        let mut sp = LineSplitter::new(8);
        assert_eq!(split(&mut sp, b"12345"), vec![]);
        assert_eq!(split(&mut sp, b"6789"), vec![Err(ParseError::LineTooLong)]);
        assert_eq!(split(&mut sp, b"more junk"), vec![]);
        assert_eq!(
            split(&mut sp, b"tail\nGET x\n"),
            vec![Ok(b"GET x".to_vec())]
        );
        // Exactly max bytes is fine; one more in a single read is not.
        assert_eq!(
            split(&mut sp, b"12345678\n"),
            vec![Ok(b"12345678".to_vec())]
        );
        assert_eq!(
            split(&mut sp, b"123456789\nA\n"),
            vec![Err(ParseError::LineTooLong), Ok(b"A".to_vec())]
        );
    }
}
