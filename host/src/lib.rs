//! # sluice
//!
//! A WebAssembly-pluggable micro-batch stream processor. The host owns everything that
//! must be right for every user; users' transforms and aggregates run as WebAssembly
//! components behind the `sluice:plugin` WIT world (see `wit/plugin.wit`).
//!
//! Modules, in the order a batch meets them:
//! * [`config`] — the pipeline file, checked.
//! * [`pipeline`] — the micro-batch loop: plan → fetch → plugins → sink → commit; it wires
//!   the modules below and owns none of their details.
//! * [`recovery`] — where a run continues: checkpoint chosen, state restored, batches to replay.
//! * [`plan`] — pure planning: positions, watermarks, budgets and caps → offset ranges.
//! * [`source`] — the `Source` trait the loop reads through, and an in-memory source.
//! * [`kafka`] — the Kafka source: exact fetch, group commits (owns librdkafka).
//! * [`chain`] — one batch through the plugin chain.
//! * [`runtime`] — loads, checks and runs plugins (owns wasmtime).
//! * [`swap`] — watches the plugin directory and prepares new plugin versions for a live swap.
//! * [`sink`] — where each batch's output goes, named by batch id.
//! * [`offline`] — feeds a plugin from a JSON-lines file in batches (`sluice plugin test`).
//! * [`examples`] — the example plugins, built from `plugins/` and embedded.
//! * [`demo`] — seed-style ad-click events and the embedded demo.
//! * [`broker`] — brokers sluice starts itself: the mock cluster and Apache Kafka (one node or a cluster) as local processes.
//! * [`bench`] — the benchmarks.

pub mod bench;
pub mod broker;
pub mod chain;
pub mod checkpoint;
pub mod config;
pub mod demo;
pub mod examples;
pub mod http;
pub mod kafka;
pub mod metrics;
pub mod offline;
pub mod pipeline;
pub mod plan;
pub mod rate;
pub mod recovery;
pub mod runtime;
pub mod sink;
pub mod source;
pub mod store;
pub mod swap;
