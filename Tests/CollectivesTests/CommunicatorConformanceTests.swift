import CollectiveChecks
import Collectives
import XCTest

final class CommunicatorConformanceTests: XCTestCase {
    func testSingleProcessCommunicatorPassesTheConformanceSuite() throws {
        let comm = SingleProcessCommunicator()
        XCTAssertEqual(comm.size, 1)
        XCTAssertEqual(try CommunicatorConformance.run(comm), [])
    }

    func testInProcessGroupPassesTheConformanceSuiteAtSizesOneToFour() throws {
        for size in 1...4 {
            let results = try InProcessGroup.run(size: size) { comm -> (Int, [String]) in
                (comm.size, try CommunicatorConformance.run(comm))
            }
            XCTAssertEqual(results.count, size)
            for (rank, result) in results.enumerated() {
                XCTAssertEqual(result.0, size, "rank \(rank) saw the wrong group size")
                XCTAssertEqual(result.1, [], "size \(size), rank \(rank)")
            }
        }
    }

    func testInProcessReductionIsBitwiseIdenticalOnEveryRank() throws {
        // Values whose sum depends on the order of addition: every rank must still agree.
        let results = try InProcessGroup.run(size: 4) { comm -> [Float] in
            var values = (0..<257).map { Float(1e7) * Float(comm.rank % 2 == 0 ? 1 : -1) + Float($0) * 0.1 + Float(comm.rank) * 1e-3 }
            try comm.allReduceSum(&values)
            return values
        }
        for rank in 1..<4 { XCTAssertEqual(results[rank].map(\.bitPattern), results[0].map(\.bitPattern)) }
    }

    func testInProcessGroupPassesTheConformanceSuiteAtSizesFiveToSixteen() throws {
        for size in 5...16 {
            let results = try InProcessGroup.run(size: size) { comm in try CommunicatorConformance.run(comm) }
            for (rank, failures) in results.enumerated() { XCTAssertEqual(failures, [], "size \(size), rank \(rank)") }
        }
    }

    /// Values whose sum depends on how the additions are grouped (every rank's values known).
    private func orderSensitiveParts(ranks: Int, count: Int) -> [[Float]] {
        var parts: [[Float]] = []
        for q in 0..<ranks {
            let sign: Float = q % 2 == 0 ? 1e7 : -0.999e7
            var part: [Float] = []
            for i in 0..<count {
                let magnitude = Float(1 + (q * 7 + i * 3) % 11)
                part.append(magnitude * sign + Float(i) * 0.37 + Float(q) * 1e-3)
            }
            parts.append(part)
        }
        return parts
    }

    func testTheRankTreeIsTheBalancedTreeOverRanksAndNotTheSequentialSum() {
        for ranks in 1...16 {
            let parts = orderSensitiveParts(ranks: ranks, count: 37)
            // The tree spelled out recursively: halves of the next power of two, missing halves left out.
            func tree(_ lo: Int, _ span: Int) -> [Float]? {
                guard lo < ranks else { return nil }
                if span == 1 { return parts[lo] }
                let left = tree(lo, span / 2)!
                guard let right = tree(lo + span / 2, span / 2) else { return left }
                return zip(left, right).map { $0 + $1 }
            }
            var span = 1
            while span < ranks { span *= 2 }
            XCTAssertEqual(rankTreeSum(parts).map(\.bitPattern), tree(0, span)!.map(\.bitPattern), "\(ranks) ranks")
            if ranks >= 4 {   // with 3 ranks the tree ((0 + 1) + 2) is the sequential sum
                let sequential = parts.dropFirst().reduce(parts[0]) { zip($0, $1).map { $0 + $1 } }
                XCTAssertNotEqual(rankTreeSum(parts).map(\.bitPattern), sequential.map(\.bitPattern),
                                  "the test values must be sensitive to the order of addition (\(ranks) ranks)")
            }
        }
    }

    /// The message schedule MPI follows, played out without MPI: every receive has its send, and
    /// every rank ends with the rank tree's sum, bit for bit, for 1–16 ranks (and a few more).
    func testTheRecursiveDoublingScheduleComputesTheRankTreeOnEveryRank() {
        for ranks in Array(1...16) + [23, 31, 33, 48] {
            let parts = orderSensitiveParts(ranks: ranks, count: 13)
            let schedules = (0..<ranks).map { RankTreeSchedule(rank: $0, size: ranks) }
            var held = parts
            let stepCount = schedules[0].steps.count
            XCTAssertTrue(schedules.allSatisfy { $0.steps.count == stepCount })
            for s in 0..<stepCount {
                let before = held
                for r in 0..<ranks {
                    let step = schedules[r].steps[s]
                    guard let source = step.receiveFrom else { continue }
                    XCTAssertTrue(schedules[source].steps[s].sendTo.contains(r), "\(ranks) ranks, step \(s): rank \(source) does not send to \(r)")
                    held[r] = zip(before[r], before[source]).map { $0 + $1 }
                }
                for r in 0..<ranks {
                    for target in schedules[r].steps[s].sendTo {
                        XCTAssertEqual(schedules[target].steps[s].receiveFrom, r, "\(ranks) ranks, step \(s): \(r) sends to \(target), which does not receive it")
                    }
                }
            }
            let expected = rankTreeSum(parts).map(\.bitPattern)
            for r in 0..<ranks { XCTAssertEqual(held[r].map(\.bitPattern), expected, "\(ranks) ranks, rank \(r)") }
        }
    }

    func testAFailingRankMakesBlockedRanksThrowInsteadOfHanging() {
        struct Boom: Error {}
        let started = Date()
        XCTAssertThrowsError(try InProcessGroup.run(size: 3) { comm -> Int in
            if comm.rank == 1 { throw Boom() }
            var values = [1.0]
            try comm.allReduceSum(&values)   // ranks 0 and 2 would wait forever for rank 1
            return 0
        }) { error in
            XCTAssertTrue(error is Boom, "the root cause is rethrown, got \(error)")
        }
        XCTAssertLessThan(Date().timeIntervalSince(started), 5)
    }

    func testFailurePropagatesIntoSubGroups() {
        struct Boom: Error {}
        XCTAssertThrowsError(try InProcessGroup.run(size: 4) { comm -> Int in
            let sub = try comm.split(color: comm.rank / 2, key: comm.rank)
            if comm.rank == 3 { throw Boom() }
            var values = [1.0]
            try sub.allReduceSum(&values)
            try comm.barrier()
            return 0
        }) { error in XCTAssertTrue(error is Boom, "got \(error)") }
    }

    func testMismatchedCountsThrowOnEveryRank() {
        XCTAssertThrowsError(try InProcessGroup.run(size: 2) { comm -> Int in
            var values = [Double](repeating: 1, count: comm.rank + 1)
            try comm.allReduceSum(&values)
            return 0
        }) { error in
            XCTAssertEqual(error as? CommunicatorError, .mismatchedCounts(operation: "allReduceSum", counts: [1, 2]))
        }
    }

    func testInvalidArgumentsAreErrors() {
        let comm = SingleProcessCommunicator()
        var values = [1.0]
        XCTAssertThrowsError(try comm.broadcast(&values, root: 1))
        XCTAssertThrowsError(try comm.split(color: -1, key: 0))
        XCTAssertThrowsError(try InProcessGroup.run(size: 2) { comm -> Int in
            var v = [1.0]
            try comm.broadcast(&v, root: 5)
            return 0
        })
    }

    func testInstrumentedCommunicatorCountsCollectivesIncludingSubGroups() throws {
        let counts = try InProcessGroup.run(size: 2) { base -> [String: Int] in
            let comm = InstrumentedCommunicator(base)
            var v = [1.0]
            try comm.allReduceSum(&v)
            try comm.allReduceSum(&v)
            let sub = try comm.split(color: 0, key: comm.rank)
            try sub.barrier()
            _ = try comm.startAllReduceSum([Float(1)]).wait()
            return comm.ledger.collectiveCounts.filter { $0.value > 0 }
        }
        XCTAssertEqual(counts[0], ["allReduceSum": 2, "split": 1, "barrier": 1, "startAllReduceSum": 1])
    }

    func testContiguousPiecesCoverTheRangeWithSizesDifferingByAtMostOne() {
        for count in 0...20 {
            for parts in 1...6 {
                let pieces = (0..<parts).map { contiguousPiece(of: count, parts: parts, index: $0) }
                XCTAssertEqual(pieces.first?.lowerBound, 0)
                XCTAssertEqual(pieces.last?.upperBound, count)
                for i in 1..<parts { XCTAssertEqual(pieces[i].lowerBound, pieces[i - 1].upperBound) }
                let sizes = pieces.map(\.count)
                XCTAssertLessThanOrEqual(sizes.max()! - sizes.min()!, 1)
                XCTAssertEqual(sizes, sizes.sorted(by: >), "larger pieces come first")
            }
        }
        XCTAssertEqual(contiguousPiece(of: 3, parts: 4, index: 3), 3..<3, "a rank may get nothing")
    }
}
