import Foundation
import Kernels

/// JSON-lines metrics, written by rank 0 (DESIGN §4): one object per logged step
/// (`step`, `epoch`, `loss`, `accuracy`, `lr`, `samples_per_s`, `comm_s`) and one per evaluation
/// (`event: "eval"`, `stats`, `loss`, `accuracy`).
public final class MetricsWriter {
    private let handle: FileHandle
    public let path: String

    /// Opens `path`; with `append` (a resumed run) the earlier history is kept.
    public init(path: String, append: Bool = false) throws {
        try checkReplaceableOutput(path)
        if !(append && FileManager.default.fileExists(atPath: path)) {
            guard FileManager.default.createFile(atPath: path, contents: nil) else {
                throw DataError("--metrics \(path): cannot create the file")
            }
        }
        guard let handle = FileHandle(forWritingAtPath: path) else { throw DataError("--metrics \(path): cannot open the file for writing") }
        if append { handle.seekToEndOfFile() }
        self.handle = handle
        self.path = path
    }

    deinit { try? handle.close() }

    public func write(_ object: [String: Any]) {
        guard let data = try? JSONSerialization.data(withJSONObject: object, options: [.sortedKeys]) else { return }
        handle.write(data + Data("\n".utf8))
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
