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
