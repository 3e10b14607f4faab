//! Test support: a cluster, a client and a fresh namespace for each integration test.
