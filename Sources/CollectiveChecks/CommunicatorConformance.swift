import Collectives

/// Checks that every rank of a group must run together: the collective contract of
/// ``Communicator``, with expected values in closed form of rank and size.
///
/// Written once and run on every implementation: `swift test` runs it on the single-process and
/// in-process communicators at sizes 1–4, `syncbn-bench selftest` runs it on MPI under `mpirun`.
/// Returns the failures (empty when all checks pass); the first line of the result names the size,
/// so a run that was silently a group of one cannot pass as a multi-rank run.
public enum CommunicatorConformance {
    public static func run(_ comm: any Communicator) throws -> [String] {
        var failures: [String] = []
        func expect(_ condition: Bool, _ what: @autoclosure () -> String) {
            if !condition { failures.append("rank \(comm.rank)/\(comm.size): \(what())") }
        }
        let r = comm.rank, n = comm.size
        expect((0..<n).contains(r), "rank \(r) outside 0..<\(n)")

        // Σ rank over the group, and a vector whose element i sums (rank + 1)·i.
        var doubles = [Double(r), 1, Double(r) * 0.5]
        try comm.allReduceSum(&doubles)
        let ranks = Double(n * (n - 1) / 2)
        expect(doubles == [ranks, Double(n), ranks * 0.5], "allReduceSum Double gave \(doubles)")

        var floats = (0..<1000).map { Float($0 % 7) * Float(r + 1) }
        try comm.allReduceSum(&floats)
        let factor = Float(n * (n + 1) / 2)
        expect(floats == (0..<1000).map { Float($0 % 7) * factor }, "allReduceSum Float mismatch")

        var integers: [Int64] = [Int64(r), Int64(1) << 40]
        try comm.allReduceSum(&integers)
        expect(integers == [Int64(n * (n - 1) / 2), Int64(n) << 40], "allReduceSum Int64 gave \(integers)")

        var empty: [Double] = []
        try comm.allReduceSum(&empty)
        expect(empty.isEmpty, "allReduceSum of nothing gave \(empty)")

        // Non-blocking: two requests in flight, waited in order.
        let first = try comm.startAllReduceSum([Float(r), 2])
        let second = try comm.startAllReduceSum([Double(r * r)])
        let a = try first.wait(), b = try second.wait()
        let squares = Double((n - 1) * n * (2 * n - 1) / 6)
        expect(a == [Float(n * (n - 1) / 2), Float(2 * n)], "startAllReduceSum Float gave \(a)")
        expect(b == [squares], "startAllReduceSum Double gave \(b), expected \(squares)")
        expect(try first.wait() == a, "a second wait() changed the result")

        // The reductions follow the rank tree bit for bit: values with rounding in every addition,
        // a length that no power of two divides, every rank's values known to every rank.
        func treeValues<T: BinaryFloatingPoint>(_: T.Type, rank q: Int, count: Int) -> [T] {
            var state = UInt64(q + 1) &* 0x9E37_79B9_7F4A_7C15
            return (0..<count).map { _ in
                state = state &* 6364136223846793005 &+ 1442695040888963407
                let unit = T(Double(state >> 11) / Double(1 << 53))
                return (unit - 0.5) * T(1 + q % 5) * 1e3
            }
        }
        let length = 1001
        let floatParts = (0..<n).map { treeValues(Float.self, rank: $0, count: length) }
        let doubleParts = (0..<n).map { treeValues(Double.self, rank: $0, count: length) }
        var treeFloats = floatParts[r]
        try comm.allReduceSum(&treeFloats)
        expect(treeFloats.map(\.bitPattern) == rankTreeSum(floatParts).map(\.bitPattern), "allReduceSum Float is not the rank tree's sum bit for bit")
        // Reductions in flight together, with a blocking one between them.
        let inFlight = try comm.startAllReduceSum(floatParts[r])
        var between = doubleParts[r]
        try comm.allReduceSum(&between)
        let later = try comm.startAllReduceSum(doubleParts[r])
        let inFlightResult = try inFlight.wait(), laterResult = try later.wait()
        let doubleTree = rankTreeSum(doubleParts).map(\.bitPattern)
        expect(inFlightResult.map(\.bitPattern) == rankTreeSum(floatParts).map(\.bitPattern), "startAllReduceSum Float is not the rank tree's sum")
        expect(between.map(\.bitPattern) == doubleTree, "allReduceSum Double is not the rank tree's sum")
        expect(laterResult.map(\.bitPattern) == doubleTree, "startAllReduceSum Double is not the rank tree's sum")

        // Broadcast from the last rank.
        var broadcastValues = [Double(r) + 0.25, Double(r) * 3]
        try comm.broadcast(&broadcastValues, root: n - 1)
        expect(broadcastValues == [Double(n - 1) + 0.25, Double(n - 1) * 3], "broadcast gave \(broadcastValues)")

        // All-gather with uneven counts: rank r sends r + 1 copies of r.
        let gathered = try comm.allGather([Float](repeating: Float(r), count: r + 1))
        expect(gathered.count == n, "allGather returned \(gathered.count) parts")
        for (q, part) in gathered.enumerated() {
            expect(part == [Float](repeating: Float(q), count: q + 1), "allGather part \(q) is \(part)")
        }

        try comm.barrier()

        // Split into even and odd ranks, reversed by key; reduce inside each sub-group.
        let sub = try comm.split(color: r % 2, key: n - r)
        let members = (0..<n).filter { $0 % 2 == r % 2 }
        expect(sub.size == members.count, "split group size \(sub.size), expected \(members.count)")
        expect(sub.rank == members.reversed().firstIndex(of: r), "split rank \(sub.rank) not ordered by key")
        var subSum = [Double(r)]
        try sub.allReduceSum(&subSum)
        expect(subSum == [Double(members.reduce(0, +))], "sub-group sum \(subSum)")

        // Collectives on the parent still work after the split.
        let total = try comm.allReduceSum(Double(1))
        expect(total == Double(n), "allReduceSum after split gave \(total)")
        return failures
    }
}
