//! `ad-clicks` 2.0.0, for the hot-swap tests: the ad-click aggregation of
//! `plugins/ad-clicks` with the same state (so a running 1.x hands its windows over), and
//! an `avg_cost` column always on. Published under the name `ad-clicks`.

use ad_clicks::{AdClicks, Config};
use sluice_sdk::arrow_schema::SchemaRef;
use sluice_sdk::{Aggregate, Batch, Context, Error, Output};

/// ad-clicks with `avg_cost`.
pub struct AdClicksV2(AdClicks);

fn with_avg_cost(config: &Config) -> Config {
    Config { avg_cost: true, ..config.clone() }
}

impl Aggregate for AdClicksV2 {
    type Config = Config;
    type State = <AdClicks as Aggregate>::State;
    const STATE_VERSION: u32 = <AdClicks as Aggregate>::STATE_VERSION;

    fn output_schema(config: &Config) -> SchemaRef {
        AdClicks::output_schema(&with_avg_cost(config))
    }

    fn new(config: Config) -> Result<Self, Error> {
        AdClicks::new(with_avg_cost(&config)).map(Self)
    }

    fn process(&mut self, batch: &Batch, ctx: &Context, out: &mut Output) -> Result<(), Error> {
        self.0.process(batch, ctx, out)
    }

    fn state(&self) -> &Self::State {
        self.0.state()
    }

    fn set_state(&mut self, state: Self::State) {
        self.0.set_state(state)
    }

    fn migrate(from_version: u32, bytes: &[u8]) -> Result<Self::State, Error> {
        AdClicks::migrate(from_version, bytes)
    }
}

sluice_sdk::export_aggregate!(AdClicksV2, name = "ad-clicks", version = "2.0.0");
