//! Empty library target: it lets `tcptrace` declare a build-dependency on this crate so
//! cargo rebuilds the embedded eBPF object when the program changes. The program itself
//! is the `tcptrace` binary (src/main.rs), built for bpfel-unknown-none.
#![no_std]
