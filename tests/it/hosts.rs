//! The network namespaces the cross-host tests stand their hosts in.

use std::process::Command;

use crate::common::netns::Hosts;

#[test]
fn hosts_reach_each_other_and_are_removed_afterwards() {
    let Some(hosts) = Hosts::create(2) else {
        return;
    };
    let names: Vec<String> = hosts.hosts.iter().map(|h| h.ns.clone()).collect();
    let mut b = hosts.b().listen(7000);
    let daemon = std::net::TcpListener::bind((hosts.gateway, 7001)).unwrap();
    assert!(hosts.a().connects(hosts.b().addr, 7000), "a cannot reach b");
    assert!(
        hosts.b().connects(hosts.gateway, 7001),
        "b cannot reach the test's namespace"
    );
    drop(daemon);
    hosts.b().cut();
    assert!(
        !hosts.a().connects(hosts.b().addr, 7000),
        "the cut link still carries"
    );
    hosts.b().mend();
    assert!(
        hosts.a().connects(hosts.b().addr, 7000),
        "the mended link does not carry"
    );
    b.kill().unwrap();
    b.wait().unwrap();
    drop(hosts);
    let list = Command::new("ip").args(["netns", "list"]).output().unwrap();
    let list = String::from_utf8_lossy(&list.stdout);
    for n in names {
        assert!(!list.contains(&n), "{n} was left behind");
    }
}
