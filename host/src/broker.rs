//! Kafka brokers started by sluice itself, for the demo, the end-to-end tests and the
//! benchmarks: librdkafka's in-process mock cluster, Apache Kafka (a single KRaft node,
//! a JVM process) and tansu, each real broker a child process on free loopback ports,
//! stopped by its PID when the handle is dropped.

use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::mocking::MockCluster;
use rdkafka::producer::DefaultProducerContext;
use rdkafka::ClientConfig;

/// A broker that topics can be created on.
pub trait Broker {
    /// `host:port` for `bootstrap.servers`.
    fn bootstrap(&self) -> String;
    /// Create `name` with `partitions` partitions (replication 1).
    fn create_topic(&self, name: &str, partitions: i32) -> anyhow::Result<()>;
    /// A short name for messages.
    fn kind(&self) -> &'static str;
    /// librdkafka producer settings for data whose offsets the tests check exactly.
    fn exact_producer_settings(&self) -> &'static [(&'static str, &'static str)] {
        &[]
    }
    /// Make the broker unavailable (`false`) or available again (`true`), keeping its data:
    /// an outage, for tests.
    fn set_available(&self, available: bool) -> anyhow::Result<()>;
}

/// librdkafka's in-process mock cluster. It keeps only a few MiB per partition: right for
/// the demo and small tests, wrong for benchmarks.
pub struct Mock(MockCluster<'static, DefaultProducerContext>);

impl Mock {
    /// A one-broker mock cluster.
    pub fn start() -> anyhow::Result<Self> {
        Ok(Self(MockCluster::new(1).context("cannot start librdkafka's mock cluster")?))
    }

}

impl Broker for Mock {
    fn bootstrap(&self) -> String {
        self.0.bootstrap_servers()
    }
    fn create_topic(&self, name: &str, partitions: i32) -> anyhow::Result<()> {
        self.0.create_topic(name, partitions, 1).with_context(|| format!("cannot create topic {name} on the mock cluster"))
    }
    fn kind(&self) -> &'static str {
        "mock"
    }
    /// The mock broker goes down (its connections are closed and new ones refused) or
    /// comes back up.
    fn set_available(&self, available: bool) -> anyhow::Result<()> {
        if available {
            self.0.broker_up(1).context("cannot bring the mock broker back up")
        } else {
            self.0.broker_down(1).context("cannot take the mock broker down")
        }
    }
}

/// The tansu version `.ci/setup-tests` installs.
pub const TANSU_VERSION: &str = "0.6.0";

/// Where `.ci/setup-tests` installs tansu (`target/tools/bin/tansu` of this workspace), unless
/// `SLUICE_TANSU` names another binary.
pub fn tansu_binary() -> PathBuf {
    installed("SLUICE_TANSU", "bin/tansu")
}

/// What the variable `var` names, else `target/tools/<path>` of this workspace, where
/// `.ci/setup-tests` installs the test brokers.
fn installed(var: &str, path: &str) -> PathBuf {
    std::env::var_os(var).map_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/tools").join(path), PathBuf::from)
}

/// A tansu broker process with in-memory storage on a free loopback port.
pub struct Tansu {
    child: Child,
    address: SocketAddr,
    log: PathBuf,
}

impl Tansu {
    /// Start [`tansu_binary`] and wait until it accepts connections.
    pub fn start() -> anyhow::Result<Self> {
        Self::start_binary(&tansu_binary())
    }

    /// Start the tansu at `binary`.
    pub fn start_binary(binary: &Path) -> anyhow::Result<Self> {
        if !binary.is_file() {
            bail!(
                "the tansu broker is not installed at {}: run `bash .ci/setup-tests` (it installs tansu {TANSU_VERSION}), or set SLUICE_TANSU to a tansu binary",
                binary.display()
            );
        }
        // Ask the OS for a free port, then hand it to tansu.
        let port = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).and_then(|l| l.local_addr()).context("no free loopback port")?.port();
        let address = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
        let url = format!("tcp://{address}");
        let log = std::env::temp_dir().join(format!("sluice-tansu-{port}.log"));
        let log_file = std::fs::File::create(&log).with_context(|| format!("cannot create {}", log.display()))?;
        let child = Command::new(binary)
            .args(["broker", "--listener-url", &url, "--advertised-listener-url", &url, "--storage-engine", "memory://tansu/"])
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(log_file.try_clone()?)
            .stderr(log_file)
            .spawn()
            .with_context(|| format!("cannot start {}", binary.display()))?;
        let mut broker = Self { child, address, log };
        broker.wait_ready()?;
        Ok(broker)
    }

    fn wait_ready(&mut self) -> anyhow::Result<()> {
        let started = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait()? {
                bail!("tansu exited with {status} before accepting connections; its log:\n{}", self.log_text());
            }
            if TcpStream::connect_timeout(&self.address, Duration::from_millis(200)).is_ok() {
                return Ok(());
            }
            if started.elapsed() > Duration::from_secs(30) {
                bail!("tansu did not listen on {} within 30 s; its log:\n{}", self.address, self.log_text());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// What the broker has logged so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The broker's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Broker for Tansu {
    fn bootstrap(&self) -> String {
        self.address.to_string()
    }

    fn create_topic(&self, name: &str, partitions: i32) -> anyhow::Result<()> {
        create_topic(&self.bootstrap(), name, partitions).with_context(|| format!("tansu's log:\n{}", self.log_text()))
    }

    fn kind(&self) -> &'static str {
        "tansu"
    }

    /// The tansu process is stopped (SIGSTOP: it answers nothing, its connections hang)
    /// or continued (SIGCONT), by its PID. Its storage is in memory, so a real restart
    /// would lose the topics; a stopped process keeps them.
    fn set_available(&self, available: bool) -> anyhow::Result<()> {
        pause(self.pid(), available)
    }

    /// One record per produce request. tansu 0.6 (memory storage) answers ListOffsets
    /// "latest" with the base offset of the partition's last record batch + 1 rather than
    /// its last offset + 1, and a fetch from an offset inside a multi-record batch returns
    /// nothing, so a consumer starting at "latest" would wait forever. With single-record
    /// batches both agree with Kafka. (sluice also takes the high watermark from fetch
    /// responses, which tansu reports correctly, so reading from the earliest offset works
    /// with ordinary batching: the benchmark uses it.)
    fn exact_producer_settings(&self) -> &'static [(&'static str, &'static str)] {
        &[("batch.num.messages", "1"), ("linger.ms", "0")]
    }
}

/// The Apache Kafka version `.ci/setup-tests` installs (`tests/kafka/pom.xml`).
pub const KAFKA_VERSION: &str = "4.4.0";

/// Where `.ci/setup-tests` puts Apache Kafka's jars (`target/tools/kafka/libs` of this
/// workspace), unless `SLUICE_KAFKA_LIBS` names another folder of jars.
pub fn kafka_libs() -> PathBuf {
    installed("SLUICE_KAFKA_LIBS", "kafka/libs")
}

/// One Apache Kafka node in KRaft mode (broker and controller in one JVM) on two free
/// loopback ports, with its log directory in a temporary folder removed on drop. Unlike
/// tansu it keeps its data on disk: [`ApacheKafka::kill`] and [`ApacheKafka::restart`]
/// stop it with SIGKILL and bring it back on the same log directory.
pub struct ApacheKafka {
    child: Option<Child>,
    dir: tempfile::TempDir,
    address: SocketAddr,
}

impl ApacheKafka {
    /// Format a log directory, start the node and wait until it serves metadata.
    pub fn start() -> anyhow::Result<Self> {
        let libs = kafka_libs();
        if !libs.join(format!("kafka_2.13-{KAFKA_VERSION}.jar")).is_file() {
            bail!(
                "Apache Kafka {KAFKA_VERSION} is not installed in {}: run `bash .ci/setup-tests` (it fetches it from Maven Central with tests/kafka/pom.xml), or set SLUICE_KAFKA_LIBS to a folder of Kafka's jars",
                libs.display()
            );
        }
        let port = || TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).and_then(|l| l.local_addr()).map(|a| a.port()).context("no free loopback port");
        let (broker_port, controller_port) = (port()?, port()?);
        let dir = tempfile::Builder::new().prefix("sluice-kafka-").tempdir().context("cannot create a folder for Kafka's log directory")?;
        let data = dir.path().join("data");
        let properties = format!(
            "process.roles=broker,controller\n\
             node.id=1\n\
             controller.quorum.voters=1@127.0.0.1:{controller_port}\n\
             listeners=PLAINTEXT://127.0.0.1:{broker_port},CONTROLLER://127.0.0.1:{controller_port}\n\
             advertised.listeners=PLAINTEXT://127.0.0.1:{broker_port}\n\
             controller.listener.names=CONTROLLER\n\
             listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT\n\
             inter.broker.listener.name=PLAINTEXT\n\
             log.dirs={}\n\
             num.partitions=1\n\
             offsets.topic.replication.factor=1\n\
             offsets.topic.num.partitions=4\n\
             transaction.state.log.replication.factor=1\n\
             transaction.state.log.min.isr=1\n\
             transaction.state.log.num.partitions=4\n\
             group.initial.rebalance.delay.ms=0\n\
             auto.create.topics.enable=false\n",
            data.display()
        );
        std::fs::write(dir.path().join("server.properties"), properties).context("cannot write Kafka's server.properties")?;
        let cluster_id = {
            use sha2::Digest;
            let seed = format!("{}-{broker_port}-{:?}", std::process::id(), Instant::now());
            let digest = sha2::Sha256::digest(seed.as_bytes());
            // A Kafka cluster id: 16 bytes, URL-safe base64 without padding.
            base64_url(&digest[..16])
        };
        let format = Command::new("java")
            .args(["-Xmx256m", "-cp"])
            .arg(format!("{}/*", libs.display()))
            // `--option=value`: an id may start with `-`, which the parser would take for an option.
            .args(["kafka.tools.StorageTool", "format", &format!("--cluster-id={cluster_id}")])
            .arg(format!("--config={}", dir.path().join("server.properties").display()))
            .stdin(Stdio::null())
            .output()
            .context("cannot run java (Apache Kafka needs Java 17 or later on PATH)")?;
        if !format.status.success() {
            bail!("formatting Kafka's log directory failed: {}{}", String::from_utf8_lossy(&format.stdout), String::from_utf8_lossy(&format.stderr));
        }
        let mut broker = Self { child: None, dir, address: SocketAddr::from((Ipv4Addr::LOCALHOST, broker_port)) };
        broker.spawn()?;
        Ok(broker)
    }

    fn log(&self) -> PathBuf {
        self.dir.path().join("kafka.log")
    }

    fn spawn(&mut self) -> anyhow::Result<()> {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(self.log()).context("cannot open Kafka's log file")?;
        let child = Command::new("java")
            .args(["-Xms256m", "-Xmx1g", "-XX:+UseG1GC", "-Djava.awt.headless=true", "-cp"])
            .arg(format!("{}/*", kafka_libs().display()))
            .arg("kafka.Kafka")
            .arg(self.dir.path().join("server.properties"))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("cannot run java (Apache Kafka needs Java 17 or later on PATH)")?;
        self.child = Some(child);
        self.wait_ready()
    }

    /// Wait until the node answers a metadata request with itself as a broker.
    fn wait_ready(&mut self) -> anyhow::Result<()> {
        let started = Instant::now();
        let client: rdkafka::consumer::BaseConsumer = ClientConfig::new().set("bootstrap.servers", self.bootstrap()).set("log_level", "0").create()?;
        loop {
            if let Some(status) = self.child.as_mut().expect("spawned").try_wait()? {
                bail!("Apache Kafka exited with {status} before it served; its log:\n{}", self.log_text());
            }
            use rdkafka::consumer::Consumer as _;
            if TcpStream::connect_timeout(&self.address, Duration::from_millis(200)).is_ok()
                && client.fetch_metadata(None, Duration::from_secs(1)).is_ok_and(|m| !m.brokers().is_empty())
            {
                return Ok(());
            }
            if started.elapsed() > Duration::from_secs(90) {
                bail!("Apache Kafka did not serve on {} within 90 s; its log:\n{}", self.address, self.log_text());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// What the node has logged so far (errors only, log4j2's default).
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(self.log()).unwrap_or_default()
    }

    /// The node's process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Stop the node with SIGKILL (by its PID); its log directory stays.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Start the node again on the same log directory and ports.
    pub fn restart(&mut self) -> anyhow::Result<()> {
        self.kill();
        self.spawn()
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
    fn bootstrap(&self) -> String {
        self.address.to_string()
    }

    fn create_topic(&self, name: &str, partitions: i32) -> anyhow::Result<()> {
        create_topic(&self.bootstrap(), name, partitions).with_context(|| format!("Apache Kafka's log:\n{}", self.log_text()))
    }

    fn kind(&self) -> &'static str {
        "kafka"
    }

    /// The JVM is stopped (SIGSTOP) or continued (SIGCONT) by its PID.
    fn set_available(&self, available: bool) -> anyhow::Result<()> {
        pause(self.pid().context("Apache Kafka is not running")?, available)
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
        create_topic(&self.0, name, partitions)
    }
    fn kind(&self) -> &'static str {
        "external"
    }
    fn set_available(&self, _: bool) -> anyhow::Result<()> {
        bail!("sluice does not control the external broker at {}", self.0)
    }
}

/// Create a topic through the Kafka admin API, with explicit retention settings (some
/// clients refuse topics that report none).
fn create_topic(bootstrap: &str, name: &str, partitions: i32) -> anyhow::Result<()> {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new().set("bootstrap.servers", bootstrap).create()?;
    let topic = NewTopic::new(name, partitions, TopicReplication::Fixed(1)).set("retention.ms", "-1").set("retention.bytes", "-1");
    let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
    let io = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    for result in io.block_on(admin.create_topics([&topic], &options)).with_context(|| format!("cannot reach {bootstrap} to create topic {name}"))? {
        if let Err((topic, code)) = result {
            bail!("cannot create topic {topic} on {bootstrap}: {code}");
        }
    }
    Ok(())
}

impl Drop for Tansu {
    fn drop(&mut self) {
        // Stopped by its PID (the child handle), never by name.
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.log);
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
