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

    /// A resume from the step-10 checkpoint of a run that logged to step 15 before it was killed:
    /// the lines of steps 11–15 (which the resumed run logs again) are removed, a partial last line
    /// is cut, the rest is kept byte for byte, and nothing is removed without a resume step.
    func testAResumeRemovesTheLinesOfTheStepsItReplays() throws {
        let dir = temporaryDirectory("syncbn-metrics")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let path = dir + "/m.jsonl"
        let kept = [#"{"event":"start","ranks":2}"#, #"{"step":5,"loss":2.1}"#, #"{"step":10,"loss":1.9}"#,
                    #"{"event":"eval","step":10,"stats":"ema","accuracy":0.5}"#]
        let replayed = [#"{"step":15,"loss":1.7}"#, #"{"event":"eval","step":15,"stats":"ema","accuracy":0.6}"#]
        let text = (kept + replayed).joined(separator: "\n") + "\n" + #"{"step":20,"lo"#
        try text.write(toFile: path, atomically: false, encoding: .utf8)
        let writer = try MetricsWriter(path: path, append: true, purgingAfter: 10)
        XCTAssertTrue(writer.repairedPartialLine)
        XCTAssertEqual(writer.purgedLines, 2)
        try writer.write(["step": 15, "loss": 1.6])
        let after = try String(contentsOfFile: path, encoding: .utf8)
        XCTAssertTrue(after.hasPrefix(kept.joined(separator: "\n") + "\n"), after)
        XCTAssertEqual(try lines(path).compactMap { $0["step"] as? Int }, [5, 10, 10, 15])
        XCTAssertFalse(try FileManager.default.contentsOfDirectory(atPath: dir).contains { $0.contains("partial") }, "no temporary file left")
        let untouched = try MetricsWriter(path: path, append: true)
        XCTAssertEqual(untouched.purgedLines, 0)
        XCTAssertEqual(try lines(path).count, 5)
    }
}
