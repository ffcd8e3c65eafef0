import Foundation
import Kernels
import TestSupport
import Training
import XCTest

/// The real binaries under real `mpirun`. Every process has a watchdog, so a hang fails fast.
final class MPIIntegrationTests: XCTestCase {
    var dir = ""
    override func setUp() { dir = temporaryDirectory("syncbn-integration") }
    override func tearDown() { try? FileManager.default.removeItem(atPath: dir) }

    /// Includes reductions bit for bit equal to the rank tree for every size 1–16.
    func testCollectivesPassTheConformanceSuiteUnderMpirunAtSizesOneToSixteen() throws {
        for ranks in 1...16 {
            let result = try Harness.mpi(ranks, Harness.bench, ["selftest", "--expect-size", String(ranks)], timeout: 60)
            XCTAssertEqual(result.status, 0, describe(result))
            XCTAssertTrue(result.stdout.contains("MPICommunicator size \(ranks): all checks passed"), describe(result))
        }
    }

    /// The exactness contract under real mpirun: W ranks × b gives bit for bit the checkpoint of
    /// 1 rank × W·b (every parameter, buffer, optimizer buffer, the EMA statistics kept beside
    /// PreciseBN's, and the cross-iteration windows, which every rank holds alike), for W = 2, 4, 8
    /// (SyncBN, CBN; 4 for the other norms) on ResNet-20 with crop+flip and the default recipe,
    /// 60 steps (two epochs), with oneDNN's convolutions and with im2col. Both sides run on this
    /// machine: nothing depends on which BLAS or oneDNN kernel the CPU gets.
    func testRanksTimesBatchGiveTheCheckpointOfOneRankWithTheWholeBatchBitForBit() throws {
        let base = ["--model", "resnet20", "--width", "0.25", "--augment", "crop,flip", "--steps", "60", "--seed", "3",
                    "--data", "synthetic:train=960,heldout=64", "--precise-bn-samples", "256"]
        let twoDomain = ["--data", "two-domain:synthetic:train=480,heldout=64", "--domain-bn"]
        let cases: [(String, [String], [Int])] = [
            // The tests' programs default to im2col (Processes.swift); oneDNN is the other backend (SyncBN
            // with oneDNN in-process: ExactnessTests).
            ("syncbn", ["--norm", "syncbn"], [2, 4, 8]),
            ("cbn-onednn", ["--norm", "cbn", "--cbn-window", "4", "--conv-backend", "onednn"], [4]),
            // CBN's default is the compensated gradient; the reference code's gradient is one flag away.
            ("cbn", ["--norm", "cbn", "--cbn-window", "4"], [2, 4, 8]),
            // The other norms on 4 ranks under mpirun: their 2- and 8-rank trees are checked
            // in-process (ExactnessTests, WorldSizeInvarianceTests); what mpirun adds is the transport.
            ("brn", ["--norm", "brn"], [4]),
            ("gn", ["--norm", "gn"], [4]),
            ("domain", ["--norm", "syncbn"] + twoDomain, [4]),
            ("ibn", ["--norm", "ibn"], [4]),
            ("cbn-reference-gradient", ["--norm", "cbn", "--cbn-gradient", "current"], [4]),
            ("rbn", ["--norm", "rbn"], [4]),
            ("wn", ["--norm", "wn"], [4]),
            ("wn-meanonly", ["--norm", "wn-meanonly"], [4]),
        ]
        for (label, options, worlds) in cases {
            let common = base + options
            let single = dir + "/\(label)-1.safetensors"
            let one = try Harness.direct(Harness.train, common + ["--batch-size", "32", "--save", single])
            XCTAssertEqual(one.status, 0, describe(one))
            let reference = try checkpointBits(single)
            XCTAssertFalse(reference.isEmpty)
            for ranks in worlds {
                let path = dir + "/\(label)-\(ranks).safetensors"
                let multi = try Harness.mpi(ranks, Harness.train, common + ["--batch-size", String(32 / ranks), "--save", path])
                XCTAssertEqual(multi.status, 0, describe(multi))
                XCTAssertTrue(multi.stderr.contains("\(ranks) rank(s) (MPI)"), describe(multi))
                var tensors = try checkpointBits(path)
                // Every rank's copy of a cross-iteration window is the group's, the single rank's.
                for name in tensors.keys where name.contains("cbn_window.rank") && !name.hasSuffix(".rank0") {
                    let first = String(name[..<name.range(of: ".rank")!.lowerBound]) + ".rank0"
                    XCTAssertEqual(tensors[name], tensors[first], "\(label) \(ranks) ranks: \(name)")
                    tensors[name] = nil
                }
                XCTAssertEqual(tensors.keys.sorted(), reference.keys.sorted(), "\(label) \(ranks) ranks")
                let differing = reference.keys.sorted().filter { tensors[$0] != reference[$0] }
                XCTAssertEqual(differing, [], "\(label): \(ranks) ranks × \(32 / ranks) against 1 × 32")
            }
        }
    }

    /// Shards that are not aligned powers of two. A short last batch whose pieces are single
    /// samples (611 = 19·32 + 3: step 20 gives ranks 1, 1, 1 and 0 samples) still cuts the tree at
    /// its leaves, so it stays bit-identical; 3 ranks × 5 against 1 × 15 cuts it elsewhere and is
    /// within rounding. Small gradient buckets: non-blocking reductions in flight during SyncBN's
    /// blocking ones.
    func testShardsThatAreNotPowersOfTwoStayExactOrWithinRounding() throws {
        let common = ["--data", "synthetic:train=611,heldout=64", "--steps", "22", "--seed", "4", "--bucket-size", "2000"]
        let a = dir + "/uneven-4.safetensors", b = dir + "/uneven-1.safetensors"
        let multi = try Harness.mpi(4, Harness.train, common + ["--batch-size", "8", "--save", a])
        XCTAssertEqual(multi.status, 0, describe(multi))
        let single = try Harness.direct(Harness.train, common + ["--batch-size", "32", "--save", b])
        XCTAssertEqual(single.status, 0, describe(single))
        let left = try checkpointBits(a), right = try checkpointBits(b)
        XCTAssertEqual(left.keys.sorted(), right.keys.sorted())
        XCTAssertEqual(left.keys.sorted().filter { left[$0] != right[$0] }, [], "a short last batch of single-sample pieces")

        let odd = ["--data", "synthetic:train=600,heldout=64", "--steps", "20", "--seed", "4"]
        let c = dir + "/odd-3.safetensors", d = dir + "/odd-1.safetensors"
        let three = try Harness.mpi(3, Harness.train, odd + ["--batch-size", "5", "--save", c])
        XCTAssertEqual(three.status, 0, describe(three))
        let one = try Harness.direct(Harness.train, odd + ["--batch-size", "15", "--save", d])
        XCTAssertEqual(one.status, 0, describe(one))
        let x = try checkpointTensors(c), y = try checkpointTensors(d)
        var largest = 0.0
        for (name, values) in x {
            let error = relativeError(values, y[name]!)
            largest = max(largest, error)
            XCTAssertLessThan(error, 1e-4, "3 × 5: \(name) differs by \(error)")
        }
        XCTAssertGreaterThan(largest, 0, "3 × 5 cuts the tree elsewhere: some bits differ (else this case tests nothing new)")
    }

    func testWithoutMpirunItRunsAsOneProcessWithoutInitialisingMPI() throws {
        let result = try Harness.direct(Harness.train, ["--data", "synthetic:train=256,heldout=64", "--steps", "5", "--batch-size", "16"])
        XCTAssertEqual(result.status, 0, describe(result))
        XCTAssertTrue(result.stderr.contains("1 rank(s) (single process, MPI not initialised)"), describe(result))
        XCTAssertTrue(result.stderr.contains("held-out accuracy"), describe(result))
    }

    func testSimulatedRanksMatchMPIRanks() throws {
        let common = ["--data", "synthetic:train=300,heldout=64", "--steps", "8", "--batch-size", "4"]
        let a = dir + "/mpi.safetensors", b = dir + "/sim.safetensors"
        let mpi = try Harness.mpi(3, Harness.train, common + ["--save", a])
        XCTAssertEqual(mpi.status, 0, describe(mpi))
        let simulated = try Harness.direct(Harness.train, common + ["--simulate-ranks", "3", "--save", b])
        XCTAssertEqual(simulated.status, 0, describe(simulated))
        XCTAssertTrue(simulated.stderr.contains("3 rank(s) (in-process threads)"), describe(simulated))
        let left = try checkpointTensors(a), right = try checkpointTensors(b)
        for (name, values) in left { XCTAssertLessThan(relativeError(values, right[name]!), 1e-5, name) }
    }

    func testResumeUnderMpirunContinuesBitIdentically() throws {
        // A run that is extended after it ended: the schedule must not depend on the total steps.
        let common = ["--data", "synthetic:train=200,heldout=32", "--batch-size", "8", "--norm", "bn", "--seed", "6",
                      "--lr-schedule", "constant", "--warmup-steps", "0"]
        let straight = dir + "/straight.safetensors", half = dir + "/half.safetensors", resumed = dir + "/resumed.safetensors"
        for args in [["--steps", "16", "--save", straight], ["--steps", "7", "--save", half], ["--steps", "16", "--resume", half, "--save", resumed]] {
            let result = try Harness.mpi(2, Harness.train, common + args)
            XCTAssertEqual(result.status, 0, describe(result))
        }
        let left = try checkpointTensors(straight), right = try checkpointTensors(resumed)
        XCTAssertEqual(left.keys.sorted(), right.keys.sorted())
        for (name, values) in left { XCTAssertEqual(values.map(\.bitPattern), right[name]!.map(\.bitPattern), name) }
    }

    func testRecomputeStatsUnderMpirunGivesEveryRankTheSameStatistics() throws {
        let trained = dir + "/trained.safetensors", mpi = dir + "/mpi.safetensors", simulated = dir + "/sim.safetensors"
        let train = try Harness.direct(Harness.train, ["--data", "synthetic:train=512,heldout=128", "--steps", "12", "--batch-size", "16",
                                                       "--eval-stats", "ema", "--save", trained])
        XCTAssertEqual(train.status, 0, describe(train))
        let common = ["recompute-stats", "--resume", trained, "--precise-bn-samples", "512", "--precise-bn-batch-size", "32"]
        let multi = try Harness.mpi(4, Harness.train, common + ["--save", mpi])
        XCTAssertEqual(multi.status, 0, describe(multi))   // exits non-zero if the ranks' replicas differ
        XCTAssertTrue(multi.stderr.contains("512 samples in 4 batches on 4 rank(s)"), describe(multi))
        let threads = try Harness.direct(Harness.train, common + ["--save", simulated, "--simulate-ranks", "4"])
        XCTAssertEqual(threads.status, 0, describe(threads))
        let before = try checkpointTensors(trained), left = try checkpointTensors(mpi), right = try checkpointTensors(simulated)
        let (_, metadata) = try Safetensors.read(mpi)
        XCTAssertEqual(metadata["statistics"], "precise")
        for name in left.keys where name.hasSuffix("running_var") && !name.hasPrefix("ema.") {
            XCTAssertLessThan(relativeError(left[name]!, right[name]!), 1e-6, name)
            XCTAssertGreaterThan(relativeError(left[name]!, before[name]!), 1e-4, "\(name) was not recomputed")
            XCTAssertEqual(left["ema." + name], before[name], "the EMA is kept beside")
        }
    }

    func testExportFoldedWritesABatchNormFreeModelWithTheSameLogits() throws {
        let trained = dir + "/trained.safetensors", folded = dir + "/folded.safetensors"
        let train = try Harness.direct(Harness.train, ["--data", "synthetic:train=256,heldout=64", "--steps", "8", "--batch-size", "16", "--save", trained])
        XCTAssertEqual(train.status, 0, describe(train))
        let export = try Harness.direct(Harness.train, ["export-folded", "--resume", trained, "--out", folded])
        XCTAssertEqual(export.status, 0, describe(export))
        XCTAssertTrue(export.stderr.contains("3 normalization layers folded"), describe(export))
        let (tensors, metadata) = try Safetensors.read(folded)
        XCTAssertEqual(metadata["format"], "syncbn-folded-1")
        XCTAssertFalse(tensors.keys.contains { $0.contains(".bn.") }, "\(tensors.keys.sorted())")
        XCTAssertEqual(tensors["features.0.conv.bias"]?.shape, [16])
        let reported = export.stderr.components(separatedBy: "differ by ").last?.split(separator: " ").first.flatMap { Double($0) }
        XCTAssertNotNil(reported)
        XCTAssertLessThan(reported ?? 1, 1e-5)
    }

    /// `syncbn-bench layer` on 13×8×5×5 input with per-channel mean 1e4 and std 1, split 4/3/3/3
    /// over 4 ranks, against a float64 two-pass reference on the same Float32 values.
    func testBenchLayerMatchesAFloat64ReferenceWhenTheMeanDwarfsTheSpread() throws {
        let shape = [13, 8, 5, 5]
        var random = DeterministicRandom(seed: 42)
        let x = Tensor<Float>(shape: shape, scalars: (0..<(13 * 200)).map { i in Float(1e4 + Double((i / 25) % 8) + random.normal()) })
        let dy = Tensor<Float>(shape: shape, scalars: (0..<(13 * 200)).map { _ in Float(random.normal()) })
        let gamma = Tensor<Float>(shape: [8], scalars: (0..<8).map { 0.5 + Float($0) * 0.25 })
        let beta = Tensor<Float>(shape: [8], scalars: (0..<8).map { Float($0) - 3 })
        for (name, t) in [("x", x), ("dy", dy), ("gamma", gamma), ("beta", beta)] { try writeNumpy(t, to: "\(dir)/\(name).npy") }
        let out = dir + "/out"
        let result = try Harness.mpi(4, Harness.bench, ["layer", "--input", dir + "/x.npy", "--grad", dir + "/dy.npy",
                                                        "--gamma", dir + "/gamma.npy", "--beta", dir + "/beta.npy",
                                                        "--norm", "syncbn", "--out", out])
        XCTAssertEqual(result.status, 0, describe(result))

        // Reference: two passes in Double on the Float32 values.
        let M = 13.0 * 25, eps = 1e-5
        let xs = x.scalars.map(Double.init), dys = dy.scalars.map(Double.init)
        let gs = gamma.scalars.map(Double.init), bs = beta.scalars.map(Double.init)
        func channel(_ i: Int) -> Int { (i / 25) % 8 }
        var mean = [Double](repeating: 0, count: 8), variance = mean
        for i in 0..<xs.count { mean[channel(i)] += xs[i] / M }
        for i in 0..<xs.count {
            let d = xs[i] - mean[channel(i)]
            variance[channel(i)] += d * d / M
        }
        let invStd = variance.map { 1 / ($0 + eps).squareRoot() }
        var xhat = [Double](repeating: 0, count: xs.count), y = xhat, dx = xhat
        var sumDy = [Double](repeating: 0, count: 8), sumDyXhat = sumDy
        for i in 0..<xs.count {
            let c = channel(i)
            xhat[i] = (xs[i] - mean[c]) * invStd[c]
            y[i] = gs[c] * xhat[i] + bs[c]
            sumDy[c] += dys[i]
            sumDyXhat[c] += dys[i] * xhat[i]
        }
        for i in 0..<xs.count {
            let c = channel(i)
            dx[i] = gs[c] * invStd[c] * (dys[i] - sumDy[c] / M - xhat[i] * sumDyXhat[c] / M)
        }
        func read(_ name: String) throws -> [Double] { try NumpyArray(contentsOf: "\(out)/\(name).npy").doubles() }
        XCTAssertLessThan(relativeError(try read("mean"), mean), 1e-6)
        XCTAssertLessThan(relativeError(try read("var"), variance), 1e-6)
        XCTAssertLessThan(relativeError(try read("y"), y), 1e-4)
        XCTAssertLessThan(relativeError(try read("dx"), dx), 1e-4)
        XCTAssertLessThan(relativeError(try read("dgamma"), sumDyXhat), 1e-4)
        XCTAssertLessThan(relativeError(try read("dbeta"), sumDy), 1e-5)
        XCTAssertLessThan(relativeError(try read("running_mean"), mean.map { 0.1 * $0 }), 1e-6)
        XCTAssertLessThan(relativeError(try read("running_var"), variance.map { 0.9 + 0.1 * $0 * M / (M - 1) }), 1e-6)
    }

    func testARankThatDiesEndsTheWholeJobWithinSeconds() throws {
        guard let mpirun = Harness.mpirun else { throw XCTSkip("mpirun is not installed") }
        let metrics = dir + "/m.jsonl"
        let process = Process()
        process.executableURL = URL(fileURLWithPath: mpirun)
        process.arguments = Harness.mpirunArguments(ranks: 4) + [Harness.train, "--steps", "100000", "--log-every", "1", "--metrics", metrics]
        let err = Pipe()
        process.standardError = err
        process.standardOutput = FileHandle.nullDevice
        try process.run()
        defer { if process.isRunning { kill(process.processIdentifier, SIGKILL) } }
        // Wait until training is under way (a metrics line), at most 60 s.
        let started = Date()
        while (try? String(contentsOfFile: metrics, encoding: .utf8))?.contains("\"step\"") != true {
            XCTAssertLessThan(Date().timeIntervalSince(started), 60, "training never started")
            if Date().timeIntervalSince(started) > 60 || !process.isRunning { return }
            usleep(100_000)
        }
        let children = try runProcess("/usr/bin/pgrep", ["-P", String(process.processIdentifier), "syncbn-train"], timeout: 10)
        let pids = children.stdout.split(separator: "\n").compactMap { Int32($0) }
        XCTAssertEqual(pids.count, 4, "expected 4 ranks as children of mpirun: \(children.stdout)")
        guard let victim = pids.last else { return }
        kill(victim, SIGKILL)
        let killed = Date()
        while process.isRunning && Date().timeIntervalSince(killed) < 30 { usleep(50_000) }
        let seconds = Date().timeIntervalSince(killed)
        XCTAssertFalse(process.isRunning, "the job still runs \(seconds) s after a rank died")
        if process.isRunning { return }
        XCTAssertNotEqual(process.terminationStatus, 0)
        XCTAssertLessThan(seconds, 15)
        let message = String(decoding: err.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
        XCTAssertTrue(message.contains("signal 9") || message.contains("Killed") || message.contains("exited"), message)
    }
}
