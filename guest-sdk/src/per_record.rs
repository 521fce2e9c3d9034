//! Per-record plugins: one function per record (as Fluvio's SmartModules), with the batch
//! loop, rejections and output handled here. A [`Filter`] keeps or drops records, a
//! [`Map`] gives each record a new value, a [`FlatMap`] turns each into zero or more
//! records. Each is a [`Transform`] through its wrapper ([`Filtered`], [`Mapped`],
//! [`FlatMapped`]); export it with [`export_filter!`](crate::export_filter),
//! [`export_map!`](crate::export_map) or [`export_flat_map!`](crate::export_flat_map).
//!
//! An `Err(reason)` rejects the record: it leaves the output and goes to the pipeline's
//! dead letters with the reason, and the rest of the batch goes on. Output records keep
//! the input record's topic, partition, offset, timestamp, key and headers.
//!
//! ```
//! use serde::Deserialize;
//! use sluice_sdk::{Error, Filter, Record};
//!
//! #[derive(Default, Deserialize)]
//! pub struct Config { min_cost: f64 }
//!
//! #[derive(Deserialize)]
//! struct Click { cost: f64 }
//!
//! pub struct BigSpenders(Config);
//!
//! impl Filter for BigSpenders {
//!     type Config = Config;
//!     fn new(config: Config) -> Result<Self, Error> { Ok(Self(config)) }
//!     fn filter(&mut self, record: &Record<'_>) -> Result<bool, String> {
//!         Ok(record.json::<Click>()?.cost >= self.0.min_cost)
//!     }
//! }
//! sluice_sdk::export_filter!(BigSpenders);
//!
//! // Natively, with the SDK's harness:
//! use sluice_sdk::testing::TransformHarness;
//! let mut h = TransformHarness::<sluice_sdk::Filtered<BigSpenders>>::new(serde_json::json!({"min_cost": 1.0})).unwrap();
//! let out = h.push_values(&[r#"{"cost": 2.5}"#, r#"{"cost": 0.5}"#, "oops"]).unwrap();
//! assert_eq!(out.values(), vec![r#"{"cost": 2.5}"#]);
//! assert_eq!(out.record_errors[0].row, 2);
//! ```

use serde::de::DeserializeOwned;

use crate::{Batch, Context, Error, Output, Record, Transform};

/// Keeps or drops each record.
pub trait Filter: Sized + 'static {
    /// Configuration, deserialized from the pipeline's JSON.
    type Config: DeserializeOwned + Default;

    /// Build an instance from its configuration; check the configuration here.
    fn new(config: Self::Config) -> Result<Self, Error>;

    /// `Ok(true)` keeps the record as it is, `Ok(false)` drops it, `Err(reason)` rejects it.
    fn filter(&mut self, record: &Record<'_>) -> Result<bool, String>;
}

/// Gives each record a new value.
pub trait Map: Sized + 'static {
    /// Configuration, deserialized from the pipeline's JSON.
    type Config: DeserializeOwned + Default;

    /// Build an instance from its configuration; check the configuration here.
    fn new(config: Self::Config) -> Result<Self, Error>;

    /// The record's new value (`None`: a null value), or `Err(reason)` to reject it.
    fn map(&mut self, record: &Record<'_>) -> Result<Option<Vec<u8>>, String>;
}

/// Turns each record into zero or more records.
pub trait FlatMap: Sized + 'static {
    /// Configuration, deserialized from the pipeline's JSON.
    type Config: DeserializeOwned + Default;

    /// Build an instance from its configuration; check the configuration here.
    fn new(config: Self::Config) -> Result<Self, Error>;

    /// The values of the records this one becomes, in order (none drops it), or
    /// `Err(reason)` to reject it.
    fn flat_map(&mut self, record: &Record<'_>) -> Result<Vec<Vec<u8>>, String>;
}

/// A [`Filter`] as a [`Transform`].
pub struct Filtered<F>(F);

/// A [`Map`] as a [`Transform`].
pub struct Mapped<M>(M);

/// A [`FlatMap`] as a [`Transform`].
pub struct FlatMapped<M>(M);

impl<F: Filter> Transform for Filtered<F> {
    type Config = F::Config;

    fn new(config: Self::Config) -> Result<Self, Error> {
        F::new(config).map(Self)
    }

    fn process(&mut self, batch: &Batch, _ctx: &Context, out: &mut Output) -> Result<(), Error> {
        for record in batch.records() {
            match self.0.filter(&record) {
                Ok(true) => out.forward(&record, None)?,
                Ok(false) => {}
                Err(reason) => out.reject(record.index(), reason),
            }
        }
        Ok(())
    }
}

impl<M: Map> Transform for Mapped<M> {
    type Config = M::Config;

    fn new(config: Self::Config) -> Result<Self, Error> {
        M::new(config).map(Self)
    }

    fn process(&mut self, batch: &Batch, _ctx: &Context, out: &mut Output) -> Result<(), Error> {
        for record in batch.records() {
            match self.0.map(&record) {
                Ok(value) => out.forward(&record, Some(value.as_deref()))?,
                Err(reason) => out.reject(record.index(), reason),
            }
        }
        Ok(())
    }
}

impl<M: FlatMap> Transform for FlatMapped<M> {
    type Config = M::Config;

    fn new(config: Self::Config) -> Result<Self, Error> {
        M::new(config).map(Self)
    }

    fn process(&mut self, batch: &Batch, _ctx: &Context, out: &mut Output) -> Result<(), Error> {
        for record in batch.records() {
            match self.0.flat_map(&record) {
                Ok(values) => {
                    for value in &values {
                        out.forward(&record, Some(Some(value)))?;
                    }
                }
                Err(reason) => out.reject(record.index(), reason),
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::TransformHarness;
    use crate::NoConfig;
    use serde_json::json;

    /// Keeps values that parse as numbers above 10, drops the rest, rejects non-numbers.
    struct AboveTen;

    impl Filter for AboveTen {
        type Config = NoConfig;
        fn new(_: NoConfig) -> Result<Self, Error> {
            Ok(Self)
        }
        fn filter(&mut self, record: &Record<'_>) -> Result<bool, String> {
            let n: f64 = record.value_str()?.parse().map_err(|e| format!("not a number: {e}"))?;
            Ok(n > 10.0)
        }
    }

    /// Upper-cases values; a null value stays null; an empty one is rejected.
    struct Upper;

    impl Map for Upper {
        type Config = NoConfig;
        fn new(_: NoConfig) -> Result<Self, Error> {
            Ok(Self)
        }
        fn map(&mut self, record: &Record<'_>) -> Result<Option<Vec<u8>>, String> {
            match record.value() {
                None => Ok(None),
                Some([]) => Err("empty value".into()),
                Some(_) => Ok(Some(record.value_str()?.to_uppercase().into_bytes())),
            }
        }
    }

    /// Splits values on spaces, `times` copies of each word.
    #[derive(Default, serde::Deserialize)]
    struct Times {
        times: usize,
    }

    struct Words(usize);

    impl FlatMap for Words {
        type Config = Times;
        fn new(config: Times) -> Result<Self, Error> {
            if config.times == 0 {
                return Err(Error::config("times must be at least 1"));
            }
            Ok(Self(config.times))
        }
        fn flat_map(&mut self, record: &Record<'_>) -> Result<Vec<Vec<u8>>, String> {
            let text = record.value_str()?;
            if text.contains('!') {
                return Err("no shouting".into());
            }
            Ok(text.split_whitespace().flat_map(|w| std::iter::repeat_n(w.as_bytes().to_vec(), self.0)).collect())
        }
    }

    #[test]
    fn a_filter_keeps_drops_and_rejects_records_by_their_index() {
        let mut h = TransformHarness::<Filtered<AboveTen>>::new(json!({})).unwrap();
        let out = h.push_values(&["5", "12", "x", "11.5", "10"]).unwrap();
        assert_eq!(out.values(), vec!["12", "11.5"]);
        assert_eq!(out.record_errors.len(), 1);
        assert_eq!(out.record_errors[0].row, 2);
        assert!(out.record_errors[0].reason.starts_with("not a number"), "{}", out.record_errors[0].reason);
        // The records kept are the input records: offsets of rows 1 and 3 of this batch.
        let offsets: Vec<i64> = out.rows.iter().map(|r| r["offset"].as_i64().unwrap()).collect();
        assert_eq!(offsets, vec![1, 3]);
    }

    #[test]
    fn a_map_gives_each_record_a_new_value_and_rejects_what_it_cannot_map() {
        let mut h = TransformHarness::<Mapped<Upper>>::new(json!({})).unwrap();
        let out = h.push_values(&["ab", "", "c d"]).unwrap();
        assert_eq!(out.values(), vec!["AB", "C D"]);
        assert_eq!((out.record_errors.len(), out.record_errors[0].row, out.record_errors[0].reason.as_str()), (1, 1, "empty value"));
    }

    #[test]
    fn a_flat_map_turns_a_record_into_several_with_its_offset_or_none() {
        let mut h = TransformHarness::<FlatMapped<Words>>::new(json!({"times": 2})).unwrap();
        let out = h.push_values(&["a b", "", "stop!", "c"]).unwrap();
        assert_eq!(out.values(), vec!["a", "a", "b", "b", "c", "c"]);
        let offsets: Vec<i64> = out.rows.iter().map(|r| r["offset"].as_i64().unwrap()).collect();
        assert_eq!(offsets, vec![0, 0, 0, 0, 3, 3], "each output record keeps its input's offset");
        assert_eq!((out.record_errors.len(), out.record_errors[0].row), (1, 2));
        let error = TransformHarness::<FlatMapped<Words>>::new(json!({"times": 0})).err().unwrap();
        assert!(format!("{error:?}").contains("times must be at least 1"), "{error:?}");
    }
}
