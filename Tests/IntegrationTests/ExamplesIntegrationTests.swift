import Foundation
import TestSupport
import Training
import XCTest

/// The programs in examples/ run as a user runs them: under `mpirun -n 2`, each with a watchdog.
final class ExamplesIntegrationTests: XCTestCase {
    func accuracies(_ text: String) -> [Double] {
        text.split(separator: "\n").compactMap { line -> Double? in
            guard let range = line.range(of: "accuracy ") else { return nil }
            return Double(line[range.upperBound...].prefix { $0.isNumber || $0 == "." })
        }
    }

    func testTheCustomModelExampleTrainsOverTwoRanksAndWritesACheckpoint() throws {
        let dir = temporaryDirectory()
        let path = dir + "/custom.safetensors"
        let result = try Harness.mpi(2, productsDirectory + "/syncbn-example-custom-model", [path], timeout: 180)
        XCTAssertEqual(result.status, 0, describe(result))
        let values = accuracies(result.stdout)
        XCTAssertEqual(values.count, 2, "an EMA and a PreciseBN line, printed once: \(result.stdout)")
        XCTAssertTrue(values.allSatisfy { $0 > 30 }, "the synthetic data is learnable well above chance (10 %): \(values)")
        XCTAssertTrue(result.stdout.contains("on 2 ranks"), result.stdout)
        let metadata = try Safetensors.read(path).metadata
        XCTAssertEqual(metadata["network"], "custom")
        XCTAssertEqual(metadata["ranks"], "2")
    }

    func testTheHandWrittenLoopExampleTrainsOverTwoRanksWithDataParallelAndPreciseBN() throws {
        let result = try Harness.mpi(2, productsDirectory + "/syncbn-example-training-loop", [], timeout: 180)
        XCTAssertEqual(result.status, 0, describe(result))
        XCTAssertEqual(result.stdout.components(separatedBy: "step ").count - 1, 4, "four progress lines, from rank 0 alone: \(result.stdout)")
        let values = accuracies(result.stdout)
        XCTAssertEqual(values.count, 5, result.stdout)
        XCTAssertGreaterThan(values.last!, 30, "held-out accuracy with PreciseBN statistics: \(result.stdout)")
    }
}
