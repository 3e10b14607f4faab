//! The Trellis operator.
