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
/// the current step. Reductions follow one fixed tree over the ranks, ``rankTreeSum(_:)``, in
/// every implementation: every rank ends with the bitwise same result, and it is the result that
/// one process adding the ranks' contributions along that tree would get (the exactness contract:
/// a rank's contribution is the subtree of its block of samples, so the whole reduction is one
/// tree over the samples).
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

/// The element-wise sum of one equal-length array per rank along the rank tree: ranks are the
/// leaves of a balanced binary tree over the next power of two, and at distance d = 1, 2, 4, …
/// node r (r a multiple of 2d) becomes node r + node r + d where rank r + d exists (a missing
/// subtree is left out, not added as zero). Recursive doubling computes exactly this on every
/// rank, since IEEE addition is commutative: the partners at distance d hold the two subtrees and
/// both form their sum. The reference for every ``Communicator``'s reductions.
public func rankTreeSum<T: Numeric>(_ parts: [[T]]) -> [T] {
    precondition(!parts.isEmpty, "a tree sum needs at least one rank")
    var nodes = parts
    var distance = 1
    while distance < nodes.count {
        var r = 0
        while r + distance < nodes.count {
            let right = nodes[r + distance]
            precondition(right.count == nodes[r].count, "rank tree sum: ranks passed different counts")
            nodes[r].withUnsafeMutableBufferPointer { left in
                right.withUnsafeBufferPointer { for i in 0..<left.count { left[i] += $0[i] } }
            }
            r += 2 * distance
        }
        distance *= 2
    }
    return nodes[0]
}

/// The schedule of the rank tree seen from one rank, for a transport that exchanges messages
/// (MPI): at each distance d = 1, 2, 4, … < size, whom this rank receives the other subtree from
/// (nil: that subtree is empty) and to whom it sends its own. Partners r and r ^ d swap subtrees;
/// where r ^ d is past the last rank but its subtree is not empty, a rank of that subtree that
/// exists sends it to r as well (and r sends nothing back). After the step at distance d every
/// rank holds its 2d-block's sum.
public struct RankTreeSchedule: Equatable, Sendable {
    public struct Step: Equatable, Sendable {
        public var distance: Int
        public var receiveFrom: Int?
        public var sendTo: [Int]
    }
    public let steps: [Step]

    public init(rank: Int, size: Int) {
        precondition(size >= 1 && (0..<size).contains(rank), "rank \(rank) of \(size)")
        var steps: [Step] = []
        var d = 1
        while d < size {
            let partner = rank ^ d
            var step = Step(distance: d, receiveFrom: nil, sendTo: [])
            if partner < size {
                step.receiveFrom = partner
                step.sendTo.append(partner)
            } else {
                // The other subtree starts at s = partner rounded down to a multiple of d.
                let s = partner & ~(d - 1)
                if s < size { step.receiveFrom = s + (partner - s) % (size - s) }
            }
            // Ranks of the lower half of this 2d-block whose partners are missing: this rank (in
            // the upper half, present) stands in for partner-less ranks congruent to it.
            if rank & d != 0 {
                let s = rank & ~(d - 1), present = size - s
                if present < d {
                    let offset = rank - s
                    var i = present
                    while i < d {
                        if i % present == offset { step.sendTo.append((s - d) + i) }
                        i += 1
                    }
                }
            }
            steps.append(step)
            d *= 2
        }
        self.steps = steps
    }
}
