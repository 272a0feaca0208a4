//! The kernel side of tcptrace: one program on `sock:inet_sock_set_state` that keeps TCP
//! only, gives every connection an identity that survives `struct sock` reuse, and writes
//! one fixed-size `StateEvent` per transition into the `EVENTS` ring buffer. Every event
//! it cannot deliver is counted in `COUNTERS`.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]
// `core::intrinsics::atomic_xadd`: an atomic add without compare-and-swap, which is all
// the BPF target offers before v3.
#![cfg_attr(target_arch = "bpf", feature(core_intrinsics))]
#![cfg_attr(target_arch = "bpf", allow(internal_features))]

#[cfg(target_arch = "bpf")]
mod program;

#[cfg(not(target_arch = "bpf"))]
fn main() {}
