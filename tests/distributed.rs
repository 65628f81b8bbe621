//! The distributed two-phase step without MPI: ranks as threads of one process
//! (`LocalGroup`), each on a device of its own. tests/mpi.rs runs the same checks
//! (tests/dist_common) as processes under mpirun.

mod common;
mod dist_common;

use segloss::distributed::{AllReduce, LocalGroup, SingleProcess};

/// Runs `f` on every member of a group of `size`, one thread and one device each.
fn on_threads(size: usize, f: fn(&segloss::GpuContext, &dyn AllReduce) -> Vec<String>) {
    let lines: Vec<Vec<String>> = std::thread::scope(|s| {
        let handles: Vec<_> = LocalGroup::new(size)
            .into_iter()
            .map(|m| {
                s.spawn(move || {
                    let ctx = common::new_ctx();
                    f(&ctx, &m)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for l in lines.iter().flatten() {
        println!("{l}");
    }
}

#[test]
fn one_rank_equals_one_device() {
    let lines = dist_common::check_rank(common::gpu(), &SingleProcess);
    println!("{}", lines.join("\n"));
}

#[test]
fn two_ranks_uneven_one_all_ignored() {
    on_threads(2, dist_common::check_rank);
}

#[test]
fn three_ranks_uneven_one_single_image_one_all_ignored() {
    on_threads(3, dist_common::check_rank);
}

#[test]
fn a_failing_rank_fails_every_rank_then_the_group_recovers() {
    on_threads(3, dist_common::check_failure);
}
