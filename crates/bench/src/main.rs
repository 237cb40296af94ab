//! `sidekey-bench`: a loopback load tool for sidekey.
//!
//! In one run it starts a minimal hyper upstream (and fake token endpoint)
//! in this process, spawns the release `sidekey` binary on a temp dir (TLS
//! in, HTTP upstream, bearer injection, a store filled with `--credentials`
//! users), and drives the same keep-alive client at the upstream directly and
//! through sidekey:
//!
//! - closed loop: fixed concurrency levels (`--levels 1,16,64,256`), each
//!   connection with one request in flight, for `--duration` seconds;
//! - open loop (`--rate R[,R2...]`): requests scheduled at fixed intervals
//!   over `--connections` connections, latency measured from the scheduled
//!   start, so a slow server cannot hide queueing (coordinated omission);
//! - `--refresh-storm N`: N concurrent requests on one expired token;
//! - `--soak S`: `--soak-connections` (256) connections for S seconds,
//!   with sidekey's RSS and its audit backlog
//!   (`sidekey_audit_pending_records`) sampled once a second.
//!
//! `--backend postgres` runs sidekey on PostgreSQL (a throwaway cluster the
//! bench starts as the `postgres` user on a unix socket in its temp dir, or
//! `--postgres-url`), with the same cases and table. Before sidekey starts,
//! `--uncached-lookups` credential reads are timed through the library on
//! the chosen backend; `--storm-replicas N` spreads the refresh storm over N
//! sidekey processes on the one database.
//!
//! sidekey's CPU time comes from `/proc/<pid>/stat` (utime + stime) and its
//! peak RSS from `/proc/<pid>/status` (VmHWM): it runs as its own process so
//! neither includes the load generator. Prints a table; `--json` prints one
//! JSON object per case on stdout (and the table on stderr).
//!
//! Build and run: `cargo build --release --bins && target/release/sidekey-bench`
//! (or `cargo run --release --bin sidekey-bench -- --help`).
//!
//! Modules:
//! - `cli`: the flags;
//! - `run`: one run, start to end, in the order the cases are measured;
//! - `upstream`: the in-process upstream and fake token endpoint;
//! - `sidekey_proc`: sidekey as a child process, its config, the offline populate;
//! - `nginx`: nginx as the comparison gateway (config, start, stop);
//! - `client`: the load client, the admin API caller, the readiness poll;
//! - `load`: the built-in closed and open loops and their CPU snapshots;
//! - `wrk`: wrk as the load generator, and its output parser;
//! - `storm`: the refresh storm, on one sidekey or over replicas;
//! - `pg`: the throwaway PostgreSQL cluster and its transaction count;
//! - `probe`: uncached and cached lookups timed through the library;
//! - `procfs`: CPU and memory of the processes, from /proc;
//! - `report`: the table, the JSON lines and the side-by-side summary.

mod cli;
mod client;
mod load;
mod nginx;
mod pg;
mod probe;
mod procfs;
mod report;
mod run;
mod sidekey_proc;
mod storm;
mod upstream;
mod wrk;

use clap::Parser;

use crate::cli::Args;
use crate::run::run;

fn main() {
    let args = Args::parse();
    sidekey::install_crypto_provider();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    match rt.block_on(run(args)) {
        Ok(()) => {}
        Err(e) => {
            eprintln!("sidekey-bench: {e}");
            std::process::exit(1);
        }
    }
}
