//! Command-line parsing: whitespace-separated `key=value` words (or bare `key`); a value may be
//! double-quoted to hold spaces. The last occurrence of a key wins, as in Linux.

/// A parsed view of the command line.
#[derive(Clone, Copy, Debug)]
pub struct Cmdline<'a> {
    raw: &'a str,
}

impl<'a> Cmdline<'a> {
    pub fn new(raw: &'a str) -> Self {
        Cmdline { raw }
    }

    /// `(key, value)` pairs in order; a bare word has value `None`.
    pub fn params(&self) -> Params<'a> {
        Params { rest: self.raw }
    }

    /// The value of the last `key=value` (`Some("")` for a bare `key`).
    pub fn get(&self, key: &str) -> Option<&'a str> {
        self.params()
            .filter(|(k, _)| *k == key)
            .last()
            .map(|(_, v)| v.unwrap_or(""))
    }

    /// `key` parsed as an unsigned number (decimal, or hex with 0x).
    pub fn get_u64(&self, key: &str) -> Option<Result<u64, core::num::ParseIntError>> {
        self.get(key).map(parse_u64)
    }
}

/// Decimal or 0x-prefixed hexadecimal.
pub fn parse_u64(s: &str) -> Result<u64, core::num::ParseIntError> {
    match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        Some(hex) => u64::from_str_radix(hex, 16),
        None => s.parse(),
    }
}

/// Iterator over the words of a command line.
pub struct Params<'a> {
    rest: &'a str,
}

impl<'a> Iterator for Params<'a> {
    type Item = (&'a str, Option<&'a str>);

    fn next(&mut self) -> Option<Self::Item> {
        let s = self.rest.trim_start();
        if s.is_empty() {
            self.rest = s;
            return None;
        }
        // A word ends at whitespace outside double quotes.
        let mut in_quotes = false;
        let mut end = s.len();
        for (i, c) in s.char_indices() {
            if c == '"' {
                in_quotes = !in_quotes;
            } else if c.is_whitespace() && !in_quotes {
                end = i;
                break;
            }
        }
        let (word, rest) = s.split_at(end);
        self.rest = rest;
        Some(match word.split_once('=') {
            Some((k, v)) => {
                let v = v
                    .strip_prefix('"')
                    .map(|v| v.strip_suffix('"').unwrap_or(v))
                    .unwrap_or(v);
                (k, Some(v))
            }
            None => (word, None),
        })
    }
}
