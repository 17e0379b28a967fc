//! The workspace's dependency rules, checked against the real dependency graph
//! (`cargo tree`), so that a change breaking them fails CI.

use std::process::Command;

fn tree(package: &str) -> String {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = Command::new(cargo)
        .args(["tree", "-e", "normal", "--prefix", "none", "-p", package])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("run cargo tree");
    assert!(out.status.success(), "cargo tree failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).expect("utf-8")
}

fn crates(tree: &str) -> Vec<&str> {
    tree.lines().filter_map(|l| l.split_whitespace().next()).collect()
}

#[test]
fn proto_does_no_io() {
    let t = tree("chitchat-proto");
    let names = crates(&t);
    assert!(names.contains(&"openmls"), "the tree was read: {names:?}");
    for forbidden in ["tokio", "libp2p", "iroh", "iroh-blobs", "redb", "openraft", "mio", "socket2"]
    {
        assert!(!names.contains(&forbidden), "chitchat-proto depends on {forbidden}");
    }
}

#[test]
fn node_and_relay_stay_apart() {
    assert!(!crates(&tree("chitchat-node")).contains(&"chitchat-relay"));
    assert!(!crates(&tree("chitchat-relay")).contains(&"chitchat-node"));
}

#[test]
fn net_is_only_the_host() {
    let t = tree("chitchat-net");
    let names = crates(&t);
    assert!(names.contains(&"libp2p"), "the tree was read: {names:?}");
    for forbidden in ["chitchat-node", "chitchat-relay", "redb", "openraft", "iroh"] {
        assert!(!names.contains(&forbidden), "chitchat-net depends on {forbidden}");
    }
}

#[test]
fn blobs_is_only_the_file_transport() {
    let t = tree("chitchat-blobs");
    let names = crates(&t);
    assert!(names.contains(&"iroh-blobs"), "the tree was read: {names:?}");
    for forbidden in ["chitchat-node", "chitchat-relay", "chitchat-net", "libp2p", "openraft"] {
        assert!(!names.contains(&forbidden), "chitchat-blobs depends on {forbidden}");
    }
}

/// Every swarm comes from `chitchat-net`, every iroh endpoint from `chitchat-blobs`: no other
/// source builds one.
#[test]
fn no_swarm_is_built_outside_net() {
    fn sources(dir: &std::path::Path, out: &mut Vec<std::path::PathBuf>) {
        for entry in std::fs::read_dir(dir).expect("read dir").flatten() {
            let path = entry.path();
            if path.is_dir() {
                sources(&path, out);
            } else if path.extension().is_some_and(|e| e == "rs") {
                out.push(path);
            }
        }
    }
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut files = Vec::new();
    for dir in
        ["node/src", "relay/src", "tests/src", "tests/tests", "tests/benches", "simulations/src"]
    {
        sources(&root.join(dir), &mut files);
    }
    assert!(files.len() > 20, "the sources were read: {files:?}");
    let needle = ["Swarm", "Builder"].concat();
    // And every iroh endpoint from `chitchat-blobs`, which builds it offline.
    let endpoint = ["Endpoint::", "builder"].concat();
    for file in files {
        let text = std::fs::read_to_string(&file).expect("read");
        assert!(!text.contains(&needle), "{} builds a swarm of its own", file.display());
        assert!(!text.contains(&endpoint), "{} builds an iroh endpoint", file.display());
    }
}
