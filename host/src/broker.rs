//! Kafka brokers started by sluice itself, for the demo, the end-to-end tests and the
//! benchmarks: librdkafka's in-process mock cluster, and a real broker process (`tansu`)
//! on a free loopback port, stopped by its PID when the handle is dropped.

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

/// The tansu version `.ci/setup` installs.
pub const TANSU_VERSION: &str = "0.6.0";

/// Where `.ci/setup` installs tansu (`target/tools/bin/tansu` of this workspace), unless
/// `SLUICE_TANSU` names another binary.
pub fn tansu_binary() -> PathBuf {
    if let Some(path) = std::env::var_os("SLUICE_TANSU") {
        return PathBuf::from(path);
    }
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/tools/bin/tansu")
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
                "the tansu broker is not installed at {}: run `bash .ci/setup` (it installs tansu {TANSU_VERSION}), or set SLUICE_TANSU to a tansu binary",
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
        let signal = if available { "-CONT" } else { "-STOP" };
        let status = Command::new("kill").args([signal, &self.pid().to_string()]).status().context("cannot run kill")?;
        anyhow::ensure!(status.success(), "kill {signal} {} failed", self.pid());
        Ok(())
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
