import Foundation
#if canImport(Glibc)
import Glibc
#endif
import Kernels

/// The version of syncbn, written into metrics files.
public let syncbnVersion = "0.3.0"

/// JSON-lines metrics, written by rank 0 (DESIGN §4): a first line with the configuration
/// (`event: "start"` or `"resume"`), one object per logged interval (`step`, `epoch`, `steps`,
/// `loss` and `accuracy` averaged over the interval's samples, `lr` of its last step,
/// `samples_per_s`, `comm_s`) and one per evaluation (`event: "eval"`, `stats`, `loss`, `accuracy`).
public final class MetricsWriter {
    private let handle: FileHandle
    public let path: String

    /// Opens `path`; with `append` (a resumed run) the earlier history is kept.
    public init(path: String, append: Bool = false) throws {
        try checkReplaceableOutput(path)
        if !(append && FileManager.default.fileExists(atPath: path)) {
            guard FileManager.default.createFile(atPath: path, contents: nil) else {
                throw DataError("⟨metrics⟩ \(path): cannot create the file")
            }
        }
        guard let handle = FileHandle(forWritingAtPath: path) else { throw DataError("⟨metrics⟩ \(path): cannot open the file for writing") }
        if append { handle.seekToEndOfFile() }
        self.handle = handle
        self.path = path
    }

    /// Opens an existing file (or device) for writing as it is, for tests of write errors.
    public init(deviceForTesting path: String) throws {
        guard let handle = FileHandle(forWritingAtPath: path) else { throw DataError("⟨metrics⟩ \(path): cannot open the file for writing") }
        self.handle = handle
        self.path = path
    }

    deinit { try? handle.close() }

    /// Appends one JSON line. A write error (a full disk) is a ``DataError`` naming the file
    /// and the reason, never a trap.
    public func write(_ object: [String: Any]) throws {
        guard let data = try? JSONSerialization.data(withJSONObject: object, options: [.sortedKeys]) else { return }
        let line = [UInt8](data + Data("\n".utf8))
        let fd = handle.fileDescriptor
        var offset = 0
        while offset < line.count {
            let n = line.withUnsafeBytes { Glibc.write(fd, $0.baseAddress! + offset, line.count - offset) }
            if n < 0 {
                if errno == EINTR { continue }
                throw DataError("⟨metrics⟩ \(path): cannot write: \(String(cString: strerror(errno)))")
            }
            offset += n
        }
    }

    /// The first line of a run (or of its continuation): the whole configuration, the number of
    /// ranks, the version and, for a resumed run, the step it resumed at.
    public func writeStart(configuration: TrainingConfiguration, ranks: Int, resumedAt: Int?) throws {
        let encoded = try JSONEncoder().encode(configuration)
        let object = try JSONSerialization.jsonObject(with: encoded)
        var line: [String: Any] = ["event": resumedAt == nil ? "start" : "resume", "configuration": object, "ranks": ranks,
                                   "version": syncbnVersion]
        if let resumedAt { line["step"] = resumedAt }
        try write(line)
    }
}

/// Progress on stderr: a live line on a terminal, plain lines otherwise.
public final class ProgressReporter {
    private let live: Bool
    private var lastPrinted = Date.distantPast
    private var lineOpen = false

    public init(live: Bool = isatty(2) != 0) {
        self.live = live
    }

    /// A progress update: on a terminal it redraws the live line (at most 5 times a second, and
    /// always for the `final` one); otherwise it prints a line only when `milestone`.
    public func step(_ text: String, milestone: Bool, final: Bool = false) {
        if live {
            let now = Date()
            guard final || now.timeIntervalSince(lastPrinted) > 0.2 else { return }
            lastPrinted = now
            FileHandle.standardError.write(Data(("\r\u{1B}[K" + text).utf8))
            lineOpen = true
        } else if milestone || final {
            line(text)
        }
    }

    public func line(_ text: String) {
        if lineOpen { FileHandle.standardError.write(Data("\r\u{1B}[K".utf8)); lineOpen = false }
        FileHandle.standardError.write(Data((text + "\n").utf8))
    }
}
