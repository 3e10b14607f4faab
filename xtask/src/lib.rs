//! What xtask shares with the benchmark runner (`bench/`): where things live
//! and how commands are run. Kept free of heavy dependencies, so that the
//! first `cargo xtask` builds in seconds.

pub mod binaries;
pub mod paths;
pub mod run;
