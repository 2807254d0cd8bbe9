//! The thin tokio adapters: transports (Unix sockets, vsock), framed I/O with time and byte
//! budgets, and the server that binds each channel to its own listener. The only async code
//! of the crate.
//!
//! What this layer decides: how long a peer may take and how many bytes it may send before
//! the KRE hangs up. What it trusts: nothing it reads; every frame goes to the sans-IO core.

pub mod io;
pub mod server;
pub mod transport;
