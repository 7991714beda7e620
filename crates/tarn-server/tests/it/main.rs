//! End-to-end tests: they start the real `tarn` binary on a temporary data directory and a free
//! port, and talk to it over HTTP as a user would.

mod catalog;
mod crash;
mod guardrails;
mod interop;
mod maintenance;
mod meta;
mod nats;
mod pg;
mod roles;
mod rollups;
mod s3;
mod server;
mod spine;
