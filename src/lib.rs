//! raftgen: one binary per GPU machine. Every node embeds a Raft log holding
//! the job queue, the assignments and the results; any node accepts HTTP
//! submissions and forwards writes to the leader; the leader assigns jobs to
//! the nodes' executors.
//!
//! Modules: [`app`] (shared context and the write path), [`http`] (public API
//! and `/raft` routes), [`node`] (start-up and shutdown), [`scheduler`]
//! (leader loop), [`host`] (executor host), [`membership`] (join/leave),
//! [`executor`] (the trait and the test-pattern test double), [`metrics`]
//! (`GET /metrics`), [`kernels`] (fused GPU kernels as candle custom ops,
//! with CPU references), [`cli`], [`demo`].

pub mod app;
pub mod batch;
pub mod certs;
pub mod cli;
pub mod config;
pub mod demo;
pub mod drain;
pub mod executor;
pub mod follow;
pub mod forwarder;
pub mod host;
pub mod http;
pub mod kernels;
pub mod local;
pub mod logging;
pub mod membership;
pub mod metrics;
pub mod models;
pub mod node;
pub mod proposer;
pub mod scheduler;
pub mod snapshot_guard;
pub mod tls;
pub mod webhook;
