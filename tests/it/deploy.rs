//! The deployment files agree with the daemon. Kubernetes manifests are
//! validated against the published schemas by `.ci/run`
//! (`kubernetes-validate --strict`); the EgressSelectorConfiguration has no
//! published schema, so it is checked here against what the example config
//! makes the daemon listen on.

use crate::common;

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

/// The YAML documents of `path`, as JSON (Debian's python3-yaml; `.ci/run`
/// installs it). `None` after [`common::skip`] when it is missing.
fn yaml(test: &str, path: &Path) -> Option<Vec<Value>> {
    let out = Command::new("python3")
        .args([
            "-c",
            "import json, sys, yaml\njson.dump(list(yaml.safe_load_all(open(sys.argv[1]))), sys.stdout)",
        ])
        .arg(path)
        .output()
        .expect("python3");
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        if err.contains("No module named 'yaml'") {
            common::skip(
                test,
                "python3's yaml module is missing (apt-get install python3-yaml)",
            );
            return None;
        }
        panic!("{}: not YAML: {err}", path.display());
    }
    Some(serde_json::from_slice(&out.stdout).unwrap())
}

/// The example config, with its commented-out `[proxy.tls]` block taken
/// in: that block is what the mTLS egress file points at.
fn example_config() -> toml::Table {
    let text = std::fs::read_to_string(repo("deploy/tunneler.example.toml")).unwrap();
    let mut tls = String::new();
    let mut in_tls = false;
    for line in text.lines() {
        if line.trim() == "# [proxy.tls]" {
            in_tls = true;
            continue;
        }
        if in_tls {
            // The block ends at the first line that is not a commented
            // `key = value` (prose comments inside it are skipped).
            match line.strip_prefix("# ") {
                Some(kv) if kv.contains(" = ") && !kv.starts_with(' ') => {
                    tls.push_str(kv);
                    tls.push('\n');
                }
                Some(_) => {}
                None => break,
            }
        }
    }
    let mut t: toml::Table = text.parse().expect("example config is TOML");
    let tls: toml::Table = tls.parse().expect("the [proxy.tls] block is TOML");
    assert!(
        tls.contains_key("listen"),
        "no [proxy.tls] listen in the example"
    );
    t["proxy"]
        .as_table_mut()
        .expect("[proxy]")
        .insert("tls".into(), toml::Value::Table(tls));
    t
}

fn selection(doc: &Value) -> &Value {
    assert_eq!(doc["apiVersion"], "apiserver.k8s.io/v1beta1", "{doc}");
    assert_eq!(doc["kind"], "EgressSelectorConfiguration", "{doc}");
    let sel = doc["egressSelections"]
        .as_array()
        .expect("egressSelections");
    assert_eq!(
        sel.len(),
        1,
        "only the cluster selection goes through us: {doc}"
    );
    assert_eq!(sel[0]["name"], "cluster", "{doc}");
    // kube-apiserver's HTTPConnect is what the proxy speaks; GRPC is
    // Konnectivity's protocol.
    assert_eq!(
        sel[0]["connection"]["proxyProtocol"], "HTTPConnect",
        "{doc}"
    );
    &sel[0]["connection"]["transport"]
}

#[test]
fn egress_selector_configurations_point_at_our_listeners() {
    let test = "egress_selector_configurations_point_at_our_listeners";
    let config = example_config();
    let listen: Vec<&str> = config["proxy"]["listen"]
        .as_array()
        .expect("proxy.listen")
        .iter()
        .filter_map(|v| v.as_str())
        .collect();

    // Unix socket: udsName is one of our unix listeners, in the directory
    // the static pod shares with kube-apiserver.
    let Some(docs) = yaml(
        test,
        &repo("deploy/kubernetes/egress-selector-configuration.yaml"),
    ) else {
        return;
    };
    let transport = selection(&docs[0]);
    let uds = transport["uds"]["udsName"].as_str().expect("udsName");
    assert!(
        listen.contains(&format!("unix://{uds}").as_str()),
        "udsName {uds} is not among proxy.listen {listen:?}"
    );
    let Some(pod) = yaml(test, &repo("deploy/kubernetes/tunneler-static-pod.yaml")) else {
        return;
    };
    let dir = Path::new(uds).parent().unwrap().to_str().unwrap();
    let mounts = pod[0]["spec"]["containers"][0]["volumeMounts"]
        .as_array()
        .expect("volumeMounts");
    assert!(
        mounts.iter().any(|m| m["mountPath"] == dir),
        "the static pod does not mount {dir}: {mounts:?}"
    );

    // mTLS: the url's port is [proxy.tls] listen's, over https, with a
    // client certificate (the listener refuses clients without one).
    let Some(docs) = yaml(
        test,
        &repo("deploy/kubernetes/egress-selector-configuration-mtls.yaml"),
    ) else {
        return;
    };
    let tcp = &selection(&docs[0])["tcp"];
    let url = tcp["url"].as_str().expect("tcp.url");
    let hostport = url
        .strip_prefix("https://")
        .expect("the TCP transport must be https");
    let port = hostport.rsplit_once(':').expect("url has a port").1;
    let tls_listen = config["proxy"]["tls"]["listen"].as_str().unwrap();
    assert_eq!(
        tls_listen.rsplit_once(':').unwrap().1,
        port,
        "url {url} vs [proxy.tls] listen {tls_listen}"
    );
    for key in ["caBundle", "clientCert", "clientKey"] {
        let p = tcp["tlsConfig"][key]
            .as_str()
            .unwrap_or_else(|| panic!("tlsConfig.{key}"));
        assert!(
            p.starts_with('/'),
            "tlsConfig.{key} {p} is not an absolute path"
        );
    }
    assert_ne!(
        tcp["tlsConfig"]["clientCert"],
        tcp["tlsConfig"]["clientKey"]
    );
    common::report(&format!(
        "egress selection: uds {uds} in proxy.listen and mounted; mTLS url {url} on [proxy.tls] listen {tls_listen}"
    ));
}
