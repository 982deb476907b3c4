//! `stopwatch`: times a program until it prints a line, for the nested tier's benchmarks
//! (scripts/bench-nested), where the guest's marker line is what "booted" means.
//!
//! ```text
//! stopwatch PATTERN OUTPUT -- PROGRAM [ARG...]
//! ```
//! Runs PROGRAM with its stdout copied line by line to the file OUTPUT (stderr is left alone) and,
//! at the first line containing PATTERN, prints `stopwatch: ms=T` (milliseconds since PROGRAM was
//! started) on stdout. Exits with PROGRAM's status once it exits; 1 if PATTERN never appeared.

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::time::Instant;

fn run(args: &[String]) -> Result<i32, String> {
    let [pattern, output, dashes, program, rest @ ..] = args else {
        return Err("usage: stopwatch PATTERN OUTPUT -- PROGRAM [ARG...]".into());
    };
    if dashes != "--" {
        return Err("usage: stopwatch PATTERN OUTPUT -- PROGRAM [ARG...]".into());
    }
    let mut out = std::fs::File::create(output).map_err(|e| format!("{output}: {e}"))?;
    let start = Instant::now();
    let mut child = Command::new(program)
        .args(rest)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run {program}: {e}"))?;
    let stdout = child.stdout.take().ok_or("no stdout pipe")?;
    let mut seen = false;
    for line in BufReader::new(stdout).split(b'\n') {
        let Ok(line) = line else { break };
        if !seen && line.windows(pattern.len()).any(|w| w == pattern.as_bytes()) {
            seen = true;
            println!("stopwatch: ms={}", start.elapsed().as_millis());
        }
        out.write_all(&line)
            .and_then(|()| out.write_all(b"\n"))
            .map_err(|e| format!("{output}: {e}"))?;
    }
    let status = child
        .wait()
        .map_err(|e| format!("wait for {program}: {e}"))?;
    if !seen {
        return Err(format!(
            "{program} exited ({status}) without printing {pattern:?}"
        ));
    }
    Ok(status.code().unwrap_or(1))
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match run(&args) {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("stopwatch: error: {e}");
            std::process::exit(1);
        }
    }
}
