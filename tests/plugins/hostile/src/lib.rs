//! A transform that misbehaves on purpose, chosen by config `{"mode": ...}`:
//! `spin` (endless loop in process), `alloc` (allocates until memory runs out), `panic`,
//! `recurse` (stack overflow), `slow-init` (endless loop in init), `ok` (forwards records),
//! `flood` (forwards each record 10 000 times), `escape` (tries to read a file, an
//! environment variable and to open a network connection, and forwards one record whose
//! value reports what each attempt gave).

use serde::Deserialize;
use sluice_sdk::{Batch, Context, Error, Output, Transform};

/// Which misbehaviour.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    /// Behave.
    #[default]
    Ok,
    /// Loop forever in process.
    Spin,
    /// Allocate until memory runs out.
    Alloc,
    /// Panic in process.
    Panic,
    /// Recurse until the stack overflows.
    Recurse,
    /// Loop forever in init.
    SlowInit,
    /// Forward each record 10 000 times.
    Flood,
    /// Try to leave the sandbox; report what happened.
    Escape,
}

/// Config.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Which misbehaviour.
    #[serde(default)]
    pub mode: Mode,
}

/// The plugin.
pub struct Hostile {
    mode: Mode,
}

#[inline(never)]
#[allow(unconditional_recursion)]
fn recurse(depth: u64, acc: &mut [u64; 64]) -> u64 {
    acc[(depth % 64) as usize] = depth;
    let below = recurse(depth + 1, std::hint::black_box(acc));
    below.wrapping_add(acc[0])
}

fn spin() -> u64 {
    let mut i: u64 = 0;
    loop {
        i = std::hint::black_box(i.wrapping_add(1));
        if i == u64::MAX {
            return i;
        }
    }
}

impl Transform for Hostile {
    type Config = Config;

    fn new(config: Config) -> Result<Self, Error> {
        if config.mode == Mode::SlowInit {
            spin();
        }
        Ok(Self { mode: config.mode })
    }

    fn process(&mut self, batch: &Batch, _ctx: &Context, out: &mut Output) -> Result<(), Error> {
        match self.mode {
            Mode::Ok | Mode::SlowInit => {
                for r in batch.records() {
                    out.forward(&r, None)?;
                }
            }
            Mode::Spin => {
                spin();
            }
            Mode::Alloc => {
                let mut hoard: Vec<Vec<u8>> = Vec::new();
                loop {
                    hoard.push(vec![1u8; 1 << 20]);
                    std::hint::black_box(&hoard);
                }
            }
            Mode::Panic => panic!("hostile plugin panicked on purpose with {} records", batch.len()),
            Mode::Recurse => {
                let mut acc = [0u64; 64];
                std::hint::black_box(recurse(0, &mut acc));
            }
            Mode::Flood => {
                for r in batch.records() {
                    for _ in 0..10_000 {
                        out.forward(&r, None)?;
                    }
                }
            }
            Mode::Escape => {
                let outcome = |r: Result<String, String>| match r {
                    Ok(got) => format!("allowed: {got}"),
                    Err(e) => format!("denied: {e}"),
                };
                let report = serde_json::json!({
                    "read_file": outcome(std::fs::read_to_string("/etc/hostname").map_err(|e| e.to_string())),
                    "list_dir": outcome(std::fs::read_dir("/").map(|d| d.count().to_string()).map_err(|e| e.to_string())),
                    "write_file": outcome(std::fs::write("/tmp/sluice-escape", b"x").map(|()| "written".into()).map_err(|e| e.to_string())),
                    "env_var": outcome(std::env::var("HOME").map_err(|e| e.to_string())),
                    "env_vars": outcome(Ok(std::env::vars().count().to_string()).and_then(|n| if n == "0" { Err("no variables".into()) } else { Ok(n) })),
                    "connect": outcome(std::net::TcpStream::connect("127.0.0.1:9").map(|_| "connected".into()).map_err(|e| e.to_string())),
                    "args": outcome(Ok(std::env::args().count().to_string()).and_then(|n| if n == "0" { Err("no arguments".into()) } else { Ok(n) })),
                });
                if let Some(first) = batch.records().next() {
                    out.forward(&first, Some(Some(report.to_string().as_bytes())))?;
                }
            }
        }
        Ok(())
    }
}

sluice_sdk::export_transform!(Hostile);
