//! tcptrace: an eBPF TCP state-transition tracer.
//!
//! Data flows one way: kernel tracepoint → ring buffer ([`kernel`]) → decode ([`decode`]) →
//! lifecycle engine ([`engine`]) → anomaly rules ([`rules`]) → sinks ([`sink`]). [`live`]
//! and [`analyze`] drive the same [`pipeline`], live from the kernel or from a recorded log.

pub mod analyze;
pub mod background;
pub mod cgroup;
pub mod cli;
pub mod decode;
pub mod demo;
pub mod engine;
pub mod event;
pub mod filter;
pub mod kernel;
pub mod kernel_btf;
pub mod leaky;
pub mod live;
pub mod metrics_http;
pub mod output;
pub mod pipeline;
pub mod preexisting;
pub mod rules;
pub mod sink;
pub mod snapshot;
pub mod tracefs;
