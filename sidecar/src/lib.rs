//! The Trellis sidecar.
