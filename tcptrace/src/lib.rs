//! tcptrace: an eBPF TCP state-transition tracer.
//!
//! Data flows one way: kernel tracepoint → ring buffer ([`kernel`]) → decode ([`decode`]) →
//! lifecycle engine ([`engine`]) → anomaly rules ([`rules`]) → sinks ([`sink`]).

pub mod decode;
pub mod engine;
pub mod event;
pub mod kernel;
pub mod rules;
pub mod sink;
pub mod tracefs;
