//! How `ftvmm vm` prints an API's answer: for people (a table of VMs, `key: value` lines) or as the
//! API's JSON. By default people get the first on a terminal and scripts the second when the output
//! is piped; `--output` chooses.

use std::io::{IsTerminal, Write};

use clap::ValueEnum;
use serde_json::Value;

/// The output format of `ftvmm vm`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum)]
pub enum OutputFormat {
    /// Human on a terminal, JSON when piped.
    #[default]
    Auto,
    /// Tables and `key: value` lines.
    Human,
    /// The API's JSON, pretty-printed.
    Json,
}

impl OutputFormat {
    /// Whether people read this output.
    pub fn is_human(self) -> bool {
        match self {
            Self::Auto => std::io::stdout().is_terminal(),
            Self::Human => true,
            Self::Json => false,
        }
    }
}

/// Prints `value`; a closed stdout (e.g. piped into `head`) is not an error of the command.
pub fn print(value: &Value, format: OutputFormat) {
    let text = if format.is_human() {
        human(value)
    } else {
        serde_json::to_string_pretty(value).unwrap_or_default() + "\n"
    };
    let _ = std::io::stdout().lock().write_all(text.as_bytes());
}

/// `value` for people: a list of VM records as a table, any other object as `key: value` lines
/// (nested keys joined with `.`, absent values left out).
pub fn human(value: &Value) -> String {
    match value {
        Value::Array(items) if items.iter().all(is_vm_record) && !items.is_empty() => {
            vm_table(items)
        }
        Value::Array(items) => items.iter().map(human).collect::<Vec<_>>().join("\n"),
        Value::Object(_) => {
            let mut lines = Vec::new();
            flatten("", value, &mut lines);
            lines.join("\n") + "\n"
        }
        Value::Null => String::new(),
        other => format!("{}\n", scalar(other)),
    }
}

/// One daemon event for people: `VM  KIND  DETAIL`.
pub fn event_line(event: &Value) -> String {
    let field = |k: &str| event[k].as_str().unwrap_or("-").to_string();
    format!("{}  {}  {}", field("vm"), field("kind"), field("detail"))
        .trim_end()
        .to_string()
}

fn is_vm_record(v: &Value) -> bool {
    v.get("id").is_some() && v.get("lifecycle").is_some()
}

fn scalar(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

fn flatten(prefix: &str, value: &Value, lines: &mut Vec<String>) {
    match value {
        Value::Object(map) => {
            for (key, v) in map {
                let key = if prefix.is_empty() {
                    key.clone()
                } else {
                    format!("{prefix}.{key}")
                };
                flatten(&key, v, lines);
            }
        }
        Value::Array(items) if items.iter().all(|i| !i.is_object() && !i.is_array()) => {
            if !items.is_empty() {
                let joined: Vec<String> = items.iter().map(scalar).collect();
                lines.push(format!("{prefix}: {}", joined.join(", ")));
            }
        }
        Value::Array(items) => {
            for (i, item) in items.iter().enumerate() {
                flatten(&format!("{prefix}[{i}]"), item, lines);
            }
        }
        Value::Null => {}
        other => lines.push(format!("{prefix}: {}", scalar(other))),
    }
}

/// VM records as a table: id, name, role, state, pid, peer.
fn vm_table(records: &[Value]) -> String {
    let header = ["ID", "NAME", "ROLE", "STATE", "PID", "PEER"].map(String::from);
    let rows: Vec<[String; 6]> = records
        .iter()
        .map(|r| {
            let text = |v: &Value| match v {
                Value::Null => "-".to_string(),
                other => scalar(other),
            };
            let peer = match (&r["peer"]["relation"], &r["peer"]["daemon"]) {
                (Value::String(rel), Value::String(d)) => format!("{rel} {d}"),
                _ => "-".into(),
            };
            [
                text(&r["id"]),
                text(&r["config"]["name"]),
                text(&r["role"]),
                text(&r["lifecycle"]),
                text(&r["process"]["pid"]),
                peer,
            ]
        })
        .collect();
    let widths: Vec<usize> = (0..6)
        .map(|c| {
            rows.iter()
                .map(|r| r[c].len())
                .chain([header[c].len()])
                .max()
                .unwrap_or(0)
        })
        .collect();
    std::iter::once(&header)
        .chain(&rows)
        .map(|row| {
            let cells: Vec<String> = row
                .iter()
                .zip(&widths)
                .map(|(cell, w)| format!("{cell:<w$}"))
                .collect();
            cells.join("  ").trim_end().to_string() + "\n"
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn vm_lists_are_tables_and_objects_are_key_value_lines() {
        let list = json!([
            { "id": "vm-1", "config": { "name": "web" }, "role": "primary", "lifecycle": "running",
              "process": { "pid": 42 }, "peer": { "relation": "protected_by", "daemon": "b:7200" } },
            { "id": "vm-22", "config": { "name": null }, "role": "standby", "lifecycle": "exited",
              "process": null, "peer": null },
        ]);
        let table = human(&list);
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(lines[0], "ID     NAME  ROLE     STATE    PID  PEER");
        assert_eq!(
            lines[1],
            "vm-1   web   primary  running  42   protected_by b:7200"
        );
        assert_eq!(lines[2], "vm-22  -     standby  exited   -    -");

        let info = json!({ "state": "protected", "standby": "10.0.0.2:7100",
            "last": { "pause_ms": 1.5 }, "gone": null, "taps": ["tap0", "tap1"] });
        assert_eq!(
            human(&info),
            "last.pause_ms: 1.5\nstandby: 10.0.0.2:7100\nstate: protected\ntaps: tap0, tap1\n"
        );
    }
}
