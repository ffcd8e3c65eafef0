import Collectives
import Foundation
import XCTest

final class WatchdogTests: XCTestCase {
    func testACollectiveThatDoesNotCompleteInTimeIsReportedWithItsContext() throws {
        let fired = DispatchSemaphore(value: 0)
        let message = LockedText()
        let watchdog = CollectiveWatchdog(timeout: 0.2) { text in
            message.set(text)
            fired.signal()
        }
        watchdog.context = "training step 7"
        // Rank 1 joins the all-reduce a second late: rank 0 waits past the timeout.
        _ = try InProcessGroup.run(size: 2) { comm -> Int in
            var values = [Double(comm.rank)]
            if comm.rank == 0 {
                try WatchdogCommunicator(comm, watchdog: watchdog).allReduceSum(&values)
            } else {
                Thread.sleep(forTimeInterval: 1)
                try comm.allReduceSum(&values)
            }
            return 0
        }
        XCTAssertEqual(fired.wait(timeout: .now() + 5), .success, "the watchdog fired")
        XCTAssertTrue(message.get().contains("allReduceSum") && message.get().contains("training step 7")
                      && message.get().contains("collective #1"), message.get())
    }

    func testCompletedCollectivesDoNotFire() throws {
        let fired = LockedText()
        let watchdog = CollectiveWatchdog(timeout: 0.2) { fired.set($0) }
        let watched = WatchdogCommunicator(SingleProcessCommunicator(), watchdog: watchdog)
        for _ in 0..<50 { var values = [1.0]; try watched.allReduceSum(&values) }
        Thread.sleep(forTimeInterval: 0.5)
        XCTAssertEqual(fired.get(), "")
    }
}

final class LockedText: @unchecked Sendable {
    private let lock = NSLock()
    private var text = ""
    func set(_ value: String) { lock.lock(); text = value; lock.unlock() }
    func get() -> String { lock.lock(); defer { lock.unlock() }; return text }
}

final class CheckedCommunicatorTests: XCTestCase {
    func divergence(_ body: @escaping (CheckedCommunicator) throws -> Void) -> [String] {
        let results = try? InProcessGroup.run(size: 3) { comm -> String in
            do { try body(CheckedCommunicator(comm)); return "" } catch { return "\(error)" }
        }
        return results ?? []
    }

    func testMatchingCollectivesPassAndGatherMayDifferInCount() throws {
        let messages = divergence { comm in
            var values = [1.0, 2.0]
            try comm.allReduceSum(&values)
            _ = try comm.allGather([Int64](repeating: 1, count: comm.rank + 1))
            try comm.broadcast(&values, root: 1)
            try comm.barrier()
        }
        XCTAssertEqual(messages, ["", "", ""])
    }

    func testTheFirstDivergenceIsNamedOnEveryRank() throws {
        let counts = divergence { comm in
            var values = [Double](repeating: 1, count: comm.rank == 2 ? 5 : 4)
            try comm.allReduceSum(&values)
        }
        XCTAssertEqual(Set(counts).count, 1, "every rank reports the same: \(counts)")
        XCTAssertTrue(counts[0].contains("ranks 0,1 called allReduceSum of 4 value(s) as its collective #1; rank 2 called allReduceSum of 5"), counts[0])
        let operations = divergence { comm in
            var values = [1.0]
            try comm.barrier()
            if comm.rank == 0 { _ = try comm.allGather(values) } else { try comm.allReduceSum(&values) }
        }
        XCTAssertTrue(operations[0].contains("rank 0 called allGather of 1 value(s) as its collective #2; ranks 1,2 called allReduceSum"), operations[0])
    }
}
