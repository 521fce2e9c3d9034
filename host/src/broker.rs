//! Brokers sluice starts itself: librdkafka's in-process mock cluster (the demo and the fast
//! tests), behind the [`Broker`] trait that the benchmarks' Apache Kafka
//! (`sluice_bench::broker`) implements too.

use std::time::Duration;

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
    /// Create `name` with `partitions` partitions, replicated to every node it has.
    fn create_topic(&self, name: &str, partitions: i32) -> anyhow::Result<()>;
    /// A short name for messages.
    fn kind(&self) -> &'static str;
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

/// Create a topic through the Kafka admin API, with explicit retention settings (some
/// clients refuse topics that report none).
pub fn create_topic(bootstrap: &str, name: &str, partitions: i32, replication: i32) -> anyhow::Result<()> {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new().set("bootstrap.servers", bootstrap).create()?;
    let topic = NewTopic::new(name, partitions, TopicReplication::Fixed(replication)).set("retention.ms", "-1").set("retention.bytes", "-1");
    let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
    let io = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    for result in io.block_on(admin.create_topics([&topic], &options)).with_context(|| format!("cannot reach {bootstrap} to create topic {name}"))? {
        if let Err((topic, code)) = result {
            bail!("cannot create topic {topic} on {bootstrap}: {code}");
        }
    }
    Ok(())
}
