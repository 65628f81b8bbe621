//! [`AllReduce`] over MPI (the `mpi` cargo feature, through the `mpi` crate, rsmpi).
//!
//! ```no_run
//! use segloss::distributed::{self, mpi::MpiAllReduce, AllReduce};
//! # fn main() -> segloss::Result<()> {
//! let world = MpiAllReduce::init()?; // MPI_Init; MPI_Finalize when `world` drops
//! let images = distributed::shard(7, world.size(), world.rank());
//! // … this rank's shard of the batch on its own device, then
//! // distributed::step(&ctx, &spec, &batch, Some(grad), &world)?;
//! # Ok(()) }
//! ```
//!
//! Run it with `mpirun -np N …`, across machines with `mpirun --hostfile hosts -np N …`.

use super::AllReduce;
use crate::error::{Error, Result};
use ::mpi::collective::{CommunicatorCollectives, SystemOperation};
use ::mpi::environment::Universe;
use ::mpi::topology::{Communicator, SimpleCommunicator};

/// The `mpi` crate this module is built against, for communicators of your own.
pub use ::mpi as rsmpi;

/// Sums over the ranks of an MPI communicator with `MPI_Allreduce(MPI_DOUBLE, MPI_SUM)`.
pub struct MpiAllReduce<C: Communicator = SimpleCommunicator> {
    comm: C,
    // Dropped after `comm` (fields drop in order): finalizes MPI when this value owns it.
    _universe: Option<Universe>,
}

impl<C: Communicator> std::fmt::Debug for MpiAllReduce<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MpiAllReduce")
            .field("rank", &self.comm.rank())
            .field("size", &self.comm.size())
            .finish()
    }
}

impl MpiAllReduce<SimpleCommunicator> {
    /// Initializes MPI and uses the world communicator; MPI is finalized when the returned
    /// value drops. An error when MPI is already initialized (then wrap your communicator
    /// with [`MpiAllReduce::new`]).
    pub fn init() -> Result<Self> {
        let universe = ::mpi::initialize().ok_or_else(|| {
            Error::Input(
                "MPI is already initialized: wrap your communicator with MpiAllReduce::new".into(),
            )
        })?;
        Ok(MpiAllReduce {
            comm: universe.world(),
            _universe: Some(universe),
        })
    }
}

impl<C: Communicator> MpiAllReduce<C> {
    /// Sums over the ranks of `comm` (a communicator of an MPI you initialized).
    pub fn new(comm: C) -> Self {
        MpiAllReduce {
            comm,
            _universe: None,
        }
    }

    /// The communicator.
    pub fn communicator(&self) -> &C {
        &self.comm
    }

    /// Ends every process of the communicator (`MPI_Abort`) after printing `message` on
    /// stderr: the way out of an error that only this rank sees outside segloss's own
    /// collectives, where the other ranks would otherwise wait in their next collective.
    pub fn abort(&self, code: i32, message: &str) -> ! {
        eprintln!(
            "segloss: rank {} of {} aborts the MPI job: {message}",
            self.comm.rank(),
            self.comm.size()
        );
        self.comm.abort(code)
    }
}

impl<C: Communicator> AllReduce for MpiAllReduce<C> {
    fn rank(&self) -> usize {
        self.comm.rank() as usize
    }

    fn size(&self) -> usize {
        self.comm.size() as usize
    }

    fn all_reduce_sum(&self, values: &mut [f64]) -> Result<()> {
        // MPI_IN_PLACE is not in rsmpi's safe API; the buffers are kilobytes.
        let send = values.to_vec();
        // rsmpi reports MPI errors through MPI's error handler (the default aborts the job
        // with a message), so there is no error to return here.
        self.comm
            .all_reduce_into(&send[..], values, SystemOperation::sum());
        Ok(())
    }
}
