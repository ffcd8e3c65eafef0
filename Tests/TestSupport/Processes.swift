import Foundation

/// The output of a finished child process.
public struct ProcessResult {
    public let status: Int32
    public let stdout: String
    public let stderr: String
    public let seconds: Double
    /// True when the watchdog had to kill the process.
    public let timedOut: Bool
}

/// Where `swift build`/`swift test` put the package's executables: beside the test bundle.
public var productsDirectory: String {
    let bundle = Bundle.allBundles.first { $0.bundlePath.hasSuffix(".xctest") }?.bundlePath ?? CommandLine.arguments[0]
    return URL(fileURLWithPath: bundle).deletingLastPathComponent().path
}

/// Runs `executable` with `arguments`, killing it (and its process group) after `timeout`
/// seconds so that a hang fails the test quickly instead of stalling the suite. With
/// `killWhen`, polled every 2 ms, the process is killed with SIGKILL as soon as it returns true
/// (a crash at a moment the test chooses).
public func runProcess(_ executable: String, _ arguments: [String], environment extra: [String: String] = [:],
                       timeout: Double, directory: String? = nil, killWhen: (() -> Bool)? = nil) throws -> ProcessResult {
    let process = Process()
    process.executableURL = URL(fileURLWithPath: executable)
    process.arguments = arguments
    var environment = ProcessInfo.processInfo.environment
    // A test run may itself be started by mpirun; the child must decide for itself.
    for key in environment.keys where key.hasPrefix("OMPI_") || key.hasPrefix("PMIX_") || key.hasPrefix("PMI_") {
        environment.removeValue(forKey: key)
    }
    // Tests compare runs bit for bit: `auto` could time its way to other backends in two runs,
    // so the programs' default is pinned to im2col (the tests' small layers are what it is fastest
    // for); the tests of oneDNN and of auto pass --conv-backend or set the variable themselves.
    if environment["SYNCBN_CONV_BACKEND"] == nil { environment["SYNCBN_CONV_BACKEND"] = "im2col" }
    environment.merge(extra) { $1 }
    process.environment = environment
    if let directory { process.currentDirectoryURL = URL(fileURLWithPath: directory) }
    let out = Pipe(), err = Pipe()
    process.standardOutput = out
    process.standardError = err
    let outData = DataCollector(out.fileHandleForReading), errData = DataCollector(err.fileHandleForReading)
    let started = Date()
    // Signalled by Foundation when the child exits (waitUntilExit spins a run loop and took most
    // of a core, which an oversubscribed mpirun job then lacks).
    let finished = DispatchSemaphore(value: 0)
    process.terminationHandler = { _ in finished.signal() }
    try process.run()
    var timedOut = false
    var done = false
    if let killWhen {
        let deadline = Date().addingTimeInterval(timeout)
        while Date() < deadline {
            if finished.wait(timeout: .now() + 0.002) == .success { done = true; break }
            if killWhen() {
                kill(process.processIdentifier, SIGKILL)
                done = finished.wait(timeout: .now() + 10) == .success
                break
            }
        }
    }
    if !done && finished.wait(timeout: .now() + (killWhen == nil ? timeout : 0)) == .timedOut {
        timedOut = true
        kill(-process.processIdentifier, SIGKILL)
        process.terminate()
        kill(process.processIdentifier, SIGKILL)
        _ = finished.wait(timeout: .now() + 10)
    }
    return ProcessResult(status: process.terminationStatus, stdout: outData.text(), stderr: errData.text(),
                         seconds: Date().timeIntervalSince(started), timedOut: timedOut)
}

/// Drains a pipe on a background queue so a chatty child never blocks on a full pipe.
final class DataCollector: @unchecked Sendable {
    private var data = Data()
    private let lock = NSLock()
    private let done = DispatchSemaphore(value: 0)

    init(_ handle: FileHandle) {
        DispatchQueue.global().async {
            while true {
                let chunk = handle.availableData
                if chunk.isEmpty { break }
                self.lock.lock(); self.data.append(chunk); self.lock.unlock()
            }
            self.done.signal()
        }
    }

    func text() -> String {
        _ = done.wait(timeout: .now() + 10)
        lock.lock(); defer { lock.unlock() }
        return String(decoding: data, as: UTF8.self)
    }
}
