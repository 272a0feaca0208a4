//! Kernel tests of the in-kernel filters: what they drop never reaches the ring buffer.

mod common;

use std::io::Read;
use std::net::{TcpListener, TcpStream};
use std::time::Duration;

use common::*;
use tcptrace::event::TcpState::*;
use tcptrace::filter::{FilterArgs, parse_cidr};
use tcptrace::kernel::{Tracer, TracerConfig};
use tcptrace::leaky::{LEAKY_COMM, LeakyServer, polite_client};

fn tracer_with(f: FilterArgs) -> Tracer {
    let filter = f.to_kernel().expect("valid filter");
    Tracer::start(TracerConfig {
        filter,
        timewait: false,
        ..TracerConfig::default()
    })
    .unwrap_or_else(|e| panic!("load: {e}"))
}

fn one_connection(bind: &str) -> u16 {
    let l = TcpListener::bind(bind).unwrap();
    client_closes_first(&l);
    l.local_addr().unwrap().port()
}

#[test]
fn port_and_address_filters_keep_exactly_the_matching_connections() {
    let Some(_g) = kernel_guard() else { return };
    runtime().block_on(async {
        // Choose the kept port first, so the filter can name it.
        let kept = TcpListener::bind("127.0.0.1:0").unwrap();
        let kept_port = kept.local_addr().unwrap().port();
        let mut tracer = tracer_with(FilterArgs {
            ports: vec![kept_port],
            ..FilterArgs::default()
        });
        let c = TcpStream::connect(("127.0.0.1", kept_port)).unwrap();
        let (mut s, _) = kept.accept().unwrap();
        drop(c);
        assert_eq!(s.read(&mut [0u8; 1]).unwrap(), 0);
        drop(s);
        drop(kept);
        let other = one_connection("127.0.0.1:0");
        let events = collect(
            &mut tracer,
            |_| true,
            |e| e.len() >= 12,
            Duration::from_secs(3),
        )
        .await;
        let on_kept = events
            .iter()
            .filter(|t| t.local.port() == kept_port || t.remote.port() == kept_port)
            .count();
        // 12 transitions and an accept, minus the listener's CLOSE→LISTEN, which happened
        // before the tracer loaded.
        assert_eq!(on_kept, 12, "{}", show(&events));
        assert!(
            events
                .iter()
                .all(|t| t.local.port() != other && t.remote.port() != other),
            "{}",
            show(&events)
        );
        let c = tracer.counters();
        assert!(
            c.filtered >= 12,
            "the other connection's transitions were dropped in the kernel: {c:?}"
        );
        assert_no_loss(&c);
    });
    runtime().block_on(async {
        let mut tracer = tracer_with(FilterArgs {
            ipv6: true,
            laddr: Some(parse_cidr("::1/128").unwrap()),
            ..FilterArgs::default()
        });
        let v4 = one_connection("127.0.0.1:0");
        let v6 = one_connection("[::1]:0");
        let events = collect(
            &mut tracer,
            |_| true,
            |e| e.len() >= 13,
            Duration::from_secs(3),
        )
        .await;
        assert!(
            events.iter().all(|t| t.local.is_ipv6()),
            "{}",
            show(&events)
        );
        assert!(
            events
                .iter()
                .all(|t| t.local.port() != v4 && t.remote.port() != v4)
        );
        // All 13: even SYN_SENT carries the local address (only its port is still 0).
        let on_v6 = events
            .iter()
            .filter(|t| t.local.port() == v6 || t.remote.port() == v6)
            .count();
        assert_eq!(on_v6, 13, "{}", show(&events));
    });
}

#[test]
fn owner_filter_keeps_a_process_sockets_from_their_first_event() {
    let Some(_g) = kernel_guard() else { return };
    runtime().block_on(async {
        let exe = std::path::Path::new(env!("CARGO_BIN_EXE_tcptrace"));
        // By command name: a pid cannot be named before the process exists, and its listen()
        // must happen under the tracer for the whole life to be seen.
        let mut tracer = tracer_with(FilterArgs {
            comm: Some(LEAKY_COMM.into()),
            ..FilterArgs::default()
        });
        let server = LeakyServer::spawn(exe, "127.0.0.1:0").unwrap();
        let port = server.addr.port();
        polite_client(server.addr, 2).unwrap();
        let events = collect(
            &mut tracer,
            |t| t.local.port() == port || t.remote.port() == port,
            |e| e.len() > 2 * 4,
            Duration::from_secs(3),
        )
        .await;
        // Listener CLOSE→LISTEN, then per accepted child LISTEN→SYN_RECV, SYN_RECV→ESTABLISHED,
        // its accept and ESTABLISHED→CLOSE_WAIT: all owned by the server. The client's 5
        // per connection (owned by this test process) are dropped in the kernel.
        assert_eq!(events.len(), 1 + 2 * 4, "{}", show(&events));
        assert_eq!(accepts(&events).len(), 2, "{}", show(&events));
        for t in &events {
            let o = t.owner.expect("owner known from the first event");
            assert_eq!(
                (o.pid, o.comm.as_str().as_ref()),
                (server.pid(), LEAKY_COMM),
                "{}",
                show(&events)
            );
        }
        assert_eq!(
            events
                .iter()
                .filter(|t| (t.old, t.new) == (Listen, SynRecv))
                .count(),
            2
        );
        server.stop();
        assert_no_loss(&tracer.counters());
    });
}

#[test]
fn an_ipv4_prefix_keeps_its_addresses_v4_mapped_ones_included() {
    let Some(_g) = kernel_guard() else { return };
    runtime().block_on(async {
        let mut tracer = tracer_with(FilterArgs {
            laddr: Some(parse_cidr("127.0.0.0/31").unwrap()),
            ..FilterArgs::default()
        });
        // The server's side is on 127.0.0.2, outside the prefix; its client's, from
        // 127.0.0.1 (the kernel's source address for the whole of 127/8), inside.
        let outside = TcpListener::bind("127.0.0.2:0").unwrap();
        let outside_port = outside.local_addr().unwrap().port();
        client_closes_first(&outside);
        drop(outside);
        // A dual-stack listener on `::` (not an IPv4 address: outside) accepts an IPv4
        // client: the accepted socket is AF_INET6 with local address ::ffff:127.0.0.1,
        // which the IPv4 prefix matches.
        let dual = TcpListener::bind("[::]:0").unwrap();
        let dual_port = dual.local_addr().unwrap().port();
        let c = TcpStream::connect(("127.0.0.1", dual_port)).unwrap();
        let (mut s, _) = dual.accept().unwrap();
        drop(c);
        assert_eq!(s.read(&mut [0u8; 1]).unwrap(), 0);
        drop(s);
        drop(dual);
        // Kept: the two clients' 5 transitions each, and the mapped child's 5 and its
        // accept.
        let events = collect(
            &mut tracer,
            |_| true,
            |e| e.len() >= 16,
            Duration::from_secs(3),
        )
        .await;
        assert_eq!(events.len(), 16, "{}", show(&events));
        let inside = |t: &tcptrace::event::Transition| {
            matches!(t.local.ip().to_canonical(), std::net::IpAddr::V4(a) if a.octets()[..3] == [127, 0, 0] && a.octets()[3] < 2)
        };
        assert!(events.iter().all(inside), "{}", show(&events));
        assert_eq!(
            events.iter().filter(|t| t.local.port() == outside_port).count(),
            0,
            "{}",
            show(&events)
        );
        let mapped: Vec<_> = events
            .iter()
            .filter(|t| t.local.port() == dual_port)
            .collect();
        // (The decoder reports the mapped address as the IPv4 address it is.)
        assert_eq!(mapped.len(), 6, "{}", show(&events));
        let c = tracer.counters();
        // The outside listener's CLOSE→LISTEN and LISTEN→CLOSE and its child's 5, and the
        // dual-stack listener's 2.
        assert!(c.filtered >= 9, "dropped in the kernel: {c:?}");
        assert_no_loss(&c);
    });
}
