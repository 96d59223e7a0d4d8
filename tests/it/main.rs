//! The one integration test binary: real PostgreSQL, real gRPC over real sockets.
mod ambiguous;
mod auth;
mod bad_input;
mod clients;
mod faults;
mod foundation;
mod h2raw;
mod harness;
mod lifecycle;
mod list;
mod ops;
mod overload;
mod proxy;
mod stats;
mod stream;
mod stream_faults;
mod sweeper;
