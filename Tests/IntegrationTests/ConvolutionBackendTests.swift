import Foundation
import Kernels
import TestSupport
import Training
import XCTest

/// `--conv-backend`: auto's choice printed, stored and kept by a resume; naming the choice
/// repeats it bit for bit; wrong lists refused; the benchmarks name the backend and the CPU.
final class ConvolutionBackendTests: XCTestCase {
    var dir = ""
    override func setUp() { dir = temporaryDirectory("syncbn-conv-backend") }
    override func tearDown() { try? FileManager.default.removeItem(atPath: dir) }

    let common = ["--model", "resnet20", "--width", "0.25", "--data", "synthetic:train=256,heldout=32", "--batch-size", "8",
                  "--seed", "4", "--lr-schedule", "constant", "--warmup-steps", "0", "--eval-stats", "ema"]

    /// The list auto printed, from its "repeat with --conv-backend LIST" line.
    func printedChoice(_ stderr: String) -> String? {
        guard let range = stderr.range(of: "repeat with --conv-backend ") else { return nil }
        return String(stderr[range.upperBound...].prefix { !$0.isWhitespace })
    }

    func testAutoChoosesPerLayerStoresTheChoiceAndAResumeOrTheNamedListRepeatsItBitForBit() throws {
        let half = dir + "/half.safetensors", resumed = dir + "/resumed.safetensors", named = dir + "/named.safetensors"
        let metrics = dir + "/metrics.jsonl"
        let first = try Harness.mpi(2, Harness.train, common + ["--steps", "4", "--conv-backend", "auto", "--save", half, "--metrics", metrics])
        XCTAssertEqual(first.status, 0, describe(first))
        XCTAssertTrue(first.stderr.contains("(timed at batch 8;"), describe(first))
        let choice = try XCTUnwrap(printedChoice(first.stderr), describe(first))
        let backends = choice.split(separator: ",").map(String.init)
        XCTAssertEqual(backends.count, 21, "ResNet-20 has 19 3×3 and 2 projection convolutions: \(choice)")
        XCTAssertTrue(backends.allSatisfy { $0 == "im2col" || $0 == "onednn" }, choice)
        XCTAssertEqual(try Safetensors.metadata(half)["conv_backends"], choice)
        let start = try String(contentsOfFile: metrics, encoding: .utf8).split(separator: "\n").first.map(String.init) ?? ""
        let line = try JSONSerialization.jsonObject(with: Data(start.utf8)) as? [String: Any]
        XCTAssertEqual(line?["conv_backends"] as? String, choice)
        XCTAssertEqual(line?["cpu_isa"] as? String, OneDNNConvolution.cpuISA)

        // A resume with auto keeps the checkpoint's choice; a fresh run naming the list computes the same.
        let second = try Harness.mpi(2, Harness.train, common + ["--steps", "8", "--conv-backend", "auto", "--resume", half, "--save", resumed])
        XCTAssertEqual(second.status, 0, describe(second))
        XCTAssertTrue(second.stderr.contains("(from the checkpoint;"), describe(second))
        XCTAssertEqual(try Safetensors.metadata(resumed)["conv_backends"], choice)
        let straight = try Harness.mpi(2, Harness.train, common + ["--steps", "8", "--conv-backend", choice, "--save", named])
        XCTAssertEqual(straight.status, 0, describe(straight))
        XCTAssertTrue(straight.stderr.contains("(set;"), describe(straight))
        let a = try checkpointBits(resumed), b = try checkpointBits(named)
        XCTAssertEqual(a.keys.sorted(), b.keys.sorted())
        XCTAssertEqual(a.keys.sorted().filter { a[$0] != b[$0] }, [], "resumed with auto against the named list")
    }

    func testAListOfTheWrongLengthAndAnUnknownBackendAreOneLineErrors() throws {
        let short = try Harness.direct(Harness.train, common + ["--steps", "1", "--conv-backend", "onednn,im2col"])
        XCTAssertEqual(short.status, 2, describe(short))
        XCTAssertTrue(short.stderr.contains("lists 2 backend(s), but the model has 21 convolution(s)"), describe(short))
        XCTAssertTrue(short.stderr.contains("--conv-backend"), describe(short))
        let unknown = try Harness.direct(Harness.train, common + ["--steps", "1", "--conv-backend", "cudnn"])
        XCTAssertEqual(unknown.status, 64, describe(unknown))
        XCTAssertTrue(unknown.stderr.contains("--conv-backend"), describe(unknown))
        let environment = try runProcess(Harness.train, common + ["--steps", "1"], environment: ["SYNCBN_CONV_BACKEND": "fast"], timeout: 60)
        XCTAssertEqual(environment.status, 64, describe(environment))
        XCTAssertTrue(environment.stderr.contains("SYNCBN_CONV_BACKEND='fast'"), describe(environment))
    }

    /// `bench conv` and `bench train` with each backend: their JSON names it and the CPU's ISA.
    func testTheBenchmarksNameTheBackendAndTheCPU() throws {
        for backend in ["im2col", "onednn"] {
            let conv = try Harness.direct(Harness.bench, ["conv", "--shape", "4,8,12,12", "--out-channels", "8", "--repeat", "2", "--backend", backend])
            XCTAssertEqual(conv.status, 0, describe(conv))
            let record = try XCTUnwrap(try JSONSerialization.jsonObject(with: Data(conv.stdout.utf8)) as? [String: Any], describe(conv))
            XCTAssertEqual(record["backend"] as? String, backend)
            XCTAssertEqual(record["cpu_isa"] as? String, OneDNNConvolution.cpuISA)
            XCTAssertGreaterThan(record["forward_s"] as? Double ?? 0, 0)
            if backend == "onednn" { XCTAssertFalse((record["onednn_implementations"] as? [String] ?? []).isEmpty, describe(conv)) }
            let train = try Harness.direct(Harness.bench, ["train", "--model", "convnet", "--norms", "bn", "--steps", "2", "--warmup", "1",
                                                           "--batch-size", "8", "--conv-backend", backend])
            XCTAssertEqual(train.status, 0, describe(train))
            let line = try XCTUnwrap(train.stdout.split(separator: "\n").last.map(String.init), describe(train))
            let trainRecord = try XCTUnwrap(try JSONSerialization.jsonObject(with: Data(line.utf8)) as? [String: Any], describe(train))
            let run = try XCTUnwrap((trainRecord["runs"] as? [[String: Any]])?.first, describe(train))
            let used = (run["conv_backends"] as? String ?? "").split(separator: ",").map(String.init)
            XCTAssertFalse(used.isEmpty, describe(train))
            XCTAssertEqual(Set(used), [backend], describe(train))
            XCTAssertEqual(trainRecord["cpu_isa"] as? String, OneDNNConvolution.cpuISA)
        }
    }

    /// One thread per rank: a oneDNN primitive keeps the thread count it was created with, so one
    /// created before the rank's setting applied would run on every core. The benchmarks' CPU
    /// seconds per wall second stay near 1 with either backend (2 would be a second busy thread).
    /// OPENBLAS_NUM_THREADS=1 as the launchers pass it: without it OpenBLAS's pool threads, made
    /// when the library loads, spin for about 0.1 s before they sleep, a second busy thread in a
    /// short run that is not the convolutions'.
    func testConvolutionsRunOnOneThreadPerRank() throws {
        guard ProcessInfo.processInfo.activeProcessorCount >= 2 else {
            throw XCTSkip("needs 2 cores to tell one busy thread from two")
        }
        if let threads = ProcessInfo.processInfo.environment["OMP_NUM_THREADS"], threads != "1" {
            throw XCTSkip("OMP_NUM_THREADS=\(threads) asks oneDNN for other than one thread per rank")
        }
        for backend in ["im2col", "onednn"] {
            let conv = try runProcess(Harness.bench, ["conv", "--shape", "32,16,28,28", "--out-channels", "16", "--repeat", "30",
                                                      "--backend", backend, "--patch-statistics"],
                                      environment: ["OPENBLAS_NUM_THREADS": "1"], timeout: 120)
            XCTAssertEqual(conv.status, 0, describe(conv))
            let record = try XCTUnwrap(try JSONSerialization.jsonObject(with: Data(conv.stdout.utf8)) as? [String: Any], describe(conv))
            let threads = try XCTUnwrap(record["cpu_s_per_wall_s"] as? Double, describe(conv))
            XCTAssertLessThan(threads, 1.3, "bench conv \(backend): CPU seconds per wall second")
            let train = try runProcess(Harness.bench, ["train", "--model", "resnet20", "--norms", "bn,cbn", "--steps", "3", "--warmup", "1",
                                                       "--conv-backend", backend], environment: ["OPENBLAS_NUM_THREADS": "1"], timeout: 120)
            XCTAssertEqual(train.status, 0, describe(train))
            let line = try XCTUnwrap(train.stdout.split(separator: "\n").last.map(String.init), describe(train))
            let runs = try XCTUnwrap((try JSONSerialization.jsonObject(with: Data(line.utf8)) as? [String: Any])?["runs"] as? [[String: Any]], describe(train))
            XCTAssertEqual(runs.count, 2, describe(train))
            for run in runs {
                let perRank = try XCTUnwrap(run["cpu_s_per_wall_s"] as? [Double], describe(train))
                XCTAssertLessThan(perRank.max() ?? 9, 1.3, "bench train \(backend) \(run["norm"] ?? ""): CPU seconds per wall second")
            }
        }
    }
}
