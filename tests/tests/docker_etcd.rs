//! The `baker/etcd` image: a member built FROM scratch from Debian's etcd, which turns healthy
//! by its own HEALTHCHECK and serves the directory's etcd layer.

use std::time::Duration;

use baker_client::model::{Instance, Route};
use baker_directory::etcd::{lease_seconds, Etcd, RouteRecord, StoreUrl};
use baker_tests::docker::{docker, require_images, Container};
use baker_tests::eventually;

#[tokio::test]
async fn the_etcd_image_runs_a_member_the_directory_layer_can_use() {
    if !require_images() {
        return;
    }
    let member = Container::run("baker-etcd", &["baker/etcd"]);
    eventually(
        Duration::from_secs(30),
        "the member to turn healthy",
        || async { (member.health() == "healthy").then_some(()) },
    )
    .await;
    let url: StoreUrl = format!("etcd://{}:2379/image-test", member.ip("bridge"))
        .parse()
        .expect("a store URL");
    let etcd = Etcd::connect(&url).await.expect("connecting to the member");
    let route: Route = [("1".parse().unwrap(), 100)].into();
    let record = RouteRecord {
        route: Some(route),
        origin: Some("test".into()),
        at: 1,
        by: None,
    };
    etcd.set_route(&"emitter".parse().unwrap(), &record, None)
        .await
        .expect("a route written");
    let i = Instance::sample("emitter", "a");
    let lease = etcd.grant(lease_seconds(i.ttl_ms)).await.expect("a lease");
    etcd.put_instance(&i, lease)
        .await
        .expect("an instance written");
    let snap = etcd.snapshot().await.expect("a snapshot");
    assert_eq!(snap.routes.get("emitter"), Some(&record));
    assert_eq!(snap.instances.len(), 1);
    // FROM scratch: etcd and the probe, and no shell.
    let shell = docker(&["exec", &member.name, "/bin/sh", "-c", "true"]);
    assert!(!shell.status.success(), "the image must hold no shell");
}
