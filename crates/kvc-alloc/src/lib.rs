//! Paging for KV caches (filled by the foundation work).
#![warn(missing_docs)]
