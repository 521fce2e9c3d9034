//! A transform that misbehaves on purpose, chosen by config `{"mode": ...}`:
//! `spin` (endless loop in process), `alloc` (allocates until memory runs out), `panic`,
//! `recurse` (stack overflow), `slow-init` (endless loop in init), `ok` (forwards records).

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
        }
        Ok(())
    }
}

sluice_sdk::export_transform!(Hostile);
