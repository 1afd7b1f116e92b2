//! hack/local-cluster itself: independent clusters, and no processes left behind once the owner
//! of a cluster exits, however it exits.

mod support;

use std::process::Command;
use std::time::Duration;

use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::PostParams;
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Api, Client, Config};
use serde_json::json;
use support::{TestNamespace, repo_root, wait_for};

fn clusters_root() -> std::path::PathBuf {
    std::env::var_os("APITOKEN_CLUSTERS_DIR")
        .map_or_else(|| std::env::temp_dir().join("apitoken-clusters"), std::path::PathBuf::from)
}

fn pid_alive(pid: u32) -> bool {
    std::path::Path::new(&format!("/proc/{pid}")).exists()
        && !std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| s.contains(") Z "))
}

#[tokio::test]
async fn a_second_cluster_is_isolated_and_torn_down_when_its_owner_dies() {
    // The first cluster (the harness's) gets an object the second must not see.
    let ns = TestNamespace::new("iso").await;
    let cm: ConfigMap = serde_json::from_value(json!({"metadata": {"name": "only-in-first"}})).unwrap();
    ns.api::<ConfigMap>().create(&PostParams::default(), &cm).await.unwrap();

    // The owner is a process we SIGKILL: the cluster must go with it.
    let mut owner = Command::new("sleep").arg("600").spawn().unwrap();
    let name = format!("iso-{}", std::process::id());
    let up = Command::new(repo_root().join("hack/local-cluster"))
        .args(["up", &name, "--owner-pid", &owner.id().to_string()])
        .output()
        .unwrap();
    assert!(up.status.success(), "{}", String::from_utf8_lossy(&up.stderr));

    let dir = clusters_root().join(&name);
    let pids: Vec<u32> = ["etcd", "kube-apiserver", "kube-controller-manager"]
        .iter()
        .map(|p| std::fs::read_to_string(dir.join(format!("{p}.pid"))).unwrap().trim().parse().unwrap())
        .collect();
    assert!(pids.iter().all(|p| pid_alive(*p)), "all three processes run");

    let kc = Kubeconfig::read_from(dir.join("kubeconfig")).unwrap();
    let second =
        Client::try_from(Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default()).await.unwrap())
            .unwrap();
    let in_second: Api<ConfigMap> = Api::namespaced(second.clone(), &ns.name);
    assert!(matches!(in_second.get_opt("only-in-first").await, Ok(None)));
    // And the other way round.
    let marker: ConfigMap = serde_json::from_value(json!({"metadata": {"name": "only-in-second"}})).unwrap();
    Api::<ConfigMap>::namespaced(second, "default").create(&PostParams::default(), &marker).await.unwrap();
    let first_default: Api<ConfigMap> = Api::namespaced(ns.client.clone(), "default");
    assert!(matches!(first_default.get_opt("only-in-second").await, Ok(None)));

    owner.kill().unwrap();
    owner.wait().unwrap();
    wait_for("the second cluster's processes to exit", Duration::from_secs(30), || async {
        pids.iter().all(|p| !pid_alive(*p)).then_some(())
    })
    .await;
    wait_for("its data directory to be removed", Duration::from_secs(10), || async {
        (!dir.exists()).then_some(())
    })
    .await;
    ns.cleanup().await;
}
