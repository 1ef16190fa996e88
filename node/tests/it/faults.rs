//! Bad networks between two real nodes, made by the UDP impairment proxy: delay and loss, reordering
//! and duplication, a change of the source's address, a long blackout. Each round completes and the
//! target is identical.

use std::process::Stdio;
use std::time::Duration;

use ferry_testkit::{Impairment, TreeGenerator, TreeSpec, UdpProxy};

use crate::network::Setup;
use crate::util::{assert_same_tree, finish_round, random_bytes};

/// A setup whose source reaches the daemon through a proxy, with a mixed tree (generated mail data and
/// a few MiB of incompressible BLOBs).
fn behind_proxy(blob_mib: usize) -> (Setup, UdpProxy) {
    let setup = Setup::new();
    let source = setup.path("export");
    TreeGenerator::create(&source, TreeSpec::with_files(300, 9)).unwrap();
    for i in 0..blob_mib {
        crate::util::write(&source.join(format!("big/blob-{i}")), &random_bytes(1 << 20, 100 + i as u64));
    }
    setup.job("zimbra", &source, &setup.path("migration"));
    let proxy = UdpProxy::start(setup.daemon.addr.parse().unwrap()).unwrap();
    setup.source.ok(&["trust", &setup.dest.id, "--name", "dest", "--addr", &proxy.addr().to_string()]);
    (setup, proxy)
}

fn sync_in_background(setup: &Setup, args: &[&str]) -> std::process::Child {
    setup
        .source
        .ferry()
        .args(["sync", "--round", "zimbra", "--json"])
        .args(args)
        .stdout(Stdio::piped())
        .stderr(crate::network::debug_log("sync"))
        .spawn()
        .unwrap()
}

#[test]
fn a_round_over_100_ms_rtt_with_2_percent_loss_completes() {
    let (setup, proxy) = behind_proxy(2);
    proxy.set(Impairment { delay: Duration::from_millis(50), loss: 0.02, ..Impairment::default() });
    let report = finish_round(sync_in_background(&setup, &[]), Duration::from_secs(120));
    assert_eq!(report["in_sync"], true, "{report}");
    assert!(report["bytes_lost"].as_u64().unwrap() > 0, "the proxy lost nothing? {report}");
    assert_same_tree(&setup.path("export"), &setup.path("migration"), |_| false);
}

#[test]
fn datagrams_grow_to_what_the_path_carries_and_no_further() {
    // Loopback carries 64 KiB datagrams: path MTU discovery climbs past Ethernet's 1452 bytes, and the
    // round keeps its one connection. (With 8952-byte datagrams, quinn's batches outgrew one UDP
    // datagram, the kernel refused them, and quinn fell back to 1200-byte datagrams.)
    let (setup, proxy) = behind_proxy(16);
    let report = finish_round(sync_in_background(&setup, &[]), Duration::from_secs(120));
    assert_eq!(report["in_sync"], true, "{report}");
    assert_eq!(report["connections"], 1, "{report}");
    assert!(report["path_mtu"].as_u64().unwrap() > 1472, "{report}");

    // A path with an Ethernet MTU drops anything larger: discovery stops below it, and the round
    // completes as before.
    proxy.set(Impairment { max_datagram: Some(1472), ..Impairment::default() });
    crate::util::write(&setup.path("export/big/blob-new"), &random_bytes(4 << 20, 99));
    let report = finish_round(sync_in_background(&setup, &[]), Duration::from_secs(120));
    assert_eq!(report["in_sync"], true, "{report}");
    let mtu = report["path_mtu"].as_u64().unwrap();
    assert!((1200..=1472).contains(&mtu), "{report}");
    assert_same_tree(&setup.path("export"), &setup.path("migration"), |_| false);
}

#[test]
fn a_round_through_reordering_duplication_and_bursty_loss_completes() {
    let (setup, proxy) = behind_proxy(2);
    proxy.set(Impairment {
        delay: Duration::from_millis(5),
        jitter: Duration::from_millis(10),
        loss: 0.01,
        burst: 0.3,
        duplicate: 0.05,
        reorder: 0.1,
        ..Impairment::default()
    });
    let report = finish_round(sync_in_background(&setup, &[]), Duration::from_secs(120));
    assert_eq!(report["in_sync"], true, "{report}");
    assert_same_tree(&setup.path("export"), &setup.path("migration"), |_| false);
}

#[test]
fn the_source_changing_address_mid_round_keeps_the_connection() {
    let (setup, mut proxy) = behind_proxy(8);
    let sync = sync_in_background(&setup, &["--bwlimit", "2M"]);
    std::thread::sleep(Duration::from_millis(1500));
    // The destination now sees the source at another port, as after a NAT rebinding.
    proxy.rebind().unwrap();
    let report = finish_round(sync, Duration::from_secs(60));
    assert_eq!(report["in_sync"], true, "{report}");
    assert_eq!(report["connections"], 1, "QUIC migrated the connection: {report}");
    assert_same_tree(&setup.path("export"), &setup.path("migration"), |_| false);
}

#[test]
fn a_60_second_blackout_mid_round_is_ridden_out() {
    let (setup, proxy) = behind_proxy(6);
    let sync = sync_in_background(&setup, &["--bwlimit", "2M", "--reconnect-grace", "5m"]);
    std::thread::sleep(Duration::from_millis(1500));
    proxy.blackout(true);
    std::thread::sleep(Duration::from_secs(60));
    proxy.blackout(false);
    let report = finish_round(sync, Duration::from_secs(120));
    assert_eq!(report["in_sync"], true, "{report}");
    // The idle timeout (30 s) ended the first connection; sync reconnected by itself.
    assert!(report["connections"].as_u64().unwrap() >= 2, "{report}");
    assert_same_tree(&setup.path("export"), &setup.path("migration"), |_| false);
}

#[test]
fn the_daemon_survives_garbage_and_a_flood_of_strangers_and_serves_its_peer() {
    let mut setup = Setup::new();
    let source = setup.path("export");
    TreeGenerator::create(&source, TreeSpec::with_files(200, 10)).unwrap();
    setup.job("zimbra", &source, &setup.path("migration"));
    let daemon: std::net::SocketAddr = setup.daemon.addr.parse().unwrap();

    // Garbage datagrams: random bytes, and random bytes dressed as QUIC Initial packets.
    let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    for i in 0..20_000u64 {
        let mut datagram = random_bytes(1 + (i as usize * 7919) % 1400, i);
        if i % 2 == 0 {
            datagram.splice(0..0, [0xc3, 0, 0, 0, 1, 8]);
        }
        let _ = socket.send_to(&datagram, daemon);
    }

    // A flood of TLS handshakes from a node the daemon does not trust.
    let stranger = ferry_certs::Identity::generate().unwrap();
    let dest_id: ferry_certs::NodeId = setup.dest.id.parse().unwrap();
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    let refused = runtime.block_on(async {
        let tls = ferry_certs::client_config(&stranger, dest_id, ferry_proto::ALPN).unwrap();
        let quic = quinn::crypto::rustls::QuicClientConfig::try_from(tls).unwrap();
        let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
        // The daemon's refusal is one CONNECTION_CLOSE, which the flood can drop on the way (seen in CI:
        // 298 of 300). A stranger whose refusal is lost then idles out after 10 s, well within the 30 s
        // deadline, unless the daemon keeps it alive: that would still count as served.
        let mut transport = quinn::TransportConfig::default();
        transport.max_idle_timeout(Some(Duration::from_secs(10).try_into().unwrap()));
        let mut client = quinn::ClientConfig::new(std::sync::Arc::new(quic));
        client.transport_config(std::sync::Arc::new(transport));
        endpoint.set_default_client_config(client);
        let attempts: Vec<_> = (0..300)
            .map(|_| {
                let connecting = endpoint.connect(daemon, "ferry").unwrap();
                tokio::spawn(async move {
                    // (Generous deadlines: on a loaded machine 300 concurrent handshakes take a while.)
                    let Ok(Ok(connection)) = tokio::time::timeout(Duration::from_secs(30), connecting).await else {
                        return true;
                    };
                    // With TLS 1.3 the refusal of the client's certificate comes right after.
                    tokio::time::timeout(Duration::from_secs(30), connection.accept_uni())
                        .await
                        .is_ok_and(|r| r.is_err())
                })
            })
            .collect();
        let mut refused = 0;
        for attempt in attempts {
            refused += usize::from(attempt.await.unwrap());
        }
        refused
    });
    assert_eq!(refused, 300, "every stranger is refused");
    assert!(setup.daemon.child.try_wait().unwrap().is_none(), "the daemon died");

    let report = setup.source.sync("zimbra");
    assert_eq!(report["in_sync"], true, "{report}");
    assert_same_tree(&source, &setup.path("migration"), |_| false);
}
