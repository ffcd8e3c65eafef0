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

    /// Opens `path`; with `append` (a resumed run) the earlier history is kept and every line is
    /// appended (`O_APPEND`: concurrent appenders never overwrite each other's lines). A partial
    /// last line (a kill or a full disk in the middle of a write) is cut off first
    /// (``repairedPartialLine``). With `history`, an existing file whose first line records
    /// another run's configuration is refused: its history is not this run's.
    ///
    /// With `purgingAfter` (the step a resumed run continues from), lines of later steps — the
    /// steps the resumed run replays, logged by the run that was interrupted after its last
    /// checkpoint — are removed first (TensorBoard's `purge_step`), so the history holds each step
    /// once (``purgedLines``). The file is rewritten beside itself and renamed into place.
    public init(path: String, append: Bool = false, history configuration: TrainingConfiguration? = nil, ranks: Int? = nil,
                allowing allowed: Set<String> = [], purgingAfter purgeStep: Int? = nil) throws {
        try checkReplaceableOutput(path)
        if append, let existing = FileManager.default.contents(atPath: path), !existing.isEmpty {
            if let configuration, let first = existing.split(separator: UInt8(ascii: "\n"), maxSplits: 1).first,
               let object = try? JSONSerialization.jsonObject(with: Data(first)) as? [String: Any],
               let stored = object["configuration"],
               let storedData = try? JSONSerialization.data(withJSONObject: stored, options: [.sortedKeys]),
               let storedConfiguration = try? JSONDecoder().decode(TrainingConfiguration.self, from: storedData),
               let difference = storedConfiguration.trajectoryDifference(from: configuration, ranks: object["ranks"] as? Int, otherRanks: ranks,
                                                                         allowing: allowed) {
                throw DataError("⟨metrics⟩ \(path) holds the history of another run (its \(difference)); give another file, or pass --overwrite-metrics to replace it")
            }
            if existing.last != UInt8(ascii: "\n") {
                let keep = existing.lastIndex(of: UInt8(ascii: "\n")).map { $0 + 1 } ?? 0
                guard truncate(path, off_t(keep)) == 0 else {
                    throw DataError("⟨metrics⟩ \(path): cannot cut its partial last line: \(String(cString: strerror(errno)))")
                }
                repairedPartialLine = true
            }
            if let purgeStep {
                let lines = existing.prefix(existing.lastIndex(of: UInt8(ascii: "\n")).map { $0 + 1 } ?? 0)
                    .split(separator: UInt8(ascii: "\n"), omittingEmptySubsequences: true)
                let kept = lines.filter { line in
                    guard let object = try? JSONSerialization.jsonObject(with: Data(line)) as? [String: Any],
                          let step = object["step"] as? Int else { return true }
                    return step <= purgeStep
                }
                if kept.count < lines.count {
                    var text = Data()
                    for line in kept { text.append(contentsOf: line); text.append(UInt8(ascii: "\n")) }
                    try Self.replace(path, with: text)
                    purgedLines = lines.count - kept.count
                }
            }
        }
        let fd = open(path, O_WRONLY | O_CREAT | O_CLOEXEC | (append ? O_APPEND : O_TRUNC), 0o644)
        guard fd >= 0 else { throw DataError("⟨metrics⟩ \(path): cannot open the file for writing: \(String(cString: strerror(errno)))") }
        self.handle = FileHandle(fileDescriptor: fd, closeOnDealloc: true)
        self.path = path
    }

    /// Whether opening cut off a partial last line.
    public private(set) var repairedPartialLine = false

    /// How many lines of steps after `purgingAfter` opening removed.
    public private(set) var purgedLines = 0

    /// Writes `data` to a temporary file beside `path`, flushes it and renames it over `path`: a
    /// crash at any moment leaves the old file or the new one.
    static func replace(_ path: String, with data: Data) throws {
        let url = URL(fileURLWithPath: path)
        let temporary = url.deletingLastPathComponent().appendingPathComponent(".\(url.lastPathComponent).partial-\(getpid())").path
        let fd = open(temporary, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC | O_NOFOLLOW, 0o644)
        guard fd >= 0 else { throw DataError("⟨metrics⟩ \(path): cannot rewrite it: \(String(cString: strerror(errno)))") }
        let written = data.withUnsafeBytes { raw in raw.count == 0 ? 0 : Glibc.write(fd, raw.baseAddress, raw.count) }
        let synced = fsync(fd) == 0
        close(fd)
        guard written == data.count, synced, rename(temporary, path) == 0 else {
            let reason = String(cString: strerror(errno))
            unlink(temporary)
            throw DataError("⟨metrics⟩ \(path): cannot rewrite it: \(reason)")
        }
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
    public func writeStart(configuration: TrainingConfiguration, ranks: Int, resumedAt: Int?,
                           convolutionBackends: [ConvolutionBackend]? = nil) throws {
        let encoded = try JSONEncoder().encode(configuration)
        let object = try JSONSerialization.jsonObject(with: encoded)
        var line: [String: Any] = ["event": resumedAt == nil ? "start" : "resume", "configuration": object, "ranks": ranks,
                                   "version": syncbnVersion]
        if let resumedAt { line["step"] = resumedAt }
        if let convolutionBackends {
            line["conv_backends"] = convolutionBackends.listText
            line["cpu_isa"] = OneDNNConvolution.cpuISA
        }
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
