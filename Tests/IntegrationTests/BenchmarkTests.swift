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
            (["train", "--steps", "1", "--warmup", "1", "--batch-size", "4", "--model", "resnet20", "--width", "0.25", "--norms", "bn,cbn,shufflebn,domainbn"],
             "cbn_over_bn shufflebn_over_bn domainbn_over_bn"),
            (["conv", "--shape", "3,2,7,5", "--out-channels", "4", "--stride", "2", "--repeat", "2"], "fraction_of_sgemm"),
        ]
        for (args, key) in cases {
            for ranks in [1, 2] {
                let result = ranks == 1 ? try Harness.direct(Harness.bench, args, timeout: 120) : try Harness.mpi(ranks, Harness.bench, args, timeout: 120)
                guard let object = json(result) else { continue }
                XCTAssertEqual(object["ranks"] as? Int, ranks, "\(args)")
                for key in key.split(separator: " ") { XCTAssertNotNil(object[String(key)], "\(args) on \(ranks) rank(s): \(object)") }
            }
        }
    }

    /// tools/onednn_leaves.c builds against libdnnl with the toolchain's C compiler and prints its
    /// three timings per round, each a positive number (what they are is in docs/performance.md);
    /// with --pair, two per ResNet-20 convolution shape and per step; bad arguments are one line.
    func testTheOneDNNLeafBenchmarkBuildsAndTimesItsThreeWays() throws {
        let path = ProcessInfo.processInfo.environment["PATH"] ?? "/usr/bin"
        guard let compiler = (["clang", "cc"].lazy.flatMap { name in path.split(separator: ":").map { "\($0)/\(name)" } })
            .first(where: { FileManager.default.isExecutableFile(atPath: $0) }) else {
            throw XCTSkip("no C compiler on PATH")
        }
        let binary = NSTemporaryDirectory() + "syncbn-onednn-leaves-\(UUID().uuidString)"
        defer { try? FileManager.default.removeItem(atPath: binary) }
        let build = try runProcess(compiler, ["-O2", Harness.repositoryRoot + "/tools/onednn_leaves.c", "-o", binary, "-ldnnl"], timeout: 120)
        XCTAssertEqual(build.status, 0, describe(build))
        let run = try runProcess(binary, ["8", "8", "6"], environment: ["OMP_NUM_THREADS": "1"], timeout: 60)
        XCTAssertEqual(run.status, 0, describe(run))
        let rounds = run.stdout.split(separator: "\n").filter { $0.hasPrefix("8x8@6:") }
        XCTAssertEqual(rounds.count, 3, run.stdout)
        for round in rounds {
            let words = round.split(separator: " ")
            let times = words.indices.dropFirst().compactMap { words[$0] == "ms," || words[$0] == "ms" ? Double(words[$0 - 1]) : nil }
            XCTAssertEqual(times.count, 3, String(round))
            XCTAssertTrue(times.allSatisfy { $0 > 0 }, String(round))
        }
        // --pair: both timings for each of ResNet-20's eight shapes, and the step's totals.
        let pair = try runProcess(binary, ["--pair", "8"], environment: ["OMP_NUM_THREADS": "1"], timeout: 120)
        XCTAssertEqual(pair.status, 0, describe(pair))
        let layers = pair.stdout.split(separator: "\n").filter { $0.contains(": two calls of C ") }
        XCTAssertEqual(layers.count, 8, pair.stdout)
        let totals = pair.stdout.split(separator: "\n").filter { $0.hasPrefix("per step (batch 32 in leaves of 8):") }
        XCTAssertEqual(totals.count, 1, pair.stdout)
        for line in layers + totals {
            let words = line.split(separator: " ")
            let times = words.indices.dropFirst().compactMap { words[$0] == "ms," || words[$0] == "ms" ? Double(words[$0 - 1]) : nil }
            XCTAssertEqual(times.count, 2, String(line))
            XCTAssertTrue(times.allSatisfy { $0 > 0 }, String(line))
        }
        for arguments in [[], ["--pair", "3"], ["--pair", "0"]] {
            let usage = try runProcess(binary, arguments, timeout: 60)
            XCTAssertEqual(usage.status, 2, describe(usage))
            XCTAssertEqual(usage.stderr.split(separator: "\n").count, 1, describe(usage))
        }
    }

    /// tools/sitting.py alternates PyTorch's benchmark (here a stand-in script printing known
    /// samples/s) with syncbn-bench train on 1 and 2 ranks, records both, and tabulates the records
    /// with the targets' ratios, which must be syncbn's figures over the stand-in's; a missing
    /// script and a file that is not its records are one line each.
    func testTheSittingToolTabulatesBothProgramsAndTheirRatios() throws {
        guard Harness.mpirun != nil else { throw XCTSkip("mpirun is not installed (launch/setup installs it)") }
        let directory = NSTemporaryDirectory() + "syncbn-sitting-\(UUID().uuidString)"
        try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: directory) }
        let standIn = directory + "/torch_train.py"
        try """
        import json, sys
        threads = int(sys.argv[sys.argv.index("--threads") + 1])
        print(json.dumps({"samples_per_s": 7.0 * threads, "torch": "stand-in"}))
        """.write(toFile: standIn, atomically: true, encoding: .utf8)
        let tool = Harness.repositoryRoot + "/tools/sitting.py"
        let arguments = [tool, "--torch-train", standIn, "--bench", Harness.bench, "--rounds", "2", "--model", "convnet",
                         "--input", "3,16,16", "--data", "synthetic:train=256,heldout=32", "--steps", "2"]
        let raw = try runProcess("/usr/bin/python3", arguments + ["--json"], timeout: 300)
        XCTAssertEqual(raw.status, 0, describe(raw))
        let records = raw.stdout.split(separator: "\n").compactMap { try? JSONSerialization.jsonObject(with: Data($0.utf8)) as? [String: Any] }
        // Per round: PyTorch at 1 and 2 threads, and syncbn's three arms on 1 and 2 ranks.
        XCTAssertEqual(records.count, 2 * (2 + 2 * 3), raw.stdout)
        let syncbn = records.filter { $0["program"] as? String == "syncbn" }
        XCTAssertEqual(Set(syncbn.compactMap { $0["norm"] as? String }), ["bn", "syncbn", "cbn"])
        XCTAssertEqual(Set(syncbn.compactMap { $0["ranks"] as? Int }), [1, 2])
        XCTAssertTrue(syncbn.allSatisfy { ($0["samples_per_s"] as? Double ?? 0) > 0 && ($0["peak_rss_mib"] as? Double ?? 0) > 0 }, raw.stdout)
        let pytorch = records.filter { $0["program"] as? String == "pytorch" }
        XCTAssertEqual(pytorch.compactMap { $0["samples_per_s"] as? Double }.sorted(), [7, 7, 14, 14])

        // The table of those records: the 1-rank target's ratios are each round's SyncBN samples/s
        // over the stand-in's 7.
        let saved = directory + "/records.jsonl"
        try raw.stdout.write(toFile: saved, atomically: true, encoding: .utf8)
        let table = try runProcess("/usr/bin/python3", [tool, "--from", saved], timeout: 60)
        XCTAssertEqual(table.status, 0, describe(table))
        XCTAssertTrue(table.stdout.contains("| PyTorch, 2 threads | 14.0 |"), table.stdout)
        let ratios = syncbn.filter { $0["ranks"] as? Int == 1 && $0["norm"] as? String == "syncbn" }.compactMap { $0["samples_per_s"] as? Double }.map { $0 / 7 }
        XCTAssertEqual(ratios.count, 2)
        let low = String(format: "%.2f", ratios.min()!), high = String(format: "%.2f", ratios.max()!)
        let expected = low == high ? "\(low)×" : "\(low)–\(high)×"
        XCTAssertTrue(table.stdout.contains("| 1 rank SyncBN ≥ 1.1× PyTorch 1 thread | \(expected) | met in every round |"), table.stdout)
        let notRecords = try runProcess("/usr/bin/python3", [tool, "--from", standIn], timeout: 60)
        XCTAssertEqual(notRecords.status, 1, describe(notRecords))
        XCTAssertEqual(notRecords.stderr.split(separator: "\n").count, 1, describe(notRecords))

        let missing = try runProcess("/usr/bin/python3", [tool, "--torch-train", directory + "/absent.py", "--bench", Harness.bench], timeout: 60)
        XCTAssertEqual(missing.status, 1, describe(missing))
        XCTAssertEqual(missing.stderr.split(separator: "\n"), ["sitting.py: error: \(directory)/absent.py: no such file"])
    }

    /// tools/cost_model.py on all-reduce timings made from known α and β: the fit gives them back
    /// and the predictions follow the documented formulas; bad input is a one-line error.
    func testCostModelFitsAlphaBetaAndPredictsByItsFormulas() throws {
        let directory = NSTemporaryDirectory() + "syncbn-cost-\(UUID().uuidString)"
        try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: directory) }
        func write(_ name: String, alpha: Double, beta: Double, ranks: Int = 2) throws -> String {
            // Below 4 KiB a flat latency (a different algorithm than the large messages use).
            let sizes = (3...22).map { 1 << $0 }.map { n -> [String: Any] in
                ["bytes": n, "median_s": n <= 4096 ? alpha : alpha + beta * Double(n), "gb_per_s": 0] }
            let object: [String: Any] = ["benchmark": "allreduce", "ranks": ranks, "repeat": 1, "sizes": sizes]
            let path = directory + "/" + name
            try JSONSerialization.data(withJSONObject: object).write(to: URL(fileURLWithPath: path))
            return path
        }
        let shm = try write("shm.json", alpha: 1e-6, beta: 1e-10), net = try write("net.json", alpha: 2e-5, beta: 1e-9)
        let tool = Harness.repositoryRoot + "/tools/cost_model.py"
        let result = try runProcess("/usr/bin/python3", [tool, "--shm", shm, "--net", net, "--ranks", "8,64", "--ranks-per-node", "8",
                                                          "--models", "resnet20", "--json"], timeout: 60)
        XCTAssertEqual(result.status, 0, describe(result))
        let object = try XCTUnwrap(try JSONSerialization.jsonObject(with: Data(result.stdout.utf8)) as? [String: Any])
        let fit = try XCTUnwrap(object["fit"] as? [String: [String: Double]])
        XCTAssertEqual(fit["shm"]!["alpha_us"]!, 1, accuracy: 1e-9)
        XCTAssertEqual(fit["shm"]!["gb_per_s"]!, 10, accuracy: 1e-6)
        XCTAssertEqual(fit["net"]!["alpha_us"]!, 20, accuracy: 1e-9)
        XCTAssertEqual(fit["net"]!["gb_per_s"]!, 1, accuracy: 1e-6)
        // ResNet-20's BN layers: 16 ×7, 32 ×7, 64 ×7; forward 8·(2C + 1) bytes, backward 8·2C.
        func allReduce(_ P: Int, _ n: Double, _ alpha: Double, _ beta: Double) -> Double {
            min(ceil(log2(Double(P))) * (alpha + beta * n), 2 * Double(P - 1) * alpha + 2 * Double(P - 1) / Double(P) * beta * n)
        }
        var grouped = 0.0, flat = 0.0
        for C in [16, 32, 64] {
            for n in [8 * (2 * C + 1), 16 * C].map(Double.init) {
                grouped += 7 * allReduce(8, n, 1e-6, 1e-10)
                flat += 7 * (allReduce(8, n, 1e-6, 1e-10) + allReduce(8, n, 2e-5, 1e-9))
            }
        }
        let rows = try XCTUnwrap(object["predictions"] as? [[String: Any]])
        XCTAssertEqual(rows.count, 2)
        XCTAssertEqual(rows[0]["ranks"] as? Int, 8)
        XCTAssertEqual(rows[0]["flat_ms"] as! Double, grouped * 1e3, accuracy: 1e-9, "8 ranks fit in one machine")
        XCTAssertEqual(rows[1]["grouped_ms"] as! Double, grouped * 1e3, accuracy: 1e-9)
        XCTAssertEqual(rows[1]["flat_ms"] as! Double, flat * 1e3, accuracy: 1e-9)

        let wrongRanks = try write("four.json", alpha: 1e-6, beta: 1e-10, ranks: 4)
        for (arguments, expected) in [(["--shm", wrongRanks, "--net", net], "needs a 2-rank run"),
                                      (["--shm", shm, "--net", directory + "/missing.json"], "missing.json"),
                                      (["--shm", shm, "--net", net, "--models", "vgg"], "unknown model 'vgg'")] {
            let bad = try runProcess("/usr/bin/python3", [tool] + arguments, timeout: 60)
            XCTAssertEqual(bad.status, 2, describe(bad))
            XCTAssertEqual(bad.stderr.split(separator: "\n").count, 1, bad.stderr)
            XCTAssertTrue(bad.stderr.contains(expected), bad.stderr)
        }
    }
}
