//! outboxd: a per-user daemon that uploads zip archives dropped into an outbox
//! folder to an HTTP API, keeps a durable queue of them, retries transient
//! failures, and puts the whole queue on hold on authentication or configuration faults.
//!
//! The binary (`src/main.rs`) is a thin command-line layer over this library, so
//! that tests and benchmarks can drive the same code.

pub mod cli;
pub mod config;
pub mod control;
pub mod daemon;
pub mod demo;
pub mod intake;
pub mod outcome;
pub mod queue;
pub mod receiver;
pub mod retry;
pub mod service;
pub mod status;
pub mod store;
pub mod systemd;
pub mod timefmt;
pub mod token;
pub mod upload;
pub mod zipfile;
