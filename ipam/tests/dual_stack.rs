//! IPv6 over a real (memory) store: the IPv4 guarantees of `allocation.rs`
//! for the second family of a dual-stack network — subnets checked across
//! families, gateways reserved, blocks claimed by CAS and never mixed with
//! the IPv4 ones, no duplicate under concurrency, fenced reclaim — and the
//! cluster's ULA pool.

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::sync::Arc;

use ipnet::IpNet;
use trellis_ipam::{AddrRequest, FamilyRequest, Ipam, IpamError, Pool, SubnetRequest};
use trellis_store::{Compare, LocalStore, Op, Store};

fn net(s: &str) -> IpNet {
    s.parse().unwrap()
}
fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}
fn none(_: IpAddr) -> (Vec<Compare>, Vec<Op>) {
    (vec![], vec![])
}
fn family(subnet: &str) -> FamilyRequest {
    FamilyRequest { subnet: SubnetRequest::Specific(net(subnet)), gateway: None }
}

/// A dual-stack network: its IPv4 and IPv6 pools.
async fn create(ipam: &Ipam, s: &Arc<dyn Store>, id: &str, v4: &str, v6: &str) -> (Pool, Pool) {
    let plan = ipam.plan_dual_network(id, &family(v4), Some(&family(v6)), &[]).await.unwrap();
    assert!(s.txn(plan.compares, plan.ops).await.unwrap().succeeded);
    (
        Pool { net_id: id.into(), subnet: plan.subnet, gateway: plan.gateway },
        Pool { net_id: id.into(), subnet: plan.subnet6.unwrap(), gateway: plan.gateway6 },
    )
}

#[tokio::test]
async fn a_dual_stack_network_gets_both_subnets_and_gateways_and_clashes_are_refused() {
    let s: Arc<dyn Store> = Arc::new(LocalStore::memory());
    let ipam = Ipam::new(s.clone(), "/t/ipam/", "h");
    let (v4, v6) = create(&ipam, &s, "n1", "10.1.0.0/24", "fd00:1::/64").await;
    assert_eq!((v4.gateway, v6.gateway), (Some(ip("10.1.0.1")), Some(ip("fd00:1::1"))));
    let addrs: Vec<IpAddr> = ipam.addresses("n1").await.unwrap().into_iter().map(|(a, _)| a).collect();
    assert_eq!(addrs.len(), 2, "both gateways reserved: {addrs:?}");
    // An IPv6 subnet overlapping another network's is refused, and so is
    // a family in the other's place.
    let e = ipam.plan_dual_network("n2", &family("10.2.0.0/24"), Some(&family("fd00:1::/48")), &[]).await.unwrap_err();
    assert!(matches!(e, IpamError::Overlap { ref network, .. } if network == "n1"), "{e}");
    let e = ipam.plan_dual_network("n2", &family("10.2.0.0/24"), Some(&family("10.3.0.0/24")), &[]).await.unwrap_err();
    assert!(matches!(e, IpamError::WrongFamily { want: "IPv6", .. }), "{e}");
    let e = ipam.plan_dual_network("n2", &family("10.2.0.0/24"), Some(&family("fd00:2::/121")), &[]).await.unwrap_err();
    assert!(matches!(e, IpamError::TooSmall(_)), "{e}");
    let gw = FamilyRequest { subnet: SubnetRequest::Specific(net("fd00:2::/64")), gateway: Some(ip("fd00:3::1")) };
    let e = ipam.plan_dual_network("n2", &family("10.2.0.0/24"), Some(&gw), &[]).await.unwrap_err();
    assert!(matches!(e, IpamError::OutOfSubnet { .. }), "{e}");
    // Both families from pools.
    let pool = ipam.ula_pool().await.unwrap();
    let v6 = FamilyRequest { subnet: SubnetRequest::FromPool { pool, prefix_len: 64 }, gateway: None };
    let v4 =
        FamilyRequest { subnet: SubnetRequest::FromPool { pool: net("10.0.0.0/8"), prefix_len: 24 }, gateway: None };
    let plan = ipam.plan_dual_network("n3", &v4, Some(&v6), &[]).await.unwrap();
    let s6 = plan.subnet6.unwrap();
    assert!(pool.contains(&s6) && s6.prefix_len() == 64, "{s6}");
    assert_eq!(plan.gateway6, Some(trellis_ipam::pure::nth(&s6, 1)));
    assert!(s.txn(plan.compares, plan.ops).await.unwrap().succeeded);
    let (index, _) = ipam.index().await.unwrap();
    assert_eq!(index.nets["n3"].subnet6, Some(s6));
}

#[tokio::test]
async fn the_cluster_ula_pool_is_chosen_once() {
    let s: Arc<dyn Store> = Arc::new(LocalStore::memory());
    let a = Ipam::new(s.clone(), "/t/ipam/", "a");
    let b = Ipam::new(s.clone(), "/t/ipam/", "b");
    let (pa, pb) = tokio::join!(a.ula_pool(), b.ula_pool());
    let (pa, pb) = (pa.unwrap(), pb.unwrap());
    assert_eq!(pa, pb, "every host sees the same pool");
    assert_eq!(pa.prefix_len(), 48);
    let IpAddr::V6(v6) = pa.network() else { panic!("{pa}") };
    assert_eq!(v6.octets()[0], 0xfd, "a ULA (RFC 4193): {pa}");
    assert_eq!(a.ula_pool().await.unwrap(), pa, "kept");
}

#[tokio::test]
async fn both_families_allocate_from_their_own_blocks() {
    let s: Arc<dyn Store> = Arc::new(LocalStore::memory());
    let ipam = Ipam::new(s.clone(), "/t/ipam/", "h");
    let (v4, v6) = create(&ipam, &s, "n", "10.9.0.0/24", "fd00:9::/64").await;
    for i in 0..70 {
        let a = ipam.allocate(&v4, AddrRequest::Any, &format!("e{i}"), none).await.unwrap();
        let b = ipam.allocate(&v6, AddrRequest::Any, &format!("e{i}"), none).await.unwrap();
        assert!(v4.subnet.contains(&a) && v6.subnet.contains(&b), "{a} {b}");
    }
    let blocks = ipam.blocks("n").await.unwrap();
    let (b4, b6): (Vec<_>, Vec<_>) = blocks.iter().map(|(b, ..)| *b).partition(|b| b.network().is_ipv4());
    assert_eq!((b4.len(), b6.len()), (2, 2), "a /26 and a /122 hold 64 each: {blocks:?}");
    assert!(b6.iter().all(|b| b.prefix_len() == 122));
    // Specific addresses, the gateway's and the subnet's own refused.
    assert_eq!(
        ipam.allocate(&v6, AddrRequest::Specific(ip("fd00:9::beef")), "x", none).await.unwrap(),
        ip("fd00:9::beef")
    );
    let e = ipam.allocate(&v6, AddrRequest::Specific(ip("fd00:9::beef")), "y", none).await.unwrap_err();
    assert!(matches!(e, IpamError::InUse { ref owner, .. } if owner == "x"), "{e}");
    let e = ipam.allocate(&v6, AddrRequest::Specific(ip("fd00:9::1")), "y", none).await.unwrap_err();
    assert!(matches!(e, IpamError::InUse { ref owner, .. } if owner == "gateway"), "{e}");
    let e = ipam.allocate(&v6, AddrRequest::Specific(ip("fd00:9::")), "y", none).await.unwrap_err();
    assert!(matches!(e, IpamError::Reserved { .. }), "{e}");
    let e = ipam.allocate(&v6, AddrRequest::Specific(ip("fd00:8::5")), "y", none).await.unwrap_err();
    assert!(matches!(e, IpamError::OutOfSubnet { .. }), "{e}");
}

/// As `concurrent_hosts_never_duplicate` for IPv4: every allocatable
/// address of a small IPv6 subnet handed out once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_hosts_never_duplicate_ipv6() {
    let s: Arc<dyn Store> = Arc::new(LocalStore::memory());
    let first = Ipam::new(s.clone(), "/t/ipam/", "h0");
    let (_, pool) = create(&first, &s, "n", "10.50.0.0/24", "fd00:50::/120").await;
    let hosts: Vec<Arc<Ipam>> =
        (0..5).map(|h| Arc::new(Ipam::new(s.clone(), "/t/ipam/", format!("h{h}")).with_block_len_v6(124))).collect();
    let mut tasks = Vec::new();
    for (h, ipam) in hosts.iter().enumerate() {
        for t in 0..4 {
            let (ipam, pool) = (ipam.clone(), pool.clone());
            tasks.push(tokio::spawn(async move {
                let mut mine = Vec::new();
                for i in 0.. {
                    match ipam.allocate(&pool, AddrRequest::Any, &format!("h{h}t{t}e{i}"), none).await {
                        Ok(ip) => mine.push(ip),
                        Err(IpamError::Exhausted { .. }) => break,
                        Err(e) => panic!("unexpected error {e}"),
                    }
                }
                mine
            }));
        }
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    let unique: BTreeSet<_> = all.iter().copied().collect();
    assert_eq!(unique.len(), all.len(), "duplicate addresses handed out");
    assert_eq!(all.len(), 256 - 2, "every address but the subnet's own and the gateway");
}

/// As `a_reclaim_planned_before_an_address_changed_hands_does_not_commit`,
/// and a dead host's share goes in both families at once.
#[tokio::test]
async fn a_dead_hosts_ipv6_share_is_reclaimed_fenced() {
    let s: Arc<dyn Store> = Arc::new(LocalStore::memory());
    let a = Ipam::new(s.clone(), "/t/ipam/", "a");
    let b = Ipam::new(s.clone(), "/t/ipam/", "b");
    let c = Ipam::new(s.clone(), "/t/ipam/", "c");
    let (v4, v6) = create(&a, &s, "n", "10.81.0.0/24", "fd00:81::/64").await;
    let x = b.allocate(&v6, AddrRequest::Any, "bx", none).await.unwrap();
    let x4 = b.allocate(&v4, AddrRequest::Any, "bx", none).await.unwrap();
    let (compares, ops) = a.plan_host_release("n", "b").await.unwrap();
    b.release(&v6, x).await.unwrap();
    assert_eq!(c.allocate(&v6, AddrRequest::Specific(x), "cx", none).await.unwrap(), x);
    assert!(!s.txn(compares, ops).await.unwrap().succeeded, "a stale reclaim committed");
    let (compares, ops) = a.plan_host_release("n", "b").await.unwrap();
    assert!(s.txn(compares, ops).await.unwrap().succeeded);
    let left = a.addresses("n").await.unwrap();
    assert!(left.iter().any(|(ip, r)| *ip == x && r.host == "c"), "c's address stays: {left:?}");
    assert!(!left.iter().any(|(ip, _)| *ip == x4), "b's IPv4 address went with its IPv6 one");
    assert!(a.blocks("n").await.unwrap().iter().all(|(_, r, _)| r.host != "b"));
}

/// A second family's address taken in the caller's transaction: picks in
/// flight never collide, one that did not commit is free again, one that
/// committed is taken for good.
#[tokio::test]
async fn an_address_picked_for_the_callers_transaction_commits_with_it_or_not_at_all() {
    let s: Arc<dyn Store> = Arc::new(LocalStore::memory());
    let ipam = Ipam::new(s.clone(), "/t/ipam/", "h");
    let (_, v6) = create(&ipam, &s, "n", "10.9.0.0/24", "fd00:9::/64").await;
    let (a, ca, oa) = ipam.pick_for_txn(&v6, "ea").await.unwrap();
    let (b, _, _) = ipam.pick_for_txn(&v6, "eb").await.unwrap();
    assert_ne!(a, b, "two picks in flight");
    // b's transaction fails: b is free again, and picked next.
    ipam.unpick(&v6, b);
    assert!(s.txn(ca, oa).await.unwrap().succeeded, "a commits in the caller's transaction");
    let (c, cc, oc) = ipam.pick_for_txn(&v6, "ec").await.unwrap();
    assert_eq!(c, b, "the unpicked address is handed out again");
    assert!(s.txn(cc, oc).await.unwrap().succeeded);
    let owners: Vec<(IpAddr, String)> = ipam
        .addresses("n")
        .await
        .unwrap()
        .into_iter()
        .map(|(ip, r)| (ip, r.owner))
        .filter(|(_, o)| o != "gateway")
        .collect();
    assert_eq!(owners, vec![(a, "ea".to_string()), (c, "ec".to_string())]);
    // A stale pick (the address taken meanwhile by another host) fails the
    // caller's transaction rather than taking it twice.
    let (d, cd, od) = ipam.pick_for_txn(&v6, "ed").await.unwrap();
    let other = Ipam::new(s.clone(), "/t/ipam/", "h2");
    assert_eq!(other.allocate(&v6, AddrRequest::Specific(d), "theirs", none).await.unwrap(), d);
    assert!(!s.txn(cd, od).await.unwrap().succeeded, "the address was taken meanwhile");
}

/// An engine's IPAM reserves an IPv6 address before the endpoint exists
/// (Docker's RequestAddress); the endpoint's transaction claims it. Only
/// this host's reservation can be claimed, once, and a failed claim says
/// why.
#[tokio::test]
async fn a_reserved_ipv6_address_is_claimed_in_the_callers_transaction_once() {
    let s: Arc<dyn Store> = Arc::new(LocalStore::memory());
    let ipam = Ipam::new(s.clone(), "/t/ipam/", "h");
    let (_, v6) = create(&ipam, &s, "n", "10.8.0.0/24", "fd00:8::/64").await;
    let r = ipam.allocate(&v6, AddrRequest::Any, trellis_ipam::RESERVED, none).await.unwrap();
    assert!(ipam.claim_failure(&v6, r).await.unwrap().is_none(), "still this host's reservation");
    // Another host cannot claim this host's reservation.
    let other = Ipam::new(s.clone(), "/t/ipam/", "h2");
    let (c, o) = other.claim_for_txn(&v6, r, "theirs");
    assert!(!s.txn(c, o).await.unwrap().succeeded, "another host claimed this host's reservation");
    assert!(matches!(other.claim_failure(&v6, r).await.unwrap(), Some(IpamError::InUse { .. })));
    // This host claims it, with its own record in the same transaction.
    let (mut c, mut o) = ipam.claim_for_txn(&v6, r, "ep1");
    c.push(Compare::Absent("/t/ep1".into()));
    o.push(Op::put("/t/ep1".to_string(), b"x".to_vec()));
    assert!(s.txn(c, o).await.unwrap().succeeded);
    let owner = ipam.addresses("n").await.unwrap().into_iter().find(|(ip, _)| *ip == r).unwrap().1;
    assert_eq!((owner.owner.as_str(), owner.host.as_str()), ("ep1", "h"));
    // Claimed once: a second claim fails and says the address is in use.
    let (c, o) = ipam.claim_for_txn(&v6, r, "ep2");
    assert!(!s.txn(c, o).await.unwrap().succeeded, "a reservation was claimed twice");
    match ipam.claim_failure(&v6, r).await.unwrap() {
        Some(IpamError::InUse { owner, .. }) => assert_eq!(owner, "ep1"),
        other => panic!("expected InUse by ep1, got {other:?}"),
    }
    // An address never reserved cannot be claimed.
    let free = ip("fd00:8::77");
    let (c, o) = ipam.claim_for_txn(&v6, free, "ep3");
    assert!(!s.txn(c, o).await.unwrap().succeeded);
    assert!(matches!(ipam.claim_failure(&v6, free).await.unwrap(), Some(IpamError::NotReserved(_))));
}
