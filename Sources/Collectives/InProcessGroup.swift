import Foundation

/// N ranks as threads of one process, sharing memory.
///
/// Lets `swift test` check N-rank behaviour without `mpirun`, and lets a user try
/// `syncbn-train --simulate-ranks 4` on a laptop. Collectives rendezvous on a condition
/// variable; every rank then reduces the contributions itself along the rank tree
/// (``rankTreeSum(_:)``), so all ranks get the bitwise same result, the one MPI's gives too. The non-blocking all-reduce completes eagerly (allowed: MPI too may
/// complete a request at any time before `wait`).
///
/// If one rank's body throws, every collective that another rank is blocked in (or enters later)
/// throws ``CommunicatorError/peerFailed(_:)`` instead of hanging.
public final class InProcessGroup: Communicator {
    public let rank: Int
    public var size: Int { state.size }
    private let state: RendezvousState

    fileprivate init(rank: Int, state: RendezvousState) {
        self.rank = rank
        self.state = state
    }

    /// Runs `body` once per rank, each on its own thread, and returns the results in rank order.
    /// If any rank throws, the first error of the lowest failing rank that is not a consequence of
    /// another rank's failure is rethrown after all threads have finished.
    public static func run<R>(size: Int, _ body: @escaping (InProcessGroup) throws -> R) throws -> [R] {
        precondition(size >= 1, "an in-process group needs at least one rank")
        let family = GroupFamily()
        let state = RendezvousState(size: size, family: family)
        let results = ResultSlots<R>(count: size)
        let done = DispatchGroup()
        for rank in 0..<size {
            done.enter()
            let thread = Thread {
                defer { done.leave() }
                let comm = InProcessGroup(rank: rank, state: state)
                do {
                    results.set(rank, .success(try body(comm)))
                } catch {
                    family.fail("rank \(rank): \(error)")
                    results.set(rank, .failure(error))
                }
            }
            thread.stackSize = 16 << 20
            thread.start()
        }
        done.wait()
        let outcomes = results.values()
        let errors = outcomes.compactMap { outcome -> Error? in
            if case let .failure(error) = outcome { return error }
            return nil
        }
        if let root = errors.first(where: { !(($0 as? CommunicatorError).map { if case .peerFailed = $0 { return true } else { return false } } ?? false) }) ?? errors.first {
            throw root
        }
        return outcomes.map { outcome in
            if case let .success(value) = outcome { return value }
            preconditionFailure("unreachable: errors were rethrown above")
        }
    }

    public func allReduceSum<T: ReducibleScalar>(_ values: inout [T]) throws {
        let all = try state.exchange(rank: rank, payload: values).contributions.map { $0 as! [T] }
        try requireEqualCounts(all.map(\.count), operation: "allReduceSum")
        values = sumInRankOrder(all)
    }

    public func startAllReduceSum<T: ReducibleScalar>(_ values: [T]) throws -> AllReduceRequest<T> {
        var reduced = values
        try allReduceSum(&reduced)
        return AllReduceRequest(completed: reduced)
    }

    public func broadcast<T: ReducibleScalar>(_ values: inout [T], root: Int) throws {
        guard (0..<size).contains(root) else {
            throw CommunicatorError.invalidArgument("broadcast root \(root) is not a rank of a group of \(size)")
        }
        let all = try state.exchange(rank: rank, payload: values).contributions.map { $0 as! [T] }
        try requireEqualCounts(all.map(\.count), operation: "broadcast")
        values = all[root]
    }

    public func allGather<T: ReducibleScalar>(_ values: [T]) throws -> [[T]] {
        try state.exchange(rank: rank, payload: values).contributions.map { $0 as! [T] }
    }

    public func barrier() throws {
        _ = try state.exchange(rank: rank, payload: ())
    }

    public func split(color: Int, key: Int) throws -> any Communicator {
        let family = state.family
        let outcome = try state.exchange(rank: rank, payload: (color, key)) { payloads in
            // Run once, by the last rank to arrive: one shared state per colour.
            let pairs = payloads.map { $0 as! (Int, Int) }
            var groups: [Int: RendezvousState] = [:]
            for color in Set(pairs.map(\.0)) where color >= 0 {
                groups[color] = RendezvousState(size: pairs.filter { $0.0 == color }.count, family: family)
            }
            return groups
        }
        guard color >= 0 else { throw CommunicatorError.invalidArgument("split colour must be ≥ 0, got \(color)") }
        let pairs = outcome.contributions.map { $0 as! (Int, Int) }
        let members = pairs.indices.filter { pairs[$0].0 == color }.sorted { (pairs[$0].1, $0) < (pairs[$1].1, $1) }
        let groups = outcome.shared as! [Int: RendezvousState]
        return InProcessGroup(rank: members.firstIndex(of: rank)!, state: groups[color]!)
    }
}

func requireEqualCounts(_ counts: [Int], operation: String) throws {
    guard counts.allSatisfy({ $0 == counts[0] }) else {
        throw CommunicatorError.mismatchedCounts(operation: operation, counts: counts)
    }
}

/// The element-wise sum of one array per rank along the rank tree (``rankTreeSum(_:)``).
/// Dispatches on the concrete type so the loop is specialised.
func sumInRankOrder<T: ReducibleScalar>(_ parts: [[T]]) -> [T] {
    switch T.kind {
    case .float32: return rankTreeSum(parts as! [[Float]]) as! [T]
    case .float64: return rankTreeSum(parts as! [[Double]]) as! [T]
    case .int64: return rankTreeSum(parts as! [[Int64]]) as! [T]
    }
}

/// Failure shared by a group and every group split from it.
final class GroupFamily: @unchecked Sendable {
    private let lock = NSLock()
    private var reason: String?
    private var members: [WeakState] = []

    var failure: String? { lock.lock(); defer { lock.unlock() }; return reason }

    func register(_ state: RendezvousState) {
        lock.lock(); members.append(WeakState(state)); lock.unlock()
    }

    func fail(_ why: String) {
        lock.lock()
        if reason == nil { reason = why }
        let states = members.compactMap(\.state)
        lock.unlock()
        for state in states { state.wakeAll() }
    }

    private struct WeakState {
        weak var state: RendezvousState?
        init(_ state: RendezvousState) { self.state = state }
    }
}

/// One rendezvous point: each collective deposits every rank's payload, and the last rank to
/// arrive publishes the full set (plus an optional value computed once) to all of them.
final class RendezvousState: @unchecked Sendable {
    let size: Int
    let family: GroupFamily
    private let condition = NSCondition()
    private var slots: [Any?]
    private var arrived = 0
    private var generation = 0
    private var published: [Any] = []
    private var publishedShared: Any?

    init(size: Int, family: GroupFamily) {
        self.size = size
        self.family = family
        self.slots = Array(repeating: nil, count: size)
        family.register(self)
    }

    func wakeAll() {
        condition.lock(); condition.broadcast(); condition.unlock()
    }

    func exchange(rank: Int, payload: Any, combine: (([Any]) -> Any)? = nil) throws -> (contributions: [Any], shared: Any?) {
        condition.lock()
        defer { condition.unlock() }
        if let why = family.failure { throw CommunicatorError.peerFailed(why) }
        slots[rank] = payload
        arrived += 1
        if arrived == size {
            published = slots.map { $0! }
            publishedShared = combine?(published)
            slots = Array(repeating: nil, count: size)
            arrived = 0
            generation += 1
            condition.broadcast()
        } else {
            let mine = generation
            while generation == mine {
                if let why = family.failure { throw CommunicatorError.peerFailed(why) }
                condition.wait()
            }
        }
        // No rank can start the next generation before this one has read: it needs our arrival.
        return (published, publishedShared)
    }
}

/// Thread-safe result slots for ``InProcessGroup/run(size:_:)``.
private final class ResultSlots<R>: @unchecked Sendable {
    private let lock = NSLock()
    private var slots: [Result<R, Error>?]
    init(count: Int) { slots = Array(repeating: nil, count: count) }
    func set(_ index: Int, _ value: Result<R, Error>) { lock.lock(); slots[index] = value; lock.unlock() }
    func values() -> [Result<R, Error>] { lock.lock(); defer { lock.unlock() }; return slots.map { $0! } }
}
