//! The distributed step under MPI (`--features mpi`): each test launches this test binary
//! under `mpirun -np N` to run `mpi_worker` on every rank, one process and one device per
//! rank, and checks what every rank reported. The checks themselves are tests/dist_common
//! (also run as threads by tests/distributed.rs): every rank's loss and gradient slice
//! equal one device holding the whole batch (2 ranks: 5 images as 3 + 2, the second shard
//! all ignored pixels; 3 ranks: 7 images as 3 + 1 + 3, the last all ignored), and bad input
//! on one rank is an error on every rank within seconds, after which the ranks go on.
//!
//! Without `mpirun` these tests fail, saying to run scripts/install-mpi.sh.

mod common;
mod dist_common;

use segloss::distributed::mpi::MpiAllReduce;
use segloss::distributed::AllReduce;
use std::io::Read;
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Set on the workers: the scenario to run ("equal" or "fail").
const WORKER_ENV: &str = "SEGLOSS_MPI_WORKER";
/// Marks the workers' report lines.
const TAG: &str = "SEGLOSS-MPI";
/// A launch that takes longer has hung: it is killed and the test fails.
const LAUNCH_TIMEOUT: Duration = Duration::from_secs(240);

/// One launch at a time: the ranks of two launches would share the two cores.
static LAUNCH: Mutex<()> = Mutex::new(());

/// The worker: runs on every rank under mpirun; the tests below launch it.
#[test]
#[ignore = "an MPI rank: run by the mpi_* tests under mpirun"]
fn mpi_worker() {
    let Ok(scenario) = std::env::var(WORKER_ENV) else {
        println!("mpi_worker runs under mpirun, launched by the mpi_* tests: nothing to do");
        return;
    };
    let world = MpiAllReduce::init().expect("MPI_Init");
    let rank = world.rank();
    let ctx = common::new_ctx();
    let result =
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| match scenario.as_str() {
            "equal" => dist_common::check_rank(&ctx, &world),
            "fail" => dist_common::check_failure(&ctx, &world),
            other => panic!("unknown scenario {other}"),
        }));
    match result {
        Ok(lines) => {
            for l in lines {
                println!("{TAG} rank {rank}: {l}");
            }
            println!("{TAG} rank {rank}: PASS");
        }
        Err(e) => {
            let msg = e
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            println!("{TAG} rank {rank}: FAIL {msg}");
            // The other ranks may wait in a collective this rank will never enter.
            world.abort(1, "a check failed on this rank");
        }
    }
}

/// Runs `mpi_worker` on `ranks` ranks; returns (success, output, seconds).
fn launch(ranks: usize, scenario: &str) -> (bool, String, f64) {
    let _one = LAUNCH.lock().unwrap_or_else(|e| e.into_inner());
    let version = Command::new("mpirun").arg("--version").output();
    let version = match version {
        Ok(o) => String::from_utf8_lossy(&o.stdout).to_string() + &String::from_utf8_lossy(&o.stderr),
        Err(e) => panic!(
            "the MPI tests need mpirun ({e}): run `bash scripts/install-mpi.sh` (Open MPI, Debian/Ubuntu), or build without --features mpi"
        ),
    };
    let exe = std::env::current_exe().expect("the test binary's path");
    let mut cmd = Command::new("mpirun");
    if version.contains("Open MPI") || version.contains("OpenRTE") {
        // More ranks than cores (CI has 2), no pinning of every rank to one core, root in
        // containers, and no cross-memory attach (often not permitted in containers).
        cmd.args(["--oversubscribe", "--bind-to", "none"])
            .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
            .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
            .env("OMPI_MCA_btl_vader_single_copy_mechanism", "none");
    }
    cmd.args(["-np", &ranks.to_string()])
        .arg(exe)
        .args([
            "--ignored",
            "--exact",
            "mpi_worker",
            "--nocapture",
            "--test-threads",
            "1",
        ])
        .env(WORKER_ENV, scenario)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    #[cfg(unix)]
    std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
    let start = Instant::now();
    let mut child = cmd.spawn().expect("starting mpirun");
    let drain = |mut r: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut s = String::new();
            let _ = r.read_to_string(&mut s);
            s
        })
    };
    let out = drain(Box::new(child.stdout.take().unwrap()));
    let err = drain(Box::new(child.stderr.take().unwrap()));
    let status = loop {
        if let Some(st) = child.try_wait().expect("waiting for mpirun") {
            break Some(st);
        }
        if start.elapsed() > LAUNCH_TIMEOUT {
            // mpirun and its ranks are one process group: end them all.
            let _ = Command::new("kill")
                .args(["-TERM", "--", &format!("-{}", child.id())])
                .status();
            std::thread::sleep(Duration::from_secs(3));
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let secs = start.elapsed().as_secs_f64();
    let text = format!(
        "{}\n--- stderr ---\n{}",
        out.join().unwrap_or_default(),
        err.join().unwrap_or_default()
    );
    match status {
        None => {
            panic!("mpirun -np {ranks} ({scenario}) hung: killed after {LAUNCH_TIMEOUT:?}\n{text}")
        }
        Some(st) => (st.success(), text, secs),
    }
}

/// Launches, then checks that every rank passed and reported `per_rank` lines containing
/// each of `expect`.
fn run(ranks: usize, scenario: &str, expect: &[&str]) {
    let (ok, text, secs) = launch(ranks, scenario);
    let report: Vec<&str> = text.lines().filter(|l| l.contains(TAG)).collect();
    println!(
        "mpirun -np {ranks} ({scenario}): {secs:.1} s\n{}",
        report.join("\n")
    );
    assert!(ok, "mpirun -np {ranks} ({scenario}) failed:\n{text}");
    for r in 0..ranks {
        let own = format!("{TAG} rank {r}: ");
        assert!(
            report.iter().any(|l| l.contains(&format!("{own}PASS"))),
            "rank {r} did not pass:\n{text}"
        );
        for e in expect {
            assert!(
                report.iter().any(|l| l.contains(&own) && l.contains(e)),
                "rank {r} did not report {e:?}:\n{text}"
            );
        }
    }
}

#[test]
fn mpi_two_ranks_equal_one_device() {
    run(2, "equal", &["dice+ce+l1: rank", "gdice+focal+kl: rank"]);
}

#[test]
fn mpi_three_ranks_equal_one_device() {
    run(3, "equal", &["dice+ce+l1: rank", "gdice+focal+kl: rank"]);
}

#[test]
fn mpi_failing_rank_fails_every_rank_two_ranks() {
    run(
        2,
        "fail",
        &["nan-logit: rank", "bad-label: rank", "recovered: rank"],
    );
}

#[test]
fn mpi_failing_rank_fails_every_rank_three_ranks() {
    run(
        3,
        "fail",
        &["nan-logit: rank", "bad-label: rank", "recovered: rank"],
    );
}
