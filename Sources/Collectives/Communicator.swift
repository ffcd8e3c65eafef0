/// A scalar type that collectives can move and add: Float, Double and Int64.
///
/// `kind` lets a backend that works on raw bytes (MPI) pick its datatype without generics
/// leaking into the protocol of every backend.
public protocol ReducibleScalar: Numeric, Sendable {
    static var kind: ScalarKind { get }
}

/// The element types the collectives support.
public enum ScalarKind: Sendable {
    case float32, float64, int64
}

extension Float: ReducibleScalar { public static var kind: ScalarKind { .float32 } }
extension Double: ReducibleScalar { public static var kind: ScalarKind { .float64 } }
extension Int64: ReducibleScalar { public static var kind: ScalarKind { .int64 } }

/// A failure in a collective operation. Every case names what went wrong in words a user can act on.
public enum CommunicatorError: Error, CustomStringConvertible, Equatable {
    /// The transport reported an error (MPI's error string, and the call that failed).
    case transport(call: String, message: String)
    /// Another rank of an in-process group failed, so this collective can never complete.
    case peerFailed(String)
    /// Ranks disagreed about the shape of a collective (different element counts).
    case mismatchedCounts(operation: String, counts: [Int])
    /// An argument that every rank must agree on is out of range (a root rank, a colour).
    case invalidArgument(String)

    public var description: String {
        switch self {
        case let .transport(call, message): return "\(call) failed: \(message)"
        case let .peerFailed(why): return "another rank failed: \(why)"
        case let .mismatchedCounts(operation, counts):
            return "\(operation): ranks passed different element counts \(counts)"
        case let .invalidArgument(why): return why
        }
    }
}

/// A group of ranks that exchange data with collective operations.
///
/// Every rank of a group must call the same collectives in the same order with the same element
/// counts (except `allGather`, whose counts may differ), including ranks that have no data for
/// the current step. Reductions are deterministic: for a given group, every rank ends with the
/// bitwise same result.
///
/// Implementations: ``SingleProcessCommunicator`` (size 1), ``InProcessGroup`` (ranks as threads)
/// and `MPICommunicator` (processes started by `mpirun`, in the CollectivesMPI target).
public protocol Communicator: AnyObject {
    /// This process's index in the group, 0 ..< size.
    var rank: Int { get }
    /// The number of ranks in the group.
    var size: Int { get }

    /// Element-wise sum over all ranks, written back into `values` on every rank.
    func allReduceSum<T: ReducibleScalar>(_ values: inout [T]) throws
    /// Starts an element-wise sum and returns at once; `wait()` on the request gives the result.
    /// Requests must be waited for in the order they were started.
    func startAllReduceSum<T: ReducibleScalar>(_ values: [T]) throws -> AllReduceRequest<T>
    /// Copies `values` of rank `root` into `values` on every rank (counts must agree).
    func broadcast<T: ReducibleScalar>(_ values: inout [T], root: Int) throws
    /// Every rank's `values` (counts may differ between ranks), indexed by rank, on every rank.
    func allGather<T: ReducibleScalar>(_ values: [T]) throws -> [[T]]
    /// Returns once every rank has entered the barrier.
    func barrier() throws
    /// Splits the group into disjoint sub-groups: ranks passing the same `color` (≥ 0) form one
    /// group, ordered by `key` and then by rank. Collective over this group.
    func split(color: Int, key: Int) throws -> any Communicator
}

/// A pending all-reduce started with ``Communicator/startAllReduceSum(_:)``.
public final class AllReduceRequest<T: ReducibleScalar> {
    private var complete: (() throws -> [T])?
    private var result: [T]?

    /// `complete` blocks until the reduction is done and returns the summed values.
    public init(complete: @escaping () throws -> [T]) {
        self.complete = complete
    }

    /// A request that is already complete (backends that reduce eagerly).
    public init(completed values: [T]) {
        self.result = values
    }

    /// Blocks until the reduction has finished and returns the element-wise sum over all ranks.
    /// Calling it again returns the same values.
    public func wait() throws -> [T] {
        if let result { return result }
        guard let complete else { preconditionFailure("AllReduceRequest has neither result nor completion") }
        self.complete = nil
        let values = try complete()
        result = values
        return values
    }
}

extension Communicator {
    /// Sums one scalar over all ranks.
    public func allReduceSum<T: ReducibleScalar>(_ value: T) throws -> T {
        var buffer = [value]
        try allReduceSum(&buffer)
        return buffer[0]
    }
}

/// Splits `count` items into `parts` contiguous pieces whose sizes differ by at most one, the
/// larger pieces first; returns the half-open range of piece `index`.
///
/// This is the sharding rule of the whole project (data batches, held-out sets, benchmark inputs):
/// piece r of B items over W ranks has B/W items, plus one for the first B mod W ranks.
public func contiguousPiece(of count: Int, parts: Int, index: Int) -> Range<Int> {
    precondition(parts > 0 && (0..<parts).contains(index), "piece \(index) of \(parts) does not exist")
    let base = count / parts, extra = count % parts
    let start = index * base + min(index, extra)
    return start..<(start + base + (index < extra ? 1 : 0))
}
