import CAllocator
import Collectives
import Foundation
import Kernels

/// Joining a job: the communicator this process trains with, chosen the way `syncbn-train` does,
/// with the settings that make ranks fast, and errors returned (never an exit).
///
///     let world = try World.current()          // MPI under mpirun, else one process
///     defer { World.finish() }
///
/// or, to run N ranks as threads of this process (tests, a laptop):
///
///     let results = try World.run(threads: 4) { world in … }
public enum World {
    /// Whether this process was started by an MPI launcher (mpirun, srun with PMIx).
    public static var launchedByMPI: Bool { MPICommunicator.launchedByMPI }

    /// The measured speed settings, applied once (``current()`` and ``run(threads:_:)`` call it):
    /// one OpenBLAS thread per rank unless `OPENBLAS_NUM_THREADS` says otherwise (the GEMMs are
    /// small per-sample convolutions: one thread was faster, 4841 against 4068 samples/s on one
    /// process, and ranks sharing a machine must not oversubscribe it); and freed blocks kept in the
    /// heap instead of returned to the kernel, so that every step does not page-fault its tensors
    /// in again (12 % of a BN layer's time).
    public static func applySpeedSettings() {
        if ProcessInfo.processInfo.environment["OPENBLAS_NUM_THREADS"] == nil { setGEMMThreads(1) }
        _ = syncbn_keep_freed_memory()
    }

    /// This process's group: the MPI world when started by an MPI launcher (initialising MPI),
    /// else a group of one.
    public static func current() throws -> any Communicator {
        applySpeedSettings()
        if launchedByMPI { return try MPICommunicator.world() }
        return SingleProcessCommunicator()
    }

    /// Runs `body` on every rank of this process: the MPI rank (or the single process) — its
    /// result alone — or, with `threads` > 1 and no MPI launcher, that many in-process ranks (every
    /// rank's result, by rank). An error of any rank is thrown.
    public static func run<R>(threads: Int? = nil, _ body: @escaping (any Communicator) throws -> R) throws -> [R] {
        if let threads, threads > 1 {
            guard !launchedByMPI else { throw WorldError("in-process ranks cannot be combined with an MPI launcher; use one or the other") }
            applySpeedSettings()
            return try InProcessGroup.run(size: threads) { try body($0) }
        }
        return [try body(try current())]
    }

    /// Ends the MPI part of the job (nothing without MPI). Call once, after the last collective.
    public static func finish() {
        if launchedByMPI { MPICommunicator.finalize() }
    }
}

/// Why a process could not join its job.
public struct WorldError: Error, CustomStringConvertible {
    public let description: String
    public init(_ description: String) { self.description = description }
}
