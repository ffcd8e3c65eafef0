import Foundation

/// Wraps a communicator and records how many collectives of each kind were issued and how long
/// the calls blocked. Groups split from it are instrumented too and report into the same ledger,
/// so a training step's total communication time and collective count can be read in one place
/// (and tests can assert, e.g., one collective per SyncBN layer per forward).
public final class InstrumentedCommunicator: Communicator {
    /// Counts and seconds, shared by a communicator and every group split from it.
    public final class Ledger: @unchecked Sendable {
        private let lock = NSLock()
        private var counts: [String: Int] = [:]
        private var seconds: Double = 0

        public init() {}

        /// Collectives issued per operation name (`allReduceSum`, `broadcast`, …).
        public var collectiveCounts: [String: Int] { lock.lock(); defer { lock.unlock() }; return counts }
        /// All collectives issued.
        public var totalCollectives: Int { collectiveCounts.values.reduce(0, +) }
        /// Seconds spent blocked in collectives (for a non-blocking one: in its `wait`).
        public var blockedSeconds: Double { lock.lock(); defer { lock.unlock() }; return seconds }

        public func reset() { lock.lock(); counts = [:]; seconds = 0; lock.unlock() }

        func record(_ name: String, seconds elapsed: Double, count: Int = 1) {
            lock.lock(); counts[name, default: 0] += count; seconds += elapsed; lock.unlock()
        }
    }

    public let base: any Communicator
    public let ledger: Ledger

    public init(_ base: any Communicator, ledger: Ledger = Ledger()) {
        self.base = base
        self.ledger = ledger
    }

    public var rank: Int { base.rank }
    public var size: Int { base.size }

    private func timed<R>(_ name: String, _ body: () throws -> R) rethrows -> R {
        let start = DispatchTime.now().uptimeNanoseconds
        defer { ledger.record(name, seconds: Double(DispatchTime.now().uptimeNanoseconds - start) * 1e-9) }
        return try body()
    }

    public func allReduceSum<T: ReducibleScalar>(_ values: inout [T]) throws {
        try timed("allReduceSum") { try base.allReduceSum(&values) }
    }

    public func startAllReduceSum<T: ReducibleScalar>(_ values: [T]) throws -> AllReduceRequest<T> {
        let request = try timed("startAllReduceSum") { try base.startAllReduceSum(values) }
        let ledger = self.ledger
        return AllReduceRequest {
            let start = DispatchTime.now().uptimeNanoseconds
            defer { ledger.record("wait", seconds: Double(DispatchTime.now().uptimeNanoseconds - start) * 1e-9, count: 0) }
            return try request.wait()
        }
    }

    public func broadcast<T: ReducibleScalar>(_ values: inout [T], root: Int) throws {
        try timed("broadcast") { try base.broadcast(&values, root: root) }
    }

    public func allGather<T: ReducibleScalar>(_ values: [T]) throws -> [[T]] {
        try timed("allGather") { try base.allGather(values) }
    }

    public func barrier() throws {
        try timed("barrier") { try base.barrier() }
    }

    public func split(color: Int, key: Int) throws -> any Communicator {
        let sub = try timed("split") { try base.split(color: color, key: key) }
        return InstrumentedCommunicator(sub, ledger: ledger)
    }
}
