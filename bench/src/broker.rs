//! Apache Kafka started by the benchmarks and the real-broker tests: one KRaft node or a
//! three-node cluster, JVM processes on free loopback ports, stopped by their PIDs when the
//! handle is dropped; and a broker someone else runs.

use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use rdkafka::ClientConfig;

use sluice::broker::{create_topic, Broker};

/// What the variable `var` names, else `target/tools/<path>` of this workspace, where
/// `.ci/setup-tests` installs the test brokers.
fn installed(var: &str, path: &str) -> PathBuf {
    std::env::var_os(var).map_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/tools").join(path), PathBuf::from)
}

/// The Apache Kafka version `.ci/setup-tests` installs (`tests/kafka/pom.xml`).
pub const KAFKA_VERSION: &str = "4.4.0";

/// Where `.ci/setup-tests` puts Apache Kafka's jars (`target/tools/kafka/libs` of this
/// workspace), unless `SLUICE_KAFKA_LIBS` names another folder of jars.
pub fn kafka_libs() -> PathBuf {
    installed("SLUICE_KAFKA_LIBS", "kafka/libs")
}

/// Apache Kafka in KRaft mode: one node, or a cluster of several, each broker and
/// controller in one JVM on two free loopback ports, their log directories in a temporary
/// folder removed on drop. Each node keeps its data on disk: [`ApacheKafka::kill`] stops
/// one with SIGKILL and [`ApacheKafka::restart`] brings it back on the same log directory.
/// A cluster replicates every topic to all nodes with `min.insync.replicas = 2`.
pub struct ApacheKafka {
    nodes: Vec<Node>,
    dir: tempfile::TempDir,
}

/// One node of an [`ApacheKafka`] cluster.
struct Node {
    /// Its `node.id`, from 1.
    id: i32,
    child: Option<Child>,
    address: SocketAddr,
}

impl ApacheKafka {
    /// Format a log directory, start one node and wait until it serves metadata.
    pub fn start() -> anyhow::Result<Self> {
        Self::cluster(1)
    }

    /// Start a cluster of `nodes` nodes (node ids 1..=nodes), each a broker and a voter of
    /// the controller quorum, and wait until every node serves. In a cluster a node that
    /// stops heartbeating loses its partitions' leadership within 4 s (the leader-kill
    /// test). A single node is its own controller: after a pause longer than its session
    /// (the outage test pauses it 12 s) it fenced itself, and its partitions were seen to
    /// stay without a leader for minutes; it gets 60 s.
    pub fn cluster(nodes: usize) -> anyhow::Result<Self> {
        Self::cluster_with_session(nodes, Duration::from_secs(if nodes == 1 { 60 } else { 4 }))
    }

    /// [`ApacheKafka::cluster`] with `broker.session.timeout.ms` = `session`. A single node
    /// killed and restarted on its log directory registers again only once its old
    /// session is over: the restart test wants a short one.
    pub fn cluster_with_session(nodes: usize, session: Duration) -> anyhow::Result<Self> {
        let libs = kafka_libs();
        if !libs.join(format!("kafka_2.13-{KAFKA_VERSION}.jar")).is_file() {
            bail!(
                "Apache Kafka {KAFKA_VERSION} is not installed in {}: run `bash .ci/setup-tests` (it fetches it from Maven Central with tests/kafka/pom.xml), or set SLUICE_KAFKA_LIBS to a folder of Kafka's jars",
                libs.display()
            );
        }
        anyhow::ensure!(nodes >= 1, "a cluster needs at least one node");
        let port = || TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).and_then(|l| l.local_addr()).map(|a| a.port()).context("no free loopback port");
        let ports: Vec<(u16, u16)> = (0..nodes).map(|_| Ok((port()?, port()?))).collect::<anyhow::Result<_>>()?;
        let dir = tempfile::Builder::new().prefix("sluice-kafka-").tempdir().context("cannot create a folder for Kafka's log directories")?;
        let voters: Vec<String> = ports.iter().enumerate().map(|(i, (_, controller))| format!("{}@127.0.0.1:{controller}", i + 1)).collect();
        let replication = nodes;
        let min_isr = nodes.min(2);
        let cluster_id = {
            use sha2::Digest;
            let seed = format!("{}-{}-{:?}", std::process::id(), ports[0].0, Instant::now());
            let digest = sha2::Sha256::digest(seed.as_bytes());
            // A Kafka cluster id: 16 bytes, URL-safe base64 without padding.
            base64_url(&digest[..16])
        };
        let session_ms = session.as_millis();
        let mut cluster = Self { nodes: Vec::new(), dir };
        for (i, &(broker_port, controller_port)) in ports.iter().enumerate() {
            let id = i as i32 + 1;
            let home = cluster.home(id);
            std::fs::create_dir_all(&home).context("cannot create a node's folder")?;
            let properties = format!(
                "process.roles=broker,controller\n\
                 node.id={id}\n\
                 controller.quorum.voters={voters}\n\
                 listeners=PLAINTEXT://127.0.0.1:{broker_port},CONTROLLER://127.0.0.1:{controller_port}\n\
                 advertised.listeners=PLAINTEXT://127.0.0.1:{broker_port}\n\
                 controller.listener.names=CONTROLLER\n\
                 listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT\n\
                 inter.broker.listener.name=PLAINTEXT\n\
                 log.dirs={data}\n\
                 num.partitions=1\n\
                 default.replication.factor={replication}\n\
                 min.insync.replicas={min_isr}\n\
                 offsets.topic.replication.factor={replication}\n\
                 offsets.topic.num.partitions=4\n\
                 transaction.state.log.replication.factor={replication}\n\
                 transaction.state.log.min.isr={min_isr}\n\
                 transaction.state.log.num.partitions=4\n\
                 group.initial.rebalance.delay.ms=0\n\
                 broker.session.timeout.ms={session_ms}\n\
                 broker.heartbeat.interval.ms=500\n\
                 auto.create.topics.enable=false\n",
                voters = voters.join(","),
                data = home.join("data").display(),
                session_ms = session_ms,
            );
            std::fs::write(home.join("server.properties"), properties).context("cannot write Kafka's server.properties")?;
            let format = Command::new("java")
                .args(["-Xmx256m", "-cp"])
                .arg(format!("{}/*", libs.display()))
                // `--option=value`: an id may start with `-`, which the parser would take for an option.
                .args(["kafka.tools.StorageTool", "format", &format!("--cluster-id={cluster_id}")])
                .arg(format!("--config={}", home.join("server.properties").display()))
                .stdin(Stdio::null())
                .output()
                .context("cannot run java (Apache Kafka needs Java 17 or later on PATH)")?;
            if !format.status.success() {
                bail!("formatting Kafka's log directory failed: {}{}", String::from_utf8_lossy(&format.stdout), String::from_utf8_lossy(&format.stderr));
            }
            cluster.nodes.push(Node { id, child: None, address: SocketAddr::from((Ipv4Addr::LOCALHOST, broker_port)) });
        }
        // All voters must run before any of them can elect a controller.
        for id in 1..=nodes as i32 {
            cluster.spawn(id)?;
        }
        for id in 1..=nodes as i32 {
            cluster.wait_ready(id)?;
        }
        Ok(cluster)
    }

    fn home(&self, id: i32) -> PathBuf {
        self.dir.path().join(format!("node-{id}"))
    }

    fn node(&mut self, id: i32) -> &mut Node {
        self.nodes.iter_mut().find(|n| n.id == id).expect("a node of this cluster")
    }

    fn spawn(&mut self, id: i32) -> anyhow::Result<()> {
        let home = self.home(id);
        let log = std::fs::OpenOptions::new().create(true).append(true).open(home.join("kafka.log")).context("cannot open Kafka's log file")?;
        let child = Command::new("java")
            .args(["-Xms256m", "-Xmx1g", "-XX:+UseG1GC", "-Djava.awt.headless=true", "-cp"])
            .arg(format!("{}/*", kafka_libs().display()))
            .arg("kafka.Kafka")
            .arg(home.join("server.properties"))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("cannot run java (Apache Kafka needs Java 17 or later on PATH)")?;
        self.node(id).child = Some(child);
        Ok(())
    }

    /// Wait until node `id` answers a metadata request that lists every running node.
    fn wait_ready(&mut self, id: i32) -> anyhow::Result<()> {
        let started = Instant::now();
        let address = self.node(id).address;
        let running = self.nodes.iter().filter(|n| n.child.is_some()).count();
        let client: rdkafka::consumer::BaseConsumer = ClientConfig::new().set("bootstrap.servers", address.to_string()).set("log_level", "0").create()?;
        loop {
            if let Some(status) = self.node(id).child.as_mut().expect("spawned").try_wait()? {
                bail!("Apache Kafka node {id} exited with {status} before it served; its log:\n{}", self.log_text());
            }
            use rdkafka::consumer::Consumer as _;
            if TcpStream::connect_timeout(&address, Duration::from_millis(200)).is_ok()
                && client.fetch_metadata(None, Duration::from_secs(1)).is_ok_and(|m| m.brokers().len() >= running)
            {
                return Ok(());
            }
            if started.elapsed() > Duration::from_secs(90) {
                bail!("Apache Kafka node {id} did not serve on {address} within 90 s; its log:\n{}", self.log_text());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// What the nodes have logged so far (errors only, log4j2's default).
    pub fn log_text(&self) -> String {
        self.nodes.iter().map(|n| format!("-- node {} --\n{}", n.id, std::fs::read_to_string(self.home(n.id).join("kafka.log")).unwrap_or_default())).collect()
    }

    /// The process id of the first node, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.nodes[0].child.as_ref().map(Child::id)
    }

    /// What the benchmarks print about the broker they ran on.
    pub fn describe(&self) -> String {
        let pids: Vec<String> = self.nodes.iter().filter_map(|n| n.child.as_ref().map(|c| c.id().to_string())).collect();
        format!("Apache Kafka {KAFKA_VERSION} ({} node{}, pid {}) at {}", self.nodes.len(), if self.nodes.len() == 1 { "" } else { "s" }, pids.join(", "), self.bootstrap())
    }

    /// Stop node `id` with SIGKILL (by its PID); its log directory stays.
    pub fn kill_node(&mut self, id: i32) {
        if let Some(mut child) = self.node(id).child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Start node `id` again on the same log directory and ports, and wait until it serves.
    pub fn restart_node(&mut self, id: i32) -> anyhow::Result<()> {
        self.kill_node(id);
        self.spawn(id)?;
        self.wait_ready(id)
    }

    /// Stop every node with SIGKILL; the log directories stay.
    pub fn kill(&mut self) {
        for id in 1..=self.nodes.len() as i32 {
            self.kill_node(id);
        }
    }

    /// Start every node again on the same log directories and ports.
    pub fn restart(&mut self) -> anyhow::Result<()> {
        self.kill();
        for id in 1..=self.nodes.len() as i32 {
            self.spawn(id)?;
        }
        for id in 1..=self.nodes.len() as i32 {
            self.wait_ready(id)?;
        }
        Ok(())
    }

    /// The node that leads `topic`'s `partition` now, as the cluster's metadata says.
    pub fn leader(&self, topic: &str, partition: i32) -> anyhow::Result<i32> {
        use rdkafka::consumer::Consumer as _;
        let client: rdkafka::consumer::BaseConsumer = ClientConfig::new().set("bootstrap.servers", self.bootstrap()).create()?;
        let metadata = client.fetch_metadata(Some(topic), Duration::from_secs(10))?;
        let found = metadata.topics().iter().find(|t| t.name() == topic).and_then(|t| t.partitions().iter().find(|p| p.id() == partition)).map(|p| p.leader());
        found.filter(|&l| l >= 0).with_context(|| format!("{topic}/{partition} has no leader now"))
    }
}

/// Stop a broker process (SIGSTOP: it answers nothing, its connections hang) or continue
/// it (SIGCONT), by its PID: an outage that keeps its data.
fn pause(pid: u32, available: bool) -> anyhow::Result<()> {
    let signal = if available { "-CONT" } else { "-STOP" };
    let status = Command::new("kill").args([signal, &pid.to_string()]).status().context("cannot run kill")?;
    anyhow::ensure!(status.success(), "kill {signal} {pid} failed");
    Ok(())
}

/// URL-safe base64 without padding.
fn base64_url(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let n = chunk.iter().enumerate().fold(0u32, |n, (i, &b)| n | (b as u32) << (16 - 8 * i));
        for i in 0..=chunk.len() {
            out.push(ALPHABET[(n >> (18 - 6 * i) & 63) as usize] as char);
        }
    }
    out
}

impl Broker for ApacheKafka {
    /// Every node's address.
    fn bootstrap(&self) -> String {
        self.nodes.iter().map(|n| n.address.to_string()).collect::<Vec<_>>().join(",")
    }

    /// Replicated to every node.
    fn create_topic(&self, name: &str, partitions: i32) -> anyhow::Result<()> {
        create_topic(&self.bootstrap(), name, partitions, self.nodes.len() as i32).with_context(|| format!("Apache Kafka's log:\n{}", self.log_text()))
    }

    fn kind(&self) -> &'static str {
        "kafka"
    }

    /// Every node's JVM is stopped (SIGSTOP) or continued (SIGCONT) by its PID.
    fn set_available(&self, available: bool) -> anyhow::Result<()> {
        for node in &self.nodes {
            pause(node.child.as_ref().map(Child::id).with_context(|| format!("Apache Kafka node {} is not running", node.id))?, available)?;
        }
        Ok(())
    }
}

impl Drop for ApacheKafka {
    fn drop(&mut self) {
        // Stopped by its PID (the child handle), never by name; the folder goes with `dir`.
        self.kill();
    }
}

/// A broker someone else runs, at `host:port`.
pub struct External(pub String);

impl Broker for External {
    fn bootstrap(&self) -> String {
        self.0.clone()
    }
    fn create_topic(&self, name: &str, partitions: i32) -> anyhow::Result<()> {
        create_topic(&self.0, name, partitions, 1)
    }
    fn kind(&self) -> &'static str {
        "external"
    }
    fn set_available(&self, _: bool) -> anyhow::Result<()> {
        bail!("sluice does not control the external broker at {}", self.0)
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn cluster_ids_are_url_safe_base64_without_padding() {
        // Python's base64.urlsafe_b64encode, padding removed.
        assert_eq!(super::base64_url(&(0..16).collect::<Vec<u8>>()), "AAECAwQFBgcICQoLDA0ODw");
        assert_eq!(super::base64_url(&[255, 254, 253, 252, 251]), "__79_Ps");
    }
}
