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
