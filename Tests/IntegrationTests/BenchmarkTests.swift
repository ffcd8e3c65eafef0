import Foundation
import TestSupport
import XCTest

/// Every benchmark runs alone and under mpirun and prints one JSON object on stdout. (What the
/// numbers are is measured and reported in the README, never asserted here.)
final class BenchmarkTests: XCTestCase {
    func json(_ result: ProcessResult, file: StaticString = #filePath, line: UInt = #line) -> [String: Any]? {
        XCTAssertEqual(result.status, 0, describe(result), file: file, line: line)
        let lines = result.stdout.split(separator: "\n")
        XCTAssertEqual(lines.count, 1, "one JSON object: \(result.stdout)", file: file, line: line)
        guard let first = lines.first, let object = try? JSONSerialization.jsonObject(with: Data(first.utf8)) as? [String: Any] else {
            XCTFail("not JSON: \(result.stdout)", file: file, line: line)
            return nil
        }
        return object
    }

    func testEveryBenchmarkPrintsItsJSONAloneAndUnderMpirun() throws {
        let cases: [([String], String)] = [
            (["limits"], "copy_gb_per_s"),
            (["layer", "--shape", "8,4,6,6", "--repeat", "3"], "fraction_of_copy"),
            (["layer", "--shape", "8,4,6,6"], "out"),
            (["allreduce", "--repeats", "2"], "sizes"),
            (["train", "--steps", "2", "--warmup", "1", "--batch-size", "8"], "syncbn_over_bn"),
        ]
        for (args, key) in cases {
            for ranks in [1, 2] {
                let result = ranks == 1 ? try Harness.direct(Harness.bench, args, timeout: 120) : try Harness.mpi(ranks, Harness.bench, args, timeout: 120)
                guard let object = json(result) else { continue }
                XCTAssertEqual(object["ranks"] as? Int, ranks, "\(args)")
                XCTAssertNotNil(object[key], "\(args) on \(ranks) rank(s): \(object)")
            }
        }
    }
}
