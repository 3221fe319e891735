//! IPAM over a real (memory) store: networks, allocation, races, exhaustion.

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::sync::Arc;

use ipnet::IpNet;
use trellis_ipam::{AddrRequest, Ipam, IpamError, Pool, SubnetRequest};
use trellis_store::{Compare, LocalStore, Op, Store};

fn net(s: &str) -> IpNet {
    s.parse().unwrap()
}
fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn store() -> Arc<dyn Store> {
    Arc::new(LocalStore::memory())
}

async fn create(ipam: &Ipam, s: &Arc<dyn Store>, id: &str, req: SubnetRequest) -> Pool {
    let plan = ipam.plan_network(id, &req, None, &[]).await.unwrap();
    assert!(s.txn(plan.compares, plan.ops).await.unwrap().succeeded);
    Pool { net_id: id.into(), subnet: plan.subnet, gateway: plan.gateway }
}

fn none(_: IpAddr) -> (Vec<Compare>, Vec<Op>) {
    (vec![], vec![])
}

#[tokio::test]
async fn default_pool_skips_taken_subnets_and_host_routes() {
    let s = store();
    let ipam = Ipam::new(s.clone(), "/t/ipam/", "h1");
    let req = SubnetRequest::FromPool { pool: net("10.0.0.0/8"), prefix_len: 24 };
    let avoid = [net("10.0.0.0/24"), net("10.0.2.0/24")];
    let p1 = ipam.plan_network("n1", &req, None, &avoid).await.unwrap();
    assert_eq!(p1.subnet, net("10.0.1.0/24"));
    assert_eq!(p1.gateway, Some(ip("10.0.1.1")));
    assert!(s.txn(p1.compares, p1.ops).await.unwrap().succeeded);
    let p2 = ipam.plan_network("n2", &req, None, &avoid).await.unwrap();
    assert_eq!(p2.subnet, net("10.0.3.0/24"));
    assert_ne!(p1.vni, p2.vni, "VNIs are unique");
    assert!(s.txn(p2.compares, p2.ops).await.unwrap().succeeded);
    let (index, _) = ipam.index().await.unwrap();
    assert_eq!(index.nets.len(), 2);
}

#[tokio::test]
async fn stale_plan_cannot_commit() {
    // Two hosts plan networks from the same index revision: only one commits.
    let s = store();
    let a = Ipam::new(s.clone(), "/t/ipam/", "a");
    let b = Ipam::new(s.clone(), "/t/ipam/", "b");
    let req = SubnetRequest::FromPool { pool: net("10.0.0.0/8"), prefix_len: 24 };
    let pa = a.plan_network("na", &req, None, &[]).await.unwrap();
    let pb = b.plan_network("nb", &req, None, &[]).await.unwrap();
    assert_eq!(pa.subnet, pb.subnet, "both chose the same subnet from the same view");
    assert!(s.txn(pa.compares, pa.ops).await.unwrap().succeeded);
    assert!(!s.txn(pb.compares, pb.ops).await.unwrap().succeeded, "the stale plan must fail");
    let pb = b.plan_network("nb", &req, None, &[]).await.unwrap();
    assert_eq!(pb.subnet, net("10.0.1.0/24"));
}

#[tokio::test]
async fn bad_subnets_and_gateways_are_refused() {
    let s = store();
    let ipam = Ipam::new(s.clone(), "/t/ipam/", "h");
    create(&ipam, &s, "n1", SubnetRequest::Specific(net("10.30.0.0/24"))).await;
    let e = ipam.plan_network("n2", &SubnetRequest::Specific(net("10.30.0.128/25")), None, &[]).await.unwrap_err();
    assert!(matches!(e, IpamError::Overlap { ref network, .. } if network == "n1"), "{e}");
    let e = ipam
        .plan_network("n2", &SubnetRequest::Specific(net("192.168.5.0/24")), None, &[net("192.168.0.0/16")])
        .await
        .unwrap_err();
    assert!(matches!(e, IpamError::OverlapsHostRoute { .. }), "{e}");
    let e = ipam
        .plan_network("n2", &SubnetRequest::Specific(net("10.31.0.0/24")), Some(ip("10.32.0.1")), &[])
        .await
        .unwrap_err();
    assert!(matches!(e, IpamError::OutOfSubnet { .. }), "{e}");
    let e = ipam
        .plan_network("n2", &SubnetRequest::Specific(net("10.31.0.0/24")), Some(ip("10.31.0.255")), &[])
        .await
        .unwrap_err();
    assert!(matches!(e, IpamError::Reserved { .. }), "{e}");
    let e = ipam.plan_network("n2", &SubnetRequest::Specific(net("10.31.0.0/31")), None, &[]).await.unwrap_err();
    assert!(matches!(e, IpamError::TooSmall(_)), "{e}");
    // Either family: an IPv6 subnet alone plans an IPv6-only network…
    let only6 = ipam.plan_network("n2", &SubnetRequest::Specific(net("fd00::/64")), None, &[]).await.unwrap();
    assert_eq!((only6.subnet, only6.gateway, only6.subnet6), (net("fd00::/64"), Some(ip("fd00::1")), None));
    // …and as a dual-stack network's IPv4 subnet it is the wrong family.
    let v6 = trellis_ipam::FamilyRequest { subnet: SubnetRequest::Specific(net("fd00::/64")), gateway: None };
    let e = ipam.plan_dual_network("n2", &v6, None, &[]).await.unwrap_err();
    assert!(matches!(e, IpamError::WrongFamily { want: "IPv4", .. }), "{e}");
    let e = ipam
        .plan_network("n2", &SubnetRequest::FromPool { pool: net("10.30.0.0/24"), prefix_len: 24 }, None, &[])
        .await
        .unwrap_err();
    assert!(matches!(e, IpamError::PoolExhausted { .. }), "{e}");
}

#[tokio::test]
async fn allocation_skips_reserved_and_exhausts_clearly() {
    let s = store();
    let ipam = Ipam::new(s.clone(), "/t/ipam/", "h");
    let pool = create(&ipam, &s, "n", SubnetRequest::Specific(net("10.9.0.0/29"))).await;
    let mut got = BTreeSet::new();
    for i in 0..5 {
        got.insert(ipam.allocate(&pool, AddrRequest::Any, &format!("ep{i}"), none).await.unwrap());
    }
    let want: BTreeSet<IpAddr> =
        ["10.9.0.2", "10.9.0.3", "10.9.0.4", "10.9.0.5", "10.9.0.6"].iter().map(|s| ip(s)).collect();
    assert_eq!(got, want, "network, gateway and broadcast are never handed out");
    let e = ipam.allocate(&pool, AddrRequest::Any, "ep5", none).await.unwrap_err();
    assert!(matches!(e, IpamError::Exhausted { .. }), "{e}");
    assert!(e.to_string().contains("10.9.0.0/29"), "{e}");
    // Release one: it can be had again.
    ipam.release(&pool, ip("10.9.0.4")).await.unwrap();
    assert_eq!(ipam.allocate(&pool, AddrRequest::Any, "ep6", none).await.unwrap(), ip("10.9.0.4"));
}

#[tokio::test]
async fn specific_addresses() {
    let s = store();
    let ipam = Ipam::new(s.clone(), "/t/ipam/", "h");
    let pool = create(&ipam, &s, "n", SubnetRequest::Specific(net("10.9.0.0/24"))).await;
    assert_eq!(ipam.allocate(&pool, AddrRequest::Specific(ip("10.9.0.50")), "a", none).await.unwrap(), ip("10.9.0.50"));
    let e = ipam.allocate(&pool, AddrRequest::Specific(ip("10.9.0.50")), "b", none).await.unwrap_err();
    assert!(matches!(e, IpamError::InUse { ref owner, .. } if owner == "a"), "{e}");
    let e = ipam.allocate(&pool, AddrRequest::Specific(ip("10.9.0.1")), "b", none).await.unwrap_err();
    assert!(matches!(e, IpamError::InUse { ref owner, .. } if owner == "gateway"), "{e}");
    let e = ipam.allocate(&pool, AddrRequest::Specific(ip("10.9.0.255")), "b", none).await.unwrap_err();
    assert!(matches!(e, IpamError::Reserved { .. }), "{e}");
    let e = ipam.allocate(&pool, AddrRequest::Specific(ip("10.8.0.5")), "b", none).await.unwrap_err();
    assert!(matches!(e, IpamError::OutOfSubnet { .. }), "{e}");
    // A block allocation never hands out the specific one.
    for i in 0..100 {
        let got = ipam.allocate(&pool, AddrRequest::Any, &format!("x{i}"), none).await.unwrap();
        assert_ne!(got, ip("10.9.0.50"));
    }
}

#[tokio::test]
async fn caller_records_commit_with_the_address_or_not_at_all() {
    let s = store();
    let ipam = Ipam::new(s.clone(), "/t/ipam/", "h");
    let pool = create(&ipam, &s, "n", SubnetRequest::Specific(net("10.9.0.0/24"))).await;
    s.put("/t/names/taken", b"x".to_vec()).await.unwrap();
    let e = ipam
        .allocate(&pool, AddrRequest::Any, "ep", |ip| {
            (vec![Compare::Absent("/t/names/taken".into())], vec![Op::put("/t/ep", ip.to_string().into_bytes())])
        })
        .await
        .unwrap_err();
    assert!(matches!(e, IpamError::CallerConflict), "{e}");
    assert_eq!(s.get("/t/ep").await.unwrap(), None);
    let addrs = ipam.addresses("n").await.unwrap();
    assert_eq!(addrs.len(), 1, "only the gateway: {addrs:?}");
    let got = ipam
        .allocate(&pool, AddrRequest::Any, "ep", |ip| (vec![], vec![Op::put("/t/ep", ip.to_string().into_bytes())]))
        .await
        .unwrap();
    assert_eq!(s.get("/t/ep").await.unwrap().unwrap().value, got.to_string().into_bytes());
}

/// Many hosts allocating at once from one small subnet: every address is
/// handed out once, and exactly the allocatable ones are.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_hosts_never_duplicate() {
    let s = store();
    let first = Ipam::new(s.clone(), "/t/ipam/", "h0");
    let pool = create(&first, &s, "n", SubnetRequest::Specific(net("10.50.0.0/24"))).await;
    let hosts: Vec<Arc<Ipam>> =
        (0..5).map(|h| Arc::new(Ipam::new(s.clone(), "/t/ipam/", format!("h{h}")).with_block_len_v4(28))).collect();
    let mut tasks = Vec::new();
    for (h, ipam) in hosts.iter().enumerate() {
        for t in 0..4 {
            let ipam = ipam.clone();
            let pool = pool.clone();
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
    assert_eq!(all.len(), 256 - 3, "every allocatable address of the /24 was handed out");
    let stored = first.addresses("n").await.unwrap();
    assert_eq!(stored.len(), 256 - 2, "store holds each endpoint address plus the gateway");
}

/// A host with no block left to claim borrows free addresses from other
/// hosts' blocks, still without duplicates.
#[tokio::test]
async fn a_host_without_blocks_borrows() {
    let s = store();
    let a = Ipam::new(s.clone(), "/t/ipam/", "a").with_block_len_v4(28);
    let b = Ipam::new(s.clone(), "/t/ipam/", "b").with_block_len_v4(28);
    let pool = create(&a, &s, "n", SubnetRequest::Specific(net("10.51.0.0/27"))).await;
    // a claims both /28 blocks but uses only a few addresses.
    let mut mine = BTreeSet::new();
    for i in 0..16 {
        mine.insert(a.allocate(&pool, AddrRequest::Any, &format!("a{i}"), none).await.unwrap());
    }
    assert_eq!(a.blocks("n").await.unwrap().len(), 2);
    let borrowed = b.allocate(&pool, AddrRequest::Any, "b0", none).await.unwrap();
    assert!(!mine.contains(&borrowed));
    assert!(b.blocks("n").await.unwrap().iter().all(|(_, r, _)| r.host == "a"), "b claimed no block");
    let rec = b.addresses("n").await.unwrap().into_iter().find(|(ip, _)| *ip == borrowed).unwrap().1;
    assert_eq!(rec.host, "b");
}

/// A block whose ownership changed under a host (reclaimed) is not used by
/// that host's stale cache.
#[tokio::test]
async fn moved_block_fences_stale_cache() {
    let s = store();
    let a = Ipam::new(s.clone(), "/t/ipam/", "a");
    let pool = create(&a, &s, "n", SubnetRequest::Specific(net("10.60.0.0/24"))).await;
    let first = a.allocate(&pool, AddrRequest::Any, "e0", none).await.unwrap();
    let blocks = a.blocks("n").await.unwrap();
    assert_eq!(blocks.len(), 1);
    let (b, _, _) = &blocks[0];
    // Someone reassigns the block to host b (as reclaim will).
    let key = format!("/t/ipam/blocks/n/{}-{}", b.network(), b.prefix_len());
    s.put(&key, br#"{"host":"b"}"#.to_vec()).await.unwrap();
    let next = a.allocate(&pool, AddrRequest::Any, "e1", none).await.unwrap();
    assert_ne!(next, first);
    assert!(!b.contains(&next), "a allocated {next} in block {b} it no longer owns");
    let mine: BTreeSet<_> =
        a.blocks("n").await.unwrap().into_iter().filter(|(_, r, _)| r.host == "a").map(|(b, ..)| b).collect();
    assert!(mine.iter().any(|blk| blk.contains(&next)));
}

#[tokio::test]
async fn network_release_removes_everything() {
    let s = store();
    let ipam = Ipam::new(s.clone(), "/t/ipam/", "h");
    let pool = create(&ipam, &s, "n", SubnetRequest::Specific(net("10.9.0.0/24"))).await;
    let keep = create(&ipam, &s, "keep", SubnetRequest::Specific(net("10.10.0.0/24"))).await;
    for i in 0..10 {
        ipam.allocate(&pool, AddrRequest::Any, &format!("e{i}"), none).await.unwrap();
    }
    ipam.allocate(&keep, AddrRequest::Any, "k", none).await.unwrap();
    let (c, o) = ipam.plan_network_release("n").await.unwrap();
    assert!(s.txn(c, o).await.unwrap().succeeded);
    ipam.forget_network("n");
    assert!(ipam.addresses("n").await.unwrap().is_empty());
    assert!(ipam.blocks("n").await.unwrap().is_empty());
    assert_eq!(ipam.addresses("keep").await.unwrap().len(), 2);
    let (index, _) = ipam.index().await.unwrap();
    assert_eq!(index.nets.keys().collect::<Vec<_>>(), ["keep"]);
    // The subnet can be used again.
    create(&ipam, &s, "n2", SubnetRequest::Specific(net("10.9.0.0/24"))).await;
}

/// Many concurrent allocators on one host (as a busy agent has): no
/// contention errors, no duplicates. A regression test: in-flight picks
/// were once dropped by a cache refresh, so allocators collided until they
/// gave up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_host_many_concurrent_allocators() {
    let s = store();
    let ipam = Arc::new(Ipam::new(s.clone(), "/t/ipam/", "h"));
    let pool = create(&ipam, &s, "n", SubnetRequest::Specific(net("10.70.0.0/16"))).await;
    let mut tasks = Vec::new();
    for t in 0..64 {
        let (ipam, pool) = (ipam.clone(), pool.clone());
        tasks.push(tokio::spawn(async move {
            let mut got = Vec::new();
            for i in 0..40 {
                got.push(ipam.allocate(&pool, AddrRequest::Any, &format!("t{t}e{i}"), none).await.unwrap());
            }
            got
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    let unique: BTreeSet<_> = all.iter().copied().collect();
    assert_eq!(unique.len(), 64 * 40);
    // Blocks were claimed as needed, not one per allocator.
    let blocks = ipam.blocks("n").await.unwrap();
    assert!(blocks.len() <= (64 * 40 / 62) + 2, "{} blocks for {} addresses", blocks.len(), 64 * 40);
}

/// A dead host's share is released as a plan the caller commits: its blocks
/// and addresses go, nobody else's do, and the space is allocatable again.
#[tokio::test]
async fn host_release_frees_a_dead_hosts_share_only() {
    let s = store();
    let a = Ipam::new(s.clone(), "/t/ipam/", "a").with_block_len_v4(28);
    let b = Ipam::new(s.clone(), "/t/ipam/", "b").with_block_len_v4(28);
    let pool = create(&a, &s, "n", SubnetRequest::Specific(net("10.80.0.0/27"))).await;
    let mut of_b = Vec::new();
    for i in 0..5 {
        a.allocate(&pool, AddrRequest::Any, &format!("a{i}"), none).await.unwrap();
        of_b.push(b.allocate(&pool, AddrRequest::Any, &format!("b{i}"), none).await.unwrap());
    }
    let (c, o) = a.plan_host_release("n", "b").await.unwrap();
    assert!(s.txn(c, o).await.unwrap().succeeded);
    let left = a.addresses("n").await.unwrap();
    assert!(left.iter().all(|(_, r)| r.host == "a"), "{left:?}");
    assert_eq!(left.len(), 6, "a's five and the gateway");
    assert!(a.blocks("n").await.unwrap().iter().all(|(_, r, _)| r.host == "a"));
    // b's addresses can be had again.
    for ip in of_b {
        a.allocate(&pool, AddrRequest::Specific(ip), "again", none).await.unwrap();
    }
}

#[tokio::test]
async fn reservations_are_claimed_once_and_released_only_while_reserved() {
    let s = store();
    let h1 = Ipam::new(s.clone(), "/t/ipam/", "h1");
    let h2 = Ipam::new(s.clone(), "/t/ipam/", "h2");
    let pool = create(&h1, &s, "n1", SubnetRequest::Specific(net("10.8.0.0/24"))).await;
    let r = h1.allocate(&pool, AddrRequest::Any, trellis_ipam::RESERVED, none).await.unwrap();
    // Reserved means taken: nobody else gets it.
    assert!(matches!(h2.allocate(&pool, AddrRequest::Specific(r), "x", none).await, Err(IpamError::InUse { .. })));
    assert_ne!(h1.allocate(&pool, AddrRequest::Any, "other", none).await.unwrap(), r);
    // Another host cannot claim this host's reservation; an unreserved
    // address cannot be claimed at all.
    assert!(matches!(h2.claim_for_test(&pool, r).await, Err(IpamError::InUse { .. })));
    assert!(matches!(h1.claim_for_test(&pool, ip("10.8.0.200")).await, Err(IpamError::NotReserved(_))));
    // The claim writes the caller's records with it.
    let key = "/t/rec".to_string();
    let got = h1
        .allocate(&pool, AddrRequest::Claim(r), "ep1", |_| (vec![], vec![Op::put(key.clone(), b"x".to_vec())]))
        .await
        .unwrap();
    assert_eq!(got, r);
    assert!(s.get(&key).await.unwrap().is_some());
    let owner = h1.addresses("n1").await.unwrap().into_iter().find(|(a, _)| *a == r).unwrap().1.owner;
    assert_eq!(owner, "ep1");
    // Claimed once: a second claim fails, and releasing the reservation
    // now leaves the endpoint's address alone.
    assert!(h1.claim_for_test(&pool, r).await.is_err());
    assert!(!h1.release_reservation(&pool, r).await.unwrap());
    assert!(h1.addresses("n1").await.unwrap().iter().any(|(a, _)| *a == r));
    // A reservation never claimed is released.
    let r2 = h1.allocate(&pool, AddrRequest::Any, trellis_ipam::RESERVED, none).await.unwrap();
    assert!(h1.release_reservation(&pool, r2).await.unwrap());
    assert!(!h1.addresses("n1").await.unwrap().iter().any(|(a, _)| *a == r2));
}

trait ClaimForTest {
    async fn claim_for_test(&self, pool: &Pool, ip: IpAddr) -> Result<IpAddr, IpamError>;
}

impl ClaimForTest for Ipam {
    async fn claim_for_test(&self, pool: &Pool, ip: IpAddr) -> Result<IpAddr, IpamError> {
        self.allocate(pool, AddrRequest::Claim(ip), "someone", none).await
    }
}

/// Service VIPs come from the top of the subnet, never collide with block
/// allocations, and survive the release of the host that created them.
#[tokio::test]
async fn top_addresses_are_cluster_wide_and_outlive_their_host() {
    let s = store();
    let a = Ipam::new(s.clone(), "/t/ipam/", "a").with_block_len_v4(28);
    let b = Ipam::new(s.clone(), "/t/ipam/", "b").with_block_len_v4(28);
    let pool = create(&a, &s, "n", SubnetRequest::Specific(net("10.81.0.0/27"))).await;
    let owner = format!("{}web", trellis_ipam::SERVICE_OWNER_PREFIX);
    let v1 = a.allocate(&pool, AddrRequest::Top, &owner, none).await.unwrap();
    let v2 = b.allocate(&pool, AddrRequest::Top, &format!("{owner}2"), none).await.unwrap();
    assert_eq!((v1, v2), (ip("10.81.0.30"), ip("10.81.0.29")), "from the top, below broadcast");
    // Every other address is still allocatable by the hosts, none twice.
    let mut got = BTreeSet::new();
    while let Ok(x) = b.allocate(&pool, AddrRequest::Any, "e", none).await {
        assert!(got.insert(x) && x != v1 && x != v2, "{x} handed out twice");
    }
    assert_eq!(got.len(), 32 - 2 - 1 - 2, "all but network, broadcast, gateway and the two VIPs");
    assert!(matches!(a.allocate(&pool, AddrRequest::Top, "x", none).await, Err(IpamError::Exhausted { .. })));
    // Host a dies: its VIP stays.
    let (c, o) = b.plan_host_release("n", "a").await.unwrap();
    assert!(s.txn(c, o).await.unwrap().succeeded);
    assert!(b.addresses("n").await.unwrap().iter().any(|(x, r)| *x == v1 && r.owner == owner));
}

/// Fencing, the interleaving a reclaim must survive: the reclaimer reads
/// the dead host's share; the host (back, its lease not yet renewed)
/// releases an address and another host takes it; the reclaim then
/// commits. It must not delete the new owner's address (which the next
/// allocation would hand out a second time): a plan that read an address
/// which changed since does not commit.
#[tokio::test]
async fn a_reclaim_planned_before_an_address_changed_hands_does_not_commit() {
    let s = store();
    let a = Ipam::new(s.clone(), "/t/ipam/", "a").with_block_len_v4(28);
    let b = Ipam::new(s.clone(), "/t/ipam/", "b").with_block_len_v4(28);
    let c = Ipam::new(s.clone(), "/t/ipam/", "c").with_block_len_v4(28);
    let pool = create(&a, &s, "n", SubnetRequest::Specific(net("10.81.0.0/28"))).await;
    let x = b.allocate(&pool, AddrRequest::Any, "bx", none).await.unwrap();
    // a plans the release of b's share (b looks dead).
    let (compares, ops) = a.plan_host_release("n", "b").await.unwrap();
    // b releases x; c takes it.
    b.release(&pool, x).await.unwrap();
    assert_eq!(c.allocate(&pool, AddrRequest::Specific(x), "cx", none).await.unwrap(), x);
    // The stale plan fails, and c's address stays c's.
    assert!(!s.txn(compares, ops).await.unwrap().succeeded, "a stale reclaim committed");
    let owner = a.addresses("n").await.unwrap().into_iter().find(|(ip, _)| *ip == x).map(|(_, r)| r.host);
    assert_eq!(owner.as_deref(), Some("c"));
    assert!(matches!(a.allocate(&pool, AddrRequest::Specific(x), "again", none).await, Err(IpamError::InUse { .. })));
    // Planned again, it releases b's block and nothing of c's.
    let (compares, ops) = a.plan_host_release("n", "b").await.unwrap();
    assert!(s.txn(compares, ops).await.unwrap().succeeded);
    assert!(a.addresses("n").await.unwrap().iter().any(|(ip, r)| *ip == x && r.host == "c"));
}
