//! The error type of tarn-core: invalid names and invalid contracts.

/// What went wrong in a pure check; every variant is a bad request from the caller's side.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Error {
    #[error("invalid {what} name {name:?}: {reason}")]
    InvalidName {
        what: &'static str,
        name: String,
        reason: &'static str,
    },
    #[error("invalid contract for dataset {dataset:?}: {reason}")]
    InvalidContract { dataset: String, reason: String },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
