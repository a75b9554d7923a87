//! Typed client (being written).
