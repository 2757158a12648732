//! The integration tests, one binary (the helpers in `common` compile once): each module
//! drives the real `tresor` binary, or the library, against real servers started on
//! 127.0.0.1 (docker-registry, Garage, s3s-fs), one area each.

mod agent;
mod common;
mod copy;
mod drill;
mod encryption;
mod faults;
mod fixtures;
mod fuzz_corpus;
mod gc;
mod hostile;
mod mount;
mod oci;
mod packaging;
mod podman;
mod postgres;
mod s3;
mod small_files;
mod trust;
mod verify;
mod volume;
mod workload;
