//! raftgen: one binary per GPU machine. Every node embeds a Raft log holding
//! the job queue, the assignments and the result metadata; any node accepts
//! HTTP submissions and forwards writes to the leader; the leader assigns jobs
//! to the nodes' executors; result images live on the nodes' stores (or an
//! object store), off the log.
//!
//! Modules: [`node`] (the node's runtime: start-up and shutdown, the write
//! path, the leader's loops, the executor host, membership, webhooks, the
//! result store), [`http`] (the public API and the node-to-node routes),
//! [`cli`] (the command line: `node`, the client commands, the demo and the
//! local-cluster harness), [`executor`] (the trait, the diffusion executor
//! and the test-pattern test double), [`models`] and [`kernels`] (the
//! pipelines and fused GPU kernels), [`metrics`] (`GET /metrics`).

pub mod cli;
pub mod executor;
pub mod http;
pub mod kernels;
pub mod logging;
pub mod metrics;
pub mod models;
pub mod node;
pub mod tls;
