import Collectives
import Foundation
import Kernels
import TestSupport
import Training
import XCTest

final class MetricsTests: XCTestCase {
    func lines(_ path: String) throws -> [[String: Any]] {
        try String(contentsOfFile: path, encoding: .utf8).split(separator: "\n").map {
            try JSONSerialization.jsonObject(with: Data($0.utf8)) as! [String: Any]
        }
    }

    /// A run logged every 5 steps reports, per interval, the mean of what a run logged every
    /// step reports for the same steps (the runs are identical).
    func testIntervalAveragesAreTheMeansOfTheSteps() throws {
        let data = try DataSource.split(.synthetic(train: 96, heldOut: 16, seed: 2), evaluation: nil, heldOutFraction: 0.1)
        let dir = temporaryDirectory()
        var logged: [Int: [[String: Any]]] = [:]
        for every in [1, 5] {
            var c = TrainingConfiguration()
            c.batchSize = 8
            c.steps = 10
            c.logEvery = every
            c.evalStats = .ema
            let trainer = try Trainer(configuration: c, data: data, world: SingleProcessCommunicator())
            let path = dir + "/m\(every).jsonl"
            trainer.metrics = try MetricsWriter(path: path)
            try trainer.metrics?.writeStart(configuration: c, ranks: 1, resumedAt: nil)
            _ = try trainer.run()
            logged[every] = try lines(path)
        }
        let perStep = logged[1]!.filter { $0["event"] == nil }, perInterval = logged[5]!.filter { $0["event"] == nil }
        XCTAssertEqual(perStep.count, 10)
        XCTAssertEqual(perInterval.map { $0["step"] as! Int }, [5, 10])
        XCTAssertEqual(perInterval.map { $0["steps"] as! Int }, [5, 5])
        for (i, interval) in perInterval.enumerated() {
            let steps = perStep[(5 * i)..<(5 * i + 5)]
            for key in ["loss", "accuracy"] {
                let mean = steps.map { $0[key] as! Double }.reduce(0, +) / 5
                XCTAssertEqual(interval[key] as! Double, mean, accuracy: 1e-9 * max(1, abs(mean)), key)
            }
            XCTAssertEqual(interval["lr"] as! Double, steps.last!["lr"] as! Double)
        }
        // The first line: the configuration, the ranks and the version.
        let start = logged[5]![0]
        XCTAssertEqual(start["event"] as? String, "start")
        XCTAssertEqual(start["ranks"] as? Int, 1)
        XCTAssertEqual((start["configuration"] as? [String: Any])?["batchSize"] as? Int, 8)
        XCTAssertNotNil(start["version"])
    }

    func testAWriteErrorIsAnErrorNotATrap() throws {
        guard FileManager.default.fileExists(atPath: "/dev/full") else { throw XCTSkip("no /dev/full on this machine") }
        // /dev/full fails every write with ENOSPC, as a full disk does. Opened directly (the
        // command line refuses devices as metrics files).
        let writer = try MetricsWriter(deviceForTesting: "/dev/full")
        XCTAssertThrowsError(try writer.write(["step": 1])) { error in
            XCTAssertTrue("\(error)".contains("No space left on device"), "\(error)")
        }
    }
}
