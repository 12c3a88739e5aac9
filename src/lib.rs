//! outboxd: a per-user daemon that uploads zip archives dropped into an outbox
//! folder to an HTTP API, keeps a durable queue of them, retries transient
//! failures, and holds the whole queue on authentication or configuration faults.
//!
//! The binary (`src/main.rs`) is a thin command-line layer over this library, so
//! that tests and benchmarks can drive the same code.

pub mod config;
pub mod receiver;
pub mod token;
pub mod zipfile;
pub mod intake;
pub mod upload;
pub mod timefmt;
