import Foundation

/// Collectives that the ranks of a group issued differently: found by ``CheckedCommunicator``
/// identically on every rank, so every rank can stop cleanly.
public struct CollectiveMismatchError: Error, CustomStringConvertible {
    public let description: String
}

/// A debugging communicator (`--check-collectives`): before every collective, the ranks
/// all-gather what they are about to do — the operation, its element count, its root and its
/// sequence number in this group — and compare. The first divergence stops every rank with a
/// ``CollectiveMismatchError`` that says which ranks called what, instead of a hang, a
/// truncation error or silently mixed data. It costs one small all-gather per collective (the
/// role of PyTorch's TORCH_DISTRIBUTED_DEBUG=DETAIL).
public final class CheckedCommunicator: Communicator {
    public let base: any Communicator
    /// Which group this is, in messages (`world`, `group 1`).
    public let label: String
    private var sequence = 0

    public init(_ base: any Communicator, label: String = "world") {
        self.base = base
        self.label = label
    }

    public var rank: Int { base.rank }
    public var size: Int { base.size }

    static let operations = ["allReduceSum", "startAllReduceSum", "broadcast", "allGather", "barrier", "split"]

    /// Compares (operation, count, root, sequence) over the group; allGather's counts may differ.
    private func check(_ operation: String, count: Int, root: Int = -1) throws {
        sequence += 1
        let code = Int64(Self.operations.firstIndex(of: operation) ?? -1)
        let mine: [Int64] = [code, Int64(count), Int64(root), Int64(sequence)]
        let all = try base.allGather(mine)
        let comparable = { (entry: [Int64]) -> [Int64] in operation == "allGather" && entry[0] == code ? [entry[0], 0, entry[2], entry[3]] : entry }
        guard all.contains(where: { comparable($0) != comparable(mine) }) else { return }
        func describe(_ entry: [Int64]) -> String {
            guard entry.count == 4 else { return "something else" }
            let name = (0..<Self.operations.count).contains(Int(entry[0])) ? Self.operations[Int(entry[0])] : "an unknown collective"
            let root = entry[2] >= 0 ? " from root \(entry[2])" : ""
            return "\(name) of \(entry[1]) value(s)\(root) as its collective #\(entry[3])"
        }
        var groups: [(String, [Int])] = []
        for (rank, entry) in all.enumerated() {
            let text = describe(entry)
            if let i = groups.firstIndex(where: { $0.0 == text }) { groups[i].1.append(rank) } else { groups.append((text, [rank])) }
        }
        let parts = groups.map { text, ranks in "\(ranks.count == 1 ? "rank" : "ranks") \(ranks.map(String.init).joined(separator: ",")) called \(text)" }
        throw CollectiveMismatchError(description: "collectives diverged in \(label): " + parts.joined(separator: "; "))
    }

    public func allReduceSum<T: ReducibleScalar>(_ values: inout [T]) throws {
        try check("allReduceSum", count: values.count)
        try base.allReduceSum(&values)
    }

    public func startAllReduceSum<T: ReducibleScalar>(_ values: [T]) throws -> AllReduceRequest<T> {
        try check("startAllReduceSum", count: values.count)
        return try base.startAllReduceSum(values)
    }

    public func broadcast<T: ReducibleScalar>(_ values: inout [T], root: Int) throws {
        try check("broadcast", count: values.count, root: root)
        try base.broadcast(&values, root: root)
    }

    public func allGather<T: ReducibleScalar>(_ values: [T]) throws -> [[T]] {
        try check("allGather", count: values.count)
        return try base.allGather(values)
    }

    public func barrier() throws {
        try check("barrier", count: 0)
        try base.barrier()
    }

    public func split(color: Int, key: Int) throws -> any Communicator {
        try check("split", count: 0)
        return CheckedCommunicator(try base.split(color: color, key: key), label: "group \(color)")
    }
}
