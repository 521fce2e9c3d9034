//! # sluice
//!
//! A WebAssembly-pluggable micro-batch stream processor. The host owns everything that
//! must be right for every user; users' transforms and aggregates run as WebAssembly
//! components behind the `sluice:plugin` WIT world (see `wit/plugin.wit`).
//!
//! Modules, in the order a batch meets them:
//! * [`config`] — the pipeline file, checked.
//! * [`control`] — the run's control channel: stop, retune, new plugin versions; waits with deadlines.
//! * [`pipeline`] — the micro-batch loop: plan → fetch → plugins → sink → commit; it wires
//!   the modules below and owns none of their details.
//! * [`progress`] — the progress record of a batch and the observers that follow a run.
//! * [`error`] — what ends a run early, by kind, with its cause.
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
//! * [`broker`] — the in-process mock cluster the demo runs on, and the `Broker` trait.
//!
//! The benchmarks and the Apache Kafka they start are in the `sluice-bench` crate.

pub mod broker;
pub mod chain;
pub mod checkpoint;
pub mod config;
pub mod control;
pub mod demo;
pub mod error;
pub mod examples;
pub mod http;
pub mod kafka;
pub mod metrics;
pub mod offline;
pub mod pipeline;
pub mod plan;
pub mod progress;
pub mod rate;
pub mod recovery;
pub mod repartition;
pub mod runtime;
pub mod sink;
pub mod source;
pub mod store;
pub mod swap;

/// The house rules of `host/src`, checked on the source itself: the modules form no import
/// cycle (each can be read knowing only the ones below it), and no file grows past 600
/// lines.
#[cfg(test)]
mod house_rules {
    use std::collections::{BTreeMap, BTreeSet};
    use std::path::{Path, PathBuf};

    fn sources(dir: &Path, out: &mut Vec<PathBuf>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                sources(&path, out);
            } else if path.extension().is_some_and(|e| e == "rs") {
                out.push(path);
            }
        }
    }

    fn src() -> (PathBuf, Vec<PathBuf>) {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
        let mut files = Vec::new();
        sources(&root, &mut files);
        files.sort();
        (root, files)
    }

    /// The top-level modules each top-level module of the library uses (test code and
    /// comments aside).
    fn imports() -> BTreeMap<String, BTreeSet<String>> {
        let (root, files) = src();
        let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        for file in files {
            let relative = file.strip_prefix(&root).unwrap();
            let module = relative.components().next().unwrap().as_os_str().to_string_lossy().trim_end_matches(".rs").to_string();
            if module == "lib" || module == "main" || relative.ends_with("tests.rs") {
                continue;
            }
            let text = std::fs::read_to_string(&file).unwrap();
            let code = text.split("#[cfg(test)]").next().unwrap();
            let uses = graph.entry(module.clone()).or_default();
            for line in code.lines().filter(|l| !l.trim_start().starts_with("//")) {
                let mut names: Vec<&str> = line.match_indices("crate::").map(|(i, _)| &line[i + 7..]).collect();
                // `use crate::{a, b::c}`
                if let Some(group) = line.split("crate::{").nth(1) {
                    names.extend(group.split(['{', '}', ',']).map(str::trim));
                }
                for name in names {
                    let name: String = name.chars().take_while(|c| c.is_ascii_lowercase() || *c == '_').collect();
                    if !name.is_empty() && name != module {
                        uses.insert(name);
                    }
                }
            }
        }
        let known: BTreeSet<String> = graph.keys().cloned().collect();
        graph.values_mut().for_each(|uses| uses.retain(|m| known.contains(m)));
        graph
    }

    /// A cycle through `from`, if any (depth-first).
    fn cycle(graph: &BTreeMap<String, BTreeSet<String>>, path: &mut Vec<String>, done: &mut BTreeSet<String>) -> Option<Vec<String>> {
        let here = path.last().unwrap().clone();
        for next in &graph[&here] {
            if let Some(at) = path.iter().position(|m| m == next) {
                let mut found = path[at..].to_vec();
                found.push(next.clone());
                return Some(found);
            }
            if done.contains(next) {
                continue;
            }
            path.push(next.clone());
            if let Some(found) = cycle(graph, path, done) {
                return Some(found);
            }
            path.pop();
        }
        done.insert(here);
        None
    }

    #[test]
    fn the_modules_form_no_import_cycle() {
        let graph = imports();
        assert!(graph.len() > 10 && graph["pipeline"].contains("chain"), "the import graph was read: {graph:?}");
        let mut done = BTreeSet::new();
        for module in graph.keys() {
            if let Some(found) = cycle(&graph, &mut vec![module.clone()], &mut done) {
                panic!("import cycle in host/src: {}", found.join(" -> "));
            }
        }
    }

    #[test]
    fn no_source_file_is_longer_than_600_lines() {
        let (root, files) = src();
        let long: Vec<String> = files
            .iter()
            .filter_map(|f| {
                let lines = std::fs::read_to_string(f).unwrap().lines().count();
                (lines > 600).then(|| format!("{} ({lines} lines)", f.strip_prefix(&root).unwrap().display()))
            })
            .collect();
        assert!(long.is_empty(), "split these by concern: {}", long.join(", "));
    }
}
