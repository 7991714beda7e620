//! Core types shared by every tarn crate: dataset contracts, names, the clock, limits and error
//! codes. No IO and no Arrow here, so every other crate can depend on it cheaply.

pub mod clock;
pub mod contract;
pub mod error;
pub mod evolution;
pub mod limits;
pub mod name;
pub mod rollup;

pub use clock::{Clock, ManualClock, SystemClock};
pub use contract::{
    App, Compaction, DatasetSpec, External, ExternalFormat, Field, FieldType, Lifecycle, Pii, Scope, SizeClass,
    UnknownFields,
};
pub use error::{Error, Result};
pub use limits::Limits;
pub use rollup::{Grain, Metric, MetricFn, Rollup};
