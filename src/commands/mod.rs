//! The operations, one function each, shared by every front end: the CLI (`src/main.rs`) and
//! the agent ([`crate::agent`]) parse their input into these options, call the function, and
//! only print or record what it returns. Each function owns what the operation needs around
//! the library: opening the repository with its secret and cache ([`open`]), the backup session
//! that keeps `gc` away ([`backup`]), healing the chunk cache after a verification
//! ([`verify`]). Neither front end opens stores or sessions by itself.

pub mod backup;
pub mod copy;
pub mod drill;
pub mod open;
pub mod verify;
pub mod workload;
