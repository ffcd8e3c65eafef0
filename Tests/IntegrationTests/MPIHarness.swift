import Foundation
import TestSupport
import Training
import XCTest

/// Starts the package's real binaries, alone or under `mpirun`, each with a watchdog.
enum Harness {
    /// The package's top-level directory (README, launch/, tools/).
    static var repositoryRoot: String {
        URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent().path
    }
    static var train: String { productsDirectory + "/syncbn-train" }
    static var bench: String { productsDirectory + "/syncbn-bench" }

    static var mpirun: String? {
        for path in ["/usr/bin/mpirun", "/usr/local/bin/mpirun"] where FileManager.default.isExecutableFile(atPath: path) { return path }
        return nil
    }

    /// mpirun's own flags for `ranks` ranks on this machine: root needs --allow-run-as-root, more
    /// ranks than cores need --oversubscribe (and idle ranks should yield the core).
    static func mpirunArguments(ranks: Int) -> [String] {
        var args = ["-n", String(ranks), "--bind-to", "none", "-x", "OPENBLAS_NUM_THREADS=1"]
        if getuid() == 0 { args.append("--allow-run-as-root") }
        if ranks > ProcessInfo.processInfo.activeProcessorCount { args += ["--oversubscribe", "--mca", "mpi_yield_when_idle", "1"] }
        return args
    }

    static func mpi(_ ranks: Int, _ executable: String, _ arguments: [String], timeout: Double = 120) throws -> ProcessResult {
        guard let mpirun else { throw XCTSkip("mpirun is not installed (launch/setup installs it)") }
        return try runProcess(mpirun, mpirunArguments(ranks: ranks) + [executable] + arguments, timeout: timeout)
    }

    static func direct(_ executable: String, _ arguments: [String], timeout: Double = 120) throws -> ProcessResult {
        try runProcess(executable, arguments, timeout: timeout)
    }
}

/// The PIDs of the running syncbn-train processes whose command line contains `tag` (a test's
/// directory, say): the ranks of that test's job.
func trainProcesses(matching tag: String) -> [Int32] {
    let entries = (try? FileManager.default.contentsOfDirectory(atPath: "/proc")) ?? []
    return entries.compactMap(Int32.init).filter { pid in
        let comm = (try? String(contentsOfFile: "/proc/\(pid)/comm", encoding: .utf8)) ?? ""
        let cmdline = (try? String(contentsOfFile: "/proc/\(pid)/cmdline", encoding: .utf8)) ?? ""
        return comm.hasPrefix("syncbn-train") && cmdline.contains(tag)
    }
}

/// Every float tensor of a checkpoint by name.
func checkpointTensors(_ path: String) throws -> [String: [Float]] {
    let (tensors, _) = try Safetensors.read(path)
    var out: [String: [Float]] = [:]
    for (name, tensor) in tensors { out[name] = tensor.floats ?? [Float(tensor.int64 ?? -1)] }
    return out
}

/// Every tensor of a checkpoint as its raw bytes (dtype and shape included): for bit-for-bit comparisons.
func checkpointBits(_ path: String) throws -> [String: [UInt8]] {
    let (tensors, _) = try Safetensors.read(path)
    var out: [String: [UInt8]] = [:]
    for (name, tensor) in tensors { out[name] = Array("\(tensor.dtype.rawValue)\(tensor.shape):".utf8) + tensor.bytes }
    return out
}

func describe(_ result: ProcessResult) -> String {
    "exit \(result.status)\(result.timedOut ? " (killed by the watchdog)" : "") after \(String(format: "%.1f", result.seconds)) s\nstderr: \(result.stderr.suffix(2000))\nstdout: \(result.stdout.suffix(500))"
}
