import CMPI
import Collectives
import Foundation

/// A communicator over Open MPI: MPI_COMM_WORLD or a group split from it.
///
/// Errors are returned, not fatal (`MPI_ERRORS_RETURN` on the world communicator), and every
/// return code goes through ``check(_:_:)``, which turns it into a ``CommunicatorError`` carrying
/// MPI's own error string. A rank that dies is handled by the launcher: `mpirun` notices the exit
/// and terminates the job, so the surviving ranks do not hang in a collective.
public final class MPICommunicator: Communicator {
    public let rank: Int
    public let size: Int
    let comm: MPI_Comm

    private init(comm: MPI_Comm) throws {
        self.comm = comm
        var r: Int32 = 0, s: Int32 = 0
        try check(MPI_Comm_rank(comm, &r), "MPI_Comm_rank")
        try check(MPI_Comm_size(comm, &s), "MPI_Comm_size")
        rank = Int(r)
        size = Int(s)
    }

    /// True when this process was started by an MPI launcher (mpirun/mpiexec, PMIx, PMI).
    public static var launchedByMPI: Bool {
        let env = ProcessInfo.processInfo.environment
        return ["OMPI_COMM_WORLD_SIZE", "PMIX_RANK", "PMI_SIZE", "PMI_RANK"].contains { env[$0] != nil }
    }

    /// The rank the launcher assigned to this process, read from the environment before MPI is
    /// initialised (0 when not launched by MPI). Lets start-up errors be printed by one rank only.
    public static var launcherRank: Int {
        let env = ProcessInfo.processInfo.environment
        for name in ["OMPI_COMM_WORLD_RANK", "PMIX_RANK", "PMI_RANK"] {
            if let value = env[name], let rank = Int(value) { return rank }
        }
        return 0
    }

    private static var initialised = false

    /// Initialises MPI (once per process) and returns MPI_COMM_WORLD.
    public static func world() throws -> MPICommunicator {
        if !initialised {
            var provided: Int32 = 0
            try check(MPI_Init_thread(nil, nil, syncbn_mpi_thread_funneled(), &provided), "MPI_Init_thread")
            initialised = true
            try check(MPI_Comm_set_errhandler(syncbn_mpi_comm_world(), syncbn_mpi_errors_return()), "MPI_Comm_set_errhandler")
        }
        return try MPICommunicator(comm: syncbn_mpi_comm_world())
    }

    /// Finalises MPI. Call once, after the last collective, on every rank.
    public static func finalize() {
        if initialised {
            MPI_Finalize()
            initialised = false
        }
    }

    /// Terminates every rank of the job with `code` (used when one rank fails alone, so the
    /// others would otherwise wait for it forever).
    public static func abort(code: Int32) -> Never {
        MPI_Abort(syncbn_mpi_comm_world(), code)
        exit(code)
    }

    /// Reductions started and not yet complete, oldest first: every collective call advances
    /// them as far as their messages allow, so a gradient all-reduce progresses during backward.
    private var inFlight: [TreeReduction] = []
    /// Numbers the reductions of this communicator (the same on every rank, as they are issued in
    /// the same order): their messages carry it in the tag, so steps of reductions that are in
    /// flight at the same time never match each other's messages.
    private var reductionSequence = 0

    /// Advances every reduction in flight without blocking and forgets the finished ones.
    private func progressInFlight() throws {
        for reduction in inFlight { _ = try reduction.advance(blocking: false) }
        inFlight.removeAll { $0.finished }
    }

    private func startReduction<T: ReducibleScalar>(_ values: [T]) throws -> TreeReduction {
        try progressInFlight()
        reductionSequence += 1
        let reduction = TreeReduction(values, schedule: RankTreeSchedule(rank: rank, size: size), kind: T.kind,
                                      datatype: datatype(T.self), tagBase: Int32((reductionSequence % 65536) * 32), comm: comm)
        _ = try reduction.advance(blocking: false)
        if !reduction.finished { inFlight.append(reduction) }
        return reduction
    }

    /// The sum along the rank tree (``rankTreeSum(_:)``) by recursive doubling with point-to-point
    /// messages: MPI_Allreduce's order of additions belongs to the implementation and may change
    /// with the message size or the number of ranks, so it cannot serve the exactness contract.
    public func allReduceSum<T: ReducibleScalar>(_ values: inout [T]) throws {
        guard size > 1, !values.isEmpty else { return }
        let reduction = try startReduction(values)
        _ = try reduction.advance(blocking: true)
        values = reduction.result(as: T.self)
    }

    public func startAllReduceSum<T: ReducibleScalar>(_ values: [T]) throws -> AllReduceRequest<T> {
        guard size > 1, !values.isEmpty else { return AllReduceRequest(completed: values) }
        let reduction = try startReduction(values)
        return AllReduceRequest { [self] in
            try progressInFlight()
            _ = try reduction.advance(blocking: true)
            return reduction.result(as: T.self)
        }
    }

    public func broadcast<T: ReducibleScalar>(_ values: inout [T], root: Int) throws {
        guard (0..<size).contains(root) else {
            throw CommunicatorError.invalidArgument("broadcast root \(root) is not a rank of a group of \(size)")
        }
        let count = Int32(values.count)
        try values.withUnsafeMutableBytes { buffer in
            try check(MPI_Bcast(buffer.baseAddress, count, datatype(T.self), Int32(root), comm), "MPI_Bcast")
        }
    }

    public func allGather<T: ReducibleScalar>(_ values: [T]) throws -> [[T]] {
        var counts = [Int32](repeating: 0, count: size)
        var mine = Int32(values.count)
        try check(MPI_Allgather(&mine, 1, syncbn_mpi_int(), &counts, 1, syncbn_mpi_int(), comm), "MPI_Allgather")
        var displacements = [Int32](repeating: 0, count: size)
        for r in 1..<size { displacements[r] = displacements[r - 1] + counts[r - 1] }
        let total = Int(counts.reduce(0, +))
        var gathered = [T](repeating: 0, count: total)
        try values.withUnsafeBytes { send in
            try gathered.withUnsafeMutableBytes { receive in
                try check(MPI_Allgatherv(send.baseAddress, mine, datatype(T.self), receive.baseAddress, &counts, &displacements, datatype(T.self), comm), "MPI_Allgatherv")
            }
        }
        return (0..<size).map { r in
            let start = Int(displacements[r])
            return Array(gathered[start..<(start + Int(counts[r]))])
        }
    }

    public func barrier() throws {
        try check(MPI_Barrier(comm), "MPI_Barrier")
    }

    public func split(color: Int, key: Int) throws -> any Communicator {
        guard color >= 0 else { throw CommunicatorError.invalidArgument("split colour must be ≥ 0, got \(color)") }
        var newComm = syncbn_mpi_comm_null()
        try check(MPI_Comm_split(comm, Int32(color), Int32(key), &newComm), "MPI_Comm_split")
        guard let newComm else { throw CommunicatorError.transport(call: "MPI_Comm_split", message: "returned no communicator") }
        return try MPICommunicator(comm: newComm)
    }
}

private func datatype<T: ReducibleScalar>(_: T.Type) -> MPI_Datatype {
    switch T.kind {
    case .float32: return syncbn_mpi_float()
    case .float64: return syncbn_mpi_double()
    case .int64: return syncbn_mpi_int64()
    }
}

/// Turns an MPI return code into a thrown error naming the call and MPI's explanation.
func check(_ code: Int32, _ call: String) throws {
    guard code != syncbn_mpi_success() else { return }
    var length: Int32 = 0
    var text = [CChar](repeating: 0, count: Int(syncbn_mpi_max_error_string()) + 1)
    MPI_Error_string(code, &text, &length)
    throw CommunicatorError.transport(call: call, message: String(cString: text))
}

/// One all-reduce along the rank tree in progress: at each step of the schedule, post the receive
/// of the other subtree and the sends of this rank's, and once all have completed add what came.
private final class TreeReduction {
    private let values: UnsafeMutableRawBufferPointer
    /// The other subtree's values; let go as soon as the last step has been added (a finished
    /// reduction may wait long for its `wait()`: the gradient buckets finished during backward).
    private var incoming: UnsafeMutableRawBufferPointer?
    private let count: Int
    private let kind: ScalarKind
    private let datatype: MPI_Datatype
    private let steps: [RankTreeSchedule.Step]
    private let tagBase: Int32
    private let comm: MPI_Comm
    private var next = 0
    private var requests: [MPI_Request?] = []
    private var posted = false
    private(set) var finished = false

    init<T: ReducibleScalar>(_ source: [T], schedule: RankTreeSchedule, kind: ScalarKind, datatype: MPI_Datatype, tagBase: Int32, comm: MPI_Comm) {
        count = source.count
        let bytes = count * MemoryLayout<T>.stride
        let own = UnsafeMutableRawBufferPointer.allocate(byteCount: bytes, alignment: 16)
        source.withUnsafeBytes { own.copyMemory(from: $0) }
        values = own
        incoming = .allocate(byteCount: bytes, alignment: 16)
        self.kind = kind
        self.datatype = datatype
        steps = schedule.steps
        self.tagBase = tagBase
        self.comm = comm
        finished = steps.isEmpty
    }

    deinit {
        values.deallocate()
        incoming?.deallocate()
    }

    func result<T: ReducibleScalar>(as: T.Type) -> [T] {
        precondition(finished, "the reduction has not finished")
        return Array(values.bindMemory(to: T.self))
    }

    /// Posts and completes steps until one is still waiting (non-blocking) or all are done.
    func advance(blocking: Bool) throws -> Bool {
        while !finished {
            let step = steps[next], tag = tagBase + Int32(next)
            if !posted {
                requests = []
                if let source = step.receiveFrom {
                    var request = syncbn_mpi_request_null()
                    try check(MPI_Irecv(incoming!.baseAddress, Int32(count), datatype, Int32(source), tag, comm, &request), "MPI_Irecv")
                    requests.append(request)
                }
                for target in step.sendTo {
                    var request = syncbn_mpi_request_null()
                    try check(MPI_Isend(values.baseAddress, Int32(count), datatype, Int32(target), tag, comm, &request), "MPI_Isend")
                    requests.append(request)
                }
                posted = true
            }
            if blocking {
                try check(MPI_Waitall(Int32(requests.count), &requests, syncbn_mpi_statuses_ignore()), "MPI_Waitall")
            } else {
                var done: Int32 = 0
                try check(MPI_Testall(Int32(requests.count), &requests, &done, syncbn_mpi_statuses_ignore()), "MPI_Testall")
                if done == 0 { return false }
            }
            if step.receiveFrom != nil { addIncoming() }
            posted = false
            next += 1
            finished = next == steps.count
        }
        incoming?.deallocate()
        incoming = nil
        return true
    }

    private func addIncoming() {
        func add<U: Numeric>(_: U.Type) {
            let own = values.bindMemory(to: U.self), other = incoming!.bindMemory(to: U.self)
            for i in 0..<count { own[i] += other[i] }
        }
        switch kind {
        case .float32: add(Float.self)
        case .float64: add(Double.self)
        case .int64: add(Int64.self)
        }
    }
}
