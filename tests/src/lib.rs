//! End-to-end tests of ChitChat: real relays and nodes, in-process and as separate processes on
//! loopback. The tests live in `tests/tests/`; this library will hold their shared harness
//! (starting relays and nodes, test clients built from `chitchat-proto`).
