//! Helpers shared by the integration tests (`mod support;`).

#![allow(dead_code)]

pub mod postgres;
pub mod server;
