//! Python bindings.
#![deny(missing_docs)]
